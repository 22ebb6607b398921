//! What a run measured, summarised: foreground latency percentiles and failures, background
//! throughput per direction. Pure functions of the samples.

use serde::{Deserialize, Serialize};

/// One foreground request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FgSample {
    /// When it started, seconds from the start of the run.
    pub at: f64,
    /// How long it took, when it completed.
    pub latency_ms: Option<f64>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Foreground latency over every request, a failed one counted as the timeout: the person
/// waited that long and gave up. (Leaving failures out would reward losing the slowest.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Requests made.
    pub requests: usize,
    /// Requests that failed or timed out.
    pub failures: usize,
    /// Mean, ms.
    pub mean: f64,
    /// Median, ms.
    pub p50: f64,
    /// 95th percentile, ms.
    pub p95: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Maximum, ms.
    pub max: f64,
}

impl Latency {
    /// Summarises `samples`, counting each failure as `timeout_ms`.
    pub fn of(samples: &[FgSample], timeout_ms: f64) -> Latency {
        let mut all: Vec<f64> = samples.iter().map(|s| s.latency_ms.unwrap_or(timeout_ms)).collect();
        all.sort_by(f64::total_cmp);
        let failures = samples.iter().filter(|s| s.latency_ms.is_none()).count();
        if all.is_empty() {
            return Latency::default();
        }
        Latency {
            requests: samples.len(),
            failures,
            mean: all.iter().sum::<f64>() / all.len() as f64,
            p50: percentile(&all, 50.0),
            p95: percentile(&all, 95.0),
            p99: percentile(&all, 99.0),
            max: all[all.len() - 1],
        }
    }
}

/// The `p`th percentile of sorted `values` (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Bits per second, in Mbit/s, of `bytes` over `seconds`.
pub fn mbit_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / seconds / 1e6
}

/// `a / b`, or `None` when `b` is zero (a ratio that would mean nothing).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(at: f64, ms: f64) -> FgSample {
        FgSample { at, latency_ms: Some(ms), error: None }
    }

    #[test]
    fn percentiles_by_nearest_rank_with_failures_at_the_timeout() {
        let samples: Vec<FgSample> = (1..=100).map(|i| ok(i as f64, i as f64)).collect();
        let l = Latency::of(&samples, 30_000.0);
        assert_eq!((l.requests, l.failures), (100, 0));
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
        assert!((l.mean - 50.5).abs() < 1e-9);
        // One of 100 failing: it counts as the whole 30 s wait.
        let mut samples = samples;
        samples[0] = FgSample { at: 1.0, latency_ms: None, error: Some("timed out".into()) };
        let l = Latency::of(&samples, 30_000.0);
        assert_eq!((l.requests, l.failures), (100, 1));
        assert_eq!((l.p99, l.max), (100.0, 30_000.0));
        assert!((l.mean - (5049.0 + 30_000.0) / 100.0).abs() < 1e-9);
        assert_eq!(Latency::of(&[], 30_000.0).requests, 0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn throughput_and_ratios() {
        assert_eq!(mbit_per_s(1_000_000, 8.0), 1.0);
        assert_eq!(mbit_per_s(5, 0.0), 0.0);
        assert_eq!(ratio(10.0, 4.0), Some(2.5));
        assert_eq!(ratio(1.0, 0.0), None);
    }
}
