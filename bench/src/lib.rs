//! fleetcert's benchmark tools.
//!
//! - [`jitp`]: a mutual-TLS load generator (a new connection and full handshake per
//!   request, with device certificates from a directory) that works against any HTTPS
//!   server asking for client certificates, so the same tool measures fleetcert and its
//!   peers; cross-checked against the server's Prometheus counters when it has them.
//! - [`issuance`]: in-process issuance throughput and the crypto floor in the same run.
//! - [`csrs`]: N P-256 device CSRs and a `provision --batch` pallet naming them, the
//!   input of the CSR-issuance comparison (`bench/compare-issuance.sh`).
//! - [`hold`]: many idle mutual-TLS keep-alive connections open at once (for a server's
//!   memory with N devices connected), with early closes by the server counted.
//! - [`mqtt`]: MQTT 3.1.1 over mutual TLS (a hand-written codec over tokio-rustls):
//!   CONNECT rate and latency (first or returning devices), QoS 1 publish throughput and
//!   latency (optionally while new devices onboard), and N sessions held open — against
//!   mosquitto with the fleetcert plugin and without it (`bench/mqtt-compare.sh`).

pub mod certs;
pub mod csrs;
pub mod hold;
pub mod issuance;
pub mod jitp;
pub mod metrics;
pub mod mqtt;
pub mod stats;
