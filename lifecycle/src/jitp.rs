//! Just-in-time provisioning: what a device's mutual-TLS connection means.
//!
//! The first time a certificate connects, the thing is registered from its template in
//! one registry transaction (details, policies, attachments, events; on SQLite shared
//! with the first connects arriving at the same moment, see `group_commit`) and the
//! device gets `provisioned` in that same connection. Later connections are `known` and answered from
//! a small cache after one indexed lookup. Refusals carry a reason code a device can log.
use crate::LifecycleError;
use crate::datadir::DataDir;
use crate::renewal::Clock;
use crate::revocation::CrlPublisher;
use crate::rotation::{Issuance, RotationStats};
use crate::sealing::KeySealer;
use fleetcert_ca::{DeviceCsr, DeviceKey};
use fleetcert_registry::{
    CertOrigin, CertStatus, ConnectionRecord, DeviceState, PolicyWrite, Registration,
    RegistrationOutcome, Registry, ReplaceOutcome, Replacement, RotationState, ThingDetails,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use time::format_description::well_known::Rfc3339;

/// Where a device with its own key (CSR) re-enrolls (RFC 7030).
pub const EST_REENROLL_PATH: &str = "/.well-known/est/simplereenroll";
/// Where a device whose key fleetcert generated fetches its replacement.
pub const FETCH_REPLACEMENT_PATH: &str = "/v1/replacement";
/// How many replacements one certificate may get (EST re-enrollments, keys generated on
/// demand, a pre-issued one): a device that lost its replacement may ask again, but a
/// stolen or looping certificate cannot have certificates issued (and the CRL grown)
/// without limit. Beyond it: `409 replacement_limit`. A fetched replacement does not
/// count again: until it is used, a fetch hands out the same key and certificate.
pub const MAX_REPLACEMENTS_PER_CERTIFICATE: u32 = 3;

impl JitpOptions {
    /// Defaults for a data directory whose keys are not encrypted (no
    /// `FLEETCERT_CA_PASSPHRASE`): its device profile and sealing key, the system clock,
    /// no renew-after-expiry window, overly permissive templates refused.
    pub fn new(
        data: &DataDir,
        ca: Arc<fleetcert_ca::IssuingCa>,
        default_template: &str,
    ) -> Result<Self, LifecycleError> {
        Ok(JitpOptions {
            default_template: default_template.to_owned(),
            allow_overly_permissive: false,
            issuance: Arc::new(data.issuance(ca)?),
            sealer: Arc::new(data.sealer(None)?),
            clock: Arc::new(crate::renewal::SystemClock::default()),
            renew_after_expiry_secs: 0,
            stats: Arc::new(RotationStats::default()),
        })
    }
}

/// The JSON a device gets from `POST /v1/connect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectReply {
    pub thing_name: String,
    /// `provisioned` on the first connect, `known` afterwards.
    pub status: &'static str,
    pub policies: Vec<String>,
    pub certificate_serial: String,
    pub certificate_not_after: String,
    /// True once the certificate is past its renewal point (or an operator made it due):
    /// the device should get its replacement now, as `rotation` describes.
    pub rotation_due: bool,
    /// The renewal point (RFC 3339).
    pub rotation_due_at: String,
    /// How to rotate, present when `rotation_due`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationAdvice>,
}

/// What a device is told to do when its rotation is due.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RotationAdvice {
    /// `est` (send a CSR for a new key) or `fetch` (fleetcert generated the key: fetch
    /// the replacement key and certificate).
    pub method: &'static str,
    /// The path to call on this server (mutual TLS with the current certificate).
    pub endpoint: &'static str,
    /// True when a replacement is already issued and waiting (`fetch`).
    pub replacement_ready: bool,
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
    /// The HTTP status to answer with.
    pub status: u16,
}

impl ConnectRefusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        ConnectRefusal {
            code,
            message: message.into(),
            retryable: false,
            status: 403,
        }
    }

    fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!("registry unavailable during a device request: {e}");
        ConnectRefusal {
            code: "registry_unavailable",
            message: "the registry is unavailable; try again later".into(),
            retryable: true,
            status: 503,
        }
    }

    fn internal(code: &'static str, e: impl std::fmt::Display) -> Self {
        tracing::error!("{code}: {e}");
        ConnectRefusal {
            code,
            message: format!("the server could not complete the request ({code})"),
            retryable: true,
            status: 500,
        }
    }
}

