//! Whether a server reaches its store of published versions: a writer's publisher and a reader's
//! follower record each attempt, and Admin.Info and the metrics say how stale the server may be
//! while the store is away, which versions alone cannot tell (a reader that cannot list the store
//! does not know how far the writer has moved on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use super::counters::Counters;
use crate::store::StoreError;

/// The outcome of the latest store request, shared by whoever makes them and whoever reports.
pub(crate) struct StoreHealth {
    /// Unix seconds of the last request that succeeded (0: none yet).
    reached: AtomicU64,
    /// What the latest request failed with, as a client may be told; `None` while it succeeded.
    error: Mutex<Option<String>>,
    metrics: Arc<dyn Counters>,
}

impl StoreHealth {
    /// A store not contacted yet, whose contacts `metrics` counts.
    pub fn new(metrics: Arc<dyn Counters>) -> StoreHealth {
        StoreHealth {
            reached: AtomicU64::new(0),
            error: Mutex::new(None),
            metrics,
        }
    }

    /// Records a request that succeeded; returns whether the store was failing until now.
    pub fn reached(&self) -> bool {
        let now = unix_now();
        self.reached.store(now, Ordering::SeqCst);
        self.metrics.store_reached(now);
        self.error_slot().take().is_some()
    }

    /// Records a failed request; returns whether it is the first failure since the store worked.
    pub fn failed(&self, e: &StoreError) -> bool {
        self.error_slot().replace(e.client_message()).is_none()
    }

    /// Why the store cannot be used now, as a client may be told.
    pub fn error(&self) -> Option<String> {
        self.error_slot().clone()
    }

    /// Seconds since a request last succeeded (0 before the first).
    pub fn seconds_since_reached(&self) -> u64 {
        match self.reached.load(Ordering::SeqCst) {
            0 => 0,
            at => unix_now().saturating_sub(at),
        }
    }

    fn error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
