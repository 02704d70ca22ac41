//! Key generation, detection, PKCS#8 PEM (plain and PBES2-encrypted) and the glue
//! between our keys and rcgen.

use crate::{CaError, KeyAlgorithm, PrivateKey};
use pkcs8::der::pem::LineEnding;
use pkcs8::pkcs5::{EncryptionScheme, pbes2};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _, RsaKeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, pem};
use zeroize::Zeroizing;

pub(crate) const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
pub(crate) const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
pub(crate) const OID_ED25519: &str = "1.3.101.112";
pub(crate) const OID_P256: &str = "1.2.840.10045.3.1.7";
pub(crate) const OID_P384: &str = "1.3.132.0.34";

/// Smallest and largest RSA moduli accepted in device CSRs.
pub(crate) const RSA_MIN_BITS: usize = 2048;
pub(crate) const RSA_MAX_BITS: usize = 8192;

/// The rcgen signature algorithm a key of this class signs with (and whose
/// AlgorithmIdentifier its SubjectPublicKeyInfo carries).
pub(crate) fn signature_algorithm(alg: KeyAlgorithm) -> &'static rcgen::SignatureAlgorithm {
    match alg {
        KeyAlgorithm::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
    }
}

/// Class of an RSA modulus: the enum names a class, not an exact size.
pub(crate) fn rsa_class(bits: usize) -> KeyAlgorithm {
    if bits < 3072 {
        KeyAlgorithm::Rsa2048
    } else {
        KeyAlgorithm::Rsa3072
    }
}

/// `OneAsymmetricKey` v2 header for Ed25519, as ring writes it (RFC 8410 §7).
const ED25519_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// `PrivateKeyInfo` v1 header for Ed25519; the 32-byte seed follows.
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A bare public key (the BIT STRING contents of a SubjectPublicKeyInfo) with the
/// algorithm whose identifier rcgen writes in front of it.
#[derive(Debug, Clone)]
pub(crate) struct RawPublicKey {
    pub(crate) alg: &'static rcgen::SignatureAlgorithm,
    pub(crate) key: Vec<u8>,
}

impl rcgen::PublicKeyData for RawPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// Key identifier per RFC 7093 §2 method 1: the leftmost 160 bits of the SHA-256 of
/// the subjectPublicKey BIT STRING value. (rcgen's default hashes the whole SPKI, a
/// method linters such as pkilint do not recognise.)
pub(crate) fn key_identifier(public: &RawPublicKey) -> rcgen::KeyIdMethod {
    rcgen::KeyIdMethod::PreSpecified(key_id(&public.key))
}

/// The RFC 7093 §2 method 1 key identifier of a subjectPublicKey BIT STRING value.
pub(crate) fn key_id(subject_public_key: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, subject_public_key);
    digest.as_ref()[..20].to_vec()
}

/// A freshly generated key: PKCS#8 DER plus its public key.
pub(crate) struct GeneratedKey {
    pub(crate) private: PrivateKey,
    pub(crate) public: RawPublicKey,
}

fn rng_failure<E>(_: E) -> CaError {
    CaError::Signing("the operating system's random number generator failed".into())
}