/// A replacement key and certificate for a device whose key fleetcert generated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchedCredentials {
    pub thing_name: String,
    pub certificate_serial: String,
    pub certificate_not_after: String,
    pub certificate_pem: String,
    /// PKCS#8 PEM; never stored unencrypted, deleted from the registry once handed out.
    pub private_key_pem: String,
    /// Issuing CA then root.
    pub chain_pem: String,
}

/// What [`Jitp`] needs besides the registry and templates.
pub struct JitpOptions {
    pub default_template: String,
    pub allow_overly_permissive: bool,
    pub issuance: Arc<Issuance>,
    pub sealer: Arc<KeySealer>,
    pub clock: Arc<dyn Clock>,
    /// How long after expiry a certificate may still re-enroll (0: not at all).
    pub renew_after_expiry_secs: i64,
    pub stats: Arc<RotationStats>,
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

    /// True if this serial (lowercase hex, as the registry keeps it) is in the current
    /// revoked set: how a server finds the open connections of a certificate revoked
    /// after their handshake.
    pub fn is_serial_revoked(&self, serial_hex: &str) -> bool {
        self.revoked_serials
            .read()
            .expect("revocation view poisoned")
            .contains(serial_hex)
    }

    /// The certificate's serial (lowercase hex, as the registry keeps it), or None if it
    /// cannot be parsed.
    pub fn serial_of(cert_der: &[u8]) -> Option<String> {
        fleetcert_ca::device_identity(cert_der)
            .ok()
            .map(|id| id.certificate_serial_hex)
    }

