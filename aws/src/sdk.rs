//! [`SdkIot`]: the [`IotApi`] implementation on `aws-sdk-iot`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use aws_config::BehaviorVersion;
use aws_config::Region;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_iot::Client;
use aws_sdk_iot::operation::register_ca_certificate::RegisterCACertificateError;
use aws_sdk_iot::operation::register_certificate::RegisterCertificateError;
use aws_sdk_iot::types::error::ResourceAlreadyExistsException;
use aws_sdk_iot::types::{AttributePayload, CertificateMode, CertificateStatus, PolicyVersion};
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use tracing::debug;

use crate::error::classify;
use crate::pem::{first_certificate_der, sha256_hex};
use crate::{
    AwsError, CaMode, CertStatus, ClientSettings, IotApi, LoggingOptions, PolicyChange, Registered,
    RemoteCertificate, RemoteThing, ThingSpec, async_trait,
};

/// AWS allows at most this many versions of a policy.
const MAX_POLICY_VERSIONS: usize = 5;
/// Page size for the List* calls (the largest AWS accepts for each of them).
const PAGE_SIZE: i32 = 250;

/// The aws-sdk-iot implementation of [`IotApi`].
///
/// Remembers which thing types, thing groups and billing groups it has seen exist, so that
/// provisioning many things does not re-check them for every thing (if one is deleted behind its
/// back, the `ResourceNotFoundException` that follows makes it forget them and try once more).
#[derive(Debug)]
pub struct SdkIot {
    client: Client,
    known_thing_types: Mutex<HashSet<String>>,
    known_thing_groups: Mutex<HashSet<String>>,
    known_billing_groups: Mutex<HashSet<String>>,
}

impl SdkIot {
    /// Standard credential chain (env, profile, web identity, ECS/IMDS) and the given region;
    /// `endpoint_url` overrides the endpoint (moto, VPC endpoints).
    ///
    /// HTTPS through aws-smithy-http-client with rustls on ring. SDK retries are off: the
    /// caller's outbox retries with its own backoff. Timeouts from `settings` (defaults 15 s
    /// per operation, 3 s to connect).
    ///
    /// Fails with [`AwsError::Config`] for an empty region, a malformed endpoint URL or a zero
    /// timeout. Credentials are only looked for on the first call.
    pub async fn connect(settings: &ClientSettings) -> Result<Self, AwsError> {
        let region = settings.region.trim();
        if region.is_empty() {
            return Err(AwsError::Config("no AWS region given".to_owned()));
        }
        if !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(AwsError::Config(format!("invalid AWS region {region:?}")));
        }
        let operation_timeout = settings
            .operation_timeout
            .unwrap_or(ClientSettings::DEFAULT_OPERATION_TIMEOUT);
        let connect_timeout = settings
            .connect_timeout
            .unwrap_or(ClientSettings::DEFAULT_CONNECT_TIMEOUT);
        if operation_timeout.is_zero() || connect_timeout.is_zero() {
            return Err(AwsError::Config(
                "timeouts must be greater than zero".to_owned(),
            ));
        }

        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .region(Region::new(region.to_owned()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(operation_timeout)
                    .connect_timeout(connect_timeout)
                    .build(),
            );
        if let Some(url) = &settings.endpoint_url {
            check_endpoint_url(url)?;
            loader = loader.endpoint_url(url.trim());
        }
        let config = loader.load().await;
        debug!(
            region,
            endpoint_url = settings.endpoint_url.as_deref(),
            "AWS IoT client configured"
        );
        Ok(SdkIot {
            client: Client::new(&config),
            known_thing_types: Mutex::default(),
            known_thing_groups: Mutex::default(),
            known_billing_groups: Mutex::default(),
        })
    }

