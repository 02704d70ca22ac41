//! The tests of fleetcert-bench's tools, in one test binary: device identities from a
//! directory, the mutual-TLS load generator and `hold`, against a real in-process
//! fleetcert server on loopback.
mod certs_dir;
mod fleet;
mod hold;
mod jitp_server;
