//! What every subcommand shares: the context it runs in (data directory, registry,
//! output format), the error type with its exit code, and checks of command-line names.
//! Subcommand modules import from here, never from each other.
use crate::output::Out;
use fleetcert_ca::ThingName;
use fleetcert_lifecycle::{DataDir, ErrorClass, LifecycleError, PASSPHRASE_ENV};
use fleetcert_registry::Registry;
use std::sync::Arc;

/// A failure with its exit code (1: operation failed, 2: bad input).
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl From<LifecycleError> for CliError {
    fn from(e: LifecycleError) -> Self {
        let code = match e.class() {
            ErrorClass::BadInput => 2,
            ErrorClass::Failed => 1,
        };
        CliError {
            code,
            message: e.to_string(),
        }
    }
}

impl From<fleetcert_registry::RegistryError> for CliError {
    fn from(e: fleetcert_registry::RegistryError) -> Self {
        LifecycleError::from(e).into()
    }
}

impl From<fleetcert_ca::CaError> for CliError {
    fn from(e: fleetcert_ca::CaError) -> Self {
        LifecycleError::from(e).into()
    }
}

pub fn bad_input(message: impl Into<String>) -> CliError {
    CliError {
        code: 2,
        message: message.into(),
    }
}

pub fn failed(message: impl Into<String>) -> CliError {
    CliError {
        code: 1,
        message: message.into(),
    }
}

/// Checks a thing name given on the command line (`[a-zA-Z0-9:_-]{1,128}`): a name that
/// cannot exist is bad input (exit 2, "invalid thing name"); a valid name that is not in
/// the registry is the command's own failure (exit 1). The message quotes at most 64
/// characters of the name.
pub fn check_thing_name(name: &str) -> Result<(), CliError> {
    match ThingName::parse(name) {
        Ok(_) => Ok(()),
        Err(fleetcert_ca::CaError::InvalidThingName { reason, .. }) => Err(bad_input(format!(
            "invalid thing name {:?}: {reason}",
            fleetcert_templates::clip(name, fleetcert_templates::MAX_ECHO_CHARS)
        ))),
        Err(other) => Err(other.into()),
    }
}

/// What a subcommand runs with: the data directory, the registry's URL (the SQLite file
/// in the data directory unless given) and the output format.
pub struct Ctx {
    pub(crate) data: DataDir,
    pub(crate) database_url: Option<String>,
    pub(crate) out: Out,
}

impl Ctx {
    pub fn data(&self) -> &DataDir {
        &self.data
    }

    pub fn out(&self) -> Out {
        self.out
    }

    /// Opens the registry. With the default SQLite file the data directory must exist
    /// (unless `create`), so a typo in --data-dir is an error rather than a new registry.
    pub async fn registry(&self, create: bool) -> Result<Arc<dyn Registry>, CliError> {
        let url = match &self.database_url {
            Some(url) => url.clone(),
            None => {
                if create {
                    self.data.ensure_exists()?;
                } else {
                    self.data.require_exists()?;
                }
                self.data.default_database_url()
            }
        };
        Ok(fleetcert_registry::open(&url).await?)
    }
}

/// The CA passphrase from the environment; an empty value counts as unset.
pub fn passphrase() -> Option<String> {
    std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty())
}
