//! First and returning connects: what a device's connection means.
//!
//! The first time a certificate connects, the thing is registered from its template in
//! one registry transaction (details, policies, attachments, events; on SQLite shared
//! with the first connects arriving at the same moment, see `group_commit`) and the
//! device gets [`ConnectStatus::Provisioned`] in that same connection. Later connections
//! are [`ConnectStatus::Known`] and answered from a small cache after one indexed lookup.
use super::{Jitp, Refusal, rfc3339, rotation_due};
use fleetcert_registry::{
    CertOrigin, CertStatus, ConnectionRecord, DeviceState, Registration, RegistrationOutcome,
    RotationState,
};
use std::net::SocketAddr;

/// What a device is told about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectReply {
    /// The thing this certificate belongs to.
    pub thing_name: String,
    /// Provisioned by this connect, or known already.
    pub status: ConnectStatus,
    /// The policies attached to the certificate.
    pub policies: Vec<String>,
    /// The certificate's serial (lowercase hex).
    pub certificate_serial: String,
    /// The certificate's notAfter (RFC 3339).
    pub certificate_not_after: String,
    /// True once the certificate is past its renewal point (or an operator made it due):
    /// the device should get its replacement now, as `rotation` describes.
    pub rotation_due: bool,
    /// The renewal point (RFC 3339).
    pub rotation_due_at: String,
    /// How to rotate, present when `rotation_due`.
    pub rotation: Option<RotationAdvice>,
}

/// Whether a connect registered the thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectStatus {
    /// The first connect of this certificate registered it.
    Provisioned,
    /// The certificate was registered before (or is a superseded one still working).
    Known,
}

impl ConnectStatus {
    /// The stable name devices see (`provisioned`, `known`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectStatus::Provisioned => "provisioned",
            ConnectStatus::Known => "known",
        }
    }
}

/// What a device is told to do when its rotation is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationAdvice {
    /// How the device gets its replacement.
    pub method: RotationMethod,
    /// True when a replacement is already issued and waiting ([`RotationMethod::Fetch`]).
    pub replacement_ready: bool,
}

/// How a device gets its replacement certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RotationMethod {
    /// The device made its own key: it re-enrolls with a CSR for a new key
    /// ([`Jitp::reenroll`]).
    Est,
    /// fleetcert generated the key: the device fetches its replacement key and
    /// certificate ([`Jitp::fetch_replacement`]).
    Fetch,
}

impl RotationMethod {
    /// The stable name devices see (`est`, `fetch`).
    pub fn as_str(self) -> &'static str {
        match self {
            RotationMethod::Est => "est",
            RotationMethod::Fetch => "fetch",
        }
    }
}

/// A connect's outcome: [`ConnectOutcome::Provisioned`] the first time,
/// [`ConnectOutcome::Known`] afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// This connect registered the thing.
    Provisioned(ConnectReply),
    /// The certificate was known already.
    Known(ConnectReply),
}

impl Jitp {
    /// A connect of a certificate that passed the transport's authentication (the TLS
    /// handshake): registers it the first time, answers from the registry (or a short
    /// cache) afterwards.
    pub async fn connect(
        &self,
        cert_der: &[u8],
        peer: SocketAddr,
    ) -> Result<ConnectOutcome, Refusal> {
        self.connect_from(cert_der, Some(&peer.to_string())).await
    }

