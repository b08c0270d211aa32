//! The learner thread: the only code that changes the model's weights, one job at a time.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::counters::Counters;
use super::guard::Canaries;
use super::jobs::{Job, Progress, Reply};
use super::publisher::Publisher;
use super::repair::StoreWatch;
use super::store_health::StoreHealth;
use super::{priority, Error, Result};
use crate::learn::history::History;
use crate::learn::{LearnConfig, Learner};
use crate::model::Model;
use crate::snapshot::Snapshots;
use crate::spans::SpanText;
use crate::store::publish::Published;
use crate::store::{Restored, Store};
use crate::trace::{prepare, trace, Trace};

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
    pub metrics: Arc<dyn Counters>,
    /// The recent learning steps, for the status page and the checkpoints.
    pub history: Arc<History>,
    /// Whether the publisher reaches the store.
    pub store_health: Arc<StoreHealth>,
    /// The forgetting guard's canaries, when configured.
    pub guard: Option<Canaries>,
}

impl Setup {
    /// A learner starting at `version`, revertible when a guard may reject its updates.
    pub(super) fn learner(&self, version: u64) -> Result<Learner> {
        let mut learner = Learner::new(
            Arc::clone(&self.model),
            self.learn.clone(),
            self.replay.clone(),
            version,
        )?;
        learner.set_revertible(self.guard.is_some());
        Ok(learner)
    }
}

/// The server's side of the learner thread.
pub(crate) struct Handle {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    progress: Arc<Mutex<Progress>>,
    /// What the store-repair timer watches (writers).
    watch: Option<StoreWatch>,
}

