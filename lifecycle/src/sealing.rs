//! Encryption at rest for private keys that fleetcert holds between issuing a
//! replacement and the device's first use of it.
//!
//! AES-256-GCM (ring) with a random 96-bit nonce per key and the certificate serial as
//! associated data, so a sealed key cannot be swapped onto another certificate's row.
//! The 256-bit sealing key lives in `<data-dir>/ca/sealing.key` (mode 0600), next to the
//! CA keys and never in the registry: a copy of the database (a PostgreSQL replica, a
//! backup) does not reveal device keys. Servers sharing one PostgreSQL need the same
//! `ca/` directory, sealing key included.
//!
//! With `FLEETCERT_CA_PASSPHRASE` set, the file holds the sealing key *encrypted under
//! the passphrase* (PEM `FLEETCERT ENCRYPTED SEALING KEY`: the DER shape of an encrypted
//! PKCS#8 key, PBES2 with scrypt N = 2^14, r = 8, p = 1 — the CA keys' parameters — and
//! AES-256-GCM, so a wrong passphrase is detected, never turned into a wrong key). We
//! encrypt a random key rather than derive the key from the passphrase because:
//! - the sealing key keeps 256 random bits whatever the passphrase's quality, and only
//!   the file's protection depends on the passphrase, exactly as for the CA keys;
//! - a data directory made before (a raw 32-byte file) is migrated by encrypting the
//!   same key, so the replacement keys already sealed with it stay readable — a derived
//!   key would have orphaned them;
//! - changing the passphrase means re-encrypting one file, not re-sealing rows.
//!
//! Without a passphrase the file is the raw 32 bytes, as before. A raw file found while
//! a passphrase is set is encrypted in place (atomically) on first use.
use crate::LifecycleError;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Seals and opens device private keys (PKCS#8 DER).
pub struct KeySealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for KeySealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySealer").finish_non_exhaustive()
    }
}

const SEALED_VERSION: u8 = 1;

