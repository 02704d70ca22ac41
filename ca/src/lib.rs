//! fleetcert's certificate authority.
//!
//! Pure and synchronous: this crate never touches the file system, the network or a
//! database. It creates the CA hierarchy (a self-signed root and an issuing
//! intermediate), encrypts and decrypts CA keys for custody at rest, parses and checks
//! device CSRs, issues device certificates from a [`DeviceProfile`], signs CRLs
//! ([`IssuingCa::sign_crl`]) and builds EST's certs-only PKCS#7 ([`pkcs7_certs_only`]).
//! Callers (`fleetcert-lifecycle`) own persistence.
//!
//! Defaults, and why:
//! - P-256 keys: small certificates, fast on constrained devices, what AWS IoT recommends.
//! - Serial numbers are 128 bits from the OS CSPRNG with the top bit clear (RFC 5280
//!   requires a positive INTEGER of at most 20 octets); the first octet is also nonzero so
//!   every serial encodes in exactly 16 octets and has one canonical hex form.
//! - notBefore is backdated by [`DeviceProfile::backdate`] (5 minutes) so a device whose
//!   clock runs a little behind still accepts a freshly issued certificate.
//! - Nothing a CSR asks for is copied: only its public key is used. Subject, SANs,
//!   extensions, CA flag and validity all come from the profile. (The subject CN is
//!   readable, [`DeviceCsr::common_name`], for callers to compare, never to copy.)
//! - CRLs are v2 with the CRL number and AKI extensions RFC 5280 requires, a reasonCode
//!   on every entry but `unspecified` ones, and no issuingDistributionPoint: one full
//!   CRL per issuing CA covers every certificate it issued.

mod crl;
mod csr;
mod error;
mod hierarchy;
mod issue;
mod keys;
mod name;
mod pkcs7;
mod reason;
mod signer;
mod x509;

pub use error::CaError;
pub use name::ThingName;
pub use reason::RevocationReason;
pub use signer::{CaSigner, SoftwareSigner};

use std::fmt;
use std::str::FromStr;
use time::{Duration, OffsetDateTime};

/// Key algorithms fleetcert can generate and accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256: the default.
    P256,
    /// ECDSA on NIST P-384 with SHA-384.
    P384,
    /// Ed25519 (RFC 8410).
    Ed25519,
    /// RSA with a 2048-bit modulus when generated; as a size class, moduli of 2048 to 3071
    /// bits.
    Rsa2048,
    /// RSA with a 3072-bit modulus when generated; as a size class, moduli of 3072 bits
    /// and more.
    Rsa3072,
}

impl KeyAlgorithm {
    /// Every algorithm fleetcert supports, in the order the CLI lists them.
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
    pkcs8_der: zeroize::Zeroizing<Vec<u8>>,
    /// Detected (and checked usable by ring) when the key was made or read.
    algorithm: KeyAlgorithm,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes (checked to be a key this crate can sign with).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, CaError> {
        let algorithm = keys::detect(der)?;
        Ok(PrivateKey {
            pkcs8_der: zeroize::Zeroizing::new(der.to_vec()),
            algorithm,
        })
    }
    /// PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8_der
    }
    /// Unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn to_pem(&self) -> zeroize::Zeroizing<String> {
        keys::to_pem(self)
    }
    /// Encrypted PKCS#8 PEM (`-----BEGIN ENCRYPTED PRIVATE KEY-----`, PBES2:
    /// scrypt or PBKDF2-SHA256 + AES-256-CBC), readable by `openssl pkey -passin`.
    ///
    /// The scrypt cost (N = 2^14, r = 8, p = 1) is OpenSSL 3's default-compatible
    /// choice and takes tens of milliseconds to derive in an optimised build.
    pub fn to_encrypted_pem(&self, passphrase: &str) -> Result<String, CaError> {
        keys::to_encrypted_pem(self, passphrase)
    }
    /// Reads a `PRIVATE KEY` or `ENCRYPTED PRIVATE KEY` PEM. An encrypted key without a
    /// passphrase is [`CaError::PassphraseRequired`]; a wrong one is
    /// [`CaError::WrongPassphrase`].
    ///
    /// A passphrase given for an unencrypted key is ignored.
    pub fn from_pem(pem: &str, passphrase: Option<&str>) -> Result<Self, CaError> {
        keys::from_pem(pem, passphrase)
    }
    /// Algorithm of this key. For RSA this is the size class: moduli of 2048 to 3071
    /// bits are [`KeyAlgorithm::Rsa2048`], larger ones [`KeyAlgorithm::Rsa3072`].
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }
}

