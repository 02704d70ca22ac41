//! The Device Defender audit, run over the fleet's own data: the checks of AWS IoT Device
//! Defender (the seed's names, severities and reason codes), each over the registry and
//! the CA files, offline. A task records every finding; suppressions keep a check's
//! findings for one resource out of the non-compliant counts until they expire.
//!
//! What each check reads:
//! - CA certificates: the data directory's root and issuing CA (no key needed).
//! - device certificates: the registry's `active` certificates (revoked ones for
//!   `REVOKED_DEVICE_CERT_CHECK`);
//! - policies: every stored policy, through the templates' least-privilege lint;
//! - MQTT sessions: the broker plugin's connection records (client id, connect and
//!   disconnect times, why it ended) within the task's window: the 31 days before an
//!   on-demand task, or since the previous task for a scheduled one (as AWS does);
//! - the mirrored AWS account, when the mirror is enabled: its certificates' statuses
//!   (`REVOKED_DEVICE_CERT_CHECK`: revoked here, still ACTIVE there). If AWS cannot be
//!   read, that check is FAILED.
use crate::LifecycleError;
use crate::datadir::DataDir;
use fleetcert_registry::{
    AuditFindingRecord, AuditSuppression, AuditTaskRecord, AuditedCertificate, CertStatus,
    ConnectionRecord, PolicyRecord, Registry, RevokedEntry,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An audit started by an operator (`fleetcert audit run`).
pub const ON_DEMAND: &str = "ON_DEMAND_AUDIT_TASK";
/// An audit started by `serve` on its interval.
pub const SCHEDULED: &str = "SCHEDULED_AUDIT_TASK";

/// How far back an on-demand task reads MQTT sessions (AWS: 31 days).
pub const ON_DEMAND_LOOKBACK_SECONDS: i64 = 31 * 86_400;

/// A check's severity, as AWS grades it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    /// Critical.
    Critical,
    /// High.
    High,
    /// Medium.
    Medium,
    /// Low.
    Low,
}

impl Severity {
    /// `CRITICAL`, `HIGH`, `MEDIUM`, `LOW`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "CRITICAL",
            Severity::High => "HIGH",
            Severity::Medium => "MEDIUM",
            Severity::Low => "LOW",
        }
    }
}

/// One audit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// The seed's name (`DEVICE_CERT_APPROACHING_EXPIRATION_CHECK`).
    pub name: &'static str,
    /// The name AWS's API uses where it differs (`DEVICE_CERTIFICATE_EXPIRING_CHECK`);
    /// accepted by `--checks` too.
    pub api_name: Option<&'static str>,
    /// Its severity.
    pub severity: Severity,
    /// What a non-compliant resource is, in one line.
    pub description: &'static str,
    /// `false`: it cannot apply to a certificate-only fleet; listed, compliant with no
    /// resources, and says why.
    pub applicable: bool,
}

const fn check(
    name: &'static str,
    api_name: Option<&'static str>,
    severity: Severity,
    description: &'static str,
) -> Check {
    Check {
        name,
        api_name,
        severity,
        description,
        applicable: true,
    }
}

/// `REVOKED_CA_CERT_CHECK`.
pub const REVOKED_CA_CERT: &str = "REVOKED_CA_CERT_CHECK";
/// `DEVICE_CERTIFICATE_SHARED_CHECK`.
pub const DEVICE_CERTIFICATE_SHARED: &str = "DEVICE_CERTIFICATE_SHARED_CHECK";
/// `UNAUTHENTICATED_COGNITO_ROLE_OVERLY_PERMISSIVE_CHECK`.
pub const UNAUTHENTICATED_COGNITO: &str = "UNAUTHENTICATED_COGNITO_ROLE_OVERLY_PERMISSIVE_CHECK";
/// `AUTHENTICATED_COGNITO_ROLE_OVERLY_PERMISSIVE_CHECK`.
pub const AUTHENTICATED_COGNITO: &str = "AUTHENTICATED_COGNITO_ROLE_OVERLY_PERMISSIVE_CHECK";
/// `IOT_POLICY_OVERLY_PERMISSIVE_CHECK`.
pub const IOT_POLICY_OVERLY_PERMISSIVE: &str = "IOT_POLICY_OVERLY_PERMISSIVE_CHECK";
/// `CA_CERT_APPROACHING_EXPIRATION_CHECK`.
pub const CA_CERT_APPROACHING_EXPIRATION: &str = "CA_CERT_APPROACHING_EXPIRATION_CHECK";
/// `CONFLICTING_CLIENT_IDS_CHECK`.
pub const CONFLICTING_CLIENT_IDS: &str = "CONFLICTING_CLIENT_IDS_CHECK";
/// `DEVICE_CERT_APPROACHING_EXPIRATION_CHECK`.
pub const DEVICE_CERT_APPROACHING_EXPIRATION: &str = "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK";
/// `REVOKED_DEVICE_CERT_CHECK`.
pub const REVOKED_DEVICE_CERT: &str = "REVOKED_DEVICE_CERT_CHECK";
/// `LOGGING_DISABLED_CHECK`.
pub const LOGGING_DISABLED: &str = "LOGGING_DISABLED_CHECK";
/// `DEVICE_CERT_KEY_QUALITY_CHECK`.
pub const DEVICE_CERT_KEY_QUALITY: &str = "DEVICE_CERT_KEY_QUALITY_CHECK";
/// `CA_CERT_KEY_QUALITY_CHECK`.
pub const CA_CERT_KEY_QUALITY: &str = "CA_CERT_KEY_QUALITY_CHECK";
/// `DEVICE_CERT_AGE_CHECK`.
pub const DEVICE_CERT_AGE: &str = "DEVICE_CERT_AGE_CHECK";
/// `INTERMEDIATE_CA_REVOKED_FOR_ACTIVE_DEVICE_CERTIFICATES_CHECK`.
pub const INTERMEDIATE_CA_REVOKED: &str =
    "INTERMEDIATE_CA_REVOKED_FOR_ACTIVE_DEVICE_CERTIFICATES_CHECK";

/// Every check, in the order reports list them.
pub const CHECKS: &[Check] = &[
    check(
        REVOKED_CA_CERT,
        Some("REVOKED_CA_CERTIFICATE_STILL_ACTIVE_CHECK"),
        Severity::Critical,
        "a CA certificate of the fleet is revoked but still in use",
    ),
    check(
        DEVICE_CERTIFICATE_SHARED,
        None,
        Severity::Critical,
        "one certificate used by several client ids at overlapping times",
    ),
    Check {
        applicable: false,
        ..check(
            UNAUTHENTICATED_COGNITO,
            None,
            Severity::Critical,
            "an unauthenticated Cognito identity pool role is overly permissive",
        )
    },
    Check {
        applicable: false,
        ..check(
            AUTHENTICATED_COGNITO,
            None,
            Severity::Critical,
            "an authenticated Cognito identity pool role is overly permissive",
        )
    },
    check(
        IOT_POLICY_OVERLY_PERMISSIVE,
        None,
        Severity::Critical,
        "a stored policy allows broad access to IoT data-plane actions",
    ),
    check(
        CA_CERT_APPROACHING_EXPIRATION,
        Some("CA_CERTIFICATE_EXPIRING_CHECK"),
        Severity::Medium,
        "a CA certificate expires soon or has expired",
    ),
    check(
        CONFLICTING_CLIENT_IDS,
        None,
        Severity::High,
        "several connections used the same client id, knocking each other off",
    ),
    check(
        DEVICE_CERT_APPROACHING_EXPIRATION,
        Some("DEVICE_CERTIFICATE_EXPIRING_CHECK"),
        Severity::Medium,
        "an active device certificate expires soon or has expired",
    ),
    check(
        REVOKED_DEVICE_CERT,
        Some("REVOKED_DEVICE_CERTIFICATE_STILL_ACTIVE_CHECK"),
        Severity::Medium,
        "a revoked device certificate is still used",
    ),
    check(
        LOGGING_DISABLED,
        None,
        Severity::Low,
        "the fleet's activity is not logged",
    ),
    check(
        DEVICE_CERT_KEY_QUALITY,
        Some("DEVICE_CERTIFICATE_KEY_QUALITY_CHECK"),
        Severity::Critical,
        "an active device certificate has a weak key",
    ),
    check(
        CA_CERT_KEY_QUALITY,
        Some("CA_CERTIFICATE_KEY_QUALITY_CHECK"),
        Severity::Critical,
        "a CA certificate has a weak key",
    ),
    check(
        DEVICE_CERT_AGE,
        Some("DEVICE_CERTIFICATE_AGE_CHECK"),
        Severity::Low,
        "an active device certificate is older than the age threshold",
    ),
    check(
        INTERMEDIATE_CA_REVOKED,
        None,
        Severity::Critical,
        "device certificates are active under a revoked intermediate CA",
    ),
];