impl KeySealer {
    /// A sealer over raw key bytes (32 bytes).
    pub fn from_key_bytes(bytes: &[u8]) -> Result<Self, LifecycleError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| LifecycleError::BadInput("the sealing key must be 32 bytes".to_owned()))?;
        Ok(KeySealer {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// Loads the sealing key from `path`, creating it (0600) if it does not exist:
    /// encrypted under `passphrase` if one is given, raw otherwise. A raw key found
    /// while a passphrase is given is encrypted in place (same key). Two processes
    /// creating it at once end up with the same key: the file is linked into place only
    /// if absent, and the loser reads the winner's.
    pub fn load_or_create(path: &Path, passphrase: Option<&str>) -> Result<Self, LifecycleError> {
        for _ in 0..2 {
            match read_bounded(path) {
                Ok(bytes) => return Self::from_file(path, &bytes, passphrase),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LifecycleError::read(path, e)),
            }
            let mut fresh = zeroize::Zeroizing::new([0u8; KEY_LEN]);
            SystemRandom::new()
                .fill(fresh.as_mut())
                .map_err(|_| LifecycleError::write(path, "the system random generator failed"))?;
            let contents = match passphrase {
                Some(p) => zeroize::Zeroizing::new(wrap(path, fresh.as_ref(), p)?.into_bytes()),
                None => zeroize::Zeroizing::new(fresh.to_vec()),
            };
            write_new(path, &contents, Placement::IfAbsent)
                .map_err(|e| LifecycleError::write(path, e))?;
        }
        Err(LifecycleError::read(
            path,
            "the sealing key disappeared while it was being created",
        ))
    }

    /// A sealer from the file's contents; migrates a raw key when a passphrase is given.
    fn from_file(
        path: &Path,
        bytes: &[u8],
        passphrase: Option<&str>,
    ) -> Result<Self, LifecycleError> {
        if bytes.len() == KEY_LEN {
            if let Some(p) = passphrase {
                let wrapped = wrap(path, bytes, p)?;
                write_new(path, wrapped.as_bytes(), Placement::Replace)
                    .map_err(|e| LifecycleError::write(path, e))?;
                tracing::info!(
                    path = %path.display(),
                    "the sealing key is now encrypted with FLEETCERT_CA_PASSPHRASE"
                );
            }
            return Self::from_key_bytes(bytes);
        }
        let Some(text) = std::str::from_utf8(bytes).ok().filter(|t| {
            t.trim_start()
                .starts_with(&format!("-----BEGIN {WRAPPED_LABEL}-----"))
        }) else {
            return Err(LifecycleError::BadFile {
                path: path.to_owned(),
                reason: format!(
                    "not a sealing key: expected {KEY_LEN} raw bytes or a {WRAPPED_LABEL} PEM block ({} bytes found)",
                    bytes.len()
                ),
            });
        };
        let Some(passphrase) = passphrase else {
            return Err(LifecycleError::KeyLocked {
                path: path.to_owned(),
                reason: format!("it is encrypted: set {}", crate::datadir::PASSPHRASE_ENV),
            });
        };
        let key = unwrap(path, text, passphrase)?;
        Self::from_key_bytes(&key)
    }

    /// `version || nonce || ciphertext || tag`, bound to `serial`.
    pub fn seal(&self, serial: &str, pkcs8_der: &[u8]) -> Result<Vec<u8>, LifecycleError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| LifecycleError::BadInput("the system random generator failed".into()))?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + pkcs8_der.len() + 16);
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&nonce);
        let mut body = pkcs8_der.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(serial.as_bytes()),
                &mut body,
            )
            .map_err(|_| LifecycleError::BadInput("cannot seal a private key".into()))?;
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    /// The PKCS#8 DER sealed for `serial`; fails if it was sealed for another serial,
    /// with another key, or altered.
    pub fn open(
        &self,
        serial: &str,
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, LifecycleError> {
        let unreadable = || {
            LifecycleError::BadInput(format!(
                "the stored key of certificate {serial} cannot be opened (altered, or sealed with another sealing key)"
            ))
        };
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEALED_VERSION {
            return Err(unreadable());
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN])
            .map_err(|_| unreadable())?;
        let mut body = zeroize::Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(serial.as_bytes()), &mut body)
            .map_err(|_| unreadable())?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }
}

const KEY_LEN: usize = 32;
/// PEM label of a sealing key encrypted under the passphrase.
const WRAPPED_LABEL: &str = "FLEETCERT ENCRYPTED SEALING KEY";
/// A sealing key file is 32 bytes raw or a few hundred as PEM; anything much larger is
/// not one (and is not read into memory).
const MAX_FILE_BYTES: u64 = 16 * 1024;
/// scrypt parameters, as for the CA keys (`fleetcert_ca`): N = 2^14, r = 8, p = 1.
const SCRYPT_LOG_N: u8 = 14;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;
/// What a crafted file may make us allocate for scrypt (128 * N * r * p bytes).
const MAX_SCRYPT_MEMORY: u128 = 256 << 20;

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes: not a sealing key"),
        ));
    }
    Ok(bytes)
}

/// The sealing key encrypted under `passphrase`, as PEM.
fn wrap(path: &Path, key: &[u8], passphrase: &str) -> Result<String, LifecycleError> {
    use pkcs8::pkcs5::{pbes2, scrypt};
    let failed = |e: &dyn std::fmt::Display| {
        LifecycleError::write(path, format!("cannot encrypt the sealing key: {e}"))
    };
    let rng = SystemRandom::new();
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    rng.fill(&mut salt)
        .and_then(|()| rng.fill(&mut nonce))
        .map_err(|_| failed(&"the system random generator failed"))?;
    let params = scrypt::Params::new(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P).map_err(|e| failed(&e))?;
    let scheme =
        pbes2::Parameters::scrypt_aes256gcm(params, &salt, nonce).map_err(|e| failed(&e))?;
    let ciphertext = scheme
        .encrypt(passphrase.as_bytes(), key)
        .map_err(|e| failed(&e))?;
    let encrypted_data =
        pkcs8::der::asn1::OctetStringRef::new(&ciphertext).map_err(|e| failed(&e))?;
    let info = pkcs8::EncryptedPrivateKeyInfoRef {
        encryption_algorithm: scheme.into(),
        encrypted_data,
    };
    let der = pkcs8::der::Encode::to_der(&info).map_err(|e| failed(&e))?;
    Ok(pem::encode(&pem::Pem::new(WRAPPED_LABEL, der)))
}

