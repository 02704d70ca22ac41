use fleetcert_ca::CaError;
use fleetcert_registry::RegistryError;
use fleetcert_templates::TemplateError;
use std::path::PathBuf;

/// Whether a failure is the caller's input (exit code 2) or an operation that could not
/// be carried out (exit code 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    BadInput,
    Failed,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("no CA in {dir}: run `fleetcert ca init` first")]
    NoCa { dir: PathBuf },
    #[error("a CA already exists in {dir}; refusing to overwrite it")]
    CaExists { dir: PathBuf },
    #[error("the CA in {dir} is incomplete or damaged: {reason}")]
    DamagedCa { dir: PathBuf, reason: String },
    #[error(
        "no fleetcert data directory at {dir}: run `fleetcert ca init` first (or pass --data-dir)"
    )]
    NoDataDir { dir: PathBuf },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write to {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// A key file encrypted under `FLEETCERT_CA_PASSPHRASE` that cannot be opened
    /// (passphrase missing or wrong).
    #[error("{path}: {reason}")]
    KeyLocked { path: PathBuf, reason: String },
    #[error("{0}")]
    BadInput(String),
    #[error("template {name:?} not found in {dir}")]
    TemplateNotFound { name: String, dir: PathBuf },
    /// AWS IoT refused or could not be reached (reconcile, CA registration).
    #[error("AWS IoT: {0}")]
    Aws(#[from] fleetcert_aws::AwsError),
}

impl LifecycleError {
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
