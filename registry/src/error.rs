/// Registry failures. Messages name the database (password redacted) and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("cannot reach the registry database {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("registry migration failed: {0}")]
    Migration(String),
    #[error("serial number or fingerprint already recorded: {0}")]
    DuplicateSerial(String),
    #[error("invalid value in the registry: {0}")]
    InvalidValue(String),
    #[error("registry database error: {0}")]
    Database(String),
    /// A certificate or thing named by the caller does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}