/// The check called `name` (the seed's name or AWS's API name, any case).
pub fn find_check(name: &str) -> Option<&'static Check> {
    let name = name.trim().to_ascii_uppercase();
    CHECKS
        .iter()
        .find(|c| c.name == name || c.api_name == Some(name.as_str()))
}

/// The checks `names` asks for (all when empty), in [`CHECKS`] order; an unknown name is
/// refused with the list of known ones.
pub fn select_checks(names: &[String]) -> Result<Vec<&'static Check>, LifecycleError> {
    if names.is_empty() {
        return Ok(CHECKS.iter().collect());
    }
    let mut wanted = BTreeSet::new();
    for name in names {
        match find_check(name) {
            Some(check) => {
                wanted.insert(check.name);
            }
            None => {
                return Err(LifecycleError::BadInput(format!(
                    "unknown audit check {name:?}; the checks are: {}",
                    CHECKS.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    Ok(CHECKS.iter().filter(|c| wanted.contains(c.name)).collect())
}

/// The thresholds of the checks that have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// A certificate expiring within this many days is approaching expiration (AWS: 30).
    pub expiring_within_days: u32,
    /// A device certificate at least this many days old is past the age threshold (AWS:
    /// 365 by default, 30 to 3652).
    pub cert_age_days: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            expiring_within_days: 30,
            cert_age_days: 365,
        }
    }
}

/// Smallest and largest `cert_age_days` (AWS's bounds).
pub const CERT_AGE_DAYS: std::ops::RangeInclusive<u32> = 30..=3652;

/// What to run.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The checks, in [`CHECKS`] order.
    pub checks: Vec<&'static Check>,
    /// [`ON_DEMAND`] or [`SCHEDULED`].
    pub task_type: &'static str,
    /// Thresholds.
    pub settings: AuditSettings,
}

/// One check's line of the summary (AWS's `auditDetails[]` item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckDetail {
    /// The check.
    pub check_name: &'static str,
    /// `COMPLETED_COMPLIANT`, `COMPLETED_NON_COMPLIANT` or `FAILED`.
    pub check_run_status: &'static str,
    /// Resources with a finding that no suppression covers.
    pub non_compliant_resources_count: u64,
    /// Resources with a finding that a suppression covers.
    pub suppressed_non_compliant_resources_count: u64,
    /// Resources the check looked at.
    pub total_resources_count: u64,
    /// Why a check does not apply, what it could not read, or why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A finished task: what [`run`] recorded.
#[derive(Debug, Clone)]
pub struct AuditReport {
    /// The task, its summary included.
    pub task: AuditTaskRecord,
    /// Every finding, suppressed ones included.
    pub findings: Vec<AuditFindingRecord>,
    /// The summary's check lines.
    pub details: Vec<CheckDetail>,
}

impl AuditReport {
    /// Whether any check found an unsuppressed non-compliant resource, or could not run
    /// (compliance is then not shown).
    pub fn non_compliant(&self) -> bool {
        self.details.iter().any(|d| {
            d.check_run_status == "COMPLETED_NON_COMPLIANT" || d.check_run_status == "FAILED"
        })
    }
}

/// A CA certificate of the fleet.
#[derive(Debug, Clone)]
pub struct CaCertificate {
    /// `root` or `issuing`.
    pub role: &'static str,
    /// Serial, lowercase hex.
    pub serial: String,
    /// RFC 4514.
    pub subject: String,
    /// Unix seconds.
    pub not_after: i64,
    /// fleetcert's spelling (`p256`, `rsa2048`, ...).
    pub key_algorithm: String,
}

/// What the checks read, gathered once per task.
#[derive(Debug, Clone, Default)]
pub struct AuditData {
    /// The task's time (Unix seconds).
    pub now: i64,
    /// MQTT sessions that began in `[window_start, now)` are read.
    pub window_start: i64,
    /// Root first, then the issuing CA.
    pub cas: Vec<CaCertificate>,
    /// Every certificate in the registry.
    pub certificates: Vec<AuditedCertificate>,
    /// Every stored policy.
    pub policies: Vec<PolicyRecord>,
    /// The revoked set (the CRL's entries).
    pub revoked: Vec<RevokedEntry>,
    /// MQTT sessions in the window, oldest first.
    pub sessions: Vec<ConnectionRecord>,
    /// The AWS mirror is enabled.
    pub mirror_enabled: bool,
    /// The mirrored AWS account, read when the mirror is enabled.
    pub aws: Option<AwsView>,
}

/// What the audit read from the mirrored AWS account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsView {
    /// The status in AWS (`ACTIVE`, `INACTIVE`, `REVOKED`, `PENDING_TRANSFER`, ...) of
    /// each mirrored certificate, by its serial in the registry.
    pub certificate_status: HashMap<String, String>,
    /// Why the account could not be read; the checks that need it fail.
    pub error: Option<String>,
    /// The account's AWS IoT logging (GetV2LoggingOptions), read apart: `Err` says why it
    /// could not be (LOGGING_DISABLED_CHECK then fails).
    pub logging: Result<fleetcert_aws::LoggingOptions, String>,
    /// The region read.
    pub region: String,
}

/// One finding before suppressions and ids.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFinding {
    /// AWS's reason code.
    pub reason_code: &'static str,
    /// Why, in words.
    pub reason_description: String,
    /// `DEVICE_CERTIFICATE`, `CA_CERTIFICATE`, `IOT_POLICY`, `CLIENT_ID`.
    pub resource_type: &'static str,
    /// The resource.
    pub resource_id: String,
    /// What the check saw.
    pub detail: serde_json::Value,
}

/// One check's result over [`AuditData`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckResult {
    /// Resources looked at.
    pub total: u64,
    /// Non-compliant ones.
    pub findings: Vec<RawFinding>,
    /// A note for the summary.
    pub message: Option<String>,
    /// The check could not run (what it needed could not be read): `FAILED`.
    pub failed: Option<String>,
}

const DAY: i64 = 86_400;

fn weak_key(algorithm: &str) -> Option<String> {
    if let Some(bits) = algorithm.strip_prefix("rsa")
        && let Ok(bits) = bits.parse::<u32>()
        && bits < 2048
    {
        return Some(format!(
            "RSA with a {bits}-bit modulus (at least 2048 bits are required)"
        ));
    }
    if algorithm.starts_with("1.") || algorithm.starts_with("2.") {
        return Some(format!("an unrecognised key algorithm ({algorithm})"));
    }
    None
}

fn rfc3339(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at.to_string())
}

fn session_json(s: &ConnectionRecord) -> serde_json::Value {
    serde_json::json!({
        "clientId": s.client_id,
        "thingName": s.thing_name,
        "certificateFingerprint": s.fingerprint_sha256,
        "sourceAddress": s.client_addr,
        "connectedAt": rfc3339(s.at),
        "disconnectedAt": s.disconnected_at.map(rfc3339),
        "disconnectReason": s.disconnect_reason,
    })
}

