//! Root + issuing CA creation, and helpers shared with issuance.

use crate::{CaError, HierarchyOptions, NewHierarchy, keys};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime, UtcOffset};

/// RFC 5280's upper bound for a common name.
const MAX_CN_CHARS: usize = 64;
const ISSUING_SUFFIX: &str = " Issuing CA";
const ROOT_SUFFIX: &str = " Root CA";
/// Longest validity accepted anywhere (about 100 years).
pub(crate) const MAX_DAYS: u32 = 36_500;
/// CA certificates are backdated like device certificates.
const CA_BACKDATE: Duration = Duration::minutes(5);

/// 16 random octets, first in 0x01..=0x7f: a positive INTEGER that encodes in exactly
/// 16 octets (RFC 5280 allows up to 20).
pub(crate) fn random_serial(rng: &SystemRandom) -> Result<[u8; 16], CaError> {
    let failed =
        |_| CaError::Signing("the operating system's random number generator failed".into());
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).map_err(failed)?;
    serial[0] &= 0x7f;
    while serial[0] == 0 {
        let mut b = [0u8; 1];
        rng.fill(&mut b).map_err(failed)?;
        serial[0] = b[0] & 0x7f;
    }
    Ok(serial)
}

/// UTC, whole seconds: what the certificate can represent.
pub(crate) fn to_cert_time(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    t - Duration::nanoseconds(i64::from(t.nanosecond()))
}

/// notBefore/notAfter for a certificate issued at `now`.
pub(crate) fn validity(
    now: OffsetDateTime,
    backdate: Duration,
    days: u32,
) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let out_of_range = || CaError::InvalidProfile("the validity period is out of range".into());
    let not_before = now.checked_sub(backdate).ok_or_else(out_of_range)?;
    let not_after = now
        .checked_add(Duration::days(i64::from(days)))
        .ok_or_else(out_of_range)?;
    let (not_before, not_after) = (to_cert_time(not_before), to_cert_time(not_after));
    if !(1..=9999).contains(&not_before.year()) || !(1..=9999).contains(&not_after.year()) {
        return Err(out_of_range());
    }
    Ok((not_before, not_after))
}

pub(crate) fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn check_options(opts: &HierarchyOptions) -> Result<(), CaError> {
    let invalid = |why: String| Err(CaError::InvalidProfile(why));
    let cn = &opts.common_name;
    if cn.trim().is_empty() {
        return invalid("the CA common name is empty".into());
    }
    if cn.trim() != cn {
        return invalid(format!(
            "the CA common name {cn:?} has leading or trailing spaces"
        ));
    }
    if cn.chars().any(char::is_control) {
        return invalid(format!(
            "the CA common name {cn:?} contains control characters"
        ));
    }
    let max = MAX_CN_CHARS - ISSUING_SUFFIX.len();
    if cn.chars().count() > max {
        return invalid(format!(
            "the CA common name is {} characters long; at most {max} fit in \"<name>{ISSUING_SUFFIX}\"",
            cn.chars().count()
        ));
    }
    for (what, days) in [("root", opts.root_days), ("issuing", opts.issuing_days)] {
        if days == 0 || days > MAX_DAYS {
            return invalid(format!(
                "{what} CA validity must be 1 to {MAX_DAYS} days, got {days}"
            ));
        }
    }
    if opts.issuing_days > opts.root_days {
        return invalid(format!(
            "the issuing CA ({} days) would outlive the root CA ({} days)",
            opts.issuing_days, opts.root_days
        ));
    }
    Ok(())
}

pub(crate) fn create(
    opts: &HierarchyOptions,
    now: OffsetDateTime,
) -> Result<NewHierarchy, CaError> {
    check_options(opts)?;
    let rng = SystemRandom::new();
    let signing = |e: rcgen::Error| CaError::Signing(e.to_string());

    let root = keys::generate(opts.key_algorithm)?;
    let root_signer = keys::signing_key(&root.private)?;
    let issuing = keys::generate(opts.key_algorithm)?;

    let mut root_params = CertificateParams::default();
    (root_params.not_before, root_params.not_after) = validity(now, CA_BACKDATE, opts.root_days)?;
    root_params.serial_number = Some(SerialNumber::from_slice(&random_serial(&rng)?));
    root_params.distinguished_name = common_name(&format!("{}{ROOT_SUFFIX}", opts.common_name));
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root_params.key_identifier_method = keys::key_identifier(&root.public);
    let root_cert = root_params.self_signed(&root_signer).map_err(signing)?;

    let mut issuing_params = CertificateParams::default();
    (issuing_params.not_before, issuing_params.not_after) =
        validity(now, CA_BACKDATE, opts.issuing_days)?;
    issuing_params.serial_number = Some(SerialNumber::from_slice(&random_serial(&rng)?));
    issuing_params.distinguished_name =
        common_name(&format!("{}{ISSUING_SUFFIX}", opts.common_name));
    issuing_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    issuing_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    issuing_params.use_authority_key_identifier_extension = true;
    issuing_params.key_identifier_method = keys::key_identifier(&issuing.public);
    let root_issuer = Issuer::from_params(&root_params, &root_signer);
    let issuing_cert = issuing_params
        .signed_by(&issuing.public, &root_issuer)
        .map_err(signing)?;

    Ok(NewHierarchy {
        root_cert_pem: root_cert.pem(),
        root_key: root.private,
        issuing_cert_pem: issuing_cert.pem(),
        issuing_key: issuing.private,
    })
}