    /// The certificate's notAfter (Unix seconds), for the renew-after-expiry check.
    pub fn not_after(cert_der: &[u8]) -> Option<i64> {
        fleetcert_ca::device_identity(cert_der)
            .ok()
            .map(|id| id.not_after.unix_timestamp())
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

const KNOWN_TTL: Duration = Duration::from_secs(5);
const KNOWN_CAPACITY: usize = 100_000;
const REVOCATION_REFRESH: Duration = Duration::from_secs(2);
/// After a revocation made here, how long to wait for more before refreshing.
const REVOCATION_DEBOUNCE: Duration = Duration::from_millis(200);
const CONNECTION_FLUSH: Duration = Duration::from_secs(1);
/// Connection records buffered before new ones are dropped (counted) rather than growing
/// memory without bound while the registry is slow.
const CONNECTION_BUFFER: usize = 50_000;

/// The JITP use case, shared by every connection.
pub struct Jitp {
    registry: Arc<dyn Registry>,
    registrations: crate::group_commit::Registrations,
    templates: crate::templates::TemplateSet,
    default_template: String,
    known: RwLock<HashMap<String, Known>>,
    revocation: Arc<RevocationView>,
    connections: Mutex<Vec<ConnectionRecord>>,
    dropped_connection_records: std::sync::atomic::AtomicU64,
    issuance: Arc<Issuance>,
    sealer: Arc<KeySealer>,
    clock: Arc<dyn Clock>,
    renew_after_expiry_secs: i64,
    stats: Arc<RotationStats>,
    crl: CrlPublisher,
    /// Woken after a revocation so the view and the CRL follow at once.
    revoked: tokio::sync::Notify,
    cacerts_pkcs7: Vec<u8>,
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

/// Is the certificate due for rotation: past its renewal point, or made due by a sweep
/// (`rotate --within`) and not finished?
fn rotation_due(state: &DeviceState, now: i64) -> bool {
    let open = state.rotation.as_ref().is_some_and(|r| {
        matches!(
            r.state,
            RotationState::Due | RotationState::Issued | RotationState::Delivered
        )
    });
    open || now >= state.certificate.renew_at
}

impl Jitp {
    /// Loads the templates from the data directory (refusing overly permissive ones
    /// unless `allow_overly_permissive`), the revocation view and the CRL.
    pub async fn new(
        data: &DataDir,
        registry: Arc<dyn Registry>,
        options: JitpOptions,
    ) -> Result<Self, LifecycleError> {
        let templates = crate::templates::TemplateSet::load(
            data,
            &options.default_template,
            options.allow_overly_permissive,
        )?;
        let ca = options.issuance.ca.clone();
        let der_of = |pem_text: &str| -> Result<Vec<u8>, LifecycleError> {
            pem::parse(pem_text)
                .map(|p| p.into_contents())
                .map_err(|e| LifecycleError::BadInput(format!("CA certificate PEM: {e}")))
        };
        let issuing = der_of(ca.issuing_cert_pem())?;
        let root = der_of(ca.root_cert_pem())?;
        let cacerts_pkcs7 = fleetcert_ca::pkcs7_certs_only(&[&issuing, &root]);
        let jitp = Jitp {
            crl: CrlPublisher::new(registry.clone(), ca, options.clock.clone()),
            registrations: crate::group_commit::Registrations::new(registry.clone()),
            registry,
            templates,
            default_template: options.default_template,
            known: RwLock::new(HashMap::new()),
            revocation: Arc::new(RevocationView::default()),
            connections: Mutex::new(Vec::new()),
            dropped_connection_records: Default::default(),
            issuance: options.issuance,
            sealer: options.sealer,
            clock: options.clock,
            renew_after_expiry_secs: options.renew_after_expiry_secs.max(0),
            stats: options.stats,
            revoked: tokio::sync::Notify::new(),
            cacerts_pkcs7,
        };
        jitp.refresh_revocations().await?;
        Ok(jitp)
    }

    pub fn revocation(&self) -> Arc<RevocationView> {
        self.revocation.clone()
    }

    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    pub fn stats(&self) -> Arc<RotationStats> {
        self.stats.clone()
    }

    /// How long after expiry a certificate may still re-enroll.
    pub fn renew_after_expiry_secs(&self) -> i64 {
        self.renew_after_expiry_secs
    }

    /// The current CRL (DER), once one has been published.
    pub fn crl_der(&self) -> Option<Vec<u8>> {
        self.crl.current().map(|c| c.der.clone())
    }

    /// `GET /.well-known/est/cacerts`: the issuing CA and root as PKCS#7 certs-only DER.
    pub fn cacerts_pkcs7(&self) -> &[u8] {
        &self.cacerts_pkcs7
    }

    /// Reloads the revoked set into the handshake view and publishes a new CRL if the
    /// set changed (or the current one is half-way to its nextUpdate).
    async fn refresh_revocations(&self) -> Result<(), LifecycleError> {
        let entries = self.registry.revoked_entries(self.clock.now()).await?;
        self.revocation
            .replace(entries.iter().map(|e| e.serial.clone()).collect());
        self.crl.publish(&entries).await?;
        Ok(())
    }

    /// Background upkeep until the returned future is dropped: refresh the revocation
    /// view and the CRL (every couple of seconds, and at once after a revocation made
    /// here), and flush connection records.
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut revocations = tokio::time::interval(REVOCATION_REFRESH);
        let mut flushes = tokio::time::interval(CONNECTION_FLUSH);
        loop {
            tokio::select! {
                _ = revocations.tick() => {}
                _ = self.revoked.notified() => {
                    // A burst of confirmations (a fleet rotating) becomes one new CRL,
                    // not one per device.
                    tokio::time::sleep(REVOCATION_DEBOUNCE).await;
                }
                _ = flushes.tick() => {
                    self.flush().await;
                    continue;
                }
            }
            if let Err(e) = self.refresh_revocations().await {
                tracing::warn!("cannot refresh revocations: {e}");
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

    /// For `/healthz`: whether the registry takes a durable write now, through the pool
    /// first connects use (see [`Registry::probe_writes`]), so health fails when first
    /// connects would (a full disk) and recovers when they do.
    pub async fn health(&self) -> Result<(), LifecycleError> {
        Ok(self.registry.probe_writes().await?)
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
            at: self.clock.now(),
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

    /// Refuses a certificate past its notAfter (it can only have passed the handshake
    /// within the renew-after-expiry window) for anything but getting a replacement.
    fn refuse_if_expired(
        &self,
        identity: &fleetcert_ca::DeviceIdentity,
    ) -> Result<(), ConnectRefusal> {
        let not_after = identity.not_after.unix_timestamp();
        if self.clock.now() > not_after {
            return Err(ConnectRefusal::new(
                "certificate_expired",
                format!(
                    "certificate expired at {}; re-enroll with it (allowed until {}) or connect with the factory certificate",
                    rfc3339(not_after),
                    rfc3339(not_after + self.renew_after_expiry_secs)
                ),
            ));
        }
        Ok(())
    }

    /// The registry's view of a certificate that passed the handshake. Confirms a
    /// rotation on the first use of a replacement: the old certificate is revoked now,
    /// because the device has been seen with the new one.
    async fn authenticate(
        &self,
        identity: &fleetcert_ca::DeviceIdentity,
    ) -> Result<DeviceState, ConnectRefusal> {
        let state = self
            .registry
            .device_state(&identity.fingerprint_sha256_hex)
            .await
            .map_err(ConnectRefusal::unavailable)?
            .ok_or_else(|| {
                ConnectRefusal::new(
                    "unknown_certificate",
                    "this certificate is not in the fleetcert registry",
                )
            })?;
        if state.certificate.status == CertStatus::Revoked {
            return Err(ConnectRefusal::new(
                "certificate_revoked",
                format!("certificate {} is revoked", state.certificate.serial),
            ));
        }
        if state.confirms_rotation {
            match self
                .registry
                .confirm_replacement(&state.certificate.serial, self.clock.now())
                .await
            {
                Ok(Some(old)) => {
                    tracing::info!(
                        thing = %state.thing.name,
                        new = %state.certificate.serial,
                        %old,
                        "rotation confirmed; old certificate revoked"
                    );
                    RotationStats::add(&self.stats.confirmed, 1);
                    self.revoked.notify_one();
                }
                Ok(None) => {}
                // The device is fine either way; the next request confirms.
                Err(e) => tracing::warn!("cannot confirm a rotation: {e}"),
            }
        }
        Ok(state)
    }

    fn identity(cert_der: &[u8]) -> Result<fleetcert_ca::DeviceIdentity, ConnectRefusal> {
        fleetcert_ca::device_identity(cert_der).map_err(|e| {
            ConnectRefusal::new(
                "certificate_unreadable",
                format!("cannot read the certificate: {e}"),
            )
        })
    }

    /// Answers `POST /v1/connect` for a certificate that passed the TLS handshake.
    pub async fn connect(
        &self,
        cert_der: &[u8],
        peer: SocketAddr,
    ) -> Result<ConnectOutcome, ConnectRefusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_expired(&identity)?;
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
            let state = self.authenticate(&identity).await?;
            if state.certificate.registered_at.is_some() {
                let reply = self.reply(&state, "known", state.policies.clone());
                self.cache(fingerprint.clone(), reply.clone());
                self.remember_connection(&fingerprint, &reply.thing_name, peer);
                return Ok(ConnectOutcome::Known(reply));
            }
            if state.certificate.status == CertStatus::Superseded {
                // A rotation never strands a device: a superseded certificate keeps
                // working until its replacement is used (that revokes it), even if it
                // never connected before. It is not registered now — its replacement
                // is, on first use — and the reply says where to get the replacement.
                let reply = self.reply(&state, "known", state.policies.clone());
                self.cache(fingerprint.clone(), reply.clone());
                self.remember_connection(&fingerprint, &reply.thing_name, peer);
                return Ok(ConnectOutcome::Known(reply));
            }
            if state.certificate.status != CertStatus::Active {
                return Err(ConnectRefusal::new(
                    "certificate_not_active",
                    format!(
                        "certificate {} is {}",
                        state.certificate.serial, state.certificate.status
                    ),
                ));
            }
            let registration = self.plan_registration(&state, &identity)?;
            match self
                .registrations
                .register(registration)
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
                        status: 503,
                    });
                }
                RegistrationOutcome::Refused { reason } => {
                    return Err(ConnectRefusal::new("registration_refused", reason));
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Refuses a certificate that expired longer ago than the renew-after-expiry window
    /// (the handshake normally does; this guards callers that skip it).
    fn refuse_if_too_late(
        &self,
        identity: &fleetcert_ca::DeviceIdentity,
    ) -> Result<(), ConnectRefusal> {
        let not_after = identity.not_after.unix_timestamp();
        if self.clock.now() > not_after + self.renew_after_expiry_secs {
            return Err(ConnectRefusal::new(
                "certificate_expired",
                format!(
                    "certificate expired at {} and the renew-after-expiry window is over",
                    rfc3339(not_after)
                ),
            ));
        }
        Ok(())
    }

    /// `POST /.well-known/est/simplereenroll` (RFC 7030 §4.2.2): `body` is a PKCS#10 CSR
    /// (base64 DER as RFC 7030 sends it, or PEM, or raw DER) for a new key, with the
    /// thing's name as its CN. Returns the new certificate (DER), committed before it is
    /// returned. The old certificate becomes `superseded` and keeps working until the
    /// device uses the new one.
    pub async fn reenroll(&self, cert_der: &[u8], body: &[u8]) -> Result<Vec<u8>, ConnectRefusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_too_late(&identity)?;
        let state = self.authenticate(&identity).await?;
        let csr_bytes = decode_csr_body(body).ok_or_else(|| {
            ConnectRefusal::new(
                "csr_invalid",
                "the body is not a PKCS#10 CSR (expected base64 DER, PEM or DER)",
            )
            .with_status(400)
        })?;
        let csr = DeviceCsr::parse(&csr_bytes)
            .map_err(|e| ConnectRefusal::new("csr_invalid", e.to_string()).with_status(400))?;
        if csr.common_name() != Some(state.thing.name.as_str()) {
            RotationStats::add(&self.stats.failed, 1);
            return Err(ConnectRefusal::new(
                "csr_wrong_thing",
                format!(
                    "the CSR names {:?}, but this certificate belongs to thing {:?}",
                    csr.common_name().unwrap_or(""),
                    state.thing.name
                ),
            ));
        }
        let (issued, new) = self
            .issuance
            .replacement(&state.certificate, DeviceKey::Csr(&csr), self.clock.now())
            .map_err(|e| ConnectRefusal::internal("issuance_failed", e))?;
        self.record_replacement(&state, new, None).await?;
        Ok(issued.der)
    }

    /// Commits a replacement handed out in this exchange (at most
    /// [`MAX_REPLACEMENTS_PER_CERTIFICATE`] per certificate). A generated key comes with
    /// its `sealed_key`, kept until the replacement is used so it can be handed out
    /// again; such a replacement is refused with `replacement_pending` while another one
    /// waits (the caller takes that one).
    async fn record_replacement(
        &self,
        state: &DeviceState,
        new: fleetcert_registry::NewCertificate,
        sealed_key: Option<Vec<u8>>,
    ) -> Result<(), ConnectRefusal> {
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
            .map_err(ConnectRefusal::unavailable)?
        {
            ReplaceOutcome::Replaced { revoked } => {
                RotationStats::add(&self.stats.issued, 1);
                RotationStats::add(&self.stats.delivered, 1);
                if !revoked.is_empty() {
                    self.revoked.notify_one();
                }
                self.forget(&state.certificate.fingerprint_sha256);
                Ok(())
            }
            ReplaceOutcome::Refused {
                code: code @ "replacement_pending",
                reason,
            } => Err(ConnectRefusal::new(code, reason).with_status(409)),
            ReplaceOutcome::Refused {
                code: code @ "replacement_limit",
                reason,
            } => {
                tracing::warn!(
                    thing = %state.thing.name,
                    serial = %state.certificate.serial,
                    "replacement refused: {reason}"
                );
                Err(ConnectRefusal::new(code, reason).with_status(409))
            }
            ReplaceOutcome::Refused { code, reason } => {
                RotationStats::add(&self.stats.failed, 1);
                Err(ConnectRefusal::new(code, reason))
            }
        }
    }

    /// `POST /v1/replacement`: for a device whose key fleetcert generated, the
    /// replacement key and certificate — the one the worker issued ahead of time, or one
    /// issued now if none is waiting and rotation is due. Until the replacement is used
    /// (which revokes this certificate), every fetch hands out the same key and
    /// certificate: a lost reply is fetched again, and concurrent fetches get one key.
    pub async fn fetch_replacement(
        &self,
        cert_der: &[u8],
    ) -> Result<FetchedCredentials, ConnectRefusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_too_late(&identity)?;
        let state = self.authenticate(&identity).await?;
        if state.certificate.origin != CertOrigin::Generated {
            return Err(ConnectRefusal::new(
                "use_est",
                format!(
                    "this device made its own key: send a CSR for a new key to {EST_REENROLL_PATH}"
                ),
            )
            .with_status(409));
        }
        let now = self.clock.now();
        let chain_pem = self.issuance.ca.chain_pem();
        // A concurrent fetch may commit its replacement between our look and our
        // commit; ours is then refused (`replacement_pending`, nothing written, our key
        // never leaves) and we hand out that one. Twice in a row would need a third
        // party replacing it in between: give up then.
        for _ in 0..3 {
            if let Some(taken) = self
                .registry
                .take_replacement(&state.certificate.serial, now)
                .await
                .map_err(ConnectRefusal::unavailable)?
            {
                let key = self
                    .sealer
                    .open(&taken.certificate.serial, &taken.sealed_key)
                    .map_err(|e| ConnectRefusal::internal("replacement_unreadable", e))?;
                let key = fleetcert_ca::PrivateKey::from_pkcs8_der(&key)
                    .map_err(|e| ConnectRefusal::internal("replacement_unreadable", e))?;
                if !taken.again {
                    RotationStats::add(&self.stats.delivered, 1);
                }
                self.forget(&state.certificate.fingerprint_sha256);
                return Ok(FetchedCredentials {
                    thing_name: state.thing.name.clone(),
                    certificate_serial: taken.certificate.serial.clone(),
                    certificate_not_after: rfc3339(taken.certificate.not_after),
                    certificate_pem: pem::encode(&pem::Pem::new(
                        "CERTIFICATE",
                        taken.certificate.der.clone(),
                    )),
                    private_key_pem: key.to_pem().to_string(),
                    chain_pem,
                });
            }
            if !rotation_due(&state, now) {
                return Err(ConnectRefusal::new(
                    "rotation_not_due",
                    format!(
                        "certificate {} is not due for rotation before {}",
                        state.certificate.serial,
                        rfc3339(state.certificate.renew_at)
                    ),
                )
                .with_status(409));
            }
            let (issued, new) = self
                .issuance
                .replacement(&state.certificate, DeviceKey::Generate, now)
                .map_err(|e| ConnectRefusal::internal("issuance_failed", e))?;
            let key = issued
                .private_key
                .as_ref()
                .expect("a generated key comes with its private key");
            let sealed = self
                .sealer
                .seal(&new.serial, key.pkcs8_der())
                .map_err(|e| ConnectRefusal::internal("sealing_failed", e))?;
            match self.record_replacement(&state, new, Some(sealed)).await {
                Ok(()) => {
                    return Ok(FetchedCredentials {
                        thing_name: state.thing.name.clone(),
                        certificate_serial: issued.serial_hex.clone(),
                        certificate_not_after: rfc3339(issued.not_after.unix_timestamp()),
                        certificate_pem: issued.pem.clone(),
                        private_key_pem: key.to_pem().to_string(),
                        chain_pem,
                    });
                }
                Err(refusal) if refusal.code == "replacement_pending" => continue,
                Err(refusal) => return Err(refusal),
            }
        }
        Err(ConnectRefusal {
            code: "registry_busy",
            message: "the replacement kept changing; try again".into(),
            retryable: true,
            status: 503,
        })
    }

    fn forget(&self, fingerprint: &str) {
        self.known
            .write()
            .expect("cache poisoned")
            .remove(fingerprint);
    }

    fn reply(
        &self,
        state: &DeviceState,
        status: &'static str,
        policies: Vec<String>,
    ) -> ConnectReply {
        let c = &state.certificate;
        let now = self.clock.now();
        let due = rotation_due(state, now);
        let rotation = due.then(|| match c.origin {
            CertOrigin::Generated => RotationAdvice {
                method: "fetch",
                endpoint: FETCH_REPLACEMENT_PATH,
                // Issued ahead of time, or handed out and not used yet (fetched again).
                replacement_ready: state.rotation.as_ref().is_some_and(|r| {
                    matches!(r.state, RotationState::Issued | RotationState::Delivered)
                }),
            },
            _ => RotationAdvice {
                method: "est",
                endpoint: EST_REENROLL_PATH,
                replacement_ready: false,
            },
        });
        let due_at = state
            .rotation
            .as_ref()
            .map_or(c.renew_at, |r| r.due_at.min(c.renew_at));
        ConnectReply {
            thing_name: state.thing.name.clone(),
            status,
            policies,
            certificate_serial: c.serial.clone(),
            certificate_not_after: rfc3339(c.not_after),
            rotation_due: due,
            rotation_due_at: rfc3339(due_at),
            rotation,
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
            at: self.clock.now(),
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
