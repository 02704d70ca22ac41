//! Factory-line provisioning: one device or a whole pallet.
//!
//! The pipeline, and why it is shaped this way:
//! 1. **Validate everything first** ([`validate_batch_csv`], [`prepare`]): names,
//!    duplicates and CSRs (signature, key strength) are checked before any certificate is
//!    signed, so bad input never leaves a trace in the registry. A batch CSV is streamed:
//!    the validation pass keeps one hash per name and one bit per row, and
//!    [`provision_batch`] reads the file again a group at a time (checking each CSR file
//!    again), so a million rows never sit in memory. CSR files must be regular files of at
//!    most [`CSR_MAX_BYTES`], inside the CSV file's directory unless
//!    [`BatchOptions::allow_outside_csr_paths`].
//! 2. **Plan against the registry**, a group at a time: a thing that already has a
//!    delivered active certificate is skipped (re-running a batch is safe), unless
//!    `--reissue`.
//! 3. **Sign on every core** (rayon), a group at a time; no certificate outlives the
//!    issuing CA (`--days` is capped, see [`validity_cap`]).
//! 4. **Commit the group in one transaction** — the certificate, its thing, the events.
//!    Nothing leaves the process before this commit.
//! 5. **Write the group's files** (temp + one `syncfs` + rename), then mark the group
//!    delivered. Writing group N overlaps with signing and committing group N+1. A group
//!    that cannot be written (a full disk) removes its staging directory.
//!
//! A run killed at any point can be re-run: files on disk always have a committed record;
//! a committed but undelivered certificate is delivered again (CSR: same certificate) or,
//! when its generated key died with the process, revoked and replaced.
use crate::fsio::{
    GroupWriter, InputDir, InputFileError, PUBLIC_MODE, SECRET_MODE, Staged, write_file_atomic,
};
use crate::pallet::{PalletEntry, PalletHeader, PalletWriter};
use crate::{LifecycleError, unix_now};
use fleetcert_ca::{DeviceCsr, DeviceKey, DeviceProfile, IssuedCertificate, IssuingCa, ThingName};
use fleetcert_registry::{CertOrigin, CertificateRecord, IssueOutcome, IssueRecord, Registry};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// The thing name, not yet validated.
    pub thing_name: String,
    /// The device's CSR (PEM or DER); `None`: fleetcert generates the key.
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
    /// A new certificate was committed, its files written and it was marked delivered.
    Issued {
        /// CSV line of the request; `None` for a single device.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        /// The thing the certificate is for.
        thing_name: String,
        /// The new certificate's serial, 32 lowercase hex digits.
        serial: String,
        /// End of its validity, RFC 3339.
        not_after: String,
        /// Whether the key came from the device's CSR or fleetcert generated it.
        origin: CertOrigin,
        /// The certificate file written, `<out-dir>/<thing>.crt`, or the pallet file.
        certificate: PathBuf,
        /// The private key file written (`<thing>.key`, mode 0600), or the pallet file,
        /// for a generated key.
        #[serde(skip_serializing_if = "Option::is_none")]
        private_key: Option<PathBuf>,
        /// Certificates this one replaced (superseded on `--reissue`, or revoked because
        /// they were never delivered).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        replaced: Vec<String>,
    },
    /// Nothing done: the thing already has a delivered active certificate (re-running a
    /// batch is safe; `--reissue` replaces it).
    Skipped {
        /// CSV line of the request; `None` for a single device.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        /// The thing skipped.
        thing_name: String,
        /// Serial of the certificate it already has.
        serial: String,
        /// Why, for people.
        reason: String,
    },
    /// A certificate committed by an interrupted run, written out now.
    Redelivered {
        /// CSV line of the request; `None` for a single device.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        /// The thing the certificate is for.
        thing_name: String,
        /// The committed certificate's serial.
        serial: String,
        /// End of its validity, RFC 3339.
        not_after: String,
        /// The certificate file written, or the pallet file.
        certificate: PathBuf,
    },
    /// Nothing issued for this device: its request was invalid, signing failed, or another
    /// run changed the thing's certificates at the same time. The other devices of the
    /// run go on unless [`ProvisionSettings::fail_fast`].
    Failed {
        /// CSV line of the request; `None` for a single device.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
        /// The thing name as given: at most an excerpt of an invalid one, empty for an
        /// unreadable CSV row.
        thing_name: String,
        /// What went wrong, for people.
        error: String,
    },
}

impl DeviceReport {
    /// The thing this report is about, whatever happened.
    pub fn thing_name(&self) -> &str {
        match self {
            DeviceReport::Issued { thing_name, .. }
            | DeviceReport::Skipped { thing_name, .. }
            | DeviceReport::Redelivered { thing_name, .. }
            | DeviceReport::Failed { thing_name, .. } => thing_name,
        }
    }

