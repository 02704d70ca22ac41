//! `fleetcert-bench mqtt claim`: devices provisioned by claim, end to end, as AWS IoT
//! Device SDK firmware does it against the Fleet Provisioning MQTT API.
//!
//! Each device, one after another on `concurrency` tasks:
//! 1. connects with the shared claim certificate (client id `<serial prefix><index>`) and
//!    subscribes to the `accepted`/`rejected` topics of the two calls it makes;
//! 2. CreateCertificateFromCsr (a P-256 key and CSR made before the clock starts: key
//!    generation is the device's work, not the server's) or CreateKeysAndCertificate;
//! 3. RegisterThing with the ownership token and `{<parameter>: <serial>}`;
//! 4. disconnects, reconnects with its new certificate and key and client id = the thing
//!    name from RegisterThing, and counts as provisioned on CONNACK 0.
//!
//! Devices per second are counted from the first claim connect to the last reconnect;
//! latencies are per device (whole flow) and per step.
use super::{Broker, MqttError, add_sample, per_second, spawn_progress};
use crate::stats::{self, LatencyMs};
use anyhow::{Context, Result, anyhow, bail};
use fleetcert_mqtt_client::fleet_provisioning::{self, Create};
use fleetcert_mqtt_client::{Client, ClientError};
use hdrhistogram::Histogram;
use rayon::prelude::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Which Fleet Provisioning call makes the device's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimApi {
    /// CreateCertificateFromCsr: the device keeps its key (made before the measurement).
    Csr,
    /// CreateKeysAndCertificate: the server generates the key and sends it.
    Keys,
}

/// What `claim` runs.
#[derive(Debug, Clone)]
pub struct ClaimOptions {
    /// Devices to provision, each once.
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// The provisioning template named in RegisterThing's topic.
    pub template: String,
    /// CreateCertificateFromCsr or CreateKeysAndCertificate.
    pub api: ClaimApi,
    /// Serial numbers are this prefix and the device's index (7 digits).
    pub serial_prefix: String,
    /// The template parameter that carries the serial number.
    pub parameter: String,
    /// Limit for one device's whole flow.
    pub timeout: Duration,
    /// Keep-alive announced in both CONNECTs, seconds.
    pub keep_alive: u16,
    /// One progress line per second on stderr.
    pub progress: bool,
}

/// The JSON document of `fleetcert-bench mqtt claim`.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimReport {
    /// `claim`.
    pub mode: &'static str,
    /// The broker's address.
    pub broker: String,
    /// `csr` (CreateCertificateFromCsr) or `keys` (CreateKeysAndCertificate).
    pub api: ClaimApi,
    /// The template RegisterThing was asked for.
    pub template: String,
    /// Devices asked for.
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Seconds spent making device keys and CSRs before the measurement (csr only).
    pub prepare_seconds: f64,
    /// Devices that got a certificate, registered, and were let in with it (CONNACK 0).
    pub provisioned: u64,
    /// Devices that did not get that far.
    pub failed: u64,
    /// Failures by kind: the connection kinds (`connect`, `tls`, `closed`, `refused`,
    /// `protocol`, `timeout`) and `rejected` (a `.../rejected` reply).
    pub errors: BTreeMap<&'static str, u64>,
    /// `errorCode`s of rejected replies.
    pub rejected_codes: BTreeMap<String, u64>,
    /// First claim connect to the last device's reconnect.
    pub duration_seconds: f64,
    /// `provisioned` per second of `duration_seconds`.
    pub devices_per_second: f64,
    /// One device's whole flow: claim connect to CONNACK with its own certificate.
    pub latency_ms: LatencyMs,
    /// Per step: claim connect + SUBACK, the create call, RegisterThing, the reconnect.
    pub steps_ms: BTreeMap<&'static str, LatencyMs>,
    /// The first thing registered, as a sample of the names.
    pub sample_thing: Option<String>,
    /// A few distinct error messages.
    pub error_samples: Vec<String>,
}

/// A device's own key, made before the measurement, and its CSR.
struct DeviceKey {
    csr_pem: String,
    pkcs8: Vec<u8>,
}

fn device_key(serial: &str) -> Result<DeviceKey> {
    let (pkcs8, csr_pem) = crate::csrs::key_and_csr(serial)?;
    Ok(DeviceKey { csr_pem, pkcs8 })
}

struct Steps {
    claim: Histogram<u64>,
    create: Histogram<u64>,
    register: Histogram<u64>,
    reconnect: Histogram<u64>,
}

/// A failure's kind for the report: the connection kinds of [`MqttError`], or
/// `rejected`.
fn failure_kind(e: &ClientError) -> &'static str {
    let kind = match e {
        ClientError::Connect(_) => MqttError::Connect,
        ClientError::Tls(_) => MqttError::Tls,
        ClientError::Refused(_) => MqttError::Refused,
        ClientError::Closed(_) | ClientError::Io(_) => MqttError::Closed,
        ClientError::Rejected { .. } => return "rejected",
        _ => MqttError::Protocol,
    };
    kind.as_str()
}

