/// Registry failures. Messages name the database (password redacted) and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The database cannot be reached or opened (connection refused, timeout, bad URL,
    /// missing directory); retrying later may help.
    #[error("cannot reach the registry database {url}: {reason}")]
    Unreachable {
        /// The database URL, password redacted.
        url: String,
        /// What went wrong, for humans.
        reason: String,
    },
    /// The schema migrations failed (a newer schema, a damaged database).
    #[error("registry migration failed: {0}")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// A serial number or fingerprint is already recorded; the message names it.
    #[error("serial number or fingerprint already recorded: {0}")]
    DuplicateSerial(String),
    /// The caller passed a value the registry cannot store (validated before any write).
    #[error("invalid value in the registry: {0}")]
    InvalidValue(String),
    /// The database refused or failed a statement.
    #[error("registry database error: {context}: {source}")]
    Database {
        /// What the registry was doing.
        context: String,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
    /// The work was cut short before it reached the database (the task that commits
    /// registrations stopped, at shutdown); nothing was written.
    #[error("registry database error: {0}")]
    Interrupted(&'static str),
    /// A certificate or thing named by the caller does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}
