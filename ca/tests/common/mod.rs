//! Shared test helpers.
#![allow(dead_code)]

use fleetcert_ca::{
    DeviceProfile, HierarchyOptions, IssuingCa, KeyAlgorithm, NewHierarchy, ThingName,
    create_hierarchy,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

pub fn hierarchy(alg: KeyAlgorithm) -> (NewHierarchy, IssuingCa) {
    let opts = HierarchyOptions {
        key_algorithm: alg,
        ..HierarchyOptions::default()
    };
    let h = create_hierarchy(&opts, OffsetDateTime::now_utc()).expect("hierarchy");
    let ca = IssuingCa::load(&h.issuing_cert_pem, &h.issuing_key, &h.root_cert_pem)
        .expect("load issuing CA");
    (h, ca)
}

pub fn thing(name: &str) -> ThingName {
    ThingName::parse(name).unwrap()
}

pub fn profile() -> DeviceProfile {
    DeviceProfile::default()
}

pub fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("certificate parses");
    assert!(rest.is_empty());
    cert
}

/// A PEM block's DER.
pub fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

// CSRs made once with `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:<curve>`
// (and `-newkey ed448`, and `-sha1` for the SHA-1 one) and pasted here.

pub const SECP256K1_CSR: &str = "\
-----BEGIN CERTIFICATE REQUEST-----
MIHLMHMCAQAwFDESMBAGA1UEAwwJazEtZGV2aWNlMFYwEAYHKoZIzj0CAQYFK4EE
AAoDQgAEXLMIBMe+P5O7wSt5l+duMDhdaIhyT01jc2aIiT4LiuZ2lePYiveAVdsn
AOBd/Oibkk7+inlff8Umnp/mxASJHaAAMAoGCCqGSM49BAMCA0gAMEUCIQCTL/Iq
Sq2eTmjKBvMLpcvJ/KgA+8GsN+o08L78cPQMJAIgRMqUuS8huu35VwUrSEbTErA9
NIbdp+KlGR1FBI5q4n0=
-----END CERTIFICATE REQUEST-----
";

pub const P521_CSR: &str = "\
-----BEGIN CERTIFICATE REQUEST-----
MIIBWTCBuwIBADAWMRQwEgYDVQQDDAtwNTIxLWRldmljZTCBmzAQBgcqhkjOPQIB
BgUrgQQAIwOBhgAEAfornAAFMj8gypPmB4H0JhiuD61KbgvZMofKnOWdBvL6lopq
ZtyNWkph8It8Z8Vs4B4tbemOmtjZ78pfrleGpA/AAR6HZY0DAL08Kg59Zc+7+sEi
CTS3XBUxK056nMewz8Qlo/q7Bx3gUMDXzO7DkHENPF+wSWvChkFOECAt+Lp9GVQG
oAAwCgYIKoZIzj0EAwIDgYwAMIGIAkIA7bQKtukIcn3HzEXdH7vFYFgMyVFEMTcW
LsyMG5N85kjrz0/6mqk8U/KsApr9GCQRcfBpEZx7kMtlr8Al7bdNRqkCQgGo+2WV
HUoWaSCE8B0z7xsGI/6/KEXjslCNYLGWf2a4iBcCkCKRZFBKNgsm2gJzkzfQfvbP
JW2zv3G0Hi7Rmumm6A==
-----END CERTIFICATE REQUEST-----
";

pub const ED448_CSR: &str = "\
-----BEGIN CERTIFICATE REQUEST-----
MIHhMGMCAQAwFzEVMBMGA1UEAwwMZWQ0NDgtZGV2aWNlMEMwBQYDK2VxAzoAyx+3
UAbPhUwaIcypPQ3E2vgaEi2qU9AwlsCo9osdgnZrwdjKwab/+iNzHoh0NZ+1U2OS
GUdYSt0AoAAwBQYDK2VxA3MAtFVHkOWeSc9kF/TNgWLivdtCDiQMfgZsqQqTq2Dp
SgrdB8z8pQewaZVB2HEF9ba6bJauonn+9m4A/bM0X7MLAYP2ryL2Glc+QLrJq2H/
2OZ++AIW+hKl0ShTIH8O5Zfz8x6MCS2sZ5RrKk5qabKtSgsA
-----END CERTIFICATE REQUEST-----
";

pub const P256_SHA1_CSR: &str = "\
-----BEGIN CERTIFICATE REQUEST-----
MIHHMHECAQAwDzENMAsGA1UEAwwEc2hhMTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABIrwOcd4SCCvmIIM7NDXZrgQnk23m9fAbPmVKEHBRiFdlbUvlpLD/r4CWFTP
hv5DPPgJrDnZ5/B74zeqVN9GUkygADAJBgcqhkjOPQQBA0cAMEQCIHuYoKMjXTzT
+D6R7t6y+nLjZ48wJBrBwPVFt/Mz8CxDAiA1Dxjcu1JtUJsSljbjbV/TAxqOioin
K8JW8XracqCdiQ==
-----END CERTIFICATE REQUEST-----
";
