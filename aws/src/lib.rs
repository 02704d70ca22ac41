//! The thin AWS IoT Core client behind fleetcert's registry mirror.
//!
//! The mirror worker talks to AWS only through the [`IotApi`] trait, so it can be tested with a
//! fake; [`SdkIot`] is the real implementation on `aws-sdk-iot` (HTTPS through rustls on
//! `ring`, SDK retries off: the worker's outbox retries with its own backoff).
//!
//! Every failure comes out as an [`AwsError`] that says whether retrying can help:
//! [`AwsError::Transient`] (network, timeouts, throttling, 503) is worth retrying for as long as
//! the outage lasts, [`AwsError::ServerError`] (500) a bounded number of times, and the rest not
//! at all.
//!
//! Every call is idempotent as the mirror uses it: "already exists" / "already attached" /
//! "not attached" answers are success.

#![warn(missing_docs)]

mod error;
mod pem;
mod sdk;

use std::collections::BTreeMap;
use std::time::Duration;

pub use async_trait::async_trait;

pub use crate::pem::certificate_id;
pub use crate::sdk::SdkIot;

/// How the issuing CA is registered with AWS IoT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// `certificateMode=DEFAULT`: registered with a verification certificate (a certificate
    /// signed by the CA whose subject CN is the account's registration code) proving possession
    /// of the CA key. Only one account per region can register a CA in this mode.
    Default,
    /// `certificateMode=SNI_ONLY`: no verification certificate; devices must send SNI when they
    /// connect. The same CA may be registered in several accounts.
    SniOnly,
}

/// The status of a device certificate in AWS IoT, as fleetcert sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    /// `ACTIVE`: the device may connect.
    Active,
    /// `INACTIVE`: the device may not connect; can be reactivated.
    Inactive,
    /// `REVOKED`: the device may not connect; AWS does not allow reactivating it.
    Revoked,
}

impl CertStatus {
    /// The status as AWS spells it: `"ACTIVE"`, `"INACTIVE"` or `"REVOKED"`.
    pub fn as_aws_str(self) -> &'static str {
        match self {
            CertStatus::Active => "ACTIVE",
            CertStatus::Inactive => "INACTIVE",
            CertStatus::Revoked => "REVOKED",
        }
    }

    /// Parses `"ACTIVE"`, `"INACTIVE"` or `"REVOKED"`, ignoring ASCII case and surrounding
    /// whitespace. Other AWS statuses (`PENDING_TRANSFER`, …) give `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        [
            CertStatus::Active,
            CertStatus::Inactive,
            CertStatus::Revoked,
        ]
        .into_iter()
        .find(|status| status.as_aws_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for CertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_aws_str())
    }
}

/// A certificate (or CA certificate) as registered with AWS IoT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The certificate id as the service returned it (or named it in its "already exists"
    /// answer). AWS computes the SHA-256 of the DER; moto and LocalStack by default hash the
    /// PEM text: callers must use this id, never one computed locally.
    pub id: String,
    /// The certificate ARN as the service returned it (`arn:aws:iot:REGION:ACCOUNT:cert/ID`
    /// or `…:cacert/ID`).
    pub arn: String,
    /// `false` when the certificate was already registered (its status was then left as it was).
    pub created: bool,
}

/// A thing as fleetcert wants it in AWS IoT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingSpec {
    /// The thing name.
    pub name: String,
    /// The thing type; created if missing. `None` removes any type the thing has.
    pub thing_type: Option<String>,
    /// The complete attribute set (replaces what AWS holds). AWS allows at most 3 attributes on
    /// a thing without a type, 50 with one.
    pub attributes: BTreeMap<String, String>,
    /// Static thing groups the thing is added to; created if missing. The thing is not removed
    /// from groups not listed here.
    pub groups: Vec<String>,
    /// The billing group; created if missing.
    pub billing_group: Option<String>,
}

/// What [`IotApi::put_policy`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyChange {
    /// The policy did not exist and was created (version 1).
    Created,
    /// The policy existed with a different document; a new default version was created.
    NewVersion {
        /// The new default version.
        version_id: String,
        /// The oldest non-default version deleted to stay within AWS's limit of 5 versions.
        pruned: Option<String>,
    },
    /// The default version already held an equivalent document (compared as JSON values).
    Unchanged,
}

/// A thing as listed by AWS IoT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteThing {
    /// The thing name.
    pub name: String,
    /// The thing type, if any.
    pub thing_type: Option<String>,
    /// The thing's attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A device certificate as listed by AWS IoT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCertificate {
    /// The certificate id, as the service names it (AWS: the SHA-256 of the DER).
    pub id: String,
    /// The certificate ARN.
    pub arn: String,
    /// The status as AWS says it, e.g. `"ACTIVE"`; see [`CertStatus::parse`].
    pub status: String,
}

