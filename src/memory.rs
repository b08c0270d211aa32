//! Resident memory of this process (or another), current and peak (Linux; NaN elsewhere).

/// Resets the kernel's peak-RSS counter so the next reading covers only what follows.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size in MiB since start or the last [`reset_peak`].
pub fn peak_rss_mb() -> f64 {
    status_mb("self", "VmHWM:")
}

/// Resident set size in MiB now.
pub fn rss_mb() -> f64 {
    status_mb("self", "VmRSS:")
}

/// Resident set size in MiB now of process `pid`.
pub fn rss_mb_of(pid: u32) -> f64 {
    status_mb(&pid.to_string(), "VmRSS:")
}

/// A kB field of /proc/PROCESS/status, in MiB.
fn status_mb(process: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
