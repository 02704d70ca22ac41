/// Everything that can go wrong in the CA. Messages name the problem in words a
/// factory operator can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A thing name outside AWS IoT's `[a-zA-Z0-9:_-]{1,128}`
    /// ([`ThingName::parse`](crate::ThingName::parse)).
    #[error("invalid thing name {name:?}: {reason}")]
    InvalidThingName {
        /// The name as given.
        name: String,
        /// What is wrong with it: empty, too long, or the first character not allowed.
        reason: String,
    },
    /// A key algorithm name that is none of
    /// [`KeyAlgorithm::as_str`](crate::KeyAlgorithm::as_str)'s spellings (in any case);
    /// holds the name as given.
    #[error("unknown key algorithm {0:?} (expected one of p256, p384, ed25519, rsa2048, rsa3072)")]
    UnknownKeyAlgorithm(String),
    /// The input is not one PKCS#10 request, in PEM or DER.
    #[error("CSR is malformed: {0}")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify with the public key it carries.
    #[error("CSR signature does not verify: the request was altered or not signed by its key")]
    CsrSignatureInvalid,
    /// The CSR's key or signature algorithm is refused: RSA outside 2048 to 8192 bits
    /// or with an unusual public exponent, a curve other than P-256, P-384 and Ed25519, or a
    /// signature with MD5 or SHA-1.
    #[error("CSR key is too weak or unsupported: {0}")]
    WeakOrUnsupportedKey(String),
    /// The key is an `ENCRYPTED PRIVATE KEY` and no passphrase was given.
    #[error("the CA key is encrypted: set FLEETCERT_CA_PASSPHRASE")]
    PassphraseRequired,
    /// The passphrase does not decrypt the key.
    #[error("wrong passphrase for the CA key (FLEETCERT_CA_PASSPHRASE)")]
    WrongPassphrase,
    /// The private key is not PKCS#8 (PEM or DER), is of an unsupported algorithm, or
    /// cannot sign. Legacy PKCS#1/SEC1 PEM gets a hint to convert it.
    #[error("private key is malformed or unsupported: {0}")]
    MalformedKey(String),
    /// A certificate cannot be parsed, or is unfit for the role it is given (a root that
    /// is not self-signed, an issuing certificate that is not a CA or may not sign CRLs).
    #[error("certificate is malformed: {0}")]
    MalformedCertificate(String),
    /// The issuing CA's key (or [`CaSigner`](crate::CaSigner)) is not the one its
    /// certificate certifies.
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    /// The issuing CA certificate's issuer is not the root's subject, or its signature
    /// does not verify with the root's key.
    #[error("the issuing CA certificate is not signed by the root CA: {0}")]
    BrokenChain(String),
    /// Options for a certificate or the hierarchy are out of range: validity, backdate,
    /// CRL URL, CA common name, server names.
    #[error("invalid profile: {0}")]
    InvalidProfile(String),
    /// Making a key or a signature failed: the OS random number generator, key
    /// generation, or the [`CaSigner`](crate::CaSigner) (an HSM or KMS may fail here).
    #[error("signing failed: {0}")]
    Signing(String),
    /// A serial that is not one of ours: 32 lowercase hex digits, first octet 01 to 7f.
    #[error("invalid certificate serial {serial:?}: {reason}")]
    InvalidSerial {
        /// The serial as given.
        serial: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A revocation reason that is unknown or not applicable to device certificates
    /// (see [`RevocationReason`](crate::RevocationReason)).
    #[error("invalid revocation reason {given:?}: {reason}")]
    InvalidRevocationReason {
        /// The reason as given.
        given: String,
        /// Why it is refused, with the accepted names when it is unknown.
        reason: String,
    },
    /// Parameters for [`IssuingCa::sign_crl`](crate::IssuingCa::sign_crl) that cannot make
    /// a valid CRL: nextUpdate not after thisUpdate, a serial listed twice, a time
    /// outside the years 1 to 9999.
    #[error("invalid CRL parameters: {0}")]
    InvalidCrl(String),
    /// The input to [`describe_crl`](crate::describe_crl) is not one CRL.
    #[error("CRL is malformed: {0}")]
    MalformedCrl(String),
}
