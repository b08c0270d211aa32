//! Queries and learning take turns on the cores: computations started by [`on_compute_threads`]
//! (queries) run in the foreground; threads marked with [`mark_background`] (the learner's) pause
//! at their next product while any foreground computation runs.
//!
//! A lower CPU priority alone leaves a learning step's products streaming memory and filling the
//! caches beside a query's, which slowed queries by a quarter to a half at the median. Pausing at
//! products hands the query the machine within milliseconds. So that learning still moves under an
//! unbroken stream of queries, a pause that reaches [`LONGEST_PAUSE`] is followed by
//! [`UNPAUSED_AFTER`] without pauses: learning keeps at least a fifth of the time.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest a background thread waits for the foreground at one product.
pub const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// How long a background thread runs without pausing after a pause that reached the limit.
pub const UNPAUSED_AFTER: Duration = Duration::from_millis(25);

/// How often a paused thread looks again.
const POLL: Duration = Duration::from_micros(200);

/// Foreground computations running now.
static FOREGROUND: AtomicUsize = AtomicUsize::new(0);

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
        FOREGROUND.fetch_sub(1, Ordering::SeqCst);
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
    while FOREGROUND.load(Ordering::Relaxed) > 0 {
        if now.elapsed() >= LONGEST_PAUSE {
            UNPAUSED_UNTIL.with(|u| u.set(Some(Instant::now() + UNPAUSED_AFTER)));
            return;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_waits_for_the_foreground_at_most_the_longest_pause_then_runs() {
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
            std::thread::sleep(POLL);
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
}
