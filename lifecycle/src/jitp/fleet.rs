//! Provisioning by claim: the AWS IoT Fleet Provisioning operations, transport-neutral.
//!
//! A claim certificate is shared by a batch of devices. Its holder may ask for a
//! certificate of its own (CreateKeysAndCertificate, CreateCertificateFromCsr): the
//! certificate is signed, recorded as *provisional* with the SHA-256 of a fresh
//! ownership token, and only then handed out with the token. RegisterThing presents the
//! token: it must come from the same broker session and claim that got it, within an
//! hour, once; the claim's template is rendered with the device's parameters and the
//! certificate becomes the thing's, registered as a first connect registers it, in one
//! registry transaction. A provisional certificate never registered is revoked when its
//! token expires ([`Jitp::expire_provisional`]). Topics, payload encodings and status
//! codes are the front end's.
use super::{Jitp, Refusal};
use fleetcert_ca::{DeviceCsr, DeviceKey, ThingName};
use fleetcert_registry::{
    ClaimRecord, NewProvisional, ProvisionalOutcome, ProvisionalRegistration, Registration,
};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// How long an ownership token may be used (AWS: one hour).
pub const OWNERSHIP_TOKEN_SECONDS: i64 = 3600;

/// RegisterThing parameters a device may send at most, and their sizes (AWS's limits:
/// keys up to 2,048 characters, values up to 4,096).
const MAX_PARAMETERS: usize = 64;
const MAX_PARAMETER_KEY: usize = 2048;
const MAX_PARAMETER_VALUE: usize = 4096;

/// A CONNECT with a claim certificate: the session may use the Fleet Provisioning API
/// for this template and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimGrant {
    /// The claim's name.
    pub claim_name: String,
    /// The one template it provisions with.
    pub template: String,
    /// The claim certificate's serial.
    pub serial: String,
    /// The claim policy, JSON (AWS's claim policy for this template).
    pub policy_document: String,
}

/// What CreateKeysAndCertificate / CreateCertificateFromCsr hand out.
#[derive(Debug)]
pub struct ProvisionalCredentials {
    /// AWS's certificate id: SHA-256 of the certificate DER, lowercase hex.
    pub certificate_id: String,
    /// The certificate, PEM.
    pub certificate_pem: String,
    /// The generated key, PKCS#8 PEM (CreateKeysAndCertificate only).
    pub private_key_pem: Option<Zeroizing<String>>,
    /// The ownership token RegisterThing needs (single use, one hour, this session).
    pub ownership_token: String,
}

/// What RegisterThing answers.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisionedThing {
    /// The thing the certificate now belongs to.
    pub thing_name: String,
    /// The template's `DeviceConfiguration`, evaluated.
    pub device_configuration: BTreeMap<String, serde_json::Value>,
    /// The certificate's serial.
    pub serial: String,
    /// The policies attached.
    pub policies: Vec<String>,
    /// The certificate, DER (a broker front end can authorize its first CONNECT ahead).
    pub certificate_der: Vec<u8>,
}

/// Why a Fleet Provisioning request was refused. Each variant has a stable code
/// ([`ProvisioningError::code`]), AWS's where AWS has one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProvisioningError {
    /// `InvalidPayload`: the request could not be read.
    InvalidPayload(String),
    /// `InvalidCSR`: the CSR's signature, encoding or key was refused.
    InvalidCsr(String),
    /// `InvalidCertificateOwnershipToken`: no certificate has this token.
    TokenInvalid(String),
    /// `CertificateOwnershipTokenUsed`: the token was spent (or its certificate revoked).
    TokenUsed(String),
    /// `CertificateOwnershipTokenExpired`: the token is over an hour old.
    TokenExpired(String),
    /// `CertificateOwnershipTokenNotYours`: another session or claim got this token.
    TokenNotYours(String),
    /// `ResourceNotFound`: no such template on this server.
    TemplateNotFound(String),
    /// `TemplateNotAllowed`: the claim is bound to another template.
    TemplateNotAllowed(String),
    /// `ClaimRevoked` / not a claim certificate.
    ClaimRevoked(String),
    /// `ClaimExhausted`: the claim's `--max-uses` is reached.
    ClaimExhausted(String),
    /// `ProvisioningRefused`: the pre-provisioning check refused the device.
    ProvisioningRefused(String),
    /// `InvalidTemplateParameters`: the template cannot be rendered with these parameters
    /// (or the registration it renders is refused).
    TemplateFailed(String),
    /// `ServiceUnavailable`: the registry could not be reached.
    Unavailable(String),
    /// `InternalFailure`.
    Internal(String),
}