/// Generates a key. EC and Ed25519 keys come from ring; RSA keys from the `rsa` crate
/// (ring cannot generate RSA keys), exported as PKCS#8 and checked by ring.
///
/// The public key is taken from the PKCS#8 document ring produced (ring always appends
/// it last), so no second scalar multiplication is spent re-deriving it.
pub(crate) fn generate(alg: KeyAlgorithm) -> Result<GeneratedKey, CaError> {
    let rng = SystemRandom::new();
    let (der, public): (Zeroizing<Vec<u8>>, Vec<u8>) = match alg {
        KeyAlgorithm::P256 | KeyAlgorithm::P384 => {
            let (ring_alg, point_len) = if alg == KeyAlgorithm::P256 {
                (&ECDSA_P256_SHA256_ASN1_SIGNING, 65)
            } else {
                (&ECDSA_P384_SHA384_ASN1_SIGNING, 97)
            };
            let doc = EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).map_err(rng_failure)?;
            let der = Zeroizing::new(doc.as_ref().to_vec());
            let public = match der.len().checked_sub(point_len).map(|at| &der[at..]) {
                Some(point) if point[0] == 0x04 => point.to_vec(),
                // Layout not what we expect: derive the public key the slow way.
                _ => EcdsaKeyPair::from_pkcs8(ring_alg, &der, &rng)
                    .map_err(|e| CaError::Signing(format!("generated EC key rejected: {e}")))?
                    .public_key()
                    .as_ref()
                    .to_vec(),
            };
            (der, public)
        }
        KeyAlgorithm::Ed25519 => {
            let doc = Zeroizing::new(
                Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(rng_failure)?
                    .as_ref()
                    .to_vec(),
            );
            // ring writes a PKCS#8 v2 document (seed + public key), which OpenSSL 3.0
            // cannot read; keep the RFC 8410 v1 form (seed only), as OpenSSL writes it.
            // v2 layout: ED25519_V2_PREFIX, seed (32), 81 21 00, public key (32).
            let layout_ok = doc.len() == 83
                && doc[..16] == ED25519_V2_PREFIX
                && doc[48..51] == [0x81, 0x21, 0x00];
            if !layout_ok {
                return Err(CaError::Signing(
                    "unexpected Ed25519 PKCS#8 layout from ring".into(),
                ));
            }
            let mut der = Zeroizing::new(Vec::with_capacity(48));
            der.extend_from_slice(&ED25519_V1_PREFIX);
            der.extend_from_slice(&doc[16..48]);
            (der, doc[51..].to_vec())
        }
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => {
            use rsa::pkcs8::EncodePrivateKey;
            let bits = if alg == KeyAlgorithm::Rsa2048 {
                2048
            } else {
                3072
            };
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| CaError::Signing(format!("RSA key generation failed: {e}")))?;
            let doc = key
                .to_pkcs8_der()
                .map_err(|e| CaError::Signing(format!("RSA key encoding failed: {e}")))?;
            let der = Zeroizing::new(doc.as_bytes().to_vec());
            let public = RsaKeyPair::from_pkcs8(&der)
                .map_err(|e| CaError::Signing(format!("generated RSA key rejected: {e}")))?
                .public()
                .as_ref()
                .to_vec();
            (der, public)
        }
    };
    Ok(GeneratedKey {
        private: PrivateKey {
            pkcs8_der: der,
            algorithm: alg,
        },
        public: RawPublicKey {
            alg: signature_algorithm(alg),
            key: public,
        },
    })
}

/// Works out which of our algorithms a PKCS#8 key is, checking that ring can sign
/// with it.
pub(crate) fn detect(der: &[u8]) -> Result<KeyAlgorithm, CaError> {
    let malformed = |why: String| CaError::MalformedKey(why);
    let info = pkcs8::PrivateKeyInfoRef::try_from(der)
        .map_err(|e| malformed(format!("not a PKCS#8 private key ({e})")))?;
    let oid = info.algorithm.oid.to_string();
    let rng = SystemRandom::new();
    match oid.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = info
                .algorithm
                .parameters_oid()
                .map_err(|_| malformed("EC key without a named curve".into()))?
                .to_string();
            let (alg, ring_alg) = match curve.as_str() {
                OID_P256 => (KeyAlgorithm::P256, &ECDSA_P256_SHA256_ASN1_SIGNING),
                OID_P384 => (KeyAlgorithm::P384, &ECDSA_P384_SHA384_ASN1_SIGNING),
                _ => {
                    return Err(malformed(format!(
                        "EC curve {} is not supported (P-256, P-384)",
                        curve_name(&curve)
                    )));
                }
            };
            EcdsaKeyPair::from_pkcs8(ring_alg, der, &rng)
                .map_err(|e| malformed(format!("EC key rejected: {e}")))?;
            Ok(alg)
        }
        OID_ED25519 => {
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map_err(|e| malformed(format!("Ed25519 key rejected: {e}")))?;
            Ok(KeyAlgorithm::Ed25519)
        }
        OID_RSA_ENCRYPTION => {
            let kp = RsaKeyPair::from_pkcs8(der).map_err(|e| {
                malformed(format!(
                    "RSA key rejected ({e}); RSA keys must be 2048 to 4096 bits"
                ))
            })?;
            Ok(rsa_class(kp.public().modulus_len() * 8))
        }
        other => Err(malformed(format!(
            "key algorithm {} is not supported (P-256, P-384, Ed25519, RSA)",
            algorithm_name(other)
        ))),
    }
}

