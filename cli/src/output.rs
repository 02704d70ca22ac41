//! Where output goes: results on stdout (JSON when asked), everything else on stderr.
use crate::args::OutputFormat;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when stdout's reader went away (`fleetcert certs list | head -1`).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// The first error writing stdout other than a closed pipe (a full disk…).
static STDOUT_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Writes `bytes` to stdout. A reader that went away is not an error, and not a panic:
/// the rest of the output is dropped quietly and the command finishes as it would have
/// (exit code included), as `head`'s callers expect. Any other write error is kept for
/// [`stdout_error`], so the command exits 1 with it.
pub fn write_stdout(bytes: &[u8]) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
        }
        Err(e) => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            let mut first = STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// A write to stdout that failed for another reason than a closed pipe.
pub fn stdout_error() -> Option<String> {
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Writes a message line to stderr; a closed stderr is ignored (never a panic).
pub fn write_stderr(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_all(text.as_bytes())
        .and_then(|()| stderr.write_all(b"\n"));
}

#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub format: OutputFormat,
}

impl Out {
    pub fn is_json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Prints one JSON document (or one JSON line) on stdout.
    pub fn json(&self, value: &impl serde::Serialize) {
        let mut bytes = serde_json::to_vec(value).unwrap_or_default();
        bytes.push(b'\n');
        write_stdout(&bytes);
    }

    /// A human-readable result line on stdout (text mode only).
    pub fn line(&self, text: impl AsRef<str>) {
        if !self.is_json() {
            let text = text.as_ref();
            let mut bytes = Vec::with_capacity(text.len() + 1);
            bytes.extend_from_slice(text.as_bytes());
            bytes.push(b'\n');
            write_stdout(&bytes);
        }
    }

    /// A message for the operator, on stderr whatever the format.
    pub fn note(&self, text: impl AsRef<str>) {
        write_stderr(text.as_ref());
    }
}

/// Unix seconds as RFC 3339, for people and JSON alike.
pub fn timestamp(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    timestamp(t.unix_timestamp())
}

/// A certificate record as the JSON of `certs list` and `certs show`.
pub fn cert_json(c: &fleetcert_registry::CertificateRecord) -> serde_json::Value {
    serde_json::json!({
        "serial": c.serial,
        "thing_name": c.thing_name,
        "status": c.status,
        "origin": c.origin,
        "key_algorithm": c.key_algorithm,
        "not_before": timestamp(c.not_before),
        "not_after": timestamp(c.not_after),
        "fingerprint_sha256": c.fingerprint_sha256,
        "issuer": c.issuer,
        "created_at": timestamp(c.created_at),
        "delivered_at": c.delivered_at.map(timestamp),
        "registered_at": c.registered_at.map(timestamp),
        "revoked_at": c.revoked_at.map(timestamp),
        "revocation_reason": c.revocation_reason,
        "renew_at": timestamp(c.renew_at),
        "replaces": c.replaces,
    })
}
