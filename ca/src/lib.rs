//! fleetcert's certificate authority.
//!
//! Pure and synchronous: this crate never touches the file system, the network or a
//! database. It creates the CA hierarchy (a self-signed root and an issuing
//! intermediate), encrypts and decrypts CA keys for custody at rest, parses and checks
//! device CSRs, and issues device certificates from a [`DeviceProfile`]. Callers
//! (`fleetcert-lifecycle`) own persistence.
//!
//! Defaults, and why:
//! - P-256 keys: small certificates, fast on constrained devices, what AWS IoT recommends.
//! - Serial numbers are 128 bits from the OS CSPRNG with the top bit clear (RFC 5280
//!   requires a positive INTEGER of at most 20 octets); the first octet is also nonzero so
//!   every serial encodes in exactly 16 octets and has one canonical hex form.
//! - notBefore is backdated by [`DeviceProfile::backdate`] (5 minutes) so a device whose
//!   clock runs a little behind still accepts a freshly issued certificate.
//! - Nothing a CSR asks for is copied: only its public key is used. Subject, SANs,
//!   extensions, CA flag and validity all come from the profile.
#![forbid(unsafe_code)]

mod error;
mod name;

pub use error::CaError;
pub use name::ThingName;

use std::fmt;
use std::str::FromStr;
use time::{Duration, OffsetDateTime};

/// Key algorithms fleetcert can generate and accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    P256,
    P384,
    Ed25519,
    Rsa2048,
    Rsa3072,
}

impl KeyAlgorithm {
    pub const ALL: [KeyAlgorithm; 5] = [
        KeyAlgorithm::P256,
        KeyAlgorithm::P384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
    ];

    /// The CLI spelling: `p256`, `p384`, `ed25519`, `rsa2048`, `rsa3072`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::P256 => "p256",
            KeyAlgorithm::P384 => "p384",
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::Rsa2048 => "rsa2048",
            KeyAlgorithm::Rsa3072 => "rsa3072",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, CaError> {
        KeyAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| CaError::UnknownKeyAlgorithm(s.to_owned()))
    }
}

/// A private key in PKCS#8 DER form. Zeroised on drop; `Debug` never prints it.
pub struct PrivateKey {
    // implementation detail, filled in by the CA implementation
    #[allow(dead_code)]
    pkcs8_der: zeroize::Zeroizing<Vec<u8>>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes (checked to be a key this crate can sign with).
    pub fn from_pkcs8_der(_der: &[u8]) -> Result<Self, CaError> {
        todo!()
    }
    /// PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        todo!()
    }
    /// Unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn to_pem(&self) -> zeroize::Zeroizing<String> {
        todo!()
    }
    /// Encrypted PKCS#8 PEM (`-----BEGIN ENCRYPTED PRIVATE KEY-----`, PBES2:
    /// scrypt or PBKDF2-SHA256 + AES-256-CBC), readable by `openssl pkey -passin`.
    pub fn to_encrypted_pem(&self, _passphrase: &str) -> Result<String, CaError> {
        todo!()
    }
    /// Reads a `PRIVATE KEY` or `ENCRYPTED PRIVATE KEY` PEM. An encrypted key without a
    /// passphrase is [`CaError::PassphraseRequired`]; a wrong one is
    /// [`CaError::WrongPassphrase`].
    pub fn from_pem(_pem: &str, _passphrase: Option<&str>) -> Result<Self, CaError> {
        todo!()
    }
    /// Algorithm of this key.
    pub fn algorithm(&self) -> KeyAlgorithm {
        todo!()
    }
}

/// Options for [`create_hierarchy`].
#[derive(Debug, Clone)]
pub struct HierarchyOptions {
    /// Base name: the root is "`<cn>` Root CA", the issuing CA "`<cn>` Issuing CA".
    pub common_name: String,
    pub key_algorithm: KeyAlgorithm,
    pub root_days: u32,
    pub issuing_days: u32,
}

impl Default for HierarchyOptions {
    fn default() -> Self {
        HierarchyOptions {
            common_name: "fleetcert".into(),
            key_algorithm: KeyAlgorithm::P256,
            root_days: 3650 * 2,
            issuing_days: 3650,
        }
    }
}

/// A freshly created CA hierarchy, ready to be persisted by the caller.
#[derive(Debug)]
pub struct NewHierarchy {
    pub root_cert_pem: String,
    pub root_key: PrivateKey,
    pub issuing_cert_pem: String,
    pub issuing_key: PrivateKey,
}

/// Creates a self-signed root (CA:TRUE, keyCertSign + cRLSign, SKI) and an issuing
/// intermediate signed by it (CA:TRUE pathlen 0, keyCertSign + cRLSign +
/// digitalSignature, SKI, AKI).
pub fn create_hierarchy(
    _opts: &HierarchyOptions,
    _now: OffsetDateTime,
) -> Result<NewHierarchy, CaError> {
    todo!()
}

