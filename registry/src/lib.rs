//! fleetcert's registry: things, certificates, policies, rotations, revocations and CRLs,
//! device connections, the AWS mirror's outbox and the append-only event log.
//!
//! The storage interface is a set of role traits, one per kind of consumer:
//! [`Issuance`] (factory provisioning), [`Registrations`] (first connects and returning
//! devices), [`Rotations`] (the rotation worker, EST re-enrollment), [`Revocations`]
//! (operators, the CRL publisher), [`MirrorOutbox`] (the AWS IoT mirror) and [`Queries`]
//! (read-only lookups). [`Registry`] is their sum, plus health checks; [`open`] returns
//! one as an `Arc<dyn Registry>`. Call a method by naming its role trait
//! (`use fleetcert_registry::Rotations;`) or import them all with
//! `use fleetcert_registry::roles::*;` (see [`roles`]).
//!
//! There are two backends: SQLite (the default: a file in the data directory, WAL mode)
//! and PostgreSQL (selected by a `postgres://` URL). Each flow is written once, generic
//! over a crate-private `Dialect` (`dialect.rs`: transaction start, row-lock clauses,
//! JSON helpers, the few statements that differ), and the role traits are implemented
//! for both backends at once in `role_impls.rs` by handing each call to that flow; the
//! backends themselves keep only their connection pool, their migrations
//! (`migrations/sqlite`, `migrations/postgres`, applied by [`open`]) and their dialect.
//! This is the only crate that speaks SQL.
//!
//! Times are Unix seconds (`i64`) everywhere, so both backends store them the same way.
//! Serials, fingerprints and key hashes are lowercase hex.
//!
//! Test support (throwaway PostgreSQL databases, raw SQL past the registry's guards) is
//! the `testing` module, compiled only with the `testing` cargo feature, which no
//! release build enables.

mod audits;
mod claims;
mod common;
mod connections;
mod dialect;
mod error;
mod issuance;
mod mirror;
mod policy_versions;
mod postgres;
mod queries;
mod registrations;
mod revocations;
mod role_impls;
mod rotations;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
mod thing_groups;

pub use error::RegistryError;

use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where a certificate's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CertOrigin {
    /// fleetcert generated the key pair.
    Generated,
    /// The device sent a CSR; fleetcert never saw the private key.
    Csr,
}

/// Where a certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CertStatus {
    /// In use (or ready to be used) by its thing.
    Active,
    /// Replaced by a newer certificate; not yet revoked.
    Superseded,
    /// Revoked; appears on the CRL until it expires.
    Revoked,
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $ty {
            /// The value's name as the database stores it and `Display` and JSON write it
            /// (lowercase); `FromStr` parses it back.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),* }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $ty {
            type Err = RegistryError;
            fn from_str(s: &str) -> Result<Self, RegistryError> {
                match s {
                    $($text => Ok($ty::$variant),)*
                    other => Err(RegistryError::InvalidValue(format!(
                        concat!("unknown ", stringify!($ty), " {:?} (expected one of: {})"),
                        other,
                        [$($text),*].join(", ")
                    ))),
                }
            }
        }
    };
}

text_enum!(CertOrigin { Generated => "generated", Csr => "csr" });
text_enum!(CertStatus { Active => "active", Superseded => "superseded", Revoked => "revoked" });

/// A certificate to record. `der` is the certificate itself (kept so a certificate whose
/// files were never written can be delivered again).
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// Lowercase hex, 32 characters.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex.
    pub public_key_sha256: String,
    /// Issuer subject (RFC 4514).
    pub issuer: String,
    /// Start of the validity period (Unix seconds), as in the certificate.
    pub not_before: i64,
    /// End of the validity period (Unix seconds), as in the certificate. Once past, the
    /// certificate drops off the CRL and out of the revoked set.
    pub not_after: i64,
    /// Who made the key pair: decides how the certificate is rotated (a `generated` key
    /// is replaced by the rotation worker, a `csr` one by the device re-enrolling).
    pub origin: CertOrigin,
    /// The key algorithm in fleetcert's spelling (`p256`, `p384`, `ed25519`, `rsa2048`,
    /// `rsa3072`); a replacement for a generated key reuses it. Stored as given.
    pub key_algorithm: String,
    /// The renewal point (Unix seconds): from then on the certificate is due for
    /// rotation. Computed by the caller (fraction of the lifetime, with jitter).
    pub renew_at: i64,
    /// The certificate, DER-encoded.
    pub der: Vec<u8>,
}

/// One certificate to commit for one thing, as part of a group commit.
#[derive(Debug, Clone)]
pub struct IssueRecord {
    /// The thing the certificate is for (the certificate's common name); created if the
    /// registry does not have it yet.
    pub thing_name: String,
    /// Template the thing is provisioned with (recorded on the thing), if any. `None`
    /// leaves the template of an existing thing as it is.
    pub template: Option<String>,
    /// The certificate, inserted as `active` and undelivered (until
    /// [`Issuance::mark_delivered`]).
    pub certificate: NewCertificate,
    /// The thing's active certificate serials as the caller saw them when it decided to
    /// issue (sorted or not). If the thing's active set differs at commit time, nothing
    /// is written for this record and the outcome is [`IssueOutcome::Conflict`]; this
    /// keeps two concurrent provisioning runs from both issuing.
    pub expected_active: Vec<String>,
    /// If true, the `expected_active` certificates become `superseded` in the same
    /// transaction (a forced re-issue). If false, `expected_active` must be empty
    /// unless the caller is replacing undelivered certificates (see `revoke_expected`).
    pub supersede_expected: bool,
    /// If true, the `expected_active` certificates are revoked (reason `superseded`)
    /// instead: they were never delivered, so no device can be using them. Setting both
    /// this and `supersede_expected` is [`RegistryError::InvalidValue`].
    pub revoke_expected: bool,
    /// When this happened (Unix seconds); used for timestamps and events.
    pub at: i64,
}

/// What happened to one [`IssueRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    /// The certificate is recorded as `active`, and the expected ones superseded or
    /// revoked if the record asked for it.
    Committed {
        /// True if the thing did not exist before.
        thing_created: bool,
    },
    /// The thing's active certificates changed since the caller looked; nothing written.
    Conflict {
        /// The thing's active serials at commit time (including any committed by earlier
        /// records of the same call), sorted; the caller decides again from these.
        current_active: Vec<String>,
    },
}

/// Thing details a provisioning template sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThingDetails {
    /// The AWS IoT thing type (the template's `ThingTypeName`); `None`: no type.
    pub thing_type: Option<String>,
    /// Attribute name to value (the template's `AttributePayload`); empty: none.
    pub attributes: BTreeMap<String, String>,
    /// Thing group names (the template's `ThingGroups`). Sorted, without duplicates
    /// (the registry normalises).
    pub groups: Vec<String>,
    /// The AWS IoT billing group (the template's `BillingGroup`); `None`: none.
    pub billing_group: Option<String>,
}

impl ThingDetails {
    /// The details with `groups` sorted and without duplicates, as the registry stores
    /// them.
    pub fn normalised(mut self) -> Self {
        self.groups.sort();
        self.groups.dedup();
        self
    }
}

/// A thing (a device) as stored: created by provisioning, its details set by the
/// registration on first connect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThingRecord {
    /// The thing's name, unique in the registry and never changed; the common name of
    /// its certificates (`[a-zA-Z0-9:_-]{1,128}`, checked by the callers).
    pub name: String,
    /// The provisioning template last recorded for the thing (by provisioning or a
    /// registration); `None` if it was never given one (the JITP server then uses its
    /// default template).
    pub template: Option<String>,
    /// When the thing was first recorded (Unix seconds): the `at` of the group commit
    /// that created it.
    pub created_at: i64,
    /// When the thing was last written (Unix seconds): a group commit that recorded a
    /// template for it, or a registration that changed its details or template.
    pub updated_at: i64,
    /// Type, attributes, groups and billing group, as the last registration set them
    /// (empty until the first registration).
    pub details: ThingDetails,
    /// 1 at creation, +1 on every change of details or template (optimistic
    /// concurrency for [`Registration::expected_thing_version`]).
    pub version: i64,
}

