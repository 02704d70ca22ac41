//! Just-in-time provisioning and the other device use cases: what a device's request
//! means, independent of the transport that carries it.
//!
//! - [`Jitp::connect`] (`connect.rs`): first connects register the thing from its
//!   template; returning devices are answered from a short cache.
//! - [`Jitp::reenroll`] (`reenroll.rs`): RFC 7030 re-enrollment with a CSR.
//! - [`Jitp::fetch_replacement`] (`replacement.rs`): replacement key and certificate for
//!   devices whose key fleetcert generated.
//! - [`Jitp::identify`] (`identify.rs`): certificate → thing, read-only, for front
//!   ends that authorize each action of a device (the broker integration).
//! - [`Jitp::authorize_connect`], [`Jitp::retired`], [`Jitp::record_disconnects`]
//!   (`broker.rs`): an MQTT broker's CONNECT (first use registers, then `iot:Connect`
//!   is evaluated against the certificate's policies), live sessions to drop, and
//!   finished sessions.
//! - `caches.rs`: returning-device replies and buffered connection records.
//!
//! Replies are typed ([`ConnectReply`], [`FetchedCredentials`]); refusals are a
//! [`Refusal`] with a stable reason code. Statuses, paths and wire formats are the front
//! end's business (the mutual-TLS server maps them to HTTP).
use crate::LifecycleError;
use crate::datadir::DataDir;
use crate::renewal::Clock;
use crate::revocation::CrlPublisher;
use crate::rotation::{Issuance, RotationStats};
use crate::sealing::KeySealer;
use fleetcert_registry::{CertStatus, DeviceState, Registry, RotationState};
use std::sync::Arc;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;

mod broker;
mod caches;
mod connect;
mod fleet;
mod identify;
mod preprovision;
mod reenroll;
mod refusal;
mod replacement;

pub use crate::revocation_view::RevocationView;
pub use broker::{
    AttachedPolicy, AuthorizedConnect, BrokerDisconnect, RetiredCertificate, RetiredReason,
};
pub use connect::{ConnectOutcome, ConnectReply, ConnectStatus, RotationAdvice, RotationMethod};
pub use fleet::{
    ClaimGrant, OWNERSHIP_TOKEN_SECONDS, ProvisionalCredentials, ProvisionedThing,
    ProvisioningError, claim_policy_document,
};
pub use identify::IdentifiedDevice;
pub use reenroll::{MAX_REPLACEMENTS_PER_CERTIFICATE, decode_csr_body};
pub use refusal::Refusal;
pub use replacement::FetchedCredentials;

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

/// What [`Jitp`] needs besides the registry and templates.
pub struct JitpOptions {
    /// The template of things that name none.
    pub default_template: String,
    /// Load templates that fail the least-privilege lint.
    pub allow_overly_permissive: bool,
    /// How replacements are signed.
    pub issuance: Arc<Issuance>,
    /// Seals generated replacement keys at rest.
    pub sealer: Arc<KeySealer>,
    /// The time every decision reads.
    pub clock: Arc<dyn Clock>,
    /// How long after expiry a certificate may still re-enroll (0: not at all).
    pub renew_after_expiry_secs: i64,
    /// Rotation counters, shared with the rotation worker.
    pub stats: Arc<RotationStats>,
}

const REVOCATION_REFRESH: Duration = Duration::from_secs(2);
/// After a revocation made here, how long to wait for more before refreshing.
const REVOCATION_DEBOUNCE: Duration = Duration::from_millis(200);
const CONNECTION_FLUSH: Duration = Duration::from_secs(1);
/// How often certificates whose ownership token expired unused are revoked.
const PROVISIONAL_EXPIRY_CHECK: Duration = Duration::from_secs(60);

