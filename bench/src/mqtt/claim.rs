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
use super::{
    Broker, Device, Failure, MqttError, Session, add_sample, io_failure, per_second, spawn_progress,
};
use crate::stats::{self, LatencyMs};
use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use rayon::prelude::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
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
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate a P-256 key")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, serial);
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .with_context(|| format!("cannot build the CSR for {serial}"))?;
    Ok(DeviceKey {
        csr_pem,
        pkcs8: key.serialize_der(),
    })
}

/// The MQTT topics of one device's calls.
struct Topics {
    create: String,
    register: String,
}

impl Topics {
    fn new(api: ClaimApi, template: &str) -> Topics {
        let create = match api {
            ClaimApi::Csr => "$aws/certificates/create-from-csr/json",
            ClaimApi::Keys => "$aws/certificates/create/json",
        };
        Topics {
            create: create.to_owned(),
            register: format!("$aws/provisioning-templates/{template}/provision/json"),
        }
    }
}

/// Why one device failed: a connection failure, or a rejected reply.
enum StepFailure {
    Mqtt(Failure),
    Rejected { code: String, message: String },
}

impl From<Failure> for StepFailure {
    fn from(f: Failure) -> Self {
        StepFailure::Mqtt(f)
    }
}

/// Sends `payload` (QoS 1) on `topic` and waits for the reply on `topic/accepted` or
/// `topic/rejected` (acknowledging it: the plugin delivers replies at QoS 1).
async fn call(
    session: &mut Session,
    packet_id: u16,
    topic: &str,
    payload: &serde_json::Value,
) -> std::result::Result<serde_json::Value, StepFailure> {
    let body = serde_json::to_vec(payload).expect("JSON serialises");
    session
        .send(&super::codec::publish(topic, Some(packet_id), &body))
        .await
        .map_err(|e| io_failure(&e))?;
    let accepted = format!("{topic}/accepted");
    let rejected = format!("{topic}/rejected");
    loop {
        match session.next_packet().await? {
            Some(super::codec::Packet::Publish {
                qos,
                packet_id: id,
                topic: got,
                payload,
            }) => {
                if let (1, Some(id)) = (qos, id) {
                    session
                        .send(&super::codec::puback(id))
                        .await
                        .map_err(|e| io_failure(&e))?;
                }
                let json = || {
                    serde_json::from_slice::<serde_json::Value>(&payload).map_err(|e| {
                        StepFailure::Mqtt((
                            MqttError::Protocol,
                            format!("the reply on {got} is not JSON: {e}"),
                        ))
                    })
                };
                if got == accepted {
                    return json();
                }
                if got == rejected {
                    let reply = json()?;
                    return Err(StepFailure::Rejected {
                        code: reply["errorCode"].as_str().unwrap_or("(none)").to_owned(),
                        message: reply["errorMessage"].as_str().unwrap_or("").to_owned(),
                    });
                }
            }
            Some(_) => {}
            None => {
                return Err(StepFailure::Mqtt((
                    MqttError::Closed,
                    format!("the broker closed the session waiting for {accepted}"),
                )));
            }
        }
    }
}

fn field<'a>(
    reply: &'a serde_json::Value,
    name: &str,
) -> std::result::Result<&'a str, StepFailure> {
    reply[name].as_str().ok_or_else(|| {
        StepFailure::Mqtt((
            MqttError::Protocol,
            format!("the accepted reply has no {name}"),
        ))
    })
}

