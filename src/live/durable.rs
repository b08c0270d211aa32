//! The data directory's side of the learner: batches journaled before they are learned, the
//! journal replayed at start, checkpoints, and the store a writer publishes to kept in step.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::learner::Worker;
use super::publisher::Publish;
use super::{Error, Result};
use crate::learn::{Doc, UpdateReport};
use crate::model::Model;
use crate::store::{Durability, Restored, Store, StoreError, Written};

impl Worker {
    /// A client's batch: journaled (and synced) before it is learned, so that once the client
    /// hears back, a restart replays it.
    pub(super) fn ingest(&mut self, batch_id: &str, docs: &[Doc]) -> Result<Vec<UpdateReport>> {
        if self.setup.paused.load(Ordering::SeqCst) {
            return Err(Error::Paused);
        }
        let Some(store) = self.setup.store.as_mut() else {
            return self.update(None, docs);
        };
        let journaled = store.journal(batch_id, docs);
        // Blocked until a batch can be journaled again; queries go on meanwhile.
        let blocked = journaled.as_ref().err().map(StoreError::client_message);
        self.setup.metrics.set_learning_blocked(blocked.is_some());
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocked = blocked;
        let seq = journaled?;
        self.update(Some(seq), docs)
    }

    /// Learns the journal records after the restored checkpoint, in their order; a record that
    /// fails (or panics) fails as it did when it first arrived, and the rest go on, so one bad
    /// record cannot keep the server from starting.
    pub(super) fn replay(&mut self, mut restored: Box<Restored>) -> Result<usize> {
        if let Some(meta) = &restored.checkpoint {
            self.setup.history.restore(&meta.recent);
        }
        if let Some(state) = restored.learner.take() {
            // Moments that do not fit (another strategy's parameters) only cost a fresh start.
            if let Err(e) = self.learner.import_state(state) {
                tracing::warn!("learner state not restored, learning starts afresh: {e}");
            }
        }
        let mut steps = 0;
        for record in &restored.replay {
            match self.update(Some(record.seq), &record.docs()) {
                Ok(reports) => steps += reports.len(),
                Err(e) => tracing::warn!(
                    seq = record.seq,
                    batch = %record.batch_id,
                    "replayed batch failed: {e}"
                ),
            }
        }
        self.publish_current()?;
        Ok(steps)
    }

    /// Makes sure a writer's store can give readers the version served now: a fresh store, or
    /// one left behind by a crash, gets a checkpoint of it.
    fn publish_current(&mut self) -> Result<()> {
        let Some(out) = &self.setup.publish else {
            return Ok(());
        };
        let current = self.setup.snapshots.current().version();
        let newest = out.list()?.newest();
        // A writer publishes only what it has journaled and applied, so after any restart its
        // version is at least the store's; a store ahead of it belongs to another history.
        if newest > current {
            return Err(Error::invalid(
                "store",
                format!(
                    "{} holds version {newest}, but this writer's data directory is at version {current}: another writer publishes there, or the data directory was lost; use a new store prefix or the writer's data directory",
                    out.url()
                ),
            ));
        }
        if current > 0 && newest != current {
            self.checkpoint()?;
        } else {
            self.setup.published.store(current, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Writes the served snapshot as a checkpoint, if the server has a data directory.
    pub(super) fn checkpoint(&mut self) -> Result<Option<Written>> {
        let Some(store) = self.setup.store.as_mut() else {
            return Ok(None);
        };
        let snapshot = self.setup.snapshots.current();
        let selection = self.learner.selection().unwrap_or_default();
        let recent = self.setup.history.steps();
        let written = self
            .learner
            .with_state(|state| store.checkpoint(&snapshot, selection, Some(state), recent))??;
        tracing::info!(
            version = written.meta.version,
            parent = ?written.meta.parent,
            journal_seq = written.meta.journal_seq,
            groups = written.meta.groups.len(),
            bytes = written.bytes,
            path = %written.path.display(),
            "checkpoint written"
        );
        if let Some(publisher) = &self.publisher {
            publisher.send(Publish::Checkpoint {
                path: written.path.clone(),
                version: written.meta.version,
                keep: store.keep_checkpoints(),
            });
        }
        Ok(Some(written))
    }
}

/// Opens the data directory when there is one: its newest good checkpoint goes into `model`'s
/// weights, and what was restored is logged.
pub(crate) fn open_store(
    model: &Model,
    durability: Option<Durability>,
    strategy: &str,
) -> Result<(Option<Store>, Option<Restored>)> {
    let Some(durability) = durability else {
        return Ok((None, None));
    };
    let dir = durability.dir.display().to_string();
    let (store, restored) = Store::open(durability, model, strategy)?;
    if let Some(meta) = restored
        .checkpoint
        .as_ref()
        .filter(|m| m.strategy != strategy)
    {
        // Replay learns with the settings given now; they differ from the ones that first learned.
        tracing::warn!(
            checkpoint = %meta.strategy,
            now = %strategy,
            "the strategy changed since the checkpoint; the journal is replayed with the new one"
        );
    }
    for path in &restored.rejected {
        tracing::error!(path = %path.display(), "checkpoint failed verification; set aside");
    }
    match &restored.checkpoint {
        Some(meta) => tracing::info!(
            data_dir = %dir,
            version = meta.version,
            journal_seq = meta.journal_seq,
            groups = meta.groups.len(),
            strategy = %meta.strategy,
            to_replay = restored.replay.len(),
            torn_bytes = restored.torn_bytes,
            "restored checkpoint"
        ),
        None => tracing::info!(
            data_dir = %dir,
            to_replay = restored.replay.len(),
            torn_bytes = restored.torn_bytes,
            "no checkpoint; starting from the base model"
        ),
    }
    Ok((Some(store), Some(restored)))
}