/// Options for [`create_hierarchy`].
#[derive(Debug, Clone)]
pub struct HierarchyOptions {
    /// Base name: the root is "`<cn>` Root CA", the issuing CA "`<cn>` Issuing CA".
    pub common_name: String,
    /// Algorithm of both CA keys. Default P-256.
    pub key_algorithm: KeyAlgorithm,
    /// Validity of the root certificate in days, 1 to 36500. Default 7300 (20 years).
    pub root_days: u32,
    /// Validity of the issuing certificate in days, 1 to 36500 and not past the root's
    /// notAfter. Default 3650 (10 years).
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
    /// The self-signed root certificate, PEM.
    pub root_cert_pem: String,
    /// The root's private key. It has signed the issuing CA certificate and signs
    /// nothing else in fleetcert.
    pub root_key: PrivateKey,
    /// The issuing CA certificate, signed by the root, PEM.
    pub issuing_cert_pem: String,
    /// The issuing CA's private key, which signs device certificates and CRLs.
    pub issuing_key: PrivateKey,
}

/// Creates a self-signed root (CA:TRUE, keyCertSign + cRLSign, SKI) and an issuing
/// intermediate signed by it (CA:TRUE pathlen 0, keyCertSign + cRLSign +
/// digitalSignature, SKI, AKI).
///
/// Both get random 128-bit serials and notBefore backdated by 5 minutes. Fails with
/// [`CaError::InvalidProfile`] if the common name is empty or too long for
/// "`<cn>` Issuing CA" to fit RFC 5280's 64 characters, a validity is 0 or over 36500
/// days, or the issuing CA would outlive the root.
pub fn create_hierarchy(
    opts: &HierarchyOptions,
    now: OffsetDateTime,
) -> Result<NewHierarchy, CaError> {
    hierarchy::create(opts, now)
}

/// How device certificates are made.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    /// Validity from "now" in days, 1 to 36500 (notBefore is backdated on top of this).
    /// Default 365.
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
/// Only its public key goes into a certificate; its subject CN is kept for callers to
/// compare with the name they expect. Everything else in the request is dropped.
#[derive(Debug, Clone)]
pub struct DeviceCsr {
    /// The SubjectPublicKeyInfo exactly as it will appear in the certificate.
    spki_der: Vec<u8>,
    /// The first CN of the subject, if it is a string type (UTF8String,
    /// PrintableString, IA5String, NumericString).
    common_name: Option<String>,
    key_algorithm: KeyAlgorithm,
    public: keys::RawPublicKey,
}

impl DeviceCsr {
    /// Parses a CSR in PEM (`CERTIFICATE REQUEST`) or DER form, verifies its
    /// self-signature, and refuses weak or unsupported keys (RSA < 2048 bits, curves other
    /// than P-256/P-384, Ed25519).
    ///
    /// PEM may be labelled `CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`. RSA keys
    /// of 2048 to 8192 bits are accepted; [`DeviceCsr::key_algorithm`] then names the
    /// size class (below 3072 bits [`KeyAlgorithm::Rsa2048`], otherwise
    /// [`KeyAlgorithm::Rsa3072`]). CSRs signed with MD5 or SHA-1 are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, CaError> {
        csr::parse(bytes)
    }
    /// Algorithm of the CSR's key; for RSA the size class, as [`DeviceCsr::parse`] says.
    pub fn key_algorithm(&self) -> KeyAlgorithm {
        self.key_algorithm
    }
    /// SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex.
    pub fn public_key_sha256_hex(&self) -> String {
        csr::public_key_sha256_hex(self)
    }
    /// The CSR subject's common name, for a caller (EST enrollment) to check against
    /// the thing name it expects. It is never copied into a certificate.
    ///
    /// `None` if the subject has no CN or it is not a UTF8String, PrintableString,
    /// IA5String or NumericString; if there are several, the first.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
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
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The certificate, PEM (`CERTIFICATE`).
    pub pem: String,
    /// SHA-256 of the certificate DER, lowercase hex (AWS IoT's certificate id).
    pub fingerprint_sha256_hex: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lowercase hex.
    pub public_key_sha256_hex: String,
    /// Start of validity: "now" less the profile's backdate, truncated to whole seconds.
    pub not_before: OffsetDateTime,
    /// End of validity, truncated to whole seconds.
    pub not_after: OffsetDateTime,
    /// Algorithm of the certified key (the profile's, or the CSR's size class).
    pub key_algorithm: KeyAlgorithm,
    /// Present when fleetcert generated the key.
    pub private_key: Option<PrivateKey>,
}

