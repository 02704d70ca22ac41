//! Signing and describing certificate revocation lists.

use crate::hierarchy::to_cert_time;
use crate::signer::signing_error;
use crate::x509::{looks_like_pem, nom_reason, rfc4514};
use crate::{CaError, CrlEntry, CrlSummary, IssuingCa, RevocationReason, SignedCrl};
use der::pem::LineEnding;
use der::{Encode as _, Header, Reader as _, SliceReader, Tag};
use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use std::collections::HashSet;
use time::OffsetDateTime;

/// Our serials: 16 octets, the first in 0x01..=0x7f, written as 32 lowercase hex digits.
pub(crate) fn parse_serial(serial_hex: &str) -> Result<[u8; 16], CaError> {
    let invalid = |reason: &str| CaError::InvalidSerial {
        serial: serial_hex.to_owned(),
        reason: reason.to_owned(),
    };
    if serial_hex.len() != 32 {
        return Err(invalid(&format!(
            "expected 32 hex characters, got {}",
            serial_hex.chars().count()
        )));
    }
    if !serial_hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid("expected lowercase hex digits (0-9, a-f) only"));
    }
    let mut serial = [0u8; 16];
    hex::decode_to_slice(serial_hex, &mut serial)
        .map_err(|_| invalid("expected lowercase hex digits (0-9, a-f) only"))?;
    if !(0x01..=0x7f).contains(&serial[0]) {
        return Err(invalid(
            "not a fleetcert serial (the first octet must be 01 to 7f)",
        ));
    }
    Ok(serial)
}

/// UTC whole seconds, in the years an X.509 time can hold.
fn crl_time(what: &str, t: OffsetDateTime) -> Result<OffsetDateTime, CaError> {
    let t = to_cert_time(t);
    if !(1..=9999).contains(&t.year()) {
        return Err(CaError::InvalidCrl(format!(
            "{what} {t} is outside the years 1 to 9999"
        )));
    }
    Ok(t)
}

pub(crate) fn sign(
    ca: &IssuingCa,
    number: u64,
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
    entries: &[CrlEntry],
) -> Result<SignedCrl, CaError> {
    let this_update = crl_time("thisUpdate", this_update)?;
    let next_update = crl_time("nextUpdate", next_update)?;
    if next_update <= this_update {
        return Err(CaError::InvalidCrl(format!(
            "nextUpdate ({next_update}) must be later than thisUpdate ({this_update})"
        )));
    }

    let mut seen = HashSet::with_capacity(entries.len());
    let revoked_certs = entries
        .iter()
        .map(|entry| {
            let serial = parse_serial(&entry.serial_hex)?;
            if !seen.insert(serial) {
                return Err(CaError::InvalidCrl(format!(
                    "serial {} is listed twice",
                    entry.serial_hex
                )));
            }
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: crl_time("revocation time", entry.revoked_at)?,
                // RFC 5280 §5.3.1: omit the extension rather than write unspecified (0).
                reason_code: (entry.reason != RevocationReason::Unspecified)
                    .then(|| entry.reason.to_rcgen()),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, CaError>>()?;

    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::PreSpecified(ca.inner.key_id.clone()),
    };
    let crl = params.signed_by(&ca.inner.issuer).map_err(|e| match e {
        rcgen::Error::IssuerNotCrlSigner => CaError::MalformedCertificate(
            "the issuing CA certificate's key usage does not allow cRLSign".into(),
        ),
        e => signing_error(e),
    })?;
    let der = crl.der().to_vec();

    // rcgen re-encodes the issuer from its parsed form; a name it cannot reproduce
    // (e.g. one repeating an attribute type) would make a CRL no relying party matches.
    if issuer_name(&der) != Some(ca.inner.subject_der.as_slice()) {
        return Err(CaError::MalformedCertificate(format!(
            "the issuing CA's subject {:?} cannot be reproduced exactly in a CRL",
            ca.inner.subject
        )));
    }

    let pem = der::pem::encode_string("X509 CRL", LineEnding::LF, &der)
        .expect("PEM encoding of a freshly signed CRL");
    Ok(SignedCrl { der, pem })
}

/// The issuer Name TLV of a CertificateList: SEQUENCE { SEQUENCE { version INTEGER,
/// signature AlgorithmIdentifier, issuer Name, ... } ... }.
fn issuer_name(crl: &[u8]) -> Option<&[u8]> {
    fn tbs_issuer<'a>(tbs: &mut SliceReader<'a>) -> der::Result<&'a [u8]> {
        for skipped in [Tag::Integer, Tag::Sequence] {
            Header::peek(tbs)?.tag().assert_eq(skipped)?;
            tbs.tlv_bytes()?;
        }
        Header::peek(tbs)?.tag().assert_eq(Tag::Sequence)?;
        let issuer = tbs.tlv_bytes()?;
        tbs.drain(tbs.remaining_len())?;
        Ok(issuer)
    }
    let mut reader = SliceReader::new(crl).ok()?;
    reader
        .sequence(|list| {
            let issuer = list.sequence(tbs_issuer)?;
            list.drain(list.remaining_len())?;
            Ok::<_, der::Error>(issuer)
        })
        .ok()
}

