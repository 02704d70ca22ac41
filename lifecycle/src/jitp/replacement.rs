//! Replacement fetches: a device whose key fleetcert generated gets its replacement key
//! and certificate, the same ones until it uses them.
use super::{Jitp, Refusal, rfc3339, rotation_due};
use crate::rotation::RotationStats;
use fleetcert_ca::DeviceKey;
use fleetcert_registry::CertOrigin;

/// A replacement key and certificate for a device whose key fleetcert generated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchedCredentials {
    /// The thing the replacement belongs to.
    pub thing_name: String,
    /// The replacement's serial (lowercase hex).
    pub certificate_serial: String,
    /// The replacement's notAfter (RFC 3339).
    pub certificate_not_after: String,
    /// The replacement certificate (PEM).
    pub certificate_pem: String,
    /// PKCS#8 PEM; never stored unencrypted, deleted from the registry once handed out.
    pub private_key_pem: String,
    /// Issuing CA then root.
    pub chain_pem: String,
}

impl Jitp {
    /// For a device whose key fleetcert generated, the replacement key and certificate —
    /// the one the worker issued ahead of time, or one issued now if none is waiting and
    /// rotation is due. Until the replacement is used (which revokes this certificate),
    /// every fetch hands out the same key and certificate: a lost reply is fetched
    /// again, and concurrent fetches get one key.
    pub async fn fetch_replacement(&self, cert_der: &[u8]) -> Result<FetchedCredentials, Refusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_too_late(&identity)?;
        let state = self.authenticate(&identity).await?;
        if state.certificate.origin != CertOrigin::Generated {
            return Err(Refusal::UseEst);
        }
        let now = self.clock.now();
        let chain_pem = self.issuance.ca.chain_pem();
        // A concurrent fetch may commit its replacement between our look and our
        // commit; ours is then refused (`replacement_pending`, nothing written, our key
        // never leaves) and we hand out that one. Twice in a row would need a third
        // party replacing it in between: give up then.
        for _ in 0..3 {
            if let Some(taken) = self
                .registry
                .take_replacement(&state.certificate.serial, now)
                .await
                .map_err(Refusal::unavailable)?
            {
                let key = self
                    .sealer
                    .open(&taken.certificate.serial, &taken.sealed_key)
                    .map_err(|e| Refusal::internal(Refusal::ReplacementUnreadable, e))?;
                let key = fleetcert_ca::PrivateKey::from_pkcs8_der(&key)
                    .map_err(|e| Refusal::internal(Refusal::ReplacementUnreadable, e))?;
                if !taken.again {
                    RotationStats::add(&self.stats.delivered, 1);
                }
                self.caches.forget(&state.certificate.fingerprint_sha256);
                return Ok(FetchedCredentials {
                    thing_name: state.thing.name.clone(),
                    certificate_serial: taken.certificate.serial.clone(),
                    certificate_not_after: rfc3339(taken.certificate.not_after),
                    certificate_pem: pem::encode(&pem::Pem::new(
                        "CERTIFICATE",
                        taken.certificate.der.clone(),
                    )),
                    private_key_pem: key.to_pem().to_string(),
                    chain_pem,
                });
            }
            if !rotation_due(&state, now) {
                return Err(Refusal::RotationNotDue(format!(
                    "certificate {} is not due for rotation before {}",
                    state.certificate.serial,
                    rfc3339(state.certificate.renew_at)
                )));
            }
            let (issued, new) = self
                .issuance
                .replacement(&state.certificate, DeviceKey::Generate, now)
                .map_err(|e| Refusal::internal(Refusal::IssuanceFailed, e))?;
            let key = issued
                .private_key
                .as_ref()
                .expect("a generated key comes with its private key");
            let sealed = self
                .sealer
                .seal(&new.serial, key.pkcs8_der())
                .map_err(|e| Refusal::internal(Refusal::SealingFailed, e))?;
            match self.record_replacement(&state, new, Some(sealed)).await {
                Ok(()) => {
                    return Ok(FetchedCredentials {
                        thing_name: state.thing.name.clone(),
                        certificate_serial: issued.serial_hex.clone(),
                        certificate_not_after: rfc3339(issued.not_after.unix_timestamp()),
                        certificate_pem: issued.pem.clone(),
                        private_key_pem: key.to_pem().to_string(),
                        chain_pem,
                    });
                }
                Err(Refusal::ReplacementPending(_)) => continue,
                Err(refusal) => return Err(refusal),
            }
        }
        Err(Refusal::RegistryBusy(
            "the replacement kept changing; try again".into(),
        ))
    }
}
