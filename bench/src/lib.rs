//! fleetcert's benchmark tools.
//!
//! - [`jitp`]: a mutual-TLS load generator (a new connection and full handshake per
//!   request, with device certificates from a directory) that works against any HTTPS
//!   server asking for client certificates, so the same tool measures fleetcert and its
//!   peers; cross-checked against the server's Prometheus counters when it has them.
//! - [`issuance`]: in-process issuance throughput and the crypto floor in the same run.
#![forbid(unsafe_code)]

pub mod certs;
pub mod issuance;
pub mod jitp;
pub mod metrics;
pub mod stats;
