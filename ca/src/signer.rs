//! The seam between the issuing CA and its private key: [`CaSigner`], the software
//! implementation [`SoftwareSigner`], and the adapter that lets rcgen sign through a
//! trait object.

use crate::{CaError, KeyAlgorithm, PrivateKey, keys};
use std::cell::RefCell;
use std::fmt;

/// Whatever holds the issuing CA's private key and signs with it.
///
/// [`IssuingCa`](crate::IssuingCa) builds every certificate and CRL itself (the
/// to-be-signed DER, with rcgen) and hands only those bytes to the signer, then
/// wraps the returned signature into the final DER. So a new key store is a new
/// implementation of this trait, passed to
/// [`IssuingCa::with_signer`](crate::IssuingCa::with_signer); nothing else changes.
///
/// The contract:
/// - [`algorithm`](CaSigner::algorithm) names the key type, which fixes the signature
///   algorithm written into certificates and CRLs: ECDSA with SHA-256 (P-256) or
///   SHA-384 (P-384), Ed25519, or RSA PKCS#1 v1.5 with SHA-256 (either RSA class).
/// - [`public_key`](CaSigner::public_key) is the subjectPublicKey BIT STRING contents of
///   the key (an uncompressed EC point, the 32 Ed25519 octets, or the PKCS#1
///   RSAPublicKey DER); [`IssuingCa::with_signer`](crate::IssuingCa::with_signer)
///   refuses a signer whose key is not the issuing certificate's.
/// - [`sign`](CaSigner::sign) gets the whole message (not a digest): the signer
///   hashes it as the algorithm says and returns the signature as X.509 carries it:
///   a DER `Ecdsa-Sig-Value` for ECDSA, 64 raw octets for Ed25519, the modulus-sized
///   octets for RSA.
/// - `Send + Sync`: one `IssuingCa` is shared by every issuing thread, so `sign` is
///   called concurrently. A signer that can only do one operation at a time (one
///   PKCS#11 session, say) serialises inside `sign` or keeps a pool of sessions.
///
/// Plugging in a hardware or cloud key:
/// - **PKCS#11 (HSM, smart card)**: open a session and find the private key object
///   at construction; read the public key from the matching public key object
///   (`CKA_EC_POINT`, unwrapped from its OCTET STRING, or `CKA_MODULUS` and
///   `CKA_PUBLIC_EXPONENT` encoded as RSAPublicKey); `sign` runs `C_SignInit` +
///   `C_Sign` with `CKM_ECDSA_SHA256`/`CKM_ECDSA_SHA384` (then DER-encode the raw
///   r‖s it returns), `CKM_EDDSA` or `CKM_SHA256_RSA_PKCS`.
/// - **Cloud KMS** (AWS KMS, Google Cloud KMS, Azure Key Vault): fetch the public key
///   once at construction (it comes as a SubjectPublicKeyInfo: take its BIT STRING
///   contents); `sign` sends the message (or its SHA-256/384 digest, with the
///   service's "digest" message type) with `ECDSA_SHA_256`/`ECDSA_SHA_384` or
///   `RSASSA_PKCS1_V1_5_SHA_256`. AWS KMS and Cloud KMS already return ECDSA
///   signatures as DER.
///
/// Errors a signer returns come back unchanged from the operation that signed
/// (prefer [`CaError::Signing`] with a message an operator can act on).
pub trait CaSigner: Send + Sync {
    /// The key's type, which fixes the signature algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// The subjectPublicKey BIT STRING contents of the key.
    fn public_key(&self) -> &[u8];
    /// Signs `message` (the DER to be signed, not a digest).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError>;
}

/// The CA key in this process's memory: a decrypted PKCS#8 [`PrivateKey`], signing
/// with ring. Stateless per signature, so it signs on every core at once.
///
/// The key file stays encrypted at rest; it is decrypted only to build this signer.
pub struct SoftwareSigner {
    key: rcgen::KeyPair,
    algorithm: KeyAlgorithm,
}

impl fmt::Debug for SoftwareSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareSigner")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SoftwareSigner {
    /// A signer for `key`. [`CaError::MalformedKey`] if ring cannot sign with it.
    pub fn new(key: &PrivateKey) -> Result<Self, CaError> {
        Ok(SoftwareSigner {
            key: keys::signing_key(key)?,
            algorithm: key.algorithm(),
        })
    }
}

impl CaSigner for SoftwareSigner {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }
    fn public_key(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(&self.key)
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        rcgen::SigningKey::sign(&self.key, message)
            .map_err(|e| CaError::Signing(format!("the CA key could not sign: {e}")))
    }
}

impl<S: CaSigner + ?Sized> CaSigner for Box<S> {
    fn algorithm(&self) -> KeyAlgorithm {
        (**self).algorithm()
    }
    fn public_key(&self) -> &[u8] {
        (**self).public_key()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        (**self).sign(message)
    }
}

thread_local! {
    /// The error of the last failed [`CaSigner::sign`] on this thread: rcgen's
    /// `SigningKey` can only report its own error type, so the signer's error waits
    /// here for [`signing_error`] to pick it up on the same thread.
    static SIGNER_ERROR: RefCell<Option<CaError>> = const { RefCell::new(None) };
}

/// A [`CaSigner`] as rcgen sees it.
pub(crate) struct RcgenSigner {
    signer: Box<dyn CaSigner>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl RcgenSigner {
    pub(crate) fn new(signer: Box<dyn CaSigner>) -> Self {
        let alg = keys::signature_algorithm(signer.algorithm());
        RcgenSigner { signer, alg }
    }
}

impl rcgen::PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        self.signer.public_key()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer.sign(msg).map_err(|e| {
            SIGNER_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
            rcgen::Error::RemoteKeyError
        })
    }
}

/// The [`CaError`] for an rcgen failure: the signer's own error if signing failed.
pub(crate) fn signing_error(e: rcgen::Error) -> CaError {
    let from_signer = SIGNER_ERROR.with(|slot| slot.borrow_mut().take());
    match (e, from_signer) {
        (rcgen::Error::RemoteKeyError, Some(e)) => e,
        (e, _) => CaError::Signing(e.to_string()),
    }
}
