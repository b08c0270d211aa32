//! A writer's store after a file missed it (the store was away, or slower than learning): the
//! learner publishes a checkpoint, since readers cannot follow deltas past the gap, and a timer
//! reminds an idle learner, so the store gets what readers need as soon as it is back. The timer
//! also checks now and then that the store still holds what was published, since a store can
//! lose objects without any request of the writer's failing (emptied, or restored from an old
//! copy, while the writer was idle).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::jobs::Job;
use super::learner::{Handle, Worker};
use super::publisher::{Publish, RETRY};
use super::Error;
use crate::store::publish::Published;

/// How often the store's files are checked against what was published: one listing each.
const AUDIT: Duration = Duration::from_secs(30);

impl Worker {
    /// Publishes a checkpoint of the served version when the store owes one and a try is due:
    /// the newest one written where nothing changed since (a checkpoint costs a full write), else
    /// a new one. A store that came back empty gets all readers need from it alone.
    pub(super) fn repair_store(&mut self) {
        let Some(publisher) = self.publisher.as_ref().filter(|p| p.take_due()) else {
            return;
        };
        if let Some(store) = self.setup.store.as_ref().filter(|s| !s.pending()) {
            if let Some((version, path)) = store.newest_checkpoint() {
                let keep = store.keep_checkpoints();
                publisher.send(Publish::Checkpoint {
                    path,
                    version,
                    keep,
                });
                return;
            }
        }
        if let Err(e) = self.checkpoint() {
            let version = self.setup.snapshots.current().version();
            tracing::error!(version, "checkpoint for the store: {e}");
        }
    }
}

/// A writer's store and what it owes readers, for the timer.
#[derive(Clone)]
pub(crate) struct StoreWatch {
    /// Set while the store misses a file readers need.
    pub owed: Arc<AtomicBool>,
    pub store: Published,
    /// The newest version published.
    pub published: Arc<AtomicU64>,
}

/// Every [`RETRY`] while the store owes a file, asks the learner to repair it, so a writer that
/// takes no batches still republishes once the store is back; every [`AUDIT`], makes the store
/// owe one where it no longer lets readers reach the published version. Ends when the server
/// shuts down; does nothing on a server that publishes nothing.
pub(crate) fn keep_store_repaired(learner: Arc<Handle>, mut stop: watch::Receiver<bool>) {
    let Some(StoreWatch {
        owed,
        store,
        published,
    }) = learner.store_watch()
    else {
        return;
    };
    tokio::spawn(async move {
        let mut audited = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return,
            }
            if !owed.load(Ordering::SeqCst) && audited.elapsed() >= AUDIT {
                audited = Instant::now();
                if lost(&store, &published).await {
                    owed.store(true, Ordering::SeqCst);
                }
            }
            if !owed.load(Ordering::SeqCst) {
                continue;
            }
            match learner.ask(|reply| Job::Repair { reply }).await {
                Ok(()) => {}
                Err(Error::ShuttingDown | Error::Gone(_)) => return,
                Err(e) => tracing::error!("repairing the store: {e}"),
            }
        }
    });
}

/// Whether `store` lacks files readers need to reach the version published before the listing.
/// A store that cannot be listed counts as whole: the publisher's next failure says otherwise.
async fn lost(store: &Published, published: &AtomicU64) -> bool {
    let version = published.load(Ordering::SeqCst);
    let store = store.clone();
    let Ok(Ok(listing)) = tokio::task::spawn_blocking(move || store.list()).await else {
        return false;
    };
    let lost = !listing.reaches(version);
    if lost {
        tracing::warn!(
            version,
            newest = listing.newest(),
            "the store lost files readers need to reach the published version; republishing"
        );
    }
    lost
}