/// A certificate as stored, with where it stands in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateRecord {
    /// The serial number, lowercase hex; the certificate's key in the registry.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex; unique. A connecting device is looked up by it
    /// ([`Registrations::device_state`]).
    pub fingerprint_sha256: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex. A replacement must not
    /// reuse the key of any certificate of the same thing.
    pub public_key_sha256: String,
    /// The thing the certificate belongs to; never changes.
    pub thing_name: String,
    /// Issuer subject (RFC 4514).
    pub issuer: String,
    /// `active` when recorded; `superseded` once replaced (a forced re-issue, or its
    /// replacement handed to the device); `revoked` by an operator, or by fleetcert once
    /// no device can need it (see `revocation_reason`).
    pub status: CertStatus,
    /// Who made the key pair (decides how the certificate is rotated).
    pub origin: CertOrigin,
    /// The key algorithm in fleetcert's spelling (`p256`, `rsa2048`, …).
    pub key_algorithm: String,
    /// Start of the validity period (Unix seconds).
    pub not_before: i64,
    /// End of the validity period (Unix seconds); a revoked certificate stays on the CRL
    /// until then.
    pub not_after: i64,
    /// When it was recorded (Unix seconds): the `at` of the group commit, completed
    /// rotation or replacement that inserted it.
    pub created_at: i64,
    /// When the certificate (and key, if generated) was handed over: files written by
    /// provisioning, or the replacement returned to the device. `None` if a crash
    /// happened between commit and delivery, or for a pre-issued replacement not
    /// fetched yet.
    pub delivered_at: Option<i64>,
    /// When it was revoked (Unix seconds); `None` unless `status` is `revoked`.
    pub revoked_at: Option<i64>,
    /// Why: the RFC 5280 reason name given to [`Revocations::revoke`] (e.g.
    /// `keyCompromise`), or `superseded` when fleetcert revoked it itself (a re-issue of
    /// an undelivered certificate, a confirmed rotation, an unused replacement). `None`
    /// unless revoked.
    pub revocation_reason: Option<String>,
    /// Set by the first successful [`Registrations::register`] of this certificate; a
    /// replacement made by a rotation starts registered (at its creation) if the
    /// certificate it replaces was.
    pub registered_at: Option<i64>,
    /// From then on the certificate is due for rotation.
    pub renew_at: i64,
    /// The certificate this one replaced in a rotation (`None` for a certificate made
    /// by provisioning: the thing's factory certificate).
    pub replaces: Option<String>,
    /// The certificate, DER-encoded. Left out of the JSON form (`#[serde(skip)]`).
    #[serde(skip)]
    pub der: Vec<u8>,
}

/// A stored policy. Policies are immutable once created: a template that needs a
/// different document uses a new policy name.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyRecord {
    /// The policy's name, unique in the registry: the template's policy name, or one
    /// the JITP server derives for a nameless policy (`TEMPLATE-LOGICALID`).
    pub name: String,
    /// The policy document (an AWS IoT policy, JSON), exactly as first stored.
    pub document: serde_json::Value,
    /// When the registration that created it ran (Unix seconds).
    pub created_at: i64,
    /// Equal to `created_at`: nothing in the registry changes a policy.
    pub updated_at: i64,
}

/// A policy a registration attaches.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyWrite {
    /// The policy's name; must not be empty (else the registration is `Refused`).
    pub name: String,
    /// `Some`: create the policy if missing; if it exists with an identical document
    /// (`serde_json::Value` equality; documents are stored as JSON text exactly as
    /// serde_json writes them), reuse it; if it exists with a different document, the
    /// outcome is [`RegistrationOutcome::Refused`] (rename the policy in the template to
    /// change it).
    /// `None`: attach an existing policy by name; missing → `Refused` naming it.
    pub document: Option<serde_json::Value>,
}

/// A first-connect registration of a certificate (see [`Registrations::register`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The certificate the device presented (must exist, be `active`, and belong to
    /// `thing_name`, else `Refused` with a reason).
    pub serial: String,
    /// The certificate's thing, which must exist (else `Refused`).
    pub thing_name: String,
    /// Template used (recorded on the thing).
    pub template: String,
    /// The thing's new details, computed by the caller from the template, the current
    /// details and OverrideSettings. `groups` need not be sorted (the registry
    /// normalises).
    pub details: ThingDetails,
    /// The thing `version` the caller read; if it changed meanwhile the outcome is
    /// [`RegistrationOutcome::ThingChanged`] and nothing is written.
    pub expected_thing_version: i64,
    /// The template's policies, to create or reuse and attach to the certificate, in
    /// template order (a name given twice is one policy; given twice with different
    /// documents, the registration is `Refused`).
    pub policies: Vec<PolicyWrite>,
    /// When the device connected (Unix seconds): the certificate's `registered_at`, the
    /// thing's `updated_at`, new policies' `created_at`, and the events' time.
    pub at: i64,
}

/// A claim certificate to record ([`Claims::create_claim`]).
#[derive(Debug, Clone)]
pub struct NewClaim {
    /// The claim's name (its certificate's common name), unique among claims.
    pub name: String,
    /// The provisioning template the claim may provision with (and only that one).
    pub template: String,
    /// How many devices may be provisioned with the claim; `None`: no limit.
    pub max_uses: Option<i64>,
    /// The claim certificate (`origin`, `key_algorithm` and `renew_at` are not kept).
    pub certificate: NewCertificate,
    /// When (Unix seconds).
    pub at: i64,
}

/// A claim certificate as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The claim's name.
    pub name: String,
    /// The one template it provisions with.
    pub template: String,
    /// The claim certificate's serial (lowercase hex).
    pub serial: String,
    /// SHA-256 of its DER (lowercase hex).
    pub fingerprint_sha256: String,
    /// `active` or `revoked`.
    pub revoked: bool,
    /// Devices it may still provision at most in total; `None`: no limit.
    pub max_uses: Option<i64>,
    /// Devices provisioned with it so far (registered things).
    pub uses: i64,
    /// Validity (Unix seconds).
    pub not_before: i64,
    /// Validity end (Unix seconds).
    pub not_after: i64,
    /// When it was recorded (Unix seconds).
    pub created_at: i64,
    /// When it was revoked (Unix seconds).
    pub revoked_at: Option<i64>,
}

/// A certificate issued through the Fleet Provisioning API, waiting for RegisterThing
/// ([`Claims::record_provisional`]).
#[derive(Debug, Clone)]
pub struct NewProvisional {
    /// The claim whose holder asked for it.
    pub claim_name: String,
    /// The broker session that asked (the ownership token is bound to it).
    pub session: String,
    /// SHA-256 of the ownership token (lowercase hex); the token itself is not stored.
    pub token_sha256: String,
    /// When the token expires (Unix seconds); an unregistered certificate is revoked then.
    pub token_expires_at: i64,
    /// The certificate.
    pub certificate: NewCertificate,
    /// When (Unix seconds).
    pub at: i64,
}

/// A provisional certificate as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionalRecord {
    /// Serial (lowercase hex).
    pub serial: String,
    /// SHA-256 of the DER (lowercase hex): AWS's certificate id.
    pub fingerprint_sha256: String,
    /// The claim whose holder asked for it.
    pub claim_name: String,
    /// The broker session that asked.
    pub session: String,
    /// `pending`, `registered` or `revoked`.
    pub state: String,
    /// When the ownership token expires (Unix seconds).
    pub token_expires_at: i64,
    /// The thing it was registered for, once registered.
    pub thing_name: Option<String>,
    /// The certificate, DER.
    pub der: Vec<u8>,
}

/// RegisterThing: the provisional certificate of an ownership token becomes the
/// certificate of a thing, registered from its template, in one transaction
/// ([`Claims::register_provisional`]).
#[derive(Debug, Clone)]
pub struct ProvisionalRegistration {
    /// SHA-256 of the ownership token presented.
    pub token_sha256: String,
    /// The broker session presenting it (must be the one that got it).
    pub session: String,
    /// The claim the session authenticated with (must be the one that got it).
    pub claim_name: String,
    /// The registration, as a first connect would make it. `expected_thing_version` is
    /// the version of the thing the caller rendered against, or 0 when it did not exist
    /// (it is created then). `serial` is ignored: the token names the certificate.
    pub registration: Registration,
}

/// What [`Claims::register_provisional`] did. Every outcome but `Registered` wrote
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProvisionalOutcome {
    /// The certificate is the thing's, active and registered, the token spent.
    Registered {
        /// The certificate's serial.
        serial: String,
        /// The policies attached.
        policies: Vec<String>,
        /// True when the thing did not exist before.
        thing_created: bool,
    },
    /// No certificate has this token.
    TokenUnknown,
    /// The token was used (or its certificate revoked) already.
    TokenUsed,
    /// The token has expired.
    TokenExpired,
    /// The token was issued to another session or claim.
    TokenNotYours,
    /// The claim is revoked.
    ClaimRevoked,
    /// The claim's `max_uses` is reached.
    ClaimExhausted,
    /// The thing changed since the caller rendered against it: render again.
    ThingChanged,
    /// The registration was refused (as [`RegistrationOutcome::Refused`]).
    Refused {
        /// Why.
        reason: String,
    },
}

/// What [`Registrations::register`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationOutcome {
    /// This call registered the certificate (HTTP 201).
    Registered {
        /// Policy names attached, in request order (a name given twice is attached
        /// once).
        policies: Vec<String>,
    },
    /// The certificate was registered before (HTTP 200).
    AlreadyRegistered {
        /// Names of the certificate's attached policies, sorted.
        policies: Vec<String>,
    },
    /// The thing changed since the caller read it: re-read, recompute, retry.
    ThingChanged,
    /// Cannot register; nothing written.
    Refused {
        /// Why, for humans (the device and the logs): an unknown, inactive or foreign
        /// certificate, a missing thing, a missing or conflicting policy.
        reason: String,
    },
}