/// One device's whole flow; the thing name on success.
async fn provision_one(
    broker: &Broker,
    claim: &tokio_rustls::TlsConnector,
    roots: &rustls::RootCertStore,
    opts: &ClaimOptions,
    serial: String,
    key: Option<&DeviceKey>,
    steps: &mut Steps,
) -> Result<String, ClientError> {
    let create = match key {
        Some(k) => Create::FromCsr(&k.csr_pem),
        None => Create::KeysAndCertificate,
    };
    let t0 = Instant::now();
    let mut session = Client::connect(
        broker.addr,
        broker.server_name.clone(),
        claim,
        &serial,
        opts.keep_alive,
    )
    .await?;
    fleet_provisioning::subscribe_to_replies(&mut session, create, &opts.template).await?;
    let t1 = Instant::now();
    stats::record(&mut steps.claim, t1 - t0);

    let created = fleet_provisioning::create_certificate(&mut session, create).await?;
    let private_key: PrivateKeyDer<'static> = match (key, &created.private_key_pem) {
        (Some(k), _) => PrivatePkcs8KeyDer::from(k.pkcs8.clone()).into(),
        (None, Some(pem)) => PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("privateKey: {e}")))?,
        (None, None) => return Err(ClientError::Protocol("no privateKey".into())),
    };
    let t2 = Instant::now();
    stats::record(&mut steps.create, t2 - t1);

    let mut parameters = serde_json::Map::new();
    parameters.insert(opts.parameter.clone(), serial.into());
    let registered = fleet_provisioning::register_thing(
        &mut session,
        &opts.template,
        &created.ownership_token,
        &parameters,
    )
    .await?;
    session.disconnect().await;
    let t3 = Instant::now();
    stats::record(&mut steps.register, t3 - t2);

    let own =
        fleetcert_mqtt_client::identity(roots, created.certificate_pem.as_bytes(), private_key)?;
    Client::connect(
        broker.addr,
        broker.server_name.clone(),
        &own,
        &registered.thing_name,
        opts.keep_alive,
    )
    .await?
    .disconnect()
    .await;
    stats::record(&mut steps.reconnect, t3.elapsed());
    Ok(registered.thing_name)
}

#[derive(Default)]
struct ClaimShared {
    next: AtomicUsize,
    ok: AtomicU64,
    failed: AtomicU64,
}

struct ClaimTally {
    latency: Histogram<u64>,
    steps: Steps,
    errors: BTreeMap<&'static str, u64>,
    rejected: BTreeMap<String, u64>,
    samples: Vec<String>,
    first_thing: Option<(usize, String)>,
}

fn new_steps() -> Steps {
    Steps {
        claim: stats::new_histogram(),
        create: stats::new_histogram(),
        register: stats::new_histogram(),
        reconnect: stats::new_histogram(),
    }
}

