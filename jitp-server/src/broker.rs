//! The broker API (`docs/broker-api.md`): plain HTTP/1.1 for the mosquitto plugin, on
//! loopback unless allowed otherwise, every request authenticated by the shared bearer
//! secret (compared in constant time; anything else gets a bare 401).
//!
//! - `POST /broker/v1/connect`: the client certificate is verified as the device
//!   listener's handshake verifies it (device-auth: chain to the issuing CA at the
//!   lifecycle clock, then the revocation view), then
//!   [`Jitp::authorize_connect`] decides (first use registers; `iot:Connect` evaluated).
//!   Answered `200` `allowed` or `refused` (with a `reason` class and lifecycle's stable
//!   `code`); `503` when the registry is unavailable or busy (the plugin then fails
//!   closed: mosquitto 2.0 closes the connection without a CONNACK).
//! - `POST /broker/v1/disconnect`: finished sessions recorded, `204`.
//! - `POST /broker/v1/sessions`: which of the live sessions' certificates are retired.
//!
//! Mapping lifecycle's [`Refusal`] to the contract's `reason` classes is transport, so
//! it lives here.
use crate::Metrics;
use crate::metrics::BrokerCounters;
use bytes::Bytes;
use fleetcert_device_auth::ChainVerifier;
use fleetcert_lifecycle::broker::BrokerSecret;
use fleetcert_lifecycle::jitp::{AuthorizedConnect, BrokerDisconnect, Jitp, Refusal};
use fleetcert_templates::ArnContext;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// `POST` here: a CONNECT to decide.
pub const CONNECT_PATH: &str = "/broker/v1/connect";
/// `POST` here: finished sessions.
pub const DISCONNECT_PATH: &str = "/broker/v1/disconnect";
/// `POST` here: which live sessions must be dropped.
pub const SESSIONS_PATH: &str = "/broker/v1/sessions";
/// `GET` here: the current CRL, PEM, for the broker's `crlfile`.
pub const CRL_PATH: &str = "/broker/v1/crl";
/// `POST` here: Fleet Provisioning requests published by claim sessions.
pub const PROVISION_PATH: &str = "/broker/v1/provision";
/// Fleet Provisioning requests in one call at most.
const MAX_PROVISION_BATCH: usize = 1024;

/// Largest request body (a sessions check of a large broker lists many fingerprints).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Concurrent connections from brokers.
const MAX_CONNECTIONS: usize = 1024;
/// Time to send a whole request (headers and body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request line plus headers.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long the plugin may answer a returning device from its cache.
pub const CACHE_SECONDS: u32 = 30;
/// Longest MQTT client ID considered (AWS IoT's limit is 128 bytes); longer is refused.
const MAX_CLIENT_ID_BYTES: usize = 1024;
/// The longest disconnect reason recorded (the plugin sends short snake_case words).
const MAX_REASON_BYTES: usize = 64;

/// Why the broker API cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerApiError {
    /// A non-loopback address without `allow_remote`.
    #[error(
        "--broker-api {0} is not a loopback address; the broker API is for a broker on this host (pass --broker-api-allow-remote to listen there anyway)"
    )]
    NotLoopback(SocketAddr),
    /// The listener cannot be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The issuing CA cannot be used to verify certificates.
    #[error("{0}")]
    Ca(String),
}

/// The broker API listener, bound and ready for [`crate::Server::with_broker_api`].
pub struct BrokerApi {
    listener: TcpListener,
    secret: BrokerSecret,
    verifier: Arc<ChainVerifier>,
    arn: ArnContext,
}

