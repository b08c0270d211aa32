//! A writer's publishing thread: deltas and checkpoints go to the store in the order the learner
//! made them, while the learner goes on with the next step, so store latency (seconds for a large
//! delta in object storage) and encoding are not added to every update.
//!
//! A file that fails to publish, or that finds the queue full because the store is slower than
//! learning, is dropped and recorded as missing: later deltas alone would lack it, so the learner
//! publishes a checkpoint instead at its next update, and readers catch up from that.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Tensor;

use super::counters::Counters;
use super::{Error, Result};
use crate::store::checkpoint::Meta;
use crate::store::publish::Published;

/// Files waiting to be published; a store slower than this is behind by more than it is worth
/// queueing deltas for, since a checkpoint will replace them.
const QUEUE: usize = 4;

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
    metrics: Arc<dyn Counters>,
}

impl Publisher {
    /// Starts the thread; `published` follows the newest version in the store.
    pub fn spawn(
        store: Published,
        published: Arc<AtomicU64>,
        metrics: Arc<dyn Counters>,
    ) -> Result<Publisher> {
        let (tx, rx) = mpsc::sync_channel::<Publish>(QUEUE);
        let missing = Arc::new(AtomicBool::new(false));
        let (flag, counts) = (Arc::clone(&missing), Arc::clone(&metrics));
        let thread = std::thread::Builder::new()
            .name("locus-publisher".into())
            .spawn(move || {
                for file in rx {
                    publish(&store, file, &published, &flag, &*counts);
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
                "the store is behind; not queueing this file, the next update publishes a checkpoint"
            );
        }
    }

    /// Whether a file was lost since the last call, so that readers need a checkpoint rather than
    /// the next delta; the caller publishes one (whose own failure sets this again).
    pub fn take_missing(&self) -> bool {
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
        }
        Err(e) => {
            missing.store(true, Ordering::SeqCst);
            tracing::error!(
                version,
                "publishing the {kind} failed: {e}; the next update publishes a checkpoint"
            );
        }
    }
}
