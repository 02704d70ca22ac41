//! Loading the issuing CA and issuing device certificates.

use crate::hierarchy::{MAX_DAYS, common_name, random_serial, validity};
use crate::signer::{RcgenSigner, signing_error};
use crate::x509::{cert_der, parse_cert, rfc4514, sha256_hex};
use crate::{
    CaError, CaSigner, DeviceKey, DeviceProfile, IssuedCertificate, IssuingCa, KeyAlgorithm,
    ThingName, keys,
};
use pkcs8::der::pem::LineEnding;
use rcgen::{
    CertificateParams, CrlDistributionPoint, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose, PublicKeyData as _, SerialNumber,
};
use ring::rand::SystemRandom;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::ParsedExtension;

/// Everything issuance needs, parsed once.
pub(crate) struct Loaded {
    pub(crate) issuer: Issuer<'static, RcgenSigner>,
    pub(crate) issuing_cert_pem: String,
    pub(crate) root_cert_pem: String,
    pub(crate) subject: String,
    pub(crate) fingerprint_sha256_hex: String,
    pub(crate) rng: SystemRandom,
    /// The issuing certificate's subject Name, DER, exactly as in the certificate: CRLs
    /// must name their issuer with it.
    pub(crate) subject_der: Vec<u8>,
    /// The issuing certificate's SubjectKeyIdentifier (RFC 7093 method 1 for CAs we
    /// made; computed that way if the certificate has none), for the CRL's AKI.
    pub(crate) key_id: Vec<u8>,
}

fn canonical_pem(der: &[u8]) -> String {
    pkcs8::der::pem::encode_string("CERTIFICATE", LineEnding::LF, der)
        .expect("PEM encoding of a parsed certificate")
}

pub(crate) fn load(
    issuing_cert_pem: &str,
    signer: Box<dyn CaSigner>,
    root_cert_pem: &str,
) -> Result<Loaded, CaError> {
    let in_cert = |what: &'static str| {
        move |e: CaError| match e {
            CaError::MalformedCertificate(why) => {
                CaError::MalformedCertificate(format!("{what} certificate: {why}"))
            }
            other => other,
        }
    };
    let issuing_der = cert_der(issuing_cert_pem.as_bytes()).map_err(in_cert("issuing CA"))?;
    let root_der = cert_der(root_cert_pem.as_bytes()).map_err(in_cert("root CA"))?;
    let issuing = parse_cert(&issuing_der).map_err(in_cert("issuing CA"))?;
    let root = parse_cert(&root_der).map_err(in_cert("root CA"))?;

    if issuing.public_key().subject_public_key.data.as_ref() != signer.public_key() {
        return Err(CaError::KeyMismatch);
    }

    match issuing.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(CaError::MalformedCertificate(
                "the issuing CA certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
    }
    if matches!(issuing.key_usage(), Ok(Some(ku)) if !ku.value.key_cert_sign()) {
        return Err(CaError::MalformedCertificate(
            "the issuing CA certificate's key usage does not allow keyCertSign".into(),
        ));
    }
    if root.verify_signature(None).is_err() {
        return Err(CaError::MalformedCertificate(
            "the root CA certificate is not self-signed".into(),
        ));
    }
    if issuing.issuer().as_raw() != root.subject().as_raw()
        && rfc4514(issuing.issuer()) != rfc4514(root.subject())
    {
        return Err(CaError::BrokenChain(format!(
            "its issuer is {:?} but the root is {:?}",
            rfc4514(issuing.issuer()),
            rfc4514(root.subject())
        )));
    }
    if issuing.verify_signature(Some(root.public_key())).is_err() {
        return Err(CaError::BrokenChain(
            "its signature does not verify with the root CA's public key".into(),
        ));
    }

    let subject = rfc4514(issuing.subject());
    let subject_der = issuing.subject().as_raw().to_vec();
    let key_id = issuing
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap_or_else(|| keys::key_id(&issuing.public_key().subject_public_key.data));
    let signer = RcgenSigner::new(signer);
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(issuing_der.as_slice()), signer)
        .map_err(|e| CaError::MalformedCertificate(format!("issuing CA certificate: {e}")))?;
    Ok(Loaded {
        issuer,
        issuing_cert_pem: canonical_pem(&issuing_der),
        root_cert_pem: canonical_pem(&root_der),
        subject,
        fingerprint_sha256_hex: sha256_hex(&issuing_der),
        rng: SystemRandom::new(),
        subject_der,
        key_id,
    })
}

