//! fleetcert's JITP server: a mutual-TLS HTTP/1.1 listener for devices and a plain-HTTP
//! admin listener for operators.
//!
//! Thin by design: TLS, HTTP, limits and metrics live here; what a connection *means*
//! (first connect, returning device, refusal) is decided by
//! [`fleetcert_lifecycle::jitp::Jitp`].
//!
//! Defaults, and why:
//! - TLS 1.2 and 1.3 only, ring's ECDHE + AEAD suites only (AWS IoT's recommended set).
//! - No TLS session resumption: every connection's client certificate is verified
//!   (resumption would skip the revocation check).
//! - Client certificates must chain to the fleet's *issuing* CA (it is the trust anchor,
//!   so devices that send only their leaf certificate work) and must not be revoked; the
//!   revocation view is refreshed from the registry every couple of seconds, so a
//!   revocation takes effect without a restart.
//! - A device is answered in the connection it opened: no dropped first connection.
//! - Routes: `POST /v1/connect`, `POST /.well-known/est/simpleenroll` (a claim
//!   certificate's initial enrollment), `POST /.well-known/est/simplereenroll` and
//!   `GET /.well-known/est/cacerts` (RFC 7030), `POST /v1/replacement` (fetch a
//!   replacement key + certificate made by fleetcert), `GET /crl`.
//! - A certificate that expired less than the renew-after-expiry window ago (default: no
//!   window) passes the handshake but may only re-enroll or fetch its replacement.
//! - Limits: 10 s to finish the handshake; 10 s to send a whole request, headers and body,
//!   counted from its first byte (408 and the connection closed after that; a keep-alive
//!   connection idle that long is closed too); 16 KiB of request headers (431); 64 KiB
//!   bodies (a larger `Content-Length` is refused with 413 before any of the body is
//!   read); 4,096 concurrent connections, at most 16 of them by one certificate (more
//!   are closed right after the handshake); on shutdown, requests in flight finish (up
//!   to 10 s).
//! - The open connections of a certificate revoked while they are open are closed within
//!   a few seconds of the revocation reaching the revocation view.
//! - Optionally a third listener, the broker API for the mosquitto plugin ([`broker`]):
//!   plain HTTP/1.1 on loopback, bearer secret, `POST /broker/v1/connect`,
//!   `/broker/v1/disconnect`, `/broker/v1/sessions` (docs/broker-api.md).

mod admin;
pub mod broker;
mod client;
mod conns;
pub mod fleet_provisioning;
mod metrics;

pub use broker::{BrokerApi, BrokerApiError};
pub use client::DeviceClient;
pub use fleetcert_device_auth::tls::{ClientAuth, TlsError, server_tls_config};
pub use metrics::Metrics;