/// What the server needs to answer a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// The certificate with the fingerprint asked for, in whatever status (the caller
    /// refuses a revoked one).
    pub certificate: CertificateRecord,
    /// The certificate's thing.
    pub thing: ThingRecord,
    /// Names of the policies attached to this certificate, sorted.
    pub policies: Vec<String>,
    /// The rotation of this certificate (it is the *old* one), in whatever state
    /// (finished ones too); `None` if none was ever opened.
    pub rotation: Option<RotationRecord>,
    /// True if this certificate replaces one that is not revoked yet: the first use of
    /// this certificate confirms the rotation (see [`Rotations::confirm_replacement`]).
    pub confirms_rotation: bool,
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RotationState {
    /// The certificate is past its renewal point; no replacement exists yet. For a
    /// device-generated key (origin `csr`) the device is told and re-enrolls through EST;
    /// for a fleetcert-generated key a worker issues the replacement ahead of time.
    Due,
    /// A replacement (generated key, sealed) is issued and waits for the device to
    /// fetch it. The old certificate is still `active`.
    Issued,
    /// The device has the replacement (EST reply or fetched); the old certificate is
    /// `superseded` and still works.
    Delivered,
    /// The device used the replacement; the old certificate is revoked.
    Confirmed,
    /// The worker gave up after repeated failures (see `last_error`).
    Failed,
    /// The old certificate was revoked by an operator before the rotation finished.
    Cancelled,
}

text_enum!(RotationState {
    Due => "due",
    Issued => "issued",
    Delivered => "delivered",
    Confirmed => "confirmed",
    Failed => "failed",
    Cancelled => "cancelled",
});

/// The rotation of one certificate (keyed by the old certificate's serial).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RotationRecord {
    /// The certificate being replaced; a certificate has at most one rotation, ever.
    pub old_serial: String,
    /// The old certificate's thing.
    pub thing_name: String,
    /// The old certificate's origin: `generated` rotations are claimed by the rotation
    /// worker, `csr` ones wait for the device to re-enroll.
    pub origin: CertOrigin,
    /// Where the rotation stands.
    pub state: RotationState,
    /// When the rotation was opened (Unix seconds).
    pub due_at: i64,
    /// The replacement's serial, once there is one (`issued` and later; `None` while
    /// `due`, and for a rotation that failed or was cancelled before any replacement).
    pub new_serial: Option<String>,
    /// The worker that last claimed the rotation ([`Rotations::claim_rotations`]'s
    /// `owner`) while it is `due`; cleared when the worker completes it or records a
    /// failure, and when the rotation moves on otherwise. An expired lease is not
    /// cleared: check `lease_until`.
    pub lease_owner: Option<String>,
    /// Until when (Unix seconds) `lease_owner` holds the rotation; it can be claimed
    /// again once `lease_until < now`.
    pub lease_until: Option<i64>,
    /// Failed attempts recorded by [`Rotations::fail_rotation`]; the rotation becomes
    /// `failed` once they reach the worker's maximum.
    pub attempts: i64,
    /// The message of the latest failed attempt; `None` if none failed.
    pub last_error: Option<String>,
    /// When the row last changed (Unix seconds); claims do not count.
    pub updated_at: i64,
}

/// Which rotations [`Rotations::list_rotations`] returns (conditions combine with AND).
#[derive(Debug, Clone, Default)]
pub struct RotationFilter {
    /// Only rotations in this state.
    pub state: Option<RotationState>,
    /// Only rotations of this thing's certificates.
    pub thing_name: Option<String>,
    /// Ordered by (due_at, old_serial); `None`: all.
    pub limit: Option<u32>,
}

/// Open rotations that are not issued yet, for `rotate` to report what a sweep could
/// not take (see [`Rotations::rotation_backlog`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RotationBacklog {
    /// Rotations of generated keys in state `due` whose lease is free or expired: the
    /// next sweep claims them.
    pub claimable: u64,
    /// Rotations of generated keys in state `due` under an unexpired lease (a worker is
    /// on them, or one was killed and its leases have not expired yet).
    pub leased: u64,
    /// When the last of those leases expires (`None` if there are none).
    pub leased_until: Option<i64>,
    /// Rotations of devices with their own keys (origin `csr`) in state `due`: waiting
    /// for the device to re-enroll.
    pub awaiting_devices: u64,
}

/// A due rotation claimed by one worker (see [`Rotations::claim_rotations`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RotationClaim {
    /// The certificate to replace.
    pub old: CertificateRecord,
    /// The thing's template (for the replacement's profile).
    pub template: Option<String>,
}

/// A replacement issued ahead of time by a worker holding the lease.
#[derive(Debug, Clone)]
pub struct PreparedReplacement {
    /// The certificate replaced: a rotation the caller claimed and still leases.
    pub old_serial: String,
    /// Origin `generated`.
    pub new: NewCertificate,
    /// The new private key, encrypted by the caller (opaque to the registry).
    pub sealed_key: Vec<u8>,
    /// When it was issued (Unix seconds): the new certificate's `created_at` (and
    /// `registered_at`, if the old one was registered) and the events' time.
    pub at: i64,
}

/// A replacement delivered in the same exchange (EST re-enrollment, or a key generated
/// on demand and returned at once). See [`Rotations::replace_certificate`].
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The certificate the device authenticated with.
    pub authenticated_serial: String,
    /// The thing the device authenticated as; the authenticated certificate must belong
    /// to it (else `wrong_thing`).
    pub thing_name: String,
    /// The replacement: origin `csr` for EST, `generated` for a key made on demand.
    /// Inserted `active` and delivered.
    pub new: NewCertificate,
    /// For a key generated on demand: the new private key, encrypted by the caller, kept
    /// (like a pre-issued one) so the replacement can be handed out again until it is
    /// first used. `None` for EST (the device holds its key).
    pub sealed_key: Option<Vec<u8>>,
    /// Refuse (`replacement_limit`) if the authenticated certificate already has this
    /// many replacements, in any status. `None`: no limit.
    pub max_replacements: Option<u32>,
    /// When the exchange happened (Unix seconds): the new certificate's `created_at`
    /// and `delivered_at`, revocations of unused replacements, the events' time.
    pub at: i64,
}

/// What [`Rotations::replace_certificate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaceOutcome {
    /// The replacement is recorded (`active`, delivered), the authenticated certificate
    /// is `superseded` (if it was `active`) and its rotation `delivered`.
    Replaced {
        /// Earlier replacements of the authenticated certificate that were never used
        /// and are now revoked (reason `superseded`).
        revoked: Vec<String>,
    },
    /// Nothing written. `code` is stable: `unknown_certificate`, `wrong_thing`,
    /// `certificate_revoked`, `key_reused`, `replacement_pending` (a sealed replacement
    /// can be handed out: take it instead), `replacement_limit`.
    Refused {
        /// The refusal's stable code (one of those above), for the caller to act on.
        code: &'static str,
        /// Why, for humans (names the certificates involved).
        reason: String,
    },
}

/// A replacement handed to the device (see [`Rotations::take_replacement`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TakenReplacement {
    /// The replacement certificate (`active`, `delivered_at` set).
    pub certificate: CertificateRecord,
    /// Its private key, sealed as the caller stored it
    /// ([`PreparedReplacement::sealed_key`] or [`Replacement::sealed_key`]); opaque to
    /// the registry.
    pub sealed_key: Vec<u8>,
    /// True if it had been handed out before (nothing was written this time).
    pub again: bool,
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationTarget {
    /// One certificate, by serial (lowercase hex).
    Serial(String),
    /// Every certificate of a thing that is not revoked yet.
    Thing(String),
}

/// A revocation asked for by an operator (see [`Revocations::revoke`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The certificate or thing to revoke.
    pub target: RevocationTarget,
    /// RFC 5280 reason name as the caller spells it (e.g. `keyCompromise`); stored as
    /// given.
    pub reason: String,
    /// When (Unix seconds): the certificates' `revoked_at` and the events' time.
    pub at: i64,
}

/// A revoked certificate, as the CRL and the handshake check see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevokedEntry {
    /// The revoked certificate's serial (lowercase hex).
    pub serial: String,
    /// Its thing.
    pub thing_name: String,
    /// When it was revoked (Unix seconds): the CRL entry's revocation date.
    pub revoked_at: i64,
    /// The stored revocation reason (an RFC 5280 reason name, `superseded` for
    /// fleetcert's own revocations); `None` if none was stored.
    pub reason: Option<String>,
    /// The certificate's expiry (Unix seconds); it drops off the CRL after that.
    pub not_after: i64,
}

/// A signed CRL as stored for every server and the `crl` command to hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCrl {
    /// The CRL number (strictly increasing).
    pub number: i64,
    /// The CRL's thisUpdate (Unix seconds): when it was signed.
    pub this_update: i64,
    /// The CRL's nextUpdate (Unix seconds): relying parties may cache it until then; a
    /// publisher signs a new one well before.
    pub next_update: i64,
    /// SHA-256 (hex) over the entries it lists, so a publisher can tell whether the
    /// revocation set changed since.
    pub entries_digest: String,
    /// How many revoked certificates it lists.
    pub entry_count: i64,
    /// The signed CRL, DER-encoded.
    pub der: Vec<u8>,
}

/// CRLs kept in the registry (older ones are pruned when a new one is stored).
pub const CRLS_KEPT: i64 = 16;

/// How a device connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConnectionTransport {
    /// fleetcert's own mutual-TLS listener (first connect, EST); recorded when answered.
    Https,
    /// An MQTT session through the mosquitto plugin; recorded when it ended.
    Mqtt,
}

