//! When a certificate is due for renewal, and what "now" is.
//!
//! The renewal point is a fraction of the lifetime (default 2/3, as step-ca does) moved
//! by a jitter of up to ±5 % of the lifetime, so that a fleet provisioned in one day
//! does not come due in one minute. The jitter is derived from the serial number (not
//! drawn at random), so it is the same every time it is computed, and it is clamped so
//! the point stays after half the lifetime and leaves at least a tenth of it (or a day,
//! whichever is less) before expiry — the time a device has to pick up its replacement.
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Where in a certificate's lifetime it comes due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// Fraction of the lifetime after which the certificate is due (0 < f < 1).
    pub fraction: f64,
    /// Largest jitter, as a fraction of the lifetime.
    pub jitter: f64,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            fraction: 2.0 / 3.0,
            jitter: 0.05,
        }
    }
}

impl RenewalPolicy {
    /// The renewal point (Unix seconds) of a certificate with this serial and validity.
    pub fn renew_at(&self, serial_hex: &str, not_before: i64, not_after: i64) -> i64 {
        let lifetime = (not_after - not_before).max(1);
        // A stable value in [-1, 1) from the serial's last 8 hex digits.
        let tail = &serial_hex[serial_hex.len().saturating_sub(8)..];
        let unit = u32::from_str_radix(tail, 16).unwrap_or(0) as f64 / u32::MAX as f64;
        let offset = self.fraction + self.jitter * (2.0 * unit - 1.0);
        let point = not_before + (lifetime as f64 * offset) as i64;
        let earliest = not_before + lifetime / 2;
        let latest = not_after - (lifetime / 10).min(86_400);
        point.clamp(earliest, latest.max(earliest))
    }
}

/// The time source of every time-dependent decision (renewal, leases, CRL validity,
/// expiry windows), so tests can move time instead of sleeping through validity
/// periods.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix seconds.
    fn now(&self) -> i64;
}

/// The system clock, optionally shifted by a fixed offset (`FLEETCERT_TIME_OFFSET`, for
/// tests that drive the real binary across validity periods).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock {
    /// Seconds added to the system time (negative: the past). Default 0.
    pub offset_secs: i64,
}

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        crate::unix_now() + self.offset_secs
    }
}

/// A clock that only moves when told to (unit and story tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock standing at `now` (Unix seconds), shared so a test can move it while the
    /// code under test reads it.
    pub fn new(now: i64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicI64::new(now)))
    }
    /// Sets the time to `now` (Unix seconds); it may go backwards.
    pub fn set(&self, now: i64) {
        self.0.store(now, Ordering::SeqCst);
    }
    /// Moves the time forward by `secs` seconds (backwards if negative).
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Environment variable that shifts fleetcert's clock by a number of seconds (may be
/// negative). Meant for tests of the real binary; a warning is logged when it is set.
pub const TIME_OFFSET_ENV: &str = "FLEETCERT_TIME_OFFSET";

/// The system clock with the offset from [`TIME_OFFSET_ENV`], if set and valid.
pub fn clock_from_env() -> Result<Arc<dyn Clock>, crate::LifecycleError> {
    let offset_secs = match std::env::var(TIME_OFFSET_ENV) {
        Ok(text) if !text.trim().is_empty() => {
            let secs: i64 = text.trim().parse().map_err(|_| {
                crate::LifecycleError::BadInput(format!(
                    "{TIME_OFFSET_ENV}={text:?} is not a whole number of seconds"
                ))
            })?;
            tracing::warn!("{TIME_OFFSET_ENV} is set: fleetcert's clock is shifted by {secs} s");
            secs
        }
        _ => 0,
    };
    Ok(Arc::new(SystemClock { offset_secs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_points_spread_around_two_thirds_and_stay_clamped() {
        let policy = RenewalPolicy::default();
        let (nb, na) = (1_000_000, 1_000_000 + 90 * 86_400);
        let lifetime = (na - nb) as f64;
        let mut points = Vec::new();
        for i in 0..1000u32 {
            let serial = format!("{:032x}", u128::from(i).wrapping_mul(0x9e3779b97f4a7c15));
            let at = policy.renew_at(&serial, nb, na);
            let fraction = (at - nb) as f64 / lifetime;
            assert!((0.616..=0.717).contains(&fraction), "{fraction}");
            assert_eq!(at, policy.renew_at(&serial, nb, na), "stable");
            points.push(at);
        }
        points.sort();
        points.dedup();
        assert!(
            points.len() > 900,
            "jitter spreads the fleet: {}",
            points.len()
        );
        // A very short lifetime still leaves time before expiry.
        let short = policy.renew_at("ffffffff", 0, 100);
        assert!((50..=90).contains(&short), "{short}");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(10);
        assert_eq!(clock.now(), 10);
        clock.advance(5);
        assert_eq!(clock.now(), 15);
        clock.set(3);
        assert_eq!(clock.now(), 3);
    }
}