/// The issuing CA, loaded and ready to sign through its [`CaSigner`]. `Send + Sync`:
/// share one across threads.
pub struct IssuingCa {
    inner: issue::Loaded,
}

impl fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuingCa").finish_non_exhaustive()
    }
}

impl IssuingCa {
    /// Loads the issuing CA. Fails if the key does not match the issuing certificate or
    /// the issuing certificate is not signed by the root.
    ///
    /// Errors: [`CaError::MalformedCertificate`] for unreadable certificates, a root
    /// that is not self-signed or an issuing certificate that is not a CA;
    /// [`CaError::KeyMismatch`]; [`CaError::BrokenChain`].
    ///
    /// The key signs in this process ([`SoftwareSigner`]); this is
    /// [`IssuingCa::with_signer`] with a `SoftwareSigner` for `issuing_key`.
    pub fn load(
        issuing_cert_pem: &str,
        issuing_key: &PrivateKey,
        root_cert_pem: &str,
    ) -> Result<Self, CaError> {
        let signer = SoftwareSigner::new(issuing_key)?;
        Self::with_signer(issuing_cert_pem, Box::new(signer), root_cert_pem)
    }
    /// Loads the issuing CA with its key behind `signer` (a key in memory, an HSM, a
    /// cloud KMS: see [`CaSigner`]). Every certificate and CRL this CA issues is
    /// signed through it, from as many threads as call it.
    ///
    /// Checks and errors as [`IssuingCa::load`]; [`CaError::KeyMismatch`] if the
    /// signer's public key is not the issuing certificate's.
    pub fn with_signer(
        issuing_cert_pem: &str,
        signer: Box<dyn CaSigner>,
        root_cert_pem: &str,
    ) -> Result<Self, CaError> {
        Ok(IssuingCa {
            inner: issue::load(issuing_cert_pem, signer, root_cert_pem)?,
        })
    }
    /// The issuing certificate, re-encoded as one canonical PEM block.
    pub fn issuing_cert_pem(&self) -> &str {
        &self.inner.issuing_cert_pem
    }
    /// The root certificate, re-encoded as one canonical PEM block.
    pub fn root_cert_pem(&self) -> &str {
        &self.inner.root_cert_pem
    }
    /// Issuing certificate then root, PEM: what `ca export --chain` prints and
    /// `chain.pem` holds.
    pub fn chain_pem(&self) -> String {
        format!(
            "{}{}",
            self.inner.issuing_cert_pem, self.inner.root_cert_pem
        )
    }
    /// The issuing CA's subject as an RFC 4514 string, e.g. `CN=fleetcert Issuing CA`.
    pub fn subject(&self) -> &str {
        &self.inner.subject
    }
    /// SHA-256 of the issuing certificate DER, lowercase hex.
    pub fn fingerprint_sha256_hex(&self) -> &str {
        &self.inner.fingerprint_sha256_hex
    }
    /// Issues a TLS server certificate for `names` (DNS names or IP addresses; the first
    /// is also the CN) with a generated P-256 key and EKU serverAuth.
    pub fn issue_server_certificate(
        &self,
        names: &[String],
        validity_days: u32,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        issue::issue_server(self, names, validity_days, now)
    }

    /// Issues the verification certificate AWS IoT asks for when registering this CA
    /// (RegisterCACertificate, default mode): CN = `registration_code` (from
    /// GetRegistrationCode), a throwaway P-256 key, one day of validity, signed by this
    /// CA. The key is discarded: AWS checks only the signature.
    pub fn issue_verification_certificate(
        &self,
        registration_code: &str,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        issue::issue_verification(self, registration_code, now)
    }

