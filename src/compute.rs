//! Process-wide settings of the CPU compute threads, applied at start through the environment
//! variables their pools read once, where the user has not set them.

/// Pause iterations a worker of candle's elementwise pool spins before it parks. candle's default
/// (25,000, about a millisecond) keeps the worker on a core through the matrix product that
/// follows most elementwise operations, taking that core from the product's threads; a profile of
/// the step benchmark put 8% of all CPU time in that spin.
const ELEMENTWISE_SPIN: &str = "100";

/// Sets the compute pools' idle and thread-count defaults. Call it at process start, before any
/// other thread exists (the variables are read when each pool starts).
///
/// In a build with the `mkl` feature MKL's OpenMP threads also sleep as soon as a product ends
/// (`KMP_BLOCKTIME=0`) rather than spinning for 200 ms against candle's threads and the queries,
/// and MKL takes as many threads as candle does, so a container's CPU set bounds both alike.
///
/// A process that `serves` (queries beside a learner) also computes candle's elementwise
/// operations on the calling thread: candle's pool for them admits one caller at a time through
/// an unfair lock, and a learner issuing thousands of such operations per step re-takes it before
/// a waiting query wakes, so the query would wait seconds for a few microseconds of work. With one
/// thread the pool runs each operation inline, without the lock; matrix products keep their
/// threads.
///
/// Any other process computes on its main thread, which therefore becomes one of rayon's threads:
/// each of a step's thousands of matrix products would otherwise hand its work to the pool and
/// put the main thread to sleep until it is done, two wake-ups per product: a profile of the step
/// benchmark put 5% of its time in the kernel's scheduler (a span backward alone, 10%), and 2.6%
/// with the main thread in the pool. (A server's learner already runs on a pool of its own, and
/// its main thread drives the network, so it keeps rayon's default.)
pub fn configure_threads(serves: bool) {
    if serves {
        set_default("CANDLE_NUM_THREADS", "1");
    } else {
        // Fails only if the pool already started, which leaves rayon's default.
        let _ = rayon::ThreadPoolBuilder::new()
            .use_current_thread()
            .build_global();
    }
    set_default("CANDLE_BARRIER_POOL_SPIN_LIMIT", ELEMENTWISE_SPIN);
    if cfg!(feature = "mkl") {
        set_default("KMP_BLOCKTIME", "0");
        let threads = candle_core::utils::get_num_threads().to_string();
        set_default("MKL_NUM_THREADS", &threads);
    }
}

/// Sets `name` to `value` unless the environment already sets it.
fn set_default(name: &str, value: &str) {
    if std::env::var_os(name).is_none() {
        std::env::set_var(name, value);
    }
}
