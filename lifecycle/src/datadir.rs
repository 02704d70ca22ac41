//! The data directory and CA key custody.
//!
//! ```text
//! <data-dir>/                 mode 0700
//!   ca/ca.json                metadata: key algorithm, CRL URL, whether keys are encrypted
//!   ca/root.crt  ca/root.key  self-signed root (key mode 0600)
//!   (with FLEETCERT_CA_PASSPHRASE, every key file here is encrypted under it)
//!   ca/issuing.crt ca/issuing.key   issuing intermediate (key mode 0600)
//!   ca/sealing.key            seals replacement keys held for devices (mode 0600)
//!   server/server.crt server/server.key   the JITP server's TLS certificate (key mode 0600)
//!   registry.db               the SQLite registry (unless --database-url says otherwise)
//!   templates/<name>.yaml|yml|json  provisioning templates
//! ```
use crate::fsio::{PUBLIC_MODE, SECRET_MODE, write_file_atomic};
use crate::{LifecycleError, unix_now};
use fleetcert_ca::{
    CertificateSummary, DeviceProfile, HierarchyOptions, IssuingCa, KeyAlgorithm, PrivateKey,
    create_hierarchy, describe_certificate,
};
use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Environment variable holding the passphrase that encrypts CA keys at rest.
pub const PASSPHRASE_ENV: &str = "FLEETCERT_CA_PASSPHRASE";

const CA_META: &str = "ca.json";
const ROOT_CERT: &str = "root.crt";
const ROOT_KEY: &str = "root.key";
const ISSUING_CERT: &str = "issuing.crt";
const ISSUING_KEY: &str = "issuing.key";

/// The JITP listener's TLS certificate and key, issued by the fleet CA.
#[derive(Debug, Clone)]
pub struct ServerCredentials {
    /// Server certificate then issuing CA, PEM.
    pub chain_pem: String,
    /// The private key as plain PKCS#8 PEM, whatever its form on disk; wiped on drop.
    pub key_pem: zeroize::Zeroizing<String>,
    /// DNS names or IP addresses the certificate is valid for (the first is its CN).
    pub names: Vec<String>,
    /// End of the certificate's validity, Unix seconds.
    pub not_after: i64,
    /// True if this call issued a new certificate.
    pub issued: bool,
}

const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const SERVER_VALIDITY_DAYS: u32 = 365;
/// A server certificate closer than this to expiry is replaced at start.
const SERVER_RENEW_BEFORE: i64 = 30 * 86_400;

/// Options for `fleetcert ca init`.
#[derive(Debug, Clone, Default)]
pub struct CaInitOptions {
    /// Names, key algorithm and validity of the root and issuing certificates.
    pub hierarchy: HierarchyOptions,
    /// CRL Distribution Point written into device certificates.
    pub crl_url: Option<String>,
}

/// What the data directory records about its CA (`ca/ca.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CaInfo {
    /// Algorithm of the root and issuing keys, as `fleetcert_ca::KeyAlgorithm` spells it
    /// (`p256`, `rsa3072`, ...). Device keys do not follow it.
    pub key_algorithm: String,
    /// CRL Distribution Point put into device certificates; `None`: none is.
    pub crl_url: Option<String>,
    /// When `ca init` ran, Unix seconds.
    pub created_at: i64,
    /// Whether the key files are encrypted under [`PASSPHRASE_ENV`]; loading one then
    /// needs the passphrase.
    pub keys_encrypted: bool,
}