/// Whether `input` starts with a well-formed header whose content runs past the end:
/// the data was cut short.
fn is_truncated(input: &[u8]) -> bool {
    SliceReader::new(input)
        .and_then(|reader| Header::peek(&reader))
        .and_then(|header| header.encoded_len()? + header.length())
        .is_ok_and(|total| usize::try_from(total).is_ok_and(|total| total > input.len()))
}

pub(crate) fn describe(input: &[u8]) -> Result<CrlSummary, CaError> {
    use rustls_pki_types::CertificateRevocationListDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;

    let malformed = CaError::MalformedCrl;
    let pem_der;
    let der: &[u8] = if looks_like_pem(input) {
        pem_der = CertificateRevocationListDer::from_pem_slice(input)
            .map_err(|e| malformed(format!("no X509 CRL PEM block ({e})")))?;
        pem_der.as_ref()
    } else if input.is_empty() {
        return Err(malformed("empty input".into()));
    } else {
        input
    };
    let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| {
        // x509-parser reports a cut-short CRL as a plain EOF error; say what it means.
        if der.first() == Some(&0x30) && is_truncated(der) {
            malformed("truncated: the data ends before the structure does".into())
        } else {
            malformed(nom_reason(e))
        }
    })?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes of trailing data after the CRL",
            rest.len()
        )));
    }
    let number = crl.crl_number().map(|n| n.to_bytes_be());
    let number_hex = number.as_ref().map(hex::encode);
    let number = number.and_then(|n| {
        // to_bytes_be gives the minimal magnitude ([0] for zero).
        (n.len() <= 8).then(|| n.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    });
    Ok(CrlSummary {
        issuer: rfc4514(crl.issuer()),
        number,
        number_hex,
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        entry_count: crl.tbs_cert_list.revoked_certificates.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_must_be_ours() {
        let ok = "0123456789abcdef0123456789abcdef";
        assert_eq!(hex::encode(parse_serial(ok).unwrap()), ok);
        assert!(parse_serial("7fffffffffffffffffffffffffffffff").is_ok());
        for (bad, why) in [
            ("", "32 hex characters"),
            ("0123456789abcdef0123456789abcde", "32 hex characters"),
            ("0123456789abcdef0123456789abcdef0", "32 hex characters"),
            ("0123456789ABCDEF0123456789ABCDEF", "lowercase hex"),
            ("0123456789abcdef0123456789abcdeg", "lowercase hex"),
            ("0123456789abcdef 123456789abcdef", "lowercase hex"),
            ("00123456789abcdef0123456789abcde", "first octet"),
            ("80123456789abcdef0123456789abcde", "first octet"),
            ("0123456789abcdef0123456789abcdé", "lowercase hex"),
        ] {
            match parse_serial(bad) {
                Err(e @ CaError::InvalidSerial { .. }) => {
                    assert!(e.to_string().contains(why), "{bad:?}: {e}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn issuer_name_walks_only_well_formed_input() {
        assert_eq!(issuer_name(&[]), None);
        assert_eq!(issuer_name(&[0x30, 0x00]), None);
        assert_eq!(issuer_name(&[0x30, 0x02, 0x30, 0x00]), None);
        // SEQ { SEQ { INTEGER 1, SEQ {}, SEQ { 05 00 } } }
        let crl = [
            0x30, 0x0b, 0x30, 0x09, 0x02, 0x01, 0x01, 0x30, 0x00, 0x30, 0x02, 0x05, 0x00,
        ];
        assert_eq!(issuer_name(&crl), Some(&[0x30, 0x02, 0x05, 0x00][..]));
    }
}