impl Handle {
    /// Starts the thread.
    pub fn spawn(setup: Setup) -> Result<Handle> {
        let learner = setup.learner(setup.snapshots.current().version())?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = priority::background_pool(threads, setup.nice).map_err(|e| Error::Thread {
            what: "starting the learner's threads",
            cause: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel(setup.queue_depth);
        let progress = Arc::new(Mutex::new(Progress::default()));
        let publisher = match &setup.publish {
            Some(store) => Some(Publisher::spawn(
                store.clone(),
                Arc::clone(&setup.published),
                Arc::clone(&setup.metrics),
                Arc::clone(&setup.store_health),
            )?),
            None => None,
        };
        let watch = publisher
            .as_ref()
            .zip(setup.publish.clone())
            .map(|(p, store)| StoreWatch {
                owed: p.owed(),
                store,
                published: Arc::clone(&setup.published),
            });
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
            .map_err(|e| Error::Thread {
                what: "starting the learner thread",
                cause: e.to_string(),
            })?;
        Ok(Handle {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            progress,
            watch,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::ShuttingDown)
    }

    /// Queues a job, waiting while the queue is full: this wait is the ingest flow control.
    pub async fn submit(&self, job: Job) -> Result<()> {
        self.sender()?
            .send(job)
            .await
            .map_err(|_| Error::Gone("has stopped"))
    }

    /// Queues a job and waits for its result.
    pub async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.submit(job(reply)).await?;
        answer.await.map_err(|_| Error::Gone("dropped a job"))?
    }

    /// Replays what `Store::open` left to replay, before the server takes new batches.
    pub async fn replay(&self, restored: Restored) -> Result<()> {
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

    /// What a writer's store-repair timer watches; `None` on a server that publishes nothing.
    pub fn store_watch(&self) -> Option<StoreWatch> {
        self.watch.clone()
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
pub(super) struct Worker {
    pub(super) learner: Learner,
    /// Publishes a writer's deltas and checkpoints off this thread.
    pub(super) publisher: Option<Publisher>,
    /// Canary perplexity of the served version `(version, perplexity)`, once measured.
    pub(super) canary: Option<(u64, f64)>,
    pub(super) setup: Setup,
    pub(super) progress: Arc<Mutex<Progress>>,
}

/// How long the learner waits for a job before it returns freed memory to the system: longer
/// than the gap between the batches of a stream, so a busy learner's steps keep reusing their
/// pages (a trim before every step makes each step fault them in again, about 15% slower).
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(1);

/// How often a learner that is never idle still returns freed memory: without it an endless
/// stream keeps every arena's freed step and query buffers resident, while a trim this rarely
/// costs a step's page faults about once in three steps (the soak saw no loss of throughput).
const TRIM_WHILE_BUSY: Duration = Duration::from_secs(10);

/// The next job; when none comes within [`TRIM_AFTER_IDLE`], or [`TRIM_WHILE_BUSY`] has passed
/// since `trimmed`, trims the heap first.
fn next_job(
    rx: &mut mpsc::Receiver<Job>,
    clock: Option<&tokio::runtime::Runtime>,
    trimmed: &mut Instant,
) -> Option<Job> {
    // The timer is made inside `block_on`, where the clock's reactor is current.
    let waited =
        clock.map(|c| c.block_on(async { tokio::time::timeout(TRIM_AFTER_IDLE, rx.recv()).await }));
    let trim = |trimmed: &mut Instant| {
        crate::malloc::trim();
        *trimmed = Instant::now();
    };
    match waited {
        Some(Ok(job)) => {
            if trimmed.elapsed() >= TRIM_WHILE_BUSY {
                trim(trimmed);
            }
            job
        }
        Some(Err(_idle)) => {
            trim(trimmed);
            rx.blocking_recv()
        }
        None => rx.blocking_recv(),
    }
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Job>, pool: &rayon::ThreadPool) {
        priority::lower_this_thread(self.setup.nice);
        crate::model::turns::mark_background();
        // Built here, not by the spawner: a runtime must not be dropped inside async code.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .inspect_err(|e| tracing::warn!("learner idle timer: {e}; freed memory stays resident"))
            .ok();
        let mut trimmed = Instant::now();
        while let Some(job) = next_job(&mut rx, clock.as_ref(), &mut trimmed) {
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
            Job::Repair { reply } => {
                let _ = reply.send(self.guarded(|w| {
                    w.repair_store();
                    Ok(())
                }));
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
    pub(super) fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        catch_unwind(AssertUnwindSafe(|| f(self))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Error::Panicked(what))
        })
    }

    fn trace(&mut self, texts: &[SpanText]) -> Result<(u64, Trace)> {
        // On this thread the variables are exactly the current snapshot's weights.
        let version = self.setup.snapshots.current().version();
        let prepared = prepare(&self.setup.model, "texts", texts)?;
        Ok((version, trace(&self.setup.model, &prepared)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The learner's idle timer and a job queue of four.
    fn timer_and_queue() -> (
        tokio::runtime::Runtime,
        mpsc::Sender<Job>,
        mpsc::Receiver<Job>,
    ) {
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        (clock, tx, rx)
    }

    #[test]
    fn a_learner_that_is_never_idle_still_trims_now_and_then() {
        let (clock, tx, mut rx) = timer_and_queue();
        let long_ago = Instant::now().checked_sub(TRIM_WHILE_BUSY).unwrap();
        let mut trimmed = long_ago;
        let (reply, _answer) = oneshot::channel();
        tx.blocking_send(Job::Checkpoint { reply }).unwrap();
        assert!(next_job(&mut rx, Some(&clock), &mut trimmed).is_some());
        assert!(
            trimmed > long_ago,
            "a busy learner trims once the interval has passed"
        );
        let last = trimmed;
        let (reply, _answer) = oneshot::channel();
        tx.blocking_send(Job::Checkpoint { reply }).unwrap();
        assert!(next_job(&mut rx, Some(&clock), &mut trimmed).is_some());
        assert_eq!(trimmed, last, "and not again before the next interval");
    }

    #[test]
    fn jobs_that_come_after_the_idle_trim_are_still_taken_in_order() {
        let (clock, tx, mut rx) = timer_and_queue();
        let start = Instant::now();
        let mut trimmed = start;
        let sender = std::thread::spawn(move || {
            std::thread::sleep(TRIM_AFTER_IDLE * 2);
            let replies: Vec<_> = (0..2)
                .map(|_| {
                    let (reply, answer) = oneshot::channel();
                    tx.blocking_send(Job::Checkpoint { reply }).unwrap();
                    answer
                })
                .collect();
            replies
        });
        for _ in 0..2 {
            let job = next_job(&mut rx, Some(&clock), &mut trimmed);
            assert!(matches!(job, Some(Job::Checkpoint { .. })));
        }
        assert!(trimmed > start, "the idle wait trimmed");
        drop(sender.join().unwrap());
        assert!(
            next_job(&mut rx, Some(&clock), &mut trimmed).is_none(),
            "closed queue"
        );
        assert!(
            next_job(&mut rx, None, &mut trimmed).is_none(),
            "without a timer too"
        );
    }
}