impl std::fmt::Debug for BrokerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerApi")
            .field("listener", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl BrokerApi {
    /// Binds the listener at `addr` (loopback only unless `allow_remote`); clients
    /// must present `secret`; certificates are verified to `issuing_ca_pem`. Policy
    /// resources are matched in `arn`'s region and account (`serve` defaults to region
    /// `local`, account `000000000000`).
    pub async fn bind(
        addr: SocketAddr,
        allow_remote: bool,
        secret: BrokerSecret,
        issuing_ca_pem: &str,
        arn: ArnContext,
    ) -> Result<Self, BrokerApiError> {
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(BrokerApiError::NotLoopback(addr));
        }
        let verifier = ChainVerifier::for_issuing_ca(issuing_ca_pem)
            .map_err(|e| BrokerApiError::Ca(e.to_string()))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| BrokerApiError::Bind {
                addr,
                reason: e.to_string(),
            })?;
        Ok(BrokerApi {
            listener,
            secret,
            verifier: Arc::new(verifier),
            arn,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// What every request handler shares.
struct Shared {
    jitp: Arc<Jitp>,
    metrics: Arc<Metrics>,
    secret: BrokerSecret,
    verifier: Arc<ChainVerifier>,
    arn: ArnContext,
}

/// Serves the broker API until the task is aborted.
pub(crate) async fn serve(api: BrokerApi, jitp: Arc<Jitp>, metrics: Arc<Metrics>) {
    let BrokerApi {
        listener,
        secret,
        verifier,
        arn,
    } = api;
    let shared = Arc::new(Shared {
        jitp,
        metrics,
        secret,
        verifier,
        arn,
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("broker API accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.rejected("broker_connection_limit");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &shared).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "broker API connection ended: {e}");
            }
        });
    }
}

use crate::{Body, error_response, json_response};

fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

/// Whether the request carries `Authorization: Bearer <secret>` (constant-time compare).
fn authorized(req: &Request<Incoming>, secret: &BrokerSecret) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    let given = given.trim_ascii();
    // Lengths are public (64); the contents are compared in constant time.
    given.len() == secret.as_str().len() && bool::from(given.ct_eq(secret.as_str().as_bytes()))
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    if !authorized(&req, &shared.secret) {
        shared.metrics.rejected("broker_unauthorized");
        let mut response = empty(StatusCode::UNAUTHORIZED);
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return response;
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    match (&parts.method, path.as_str()) {
        (&Method::GET, CRL_PATH) => return crl_pem_response(shared),
        (&Method::POST, CONNECT_PATH | DISCONNECT_PATH | SESSIONS_PATH | PROVISION_PATH) => {}
        (_, CRL_PATH) => {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use GET {path}"),
            );
        }
        (_, CONNECT_PATH | DISCONNECT_PATH | SESSIONS_PATH | PROVISION_PATH) => {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use POST {path}"),
            );
        }
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {path}"),
            );
        }
    }
    let collected = tokio::time::timeout(
        REQUEST_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await;
    let bytes = match collected {
        Err(_) => {
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            );
        }
        Ok(Err(_)) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    match path.as_str() {
        CONNECT_PATH => connect(&bytes, shared).await,
        DISCONNECT_PATH => disconnect(&bytes, shared).await,
        PROVISION_PATH => provision(&bytes, shared).await,
        _ => sessions(&bytes, shared).await,
    }
}

/// `GET /broker/v1/crl`: the CRL the device listener serves at `/crl`, as PEM (what
/// mosquitto's `crlfile` holds). The plugin keeps the broker's file equal to it.
fn crl_pem_response(shared: &Shared) -> Response<Body> {
    match shared.jitp.crl_der() {
        Some(der) => {
            shared.metrics.request("broker_crl");
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/x-pem-file")
                // The clock the CRL was signed with: the plugin refuses to install a CRL
                // from a serve whose clock is far from the broker's.
                .header("x-fleetcert-clock", shared.jitp.clock().now().to_string())
                .body(Full::new(Bytes::from(
                    fleetcert_lifecycle::revocation::crl_pem(&der),
                )))
                .expect("valid response")
        }
        None => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "crl_unavailable",
            "no CRL has been published yet; try again shortly",
        ),
    }
}

fn bad_json(e: serde_json::Error) -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        "bad_request",
        &format!("the body is not the expected JSON: {e}"),
    )
}

/// Registry trouble: the plugin answers "server unavailable" (the device retries).
fn unavailable(refusal: &Refusal, metrics: &Metrics) -> Response<Body> {
    metrics.rejected(refusal.code());
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        refusal.code(),
        &refusal.message(),
    )
}

#[derive(serde::Deserialize)]
struct ConnectRequest {
    client_id: String,
    #[serde(default)]
    certificate_pem: Option<String>,
    #[serde(default)]
    source_address: Option<String>,
    /// Informational only (AWS SDKs put metrics there); never an identity.
    #[serde(default)]
    #[allow(dead_code)]
    username: Option<String>,
}

/// The contract's `reason` class of a refusal: `bad_credentials` when there is no
/// certificate to judge, `not_authorized` otherwise.
fn reason_class(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::CertificateUnreadable(_) => "bad_credentials",
        _ => "not_authorized",
    }
}

fn refused(refusal: &Refusal, metrics: &Metrics) -> Response<Body> {
    metrics.request("broker_connect_refused");
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "result": "refused",
            "reason": reason_class(refusal),
            "code": refusal.code(),
            "message": refusal.message(),
        }),
    )
}

