//! Queries before learning: the learner computes at the lowest CPU priority.
//!
//! A learning step keeps every core busy for seconds, and candle's kernels share one rayon pool,
//! so a query arriving mid-step would queue behind the step's matrix products. The learner
//! therefore runs on a rayon pool of its own whose threads (and the learner thread itself) have a
//! raised `nice` value: while queries compute, the kernel gives the learner only a small share of
//! the cores (about 10% at nice 10, 1.5% at 19), and all of them when queries are idle.
//! Beyond that share, the learner's threads pause at each product while a query computes
//! (`model::turns`).

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Lowers the calling thread's priority by `nice` steps (logged, not fatal, where refused).
pub(crate) fn lower_this_thread(nice: i32) {
    // On Linux the nice value belongs to the thread, so this leaves the query threads alone.
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read their integer arguments.
    let failed = unsafe {
        let tid = libc::gettid() as libc::id_t;
        // getpriority's -1 can be a valid value, but the sum only matters when it is not.
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19)) != 0
    };
    #[cfg(not(target_os = "linux"))]
    let failed = true;
    if failed {
        tracing::warn!("could not lower the learner's CPU priority; queries may wait for steps");
    }
}

/// A rayon pool of `threads` threads at priority `nice` for the learner's computations.
pub(crate) fn background_pool(
    threads: usize,
    nice: i32,
) -> Result<ThreadPool, rayon::ThreadPoolBuildError> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("locus-learn-{i}"))
        .start_handler(move |_| {
            lower_this_thread(nice);
            crate::model::turns::mark_background();
        })
        .build()
}