    /// True for [`DeviceReport::Failed`].
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
    /// Devices given a new certificate ([`DeviceReport::Issued`]).
    pub issued: u64,
    /// Devices left alone ([`DeviceReport::Skipped`]).
    pub skipped: u64,
    /// Certificates of an interrupted run written out ([`DeviceReport::Redelivered`]).
    pub redelivered: u64,
    /// Devices that failed, validation failures included ([`DeviceReport::Failed`]).
    pub failed: u64,
    /// Wall time of the run, validation of a batch excluded.
    pub elapsed_seconds: f64,
    /// Issued certificates per second of wall time.
    pub issued_per_second: f64,
    /// Where the certificates, keys and `chain.pem` were written.
    pub out_dir: PathBuf,
    /// The pallet file, when the run wrote one instead of device files: finished (under
    /// this name) unless the run stopped early, when its lines wait in the temporary file
    /// for the re-run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pallet: Option<PathBuf>,
    /// Devices already in the pallet from an interrupted run (kept; reported skipped).
    #[serde(skip_serializing_if = "is_zero")]
    pub resumed_from_pallet: u64,
    /// True if `--fail-fast` stopped the run early.
    pub stopped_early: bool,
    /// Set when `--days` would have outlived the issuing CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validity_capped: Option<ValidityCap>,
    /// The error that stopped the run (what is counted above was done before it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How a run provisions.
#[derive(Debug, Clone)]
pub struct ProvisionSettings {
    /// Where certificates, generated keys and [`CHAIN_FILE`] are written (created if
    /// missing).
    pub out_dir: PathBuf,
    /// Template recorded on each thing.
    pub template: Option<String>,
    /// Validity, key algorithm and CRL URL of the certificates; the validity is cut to
    /// the issuing CA's (see [`validity_cap`]).
    pub profile: DeviceProfile,
    /// Issue new certificates even for things that already have one (the old ones become
    /// `superseded`).
    pub reissue: bool,
    /// Stop at the first failed device. Validation failures stop the run before anything
    /// is issued.
    pub fail_fast: bool,
    /// Devices per transaction and per file sync.
    pub group_size: usize,
    /// Write one pallet file (JSON lines, see [`crate::pallet`]) here instead of device
    /// files and [`CHAIN_FILE`] in `out_dir`.
    pub pallet: Option<PathBuf>,
}

impl ProvisionSettings {
    /// Settings writing to `out_dir` with `profile`: no template, no reissue, no fail
    /// fast, groups of 1,024 devices.
    pub fn new(out_dir: impl Into<PathBuf>, profile: DeviceProfile) -> Self {
        ProvisionSettings {
            out_dir: out_dir.into(),
            template: None,
            profile,
            reissue: false,
            fail_fast: false,
            group_size: 1024,
            pallet: None,
        }
    }
}

/// Largest CSR file read (a CSR is a few KiB).
pub const CSR_MAX_BYTES: u64 = 64 * 1024;

/// Characters of an input value (a CSV field, a path) quoted in an error message.
const EXCERPT_CHARS: usize = 64;

/// Rows read and checked at a time (in parallel) while validating a batch.
const VALIDATION_CHUNK: usize = 1024;

/// Line numbers listed in a duplicate-name message.
const DUPLICATE_LINES_SHOWN: usize = 10;

/// `value`, cut to [`EXCERPT_CHARS`] characters (then "…") for an error message.
pub(crate) fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}…", &value[..cut]),
    }
}

fn path_excerpt(path: &Path) -> String {
    excerpt(&path.to_string_lossy())
}

/// Parses a thing name; the error quotes at most an excerpt of it.
fn parse_name(name: &str) -> Result<ThingName, fleetcert_ca::CaError> {
    ThingName::parse(name).map_err(|e| match e {
        fleetcert_ca::CaError::InvalidThingName { name, reason } => {
            fleetcert_ca::CaError::InvalidThingName {
                name: excerpt(&name),
                reason,
            }
        }
        other => other,
    })
}

/// Reads and checks one CSR file: a regular file of at most [`CSR_MAX_BYTES`], found
/// through `dir`. The error names the path (an excerpt) and the problem.
fn read_csr(dir: &InputDir, path: &Path) -> Result<DeviceCsr, String> {
    let bytes = dir.read_regular(path, CSR_MAX_BYTES).map_err(|e| match e {
        InputFileError::Io(e) => {
            format!("cannot read CSR file {}: {e}", path_excerpt(path))
        }
        other => format!("CSR file {}: {other}", path_excerpt(path)),
    })?;
    DeviceCsr::parse(&bytes).map_err(|e| format!("CSR file {}: {e}", path_excerpt(path)))
}

/// Options for reading a batch CSV.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// Let the `csr` column name files outside the CSV file's directory (absolute paths,
    /// `..`, symbolic links leading out). Off by default: a CSV from a factory station
    /// must not make fleetcert read arbitrary files.
    pub allow_outside_csr_paths: bool,
}

/// The CSV's columns, found in its header row.
struct Columns {
    name: usize,
    csr: Option<usize>,
}

/// One raw row of a batch CSV, by its position among the records.
struct RawRow {
    index: u64,
    line: Option<u64>,
    result: Result<(String, Option<String>), DeviceReport>,
}

/// A streaming reader of a batch CSV's rows.
struct CsvRows {
    path: PathBuf,
    reader: csv::Reader<std::io::BufReader<std::fs::File>>,
    columns: Columns,
    record: csv::StringRecord,
    next_index: u64,
}

impl CsvRows {
    /// Opens the file (a regular file: it is read twice) and checks its header row.
    fn open(path: &Path, file: std::fs::File) -> Result<Self, LifecycleError> {
        let bad = |reason: String| LifecycleError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
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
        let name = column("thing_name").ok_or_else(|| {
            bad(format!(
                "no thing_name column in the header row (found: {})",
                excerpt(&headers.iter().collect::<Vec<_>>().join(", "))
            ))
        })?;
        let csr = column("csr");
        Ok(CsvRows {
            path: path.to_path_buf(),
            reader,
            columns: Columns { name, csr },
            record: csv::StringRecord::new(),
            next_index: 0,
        })
    }

