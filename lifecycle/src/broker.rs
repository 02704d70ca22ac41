//! What the MQTT broker integration keeps on disk: the broker API's shared secret (in the
//! data directory for `serve --broker-api`, and beside the broker's configuration for
//! the plugin), and the broker's TLS server certificate issued by the fleet CA.
//!
//! Every file is written atomically (temporary file, then rename) with mode 0600 for
//! secrets; an existing secret is reused, never replaced.
use crate::LifecycleError;
use crate::datadir::DataDir;
use crate::fsio::{PUBLIC_MODE, SECRET_MODE, write_file_atomic};
use fleetcert_ca::IssuingCa;
use ring::rand::{SecureRandom, SystemRandom};
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The secret's file name, in the data directory's `broker/` and in the broker's
/// configuration directory.
pub const SECRET_FILE: &str = "broker-api.secret";
/// Validity of the broker's server certificate.
const BROKER_CERT_DAYS: u32 = 365;
/// Longest secret file read (a secret is 64 characters).
const MAX_SECRET_FILE: u64 = 4096;

/// The broker API's bearer secret: 32 random bytes, as 64 lowercase hex characters.
#[derive(Clone)]
pub struct BrokerSecret(Zeroizing<String>);

impl std::fmt::Debug for BrokerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerSecret(***)")
    }
}

impl BrokerSecret {
    /// A new secret from the OS CSPRNG, to be written to `for_path` (named if the
    /// generator fails).
    fn generate(for_path: &Path) -> Result<Self, LifecycleError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| LifecycleError::write(for_path, "the system random generator failed"))?;
        Ok(BrokerSecret(Zeroizing::new(hex::encode(&bytes[..]))))
    }

    /// The secret as written in its file (64 hex characters).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads a secret file: 64 hex characters (surrounding whitespace ignored). `Ok(None)`
    /// if the file does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>, LifecycleError> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LifecycleError::read(path, e)),
        };
        let mut text = Zeroizing::new(String::new());
        file.take(MAX_SECRET_FILE)
            .read_to_string(&mut text)
            .map_err(|e| LifecycleError::read(path, e))?;
        let secret = text.trim();
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LifecycleError::BadFile {
                path: path.to_owned(),
                reason: "a broker API secret is 64 hex characters (32 random bytes)".into(),
            });
        }
        Ok(Some(BrokerSecret(Zeroizing::new(
            secret.to_ascii_lowercase(),
        ))))
    }

    fn write(&self, path: &Path) -> Result<(), LifecycleError> {
        if let Some(dir) = path.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| LifecycleError::write(dir, e))?;
        }
        write_file_atomic(path, self.0.as_bytes(), SECRET_MODE)
            .map_err(|e| LifecycleError::write(path, e))
    }
}

/// Where a secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretOrigin {
    /// Generated now.
    Generated,
    /// An existing secret (in the data directory or the broker's directory) was reused.
    Reused,
}

impl DataDir {
    /// `DATA/broker/broker-api.secret`: the secret `serve --broker-api` reads.
    pub fn broker_secret_path(&self) -> PathBuf {
        self.root().join("broker").join(SECRET_FILE)
    }

    /// The broker API secret `serve --broker-api` needs; missing: an error naming the
    /// file and the command that writes it.
    pub fn read_broker_secret(&self) -> Result<BrokerSecret, LifecycleError> {
        let path = self.broker_secret_path();
        BrokerSecret::read(&path)?.ok_or_else(|| LifecycleError::BadFile {
            path: path.clone(),
            reason:
                "the broker API secret is missing; write it (and the broker's configuration) with \
                     `fleetcert mosquitto config --listen HOST:PORT --broker-api http://ADDR`"
                    .into(),
        })
    }

