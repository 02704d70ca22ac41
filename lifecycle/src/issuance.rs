//! How device certificates are made: the issuing CA, the device profile and the renewal
//! point, shared by provisioning, the rotation worker and re-enrollment.
use crate::LifecycleError;
use crate::renewal::RenewalPolicy;
use fleetcert_ca::{
    DeviceKey, DeviceProfile, IssuedCertificate, IssuingCa, KeyAlgorithm, ThingName,
};
use fleetcert_registry::{CertOrigin, CertificateRecord, NewCertificate};
use std::sync::Arc;

/// How device certificates are made: the CA, the profile, the renewal point.
pub struct Issuance {
    /// The issuing CA, with its key, that signs every certificate.
    pub ca: Arc<IssuingCa>,
    /// The device profile (validity, key algorithm, CRL URL); [`Issuance::replacement`]
    /// overrides the validity and, for generated keys, the algorithm per certificate.
    pub profile: DeviceProfile,
    /// Where in each certificate's lifetime its rotation comes due (recorded as
    /// `renew_at`).
    pub renewal: RenewalPolicy,
}

impl std::fmt::Debug for Issuance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuance")
            .field("profile", &self.profile)
            .field("renewal", &self.renewal)
            .finish_non_exhaustive()
    }
}

impl Issuance {
    /// A replacement for `old`: same thing, same lifetime (in whole days), and for a
    /// generated key the same algorithm.
    pub fn replacement(
        &self,
        old: &CertificateRecord,
        key: DeviceKey<'_>,
        now: i64,
    ) -> Result<(IssuedCertificate, NewCertificate), LifecycleError> {
        let thing = ThingName::parse(&old.thing_name)?;
        let lifetime_days = ((old.not_after - old.not_before) as f64 / 86_400.0).round();
        let mut profile = self.profile.clone();
        profile.validity_days = (lifetime_days as u32).max(1);
        if matches!(key, DeviceKey::Generate) {
            profile.key_algorithm = old
                .key_algorithm
                .parse::<KeyAlgorithm>()
                .unwrap_or(self.profile.key_algorithm);
        }
        let now = time::OffsetDateTime::from_unix_timestamp(now)
            .map_err(|e| LifecycleError::BadInput(format!("clock out of range: {e}")))?;
        let issued = self.ca.issue(&thing, key, &profile, now)?;
        let record = new_certificate(&issued, self.ca.subject(), &self.renewal);
        Ok((issued, record))
    }
}

/// The registry record of a freshly signed certificate.
pub(crate) fn new_certificate(
    cert: &IssuedCertificate,
    issuer: &str,
    renewal: &RenewalPolicy,
) -> NewCertificate {
    let not_before = cert.not_before.unix_timestamp();
    let not_after = cert.not_after.unix_timestamp();
    NewCertificate {
        serial: cert.serial_hex.clone(),
        fingerprint_sha256: cert.fingerprint_sha256_hex.clone(),
        public_key_sha256: cert.public_key_sha256_hex.clone(),
        issuer: issuer.to_owned(),
        not_before,
        not_after,
        origin: if cert.private_key.is_some() {
            CertOrigin::Generated
        } else {
            CertOrigin::Csr
        },
        key_algorithm: cert.key_algorithm.to_string(),
        renew_at: renewal.renew_at(&cert.serial_hex, not_before, not_after),
        der: cert.der.clone(),
    }
}