/// Provisions `opts.devices` devices with the claim `claim` (a TLS client configuration
/// holding the claim certificate and key) and reports.
pub async fn claim(
    broker: Arc<Broker>,
    claim: tokio_rustls::TlsConnector,
    roots: rustls::RootCertStore,
    opts: ClaimOptions,
) -> Result<ClaimReport> {
    if opts.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if opts.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let serials: Vec<String> = (0..opts.devices)
        .map(|i| format!("{}{i:07}", opts.serial_prefix))
        .collect();
    let prepare = std::time::Instant::now();
    let keys: Vec<DeviceKey> = match opts.api {
        ClaimApi::Csr => {
            if opts.progress {
                eprintln!("mqtt claim: making {} device keys and CSRs", opts.devices);
            }
            serials
                .par_iter()
                .map(|s| device_key(s))
                .collect::<Result<_>>()?
        }
        ClaimApi::Keys => Vec::new(),
    };
    let prepare_seconds = prepare.elapsed().as_secs_f64();
    let keys = Arc::new(keys);
    let serials = Arc::new(serials);
    let roots = Arc::new(roots);
    let opts = Arc::new(opts);
    let shared = Arc::new(ClaimShared::default());
    let start = Instant::now();
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        let opts = opts.clone();
        spawn_progress("claim", start, move || {
            let ok = shared.ok.load(Ordering::Relaxed);
            let failed = shared.failed.load(Ordering::Relaxed);
            let started = (shared.next.load(Ordering::Relaxed) as u64).min(opts.devices as u64);
            (ok, failed, started)
        })
    });
    let workers: Vec<_> = (0..opts.concurrency.min(opts.devices))
        .map(|_| {
            let (broker, claim, roots, opts, shared, keys, serials) = (
                broker.clone(),
                claim.clone(),
                roots.clone(),
                opts.clone(),
                shared.clone(),
                keys.clone(),
                serials.clone(),
            );
            tokio::spawn(async move {
                let mut tally = ClaimTally {
                    latency: stats::new_histogram(),
                    steps: new_steps(),
                    errors: BTreeMap::new(),
                    rejected: BTreeMap::new(),
                    samples: Vec::new(),
                    first_thing: None,
                };
                loop {
                    let index = shared.next.fetch_add(1, Ordering::Relaxed);
                    if index >= opts.devices {
                        break;
                    }
                    let begin = Instant::now();
                    let flow = provision_one(
                        &broker,
                        &claim,
                        &roots,
                        &opts,
                        serials[index].clone(),
                        keys.get(index),
                        &mut tally.steps,
                    );
                    let outcome = tokio::time::timeout(opts.timeout, flow)
                        .await
                        .map_err(|_| None)
                        .and_then(|done| done.map_err(Some));
                    match outcome {
                        Ok(thing) => {
                            stats::record(&mut tally.latency, begin.elapsed());
                            shared.ok.fetch_add(1, Ordering::Relaxed);
                            if tally.first_thing.as_ref().is_none_or(|(i, _)| index < *i) {
                                tally.first_thing = Some((index, thing));
                            }
                        }
                        Err(failure) => {
                            shared.failed.fetch_add(1, Ordering::Relaxed);
                            let (kind, message) = match failure {
                                None => (
                                    MqttError::Timeout.as_str(),
                                    format!("not provisioned within {:?}", opts.timeout),
                                ),
                                Some(e) => {
                                    if let ClientError::Rejected { code, .. } = &e {
                                        *tally.rejected.entry(code.clone()).or_default() += 1;
                                    }
                                    (failure_kind(&e), e.to_string())
                                }
                            };
                            *tally.errors.entry(kind).or_default() += 1;
                            add_sample(&mut tally.samples, format!("{kind}: {message}"));
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut latency = stats::new_histogram();
    let mut steps = new_steps();
    let mut errors: BTreeMap<&'static str, u64> = MqttError::ALL
        .iter()
        .map(|k| (k.as_str(), 0))
        .chain([("rejected", 0)])
        .collect();
    let mut rejected_codes = BTreeMap::new();
    let mut error_samples = Vec::new();
    let mut first_thing: Option<(usize, String)> = None;
    for w in workers {
        let tally = w.await.context("a device task panicked")?;
        let add = |into: &mut Histogram<u64>, from: &Histogram<u64>| {
            into.add(from).expect("histograms of the same bounds")
        };
        add(&mut latency, &tally.latency);
        add(&mut steps.claim, &tally.steps.claim);
        add(&mut steps.create, &tally.steps.create);
        add(&mut steps.register, &tally.steps.register);
        add(&mut steps.reconnect, &tally.steps.reconnect);
        for (kind, n) in tally.errors {
            *errors.entry(kind).or_default() += n;
        }
        for (code, n) in tally.rejected {
            *rejected_codes.entry(code).or_default() += n;
        }
        for s in tally.samples {
            add_sample(&mut error_samples, s);
        }
        if let Some((i, thing)) = tally.first_thing
            && first_thing.as_ref().is_none_or(|(j, _)| i < *j)
        {
            first_thing = Some((i, thing));
        }
    }
    let duration_seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let provisioned = shared.ok.load(Ordering::Relaxed);
    Ok(ClaimReport {
        mode: "claim",
        broker: broker.addr.to_string(),
        api: opts.api,
        template: opts.template.clone(),
        devices: opts.devices,
        concurrency: opts.concurrency,
        prepare_seconds,
        provisioned,
        failed: shared.failed.load(Ordering::Relaxed),
        errors,
        rejected_codes,
        duration_seconds,
        devices_per_second: per_second(provisioned, duration_seconds),
        latency_ms: stats::summarize(&latency),
        steps_ms: BTreeMap::from([
            ("1_claim_connect", stats::summarize(&steps.claim)),
            ("2_create", stats::summarize(&steps.create)),
            ("3_register_thing", stats::summarize(&steps.register)),
            ("4_reconnect", stats::summarize(&steps.reconnect)),
        ]),
        sample_thing: first_thing.map(|(_, t)| t),
        error_samples,
    })
}

/// The claim's TLS client configuration from its certificate and key files.
pub fn claim_connector(
    roots: &rustls::RootCertStore,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsConnector> {
    let files = crate::certs::DeviceFiles {
        name: "claim".into(),
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    crate::certs::client_config(roots, &files)
        .map(tokio_rustls::TlsConnector::from)
        .map_err(|e| anyhow!("the claim certificate: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_are_pkcs8_p256_with_a_csr_naming_the_serial() {
        let k = device_key("bench-0000001").unwrap();
        assert!(k.csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(k.csr_pem.as_bytes())
                .unwrap();
        let der = der.as_ref();
        assert!(der.windows(13).any(|w| w == b"bench-0000001"), "no CN");
        let pair = rcgen::KeyPair::try_from(k.pkcs8.as_slice()).unwrap();
        assert!(pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
    }
}