text_enum!(ConnectionTransport { Https => "https", Mqtt => "mqtt" });

/// One device connection, as the JITP server or the broker saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionRecord {
    /// The certificate the device presented: SHA-256 of its DER, lowercase hex
    /// (connections are kept per fingerprint).
    pub fingerprint_sha256: String,
    /// The certificate's thing at the time.
    pub thing_name: String,
    /// The peer's address as the server saw it (`IP:PORT`, IPv6 in brackets; the broker
    /// reports the address without the port).
    pub client_addr: String,
    /// When the connection was answered (HTTPS) or the session began (MQTT), Unix seconds.
    pub at: i64,
    /// Which front end saw it.
    pub transport: ConnectionTransport,
    /// The MQTT client id (MQTT sessions only).
    pub client_id: Option<String>,
    /// When the session ended (MQTT sessions only), Unix seconds.
    pub disconnected_at: Option<i64>,
    /// Why the session ended, as the broker saw it (MQTT sessions only): `disconnected`
    /// (the client left or its connection dropped), `duplicate_client_id` (another
    /// connection took its client id over), `certificate_retired` (kicked: revoked or
    /// rotated), `broker_stopped`.
    pub disconnect_reason: Option<String>,
}

impl ConnectionRecord {
    /// A connection answered by the HTTPS listener.
    pub fn https(fingerprint_sha256: &str, thing_name: &str, client_addr: &str, at: i64) -> Self {
        ConnectionRecord {
            fingerprint_sha256: fingerprint_sha256.to_owned(),
            thing_name: thing_name.to_owned(),
            client_addr: client_addr.to_owned(),
            at,
            transport: ConnectionTransport::Https,
            client_id: None,
            disconnected_at: None,
            disconnect_reason: None,
        }
    }
}

/// Connections kept per certificate (older ones are pruned as new ones arrive).
pub const MAX_CONNECTIONS_PER_CERTIFICATE: usize = 32;

/// An entry of the append-only event log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EventRecord {
    /// The event's position in the log, assigned on insert and increasing; listings are
    /// ordered by it.
    pub id: i64,
    /// When it happened (Unix seconds): the `at` the caller passed to the call that
    /// wrote it.
    pub at: i64,
    /// e.g. `thing.created`, `thing.updated`, `certificate.issued`,
    /// `certificate.superseded`, `certificate.revoked`, `certificate.delivered`,
    /// `certificate.registered`, `policy.created`, `policy.attached`.
    pub kind: String,
    /// The thing concerned; `None` for events about no thing (`mirror.enabled`, …).
    pub thing_name: Option<String>,
    /// The certificate concerned (for `rotation.*` events, the old certificate); `None`
    /// for `thing.*` events and those about no certificate.
    pub serial: Option<String>,
    /// A JSON object whose fields depend on `kind` (e.g. `reason` for
    /// `certificate.revoked`, `replaced_by` for `certificate.superseded`).
    pub detail: serde_json::Value,
}

/// Which certificates [`Queries::list_certificates`] returns (conditions combine with
/// AND; the default: all).
#[derive(Debug, Clone, Default)]
pub struct CertificateFilter {
    /// Only this thing's certificates.
    pub thing_name: Option<String>,
    /// Only certificates in this status.
    pub status: Option<CertStatus>,
    /// Only certificates with `not_after <= expires_before`.
    pub expires_before: Option<i64>,
    /// At most this many, ordered by (thing_name, created_at, serial). `None`: all.
    pub limit: Option<u32>,
}

/// Which things [`Queries::list_things`] returns (the default: all).
#[derive(Debug, Clone, Default)]
pub struct ThingFilter {
    /// Ordered by name; `None`: all.
    pub limit: Option<u32>,
    /// Only names strictly greater than this (keyset pagination).
    pub after: Option<String>,
}

/// Which events [`Queries::list_events`] returns (conditions combine with AND; the
/// default: the whole log).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only events about this thing.
    pub thing_name: Option<String>,
    /// Only events about this certificate (for `rotation.*` events: as the old one).
    pub serial: Option<String>,
    /// Ordered by id; `None`: all.
    pub limit: Option<u32>,
}

/// Counts for `things list` summaries and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryCounts {
    /// Things recorded.
    pub things: u64,
    /// (status name, count) for each [`CertStatus`] that has certificates, sorted by
    /// name; a status without any is absent.
    pub certificates_by_status: Vec<(String, u64)>,
    /// Entries in the event log.
    pub events: u64,
}

/// How the AWS IoT Core mirror reaches AWS and what it does; one row, stored by
/// `aws enable`. The mirror worker reads it on every run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MirrorSettings {
    /// Whether changes are queued for the mirror (by the event log's trigger). Stored
    /// `true` by [`MirrorOutbox::enable_mirror`] whatever this says; `false` after
    /// [`MirrorOutbox::disable_mirror`].
    pub enabled: bool,
    /// The AWS region (e.g. `eu-west-1`); must not be empty. A new region or endpoint
    /// forgets the recorded AWS ids (another account).
    pub region: String,
    /// An endpoint to use instead of the region's (LocalStack, moto, a VPC endpoint);
    /// `None`: AWS's regional endpoint.
    pub endpoint_url: Option<String>,
    /// `default` (registered with a verification certificate) or `sni-only`.
    pub ca_mode: String,
    /// What a certificate replaced by a confirmed rotation becomes in AWS:
    /// `REVOKED` (default) or `INACTIVE`.
    pub rotated_status: String,
    /// The issuing CA's AWS id, once registered.
    pub ca_certificate_id: Option<String>,
    /// `arn:PARTITION:iot:REGION:ACCOUNT:`, learnt when the CA was registered; a
    /// certificate's ARN is this + `cert/` + its id (the SHA-256 of its DER).
    pub arn_prefix: Option<String>,
    /// When the settings last changed (Unix seconds): enabled, disabled, CA recorded.
    /// [`MirrorOutbox::enable_mirror`] stores its `at` instead of this.
    pub updated_at: i64,
}

/// What a mirror operation makes AWS match: the subject's current registry state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MirrorOpKind {
    /// The thing (type, attributes, groups). Subject: thing name.
    Thing,
    /// The certificate: registered with its status, its policies attached, attached
    /// to its thing (or detached once a rotation retired it). Subject: serial.
    Certificate,
    /// The policy document. Subject: policy name.
    Policy,
    /// The issuing CA certificate. Subject: `ca`.
    Ca,
}

text_enum!(MirrorOpKind { Thing => "thing", Certificate => "certificate", Policy => "policy", Ca => "ca" });

/// An operation to queue. Operations of one `queue` apply in order; a thing's
/// operations share the queue `thing:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMirrorOp {
    /// The queue: `thing:NAME` (a thing and its certificates), `policy:NAME` or `ca`.
    pub queue: String,
    /// What to make AWS match.
    pub kind: MirrorOpKind,
    /// The thing name, serial, policy name or `ca`, by `kind`.
    pub subject: String,
}

impl NewMirrorOp {
    /// Mirror thing `name`, in its own queue `thing:NAME`.
    pub fn thing(name: &str) -> Self {
        NewMirrorOp {
            queue: format!("thing:{name}"),
            kind: MirrorOpKind::Thing,
            subject: name.to_owned(),
        }
    }
    /// Mirror certificate `serial`, in the queue of its thing (so it applies after the
    /// thing's earlier operations).
    pub fn certificate(thing_name: &str, serial: &str) -> Self {
        NewMirrorOp {
            queue: format!("thing:{thing_name}"),
            kind: MirrorOpKind::Certificate,
            subject: serial.to_owned(),
        }
    }
    /// Mirror policy `name`, in its own queue `policy:NAME`.
    pub fn policy(name: &str) -> Self {
        NewMirrorOp {
            queue: format!("policy:{name}"),
            kind: MirrorOpKind::Policy,
            subject: name.to_owned(),
        }
    }
    /// Register the issuing CA, in the queue `ca` (subject `ca`).
    pub fn ca() -> Self {
        NewMirrorOp {
            queue: "ca".to_owned(),
            kind: MirrorOpKind::Ca,
            subject: "ca".to_owned(),
        }
    }
}

/// A queued (or parked) mirror operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MirrorOp {
    /// The operation's id, increasing in queueing order; operations of one queue apply
    /// in id order. Named in its [`MirrorResult`].
    pub id: i64,
    /// Its queue (see [`NewMirrorOp::queue`]).
    pub queue: String,
    /// What it makes AWS match.
    pub kind: MirrorOpKind,
    /// The thing name, serial, policy name or `ca`, by `kind`.
    pub subject: String,
    /// `pending` or `parked`.
    pub state: String,
    /// When it was queued (Unix seconds; for one queued by the event log, the event's
    /// time).
    pub created_at: i64,
    /// Backoff: not claimed before this (Unix seconds) unless the claim ignores backoff;
    /// 0 until a retry sets it, and again once requeued.
    pub not_before: i64,
    /// Failed applications so far (retried or parked); 0 again once requeued.
    pub attempts: i64,
    /// The error of the latest failed application; `None` if none failed.
    pub last_error: Option<String>,
}

