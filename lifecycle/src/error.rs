use fleetcert_ca::CaError;
use fleetcert_registry::RegistryError;
use fleetcert_templates::TemplateError;
use std::path::PathBuf;

/// Whether a failure is the caller's input (exit code 2) or an operation that could not
/// be carried out (exit code 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input was wrong (a name, a CSR, a file, a template); fixing it and running
    /// again can succeed. Exit code 2.
    BadInput,
    /// Anything else: storage, the CA, AWS, the file system. Exit code 1.
    Failed,
}

/// Why a use case failed. The message is meant for an operator; [`LifecycleError::class`]
/// tells whether the input or the operation was at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// The CA layer refused or failed: a bad thing name or CSR, a key it cannot read, a
    /// signing error.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The registry failed or refused the change (unavailable, busy, a conflict).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A provisioning template is invalid.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The data directory has no CA yet (`ca/ca.json` is missing).
    #[error("no CA in {dir}: run `fleetcert ca init` first")]
    NoCa {
        /// The `ca/` directory looked in.
        dir: PathBuf,
    },
    /// `ca init` found `ca/` not empty; nothing was generated or written.
    #[error("a CA already exists in {dir}; refusing to overwrite it")]
    CaExists {
        /// The `ca/` directory that holds files.
        dir: PathBuf,
    },
    /// `ca/ca.json` exists but another CA file is missing, or `ca.json` does not parse.
    #[error("the CA in {dir} is incomplete or damaged: {reason}")]
    DamagedCa {
        /// The `ca/` directory.
        dir: PathBuf,
        /// Which file is missing or why it does not parse.
        reason: String,
    },
    /// The data directory does not exist (and the command does not create one).
    #[error(
        "no fleetcert data directory at {dir}: run `fleetcert ca init` first (or pass --data-dir)"
    )]
    NoDataDir {
        /// The data directory looked for.
        dir: PathBuf,
    },
    /// A file or directory could not be read (the I/O error, as text). Counted as bad
    /// input: it is usually a path the caller gave.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// The underlying error.
        reason: String,
    },
    /// A file or directory could not be created or written (a full disk, permissions).
    #[error("cannot write to {path}: {reason}")]
    Write {
        /// What could not be written.
        path: PathBuf,
        /// The underlying error.
        reason: String,
    },
    /// A file was read but its contents or kind are refused: not a regular file, too
    /// large, outside the directory it must be in, malformed, or changed since it was
    /// validated.
    #[error("{path}: {reason}")]
    BadFile {
        /// The refused file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key file encrypted under `FLEETCERT_CA_PASSPHRASE` that cannot be opened
    /// (passphrase missing or wrong).
    #[error("{path}: {reason}")]
    KeyLocked {
        /// The key file.
        path: PathBuf,
        /// Whether the passphrase is missing or wrong.
        reason: String,
    },
    /// A request that cannot be carried out as given; the message says why. Also used
    /// for a few failures that are not the caller's (see [`LifecycleError::class`]).
    #[error("{0}")]
    BadInput(String),
    /// No template file of that name in the templates directory.
    #[error("template {name:?} not found in {dir}")]
    TemplateNotFound {
        /// The name asked for (without extension).
        name: String,
        /// The templates directory searched.
        dir: PathBuf,
    },
    /// AWS IoT refused or could not be reached (reconcile, CA registration).
    #[error("AWS IoT: {0}")]
    Aws(#[from] fleetcert_aws::AwsError),
}

impl LifecycleError {
    /// Whose fault the failure is, which decides the exit code. The input's: invalid
    /// thing names, CSRs (malformed, bad signature, weak key), key algorithm names and
    /// profiles, templates, refused files, unreadable paths and
    /// [`LifecycleError::BadInput`]. Everything else (the registry, AWS, writes, a missing
    /// or damaged CA, other CA errors) is [`ErrorClass::Failed`].
    pub fn class(&self) -> ErrorClass {
        use ErrorClass::*;
        match self {
            LifecycleError::Ca(
                CaError::InvalidThingName { .. }
                | CaError::UnknownKeyAlgorithm(_)
                | CaError::MalformedCsr(_)
                | CaError::CsrSignatureInvalid
                | CaError::WeakOrUnsupportedKey(_)
                | CaError::InvalidProfile(_),
            ) => BadInput,
            LifecycleError::Template(_)
            | LifecycleError::BadFile { .. }
            | LifecycleError::BadInput(_)
            | LifecycleError::TemplateNotFound { .. } => BadInput,
            LifecycleError::Read { .. } => BadInput,
            _ => Failed,
        }
    }

    pub(crate) fn read(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        LifecycleError::Read {
            path: path.into(),
            reason: err.to_string(),
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        LifecycleError::Write {
            path: path.into(),
            reason: err.to_string(),
        }
    }
}
