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

/// Where a file is written before it is renamed (or linked) to `target`: a hidden name
/// beside it that a later run recognises as garbage.
pub(crate) fn temp_path_for(target: &Path) -> PathBuf {
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

/// Makes a rename or link in `path`'s directory durable (a bare file name means the
/// current directory).
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes one file atomically and durably (temp, fsync, rename, fsync of the directory).
pub(crate) fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let temp = temp_path_for(path);
    let written = write_new(&temp, contents, mode)
        .and_then(|file| file.sync_all())
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = written {
        // A full disk must not keep a half-written temporary file taking space.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    sync_parent(path)
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
    published: bool,
}

/// A group that could not be published (a full disk, an I/O error) takes its staging
/// directory and whatever it holds with it, so a failed run does not keep the disk full.
impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
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
        Ok(Staging {
            dir,
            published: false,
        })
    }

    /// Makes a group of staged files durable, then visible: one `syncfs`, the renames
    /// into the output directory, one `fsync` of it; then drops the staging directory.
    pub(crate) fn publish(&self, mut staging: Staging, staged: Vec<Staged>) -> io::Result<()> {
        let dir = File::open(&self.dir)?;
        if !staged.is_empty() {
            rustix::fs::syncfs(&dir)?;
            for file in &staged {
                fs::rename(&file.temp, self.dir.join(&file.target))?;
            }
            dir.sync_all()?;
        }
        fs::remove_dir(&staging.dir)?;
        staging.published = true;
        Ok(())
    }
}

/// Where the input files named in a batch (the CSV's `csr` column) may be read from.
pub(crate) struct InputDir {
    path: PathBuf,
    /// The directory itself, opened once: paths are resolved beneath it by the kernel
    /// (`openat2` with `RESOLVE_BENEATH`). `None`: anywhere (absolute paths, `..` and
    /// symbolic links leading out are followed).
    confined: Option<rustix::fd::OwnedFd>,
}

/// Why an input file was not read. Messages never include the file's contents.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InputFileError {
    #[error(
        "it is outside the CSV file's directory (an absolute path, `..` or a symbolic link leading out); pass --allow-absolute-csr-paths to allow that"
    )]
    Outside,
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it is larger than {} KiB (a CSR is a few KiB)", .0 / 1024)]
    TooLarge(u64),
    #[error("it changed while being opened")]
    Changed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<rustix::io::Errno> for InputFileError {
    fn from(e: rustix::io::Errno) -> Self {
        InputFileError::Io(e.into())
    }
}

fn file_kind(meta: &fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    })
}

impl InputDir {
    /// Files relative to `dir`, never leaving it.
    pub(crate) fn confined(dir: &Path) -> io::Result<Self> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(InputDir {
            path: dir.to_path_buf(),
            confined: Some(fd),
        })
    }

    /// Files relative to `dir`, or anywhere with an absolute path.
    pub(crate) fn anywhere(dir: &Path) -> Self {
        InputDir {
            path: dir.to_path_buf(),
            confined: None,
        }
    }

    fn open(&self, rel: &Path, flags: rustix::fs::OFlags) -> Result<File, InputFileError> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        use rustix::io::Errno;
        let flags = flags | OFlags::CLOEXEC;
        let Some(dir) = &self.confined else {
            return Ok(File::from(rustix::fs::open(
                self.path.join(rel),
                flags,
                Mode::empty(),
            )?));
        };
        match rustix::fs::openat2(
            dir,
            rel,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::XDEV) => Err(InputFileError::Outside),
            // No openat2 (a kernel before 5.6, or a seccomp filter): resolve in user
            // space, then open the resolved path without following a final symlink.
            Err(Errno::NOSYS | Errno::PERM) => {
                if rel.is_absolute() {
                    return Err(InputFileError::Outside);
                }
                let base = fs::canonicalize(&self.path)?;
                let resolved = fs::canonicalize(self.path.join(rel))?;
                if !resolved.starts_with(&base) {
                    return Err(InputFileError::Outside);
                }
                Ok(File::from(rustix::fs::open(
                    &resolved,
                    flags | OFlags::NOFOLLOW,
                    Mode::empty(),
                )?))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a regular file of at most `cap` bytes. The file type is checked before the
    /// file is opened for reading (a device is never opened; a FIFO never blocks: the
    /// read open is non-blocking and re-checked), and at most `cap + 1` bytes are read.
    pub(crate) fn read_regular(&self, rel: &Path, cap: u64) -> Result<Vec<u8>, InputFileError> {
        use rustix::fs::OFlags;
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let probe = self.open(rel, OFlags::PATH)?.metadata()?;
        if let Some(kind) = file_kind(&probe) {
            return Err(InputFileError::NotRegular(kind));
        }
        if probe.len() > cap {
            return Err(InputFileError::TooLarge(cap));
        }
        let file = self.open(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        let meta = file.metadata()?;
        if let Some(kind) = file_kind(&meta) {
            return Err(InputFileError::NotRegular(kind));
        }
        if (meta.dev(), meta.ino()) != (probe.dev(), probe.ino()) {
            return Err(InputFileError::Changed);
        }
        let mut bytes = Vec::with_capacity(meta.len().min(cap) as usize + 1);
        file.take(cap + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > cap {
            return Err(InputFileError::TooLarge(cap));
        }
        Ok(bytes)
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

    #[test]
    fn confined_input_files_stay_in_their_directory_and_are_regular_and_small() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("csv");
        fs::create_dir(&base).unwrap();
        fs::create_dir(base.join("sub")).unwrap();
        fs::write(base.join("sub/a.csr"), b"csr").unwrap();
        fs::write(tmp.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("../secret", base.join("out-link")).unwrap();
        std::os::unix::fs::symlink("sub/a.csr", base.join("in-link")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", base.join("dev-link")).unwrap();
        fs::write(base.join("big"), vec![b'x'; 100]).unwrap();
        let dir = InputDir::confined(&base).unwrap();
        assert_eq!(
            dir.read_regular(Path::new("sub/a.csr"), 64).unwrap(),
            b"csr"
        );
        assert_eq!(dir.read_regular(Path::new("in-link"), 64).unwrap(), b"csr");
        assert_eq!(
            dir.read_regular(Path::new("sub/../sub/a.csr"), 64).unwrap(),
            b"csr"
        );
        for outside in ["../secret", "out-link", "/etc/passwd", "sub/../../secret"] {
            assert!(
                matches!(
                    dir.read_regular(Path::new(outside), 64),
                    Err(InputFileError::Outside)
                ),
                "{outside}"
            );
        }
        assert!(matches!(
            dir.read_regular(Path::new("sub"), 64),
            Err(InputFileError::NotRegular("a directory"))
        ));
        assert!(matches!(
            dir.read_regular(Path::new("big"), 64),
            Err(InputFileError::TooLarge(64))
        ));
        let anywhere = InputDir::anywhere(&base);
        assert_eq!(
            anywhere.read_regular(Path::new("../secret"), 64).unwrap(),
            b"secret"
        );
        assert!(matches!(
            anywhere.read_regular(Path::new("dev-link"), 64),
            Err(InputFileError::NotRegular("a character device"))
        ));
        assert!(matches!(
            anywhere.read_regular(Path::new("/dev/zero"), 64),
            Err(InputFileError::NotRegular("a character device"))
        ));
    }
}
