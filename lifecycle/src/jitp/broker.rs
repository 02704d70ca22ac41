//! The broker integration's use cases, transport-neutral: what an MQTT CONNECT of a
//! certificate means (first use registers the thing, as a first connect does; then
//! `iot:Connect` is evaluated against the certificate's policies), recording
//! disconnects, and which live sessions' certificates are retired.
//!
//! The certificate is path-validated by the front end first (device-auth, as the TLS
//! handshake does); the broker's wire format, statuses and MQTT reason codes are the
//! front end's.
use super::{ConnectOutcome, Jitp, Refusal, rfc3339};
use fleetcert_registry::{CertStatus, ConnectionRecord, ConnectionTransport};
use fleetcert_templates::{
    AlternativeNames, ArnContext, CertificateContext, ConnectionContext, DistinguishedName, Policy,
    Request, ThingContext, evaluate_policies,
};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A policy attached to a connecting certificate, with its document as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedPolicy {
    /// The policy name.
    pub name: String,
    /// The document, JSON text as the registry stores it (policy variables unsubstituted).
    pub document: String,
}

/// An MQTT CONNECT that the certificate's policies allow.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthorizedConnect {
    /// The thing the certificate belongs to.
    pub thing_name: String,
    /// The certificate serial (lowercase hex).
    pub serial: String,
    /// SHA-256 of the certificate DER (lowercase hex).
    pub fingerprint_sha256: String,
    /// True when this CONNECT registered the thing (the certificate's first use).
    pub registered: bool,
    /// The policies attached to the certificate, by name.
    pub policies: Vec<AttachedPolicy>,
    /// What the policies were evaluated with (and every later action is).
    pub context: ConnectionContext,
    /// The region and account resources were matched in.
    pub arn: ArnContext,
    /// Present when the certificate is a claim: the session may use the Fleet
    /// Provisioning API for this template and nothing else (`policies` is the claim
    /// policy); no thing is registered.
    pub claim: Option<super::ClaimGrant>,
}

/// A finished broker session, as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDisconnect {
    /// The MQTT client ID.
    pub client_id: String,
    /// SHA-256 of the certificate DER (lowercase hex).
    pub fingerprint_sha256: String,
    /// The client's address as the broker saw it.
    pub source_address: String,
    /// When the session started (Unix seconds).
    pub connected_at: i64,
    /// When it ended (Unix seconds).
    pub disconnected_at: i64,
    /// Why it ended, as the broker saw it (`disconnected`, `duplicate_client_id`,
    /// `certificate_retired`, `broker_stopped`); `None` when the broker did not say.
    pub reason: Option<String>,
}

/// Why a live session's certificate must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetiredReason {
    /// Revoked by an operator (or for any reason other than a rotation).
    Revoked,
    /// Revoked because the device was seen using its replacement (a confirmed rotation).
    Rotated,
    /// Still valid, but the policies its thing gets through its groups changed after the
    /// session was granted (e.g. the audit's ADD_THINGS_TO_THING_GROUP quarantine): the
    /// device must reconnect under the new set.
    PoliciesChanged,
}

impl RetiredReason {
    /// The stable name (`revoked`, `rotated`, `policies_changed`).
    pub fn as_str(self) -> &'static str {
        match self {
            RetiredReason::Revoked => "revoked",
            RetiredReason::Rotated => "rotated",
            RetiredReason::PoliciesChanged => "policies_changed",
        }
    }
}

/// How far back the first session poll after a start looks for policy changes, seconds
/// (later polls look back to the previous one, less this margin for clock steps).
const POLICY_CHANGE_LOOKBACK_SECONDS: i64 = 10;

/// A certificate of a live session that must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredCertificate {
    /// SHA-256 of the certificate DER (lowercase hex), as the broker sent it.
    pub fingerprint_sha256: String,
    /// Why.
    pub reason: RetiredReason,
}