/// How applying a claimed operation went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorOutcome {
    /// Done: the operation is removed from the outbox.
    Applied,
    /// Try again, not before `not_before`.
    Retry {
        /// What went wrong (stored as the operation's `last_error`).
        error: String,
        /// The end of the backoff (Unix seconds).
        not_before: i64,
    },
    /// Failed for good: kept as `parked` with its error, out of the way of the others.
    Park {
        /// What went wrong (stored as `last_error` and in the `mirror.parked` event).
        error: String,
    },
}

/// How one claimed operation went, for [`MirrorOutbox::finish_mirror_ops`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorResult {
    /// The operation's [`MirrorOp::id`], as claimed.
    pub id: i64,
    /// What to do with it.
    pub outcome: MirrorOutcome,
}

/// The outbox at a glance, for `aws status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MirrorBacklog {
    /// Operations waiting (including those in backoff and in flight).
    pub pending: i64,
    /// Of those, leased by a worker (being applied now, in this or another process;
    /// an expired lease counts until another worker claims the operation).
    pub in_flight: i64,
    /// Of those, waiting for a retry after an error.
    pub retrying: i64,
    /// The waiting operation queued first (lowest id); `None` if nothing waits.
    pub oldest_pending: Option<MirrorOp>,
    /// Parked operations, all of them (`parked_ops` lists at most the limit).
    pub parked: i64,
    /// The oldest parked operations (at most the limit asked for).
    pub parked_ops: Vec<MirrorOp>,
}

/// A certificate as AWS IoT knows it: the id and ARN that AWS returned when the mirror
/// registered it (or named when it said the certificate already exists). The mirror uses
/// these for attachments and status changes, never an id computed here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MirroredCertificate {
    /// The certificate's serial in the registry.
    pub serial: String,
    /// AWS's `certificateId`, as AWS returned it.
    pub certificate_id: String,
    /// AWS's `certificateArn`, as AWS returned it.
    pub certificate_arn: String,
    /// When the mirror recorded them (Unix seconds).
    pub recorded_at: i64,
}

/// Factory issuance: group commits of issued certificates and their delivery (`provision`).
#[async_trait]
pub trait Issuance: Send + Sync {
    /// Commits a group of issued certificates in ONE transaction: creates each thing if
    /// missing (event `thing.created`), checks its active set against
    /// `expected_active`, applies supersede/revoke of the expected ones (events
    /// `certificate.superseded` / `certificate.revoked`), inserts the certificate as
    /// `active` (event `certificate.issued`). Records that conflict are skipped and
    /// reported; the others commit. A duplicate serial or fingerprint fails the whole
    /// call with [`RegistryError::DuplicateSerial`] and commits nothing.
    async fn record_issued(
        &self,
        records: &[IssueRecord],
    ) -> Result<Vec<IssueOutcome>, RegistryError>;

    /// Marks certificates as delivered (files written), in one transaction, with a
    /// `certificate.delivered` event each. Already-delivered ones are left as they are.
    async fn mark_delivered(&self, serials: &[String], at: i64) -> Result<(), RegistryError>;

    /// Active certificates of each named thing (things without any are absent from the
    /// map). Works for thousands of names (the implementation chunks its queries).
    async fn active_certificates(
        &self,
        thing_names: &[String],
    ) -> Result<HashMap<String, Vec<CertificateRecord>>, RegistryError>;
}

/// First connects and returning devices: registration from a template, the device state read on every connection, connection records (the JITP server, the broker integration).
#[async_trait]
pub trait Registrations: Send + Sync {
    /// Registers a certificate on its first connection, in ONE transaction that is safe
    /// under concurrency (of ten concurrent calls for one certificate exactly one gets
    /// `Registered`, the others `AlreadyRegistered`):
    /// - the certificate must exist, be `active` and belong to `thing_name`
    ///   (else `Refused`); if it is registered already: `AlreadyRegistered`;
    /// - the thing's version must be `expected_thing_version` (else `ThingChanged`);
    /// - if the details or template differ from the stored ones, the thing is updated
    ///   (version + 1, event `thing.updated`);
    /// - each policy is created (event `policy.created`), reused, or refused (see
    ///   [`PolicyWrite`]), and attached to the certificate (event `policy.attached`);
    /// - the certificate gets `registered_at` (event `certificate.registered`).
    ///
    /// `Refused` and `ThingChanged` write nothing.
    async fn register(
        &self,
        registration: &Registration,
    ) -> Result<RegistrationOutcome, RegistryError>;

    /// Several registrations in one transaction and one durable commit (group commit):
    /// each applies entirely or not at all, exactly as [`Registrations::register`] would one
    /// after another, and the outcomes come back in order. A database error fails the
    /// whole group and writes nothing; the caller may then register one by one.
    ///
    /// Both backends run the group in one transaction with a savepoint per
    /// registration; the default (for other implementations) registers one after
    /// another, each in its own transaction. Callers group only as many as
    /// [`Registrations::registration_group_size`] says is worth it.
    async fn register_batch(
        &self,
        registrations: &[Registration],
    ) -> Result<Vec<RegistrationOutcome>, RegistryError> {
        let mut outcomes = Vec::with_capacity(registrations.len());
        for registration in registrations {
            outcomes.push(self.register(registration).await?);
        }
        Ok(outcomes)
    }

    /// How many concurrent first connects are worth grouping into one
    /// [`Registrations::register_batch`]. 1 (the default) means: call
    /// [`Registrations::register`] concurrently, the database runs them in parallel
    /// (PostgreSQL). SQLite has one writer and one fsync per commit, so grouping is what
    /// lets its registrations keep up with the handshakes.
    fn registration_group_size(&self) -> usize {
        1
    }