/// How device certificates are made.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub validity_days: u32,
    /// Algorithm for keys fleetcert generates (CSRs bring their own).
    pub key_algorithm: KeyAlgorithm,
    /// CRL Distribution Point URI written into every device certificate, if any.
    pub crl_url: Option<String>,
    /// How far notBefore is set back from "now" to absorb device clock skew.
    pub backdate: Duration,
}

impl Default for DeviceProfile {
    fn default() -> Self {
        DeviceProfile {
            validity_days: 365,
            key_algorithm: KeyAlgorithm::P256,
            crl_url: None,
            backdate: Duration::minutes(5),
        }
    }
}

/// A parsed device CSR whose signature has been verified and whose key is acceptable.
/// Only its public key is ever used.
#[derive(Debug, Clone)]
pub struct DeviceCsr {
    #[allow(dead_code)]
    spki_der: Vec<u8>,
    #[allow(dead_code)]
    key_algorithm: KeyAlgorithm,
}

impl DeviceCsr {
    /// Parses a CSR in PEM (`CERTIFICATE REQUEST`) or DER form, verifies its
    /// self-signature, and refuses weak or unsupported keys (RSA < 2048 bits, curves other
    /// than P-256/P-384, Ed25519).
    pub fn parse(_bytes: &[u8]) -> Result<Self, CaError> {
        todo!()
    }
    pub fn key_algorithm(&self) -> KeyAlgorithm {
        self.key_algorithm
    }
    /// SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex.
    pub fn public_key_sha256_hex(&self) -> String {
        todo!()
    }
}

/// Where the device key comes from.
#[derive(Debug, Clone, Copy)]
pub enum DeviceKey<'a> {
    /// fleetcert generates a key of the profile's algorithm.
    Generate,
    /// The device sent a CSR; its key never leaves the device.
    Csr(&'a DeviceCsr),
}

/// A signed device certificate, not yet recorded anywhere.
#[derive(Debug)]
pub struct IssuedCertificate {
    /// Lowercase hex of the serial's 16 octets (32 characters).
    pub serial_hex: String,
    pub der: Vec<u8>,
    pub pem: String,
    /// SHA-256 of the certificate DER, lowercase hex (AWS IoT's certificate id).
    pub fingerprint_sha256_hex: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex.
    pub public_key_sha256_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub key_algorithm: KeyAlgorithm,
    /// Present when fleetcert generated the key.
    pub private_key: Option<PrivateKey>,
}

/// The issuing CA, loaded and ready to sign. `Send + Sync`: share one across threads.
pub struct IssuingCa {
    _private: (),
}

impl fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuingCa").finish_non_exhaustive()
    }
}

impl IssuingCa {
    /// Loads the issuing CA. Fails if the key does not match the issuing certificate or
    /// the issuing certificate is not signed by the root.
    pub fn load(
        _issuing_cert_pem: &str,
        _issuing_key: &PrivateKey,
        _root_cert_pem: &str,
    ) -> Result<Self, CaError> {
        todo!()
    }
    pub fn issuing_cert_pem(&self) -> &str {
        todo!()
    }
    pub fn root_cert_pem(&self) -> &str {
        todo!()
    }
    /// Issuing certificate then root, PEM: what `ca export --chain` prints and
    /// `chain.pem` holds.
    pub fn chain_pem(&self) -> String {
        todo!()
    }
    /// The issuing CA's subject as an RFC 4514 string, e.g. `CN=fleetcert Issuing CA`.
    pub fn subject(&self) -> &str {
        todo!()
    }
    /// SHA-256 of the issuing certificate DER, lowercase hex.
    pub fn fingerprint_sha256_hex(&self) -> &str {
        todo!()
    }
    /// Issues a device certificate: CN = thing name, EKU clientAuth, KU digitalSignature
    /// (+ keyEncipherment for RSA), CA:FALSE, SKI, AKI, CRL DP from the profile,
    /// random 128-bit serial, validity from the profile with backdated notBefore.
    pub fn issue(
        &self,
        _thing: &ThingName,
        _key: DeviceKey<'_>,
        _profile: &DeviceProfile,
        _now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        todo!()
    }
}

/// What `ca show` prints about a certificate.
#[derive(Debug, Clone)]
pub struct CertificateSummary {
    pub subject: String,
    pub issuer: String,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub fingerprint_sha256_hex: String,
    /// e.g. `p256`, or the OID if it is not one of ours.
    pub key_algorithm: String,
    pub is_ca: bool,
    pub path_len: Option<u32>,
}

/// Parses one certificate (PEM or DER) and summarises it.
pub fn describe_certificate(_pem_or_der: &[u8]) -> Result<CertificateSummary, CaError> {
    todo!()
}
