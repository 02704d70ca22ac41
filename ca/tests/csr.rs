//! Device CSR parsing: what is refused, and that nothing but the key is used.

mod common;

use common::*;
use fleetcert_ca::{CaError, DeviceCsr, DeviceKey, KeyAlgorithm};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SigningKey,
};
use time::OffsetDateTime;
use x509_parser::extensions::ParsedExtension;

fn csr_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
}

fn rcgen_csr(alg: &'static rcgen::SignatureAlgorithm) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(alg).unwrap();
    let csr = csr_params("device").serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

/// DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// An RSA key of any size signing through the `rsa` crate (ring refuses < 2048 bits).
struct RsaCrateKey {
    key: rsa::RsaPrivateKey,
    public_pkcs1: Vec<u8>,
}

impl RsaCrateKey {
    fn generate(bits: usize) -> Self {
        use rsa::pkcs1::EncodeRsaPublicKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap();
        let public_pkcs1 = key.to_public_key().to_pkcs1_der().unwrap().into_vec();
        RsaCrateKey { key, public_pkcs1 }
    }
}

impl PublicKeyData for RsaCrateKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_pkcs1
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

impl SigningKey for RsaCrateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let mut info = SHA256_DIGEST_INFO.to_vec();
        info.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, msg).as_ref());
        self.key
            .sign(rsa::Pkcs1v15Sign::new_unprefixed(), &info)
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// A key whose public half is made up (any bytes) and whose "signature" is junk.
struct FakeKey {
    public: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for FakeKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl SigningKey for FakeKey {
    fn sign(&self, _msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(vec![0x5a; 64])
    }
}

fn der_len(len: usize) -> Vec<u8> {
    match len {
        0..=127 => vec![len as u8],
        128..=255 => vec![0x81, len as u8],
        _ => vec![0x82, (len >> 8) as u8, len as u8],
    }
}

fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(body.len()));
    out.extend_from_slice(body);
    out
}

fn expect_weak(result: Result<DeviceCsr, CaError>, needle: &str) {
    match result {
        Err(CaError::WeakOrUnsupportedKey(why)) => {
            assert!(why.contains(needle), "{why:?} should mention {needle:?}")
        }
        other => panic!("expected WeakOrUnsupportedKey({needle}), got {other:?}"),
    }
}

#[test]
fn garbage_is_malformed() {
    for input in [
        &b""[..],
        b"   \n",
        b"hello, I am a CSR",
        &[0x30, 0x03, 0x02, 0x01, 0x00],
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        match DeviceCsr::parse(input) {
            Err(CaError::MalformedCsr(why)) => assert!(!why.is_empty()),
            other => panic!("{input:?}: expected MalformedCsr, got {other:?}"),
        }
    }
}

#[test]
fn truncated_is_malformed_with_reason() {
    let (_, der) = rcgen_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    for cut in [1, 10, der.len() / 2, der.len() - 1] {
        match DeviceCsr::parse(&der[..cut]) {
            Err(CaError::MalformedCsr(why)) => assert!(!why.is_empty()),
            other => panic!("cut at {cut}: expected MalformedCsr, got {other:?}"),
        }
    }
    let mut long = der.clone();
    long.push(0);
    assert!(matches!(
        DeviceCsr::parse(&long),
        Err(CaError::MalformedCsr(why)) if why.contains("trailing")
    ));
}

#[test]
fn tampered_signature_is_refused() {
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ] {
        let (_, der) = rcgen_csr(alg);
        assert!(DeviceCsr::parse(&der).is_ok());
        // The signature BIT STRING is the last element: flip a byte inside it.
        let mut bad = der.clone();
        let at = bad.len() - 5;
        bad[at] ^= 0x01;
        assert!(
            matches!(DeviceCsr::parse(&bad), Err(CaError::CsrSignatureInvalid)),
            "{alg:?}"
        );
        // Changing the signed content (the CN "device") breaks it too.
        let mut bad = der.clone();
        let at = bad.windows(6).position(|w| w == b"device").unwrap();
        bad[at] = b'D';
        assert!(matches!(
            DeviceCsr::parse(&bad),
            Err(CaError::CsrSignatureInvalid)
        ));
    }
}

