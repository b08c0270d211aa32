//! What the learner and the publisher count, without knowing where the counts are exported.

use crate::learn::UpdateReport;

/// Where learning steps, published files, store contact and a blocked learner are counted.
pub(crate) trait Counters: Send + Sync {
    /// Counts one learning step, as the learner finishes it.
    fn stepped(&self, report: &UpdateReport);
    /// Records a file published to the store, with its size (`None`: it failed).
    fn published(&self, kind: &str, bytes: Option<u64>);
    /// Whether learning is blocked now.
    fn set_learning_blocked(&self, blocked: bool);
    /// Records a store request that succeeded at `unix` seconds.
    fn store_reached(&self, unix: u64);
}