/// The sealing key from its encrypted PEM.
fn unwrap(
    path: &Path,
    text: &str,
    passphrase: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, LifecycleError> {
    let damaged = |reason: String| LifecycleError::BadFile {
        path: path.to_owned(),
        reason: format!("the encrypted sealing key is malformed: {reason}"),
    };
    let block = pem::parse(text).map_err(|e| damaged(e.to_string()))?;
    if block.tag() != WRAPPED_LABEL {
        return Err(damaged(format!("unexpected PEM label {:?}", block.tag())));
    }
    let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(block.contents())
        .map_err(|e| damaged(e.to_string()))?;
    let Some(scrypt) = info
        .encryption_algorithm
        .pbes2()
        .and_then(|p| p.kdf.scrypt())
    else {
        return Err(damaged("not encrypted with PBES2 and scrypt".to_owned()));
    };
    let memory = 128u128
        * u128::from(scrypt.cost_parameter)
        * u128::from(scrypt.block_size)
        * u128::from(scrypt.parallelization);
    if memory > MAX_SCRYPT_MEMORY {
        return Err(damaged(format!(
            "its scrypt parameters need {} MiB; at most {} MiB is allowed",
            memory >> 20,
            MAX_SCRYPT_MEMORY >> 20
        )));
    }
    let key = info
        .encryption_algorithm
        .decrypt(passphrase.as_bytes(), info.encrypted_data.as_bytes())
        .map_err(|e| match e {
            pkcs8::pkcs5::Error::DecryptFailed => LifecycleError::KeyLocked {
                path: path.to_owned(),
                reason: format!(
                    "wrong passphrase ({}) for the encrypted sealing key",
                    crate::datadir::PASSPHRASE_ENV
                ),
            },
            other => damaged(other.to_string()),
        })?;
    let key = zeroize::Zeroizing::new(key);
    if key.len() != KEY_LEN {
        return Err(damaged(format!(
            "it holds {} bytes, not {KEY_LEN}",
            key.len()
        )));
    }
    Ok(key)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Link into place only if nothing is there (creation).
    IfAbsent,
    /// Rename over what is there (migration of the same key).
    Replace,
}

/// Writes `contents` (0600) next to `path`, syncs it, puts it in place and syncs the
/// directory.
fn write_new(path: &Path, contents: &[u8], placement: Placement) -> std::io::Result<()> {
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        match placement {
            Placement::IfAbsent => match fs::hard_link(&temp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            },
            Placement::Replace => fs::rename(&temp, path)?,
        }
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    let written = write();
    let _ = fs::remove_file(&temp);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_for_their_serial_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealing.key");
        let sealer = KeySealer::load_or_create(&path, None).unwrap();
        let again = KeySealer::load_or_create(&path, None).unwrap();
        let sealed = sealer.seal("01ab", b"private key bytes").unwrap();
        assert_ne!(&sealed[1 + NONCE_LEN..], b"private key bytes");
        assert_eq!(
            again.open("01ab", &sealed).unwrap().as_slice(),
            b"private key bytes"
        );
        assert!(sealer.open("01ac", &sealed).is_err(), "bound to the serial");
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(sealer.open("01ab", &altered).is_err());
        let other = KeySealer::from_key_bytes(&[7u8; 32]).unwrap();
        assert!(other.open("01ab", &sealed).is_err());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), 32);
    }

    #[test]
    fn with_a_passphrase_the_file_is_encrypted_and_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealing.key");
        let sealer = KeySealer::load_or_create(&path, Some("correct horse")).unwrap();
        let sealed = sealer.seal("01ab", b"device key").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("-----BEGIN FLEETCERT ENCRYPTED SEALING KEY-----"),
            "{text}"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No 32-byte window of the file (or of its PEM body) is the key.
        let der = pem::parse(&text).unwrap().into_contents();
        for bytes in [text.as_bytes(), der.as_slice()] {
            for window in bytes.windows(KEY_LEN) {
                let candidate = KeySealer::from_key_bytes(window).unwrap();
                assert!(candidate.open("01ab", &sealed).is_err());
            }
        }
        let again = KeySealer::load_or_create(&path, Some("correct horse")).unwrap();
        assert_eq!(
            again.open("01ab", &sealed).unwrap().as_slice(),
            b"device key"
        );
        let missing = KeySealer::load_or_create(&path, None).unwrap_err();
        assert!(
            matches!(&missing, LifecycleError::KeyLocked { reason, .. } if reason.contains("FLEETCERT_CA_PASSPHRASE")),
            "{missing}"
        );
        let wrong = KeySealer::load_or_create(&path, Some("wrong")).unwrap_err();
        assert!(
            matches!(&wrong, LifecycleError::KeyLocked { reason, .. } if reason.contains("wrong passphrase")),
            "{wrong}"
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            text,
            "a failed load changed the file"
        );
    }

    #[test]
    fn a_raw_key_is_encrypted_in_place_and_keeps_its_sealed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealing.key");
        let raw = KeySealer::load_or_create(&path, None).unwrap();
        let raw_bytes = fs::read(&path).unwrap();
        assert_eq!(raw_bytes.len(), KEY_LEN);
        let sealed = raw.seal("02cd", b"older device key").unwrap();

        let migrated = KeySealer::load_or_create(&path, Some("pass")).unwrap();
        assert_eq!(
            migrated.open("02cd", &sealed).unwrap().as_slice(),
            b"older device key"
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(WRAPPED_LABEL));
        assert!(
            !text
                .as_bytes()
                .windows(KEY_LEN)
                .any(|w| w == raw_bytes.as_slice()),
            "the raw key is still in the file"
        );
        assert!(KeySealer::load_or_create(&path, None).is_err());
        let reopened = KeySealer::load_or_create(&path, Some("pass")).unwrap();
        assert!(reopened.open("02cd", &sealed).is_ok());
        assert_eq!(leftovers(dir.path()), ["sealing.key"]);
    }

    #[test]
    fn damaged_and_hostile_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealing.key");
        fs::write(&path, b"short").unwrap();
        let e = KeySealer::load_or_create(&path, None).unwrap_err();
        assert!(e.to_string().contains("not a sealing key"), "{e}");
        fs::write(&path, vec![b'x'; 1 << 20]).unwrap();
        let e = KeySealer::load_or_create(&path, Some("p")).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // scrypt parameters that would need 1 GiB are refused before deriving.
        use pkcs8::pkcs5::{pbes2, scrypt};
        let params = scrypt::Params::new(20, 8, 1).unwrap();
        let scheme = pbes2::Parameters::scrypt_aes256gcm(params, &[1u8; 16], [2u8; 12]).unwrap();
        let data = pkcs8::der::asn1::OctetStringRef::new(&[0u8; 48]).unwrap();
        let info = pkcs8::EncryptedPrivateKeyInfoRef {
            encryption_algorithm: scheme.into(),
            encrypted_data: data,
        };
        let der = pkcs8::der::Encode::to_der(&info).unwrap();
        fs::write(&path, pem::encode(&pem::Pem::new(WRAPPED_LABEL, der))).unwrap();
        let e = KeySealer::load_or_create(&path, Some("p")).unwrap_err();
        assert!(e.to_string().contains("MiB"), "{e}");
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}
