//! The HTTP client of serve's broker API (docs/broker-api.md): plain HTTP/1.1 on loopback,
//! JSON bodies, a bearer secret, every call bounded by the configured timeout.

use fleetcert_templates::ConnectionContext;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The header serve's CRL answer carries its clock in (Unix seconds).
pub const CLOCK_HEADER: &str = "x-fleetcert-clock";
/// How far serve's clock may be from the broker's before its CRL is not installed.
const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Largest answer body read from serve.
const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// `POST /broker/v1/connect` request.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectRequest<'a> {
    /// The MQTT client ID.
    pub client_id: &'a str,
    /// The client's leaf certificate, PEM.
    pub certificate_pem: &'a str,
    /// The client's address as the broker sees it.
    pub source_address: &'a str,
    /// The MQTT username, informational only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<&'a str>,
}

/// One policy attached to the certificate.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyText {
    /// The policy name.
    pub name: String,
    /// The policy document, JSON text.
    pub document: String,
}

/// The region and account resources are matched in.
#[derive(Debug, Clone, Deserialize)]
pub struct ArnJson {
    /// The region.
    pub region: String,
    /// The account.
    pub account: String,
}

/// serve allowed the CONNECT.
#[derive(Debug, Clone, Deserialize)]
pub struct Allowed {
    /// The thing the connection is for.
    pub thing_name: String,
    /// The certificate's SHA-256 fingerprint (hex).
    #[serde(default)]
    pub fingerprint_sha256: String,
    /// Whether this CONNECT registered the thing (JITP).
    #[serde(default)]
    pub registered: bool,
    /// The effective policies.
    #[serde(default)]
    pub policies: Vec<PolicyText>,
    /// The policy variables' values.
    pub context: ConnectionContext,
    /// The ARN region and account.
    pub arn: ArnJson,
    /// How long a reconnect may be answered from the cache.
    #[serde(default)]
    pub cache_seconds: u64,
    /// Present for a claim certificate: the session may use the Fleet Provisioning API.
    #[serde(default)]
    pub claim: Option<ClaimJson>,
}

/// The claim a claim certificate is.
#[derive(Debug, Clone, Deserialize)]
pub struct ClaimJson {
    /// The claim's name.
    pub name: String,
    /// The template it provisions with.
    pub template: String,
}

/// One Fleet Provisioning request published by a claim session
/// (`POST /broker/v1/provision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProvisionRequest {
    /// Echoed in the reply.
    pub id: u64,
    /// The session that published it.
    pub session: String,
    /// The session's (claim) certificate.
    pub fingerprint_sha256: String,
    /// The request topic.
    pub topic: String,
    /// The payload, base64.
    pub payload_b64: String,
}

/// serve's reply to one request: publish `payload` on `topic` to the asking client only.
#[derive(Debug, Clone, Deserialize)]
pub struct ProvisionReply {
    /// The request's id.
    pub id: u64,
    /// `<request topic>/accepted` or `/rejected`.
    pub topic: String,
    /// The payload, base64.
    pub payload_b64: String,
    /// After an accepted RegisterThing: serve's answer to the device's CONNECT with its
    /// new certificate and client id = thing name, made ahead for the cache.
    #[serde(default)]
    pub grant: Option<Allowed>,
}

#[derive(Deserialize)]
struct ProvisionAnswer {
    #[serde(default)]
    replies: Vec<ProvisionReply>,
}

/// serve refused the CONNECT.
#[derive(Debug, Clone, Deserialize)]
pub struct Refused {
    /// `not_authorized` or `bad_credentials`.
    #[serde(default)]
    pub reason: String,
    /// lifecycle's stable refusal code.
    #[serde(default)]
    pub code: String,
    /// In words.
    #[serde(default)]
    pub message: String,
}

/// serve's decision on a CONNECT.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ConnectAnswer {
    /// Allowed.
    Allowed(Box<Allowed>),
    /// Refused.
    Refused(Refused),
}

/// One ended connection, for `POST /broker/v1/disconnect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DisconnectRecord {
    /// The MQTT client ID.
    pub client_id: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// The client's address.
    pub source_address: String,
    /// Unix seconds.
    pub connected_at: u64,
    /// Unix seconds.
    pub disconnected_at: u64,
    /// Why it ended: `disconnected`, `duplicate_client_id` (another connection took the
    /// client id over), `certificate_retired` (kicked), `broker_stopped`.
    pub reason: String,
}

/// Who is reporting and its counters (`broker` in `POST /broker/v1/sessions`).
#[derive(Debug, Clone, Serialize)]
pub struct BrokerReport {
    /// Random per plugin start: serve turns cumulative counters into increments per
    /// instance, so a restarted broker starts from zero without double counting.
    pub instance: String,
    /// Live sessions now.
    pub sessions: u64,
    /// The counters.
    pub metrics: crate::metrics::MetricsSnapshot,
}

/// A certificate whose sessions must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Retired {
    /// SHA-256 of the certificate's DER, hex.
    pub fingerprint_sha256: String,
    /// Why (`revoked`, `rotated`…).
    #[serde(default)]
    pub reason: String,
}

