//! Private keys: PEM, encryption at rest, detection.

mod common;

use common::*;
use fleetcert_ca::{CaError, KeyAlgorithm, PrivateKey};
use std::time::Instant;

fn p256_key() -> PrivateKey {
    hierarchy(KeyAlgorithm::P256).0.issuing_key
}

#[test]
fn plain_pem_round_trips() {
    let key = p256_key();
    let pem = key.to_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert!(pem.trim_end().ends_with("-----END PRIVATE KEY-----"));
    let back = PrivateKey::from_pem(&pem, None).unwrap();
    assert_eq!(back.pkcs8_der(), key.pkcs8_der());
    assert_eq!(back.algorithm(), KeyAlgorithm::P256);
    // A passphrase for an unencrypted key is ignored.
    assert!(PrivateKey::from_pem(&pem, Some("x")).is_ok());
    assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
}

#[test]
fn encrypted_pem_round_trips_and_checks_passphrase() {
    let key = p256_key();
    let pem = key.to_encrypted_pem("correct horse").unwrap();
    assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----\n"));
    assert!(!pem.contains(&hex::encode(key.pkcs8_der())));

    let start = Instant::now();
    let back = PrivateKey::from_pem(&pem, Some("correct horse")).unwrap();
    eprintln!("scrypt decrypt took {:?}", start.elapsed());
    assert_eq!(back.pkcs8_der(), key.pkcs8_der());

    assert!(matches!(
        PrivateKey::from_pem(&pem, None),
        Err(CaError::PassphraseRequired)
    ));
    for wrong in ["correct horse ", "", "Correct horse", "battery staple"] {
        assert!(
            matches!(
                PrivateKey::from_pem(&pem, Some(wrong)),
                Err(CaError::WrongPassphrase)
            ),
            "{wrong:?}"
        );
    }
    // Each encryption uses a fresh salt and IV.
    assert_ne!(pem, key.to_encrypted_pem("correct horse").unwrap());
}

#[test]
fn every_algorithm_is_detected() {
    for alg in [
        KeyAlgorithm::P256,
        KeyAlgorithm::P384,
        KeyAlgorithm::Ed25519,
    ] {
        let (h, _) = hierarchy(alg);
        assert_eq!(h.root_key.algorithm(), alg);
        assert_eq!(h.issuing_key.algorithm(), alg);
        let again = PrivateKey::from_pkcs8_der(h.issuing_key.pkcs8_der()).unwrap();
        assert_eq!(again.algorithm(), alg);
    }
    // RSA-2048 from the rsa crate, the way fleetcert generates it.
    use rsa::pkcs8::EncodePrivateKey;
    let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let der = rsa.to_pkcs8_der().unwrap();
    let key = PrivateKey::from_pkcs8_der(der.as_bytes()).unwrap();
    assert_eq!(key.algorithm(), KeyAlgorithm::Rsa2048);
    let enc = key.to_encrypted_pem("pw").unwrap();
    assert_eq!(
        PrivateKey::from_pem(&enc, Some("pw")).unwrap().algorithm(),
        KeyAlgorithm::Rsa2048
    );
}

#[test]
fn bad_keys_are_malformed() {
    for der in [&b""[..], b"\x30\x03\x02\x01\x00", b"not a key"] {
        assert!(matches!(
            PrivateKey::from_pkcs8_der(der),
            Err(CaError::MalformedKey(_))
        ));
    }
    // A truncated key.
    let key = p256_key();
    let der = key.pkcs8_der();
    assert!(matches!(
        PrivateKey::from_pkcs8_der(&der[..der.len() - 3]),
        Err(CaError::MalformedKey(_))
    ));
    // Legacy formats get a hint.
    let legacy = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
    match PrivateKey::from_pem(legacy, None) {
        Err(CaError::MalformedKey(why)) => assert!(why.contains("openssl pkcs8"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        PrivateKey::from_pem("garbage", None),
        Err(CaError::MalformedKey(_))
    ));
    // A corrupted encrypted key is malformed, not "wrong passphrase".
    let enc = key.to_encrypted_pem("pw").unwrap();
    let mut lines: Vec<&str> = enc.lines().collect();
    lines.remove(2);
    let broken = lines.join("\n");
    assert!(matches!(
        PrivateKey::from_pem(&broken, Some("pw")),
        Err(CaError::MalformedKey(_))
    ));
}