    /// The certificate with this fingerprint, its thing and its attached policies; the
    /// hot path of every returning connection (one indexed query).
    async fn device_state(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Option<DeviceState>, RegistryError>;

    /// Appends connection records in one transaction and prunes each affected
    /// certificate to its newest [`MAX_CONNECTIONS_PER_CERTIFICATE`] (newest: latest
    /// appended; within a slice, later records are newer).
    async fn record_connections(
        &self,
        connections: &[ConnectionRecord],
    ) -> Result<(), RegistryError>;

    /// The kept connections of a certificate, newest first.
    async fn recent_connections(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Vec<ConnectionRecord>, RegistryError>;
}

/// The rotation lifecycle: due certificates, leased claims, replacements issued ahead or in the exchange, confirmation on first use (the rotation worker, EST re-enrollment).
#[async_trait]
pub trait Rotations: Send + Sync {
    /// Certificates due for rotation at `now`, without changing anything (for
    /// `rotate --dry-run`): `active`, delivered, no rotation row yet, and either
    /// `renew_at <= now` or (if given) `not_after <= expiring_before`. Ordered by
    /// (renew_at, serial); at most `limit`.
    async fn due_certificates(
        &self,
        now: i64,
        expiring_before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Vec<CertificateRecord>, RegistryError>;

    /// Opens a rotation (state `due`, event `rotation.due`) for every certificate that
    /// [`Rotations::due_certificates`] would list, in transactions of at most a few
    /// thousand rows. Idempotent and safe under concurrency: a certificate gets one
    /// rotation row, ever. Returns how many this call opened.
    async fn open_due_rotations(
        &self,
        now: i64,
        expiring_before: Option<i64>,
    ) -> Result<u64, RegistryError>;

    /// Opens a rotation (state `due`, event `rotation.due`) for each of `serials` that a
    /// sweep could rotate (`active`, delivered, no rotation row yet), whatever its
    /// renewal point: an operator's decision (the audit's mitigation). Returns the
    /// serials it opened, sorted; the others are left as they are.
    async fn open_rotations_for(
        &self,
        serials: &[String],
        now: i64,
    ) -> Result<Vec<String>, RegistryError>;

    /// Claims up to `limit` rotations in state `due` whose old certificate has origin
    /// `generated` and whose lease is free or expired (`lease_until < now`): sets
    /// `lease_owner = owner`, `lease_until = now + lease_secs`. Two concurrent callers
    /// never get the same rotation. Ordered by (due_at, old_serial).
    async fn claim_rotations(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: u32,
    ) -> Result<Vec<RotationClaim>, RegistryError>;

    /// Commits pre-issued replacements in ONE transaction. For each item whose rotation
    /// is still `due` and leased by `owner`: inserts `new` as `active`, undelivered,
    /// `replaces = old_serial`, `registered_at = at` if the old certificate was
    /// registered; copies the old certificate's policy attachments; the rotation becomes
    /// `issued` with `new_serial` and the sealed key, lease cleared; events
    /// `certificate.issued` and `rotation.issued`. Any other item (lease lost, state
    /// changed) writes nothing and yields `false`. A duplicate serial/fingerprint fails
    /// the call ([`RegistryError::DuplicateSerial`]) and commits nothing.
    async fn complete_rotations(
        &self,
        owner: &str,
        items: &[PreparedReplacement],
    ) -> Result<Vec<bool>, RegistryError>;

    /// Records a failed attempt on a rotation leased by `owner`: `attempts + 1`,
    /// `last_error`, lease cleared, event `rotation.failed`; once `attempts` reaches
    /// `max_attempts` the state becomes `failed`. Returns false (nothing written) if the
    /// lease is not `owner`'s.
    async fn fail_rotation(
        &self,
        owner: &str,
        old_serial: &str,
        error: &str,
        at: i64,
        max_attempts: u32,
    ) -> Result<bool, RegistryError>;

    /// A replacement the device receives in the same exchange (EST re-enrollment, or a
    /// key generated on demand), in ONE transaction:
    /// - the authenticated certificate must exist (`unknown_certificate`), belong to
    ///   `thing_name` (`wrong_thing`) and not be revoked (`certificate_revoked`);
    /// - no certificate of the thing, in any status, may have the new public key
    ///   (`key_reused`);
    /// - with a `sealed_key`: no replacement of the authenticated certificate may be
    ///   waiting to be handed out (rotation `issued` or `delivered` with its sealed key,
    ///   new certificate `active`): `replacement_pending` (concurrent fetches get one
    ///   key, not one each);
    /// - with `max_replacements`: fewer certificates than that may already replace the
    ///   authenticated one (`replacement_limit`);
    /// - `new` is inserted `active`, `delivered_at = at`, `replaces =
    ///   authenticated_serial`, `registered_at = at` if the authenticated certificate
    ///   was registered; its policy attachments are copied (event `certificate.issued`);
    /// - the authenticated certificate, if `active`, becomes `superseded` (event
    ///   `certificate.superseded`);
    /// - other `active` certificates that replace the authenticated one (replacements
    ///   never used) are revoked, reason `superseded` (event `certificate.revoked`);
    /// - the authenticated certificate's rotation row is created or updated to
    ///   `delivered` with `new_serial` and `sealed_key` (cleared if `None`) (event
    ///   `rotation.delivered`).
    ///
    /// `Refused` writes nothing. A duplicate serial fails with `DuplicateSerial`.
    async fn replace_certificate(
        &self,
        replacement: &Replacement,
    ) -> Result<ReplaceOutcome, RegistryError>;

    /// Hands out the replacement of `old_serial` whose sealed key is held, in ONE
    /// transaction: if its rotation is `issued`, the rotation becomes `delivered` (the
    /// sealed key is kept until the replacement's first use confirms the rotation, or the
    /// rotation is cancelled), the new certificate gets `delivered_at = at` (event
    /// `certificate.delivered`), the old one becomes `superseded` (event
    /// `certificate.superseded`), event `rotation.delivered`. If it is `delivered`
    /// already, with its sealed key and the new certificate still `active`, the same
    /// certificate and key are returned again (`again`, nothing written): a device that
    /// lost the reply, or several concurrent requests, get one key. `None` (nothing
    /// written) otherwise.
    async fn take_replacement(
        &self,
        old_serial: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, RegistryError>;

    /// Called when certificate `serial` authenticates. If it replaces a certificate that
    /// is not revoked, in ONE transaction: that certificate is revoked (reason
    /// `superseded`, event `certificate.revoked`) and its rotation becomes `confirmed`
    /// (event `rotation.confirmed`). Returns the revoked serial; `None` if there was
    /// nothing to confirm. Safe under concurrency (confirms once).
    async fn confirm_replacement(
        &self,
        serial: &str,
        at: i64,
    ) -> Result<Option<String>, RegistryError>;

    /// The rotation whose old certificate is `old_serial`.
    async fn get_rotation(&self, old_serial: &str)
    -> Result<Option<RotationRecord>, RegistryError>;

    /// Rotations matching `filter`, ordered by (due_at, old_serial), at most
    /// `filter.limit`.
    async fn list_rotations(
        &self,
        filter: &RotationFilter,
    ) -> Result<Vec<RotationRecord>, RegistryError>;

    /// Counts the open rotations (state `due`) at `now`: claimable, under an unexpired
    /// lease (and when the last lease expires), waiting for devices. One indexed query.
    async fn rotation_backlog(&self, now: i64) -> Result<RotationBacklog, RegistryError>;
}

/// Revocation and the CRLs (operators, the CRL publisher, the handshake's revoked set).
#[async_trait]
pub trait Revocations: Send + Sync {
    /// Serials of revoked certificates that have not expired at `now` (`not_after >=
    /// now`), sorted (for the handshake check).
    async fn revoked_serials(&self, now: i64) -> Result<Vec<String>, RegistryError>;

    /// Revokes in ONE transaction: for `Serial`, that certificate and its replacements
    /// that were never delivered; for `Thing`, every certificate of the thing that is not
    /// revoked. Each gets `status = revoked`, `revoked_at`, `revocation_reason` and an
    /// event `certificate.revoked` (detail: reason); open rotations of revoked
    /// certificates (`due`/`issued`/`delivered`) become `cancelled`, sealed keys
    /// deleted. Returns the certificates revoked by this call (already revoked ones are
    /// left alone; an empty result means nothing was left to revoke). An unknown serial
    /// or thing is [`RegistryError::NotFound`].
    async fn revoke(&self, revocation: &Revocation) -> Result<Vec<RevokedEntry>, RegistryError>;

    /// Revoked certificates that have not expired at `now` (`not_after >= now`), sorted
    /// by serial: what the CRL lists.
    async fn revoked_entries(&self, now: i64) -> Result<Vec<RevokedEntry>, RegistryError>;

    /// The stored CRL with the highest number.
    async fn latest_crl(&self) -> Result<Option<StoredCrl>, RegistryError>;

    /// Stores a CRL if its number is greater than every stored one (else `false`,
    /// nothing written: another publisher was first; re-read and retry), and prunes all
    /// but the newest [`CRLS_KEPT`].
    async fn store_crl(&self, crl: &StoredCrl) -> Result<bool, RegistryError>;
}

/// The AWS IoT mirror: its settings, the outbox the event log fills, the AWS ids recorded (the mirror worker).
#[async_trait]
pub trait MirrorOutbox: Send + Sync {
    /// The AWS mirror settings, if `aws enable` ever ran.
    async fn mirror_settings(&self) -> Result<Option<MirrorSettings>, RegistryError>;

    /// Stores `settings` with `enabled = true` (event `mirror.enabled`). If the mirror
    /// was not enabled before, queues in the same transaction the CA, every thing and
    /// every certificate that has not expired at `at`, so an existing registry is
    /// mirrored whole. Returns the operations queued.
    async fn enable_mirror(&self, settings: &MirrorSettings, at: i64)
    -> Result<u64, RegistryError>;

    /// Stops queueing mirror operations (event `mirror.disabled`); queued ones stay.
    /// `false` if it was not enabled.
    async fn disable_mirror(&self, at: i64) -> Result<bool, RegistryError>;

    /// Records the issuing CA's AWS id and the account's ARN prefix.
    async fn record_mirror_ca(
        &self,
        ca_certificate_id: &str,
        arn_prefix: &str,
        at: i64,
    ) -> Result<(), RegistryError>;

    /// Records the AWS id and ARN of a mirrored certificate (replacing what was recorded).
    /// `aws enable` with another region or endpoint forgets them all.
    async fn record_mirrored_certificate(
        &self,
        certificate: &MirroredCertificate,
    ) -> Result<(), RegistryError>;

    /// The AWS id and ARN recorded for one certificate.
    async fn mirrored_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<MirroredCertificate>, RegistryError>;

    /// Every recorded AWS certificate id (reconcile).
    async fn mirrored_certificates(&self) -> Result<Vec<MirroredCertificate>, RegistryError>;

    /// Queues operations (reconcile), in order, in one transaction. An operation whose
    /// subject already has one of its kind waiting (queued, not in flight) is not
    /// queued again. Returns how many were queued.
    async fn queue_mirror_ops(&self, ops: &[NewMirrorOp], at: i64) -> Result<u64, RegistryError>;

    /// Leases up to `limit` operations that are at the head of their queue (no earlier
    /// pending one), not in backoff at `now` (unless `ignore_backoff`) and not leased
    /// to a live owner, until `now + lease_secs`. In id order.
    async fn claim_mirror_ops(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: u32,
        ignore_backoff: bool,
    ) -> Result<Vec<MirrorOp>, RegistryError>;

    /// Records how claimed operations went, in one transaction: applied ones are
    /// deleted, retried ones get their error and backoff, parked ones are parked (event
    /// `mirror.parked`). Results for operations no longer leased to `owner` are
    /// ignored. Returns how many results were recorded.
    async fn finish_mirror_ops(
        &self,
        owner: &str,
        results: &[MirrorResult],
        at: i64,
    ) -> Result<u64, RegistryError>;

    /// Counts and the oldest pending operation; at most `parked_limit` parked ones.
    async fn mirror_backlog(&self, parked_limit: u32) -> Result<MirrorBacklog, RegistryError>;

    /// Puts parked operations back in their queues (attempts reset), e.g. after the
    /// cause was fixed. Returns how many.
    async fn requeue_parked_mirror_ops(&self, at: i64) -> Result<u64, RegistryError>;
}

/// Read-only lookups and listings (the CLI, the effective policy, the audit).
#[async_trait]
pub trait Queries: Send + Sync {
    /// The thing named `name`; `None` if the registry does not have it.
    async fn get_thing(&self, name: &str) -> Result<Option<ThingRecord>, RegistryError>;

    /// Things ordered by name, after `filter.after` (keyset pagination), at most
    /// `filter.limit`.
    async fn list_things(&self, filter: &ThingFilter) -> Result<Vec<ThingRecord>, RegistryError>;

    /// The certificate with this serial, in whatever status; `None` if unknown.
    async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError>;

    /// Certificates matching `filter`, ordered by (thing_name, created_at, serial), at
    /// most `filter.limit`.
    async fn list_certificates(
        &self,
        filter: &CertificateFilter,
    ) -> Result<Vec<CertificateRecord>, RegistryError>;

    /// Events matching `filter`, oldest first (by id), at most `filter.limit`.
    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>, RegistryError>;

    /// How many things, certificates (by status) and events there are, read from one
    /// snapshot so the numbers agree.
    async fn counts(&self) -> Result<RegistryCounts, RegistryError>;

    /// The policy named `name`; `None` if the registry does not have it.
    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError>;

    /// All policies, by name.
    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError>;

    /// Policies attached to any of the thing's active certificates or to one of its
    /// thing groups, distinct, by name.
    async fn policies_of_thing(&self, thing_name: &str)
    -> Result<Vec<PolicyRecord>, RegistryError>;

    /// Policies attached to one certificate, by name.
    async fn policies_of_certificate(
        &self,
        serial: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError>;
}

/// A Device Defender audit task: when it ran and its summary, in the shape of AWS's audit
/// notification (`taskId`, `taskStatus`, `auditDetails[]`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditTaskRecord {
    /// Random, 32 lowercase hex digits.
    pub task_id: String,
    /// `ON_DEMAND_AUDIT_TASK` or `SCHEDULED_AUDIT_TASK`.
    pub task_type: String,
    /// `COMPLETED` or `FAILED`.
    pub task_status: String,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix seconds.
    pub finished_at: i64,
    /// The notification document.
    pub summary: serde_json::Value,
}

/// One non-compliant resource found by one check of an audit task.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditFindingRecord {
    /// Random, 32 lowercase hex digits.
    pub finding_id: String,
    /// The task that found it.
    pub task_id: String,
    /// The check (`DEVICE_CERT_APPROACHING_EXPIRATION_CHECK`, ...).
    pub check_name: String,
    /// `CRITICAL`, `HIGH`, `MEDIUM` or `LOW`.
    pub severity: String,
    /// AWS's reason code (`CERTIFICATE_PAST_EXPIRATION`, ...).
    pub reason_code: String,
    /// Why, in words.
    pub reason_description: String,
    /// `DEVICE_CERTIFICATE`, `CA_CERTIFICATE`, `IOT_POLICY`, `CLIENT_ID`, ...
    pub resource_type: String,
    /// The resource: a certificate's serial, a policy's name, a client id.
    pub resource_id: String,
    /// What the check saw (client ids and times, days left, ...).
    pub detail: serde_json::Value,
    /// A suppression covered it when the task ran: not counted as non-compliant.
    pub suppressed: bool,
    /// Unix seconds.
    pub found_at: i64,
}

/// What the audit reads of a certificate (no DER: a fleet's worth fits in memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditedCertificate {
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// Its thing.
    pub thing_name: String,
    /// `active`, `superseded` or `revoked`.
    pub status: CertStatus,
    /// fleetcert's spelling (`p256`, `rsa2048`, ...).
    pub key_algorithm: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// Which findings [`Audits::audit_findings`] lists (all conditions must hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFindingFilter {
    /// Of this task only.
    pub task_id: Option<String>,
    /// Of this check only.
    pub check_name: Option<String>,
    /// For this resource only.
    pub resource_id: Option<String>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// Keeps a check's findings for one resource out of the non-compliant counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSuppression {
    /// The check.
    pub check_name: String,
    /// The resource (as in [`AuditFindingRecord::resource_id`]).
    pub resource_id: String,
    /// Until when (Unix seconds); `None`: until deleted.
    pub expires_at: Option<i64>,
    /// Why.
    pub description: String,
    /// When it was set (Unix seconds).
    pub created_at: i64,
}

/// The Device Defender audit: tasks and findings, suppressions, and the MQTT sessions the
/// connection-based checks read.
#[async_trait]
pub trait Audits: Send + Sync {
    /// Records a task and its findings in one transaction (event `audit.completed`).
    async fn record_audit(
        &self,
        task: &AuditTaskRecord,
        findings: &[AuditFindingRecord],
    ) -> Result<(), RegistryError>;

    /// The newest `limit` tasks, newest first.
    async fn audit_tasks(&self, limit: u32) -> Result<Vec<AuditTaskRecord>, RegistryError>;

    /// The task with this id, if any.
    async fn audit_task(&self, task_id: &str) -> Result<Option<AuditTaskRecord>, RegistryError>;

    /// Findings matching `filter`, newest first.
    async fn audit_findings(
        &self,
        filter: &AuditFindingFilter,
    ) -> Result<Vec<AuditFindingRecord>, RegistryError>;

    /// Creates or replaces the suppression of (check, resource) (event
    /// `audit.suppression_set`).
    async fn put_audit_suppression(
        &self,
        suppression: &AuditSuppression,
    ) -> Result<(), RegistryError>;

    /// Deletes a suppression; `false` if there was none (event
    /// `audit.suppression_deleted`).
    async fn delete_audit_suppression(
        &self,
        check_name: &str,
        resource_id: &str,
        at: i64,
    ) -> Result<bool, RegistryError>;

    /// Every suppression, expired ones included (the caller compares with its clock).
    async fn audit_suppressions(&self) -> Result<Vec<AuditSuppression>, RegistryError>;

    /// Every certificate in the registry, as the audit reads it, by serial.
    async fn audited_certificates(&self) -> Result<Vec<AuditedCertificate>, RegistryError>;

    /// The MQTT sessions (connection records with a client id) that began in
    /// `[since, until)`, oldest first. Records are kept per certificate up to
    /// [`MAX_CONNECTIONS_PER_CERTIFICATE`].
    async fn mqtt_sessions(
        &self,
        since: i64,
        until: i64,
    ) -> Result<Vec<ConnectionRecord>, RegistryError>;
}

/// Thing groups' policies: a policy attached to a group applies to every certificate of
/// every thing in the group, beside the certificate's own (the device state's `policies`
/// are both). The audit's ADD_THINGS_TO_THING_GROUP mitigation uses this to quarantine.
#[async_trait]
pub trait ThingGroups: Send + Sync {
    /// Attaches `policy` to `group`, creating the policy with `document` if it does not
    /// exist; a policy of that name with another document is
    /// [`RegistryError::InvalidValue`] (policies are immutable). `false` if it was
    /// attached already. Things in the group get `policies_changed_at` = `at` (event
    /// `thing_group.policy_attached`).
    async fn attach_group_policy(
        &self,
        group: &str,
        policy: &str,
        document: &serde_json::Value,
        at: i64,
    ) -> Result<bool, RegistryError>;

    /// Adds each of `things` to `group` (its `groups`, version + 1, `policies_changed_at`
    /// = `at`; event `thing.added_to_group`), in one transaction; returns those that were
    /// not in it. An unknown thing is [`RegistryError::NotFound`] and adds none.
    async fn add_things_to_group(
        &self,
        group: &str,
        things: &[String],
        at: i64,
    ) -> Result<Vec<String>, RegistryError>;

    /// The policies attached to `group`, by name.
    async fn group_policies(&self, group: &str) -> Result<Vec<String>, RegistryError>;

    /// Things whose policies through groups changed at or after `since` (name, when),
    /// oldest change first.
    async fn things_policies_changed_since(
        &self,
        since: i64,
    ) -> Result<Vec<(String, i64)>, RegistryError>;
}

/// Policy versions: `policies.document` is the default version's; replacing it keeps the
/// earlier versions (the audit's REPLACE_DEFAULT_POLICY_VERSION mitigation).
#[async_trait]
pub trait PolicyVersions: Send + Sync {
    /// Makes `document` the policy's new default version (its number returned); `None`
    /// when it is the default document already. The replaced versions are kept; a
    /// registration whose template renders any stored version of the policy still
    /// attaches it by name. Things the policy applies to get `policies_changed_at` = `at`
    /// (event `policy.default_version_replaced`). Unknown policy:
    /// [`RegistryError::NotFound`].
    async fn replace_default_policy_version(
        &self,
        policy: &str,
        document: &serde_json::Value,
        at: i64,
    ) -> Result<Option<i64>, RegistryError>;

    /// The policy's versions (number, document), oldest first; empty for a policy whose
    /// default version was never replaced (its one version is `policies.document`).
    async fn policy_versions(
        &self,
        policy: &str,
    ) -> Result<Vec<(i64, serde_json::Value)>, RegistryError>;
}

/// Provisioning by claim: claim certificates and the certificates the Fleet Provisioning
/// API issues until RegisterThing (the broker integration, `claims` commands).
#[async_trait]
pub trait Claims: Send + Sync {
    /// Records a claim (event `claim.created`). A name, serial or fingerprint already
    /// used is [`RegistryError::DuplicateSerial`].
    async fn create_claim(&self, claim: &NewClaim) -> Result<(), RegistryError>;

    /// Every claim, by name.
    async fn list_claims(&self) -> Result<Vec<ClaimRecord>, RegistryError>;

    /// The claim with this name.
    async fn get_claim(&self, name: &str) -> Result<Option<ClaimRecord>, RegistryError>;

    /// The claim whose certificate has this SHA-256 fingerprint.
    async fn claim_by_fingerprint(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Option<ClaimRecord>, RegistryError>;

    /// Revokes a claim (event `claim.revoked`) and the certificates it got that are still
    /// waiting for RegisterThing. `false` if it was revoked already; an unknown name is
    /// [`RegistryError::NotFound`].
    async fn revoke_claim(&self, name: &str, at: i64) -> Result<bool, RegistryError>;

    /// Records a certificate the Fleet Provisioning API issued, before it is handed out
    /// (event `claim.certificate_issued`).
    async fn record_provisional(&self, provisional: &NewProvisional) -> Result<(), RegistryError>;

    /// The provisional certificate of an ownership token (by the token's SHA-256).
    async fn provisional_by_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<ProvisionalRecord>, RegistryError>;

    /// RegisterThing, in ONE transaction: checks the token (known, pending, not expired
    /// at `registration.at`, issued to this session and claim), the claim (active, under
    /// `max_uses`), creates the thing if missing (event `thing.created`), inserts the
    /// certificate as `active`, delivered (event `certificate.issued`), registers it as
    /// [`Registrations::register`] does, spends the token and counts a use of the claim
    /// (event `claim.used`).
    async fn register_provisional(
        &self,
        registration: &ProvisionalRegistration,
    ) -> Result<ProvisionalOutcome, RegistryError>;

    /// Several [`Claims::record_provisional`]s in one transaction and one durable commit
    /// (group commit); a database error (a duplicate serial included) records none of
    /// them, and the caller may then record them one by one. The default records one
    /// after another.
    async fn record_provisional_batch(
        &self,
        batch: &[NewProvisional],
    ) -> Result<(), RegistryError> {
        for provisional in batch {
            self.record_provisional(provisional).await?;
        }
        Ok(())
    }

    /// Several [`Claims::register_provisional`]s in one transaction and one durable commit
    /// (group commit), each as it would run after the ones before it, outcomes in order;
    /// a database error fails the whole group and writes nothing. The default registers
    /// one after another. Callers group only as many as
    /// [`Registrations::registration_group_size`] says is worth it.
    async fn register_provisional_batch(
        &self,
        batch: &[ProvisionalRegistration],
    ) -> Result<Vec<ProvisionalOutcome>, RegistryError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for registration in batch {
            outcomes.push(self.register_provisional(registration).await?);
        }
        Ok(outcomes)
    }

    /// Revokes the provisional certificates whose token expired before `now` unused
    /// (they drop onto the CRL); returns their serials.
    async fn expire_provisional(&self, now: i64) -> Result<Vec<String>, RegistryError>;
}

/// The one storage interface: the sum of the role traits, which both backends implement
/// identically (each flow written once over the backend's dialect; the story tests in
/// `tests/` run against each). A consumer names the role it needs (`use
/// fleetcert_registry::Rotations`) to call its methods on an `Arc<dyn Registry>`, or
/// imports them all with `use fleetcert_registry::roles::*`.
#[async_trait]
pub trait Registry:
    Issuance
    + Registrations
    + Rotations
    + Revocations
    + MirrorOutbox
    + Queries
    + Claims
    + Audits
    + ThingGroups
    + PolicyVersions
    + fmt::Debug
{
    /// Which backend this is: `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// A cheap round trip to the database (a read).
    async fn ping(&self) -> Result<(), RegistryError>;

    /// Whether the database takes a durable write now, through the same pool and the
    /// same kind of transaction as a registration (SQLite: `BEGIN IMMEDIATE`, a header
    /// write, a synchronous commit; PostgreSQL: a transaction that gets an id and
    /// commits). A full disk, a read-only database or a pool of broken connections fail
    /// it; for `/healthz`. Probes are serialised and a success is reused for a fraction
    /// of a second, so polling cannot turn into a stream of commits.
    async fn probe_writes(&self) -> Result<(), RegistryError>;
}

/// Every role trait, for `use fleetcert_registry::roles::*`.
pub mod roles {
    pub use crate::{
        Audits, Claims, Issuance, MirrorOutbox, PolicyVersions, Queries, Registrations, Registry,
        Revocations, Rotations, ThingGroups,
    };
}

/// Opens (creating if needed) and migrates the registry at `url`:
/// - `sqlite:PATH` / `sqlite://PATH` or a plain file path: SQLite, WAL, `synchronous=FULL`;
/// - `postgres://…` / `postgresql://…`: PostgreSQL.
///
/// Fails with [`RegistryError::Unreachable`] naming the URL (password redacted) if the
/// database cannot be reached or opened.
pub async fn open(url: &str) -> Result<Arc<dyn Registry>, RegistryError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::PgRegistry::open(url).await?));
    }
    let target = sqlite_target(url)?;
    Ok(Arc::new(sqlite::SqliteRegistry::open(url, target).await?))
}