/// A CRL distribution point URI must be ASCII (IA5String) with a scheme.
fn check_crl_url(url: &str) -> Result<(), CaError> {
    let scheme_ok = url.split_once(':').is_some_and(|(scheme, rest)| {
        !rest.is_empty()
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if !scheme_ok || !url.chars().all(|c| c.is_ascii_graphic()) {
        return Err(CaError::InvalidProfile(format!(
            "CRL URL {url:?} is not an absolute ASCII URI such as http://pki.example.com/ca.crl"
        )));
    }
    Ok(())
}

pub(crate) fn check_profile(profile: &DeviceProfile) -> Result<(), CaError> {
    if profile.validity_days == 0 || profile.validity_days > MAX_DAYS {
        return Err(CaError::InvalidProfile(format!(
            "validity must be 1 to {MAX_DAYS} days, got {}",
            profile.validity_days
        )));
    }
    if profile.backdate.is_negative() {
        return Err(CaError::InvalidProfile(format!(
            "backdate must not be negative, got {}",
            profile.backdate
        )));
    }
    if let Some(url) = &profile.crl_url {
        check_crl_url(url)?;
    }
    Ok(())
}

pub(crate) fn issue(
    ca: &IssuingCa,
    thing: &ThingName,
    key: DeviceKey<'_>,
    profile: &DeviceProfile,
    now: OffsetDateTime,
) -> Result<IssuedCertificate, CaError> {
    check_profile(profile)?;
    let (not_before, not_after) = validity(now, profile.backdate, profile.validity_days)?;

    let generated;
    let (public, key_algorithm, private_key) = match key {
        DeviceKey::Generate => {
            let g = keys::generate(profile.key_algorithm)?;
            generated = g.public;
            (&generated, profile.key_algorithm, Some(g.private))
        }
        DeviceKey::Csr(csr) => (&csr.public, csr.key_algorithm, None),
    };

    let serial = random_serial(&ca.inner.rng)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.distinguished_name = common_name(thing.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = match key_algorithm {
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
        _ => vec![KeyUsagePurpose::DigitalSignature],
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if let Some(url) = &profile.crl_url {
        params.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec![url.clone()],
        }];
    }
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = keys::key_identifier(public);

    let cert = params
        .signed_by(public, &ca.inner.issuer)
        .map_err(signing_error)?;
    let der = cert.der().to_vec();
    Ok(IssuedCertificate {
        serial_hex: hex::encode(serial),
        pem: cert.pem(),
        fingerprint_sha256_hex: sha256_hex(&der),
        public_key_sha256_hex: sha256_hex(&public.subject_public_key_info()),
        der,
        not_before,
        not_after,
        key_algorithm,
        private_key,
    })
}

/// A TLS server certificate for the JITP listener: CN = first name, every name as a SAN
/// (IP addresses as iPAddress), EKU serverAuth, a generated P-256 key.
pub(crate) fn issue_server(
    ca: &IssuingCa,
    names: &[String],
    validity_days: u32,
    now: OffsetDateTime,
) -> Result<IssuedCertificate, CaError> {
    let first = names
        .first()
        .ok_or_else(|| CaError::InvalidProfile("a server certificate needs a name".into()))?;
    let (not_before, not_after) = validity(now, time::Duration::minutes(5), validity_days)?;
    let g = keys::generate(KeyAlgorithm::P256)?;
    let serial = random_serial(&ca.inner.rng)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.distinguished_name = common_name(first);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(rcgen::SanType::IpAddress(ip)),
            Err(_) => rcgen::string::Ia5String::try_from(name.as_str())
                .map(rcgen::SanType::DnsName)
                .map_err(|_| {
                    CaError::InvalidProfile(format!(
                        "server name {name:?} is not a DNS name or IP address"
                    ))
                }),
        })
        .collect::<Result<_, _>>()?;
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = keys::key_identifier(&g.public);
    let cert = params
        .signed_by(&g.public, &ca.inner.issuer)
        .map_err(signing_error)?;
    let der = cert.der().to_vec();
    Ok(IssuedCertificate {
        serial_hex: hex::encode(serial),
        pem: cert.pem(),
        fingerprint_sha256_hex: sha256_hex(&der),
        public_key_sha256_hex: sha256_hex(&g.public.subject_public_key_info()),
        der,
        not_before,
        not_after,
        key_algorithm: KeyAlgorithm::P256,
        private_key: Some(g.private),
    })
}

/// A certificate proving possession of the CA key to AWS IoT (RegisterCACertificate):
/// CN = the account's registration code, a throwaway P-256 key, one day of validity.
pub(crate) fn issue_verification(
    ca: &IssuingCa,
    registration_code: &str,
    now: OffsetDateTime,
) -> Result<IssuedCertificate, CaError> {
    if registration_code.is_empty() || registration_code.len() > 64 {
        return Err(CaError::InvalidProfile(format!(
            "registration code {registration_code:?} is empty or too long"
        )));
    }
    let (not_before, not_after) = validity(now, time::Duration::minutes(5), 1)?;
    let g = keys::generate(KeyAlgorithm::P256)?;
    let serial = random_serial(&ca.inner.rng)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.distinguished_name = common_name(registration_code);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = keys::key_identifier(&g.public);
    let cert = params
        .signed_by(&g.public, &ca.inner.issuer)
        .map_err(signing_error)?;
    let der = cert.der().to_vec();
    Ok(IssuedCertificate {
        serial_hex: hex::encode(serial),
        pem: cert.pem(),
        fingerprint_sha256_hex: sha256_hex(&der),
        public_key_sha256_hex: sha256_hex(&g.public.subject_public_key_info()),
        der,
        not_before,
        not_after,
        key_algorithm: KeyAlgorithm::P256,
        private_key: None,
    })
}
