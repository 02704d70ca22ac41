//! Scheduled rotation: find certificates past their renewal point, get replacements to
//! the devices, and never strand one.
//!
//! A sweep (the worker inside `serve`, or `fleetcert rotate` from cron):
//! 1. **Opens** a rotation for every active, delivered certificate past its renewal
//!    point (or expiring within `--within`): one row per old certificate, ever.
//! 2. **Claims** due rotations of fleetcert-generated keys in batches, each under a
//!    lease, so two workers (two servers on one PostgreSQL, or cron `rotate` next to
//!    `serve`) never work on one rotation at once. A worker killed mid-sweep leaves
//!    leases that expire; the next sweep takes them over.
//! 3. **Issues** the replacements on every core (same thing, same lifetime, same key
//!    algorithm, a new key), seals each private key (see [`crate::sealing`]), and
//!    commits the batch in one transaction *only if the lease is still ours* — so a
//!    rotation is issued exactly once even when a slow worker loses its lease.
//!
//! Devices with their own keys (origin `csr`) are only told: `POST /v1/connect` says
//! `rotation_due` and the device re-enrolls through EST. Either way the old certificate
//! keeps working until the device has been seen with the new one; only then is it
//! revoked (see [`crate::jitp::Jitp`]).
use crate::LifecycleError;
pub use crate::issuance::Issuance;
use crate::renewal::Clock;
use crate::sealing::KeySealer;
use fleetcert_ca::DeviceKey;
use fleetcert_registry::{
    CertificateRecord, PreparedReplacement, Registry, RotationBacklog, RotationClaim,
};
use rayon::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Rotation counters for `/metrics`, shared by the worker and the JITP server.
#[derive(Debug, Default)]
pub struct RotationStats {
    /// Rotations opened (certificates that came due).
    pub due: AtomicU64,
    /// Replacements issued (ahead of time by the worker, by EST, or on demand).
    pub issued: AtomicU64,
    /// Replacements handed to devices (EST replies and fetches).
    pub delivered: AtomicU64,
    /// Old certificates revoked because the device used its new one.
    pub confirmed: AtomicU64,
    /// Failed attempts (signing or sealing errors, refused re-enrollments).
    pub failed: AtomicU64,
}

impl RotationStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Knobs of a sweep.
#[derive(Debug, Clone)]
pub struct RotationSettings {
    /// How long a claim is exclusive. A worker that dies holds its batch this long.
    pub lease: Duration,
    /// Rotations claimed, signed and committed together.
    pub batch: u32,
    /// Failed attempts before a rotation is parked as `failed`.
    pub max_attempts: u32,
    /// Also rotate every active certificate that expires within this long.
    pub expiring_within: Option<Duration>,
}

impl Default for RotationSettings {
    fn default() -> Self {
        RotationSettings {
            lease: Duration::from_secs(300),
            batch: 4096,
            max_attempts: 5,
            expiring_within: None,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SweepReport {
    /// Rotations opened by this sweep (certificates that came due).
    pub opened: u64,
    /// Replacements issued ahead of time (generated keys).
    pub issued: u64,
    /// Claimed rotations whose lease another worker took over before the commit
    /// (nothing written for them).
    pub lost_leases: u64,
    /// Failed attempts (they are retried by later sweeps up to the attempt limit).
    pub failed: u64,
    /// Wall time of the sweep, seconds. The phases below can add up to more: signing
    /// runs on the blocking pool, overlapping the commits.
    pub seconds: f64,
    /// Time spent opening rotations for the certificates that came due, seconds.
    pub open_seconds: f64,
    /// Time spent claiming batches of due rotations, seconds.
    pub claim_seconds: f64,
    /// Time spent signing replacements and sealing their keys (every core), seconds.
    pub sign_seconds: f64,
    /// Time spent committing batches, seconds.
    pub commit_seconds: f64,
}

/// The rotation worker.
pub struct Rotator {
    registry: Arc<dyn Registry>,
    issuance: Arc<Issuance>,
    sealer: Arc<KeySealer>,
    clock: Arc<dyn Clock>,
    owner: String,
    settings: RotationSettings,
    stats: Arc<RotationStats>,
}

impl std::fmt::Debug for Rotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotator")
            .field("owner", &self.owner)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A name for this worker's leases: host, process and a random tag.
pub fn worker_name() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let mut tag = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag);
    format!("{host}:{}:{}", std::process::id(), hex::encode(tag))
}

impl Rotator {
    /// A worker issuing with `issuance` and sealing generated keys with `sealer`; its
    /// leases are taken under a fresh [`worker_name`]. `stats` is shared with whoever
    /// exports it (the JITP server's `/metrics`).
    pub fn new(
        registry: Arc<dyn Registry>,
        issuance: Arc<Issuance>,
        sealer: Arc<KeySealer>,
        clock: Arc<dyn Clock>,
        settings: RotationSettings,
        stats: Arc<RotationStats>,
    ) -> Self {
        Rotator {
            registry,
            issuance,
            sealer,
            clock,
            owner: worker_name(),
            settings,
            stats,
        }
    }

    /// The name this worker's leases are held under (host, process, random tag).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn expiring_before(&self, now: i64) -> Option<i64> {
        self.settings
            .expiring_within
            .map(|d| now.saturating_add(d.as_secs() as i64))
    }