/// The end of a session for overlap tests: its disconnect, or `now` if still open.
fn session_end(s: &ConnectionRecord, now: i64) -> i64 {
    s.disconnected_at.unwrap_or(now).max(s.at)
}

fn overlap(a: &ConnectionRecord, b: &ConnectionRecord, now: i64) -> bool {
    a.at < session_end(b, now) && b.at < session_end(a, now)
}

fn active_devices(data: &AuditData) -> impl Iterator<Item = &AuditedCertificate> {
    data.certificates
        .iter()
        .filter(|c| c.status == CertStatus::Active)
}

fn revoked_ca(data: &AuditData) -> Vec<&CaCertificate> {
    let revoked: BTreeSet<&str> = data.revoked.iter().map(|r| r.serial.as_str()).collect();
    data.cas
        .iter()
        .filter(|ca| revoked.contains(ca.serial.as_str()))
        .collect()
}

fn expiration(
    not_after: i64,
    now: i64,
    within_days: u32,
    what: &str,
) -> Option<(&'static str, String, serde_json::Value)> {
    let detail = serde_json::json!({
        "notAfter": rfc3339(not_after),
        "daysLeft": (not_after - now).div_euclid(DAY),
    });
    if not_after <= now {
        Some((
            "CERTIFICATE_PAST_EXPIRATION",
            format!("{what} expired on {}", rfc3339(not_after)),
            detail,
        ))
    } else if not_after <= now + i64::from(within_days) * DAY {
        Some((
            "CERTIFICATE_APPROACHING_EXPIRATION",
            format!(
                "{what} expires on {} (within {within_days} days)",
                rfc3339(not_after)
            ),
            detail,
        ))
    } else {
        None
    }
}