    /// The underlying SDK client, for calls [`IotApi`] does not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn describe_ca(&self, id: &str) -> Result<Option<(String, String)>, AwsError> {
        const OP: &str = "DescribeCACertificate";
        match self
            .client
            .describe_ca_certificate()
            .certificate_id(id)
            .send()
            .await
        {
            Ok(out) => {
                let description = out
                    .certificate_description()
                    .ok_or_else(|| missing_field(OP, "certificateDescription"))?;
                let arn = description
                    .certificate_arn()
                    .ok_or_else(|| missing_field(OP, "certificateArn"))?;
                let status = description
                    .status()
                    .map_or("UNKNOWN", |status| status.as_str());
                Ok(Some((arn.to_owned(), status.to_owned())))
            }
            Err(err) => match classify(OP, err) {
                AwsError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn certificate_arn(&self, id: &str) -> Result<String, AwsError> {
        const OP: &str = "DescribeCertificate";
        let out = self
            .client
            .describe_certificate()
            .certificate_id(id)
            .send()
            .await
            .map_err(|err| classify(OP, err))?;
        out.certificate_description()
            .and_then(|description| description.certificate_arn())
            .map(str::to_owned)
            .ok_or_else(|| missing_field(OP, "certificateArn"))
    }

    async fn ensure_thing_type(&self, name: &str) -> Result<(), AwsError> {
        if lock(&self.known_thing_types).contains(name) {
            return Ok(());
        }
        match self
            .client
            .describe_thing_type()
            .thing_type_name(name)
            .send()
            .await
        {
            Ok(_) => {}
            Err(err) => match classify("DescribeThingType", err) {
                AwsError::NotFound { .. } => {
                    match self
                        .client
                        .create_thing_type()
                        .thing_type_name(name)
                        .send()
                        .await
                    {
                        Ok(_) => debug!(thing_type = name, "created thing type"),
                        Err(err) if already_exists(&err) => {}
                        Err(err) => return Err(classify("CreateThingType", err)),
                    }
                }
                other => return Err(other),
            },
        }
        lock(&self.known_thing_types).insert(name.to_owned());
        Ok(())
    }

    async fn ensure_thing_group(&self, name: &str) -> Result<(), AwsError> {
        if lock(&self.known_thing_groups).contains(name) {
            return Ok(());
        }
        match self
            .client
            .create_thing_group()
            .thing_group_name(name)
            .send()
            .await
        {
            Ok(_) => debug!(thing_group = name, "created (or found) thing group"),
            Err(err) if already_exists(&err) => {}
            Err(err) => return Err(classify("CreateThingGroup", err)),
        }
        lock(&self.known_thing_groups).insert(name.to_owned());
        Ok(())
    }

    async fn ensure_billing_group(&self, name: &str) -> Result<(), AwsError> {
        if lock(&self.known_billing_groups).contains(name) {
            return Ok(());
        }
        match self
            .client
            .create_billing_group()
            .billing_group_name(name)
            .send()
            .await
        {
            Ok(_) => debug!(billing_group = name, "created billing group"),
            Err(err) if already_exists(&err) => {}
            Err(err) => return Err(classify("CreateBillingGroup", err)),
        }
        lock(&self.known_billing_groups).insert(name.to_owned());
        Ok(())
    }

    /// Forgets that `thing`'s type and groups exist, so the next attempt checks them again.
    fn forget_dependencies(&self, thing: &ThingSpec) -> bool {
        let mut forgot = false;
        if let Some(thing_type) = &thing.thing_type {
            forgot |= lock(&self.known_thing_types).remove(thing_type);
        }
        if let Some(billing_group) = &thing.billing_group {
            forgot |= lock(&self.known_billing_groups).remove(billing_group);
        }
        let mut groups = lock(&self.known_thing_groups);
        for group in &thing.groups {
            forgot |= groups.remove(group);
        }
        forgot
    }

    async fn put_thing_once(&self, thing: &ThingSpec) -> Result<(), AwsError> {
        if let Some(thing_type) = &thing.thing_type {
            self.ensure_thing_type(thing_type).await?;
        }
        if let Some(billing_group) = &thing.billing_group {
            self.ensure_billing_group(billing_group).await?;
        }
        let attributes: HashMap<String, String> = thing
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let created = self
            .client
            .create_thing()
            .thing_name(&thing.name)
            .attribute_payload(
                AttributePayload::builder()
                    .set_attributes(Some(attributes.clone()))
                    .build(),
            )
            .set_thing_type_name(thing.thing_type.clone())
            .set_billing_group_name(thing.billing_group.clone())
            .send()
            .await;
        match created {
            Ok(_) => debug!(thing = thing.name, "CreateThing done"),
            Err(err) if already_exists(&err) => self.update_thing(thing, attributes).await?,
            Err(err) => return Err(classify("CreateThing", err)),
        }
        for group in &thing.groups {
            self.ensure_thing_group(group).await?;
            self.client
                .add_thing_to_thing_group()
                .thing_group_name(group)
                .thing_name(&thing.name)
                .send()
                .await
                .map_err(|err| classify("AddThingToThingGroup", err))?;
        }
        Ok(())
    }

    /// The thing exists with another configuration: bring it in line.
    async fn update_thing(
        &self,
        thing: &ThingSpec,
        attributes: HashMap<String, String>,
    ) -> Result<(), AwsError> {
        let mut update = self
            .client
            .update_thing()
            .thing_name(&thing.name)
            .attribute_payload(
                AttributePayload::builder()
                    .set_attributes(Some(attributes))
                    .merge(false)
                    .build(),
            );
        match &thing.thing_type {
            Some(thing_type) => update = update.thing_type_name(thing_type),
            None => {
                let current = self
                    .client
                    .describe_thing()
                    .thing_name(&thing.name)
                    .send()
                    .await
                    .map_err(|err| classify("DescribeThing", err))?;
                if current.thing_type_name().is_some() {
                    update = update.remove_thing_type(true);
                }
            }
        }
        update
            .send()
            .await
            .map_err(|err| classify("UpdateThing", err))?;
        debug!(thing = thing.name, "thing existed: UpdateThing done");
        if let Some(billing_group) = &thing.billing_group {
            self.client
                .add_thing_to_billing_group()
                .billing_group_name(billing_group)
                .thing_name(&thing.name)
                .send()
                .await
                .map_err(|err| classify("AddThingToBillingGroup", err))?;
        }
        Ok(())
    }

    async fn policy_versions(&self, name: &str) -> Result<Vec<PolicyVersion>, AwsError> {
        let out = self
            .client
            .list_policy_versions()
            .policy_name(name)
            .send()
            .await
            .map_err(|err| classify("ListPolicyVersions", err))?;
        Ok(out.policy_versions().to_vec())
    }

    /// Deletes the oldest non-default version of the policy; returns its id.
    async fn prune_oldest_version(
        &self,
        name: &str,
        versions: &[PolicyVersion],
    ) -> Result<String, AwsError> {
        const OP: &str = "DeletePolicyVersion";
        let oldest = versions
            .iter()
            .filter(|version| !version.is_default_version())
            .filter_map(|version| version.version_id().map(|id| (version, id)))
            .min_by_key(|(version, id)| {
                (
                    id.parse::<u64>().unwrap_or(u64::MAX),
                    version
                        .create_date()
                        .map(|date| (date.secs(), date.subsec_nanos())),
                )
            })
            .map(|(_, id)| id.to_owned())
            .ok_or_else(|| AwsError::Permanent {
                operation: OP,
                code: "VersionsLimitExceededException".to_owned(),
                message: format!(
                    "policy {name} has {} versions and none of them can be deleted",
                    versions.len()
                ),
            })?;
        match self
            .client
            .delete_policy_version()
            .policy_name(name)
            .policy_version_id(&oldest)
            .send()
            .await
        {
            Ok(_) => {}
            Err(err) => match classify(OP, err) {
                // Somebody else pruned it: the slot is free all the same.
                AwsError::NotFound { .. } => {}
                other => return Err(other),
            },
        }
        debug!(
            policy = name,
            version = oldest,
            "deleted oldest policy version"
        );
        Ok(oldest)
    }
}

#[async_trait]
impl IotApi for SdkIot {
    async fn registration_code(&self) -> Result<String, AwsError> {
        const OP: &str = "GetRegistrationCode";
        let out = self
            .client
            .get_registration_code()
            .send()
            .await
            .map_err(|err| classify(OP, err))?;
        out.registration_code()
            .map(str::to_owned)
            .ok_or_else(|| missing_field(OP, "registrationCode"))
    }

    async fn register_ca(
        &self,
        ca_pem: &str,
        verification_pem: Option<&str>,
        mode: CaMode,
    ) -> Result<Registered, AwsError> {
        const OP: &str = "RegisterCACertificate";
        let der = first_certificate_der(ca_pem).ok_or_else(|| AwsError::Permanent {
            operation: OP,
            code: "InvalidPem".to_owned(),
            message: "the CA certificate is not a PEM CERTIFICATE".to_owned(),
        })?;
        let id = sha256_hex(&der);
        // RegisterCACertificate is not reliably idempotent (moto re-registers silently), so look
        // first: the id is the SHA-256 of the DER.
        if let Some((arn, _status)) = self.describe_ca(&id).await? {
            return Ok(Registered {
                id,
                arn,
                created: false,
            });
        }

        let mut request = self
            .client
            .register_ca_certificate()
            .ca_certificate(ca_pem)
            .set_as_active(true)
            .allow_auto_registration(false);
        request = match mode {
            CaMode::Default => {
                let verification = verification_pem.ok_or_else(|| AwsError::Permanent {
                    operation: OP,
                    code: "InvalidRequestException".to_owned(),
                    message: "CA mode DEFAULT needs a verification certificate".to_owned(),
                })?;
                request
                    .verification_certificate(verification)
                    .certificate_mode(CertificateMode::Default)
            }
            CaMode::SniOnly => request.certificate_mode(CertificateMode::SniOnly),
        };
        match request.send().await {
            Ok(out) => {
                let arn = out
                    .certificate_arn()
                    .ok_or_else(|| missing_field(OP, "certificateArn"))?;
                let id = out.certificate_id().map_or(id, str::to_owned);
                debug!(ca = id, "registered CA certificate");
                Ok(Registered {
                    id,
                    arn: arn.to_owned(),
                    created: true,
                })
            }
            Err(err) => {
                let existing = match err.as_service_error() {
                    Some(RegisterCACertificateError::ResourceAlreadyExistsException(e)) => {
                        Some(existing_ids(e))
                    }
                    _ => None,
                };
                let Some((existing_id, existing_arn)) = existing else {
                    return Err(classify(OP, err));
                };
                let id = existing_id.unwrap_or(id);
                let arn = match existing_arn {
                    Some(arn) => arn,
                    None => match self.describe_ca(&id).await? {
                        Some((arn, _)) => arn,
                        None => {
                            return Err(AwsError::NotFound {
                                operation: "DescribeCACertificate",
                                message: format!(
                                    "CA certificate {id} is said to exist but cannot be described"
                                ),
                            });
                        }
                    },
                };
                Ok(Registered {
                    id,
                    arn,
                    created: false,
                })
            }
        }
    }

    async fn ca_status(&self, id: &str) -> Result<Option<String>, AwsError> {
        Ok(self.describe_ca(id).await?.map(|(_arn, status)| status))
    }

    async fn register_certificate(
        &self,
        pem: &str,
        ca_pem: &str,
        status: CertStatus,
    ) -> Result<Registered, AwsError> {
        const OP: &str = "RegisterCertificate";
        // Refused here rather than by AWS (moto answers a broken PEM with HTTP 500).
        let local_id = crate::pem::certificate_id(pem).ok_or_else(|| AwsError::Permanent {
            operation: OP,
            code: "InvalidPem".to_owned(),
            message: "the certificate is not a PEM CERTIFICATE".to_owned(),
        })?;
        let mut request = self
            .client
            .register_certificate()
            .certificate_pem(pem)
            .status(CertificateStatus::from(status.as_aws_str()));
        if !ca_pem.trim().is_empty() {
            request = request.ca_certificate_pem(ca_pem);
        }
        match request.send().await {
            Ok(out) => {
                let id = out
                    .certificate_id()
                    .ok_or_else(|| missing_field(OP, "certificateId"))?;
                let arn = out
                    .certificate_arn()
                    .ok_or_else(|| missing_field(OP, "certificateArn"))?;
                debug!(certificate = id, %status, "registered certificate");
                Ok(Registered {
                    id: id.to_owned(),
                    arn: arn.to_owned(),
                    created: true,
                })
            }
            Err(err) => {
                let existing = match err.as_service_error() {
                    Some(RegisterCertificateError::ResourceAlreadyExistsException(e)) => {
                        Some(existing_ids(e))
                    }
                    _ => None,
                };
                let Some((existing_id, existing_arn)) = existing else {
                    return Err(classify(OP, err));
                };
                // The id as the service names it: from the answer, else from the ARN it
                // gave; only a service that names neither gets AWS's own (DER) id.
                let id = existing_id
                    .or_else(|| {
                        existing_arn
                            .as_deref()
                            .and_then(|arn| arn.rsplit_once("cert/"))
                            .map(|(_, id)| id.to_owned())
                            .filter(|id| !id.is_empty())
                    })
                    .unwrap_or(local_id);
                let arn = match existing_arn {
                    Some(arn) => arn,
                    None => self.certificate_arn(&id).await?,
                };
                Ok(Registered {
                    id,
                    arn,
                    created: false,
                })
            }
        }
    }

    async fn update_certificate(&self, id: &str, status: CertStatus) -> Result<(), AwsError> {
        self.client
            .update_certificate()
            .certificate_id(id)
            .new_status(CertificateStatus::from(status.as_aws_str()))
            .send()
            .await
            .map_err(|err| classify("UpdateCertificate", err))?;
        Ok(())
    }

    async fn put_thing(&self, thing: &ThingSpec) -> Result<(), AwsError> {
        match self.put_thing_once(thing).await {
            // A type or group this client believed in may have been deleted: check them again.
            Err(AwsError::NotFound { .. }) if self.forget_dependencies(thing) => {
                self.put_thing_once(thing).await
            }
            result => result,
        }
    }

    async fn put_policy(&self, name: &str, document: &str) -> Result<PolicyChange, AwsError> {
        let desired: serde_json::Value =
            serde_json::from_str(document).map_err(|e| AwsError::Permanent {
                operation: "CreatePolicy",
                code: "MalformedPolicyException".to_owned(),
                message: format!("the policy document is not JSON: {e}"),
            })?;
        let current = match self.policy_document(name).await? {
            Some(current) => current,
            None => match self
                .client
                .create_policy()
                .policy_name(name)
                .policy_document(document)
                .send()
                .await
            {
                Ok(_) => {
                    debug!(policy = name, "created policy");
                    return Ok(PolicyChange::Created);
                }
                // Created concurrently: compare with what is there now.
                Err(err) if already_exists(&err) => {
                    self.policy_document(name)
                        .await?
                        .ok_or_else(|| AwsError::NotFound {
                            operation: "GetPolicy",
                            message: format!("policy {name} exists and then does not"),
                        })?
                }
                Err(err) => return Err(classify("CreatePolicy", err)),
            },
        };
        if serde_json::from_str::<serde_json::Value>(&current)
            .ok()
            .as_ref()
            == Some(&desired)
        {
            return Ok(PolicyChange::Unchanged);
        }

        let mut pruned = None;
        let versions = self.policy_versions(name).await?;
        if versions.len() >= MAX_POLICY_VERSIONS {
            pruned = Some(self.prune_oldest_version(name, &versions).await?);
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .client
                .create_policy_version()
                .policy_name(name)
                .policy_document(document)
                .set_as_default(true)
                .send()
                .await
            {
                Ok(out) => {
                    let version_id = out
                        .policy_version_id()
                        .ok_or_else(|| missing_field("CreatePolicyVersion", "policyVersionId"))?
                        .to_owned();
                    debug!(
                        policy = name,
                        version = version_id,
                        ?pruned,
                        "new policy version"
                    );
                    return Ok(PolicyChange::NewVersion { version_id, pruned });
                }
                // A version was added concurrently (or the listing was stale): prune and retry.
                Err(err)
                    if attempts < 3 && err.code() == Some("VersionsLimitExceededException") =>
                {
                    let versions = self.policy_versions(name).await?;
                    pruned = Some(self.prune_oldest_version(name, &versions).await?);
                }
                Err(err) => return Err(classify("CreatePolicyVersion", err)),
            }
        }
    }

    async fn attach_policy(&self, policy: &str, target_arn: &str) -> Result<(), AwsError> {
        match self
            .client
            .attach_policy()
            .policy_name(policy)
            .target(target_arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if already_exists(&err) => Ok(()),
            Err(err) => Err(classify("AttachPolicy", err)),
        }
    }

    async fn attach_thing_principal(
        &self,
        thing: &str,
        principal_arn: &str,
    ) -> Result<(), AwsError> {
        match self
            .client
            .attach_thing_principal()
            .thing_name(thing)
            .principal(principal_arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if already_exists(&err) => Ok(()),
            Err(err) => Err(classify("AttachThingPrincipal", err)),
        }
    }

    async fn detach_thing_principal(
        &self,
        thing: &str,
        principal_arn: &str,
    ) -> Result<(), AwsError> {
        match self
            .client
            .detach_thing_principal()
            .thing_name(thing)
            .principal(principal_arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) => match classify("DetachThingPrincipal", err) {
                AwsError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list_things(&self) -> Result<Vec<RemoteThing>, AwsError> {
        const OP: &str = "ListThings";
        let mut things = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_things()
                .max_results(PAGE_SIZE)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|err| classify(OP, err))?;
            things.extend(out.things().iter().filter_map(|thing| {
                Some(RemoteThing {
                    name: thing.thing_name()?.to_owned(),
                    thing_type: thing.thing_type_name().map(str::to_owned),
                    attributes: thing
                        .attributes()
                        .map(|attributes| {
                            attributes
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect::<BTreeMap<_, _>>()
                        })
                        .unwrap_or_default(),
                })
            }));
            token = next_page(OP, token, out.next_token())?;
            if token.is_none() {
                return Ok(things);
            }
        }
    }

    async fn logging_options(&self) -> Result<LoggingOptions, AwsError> {
        const OP: &str = "GetV2LoggingOptions";
        match self.client.get_v2_logging_options().send().await {
            Ok(out) => Ok(LoggingOptions {
                configured: true,
                disabled: out.disable_all_logs(),
                default_log_level: out.default_log_level().map(|l| l.as_str().to_owned()),
            }),
            Err(err) => match classify(OP, err) {
                AwsError::Permanent { code, .. } if code == "NotConfiguredException" => {
                    Ok(LoggingOptions {
                        configured: false,
                        disabled: true,
                        default_log_level: None,
                    })
                }
                other => Err(other),
            },
        }
    }

    async fn list_certificates(&self) -> Result<Vec<RemoteCertificate>, AwsError> {
        const OP: &str = "ListCertificates";
        let mut certificates = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_certificates()
                .page_size(PAGE_SIZE)
                .set_marker(marker.clone())
                .send()
                .await
                .map_err(|err| classify(OP, err))?;
            certificates.extend(out.certificates().iter().filter_map(|certificate| {
                Some(RemoteCertificate {
                    id: certificate.certificate_id()?.to_owned(),
                    arn: certificate.certificate_arn()?.to_owned(),
                    status: certificate
                        .status()
                        .map(|status| status.as_str().to_owned())
                        .unwrap_or_default(),
                })
            }));
            marker = next_page(OP, marker, out.next_marker())?;
            if marker.is_none() {
                return Ok(certificates);
            }
        }
    }

    async fn thing_principals(&self, thing: &str) -> Result<Vec<String>, AwsError> {
        const OP: &str = "ListThingPrincipals";
        let mut principals = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_thing_principals()
                .thing_name(thing)
                .max_results(PAGE_SIZE)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|err| classify(OP, err))?;
            principals.extend(out.principals().iter().cloned());
            token = next_page(OP, token, out.next_token())?;
            if token.is_none() {
                return Ok(principals);
            }
        }
    }

    async fn attached_policies(&self, target_arn: &str) -> Result<Vec<String>, AwsError> {
        const OP: &str = "ListAttachedPolicies";
        let mut policies = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_attached_policies()
                .target(target_arn)
                .recursive(false)
                .page_size(PAGE_SIZE)
                .set_marker(marker.clone())
                .send()
                .await
                .map_err(|err| classify(OP, err))?;
            policies.extend(
                out.policies()
                    .iter()
                    .filter_map(|policy| policy.policy_name().map(str::to_owned)),
            );
            marker = next_page(OP, marker, out.next_marker())?;
            if marker.is_none() {
                return Ok(policies);
            }
        }
    }

    async fn policy_document(&self, name: &str) -> Result<Option<String>, AwsError> {
        const OP: &str = "GetPolicy";
        match self.client.get_policy().policy_name(name).send().await {
            Ok(out) => Ok(Some(
                out.policy_document()
                    .ok_or_else(|| missing_field(OP, "policyDocument"))?
                    .to_owned(),
            )),
            Err(err) => match classify(OP, err) {
                AwsError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }
}

/// `true` if AWS answered ResourceAlreadyExistsException.
fn already_exists<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err, SdkError::ServiceError(_)) && err.code() == Some("ResourceAlreadyExistsException")
}

