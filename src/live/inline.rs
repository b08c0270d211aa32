//! The live engine on its caller's thread: `locus eval` learns through the server's own update
//! path (steps, snapshots), so it measures what the server does, without a queue, guard,
//! journal, store or publisher.

use std::sync::Arc;

use super::counters::Counters;
use super::learner::{Setup, Worker};
use super::store_health::StoreHealth;
use super::Result;
use crate::learn::{Doc, LearnConfig, Learner, UpdateReport};
use crate::model::Model;
use crate::snapshot::{Snapshot, Snapshots};

/// A learner that serves each update as a snapshot kept in memory, as the server does.
pub struct Inline {
    worker: Worker,
}

impl Inline {
    /// Starts from the model's current weights as version 0; `prepare` sets the learner up
    /// (static norms, say) before its first step.
    pub fn new(
        model: Arc<Model>,
        learn: LearnConfig,
        replay: Vec<String>,
        batch_size: usize,
        prepare: impl FnOnce(&mut Learner),
    ) -> Result<Inline> {
        let snapshots = Snapshots::new(Snapshot::load(Arc::clone(&model), 0)?, 1);
        let setup = Setup {
            model,
            snapshots: Arc::new(snapshots),
            learn,
            replay,
            batch_size: batch_size.max(1),
            queue_depth: 1,
            nice: 0,
            paused: Arc::default(),
            store: None,
            publish: None,
            published: Arc::default(),
            metrics: Arc::new(Uncounted),
            history: Arc::default(),
            store_health: Arc::new(StoreHealth::new(Arc::new(Uncounted))),
            guard: None,
        };
        let mut learner = setup.learner(0)?;
        prepare(&mut learner);
        Ok(Inline {
            worker: Worker {
                learner,
                publisher: None,
                canary: None,
                setup,
                progress: Arc::default(),
            },
        })
    }

    /// Learns `docs` as the server learns one ingested batch: in steps of at most the batch size.
    pub fn learn(&mut self, docs: &[Doc]) -> Result<Vec<UpdateReport>> {
        self.worker.update(None, docs)
    }

    /// The version served now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.worker.setup.snapshots.current()
    }

    /// The learner, for what only an evaluation does to it (merging adapters before scoring).
    pub fn learner(&mut self) -> &mut Learner {
        &mut self.worker.learner
    }
}

/// Nothing exports an inline engine's counts.
struct Uncounted;

impl Counters for Uncounted {
    fn stepped(&self, _: &UpdateReport) {}
    fn published(&self, _: &str, _: Option<u64>) {}
    fn set_learning_blocked(&self, _: bool) {}
    fn store_reached(&self, _: u64) {}
}
