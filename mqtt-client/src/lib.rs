//! A small MQTT 3.1.1 device client over mutual TLS, and the AWS IoT Fleet Provisioning
//! flow of a device that holds a claim certificate.
//!
//! fleetcert's own tools act as devices with it: `fleetcert demo` provisions a device by
//! claim through mosquitto, and `fleetcert-bench mqtt claim` does it for thousands. It is
//! deliberately small: QoS 0 and 1, one session per [`Client`], packets encoded by hand
//! ([`codec`]); TLS is rustls with the ring provider, like the rest of fleetcert.
//! Independent clients (paho, the AWS IoT Device SDK) check the broker side in the tests.

pub mod codec;
pub mod fleet_provisioning;

use bytes::{Buf, BytesMut};
use codec::Packet;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why a session or a request failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be made.
    Connect(std::io::Error),
    /// The TLS handshake failed, or a TLS alert came later (a TLS 1.3 server checks the
    /// client certificate after the client has finished its side of the handshake).
    Tls(std::io::Error),
    /// CONNACK with this non-zero return code (5: not authorized).
    Refused(u8),
    /// The broker closed the connection; what the client was waiting for.
    Closed(String),
    /// Reading or writing failed.
    Io(std::io::Error),
    /// Bytes or replies that are not what MQTT or the API says.
    Protocol(String),
    /// A Fleet Provisioning request was answered on its `rejected` topic.
    Rejected {
        /// `errorCode` of the reply.
        code: String,
        /// `errorMessage` of the reply.
        message: String,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "cannot connect: {e}"),
            ClientError::Tls(e) => write!(f, "TLS: {e}"),
            ClientError::Refused(code) => write!(f, "CONNACK {code} (refused)"),
            ClientError::Closed(what) => write!(f, "the broker closed the connection {what}"),
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Protocol(what) => write!(f, "{what}"),
            ClientError::Rejected { code, message } => write!(f, "rejected: {code}: {message}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Whether an I/O error is a TLS one (rustls puts its error inside the `io::Error`).
pub fn is_tls_error(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

impl ClientError {
    fn io(e: std::io::Error) -> ClientError {
        if is_tls_error(&e) {
            ClientError::Tls(e)
        } else {
            ClientError::Io(e)
        }
    }
}

/// An MQTT session over TLS, after its CONNACK 0.
pub struct Client {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_packet_id: u16,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// The CONNACK return code for "accepted".
pub const ACCEPTED: u8 = 0;

impl Client {
    /// TCP connect, TLS handshake (`tls` holds the client certificate), CONNECT with a
    /// clean session and `client_id`, CONNACK. No timeout of its own: wrap the call.
    pub async fn connect(
        addr: SocketAddr,
        server_name: ServerName<'static>,
        tls: &TlsConnector,
        client_id: &str,
        keep_alive_seconds: u16,
    ) -> Result<Client, ClientError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let stream = tls
            .connect(server_name, tcp)
            .await
            .map_err(ClientError::Tls)?;
        let mut client = Client {
            stream,
            buf: BytesMut::with_capacity(4096),
            next_packet_id: 1,
        };
        client
            .send(&codec::connect(client_id, keep_alive_seconds, true))
            .await?;
        match client.next_packet().await? {
            Some(Packet::ConnAck { code: ACCEPTED, .. }) => Ok(client),
            Some(Packet::ConnAck { code, .. }) => Err(ClientError::Refused(code)),
            Some(other) => Err(ClientError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
            None => Err(ClientError::Closed("before CONNACK".into())),
        }
    }

    /// The TLS session (protocol version, cipher suite) for reports.
    pub fn tls(&self) -> &rustls::ClientConnection {
        self.stream.get_ref().1
    }

    /// Writes `bytes` (one or more encoded packets) and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(ClientError::io)?;
        self.stream.flush().await.map_err(ClientError::io)
    }

    /// A whole packet already read, if any.
    pub fn try_decode(&mut self) -> Result<Option<Packet>, ClientError> {
        match codec::decode(&self.buf) {
            Ok(Some((packet, used))) => {
                self.buf.advance(used);
                Ok(Some(packet))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// Reads more bytes; `Ok(false)` at the end of the stream.
    pub async fn fill(&mut self) -> Result<bool, ClientError> {
        self.buf.reserve(4096);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(ClientError::io(e)),
        }
    }

    /// The next packet; `None` at a clean end of the stream.
    pub async fn next_packet(&mut self) -> Result<Option<Packet>, ClientError> {
        loop {
            if let Some(packet) = self.try_decode()? {
                return Ok(Some(packet));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        id
    }

    /// SUBSCRIBE to `filters` (each with its QoS) and wait for the SUBACK; its return
    /// codes, one per filter (0–2 granted QoS, 0x80 refused).
    pub async fn subscribe(&mut self, filters: &[(&str, u8)]) -> Result<Vec<u8>, ClientError> {
        let id = self.packet_id();
        self.send(&codec::subscribe_many(id, filters)).await?;
        loop {
            match self.next_packet().await? {
                Some(Packet::SubAck { packet_id, codes }) if packet_id == id => return Ok(codes),
                Some(_) => {}
                None => return Err(ClientError::Closed("waiting for SUBACK".into())),
            }
        }
    }

    /// PUBLISH at QoS 1 and wait for its PUBACK. Messages delivered meanwhile are
    /// acknowledged and returned, in order.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
        let id = self.packet_id();
        self.send(&codec::publish(topic, Some(id), payload)).await?;
        let mut delivered = Vec::new();
        loop {
            match self.next_packet().await? {
                Some(Packet::PubAck { packet_id }) if packet_id == id => return Ok(delivered),
                Some(Packet::Publish {
                    qos,
                    packet_id,
                    topic,
                    payload,
                }) => {
                    self.acknowledge(qos, packet_id).await?;
                    delivered.push((topic, payload));
                }
                Some(_) => {}
                None => {
                    return Err(ClientError::Closed(format!(
                        "waiting for the PUBACK on {topic}"
                    )));
                }
            }
        }
    }

    /// The next message delivered (acknowledged if QoS 1): topic and payload.
    pub async fn next_message(&mut self) -> Result<(String, Vec<u8>), ClientError> {
        loop {
            match self.next_packet().await? {
                Some(Packet::Publish {
                    qos,
                    packet_id,
                    topic,
                    payload,
                }) => {
                    self.acknowledge(qos, packet_id).await?;
                    return Ok((topic, payload));
                }
                Some(_) => {}
                None => return Err(ClientError::Closed("waiting for a message".into())),
            }
        }
    }

    async fn acknowledge(&mut self, qos: u8, packet_id: Option<u16>) -> Result<(), ClientError> {
        match (qos, packet_id) {
            (1, Some(id)) => self.send(&codec::puback(id)).await,
            _ => Ok(()),
        }
    }

    /// DISCONNECT, then TLS close_notify and the TCP close; errors ignored.
    pub async fn disconnect(mut self) {
        let _ = self.send(&codec::disconnect()).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A TLS client configuration for a device identity: the certificate (and any chain after
/// it) from `certificate_pem`, its key, `roots` for the broker's certificate; ring
/// provider, TLS 1.3 and 1.2, no session resumption (every connection is a full
/// handshake, as for a device that just booted).
pub fn identity(
    roots: &rustls::RootCertStore,
    certificate_pem: &[u8],
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<TlsConnector, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(certificate_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::Protocol(format!("the certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(ClientError::Protocol(
            "the certificate PEM holds no certificate".into(),
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .map_err(|e| ClientError::Protocol(format!("the certificate and key do not fit: {e}")))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(std::sync::Arc::new(config)))
}
