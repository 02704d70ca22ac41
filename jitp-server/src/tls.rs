//! rustls configuration for the device listener.
use fleetcert_lifecycle::RevocationView;
use fleetcert_lifecycle::renewal::Clock;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("server certificate or key is not valid PEM: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// How client certificates are judged beyond path validation.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Revoked serials, refreshed from the registry.
    pub revocation: Arc<RevocationView>,
    /// The clock validity is checked against (tests shift it).
    pub clock: Arc<dyn Clock>,
    /// A certificate that expired at most this long ago still passes the handshake, so
    /// it can re-enroll (the request handlers allow nothing else). 0: no window.
    pub renew_after_expiry_secs: i64,
}

impl ClientAuth {
    /// The settings a [`fleetcert_lifecycle::jitp::Jitp`] was built with.
    pub fn of(jitp: &fleetcert_lifecycle::jitp::Jitp) -> Self {
        ClientAuth {
            revocation: jitp.revocation(),
            clock: jitp.clock(),
            renew_after_expiry_secs: jitp.renew_after_expiry_secs(),
        }
    }
}

/// rustls asks this for "now"; it answers with fleetcert's clock.
#[derive(Debug)]
struct ClockTime(Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        u64::try_from(self.0.now())
            .ok()
            .map(|secs| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)))
    }
}

/// Webpki path validation to the issuing CA, then the registry's revocation view.
#[derive(Debug)]
struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    auth: ClientAuth,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) if self.auth.renew_after_expiry_secs > 0 => {
                // Within the window, judge the chain as of the last second the
                // certificate was valid; past it, refuse as expired.
                let not_after = RevocationView::not_after(end_entity.as_ref())
                    .and_then(|t| u64::try_from(t).ok())
                    .ok_or(Error::InvalidCertificate(
                        rustls::CertificateError::BadEncoding,
                    ))?;
                let expired_for = now.as_secs().saturating_sub(not_after);
                if expired_for > self.auth.renew_after_expiry_secs as u64 {
                    return Err(Error::InvalidCertificate(rustls::CertificateError::Expired));
                }
                let then = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_after));
                self.inner
                    .verify_client_cert(end_entity, intermediates, then)?
            }
            other => other?,
        };
        if self.auth.revocation.is_revoked(end_entity.as_ref()) {
            return Err(Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The device listener's TLS configuration: TLS 1.2/1.3 with ring's ECDHE + AEAD suites,
/// mandatory client certificates chaining to `issuing_ca_pem`, validity judged by
/// `auth.clock`, and `auth.revocation` checked on every handshake.
pub fn server_tls_config(
    server_chain_pem: &str,
    server_key_pem: &str,
    issuing_ca_pem: &str,
    auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(server_key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(issuing_ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| TlsError::Pem(e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("issuing CA as trust anchor: {e}")))?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let time = Arc::new(ClockTime(auth.clock.clone()));
    let verifier = Arc::new(RevocationCheckingVerifier { inner, auth });
    let mut config = rustls::ServerConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips client-certificate verification,
    // so a certificate revoked (or expired) since the first handshake would keep
    // getting in. Every connection is verified against the current revocation view.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