/// Runs one check over `data` (pure: no I/O).
pub fn evaluate(check: &Check, data: &AuditData, settings: &AuditSettings) -> CheckResult {
    let now = data.now;
    let mut result = CheckResult::default();
    let finding =
        |reason_code, reason_description, resource_type, resource_id, detail| RawFinding {
            reason_code,
            reason_description,
            resource_type,
            resource_id,
            detail,
        };
    match check.name {
        REVOKED_CA_CERT => {
            result.total = data.cas.len() as u64;
            for ca in revoked_ca(data) {
                result.findings.push(finding(
                    "CERTIFICATE_REVOKED_BY_ISSUER",
                    format!(
                        "the {} CA {} is on the fleet's revoked list",
                        ca.role, ca.subject
                    ),
                    "CA_CERTIFICATE",
                    ca.serial.clone(),
                    serde_json::json!({ "role": ca.role, "subject": ca.subject }),
                ));
            }
            if data.mirror_enabled {
                result.message = Some(
                    "checked against the fleet's revoked set; CA registrations in the mirrored AWS account are not read by this version".into(),
                );
            }
        }
        INTERMEDIATE_CA_REVOKED => {
            let revoked: Vec<&CaCertificate> = revoked_ca(data)
                .into_iter()
                .filter(|ca| ca.role == "issuing")
                .collect();
            let active: Vec<&AuditedCertificate> = active_devices(data).collect();
            result.total = active.len() as u64;
            if let Some(ca) = revoked.first() {
                for cert in active {
                    result.findings.push(finding(
                        "INTERMEDIATE_CA_REVOKED_BY_ISSUER",
                        format!("issued by the revoked intermediate CA {}", ca.subject),
                        "DEVICE_CERTIFICATE",
                        cert.serial.clone(),
                        serde_json::json!({ "thingName": cert.thing_name, "caSerial": ca.serial }),
                    ));
                }
            }
        }
        DEVICE_CERTIFICATE_SHARED => {
            let serial_of: HashMap<&str, &str> = data
                .certificates
                .iter()
                .map(|c| (c.fingerprint_sha256.as_str(), c.serial.as_str()))
                .collect();
            let mut by_certificate: BTreeMap<&str, Vec<&ConnectionRecord>> = BTreeMap::new();
            for s in &data.sessions {
                by_certificate
                    .entry(s.fingerprint_sha256.as_str())
                    .or_default()
                    .push(s);
            }
            result.total = by_certificate.len() as u64;
            for (fingerprint, sessions) in by_certificate {
                let mut shared: Vec<&ConnectionRecord> = Vec::new();
                for (i, a) in sessions.iter().enumerate() {
                    for b in &sessions[i + 1..] {
                        if a.client_id != b.client_id && overlap(a, b, now) {
                            for s in [*a, *b] {
                                if !shared.iter().any(|x| std::ptr::eq(*x, s)) {
                                    shared.push(s);
                                }
                            }
                        }
                    }
                }
                if shared.is_empty() {
                    continue;
                }
                shared.sort_by_key(|s| std::cmp::Reverse(s.at));
                let client_ids: BTreeSet<&str> = shared
                    .iter()
                    .filter_map(|s| s.client_id.as_deref())
                    .collect();
                result.findings.push(finding(
                    "CERTIFICATE_SHARED_BY_MULTIPLE_DEVICES",
                    format!(
                        "one certificate connected as {} client ids at overlapping times",
                        client_ids.len()
                    ),
                    "DEVICE_CERTIFICATE",
                    serial_of
                        .get(fingerprint)
                        .map_or_else(|| fingerprint.to_owned(), |s| (*s).to_owned()),
                    serde_json::json!({
                        "certificateFingerprint": fingerprint,
                        "clientIds": client_ids,
                        "connections": shared.iter().map(|s| session_json(s)).collect::<Vec<_>>(),
                    }),
                ));
            }
        }
        CONFLICTING_CLIENT_IDS => {
            let mut by_client: BTreeMap<&str, Vec<&ConnectionRecord>> = BTreeMap::new();
            for s in &data.sessions {
                if let Some(id) = s.client_id.as_deref() {
                    by_client.entry(id).or_default().push(s);
                }
            }
            result.total = by_client.len() as u64;
            for (client_id, sessions) in by_client {
                let mut conflicting: Vec<&ConnectionRecord> = sessions
                    .iter()
                    .copied()
                    .filter(|s| s.disconnect_reason.as_deref() == Some("duplicate_client_id"))
                    .collect();
                for (i, a) in sessions.iter().enumerate() {
                    for b in &sessions[i + 1..] {
                        if a.fingerprint_sha256 != b.fingerprint_sha256 && overlap(a, b, now) {
                            for s in [*a, *b] {
                                if !conflicting.iter().any(|x| std::ptr::eq(*x, s)) {
                                    conflicting.push(s);
                                }
                            }
                        }
                    }
                }
                if conflicting.is_empty() {
                    continue;
                }
                conflicting.sort_by_key(|s| std::cmp::Reverse(s.at));
                let knocked_off = conflicting
                    .iter()
                    .filter(|s| s.disconnect_reason.as_deref() == Some("duplicate_client_id"))
                    .count();
                result.findings.push(finding(
                    "DUPLICATE_CLIENT_ID_ACROSS_CONNECTIONS",
                    format!(
                        "client id used by overlapping connections; {knocked_off} knocked off by another connection with it"
                    ),
                    "CLIENT_ID",
                    client_id.to_owned(),
                    serde_json::json!({
                        "principals": conflicting
                            .iter()
                            .map(|s| s.fingerprint_sha256.as_str())
                            .collect::<BTreeSet<_>>(),
                        "connections": conflicting.iter().map(|s| session_json(s)).collect::<Vec<_>>(),
                    }),
                ));
            }
        }
        IOT_POLICY_OVERLY_PERMISSIVE => {
            result.total = data.policies.len() as u64;
            for policy in &data.policies {
                let lint = fleetcert_templates::lint_policy(&policy.document);
                if lint.is_empty() {
                    continue;
                }
                result.findings.push(finding(
                    fleetcert_templates::REASON_BROAD_DATA_PLANE,
                    lint.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                    "IOT_POLICY",
                    policy.name.clone(),
                    serde_json::json!({ "statements": lint }),
                ));
            }
        }
        CA_CERT_APPROACHING_EXPIRATION => {
            result.total = data.cas.len() as u64;
            for ca in &data.cas {
                let what = format!("the {} CA {}", ca.role, ca.subject);
                if let Some((code, text, detail)) =
                    expiration(ca.not_after, now, settings.expiring_within_days, &what)
                {
                    result.findings.push(finding(
                        code,
                        text,
                        "CA_CERTIFICATE",
                        ca.serial.clone(),
                        detail,
                    ));
                }
            }
        }
        DEVICE_CERT_APPROACHING_EXPIRATION => {
            for cert in active_devices(data) {
                result.total += 1;
                let what = format!("{}'s certificate", cert.thing_name);
                if let Some((code, text, mut detail)) =
                    expiration(cert.not_after, now, settings.expiring_within_days, &what)
                {
                    detail["thingName"] = cert.thing_name.clone().into();
                    result.findings.push(finding(
                        code,
                        text,
                        "DEVICE_CERTIFICATE",
                        cert.serial.clone(),
                        detail,
                    ));
                }
            }
        }
        REVOKED_DEVICE_CERT => {
            let cert_of: HashMap<&str, &AuditedCertificate> = data
                .certificates
                .iter()
                .map(|c| (c.serial.as_str(), c))
                .collect();
            let mut sessions_of: HashMap<&str, Vec<&ConnectionRecord>> = HashMap::new();
            for s in &data.sessions {
                sessions_of
                    .entry(s.fingerprint_sha256.as_str())
                    .or_default()
                    .push(s);
            }
            let aws = data.aws.as_ref().filter(|a| a.error.is_none());
            for entry in &data.revoked {
                let Some(cert) = cert_of.get(entry.serial.as_str()) else {
                    // A claim or an unregistered provisional certificate: not a device's.
                    continue;
                };
                result.total += 1;
                let after: Vec<&ConnectionRecord> = sessions_of
                    .get(cert.fingerprint_sha256.as_str())
                    .map(|v| {
                        v.iter()
                            .copied()
                            .filter(|s| s.at > entry.revoked_at)
                            .collect()
                    })
                    .unwrap_or_default();
                let aws_status = aws
                    .and_then(|a| a.certificate_status.get(&entry.serial))
                    .filter(|status| matches!(status.as_str(), "ACTIVE" | "PENDING_TRANSFER"));
                if after.is_empty() && aws_status.is_none() {
                    continue;
                }
                let mut why = Vec::new();
                if !after.is_empty() {
                    why.push(format!("connected {} time(s) since", after.len()));
                }
                if let Some(status) = aws_status {
                    why.push(format!("still {status} in the mirrored AWS account"));
                }
                result.findings.push(finding(
                    "CERTIFICATE_REVOKED_BY_ISSUER",
                    format!(
                        "revoked on {}, but {}",
                        rfc3339(entry.revoked_at),
                        why.join(" and ")
                    ),
                    "DEVICE_CERTIFICATE",
                    entry.serial.clone(),
                    serde_json::json!({
                        "thingName": cert.thing_name,
                        "revokedAt": rfc3339(entry.revoked_at),
                        "awsStatus": aws_status,
                        "connections": after.iter().map(|s| session_json(s)).collect::<Vec<_>>(),
                    }),
                ));
            }
            match &data.aws {
                Some(AwsView { error: Some(e), .. }) => {
                    result.failed =
                        Some(format!("the mirrored AWS account could not be read: {e}"));
                }
                Some(view) => {
                    result.message = Some(format!(
                        "checked against connections seen by fleetcert and the mirrored AWS account ({} certificates there)",
                        view.certificate_status.len()
                    ));
                }
                None => {}
            }
        }
        LOGGING_DISABLED => {
            result.total = 1;
            match &data.aws {
                None => {
                    result.message = Some(
                        "the registry's event log is always on (every issuance, registration, revocation and audit is an event)".into(),
                    );
                }
                Some(AwsView {
                    logging: Err(e), ..
                }) => {
                    result.failed = Some(format!(
                        "the mirrored AWS account's logging options could not be read: {e}"
                    ));
                }
                Some(AwsView {
                    logging: Ok(options),
                    region,
                    ..
                }) => {
                    result.message = Some(
                        "the registry's event log is always on; the mirrored AWS account's logging options were read (GetV2LoggingOptions)".into(),
                    );
                    if !options.enabled() {
                        result.findings.push(finding(
                            "LOGGING_DISABLED",
                            if options.configured {
                                format!(
                                    "AWS IoT logging is off in {region} (disableAllLogs {}, defaultLogLevel {})",
                                    options.disabled,
                                    options.default_log_level.as_deref().unwrap_or("unset")
                                )
                            } else {
                                format!("AWS IoT logging was never configured in {region}")
                            },
                            "ACCOUNT_SETTINGS",
                            region.clone(),
                            serde_json::json!({
                                "configured": options.configured,
                                "disableAllLogs": options.disabled,
                                "defaultLogLevel": options.default_log_level,
                            }),
                        ));
                    }
                }
            }
        }
        UNAUTHENTICATED_COGNITO | AUTHENTICATED_COGNITO => {
            result.message = Some(
                "not applicable: fleetcert authenticates devices by certificate only and makes no Cognito identities".into(),
            );
        }
        DEVICE_CERT_KEY_QUALITY => {
            for cert in active_devices(data) {
                result.total += 1;
                if let Some(why) = weak_key(&cert.key_algorithm) {
                    result.findings.push(finding(
                        "CERTIFICATE_KEY_WEAK",
                        format!("{}'s certificate has {why}", cert.thing_name),
                        "DEVICE_CERTIFICATE",
                        cert.serial.clone(),
                        serde_json::json!({ "thingName": cert.thing_name, "keyAlgorithm": cert.key_algorithm }),
                    ));
                }
            }
        }
        CA_CERT_KEY_QUALITY => {
            result.total = data.cas.len() as u64;
            for ca in &data.cas {
                if let Some(why) = weak_key(&ca.key_algorithm) {
                    result.findings.push(finding(
                        "CERTIFICATE_KEY_WEAK",
                        format!("the {} CA has {why}", ca.role),
                        "CA_CERTIFICATE",
                        ca.serial.clone(),
                        serde_json::json!({ "role": ca.role, "keyAlgorithm": ca.key_algorithm }),
                    ));
                }
            }
        }
        DEVICE_CERT_AGE => {
            for cert in active_devices(data) {
                result.total += 1;
                let age_days = (now - cert.not_before).div_euclid(DAY);
                if age_days >= i64::from(settings.cert_age_days) {
                    result.findings.push(finding(
                        "CERTIFICATE_PAST_AGE_THRESHOLD",
                        format!(
                            "{}'s certificate has been valid for {age_days} days (threshold {})",
                            cert.thing_name, settings.cert_age_days
                        ),
                        "DEVICE_CERTIFICATE",
                        cert.serial.clone(),
                        serde_json::json!({ "thingName": cert.thing_name, "ageDays": age_days, "notBefore": rfc3339(cert.not_before) }),
                    ));
                }
            }
        }
        _ => {}
    }
    result
}

fn random_hex(bytes: usize) -> Result<String, LifecycleError> {
    crate::random_hex(bytes)
        .ok_or_else(|| LifecycleError::write("the registry", "the system random generator failed"))
}