    /// Issues a device certificate: CN = thing name, EKU clientAuth, KU digitalSignature
    /// (+ keyEncipherment for RSA), CA:FALSE, SKI, AKI, CRL DP from the profile,
    /// random 128-bit serial, validity from the profile with backdated notBefore.
    ///
    /// [`CaError::InvalidProfile`] if `validity_days` is 0 or over 36500, `backdate` is
    /// negative or `crl_url` is not an absolute ASCII URI. notAfter is not clamped to
    /// the issuing CA's own notAfter.
    pub fn issue(
        &self,
        thing: &ThingName,
        key: DeviceKey<'_>,
        profile: &DeviceProfile,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        issue::issue(self, thing, key, profile, now)
    }

    /// Signs a full v2 CRL listing `entries`, with the issuing CA's key.
    ///
    /// - issuer: the issuing certificate's subject, byte for byte;
    /// - extensions: CRL number `number` and an authority key identifier equal to the
    ///   issuing certificate's subjectKeyIdentifier (both non-critical); no
    ///   issuingDistributionPoint, so the CRL covers everything the CA issued;
    /// - thisUpdate/nextUpdate and each revocation time are truncated to whole seconds
    ///   in UTC (UTCTime for 1950 to 2049, GeneralizedTime otherwise);
    /// - entries keep the given order; each gets a non-critical reasonCode extension
    ///   except [`RevocationReason::Unspecified`] ones, which get none (RFC 5280
    ///   §5.3.1); with no entries, revokedCertificates is left out, as RFC 5280
    ///   requires.
    ///
    /// The signature algorithm is the one the CA signs certificates with (ECDSA with
    /// SHA-256/384, Ed25519, or RSA PKCS#1 v1.5 with SHA-256). The caller keeps
    /// `number` increasing from one CRL to the next (RFC 5280 §5.2.3).
    ///
    /// Errors: [`CaError::InvalidSerial`] for a serial that is not 32 lowercase hex
    /// digits of one of our serials (first octet 01 to 7f); [`CaError::InvalidCrl`] if
    /// `next_update` is not later than `this_update` (after truncation), a serial is
    /// listed twice, or a time is outside the years 1 to 9999;
    /// [`CaError::MalformedCertificate`] if the issuing certificate does not allow
    /// cRLSign or its subject cannot be reproduced exactly.
    pub fn sign_crl(
        &self,
        number: u64,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        entries: &[CrlEntry],
    ) -> Result<SignedCrl, CaError> {
        crl::sign(self, number, this_update, next_update, entries)
    }
}

/// One revoked certificate in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlEntry {
    /// The certificate serial as [`IssuedCertificate::serial_hex`] writes it: 32
    /// lowercase hex digits.
    pub serial_hex: String,
    /// When the CA processed the revocation (RFC 5280 revocationDate).
    pub revoked_at: OffsetDateTime,
    /// Written as the entry's reasonCode, except [`RevocationReason::Unspecified`].
    pub reason: RevocationReason,
}

/// A signed CRL, not yet published anywhere.
#[derive(Debug, Clone)]
pub struct SignedCrl {
    /// The CRL, DER: what `GET /crl` serves.
    pub der: Vec<u8>,
    /// PEM with the `X509 CRL` label (what `openssl crl` reads), LF line endings.
    pub pem: String,
}

/// What [`describe_crl`] reads from a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSummary {
    /// RFC 4514 string, e.g. `CN=fleetcert Issuing CA`.
    pub issuer: String,
    /// The CRL number, if the CRL has one and it fits in a `u64` (ours always do).
    pub number: Option<u64>,
    /// The CRL number's magnitude in lowercase hex, whatever its size.
    pub number_hex: Option<String>,
    /// When this CRL was issued.
    pub this_update: OffsetDateTime,
    /// When the next CRL is due; optional in RFC 5280 (ours always have it).
    pub next_update: Option<OffsetDateTime>,
    /// How many certificates the CRL lists.
    pub entry_count: usize,
}

/// Parses a CRL (DER, or PEM labelled `X509 CRL`) and summarises it. The signature is
/// not checked.
///
/// [`CaError::MalformedCrl`] for input that is not one CRL.
pub fn describe_crl(der: &[u8]) -> Result<CrlSummary, CaError> {
    crl::describe(der)
}

