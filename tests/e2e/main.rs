//! End-to-end tests: they drive the real `fleetcert` binary and check what it makes with
//! real peers (openssl, webpki, pkilint, PostgreSQL). All in one test binary, as ripgrep
//! does, so the suite links once.
//!
//! Service tests are `#[ignore]`d so plain `cargo test` stays hermetic; the README's test
//! command (`scripts/test.sh`) runs them with `--include-ignored` after starting the
//! services, and they fail loudly if a service they need is not configured.
mod util;

mod audit;
mod aws;
mod bad_input;
mod batch;
mod broker;
mod ca;
mod crash;
mod demo;
mod harden_cli;
mod harden_provision;
mod harden_registry;
mod harden_secrets;
mod harden_server;
mod jitp;
mod mqtt;
mod pallet;
mod provision;
mod rotation;
mod services;
mod templates;