/// Reads the CA certificates of the data directory (root, then issuing).
fn ca_certificates(data_dir: &DataDir) -> Result<Vec<CaCertificate>, LifecycleError> {
    let mut cas = Vec::new();
    let root = data_dir.root_cert_pem()?;
    let chain = data_dir.chain_pem()?;
    let root_summary = fleetcert_ca::describe_certificate(root.as_bytes())?;
    let mut push = |role, summary: fleetcert_ca::CertificateSummary| {
        cas.push(CaCertificate {
            role,
            serial: summary.serial_hex,
            subject: summary.subject,
            not_after: summary.not_after.unix_timestamp(),
            key_algorithm: summary.key_algorithm,
        });
    };
    let root_serial = root_summary.serial_hex.clone();
    push("root", root_summary);
    for block in pem::parse_many(chain.as_bytes()).map_err(|e| LifecycleError::BadFile {
        path: data_dir.root().join("ca"),
        reason: format!("the CA chain does not parse: {e}"),
    })? {
        let summary = fleetcert_ca::describe_certificate(block.contents())?;
        if summary.serial_hex != root_serial {
            push("issuing", summary);
        }
    }
    Ok(cas)
}

/// Reads what the checks need at `now` for a task of `task_type`.
pub async fn gather(
    data_dir: &DataDir,
    registry: &dyn Registry,
    task_type: &str,
    now: i64,
) -> Result<AuditData, LifecycleError> {
    let window_start = if task_type == SCHEDULED {
        // Since the previous task (of either kind), at most 31 days back.
        registry
            .audit_tasks(1)
            .await?
            .first()
            .map_or(now - ON_DEMAND_LOOKBACK_SECONDS, |t| {
                t.started_at.max(now - ON_DEMAND_LOOKBACK_SECONDS)
            })
    } else {
        now - ON_DEMAND_LOOKBACK_SECONDS
    };
    let mirror = registry.mirror_settings().await?.filter(|m| m.enabled);
    let certificates = registry.audited_certificates().await?;
    let sessions = registry.mqtt_sessions(window_start, now + 1).await?;
    Ok(AuditData {
        now,
        window_start,
        cas: ca_certificates(data_dir)?,
        certificates,
        policies: registry.list_policies().await?,
        revoked: registry.revoked_entries(now).await?,
        sessions,
        mirror_enabled: mirror.is_some(),
        aws: match mirror {
            Some(settings) => Some(read_aws(registry, &settings).await?),
            None => None,
        },
    })
}

/// The mirrored certificates' statuses in AWS; an AWS failure is kept in the view (the
/// checks that need it fail), a registry failure is an error.
async fn read_aws(
    registry: &dyn Registry,
    settings: &fleetcert_registry::MirrorSettings,
) -> Result<AwsView, LifecycleError> {
    let mirrored = registry.mirrored_certificates().await?;
    let api = crate::mirror::connect(&settings.region, settings.endpoint_url.as_deref()).await;
    let (listed, logging) = match &api {
        Ok(api) => (
            api.list_certificates()
                .await
                .map_err(|e| LifecycleError::from(e).to_string()),
            api.logging_options()
                .await
                .map_err(|e| LifecycleError::from(e).to_string()),
        ),
        Err(e) => (Err(e.to_string()), Err(e.to_string())),
    };
    let region = settings.region.clone();
    Ok(match listed {
        Ok(remote) => {
            let status_of: HashMap<&str, &str> = remote
                .iter()
                .map(|c| (c.id.as_str(), c.status.as_str()))
                .collect();
            AwsView {
                certificate_status: mirrored
                    .iter()
                    .filter_map(|m| {
                        status_of
                            .get(m.certificate_id.as_str())
                            .map(|status| (m.serial.clone(), (*status).to_owned()))
                    })
                    .collect(),
                error: None,
                logging,
                region,
            }
        }
        Err(e) => AwsView {
            certificate_status: HashMap::new(),
            error: Some(e),
            logging,
            region,
        },
    })
}

/// A finding's id: 32 hex digits, the task's time first, then half of the task's random
/// id and the finding's position. Unique, and increasing with time, so that recording a
/// task's thousands of findings appends to the findings table's key instead of
/// scattering across it (measured: 5,500 findings into a table of 50,000 in 47 ms
/// instead of 316 ms on SQLite).
fn finding_id(now: i64, task_id: &str, position: usize) -> String {
    let seconds = u32::try_from(now.max(0)).unwrap_or(u32::MAX);
    let task = task_id.get(..16).unwrap_or(task_id);
    format!("{seconds:08x}{task}{position:08x}")
}

/// Runs `options.checks` over `data`, applies `suppressions`, and builds the task (not
/// recorded: see [`run`]).
pub fn assess(
    data: &AuditData,
    options: &AuditOptions,
    suppressions: &[AuditSuppression],
) -> Result<AuditReport, LifecycleError> {
    let now = data.now;
    let task_id = random_hex(16)?;
    let active: BTreeSet<(&str, &str)> = suppressions
        .iter()
        .filter(|s| s.expires_at.is_none_or(|at| at > now))
        .map(|s| (s.check_name.as_str(), s.resource_id.as_str()))
        .collect();
    let mut findings = Vec::new();
    let mut details = Vec::new();
    for check in &options.checks {
        let result = evaluate(check, data, &options.settings);
        let mut open = BTreeSet::new();
        let mut suppressed = BTreeSet::new();
        for f in result.findings {
            let is_suppressed = active.contains(&(check.name, f.resource_id.as_str()));
            if is_suppressed {
                suppressed.insert(f.resource_id.clone());
            } else {
                open.insert(f.resource_id.clone());
            }
            findings.push(AuditFindingRecord {
                finding_id: finding_id(now, &task_id, findings.len()),
                task_id: task_id.clone(),
                check_name: check.name.to_owned(),
                severity: check.severity.as_str().to_owned(),
                reason_code: f.reason_code.to_owned(),
                reason_description: f.reason_description,
                resource_type: f.resource_type.to_owned(),
                resource_id: f.resource_id,
                detail: f.detail,
                suppressed: is_suppressed,
                found_at: now,
            });
        }
        details.push(CheckDetail {
            check_name: check.name,
            check_run_status: if result.failed.is_some() {
                "FAILED"
            } else if open.is_empty() {
                "COMPLETED_COMPLIANT"
            } else {
                "COMPLETED_NON_COMPLIANT"
            },
            non_compliant_resources_count: open.len() as u64,
            suppressed_non_compliant_resources_count: suppressed.len() as u64,
            total_resources_count: result.total,
            message: result
                .failed
                .or(result.message)
                .or_else(|| (!check.applicable).then(|| "not applicable to this fleet".to_owned())),
        });
    }
    let non_compliant = details
        .iter()
        .filter(|d| d.check_run_status == "COMPLETED_NON_COMPLIANT")
        .count();
    let failed = details
        .iter()
        .filter(|d| d.check_run_status == "FAILED")
        .count();
    let summary = serde_json::json!({
        "taskId": task_id,
        "taskStatus": "COMPLETED",
        "taskType": options.task_type,
        "taskStartTime": now * 1000,
        "failedChecksCount": failed,
        "canceledChecksCount": 0,
        "nonCompliantChecksCount": non_compliant,
        "compliantChecksCount": details.len() - non_compliant - failed,
        "totalChecksCount": details.len(),
        "auditDetails": details,
    });
    Ok(AuditReport {
        task: AuditTaskRecord {
            task_id,
            task_type: options.task_type.to_owned(),
            task_status: "COMPLETED".to_owned(),
            started_at: now,
            finished_at: now,
            summary,
        },
        findings,
        details,
    })
}

/// How long a notification webhook may take to answer.
pub const WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Checks a notification webhook URL (plain `http://`: the request carries no secret,
/// only the summary; put a local relay in front of anything farther).
pub fn check_webhook_url(url: &str) -> Result<(), LifecycleError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        LifecycleError::BadInput(format!(
            "audit webhook {url:?}: only http:// URLs are supported"
        ))
    })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(LifecycleError::BadInput(format!(
            "audit webhook {url:?}: no host"
        )));
    }
    Ok(())
}

/// POSTs a task's summary (the notification JSON) to `url`; a non-2xx answer is an error.
/// Blocking: call it off the async runtime's threads.
pub fn notify(url: &str, summary: &serde_json::Value) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let body = serde_json::to_vec(summary).map_err(|e| e.to_string())?;
    let response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(&body[..])
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("{url} answered HTTP {status}"))
    }
}

