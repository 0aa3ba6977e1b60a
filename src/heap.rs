//! The C allocator's settings, applied once at start.
//!
//! glibc's malloc keeps small freed blocks in "fast bins" without merging them, and merges all of
//! them at once (`malloc_consolidate`) the next time a large block is asked for. After a mass
//! release (a connection leaving with 100 000 queued LOCKs frees several hundred thousand small
//! blocks) the next large allocation, such as the histogram a STATS answer builds, then walked them
//! all in one go: a stall of 150 to 270 ms on the serving thread, felt by every client. With fast
//! bins off, each free merges its block as it goes (the per-thread cache still serves the common
//! small sizes without locking), so the cost of a mass release is spread over the releases that
//! make it, which already run in slices (see [`crate::retire`]).

/// Applies the settings above. Call before the runtime starts its threads.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
}