    /// The next row, `None` at the end; an I/O error ends the file.
    fn next_row(&mut self) -> Result<Option<RawRow>, LifecycleError> {
        let index = self.next_index;
        let row = match self.reader.read_record(&mut self.record) {
            Ok(false) => return Ok(None),
            Ok(true) => {
                let record = &self.record;
                let field = |c: usize| record.get(c).unwrap_or_default();
                RawRow {
                    index,
                    line: record.position().map(|p| p.line()),
                    result: Ok((
                        field(self.columns.name).to_owned(),
                        self.columns
                            .csr
                            .map(field)
                            .filter(|p| !p.is_empty())
                            .map(str::to_owned),
                    )),
                }
            }
            Err(e) => {
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(LifecycleError::read(&self.path, e));
                }
                let line = e.position().map(|p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("unreadable row: {len} fields where the header has {expected_len}")
                    }
                    csv::ErrorKind::Utf8 { .. } => "unreadable row: not valid UTF-8".to_owned(),
                    _ => format!("unreadable row: {}", excerpt(&e.to_string())),
                };
                RawRow {
                    index,
                    line,
                    result: Err(DeviceReport::failed(line, "", reason)),
                }
            }
        };
        self.next_index += 1;
        Ok(Some(row))
    }

    fn next_chunk(&mut self, max: usize) -> Result<Vec<RawRow>, LifecycleError> {
        let mut rows = Vec::with_capacity(max);
        while rows.len() < max {
            match self.next_row()? {
                Some(row) => rows.push(row),
                None => break,
            }
        }
        Ok(rows)
    }
}

/// Row positions, one bit each.
#[derive(Default)]
struct RowSet(Vec<u64>);

impl RowSet {
    fn insert(&mut self, i: u64) {
        let word = (i / 64) as usize;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (i % 64);
    }

