//! Verification of device certificates against the fleet chain, with webpki — the same
//! path validation a TLS server performs on a client certificate.
use fleetcert_lifecycle::LifecycleError;
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

    /// Verifies one DER certificate for TLS client authentication at `now`.
    pub fn verify(&self, cert_der: &[u8], now: UnixTime) -> Result<VerifiedDevice, String> {
        let der = CertificateDer::from(cert_der);
        let ee = webpki::EndEntityCert::try_from(&der).map_err(|e| e.to_string())?;
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                &self.intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| e.to_string())?;
        Ok(VerifiedDevice {
            chain_len: path.intermediate_certificates().count() + 2,
        })
    }
}
