//! Reading X.509 structures: public-key classification, RFC 4514 names, PEM/DER input.

use crate::keys::{
    self, OID_EC_PUBLIC_KEY, OID_ED25519, OID_P256, OID_P384, OID_RSA_ENCRYPTION, RSA_MAX_BITS,
    RSA_MIN_BITS, RawPublicKey,
};
use crate::{CaError, KeyAlgorithm};
use x509_parser::asn1_rs::{Tag, ToDer};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::{AttributeTypeAndValue, SubjectPublicKeyInfo, X509Name};

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Strips leading zero octets of a big-endian unsigned integer.
fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

fn bit_len(unsigned_be: &[u8]) -> usize {
    match strip_zeros(unsigned_be) {
        [] => 0,
        b => (b.len() - 1) * 8 + (8 - b[0].leading_zeros() as usize),
    }
}

/// A public key we accept, ready for rcgen.
#[derive(Debug)]
pub(crate) struct AcceptedKey {
    pub(crate) algorithm: KeyAlgorithm,
    pub(crate) public: RawPublicKey,
}

fn ec_curve(spki: &SubjectPublicKeyInfo<'_>) -> Option<String> {
    spki.algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.to_id_string())
}

/// Decides whether a device public key is one we certify. `Err` carries an
/// operator-readable reason.
pub(crate) fn accept_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<AcceptedKey, String> {
    let oid = spki.algorithm.algorithm.to_id_string();
    let key = &spki.subject_public_key.data;
    let algorithm = match oid.as_str() {
        OID_RSA_ENCRYPTION => {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err("RSA public key is not a valid RSAPublicKey structure".into());
            };
            let bits = bit_len(rsa.modulus);
            if bits < RSA_MIN_BITS {
                return Err(format!(
                    "RSA {bits}-bit key; at least {RSA_MIN_BITS} bits required"
                ));
            }
            if bits > RSA_MAX_BITS {
                return Err(format!(
                    "RSA {bits}-bit key; at most {RSA_MAX_BITS} bits supported"
                ));
            }
            let e = strip_zeros(rsa.exponent);
            let e_val = (e.len() <= 8).then(|| e.iter().fold(0u64, |a, &b| (a << 8) | b as u64));
            match e_val {
                Some(v) if v >= 3 && v % 2 == 1 && v < (1 << 33) => {}
                _ => {
                    return Err(format!(
                        "RSA public exponent 0x{} is not supported (must be odd, at least 3 and below 2^33)",
                        hex::encode(e)
                    ));
                }
            }
            keys::rsa_class(bits)
        }
        OID_EC_PUBLIC_KEY => {
            let Some(curve) = ec_curve(spki) else {
                return Err(
                    "EC key with explicit or missing curve parameters is not supported (P-256, P-384)"
                        .into(),
                );
            };
            let (alg, point_len) = match curve.as_str() {
                OID_P256 => (KeyAlgorithm::P256, 65),
                OID_P384 => (KeyAlgorithm::P384, 97),
                _ => {
                    return Err(format!(
                        "EC curve {} is not supported (P-256, P-384)",
                        keys::curve_name(&curve)
                    ));
                }
            };
            match key.first() {
                Some(0x04) if key.len() == point_len => {}
                Some(0x02 | 0x03) => {
                    return Err(
                        "compressed EC points are not supported; send the uncompressed form".into(),
                    );
                }
                _ => return Err("EC public key is not a valid uncompressed point".into()),
            }
            alg
        }
        OID_ED25519 => {
            if key.len() != 32 || spki.algorithm.parameters.is_some() {
                return Err("Ed25519 public key is malformed".into());
            }
            KeyAlgorithm::Ed25519
        }
        other => {
            return Err(format!(
                "{} keys are not supported (P-256, P-384, Ed25519, RSA {RSA_MIN_BITS}-{RSA_MAX_BITS})",
                keys::algorithm_name(other)
            ));
        }
    };
    Ok(AcceptedKey {
        algorithm,
        public: RawPublicKey {
            alg: keys::signature_algorithm(algorithm),
            key: key.to_vec(),
        },
    })
}

