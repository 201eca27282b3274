//! Compute threads. candle's CPU kernels run on rayon's global pool and split their work by
//! `RAYON_NUM_THREADS`; both read it once, at the first tensor operation, so it is set here
//! before any. The image loader has its own threads (see `--loader-threads`).

use vt_model::threads::{available_cores, default_compute_threads};

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

/// Loader threads when not given, at least one. On the CPU: the cores the compute threads
/// leave. With every core computing, the one loader thread barely competes: it decodes only
/// until `prefetch` batches wait, a small fraction of a training step's work. On a GPU the
/// model needs one core, to issue its work, and the others decode images, which a GPU takes
/// faster than a few cores produce them.
pub fn default_loader_threads(compute: usize, gpu: bool) -> usize {
    loader_threads_among(available_cores(), compute, gpu)
}

fn loader_threads_among(cores: usize, compute: usize, gpu: bool) -> usize {
    let busy = if gpu { 1 } else { compute };
    cores.saturating_sub(busy).max(1)
}

#[cfg(test)]
mod tests {
    use super::loader_threads_among;

    #[test]
    fn a_gpu_run_leaves_the_loader_all_cores_but_one() {
        assert_eq!(loader_threads_among(16, 16, false), 1);
        assert_eq!(loader_threads_among(16, 4, false), 12);
        assert_eq!(loader_threads_among(16, 16, true), 15);
        assert_eq!(loader_threads_among(1, 1, true), 1);
    }
}