use bytes::Bytes;
use conns::{OpenConnections, RequestClock, TimedIo};
use fleetcert_lifecycle::jitp::{
    ConnectOutcome, ConnectReply, Jitp, Refusal, RotationAdvice, RotationMethod,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Where a device with its own key (CSR) re-enrolls (RFC 7030).
pub const EST_REENROLL_PATH: &str = "/.well-known/est/simplereenroll";
/// RFC 7030 initial enrollment, authenticated by a claim certificate.
pub const EST_ENROLL_PATH: &str = "/.well-known/est/simpleenroll";
/// Where a device whose key fleetcert generated fetches its replacement.
pub const FETCH_REPLACEMENT_PATH: &str = "/v1/replacement";

/// Connection limits of the device listener. [`Limits::default`] gives the values
/// listed in the crate documentation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time from accepting the TCP connection to a finished TLS handshake; a slower client
    /// is dropped (counted as `handshake_timeout`). Default 10 s.
    pub handshake_timeout: Duration,
    /// For a whole request, headers and body, from its first byte; also how long a
    /// keep-alive connection may stay idle. A request not complete by then gets 408 and
    /// its connection is closed (one still sending its headers is just closed).
    /// Default 10 s.
    pub request_timeout: Duration,
    /// Largest request body, in bytes (more: 413). A declared length beyond 16 times this
    /// (at least 1 MiB) is refused before any of the body is read; a smaller oversized
    /// body is read and dropped first, so a client still sending reads the 413 rather
    /// than a reset. Default 64 KiB.
    pub max_body_bytes: usize,
    /// Request line plus headers, in bytes (more: 431). Default 16 KiB.
    pub max_header_bytes: usize,
    /// Device connections open at once, handshakes included; a connection beyond this
    /// is closed as soon as it is accepted. Default 4,096.
    pub max_connections: usize,
    /// Connections one certificate may hold open at once (more: closed after the
    /// handshake). Default 16.
    pub max_connections_per_certificate: usize,
    /// How long [`Server::run`] waits, once shutdown is asked for, for requests in flight
    /// to finish before the remaining connections are dropped. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            max_connections_per_certificate: 16,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Bound listeners, ready to serve.
pub struct Server {
    device_listener: TcpListener,
    admin_listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    jitp: Arc<Jitp>,
    metrics: Arc<Metrics>,
    limits: Limits,
    mirror: Option<Arc<fleetcert_lifecycle::mirror::Mirror>>,
    broker: Option<BrokerApi>,
}

impl Server {
    /// Binds both listeners (port 0 picks a free port; see [`Server::local_addrs`]).
    pub async fn bind(
        listen: SocketAddr,
        admin_listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        jitp: Arc<Jitp>,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let device_listener = TcpListener::bind(listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}"))
        })?;
        let admin_listener = TcpListener::bind(admin_listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {admin_listen}: {e}"))
        })?;
        Ok(Server {
            device_listener,
            admin_listener,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            jitp,
            metrics: Arc::new(Metrics::new()),
            limits,
            mirror: None,
            broker: None,
        })
    }

    /// Exports this AWS mirror worker's counters and the outbox backlog on `/metrics`
    /// (the caller runs the worker).
    pub fn with_mirror(mut self, mirror: Arc<fleetcert_lifecycle::mirror::Mirror>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// Also answers the mosquitto plugin on this broker API listener (see [`broker`]).
    pub fn with_broker_api(mut self, api: BrokerApi) -> Self {
        self.broker = Some(api);
        self
    }

    /// The broker API listener's address, if there is one.
    pub fn broker_api_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(|b| b.local_addr().ok())
    }

    /// (device listener, admin listener) addresses actually bound.
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((
            self.device_listener.local_addr()?,
            self.admin_listener.local_addr()?,
        ))
    }

    /// The device listener's counters, shared with the admin listener's `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets requests in flight
    /// finish (up to [`Limits::shutdown_grace`]). Runs the JITP upkeep (revocation view,
    /// CRL publishing, connection records) meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            device_listener,
            admin_listener,
            tls,
            jitp,
            metrics,
            limits,
            mirror,
            broker,
        } = self;
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            metrics.clone(),
            jitp.clone(),
            mirror,
        ));
        let broker =
            broker.map(|api| tokio::spawn(broker::serve(api, jitp.clone(), metrics.clone())));
        // Revocation view, CRL, connection records: kept fresh while serving.
        let upkeep = tokio::spawn(jitp.clone().run_upkeep());
        // Connections by certificate: the per-certificate cap, and the connections of a
        // certificate revoked since their handshake closed once the view has it.
        let by_certificate = Arc::new(OpenConnections::new(limits.max_connections_per_certificate));
        let sweeper = tokio::spawn({
            let open = by_certificate.clone();
            let revocation = jitp.revocation();
            async move {
                let mut tick = tokio::time::interval(REVOKED_SWEEP);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    open.close_revoked(|serial| revocation.is_serial_revoked(serial));
                }
            }
        });
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = device_listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                metrics.rejected("connection_limit");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let jitp = jitp.clone();
            let metrics = metrics.clone();
            let limits = limits.clone();
            let by_certificate = by_certificate.clone();
            let watcher = graceful.watcher();
            let open = metrics.connection_opened();
            tokio::spawn(async move {
                let _held = (permit, open);
                let started = Instant::now();
                let stream =
                    match tokio::time::timeout(limits.handshake_timeout, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            metrics.handshake_failed(&e);
                            tracing::debug!(%peer, "handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            metrics.rejected("handshake_timeout");
                            return;
                        }
                    };
                metrics.handshake_ok(started.elapsed());
                let Some(cert) = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec())
                else {
                    // The verifier requires a certificate; this cannot happen.
                    metrics.rejected("no_client_certificate");
                    return;
                };
                let Some(serial) = fleetcert_device_auth::certificate_serial(&cert) else {
                    // The verifier parsed it; this cannot happen either.
                    metrics.rejected("certificate_invalid");
                    return;
                };
                let Some(registration) = by_certificate.register(serial) else {
                    metrics.rejected("certificate_connection_limit");
                    tracing::info!(
                        %peer,
                        limit = limits.max_connections_per_certificate,
                        "closed a connection: its certificate already holds the most connections one certificate may"
                    );
                    let mut stream = stream;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio::io::AsyncWriteExt::shutdown(&mut stream),
                    )
                    .await;
                    return;
                };
                let cert = Arc::new(cert);
                let clock = Arc::new(RequestClock::default());
                let service = hyper::service::service_fn({
                    let clock = clock.clone();
                    let metrics = metrics.clone();
                    let limits = RequestLimits {
                        max_body: limits.max_body_bytes,
                        timeout: limits.request_timeout,
                    };
                    move |req| {
                        let jitp = jitp.clone();
                        let metrics = metrics.clone();
                        let cert = cert.clone();
                        let clock = clock.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                handle(req, &jitp, &metrics, &cert, peer, limits, &clock).await,
                            )
                        }
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    // Starts when the connection waits for a request (so it also bounds
                    // keep-alive idleness); the body's share is bounded in `handle`.
                    .header_read_timeout(limits.request_timeout)
                    .max_header_size(limits.max_header_bytes)
                    .serve_connection(TokioIo::new(TimedIo::new(stream, clock.clone())), service);
                tokio::select! {
                    served = watcher.watch(conn) => if let Err(e) = served {
                        if e.is_parse_too_large() {
                            metrics.rejected("headers_too_large");
                        } else if e.is_timeout() && clock.started().is_some() {
                            // Part of a request came, not all of it in time (an idle
                            // keep-alive connection closed is no refusal).
                            metrics.rejected("request_timeout");
                        }
                        tracing::debug!(%peer, "connection ended: {e}");
                    },
                    _ = registration.closed() => {
                        metrics.rejected("revoked_while_connected");
                        tracing::info!(
                            %peer,
                            serial = registration.serial(),
                            "closed a connection: its certificate was revoked"
                        );
                    }
                }
            });
        }
        drop(device_listener);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(limits.shutdown_grace) => {
                tracing::warn!("shutdown grace period over; closing remaining connections");
            }
        }
        admin.abort();
        if let Some(broker) = broker {
            broker.abort();
        }
        upkeep.abort();
        sweeper.abort();
        jitp.flush().await;
    }
}

