//! Verification of device certificates against the fleet chain, with webpki — the same
//! path validation a TLS server performs on a client certificate.
use fleetcert_lifecycle::LifecycleError;
use fleetcert_lifecycle::jitp::Refusal;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

/// Verifies device certificates (client-auth end entities) against root + issuing CA.
#[derive(Debug)]
pub struct ChainVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
}

/// A certificate that verified.
#[derive(Debug, Clone)]
pub struct VerifiedDevice {
    /// Certificates in the verified path: the device, intermediates, the anchor.
    pub chain_len: usize,
}

impl ChainVerifier {
    /// `chain_pem` is issuing then root, as `ca export --chain` prints it.
    pub fn from_chain_pem(chain_pem: &str) -> Result<Self, LifecycleError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| LifecycleError::BadInput(format!("CA chain is not valid PEM: {e}")))?;
        let (root, intermediates) = certs
            .split_last()
            .ok_or_else(|| LifecycleError::BadInput("CA chain holds no certificate".into()))?;
        let anchor = webpki::anchor_from_trusted_cert(root)
            .map_err(|e| LifecycleError::BadInput(format!("root CA certificate: {e}")))?
            .to_owned();
        Ok(ChainVerifier {
            anchors: vec![anchor],
            intermediates: intermediates.to_vec(),
        })
    }

    /// The device listener's trust: the issuing CA is the anchor (as in
    /// [`crate::tls::server_tls_config`]), so a device that sends only its leaf verifies.
    pub fn for_issuing_ca(issuing_ca_pem: &str) -> Result<Self, LifecycleError> {
        let first = CertificateDer::pem_slice_iter(issuing_ca_pem.as_bytes())
            .next()
            .ok_or_else(|| LifecycleError::BadInput("issuing CA PEM holds no certificate".into()))?
            .map_err(|e| LifecycleError::BadInput(format!("issuing CA is not valid PEM: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&first)
            .map_err(|e| LifecycleError::BadInput(format!("issuing CA certificate: {e}")))?
            .to_owned();
        Ok(ChainVerifier {
            anchors: vec![anchor],
            intermediates: Vec::new(),
        })
    }

    /// Verifies one DER certificate for TLS client authentication at `now`.
    pub fn verify(&self, cert_der: &[u8], now: UnixTime) -> Result<VerifiedDevice, String> {
        self.verify_webpki(cert_der, now).map_err(|e| e.to_string())
    }

    /// Verifies a device certificate as the mutual-TLS listener's handshake does, for a
    /// front end that does not terminate TLS itself (the broker's CONNECT): path
    /// validation for client authentication at `now` (Unix seconds, the lifecycle clock),
    /// then the revocation view. Refusals carry lifecycle's stable codes:
    /// `certificate_unreadable`, `unknown_issuer`, `certificate_expired`,
    /// `certificate_invalid`, `certificate_revoked`.
    pub fn verify_device(
        &self,
        cert_der: &[u8],
        now: i64,
        revocation: &crate::RevocationView,
    ) -> Result<VerifiedDevice, Refusal> {
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now).unwrap_or(0),
        ));
        let verified = self.verify_webpki(cert_der, at).map_err(|e| match e {
            webpki::Error::BadDer | webpki::Error::BadDerTime | webpki::Error::TrailingData(_) => {
                Refusal::CertificateUnreadable(format!("cannot read the certificate: {e}"))
            }
            // A CA of the same name that did not sign it (another fleet's) is as unknown.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                Refusal::UnknownIssuer(
                    "the certificate is not issued by this fleet's issuing CA".into(),
                )
            }
            webpki::Error::CertExpired { .. } => {
                Refusal::CertificateExpired("the certificate has expired".into())
            }
            webpki::Error::CertNotValidYet { .. } => {
                Refusal::CertificateInvalid("the certificate is not valid yet".into())
            }
            other => {
                Refusal::CertificateInvalid(format!("the certificate does not verify: {other}"))
            }
        })?;
        if revocation.is_revoked(cert_der) {
            let serial = crate::certificate_serial(cert_der).unwrap_or_default();
            return Err(Refusal::CertificateRevoked(format!(
                "certificate {serial} is revoked"
            )));
        }
        Ok(verified)
    }

    fn verify_webpki(
        &self,
        cert_der: &[u8],
        now: UnixTime,
    ) -> Result<VerifiedDevice, webpki::Error> {
        let der = CertificateDer::from(cert_der);
        let ee = webpki::EndEntityCert::try_from(&der)?;
        let path = ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &self.intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )?;
        Ok(VerifiedDevice {
            chain_len: path.intermediate_certificates().count() + 2,
        })
    }
}