    fn contains(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Validates one row: its name, and its CSR file if it names one.
#[allow(clippy::result_large_err)] // a row's report is the error; rows are few per chunk
fn validate_row(
    dir: &InputDir,
    line: Option<u64>,
    name: &str,
    csr: Option<&str>,
) -> Result<PreparedDevice, DeviceReport> {
    let thing = parse_name(name).map_err(|e| DeviceReport::failed(line, &excerpt(name), e))?;
    let csr = match csr {
        None => None,
        Some(path) => {
            Some(read_csr(dir, Path::new(path)).map_err(|e| DeviceReport::failed(line, name, e))?)
        }
    };
    Ok(PreparedDevice { line, thing, csr })
}

/// A batch CSV whose every row has been checked (pass 1 of [`validate_batch_csv`]);
/// [`provision_batch`] reads it again, a group at a time, and provisions the rows that
/// passed.
pub struct ValidatedBatch {
    path: PathBuf,
    file: std::fs::File,
    stamp: (u64, Option<std::time::SystemTime>),
    dir: Arc<InputDir>,
    failed_rows: RowSet,
    rows: u64,
    failures: u64,
}

impl std::fmt::Debug for ValidatedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidatedBatch")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl ValidatedBatch {
    /// Data rows in the file.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows that failed validation (each already reported).
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

fn file_stamp(meta: &std::fs::Metadata) -> (u64, Option<std::time::SystemTime>) {
    (meta.len(), meta.modified().ok())
}

/// Pass 1 over a batch CSV: a header row with a `thing_name` column and optionally a
/// `csr` column (a path relative to the CSV file's directory, see [`BatchOptions`]).
/// Problems with the file as a whole are an error; each row that fails (unreadable row,
/// invalid name, duplicate name, unreadable or invalid CSR) is passed to `report` as a
/// `Failed` report naming its line. Streams: memory holds a chunk of rows, one 64-bit
/// hash per name (for duplicates) and one bit per row, never the whole file.
#[allow(clippy::result_large_err)]
pub fn validate_batch_csv(
    path: &Path,
    options: &BatchOptions,
    report: &mut dyn FnMut(&DeviceReport),
) -> Result<ValidatedBatch, LifecycleError> {
    let bad = |reason: String| LifecycleError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| LifecycleError::read(path, e))?;
    let meta = file.metadata().map_err(|e| LifecycleError::read(path, e))?;
    if !meta.is_file() {
        return Err(bad(
            "not a regular file (a batch is read twice: validated, then provisioned)".into(),
        ));
    }
    let stamp = file_stamp(&meta);
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = Arc::new(if options.allow_outside_csr_paths {
        InputDir::anywhere(base)
    } else {
        InputDir::confined(base).map_err(|e| LifecycleError::read(base, e))?
    });
    let reopen = |file: &std::fs::File| -> Result<CsvRows, LifecycleError> {
        let mut file = file
            .try_clone()
            .map_err(|e| LifecycleError::read(path, e))?;
        std::io::Seek::rewind(&mut file).map_err(|e| LifecycleError::read(path, e))?;
        CsvRows::open(path, file)
    };
    let mut rows = reopen(&file)?;
    let hasher = std::collections::hash_map::RandomState::new();
    let hash = |name: &str| std::hash::BuildHasher::hash_one(&hasher, name);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut repeated: HashSet<u64> = HashSet::new();
    let mut failed_rows = RowSet::default();
    let mut failures = 0u64;
    loop {
        let chunk = rows.next_chunk(VALIDATION_CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        // Duplicates: every valid name is hashed here; names whose hash repeats are
        // confirmed (exactly) below, in a read that keeps only those names.
        for row in &chunk {
            if let Ok((name, _)) = &row.result
                && ThingName::parse(name).is_ok()
                && !seen.insert(hash(name))
            {
                repeated.insert(hash(name));
            }
        }
        let dir = &dir;
        let checked: Vec<(u64, Result<(), DeviceReport>)> = chunk
            .into_par_iter()
            .map(|row| {
                let result = row.result.and_then(|(name, csr)| {
                    validate_row(dir, row.line, &name, csr.as_deref()).map(|_| ())
                });
                (row.index, result)
            })
            .collect();
        for (index, result) in checked {
            if let Err(failure) = result {
                failures += 1;
                failed_rows.insert(index);
                report(&failure);
            }
        }
    }
    let total_rows = rows.next_index;
    drop(seen);
    if !repeated.is_empty() {
        let mut lines_by_name: HashMap<String, Vec<(u64, Option<u64>)>> = HashMap::new();
        let mut rows = reopen(&file)?;
        while let Some(row) = rows.next_row()? {
            if let Ok((name, _)) = row.result
                && repeated.contains(&hash(&name))
                && ThingName::parse(&name).is_ok()
            {
                lines_by_name
                    .entry(name)
                    .or_default()
                    .push((row.index, row.line));
            }
        }
        let mut duplicates: Vec<(u64, DeviceReport)> = Vec::new();
        for (name, rows) in lines_by_name.into_iter().filter(|(_, r)| r.len() > 1) {
            let mut where_ = rows
                .iter()
                .take(DUPLICATE_LINES_SHOWN)
                .map(|(_, l)| l.map_or("?".to_owned(), |l| l.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            if rows.len() > DUPLICATE_LINES_SHOWN {
                where_.push_str(&format!(" and {} more", rows.len() - DUPLICATE_LINES_SHOWN));
            }
            let reason = format!(
                "duplicate thing name {name:?} in this batch (lines {where_}); none of them was provisioned"
            );
            for (index, line) in rows {
                if !failed_rows.contains(index) {
                    duplicates.push((index, DeviceReport::failed(line, &name, &reason)));
                }
            }
        }
        duplicates.sort_by_key(|(index, _)| *index);
        for (index, failure) in duplicates {
            failures += 1;
            failed_rows.insert(index);
            report(&failure);
        }
    }
    Ok(ValidatedBatch {
        path: path.to_path_buf(),
        file,
        stamp,
        dir,
        failed_rows,
        rows: total_rows,
        failures,
    })
}

/// Pass 2's source: the rows that passed validation, read (and their CSRs checked)
/// again, a group at a time.
struct BatchSource {
    rows: CsvRows,
    dir: Arc<InputDir>,
    failed_rows: RowSet,
}

impl DeviceSource for BatchSource {
    #[allow(clippy::result_large_err)]
    fn next_chunk(
        &mut self,
        max: usize,
    ) -> Result<Vec<Result<PreparedDevice, DeviceReport>>, LifecycleError> {
        let mut rows = Vec::with_capacity(max);
        while rows.len() < max {
            match self.rows.next_row()? {
                None => break,
                Some(row) if self.failed_rows.contains(row.index) => continue,
                Some(row) => rows.push(row),
            }
        }
        let dir = &self.dir;
        Ok(rows
            .into_par_iter()
            .map(|row| {
                let (name, csr) = row.result?;
                validate_row(dir, row.line, &name, csr.as_deref())
            })
            .collect())
    }
}

/// Where the pipeline takes its devices from, a group at a time (blocking: file reads
/// and CSR checks). An empty chunk ends the run.
trait DeviceSource: Send + 'static {
    #[allow(clippy::result_large_err)]
    fn next_chunk(
        &mut self,
        max: usize,
    ) -> Result<Vec<Result<PreparedDevice, DeviceReport>>, LifecycleError>;
}

struct VecSource(std::vec::IntoIter<PreparedDevice>);

impl DeviceSource for VecSource {
    fn next_chunk(
        &mut self,
        max: usize,
    ) -> Result<Vec<Result<PreparedDevice, DeviceReport>>, LifecycleError> {
        Ok(self.0.by_ref().take(max).map(Ok).collect())
    }
}

/// Validates names (and duplicates among them) and reads and checks CSRs, on all cores.
/// A `csr_path` is read as given (relative to the working directory), but only if it is
/// a regular file of at most [`CSR_MAX_BYTES`].
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
                format!("duplicate thing name {:?} in this batch (lines {where_}); none of them was provisioned", excerpt(name)),
            )
        })
        .collect();
    let dir = InputDir::anywhere(Path::new("."));
    requests
        .into_par_iter()
        .map(|request| {
            let request = request?;
            let fail = |e: &dyn std::fmt::Display| {
                DeviceReport::failed(request.line, &excerpt(&request.thing_name), e)
            };
            if let Some(reason) = duplicates.get(&request.thing_name) {
                return Err(fail(reason));
            }
            let thing = parse_name(&request.thing_name).map_err(|e| fail(&e))?;
            let csr = match &request.csr_path {
                None => None,
                Some(path) => Some(read_csr(&dir, path).map_err(|e| fail(&e))?),
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
        certificate: crate::issuance::new_certificate(
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

/// Where a run's certificates and keys go.
enum Output {
    /// `<thing>.crt`, `<thing>.key` and `chain.pem` in a directory.
    Files(GroupWriter),
    /// One JSON-lines pallet file.
    Pallet(PalletWriter),
}

impl Output {
    fn certificate_path(&self, thing: &str) -> PathBuf {
        match self {
            Output::Files(writer) => writer.path_of(&format!("{thing}.crt")),
            Output::Pallet(pallet) => pallet.target().to_path_buf(),
        }
    }

    fn key_path(&self, thing: &str) -> PathBuf {
        match self {
            Output::Files(writer) => writer.path_of(&format!("{thing}.key")),
            Output::Pallet(pallet) => pallet.target().to_path_buf(),
        }
    }

    fn location(&self) -> &Path {
        match self {
            Output::Files(writer) => writer.dir(),
            Output::Pallet(pallet) => pallet.target(),
        }
    }

    /// Makes a committed group's certificates and keys durable and visible.
    fn write(&self, items: &[PalletEntry]) -> std::io::Result<()> {
        match self {
            Output::Files(writer) => {
                // Sequential on purpose: creations in one directory serialise on its
                // inode lock, and parallel creators only spin on it.
                let staging = writer.staging()?;
                let mut staged: Vec<Staged> = Vec::with_capacity(items.len() * 2);
                for item in items {
                    let thing = &item.thing_name;
                    if let Some(key) = &item.private_key {
                        staged.push(staging.stage(
                            &format!("{thing}.key"),
                            key.as_bytes(),
                            SECRET_MODE,
                        )?);
                    }
                    staged.push(staging.stage(
                        &format!("{thing}.crt"),
                        item.certificate.as_bytes(),
                        PUBLIC_MODE,
                    )?);
                }
                writer.publish(staging, staged)
            }
            Output::Pallet(pallet) => pallet.append(&crate::pallet::render(items)),
        }
    }
}

/// One committed group on its way to disk.
#[derive(Default)]
struct Delivery {
    staged_reports: Vec<DeviceReport>,
    items: Vec<PalletEntry>,
}

impl Delivery {
    /// A certificate committed by an interrupted run, to be written out again.
    fn add_redelivery(
        &mut self,
        output: &Output,
        device: &PreparedDevice,
        record: &CertificateRecord,
    ) {
        let thing = device.thing.to_string();
        let not_after = unix_to_rfc3339(record.not_after);
        self.items.push(PalletEntry {
            thing_name: thing.clone(),
            serial: record.serial.clone(),
            not_after: not_after.clone(),
            origin: CertOrigin::Csr,
            certificate: pem::encode(&pem::Pem::new("CERTIFICATE", record.der.clone())),
            private_key: None,
        });
        self.staged_reports.push(DeviceReport::Redelivered {
            line: device.line,
            certificate: output.certificate_path(&thing),
            thing_name: thing,
            serial: record.serial.clone(),
            not_after,
        });
    }
}

async fn deliver(
    output: Arc<Output>,
    registry: Arc<dyn Registry>,
    delivery: Delivery,
) -> Result<Vec<DeviceReport>, LifecycleError> {
    let Delivery {
        staged_reports,
        items,
    } = delivery;
    let serials: Vec<String> = items.iter().map(|i| i.serial.clone()).collect();
    let location = output.location().to_path_buf();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        output.write(&items)?;
        tracing::debug!(certificates = items.len(), took = ?started.elapsed(), "group written");
        Ok(())
    })
    .await
    .expect("file writer panicked")
    .map_err(|e| LifecycleError::Write {
        path: location,
        reason: format!(
            "{e}; the certificates are recorded but were not written: re-run the same command to deliver them"
        ),
    })?;
    let marking = Instant::now();
    registry.mark_delivered(&serials, unix_now()).await?;
    tracing::debug!(certificates = serials.len(), took = ?marking.elapsed(), "group marked delivered");
    Ok(staged_reports)
}

/// Validity of the certificates of a run, cut short so that none outlives the issuing CA.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ValidityCap {
    /// `--days` as asked.
    pub requested_days: u32,
    /// What the run issues (whole days before the issuing CA's notAfter, at the start).
    pub days: u32,
    /// The issuing CA's notAfter (RFC 3339).
    pub issuing_ca_not_after: String,
}

fn issuing_ca_not_after(ca: &IssuingCa) -> Result<time::OffsetDateTime, LifecycleError> {
    Ok(fleetcert_ca::describe_certificate(ca.issuing_cert_pem().as_bytes())?.not_after)
}

/// Whole days from `now` until `ca_not_after`, at most `requested`.
fn capped_days(
    requested: u32,
    now: time::OffsetDateTime,
    ca_not_after: time::OffsetDateTime,
) -> u32 {
    let left = (ca_not_after - now).whole_days().max(0);
    u32::try_from(left).map_or(requested, |left| left.min(requested))
}

/// Checks the requested validity against the issuing CA's notAfter: `None` if it fits,
/// the cap otherwise. An error if the CA expires within a day (nothing can be issued).
pub fn validity_cap(
    ca: &IssuingCa,
    profile: &DeviceProfile,
) -> Result<Option<ValidityCap>, LifecycleError> {
    let ca_not_after = issuing_ca_not_after(ca)?;
    let now = time::OffsetDateTime::now_utc();
    let days = capped_days(profile.validity_days, now, ca_not_after);
    if days == 0 {
        return Err(LifecycleError::BadInput(format!(
            "the issuing CA expires at {} (less than a day from now): no device certificate can be issued under it",
            rfc3339(ca_not_after)
        )));
    }
    Ok((days < profile.validity_days).then(|| ValidityCap {
        requested_days: profile.validity_days,
        days,
        issuing_ca_not_after: rfc3339(ca_not_after),
    }))
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
    let mut prepared = Vec::with_capacity(devices.len());
    for device in devices {
        match device {
            Ok(d) => prepared.push(d),
            Err(failure) => {
                summary.count(&failure);
                report(&failure);
            }
        }
    }
    let source = VecSource(prepared.into_iter());
    let outcome = run(ca, registry, source, settings, summary, started, report).await;
    outcome.into_result()
}

/// A run's totals, and the error that stopped it if one did: the totals count what was
/// done before it.
#[derive(Debug)]
pub struct ProvisionOutcome {
    /// The totals, complete or up to the error.
    pub summary: ProvisionSummary,
    /// What stopped the run early (its [`ProvisionSummary::error`] is left for the caller
    /// to fill in).
    pub error: Option<LifecycleError>,
}

impl ProvisionOutcome {
    /// The summary, or the error alone if the run stopped early (the partial totals are
    /// dropped).
    pub fn into_result(self) -> Result<ProvisionSummary, LifecycleError> {
        match self.error {
            None => Ok(self.summary),
            Some(e) => Err(e),
        }
    }
}

/// Pass 2 of a batch: reads the validated CSV again, a group at a time, and provisions
/// the rows that passed validation (their CSR files are read and checked again). Rows
/// that failed validation were reported by [`validate_batch_csv`] and are counted here.
/// With `fail_fast`, any failed row stops the run before anything is issued.
pub async fn provision_batch(
    ca: Arc<IssuingCa>,
    registry: Arc<dyn Registry>,
    batch: ValidatedBatch,
    settings: &ProvisionSettings,
    report: &mut (dyn FnMut(&DeviceReport) + Send),
) -> ProvisionOutcome {
    let started = Instant::now();
    let summary = ProvisionSummary {
        out_dir: settings.out_dir.clone(),
        failed: batch.failures,
        ..ProvisionSummary::default()
    };
    let fail = |summary: ProvisionSummary, error: LifecycleError| ProvisionOutcome {
        summary: finish(summary, started),
        error: Some(error),
    };
    let changed = || LifecycleError::BadFile {
        path: batch.path.clone(),
        reason: "the file changed after it was validated; run the batch again".into(),
    };
    match batch.file.metadata() {
        Ok(meta) if file_stamp(&meta) == batch.stamp => {}
        Ok(_) => return fail(summary, changed()),
        Err(e) => return fail(summary, LifecycleError::read(&batch.path, e)),
    }
    let rows = match batch
        .file
        .try_clone()
        .and_then(|mut f| std::io::Seek::rewind(&mut f).map(|()| f))
    {
        Ok(file) => CsvRows::open(&batch.path, file),
        Err(e) => Err(LifecycleError::read(&batch.path, e)),
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return fail(summary, e),
    };
    let source = BatchSource {
        rows,
        dir: batch.dir,
        failed_rows: batch.failed_rows,
    };
    run(ca, registry, source, settings, summary, started, report).await
}

fn finish(mut summary: ProvisionSummary, started: Instant) -> ProvisionSummary {
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    if summary.elapsed_seconds > 0.0 {
        summary.issued_per_second = summary.issued as f64 / summary.elapsed_seconds;
    }
    summary
}

/// What the planner and the signer hand to the committing task.
enum Step {
    Reports(Vec<DeviceReport>),
    Redeliver(Delivery),
    Signed(Vec<Signed>),
    Failed(LifecycleError),
}

async fn run<S: DeviceSource>(
    ca: Arc<IssuingCa>,
    registry: Arc<dyn Registry>,
    source: S,
    settings: &ProvisionSettings,
    mut summary: ProvisionSummary,
    started: Instant,
    report: &mut (dyn FnMut(&DeviceReport) + Send),
) -> ProvisionOutcome {
    let done = |summary: ProvisionSummary, error: Option<LifecycleError>| ProvisionOutcome {
        summary: finish(summary, started),
        error,
    };
    if settings.fail_fast && summary.failed > 0 {
        summary.stopped_early = true;
        return done(summary, None);
    }
    let ca_not_after = match issuing_ca_not_after(&ca) {
        Ok(t) => t,
        Err(e) => return done(summary, Some(e)),
    };
    match validity_cap(&ca, &settings.profile) {
        Ok(cap) => summary.validity_capped = cap,
        Err(e) => return done(summary, Some(e)),
    }
    let (output, resumed) = match open_output(&ca, &registry, settings).await {
        Ok(opened) => opened,
        Err(e) => return done(summary, Some(e)),
    };
    if let Output::Pallet(pallet) = &output {
        summary.pallet = Some(pallet.target().to_path_buf());
        summary.resumed_from_pallet = resumed.len() as u64;
    }
    let output = Arc::new(output);
    let mut emit = |summary: &mut ProvisionSummary, r: DeviceReport| {
        summary.count(&r);
        report(&r);
    };
    let error = pipeline(
        ca,
        ca_not_after,
        registry,
        output.clone(),
        resumed,
        source,
        settings,
        &mut summary,
        &mut emit,
    )
    .await
    .err();
    if error.is_some() || summary.stopped_early {
        if let Some(pallet) = &summary.pallet {
            tracing::info!(pallet = %pallet.display(), "the pallet is not finished: re-run the same command to complete it");
        }
        return done(summary, error);
    }
    // Every delivery has finished, so this is the only reference left.
    let finished = match Arc::try_unwrap(output) {
        Ok(Output::Pallet(pallet)) => pallet.finish().map(|_| ()).map_err(|e| {
            LifecycleError::write(
                summary.pallet.clone().unwrap_or_default(),
                format!("{e}; its devices are recorded as delivered and their lines are in the temporary file next to it"),
            )
        }),
        _ => Ok(()),
    };
    done(summary, finished.err())
}

/// Opens the run's output: the device-file directory (with [`CHAIN_FILE`]), or the pallet,
/// keeping the lines of an interrupted run whose certificates were delivered. Returns the
/// serials kept.
async fn open_output(
    ca: &IssuingCa,
    registry: &Arc<dyn Registry>,
    settings: &ProvisionSettings,
) -> Result<(Output, HashSet<String>), LifecycleError> {
    let Some(target) = &settings.pallet else {
        let writer = GroupWriter::open(&settings.out_dir)
            .map_err(|e| LifecycleError::write(&settings.out_dir, e))?;
        let chain_path = writer.path_of(CHAIN_FILE);
        write_file_atomic(&chain_path, ca.chain_pem().as_bytes(), PUBLIC_MODE)
            .map_err(|e| LifecycleError::write(&chain_path, e))?;
        return Ok((Output::Files(writer), HashSet::new()));
    };
    let header = PalletHeader {
        fleetcert_pallet: crate::pallet::PALLET_FORMAT,
        issuer: ca.subject().to_owned(),
        chain: ca.chain_pem().to_owned(),
    };
    let (pallet, resumed) = PalletWriter::open(target, &header).map_err(|e| match e {
        crate::pallet::OpenError::Refused(reason) => LifecycleError::BadInput(reason),
        crate::pallet::OpenError::Io(e) => LifecycleError::write(target, e),
    })?;
    if resumed.entries.is_empty() {
        return Ok((Output::Pallet(pallet), HashSet::new()));
    }
    if settings.reissue {
        return Err(LifecycleError::BadInput(format!(
            "{} holds {} devices of an interrupted run: finish it by re-running without --reissue, then reissue into a new pallet",
            target.display(),
            resumed.entries.len()
        )));
    }
    // Keep a line only if its certificate is active and recorded as delivered; the
    // others are delivered again or replaced by this run, as device files would be.
    let mut delivered = HashSet::new();
    for chunk in resumed.entries.chunks(1000) {
        let names: Vec<String> = chunk.iter().map(|(thing, _)| thing.clone()).collect();
        let active = registry.active_certificates(&names).await?;
        for certs in active.values() {
            for cert in certs.iter().filter(|c| c.delivered_at.is_some()) {
                delivered.insert(cert.serial.clone());
            }
        }
    }
    let keep: HashSet<String> = resumed
        .entries
        .into_iter()
        .map(|(_, serial)| serial)
        .filter(|serial| delivered.contains(serial))
        .collect();
    // Once per resumed run, before any signing: not worth a blocking task.
    let dropped = pallet
        .retain(&|serial| keep.contains(serial))
        .map_err(|e| LifecycleError::write(target, e))?;
    tracing::info!(kept = keep.len(), dropped, pallet = %target.display(), "resuming an interrupted pallet");
    Ok((Output::Pallet(pallet), keep))
}

/// Reads, plans and redelivers a group at a time (a task), hands the plans to the signer
/// (a thread, signing on every core), then commits and writes each group (this task).
#[allow(clippy::too_many_arguments)]
async fn pipeline<S: DeviceSource>(
    ca: Arc<IssuingCa>,
    ca_not_after: time::OffsetDateTime,
    registry: Arc<dyn Registry>,
    output: Arc<Output>,
    in_pallet: HashSet<String>,
    source: S,
    settings: &ProvisionSettings,
    summary: &mut ProvisionSummary,
    emit: &mut (dyn FnMut(&mut ProvisionSummary, DeviceReport) + Send),
) -> Result<(), LifecycleError> {
    let group_size = settings.group_size.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    // Two groups in flight between each stage: one being committed/written while the
    // next is signed and the one after is read and planned.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Step>(2);
    let (plan_tx, mut plan_rx) = tokio::sync::mpsc::channel::<Vec<IssuePlan>>(1);

    let planner = {
        let tx = tx.clone();
        let registry = registry.clone();
        let output = output.clone();
        let reissue = settings.reissue;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut source = Some(source);
            while !stop.load(Ordering::Relaxed) {
                let mut s = source.take().expect("source is put back after each chunk");
                let (s, chunk) = tokio::task::spawn_blocking(move || {
                    let chunk = s.next_chunk(group_size);
                    (s, chunk)
                })
                .await
                .expect("batch reader panicked");
                source = Some(s);
                let chunk = match chunk {
                    Ok(chunk) if chunk.is_empty() => break,
                    Ok(chunk) => chunk,
                    Err(e) => {
                        let _ = tx.send(Step::Failed(e)).await;
                        break;
                    }
                };
                let mut reports = Vec::new();
                let mut devices = Vec::with_capacity(chunk.len());
                for device in chunk {
                    match device {
                        Ok(d) => devices.push(d),
                        Err(failure) => reports.push(failure),
                    }
                }
                let names: Vec<String> = devices.iter().map(|d| d.thing.to_string()).collect();
                let mut active = match registry.active_certificates(&names).await {
                    Ok(active) => active,
                    Err(e) => {
                        let _ = tx.send(Step::Failed(e.into())).await;
                        break;
                    }
                };
                drop(names);
                let mut plans = Vec::new();
                let mut redelivery = Delivery::default();
                for device in devices {
                    let current = active.remove(device.thing.as_str());
                    match plan(device, current.as_ref(), reissue) {
                        Plan::Skip(DeviceReport::Skipped {
                            line,
                            thing_name,
                            serial,
                            ..
                        }) if in_pallet.contains(&serial) => reports.push(DeviceReport::Skipped {
                            line,
                            thing_name,
                            serial,
                            reason: "already in the pallet (written by the interrupted run)".into(),
                        }),
                        Plan::Skip(skip) => reports.push(skip),
                        Plan::Redeliver(device, record) => {
                            redelivery.add_redelivery(&output, &device, &record)
                        }
                        Plan::Issue(p) => plans.push(p),
                    }
                }
                if !reports.is_empty() && tx.send(Step::Reports(reports)).await.is_err() {
                    break;
                }
                if !redelivery.items.is_empty()
                    && tx.send(Step::Redeliver(redelivery)).await.is_err()
                {
                    break;
                }
                if !plans.is_empty() && plan_tx.send(plans).await.is_err() {
                    break;
                }
            }
        })
    };

    let signer = {
        let ca = ca.clone();
        let profile = settings.profile.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("fleetcert-signer".into())
            .spawn(move || {
                while let Some(group) = plan_rx.blocking_recv() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let now = time::OffsetDateTime::now_utc();
                    // No certificate outlives the issuing CA, however long the run.
                    let mut profile = profile.clone();
                    profile.validity_days = capped_days(profile.validity_days, now, ca_not_after);
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
                    if tx.blocking_send(Step::Signed(signed)).is_err() {
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
    while let Some(step) = rx.recv().await {
        let delivery = match step {
            Step::Reports(reports) => {
                reports.into_iter().for_each(|r| emit(summary, r));
                None
            }
            Step::Failed(e) => {
                outcome = Err(e);
                break;
            }
            Step::Redeliver(delivery) => Some(delivery),
            Step::Signed(group) => {
                match commit_group(group, &registry, &output, &issuer, settings, summary, emit)
                    .await
                {
                    Ok(delivery) => Some(delivery),
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
        };
        if let Some(delivery) = delivery {
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
                output.clone(),
                registry.clone(),
                delivery,
            )));
        }
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
    let _ = planner.await;
    let _ = tokio::task::spawn_blocking(move || signer.join()).await;
    outcome
}

/// Commits one signed group in one transaction and returns its files to write.
async fn commit_group(
    group: Vec<Signed>,
    registry: &Arc<dyn Registry>,
    output: &Output,
    issuer: &str,
    settings: &ProvisionSettings,
    summary: &mut ProvisionSummary,
    emit: &mut (dyn FnMut(&mut ProvisionSummary, DeviceReport) + Send),
) -> Result<Delivery, LifecycleError> {
    let at = unix_now();
    let mut records = Vec::with_capacity(group.len());
    let mut signed_ok = Vec::with_capacity(group.len());
    for signed in group {
        match signed.result {
            Ok(cert) => {
                records.push(issue_record(
                    &signed.plan,
                    &cert,
                    issuer,
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
    let outcomes = registry.record_issued(&records).await?;
    tracing::debug!(records = records.len(), took = ?committing.elapsed(), "group committed");
    drop(records);
    let mut delivery = Delivery {
        staged_reports: Vec::with_capacity(signed_ok.len()),
        items: Vec::with_capacity(signed_ok.len()),
    };
    for ((plan, cert), result) in signed_ok.into_iter().zip(outcomes) {
        let thing = plan.device.thing.as_str();
        match result {
            IssueOutcome::Committed { .. } => {
                let origin = if cert.private_key.is_some() {
                    CertOrigin::Generated
                } else {
                    CertOrigin::Csr
                };
                let not_after = rfc3339(cert.not_after);
                delivery.staged_reports.push(DeviceReport::Issued {
                    line: plan.device.line,
                    thing_name: thing.to_owned(),
                    serial: cert.serial_hex.clone(),
                    not_after: not_after.clone(),
                    origin,
                    certificate: output.certificate_path(thing),
                    private_key: cert.private_key.as_ref().map(|_| output.key_path(thing)),
                    replaced: plan.expected_active.clone(),
                });
                delivery.items.push(PalletEntry {
                    thing_name: thing.to_owned(),
                    serial: cert.serial_hex.clone(),
                    not_after,
                    origin,
                    private_key: cert.private_key.as_ref().map(|key| key.to_pem()),
                    certificate: cert.pem,
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
    Ok(delivery)
}