/// The resource id and ARN a ResourceAlreadyExistsException names, if it does.
fn existing_ids(e: &ResourceAlreadyExistsException) -> (Option<String>, Option<String>) {
    let non_empty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    (non_empty(e.resource_id()), non_empty(e.resource_arn()))
}

/// The token for the next page, `None` after the last one. A service handing back the token it
/// was just given would make the listing loop forever: that is reported as a server error.
fn next_page(
    operation: &'static str,
    previous: Option<String>,
    next: Option<&str>,
) -> Result<Option<String>, AwsError> {
    match next {
        None | Some("") => Ok(None),
        Some(next) if previous.as_deref() == Some(next) => Err(AwsError::ServerError {
            operation,
            message: format!("pagination does not advance (token {next:?} returned twice)"),
        }),
        Some(next) => Ok(Some(next.to_owned())),
    }
}

fn missing_field(operation: &'static str, field: &str) -> AwsError {
    AwsError::ServerError {
        operation,
        message: format!("the answer has no {field}"),
    }
}

fn check_endpoint_url(url: &str) -> Result<(), AwsError> {
    let url = url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            AwsError::Config(format!(
                "endpoint URL {url:?} must start with http:// or https://"
            ))
        })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AwsError::Config(format!("invalid endpoint URL {url:?}")));
    }
    Ok(())
}