/// The device use cases, shared by every connection.
pub struct Jitp {
    registry: Arc<dyn Registry>,
    registrations: crate::group_commit::Grouped<crate::group_commit::Register>,
    /// The Fleet Provisioning API's writes, grouped as first connects are.
    provisionals: crate::group_commit::Grouped<crate::group_commit::RecordProvisional>,
    register_things: crate::group_commit::Grouped<crate::group_commit::RegisterProvisional>,
    templates: crate::templates::TemplateSet,
    default_template: String,
    caches: caches::Caches,
    broker: broker::BrokerMemo,
    revocation: Arc<RevocationView>,
    issuance: Arc<Issuance>,
    sealer: Arc<KeySealer>,
    clock: Arc<dyn Clock>,
    renew_after_expiry_secs: i64,
    stats: Arc<RotationStats>,
    crl: CrlPublisher,
    /// Woken after a revocation so the view and the CRL follow at once.
    revoked: tokio::sync::Notify,
    cacerts_pkcs7: Vec<u8>,
    /// RegisterThing's allow-lists and webhooks, by template.
    pre_provisioning: preprovision::PreProvisioning,
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
            registrations: crate::group_commit::Grouped::new(registry.clone()),
            provisionals: crate::group_commit::Grouped::new(registry.clone()),
            register_things: crate::group_commit::Grouped::new(registry.clone()),
            registry,
            templates,
            default_template: options.default_template,
            caches: caches::Caches::default(),
            broker: broker::BrokerMemo::default(),
            revocation: Arc::new(RevocationView::default()),
            issuance: options.issuance,
            sealer: options.sealer,
            clock: options.clock,
            renew_after_expiry_secs: options.renew_after_expiry_secs.max(0),
            stats: options.stats,
            revoked: tokio::sync::Notify::new(),
            cacerts_pkcs7,
            pre_provisioning: preprovision::PreProvisioning::load(&data.pre_provisioning_dir())?,
        };
        jitp.refresh_revocations().await?;
        Ok(jitp)
    }

    /// The revocation view this use case keeps fresh (see [`Jitp::run_upkeep`]).
    pub fn revocation(&self) -> Arc<RevocationView> {
        self.revocation.clone()
    }

    /// The clock every decision reads.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The rotation counters.
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

    /// The issuing CA and root as PKCS#7 certs-only DER (what EST `cacerts` answers).
    pub fn cacerts_pkcs7(&self) -> &[u8] {
        &self.cacerts_pkcs7
    }

    /// Reloads the revoked set into the handshake view and publishes a new CRL if the
    /// set changed (or the current one is half-way to its nextUpdate).
    async fn refresh_revocations(&self) -> Result<(), LifecycleError> {
        let entries = self.registry.revoked_entries(self.clock.now()).await?;
        self.revocation.replace(
            entries
                .iter()
                .map(|e| (e.serial.clone(), e.reason.clone()))
                .collect(),
        );
        self.crl.publish(&entries).await?;
        Ok(())
    }

    /// Background upkeep until the returned future is dropped: refresh the revocation
    /// view and the CRL (every couple of seconds, and at once after a revocation made
    /// here), and flush connection records.
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut revocations = tokio::time::interval(REVOCATION_REFRESH);
        let mut flushes = tokio::time::interval(CONNECTION_FLUSH);
        let mut expiries = tokio::time::interval(PROVISIONAL_EXPIRY_CHECK);
        loop {
            tokio::select! {
                _ = revocations.tick() => {}
                _ = expiries.tick() => {
                    if let Err(e) = self.expire_provisional().await {
                        tracing::warn!("cannot expire provisional certificates: {e}");
                    }
                    continue;
                }
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
        let batch = self.caches.take_connections();
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

    /// Refuses a certificate past its notAfter (it can only have passed the handshake
    /// within the renew-after-expiry window) for anything but getting a replacement.
    fn refuse_if_expired(&self, identity: &fleetcert_ca::DeviceIdentity) -> Result<(), Refusal> {
        let not_after = identity.not_after.unix_timestamp();
        if self.clock.now() > not_after {
            return Err(Refusal::CertificateExpired(format!(
                "certificate expired at {}; re-enroll with it (allowed until {}) or connect with the factory certificate",
                rfc3339(not_after),
                rfc3339(not_after + self.renew_after_expiry_secs)
            )));
        }
        Ok(())
    }

    /// The registry's state of this certificate; a certificate it does not know is
    /// refused as unknown.
    pub(crate) async fn known_device_state(
        &self,
        identity: &fleetcert_ca::DeviceIdentity,
    ) -> Result<DeviceState, Refusal> {
        self.registry
            .device_state(&identity.fingerprint_sha256_hex)
            .await
            .map_err(Refusal::unavailable)?
            .ok_or_else(|| {
                Refusal::UnknownCertificate(
                    "this certificate is not in the fleetcert registry".into(),
                )
            })
    }

    /// The registry's view of a certificate that passed the handshake. Confirms a
    /// rotation on the first use of a replacement: the old certificate is revoked now,
    /// because the device has been seen with the new one.
    async fn authenticate(
        &self,
        identity: &fleetcert_ca::DeviceIdentity,
    ) -> Result<DeviceState, Refusal> {
        let state = self.known_device_state(identity).await?;
        if state.certificate.status == CertStatus::Revoked {
            return Err(Refusal::CertificateRevoked(format!(
                "certificate {} is revoked",
                state.certificate.serial
            )));
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

    fn identity(cert_der: &[u8]) -> Result<fleetcert_ca::DeviceIdentity, Refusal> {
        fleetcert_ca::device_identity(cert_der).map_err(|e| {
            Refusal::CertificateUnreadable(format!("cannot read the certificate: {e}"))
        })
    }

    /// Refuses a certificate that expired longer ago than the renew-after-expiry window
    /// (the handshake normally does; this guards callers that skip it).
    fn refuse_if_too_late(&self, identity: &fleetcert_ca::DeviceIdentity) -> Result<(), Refusal> {
        let not_after = identity.not_after.unix_timestamp();
        if self.clock.now() > not_after + self.renew_after_expiry_secs {
            return Err(Refusal::CertificateExpired(format!(
                "certificate expired at {} and the renew-after-expiry window is over",
                rfc3339(not_after)
            )));
        }
        Ok(())
    }
}
