//! The learner thread: the only code that changes the model's weights.
//!
//! candle's work is blocking and CPU-bound, so it runs on its own OS thread fed by a bounded tokio
//! queue; a full queue makes ingest streams wait, which pushes back on their clients. Every
//! update is followed by a new snapshot, so queries see whole updates or none.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::guard::{Canaries, Check};
use super::publisher::{Publish, Publisher};
use super::{priority, ServerError};
use crate::learn::engine::UpdatedGroup;
use crate::learn::{Doc, LearnConfig, Learner, UpdateReport};
use candle_core::Tensor;

use crate::model::{GroupId, Model, ParamKind, Params};
use crate::snapshot::{Snapshot, Snapshots};
use crate::spans::SpanText;
use crate::store::publish::Published;
use crate::store::{Durability, Restored, Store, Written};
use crate::trace::{prepare, trace, Trace};

/// A reply channel for a job's result.
type Reply<T> = oneshot::Sender<Result<T, ServerError>>;

/// Work for the learner thread.
pub(crate) enum Job {
    /// Learn from documents in steps of at most `batch_size`, journaling them first.
    Learn {
        batch_id: String,
        docs: Vec<Doc>,
        /// The submitting RPC's span, the parent of the learning spans on this thread.
        span: tracing::Span,
        reply: Reply<Vec<UpdateReport>>,
    },
    /// Measure gradient norms without updating; answers with the version measured.
    Trace {
        texts: Vec<SpanText>,
        reply: Reply<(u64, Trace)>,
    },
    /// Restore a retained version as a new one; answers `(new version, restored version)`.
    Rollback {
        version: u64,
        reply: Reply<(u64, u64)>,
    },
    /// Apply journal records left after the restored checkpoint; answers the steps taken.
    Replay {
        restored: Box<Restored>,
        reply: Reply<usize>,
    },
    /// Write a checkpoint now; answers `None` when the server keeps no data directory.
    Checkpoint { reply: Reply<Option<Written>> },
    /// Serve a version a writer published: these groups' tensors, on top of the current ones.
    Follow {
        version: u64,
        groups: Vec<GroupId>,
        tensors: BTreeMap<String, Tensor>,
        reply: Reply<()>,
    },
}

/// What the learner has done, for Admin.Info.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// Groups the strategy selects now.
    pub selection: Vec<GroupId>,
    /// Learning steps taken.
    pub steps: u64,
    /// Why batches cannot be learned now (the data directory is full, say), as a client is told.
    pub blocked: Option<String>,
}

/// What the learner thread needs.
pub(crate) struct Setup {
    pub model: Arc<Model>,
    pub snapshots: Arc<Snapshots>,
    pub learn: LearnConfig,
    pub replay: Vec<String>,
    pub batch_size: usize,
    pub queue_depth: usize,
    /// The learner's CPU priority below queries (a `nice` increment).
    pub nice: i32,
    pub paused: Arc<AtomicBool>,
    /// The data directory, when the server is durable.
    pub store: Option<Store>,
    /// Where a writer publishes its versions for readers.
    pub publish: Option<Published>,
    /// The newest version published (by this writer, or seen by this reader).
    pub published: Arc<AtomicU64>,
    /// Where learning steps and published files are counted.
    pub metrics: Arc<super::metrics::Metrics>,
    /// The forgetting guard's canaries, when configured.
    pub guard: Option<Canaries>,
}

/// The server's side of the learner thread.
pub(crate) struct Handle {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    progress: Arc<Mutex<Progress>>,
}