/// How often open connections are checked against the revocation view (which itself
/// follows the registry every couple of seconds).
const REVOKED_SWEEP: Duration = Duration::from_millis(500);

pub(crate) type Body = Full<Bytes>;

/// What [`handle`] enforces on one request.
#[derive(Debug, Clone, Copy)]
struct RequestLimits {
    max_body: usize,
    timeout: Duration,
}

/// A refusal after which the connection is closed (the rest of the request is not read).
fn closing(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid response")
}

pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

async fn handle(
    req: Request<Incoming>,
    jitp: &Jitp,
    metrics: &Metrics,
    cert: &[u8],
    peer: SocketAddr,
    limits: RequestLimits,
    clock: &RequestClock,
) -> Response<Body> {
    let started = Instant::now();
    let max_body = limits.max_body;
    let (parts, mut body) = req.into_parts();
    // What an oversized body is drained up to (see below).
    let drain_limit = max_body.saturating_mul(16).max(1 << 20);
    // A declared length beyond what would be drained is refused before any of the body is
    // read. A smaller oversized body is read (and dropped) first: a client still sending
    // when the connection closes gets a reset instead of the 413.
    if hyper::body::Body::size_hint(&body).lower() > drain_limit as u64 {
        metrics.rejected("body_too_large");
        return closing(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("request bodies are limited to {max_body} bytes"),
        ));
    }
    // One deadline for the whole request: from its first byte (headers included).
    let deadline = clock.started().unwrap_or(started) + limits.timeout;
    // Read (and bound) the body even where it is ignored, so a client cannot stream
    // without limit. An oversized body is still drained up to a bound, so that the
    // client, still sending, reads the 413 instead of a reset connection.
    let mut received = 0usize;
    let mut collected: Option<Vec<u8>> = None;
    let read = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                received += data.len();
                if received <= max_body {
                    collected
                        .get_or_insert_with(Vec::new)
                        .extend_from_slice(data);
                }
            }
            if received > drain_limit {
                break;
            }
        }
    })
    .await;
    if read.is_err() {
        metrics.rejected("request_timeout");
        return closing(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            &format!(
                "a request (headers and body) must arrive within {} ms of its first byte",
                limits.timeout.as_millis()
            ),
        ));
    }
    // The whole request is in: the next byte starts the next one.
    clock.reset();
    if received > max_body {
        metrics.rejected("body_too_large");
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("request bodies are limited to {max_body} bytes"),
        );
    }
    let path = parts.uri.path();
    let response = match (&parts.method, path) {
        (&Method::POST, "/v1/connect") => match jitp.connect(cert, peer).await {
            Ok(ConnectOutcome::Provisioned(reply)) => {
                metrics.connect("provisioned", started.elapsed());
                return json_response(StatusCode::CREATED, &connect_json(&reply));
            }
            Ok(ConnectOutcome::Known(reply)) => {
                metrics.connect("known", started.elapsed());
                return json_response(StatusCode::OK, &connect_json(&reply));
            }
            Err(refusal) => Err(refusal),
        },
        (&Method::POST, EST_REENROLL_PATH) => {
            let body = collected.as_deref().unwrap_or_default();
            jitp.reenroll(cert, body).await.map(|der| {
                metrics.request("est_simplereenroll");
                pkcs7_response(&fleetcert_ca_pkcs7(&der))
            })
        }
        (&Method::POST, EST_ENROLL_PATH) => {
            let body = collected.as_deref().unwrap_or_default();
            return match jitp.enroll_with_claim(cert, body).await {
                Ok((der, thing)) => {
                    metrics.request("est_simpleenroll");
                    tracing::info!(thing = %thing.thing_name, "enrolled by claim over EST");
                    pkcs7_response(&fleetcert_ca_pkcs7(&der))
                }
                Err(e) => {
                    metrics.rejected(e.code());
                    let status = StatusCode::from_u16(fleet_provisioning::status_code(&e))
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    error_response(status, e.code(), e.message())
                }
            };
        }
        (&Method::GET, "/.well-known/est/cacerts") => {
            metrics.request("est_cacerts");
            Ok(pkcs7_response(jitp.cacerts_pkcs7()))
        }
        (&Method::POST, FETCH_REPLACEMENT_PATH) => {
            jitp.fetch_replacement(cert).await.map(|credentials| {
                metrics.request("replacement");
                let mut response = json_response(
                    StatusCode::OK,
                    &serde_json::to_value(&credentials).unwrap_or_default(),
                );
                response.headers_mut().insert(
                    "cache-control",
                    hyper::header::HeaderValue::from_static("no-store"),
                );
                response
            })
        }
        (&Method::GET, "/crl") => {
            metrics.request("crl");
            Ok(crl_response(jitp))
        }
        (_, "/v1/connect" | FETCH_REPLACEMENT_PATH | EST_REENROLL_PATH | EST_ENROLL_PATH) => {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use POST {path}"),
            );
        }
        (_, "/.well-known/est/cacerts" | "/crl") => {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use GET {path}"),
            );
        }
        (_, path) => {
            return error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {path}"),
            );
        }
    };
    response.unwrap_or_else(|refusal| {
        metrics.rejected(refusal.code());
        error_response(
            refusal_status(&refusal),
            refusal.code(),
            &refusal_message(&refusal),
        )
    })
}

