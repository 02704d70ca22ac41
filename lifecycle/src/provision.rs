//! Factory-line provisioning: one device or a whole pallet.
//!
//! The pipeline, and why it is shaped this way:
//! 1. **Validate everything first** ([`read_batch_csv`], [`prepare`]): names, duplicates
//!    and CSRs (signature, key strength) are checked before any certificate is signed, so
//!    bad input never leaves a trace in the registry.
//! 2. **Plan against the registry**: a thing that already has a delivered active
//!    certificate is skipped (re-running a batch is safe), unless `--reissue`.
//! 3. **Sign on every core** (rayon), a group at a time.
//! 4. **Commit the group in one transaction** — the certificate, its thing, the events.
//!    Nothing leaves the process before this commit.
//! 5. **Write the group's files** (temp + one `syncfs` + rename), then mark the group
//!    delivered. Writing group N overlaps with signing and committing group N+1.
//!
//! A run killed at any point can be re-run: files on disk always have a committed record;
//! a committed but undelivered certificate is delivered again (CSR: same certificate) or,
//! when its generated key died with the process, revoked and replaced.
use crate::fsio::{GroupWriter, PUBLIC_MODE, SECRET_MODE, Staged, write_file_atomic};
use crate::{LifecycleError, unix_now};
use fleetcert_ca::{DeviceCsr, DeviceKey, DeviceProfile, IssuedCertificate, IssuingCa, ThingName};
use fleetcert_registry::{CertOrigin, CertificateRecord, IssueOutcome, IssueRecord, Registry};
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use time::format_description::well_known::Rfc3339;

/// Committed groups being written to disk at once.
const DELIVERIES_IN_FLIGHT: usize = 2;

/// Name of the chain file written next to device certificates.
pub const CHAIN_FILE: &str = "chain.pem";

/// One device to provision, as given on the command line or in a CSV row.
#[derive(Debug, Clone)]
pub struct DeviceRequest {
    /// Line in the CSV file (for messages); `None` for a single device.
    pub line: Option<u64>,
    pub thing_name: String,
    pub csr_path: Option<PathBuf>,
}

/// A request whose name and CSR passed validation.
#[derive(Debug, Clone)]
pub struct PreparedDevice {
    line: Option<u64>,
    thing: ThingName,
    csr: Option<DeviceCsr>,
}

/// What happened to one device. Serialises as one JSON line per device
/// (`{"result":"issued",...}`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum DeviceReport {
    Issued {
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        thing_name: String,
        serial: String,
        not_after: String,
        origin: CertOrigin,
        certificate: PathBuf,
        #[serde(skip_serializing_if = "Option::is_none")]
        private_key: Option<PathBuf>,
        /// Certificates this one replaced (superseded on `--reissue`, or revoked because
        /// they were never delivered).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        replaced: Vec<String>,
    },
    Skipped {
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        thing_name: String,
        serial: String,
        reason: String,
    },
    /// A certificate committed by an interrupted run, written out now.
    Redelivered {
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        thing_name: String,
        serial: String,
        not_after: String,
        certificate: PathBuf,
    },
    Failed {
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        thing_name: String,
        error: String,
    },
}

impl DeviceReport {
    pub fn thing_name(&self) -> &str {
        match self {
            DeviceReport::Issued { thing_name, .. }
            | DeviceReport::Skipped { thing_name, .. }
            | DeviceReport::Redelivered { thing_name, .. }
            | DeviceReport::Failed { thing_name, .. } => thing_name,
        }
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, DeviceReport::Failed { .. })
    }

    fn failed(line: Option<u64>, thing_name: &str, error: impl ToString) -> Self {
        DeviceReport::Failed {
            line,
            thing_name: thing_name.to_owned(),
            error: error.to_string(),
        }
    }
}

/// Totals of a provisioning run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProvisionSummary {
    pub issued: u64,
    pub skipped: u64,
    pub redelivered: u64,
    pub failed: u64,
    pub elapsed_seconds: f64,
    /// Issued certificates per second of wall time.
    pub issued_per_second: f64,
    pub out_dir: PathBuf,
    /// True if `--fail-fast` stopped the run early.
    pub stopped_early: bool,
}

impl ProvisionSummary {
    fn count(&mut self, report: &DeviceReport) {
        match report {
            DeviceReport::Issued { .. } => self.issued += 1,
            DeviceReport::Skipped { .. } => self.skipped += 1,
            DeviceReport::Redelivered { .. } => self.redelivered += 1,
            DeviceReport::Failed { .. } => self.failed += 1,
        }
    }
}