impl Handle {
    /// Starts the thread.
    pub fn spawn(setup: Setup) -> Result<Handle, ServerError> {
        let learner = Learner::new(
            Arc::clone(&setup.model),
            setup.learn.clone(),
            setup.replay.clone(),
            setup.snapshots.current().version(),
        )?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = priority::background_pool(threads, setup.nice)
            .map_err(|e| ServerError::Internal(format!("starting the learner's threads: {e}")))?;
        let (tx, rx) = mpsc::channel(setup.queue_depth);
        let progress = Arc::new(Mutex::new(Progress::default()));
        let publisher = match &setup.publish {
            Some(store) => Some(Publisher::spawn(
                store.clone(),
                Arc::clone(&setup.published),
                Arc::clone(&setup.metrics),
            )?),
            None => None,
        };
        let worker = Worker {
            learner,
            publisher,
            canary: None,
            setup,
            progress: Arc::clone(&progress),
        };
        let thread = std::thread::Builder::new()
            .name("locus-learner".into())
            .spawn(move || worker.run(rx, &pool))
            .map_err(|e| ServerError::Internal(format!("starting the learner thread: {e}")))?;
        Ok(Handle {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            progress,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>, ServerError> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(ServerError::ShuttingDown)
    }

    /// Queues a job, waiting while the queue is full: this wait is the ingest flow control.
    pub async fn submit(&self, job: Job) -> Result<(), ServerError> {
        self.sender()?
            .send(job)
            .await
            .map_err(|_| ServerError::Internal("the learner thread has stopped".into()))
    }

    /// Queues a job and waits for its result.
    pub async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, ServerError> {
        let (reply, answer) = oneshot::channel();
        self.submit(job(reply)).await?;
        answer
            .await
            .map_err(|_| ServerError::Internal("the learner thread dropped a job".into()))?
    }

    /// Replays what `Store::open` left to replay, before the server takes new batches.
    pub async fn replay(&self, restored: Restored) -> Result<(), ServerError> {
        let records = restored.replay.len();
        let restored = Box::new(restored);
        let steps = self.ask(|reply| Job::Replay { restored, reply }).await?;
        if records > 0 {
            tracing::info!(records, steps, "journal replayed");
        }
        Ok(())
    }

    /// Jobs waiting in the queue.
    pub fn queued(&self) -> usize {
        self.sender()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .unwrap_or(0)
    }

    /// What the learner has done so far.
    pub fn progress(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Closes the queue and waits until the thread has finished the jobs already queued.
    pub async fn stop(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            if tokio::task::spawn_blocking(move || thread.join())
                .await
                .is_err()
            {
                tracing::error!("the learner thread panicked");
            }
        }
    }
}

/// The thread's own state.
struct Worker {
    learner: Learner,
    /// Publishes a writer's deltas and checkpoints off this thread.
    publisher: Option<Publisher>,
    /// Canary perplexity of the served version `(version, perplexity)`, once measured.
    canary: Option<(u64, f64)>,
    setup: Setup,
    progress: Arc<Mutex<Progress>>,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Job>, pool: &rayon::ThreadPool) {
        priority::lower_this_thread(self.setup.nice);
        while let Some(job) = rx.blocking_recv() {
            pool.install(|| self.serve(job));
        }
        if self.setup.store.as_ref().is_some_and(Store::pending) {
            if let Err(e) = pool.install(|| self.checkpoint()) {
                tracing::error!("checkpoint at shutdown: {e}");
            }
        }
        tracing::info!("learner thread stopped");
    }

    /// Runs one job and answers it.
    fn serve(&mut self, job: Job) {
        match job {
            Job::Learn {
                batch_id,
                docs,
                span,
                reply,
            } => {
                let learn = tracing::info_span!(parent: &span, "learn", batch = %batch_id);
                let _ = reply.send(learn.in_scope(|| self.guarded(|w| w.ingest(&batch_id, &docs))));
            }
            Job::Trace { texts, reply } => {
                let _ = reply.send(self.guarded(|w| w.trace(&texts)));
            }
            Job::Rollback { version, reply } => {
                let _ = reply.send(self.guarded(|w| w.rollback(version)));
            }
            Job::Replay { restored, reply } => {
                let _ = reply.send(self.guarded(|w| w.replay(restored)));
            }
            Job::Checkpoint { reply } => {
                let _ = reply.send(self.guarded(|w| w.checkpoint()));
            }
            Job::Follow {
                version,
                groups,
                tensors,
                reply,
            } => {
                let _ = reply.send(self.guarded(|w| w.follow(version, &groups, tensors)));
            }
        }
    }

    /// Runs a job, turning a panic into an error so one bad job does not take the server down.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ServerError>,
    ) -> Result<T, ServerError> {
        catch_unwind(AssertUnwindSafe(|| f(self))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(ServerError::Internal(format!(
                "the learner panicked: {what}"
            )))
        })
    }

    /// A client's batch: journaled (and synced) before it is learned, so that once the client
    /// hears back, a restart replays it.
    fn ingest(&mut self, batch_id: &str, docs: &[Doc]) -> Result<Vec<UpdateReport>, ServerError> {
        if self.setup.paused.load(Ordering::SeqCst) {
            return Err(ServerError::Paused);
        }
        let Some(store) = self.setup.store.as_mut() else {
            return self.learn(docs);
        };
        let journaled = store.journal(batch_id, docs).map_err(ServerError::from);
        // Blocked until a batch can be journaled again; queries go on meanwhile.
        let blocked = journaled.as_ref().err().map(ServerError::client_message);
        self.setup.metrics.set_learning_blocked(blocked.is_some());
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocked = blocked;
        let seq = journaled?;
        let result = self.learn(docs);
        self.applied(seq);
        result
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

    /// Learns the journal records after the restored checkpoint, in their order; a record that
    /// fails (or panics) fails as it did when it first arrived, and the rest go on, so one bad
    /// record cannot keep the server from starting.
    fn replay(&mut self, mut restored: Box<Restored>) -> Result<usize, ServerError> {
        if let Some(state) = restored.learner.take() {
            // Moments that do not fit (another strategy's parameters) only cost a fresh start.
            if let Err(e) = self.learner.import_state(state) {
                tracing::warn!("learner state not restored, learning starts afresh: {e}");
            }
        }
        let mut steps = 0;
        for record in &restored.replay {
            match self.guarded(|w| w.learn(&record.docs())) {
                Ok(reports) => steps += reports.len(),
                Err(e) => tracing::warn!(
                    seq = record.seq,
                    batch = %record.batch_id,
                    "replayed batch failed: {e}"
                ),
            }
            self.applied(record.seq);
        }
        self.publish_current()?;
        Ok(steps)
    }

    /// Makes sure a writer's store can give readers the version served now: a fresh store, or
    /// one left behind by a crash, gets a checkpoint of it.
    fn publish_current(&mut self) -> Result<(), ServerError> {
        let Some(out) = &self.setup.publish else {
            return Ok(());
        };
        let current = self.setup.snapshots.current().version();
        let newest = out.list()?.newest();
        // A writer publishes only what it has journaled and applied, so after any restart its
        // version is at least the store's; a store ahead of it belongs to another history.
        if newest > current {
            return Err(ServerError::invalid(
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

    /// Queues the update from version `parent` to `snapshot` as a delta for readers, or a
    /// checkpoint where an earlier file never reached the store. Failures are the publisher's to
    /// log; the batch is journaled and applied either way.
    fn publish_delta(&mut self, parent: u64, snapshot: &Snapshot) {
        if self.publisher.as_ref().is_some_and(Publisher::take_missing) {
            if let Err(e) = self.checkpoint() {
                tracing::error!(
                    version = snapshot.version(),
                    "checkpoint for the store: {e}"
                );
            }
            return;
        }
        let (Some(publisher), Some(store)) = (&self.publisher, &self.setup.store) else {
            return;
        };
        let meta = store.meta(
            snapshot.version(),
            Some(parent),
            snapshot.changed(),
            self.learner.selection().unwrap_or_default(),
        );
        publisher.send(Publish::Delta {
            meta: Box::new(meta),
            tensors: snapshot.tensors_of(snapshot.changed()),
            model_bytes: snapshot.bytes(),
        });
    }

    /// With a guard: the canary check of `next` against `current`, when it fails. The canary
    /// perplexity of the version served is measured once and remembered.
    fn guarded_update(
        &mut self,
        current: &Snapshot,
        next: &Snapshot,
    ) -> Result<Option<Check>, ServerError> {
        let Some(guard) = &self.setup.guard else {
            return Ok(None);
        };
        let before = match self.canary {
            Some((v, ppl)) if v == current.version() => ppl,
            _ => guard.perplexity(current)?,
        };
        let check = Check {
            before,
            after: guard.perplexity(next)?,
        };
        if check.ratio() > guard.max_ratio {
            self.canary = Some((current.version(), before));
            return Ok(Some(check));
        }
        self.canary = Some((next.version(), check.after));
        Ok(None)
    }

    /// Serves a version a writer published (on a reader).
    fn follow(
        &mut self,
        version: u64,
        groups: &[GroupId],
        tensors: BTreeMap<String, Tensor>,
    ) -> Result<(), ServerError> {
        for (name, t) in &tensors {
            let var = self.setup.model.vars.get(name).ok_or_else(|| {
                ServerError::Internal(format!(
                    "version {version} holds `{name}`, which the model lacks"
                ))
            })?;
            var.set(t).map_err(crate::Error::from)?;
        }
        let next = self.setup.snapshots.current().after_update(
            version,
            groups,
            &Params::from_map(tensors),
        )?;
        self.setup.snapshots.publish(next)?;
        Ok(())
    }

    /// Writes the served snapshot as a checkpoint, if the server has a data directory.
    fn checkpoint(&mut self) -> Result<Option<Written>, ServerError> {
        let Some(store) = self.setup.store.as_mut() else {
            return Ok(None);
        };
        let snapshot = self.setup.snapshots.current();
        let selection = self.learner.selection().unwrap_or_default();
        let state = self.learner.export_state()?;
        let written = store.checkpoint(&snapshot, selection, Some(&state))?;
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

    fn learn(&mut self, docs: &[Doc]) -> Result<Vec<UpdateReport>, ServerError> {
        let mut reports = Vec::new();
        for chunk in docs.chunks(self.setup.batch_size) {
            let span = tracing::info_span!("update", documents = chunk.len());
            let _entered = span.enter();
            let mut report = self.learner.step(chunk)?;
            if report.applied {
                let changed: Vec<GroupId> = report.groups.iter().map(UpdatedGroup::id).collect();
                let weights = self.learner.current_params()?;
                let current = self.setup.snapshots.current();
                let next = current.after_update(report.version, &changed, &weights)?;
                if let Some(check) = self.guarded_update(&current, &next)? {
                    // Undone before anything saw it: the weights go back to the served ones.
                    for (name, t) in current.tensors_of(&changed) {
                        if let Some(var) = self.setup.model.vars.get(&name) {
                            var.set(&t).map_err(crate::Error::from)?;
                        }
                    }
                    self.learner.undo_last_update();
                    report.applied = false;
                    report.version = self.learner.version();
                    report.skipped = Some(format!(
                        "forgetting guard: canary perplexity {:.3} -> {:.3} (ratio {:.3} > {:.3}); the update was undone",
                        check.before,
                        check.after,
                        check.ratio(),
                        self.setup.guard.as_ref().map_or(0.0, |g| g.max_ratio)
                    ));
                    tracing::warn!(
                        version = report.version,
                        before = check.before,
                        after = check.after,
                        "forgetting guard undid an update"
                    );
                } else {
                    let published = self.setup.snapshots.publish(next)?;
                    if let Some(store) = self.setup.store.as_mut() {
                        store.updated(changed);
                    }
                    self.publish_delta(current.version(), &published);
                }
            }
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
            reports.push(report);
        }
        Ok(reports)
    }

    fn trace(&mut self, texts: &[SpanText]) -> Result<(u64, Trace), ServerError> {
        // On this thread the variables are exactly the current snapshot's weights.
        let version = self.setup.snapshots.current().version();
        let prepared = prepare(&self.setup.model, "texts", texts)?;
        Ok((version, trace(&self.setup.model, &prepared)?))
    }

    fn rollback(&mut self, version: u64) -> Result<(u64, u64), ServerError> {
        let snapshots = &self.setup.snapshots;
        let current = snapshots.current();
        let target = match snapshots.get(version) {
            Some(kept) => kept,
            None => Arc::new(self.rebuild(version, &current)?),
        };
        let next = current.version() + 1;
        let restored = target.restore(&current, next)?;
        // The optimizer moments and norms belonged to the abandoned weights; start afresh.
        self.learner = Learner::new(
            Arc::clone(&self.setup.model),
            self.setup.learn.clone(),
            self.setup.replay.clone(),
            next,
        )?;
        let published = snapshots.publish(restored)?;
        if let Some(store) = self.setup.store.as_mut() {
            // The journal cannot replay a rollback, so it is made durable by a checkpoint now.
            store.updated(published.changed().iter().copied());
            self.checkpoint().map_err(|e| {
                ServerError::Internal(format!(
                    "rolled back to {version} as version {next}, but it is not durable: {e}"
                ))
            })?;
        }
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .selection
            .clear();
        Ok((next, version))
    }

    /// Version `version`, no longer in memory, rebuilt from the data directory: its checkpoint's
    /// groups, and the base model's weights for the other groups changed since (version 0 is the
    /// base model). Built on `current`, from the thread that owns the weights.
    fn rebuild(&self, version: u64, current: &Snapshot) -> Result<Snapshot, ServerError> {
        let Some(store) = &self.setup.store else {
            return Err(self.unknown_version(version));
        };
        let device = self.setup.model.device();
        let (groups, mut tensors) = if version == 0 {
            (Vec::new(), BTreeMap::new())
        } else {
            match store.checkpoint_of(version, device)? {
                Some(c) => (c.meta.group_ids(), c.tensors),
                None => return Err(self.unknown_version(version)),
            }
        };
        let from_base: Vec<GroupId> = store
            .changed_since_base()
            .iter()
            .filter(|g| !groups.contains(g))
            .copied()
            .collect();
        if !from_base.is_empty() {
            tensors.extend(self.base_weights(&from_base, store.base_hash())?);
        }
        tracing::info!(
            version,
            from_checkpoint = groups.len(),
            from_base = from_base.len(),
            "rebuilding a version from the data directory"
        );
        let all: Vec<GroupId> = groups.into_iter().chain(from_base).collect();
        Ok(current.after_update(version, &all, &Params::from_map(tensors))?)
    }

    /// The base model's weights of `groups`, read again from where the model was loaded and
    /// checked against the hash the data directory was made with.
    fn base_weights(
        &self,
        groups: &[GroupId],
        hash: &str,
    ) -> Result<BTreeMap<String, Tensor>, ServerError> {
        let source = &self.setup.model.source.path;
        let base = crate::model::load::load(source, self.setup.model.device())?;
        let found = crate::store::model_hash(&base)?;
        if found != hash {
            return Err(ServerError::Internal(format!(
                "{source} now holds a model with hash {found}, not the base model ({hash}) this data directory was made on"
            )));
        }
        let wanted: BTreeSet<GroupId> = groups.iter().copied().collect();
        Ok(base
            .vars
            .iter()
            .filter(|(name, _)| {
                matches!(base.arch.kind_of(name), Some(ParamKind::Group(g)) if wanted.contains(&g))
            })
            .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
            .collect())
    }

    /// The error for a version that can be restored neither from memory nor from disk.
    fn unknown_version(&self, version: u64) -> ServerError {
        let in_memory = self
            .setup
            .snapshots
            .retained()
            .iter()
            .map(|s| s.version().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut retained = format!("{in_memory} in memory");
        if let Some(store) = &self.setup.store {
            let on_disk = store.checkpoint_versions().unwrap_or_default();
            let on_disk: Vec<_> = on_disk.iter().rev().map(u64::to_string).collect();
            if !on_disk.is_empty() {
                retained += &format!("; {} as checkpoints", on_disk.join(", "));
            }
            retained += "; 0, the base model";
        }
        ServerError::UnknownVersion { version, retained }
    }
}

/// Opens the data directory when there is one: its newest good checkpoint goes into `model`'s
/// weights, and what was restored is logged.
pub(crate) fn open_store(
    model: &Model,
    durability: Option<Durability>,
    strategy: &str,
) -> Result<(Option<Store>, Option<Restored>), ServerError> {
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
