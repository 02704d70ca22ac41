//! Re-enrollment (RFC 7030 simplereenroll): a device with its own key sends a CSR for a
//! new key, authenticated by its current certificate; and the commit every replacement
//! handed out in an exchange goes through.
use super::{Jitp, Refusal};
use crate::rotation::RotationStats;
use fleetcert_ca::{DeviceCsr, DeviceKey};
use fleetcert_registry::{DeviceState, ReplaceOutcome, Replacement};

/// How many replacements one certificate may get (EST re-enrollments, keys generated on
/// demand, a pre-issued one): a device that lost its replacement may ask again, but a
/// stolen or looping certificate cannot have certificates issued (and the CRL grown)
/// without limit. Beyond it: [`Refusal::ReplacementLimit`]. A fetched replacement does
/// not count again: until it is used, a fetch hands out the same key and certificate.
pub const MAX_REPLACEMENTS_PER_CERTIFICATE: u32 = 3;

impl Jitp {
    /// Re-enrollment (RFC 7030 §4.2.2): `body` is a PKCS#10 CSR (base64 DER as RFC 7030
    /// sends it, or PEM, or raw DER) for a new key, with the thing's name as its CN.
    /// Returns the new certificate (DER), committed before it is returned. The old
    /// certificate becomes `superseded` and keeps working until the device uses the new
    /// one.
    pub async fn reenroll(&self, cert_der: &[u8], body: &[u8]) -> Result<Vec<u8>, Refusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_too_late(&identity)?;
        let state = self.authenticate(&identity).await?;
        let csr_bytes = decode_csr_body(body).ok_or_else(|| {
            Refusal::CsrInvalid(
                "the body is not a PKCS#10 CSR (expected base64 DER, PEM or DER)".into(),
            )
        })?;
        let csr = DeviceCsr::parse(&csr_bytes).map_err(|e| Refusal::CsrInvalid(e.to_string()))?;
        if csr.common_name() != Some(state.thing.name.as_str()) {
            RotationStats::add(&self.stats.failed, 1);
            return Err(Refusal::CsrWrongThing(format!(
                "the CSR names {:?}, but this certificate belongs to thing {:?}",
                csr.common_name().unwrap_or(""),
                state.thing.name
            )));
        }
        let (issued, new) = self
            .issuance
            .replacement(&state.certificate, DeviceKey::Csr(&csr), self.clock.now())
            .map_err(|e| Refusal::internal(Refusal::IssuanceFailed, e))?;
        self.record_replacement(&state, new, None).await?;
        Ok(issued.der)
    }

    /// Commits a replacement handed out in this exchange (at most
    /// [`MAX_REPLACEMENTS_PER_CERTIFICATE`] per certificate). A generated key comes with
    /// its `sealed_key`, kept until the replacement is used so it can be handed out
    /// again; such a replacement is refused with [`Refusal::ReplacementPending`] while
    /// another one waits (the caller takes that one).
    pub(super) async fn record_replacement(
        &self,
        state: &DeviceState,
        new: fleetcert_registry::NewCertificate,
        sealed_key: Option<Vec<u8>>,
    ) -> Result<(), Refusal> {
        let replacement = Replacement {
            authenticated_serial: state.certificate.serial.clone(),
            thing_name: state.thing.name.clone(),
            new,
            sealed_key,
            max_replacements: Some(MAX_REPLACEMENTS_PER_CERTIFICATE),
            at: self.clock.now(),
        };
        match self
            .registry
            .replace_certificate(&replacement)
            .await
            .map_err(Refusal::unavailable)?
        {
            ReplaceOutcome::Replaced { revoked } => {
                RotationStats::add(&self.stats.issued, 1);
                RotationStats::add(&self.stats.delivered, 1);
                if !revoked.is_empty() {
                    self.revoked.notify_one();
                }
                self.caches.forget(&state.certificate.fingerprint_sha256);
                Ok(())
            }
            ReplaceOutcome::Refused { code, reason } => {
                let refusal = Refusal::of_replacement(code, reason);
                match &refusal {
                    Refusal::ReplacementPending(_) => {}
                    Refusal::ReplacementLimit(reason) => tracing::warn!(
                        thing = %state.thing.name,
                        serial = %state.certificate.serial,
                        "replacement refused: {reason}"
                    ),
                    _ => RotationStats::add(&self.stats.failed, 1),
                }
                Err(refusal)
            }
        }
    }
}

/// The CSR in an EST request body: base64 (RFC 7030; line breaks allowed), PEM, or DER.
/// `None` when the body is none of these; the bytes returned are then for
/// [`fleetcert_ca::DeviceCsr::parse`], which checks everything else.
pub fn decode_csr_body(body: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::str::from_utf8(body).ok();
    if let Some(text) = text {
        let trimmed = text.trim();
        if trimmed.starts_with("-----BEGIN") {
            return Some(trimmed.as_bytes().to_vec());
        }
        let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
        if !compact.is_empty()
            && let Ok(der) = base64::engine::general_purpose::STANDARD.decode(compact)
        {
            return Some(der);
        }
    }
    (body.first() == Some(&0x30)).then(|| body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_bodies_in_every_spelling() {
        let der = [0x30u8, 0x03, 0x02, 0x01, 0x00];
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let wrapped = format!("{}\r\n{}\r\n", &b64[..4], &b64[4..]);
        assert_eq!(decode_csr_body(b64.as_bytes()).unwrap(), der);
        assert_eq!(decode_csr_body(wrapped.as_bytes()).unwrap(), der);
        assert_eq!(decode_csr_body(&der).unwrap(), der);
        assert!(decode_csr_body(b"-----BEGIN CERTIFICATE REQUEST-----\nxx").is_some());
        assert!(decode_csr_body(b"").is_none());
        assert!(decode_csr_body(b"not base64 !!").is_none());
    }
}
