//! A reader's side of scale-out: it follows the versions a writer publishes to a shared store.
//!
//! Files are read on the blocking pool and applied by the learner thread, which stays the only
//! code that changes weights; each applied file becomes a snapshot with the writer's version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use tokio::sync::watch;

use super::jobs::Job;
use super::learner::{Handle, Worker};
use super::store_health::StoreHealth;
use super::{Error, Result};
use crate::learn::history::History;
use crate::model::{GroupId, Params};
use crate::snapshot::Snapshots;
use crate::store::checkpoint::Checkpoint;
use crate::store::publish::{Listing, Published};

/// What a reader follows and what it serves.
#[derive(Clone)]
pub(crate) struct Follower {
    pub store: Published,
    /// The base model's hash: files made on another base are refused.
    pub base_hash: String,
    pub device: Device,
    pub snapshots: Arc<Snapshots>,
    pub learner: Arc<Handle>,
    /// The newest version the store holds, as last seen.
    pub published: Arc<AtomicU64>,
    /// Whether the store answers.
    pub health: Arc<StoreHealth>,
    /// The recent learning steps: the writer's, as its files carry them.
    pub history: Arc<History>,
}

impl Follower {
    /// Applies every published file beyond the served version, in order; returns the version
    /// served afterwards.
    pub async fn catch_up(&self) -> Result<u64> {
        loop {
            let current = self.snapshots.current().version();
            let (store, device) = (self.store.clone(), self.device.clone());
            let read = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
                let listing = store.list()?;
                Ok((
                    listing.newest(),
                    next_file(&store, &listing, current, &device)?,
                ))
            })
            .await
            .map_err(|e| Error::Thread {
                what: "reading the store",
                cause: e.to_string(),
            })?;
            let (newest, next) = self.record(current, read)?;
            self.published.fetch_max(newest, Ordering::SeqCst);
            let Some(file) = next else {
                return Ok(current);
            };
            let meta = file.meta;
            if meta.base_hash != self.base_hash {
                return Err(Error::OtherBase {
                    store: self.store.url().to_string(),
                    version: meta.version,
                    found: meta.base_hash,
                    ours: self.base_hash.clone(),
                });
            }
            let groups = meta.group_ids();
            let tensors = file.tensors;
            let (step, recent) = (meta.step, meta.recent);
            self.learner
                .ask(|reply| Job::Follow {
                    version: meta.version,
                    groups,
                    tensors,
                    reply,
                })
                .await?;
            // A delta brings the step that made it; a checkpoint the writer's recent steps.
            match step {
                Some(step) => self.history.record(step),
                None if !recent.is_empty() => self.history.restore(&recent),
                None => {}
            }
            tracing::info!(
                version = meta.version,
                from = current,
                groups = meta.groups.len(),
                behind = self
                    .published
                    .load(Ordering::SeqCst)
                    .saturating_sub(meta.version),
                "following the writer"
            );
        }
    }

    /// Records whether the store answered, logging only when that changes: a store that is away
    /// for minutes would otherwise fill the log with one error per poll.
    fn record<T>(&self, current: u64, read: crate::store::Result<T>) -> Result<T> {
        match read {
            Ok(found) => {
                if self.health.reached() {
                    tracing::info!(version = current, "the store answers again; catching up");
                }
                Ok(found)
            }
            Err(e) => {
                if self.health.failed(&e) {
                    tracing::error!(
                        version = current,
                        "reading the store: {e}; serving version {current} until it answers"
                    );
                }
                Err(e.into())
            }
        }
    }

    /// Catches up every `interval` until the server shuts down.
    pub fn spawn(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
                match self.catch_up().await {
                    // Store failures are logged as they begin and end.
                    Ok(_) | Err(Error::Store(_)) => {}
                    Err(Error::ShuttingDown) => return,
                    Err(e) => tracing::error!("following the writer: {e}"),
                }
            }
        });
    }
}

/// The file that takes a reader from `current` further: the delta whose parent is `current`,
/// else (a late start, a gap after pruning, a rollback) the newest checkpoint when it is newer.
fn next_file(
    store: &Published,
    listing: &Listing,
    current: u64,
    device: &Device,
) -> crate::store::Result<Option<Checkpoint>> {
    if let Some(version) = listing.delta_after(current) {
        match store.delta_to(version, device) {
            Ok(delta) if delta.meta.parent == Some(current) => return Ok(Some(delta)),
            Ok(_) => {}
            // Pruned by the writer since it was listed, or damaged: the checkpoint covers it.
            Err(e) => tracing::warn!("{e}; falling back to the newest checkpoint"),
        }
    }
    let (found, failed) = store.newest_checkpoint_after(listing, current, device)?;
    for e in failed {
        tracing::error!("{e}; trying an older published checkpoint");
    }
    Ok(found)
}

impl Worker {
    /// Serves a version a writer published (on a reader).
    pub(super) fn follow(
        &mut self,
        version: u64,
        groups: &[GroupId],
        tensors: BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let model = &self.setup.model;
        // Every name is checked before any variable is written, so a refused version leaves
        // nothing of itself behind. Served snapshots share the never-written tensors with the
        // variables, so those are refused too.
        let vars = tensors
            .iter()
            .map(|(name, t)| {
                model
                    .written_var(name)
                    .map(|var| (var, t))
                    .ok_or_else(|| Error::UnknownTensor {
                        version,
                        name: name.clone(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        for (var, t) in vars {
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
}