fn allowed_json(allowed: &AuthorizedConnect) -> serde_json::Value {
    serde_json::json!({
        "result": "allowed",
        "thing_name": allowed.thing_name,
        "serial": allowed.serial,
        "fingerprint_sha256": allowed.fingerprint_sha256,
        "registered": allowed.registered,
        "policies": allowed
            .policies
            .iter()
            .map(|p| serde_json::json!({ "name": p.name, "document": p.document }))
            .collect::<Vec<_>>(),
        "context": allowed.context,
        "arn": { "region": allowed.arn.region, "account": allowed.arn.account },
        "cache_seconds": CACHE_SECONDS,
        "claim": allowed.claim.as_ref().map(|c| serde_json::json!({
            "name": c.claim_name,
            "template": c.template,
        })),
    })
}

async fn connect(body: &[u8], shared: &Shared) -> Response<Body> {
    let request: ConnectRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    let metrics = &shared.metrics;
    let Some(der) = request
        .certificate_pem
        .as_deref()
        .filter(|pem| !pem.trim().is_empty())
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
    else {
        return refused(
            &Refusal::CertificateUnreadable("no client certificate was presented".into()),
            metrics,
        );
    };
    let der = match der {
        Ok(der) => der,
        Err(e) => {
            return refused(
                &Refusal::CertificateUnreadable(format!(
                    "certificate_pem is not a PEM certificate: {e}"
                )),
                metrics,
            );
        }
    };
    if request.client_id.len() > MAX_CLIENT_ID_BYTES {
        return refused(
            &Refusal::ClientIdMismatch(format!(
                "the client ID is {} bytes long; at most {MAX_CLIENT_ID_BYTES} are accepted",
                request.client_id.len()
            )),
            metrics,
        );
    }
    let jitp = &shared.jitp;
    if let Err(refusal) =
        shared
            .verifier
            .verify_device(der.as_ref(), jitp.clock().now(), &jitp.revocation())
    {
        return refused(&refusal, metrics);
    }
    let started = std::time::Instant::now();
    let outcome = jitp
        .authorize_connect(der.as_ref(), &request.client_id, &shared.arn)
        .await;
    metrics.broker_connect_answered(started.elapsed());
    if let Err(refusal) = &outcome {
        tracing::info!(
            client_id = %fleetcert_templates::clip(&request.client_id, fleetcert_templates::MAX_ECHO_CHARS),
            source = request.source_address.as_deref().unwrap_or(""),
            code = refusal.code(),
            "broker CONNECT refused"
        );
    }
    match outcome {
        Ok(allowed) => {
            metrics.request(if allowed.registered {
                "broker_connect_registered"
            } else {
                "broker_connect_allowed"
            });
            json_response(StatusCode::OK, &allowed_json(&allowed))
        }
        Err(refusal) if refusal.is_retryable() => unavailable(&refusal, metrics),
        Err(refusal) => refused(&refusal, metrics),
    }
}

#[derive(serde::Deserialize)]
struct DisconnectRequest {
    sessions: Vec<DisconnectedSession>,
}

#[derive(serde::Deserialize)]
struct DisconnectedSession {
    #[serde(default)]
    client_id: String,
    fingerprint_sha256: String,
    #[serde(default)]
    source_address: String,
    #[serde(default)]
    connected_at: i64,
    disconnected_at: i64,
    #[serde(default)]
    reason: Option<String>,
}

async fn disconnect(body: &[u8], shared: &Shared) -> Response<Body> {
    let request: DisconnectRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    let sessions: Vec<BrokerDisconnect> = request
        .sessions
        .into_iter()
        .map(|s| BrokerDisconnect {
            client_id: s.client_id,
            fingerprint_sha256: s.fingerprint_sha256.to_ascii_lowercase(),
            source_address: s.source_address,
            connected_at: s.connected_at,
            disconnected_at: s.disconnected_at,
            reason: s
                .reason
                .filter(|r| r.len() <= MAX_REASON_BYTES && r.bytes().all(|b| b.is_ascii_graphic())),
        })
        .collect();
    match shared.jitp.record_disconnects(&sessions).await {
        Ok(_) => {
            shared.metrics.request("broker_disconnect");
            empty(StatusCode::NO_CONTENT)
        }
        Err(refusal) => unavailable(&refusal, &shared.metrics),
    }
}

#[derive(serde::Deserialize)]
struct SessionsRequest {
    fingerprints: Vec<String>,
    #[serde(default)]
    broker: Option<BrokerReport>,
}

/// Who polls and its counters (the plugin's `MetricsSnapshot`).
#[derive(serde::Deserialize)]
struct BrokerReport {
    instance: String,
    #[serde(default)]
    sessions: u64,
    #[serde(default)]
    metrics: BrokerCounters,
}

/// The longest broker instance id taken (the plugin sends 32 hex characters).
const MAX_INSTANCE_BYTES: usize = 64;

