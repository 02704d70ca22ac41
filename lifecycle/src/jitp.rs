//! Just-in-time provisioning: what a device's mutual-TLS connection means.
//!
//! The first time a certificate connects, the thing is registered from its template in
//! one registry transaction (details, policies, attachments, events) and the device gets
//! `provisioned` in that same connection. Later connections are `known` and answered from
//! a small cache after one indexed lookup. Refusals carry a reason code a device can log.
use crate::LifecycleError;
use crate::datadir::DataDir;
use fleetcert_registry::{
    CertStatus, ConnectionRecord, DeviceState, PolicyWrite, Registration, RegistrationOutcome,
    Registry, ThingDetails,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use time::format_description::well_known::Rfc3339;

/// The JSON a device gets from `POST /v1/connect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectReply {
    pub thing_name: String,
    /// `provisioned` on the first connect, `known` afterwards.
    pub status: &'static str,
    pub policies: Vec<String>,
    pub certificate_serial: String,
    pub certificate_not_after: String,
    /// True once the certificate is past its renewal point (rotation arrives later; for
    /// now: within the last third of its lifetime).
    pub rotation_due: bool,
}

/// `Provisioned` answers 201, `Known` answers 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    Provisioned(ConnectReply),
    Known(ConnectReply),
}

/// Why a device is refused. `code` is stable (metrics label, JSON `error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub code: &'static str,
    pub message: String,
    /// The server, not the device, is at fault (database down): try again later.
    pub retryable: bool,
}

impl ConnectRefusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        ConnectRefusal {
            code,
            message: message.into(),
            retryable: false,
        }
    }

    fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!("registry unavailable during connect: {e}");
        ConnectRefusal {
            code: "registry_unavailable",
            message: "the registry is unavailable; try again later".into(),
            retryable: true,
        }
    }
}

/// Revoked certificates, as the TLS handshake sees them. Refreshed from the registry.
#[derive(Debug, Default)]
pub struct RevocationView {
    revoked_serials: RwLock<HashSet<String>>,
}

impl RevocationView {
    /// True if the (already path-validated) certificate is revoked. Unparseable
    /// certificates count as revoked: refuse what cannot be checked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        let serials = self
            .revoked_serials
            .read()
            .expect("revocation view poisoned");
        if serials.is_empty() {
            return false;
        }
        match fleetcert_ca::device_identity(cert_der) {
            Ok(id) => serials.contains(&id.certificate_serial_hex),
            Err(_) => true,
        }
    }

    fn replace(&self, serials: Vec<String>) {
        *self
            .revoked_serials
            .write()
            .expect("revocation view poisoned") = serials.into_iter().collect();
    }
}

/// A registered certificate, remembered so a returning device costs no registry round
/// trip. Short-lived: status changes (rotation, revocation) reach it within the TTL, and
/// revocation is enforced at the handshake anyway.
#[derive(Debug, Clone)]
struct Known {
    reply: ConnectReply,
    cached_at: Instant,
}

const KNOWN_TTL: Duration = Duration::from_secs(30);
const KNOWN_CAPACITY: usize = 100_000;
const REVOCATION_REFRESH: Duration = Duration::from_secs(2);
const CONNECTION_FLUSH: Duration = Duration::from_secs(1);
/// Connection records buffered before new ones are dropped (counted) rather than growing
/// memory without bound while the registry is slow.
const CONNECTION_BUFFER: usize = 50_000;

/// The JITP use case, shared by every connection.
pub struct Jitp {
    registry: Arc<dyn Registry>,
    templates: crate::templates::TemplateSet,
    default_template: String,
    known: RwLock<HashMap<String, Known>>,
    revocation: Arc<RevocationView>,
    connections: Mutex<Vec<ConnectionRecord>>,
    dropped_connection_records: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Jitp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jitp")
            .field("default_template", &self.default_template)
            .finish_non_exhaustive()
    }
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn rotation_due(not_before: i64, not_after: i64, now: i64) -> bool {
    let lifetime = (not_after - not_before).max(1);
    now >= not_before + lifetime * 2 / 3
}