/// How a run provisions.
#[derive(Debug, Clone)]
pub struct ProvisionSettings {
    pub out_dir: PathBuf,
    /// Template recorded on each thing.
    pub template: Option<String>,
    pub profile: DeviceProfile,
    /// Issue new certificates even for things that already have one (the old ones become
    /// `superseded`).
    pub reissue: bool,
    /// Stop at the first failed device. Validation failures stop the run before anything
    /// is issued.
    pub fail_fast: bool,
    /// Devices per transaction and per file sync.
    pub group_size: usize,
}

impl ProvisionSettings {
    pub fn new(out_dir: impl Into<PathBuf>, profile: DeviceProfile) -> Self {
        ProvisionSettings {
            out_dir: out_dir.into(),
            template: None,
            profile,
            reissue: false,
            fail_fast: false,
            group_size: 1024,
        }
    }
}

/// Reads a batch CSV: a header row with a `thing_name` column and optionally a `csr`
/// column (a path, relative to the CSV file's directory). Problems with the file as a
/// whole are an error; problems with one row are a `Failed` report for that row.
pub fn read_batch_csv(
    path: &Path,
) -> Result<Vec<Result<DeviceRequest, DeviceReport>>, LifecycleError> {
    let bad = |reason: String| LifecycleError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| LifecycleError::read(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(std::io::BufReader::new(file));
    let headers = reader
        .headers()
        .map_err(|e| bad(format!("unreadable header row: {e}")))?
        .clone();
    if headers.is_empty() || headers.iter().all(str::is_empty) {
        return Err(bad(
            "the file is empty: expected a header row with a thing_name column".into(),
        ));
    }
    let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let name_col = column("thing_name").ok_or_else(|| {
        bad(format!(
            "no thing_name column in the header row (found: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let csr_col = column("csr");
    let base = path.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for record in reader.records() {
        match record {
            Ok(record) => {
                let line = record.position().map(|p| p.line());
                let thing_name = record.get(name_col).unwrap_or_default().to_owned();
                let csr_path = csr_col
                    .and_then(|c| record.get(c))
                    .filter(|p| !p.is_empty())
                    .map(|p| base.join(p));
                rows.push(Ok(DeviceRequest {
                    line,
                    thing_name,
                    csr_path,
                }));
            }
            Err(e) => {
                let line = e.position().map(|p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("unreadable row: {len} fields where the header has {expected_len}")
                    }
                    csv::ErrorKind::Utf8 { .. } => "unreadable row: not valid UTF-8".to_owned(),
                    _ => format!("unreadable row: {e}"),
                };
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(LifecycleError::read(path, e));
                }
                rows.push(Err(DeviceReport::failed(line, "", reason)));
            }
        }
    }
    Ok(rows)
}

/// Validates names (and duplicates among them) and reads and checks CSRs, on all cores.
// A failed row's report is moved once per row; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
pub fn prepare(
    requests: Vec<Result<DeviceRequest, DeviceReport>>,
) -> Vec<Result<PreparedDevice, DeviceReport>> {
    let mut lines_by_name: HashMap<&str, Vec<Option<u64>>> = HashMap::new();
    for request in requests.iter().flatten() {
        lines_by_name
            .entry(request.thing_name.as_str())
            .or_default()
            .push(request.line);
    }
    let duplicates: HashMap<String, String> = lines_by_name
        .into_iter()
        .filter(|(_, lines)| lines.len() > 1)
        .map(|(name, lines)| {
            let where_ = lines
                .iter()
                .map(|l| l.map_or("?".to_owned(), |l| l.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            (
                name.to_owned(),
                format!("duplicate thing name {name:?} in this batch (lines {where_}); none of them was provisioned"),
            )
        })
        .collect();
    requests
        .into_par_iter()
        .map(|request| {
            let request = request?;
            let fail = |e: &dyn std::fmt::Display| {
                DeviceReport::failed(request.line, &request.thing_name, e)
            };
            if let Some(reason) = duplicates.get(&request.thing_name) {
                return Err(fail(reason));
            }
            let thing = ThingName::parse(&request.thing_name).map_err(|e| fail(&e))?;
            let csr = match &request.csr_path {
                None => None,
                Some(path) => {
                    let bytes = std::fs::read(path).map_err(|e| {
                        fail(&format!("cannot read CSR file {}: {e}", path.display()))
                    })?;
                    Some(
                        DeviceCsr::parse(&bytes)
                            .map_err(|e| fail(&format!("CSR file {}: {e}", path.display())))?,
                    )
                }
            };
            Ok(PreparedDevice {
                line: request.line,
                thing,
                csr,
            })
        })
        .collect()
}

struct IssuePlan {
    device: PreparedDevice,
    expected_active: Vec<String>,
    supersede: bool,
    revoke: bool,
}

enum Plan {
    Skip(DeviceReport),
    Redeliver(PreparedDevice, Box<CertificateRecord>),
    Issue(IssuePlan),
}

fn plan(device: PreparedDevice, active: Option<&Vec<CertificateRecord>>, reissue: bool) -> Plan {
    let active = match active {
        Some(active) if !active.is_empty() => active,
        _ => {
            return Plan::Issue(IssuePlan {
                device,
                expected_active: Vec::new(),
                supersede: false,
                revoke: false,
            });
        }
    };
    let serials = active.iter().map(|c| c.serial.clone()).collect();
    if reissue {
        return Plan::Issue(IssuePlan {
            device,
            expected_active: serials,
            supersede: true,
            revoke: false,
        });
    }
    if let Some(delivered) = active.iter().find(|c| c.delivered_at.is_some()) {
        return Plan::Skip(DeviceReport::Skipped {
            line: device.line,
            thing_name: device.thing.to_string(),
            serial: delivered.serial.clone(),
            reason: "already has an active certificate; pass --reissue to replace it".into(),
        });
    }
    // Only undelivered certificates: an earlier run committed them and died before
    // writing the files. A CSR certificate can simply be written again; a generated key
    // died with that process, so its certificate is revoked and replaced.
    if let Some(csr) = &device.csr {
        let key = csr.public_key_sha256_hex();
        if let Some(same_key) = active.iter().find(|c| c.public_key_sha256 == key) {
            let record = same_key.clone();
            return Plan::Redeliver(device, Box::new(record));
        }
    }
    Plan::Issue(IssuePlan {
        device,
        expected_active: serials,
        supersede: false,
        revoke: true,
    })
}

struct Signed {
    plan: IssuePlan,
    result: Result<IssuedCertificate, fleetcert_ca::CaError>,
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn unix_to_rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(rfc3339)
        .unwrap_or_else(|_| secs.to_string())
}

fn issue_record(
    plan: &IssuePlan,
    cert: &IssuedCertificate,
    issuer: &str,
    template: &Option<String>,
    at: i64,
) -> IssueRecord {
    IssueRecord {
        thing_name: plan.device.thing.to_string(),
        template: template.clone(),
        certificate: crate::rotation::new_certificate(
            cert,
            issuer,
            &crate::renewal::RenewalPolicy::default(),
        ),
        expected_active: plan.expected_active.clone(),
        supersede_expected: plan.supersede,
        revoke_expected: plan.revoke,
        at,
    }
}

/// One committed group on its way to disk.
struct Delivery {
    staged_reports: Vec<DeviceReport>,
    serials: Vec<String>,
    files: Vec<(String, Vec<u8>, u32)>,
}

async fn deliver(
    writer: Arc<GroupWriter>,
    registry: Arc<dyn Registry>,
    delivery: Delivery,
) -> Result<Vec<DeviceReport>, LifecycleError> {
    let Delivery {
        staged_reports,
        serials,
        files,
    } = delivery;
    let dir = writer.dir().to_path_buf();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        // Sequential on purpose: creations in one directory serialise on its inode lock,
        // and parallel creators only spin on it.
        let staging = writer.staging()?;
        let staged: Vec<Staged> = files
            .iter()
            .map(|(name, contents, mode)| staging.stage(name, contents, *mode))
            .collect::<Result<_, _>>()?;
        let staged_at = started.elapsed();
        writer.publish(staging, staged)?;
        tracing::debug!(files = files.len(), ?staged_at, published_at = ?started.elapsed(), "group files written");
        Ok(())
    })
    .await
    .expect("file writer panicked")
    .map_err(|e| LifecycleError::Write {
        path: dir,
        reason: format!(
            "{e}; the certificates are recorded but their files were not written: re-run the same command to deliver them"
        ),
    })?;
    let marking = Instant::now();
    registry.mark_delivered(&serials, unix_now()).await?;
    tracing::debug!(certificates = serials.len(), took = ?marking.elapsed(), "group marked delivered");
    Ok(staged_reports)
}

/// Provisions prepared devices: plan, sign, commit, write. `report` is called once per
/// device, in completion order, from the calling task.
pub async fn provision(
    ca: Arc<IssuingCa>,
    registry: Arc<dyn Registry>,
    devices: Vec<Result<PreparedDevice, DeviceReport>>,
    settings: &ProvisionSettings,
    report: &mut (dyn FnMut(&DeviceReport) + Send),
) -> Result<ProvisionSummary, LifecycleError> {
    let started = Instant::now();
    let mut summary = ProvisionSummary {
        out_dir: settings.out_dir.clone(),
        ..ProvisionSummary::default()
    };
    let mut emit = |summary: &mut ProvisionSummary, r: DeviceReport| {
        summary.count(&r);
        report(&r);
    };

    let mut prepared = Vec::with_capacity(devices.len());
    for device in devices {
        match device {
            Ok(d) => prepared.push(d),
            Err(failure) => emit(&mut summary, failure),
        }
    }
    if settings.fail_fast && summary.failed > 0 {
        summary.stopped_early = true;
        return Ok(finish(summary, started));
    }

    let writer = Arc::new(
        GroupWriter::open(&settings.out_dir)
            .map_err(|e| LifecycleError::write(&settings.out_dir, e))?,
    );
    let chain_path = writer.path_of(CHAIN_FILE);
    write_file_atomic(&chain_path, ca.chain_pem().as_bytes(), PUBLIC_MODE)
        .map_err(|e| LifecycleError::write(&chain_path, e))?;

    let names: Vec<String> = prepared.iter().map(|d| d.thing.to_string()).collect();
    let mut active = registry.active_certificates(&names).await?;
    drop(names);

    let mut issue_plans = Vec::new();
    let mut redeliveries = Vec::new();
    for device in prepared {
        let current = active.remove(device.thing.as_str());
        match plan(device, current.as_ref(), settings.reissue) {
            Plan::Skip(skip) => emit(&mut summary, skip),
            Plan::Redeliver(device, record) => redeliveries.push((device, record)),
            Plan::Issue(p) => issue_plans.push(p),
        }
    }

    for group in redeliveries.chunks(settings.group_size.max(1)) {
        let mut delivery = Delivery {
            staged_reports: Vec::new(),
            serials: Vec::new(),
            files: Vec::new(),
        };
        for (device, record) in group {
            let file = format!("{}.crt", device.thing);
            let pem = pem::encode(&pem::Pem::new("CERTIFICATE", record.der.clone()));
            delivery
                .files
                .push((file.clone(), pem.into_bytes(), PUBLIC_MODE));
            delivery.serials.push(record.serial.clone());
            delivery.staged_reports.push(DeviceReport::Redelivered {
                line: device.line,
                thing_name: device.thing.to_string(),
                serial: record.serial.clone(),
                not_after: unix_to_rfc3339(record.not_after),
                certificate: writer.path_of(&file),
            });
        }
        for r in deliver(writer.clone(), registry.clone(), delivery).await? {
            emit(&mut summary, r);
        }
    }

    if !issue_plans.is_empty() {
        issue_all(
            ca,
            registry,
            writer,
            issue_plans,
            settings,
            &mut summary,
            &mut emit,
        )
        .await?;
    }
    Ok(finish(summary, started))
}

fn finish(mut summary: ProvisionSummary, started: Instant) -> ProvisionSummary {
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    if summary.elapsed_seconds > 0.0 {
        summary.issued_per_second = summary.issued as f64 / summary.elapsed_seconds;
    }
    summary
}

async fn issue_all(
    ca: Arc<IssuingCa>,
    registry: Arc<dyn Registry>,
    writer: Arc<GroupWriter>,
    plans: Vec<IssuePlan>,
    settings: &ProvisionSettings,
    summary: &mut ProvisionSummary,
    emit: &mut (dyn FnMut(&mut ProvisionSummary, DeviceReport) + Send),
) -> Result<(), LifecycleError> {
    let group_size = settings.group_size.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    // Two groups in flight: one being committed/written while the next is signed.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Signed>>(2);
    let signer = {
        let ca = ca.clone();
        let profile = settings.profile.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("fleetcert-signer".into())
            .spawn(move || {
                let mut plans = plans.into_iter();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let group: Vec<IssuePlan> = plans.by_ref().take(group_size).collect();
                    if group.is_empty() {
                        break;
                    }
                    let now = time::OffsetDateTime::now_utc();
                    let signed: Vec<Signed> = group
                        .into_par_iter()
                        .map(|plan| {
                            let key = match &plan.device.csr {
                                Some(csr) => DeviceKey::Csr(csr),
                                None => DeviceKey::Generate,
                            };
                            let result = ca.issue(&plan.device.thing, key, &profile, now);
                            Signed { plan, result }
                        })
                        .collect();
                    if tx.blocking_send(signed).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| LifecycleError::BadInput(format!("cannot start signer thread: {e}")))?
    };

    let issuer = ca.subject().to_owned();
    // Deliveries overlap each other and the next commit: the file system's and the
    // database's sync latencies, not the CPU, would otherwise bound the line.
    let mut in_flight: VecDeque<
        tokio::task::JoinHandle<Result<Vec<DeviceReport>, LifecycleError>>,
    > = VecDeque::new();
    let mut outcome = Ok(());
    while let Some(group) = rx.recv().await {
        let at = unix_now();
        let mut records = Vec::with_capacity(group.len());
        let mut signed_ok = Vec::with_capacity(group.len());
        for signed in group {
            match signed.result {
                Ok(cert) => {
                    records.push(issue_record(
                        &signed.plan,
                        &cert,
                        &issuer,
                        &settings.template,
                        at,
                    ));
                    signed_ok.push((signed.plan, cert));
                }
                Err(e) => {
                    let d = &signed.plan.device;
                    emit(summary, DeviceReport::failed(d.line, d.thing.as_str(), e));
                }
            }
        }
        let committing = Instant::now();
        let committed = registry.record_issued(&records).await;
        tracing::debug!(records = records.len(), took = ?committing.elapsed(), "group committed");
        let outcomes = match committed {
            Ok(outcomes) => outcomes,
            Err(e) => {
                outcome = Err(e.into());
                break;
            }
        };
        drop(records);
        let mut delivery = Delivery {
            staged_reports: Vec::with_capacity(signed_ok.len()),
            serials: Vec::with_capacity(signed_ok.len()),
            files: Vec::with_capacity(signed_ok.len() * 2),
        };
        for ((plan, cert), result) in signed_ok.into_iter().zip(outcomes) {
            let thing = plan.device.thing.as_str();
            match result {
                IssueOutcome::Committed { .. } => {
                    let crt = format!("{thing}.crt");
                    let key_file = cert.private_key.as_ref().map(|key| {
                        let name = format!("{thing}.key");
                        delivery.files.push((
                            name.clone(),
                            key.to_pem().as_bytes().to_vec(),
                            SECRET_MODE,
                        ));
                        writer.path_of(&name)
                    });
                    delivery
                        .files
                        .push((crt.clone(), cert.pem.clone().into_bytes(), PUBLIC_MODE));
                    delivery.serials.push(cert.serial_hex.clone());
                    delivery.staged_reports.push(DeviceReport::Issued {
                        line: plan.device.line,
                        thing_name: thing.to_owned(),
                        serial: cert.serial_hex.clone(),
                        not_after: rfc3339(cert.not_after),
                        origin: if key_file.is_some() {
                            CertOrigin::Generated
                        } else {
                            CertOrigin::Csr
                        },
                        certificate: writer.path_of(&crt),
                        private_key: key_file,
                        replaced: plan.expected_active.clone(),
                    });
                }
                IssueOutcome::Conflict { current_active } => emit(
                    summary,
                    DeviceReport::failed(
                        plan.device.line,
                        thing,
                        format!(
                            "another provisioning run changed this thing's certificates at the same time (now active: {}); nothing was issued for it, re-run to pick up the current state",
                            current_active.join(", ")
                        ),
                    ),
                ),
            }
        }
        if in_flight.len() >= DELIVERIES_IN_FLIGHT {
            let oldest = in_flight.pop_front().expect("non-empty");
            match oldest.await.expect("delivery task panicked") {
                Ok(reports) => reports.into_iter().for_each(|r| emit(summary, r)),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        in_flight.push_back(tokio::spawn(deliver(
            writer.clone(),
            registry.clone(),
            delivery,
        )));
        if settings.fail_fast && summary.failed > 0 {
            summary.stopped_early = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    for pending in in_flight {
        match pending.await.expect("delivery task panicked") {
            Ok(reports) => reports.into_iter().for_each(|r| emit(summary, r)),
            Err(e) => {
                if outcome.is_ok() {
                    outcome = Err(e)
                }
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || signer.join()).await;
    outcome
}