/// An rcgen signing key for one of our private keys.
pub(crate) fn signing_key(key: &PrivateKey) -> Result<rcgen::KeyPair, CaError> {
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(key.pkcs8_der.as_slice()),
        signature_algorithm(key.algorithm),
    )
    .map_err(|e| CaError::MalformedKey(format!("the key cannot sign: {e}")))
}

const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

pub(crate) fn to_pem(key: &PrivateKey) -> Zeroizing<String> {
    Zeroizing::new(
        pkcs8::der::pem::encode_string("PRIVATE KEY", LineEnding::LF, &key.pkcs8_der)
            .expect("PEM-encoding a few kilobytes with a fixed label cannot fail"),
    )
}

/// PBES2 with scrypt (N = 2^14, r = 8, p = 1: OpenSSL 3's default memory limit allows
/// it; about 50 ms to derive in release builds) and AES-256-CBC.
pub(crate) fn to_encrypted_pem(key: &PrivateKey, passphrase: &str) -> Result<String, CaError> {
    let params = pbes2::Parameters::generate();
    let ciphertext = params
        .encrypt(passphrase.as_bytes(), &key.pkcs8_der)
        .map_err(|e| CaError::Signing(format!("key encryption failed: {e}")))?;
    let encrypted_data = pkcs8::der::asn1::OctetStringRef::new(&ciphertext)
        .map_err(|e| CaError::Signing(format!("key encryption failed: {e}")))?;
    let info = pkcs8::EncryptedPrivateKeyInfoRef {
        encryption_algorithm: params.into(),
        encrypted_data,
    };
    let doc = pkcs8::der::Document::encode_msg(&info)
        .map_err(|e| CaError::Signing(format!("key encoding failed: {e}")))?;
    doc.to_pem(ENCRYPTED_LABEL, LineEnding::LF)
        .map_err(|e| CaError::Signing(format!("key encoding failed: {e}")))
}

/// Rewrites a PEM label unknown to rustls-pki-types into one it knows, so its
/// (lenient) PEM reader can decode the section.
pub(crate) fn relabel(pem: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {from}-----");
    let text = std::str::from_utf8(pem).ok()?;
    if !text.contains(&begin) {
        return None;
    }
    Some(
        text.replace(&begin, &format!("-----BEGIN {to}-----"))
            .replace(
                &format!("-----END {from}-----"),
                &format!("-----END {to}-----"),
            )
            .into_bytes(),
    )
}

pub(crate) fn from_pem(pem_text: &str, passphrase: Option<&str>) -> Result<PrivateKey, CaError> {
    if let Some(relabelled) = relabel(pem_text.as_bytes(), ENCRYPTED_LABEL, "PRIVATE KEY") {
        let relabelled = Zeroizing::new(relabelled);
        // Not secret (it is ciphertext), but the type is handy for decoding.
        let der = PrivatePkcs8KeyDer::from_pem_slice(&relabelled)
            .map_err(|e| CaError::MalformedKey(format!("bad PEM: {e}")))?;
        let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der.secret_pkcs8_der())
            .map_err(|e| CaError::MalformedKey(format!("not an encrypted PKCS#8 key ({e})")))?;
        let Some(passphrase) = passphrase else {
            return Err(CaError::PassphraseRequired);
        };
        let plaintext = decrypt(
            &info.encryption_algorithm,
            info.encrypted_data.as_bytes(),
            passphrase,
        )?;
        // A wrong passphrase almost always fails the CBC padding check; the rare
        // garbage that passes it is caught here by the DER structure check.
        if pkcs8::PrivateKeyInfoRef::try_from(plaintext.as_slice()).is_err() {
            return Err(CaError::WrongPassphrase);
        }
        return PrivateKey::from_pkcs8_der(&plaintext);
    }
    match PrivatePkcs8KeyDer::from_pem_slice(pem_text.as_bytes()) {
        Ok(der) => PrivateKey::from_pkcs8_der(der.secret_pkcs8_der()),
        Err(pem::Error::NoItemsFound) => {
            let hint = if pem_text.contains("-----BEGIN RSA PRIVATE KEY-----")
                || pem_text.contains("-----BEGIN EC PRIVATE KEY-----")
            {
                "it is a legacy PKCS#1/SEC1 key; convert it with `openssl pkcs8 -topk8`"
            } else {
                "no PRIVATE KEY or ENCRYPTED PRIVATE KEY PEM block found"
            };
            Err(CaError::MalformedKey(hint.into()))
        }
        Err(e) => Err(CaError::MalformedKey(format!("bad PEM: {e}"))),
    }
}

