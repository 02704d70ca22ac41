//! fleetcert's device authentication, shared by every front end (the mutual-TLS JITP
//! server today, the MQTT broker integration next).
//!
//! - [`ChainVerifier`]: webpki path validation of a device certificate (TLS client
//!   authentication) to the fleet chain, for front ends that do not terminate TLS with
//!   rustls themselves.
//! - [`tls`]: the rustls client-certificate verifier and server configuration: path
//!   validation to the issuing CA, the [`ExpiryWindow`], then the [`RevocationView`].
//! - [`RevocationView`]: the revoked set (kept fresh by the lifecycle's upkeep).
//! - [`DeviceCertificate`]: certificate → thing (serial, fingerprint, thing name),
//!   offline, from the certificate alone; [`IdentifiedDevice`] (from
//!   `Jitp::identify`): the registry's view of it, read-only (thing, status, policies,
//!   attached or not) for front ends that authorize every action.
//!
//! Dependencies point one way: front ends → device-auth → lifecycle, ca.

pub mod tls;
mod verify;

pub use fleetcert_lifecycle::RevocationView;
pub use fleetcert_lifecycle::jitp::IdentifiedDevice;
pub use verify::{ChainVerifier, VerifiedDevice};

/// How long after expiry a certificate may still authenticate to get its replacement
/// (re-enroll or fetch); nothing else is allowed past notAfter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpiryWindow {
    renew_after_expiry_secs: u64,
}

impl ExpiryWindow {
    /// A window of `renew_after_expiry_secs` seconds (0 or less: no window).
    pub fn new(renew_after_expiry_secs: i64) -> Self {
        ExpiryWindow {
            renew_after_expiry_secs: u64::try_from(renew_after_expiry_secs).unwrap_or(0),
        }
    }

    /// True when a window is open at all.
    pub fn is_open(&self) -> bool {
        self.renew_after_expiry_secs > 0
    }

    /// True if a certificate with this notAfter (Unix seconds) may still renew at `now`
    /// (Unix seconds): not expired, or expired at most the window ago.
    pub fn may_renew(&self, not_after: u64, now: u64) -> bool {
        now.saturating_sub(not_after) <= self.renew_after_expiry_secs
    }
}

/// What a device certificate says about its device: certificate → thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    /// The serial, lowercase hex, as the registry keeps it.
    pub serial_hex: String,
    /// SHA-256 of the certificate DER, lowercase hex (the registry's lookup key).
    pub fingerprint_sha256_hex: String,
    /// The thing the certificate names (its common name), if that is a valid thing name.
    pub thing_name: Option<String>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

impl DeviceCertificate {
    /// Reads a device certificate (DER); `None` if it cannot be parsed.
    pub fn parse(cert_der: &[u8]) -> Option<Self> {
        let id = fleetcert_ca::device_identity(cert_der).ok()?;
        let thing_name = id
            .common_name
            .as_deref()
            .and_then(|cn| fleetcert_ca::ThingName::parse(cn).ok())
            .map(|name| name.to_string());
        Some(DeviceCertificate {
            serial_hex: id.certificate_serial_hex,
            fingerprint_sha256_hex: id.fingerprint_sha256_hex,
            thing_name,
            not_after: id.not_after.unix_timestamp(),
        })
    }
}

/// The certificate's serial (lowercase hex, as the registry keeps it), or `None` if it
/// cannot be parsed.
pub fn certificate_serial(cert_der: &[u8]) -> Option<String> {
    fleetcert_ca::device_identity(cert_der)
        .ok()
        .map(|id| id.certificate_serial_hex)
}

/// The certificate's notAfter (Unix seconds), or `None` if it cannot be parsed.
pub fn certificate_not_after(cert_der: &[u8]) -> Option<i64> {
    fleetcert_ca::device_identity(cert_der)
        .ok()
        .map(|id| id.not_after.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_window() {
        let closed = ExpiryWindow::new(0);
        assert!(!closed.is_open());
        assert!(closed.may_renew(100, 100));
        assert!(!closed.may_renew(100, 101));
        let day = ExpiryWindow::new(86_400);
        assert!(day.is_open());
        assert!(day.may_renew(100, 50));
        assert!(day.may_renew(100, 100 + 86_400));
        assert!(!day.may_renew(100, 101 + 86_400));
        assert_eq!(ExpiryWindow::new(-5), closed);
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert!(DeviceCertificate::parse(b"not a certificate").is_none());
        assert!(certificate_serial(&[0x30, 0x00]).is_none());
        assert!(certificate_not_after(&[]).is_none());
    }
}