/// When the next scheduled task is due: `interval` after the newest task of either kind,
/// or `now` if there is none (or it is overdue).
pub async fn next_scheduled(
    registry: &dyn Registry,
    interval: std::time::Duration,
    now: i64,
) -> Result<i64, LifecycleError> {
    let interval = i64::try_from(interval.as_secs()).unwrap_or(i64::MAX);
    Ok(match registry.audit_tasks(1).await?.first() {
        Some(last) => last.started_at.saturating_add(interval).max(now),
        None => now,
    })
}

/// One mitigation action on one finding's resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mitigation {
    /// The finding acted on.
    pub finding_id: String,
    /// Its check.
    pub check_name: String,
    /// The resource (a device certificate's serial).
    pub resource_identifier: String,
    /// AWS's action type (`UPDATE_DEVICE_CERTIFICATE`).
    pub action_type: &'static str,
    /// `applied`, `would_apply` (dry run), `already_done` or `skipped`.
    pub status: &'static str,
    /// What happened, in words.
    pub message: String,
}

/// Which findings a mitigation acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MitigationTarget {
    /// The task whose findings are acted on.
    pub task_id: String,
    /// Only this check's findings.
    pub check_name: Option<String>,
    /// Only this resource's.
    pub resource_id: Option<String>,
}

/// Most findings one mitigation call acts on.
pub const MAX_MITIGATED_FINDINGS: u32 = 100_000;

/// The policy `ADD_THINGS_TO_THING_GROUP` attaches to a thing group that has none, so that
/// the group quarantines: its things' devices may still connect (their sessions stay
/// visible in the connection records), but neither publish, subscribe nor receive. An
/// explicit Deny wins over every Allow of their own policies.
pub const QUARANTINE_POLICY_NAME: &str = "fleetcert-quarantine";

/// The document of [`QUARANTINE_POLICY_NAME`].
pub fn quarantine_policy() -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Deny",
            "Action": ["iot:Publish", "iot:Subscribe", "iot:Receive", "iot:RetainPublish"],
            "Resource": "*"
        }]
    })
}

/// What a mitigation does to each finding's device certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MitigationAction {
    /// AWS's UPDATE_DEVICE_CERTIFICATE, as fleetcert does it: revoke it (an event each;
    /// the CRL follows).
    Revoke(fleetcert_ca::RevocationReason),
    /// Open a rotation for it now, whatever its renewal point (`rotation.due` events):
    /// the rotation worker issues the replacement and revokes it once the device uses
    /// the new one.
    Rotate,
    /// AWS's ADD_THINGS_TO_THING_GROUP: add the certificate's thing to this group (a
    /// group with no policy gets [`QUARANTINE_POLICY_NAME`] first). Policies attached to
    /// the group apply to the thing's certificates from their next CONNECT; the broker
    /// drops live sessions granted before (within its session poll, ~2 s).
    AddToThingGroup(String),
    /// AWS's REPLACE_DEFAULT_POLICY_VERSION with its BLANK_POLICY template, on each
    /// overly permissive policy's finding: the policy's new default version is
    /// [`blank_policy`] (earlier versions kept, so the template still registers devices);
    /// devices holding it keep only `iot:Connect` as their own thing, from their next
    /// CONNECT (the broker drops live sessions within seconds).
    ReplaceDefaultPolicyVersion,
}

/// The template name of [`blank_policy`], as AWS names the mitigation's only template.
pub const BLANK_POLICY: &str = "BLANK_POLICY";

/// The version REPLACE_DEFAULT_POLICY_VERSION installs: it grants nothing but
/// `iot:Connect` for the certificate's own attached thing (a policy needs a statement;
/// this one keeps the device reachable by its identity and allows no data-plane action).
pub fn blank_policy() -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": "iot:Connect",
            "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}",
            "Condition": { "Bool": { "iot:Connection.Thing.IsAttached": "true" } }
        }]
    })
}

impl MitigationAction {
    /// The action type in reports.
    pub fn action_type(&self) -> &'static str {
        match self {
            MitigationAction::Revoke(_) => "UPDATE_DEVICE_CERTIFICATE",
            MitigationAction::Rotate => "ROTATE_DEVICE_CERTIFICATE",
            MitigationAction::AddToThingGroup(_) => "ADD_THINGS_TO_THING_GROUP",
            MitigationAction::ReplaceDefaultPolicyVersion => "REPLACE_DEFAULT_POLICY_VERSION",
        }
    }
}

/// Applies `action` to the device certificate of each unsuppressed `DEVICE_CERTIFICATE`
/// finding of the target (once per certificate). With `dry_run`, says what it would do
/// and changes nothing. An unknown task is an error.
pub async fn mitigate(
    registry: &dyn Registry,
    target: &MitigationTarget,
    action: MitigationAction,
    dry_run: bool,
    now: i64,
) -> Result<Vec<Mitigation>, LifecycleError> {
    let found = registry
        .audit_findings(&fleetcert_registry::AuditFindingFilter {
            task_id: Some(target.task_id.clone()),
            check_name: target.check_name.clone(),
            resource_id: target.resource_id.clone(),
            limit: MAX_MITIGATED_FINDINGS,
        })
        .await?;
    if found.is_empty() && registry.audit_task(&target.task_id).await?.is_none() {
        return Err(LifecycleError::BadInput(format!(
            "no audit task {:?} (`fleetcert audit tasks` lists them)",
            target.task_id
        )));
    }
    let mut chosen = BTreeSet::new();
    let mut actions = Vec::new();
    // What the action acts on: a policy's findings, or a device certificate's.
    let (resource_type, resource_words) = match action {
        MitigationAction::ReplaceDefaultPolicyVersion => ("IOT_POLICY", "a policy"),
        _ => ("DEVICE_CERTIFICATE", "a device certificate"),
    };
    for f in found {
        let mut entry = Mitigation {
            finding_id: f.finding_id.clone(),
            check_name: f.check_name.clone(),
            resource_identifier: f.resource_id.clone(),
            action_type: action.action_type(),
            status: "skipped",
            message: String::new(),
        };
        if f.resource_type != resource_type {
            entry.message = format!("a {} is not {resource_words}", f.resource_type);
        } else if f.suppressed {
            entry.message = "the finding is suppressed".into();
        } else if !chosen.insert(f.resource_id.clone()) {
            entry.status = "already_done";
            entry.message = "handled for another finding of this call".into();
        } else {
            entry.status = "chosen";
        }
        actions.push(entry);
    }
    let chosen: Vec<&mut Mitigation> = actions
        .iter_mut()
        .filter(|a| a.status == "chosen")
        .collect();
    match &action {
        MitigationAction::ReplaceDefaultPolicyVersion => {
            replace_policy_versions(registry, chosen, dry_run, now).await?
        }
        MitigationAction::AddToThingGroup(group) => {
            add_to_thing_group(registry, group, chosen, dry_run, now).await?
        }
        MitigationAction::Revoke(reason) => {
            revoke_certificates(registry, *reason, chosen, dry_run, now).await?
        }
        MitigationAction::Rotate => rotate_certificates(registry, chosen, dry_run, now).await?,
    }
    Ok(actions)
}

/// REPLACE_DEFAULT_POLICY_VERSION on each chosen policy.
async fn replace_policy_versions(
    registry: &dyn Registry,
    chosen: Vec<&mut Mitigation>,
    dry_run: bool,
    now: i64,
) -> Result<(), LifecycleError> {
    for entry in chosen {
        let policy = entry.resource_identifier.clone();
        let (status, message) = if dry_run {
            (
                "would_apply",
                format!("would make {BLANK_POLICY} the default version of policy {policy}"),
            )
        } else {
            match registry
                .replace_default_policy_version(&policy, &blank_policy(), now)
                .await
            {
                Ok(Some(version)) => (
                    "applied",
                    format!(
                        "policy {policy}'s default version is now {version}, the \
                         {BLANK_POLICY} (earlier versions kept)"
                    ),
                ),
                Ok(None) => (
                    "already_done",
                    format!("policy {policy}'s default version is {BLANK_POLICY} already"),
                ),
                Err(fleetcert_registry::RegistryError::NotFound(_)) => {
                    ("skipped", format!("policy {policy} is not in the registry"))
                }
                Err(e) => return Err(e.into()),
            }
        };
        entry.status = status;
        entry.message = message;
    }
    Ok(())
}