#[derive(Deserialize)]
struct SessionsAnswer {
    #[serde(default)]
    retired: Vec<Retired>,
}

/// serve could not be asked, or did not answer as the contract says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeError(pub String);

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServeError {}

/// The client. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct ServeClient {
    agent: ureq::Agent,
    base: String,
    authorization: String,
}

impl std::fmt::Debug for ServeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("ServeClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ServeClient {
    /// A client of the broker API at `base` (`http://HOST:PORT`), each call bounded by
    /// `timeout` (connect, send and receive together).
    pub fn new(base: &str, secret: &str, timeout: Duration) -> ServeClient {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            // serve is on loopback; an HTTP_PROXY in the broker's environment must not apply.
            .proxy(None)
            .build();
        ServeClient {
            agent: config.into(),
            base: base.trim_end_matches('/').to_string(),
            authorization: format!("Bearer {secret}"),
        }
    }

    fn post(&self, path: &str, body: &impl Serialize) -> Result<(u16, String), ServeError> {
        let url = format!("{}{path}", self.base);
        let body = serde_json::to_vec(body).map_err(|e| ServeError(format!("{path}: {e}")))?;
        let mut response = self
            .agent
            .post(&url)
            .header("Authorization", &self.authorization)
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(|e| ServeError(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| ServeError(format!("{url}: reading the answer: {e}")))?;
        Ok((status, text))
    }

    /// `GET /broker/v1/crl`: serve's current CRL, PEM (checked to look like one).
    pub fn crl(&self) -> Result<String, ServeError> {
        let url = format!("{}/broker/v1/crl", self.base);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .call()
            .map_err(|e| ServeError(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(ServeError(format!("crl: HTTP status {status}")));
        }
        let serve_now: Option<i64> = response
            .headers()
            .get(CLOCK_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| ServeError(format!("{url}: reading the answer: {e}")))?;
        if !text.starts_with("-----BEGIN X509 CRL-----")
            || !text.trim_end().ends_with("-----END X509 CRL-----")
        {
            return Err(ServeError("crl: the answer is not a PEM CRL".into()));
        }
        // serve signs CRLs with its clock; one far ahead of the broker's would make
        // mosquitto's TLS refuse every client ("CRL not yet valid"): keep the old file.
        if let Some(serve_now) = serve_now {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if (serve_now - now).abs() > MAX_CLOCK_SKEW_SECS {
                return Err(ServeError(format!(
                    "crl: serve's clock is {}s away from this broker's; the CRL is not installed (fix the clocks)",
                    serve_now - now
                )));
            }
        }
        Ok(text)
    }

    /// `POST /broker/v1/connect`.
    pub fn connect(&self, request: &ConnectRequest<'_>) -> Result<ConnectAnswer, ServeError> {
        let (status, text) = self.post("/broker/v1/connect", request)?;
        if status != 200 {
            return Err(ServeError(format!("connect: HTTP status {status}")));
        }
        serde_json::from_str(&text).map_err(|e| ServeError(format!("connect: bad answer: {e}")))
    }

    /// `POST /broker/v1/provision`: serve's replies, in request order (requests that
    /// are not Fleet Provisioning requests get none).
    pub fn provision(
        &self,
        requests: &[ProvisionRequest],
    ) -> Result<Vec<ProvisionReply>, ServeError> {
        #[derive(Serialize)]
        struct Body<'a> {
            requests: &'a [ProvisionRequest],
        }
        let (status, text) = self.post("/broker/v1/provision", &Body { requests })?;
        if status != 200 {
            return Err(ServeError(format!("provision: HTTP status {status}")));
        }
        let answer: ProvisionAnswer = serde_json::from_str(&text)
            .map_err(|e| ServeError(format!("provision: bad answer: {e}")))?;
        Ok(answer.replies)
    }

    /// `POST /broker/v1/disconnect`.
    pub fn disconnect(&self, sessions: &[DisconnectRecord]) -> Result<(), ServeError> {
        #[derive(Serialize)]
        struct Body<'a> {
            sessions: &'a [DisconnectRecord],
        }
        let (status, _) = self.post("/broker/v1/disconnect", &Body { sessions })?;
        match status {
            200..=299 => Ok(()),
            _ => Err(ServeError(format!("disconnect: HTTP status {status}"))),
        }
    }

    /// `POST /broker/v1/sessions`: which of these certificates' sessions must be dropped;
    /// the plugin's counters ride along for serve's `/metrics`.
    pub fn sessions(
        &self,
        fingerprints: &[String],
        broker: &BrokerReport,
    ) -> Result<Vec<Retired>, ServeError> {
        #[derive(Serialize)]
        struct Body<'a> {
            fingerprints: &'a [String],
            broker: &'a BrokerReport,
        }
        let (status, text) = self.post(
            "/broker/v1/sessions",
            &Body {
                fingerprints,
                broker,
            },
        )?;
        if status != 200 {
            return Err(ServeError(format!("sessions: HTTP status {status}")));
        }
        let answer: SessionsAnswer = serde_json::from_str(&text)
            .map_err(|e| ServeError(format!("sessions: bad answer: {e}")))?;
        Ok(answer.retired)
    }
}
