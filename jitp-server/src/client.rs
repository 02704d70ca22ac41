//! A device-side client: one new mutual-TLS connection per `POST /v1/connect`, as a
//! device does. Used by `fleetcert demo` and the tests; works against any HTTPS server
//! that asks for client certificates.
use crate::TlsError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;

/// A device identity and the trust anchor it checks the server against.
#[derive(Clone)]
pub struct DeviceClient {
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl DeviceClient {
    /// A client presenting `cert_pem` (leaf first, then any intermediates) and its
    /// `key_pem`, trusting the CA certificates in `root_pem` for a server certificate
    /// valid for `server_name`. TLS 1.3 and 1.2, ring's default suites.
    ///
    /// [`TlsError::Pem`] means a PEM input did not parse; [`TlsError::Config`] that rustls
    /// refused it (a root it cannot use, a key that does not match, a bad server name).
    pub fn new(
        root_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots
                .add(ca.map_err(|e| TlsError::Pem(e.to_string()))?)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| TlsError::Config(format!("server name {server_name:?}: {e}")))?;
        Ok(DeviceClient {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Opens a new connection, sends `POST /v1/connect`, returns (status, body).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<(u16, String)> {
        self.post(addr, "/v1/connect").await
    }

    /// Opens a new connection, sends an empty `POST path`, returns (status, body).
    pub async fn post(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::post(path)
            .header("host", "fleetcert")
            .body(Empty::<Bytes>::new())
            .map_err(std::io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        drop(sender);
        let _ = driver.await;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