impl ProvisioningError {
    /// The stable code (the Fleet Provisioning `errorCode`).
    pub fn code(&self) -> &'static str {
        match self {
            ProvisioningError::InvalidPayload(_) => "InvalidPayload",
            ProvisioningError::InvalidCsr(_) => "InvalidCSR",
            ProvisioningError::TokenInvalid(_) => "InvalidCertificateOwnershipToken",
            ProvisioningError::TokenUsed(_) => "CertificateOwnershipTokenUsed",
            ProvisioningError::TokenExpired(_) => "CertificateOwnershipTokenExpired",
            ProvisioningError::TokenNotYours(_) => "CertificateOwnershipTokenNotYours",
            ProvisioningError::TemplateNotFound(_) => "ResourceNotFound",
            ProvisioningError::TemplateNotAllowed(_) => "TemplateNotAllowed",
            ProvisioningError::ClaimRevoked(_) => "ClaimRevoked",
            ProvisioningError::ClaimExhausted(_) => "ClaimExhausted",
            ProvisioningError::ProvisioningRefused(_) => "ProvisioningRefused",
            ProvisioningError::TemplateFailed(_) => "InvalidTemplateParameters",
            ProvisioningError::Unavailable(_) => "ServiceUnavailable",
            ProvisioningError::Internal(_) => "InternalFailure",
        }
    }

    /// The human-readable reason.
    pub fn message(&self) -> &str {
        match self {
            ProvisioningError::InvalidPayload(m)
            | ProvisioningError::InvalidCsr(m)
            | ProvisioningError::TokenInvalid(m)
            | ProvisioningError::TokenUsed(m)
            | ProvisioningError::TokenExpired(m)
            | ProvisioningError::TokenNotYours(m)
            | ProvisioningError::TemplateNotFound(m)
            | ProvisioningError::TemplateNotAllowed(m)
            | ProvisioningError::ClaimRevoked(m)
            | ProvisioningError::ClaimExhausted(m)
            | ProvisioningError::ProvisioningRefused(m)
            | ProvisioningError::TemplateFailed(m)
            | ProvisioningError::Unavailable(m)
            | ProvisioningError::Internal(m) => m,
        }
    }

    fn unavailable(e: impl std::fmt::Display) -> Self {
        ProvisioningError::Unavailable(format!("the registry is unavailable: {e}"))
    }
}

impl std::fmt::Display for ProvisioningError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ProvisioningError {}

