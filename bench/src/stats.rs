//! Latency percentiles (HdrHistogram, microsecond resolution).
use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded: 10 minutes, in microseconds; larger values are clamped.
const MAX_MICROS: u64 = 600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// Records one latency (clamped to the histogram's range).
pub fn record(histogram: &mut Histogram<u64>, latency: std::time::Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS);
    histogram
        .record(micros)
        .expect("value within the histogram's bounds");
}

/// p50, p90, p99 and max in milliseconds; all zero for an empty histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Highest recorded (clamped to 10 minutes).
    pub max: f64,
}

/// Reads the percentiles of a histogram made by [`new_histogram`].
pub fn summarize(histogram: &Histogram<u64>) -> LatencyMs {
    if histogram.is_empty() {
        return LatencyMs {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            max: 0.0,
        };
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    LatencyMs {
        p50: ms(histogram.value_at_quantile(0.50)),
        p90: ms(histogram.value_at_quantile(0.90)),
        p99: ms(histogram.value_at_quantile(0.99)),
        max: ms(histogram.max()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_of_one_to_a_hundred_ms() {
        let mut h = new_histogram();
        for ms in 1..=100 {
            record(&mut h, Duration::from_millis(ms));
        }
        let s = summarize(&h);
        // 3 significant digits: values are exact to within 0.1 %.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(s.p50, 50.0), "{s:?}");
        assert!(close(s.p90, 90.0), "{s:?}");
        assert!(close(s.p99, 99.0), "{s:?}");
        assert!(close(s.max, 100.0), "{s:?}");
    }

    #[test]
    fn empty_is_zero_and_outliers_are_clamped() {
        assert_eq!(summarize(&new_histogram()).max, 0.0);
        let mut h = new_histogram();
        record(&mut h, Duration::ZERO);
        record(&mut h, Duration::from_secs(100_000));
        let s = summarize(&h);
        assert!(s.p50 <= 0.002, "{s:?}");
        assert!((s.max - 600_000.0).abs() / 600_000.0 < 0.001, "{s:?}");
    }

    #[test]
    fn merged_worker_histograms_add_up() {
        let (mut a, mut b) = (new_histogram(), new_histogram());
        for _ in 0..99 {
            record(&mut a, Duration::from_millis(2));
        }
        record(&mut b, Duration::from_millis(500));
        a.add(&b).unwrap();
        assert_eq!(a.len(), 100);
        let s = summarize(&a);
        assert!((s.p99 - 2.0).abs() < 0.01, "{s:?}");
        assert!((s.max - 500.0).abs() < 0.5, "{s:?}");
    }
}