/// Certificates (and compiled policies) the broker use cases have seen, so that the
/// broker's frequent session checks cost no registry round trip.
#[derive(Debug, Default)]
pub(super) struct BrokerMemo {
    /// fingerprint → (serial, thing name).
    certificates: RwLock<HashMap<String, (String, String)>>,
    /// Policy name → (document text, compiled). A policy's document changes only when
    /// its default version is replaced, so the text is compared and a changed one
    /// compiled again.
    policies: RwLock<HashMap<String, (String, Arc<Policy>)>>,
    /// fingerprint → when serve last granted it a CONNECT (Unix seconds), or first saw
    /// it in a session poll: a policy change after that retires its sessions.
    granted_at: RwLock<HashMap<String, i64>>,
    /// When the previous session poll asked for policy changes.
    policy_poll: std::sync::Mutex<Option<i64>>,
}

const MEMO_CAPACITY: usize = 200_000;

impl BrokerMemo {
    fn certificate(&self, fingerprint: &str) -> Option<(String, String)> {
        self.certificates
            .read()
            .expect("broker memo poisoned")
            .get(fingerprint)
            .cloned()
    }

    /// Notes when a certificate's CONNECT was granted (or, with `only_if_unknown`, when
    /// a session of it was first seen).
    fn granted(&self, fingerprint: &str, at: i64, only_if_unknown: bool) {
        let mut granted = self.granted_at.write().expect("broker memo poisoned");
        if granted.len() >= MEMO_CAPACITY {
            granted.clear();
        }
        if only_if_unknown {
            granted.entry(fingerprint.to_owned()).or_insert(at);
        } else {
            granted.insert(fingerprint.to_owned(), at);
        }
    }

    fn granted_at(&self, fingerprint: &str) -> Option<i64> {
        self.granted_at
            .read()
            .expect("broker memo poisoned")
            .get(fingerprint)
            .copied()
    }

    /// Since when this poll looks for policy changes (and records `now` for the next).
    fn policy_poll_since(&self, now: i64) -> i64 {
        let mut previous = self.policy_poll.lock().expect("broker memo poisoned");
        let since = previous.map_or(now - POLICY_CHANGE_LOOKBACK_SECONDS, |p| p.min(now) - 2);
        *previous = Some(now);
        since
    }

    fn remember(&self, fingerprint: &str, serial: &str, thing: &str) {
        let mut certificates = self.certificates.write().expect("broker memo poisoned");
        if certificates.len() >= MEMO_CAPACITY {
            certificates.clear();
        }
        certificates.insert(
            fingerprint.to_owned(),
            (serial.to_owned(), thing.to_owned()),
        );
    }

    fn compiled(&self, name: &str, text: &str) -> Result<Arc<Policy>, Refusal> {
        if let Some((known, policy)) = self
            .policies
            .read()
            .expect("broker memo poisoned")
            .get(name)
            && known == text
        {
            return Ok(policy.clone());
        }
        let policy = Arc::new(Policy::from_json(text).map_err(|e| {
            tracing::error!(policy = name, "a stored policy cannot be evaluated: {e}");
            Refusal::PolicyInvalid(format!("policy {name:?} cannot be evaluated"))
        })?);
        let mut policies = self.policies.write().expect("broker memo poisoned");
        if policies.len() >= MEMO_CAPACITY {
            policies.clear();
        }
        policies.insert(name.to_owned(), (text.to_owned(), policy.clone()));
        Ok(policy)
    }
}