/// `p256`, `p384`, `ed25519`, `rsa<bits>`, or an OID (the curve's for other EC keys).
pub(crate) fn key_label(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let oid = spki.algorithm.algorithm.to_id_string();
    match oid.as_str() {
        OID_RSA_ENCRYPTION => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => format!("rsa{}", bit_len(rsa.modulus)),
            _ => oid,
        },
        OID_EC_PUBLIC_KEY => match ec_curve(spki).as_deref() {
            Some(OID_P256) => "p256".into(),
            Some(OID_P384) => "p384".into(),
            Some(curve) => curve.to_owned(),
            None => oid,
        },
        OID_ED25519 => "ed25519".into(),
        _ => oid,
    }
}

/// The certificate DER from PEM (`CERTIFICATE`) or DER input.
pub(crate) fn cert_der(input: &[u8]) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    if looks_like_pem(input) {
        CertificateDer::from_pem_slice(input)
            .map(|d| d.to_vec())
            .map_err(|e| CaError::MalformedCertificate(format!("no CERTIFICATE PEM block ({e})")))
    } else if input.is_empty() {
        Err(CaError::MalformedCertificate("empty input".into()))
    } else {
        Ok(input.to_vec())
    }
}

pub(crate) fn looks_like_pem(input: &[u8]) -> bool {
    input.windows(11).any(|w| w == b"-----BEGIN ")
}