    /// The broker API secret, in the data directory and in `broker_dir` (both mode
    /// 0600, written atomically): an existing one is reused (and copied to where it is
    /// missing); otherwise a new one is generated. Two different existing secrets are an
    /// error naming both files (nothing is overwritten).
    pub fn ensure_broker_secret(
        &self,
        broker_dir: &Path,
    ) -> Result<(BrokerSecret, SecretOrigin), LifecycleError> {
        let in_data = self.broker_secret_path();
        let in_dir = broker_dir.join(SECRET_FILE);
        let (secret, origin) = match (BrokerSecret::read(&in_data)?, BrokerSecret::read(&in_dir)?) {
            (Some(a), Some(b)) if a.as_str() != b.as_str() => {
                return Err(LifecycleError::BadInput(format!(
                    "{} and {} hold different broker API secrets; remove the one that is wrong (serve reads the first, the plugin the second)",
                    in_data.display(),
                    in_dir.display()
                )));
            }
            (Some(a), _) | (None, Some(a)) => (a, SecretOrigin::Reused),
            (None, None) => (BrokerSecret::generate(&in_data)?, SecretOrigin::Generated),
        };
        for path in [&in_data, &in_dir] {
            if BrokerSecret::read(path)?.is_none() {
                secret.write(path)?;
            }
        }
        Ok((secret, origin))
    }
}

/// A TLS server certificate and key for the MQTT broker.
#[derive(Debug)]
pub struct BrokerCredentials {
    /// The broker's certificate then the issuing CA (PEM).
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM, unencrypted (the broker reads it at start).
    pub key_pem: Zeroizing<String>,
    /// The names in its subjectAltName.
    pub names: Vec<String>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// Issues the broker's TLS server certificate from the fleet's issuing CA, for `names`
/// (DNS names or IP addresses), valid a year.
pub fn issue_broker_credentials(
    ca: &IssuingCa,
    names: &[String],
) -> Result<BrokerCredentials, LifecycleError> {
    let issued =
        ca.issue_server_certificate(names, BROKER_CERT_DAYS, time::OffsetDateTime::now_utc())?;
    let key = issued
        .private_key
        .as_ref()
        .expect("server certificates come with a generated key");
    let summary = fleetcert_ca::describe_certificate(issued.pem.as_bytes())?;
    let mut chain_pem = issued.pem.clone();
    if !chain_pem.ends_with('\n') {
        chain_pem.push('\n');
    }
    chain_pem.push_str(ca.issuing_cert_pem());
    Ok(BrokerCredentials {
        chain_pem,
        key_pem: key.to_pem(),
        names: names.to_vec(),
        not_after: summary.not_after.unix_timestamp(),
    })
}

/// Writes a public file (certificate, CRL, configuration) atomically, mode 0644.
pub fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), LifecycleError> {
    write_file_atomic(path, contents, PUBLIC_MODE).map_err(|e| LifecycleError::write(path, e))
}

/// Writes a secret file (a private key) atomically, mode 0600.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), LifecycleError> {
    write_file_atomic(path, contents, SECRET_MODE).map_err(|e| LifecycleError::write(path, e))
}

/// Creates a directory (and its parents) for the broker's files, mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), LifecycleError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| LifecycleError::write(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_shared_and_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path().join("data"));
        let dir = tmp.path().join("mosquitto");
        let (first, origin) = data.ensure_broker_secret(&dir).unwrap();
        assert_eq!(origin, SecretOrigin::Generated);
        assert_eq!(first.as_str().len(), 64);
        let (again, origin) = data.ensure_broker_secret(&dir).unwrap();
        assert_eq!(origin, SecretOrigin::Reused);
        assert_eq!(again.as_str(), first.as_str());
        assert_eq!(data.read_broker_secret().unwrap().as_str(), first.as_str());
        // Another directory gets the same secret.
        let other = tmp.path().join("other");
        let (copied, _) = data.ensure_broker_secret(&other).unwrap();
        assert_eq!(copied.as_str(), first.as_str());
        // Two different secrets: refused, nothing overwritten.
        std::fs::write(other.join(SECRET_FILE), "ab".repeat(32)).unwrap();
        assert!(data.ensure_broker_secret(&other).is_err());
        assert_eq!(
            std::fs::read_to_string(other.join(SECRET_FILE)).unwrap(),
            "ab".repeat(32)
        );
        std::fs::write(data.broker_secret_path(), "not hex").unwrap();
        assert!(data.read_broker_secret().is_err());
    }
}
