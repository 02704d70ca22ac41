//! fleetcert's use cases.
//!
//! Composes the pure crates ([`fleetcert_ca`], [`fleetcert_templates`]) with storage
//! ([`fleetcert_registry`]) and the file system: CA custody in the data directory,
//! factory-line provisioning (single and batch), the device use cases. Front ends (the
//! CLI, the JITP server) stay thin and call in here; device authentication is
//! `fleetcert-device-auth`.

pub mod audit;
pub mod broker;
pub mod claims;
mod datadir;
mod error;
mod fsio;
mod group_commit;
mod issuance;
pub mod jitp;
pub mod mirror;
pub mod pallet;
pub mod provision;
pub mod renewal;
pub mod revocation;
mod revocation_view;
pub mod rotation;
pub mod sealing;
mod templates;

pub use datadir::{CaInfo, CaInitOptions, DataDir, PASSPHRASE_ENV, ServerCredentials};
pub use error::{ErrorClass, LifecycleError};
/// PKCS#7 certs-only DER (RFC 7030 replies), re-exported for the server.
pub use fleetcert_ca::pkcs7_certs_only;
pub use issuance::Issuance;
pub use revocation_view::RevocationView;
pub use templates::{read_template_file, read_template_path};

/// `bytes` random bytes from the OS CSPRNG, as lowercase hex (ids, ownership tokens);
/// `None` if the generator fails.
pub(crate) fn random_hex(bytes: usize) -> Option<String> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf).ok()?;
    Some(hex::encode(buf))
}

/// Current time as Unix seconds; one place so every record uses the same clock.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