/// The HTTP status a refusal answers with: 400 for a malformed request, 409 for a
/// request that conflicts with the certificate's rotation state, 503 when the registry
/// is unavailable or busy, 500 for the server's own failures, 403 otherwise.
fn refusal_status(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::CsrInvalid(_) => StatusCode::BAD_REQUEST,
        Refusal::ReplacementPending(_)
        | Refusal::ReplacementLimit(_)
        | Refusal::UseEst
        | Refusal::RotationNotDue(_) => StatusCode::CONFLICT,
        Refusal::RegistryUnavailable | Refusal::RegistryBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::IssuanceFailed | Refusal::ReplacementUnreadable | Refusal::SealingFailed => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::FORBIDDEN,
    }
}

/// The refusal's message, with this server's paths where it points the device to one.
fn refusal_message(refusal: &Refusal) -> String {
    match refusal {
        Refusal::UseEst => {
            format!("this device made its own key: send a CSR for a new key to {EST_REENROLL_PATH}")
        }
        other => other.message(),
    }
}

/// Where a rotation method is served on this listener.
fn rotation_endpoint(method: RotationMethod) -> &'static str {
    match method {
        RotationMethod::Fetch => FETCH_REPLACEMENT_PATH,
        _ => EST_REENROLL_PATH,
    }
}

