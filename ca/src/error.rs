/// Everything that can go wrong in the CA. Messages name the problem in words a
/// factory operator can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("invalid thing name {name:?}: {reason}")]
    InvalidThingName { name: String, reason: String },
    #[error("unknown key algorithm {0:?} (expected one of p256, p384, ed25519, rsa2048, rsa3072)")]
    UnknownKeyAlgorithm(String),
    #[error("CSR is malformed: {0}")]
    MalformedCsr(String),
    #[error("CSR signature does not verify: the request was altered or not signed by its key")]
    CsrSignatureInvalid,
    #[error("CSR key is too weak or unsupported: {0}")]
    WeakOrUnsupportedKey(String),
    #[error("the CA key is encrypted: set FLEETCERT_CA_PASSPHRASE")]
    PassphraseRequired,
    #[error("wrong passphrase for the CA key (FLEETCERT_CA_PASSPHRASE)")]
    WrongPassphrase,
    #[error("private key is malformed or unsupported: {0}")]
    MalformedKey(String),
    #[error("certificate is malformed: {0}")]
    MalformedCertificate(String),
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("the issuing CA certificate is not signed by the root CA: {0}")]
    BrokenChain(String),
    #[error("invalid profile: {0}")]
    InvalidProfile(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("invalid certificate serial {serial:?}: {reason}")]
    InvalidSerial { serial: String, reason: String },
    #[error("invalid revocation reason {given:?}: {reason}")]
    InvalidRevocationReason { given: String, reason: String },
    #[error("invalid CRL parameters: {0}")]
    InvalidCrl(String),
    #[error("CRL is malformed: {0}")]
    MalformedCrl(String),
}
