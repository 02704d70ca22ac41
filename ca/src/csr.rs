//! Device CSR parsing: only the public key (and, for callers to compare, the subject's
//! CN) survives, after the self-signature and the key itself have been checked.

use crate::x509::{accept_spki, looks_like_pem, nom_reason, sha256_hex};
use crate::{CaError, DeviceCsr, keys};
use rcgen::PublicKeyData as _;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::{self, PemObject};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;

/// Signature algorithms whose digests are broken; a CSR signed with one is refused.
const BROKEN_SIGNATURE_ALGS: &[(&str, &str)] = &[
    ("1.2.840.113549.1.1.4", "md5WithRSAEncryption"),
    ("1.2.840.113549.1.1.5", "sha1WithRSAEncryption"),
    ("1.3.14.3.2.29", "sha1WithRSASignature"),
    ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
];

pub(crate) fn parse(bytes: &[u8]) -> Result<DeviceCsr, CaError> {
    let malformed = |why: String| CaError::MalformedCsr(why);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(malformed("the input is empty".into()));
    }
    let pem_der;
    let der: &[u8] = if looks_like_pem(bytes) {
        let relabelled = keys::relabel(bytes, "NEW CERTIFICATE REQUEST", "CERTIFICATE REQUEST");
        let text = relabelled.as_deref().unwrap_or(bytes);
        pem_der = CertificateSigningRequestDer::from_pem_slice(text).map_err(|e| match e {
            pem::Error::NoItemsFound => malformed("no CERTIFICATE REQUEST PEM block found".into()),
            e => malformed(format!("bad PEM: {e}")),
        })?;
        pem_der.as_ref()
    } else {
        bytes
    };

    let (rest, req) =
        X509CertificationRequest::from_der(der).map_err(|e| malformed(nom_reason(e)))?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes of trailing data after the request",
            rest.len()
        )));
    }
    let info = &req.certification_request_info;
    if info.version.0 != 0 {
        return Err(malformed(format!("unknown CSR version {}", info.version.0)));
    }

    // The key is judged before the signature: ring refuses to verify with weak keys,
    // and "key too small" is the useful answer then, not "bad signature".
    let accepted = accept_spki(&info.subject_pki).map_err(CaError::WeakOrUnsupportedKey)?;

    let sig_oid = req.signature_algorithm.algorithm.to_id_string();
    if let Some((_, name)) = BROKEN_SIGNATURE_ALGS
        .iter()
        .find(|(oid, _)| *oid == sig_oid)
    {
        return Err(CaError::WeakOrUnsupportedKey(format!(
            "the CSR is signed with {name}; sign it with SHA-256 or better"
        )));
    }
    match req.verify_signature() {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => {
            return Err(CaError::WeakOrUnsupportedKey(format!(
                "CSR signature algorithm {sig_oid} is not supported for a {} key",
                accepted.algorithm
            )));
        }
        Err(_) => return Err(CaError::CsrSignatureInvalid),
    }

    // Kept only so callers (EST) can compare it with the thing name they expect; it is
    // never copied into a certificate.
    let common_name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);

    Ok(DeviceCsr {
        spki_der: accepted.public.subject_public_key_info(),
        common_name,
        key_algorithm: accepted.algorithm,
        public: accepted.public,
    })
}

pub(crate) fn public_key_sha256_hex(csr: &DeviceCsr) -> String {
    sha256_hex(&csr.spki_der)
}