    /// The certificates a sweep would open rotations for, changing nothing.
    pub async fn due(&self, limit: Option<u32>) -> Result<Vec<CertificateRecord>, LifecycleError> {
        let now = self.clock.now();
        Ok(self
            .registry
            .due_certificates(now, self.expiring_before(now), limit)
            .await?)
    }

    /// The open rotations not issued yet: claimable, under a lease (after a sweep:
    /// another worker's — a killed `rotate` holds its batch until the lease expires),
    /// or waiting for devices to re-enroll. A sweep that found "0 due" reports these
    /// instead of saying nothing is waiting.
    pub async fn backlog(&self) -> Result<RotationBacklog, LifecycleError> {
        Ok(self.registry.rotation_backlog(self.clock.now()).await?)
    }

    /// One sweep; `progress` is called after every committed batch.
    pub async fn sweep(
        &self,
        mut progress: impl FnMut(&SweepReport),
    ) -> Result<SweepReport, LifecycleError> {
        let started = Instant::now();
        let mut report = SweepReport::default();
        let now = self.clock.now();
        report.opened = self
            .registry
            .open_due_rotations(now, self.expiring_before(now))
            .await?;
        report.open_seconds = started.elapsed().as_secs_f64();
        RotationStats::add(&self.stats.due, report.opened);
        progress(&report);
        let lease = self.settings.lease.as_secs().max(1) as i64;
        // Signing batch N+1 (on the blocking pool, every core) overlaps committing
        // batch N: the database and the CPUs work at the same time.
        let mut pending: Option<(Vec<Signed>, i64)> = None;
        loop {
            let now = self.clock.now();
            let phase = Instant::now();
            let claims = self
                .registry
                .claim_rotations(&self.owner, now, lease, self.settings.batch.max(1))
                .await?;
            report.claim_seconds += phase.elapsed().as_secs_f64();
            let signing = (!claims.is_empty()).then(|| {
                let issuance = self.issuance.clone();
                let sealer = self.sealer.clone();
                tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let signed = claims
                        .par_iter()
                        .map(|claim| prepare(&issuance, &sealer, claim, now))
                        .collect::<Vec<_>>();
                    (signed, started.elapsed().as_secs_f64())
                })
            });
            if let Some((signed, at)) = pending.take() {
                self.commit(signed, at, &mut report).await?;
                report.seconds = started.elapsed().as_secs_f64();
                progress(&report);
            }
            let Some(signing) = signing else { break };
            let (signed, took) = signing
                .await
                .map_err(|e| LifecycleError::BadInput(format!("signing task failed: {e}")))?;
            report.sign_seconds += took;
            pending = Some((signed, now));
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Commits one signed batch (failures are recorded per rotation).
    async fn commit(
        &self,
        signed: Vec<Signed>,
        now: i64,
        report: &mut SweepReport,
    ) -> Result<(), LifecycleError> {
        let phase = Instant::now();
        let mut ready = Vec::with_capacity(signed.len());
        for outcome in signed {
            match outcome {
                Ok(item) => ready.push(item),
                Err((serial, error)) => {
                    tracing::warn!(%serial, "cannot issue a replacement: {error}");
                    self.registry
                        .fail_rotation(
                            &self.owner,
                            &serial,
                            &error,
                            now,
                            self.settings.max_attempts,
                        )
                        .await?;
                    report.failed += 1;
                    RotationStats::add(&self.stats.failed, 1);
                }
            }
        }
        if !ready.is_empty() {
            let committed = self
                .registry
                .complete_rotations(&self.owner, &ready)
                .await?;
            let issued = committed.iter().filter(|c| **c).count() as u64;
            report.issued += issued;
            report.lost_leases += committed.len() as u64 - issued;
            RotationStats::add(&self.stats.issued, issued);
        }
        report.commit_seconds += phase.elapsed().as_secs_f64();
        Ok(())
    }

    /// Sweeps every `interval` until the future is dropped (the worker inside `serve`).
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            match self.sweep(|_| {}).await {
                Ok(r) if r.opened + r.issued + r.failed + r.lost_leases > 0 => tracing::info!(
                    opened = r.opened,
                    issued = r.issued,
                    failed = r.failed,
                    lost_leases = r.lost_leases,
                    "rotation sweep"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("rotation sweep failed: {e}"),
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// A signed and sealed replacement, or (old serial, why it failed).
type Signed = Result<PreparedReplacement, (String, String)>;

/// Signs and seals one replacement; on failure, the old serial and the reason.
fn prepare(
    issuance: &Issuance,
    sealer: &KeySealer,
    claim: &RotationClaim,
    now: i64,
) -> Result<PreparedReplacement, (String, String)> {
    let fail = |e: LifecycleError| (claim.old.serial.clone(), e.to_string());
    let (issued, new) = issuance
        .replacement(&claim.old, DeviceKey::Generate, now)
        .map_err(fail)?;
    let key = issued
        .private_key
        .as_ref()
        .expect("a generated key comes with its private key");
    let sealed_key = sealer.seal(&new.serial, key.pkcs8_der()).map_err(fail)?;
    Ok(PreparedReplacement {
        old_serial: claim.old.serial.clone(),
        new,
        sealed_key,
        at: now,
    })
}
