//! Compute threads. candle's CPU kernels run on rayon's global pool and split their work by
//! `RAYON_NUM_THREADS`; both read it once, at the first tensor operation, so it is set here
//! before any. The image loader has its own threads (see `--loader-threads`).

pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `RAYON_NUM_THREADS` when the user set it, else every core.
pub fn default_compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(available_cores)
}

/// Fixes the compute threads for this process (call before the first tensor operation);
/// returns the number in effect.
pub fn set_compute_threads(requested: Option<usize>) -> usize {
    let n = requested
        .filter(|&n| n > 0)
        .unwrap_or_else(default_compute_threads);
    // Single-threaded at this point: no other thread reads the environment concurrently.
    vt_model::threads::set_compute_threads(n);
    n
}

/// Loader threads when not given: the cores the compute threads leave, at least one. With
/// every core computing, the one loader thread barely competes: it decodes only until
/// `prefetch` batches wait, a small fraction of a training step's work.
pub fn default_loader_threads(compute: usize) -> usize {
    available_cores().saturating_sub(compute).max(1)
}
