//! Queries and learning take turns on the cores: computations started by [`on_compute_threads`]
//! (queries) run in the foreground; threads marked with [`mark_background`] (the learner's) pause
//! at their next product, tile of the forward's product kernel or chunk of the optimizer's passes
//! while any foreground computation runs, and sleep until the last one ends.
//!
//! A lower CPU priority alone leaves a learning step's products streaming memory and filling the
//! caches beside a query's, which slowed queries by a quarter to a half at the median. Pausing at
//! products alone still left each query beside the rest of the product the learner was in (the
//! forward's whole products, several milliseconds) and beside threads that woke every 0.2 ms to
//! look again: with one client's Score requests back to back, the median query took 1.43 times
//! its idle time and the p99 1.88 (docs/benchmarks.md). Pausing within a tile's time of a query
//! and waking once brings both to about 1.2. A backward product (on the `gemm` crate) still runs
//! to its end, up to about 2 ms on the default model, as does a forward product where the kernel
//! does not run (no AVX-512, or the MKL build).
//!
//! So that learning still moves under one long foreground computation (a long completion), a
//! pause that reaches [`LONGEST_PAUSE`] is followed by [`UNPAUSED_AFTER`] without pauses: learning
//! keeps at least a fifth of that time. Between queries that follow each other closely, learning
//! runs in the gaps: under the back-to-back client above its steps took three times as long.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The longest a background thread waits for the foreground at one pause point.
pub const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// How long a background thread runs without pausing after a pause that reached the limit.
pub const UNPAUSED_AFTER: Duration = Duration::from_millis(25);

/// Foreground computations running now.
static FOREGROUND: AtomicUsize = AtomicUsize::new(0);

/// Wakes paused threads when the last foreground computation ends: a paused thread that looked
/// again every fraction of a millisecond would take a query's core as often.
static ENDED: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());

thread_local! {
    /// Whether this thread yields to the foreground.
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
    /// Until when this thread runs without pausing, after a pause that reached the limit.
    static UNPAUSED_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Makes the calling thread pause for foreground computations (see [`yield_to_foreground`]).
pub fn mark_background() {
    BACKGROUND.with(|b| b.set(true));
}

/// Runs `f` on a thread of rayon's pool, where the many small products of a forward pass over a
/// few tokens (generation, scoring) share their work with the calling thread: from any other
/// thread each product would hand its work to the pool and sleep until it is done. Called from a
/// thread outside the background, `f` is foreground: background threads pause while it runs.
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let _running = (!BACKGROUND.with(Cell::get)).then(Foreground::enter);
    rayon::scope(|_| f())
}

/// One foreground computation, counted while it lives (a panic included).
struct Foreground;

impl Foreground {
    fn enter() -> Self {
        FOREGROUND.fetch_add(1, Ordering::SeqCst);
        Foreground
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if FOREGROUND.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Under the lock, so that a thread between its look at the count and its wait
            // cannot miss the wake-up.
            let _lock = ENDED.0.lock().unwrap_or_else(PoisonError::into_inner);
            ENDED.1.notify_all();
        }
    }
}

/// On a background thread, waits while foreground computations run, at most [`LONGEST_PAUSE`],
/// and not again for [`UNPAUSED_AFTER`] after a wait that reached it. Elsewhere returns at once.
pub(crate) fn yield_to_foreground() {
    if !BACKGROUND.with(Cell::get) || FOREGROUND.load(Ordering::Relaxed) == 0 {
        return;
    }
    let now = Instant::now();
    if UNPAUSED_UNTIL
        .with(Cell::get)
        .is_some_and(|until| now < until)
    {
        return;
    }
    let mut lock = ENDED.0.lock().unwrap_or_else(PoisonError::into_inner);
    while FOREGROUND.load(Ordering::SeqCst) > 0 {
        let Some(left) = LONGEST_PAUSE
            .checked_sub(now.elapsed())
            .filter(|d| !d.is_zero())
        else {
            UNPAUSED_UNTIL.with(|u| u.set(Some(Instant::now() + UNPAUSED_AFTER)));
            return;
        };
        lock = ENDED
            .1
            .wait_timeout(lock, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share the process's foreground count, so they run one at a time.
    static ALONE: Mutex<()> = Mutex::new(());

    #[test]
    fn the_background_waits_for_the_foreground_at_most_the_longest_pause_then_runs() {
        let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
        let query = std::thread::spawn(|| {
            on_compute_threads(|| {
                // A foreground thread never waits, even at a product.
                let start = Instant::now();
                yield_to_foreground();
                assert!(start.elapsed() < Duration::from_millis(5));
                std::thread::sleep(Duration::from_millis(500));
            })
        });
        while FOREGROUND.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let learner = std::thread::spawn(|| {
            mark_background();
            let timed = || {
                let start = Instant::now();
                yield_to_foreground();
                start.elapsed()
            };
            (timed(), timed())
        });
        let (first, second) = learner.join().unwrap();
        query.join().unwrap();
        assert!(
            first >= LONGEST_PAUSE && first < Duration::from_millis(350),
            "the first pause lasted {first:?}"
        );
        assert!(
            second < Duration::from_millis(5),
            "the second pause lasted {second:?}"
        );
    }

    #[test]
    fn a_paused_thread_resumes_as_soon_as_the_foreground_ends() {
        let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
        std::thread::scope(|s| {
            let query = s.spawn(|| {
                on_compute_threads(|| std::thread::sleep(Duration::from_millis(40)));
                Instant::now()
            });
            while FOREGROUND.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let learner = s.spawn(|| {
                mark_background();
                yield_to_foreground();
                Instant::now()
            });
            let (ended, resumed) = (query.join().unwrap(), learner.join().unwrap());
            // Woken by the end, not by the pause's limit 60 ms later.
            assert!(
                resumed + Duration::from_millis(2) >= ended
                    && resumed <= ended + Duration::from_millis(15),
                "resumed {:?} before or {:?} after the foreground ended",
                ended.saturating_duration_since(resumed),
                resumed.saturating_duration_since(ended)
            );
        });
    }
}