/// ADD_THINGS_TO_THING_GROUP: each chosen certificate's thing joins `group` (unknown
/// certificates are skipped; a thing reached through several certificates is added and
/// reported applied once).
async fn add_to_thing_group(
    registry: &dyn Registry,
    group: &str,
    chosen: Vec<&mut Mitigation>,
    dry_run: bool,
    now: i64,
) -> Result<(), LifecycleError> {
    check_group_name(group)?;
    let mut thing_of = std::collections::BTreeMap::new();
    for entry in &chosen {
        let serial = &entry.resource_identifier;
        if let Some(cert) = registry.get_certificate(serial).await? {
            thing_of.insert(serial.clone(), cert.thing_name);
        }
    }
    let mut group_note = String::new();
    let added: BTreeSet<String> = if dry_run {
        BTreeSet::new()
    } else {
        if registry.group_policies(group).await?.is_empty() {
            registry
                .attach_group_policy(group, QUARANTINE_POLICY_NAME, &quarantine_policy(), now)
                .await?;
            group_note = format!(
                "; the group had no policy, so {QUARANTINE_POLICY_NAME} (deny publish, \
                 subscribe, receive) was attached to it"
            );
        }
        let things: BTreeSet<String> = thing_of.values().cloned().collect();
        let things: Vec<String> = things.into_iter().collect();
        registry
            .add_things_to_group(group, &things, now)
            .await?
            .into_iter()
            .collect()
    };
    let mut reported = BTreeSet::new();
    for entry in chosen {
        let serial = &entry.resource_identifier;
        let (status, message) = match thing_of.get(serial) {
            None => (
                "skipped",
                format!("certificate {serial} is not in the registry"),
            ),
            Some(thing) if dry_run => (
                "would_apply",
                format!("would add thing {thing} to thing group {group}"),
            ),
            Some(thing) if added.contains(thing) && reported.insert(thing) => (
                "applied",
                format!("added thing {thing} to thing group {group}{group_note}"),
            ),
            Some(thing) => (
                "already_done",
                format!("thing {thing} is in thing group {group} already"),
            ),
        };
        entry.status = status;
        entry.message = message;
    }
    Ok(())
}

/// UPDATE_DEVICE_CERTIFICATE as fleetcert does it: each chosen certificate revoked.
async fn revoke_certificates(
    registry: &dyn Registry,
    reason: fleetcert_ca::RevocationReason,
    chosen: Vec<&mut Mitigation>,
    dry_run: bool,
    now: i64,
) -> Result<(), LifecycleError> {
    for entry in chosen {
        let serial = entry.resource_identifier.clone();
        let (status, message) = if dry_run {
            (
                "would_apply",
                format!("would revoke certificate {serial} ({})", reason.as_str()),
            )
        } else if crate::revocation::revoke(
            registry,
            fleetcert_registry::RevocationTarget::Serial(serial.clone()),
            reason,
            now,
        )
        .await?
        .is_empty()
        {
            (
                "already_done",
                format!("certificate {serial} was revoked already"),
            )
        } else {
            (
                "applied",
                format!("revoked certificate {serial} ({})", reason.as_str()),
            )
        };
        entry.status = status;
        entry.message = message;
    }
    Ok(())
}

/// A rotation opened now for each chosen certificate, whatever its renewal point.
async fn rotate_certificates(
    registry: &dyn Registry,
    chosen: Vec<&mut Mitigation>,
    dry_run: bool,
    now: i64,
) -> Result<(), LifecycleError> {
    let serials: Vec<String> = chosen
        .iter()
        .map(|e| e.resource_identifier.clone())
        .collect();
    let opened: BTreeSet<String> = if dry_run {
        BTreeSet::new()
    } else {
        registry
            .open_rotations_for(&serials, now)
            .await?
            .into_iter()
            .collect()
    };
    for entry in chosen {
        let serial = &entry.resource_identifier;
        let (status, message) = if dry_run {
            (
                "would_apply",
                format!("would open a rotation of certificate {serial}"),
            )
        } else if opened.contains(serial) {
            (
                "applied",
                format!(
                    "opened a rotation of certificate {serial}; the rotation worker replaces it"
                ),
            )
        } else {
            (
                "already_done",
                format!(
                    "certificate {serial} is rotating already, or is not active and handed over"
                ),
            )
        };
        entry.status = status;
        entry.message = message;
    }
    Ok(())
}

/// A thing group name as AWS allows it: 1 to 128 of `[a-zA-Z0-9:_-]`.
pub fn check_group_name(name: &str) -> Result<(), LifecycleError> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LifecycleError::BadInput(format!(
            "thing group name {name:?}: 1 to 128 letters, digits, ':', '_' or '-'"
        )))
    }
}