#[test]
fn rsa_1024_is_too_weak() {
    let key = RsaCrateKey::generate(1024);
    let csr = csr_params("weak").serialize_request(&key).unwrap();
    expect_weak(
        DeviceCsr::parse(csr.der()),
        "RSA 1024-bit key; at least 2048 bits required",
    );
}

#[test]
fn rsa_above_8192_is_refused() {
    let mut modulus = vec![0x00];
    modulus.extend(std::iter::repeat_n(0xc5, 1026)); // 8208 bits
    let mut body = der_tlv(0x02, &modulus);
    body.extend(der_tlv(0x02, &[0x01, 0x00, 0x01]));
    let key = FakeKey {
        public: der_tlv(0x30, &body),
        alg: &rcgen::PKCS_RSA_SHA256,
    };
    let csr = csr_params("huge").serialize_request(&key).unwrap();
    expect_weak(DeviceCsr::parse(csr.der()), "RSA 8208-bit key");
}

#[test]
fn unsupported_curves_and_algorithms_are_named() {
    expect_weak(
        DeviceCsr::parse(SECP256K1_CSR.as_bytes()),
        "EC curve secp256k1 is not supported (P-256, P-384)",
    );
    expect_weak(DeviceCsr::parse(P521_CSR.as_bytes()), "EC curve P-521");
    expect_weak(DeviceCsr::parse(ED448_CSR.as_bytes()), "Ed448");
    expect_weak(DeviceCsr::parse(P256_SHA1_CSR.as_bytes()), "SHA1");
}

#[test]
fn compressed_points_are_refused() {
    let key = KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let mut compressed = vec![0x02 | (raw[64] & 1)];
    compressed.extend_from_slice(&raw[1..33]);
    let fake = FakeKey {
        public: compressed,
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let csr = csr_params("c").serialize_request(&fake).unwrap();
    expect_weak(DeviceCsr::parse(csr.der()), "compressed");
}

#[test]
fn accepts_pem_der_and_every_supported_key() {
    for (alg, expect) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, KeyAlgorithm::P256),
        (&rcgen::PKCS_ECDSA_P384_SHA384, KeyAlgorithm::P384),
        (&rcgen::PKCS_ED25519, KeyAlgorithm::Ed25519),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = csr_params("device").serialize_request(&key).unwrap();
        let from_der = DeviceCsr::parse(csr.der()).unwrap();
        let pem = csr.pem().unwrap();
        let from_pem = DeviceCsr::parse(pem.as_bytes()).unwrap();
        let new_label = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        let from_new = DeviceCsr::parse(new_label.as_bytes()).unwrap();
        for c in [&from_der, &from_pem, &from_new] {
            assert_eq!(c.key_algorithm(), expect);
            let spki = key.subject_public_key_info();
            assert_eq!(
                c.public_key_sha256_hex(),
                hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki))
            );
        }
    }
}

#[test]
fn rsa_sizes_map_to_classes() {
    let key = RsaCrateKey::generate(2048);
    let csr = csr_params("r").serialize_request(&key).unwrap();
    assert_eq!(
        DeviceCsr::parse(csr.der()).unwrap().key_algorithm(),
        KeyAlgorithm::Rsa2048
    );
    // 2560 bits: still the 2048 class (anything from 2048 to 3071).
    let key = RsaCrateKey::generate(2560);
    let csr = csr_params("r").serialize_request(&key).unwrap();
    assert_eq!(
        DeviceCsr::parse(csr.der()).unwrap().key_algorithm(),
        KeyAlgorithm::Rsa2048
    );
}

