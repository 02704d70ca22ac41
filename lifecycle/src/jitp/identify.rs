//! Certificate → thing, read-only: what the registry says of a certificate that passed
//! path validation. For front ends that authorize each action of an authenticated
//! device (the broker integration) rather than register it.

use super::{Jitp, Refusal};
use fleetcert_registry::{CertStatus, CertificateRecord, ThingRecord};

/// A device certificate as the registry knows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IdentifiedDevice {
    /// The thing the certificate belongs to (its type and attributes feed the
    /// `iot:Connection.Thing.*` policy variables).
    pub thing: ThingRecord,
    /// The certificate's record (`active` or `superseded`; never `revoked`).
    pub certificate: CertificateRecord,
    /// Names of the policies attached to the certificate, sorted. Empty before the
    /// first connect registered it.
    pub policies: Vec<String>,
}

impl IdentifiedDevice {
    /// Whether the certificate is registered to its thing (`iot:Connection.Thing.IsAttached`):
    /// false until its first connect.
    pub fn is_attached(&self) -> bool {
        self.certificate.registered_at.is_some()
    }
}

impl Jitp {
    /// The registry's view of `cert_der` (DER), without writing anything: no
    /// registration, no rotation confirmation, no connection record.
    ///
    /// Refuses an unreadable or expired certificate, one the registry does not hold, and
    /// a revoked one (by its record or by the revocation view, whichever knows first).
    pub async fn identify(&self, cert_der: &[u8]) -> Result<IdentifiedDevice, Refusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_expired(&identity)?;
        let state = self.known_device_state(&identity).await?;
        if state.certificate.status == CertStatus::Revoked
            || self.revocation.is_serial_revoked(&state.certificate.serial)
        {
            return Err(Refusal::CertificateRevoked(format!(
                "certificate {} is revoked",
                state.certificate.serial
            )));
        }
        Ok(IdentifiedDevice {
            thing: state.thing,
            certificate: state.certificate,
            policies: state.policies,
        })
    }
}
