//! The revocation view: the revoked serials every front end checks a device certificate
//! against (the TLS handshake, open connections, a broker's CONNECT). Kept fresh from
//! the registry by [`crate::jitp::Jitp::run_upkeep`]; the CRL is published from the
//! same entries (see [`crate::revocation`]).
use std::collections::HashSet;
use std::sync::RwLock;

/// Revoked certificates, as the TLS handshake sees them. Refreshed from the registry.
#[derive(Debug, Default)]
pub struct RevocationView {
    revoked_serials: RwLock<HashSet<String>>,
}

impl RevocationView {
    /// True if the (already path-validated) certificate is revoked. Unparseable
    /// certificates count as revoked: refuse what cannot be checked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        let serials = self
            .revoked_serials
            .read()
            .expect("revocation view poisoned");
        if serials.is_empty() {
            return false;
        }
        match fleetcert_ca::device_identity(cert_der) {
            Ok(id) => serials.contains(&id.certificate_serial_hex),
            Err(_) => true,
        }
    }

    /// True if this serial (lowercase hex, as the registry keeps it) is in the current
    /// revoked set: how a server finds the open connections of a certificate revoked
    /// after their handshake.
    pub fn is_serial_revoked(&self, serial_hex: &str) -> bool {
        self.revoked_serials
            .read()
            .expect("revocation view poisoned")
            .contains(serial_hex)
    }

    /// The certificate's serial (lowercase hex, as the registry keeps it), or None if it
    /// cannot be parsed.
    pub fn serial_of(cert_der: &[u8]) -> Option<String> {
        fleetcert_ca::device_identity(cert_der)
            .ok()
            .map(|id| id.certificate_serial_hex)
    }

    /// The certificate's notAfter (Unix seconds), for the renew-after-expiry check.
    pub fn not_after(cert_der: &[u8]) -> Option<i64> {
        fleetcert_ca::device_identity(cert_der)
            .ok()
            .map(|id| id.not_after.unix_timestamp())
    }

    /// Replaces the revoked set (lowercase hex serials, as the registry keeps them).
    pub(crate) fn replace(&self, serials: Vec<String>) {
        *self
            .revoked_serials
            .write()
            .expect("revocation view poisoned") = serials.into_iter().collect();
    }
}