/// The CSR asks for CN=evil, a SAN, CA:TRUE, keyCertSign, serverAuth and a custom
/// extension; the certificate has none of it.
#[test]
fn nothing_but_the_key_is_copied() {
    let (_, ca) = hierarchy(KeyAlgorithm::P256);
    let key = KeyPair::generate().unwrap();
    let mut params = csr_params("evil");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Evil Corp");
    params.subject_alt_names = vec![
        SanType::DnsName("evil.example.com".try_into().unwrap()),
        SanType::URI("spiffe://evil/admin".try_into().unwrap()),
    ];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[1, 2, 3, 4, 5],
        vec![0x05, 0x00],
    )];
    let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = DeviceCsr::parse(csr_pem.as_bytes()).unwrap();

    let issued = ca
        .issue(
            &thing("sensor-7"),
            DeviceKey::Csr(&csr),
            &profile(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert!(issued.private_key.is_none());
    assert_eq!(issued.key_algorithm, KeyAlgorithm::P256);
    assert_eq!(issued.public_key_sha256_hex, csr.public_key_sha256_hex());

    let cert = parse_cert(&issued.der);
    assert_eq!(cert.subject().to_string(), "CN=sensor-7");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(!bc.value.ca);
    assert!(cert.subject_alternative_name().unwrap().is_none());
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    for ext in cert.extensions() {
        assert_ne!(ext.oid.to_id_string(), "1.2.3.4.5");
        assert!(
            matches!(
                ext.parsed_extension(),
                ParsedExtension::BasicConstraints(_)
                    | ParsedExtension::KeyUsage(_)
                    | ParsedExtension::ExtendedKeyUsage(_)
                    | ParsedExtension::SubjectKeyIdentifier(_)
                    | ParsedExtension::AuthorityKeyIdentifier(_)
            ),
            "unexpected extension {}",
            ext.oid
        );
    }
}

#[test]
fn csr_keys_of_every_kind_are_certified() {
    let (_, ca) = hierarchy(KeyAlgorithm::P256);
    let rsa = RsaCrateKey::generate(2048);
    let rsa_csr = csr_params("x").serialize_request(&rsa).unwrap();
    let mut csrs = vec![(rsa_csr.der().to_vec(), KeyAlgorithm::Rsa2048)];
    for (alg, expect) in [
        (&rcgen::PKCS_ECDSA_P384_SHA384, KeyAlgorithm::P384),
        (&rcgen::PKCS_ED25519, KeyAlgorithm::Ed25519),
    ] {
        csrs.push((rcgen_csr(alg).1, expect));
    }
    for (der, expect) in csrs {
        let csr = DeviceCsr::parse(&der).unwrap();
        let issued = ca
            .issue(
                &thing("t"),
                DeviceKey::Csr(&csr),
                &profile(),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        assert_eq!(issued.key_algorithm, expect);
        let cert = parse_cert(&issued.der);
        let ku = cert.key_usage().unwrap().unwrap().value;
        let is_rsa = expect == KeyAlgorithm::Rsa2048;
        assert_eq!(ku.key_encipherment(), is_rsa);
        assert_eq!(
            hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                cert.public_key().raw
            )),
            issued.public_key_sha256_hex
        );
    }
}

#[test]
fn the_subject_cn_is_readable_for_callers() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let parse = |params: CertificateParams| {
        let csr = params.serialize_request(&key).unwrap();
        DeviceCsr::parse(csr.der()).unwrap()
    };

    assert_eq!(
        parse(csr_params("sensor-42")).common_name(),
        Some("sensor-42")
    );

    let mut params = csr_params("ignored");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Acme");
    params.distinguished_name.push(
        DnType::CommonName,
        rcgen::DnValue::PrintableString("printable 1".try_into().unwrap()),
    );
    assert_eq!(parse(params).common_name(), Some("printable 1"));

    let mut params = csr_params("ignored");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Acme");
    assert_eq!(parse(params).common_name(), None);

    let mut params = csr_params("ignored");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        rcgen::DnValue::BmpString("bmp".try_into().unwrap()),
    );
    assert_eq!(parse(params).common_name(), None, "BMPString is not read");

    // Read, never copied: the certificate's CN is the thing name.
    let (_h, ca) = hierarchy(KeyAlgorithm::P256);
    let csr = parse(csr_params("not-the-thing"));
    let issued = ca
        .issue(
            &thing("the-thing"),
            DeviceKey::Csr(&csr),
            &profile(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert_eq!(
        parse_cert(&issued.der).subject().to_string(),
        "CN=the-thing"
    );
}