impl Jitp {
    /// Loads the templates from the data directory (refusing overly permissive ones
    /// unless `allow_overly_permissive`) and the revocation view.
    pub async fn new(
        data: &DataDir,
        registry: Arc<dyn Registry>,
        default_template: &str,
        allow_overly_permissive: bool,
    ) -> Result<Self, LifecycleError> {
        let templates =
            crate::templates::TemplateSet::load(data, default_template, allow_overly_permissive)?;
        let jitp = Jitp {
            registry,
            templates,
            default_template: default_template.to_owned(),
            known: RwLock::new(HashMap::new()),
            revocation: Arc::new(RevocationView::default()),
            connections: Mutex::new(Vec::new()),
            dropped_connection_records: Default::default(),
        };
        jitp.refresh_revocations().await?;
        Ok(jitp)
    }

    pub fn revocation(&self) -> Arc<RevocationView> {
        self.revocation.clone()
    }

    async fn refresh_revocations(&self) -> Result<(), LifecycleError> {
        let serials = self.registry.revoked_serials(crate::unix_now()).await?;
        self.revocation.replace(serials);
        Ok(())
    }

    /// Background upkeep until the returned future is dropped: refresh the revocation
    /// view and flush connection records.
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut revocations = tokio::time::interval(REVOCATION_REFRESH);
        let mut flushes = tokio::time::interval(CONNECTION_FLUSH);
        loop {
            tokio::select! {
                _ = revocations.tick() => {
                    if let Err(e) = self.refresh_revocations().await {
                        tracing::warn!("cannot refresh revocations: {e}");
                    }
                }
                _ = flushes.tick() => self.flush().await,
            }
        }
    }

    /// Writes buffered connection records to the registry.
    pub async fn flush(&self) {
        let batch = std::mem::take(&mut *self.connections.lock().expect("buffer poisoned"));
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.registry.record_connections(&batch).await {
            tracing::warn!(records = batch.len(), "cannot record connections: {e}");
        }
    }

    /// Registry reachability, for `/healthz`.
    pub async fn health(&self) -> Result<(), LifecycleError> {
        Ok(self.registry.ping().await?)
    }

    fn remember_connection(&self, state_fp: &str, thing: &str, peer: SocketAddr) {
        let mut buffer = self.connections.lock().expect("buffer poisoned");
        if buffer.len() >= CONNECTION_BUFFER {
            self.dropped_connection_records
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        buffer.push(ConnectionRecord {
            fingerprint_sha256: state_fp.to_owned(),
            thing_name: thing.to_owned(),
            client_addr: peer.to_string(),
            at: crate::unix_now(),
        });
    }

    fn cached(&self, fingerprint: &str) -> Option<ConnectReply> {
        let known = self.known.read().expect("cache poisoned");
        let entry = known.get(fingerprint)?;
        (entry.cached_at.elapsed() < KNOWN_TTL).then(|| entry.reply.clone())
    }

    fn cache(&self, fingerprint: String, reply: ConnectReply) {
        let mut known = self.known.write().expect("cache poisoned");
        if known.len() >= KNOWN_CAPACITY {
            known.clear();
        }
        known.insert(
            fingerprint,
            Known {
                reply,
                cached_at: Instant::now(),
            },
        );
    }

    /// Answers `POST /v1/connect` for a certificate that passed the TLS handshake.
    pub async fn connect(
        &self,
        cert_der: &[u8],
        peer: SocketAddr,
    ) -> Result<ConnectOutcome, ConnectRefusal> {
        let identity = fleetcert_ca::device_identity(cert_der).map_err(|e| {
            ConnectRefusal::new(
                "certificate_unreadable",
                format!("cannot read the certificate: {e}"),
            )
        })?;
        let fingerprint = identity.fingerprint_sha256_hex.clone();
        if let Some(reply) = self.cached(&fingerprint) {
            self.remember_connection(&fingerprint, &reply.thing_name, peer);
            return Ok(ConnectOutcome::Known(reply));
        }
        // The common name must be a valid thing name: it is substituted into policies.
        let cn = identity.common_name.clone().unwrap_or_default();
        fleetcert_ca::ThingName::parse(&cn).map_err(|e| {
            ConnectRefusal::new(
                "invalid_thing_name",
                format!("certificate common name: {e}"),
            )
        })?;
        for attempt in 0.. {
            let state = self
                .registry
                .device_state(&fingerprint)
                .await
                .map_err(ConnectRefusal::unavailable)?
                .ok_or_else(|| {
                    ConnectRefusal::new(
                        "unknown_certificate",
                        "this certificate is not in the fleetcert registry",
                    )
                })?;
            if state.certificate.status != CertStatus::Active {
                return Err(ConnectRefusal::new(
                    "certificate_not_active",
                    format!(
                        "certificate {} is {}",
                        state.certificate.serial, state.certificate.status
                    ),
                ));
            }
            if state.certificate.registered_at.is_some() {
                let reply = self.reply(&state, "known", state.policies.clone());
                self.cache(fingerprint.clone(), reply.clone());
                self.remember_connection(&fingerprint, &reply.thing_name, peer);
                return Ok(ConnectOutcome::Known(reply));
            }
            let registration = self.plan_registration(&state, &identity)?;
            match self
                .registry
                .register(&registration)
                .await
                .map_err(ConnectRefusal::unavailable)?
            {
                RegistrationOutcome::Registered { policies } => {
                    let reply = self.reply(&state, "provisioned", policies);
                    self.remember_connection(&fingerprint, &reply.thing_name, peer);
                    return Ok(ConnectOutcome::Provisioned(reply));
                }
                RegistrationOutcome::AlreadyRegistered { policies } => {
                    // A concurrent first connect of the same device won.
                    let reply = self.reply(&state, "known", policies);
                    self.cache(fingerprint.clone(), reply.clone());
                    self.remember_connection(&fingerprint, &reply.thing_name, peer);
                    return Ok(ConnectOutcome::Known(reply));
                }
                RegistrationOutcome::ThingChanged if attempt < 5 => continue,
                RegistrationOutcome::ThingChanged => {
                    return Err(ConnectRefusal {
                        code: "registry_busy",
                        message: "the thing kept changing during registration; try again".into(),
                        retryable: true,
                    });
                }
                RegistrationOutcome::Refused { reason } => {
                    return Err(ConnectRefusal::new("registration_refused", reason));
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn reply(
        &self,
        state: &DeviceState,
        status: &'static str,
        policies: Vec<String>,
    ) -> ConnectReply {
        let c = &state.certificate;
        ConnectReply {
            thing_name: state.thing.name.clone(),
            status,
            policies,
            certificate_serial: c.serial.clone(),
            certificate_not_after: rfc3339(c.not_after),
            rotation_due: rotation_due(c.not_before, c.not_after, crate::unix_now()),
        }
    }

    fn plan_registration(
        &self,
        state: &DeviceState,
        identity: &fleetcert_ca::DeviceIdentity,
    ) -> Result<Registration, ConnectRefusal> {
        let template_name = state
            .thing
            .template
            .clone()
            .unwrap_or_else(|| self.default_template.clone());
        let rendered = self
            .templates
            .render(&template_name, identity, &state.thing.details)
            .map_err(|e| ConnectRefusal::new("template_failed", e.to_string()))?;
        if rendered.thing_name != state.thing.name {
            return Err(ConnectRefusal::new(
                "template_failed",
                format!(
                    "template {template_name:?} names the thing {:?}, but the certificate belongs to {:?}",
                    rendered.thing_name, state.thing.name
                ),
            ));
        }
        Ok(Registration {
            serial: state.certificate.serial.clone(),
            thing_name: state.thing.name.clone(),
            template: template_name,
            details: rendered.details,
            expected_thing_version: state.thing.version,
            policies: rendered.policies,
            at: crate::unix_now(),
        })
    }
}

/// What a template produced for one device, ready for [`Registration`].
#[derive(Debug, Clone)]
pub(crate) struct RenderedRegistration {
    pub thing_name: String,
    pub details: ThingDetails,
    pub policies: Vec<PolicyWrite>,
}
