//! Printing figures beside their baseline.

use std::time::Duration;

/// Prints a throughput row: ours, the baseline, and ours / baseline.
pub(crate) fn throughput(label: &str, ours_per_s: f64, baseline_label: &str, base_per_s: f64) {
    println!(
        "  {label:<44} {ours_per_s:>12.0}/s   {baseline_label:<34} {base_per_s:>12.0}/s   ratio {:.2}",
        ours_per_s / base_per_s
    );
}

/// Prints a latency row: ours, the baseline, and ours / baseline.
pub(crate) fn latency(label: &str, ours: Duration, baseline_label: &str, base: Duration) {
    println!(
        "  {label:<44} {:>10.1} µs   {baseline_label:<34} {:>10.1} µs   ratio {:.2}",
        ours.as_secs_f64() * 1e6,
        base.as_secs_f64() * 1e6,
        ours.as_secs_f64() / base.as_secs_f64()
    );
}

/// Percentile of a set of durations (sorts in place).
pub(crate) fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let idx = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[idx]
}