/// The certificate's names and validity as `iot:Certificate.*` policy variables see them.
fn certificate_context(cert_der: &[u8]) -> Result<CertificateContext, Refusal> {
    let attributes = fleetcert_ca::certificate_attributes(cert_der)
        .map_err(|e| Refusal::CertificateUnreadable(format!("cannot read the certificate: {e}")))?;
    let name = |pairs: &[(&'static str, String)]| {
        let mut dn = DistinguishedName::default();
        for (short, value) in pairs {
            let field = match *short {
                "C" => &mut dn.country,
                "O" => &mut dn.organization,
                "OU" => &mut dn.organizational_unit,
                "dnQualifier" => &mut dn.distinguished_name_qualifier,
                "ST" => &mut dn.state,
                "CN" => &mut dn.common_name,
                "serialNumber" => &mut dn.serial_number,
                "title" => &mut dn.title,
                "SN" => &mut dn.surname,
                "GN" => &mut dn.given_name,
                "initials" => &mut dn.initials,
                "pseudonym" => &mut dn.pseudonym,
                "generationQualifier" => &mut dn.generation_qualifier,
                _ => continue,
            };
            field.push(value.clone());
        }
        dn
    };
    let mut alternative = AlternativeNames::default();
    for (kind, value) in &attributes.subject_alternative_names {
        let field = match *kind {
            "DNSName" => &mut alternative.dns_name,
            "RFC822Name" => &mut alternative.rfc822_name,
            "UniformResourceIdentifier" => &mut alternative.uniform_resource_identifier,
            "IPAddress" => &mut alternative.ip_address,
            "DirectoryName" => &mut alternative.directory_name,
            _ => continue,
        };
        field.push(value.clone());
    }
    Ok(CertificateContext {
        subject: name(&attributes.subject),
        issuer: name(&attributes.issuer),
        subject_alternative_name: alternative,
        issuer_alternative_name: AlternativeNames::default(),
        serial_number: Some(attributes.serial_hex),
        not_before: Some(rfc3339(attributes.not_before.unix_timestamp())),
        not_after: Some(rfc3339(attributes.not_after.unix_timestamp())),
    })
}

impl Jitp {
    /// An MQTT CONNECT of `cert_der` (DER, already path-validated to the issuing CA and
    /// checked against the revocation view by the front end) with `client_id`.
    ///
    /// The certificate's first use registers the thing from its template, as
    /// [`Jitp::connect`] does (the same path: concurrent first uses make one
    /// registration). Then `iot:Connect` on `client/<client_id>` is evaluated against the
    /// policies attached to the certificate, in `arn`; the thing's name, type and
    /// attributes are in the context only when `client_id` is the name of the thing the
    /// certificate is attached to (as AWS IoT does). The session is recorded when it ends
    /// ([`Jitp::record_disconnects`]): returning devices are answered from the broker's
    /// cache, so a record made here would catch only some sessions.
    pub async fn authorize_connect(
        &self,
        cert_der: &[u8],
        client_id: &str,
        arn: &ArnContext,
    ) -> Result<AuthorizedConnect, Refusal> {
        let identity = Self::identity(cert_der)?;
        let registered = match self.connect_from(cert_der, None).await {
            Ok(outcome) => matches!(outcome, ConnectOutcome::Provisioned(_)),
            // Not a device certificate: a claim certificate, or refused as it was.
            Err(Refusal::UnknownCertificate(message)) => {
                return match self.claim_grant(cert_der).await? {
                    Some(claim) => self.authorize_claim_connect(cert_der, client_id, arn, claim),
                    None => Err(Refusal::UnknownCertificate(message)),
                };
            }
            Err(refusal) => return Err(refusal),
        };
        let state = self.known_device_state(&identity).await?;
        let certificate = &state.certificate;
        if certificate.status == CertStatus::Revoked
            || self.revocation.is_serial_revoked(&certificate.serial)
        {
            return Err(Refusal::CertificateRevoked(format!(
                "certificate {} is revoked",
                certificate.serial
            )));
        }
        self.broker.remember(
            &certificate.fingerprint_sha256,
            &certificate.serial,
            &state.thing.name,
        );
        self.broker
            .granted(&certificate.fingerprint_sha256, self.clock.now(), false);
        let attached = certificate.registered_at.is_some();
        let mut records = self
            .registry
            .policies_of_certificate(&certificate.serial)
            .await
            .map_err(Refusal::unavailable)?;
        // The thing's groups' policies (the device state lists them with the
        // certificate's own) apply, as in AWS IoT, when the client id is the thing's name.
        if attached && client_id == state.thing.name {
            for name in &state.policies {
                if records.iter().any(|r| &r.name == name) {
                    continue;
                }
                if let Some(record) = self
                    .registry
                    .get_policy(name)
                    .await
                    .map_err(Refusal::unavailable)?
                {
                    records.push(record);
                }
            }
        }
        let mut policies = Vec::with_capacity(records.len());
        let mut compiled = Vec::with_capacity(records.len());
        for record in records {
            let document = serde_json::to_string(&record.document)
                .map_err(|e| Refusal::PolicyInvalid(format!("policy {:?}: {e}", record.name)))?;
            compiled.push(self.broker.compiled(&record.name, &document)?);
            policies.push(AttachedPolicy {
                name: record.name,
                document,
            });
        }
        let thing = (attached && client_id == state.thing.name).then(|| ThingContext {
            name: state.thing.name.clone(),
            thing_type_name: state.thing.details.thing_type.clone(),
            attributes: state.thing.details.attributes.clone(),
        });
        let context = ConnectionContext {
            client_id: client_id.to_owned(),
            thing,
            certificate: Some(certificate_context(cert_der)?),
        };
        let decision = evaluate_policies(
            compiled.iter().map(|p| &**p),
            arn,
            &context,
            &Request::connect(client_id),
        );
        if !decision.is_allowed() {
            let shown = fleetcert_templates::clip(client_id, fleetcert_templates::MAX_ECHO_CHARS);
            return Err(if client_id != state.thing.name {
                Refusal::ClientIdMismatch(format!(
                    "client ID {shown:?} is not {:?}, the thing this certificate is attached to, and its policies do not allow iot:Connect with it ({decision})",
                    state.thing.name
                ))
            } else {
                Refusal::ConnectDenied(format!(
                    "the certificate's policies do not allow iot:Connect on client/{shown} ({decision})"
                ))
            });
        }
        Ok(AuthorizedConnect {
            thing_name: state.thing.name.clone(),
            serial: certificate.serial.clone(),
            fingerprint_sha256: certificate.fingerprint_sha256.clone(),
            registered,
            policies,
            context,
            arn: arn.clone(),
            claim: None,
        })
    }

    /// A CONNECT with a claim certificate: `iot:Connect` evaluated against the claim
    /// policy; nothing registered.
    fn authorize_claim_connect(
        &self,
        cert_der: &[u8],
        client_id: &str,
        arn: &ArnContext,
        claim: super::ClaimGrant,
    ) -> Result<AuthorizedConnect, Refusal> {
        let name = format!("fleetcert-claim-{}", claim.template);
        let policy = self.broker.compiled(&name, &claim.policy_document)?;
        let context = ConnectionContext {
            client_id: client_id.to_owned(),
            thing: None,
            certificate: Some(certificate_context(cert_der)?),
        };
        let decision = evaluate_policies([&*policy], arn, &context, &Request::connect(client_id));
        if !decision.is_allowed() {
            return Err(Refusal::ConnectDenied(format!(
                "the claim policy does not allow iot:Connect ({decision})"
            )));
        }
        Ok(AuthorizedConnect {
            thing_name: claim.claim_name.clone(),
            serial: claim.serial.clone(),
            fingerprint_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, cert_der)),
            registered: false,
            policies: vec![AttachedPolicy {
                name,
                document: claim.policy_document.clone(),
            }],
            context,
            arn: arn.clone(),
            claim: Some(claim),
        })
    }

    /// Records finished broker sessions as connections of their certificates (client id,
    /// address, connect and disconnect times, why it ended), with the next connection
    /// flush. Sessions of certificates the registry does not hold are skipped.
    /// Returns how many were recorded.
    pub async fn record_disconnects(
        &self,
        sessions: &[BrokerDisconnect],
    ) -> Result<usize, Refusal> {
        let mut recorded = 0;
        for session in sessions {
            let Some((_, thing)) = self.known_certificate(&session.fingerprint_sha256).await?
            else {
                continue;
            };
            self.caches.remember_connection(ConnectionRecord {
                fingerprint_sha256: session.fingerprint_sha256.clone(),
                thing_name: thing,
                client_addr: session.source_address.clone(),
                at: session.connected_at,
                transport: ConnectionTransport::Mqtt,
                client_id: Some(session.client_id.clone()),
                disconnected_at: Some(session.disconnected_at),
                disconnect_reason: session.reason.clone(),
            });
            recorded += 1;
        }
        Ok(recorded)
    }

    /// Which of these certificates (SHA-256 fingerprints of live sessions) must be
    /// dropped: revoked, or retired by a confirmed rotation. Answered from the revocation
    /// view (refreshed every couple of seconds) for certificates seen before, from the
    /// registry otherwise. Certificates the registry does not hold are not listed.
    pub async fn retired(
        &self,
        fingerprints: &[String],
    ) -> Result<Vec<RetiredCertificate>, Refusal> {
        let now = self.clock.now();
        let since = self.broker.policy_poll_since(now);
        // Things whose policies through groups changed lately, with the latest change.
        let mut changed: HashMap<String, i64> = HashMap::new();
        for (thing, at) in self
            .registry
            .things_policies_changed_since(since)
            .await
            .map_err(Refusal::unavailable)?
        {
            let latest = changed.entry(thing).or_insert(at);
            *latest = (*latest).max(at);
        }
        let mut retired = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for fingerprint in fingerprints {
            if !seen.insert(fingerprint.as_str()) {
                continue;
            }
            self.broker.granted(fingerprint, now, true);
            let reason = if let Some((serial, _)) = self.broker.certificate(fingerprint) {
                self.revocation
                    .is_serial_revoked(&serial)
                    .then(|| self.revocation.reason_of(&serial))
            } else {
                let Some(state) = self
                    .registry
                    .device_state(fingerprint)
                    .await
                    .map_err(Refusal::unavailable)?
                else {
                    // A claim certificate's session goes when the claim is revoked.
                    let claim = self
                        .registry
                        .claim_by_fingerprint(fingerprint)
                        .await
                        .map_err(Refusal::unavailable)?;
                    if claim.is_some_and(|c| c.revoked) {
                        retired.push(RetiredCertificate {
                            fingerprint_sha256: fingerprint.clone(),
                            reason: RetiredReason::Revoked,
                        });
                    }
                    continue;
                };
                let c = &state.certificate;
                self.broker
                    .remember(fingerprint, &c.serial, &state.thing.name);
                (c.status == CertStatus::Revoked || self.revocation.is_serial_revoked(&c.serial))
                    .then(|| {
                        c.revocation_reason
                            .clone()
                            .or_else(|| self.revocation.reason_of(&c.serial))
                    })
            };
            if let Some(reason) = reason {
                retired.push(RetiredCertificate {
                    fingerprint_sha256: fingerprint.clone(),
                    reason: if reason.as_deref() == Some("superseded") {
                        RetiredReason::Rotated
                    } else {
                        RetiredReason::Revoked
                    },
                });
                continue;
            }
            // Granted in the same second as the change: it may predate it, so it goes
            // too (the reconnect is granted after, and stays).
            let policies_changed = !changed.is_empty()
                && self
                    .broker
                    .certificate(fingerprint)
                    .is_some_and(|(_, thing)| {
                        changed.get(&thing).is_some_and(|&at| {
                            self.broker
                                .granted_at(fingerprint)
                                .is_none_or(|granted| granted <= at)
                        })
                    });
            if policies_changed {
                retired.push(RetiredCertificate {
                    fingerprint_sha256: fingerprint.clone(),
                    reason: RetiredReason::PoliciesChanged,
                });
            }
        }
        Ok(retired)
    }

    /// (serial, thing name) of a certificate by fingerprint, remembered or from the
    /// registry.
    async fn known_certificate(
        &self,
        fingerprint: &str,
    ) -> Result<Option<(String, String)>, Refusal> {
        if let Some(known) = self.broker.certificate(fingerprint) {
            return Ok(Some(known));
        }
        let state = self
            .registry
            .device_state(fingerprint)
            .await
            .map_err(Refusal::unavailable)?;
        Ok(state.map(|s| {
            self.broker
                .remember(fingerprint, &s.certificate.serial, &s.thing.name);
            (s.certificate.serial, s.thing.name)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_reasons_have_stable_names() {
        assert_eq!(RetiredReason::Revoked.as_str(), "revoked");
        assert_eq!(RetiredReason::Rotated.as_str(), "rotated");
    }

    #[test]
    fn garbage_has_no_certificate_context() {
        assert_eq!(
            certificate_context(b"junk").unwrap_err().code(),
            "certificate_unreadable"
        );
    }
}
