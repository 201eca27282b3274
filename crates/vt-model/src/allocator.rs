//! Process-wide allocator settings for model work.

/// Keeps freed memory in the process for reuse. Every layer allocates and frees buffers of
/// megabytes each step, and glibc's defaults map such blocks fresh and unmap them on free,
/// so each step paid again for page faults and zeroing: a training step of vt-resnet18
/// took 1.0M page faults instead of 0.25M (bench/RESULTS.md). The cost is that the process
/// keeps its peak heap. Call once at start-up, before other threads allocate.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before the program
    // starts other threads.
    unsafe {
        // Serve every size from the heap rather than from its own mapping.
        if libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX) == 0 {
            // Older glibc caps the threshold at half its heap size (32 MiB on 64-bit).
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        // Never hand the top of the heap back to the kernel.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Hands the free memory of every heap back to the kernel, once. For when a model is gone
/// for good (vt-serve's reload): its buffers, which [`retain_freed_memory`] keeps, were
/// freed into the arena of a thread that has ended, and no later work of the process would
/// reuse them, a reload under load adding a model's worth of memory each time.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