fn lock(set: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        assert!(check_endpoint_url("http://127.0.0.1:5000").is_ok());
        assert!(check_endpoint_url("https://vpce-1.iot.eu-west-1.vpce.amazonaws.com/").is_ok());
        assert!(check_endpoint_url("127.0.0.1:5000").is_err());
        assert!(check_endpoint_url("http://").is_err());
        assert!(check_endpoint_url("http://a b").is_err());
    }

    #[test]
    fn pagination_tokens() {
        assert_eq!(next_page("Op", None, None).unwrap(), None);
        assert_eq!(next_page("Op", None, Some("")).unwrap(), None);
        assert_eq!(
            next_page("Op", None, Some("a")).unwrap(),
            Some("a".to_owned())
        );
        assert_eq!(
            next_page("Op", Some("a".to_owned()), Some("b")).unwrap(),
            Some("b".to_owned())
        );
        assert!(next_page("Op", Some("a".to_owned()), Some("a")).is_err());
    }

    #[tokio::test]
    async fn connect_rejects_bad_settings() {
        let bad = [
            ClientSettings::default(),
            ClientSettings {
                region: "eu west".into(),
                ..Default::default()
            },
            ClientSettings {
                region: "eu-west-1".into(),
                endpoint_url: Some("localhost:5000".into()),
                ..Default::default()
            },
            ClientSettings {
                region: "eu-west-1".into(),
                operation_timeout: Some(std::time::Duration::ZERO),
                ..Default::default()
            },
        ];
        for settings in bad {
            match SdkIot::connect(&settings).await {
                Err(AwsError::Config(_)) => {}
                Err(other) => panic!("{settings:?}: expected Config, got {other:?}"),
                Ok(_) => panic!("{settings:?}: expected Config error"),
            }
        }
    }
}
