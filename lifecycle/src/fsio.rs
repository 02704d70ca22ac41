//! Durable, atomic file output.
//!
//! Every file fleetcert hands out is written to a temporary name in the destination
//! directory, flushed, and renamed into place, so a reader (or a re-run after `kill -9`)
//! sees either the whole file or no file. Device files are written a group at a time: one
//! `syncfs` for the group instead of one `fsync` per file keeps the factory line bounded
//! by signing rather than by the disk.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode of files that hold private keys.
pub(crate) const SECRET_MODE: u32 = 0o600;
/// Mode of public files (certificates, chains).
pub(crate) const PUBLIC_MODE: u32 = 0o644;

const TEMP_SUFFIX: &str = ".fleetcert-tmp";

fn temp_path_for(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{TEMP_SUFFIX}"))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
    };
    let mut file = match open() {
        Ok(file) => file,
        // A stale temporary file from an interrupted run: start afresh so its mode cannot
        // leak into the new file. (Rare, so the common path costs one syscall.)
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()?
        }
        Err(e) => return Err(e),
    };
    file.write_all(contents)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes one file atomically and durably (temp, fsync, rename, fsync of the directory).
pub(crate) fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let temp = temp_path_for(path);
    let file = write_new(&temp, contents, mode)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// A file staged by [`GroupWriter::stage`], not yet visible under its final name.
pub(crate) struct Staged {
    temp: PathBuf,
    target: PathBuf,
}

/// Writes device files into one output directory, a group at a time.
pub(crate) struct GroupWriter {
    dir: PathBuf,
    next_staging: std::sync::atomic::AtomicU64,
}

/// A group's own staging directory inside the output directory. Creating a file takes its
/// directory's lock; with each group staging into its own small directory, the next
/// group's creations do not queue behind the renames that publish the previous one (a
/// `strace -c` of a run staging next to its targets showed creations averaging 0.7 ms).
pub(crate) struct Staging {
    dir: PathBuf,
}

impl Staging {
    pub(crate) fn stage(&self, file_name: &str, contents: &[u8], mode: u32) -> io::Result<Staged> {
        let temp = self.dir.join(file_name);
        write_new(&temp, contents, mode)?;
        Ok(Staged {
            temp,
            target: PathBuf::from(file_name),
        })
    }
}

impl GroupWriter {
    /// Creates the directory if needed and proves it is writable before anything is
    /// issued, so an unwritable output directory fails the run with nothing recorded.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let probe = dir.join(format!(".write-probe{TEMP_SUFFIX}"));
        write_new(&probe, b"", PUBLIC_MODE)?;
        fs::remove_file(&probe)?;
        let writer = GroupWriter {
            dir: dir.to_path_buf(),
            next_staging: Default::default(),
        };
        writer.remove_stale_temporaries()?;
        Ok(writer)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Temporary files left by a run that was killed: their content is incomplete or
    /// was never renamed into place, so they are garbage.
    fn remove_stale_temporaries(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
                if entry.file_type()?.is_dir() {
                    fs::remove_dir_all(entry.path())?;
                } else {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn path_of(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// A fresh staging directory for one group (removed by [`GroupWriter::publish`]).
    pub(crate) fn staging(&self) -> io::Result<Staging> {
        let n = self
            .next_staging
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .dir
            .join(format!(".staging-{}-{n}{TEMP_SUFFIX}", std::process::id()));
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_dir_all(&dir)?;
                fs::create_dir(&dir)?;
            }
            other => other?,
        }
        Ok(Staging { dir })
    }

    /// Makes a group of staged files durable, then visible: one `syncfs`, the renames
    /// into the output directory, one `fsync` of it; then drops the staging directory.
    pub(crate) fn publish(&self, staging: Staging, staged: Vec<Staged>) -> io::Result<()> {
        let dir = File::open(&self.dir)?;
        if !staged.is_empty() {
            rustix::fs::syncfs(&dir)?;
            for file in &staged {
                fs::rename(&file.temp, self.dir.join(&file.target))?;
            }
            dir.sync_all()?;
        }
        fs::remove_dir(&staging.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_writer_publishes_with_modes_and_cleans_stale_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(".old.key.fleetcert-tmp"), b"junk").unwrap();
        let stale_staging = tmp.path().join(".staging-1-0.fleetcert-tmp");
        fs::create_dir(&stale_staging).unwrap();
        fs::write(stale_staging.join("b.key"), b"junk").unwrap();
        let writer = GroupWriter::open(tmp.path()).unwrap();
        assert!(!tmp.path().join(".old.key.fleetcert-tmp").exists());
        assert!(!stale_staging.exists());
        let staging = writer.staging().unwrap();
        let staged = vec![
            staging.stage("a.key", b"secret", SECRET_MODE).unwrap(),
            staging.stage("a.crt", b"public", PUBLIC_MODE).unwrap(),
        ];
        assert!(!tmp.path().join("a.key").exists(), "visible before publish");
        writer.publish(staging, staged).unwrap();
        let mode = fs::metadata(tmp.path().join("a.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(tmp.path().join("a.crt")).unwrap(), b"public");
        let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2);
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("chain.pem");
        write_file_atomic(&path, b"one", PUBLIC_MODE).unwrap();
        write_file_atomic(&path, b"two", PUBLIC_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
    }
}
