//! Compute threads for the process. candle's CPU kernels and this crate's kernels run on
//! rayon's global pool and size their work by `RAYON_NUM_THREADS`; candle's element-wise
//! operations also use a pool of their own whose workers spin after every operation. All of
//! it is read once, at the first tensor operation.

/// How long candle's element-wise workers spin before they sleep, unless the user chose
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT`). candle's default, 25,000 spins, kept a worker busy
/// for about half a millisecond after each operation, taking a core from the next
/// convolution: 5.7 % of a training step's CPU time on two cores (bench/RESULTS.md).
const BARRIER_POOL_SPIN_LIMIT: &str = "1000";

/// The most compute or loader threads a command takes: more than machines have cores, and
/// few enough to start at once (a mistyped 100000 spent minutes starting threads).
pub const MAX_THREADS: usize = 1024;

pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `RAYON_NUM_THREADS` when the user set it (at most [`MAX_THREADS`]), else every core.
pub fn default_compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .map_or_else(available_cores, |n| n.min(MAX_THREADS))
}

/// Fixes the compute threads for this process. Call at start-up, before the first tensor
/// operation and before other threads start: it sets environment variables.
pub fn set_compute_threads(threads: usize) {
    std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT);
    }
}
