//! Encryption at rest for private keys that fleetcert holds between issuing a
//! replacement and handing it to the device.
//!
//! AES-256-GCM (ring) with a random 96-bit nonce per key and the certificate serial as
//! associated data, so a sealed key cannot be swapped onto another certificate's row.
//! The 256-bit sealing key lives in `<data-dir>/ca/sealing.key` (mode 0600), next to the
//! CA keys and never in the registry: a copy of the database (a PostgreSQL replica, a
//! backup) does not reveal device keys. Servers sharing one PostgreSQL need the same
//! `ca/` directory, sealing key included.
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

    /// Loads the sealing key from `path`, creating it (0600) if it does not exist. Two
    /// processes creating it at once end up with the same key: the file is linked into
    /// place only if absent, and the loser reads the winner's.
    pub fn load_or_create(path: &Path) -> Result<Self, LifecycleError> {
        match fs::read(path) {
            Ok(bytes) => return Self::from_key_bytes(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LifecycleError::read(path, e)),
        }
        let mut fresh = zeroize::Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(fresh.as_mut())
            .map_err(|_| LifecycleError::write(path, "the system random generator failed"))?;
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(fresh.as_ref())?;
            file.sync_all()?;
            match fs::hard_link(&temp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            if let Some(dir) = path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        let written = write();
        let _ = fs::remove_file(&temp);
        written.map_err(|e| LifecycleError::write(path, e))?;
        let bytes = fs::read(path).map_err(|e| LifecycleError::read(path, e))?;
        Self::from_key_bytes(&bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_for_their_serial_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealing.key");
        let sealer = KeySealer::load_or_create(&path).unwrap();
        let again = KeySealer::load_or_create(&path).unwrap();
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
}
