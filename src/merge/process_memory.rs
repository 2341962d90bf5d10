//! This process's memory: its peak and current resident size, the `MUDSC_TRACE_MEMORY`
//! trace, and handing freed heap back to the system. The merge reads them to report its
//! peak, to fit `--max-memory`'s passes and cache beside what it already holds, and to keep
//! memory it no longer uses from counting against the next phase.

/// Whether `MUDSC_TRACE_MEMORY` asks for the step-by-step trace.
pub(crate) fn traced() -> bool {
    std::env::var_os("MUDSC_TRACE_MEMORY").is_some()
}

/// Peak resident set size of this process in MiB, from `getrusage` (kilobytes on Linux).
pub fn peak_rss_mib() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: rc == 0 means the struct was written.
    let usage = unsafe { usage.assume_init() };
    usage.ru_maxrss as f64 / 1024.0
}

/// With `MUDSC_TRACE_MEMORY` set, prints the resident memory now and at its peak to stderr,
/// labelled: where a merge's memory goes, step by step (the report has only per-phase peaks).
pub(crate) fn trace_memory(label: &str) {
    if !traced() {
        return;
    }
    let now = resident_bytes() as f64 / 1048576.0;
    eprintln!(
        "memory: {label}: {now:.0} MiB now, {:.0} MiB peak",
        peak_rss_mib()
    );
}

/// This process's resident memory now, in bytes (Linux's /proc/self/statm; 0 where unknown).
pub(super) fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages.saturating_mul(page_bytes()))
}

/// Hands the heap's free memory back to the system. Freed memory otherwise stays with the
/// process: after calibration on a ViT-B pair, 1.3 GB that the engines and the moments had
/// freed was still counted as resident (and the next phase's peak stood on it).
pub(super) fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(1) as u64
}