/// What a non-PostgreSQL URL names: `sqlite:PATH`, `sqlite://PATH` (query string
/// ignored), `sqlite::memory:`, or a plain path.
fn sqlite_target(url: &str) -> Result<sqlite::SqliteTarget, RegistryError> {
    let unusable = |reason: &str| RegistryError::Unreachable {
        url: redact_url(url),
        reason: reason.to_owned(),
    };
    let path = match url.strip_prefix("sqlite:") {
        Some(rest) => {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            rest.split_once('?').map_or(rest, |(path, _)| path)
        }
        None => {
            if let Some((scheme, _)) = url.split_once("://")
                && !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            {
                return Err(unusable(&format!(
                    "unsupported database URL scheme {scheme:?} \
                     (expected sqlite:PATH, a file path, or postgres://)"
                )));
            }
            url
        }
    };
    match path {
        "" => Err(unusable("no database file path given")),
        ":memory:" => Ok(sqlite::SqliteTarget::Memory),
        path => Ok(sqlite::SqliteTarget::File(path.into())),
    }
}

/// `url` with any password replaced by `***`, for messages and logs: the `user:pass@`
/// form and the `password` / `sslpassword` query parameters (`?password=…`, as libpq and
/// sqlx accept them; the parameter name may be percent-encoded or in any case).
pub fn redact_url(url: &str) -> String {
    // The userinfo first, on the whole URL (a stray '@' in the query masks more, never
    // less), then the query parameters of what is left.
    let url = redact_userinfo(url);
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_parameter(key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `password`, `sslpassword` (any case, `+`/percent-encoding decoded).
fn is_secret_parameter(key: &str) -> bool {
    let bytes = key.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    decoded.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            b'+' => decoded.push(b' '),
            b => decoded.push(b),
        }
        i += 1;
    }
    let key = String::from_utf8_lossy(&decoded)
        .trim()
        .to_ascii_lowercase();
    key.contains("password")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://fleet:s3cret@db.example:5432/fleetcert"),
            "postgres://fleet:***@db.example:5432/fleetcert"
        );
        assert_eq!(
            redact_url("postgresql://fleet@db/fleetcert"),
            "postgresql://fleet@db/fleetcert"
        );
        assert_eq!(
            redact_url("postgres://db.example/fleetcert"),
            "postgres://db.example/fleetcert"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss:w@rd@host/db"),
            "postgres://u:***@host/db"
        );
        assert_eq!(
            redact_url("sqlite:/var/lib/fleetcert/registry.db"),
            "sqlite:/var/lib/fleetcert/registry.db"
        );
        assert_eq!(redact_url("/data/registry.db"), "/data/registry.db");
        assert_eq!(redact_url("/data/a@b/registry.db"), "/data/a@b/registry.db");
    }

    #[test]
    fn redact_url_hides_query_passwords() {
        assert_eq!(
            redact_url("postgres://fleet@db/fleetcert?password=s3cret&sslmode=require"),
            "postgres://fleet@db/fleetcert?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/f?user=u&PassWord=a&sslpassword=b&pass%77ord=c"),
            "postgres://db/f?user=u&PassWord=***&sslpassword=***&pass%77ord=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@db/f?password=q"),
            "postgres://u:***@db/f?password=***"
        );
        assert_eq!(
            redact_url("postgres://db/f?sslmode=disable"),
            "postgres://db/f?sslmode=disable"
        );
    }

    #[test]
    fn sqlite_urls() {
        let path = |url: &str| match sqlite_target(url).unwrap() {
            sqlite::SqliteTarget::File(p) => p.display().to_string(),
            sqlite::SqliteTarget::Memory => ":memory:".to_owned(),
        };
        assert_eq!(path("sqlite:/tmp/r.db"), "/tmp/r.db");
        assert_eq!(path("sqlite:///tmp/r.db"), "/tmp/r.db");
        assert_eq!(path("sqlite://data/r.db?mode=rwc"), "data/r.db");
        assert_eq!(path("sqlite:r.db"), "r.db");
        assert_eq!(path("data/registry.db"), "data/registry.db");
        assert_eq!(path("sqlite::memory:"), ":memory:");
        assert!(matches!(
            sqlite_target("mysql://u:pw@h/db"),
            Err(RegistryError::Unreachable { url, .. }) if url == "mysql://u:***@h/db"
        ));
        assert!(sqlite_target("sqlite:").is_err());
    }
}