/// A degenerate CMS SignedData holding `certs_der` (RFC 5652 §5; "certs-only"): what
/// RFC 7030 (EST) sends as `application/pkcs7-mime` from `/cacerts` and
/// `/simpleenroll`.
///
/// ContentInfo id-signedData wrapping SignedData version 1, an empty digestAlgorithms
/// SET, encapContentInfo of type id-data with no content, the certificates in
/// `[0] IMPLICIT` in the order given, and an empty signerInfos SET. The certificates
/// are embedded as they are (DER expected, not checked); with none, the optional
/// certificates field is left out. Callers base64-encode it for EST.
pub fn pkcs7_certs_only(certs_der: &[&[u8]]) -> Vec<u8> {
    pkcs7::certs_only(certs_der)
}

/// What `ca show` prints about a certificate.
#[derive(Debug, Clone)]
pub struct CertificateSummary {
    /// RFC 4514 string, e.g. `CN=fleetcert Root CA`.
    pub subject: String,
    /// RFC 4514 string.
    pub issuer: String,
    /// The serial's magnitude in lowercase hex, without leading zero octets (`00` for
    /// zero).
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint_sha256_hex: String,
    /// e.g. `p256`, `rsa4096` (the exact modulus size), or the OID if it is not one of
    /// ours.
    pub key_algorithm: String,
    /// basicConstraints CA:TRUE.
    pub is_ca: bool,
    /// The basicConstraints pathLenConstraint of a CA certificate; `None` if it has none
    /// or is not a CA.
    pub path_len: Option<u32>,
}

/// The identity fields of a device certificate, as JITP templates read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The subject's first commonName (`AWS::IoT::Certificate::CommonName`).
    pub common_name: Option<String>,
    /// The subject's serialNumber attribute (not the certificate serial).
    pub serial_number: Option<String>,
    /// The subject's countryName (`AWS::IoT::Certificate::Country`).
    pub country: Option<String>,
    /// The subject's organizationName (`AWS::IoT::Certificate::Organization`).
    pub organization: Option<String>,
    /// The subject's organizationalUnitName (`AWS::IoT::Certificate::OrganizationalUnit`).
    pub organizational_unit: Option<String>,
    /// The subject's dnQualifier (`AWS::IoT::Certificate::DistinguishedNameQualifier`).
    pub distinguished_name_qualifier: Option<String>,
    /// The subject's stateOrProvinceName (`AWS::IoT::Certificate::StateName`).
    pub state_name: Option<String>,
    /// Lowercase hex of the certificate serial.
    pub certificate_serial_hex: String,
    /// SHA-256 of the DER, lowercase hex (AWS IoT's certificate id).
    pub fingerprint_sha256_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// A certificate's names and validity as policy variables see them
/// (`iot:Certificate.*`): every subject and issuer attribute in the certificate's order,
/// the subject alternative names, the serial and the validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateAttributes {
    /// Subject attributes, in order: (short name, value). Short names: `C`, `O`, `OU`,
    /// `dnQualifier`, `ST`, `L`, `CN`, `serialNumber`, `title`, `SN`, `GN`, `initials`,
    /// `pseudonym`, `generationQualifier`; other attributes are left out.
    pub subject: Vec<(&'static str, String)>,
    /// Issuer attributes, as `subject`.
    pub issuer: Vec<(&'static str, String)>,
    /// Subject alternative names: (`DNSName` | `RFC822Name` | `UniformResourceIdentifier`
    /// | `IPAddress` | `DirectoryName`, value).
    pub subject_alternative_names: Vec<(&'static str, String)>,
    /// Lowercase hex of the certificate serial.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Reads a DER certificate's names and validity (see [`CertificateAttributes`]).
pub fn certificate_attributes(der: &[u8]) -> Result<CertificateAttributes, CaError> {
    x509::attributes(der)
}

/// Reads the identity fields of a DER certificate (already verified by the caller).
pub fn device_identity(der: &[u8]) -> Result<DeviceIdentity, CaError> {
    x509::identity(der)
}

/// Parses one certificate (PEM or DER) and summarises it.
///
/// Subject and issuer are RFC 4514 strings; `serial_hex` is the serial's magnitude in
/// lowercase hex (the 32 characters of [`IssuedCertificate::serial_hex`] for ours).
pub fn describe_certificate(pem_or_der: &[u8]) -> Result<CertificateSummary, CaError> {
    x509::describe(pem_or_der)
}
