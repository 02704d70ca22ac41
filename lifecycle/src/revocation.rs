//! Revocation and the CRL.
//!
//! `fleetcert revoke` and rotation confirmations mark certificates revoked in the
//! registry. From that set the issuing CA signs a CRL (RFC 5280 v2: CRL number, reason
//! codes, thisUpdate/nextUpdate), stored in the registry so every server hands out the
//! same one. A publisher re-signs when the revoked set changes or when less than half of
//! the current CRL's validity is left; revoked certificates that have expired drop off,
//! so the CRL does not grow without bound.
use crate::LifecycleError;
use crate::renewal::Clock;
use fleetcert_ca::{CrlEntry, IssuingCa, RevocationReason};
use fleetcert_registry::{Registry, RevocationTarget, RevokedEntry, StoredCrl};
use std::sync::{Arc, RwLock};

/// How long a CRL is valid (nextUpdate − thisUpdate). Relying parties cache it that
/// long; a new one is published after every revocation and once half of this is gone.
pub const CRL_VALIDITY_SECS: i64 = 24 * 3600;

/// Revokes a certificate (and its undelivered replacements) or every certificate of a
/// thing. Returns what this call revoked; empty if everything was revoked already.
pub async fn revoke(
    registry: &dyn Registry,
    target: RevocationTarget,
    reason: RevocationReason,
    at: i64,
) -> Result<Vec<RevokedEntry>, LifecycleError> {
    let revocation = fleetcert_registry::Revocation {
        target,
        reason: reason.as_str().to_owned(),
        at,
    };
    Ok(registry.revoke(&revocation).await?)
}

/// Signs, stores and hands out the CRL.
pub struct CrlPublisher {
    registry: Arc<dyn Registry>,
    ca: Arc<IssuingCa>,
    clock: Arc<dyn Clock>,
    validity_secs: i64,
    current: RwLock<Option<Arc<StoredCrl>>>,
}

impl std::fmt::Debug for CrlPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlPublisher")
            .field("validity_secs", &self.validity_secs)
            .finish_non_exhaustive()
    }
}

/// What [`CrlPublisher::refresh`] did.
#[derive(Debug, Clone)]
pub struct Published {
    /// The CRL now current, as stored in the registry (DER, number, update times).
    pub crl: Arc<StoredCrl>,
    /// True if this call signed a new CRL (false: the stored one was still current).
    pub signed: bool,
}

impl CrlPublisher {
    /// A publisher signing with `ca` and storing in `registry`, each CRL valid for
    /// [`CRL_VALIDITY_SECS`]. Holds no CRL until [`Self::refresh`] or [`Self::publish`].
    pub fn new(registry: Arc<dyn Registry>, ca: Arc<IssuingCa>, clock: Arc<dyn Clock>) -> Self {
        CrlPublisher {
            registry,
            ca,
            clock,
            validity_secs: CRL_VALIDITY_SECS,
            current: RwLock::new(None),
        }
    }

    /// The CRL last published or loaded by this publisher.
    pub fn current(&self) -> Option<Arc<StoredCrl>> {
        self.current.read().expect("crl lock poisoned").clone()
    }

    /// Reads the revoked set and publishes a new CRL if needed.
    pub async fn refresh(&self) -> Result<Published, LifecycleError> {
        let entries = self.registry.revoked_entries(self.clock.now()).await?;
        self.publish(&entries).await
    }

    /// Publishes a CRL for `entries` (the registry's current revoked set) unless the
    /// stored one lists exactly these and has more than half its validity left. If
    /// another publisher stores a CRL first, re-reads and retries.
    pub async fn publish(&self, entries: &[RevokedEntry]) -> Result<Published, LifecycleError> {
        let digest = entries_digest(entries);
        for _ in 0..8 {
            let now = self.clock.now();
            let latest = self.registry.latest_crl().await?;
            if let Some(latest) = &latest
                && latest.entries_digest == digest
                && latest.next_update - now > self.validity_secs / 2
                && latest.this_update <= now
            {
                let crl = Arc::new(latest.clone());
                *self.current.write().expect("crl lock poisoned") = Some(crl.clone());
                return Ok(Published { crl, signed: false });
            }
            let number = latest.as_ref().map_or(1, |l| l.number + 1);
            let crl = self.sign(number, now, entries, &digest)?;
            if self.registry.store_crl(&crl).await? {
                tracing::info!(number, entries = entries.len(), "published a new CRL");
                let crl = Arc::new(crl);
                *self.current.write().expect("crl lock poisoned") = Some(crl.clone());
                return Ok(Published { crl, signed: true });
            }
        }
        Err(LifecycleError::BadInput(
            "could not store a CRL: other publishers kept storing newer ones".into(),
        ))
    }

    fn sign(
        &self,
        number: i64,
        now: i64,
        entries: &[RevokedEntry],
        digest: &str,
    ) -> Result<StoredCrl, LifecycleError> {
        let when = |secs: i64| {
            time::OffsetDateTime::from_unix_timestamp(secs)
                .map_err(|e| LifecycleError::BadInput(format!("time out of range: {e}")))
        };
        let ca_entries = entries
            .iter()
            .map(|e| {
                Ok(CrlEntry {
                    serial_hex: e.serial.clone(),
                    revoked_at: when(e.revoked_at)?,
                    reason: e
                        .reason
                        .as_deref()
                        .and_then(|r| r.parse::<RevocationReason>().ok())
                        .unwrap_or(RevocationReason::Unspecified),
                })
            })
            .collect::<Result<Vec<_>, LifecycleError>>()?;
        let next_update = now + self.validity_secs;
        let signed =
            self.ca
                .sign_crl(number as u64, when(now)?, when(next_update)?, &ca_entries)?;
        Ok(StoredCrl {
            number,
            this_update: now,
            next_update,
            entries_digest: digest.to_owned(),
            entry_count: entries.len() as i64,
            der: signed.der,
        })
    }
}

/// SHA-256 over the entries as the CRL lists them (serial, time, reason).
pub fn entries_digest(entries: &[RevokedEntry]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for e in entries {
        ctx.update(e.serial.as_bytes());
        ctx.update(b"|");
        ctx.update(e.revoked_at.to_string().as_bytes());
        ctx.update(b"|");
        ctx.update(e.reason.as_deref().unwrap_or("").as_bytes());
        ctx.update(b"\n");
    }
    hex::encode(ctx.finish())
}

/// PEM (`X509 CRL`) of a DER CRL.
pub fn crl_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("X509 CRL", der.to_vec()))
}
