//! Claim certificates (provisioning by claim): one certificate shared by a batch of
//! devices, bound to one provisioning template, that may only ask the Fleet Provisioning
//! API for the devices' own certificates (see `jitp::fleet`). Recorded before its files
//! are written (commit before release); a claim whose files could not be written is
//! revoked at once, so no usable claim key exists outside the files.
use crate::LifecycleError;
use crate::datadir::DataDir;
use fleetcert_ca::{DeviceKey, IssuingCa, ThingName};
use fleetcert_registry::{ClaimRecord, NewClaim, Registry};
use std::path::{Path, PathBuf};

/// Longest claim lifetime accepted, in days.
pub const MAX_CLAIM_DAYS: u32 = 36_500;

/// What `claims create` asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The claim's name (its certificate's common name; the thing-name character set).
    pub name: String,
    /// The provisioning template it is bound to.
    pub template: String,
    /// Validity in days.
    pub days: u32,
    /// How many devices it may provision; `None`: no limit.
    pub max_uses: Option<u32>,
    /// Where `NAME.crt` and `NAME.key` are written.
    pub out_dir: PathBuf,
}

/// A claim made by [`create`].
#[derive(Debug, Clone)]
pub struct CreatedClaim {
    /// As recorded.
    pub record: ClaimRecord,
    /// The certificate file.
    pub certificate_path: PathBuf,
    /// The key file (mode 0600).
    pub key_path: PathBuf,
}

/// Issues a claim certificate with a generated key, records it, then writes
/// `NAME.crt` (the claim certificate, then the issuing CA) and `NAME.key`.
/// Refuses an unknown template, a name in use, and files that exist already.
pub async fn create(
    data: &DataDir,
    registry: &dyn Registry,
    ca: &IssuingCa,
    request: &ClaimRequest,
    now: i64,
) -> Result<CreatedClaim, LifecycleError> {
    let name = ThingName::parse(&request.name)
        .map_err(|e| LifecycleError::BadInput(format!("claim name: {e}")))?;
    if request.days == 0 || request.days > MAX_CLAIM_DAYS {
        return Err(LifecycleError::BadInput(format!(
            "--days must be 1 to {MAX_CLAIM_DAYS}"
        )));
    }
    if request.max_uses == Some(0) {
        return Err(LifecycleError::BadInput(
            "--max-uses must be at least 1".into(),
        ));
    }
    // The template must exist and load (lint included) now, not at the first device.
    data.load_template(&request.template, false)?;
    if registry.get_claim(&request.name).await?.is_some() {
        return Err(LifecycleError::BadInput(format!(
            "a claim named {:?} exists already",
            request.name
        )));
    }
    let certificate_path = request.out_dir.join(format!("{}.crt", request.name));
    let key_path = request.out_dir.join(format!("{}.key", request.name));
    for path in [&certificate_path, &key_path] {
        if path.exists() {
            return Err(LifecycleError::BadInput(format!(
                "{} exists already; not overwritten",
                path.display()
            )));
        }
    }
    if !request.out_dir.is_dir() {
        return Err(LifecycleError::BadInput(format!(
            "--out {} is not a directory",
            request.out_dir.display()
        )));
    }

    let mut profile = data.device_profile()?;
    profile.validity_days = request.days;
    let at = time::OffsetDateTime::from_unix_timestamp(now)
        .map_err(|e| LifecycleError::BadInput(format!("clock out of range: {e}")))?;
    let issued = ca.issue(&name, DeviceKey::Generate, &profile, at)?;
    let key = issued
        .private_key
        .as_ref()
        .ok_or_else(|| LifecycleError::BadInput("no key was generated".into()))?;
    let certificate = crate::issuance::new_certificate(
        &issued,
        ca.subject(),
        &crate::renewal::RenewalPolicy::default(),
    );
    registry
        .create_claim(&NewClaim {
            name: request.name.clone(),
            template: request.template.clone(),
            max_uses: request.max_uses.map(i64::from),
            certificate,
            at: now,
        })
        .await?;
    let chain = format!("{}{}", issued.pem, ca.issuing_cert_pem());
    let written = write_new(&certificate_path, chain.as_bytes(), 0o644)
        .and_then(|()| write_new(&key_path, key.to_pem().as_bytes(), 0o600));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&certificate_path);
        let _ = std::fs::remove_file(&key_path);
        // The key is gone with this process: the recorded claim must not stay usable.
        let _ = registry.revoke_claim(&request.name, now).await;
        return Err(e);
    }
    let record = registry
        .get_claim(&request.name)
        .await?
        .ok_or_else(|| LifecycleError::BadInput("the claim vanished".into()))?;
    Ok(CreatedClaim {
        record,
        certificate_path,
        key_path,
    })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), LifecycleError> {
    crate::fsio::write_file_atomic(path, contents, mode).map_err(|e| LifecycleError::write(path, e))
}

/// Revokes a claim: its sessions are dropped within seconds by a running server, its
/// certificate is listed on the next CRL, and certificates it got that wait for
/// RegisterThing are revoked with it. `false` if it was revoked already.
pub async fn revoke(registry: &dyn Registry, name: &str, now: i64) -> Result<bool, LifecycleError> {
    Ok(registry.revoke_claim(name, now).await?)
}