/// A fleetcert data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`. Nothing is read or created until a method needs it
    /// (see [`Self::ensure_exists`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The directory itself, as given to [`Self::new`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<data-dir>/ca`: the CA certificates, keys and `ca.json`.
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// `<data-dir>/templates`: provisioning templates.
    /// `<data-dir>/pre-provisioning/`: RegisterThing's checks per template.
    pub(crate) fn pre_provisioning_dir(&self) -> PathBuf {
        self.root().join("pre-provisioning")
    }

    pub(crate) fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// The embedded default registry: a SQLite file in the data directory.
    pub fn default_database_url(&self) -> String {
        self.root.join("registry.db").to_string_lossy().into_owned()
    }

    /// Creates the data directory (mode 0700: it holds CA keys) if missing.
    pub fn ensure_exists(&self) -> Result<(), LifecycleError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| LifecycleError::write(&self.root, e))
    }

    /// Checks that the data directory exists, without creating it: a command that needs
    /// an existing fleet fails with [`LifecycleError::NoDataDir`] rather than starting an
    /// empty one.
    pub fn require_exists(&self) -> Result<(), LifecycleError> {
        if self.root.is_dir() {
            Ok(())
        } else {
            Err(LifecycleError::NoDataDir {
                dir: self.root.clone(),
            })
        }
    }

    /// Whether `ca init` has run here (`ca/ca.json` exists). Says nothing about whether
    /// the rest of `ca/` is intact; [`Self::ca_info`] and the loaders check that.
    pub fn has_ca(&self) -> bool {
        self.ca_dir().join(CA_META).exists()
    }

    /// Creates the CA hierarchy. Never overwrites: if `ca/` holds anything, this fails
    /// before generating a key. The files are written into a temporary directory that is
    /// renamed to `ca/` only when complete, so an interrupted init leaves no half CA.
    pub fn init_ca(
        &self,
        opts: &CaInitOptions,
        passphrase: Option<&str>,
    ) -> Result<CaInfo, LifecycleError> {
        let ca_dir = self.ca_dir();
        if dir_has_entries(&ca_dir) {
            return Err(LifecycleError::CaExists { dir: ca_dir });
        }
        self.ensure_exists()?;
        if let Some(url) = &opts.crl_url {
            validate_crl_url(url)?;
        }
        let hierarchy = create_hierarchy(&opts.hierarchy, time::OffsetDateTime::now_utc())?;
        let staging = self.root.join(format!(".ca-init-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| LifecycleError::write(&staging, e))?;
        let info = CaInfo {
            key_algorithm: opts.hierarchy.key_algorithm.to_string(),
            crl_url: opts.crl_url.clone(),
            created_at: unix_now(),
            keys_encrypted: passphrase.is_some(),
        };
        let result = (|| {
            let key_pem = |key: &PrivateKey| -> Result<Vec<u8>, LifecycleError> {
                Ok(match passphrase {
                    Some(p) => key.to_encrypted_pem(p)?.into_bytes(),
                    None => key.to_pem().as_bytes().to_vec(),
                })
            };
            let files: [(&str, Vec<u8>, u32); 5] = [
                (ROOT_KEY, key_pem(&hierarchy.root_key)?, SECRET_MODE),
                (ISSUING_KEY, key_pem(&hierarchy.issuing_key)?, SECRET_MODE),
                (
                    ROOT_CERT,
                    hierarchy.root_cert_pem.clone().into_bytes(),
                    PUBLIC_MODE,
                ),
                (
                    ISSUING_CERT,
                    hierarchy.issuing_cert_pem.clone().into_bytes(),
                    PUBLIC_MODE,
                ),
                (
                    CA_META,
                    serde_json::to_vec_pretty(&info).expect("CaInfo serialises"),
                    PUBLIC_MODE,
                ),
            ];
            for (name, contents, mode) in files {
                let path = staging.join(name);
                write_file_atomic(&path, &contents, mode)
                    .map_err(|e| LifecycleError::write(&path, e))?;
            }
            // An empty ca/ left by hand would make rename fail; it holds nothing to lose.
            let _ = fs::remove_dir(&ca_dir);
            fs::rename(&staging, &ca_dir).map_err(|e| {
                if dir_has_entries(&ca_dir) {
                    LifecycleError::CaExists {
                        dir: ca_dir.clone(),
                    }
                } else {
                    LifecycleError::write(&ca_dir, e)
                }
            })?;
            fs::File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(|e| LifecycleError::write(&self.root, e))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result.map(|()| info)
    }

    /// Reads `ca/ca.json`.
    pub fn ca_info(&self) -> Result<CaInfo, LifecycleError> {
        let path = self.ca_dir().join(CA_META);
        let text = fs::read(&path).map_err(|e| self.missing_ca_or(&path, e))?;
        serde_json::from_slice(&text).map_err(|e| LifecycleError::DamagedCa {
            dir: self.ca_dir(),
            reason: format!("{}: {e}", path.display()),
        })
    }

    fn missing_ca_or(&self, path: &Path, e: std::io::Error) -> LifecycleError {
        if e.kind() == std::io::ErrorKind::NotFound {
            if self.has_ca() {
                LifecycleError::DamagedCa {
                    dir: self.ca_dir(),
                    reason: format!("{} is missing", path.display()),
                }
            } else {
                LifecycleError::NoCa { dir: self.ca_dir() }
            }
        } else {
            LifecycleError::read(path, e)
        }
    }

    fn read_ca_file(&self, name: &str) -> Result<String, LifecycleError> {
        let path = self.ca_dir().join(name);
        fs::read_to_string(&path).map_err(|e| self.missing_ca_or(&path, e))
    }

    /// Summaries of the root and issuing certificates (no key is read).
    pub fn ca_certificates(
        &self,
    ) -> Result<(CertificateSummary, CertificateSummary), LifecycleError> {
        self.ca_info()?;
        let root = describe_certificate(self.read_ca_file(ROOT_CERT)?.as_bytes())?;
        let issuing = describe_certificate(self.read_ca_file(ISSUING_CERT)?.as_bytes())?;
        Ok((root, issuing))
    }

    /// Root certificate PEM (the fleet's trust anchor).
    pub fn root_cert_pem(&self) -> Result<String, LifecycleError> {
        self.ca_info()?;
        self.read_ca_file(ROOT_CERT)
    }

    /// Issuing certificate then root, PEM.
    pub fn chain_pem(&self) -> Result<String, LifecycleError> {
        self.ca_info()?;
        let issuing = self.read_ca_file(ISSUING_CERT)?;
        let root = self.read_ca_file(ROOT_CERT)?;
        Ok(format!(
            "{}{}",
            ensure_newline(issuing),
            ensure_newline(root)
        ))
    }

    /// Loads the issuing CA with its key, decrypting it if needed.
    pub fn load_issuing_ca(&self, passphrase: Option<&str>) -> Result<IssuingCa, LifecycleError> {
        self.ca_info()?;
        let key_pem = zeroize::Zeroizing::new(self.read_ca_file(ISSUING_KEY)?);
        let key = PrivateKey::from_pem(&key_pem, passphrase)?;
        let ca = IssuingCa::load(
            &self.read_ca_file(ISSUING_CERT)?,
            &key,
            &self.read_ca_file(ROOT_CERT)?,
        )?;
        Ok(ca)
    }

    /// `<data-dir>/server`: the JITP server's certificate, key and the names they cover.
    fn server_dir(&self) -> PathBuf {
        self.root.join("server")
    }

    /// The JITP server's certificate for `names`: reused if it exists, names the same
    /// hosts and is not about to expire; otherwise issued by `ca` and stored (key mode
    /// 0600). With a `passphrase` the key is stored as encrypted PKCS#8 under it (as the
    /// CA keys are; a plain key found is encrypted in place), without one it is plain
    /// PKCS#8. The returned key is plain PEM, for the TLS stack.
    pub fn server_credentials(
        &self,
        ca: &IssuingCa,
        names: &[String],
        passphrase: Option<&str>,
    ) -> Result<ServerCredentials, LifecycleError> {
        let dir = self.server_dir();
        let cert_path = dir.join(SERVER_CERT);
        let key_path = dir.join(SERVER_KEY);
        let stored_key = match fs::read_to_string(&key_path) {
            Ok(text) => Some(zeroize::Zeroizing::new(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LifecycleError::read(&key_path, e)),
        };
        if let (Ok(cert_pem), Some(key_text)) = (fs::read_to_string(&cert_path), &stored_key)
            && let Ok(summary) = describe_certificate(cert_pem.as_bytes())
        {
            let stored_names: Vec<String> = fs::read_to_string(dir.join("names.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            let fresh = summary.not_after.unix_timestamp() - unix_now() > SERVER_RENEW_BEFORE;
            if fresh && stored_names == names && summary.issuer == ca.subject() {
                // An encrypted key needs the passphrase: without it (or with a wrong
                // one) this fails rather than quietly issuing a plain key in its place.
                let key = PrivateKey::from_pem(key_text, passphrase).map_err(|e| match e {
                    fleetcert_ca::CaError::PassphraseRequired => LifecycleError::KeyLocked {
                        path: key_path.clone(),
                        reason: format!("the server key is encrypted: set {PASSPHRASE_ENV}"),
                    },
                    fleetcert_ca::CaError::WrongPassphrase => LifecycleError::KeyLocked {
                        path: key_path.clone(),
                        reason: format!("wrong passphrase ({PASSPHRASE_ENV}) for the server key"),
                    },
                    other => LifecycleError::BadFile {
                        path: key_path.clone(),
                        reason: other.to_string(),
                    },
                })?;
                if let Some(p) = passphrase
                    && !is_encrypted_pem(key_text)
                {
                    write_file_atomic(&key_path, key.to_encrypted_pem(p)?.as_bytes(), SECRET_MODE)
                        .map_err(|e| LifecycleError::write(&key_path, e))?;
                    tracing::info!(
                        path = %key_path.display(),
                        "the server key is now encrypted with {PASSPHRASE_ENV}"
                    );
                }
                return Ok(ServerCredentials {
                    chain_pem: format!("{}{}", ensure_newline(cert_pem), ca.issuing_cert_pem()),
                    key_pem: key.to_pem(),
                    names: names.to_vec(),
                    not_after: summary.not_after.unix_timestamp(),
                    issued: false,
                });
            }
        }
        let issued = ca.issue_server_certificate(
            names,
            SERVER_VALIDITY_DAYS,
            time::OffsetDateTime::now_utc(),
        )?;
        let key = issued
            .private_key
            .as_ref()
            .expect("server certificates come with a generated key");
        let key_pem = key.to_pem();
        let stored: zeroize::Zeroizing<Vec<u8>> = zeroize::Zeroizing::new(match passphrase {
            Some(p) => key.to_encrypted_pem(p)?.into_bytes(),
            None => key_pem.as_bytes().to_vec(),
        });
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| LifecycleError::write(&dir, e))?;
        write_file_atomic(&key_path, &stored, SECRET_MODE)
            .map_err(|e| LifecycleError::write(&key_path, e))?;
        write_file_atomic(&cert_path, issued.pem.as_bytes(), PUBLIC_MODE)
            .map_err(|e| LifecycleError::write(&cert_path, e))?;
        let names_path = dir.join("names.json");
        write_file_atomic(
            &names_path,
            serde_json::to_string(names)
                .expect("names serialise")
                .as_bytes(),
            PUBLIC_MODE,
        )
        .map_err(|e| LifecycleError::write(&names_path, e))?;
        Ok(ServerCredentials {
            chain_pem: format!("{}{}", ensure_newline(issued.pem), ca.issuing_cert_pem()),
            key_pem,
            names: names.to_vec(),
            not_after: issued.not_after.unix_timestamp(),
            issued: true,
        })
    }

    /// Template files in `<data-dir>/templates/`: (name, path), sorted by name.
    pub fn template_files(&self) -> Result<Vec<(String, PathBuf)>, LifecycleError> {
        crate::templates::template_files(&self.templates_dir())
    }

    /// Reads one file of [`Self::template_files`]: a regular file inside the templates
    /// directory (symbolic links out of it are not followed), size-capped.
    pub fn read_template_file(&self, path: &Path) -> Result<String, LifecycleError> {
        crate::templates::read_template_file(&self.templates_dir(), path)
    }

    /// The key that seals replacement private keys at rest (`ca/sealing.key`, created on
    /// first use, encrypted under `passphrase` if one is given; see [`crate::sealing`]).
    pub fn sealer(
        &self,
        passphrase: Option<&str>,
    ) -> Result<crate::sealing::KeySealer, LifecycleError> {
        self.ca_info()?;
        crate::sealing::KeySealer::load_or_create(&self.ca_dir().join("sealing.key"), passphrase)
    }

    /// Everything rotation and re-enrollment need to issue: the loaded issuing CA, this
    /// CA's device profile and the default renewal policy.
    pub fn issuance(
        &self,
        ca: std::sync::Arc<IssuingCa>,
    ) -> Result<crate::issuance::Issuance, LifecycleError> {
        Ok(crate::issuance::Issuance {
            ca,
            profile: self.device_profile()?,
            renewal: crate::renewal::RenewalPolicy::default(),
        })
    }

    /// The device profile this CA issues with, before per-run overrides.
    pub fn device_profile(&self) -> Result<DeviceProfile, LifecycleError> {
        let info = self.ca_info()?;
        Ok(DeviceProfile {
            crl_url: info.crl_url,
            key_algorithm: KeyAlgorithm::P256,
            ..DeviceProfile::default()
        })
    }

    /// Reads a template by name from `<data-dir>/templates/`; `default` is built in unless
    /// a file overrides it. It must parse, and pass the least-privilege lint unless
    /// `allow_overly_permissive`.
    pub fn load_template(
        &self,
        name: &str,
        allow_overly_permissive: bool,
    ) -> Result<String, LifecycleError> {
        fleetcert_templates::validate_name(name)?;
        let dir = self.templates_dir();
        for ext in ["yaml", "yml", "json"] {
            let path = dir.join(format!("{name}.{ext}"));
            match fs::symlink_metadata(&path) {
                Ok(_) => {
                    let text = crate::templates::read_template_file(&dir, &path)?;
                    if allow_overly_permissive {
                        fleetcert_templates::Template::parse(name, &text)?;
                    } else {
                        fleetcert_templates::check_syntax(name, &text)?;
                    }
                    return Ok(text);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(LifecycleError::read(&path, e)),
            }
        }
        if name == fleetcert_templates::DEFAULT_TEMPLATE_NAME {
            return Ok(fleetcert_templates::DEFAULT_TEMPLATE_YAML.to_owned());
        }
        Err(LifecycleError::TemplateNotFound {
            name: name.to_owned(),
            dir,
        })
    }
}

fn is_encrypted_pem(text: &str) -> bool {
    text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
}

fn ensure_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

fn dir_has_entries(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false)
}

fn validate_crl_url(url: &str) -> Result<(), LifecycleError> {
    let ok = (url.starts_with("http://") && url.len() > "http://".len())
        && url.is_ascii()
        && !url
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control());
    if ok {
        Ok(())
    } else {
        Err(LifecycleError::BadInput(format!(
            "invalid CRL URL {url:?}: it must be an http:// URL (RFC 5280 relying parties fetch CRLs over plain HTTP)"
        )))
    }
}
