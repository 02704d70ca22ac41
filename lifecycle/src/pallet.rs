//! The pallet file: one JSON-lines file per batch instead of two files per device.
//!
//! A station that flashes devices from a stream does not need `<thing>.crt` and
//! `<thing>.key` on disk, and on a busy ext4 those two inodes per device in one directory
//! are what bounds a batch (BENCHMARKS.md: 4–17× cfssl with device files, 18–21× with
//! them on tmpfs). A pallet is one file, appended a group at a time:
//!
//! ```text
//! {"fleetcert_pallet":1,"issuer":"CN=…","chain":"-----BEGIN CERTIFICATE-----…"}
//! {"thing_name":"dev-1","serial":"…","not_after":"…","origin":"generated","certificate":"-----BEGIN…","private_key":"-----BEGIN…"}
//! ```
//!
//! The same guarantees as device files:
//! - **commit before release**: a group's lines are appended only after its transaction
//!   commits, then `fdatasync`ed, and only then marked delivered;
//! - **never half-written**: the lines go to `.<name>.fleetcert-tmp` next to the pallet
//!   (mode 0600: it holds private keys), renamed to the pallet's name when the whole batch
//!   is done; a pallet that already exists is never overwritten;
//! - **an interrupted batch resumes**: re-running the same command finds the temporary
//!   file, drops a torn last line and every line whose certificate is not recorded as
//!   delivered (those are delivered again or replaced, as for device files), and appends
//!   the rest of the batch. An exclusive lock on the temporary file keeps two runs from
//!   writing one pallet.
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fsio::{SECRET_MODE, sync_parent, temp_path_for};

/// The first line's format marker; a reader checks it before reading devices.
pub const PALLET_FORMAT: u32 = 1;

/// The pallet's first line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PalletHeader {
    /// Always [`PALLET_FORMAT`].
    pub fleetcert_pallet: u32,
    /// The issuing CA's subject.
    pub issuer: String,
    /// The issuing CA, then the root (PEM), as `chain.pem` holds them.
    pub chain: String,
}

/// One device's line.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PalletEntry {
    /// The thing the certificate is for.
    pub thing_name: String,
    /// The certificate's serial, lowercase hex.
    pub serial: String,
    /// End of its validity, RFC 3339.
    pub not_after: String,
    /// `generated` (the key is on this line) or `csr` (the device holds it).
    pub origin: fleetcert_registry::CertOrigin,
    /// The certificate (PEM).
    pub certificate: String,
    /// The generated private key (PKCS#8 PEM); absent for a CSR's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<zeroize::Zeroizing<String>>,
}

/// What an interrupted run left in the temporary file.
#[derive(Debug, Default)]
pub(crate) struct Resumed {
    /// (thing name, serial) of every complete device line, in file order.
    pub(crate) entries: Vec<(String, String)>,
}

/// Appends groups of device lines to a pallet's temporary file.
pub(crate) struct PalletWriter {
    target: PathBuf,
    temp: PathBuf,
    /// The temporary file, locked (`flock`) for this run; appends are serialised here.
    file: Mutex<File>,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Why a pallet could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Refused as asked (the pallet exists, another run holds it, a different CA):
    /// nothing was written.
    Refused(String),
    /// The file system failed.
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

impl PalletWriter {
    /// Opens the pallet `target` for a run: creates its temporary file with `header`, or
    /// takes over the one an interrupted run left (whose header must match) and returns
    /// its complete device lines. A torn last line is cut off.
    pub(crate) fn open(target: &Path, header: &PalletHeader) -> Result<(Self, Resumed), OpenError> {
        if target.file_name().is_none() {
            return Err(OpenError::Refused(format!(
                "{}: a pallet must be a file name",
                target.display()
            )));
        }
        if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        if fs::symlink_metadata(target).is_ok() {
            return Err(OpenError::Refused(format!(
                "{} already exists: a finished pallet is never overwritten (choose another name, or move it away)",
                target.display()
            )));
        }
        let temp = temp_path_for(target);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(SECRET_MODE)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&temp)?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(OpenError::Refused(format!(
                "{}: another provisioning run is writing this pallet",
                target.display()
            )));
        }
        let resumed = if file.metadata()?.len() == 0 {
            write_header(&mut file, header)?;
            sync_parent(&temp)?;
            Resumed::default()
        } else {
            read_resumed(&mut file, &temp, header)?
        };
        let writer = PalletWriter {
            target: target.to_path_buf(),
            temp,
            file: Mutex::new(file),
        };
        Ok((writer, resumed))
    }

    /// The pallet's final name (what reports point at).
    pub(crate) fn target(&self) -> &Path {
        &self.target
    }

    /// Appends lines and makes them durable. On failure the file is cut back to where it
    /// was, so it never ends in a torn line of this group.
    pub(crate) fn append(&self, lines: &[u8]) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let start = file.seek(SeekFrom::End(0))?;
        let written = file.write_all(lines).and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(start);
            return Err(e);
        }
        Ok(())
    }

    /// Keeps only the device lines whose serial `keep` accepts (after a resume), by
    /// writing the kept lines to a new temporary file and renaming it over the old one.
    pub(crate) fn retain(&self, keep: &dyn Fn(&str) -> bool) -> io::Result<usize> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::Start(0))?;
        let mut kept = Vec::new();
        let mut dropped = 0;
        for (i, line) in BufReader::new(&*file).split(b'\n').enumerate() {
            let line = line?;
            let wanted = i == 0 || {
                let entry: PalletEntry =
                    serde_json::from_slice(&line).map_err(|e| invalid(e.to_string()))?;
                keep(&entry.serial)
            };
            if wanted {
                kept.extend_from_slice(&line);
                kept.push(b'\n');
            } else {
                dropped += 1;
            }
        }
        if dropped == 0 {
            return Ok(0);
        }
        // Rewritten in place under the lock this run holds: a second file renamed over
        // this one would not carry the lock with it.
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&kept)?;
        file.sync_all()?;
        Ok(dropped)
    }

    /// Renames the finished pallet to its name; the lock goes with the file.
    pub(crate) fn finish(self) -> io::Result<PathBuf> {
        let file = self.file.into_inner().unwrap_or_else(|e| e.into_inner());
        file.sync_all()?;
        // `rename` would replace a pallet created meanwhile; a hard link refuses to.
        fs::hard_link(&self.temp, &self.target).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} appeared during the run; the finished pallet is kept as {}",
                        self.target.display(),
                        self.temp.display()
                    ),
                )
            } else {
                e
            }
        })?;
        fs::remove_file(&self.temp)?;
        sync_parent(&self.target)?;
        Ok(self.target)
    }
}

