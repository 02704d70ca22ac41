//! fleetcert's mosquitto 2.0 plugin (`libfleetcert_mosquitto.so`, plugin API v5).
//!
//! It makes a self-hosted mosquitto as strict as AWS IoT Core for fleetcert's devices:
//!
//! - **CONNECT** (`MOSQ_EVT_BASIC_AUTH`): the verified client certificate and client id go to
//!   `fleetcert serve`'s broker API (`POST /broker/v1/connect`, docs/broker-api.md), which
//!   verifies the certificate, registers the thing on first use (JITP) and answers with the
//!   device's policies. The call is synchronous on the broker's thread but bounded
//!   (`plugin_opt_timeout_ms`, default 2 s), and only made for a certificate + client id not
//!   in the cache (`cache_seconds` from serve); returning devices are answered at once.
//! - **SUBSCRIBE / PUBLISH / delivery** (`MOSQ_EVT_ACL_CHECK`): decided in process from the
//!   session's compiled policies (`iot:Subscribe` on `topicfilter/`, `iot:Publish` (+
//!   `iot:RetainPublish` when retained) and `iot:Receive` on `topic/`), no I/O. Unknown
//!   sessions, `$SYS` and topics over AWS's limits ([`topic`]) are denied.
//! - **DISCONNECT** only queues a record; a worker thread sends them in batches
//!   (`/broker/v1/disconnect`) and polls `/broker/v1/sessions` every
//!   `plugin_opt_sessions_interval_ms`; the clients of retired certificates are kicked from
//!   `MOSQ_EVT_TICK` on the broker's thread.
//!
//! # mosquitto 2.0 behaviour this relies on (checked in the 2.0.11 source)
//!
//! - A `MOSQ_EVT_BASIC_AUTH` result maps to a CONNACK in `handle_connect.c`:
//!   `MOSQ_ERR_SUCCESS` accepts; `MOSQ_ERR_AUTH` sends "not authorised" (MQTT 5: 0x87,
//!   3.1.1: code 5); **any other value sends no CONNACK at all** and closes the connection.
//!   No plugin return value yields 0x88 (server unavailable) or 0x86 (bad user name or
//!   password): mosquitto sends those only itself (0x86 for `use_identity_as_username`
//!   without a certificate). So serve's `not_authorized` and `bad_credentials` both answer
//!   `MOSQ_ERR_AUTH` (0x87 / 5), and "serve unreachable" answers `MOSQ_ERR_UNKNOWN`: the
//!   connection is closed without CONNACK, which device SDKs retry like a network failure
//!   rather than treating as a refusal. `MOSQ_ERR_PLUGIN_DEFER` is never returned (it
//!   would let `allow_anonymous` decide).
//! - The broker must not use `use_identity_as_username` / `use_subject_as_username`: with
//!   either, mosquitto skips `MOSQ_EVT_BASIC_AUTH` entirely.
//! - `mosquitto_client_certificate` returns `SSL_get_peer_certificate(client->ssl)`, a new
//!   reference: the plugin frees it with `X509_free` (the header says so too).
//! - `MOSQ_EVT_TICK` is dispatched only with `per_listener_settings false` (2.0.11
//!   `plugin__handle_tick`); with it true, kicks would never be delivered.
//! - `mosquitto_kick_client_by_clientid(NULL, …)` kicks every client; kicking runs the
//!   DISCONNECT callback re-entrantly.
//!
//! Everything but [`ffi`]'s thin layer is safe Rust.

pub mod ffi;
pub mod metrics;
pub mod options;
pub mod plugin;
pub mod serve;
pub mod topic;

#[cfg(test)]
mod fake_serve;

pub use options::PluginOptions;
pub use plugin::{Access, AuthAnswer, ConnectAttempt, ConnectionKey, Plugin};
