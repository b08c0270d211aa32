//! One batch from its journal record to the version served: steps, the guard, snapshots, the
//! store's bookkeeping, publishing, and a checkpoint when one is due.

use std::sync::{Arc, PoisonError};

use super::guard::Check;
use super::learner::Worker;
use super::publisher::{Publish, Publisher};
use super::Result;
use crate::learn::engine::UpdatedGroup;
use crate::learn::history::Step;
use crate::learn::{Doc, UpdateReport};
use crate::model::GroupId;
use crate::snapshot::Snapshot;

/// An update now served: the version it was made from and the snapshot it became.
struct Served {
    parent: u64,
    published: Arc<Snapshot>,
}

impl Worker {
    /// Learns `docs` in steps of at most `batch_size`, serving each update the guard lets
    /// through, then records journal record `seq` (when the server is durable) as applied, and
    /// checkpoints when one is due. A batch that fails, or panics, is applied all the same: it
    /// fails as it did when it first arrived, and replaying it would only fail again.
    pub(super) fn update(&mut self, seq: Option<u64>, docs: &[Doc]) -> Result<Vec<UpdateReport>> {
        let mut reports = Vec::new();
        let learned = self.guarded(|w| {
            for chunk in docs.chunks(w.setup.batch_size) {
                reports.push(w.step(chunk)?);
            }
            Ok(())
        });
        if let Some(seq) = seq {
            self.applied(seq);
        }
        learned.map(|()| reports)
    }

    /// One learning step, served unless the guard rejects it.
    fn step(&mut self, docs: &[Doc]) -> Result<UpdateReport> {
        let span = tracing::info_span!("update", documents = docs.len());
        let _entered = span.enter();
        let mut report = self.learner.step(docs)?;
        let (canary, served) = if report.applied {
            self.serve_update(&mut report)?
        } else {
            (None, None)
        };
        let step = Step::of(&report, canary);
        if let Some(s) = served {
            self.publish_delta(s.parent, &s.published, &step);
        }
        self.setup.history.record(step);
        self.setup.metrics.stepped(&report);
        tracing::info!(
            version = report.version,
            applied = report.applied,
            groups = report.groups.len(),
            loss_before = report.loss_before,
            loss_after = report.loss_after,
            rehearsed = report.rehearsed,
            seconds = report.seconds,
            "update step"
        );
        let mut progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        progress.steps += 1;
        progress.selection = self.learner.selection().unwrap_or_default().to_vec();
        Ok(report)
    }

    /// Publishes the step's weights as the next snapshot, or, when the guard rejects them,
    /// reverts the step before anything saw it. Answers the guard's canary check, when it made
    /// one, and the version served before with the snapshot now served, when the update is.
    fn serve_update(
        &mut self,
        report: &mut UpdateReport,
    ) -> Result<(Option<Check>, Option<Served>)> {
        let changed: Vec<GroupId> = report.groups.iter().map(UpdatedGroup::id).collect();
        let weights = self.learner.current_params()?;
        let current = self.setup.snapshots.current();
        let next = current.after_update(report.version, &changed, &weights)?;
        let check = self.canary_check(&current, &next)?;
        let max_ratio = self
            .setup
            .guard
            .as_ref()
            .map_or(f64::INFINITY, |g| g.max_ratio);
        // A canary perplexity that is no longer finite fails too (NaN > max is false).
        if let Some(check) = check.filter(|c| c.fails(max_ratio)) {
            self.canary = Some((current.version(), check.before));
            self.learner.revert()?;
            report.applied = false;
            report.version = self.learner.version();
            report.skipped = Some(format!(
                "forgetting guard: canary perplexity {:.3} -> {:.3} (ratio {:.3}, at most {:.3}); the update was undone",
                check.before,
                check.after,
                check.ratio(),
                max_ratio
            ));
            tracing::warn!(
                version = report.version,
                before = check.before,
                after = check.after,
                "forgetting guard undid an update"
            );
            return Ok((Some(check), None));
        }
        if let Some(c) = check {
            self.canary = Some((next.version(), c.after));
        }
        let published = self.setup.snapshots.publish(next)?;
        if let Some(store) = self.setup.store.as_mut() {
            store.updated(changed);
        }
        let parent = current.version();
        Ok((check, Some(Served { parent, published })))
    }

    /// With a guard: the canary perplexity of `current` and of `next`; that of the version served
    /// is remembered from its own check rather than measured again.
    fn canary_check(&self, current: &Snapshot, next: &Snapshot) -> Result<Option<Check>> {
        let Some(guard) = &self.setup.guard else {
            return Ok(None);
        };
        let before = match self.canary {
            Some((v, ppl)) if v == current.version() => ppl,
            _ => guard.perplexity(current)?,
        };
        Ok(Some(Check {
            before,
            after: guard.perplexity(next)?,
        }))
    }

    /// Records that journal record `seq` has been learned, and checkpoints when one is due.
    fn applied(&mut self, seq: u64) {
        let Some(store) = self.setup.store.as_mut() else {
            return;
        };
        store.applied(seq);
        if store.due() {
            // The batch is journaled and applied; a failed checkpoint only lengthens the replay.
            if let Err(e) = self.checkpoint() {
                tracing::error!("periodic checkpoint: {e}");
            }
        }
    }

    /// Queues the update from version `parent` to `snapshot`, made by `step`, as a delta for
    /// readers, or, where an earlier file never reached the store, repairs the store instead (a
    /// delta would only extend a chain readers cannot follow). Failures are the publisher's to
    /// log; the batch is journaled and applied either way.
    fn publish_delta(&mut self, parent: u64, snapshot: &Snapshot, step: &Step) {
        if self.publisher.as_ref().is_some_and(Publisher::owes) {
            self.repair_store();
            return;
        }
        let (Some(publisher), Some(store)) = (&self.publisher, &self.setup.store) else {
            return;
        };
        let mut meta = store.meta(
            snapshot.version(),
            Some(parent),
            snapshot.changed(),
            self.learner.selection().unwrap_or_default(),
        );
        meta.step = Some(step.clone());
        publisher.send(Publish::Delta {
            meta: Box::new(meta),
            tensors: snapshot.tensors_of(snapshot.changed()),
            model_bytes: snapshot.bytes(),
        });
    }
}
