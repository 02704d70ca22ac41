//! Device identities for the load generator: `<name>.crt` + `<name>.key` pairs in one
//! directory (what `fleetcert provision --out DIR` writes), each turned into a rustls
//! client configuration once, up front.
use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The chain file `fleetcert provision` writes next to device files; not a device.
pub const CHAIN_FILE: &str = "chain.pem";

/// One device's certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFiles {
    /// The file stem shared by both files (the thing name, for `provision --out`).
    pub name: String,
    /// `<dir>/<name>.crt`: the device certificate, PEM.
    pub cert: PathBuf,
    /// `<dir>/<name>.key`: its private key, PEM.
    pub key: PathBuf,
}

/// Lists the `<name>.crt` + `<name>.key` pairs in `dir`, sorted by name. `chain.pem` and
/// files with other extensions are skipped; a `.crt` without its `.key` is an error (a
/// device whose key stayed on the device cannot be impersonated by a load generator).
pub fn list_devices(dir: &Path) -> Result<Vec<DeviceFiles>> {
    let mut devices = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if path.file_name().and_then(|n| n.to_str()) == Some(CHAIN_FILE) {
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("crt") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let key = path.with_extension("key");
        if !key.is_file() {
            bail!(
                "{} has no key next to it (expected {})",
                path.display(),
                key.display()
            );
        }
        devices.push(DeviceFiles {
            name: name.to_owned(),
            cert: path.clone(),
            key,
        });
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    if devices.is_empty() {
        bail!(
            "no device certificates (<name>.crt + <name>.key) in {}",
            dir.display()
        );
    }
    Ok(devices)
}

/// Trust anchors from a PEM file (one or more certificates).
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| anyhow!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate", path.display());
    }
    Ok(roots)
}

/// A client configuration for one device: ring provider, TLS 1.3 and 1.2, the device's
/// certificate (and any chain in its `.crt`), and no session resumption, so every
/// connection is a full handshake.
pub fn client_config(
    roots: &rustls::RootCertStore,
    device: &DeviceFiles,
) -> Result<Arc<rustls::ClientConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&device.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| anyhow!("{}: {e}", device.cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate", device.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&device.key)
        .map_err(|e| anyhow!("{}: {e}", device.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .with_context(|| format!("{}: key does not fit", device.name))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