pub(crate) fn parse_cert(
    der: &[u8],
) -> Result<x509_parser::certificate::X509Certificate<'_>, CaError> {
    use x509_parser::prelude::FromDer;
    let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CaError::MalformedCertificate(nom_reason(e)))?;
    if !rest.is_empty() {
        return Err(CaError::MalformedCertificate(format!(
            "{} bytes of trailing data after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// A readable reason for an x509-parser failure.
pub(crate) fn nom_reason(e: x509_parser::nom::Err<x509_parser::error::X509Error>) -> String {
    match e {
        x509_parser::nom::Err::Incomplete(_) => {
            "truncated: the data ends before the structure does".into()
        }
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => match e {
            x509_parser::error::X509Error::Der(
                x509_parser::der_parser::error::Error::Incomplete(_),
            ) => "truncated: the data ends before the structure does".into(),
            other => format!("invalid DER ({other})"),
        },
    }
}

/// RFC 4514 string form of a name: RDNs in reverse order, `,`-separated, multi-valued
/// RDNs joined by `+`, special characters escaped.
pub(crate) fn rfc4514(name: &X509Name<'_>) -> String {
    let mut rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| format!("{}={}", attr_type(atv), attr_value(atv)))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.reverse();
    rdns.join(",")
}

fn attr_type(atv: &AttributeTypeAndValue<'_>) -> String {
    let oid = atv.attr_type().to_id_string();
    match oid.as_str() {
        "2.5.4.3" => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.6" => "C",
        "2.5.4.9" => "STREET",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "2.5.4.5" => "serialNumber",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return oid,
    }
    .to_owned()
}

fn attr_value(atv: &AttributeTypeAndValue<'_>) -> String {
    let any = atv.attr_value();
    let data = any.data;
    let text: Option<String> = match any.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(data).ok().map(str::to_owned),
        // T.61 in practice holds Latin-1.
        Tag::TeletexString => Some(data.iter().map(|&b| b as char).collect()),
        Tag::BmpString if data.len() % 2 == 0 => String::from_utf16(
            &data
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        )
        .ok(),
        Tag::UniversalString if data.len() % 4 == 0 => data
            .chunks(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    };
    match text {
        Some(t) => escape(&t),
        None => match any.to_der_vec() {
            Ok(der) => format!("#{}", hex::encode(der)),
            Err(_) => format!("#{}", hex::encode(data)),
        },
    }
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn describe(input: &[u8]) -> Result<crate::CertificateSummary, CaError> {
    let der = cert_der(input)?;
    let cert = parse_cert(&der)?;
    let (is_ca, path_len) = match cert.basic_constraints() {
        Ok(Some(bc)) => (bc.value.ca, bc.value.path_len_constraint),
        Ok(None) => (false, None),
        Err(e) => {
            return Err(CaError::MalformedCertificate(format!(
                "bad basicConstraints extension ({e})"
            )));
        }
    };
    let serial = match strip_zeros(cert.raw_serial()) {
        [] => "00".to_owned(),
        s => hex::encode(s),
    };
    Ok(crate::CertificateSummary {
        subject: rfc4514(cert.subject()),
        issuer: rfc4514(cert.issuer()),
        serial_hex: serial,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        fingerprint_sha256_hex: sha256_hex(&der),
        key_algorithm: key_label(cert.public_key()),
        is_ca,
        path_len: if is_ca { path_len } else { None },
    })
}

/// The subject attributes JITP templates read (`AWS::IoT::Certificate::*`).
pub(crate) fn identity(der: &[u8]) -> Result<crate::DeviceIdentity, CaError> {
    use x509_parser::oid_registry as oids;
    let cert = parse_cert(der)?;
    let subject = cert.subject();
    let first = |oid: &x509_parser::der_parser::oid::Oid<'_>| {
        subject
            .iter_attributes()
            .find(|a| a.attr_type() == oid)
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned)
    };
    let serial = match strip_zeros(cert.raw_serial()) {
        [] => "00".to_owned(),
        s => hex::encode(s),
    };
    Ok(crate::DeviceIdentity {
        common_name: first(&oids::OID_X509_COMMON_NAME),
        serial_number: first(&oids::OID_X509_SERIALNUMBER),
        country: first(&oids::OID_X509_COUNTRY_NAME),
        organization: first(&oids::OID_X509_ORGANIZATION_NAME),
        organizational_unit: first(&oids::OID_X509_ORGANIZATIONAL_UNIT),
        distinguished_name_qualifier: first(&oids::OID_X509_DN_QUALIFIER),
        state_name: first(&oids::OID_X509_STATE_OR_PROVINCE_NAME),
        certificate_serial_hex: serial,
        fingerprint_sha256_hex: sha256_hex(der),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

fn name_attributes(name: &X509Name<'_>) -> Vec<(&'static str, String)> {
    // X.520 attribute types (2.5.4.*).
    const KNOWN: [(&str, &str); 14] = [
        ("2.5.4.6", "C"),
        ("2.5.4.10", "O"),
        ("2.5.4.11", "OU"),
        ("2.5.4.46", "dnQualifier"),
        ("2.5.4.8", "ST"),
        ("2.5.4.7", "L"),
        ("2.5.4.3", "CN"),
        ("2.5.4.5", "serialNumber"),
        ("2.5.4.12", "title"),
        ("2.5.4.4", "SN"),
        ("2.5.4.42", "GN"),
        ("2.5.4.43", "initials"),
        ("2.5.4.65", "pseudonym"),
        ("2.5.4.44", "generationQualifier"),
    ];
    name.iter_attributes()
        .filter_map(|a| {
            let oid = a.attr_type().to_id_string();
            let (_, short) = KNOWN.iter().find(|(known, _)| *known == oid)?;
            let value = a.as_str().ok()?;
            Some((*short, value.to_owned()))
        })
        .collect()
}

pub(crate) fn attributes(der: &[u8]) -> Result<crate::CertificateAttributes, CaError> {
    use x509_parser::extensions::GeneralName;
    let cert = parse_cert(der)?;
    let mut alternative = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => alternative.push(("DNSName", (*n).to_owned())),
                GeneralName::RFC822Name(n) => alternative.push(("RFC822Name", (*n).to_owned())),
                GeneralName::URI(n) => {
                    alternative.push(("UniformResourceIdentifier", (*n).to_owned()))
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes)
                            .map(|b| std::net::IpAddr::from(b).to_string())
                            .ok(),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .map(|b| std::net::IpAddr::from(b).to_string())
                            .ok(),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        alternative.push(("IPAddress", ip));
                    }
                }
                GeneralName::DirectoryName(n) => alternative.push(("DirectoryName", n.to_string())),
                _ => {}
            }
        }
    }
    let serial = match strip_zeros(cert.raw_serial()) {
        [] => "00".to_owned(),
        s => hex::encode(s),
    };
    Ok(crate::CertificateAttributes {
        subject: name_attributes(cert.subject()),
        issuer: name_attributes(cert.issuer()),
        subject_alternative_names: alternative,
        serial_hex: serial,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4514_escapes_and_reverses() {
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape(" #x "), "\\ #x\\ ");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(bit_len(&[0, 0x80, 0]), 16);
        assert_eq!(bit_len(&[0x01, 0]), 9);
    }
}