    /// [`Jitp::connect`], recording the connection from `peer` (an address as the front
    /// end knows it) unless `None` (the caller records it once it has decided).
    pub(super) async fn connect_from(
        &self,
        cert_der: &[u8],
        peer: Option<&str>,
    ) -> Result<ConnectOutcome, Refusal> {
        let identity = Self::identity(cert_der)?;
        self.refuse_if_expired(&identity)?;
        let fingerprint = identity.fingerprint_sha256_hex.clone();
        if let Some(reply) = self.caches.cached(&fingerprint) {
            self.remember_connection(&fingerprint, &reply.thing_name, peer);
            return Ok(ConnectOutcome::Known(reply));
        }
        // The common name must be a valid thing name: it is substituted into policies.
        let cn = identity.common_name.clone().unwrap_or_default();
        fleetcert_ca::ThingName::parse(&cn)
            .map_err(|e| Refusal::InvalidThingName(format!("certificate common name: {e}")))?;
        for attempt in 0.. {
            let state = self.authenticate(&identity).await?;
            if state.certificate.registered_at.is_some() {
                let reply = self.reply(&state, ConnectStatus::Known, state.policies.clone());
                self.caches.cache(fingerprint.clone(), reply.clone());
                self.remember_connection(&fingerprint, &reply.thing_name, peer);
                return Ok(ConnectOutcome::Known(reply));
            }
            if state.certificate.status == CertStatus::Superseded {
                // A rotation never strands a device: a superseded certificate keeps
                // working until its replacement is used (that revokes it), even if it
                // never connected before. It is not registered now — its replacement
                // is, on first use — and the reply says where to get the replacement.
                let reply = self.reply(&state, ConnectStatus::Known, state.policies.clone());
                self.caches.cache(fingerprint.clone(), reply.clone());
                self.remember_connection(&fingerprint, &reply.thing_name, peer);
                return Ok(ConnectOutcome::Known(reply));
            }
            if state.certificate.status != CertStatus::Active {
                return Err(Refusal::CertificateNotActive(format!(
                    "certificate {} is {}",
                    state.certificate.serial, state.certificate.status
                )));
            }
            let registration = self.plan_registration(&state, &identity)?;
            match self
                .registrations
                .write(registration)
                .await
                .map_err(Refusal::unavailable)?
            {
                RegistrationOutcome::Registered { policies } => {
                    let reply = self.reply(&state, ConnectStatus::Provisioned, policies);
                    self.remember_connection(&fingerprint, &reply.thing_name, peer);
                    return Ok(ConnectOutcome::Provisioned(reply));
                }
                RegistrationOutcome::AlreadyRegistered { policies } => {
                    // A concurrent first connect of the same device won.
                    let reply = self.reply(&state, ConnectStatus::Known, policies);
                    self.caches.cache(fingerprint.clone(), reply.clone());
                    self.remember_connection(&fingerprint, &reply.thing_name, peer);
                    return Ok(ConnectOutcome::Known(reply));
                }
                RegistrationOutcome::ThingChanged if attempt < 5 => continue,
                RegistrationOutcome::ThingChanged => {
                    return Err(Refusal::RegistryBusy(
                        "the thing kept changing during registration; try again".into(),
                    ));
                }
                RegistrationOutcome::Refused { reason } => {
                    return Err(Refusal::RegistrationRefused(reason));
                }
            }
        }
        unreachable!("the loop returns")
    }

    pub(super) fn remember_connection(&self, fingerprint: &str, thing: &str, peer: Option<&str>) {
        if let Some(peer) = peer {
            self.caches.remember_connection(ConnectionRecord::https(
                fingerprint,
                thing,
                peer,
                self.clock.now(),
            ));
        }
    }

    fn reply(
        &self,
        state: &DeviceState,
        status: ConnectStatus,
        policies: Vec<String>,
    ) -> ConnectReply {
        let c = &state.certificate;
        let now = self.clock.now();
        let due = rotation_due(state, now);
        let rotation = due.then(|| match c.origin {
            CertOrigin::Generated => RotationAdvice {
                method: RotationMethod::Fetch,
                // Issued ahead of time, or handed out and not used yet (fetched again).
                replacement_ready: state.rotation.as_ref().is_some_and(|r| {
                    matches!(r.state, RotationState::Issued | RotationState::Delivered)
                }),
            },
            _ => RotationAdvice {
                method: RotationMethod::Est,
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
    ) -> Result<Registration, Refusal> {
        let template_name = state
            .thing
            .template
            .clone()
            .unwrap_or_else(|| self.default_template.clone());
        let rendered = self
            .templates
            .render(&template_name, identity, &state.thing.details)
            .map_err(|e| Refusal::TemplateFailed(e.to_string()))?;
        if rendered.thing_name != state.thing.name {
            return Err(Refusal::TemplateFailed(format!(
                "template {template_name:?} names the thing {:?}, but the certificate belongs to {:?}",
                rendered.thing_name, state.thing.name
            )));
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