async fn sessions(body: &[u8], shared: &Shared) -> Response<Body> {
    let request: SessionsRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    if let Some(broker) = &request.broker
        && !broker.instance.is_empty()
        && broker.instance.len() <= MAX_INSTANCE_BYTES
    {
        let mut counters = broker.metrics;
        counters.sessions = broker.sessions;
        shared.metrics.broker_report(&broker.instance, &counters);
    }
    let fingerprints: Vec<String> = request
        .fingerprints
        .iter()
        .map(|f| f.to_ascii_lowercase())
        .collect();
    match shared.jitp.retired(&fingerprints).await {
        Ok(retired) => {
            shared.metrics.request("broker_sessions");
            json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "retired": retired
                        .iter()
                        .map(|r| serde_json::json!({
                            "fingerprint_sha256": r.fingerprint_sha256,
                            "reason": r.reason.as_str(),
                        }))
                        .collect::<Vec<_>>(),
                }),
            )
        }
        Err(refusal) => unavailable(&refusal, &shared.metrics),
    }
}

#[derive(serde::Deserialize)]
struct ProvisionRequest {
    requests: Vec<ProvisionItem>,
}

/// One Fleet Provisioning request as the plugin relays it.
#[derive(serde::Deserialize)]
struct ProvisionItem {
    /// The plugin's id, echoed in the reply.
    id: u64,
    /// The broker session that published it (ownership tokens are bound to it).
    session: String,
    /// The claim certificate's SHA-256 fingerprint (the session's certificate).
    fingerprint_sha256: String,
    topic: String,
    /// The payload, base64.
    payload_b64: String,
}

/// `POST /broker/v1/provision`: each request answered concurrently (so their
/// registrations share group commits); replies in the same order, each with the topic
/// to publish it on (to the asking client only) and the payload.
async fn provision(body: &[u8], shared: &Shared) -> Response<Body> {
    let request: ProvisionRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    if request.requests.len() > MAX_PROVISION_BATCH {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            &format!("at most {MAX_PROVISION_BATCH} requests per call"),
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (index, item) in request.requests.into_iter().enumerate() {
        let jitp = shared.jitp.clone();
        let verifier = shared.verifier.clone();
        let arn = shared.arn.clone();
        tasks.spawn(async move {
            let payload = crate::fleet_provisioning::unb64(&item.payload_b64);
            let reply = match payload {
                Some(payload) => {
                    crate::fleet_provisioning::answer(
                        &jitp,
                        &item.fingerprint_sha256.to_ascii_lowercase(),
                        &item.session,
                        &item.topic,
                        &payload,
                    )
                    .await
                }
                None => None,
            };
            // A device registered now reconnects with its new certificate and client id =
            // thing name (as AWS's SDKs do): the answer to that CONNECT, computed here off
            // the broker's thread, lets the plugin answer it from its cache.
            let mut grant = None;
            if let Some((der, thing)) = reply.as_ref().and_then(|r| r.registered.as_ref())
                && verifier
                    .verify_device(der, jitp.clock().now(), &jitp.revocation())
                    .is_ok()
                && let Ok(allowed) = jitp.authorize_connect(der, thing, &arn).await
            {
                grant = Some(allowed_json(&allowed));
            }
            (index, item.id, reply, grant)
        });
    }
    let mut replies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let Ok((index, id, reply, grant)) = done else {
            continue;
        };
        let Some(reply) = reply else {
            shared.metrics.request("broker_provision_ignored");
            continue;
        };
        shared.metrics.request(if reply.error_code.is_some() {
            "broker_provision_rejected"
        } else {
            "broker_provision_accepted"
        });
        if let Some(code) = reply.error_code {
            tracing::info!(topic = %reply.topic, code, "Fleet Provisioning request rejected");
        }
        replies.push((
            index,
            serde_json::json!({
                "id": id,
                "topic": reply.topic,
                "payload_b64": crate::fleet_provisioning::b64(&reply.payload),
                "grant": grant,
            }),
        ));
    }
    replies.sort_by_key(|(index, _)| *index);
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "replies": replies.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_classes() {
        assert_eq!(
            reason_class(&Refusal::CertificateUnreadable("x".into())),
            "bad_credentials"
        );
        for refusal in [
            Refusal::CertificateRevoked("x".into()),
            Refusal::UnknownIssuer("x".into()),
            Refusal::ClientIdMismatch("x".into()),
            Refusal::ConnectDenied("x".into()),
            Refusal::CertificateExpired("x".into()),
        ] {
            assert_eq!(reason_class(&refusal), "not_authorized");
        }
    }
}