/// Writes the header as the (empty) file's first line and makes it durable.
fn write_header(file: &mut File, header: &PalletHeader) -> io::Result<()> {
    let mut line = serde_json::to_vec(header).map_err(io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)?;
    file.sync_all()
}

/// Reads what an interrupted run left: checks the header, cuts a torn last line, and
/// lists the complete device lines.
fn read_resumed(file: &mut File, temp: &Path, header: &PalletHeader) -> Result<Resumed, OpenError> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&*file);
    let mut complete_len = 0u64;
    let mut resumed = Resumed::default();
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // end of file, or a torn last line
        }
        let body = &line[..line.len() - 1];
        if first {
            let found: PalletHeader = serde_json::from_slice(body).map_err(|_| {
                OpenError::Refused(format!(
                    "{} is not a fleetcert pallet left by an interrupted run; remove it to start afresh",
                    temp.display()
                ))
            })?;
            if found != *header {
                return Err(OpenError::Refused(format!(
                    "{} was started under another issuing CA (issuer {:?}); finish or remove it before provisioning under this one",
                    temp.display(),
                    found.issuer
                )));
            }
            first = false;
        } else {
            let entry: PalletEntry = serde_json::from_slice(body).map_err(|e| {
                OpenError::Refused(format!(
                    "{}: unreadable device line after byte {complete_len} ({e}); remove the file to start afresh",
                    temp.display()
                ))
            })?;
            resumed.entries.push((entry.thing_name, entry.serial));
        }
        complete_len += n as u64;
    }
    drop(reader);
    if first {
        // Not even the header was complete: start the file again.
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        write_header(file, header)?;
        return Ok(Resumed::default());
    }
    if file.metadata()?.len() != complete_len {
        file.set_len(complete_len)?;
        file.sync_all()?;
    }
    Ok(resumed)
}

/// Renders device lines for [`PalletWriter::append`].
pub(crate) fn render(entries: &[PalletEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 1536);
    for entry in entries {
        serde_json::to_writer(&mut out, entry).expect("a pallet entry serialises");
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PalletHeader {
        PalletHeader {
            fleetcert_pallet: PALLET_FORMAT,
            issuer: "CN=test".into(),
            chain: "chain".into(),
        }
    }

    fn entry(thing: &str, serial: &str) -> PalletEntry {
        PalletEntry {
            thing_name: thing.into(),
            serial: serial.into(),
            not_after: "2030-01-01T00:00:00Z".into(),
            origin: fleetcert_registry::CertOrigin::Generated,
            certificate: "cert".into(),
            private_key: Some(zeroize::Zeroizing::new("key".into())),
        }
    }

    #[test]
    fn a_resumed_pallet_cuts_its_torn_line_and_keeps_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("p.jsonl");
        {
            let (writer, resumed) = PalletWriter::open(&target, &header()).unwrap();
            assert!(resumed.entries.is_empty());
            writer
                .append(&render(&[entry("a", "01"), entry("b", "02")]))
                .unwrap();
            // A kill in the middle of a line.
            writer.append(br#"{"thing_name":"c","ser"#).unwrap();
        }
        let (writer, resumed) = PalletWriter::open(&target, &header()).unwrap();
        assert_eq!(
            resumed.entries,
            vec![("a".into(), "01".into()), ("b".into(), "02".into())]
        );
        assert_eq!(writer.retain(&|serial| serial != "02").unwrap(), 1);
        writer.append(&render(&[entry("c", "03")])).unwrap();
        let path = writer.finish().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].contains("\"a\"") && lines[2].contains("\"c\""));
        assert!(!temp_path_for(&target).exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn an_existing_pallet_another_run_or_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("p.jsonl");
        let (writer, _) = PalletWriter::open(&target, &header()).unwrap();
        assert!(matches!(
            PalletWriter::open(&target, &header()),
            Err(OpenError::Refused(m)) if m.contains("another provisioning run")
        ));
        drop(writer);
        let other = PalletHeader {
            issuer: "CN=other".into(),
            ..header()
        };
        assert!(matches!(
            PalletWriter::open(&target, &other),
            Err(OpenError::Refused(m)) if m.contains("another issuing CA")
        ));
        let (writer, _) = PalletWriter::open(&target, &header()).unwrap();
        writer.finish().unwrap();
        assert!(matches!(
            PalletWriter::open(&target, &header()),
            Err(OpenError::Refused(m)) if m.contains("never overwritten")
        ));
    }
}