/// A failed AWS IoT call, classified by what retrying it can achieve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AwsError {
    /// Network failure, timeout, throttling, 503 — worth retrying later, however long the outage.
    #[error("{operation}: {message} (transient)")]
    Transient {
        /// The AWS operation, e.g. `"RegisterCertificate"`.
        operation: &'static str,
        /// What went wrong.
        message: String,
    },
    /// AWS answered 500/InternalFailure: retry, but a bounded number of times (moto answers 500
    /// for unimplemented calls).
    #[error("{operation}: {message} (server error)")]
    ServerError {
        /// The AWS operation.
        operation: &'static str,
        /// What AWS said.
        message: String,
    },
    /// The resource named does not exist (ResourceNotFoundException).
    #[error("{operation}: not found: {message}")]
    NotFound {
        /// The AWS operation.
        operation: &'static str,
        /// What AWS said.
        message: String,
    },
    /// Anything else AWS refused (InvalidRequest, Unauthorized, CertificateValidation,
    /// LimitExceeded, …): retrying will not help.
    #[error("{operation}: {code}: {message}")]
    Permanent {
        /// The AWS operation.
        operation: &'static str,
        /// The AWS error code (e.g. `"InvalidRequestException"`), `"HTTP nnn"` when AWS gave
        /// none, or a local code such as `"InvalidPem"` when the request was refused before
        /// being sent.
        code: String,
        /// What AWS said.
        message: String,
    },
    /// Building the client failed (bad region, endpoint URL, credentials setup), or a call found
    /// no usable credentials.
    #[error("AWS client configuration: {0}")]
    Config(String),
}

impl AwsError {
    /// `true` for [`AwsError::Transient`] and [`AwsError::ServerError`].
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AwsError::Transient { .. } | AwsError::ServerError { .. }
        )
    }

    /// The AWS operation that failed (e.g. `"RegisterCertificate"`); `"configuration"` for
    /// [`AwsError::Config`].
    pub fn operation(&self) -> &'static str {
        match self {
            AwsError::Transient { operation, .. }
            | AwsError::ServerError { operation, .. }
            | AwsError::NotFound { operation, .. }
            | AwsError::Permanent { operation, .. } => operation,
            AwsError::Config(_) => "configuration",
        }
    }
}

/// The calls fleetcert makes to AWS IoT Core. Every call is idempotent as used by the mirror:
/// "already exists" answers are success.
#[async_trait]
pub trait IotApi: Send + Sync {
    /// GetRegistrationCode.
    async fn registration_code(&self) -> Result<String, AwsError>;

    /// RegisterCACertificate (setAsActive=true, allowAutoRegistration=false). Default mode passes
    /// the verification cert; SniOnly passes certificateMode=SNI_ONLY and no verification cert.
    ///
    /// A CA that is already registered gives `Ok(created=false)` with its id and ARN (its
    /// status is left as it is: check [`IotApi::ca_status`]).
    async fn register_ca(
        &self,
        ca_pem: &str,
        verification_pem: Option<&str>,
        mode: CaMode,
    ) -> Result<Registered, AwsError>;

    /// DescribeCACertificate: `Some(status string)` or `None` if not found.
    async fn ca_status(&self, id: &str) -> Result<Option<String>, AwsError>;

    /// RegisterCertificate(certificatePem, caCertificatePem, status): the `certificateId` and
    /// `certificateArn` the service returns. AlreadyExists → `Ok(created=false)` with the id
    /// and ARN the exception names (the status is then not changed).
    async fn register_certificate(
        &self,
        pem: &str,
        ca_pem: &str,
        status: CertStatus,
    ) -> Result<Registered, AwsError>;

    /// UpdateCertificate(certificateId, newStatus).
    async fn update_certificate(&self, id: &str, status: CertStatus) -> Result<(), AwsError>;

    /// Makes the thing exist as specified: creates the thing type if given and missing,
    /// CreateThing (attributes, type, billing group), or UpdateThing if the thing exists with a
    /// different configuration; then creates each group if missing and adds the thing to it.
    async fn put_thing(&self, thing: &ThingSpec) -> Result<(), AwsError>;

    /// Makes the named policy's default version equal `document` (JSON text): CreatePolicy if
    /// missing; if the default version differs (compared as JSON values, not text) a new default
    /// version, deleting the oldest non-default version first when AWS already holds 5.
    async fn put_policy(&self, name: &str, document: &str) -> Result<PolicyChange, AwsError>;