/// The TLS client configuration of a freshly provisioned device.
fn own_identity(
    roots: &rustls::RootCertStore,
    certificate_pem: &str,
    key: PrivateKeyDer<'static>,
) -> std::result::Result<tokio_rustls::TlsConnector, StepFailure> {
    let protocol = |m: String| StepFailure::Mqtt((MqttError::Protocol, m));
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(certificate_pem.as_bytes())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| protocol(format!("certificatePem: {e}")))?;
    if chain.is_empty() {
        return Err(protocol("certificatePem holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| protocol(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .map_err(|e| protocol(format!("the new certificate and key do not fit: {e}")))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config).into())
}

struct Steps {
    claim: Histogram<u64>,
    create: Histogram<u64>,
    register: Histogram<u64>,
    reconnect: Histogram<u64>,
}

/// One device's whole flow; the thing name on success.
#[allow(clippy::too_many_arguments)]
async fn provision_one(
    broker: &Broker,
    claim: &tokio_rustls::TlsConnector,
    roots: &rustls::RootCertStore,
    opts: &ClaimOptions,
    topics: &Topics,
    serial: String,
    key: Option<&DeviceKey>,
    steps: &mut Steps,
) -> std::result::Result<String, StepFailure> {
    let t0 = Instant::now();
    let claim_device = Device {
        name: serial.clone(),
        tls: claim.clone(),
    };
    let mut code = None;
    let (mut session, _) = Session::open(broker, &claim_device, opts.keep_alive, &mut code).await?;
    let filters: Vec<String> = [&topics.create, &topics.register]
        .iter()
        .flat_map(|t| [format!("{t}/accepted"), format!("{t}/rejected")])
        .collect();
    let filters: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 1)).collect();
    session
        .send(&super::codec::subscribe_many(1, &filters))
        .await
        .map_err(|e| io_failure(&e))?;
    match session.next_packet().await? {
        Some(super::codec::Packet::SubAck { codes, .. }) if codes.iter().all(|c| *c <= 2) => {}
        other => {
            return Err(StepFailure::Mqtt((
                MqttError::Refused,
                format!("the claim's subscriptions were not granted: {other:?}"),
            )));
        }
    }
    let t1 = Instant::now();
    stats::record(&mut steps.claim, t1 - t0);

    let request = match key {
        Some(k) => serde_json::json!({ "certificateSigningRequest": k.csr_pem }),
        None => serde_json::json!({}),
    };
    let created = call(&mut session, 2, &topics.create, &request).await?;
    let certificate_pem = field(&created, "certificatePem")?.to_owned();
    let token = field(&created, "certificateOwnershipToken")?.to_owned();
    let private_key: PrivateKeyDer<'static> = match key {
        Some(k) => PrivatePkcs8KeyDer::from(k.pkcs8.clone()).into(),
        None => PrivateKeyDer::from_pem_slice(field(&created, "privateKey")?.as_bytes())
            .map_err(|e| StepFailure::Mqtt((MqttError::Protocol, format!("privateKey: {e}"))))?,
    };
    let t2 = Instant::now();
    stats::record(&mut steps.create, t2 - t1);

    let mut parameters = serde_json::Map::new();
    parameters.insert(opts.parameter.clone(), serial.into());
    let registered = call(
        &mut session,
        3,
        &topics.register,
        &serde_json::json!({ "certificateOwnershipToken": token, "parameters": parameters }),
    )
    .await?;
    let thing = field(&registered, "thingName")?.to_owned();
    session.close().await;
    let t3 = Instant::now();
    stats::record(&mut steps.register, t3 - t2);

    let device = Device {
        name: thing.clone(),
        tls: own_identity(roots, &certificate_pem, private_key)?,
    };
    let mut code = None;
    let (session, _) = Session::open(broker, &device, opts.keep_alive, &mut code).await?;
    session.close().await;
    stats::record(&mut steps.reconnect, t3.elapsed());
    Ok(thing)
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
    let topics = Arc::new(Topics::new(opts.api, &opts.template));
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
            let (broker, claim, roots, opts, topics, shared, keys, serials) = (
                broker.clone(),
                claim.clone(),
                roots.clone(),
                opts.clone(),
                topics.clone(),
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
                        &topics,
                        serials[index].clone(),
                        keys.get(index),
                        &mut tally.steps,
                    );
                    let outcome = tokio::time::timeout(opts.timeout, flow)
                        .await
                        .unwrap_or_else(|_| {
                            Err(StepFailure::Mqtt((
                                MqttError::Timeout,
                                format!("not provisioned within {:?}", opts.timeout),
                            )))
                        });
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
                                StepFailure::Mqtt((kind, message)) => (kind.as_str(), message),
                                StepFailure::Rejected { code, message } => {
                                    *tally.rejected.entry(code.clone()).or_default() += 1;
                                    ("rejected", format!("{code}: {message}"))
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

    #[test]
    fn topics_follow_aws() {
        let t = Topics::new(ClaimApi::Csr, "sensors");
        assert_eq!(t.create, "$aws/certificates/create-from-csr/json");
        assert_eq!(
            t.register,
            "$aws/provisioning-templates/sensors/provision/json"
        );
        let t = Topics::new(ClaimApi::Keys, "sensors");
        assert_eq!(t.create, "$aws/certificates/create/json");
    }
}
