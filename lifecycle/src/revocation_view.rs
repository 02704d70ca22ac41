//! The revocation view: the revoked serials every front end checks a device certificate
//! against (the TLS handshake, open connections, a broker's CONNECT). Kept fresh from
//! the registry by [`crate::jitp::Jitp::run_upkeep`]; the CRL is published from the
//! same entries (see [`crate::revocation`]).
use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

/// Revoked certificates, as the TLS handshake sees them. Refreshed from the registry.
#[derive(Debug, Default)]
pub struct RevocationView {
    revoked_serials: RwLock<HashSet<String>>,
    /// The RFC 5280 reason name of each revoked serial that has one (`superseded` for
    /// the old certificate of a confirmed rotation).
    reasons: RwLock<HashMap<String, String>>,
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

    /// The revocation reason recorded for a serial in the current revoked set, if any
    /// (e.g. `superseded` when a confirmed rotation retired it).
    pub fn reason_of(&self, serial_hex: &str) -> Option<String> {
        self.reasons
            .read()
            .expect("revocation view poisoned")
            .get(serial_hex)
            .cloned()
    }

    /// Replaces the revoked set: (lowercase hex serial, as the registry keeps it, and
    /// its revocation reason).
    pub(crate) fn replace(&self, entries: Vec<(String, Option<String>)>) {
        let mut reasons = HashMap::new();
        let mut serials = HashSet::with_capacity(entries.len());
        for (serial, reason) in entries {
            if let Some(reason) = reason {
                reasons.insert(serial.clone(), reason);
            }
            serials.insert(serial);
        }
        *self
            .revoked_serials
            .write()
            .expect("revocation view poisoned") = serials;
        *self.reasons.write().expect("revocation view poisoned") = reasons;
    }
}