/// AWS's claim policy: connect, and publish, receive and subscribe on the provisioning
/// API's topics. The RegisterThing topics of every template are allowed so that a device
/// naming the wrong template gets a `rejected` reply saying so (`TemplateNotAllowed`,
/// `ResourceNotFound`) instead of a bare PUBACK refusal; the claim's binding to its one
/// template is enforced by RegisterThing itself.
pub fn claim_policy_document(_template: &str) -> String {
    let topic = |suffix: &str| format!("arn:aws:iot:*:*:topic/{suffix}");
    let filter = |suffix: &str| format!("arn:aws:iot:*:*:topicfilter/{suffix}");
    let suffixes = [
        "$aws/certificates/create/*".to_owned(),
        "$aws/certificates/create-from-csr/*".to_owned(),
        "$aws/provisioning-templates/*/provision/*".to_owned(),
    ];
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/*" },
            {
                "Effect": "Allow",
                "Action": ["iot:Publish", "iot:Receive"],
                "Resource": suffixes.iter().map(|s| topic(s)).collect::<Vec<_>>(),
            },
            {
                "Effect": "Allow",
                "Action": "iot:Subscribe",
                "Resource": suffixes.iter().map(|s| filter(s)).collect::<Vec<_>>(),
            }
        ]
    })
    .to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn random_hex(len: usize) -> Result<String, ProvisioningError> {
    crate::random_hex(len)
        .ok_or_else(|| ProvisioningError::Internal("the system random generator failed".into()))
}

impl Jitp {
    /// The claim this certificate is, if it is one and is active; a revoked claim is
    /// refused. `Ok(None)`: not a claim.
    pub async fn claim_grant(&self, cert_der: &[u8]) -> Result<Option<ClaimGrant>, Refusal> {
        let fingerprint = sha256_hex(cert_der);
        let Some(claim) = self
            .registry
            .claim_by_fingerprint(&fingerprint)
            .await
            .map_err(Refusal::unavailable)?
        else {
            return Ok(None);
        };
        if claim.revoked || self.revocation.is_serial_revoked(&claim.serial) {
            return Err(Refusal::CertificateRevoked(format!(
                "claim {:?} is revoked",
                claim.name
            )));
        }
        Ok(Some(ClaimGrant {
            policy_document: claim_policy_document(&claim.template),
            claim_name: claim.name,
            template: claim.template,
            serial: claim.serial,
        }))
    }

    async fn active_claim(
        &self,
        claim_fingerprint: &str,
    ) -> Result<ClaimRecord, ProvisioningError> {
        let claim = self
            .registry
            .claim_by_fingerprint(claim_fingerprint)
            .await
            .map_err(ProvisioningError::unavailable)?
            .ok_or_else(|| {
                ProvisioningError::ClaimRevoked("the certificate is not a claim certificate".into())
            })?;
        if claim.revoked || self.revocation.is_serial_revoked(&claim.serial) {
            return Err(ProvisioningError::ClaimRevoked(format!(
                "claim {:?} is revoked",
                claim.name
            )));
        }
        if claim.max_uses.is_some_and(|max| claim.uses >= max) {
            return Err(ProvisioningError::ClaimExhausted(format!(
                "claim {:?} has provisioned its {} devices (--max-uses)",
                claim.name, claim.uses
            )));
        }
        Ok(claim)
    }

    /// CreateKeysAndCertificate (`csr_pem` = `None`: fleetcert generates the key) or
    /// CreateCertificateFromCsr, for the holder of the claim with this certificate
    /// fingerprint, in broker session `session`. The certificate is recorded before it
    /// is returned; nothing in the CSR but its public key is used.
    pub async fn create_provisional_certificate(
        &self,
        claim_fingerprint: &str,
        session: &str,
        csr_pem: Option<&str>,
    ) -> Result<ProvisionalCredentials, ProvisioningError> {
        let csr = csr_pem
            .map(|pem| {
                DeviceCsr::parse(pem.as_bytes()).map_err(|e| {
                    ProvisioningError::InvalidCsr(format!("certificateSigningRequest: {e}"))
                })
            })
            .transpose()?;
        self.create_provisional(claim_fingerprint, session, csr.as_ref())
            .await
    }

    async fn create_provisional(
        &self,
        claim_fingerprint: &str,
        session: &str,
        csr: Option<&DeviceCsr>,
    ) -> Result<ProvisionalCredentials, ProvisioningError> {
        let claim = self.active_claim(claim_fingerprint).await?;
        // The thing is not known yet; the certificate's name is its own, random.
        let name = ThingName::parse(&format!("provisional-{}", random_hex(12)?))
            .map_err(|e| ProvisioningError::Internal(e.to_string()))?;
        let key = csr.map_or(DeviceKey::Generate, DeviceKey::Csr);
        let now = self.clock.now();
        let at = time::OffsetDateTime::from_unix_timestamp(now)
            .map_err(|e| ProvisioningError::Internal(format!("clock out of range: {e}")))?;
        let issuance = &self.issuance;
        let issued = issuance
            .ca
            .issue(&name, key, &issuance.profile, at)
            .map_err(|e| ProvisioningError::Internal(format!("cannot sign: {e}")))?;
        let record =
            crate::issuance::new_certificate(&issued, issuance.ca.subject(), &issuance.renewal);
        let token = random_hex(32)?;
        self.provisionals
            .write(NewProvisional {
                claim_name: claim.name.clone(),
                session: session.to_owned(),
                token_sha256: sha256_hex(token.as_bytes()),
                token_expires_at: now + OWNERSHIP_TOKEN_SECONDS,
                certificate: record,
                at: now,
            })
            .await
            .map_err(ProvisioningError::unavailable)?;
        tracing::info!(
            claim = %claim.name,
            serial = %issued.serial_hex,
            generated_key = issued.private_key.is_some(),
            "provisional certificate issued"
        );
        Ok(ProvisionalCredentials {
            certificate_id: issued.fingerprint_sha256_hex.clone(),
            certificate_pem: issued.pem.clone(),
            private_key_pem: issued.private_key.as_ref().map(|k| k.to_pem()),
            ownership_token: token,
        })
    }

    /// RegisterThing with `template` (from the request's topic), `token` and the
    /// device's `parameters`, for the claim with this certificate fingerprint in broker
    /// session `session`.
    pub async fn register_provisioned_thing(
        &self,
        claim_fingerprint: &str,
        session: &str,
        template: &str,
        token: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<ProvisionedThing, ProvisioningError> {
        if parameters.len() > MAX_PARAMETERS
            || parameters
                .iter()
                .any(|(k, v)| k.len() > MAX_PARAMETER_KEY || v.len() > MAX_PARAMETER_VALUE)
        {
            return Err(ProvisioningError::InvalidPayload(format!(
                "parameters: at most {MAX_PARAMETERS}, keys up to {MAX_PARAMETER_KEY} and values up to {MAX_PARAMETER_VALUE} bytes"
            )));
        }
        let claim = self.active_claim(claim_fingerprint).await?;
        if !self.templates.contains(template) {
            return Err(ProvisioningError::TemplateNotFound(format!(
                "no provisioning template {:?} on this server",
                fleetcert_templates::clip(template, fleetcert_templates::MAX_ECHO_CHARS)
            )));
        }
        if claim.template != template {
            return Err(ProvisioningError::TemplateNotAllowed(format!(
                "claim {:?} provisions with template {:?} only",
                claim.name, claim.template
            )));
        }
        let token_sha256 = sha256_hex(token.as_bytes());
        let provisional = self
            .registry
            .provisional_by_token(&token_sha256)
            .await
            .map_err(ProvisioningError::unavailable)?
            .ok_or_else(|| {
                ProvisioningError::TokenInvalid("no certificate has this ownership token".into())
            })?;
        let now = self.clock.now();
        // Expiry first: an expired token's certificate is revoked by the upkeep, and the
        // device should hear that its token expired, not that it was used.
        if provisional.token_expires_at < now {
            return Err(ProvisioningError::TokenExpired(
                "this ownership token has expired (tokens are valid for one hour)".into(),
            ));
        }
        match provisional.state.as_str() {
            "pending" => {}
            "registered" => {
                return Err(ProvisioningError::TokenUsed(
                    "this ownership token was used already".into(),
                ));
            }
            _ => {
                return Err(ProvisioningError::TokenUsed(
                    "this ownership token's certificate is revoked".into(),
                ));
            }
        }
        if provisional.session != session || provisional.claim_name != claim.name {
            return Err(ProvisioningError::TokenNotYours(
                "this ownership token was issued to another connection".into(),
            ));
        }
        let certificate_pem = pem::encode(&pem::Pem::new("CERTIFICATE", provisional.der.clone()));
        let mut params = self
            .pre_provisioning
            .check(&super::preprovision::HookRequest {
                claim_certificate_id: claim_fingerprint,
                certificate_id: &provisional.fingerprint_sha256,
                certificate_pem: &certificate_pem,
                template_name: template,
                parameters,
            })
            .await?;
        params.insert(
            fleetcert_templates::params::ID.to_owned(),
            provisional.fingerprint_sha256.clone(),
        );
        let rendered = self
            .templates
            .render_with_parameters(template, &params)
            .map_err(|e| ProvisioningError::TemplateFailed(e.to_string()))?;
        for attempt in 0.. {
            let thing_name = rendered.thing.name.clone();
            let existing = self
                .registry
                .get_thing(&thing_name)
                .await
                .map_err(ProvisioningError::unavailable)?;
            let (current, version) = existing
                .as_ref()
                .map_or((Default::default(), 0), |t| (t.details.clone(), t.version));
            let registration = crate::templates::TemplateSet::merge(template, &rendered, &current)
                .map_err(|e| ProvisioningError::TemplateFailed(e.to_string()))?;
            let outcome = self
                .register_things
                .write(ProvisionalRegistration {
                    token_sha256: token_sha256.clone(),
                    session: session.to_owned(),
                    claim_name: claim.name.clone(),
                    registration: Registration {
                        serial: provisional.serial.clone(),
                        thing_name: registration.thing_name.clone(),
                        template: template.to_owned(),
                        details: registration.details,
                        expected_thing_version: version,
                        policies: registration.policies,
                        at: now,
                    },
                })
                .await
                .map_err(ProvisioningError::unavailable)?;
            return match outcome {
                ProvisionalOutcome::Registered {
                    serial, policies, ..
                } => {
                    tracing::info!(claim = %claim.name, thing = %thing_name, %serial, "thing registered by claim");
                    Ok(ProvisionedThing {
                        thing_name,
                        device_configuration: rendered.device_configuration.clone(),
                        serial,
                        policies,
                        certificate_der: provisional.der.clone(),
                    })
                }
                ProvisionalOutcome::ThingChanged if attempt < 5 => continue,
                ProvisionalOutcome::ThingChanged => Err(ProvisioningError::Unavailable(
                    "the thing kept changing during registration; try again".into(),
                )),
                ProvisionalOutcome::TokenUnknown => Err(ProvisioningError::TokenInvalid(
                    "no certificate has this ownership token".into(),
                )),
                ProvisionalOutcome::TokenUsed => Err(ProvisioningError::TokenUsed(
                    "this ownership token was used already".into(),
                )),
                ProvisionalOutcome::TokenExpired => Err(ProvisioningError::TokenExpired(
                    "this ownership token has expired".into(),
                )),
                ProvisionalOutcome::TokenNotYours => Err(ProvisioningError::TokenNotYours(
                    "this ownership token was issued to another connection".into(),
                )),
                ProvisionalOutcome::ClaimRevoked => Err(ProvisioningError::ClaimRevoked(format!(
                    "claim {:?} is revoked",
                    claim.name
                ))),
                ProvisionalOutcome::ClaimExhausted => Err(ProvisioningError::ClaimExhausted(
                    format!("claim {:?} has reached its --max-uses", claim.name),
                )),
                ProvisionalOutcome::Refused { reason } => {
                    Err(ProvisioningError::TemplateFailed(reason))
                }
                other => Err(ProvisioningError::Internal(format!(
                    "unexpected outcome {other:?}"
                ))),
            };
        }
        unreachable!("the loop returns")
    }

    /// RFC 7030 initial enrollment (`simpleenroll`) authenticated by a claim certificate
    /// (`claim_der`), for devices that speak HTTPS: the CSR's common name is the device's
    /// `SerialNumber` parameter; the certificate is issued and registered from the
    /// claim's template as CreateCertificateFromCsr + RegisterThing would (same checks,
    /// same events). Returns the certificate, DER, and the registration.
    pub async fn enroll_with_claim(
        &self,
        claim_der: &[u8],
        body: &[u8],
    ) -> Result<(Vec<u8>, ProvisionedThing), ProvisioningError> {
        let claim_fingerprint = sha256_hex(claim_der);
        let claim = self.active_claim(&claim_fingerprint).await?;
        let csr_bytes = super::decode_csr_body(body).ok_or_else(|| {
            ProvisioningError::InvalidPayload(
                "the body is not a PKCS#10 CSR (expected base64 DER, PEM or DER)".into(),
            )
        })?;
        let csr = DeviceCsr::parse(&csr_bytes)
            .map_err(|e| ProvisioningError::InvalidCsr(e.to_string()))?;
        let serial_number = csr
            .common_name()
            .filter(|cn| ThingName::parse(cn).is_ok())
            .ok_or_else(|| {
                ProvisioningError::InvalidCsr(
                    "the CSR's common name must be the device's serial number (letters, digits, ':', '_', '-')".into(),
                )
            })?
            .to_owned();
        let session = format!("est:{}", random_hex(16)?);
        let created = self
            .create_provisional(&claim_fingerprint, &session, Some(&csr))
            .await?;
        let parameters = BTreeMap::from([("SerialNumber".to_owned(), serial_number)]);
        let thing = self
            .register_provisioned_thing(
                &claim_fingerprint,
                &session,
                &claim.template,
                &created.ownership_token,
                &parameters,
            )
            .await?;
        let der = pem::parse(created.certificate_pem.as_bytes())
            .map_err(|e| ProvisioningError::Internal(e.to_string()))?
            .into_contents();
        Ok((der, thing))
    }

    /// Revokes provisional certificates whose ownership token expired unused (they are
    /// listed on the next CRL); returns how many.
    pub async fn expire_provisional(&self) -> Result<usize, crate::LifecycleError> {
        let expired = self.registry.expire_provisional(self.clock.now()).await?;
        if !expired.is_empty() {
            tracing::info!(
                count = expired.len(),
                "unregistered provisional certificates revoked"
            );
            self.revoked.notify_one();
        }
        Ok(expired.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_policy_allows_only_the_provisioning_api() {
        use fleetcert_templates::{
            ArnContext, ConnectionContext, Policy, Request, evaluate_policies,
        };
        let policy = Policy::from_json(&claim_policy_document("sensors")).unwrap();
        let arn = ArnContext::new("eu-west-1", "123456789012");
        let context = ConnectionContext {
            client_id: "factory-7".into(),
            thing: None,
            certificate: None,
        };
        let allowed = |request: Request<'_>| {
            evaluate_policies([&policy], &arn, &context, &request).is_allowed()
        };
        assert!(allowed(Request::connect("factory-7")));
        assert!(allowed(Request::publish("$aws/certificates/create/json")));
        assert!(allowed(Request::publish(
            "$aws/certificates/create-from-csr/cbor"
        )));
        assert!(allowed(Request::receive(
            "$aws/certificates/create/json/accepted"
        )));
        assert!(allowed(Request::subscribe(
            "$aws/certificates/create-from-csr/json/rejected"
        )));
        assert!(allowed(Request::publish(
            "$aws/provisioning-templates/sensors/provision/json"
        )));
        assert!(allowed(Request::publish(
            "$aws/provisioning-templates/other/provision/json"
        )));
        assert!(!allowed(Request::publish(
            "$aws/provisioning-templates/other/describe"
        )));
        assert!(!allowed(Request::subscribe(
            "$aws/provisioning-templates/#"
        )));
        assert!(!allowed(Request::publish("devices/factory-7/telemetry")));
        assert!(!allowed(Request::subscribe("#")));
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(
            ProvisioningError::InvalidCsr(String::new()).code(),
            "InvalidCSR"
        );
        assert_eq!(
            ProvisioningError::TokenUsed(String::new()).code(),
            "CertificateOwnershipTokenUsed"
        );
        assert_eq!(
            ProvisioningError::TemplateNotFound(String::new()).code(),
            "ResourceNotFound"
        );
    }
}