/// The JSON a device gets from `POST /v1/connect`.
#[derive(serde::Serialize)]
struct ConnectBody<'a> {
    thing_name: &'a str,
    /// `provisioned` on the first connect, `known` afterwards.
    status: &'static str,
    policies: &'a [String],
    certificate_serial: &'a str,
    certificate_not_after: &'a str,
    rotation_due: bool,
    rotation_due_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rotation: Option<RotationBody>,
}

/// What a device is told to do when its rotation is due.
#[derive(serde::Serialize)]
struct RotationBody {
    /// `est` (send a CSR for a new key) or `fetch` (fetch the replacement key and
    /// certificate fleetcert generated).
    method: &'static str,
    /// The path to call on this server (mutual TLS with the current certificate).
    endpoint: &'static str,
    replacement_ready: bool,
}

fn connect_json(reply: &ConnectReply) -> serde_json::Value {
    let rotation = reply.rotation.as_ref().map(
        |&RotationAdvice {
             method,
             replacement_ready,
             ..
         }| RotationBody {
            method: method.as_str(),
            endpoint: rotation_endpoint(method),
            replacement_ready,
        },
    );
    serde_json::to_value(ConnectBody {
        thing_name: &reply.thing_name,
        status: reply.status.as_str(),
        policies: &reply.policies,
        certificate_serial: &reply.certificate_serial,
        certificate_not_after: &reply.certificate_not_after,
        rotation_due: reply.rotation_due,
        rotation_due_at: &reply.rotation_due_at,
        rotation,
    })
    .unwrap_or_default()
}

/// RFC 7030 replies: base64 of a PKCS#7 certs-only DER.
fn pkcs7_response(der: &[u8]) -> Response<Body> {
    use base64::Engine;
    let mut text = base64::engine::general_purpose::STANDARD.encode(der);
    text.push('\n');
    Response::builder()
        .status(StatusCode::OK)
        .header(
            "content-type",
            "application/pkcs7-mime; smime-type=certs-only",
        )
        .header("content-transfer-encoding", "base64")
        .body(Full::new(Bytes::from(text)))
        .expect("valid response")
}

fn fleetcert_ca_pkcs7(cert_der: &[u8]) -> Vec<u8> {
    fleetcert_lifecycle::pkcs7_certs_only(&[cert_der])
}

/// `GET /crl`: the current CRL, DER (`application/pkix-crl`, RFC 5280 §4.2.1.13).
pub(crate) fn crl_response(jitp: &Jitp) -> Response<Body> {
    match jitp.crl_der() {
        Some(der) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/pkix-crl")
            .header("cache-control", "max-age=60")
            .body(Full::new(Bytes::from(der)))
            .expect("valid response"),
        None => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "crl_unavailable",
            "no CRL has been published yet; try again shortly",
        ),
    }
}
