//! A writer's publishing thread: deltas and checkpoints go to the store in the order the learner
//! made them, while the learner goes on with the next step, so store latency (seconds for a large
//! delta in object storage) and encoding are not added to every update.
//!
//! A file that fails to publish, or that finds the queue full because the store is slower than
//! learning, is dropped and recorded as missing: later deltas alone would lack it, so the learner
//! publishes a checkpoint instead, and readers catch up from that. While the store stays away the
//! learner tries again at most every [`RETRY`], not at every update (each try writes a
//! checkpoint), and an idle writer is reminded by a timer (`repair.rs`), so readers get what they
//! need as soon as the store is back whether or not batches still arrive.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::counters::Counters;
use super::store_health::StoreHealth;
use super::{Error, Result};
use crate::store::checkpoint::Meta;
use crate::store::publish::Published;

/// Files waiting to be published; a store slower than this is behind by more than it is worth
/// queueing deltas for, since a checkpoint will replace them.
const QUEUE: usize = 4;

/// The least time between two checkpoints for a store that missed a file: a store that is away
/// costs one try (and one checkpoint written) per this, however fast batches arrive.
pub(crate) const RETRY: Duration = Duration::from_secs(3);

/// One file for the store.
pub(crate) enum Publish {
    /// The update to `meta.version`: the groups it changed.
    Delta {
        meta: Box<Meta>,
        tensors: BTreeMap<String, Tensor>,
        /// The full model's size, for the log.
        model_bytes: u64,
    },
    /// A checkpoint file of the data directory; the store keeps the newest `keep`.
    Checkpoint {
        path: PathBuf,
        version: u64,
        keep: usize,
    },
}

impl Publish {
    fn kind(&self) -> &'static str {
        match self {
            Publish::Delta { .. } => "delta",
            Publish::Checkpoint { .. } => "checkpoint",
        }
    }
}

/// The publishing thread and its queue.
pub(crate) struct Publisher {
    tx: Option<SyncSender<Publish>>,
    thread: Option<JoinHandle<()>>,
    missing: Arc<AtomicBool>,
    /// When the learner last took the missing file in hand, for [`RETRY`].
    repaired: Cell<Option<Instant>>,
    metrics: Arc<dyn Counters>,
}

impl Publisher {
    /// Starts the thread; `published` follows the newest version in the store.
    pub fn spawn(
        store: Published,
        published: Arc<AtomicU64>,
        metrics: Arc<dyn Counters>,
        health: Arc<StoreHealth>,
    ) -> Result<Publisher> {
        let (tx, rx) = mpsc::sync_channel::<Publish>(QUEUE);
        let missing = Arc::new(AtomicBool::new(false));
        let (flag, counts) = (Arc::clone(&missing), Arc::clone(&metrics));
        let thread = std::thread::Builder::new()
            .name("locus-publisher".into())
            .spawn(move || {
                for file in rx {
                    publish(&store, file, &published, &flag, &*counts, &health);
                }
            })
            .map_err(|e| Error::Thread {
                what: "starting the publisher thread",
                cause: e.to_string(),
            })?;
        Ok(Publisher {
            tx: Some(tx),
            thread: Some(thread),
            missing,
            repaired: Cell::new(None),
            metrics,
        })
    }

    /// Queues `file`; with the queue full it is dropped and recorded as missing.
    pub fn send(&self, file: Publish) {
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(file) | TrySendError::Disconnected(file)) = tx.try_send(file)
        {
            self.metrics.published(file.kind(), None);
            self.missing.store(true, Ordering::SeqCst);
            tracing::warn!(
                kind = file.kind(),
                "the store is behind; not queueing this file, a checkpoint follows"
            );
        }
    }

    /// Whether a file never reached the store, so that readers need a checkpoint rather than the
    /// next delta.
    pub fn owes(&self) -> bool {
        self.missing.load(Ordering::SeqCst)
    }

    /// The flag [`Publisher::owes`] reads, for the timer that reminds an idle learner.
    pub fn owed(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.missing)
    }

    /// Whether the caller should publish a checkpoint now: a file is missing and the last try
    /// was at least [`RETRY`] ago. It clears the flag; the checkpoint's own failure sets it again.
    pub fn take_due(&self) -> bool {
        if !self.owes() || self.repaired.get().is_some_and(|at| at.elapsed() < RETRY) {
            return false;
        }
        self.repaired.set(Some(Instant::now()));
        self.missing.swap(false, Ordering::SeqCst)
    }
}

impl Drop for Publisher {
    /// Publishes what is queued (the checkpoint written at shutdown among it) before returning.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the publisher thread panicked");
            }
        }
    }
}

/// Publishes one file and records the outcome.
fn publish(
    store: &Published,
    file: Publish,
    published: &AtomicU64,
    missing: &AtomicBool,
    metrics: &dyn Counters,
    health: &StoreHealth,
) {
    let kind = file.kind();
    let (version, written) = match file {
        Publish::Delta {
            meta,
            tensors,
            model_bytes,
        } => {
            let written = store.delta(&meta, &tensors);
            if let Ok(bytes) = &written {
                tracing::info!(
                    version = meta.version,
                    groups = meta.groups.len(),
                    bytes,
                    model_bytes,
                    "delta published"
                );
            }
            (meta.version, written)
        }
        Publish::Checkpoint {
            path,
            version,
            keep,
        } => {
            let written = store.checkpoint(&path, version, keep);
            if written.is_ok() {
                tracing::info!(version, store = store.url(), "checkpoint published");
            }
            (version, written)
        }
    };
    metrics.published(kind, written.as_ref().ok().copied());
    match written {
        Ok(_) => {
            published.fetch_max(version, Ordering::SeqCst);
            if health.reached() {
                tracing::info!(version, "the store is reachable again");
            }
        }
        Err(e) => {
            missing.store(true, Ordering::SeqCst);
            health.failed(&e);
            tracing::error!(
                version,
                "publishing the {kind} failed: {e}; a checkpoint follows once the store takes it"
            );
        }
    }
}