/// Runs an audit task at `now` and records it with its findings.
pub async fn run(
    data_dir: &DataDir,
    registry: &dyn Registry,
    options: &AuditOptions,
    now: i64,
) -> Result<AuditReport, LifecycleError> {
    let started = std::time::Instant::now();
    let data = gather(data_dir, registry, options.task_type, now).await?;
    let gathered = started.elapsed();
    let suppressions = registry.audit_suppressions().await?;
    let mut report = assess(&data, options, &suppressions)?;
    let assessed = started.elapsed();
    let finished = now.max(data.now);
    report.task.finished_at = finished;
    registry
        .record_audit(&report.task, &report.findings)
        .await?;
    tracing::debug!(
        certificates = data.certificates.len(),
        sessions = data.sessions.len(),
        findings = report.findings.len(),
        gather_ms = gathered.as_millis() as u64,
        assess_ms = (assessed - gathered).as_millis() as u64,
        record_ms = (started.elapsed() - assessed).as_millis() as u64,
        "audit task {}",
        report.task.task_id
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcert_registry::ConnectionTransport;

    const NOW: i64 = 1_800_000_000;

    fn cert(
        serial: &str,
        thing: &str,
        not_before: i64,
        not_after: i64,
        key: &str,
    ) -> AuditedCertificate {
        AuditedCertificate {
            serial: serial.into(),
            fingerprint_sha256: format!("fp-{serial}"),
            thing_name: thing.into(),
            status: CertStatus::Active,
            key_algorithm: key.into(),
            not_before,
            not_after,
        }
    }

    fn session(
        fp: &str,
        client: &str,
        at: i64,
        end: Option<i64>,
        reason: Option<&str>,
    ) -> ConnectionRecord {
        ConnectionRecord {
            fingerprint_sha256: fp.into(),
            thing_name: "t".into(),
            client_addr: "127.0.0.1".into(),
            at,
            transport: ConnectionTransport::Mqtt,
            client_id: Some(client.into()),
            disconnected_at: end,
            disconnect_reason: reason.map(str::to_owned),
        }
    }

    fn data() -> AuditData {
        AuditData {
            now: NOW,
            window_start: NOW - ON_DEMAND_LOOKBACK_SECONDS,
            cas: vec![
                CaCertificate {
                    role: "root",
                    serial: "01".into(),
                    subject: "CN=root".into(),
                    not_after: NOW + 3650 * DAY,
                    key_algorithm: "p256".into(),
                },
                CaCertificate {
                    role: "issuing",
                    serial: "02".into(),
                    subject: "CN=issuing".into(),
                    not_after: NOW + 10 * DAY,
                    key_algorithm: "rsa1024".into(),
                },
            ],
            certificates: vec![
                cert("a1", "fresh", NOW - DAY, NOW + 300 * DAY, "p256"),
                cert("a2", "expiring", NOW - 400 * DAY, NOW + 5 * DAY, "p256"),
                cert("a3", "expired", NOW - 400 * DAY, NOW - DAY, "rsa1024"),
            ],
            ..AuditData::default()
        }
    }

    fn run_one(name: &str, data: &AuditData) -> CheckResult {
        evaluate(find_check(name).unwrap(), data, &AuditSettings::default())
    }

    fn resources(r: &CheckResult) -> Vec<(&str, &str)> {
        r.findings
            .iter()
            .map(|f| (f.resource_id.as_str(), f.reason_code))
            .collect()
    }

    #[test]
    fn names_and_aliases() {
        assert_eq!(
            find_check("device_certificate_expiring_check")
                .unwrap()
                .name,
            DEVICE_CERT_APPROACHING_EXPIRATION
        );
        assert!(select_checks(&["NOPE".into()]).is_err());
        assert_eq!(select_checks(&[]).unwrap().len(), CHECKS.len());
        let two = select_checks(&[LOGGING_DISABLED.into(), REVOKED_CA_CERT.into()]).unwrap();
        assert_eq!(
            two.iter().map(|c| c.name).collect::<Vec<_>>(),
            [REVOKED_CA_CERT, LOGGING_DISABLED]
        );
    }

    #[test]
    fn expiration_age_and_key_quality() {
        let d = data();
        let r = run_one(DEVICE_CERT_APPROACHING_EXPIRATION, &d);
        assert_eq!(r.total, 3);
        assert_eq!(
            resources(&r),
            [
                ("a2", "CERTIFICATE_APPROACHING_EXPIRATION"),
                ("a3", "CERTIFICATE_PAST_EXPIRATION")
            ]
        );
        let r = run_one(CA_CERT_APPROACHING_EXPIRATION, &d);
        assert_eq!(
            resources(&r),
            [("02", "CERTIFICATE_APPROACHING_EXPIRATION")]
        );
        let r = run_one(DEVICE_CERT_AGE, &d);
        assert_eq!(
            resources(&r),
            [
                ("a2", "CERTIFICATE_PAST_AGE_THRESHOLD"),
                ("a3", "CERTIFICATE_PAST_AGE_THRESHOLD")
            ]
        );
        let r = run_one(DEVICE_CERT_KEY_QUALITY, &d);
        assert_eq!(resources(&r), [("a3", "CERTIFICATE_KEY_WEAK")]);
        let r = run_one(CA_CERT_KEY_QUALITY, &d);
        assert_eq!(resources(&r), [("02", "CERTIFICATE_KEY_WEAK")]);
    }

    #[test]
    fn shared_certificates_and_conflicting_client_ids() {
        let mut d = data();
        d.sessions = vec![
            // fp-a1 as two client ids at once: shared.
            session("fp-a1", "one", NOW - 100, Some(NOW - 10), None),
            session("fp-a1", "two", NOW - 50, None, None),
            // fp-a2 as two client ids one after the other: not shared.
            session("fp-a2", "x", NOW - 100, Some(NOW - 90), None),
            session("fp-a2", "y", NOW - 80, Some(NOW - 70), None),
            // client id "z" knocked off by another certificate.
            session(
                "fp-a2",
                "z",
                NOW - 60,
                Some(NOW - 40),
                Some("duplicate_client_id"),
            ),
            session("fp-a3", "z", NOW - 40, None, None),
        ];
        let r = run_one(DEVICE_CERTIFICATE_SHARED, &d);
        assert_eq!(r.total, 3);
        assert_eq!(
            resources(&r),
            [("a1", "CERTIFICATE_SHARED_BY_MULTIPLE_DEVICES")]
        );
        assert_eq!(
            r.findings[0].detail["clientIds"],
            serde_json::json!(["one", "two"])
        );
        let r = run_one(CONFLICTING_CLIENT_IDS, &d);
        assert_eq!(r.total, 5);
        assert_eq!(
            resources(&r),
            [("z", "DUPLICATE_CLIENT_ID_ACROSS_CONNECTIONS")]
        );
    }

    #[test]
    fn revoked_certificates_seen_after_revocation_and_revoked_cas() {
        let mut d = data();
        d.revoked = vec![
            RevokedEntry {
                serial: "a1".into(),
                thing_name: "fresh".into(),
                revoked_at: NOW - 100,
                reason: None,
                not_after: NOW + DAY,
            },
            RevokedEntry {
                serial: "a2".into(),
                thing_name: "expiring".into(),
                revoked_at: NOW - 100,
                reason: None,
                not_after: NOW + DAY,
            },
        ];
        d.sessions = vec![
            session("fp-a1", "fresh", NOW - 50, None, None),
            session("fp-a2", "expiring", NOW - 200, Some(NOW - 150), None),
        ];
        let r = run_one(REVOKED_DEVICE_CERT, &d);
        assert_eq!(r.total, 2);
        assert_eq!(resources(&r), [("a1", "CERTIFICATE_REVOKED_BY_ISSUER")]);
        assert!(run_one(REVOKED_CA_CERT, &d).findings.is_empty());
        d.revoked.push(RevokedEntry {
            serial: "02".into(),
            thing_name: String::new(),
            revoked_at: NOW - 10,
            reason: None,
            not_after: NOW + DAY,
        });
        assert_eq!(
            resources(&run_one(REVOKED_CA_CERT, &d)),
            [("02", "CERTIFICATE_REVOKED_BY_ISSUER")]
        );
        assert_eq!(run_one(INTERMEDIATE_CA_REVOKED, &d).findings.len(), 3);
    }

    #[test]
    fn policies_cognito_and_suppressions() {
        let mut d = data();
        d.policies = vec![
            PolicyRecord {
                name: "tight".into(),
                document: serde_json::json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"}]}),
                created_at: NOW,
                updated_at: NOW,
            },
            PolicyRecord {
                name: "broad".into(),
                document: serde_json::json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}),
                created_at: NOW,
                updated_at: NOW,
            },
        ];
        let r = run_one(IOT_POLICY_OVERLY_PERMISSIVE, &d);
        assert_eq!(r.total, 2);
        assert_eq!(
            resources(&r),
            [("broad", "ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS")]
        );
        let cognito = run_one(AUTHENTICATED_COGNITO, &d);
        assert_eq!((cognito.total, cognito.findings.len()), (0, 0));
        assert!(cognito.message.unwrap().contains("not applicable"));

        let options = AuditOptions {
            checks: select_checks(&[IOT_POLICY_OVERLY_PERMISSIVE.into(), DEVICE_CERT_AGE.into()])
                .unwrap(),
            task_type: ON_DEMAND,
            settings: AuditSettings::default(),
        };
        let suppress = |resource: &str, expires_at| AuditSuppression {
            check_name: IOT_POLICY_OVERLY_PERMISSIVE.into(),
            resource_id: resource.into(),
            expires_at,
            description: String::new(),
            created_at: NOW - 10,
        };
        let report = assess(&d, &options, &[suppress("broad", Some(NOW + 60))]).unwrap();
        assert_eq!(report.details[0].non_compliant_resources_count, 0);
        assert_eq!(
            report.details[0].suppressed_non_compliant_resources_count,
            1
        );
        assert_eq!(report.details[0].check_run_status, "COMPLETED_COMPLIANT");
        assert!(report.findings.iter().any(|f| f.suppressed));
        assert!(report.non_compliant(), "the age check still fails");
        assert_eq!(report.task.summary["nonCompliantChecksCount"], 1);
        assert_eq!(report.task.summary["totalChecksCount"], 2);
        // An expired suppression no longer counts.
        let report = assess(&d, &options, &[suppress("broad", Some(NOW))]).unwrap();
        assert_eq!(
            report.details[0].check_run_status,
            "COMPLETED_NON_COMPLIANT"
        );
    }
}
