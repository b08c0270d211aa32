//! A writer's store after a file missed it (the store was away, or slower than learning): the
//! learner publishes a checkpoint, since readers cannot follow deltas past the gap, and a timer
//! reminds an idle learner, so the store gets what readers need as soon as it is back.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use super::jobs::Job;
use super::learner::{Handle, Worker};
use super::publisher::{Publish, RETRY};
use super::Error;

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

/// Every [`RETRY`] while the store owes a file, asks the learner to repair it, so a writer that
/// takes no batches still republishes once the store is back; ends when the server shuts down.
pub(crate) fn keep_store_repaired(learner: Arc<Handle>, mut stop: watch::Receiver<bool>) {
    let Some(owed) = learner.owed() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return,
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
