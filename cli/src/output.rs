//! Where output goes: results on stdout (JSON when asked), everything else on stderr.
use crate::args::OutputFormat;
use std::io::Write;

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
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, value);
        let _ = stdout.write_all(b"\n");
    }

    /// A human-readable result line on stdout (text mode only).
    pub fn line(&self, text: impl AsRef<str>) {
        if !self.is_json() {
            println!("{}", text.as_ref());
        }
    }

    /// A message for the operator, on stderr whatever the format.
    pub fn note(&self, text: impl AsRef<str>) {
        eprintln!("{}", text.as_ref());
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