const MAX_SCRYPT_MEMORY: u128 = 256 << 20;

fn decrypt(
    scheme: &EncryptionScheme,
    ciphertext: &[u8],
    passphrase: &str,
) -> Result<Zeroizing<Vec<u8>>, CaError> {
    // A crafted file must not make us allocate gigabytes: cap scrypt's memory
    // (128 * N * r * p bytes) well above what OpenSSL or we write (16 MiB).
    if let Some(scrypt) = scheme.pbes2().and_then(|p| p.kdf.scrypt()) {
        let memory = 128u128
            * u128::from(scrypt.cost_parameter)
            * u128::from(scrypt.block_size)
            * u128::from(scrypt.parallelization);
        if memory > MAX_SCRYPT_MEMORY {
            return Err(CaError::MalformedKey(format!(
                "the key's scrypt parameters need {} MiB; at most {} MiB is allowed",
                memory >> 20,
                MAX_SCRYPT_MEMORY >> 20
            )));
        }
    }
    match scheme.decrypt(passphrase.as_bytes(), ciphertext) {
        Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
        Err(pkcs8::pkcs5::Error::DecryptFailed) => Err(CaError::WrongPassphrase),
        Err(e) => Err(CaError::MalformedKey(format!(
            "unsupported key encryption: {e}"
        ))),
    }
}

/// A readable name for a curve OID.
pub(crate) fn curve_name(oid: &str) -> String {
    match oid {
        OID_P256 => "P-256",
        OID_P384 => "P-384",
        "1.3.132.0.35" => "P-521",
        "1.3.132.0.33" => "P-224",
        "1.2.840.10045.3.1.1" => "P-192",
        "1.3.132.0.10" => "secp256k1",
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1",
        "1.3.36.3.3.2.8.1.1.11" => "brainpoolP384r1",
        "1.3.36.3.3.2.8.1.1.13" => "brainpoolP512r1",
        "1.2.156.10197.1.301" => "SM2",
        other => return other.to_owned(),
    }
    .to_owned()
}

/// A readable name for a public-key algorithm OID.
pub(crate) fn algorithm_name(oid: &str) -> String {
    match oid {
        OID_RSA_ENCRYPTION => "RSA",
        OID_EC_PUBLIC_KEY => "EC",
        OID_ED25519 => "Ed25519",
        "1.3.101.113" => "Ed448",
        "1.3.101.110" => "X25519",
        "1.3.101.111" => "X448",
        "1.2.840.10040.4.1" => "DSA",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.2.840.10046.2.1" => "DH",
        other => return other.to_owned(),
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public key read off ring's PKCS#8 layout is the one the key really has.
    #[test]
    fn generated_public_keys_match_their_private_keys() {
        let rng = SystemRandom::new();
        for _ in 0..5 {
            for alg in [
                KeyAlgorithm::P256,
                KeyAlgorithm::P384,
                KeyAlgorithm::Ed25519,
            ] {
                let g = generate(alg).unwrap();
                let der = g.private.pkcs8_der();
                let derived = match alg {
                    KeyAlgorithm::P256 => {
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
                            .unwrap()
                            .public_key()
                            .as_ref()
                            .to_vec()
                    }
                    KeyAlgorithm::P384 => {
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der, &rng)
                            .unwrap()
                            .public_key()
                            .as_ref()
                            .to_vec()
                    }
                    _ => Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                        .unwrap()
                        .public_key()
                        .as_ref()
                        .to_vec(),
                };
                assert_eq!(g.public.key, derived, "{alg}");
                assert_eq!(detect(der).unwrap(), alg);
            }
        }
        // Ed25519 keys are stored as PKCS#8 v1 (what OpenSSL 3.0 reads).
        let g = generate(KeyAlgorithm::Ed25519).unwrap();
        assert_eq!(g.private.pkcs8_der().len(), 48);
        assert_eq!(g.private.pkcs8_der()[4], 0);
    }

    #[test]
    fn rsa_classes() {
        assert_eq!(rsa_class(2048), KeyAlgorithm::Rsa2048);
        assert_eq!(rsa_class(3071), KeyAlgorithm::Rsa2048);
        assert_eq!(rsa_class(3072), KeyAlgorithm::Rsa3072);
        assert_eq!(rsa_class(8192), KeyAlgorithm::Rsa3072);
    }
}