    /// AttachPolicy(policyName, target=certificate ARN). Already attached = Ok.
    async fn attach_policy(&self, policy: &str, target_arn: &str) -> Result<(), AwsError>;

    /// AttachThingPrincipal. Already attached = Ok.
    async fn attach_thing_principal(
        &self,
        thing: &str,
        principal_arn: &str,
    ) -> Result<(), AwsError>;

    /// DetachThingPrincipal; not attached / not found = Ok.
    async fn detach_thing_principal(
        &self,
        thing: &str,
        principal_arn: &str,
    ) -> Result<(), AwsError>;

    /// ListThings, all pages.
    async fn list_things(&self) -> Result<Vec<RemoteThing>, AwsError>;

    /// ListCertificates, all pages.
    async fn list_certificates(&self) -> Result<Vec<RemoteCertificate>, AwsError>;

    /// ListThingPrincipals, all pages: principal ARNs. Thing missing → `Err(NotFound)`.
    async fn thing_principals(&self, thing: &str) -> Result<Vec<String>, AwsError>;

    /// ListAttachedPolicies(target), all pages: policy names.
    async fn attached_policies(&self, target_arn: &str) -> Result<Vec<String>, AwsError>;

    /// GetPolicy: `Some(default version's document text)` or `None` if the policy is missing.
    async fn policy_document(&self, name: &str) -> Result<Option<String>, AwsError>;

    /// GetV2LoggingOptions: the account's AWS IoT logging (never configured, answered by
    /// AWS with NotConfiguredException, is logging off).
    async fn logging_options(&self) -> Result<LoggingOptions, AwsError>;
}

/// The account's AWS IoT logging options (GetV2LoggingOptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingOptions {
    /// Whether logging options were ever set in the account.
    pub configured: bool,
    /// `disableAllLogs`, or true when never configured.
    pub disabled: bool,
    /// `defaultLogLevel` (`DEBUG`, `INFO`, `ERROR`, `WARN`, `DISABLED`), if set.
    pub default_log_level: Option<String>,
}

impl LoggingOptions {
    /// Whether AWS IoT writes logs at all: configured, not disabled, and a level other
    /// than `DISABLED`.
    pub fn enabled(&self) -> bool {
        self.configured && !self.disabled && self.default_log_level.as_deref() != Some("DISABLED")
    }
}

/// Where and how to reach AWS IoT.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    /// The AWS region, e.g. `"eu-west-1"`.
    pub region: String,
    /// Overrides the endpoint (moto, VPC endpoints), e.g. `"http://127.0.0.1:5000"`.
    pub endpoint_url: Option<String>,
    /// Time limit for a whole call; default 15 s.
    pub operation_timeout: Option<Duration>,
    /// Time limit for establishing a connection; default 3 s.
    pub connect_timeout: Option<Duration>,
}

impl ClientSettings {
    /// Default [`ClientSettings::operation_timeout`].
    pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
    /// Default [`ClientSettings::connect_timeout`].
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_status_round_trips_and_ignores_case() {
        for status in [
            CertStatus::Active,
            CertStatus::Inactive,
            CertStatus::Revoked,
        ] {
            assert_eq!(CertStatus::parse(status.as_aws_str()), Some(status));
            assert_eq!(
                CertStatus::parse(&status.as_aws_str().to_lowercase()),
                Some(status)
            );
            assert_eq!(status.to_string(), status.as_aws_str());
        }
        assert_eq!(CertStatus::parse(" Revoked "), Some(CertStatus::Revoked));
        assert_eq!(CertStatus::parse("PENDING_TRANSFER"), None);
        assert_eq!(CertStatus::parse(""), None);
    }

    #[test]
    fn retryable_and_operation() {
        let transient = AwsError::Transient {
            operation: "ListThings",
            message: "x".into(),
        };
        assert!(transient.is_retryable());
        assert_eq!(transient.operation(), "ListThings");
        let server = AwsError::ServerError {
            operation: "GetPolicy",
            message: "x".into(),
        };
        assert!(server.is_retryable());
        let not_found = AwsError::NotFound {
            operation: "UpdateCertificate",
            message: "x".into(),
        };
        assert!(!not_found.is_retryable());
        assert_eq!(not_found.operation(), "UpdateCertificate");
        let permanent = AwsError::Permanent {
            operation: "RegisterCertificate",
            code: "CertificateValidationException".into(),
            message: "bad".into(),
        };
        assert!(!permanent.is_retryable());
        assert_eq!(
            permanent.to_string(),
            "RegisterCertificate: CertificateValidationException: bad"
        );
        let config = AwsError::Config("no region".into());
        assert!(!config.is_retryable());
        assert_eq!(config.operation(), "configuration");
    }
}
