//! An MQTT 3.1.1 load generator over mutual TLS, for a broker that authenticates devices by
//! their client certificates (mosquitto with or without the fleetcert plugin). Each device
//! connects with its own certificate from a directory of `<name>.crt` + `<name>.key` and
//! its name as the client id (the fleet's policies require client id = thing name).
//!
//! Three modes, each printing one JSON document:
//! - `connect`: a new TCP connection, full TLS handshake (no resumption), CONNECT and
//!   CONNACK per device, then DISCONNECT and close; CONNACKs per second and latency (TCP
//!   connect to CONNACK). `--new-devices` uses each device at most once (first connects:
//!   JITP registration behind the fleetcert plugin); `--rate` paces connects open loop.
//! - `publish`: N devices connect, then each publishes QoS 1 messages to its own topic
//!   (`devices/<name>/telemetry` by default, what the default template allows) with a
//!   window of messages in flight, or at a fixed total rate; PUBACKs per second and
//!   PUBLISH → PUBACK latency. Optionally new devices onboard (first connects) at a fixed
//!   rate in the background during the measurement.
//! - `hold`: N devices connected at once for a while (for the broker's memory), with a
//!   file written once all are connected so a script can read the broker's RSS then.
//!
//! The MQTT packets are encoded and decoded by hand ([`codec`]); TLS is rustls with the
//! ring provider, as for the other tools of this crate.
pub mod claim;
pub use fleetcert_mqtt_client::codec;

use crate::certs;
use crate::jitp::{describe, describe_session, is_tls_error};
use crate::stats::{self, LatencyMs};
use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use codec::Packet;
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// The broker: where it listens and the name its certificate is checked against.
#[derive(Debug, Clone)]
pub struct Broker {
    /// The MQTT over TLS listener.
    pub addr: SocketAddr,
    /// TLS server name (SNI and certificate check).
    pub server_name: ServerName<'static>,
}

impl Broker {
    /// Resolves `HOST:PORT`; the server name is `server_name` or else HOST.
    pub async fn resolve(host_port: &str, server_name: Option<&str>) -> Result<Broker> {
        let (host, port) = host_port
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("--broker must be HOST:PORT, got {host_port:?}"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| anyhow!("--broker {host_port:?}: bad port"))?;
        let host = host.trim_matches(['[', ']']);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .ok_or_else(|| anyhow!("{host} has no address"))?;
        let name = server_name.unwrap_or(host).to_owned();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| anyhow!("server name {name:?}: {e}"))?;
        Ok(Broker { addr, server_name })
    }
}

/// One device: its name (the MQTT client id) and its TLS client configuration.
#[derive(Clone)]
pub struct Device {
    /// Client id and thing name.
    pub name: String,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).finish()
    }
}

/// Loads the first `limit` devices (all if `None`) of `dir`, sorted by name, each with
/// its client configuration built up front.
pub fn load_devices(dir: &Path, ca: &Path, limit: Option<usize>) -> Result<Vec<Device>> {
    let roots = certs::read_roots(ca)?;
    let mut files = certs::list_devices(dir)?;
    if let Some(limit) = limit {
        if files.len() < limit {
            bail!(
                "{} holds {} devices, {limit} are needed",
                dir.display(),
                files.len()
            );
        }
        files.truncate(limit);
    }
    files
        .iter()
        .map(|d| {
            Ok(Device {
                name: d.name.clone(),
                tls: certs::client_config(&roots, d)?.into(),
            })
        })
        .collect()
}

/// Why a device did not get as far as it should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MqttError {
    /// TCP connect failed.
    Connect,
    /// TLS handshake failed, or a TLS alert came later (TLS 1.3 servers check the client
    /// certificate after the client has finished its side of the handshake).
    Tls,
    /// The broker closed the connection (before CONNACK: what mosquitto does when a
    /// plugin fails a CONNECT other than "not authorized"), or it broke.
    Closed,
    /// CONNACK with a non-zero return code (5: not authorized).
    Refused,
    /// Bytes that are not the MQTT expected.
    Protocol,
    /// No CONNACK within the time limit.
    Timeout,
}

impl MqttError {
    /// Every kind, in the order reports list them.
    pub const ALL: [MqttError; 6] = [
        MqttError::Connect,
        MqttError::Tls,
        MqttError::Closed,
        MqttError::Refused,
        MqttError::Protocol,
        MqttError::Timeout,
    ];

    /// The key in reports' `errors` maps.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttError::Connect => "connect",
            MqttError::Tls => "tls",
            MqttError::Closed => "closed",
            MqttError::Refused => "refused",
            MqttError::Protocol => "protocol",
            MqttError::Timeout => "timeout",
        }
    }
}

type Failure = (MqttError, String);

fn io_failure(e: &std::io::Error) -> Failure {
    let kind = if is_tls_error(e) {
        MqttError::Tls
    } else {
        MqttError::Closed
    };
    (kind, describe(e))
}

/// An MQTT session over TLS, after its CONNACK.
struct Session {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

/// The CONNACK code mosquitto (and MQTT 3.1.1) uses for "accepted".
const ACCEPTED: u8 = 0;

impl Session {
    /// TCP connect, TLS handshake, CONNECT, CONNACK. On a refusal, the CONNACK code is
    /// returned in the failure message (`CONNACK 5`) and in `code`.
    async fn open(
        broker: &Broker,
        device: &Device,
        keep_alive: u16,
        code: &mut Option<u8>,
    ) -> std::result::Result<(Session, String), Failure> {
        let tcp = TcpStream::connect(broker.addr)
            .await
            .map_err(|e| (MqttError::Connect, describe(&e)))?;
        let _ = tcp.set_nodelay(true);
        let stream = device
            .tls
            .connect(broker.server_name.clone(), tcp)
            .await
            .map_err(|e| (MqttError::Tls, describe(&e)))?;
        let tls = describe_session(stream.get_ref().1);
        let mut session = Session {
            stream,
            buf: BytesMut::with_capacity(4096),
        };
        session
            .send(&codec::connect(&device.name, keep_alive, true))
            .await
            .map_err(|e| io_failure(&e))?;
        match session.next_packet().await? {
            Some(Packet::ConnAck { code: c, .. }) => {
                *code = Some(c);
                if c == ACCEPTED {
                    Ok((session, tls))
                } else {
                    Err((MqttError::Refused, format!("CONNACK {c}")))
                }
            }
            Some(other) => Err((
                MqttError::Protocol,
                format!("expected CONNACK, got {other:?}"),
            )),
            None => Err((MqttError::Closed, "connection closed before CONNACK".into())),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// A whole packet already read, if any.
    fn try_decode(&mut self) -> std::result::Result<Option<Packet>, Failure> {
        match codec::decode(&self.buf) {
            Ok(Some((packet, used))) => {
                self.buf.advance(used);
                Ok(Some(packet))
            }
            Ok(None) => Ok(None),
            Err(e) => Err((MqttError::Protocol, e.to_string())),
        }
    }

    /// Reads more bytes; `Ok(false)` at the end of the stream.
    async fn fill(&mut self) -> std::result::Result<bool, Failure> {
        self.buf.reserve(4096);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(io_failure(&e)),
        }
    }

    /// The next packet; `None` at a clean end of the stream.
    async fn next_packet(&mut self) -> std::result::Result<Option<Packet>, Failure> {
        loop {
            if let Some(packet) = self.try_decode()? {
                return Ok(Some(packet));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// DISCONNECT, then TLS close_notify and the TCP close; errors ignored.
    async fn close(mut self) {
        let _ = self.send(&codec::disconnect()).await;
        let _ = self.stream.shutdown().await;
    }
}

const MAX_SAMPLES: usize = 8;

fn add_sample(samples: &mut Vec<String>, sample: String) {
    if samples.len() < MAX_SAMPLES && !samples.contains(&sample) {
        samples.push(sample);
    }
}

fn error_map(counts: &BTreeMap<MqttError, u64>) -> BTreeMap<&'static str, u64> {
    let mut map: BTreeMap<&'static str, u64> =
        MqttError::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    for (kind, n) in counts {
        *map.entry(kind.as_str()).or_default() += n;
    }
    map
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

// --- connect ---------------------------------------------------------------------------

/// How `connect` (and the onboarding of `publish`) drives CONNECTs.
#[derive(Debug, Clone)]
pub struct ConnectLoad {
    /// Connects in flight at once (one task each).
    pub concurrency: usize,
    /// Connects started per second, evenly spaced (open loop); `None`: as fast as the
    /// tasks go.
    pub rate: Option<f64>,
    /// Each device at most once; stop when they run out.
    pub new_devices: bool,
    /// Limit for one connect (TCP connect to CONNACK).
    pub timeout: Duration,
    /// Keep-alive announced in CONNECT, seconds.
    pub keep_alive: u16,
}

/// The JSON document of `fleetcert-bench mqtt connect` (and the `onboarding` part of
/// `publish`).
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// `connect`.
    pub mode: &'static str,
    /// The broker's address.
    pub broker: String,
    /// Each device was used at most once (`--new-devices`).
    pub new_devices: bool,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Target connect rate, if paced.
    pub rate: Option<f64>,
    /// Device certificate + key pairs loaded.
    pub devices_loaded: usize,
    /// Distinct devices that connected (or tried).
    pub devices_used: usize,
    /// `--new-devices` only: the run stopped because every device had been used.
    pub devices_exhausted: bool,
    /// Connects started, whatever their outcome.
    pub attempts: u64,
    /// CONNACKs with return code 0.
    pub ok: u64,
    /// Failed connects by kind (every kind listed).
    pub errors: BTreeMap<&'static str, u64>,
    /// Sum of `errors`.
    pub errors_total: u64,
    /// CONNACK return codes received (0 accepted, 5 not authorized, ...).
    pub connack_codes: BTreeMap<u8, u64>,
    /// Accepted connects by negotiated TLS version, cipher suite, group and handshake kind.
    pub tls_sessions: BTreeMap<String, u64>,
    /// From the start of the load to the end of the last connect.
    pub duration_seconds: f64,
    /// `ok` per second of `duration_seconds`.
    pub connects_per_second: f64,
    /// Latency of accepted connects, TCP connect to CONNACK (when paced: from the
    /// scheduled start, so a generator falling behind shows as latency).
    pub latency_ms: LatencyMs,
    /// A few distinct error messages.
    pub error_samples: Vec<String>,
}

#[derive(Default)]
struct ConnectShared {
    next_device: AtomicUsize,
    next_ticket: AtomicU64,
    attempts: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    exhausted: AtomicBool,
}

struct ConnectTally {
    latency: Histogram<u64>,
    errors: BTreeMap<MqttError, u64>,
    codes: BTreeMap<u8, u64>,
    sessions: BTreeMap<String, u64>,
    samples: Vec<String>,
}

async fn connect_worker(
    broker: Arc<Broker>,
    devices: Arc<Vec<Device>>,
    load: Arc<ConnectLoad>,
    shared: Arc<ConnectShared>,
    start: Instant,
    deadline: Instant,
) -> ConnectTally {
    let mut tally = ConnectTally {
        latency: stats::new_histogram(),
        errors: BTreeMap::new(),
        codes: BTreeMap::new(),
        sessions: BTreeMap::new(),
        samples: Vec::new(),
    };
    loop {
        let begin = match load.rate {
            Some(rate) => {
                let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
                let at = start + Duration::from_secs_f64(ticket as f64 / rate);
                if at >= deadline {
                    break;
                }
                tokio::time::sleep_until(at).await;
                at
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        let index = shared.next_device.fetch_add(1, Ordering::Relaxed);
        let device = if load.new_devices {
            if index >= devices.len() {
                shared.exhausted.store(true, Ordering::Relaxed);
                break;
            }
            &devices[index]
        } else {
            &devices[index % devices.len()]
        };
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        let mut code = None;
        let outcome = tokio::time::timeout(
            load.timeout,
            Session::open(&broker, device, load.keep_alive, &mut code),
        )
        .await
        .unwrap_or_else(|_| {
            Err((
                MqttError::Timeout,
                format!("no CONNACK within {:?}", load.timeout),
            ))
        });
        if let Some(code) = code {
            *tally.codes.entry(code).or_default() += 1;
        }
        match outcome {
            Ok((session, tls)) => {
                stats::record(&mut tally.latency, begin.elapsed());
                shared.ok.fetch_add(1, Ordering::Relaxed);
                *tally.sessions.entry(tls).or_default() += 1;
                session.close().await;
            }
            Err((kind, message)) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                *tally.errors.entry(kind).or_default() += 1;
                add_sample(&mut tally.samples, format!("{}: {message}", kind.as_str()));
            }
        }
    }
    tally
}

fn spawn_progress(
    label: &'static str,
    start: Instant,
    read: impl Fn() -> (u64, u64, u64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        let mut last = 0;
        loop {
            tick.tick().await;
            let (ok, failed, started) = read();
            eprintln!(
                "mqtt {label}: {:>4.0}s  ok {ok:>8}  failed {failed:>6}  in flight {:>5}  {:>6} ok/s",
                start.elapsed().as_secs_f64(),
                started.saturating_sub(ok + failed),
                ok - last
            );
            last = ok;
        }
    })
}

/// Runs a connect load from `start` until `deadline` (or until new devices run out).
pub async fn connect_load(
    broker: Arc<Broker>,
    devices: Arc<Vec<Device>>,
    load: ConnectLoad,
    start: Instant,
    deadline: Instant,
    progress: Option<&'static str>,
) -> Result<ConnectReport> {
    if load.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    if let Some(rate) = load.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("rate must be a positive number of connects per second");
    }
    if devices.is_empty() {
        bail!("no devices");
    }
    let load = Arc::new(load);
    let shared = Arc::new(ConnectShared::default());
    tokio::time::sleep_until(start).await;
    let progress = progress.map(|label| {
        let shared = shared.clone();
        spawn_progress(label, start, move || {
            (
                shared.ok.load(Ordering::Relaxed),
                shared.failed.load(Ordering::Relaxed),
                shared.attempts.load(Ordering::Relaxed),
            )
        })
    });
    let workers: Vec<_> = (0..load.concurrency)
        .map(|_| {
            tokio::spawn(connect_worker(
                broker.clone(),
                devices.clone(),
                load.clone(),
                shared.clone(),
                start,
                deadline,
            ))
        })
        .collect();
    let mut latency = stats::new_histogram();
    let mut errors = BTreeMap::new();
    let mut connack_codes = BTreeMap::new();
    let mut tls_sessions = BTreeMap::new();
    let mut error_samples = Vec::new();
    for w in workers {
        let tally = w.await.context("a connect task panicked")?;
        latency
            .add(&tally.latency)
            .expect("histograms of the same bounds");
        for (kind, n) in tally.errors {
            *errors.entry(kind).or_default() += n;
        }
        for (code, n) in tally.codes {
            *connack_codes.entry(code).or_default() += n;
        }
        for (s, n) in tally.sessions {
            *tls_sessions.entry(s).or_default() += n;
        }
        for s in tally.samples {
            add_sample(&mut error_samples, s);
        }
    }
    let duration_seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let attempts = shared.attempts.load(Ordering::Relaxed);
    let ok = shared.ok.load(Ordering::Relaxed);
    let used = shared.next_device.load(Ordering::Relaxed);
    let errors = error_map(&errors);
    Ok(ConnectReport {
        mode: "connect",
        broker: broker.addr.to_string(),
        new_devices: load.new_devices,
        concurrency: load.concurrency,
        rate: load.rate,
        devices_loaded: devices.len(),
        devices_used: used.min(devices.len()),
        devices_exhausted: shared.exhausted.load(Ordering::Relaxed),
        attempts,
        ok,
        errors_total: errors.values().sum(),
        errors,
        connack_codes,
        tls_sessions,
        duration_seconds,
        connects_per_second: per_second(ok, duration_seconds),
        latency_ms: stats::summarize(&latency),
        error_samples,
    })
}

// --- publish ---------------------------------------------------------------------------

/// How `publish` paces each device.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Closed loop: each device keeps this many messages awaiting PUBACK.
    Window(usize),
    /// Open loop: this many messages per second over all devices, each device's share
    /// evenly spaced and the devices staggered; latency counts from the scheduled send.
    Rate(f64),
}

/// What `publish` runs.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Devices that connect and publish (each its own session).
    pub devices: usize,
    /// Sessions being opened at a time before the measurement.
    pub connect_parallelism: usize,
    /// Closed or open loop.
    pub pace: Pace,
    /// Topic, with `{name}` replaced by the device name.
    pub topic: String,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Each device subscribes (QoS 0) to its own topic, so every message is also
    /// delivered back (the broker's delivery path, and the plugin's `iot:Receive` check).
    pub echo: bool,
    /// Publishing before the measurement starts (not counted).
    pub warmup: Duration,
    /// The measurement.
    pub duration: Duration,
    /// After the measurement, how long to wait for outstanding PUBACKs.
    pub drain: Duration,
    /// Background first connects during the measurement: devices and rate.
    pub onboard: Option<(Vec<Device>, f64)>,
    /// Connects in flight at once for the onboarding.
    pub onboard_concurrency: usize,
    /// Limit for one connect.
    pub timeout: Duration,
    /// Keep-alive announced in CONNECT, seconds.
    pub keep_alive: u16,
    /// One progress line per second on stderr.
    pub progress: bool,
    /// The broker's process, whose CPU time over the measurement is reported.
    pub broker_pid: Option<u32>,
}

/// The JSON document of `fleetcert-bench mqtt publish`.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// `publish`.
    pub mode: &'static str,
    /// The broker's address.
    pub broker: String,
    /// Devices asked to connect and publish.
    pub devices: usize,
    /// Sessions established before the measurement.
    pub connected: u64,
    /// Sessions that failed to establish, by kind.
    pub connect_errors: BTreeMap<&'static str, u64>,
    /// Seconds the sessions took to establish.
    pub connect_seconds: f64,
    /// Messages awaiting PUBACK per device (closed loop), if so paced.
    pub window: Option<usize>,
    /// Total messages per second asked for (open loop), if so paced.
    pub rate: Option<f64>,
    /// Topic pattern (`{name}` is the device).
    pub topic: String,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// Devices subscribed to their own topics (`--echo`).
    pub echo: bool,
    /// Warm-up before the measurement, seconds.
    pub warmup_seconds: f64,
    /// The measurement, seconds.
    pub measure_seconds: f64,
    /// QoS 1 messages sent during the measurement.
    pub published: u64,
    /// Of those, acknowledged (PUBACK).
    pub acked: u64,
    /// `acked` per second of the measurement.
    pub acks_per_second: f64,
    /// PUBLISH written (scheduled, when paced) → PUBACK read.
    pub latency_ms: LatencyMs,
    /// Messages delivered back to the devices (`--echo`), during the whole run.
    pub delivered: u64,
    /// Messages of the measurement still without PUBACK when the drain ended.
    pub unacked_at_end: u64,
    /// Sessions lost during the run (closed by the broker or broken).
    pub lost_sessions: u64,
    /// Background onboarding during the measurement, if asked for.
    pub onboarding: Option<ConnectReport>,
    /// CPU seconds the broker process (`--broker-pid`, all its threads) used during the
    /// measurement: what each message costs the broker, whoever limits the rate.
    pub broker_cpu_seconds: Option<f64>,
    /// `broker_cpu_seconds` per acknowledged message, microseconds.
    pub broker_cpu_us_per_message: Option<f64>,
    /// A few distinct error messages.
    pub error_samples: Vec<String>,
}

struct PublishPlan {
    pace: Pace,
    per_device_interval: Option<Duration>,
    payload: Vec<u8>,
    echo: bool,
    start: Instant,
    measure_start: Instant,
    deadline: Instant,
    drain_until: Instant,
}

#[derive(Default)]
struct PublishShared {
    published: AtomicU64,
    acked: AtomicU64,
}

struct PublishTally {
    latency: Histogram<u64>,
    delivered: u64,
    unacked_at_end: u64,
    lost: Option<String>,
}

fn next_packet_id(next: &mut u16, inflight: &HashMap<u16, Instant>) -> Option<u16> {
    for _ in 0..u16::MAX {
        let id = *next;
        *next = if *next == u16::MAX { 1 } else { *next + 1 };
        if !inflight.contains_key(&id) {
            return Some(id);
        }
    }
    None
}

async fn publish_session(
    mut session: Session,
    topic: String,
    slot: usize,
    devices: usize,
    plan: Arc<PublishPlan>,
    shared: Arc<PublishShared>,
) -> PublishTally {
    let mut tally = PublishTally {
        latency: stats::new_histogram(),
        delivered: 0,
        unacked_at_end: 0,
        lost: None,
    };
    let counted = |at: Instant| at >= plan.measure_start && at < plan.deadline;
    if plan.echo {
        let result = async {
            session
                .send(&codec::subscribe(1, &topic, 0))
                .await
                .map_err(|e| io_failure(&e))?;
            match session.next_packet().await? {
                Some(Packet::SubAck { codes, .. }) if codes.first().is_some_and(|c| *c <= 2) => {
                    Ok(())
                }
                other => Err((
                    MqttError::Protocol,
                    format!("subscription to {topic} not granted: {other:?}"),
                )),
            }
        }
        .await;
        if let Err((kind, message)) = result {
            tally.lost = Some(format!("{}: {message}", kind.as_str()));
            return tally;
        }
    }
    let mut inflight: HashMap<u16, Instant> = HashMap::new();
    let mut next_id: u16 = 1;
    // Open loop: this device's sends are staggered over the first interval.
    let mut next_at = match plan.per_device_interval {
        Some(interval) => plan.start + interval.mul_f64(slot as f64 / devices as f64),
        None => plan.start,
    };
    let end = 'session: loop {
        loop {
            match session.try_decode() {
                Ok(Some(Packet::PubAck { packet_id })) => {
                    if let Some(sent) = inflight.remove(&packet_id)
                        && counted(sent)
                    {
                        stats::record(&mut tally.latency, sent.elapsed());
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Packet::Publish { qos, packet_id, .. })) => {
                    tally.delivered += 1;
                    if let (1, Some(id)) = (qos, packet_id)
                        && let Err(e) = session.send(&codec::puback(id)).await
                    {
                        break 'session Some(io_failure(&e));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(failure) => break 'session Some(failure),
            }
        }
        let now = Instant::now();
        let (sending, send_at) = match plan.pace {
            Pace::Window(window) => (now < plan.deadline && inflight.len() < window, now),
            Pace::Rate(_) => (next_at < plan.deadline, next_at),
        };
        if !sending && (inflight.is_empty() || now >= plan.drain_until) {
            break 'session None;
        }
        tokio::select! {
            biased;
            more = session.fill() => match more {
                Ok(true) => {}
                Ok(false) => break 'session Some((MqttError::Closed, "the broker closed the session".into())),
                Err(failure) => break 'session Some(failure),
            },
            _ = tokio::time::sleep_until(send_at), if sending => {
                let Some(id) = next_packet_id(&mut next_id, &inflight) else {
                    continue;
                };
                let stamp = match plan.pace {
                    Pace::Window(_) => Instant::now(),
                    Pace::Rate(_) => send_at,
                };
                if let Err(e) = session.send(&codec::publish(&topic, Some(id), &plan.payload)).await {
                    break 'session Some(io_failure(&e));
                }
                inflight.insert(id, stamp);
                if counted(stamp) {
                    shared.published.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(interval) = plan.per_device_interval {
                    next_at += interval;
                }
            }
            // Wake at the deadline (to stop sending) and at the end of the drain.
            _ = tokio::time::sleep_until(if now < plan.deadline { plan.deadline } else { plan.drain_until }) => {}
        }
    };
    tally.unacked_at_end = inflight.values().filter(|at| counted(**at)).count() as u64;
    match end {
        Some((kind, message)) => tally.lost = Some(format!("{}: {message}", kind.as_str())),
        None => session.close().await,
    }
    tally
}

/// Connects the devices, runs the publish load (and the onboarding, if any), reports.
pub async fn publish(
    broker: Arc<Broker>,
    devices: Vec<Device>,
    opts: PublishOptions,
) -> Result<PublishReport> {
    match opts.pace {
        Pace::Window(0) => bail!("the window must be at least 1"),
        Pace::Rate(r) if !(r.is_finite() && r > 0.0) => {
            bail!("rate must be a positive number of messages per second")
        }
        _ => {}
    }
    if devices.is_empty() {
        bail!("no devices");
    }
    if opts.duration.is_zero() {
        bail!("the measurement must last more than 0 s");
    }
    // Sessions first, a bounded number at a time.
    let connect_start = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(opts.connect_parallelism.max(1)));
    let opening: Vec<_> = devices
        .iter()
        .map(|device| {
            let (broker, device, semaphore) = (broker.clone(), device.clone(), semaphore.clone());
            let (timeout, keep_alive) = (opts.timeout, opts.keep_alive);
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let mut code = None;
                let result = tokio::time::timeout(
                    timeout,
                    Session::open(&broker, &device, keep_alive, &mut code),
                )
                .await
                .unwrap_or_else(|_| Err((MqttError::Timeout, "no CONNACK".into())));
                (device.name, result)
            })
        })
        .collect();
    let mut sessions = Vec::new();
    let mut connect_errors = BTreeMap::new();
    let mut error_samples = Vec::new();
    for task in opening {
        let (name, result) = task.await.context("a connect task panicked")?;
        match result {
            Ok((session, _)) => sessions.push((name, session)),
            Err((kind, message)) => {
                *connect_errors.entry(kind).or_default() += 1;
                add_sample(
                    &mut error_samples,
                    format!("connect {}: {message}", kind.as_str()),
                );
            }
        }
    }
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let connected = sessions.len() as u64;
    if opts.progress {
        eprintln!(
            "mqtt publish: {connected} of {} sessions open in {connect_seconds:.1}s",
            devices.len()
        );
    }
    if sessions.is_empty() {
        bail!("no session could be opened: {error_samples:?}");
    }

    let start = Instant::now() + Duration::from_millis(100);
    let measure_start = start + opts.warmup;
    let deadline = measure_start + opts.duration;
    let per_device_interval = match opts.pace {
        Pace::Rate(rate) => Some(Duration::from_secs_f64(sessions.len() as f64 / rate)),
        Pace::Window(_) => None,
    };
    let plan = Arc::new(PublishPlan {
        pace: opts.pace,
        per_device_interval,
        payload: vec![0x5a; opts.payload_bytes],
        echo: opts.echo,
        start,
        measure_start,
        deadline,
        drain_until: deadline + opts.drain,
    });
    let shared = Arc::new(PublishShared::default());
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        spawn_progress("publish", start, move || {
            let acked = shared.acked.load(Ordering::Relaxed);
            let published = shared.published.load(Ordering::Relaxed);
            (acked, 0, published)
        })
    });
    let count = sessions.len();
    let publishers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(slot, (name, session))| {
            let topic = opts.topic.replace("{name}", &name);
            tokio::spawn(publish_session(
                session,
                topic,
                slot,
                count,
                plan.clone(),
                shared.clone(),
            ))
        })
        .collect();
    let broker_cpu = opts.broker_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_start).await;
            let before = process_cpu_ns(pid)?;
            tokio::time::sleep_until(deadline).await;
            let after = process_cpu_ns(pid)?;
            Ok::<f64, std::io::Error>(after.saturating_sub(before) as f64 / 1e9)
        })
    });
    let onboarding = opts.onboard.map(|(devices, rate)| {
        let load = ConnectLoad {
            concurrency: opts.onboard_concurrency.max(1),
            rate: Some(rate),
            new_devices: true,
            timeout: opts.timeout,
            keep_alive: opts.keep_alive,
        };
        tokio::spawn(connect_load(
            broker.clone(),
            Arc::new(devices),
            load,
            measure_start,
            deadline,
            opts.progress.then_some("onboard"),
        ))
    });

    let mut latency = stats::new_histogram();
    let (mut delivered, mut unacked_at_end, mut lost_sessions) = (0, 0, 0);
    for p in publishers {
        let tally = p.await.context("a publish task panicked")?;
        latency
            .add(&tally.latency)
            .expect("histograms of the same bounds");
        delivered += tally.delivered;
        unacked_at_end += tally.unacked_at_end;
        if let Some(lost) = tally.lost {
            lost_sessions += 1;
            add_sample(&mut error_samples, format!("session lost: {lost}"));
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let onboarding = match onboarding {
        Some(task) => Some(task.await.context("the onboarding panicked")??),
        None => None,
    };
    let acked = shared.acked.load(Ordering::Relaxed);
    let measure_seconds = opts.duration.as_secs_f64();
    let broker_cpu_seconds = match broker_cpu {
        Some(task) => Some(
            task.await
                .context("the broker CPU reader panicked")?
                .with_context(|| {
                    format!(
                        "reading the CPU time of --broker-pid {}",
                        opts.broker_pid.unwrap_or_default()
                    )
                })?,
        ),
        None => None,
    };
    Ok(PublishReport {
        mode: "publish",
        broker: broker.addr.to_string(),
        devices: devices.len(),
        connected,
        connect_errors: error_map(&connect_errors),
        connect_seconds,
        window: match opts.pace {
            Pace::Window(w) => Some(w),
            Pace::Rate(_) => None,
        },
        rate: match opts.pace {
            Pace::Rate(r) => Some(r),
            Pace::Window(_) => None,
        },
        topic: opts.topic,
        payload_bytes: opts.payload_bytes,
        echo: opts.echo,
        warmup_seconds: opts.warmup.as_secs_f64(),
        measure_seconds,
        published: shared.published.load(Ordering::Relaxed),
        acked,
        acks_per_second: per_second(acked, measure_seconds),
        latency_ms: stats::summarize(&latency),
        delivered,
        unacked_at_end,
        lost_sessions,
        onboarding,
        broker_cpu_seconds,
        broker_cpu_us_per_message: broker_cpu_seconds
            .filter(|_| acked > 0)
            .map(|cpu| cpu * 1e6 / acked as f64),
        error_samples,
    })
}

/// CPU time of a process so far, all threads, nanoseconds (the first field of each
/// thread's `/proc/PID/task/TID/schedstat`).
fn process_cpu_ns(pid: u32) -> std::io::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread that ended since the listing has no file any more: it counts no longer.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| {
                std::io::Error::other(format!("unexpected {}: {text:?}", path.display()))
            })?;
        total += ns;
    }
    Ok(total)
}

// --- hold ------------------------------------------------------------------------------

/// What `hold` runs.
#[derive(Debug, Clone)]
pub struct HoldOptions {
    /// Sessions opened at a time during the ramp.
    pub parallelism: usize,
    /// How long to keep every session open after the last one was settled.
    pub hold: Duration,
    /// Written (empty) once every session is open, so a script can measure then.
    pub ready_file: Option<PathBuf>,
    /// Limit for one connect.
    pub timeout: Duration,
    /// Keep-alive announced in CONNECT, seconds; PINGREQ every half of it.
    pub keep_alive: u16,
    /// One progress line per second on stderr.
    pub progress: bool,
}

/// The JSON document of `fleetcert-bench mqtt hold`.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    /// `hold`.
    pub mode: &'static str,
    /// The broker's address.
    pub broker: String,
    /// Sessions asked for (one per device).
    pub connections: usize,
    /// Sessions opened at a time during the ramp.
    pub parallelism: usize,
    /// Sessions that got CONNACK 0.
    pub established: u64,
    /// Sessions that did not.
    pub failed: u64,
    /// `failed` by kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// The most sessions open at the same moment.
    pub max_open: u64,
    /// `max_open == connections`.
    pub all_open_at_once: bool,
    /// Seconds until every session was settled (open or failed).
    pub ramp_seconds: f64,
    /// The hold asked for, seconds.
    pub hold_seconds: f64,
    /// Sessions open when the hold ended.
    pub open_at_end: u64,
    /// Established sessions that ended before the hold did.
    pub closed_early: u64,
    /// The ready file was written (every session open at once).
    pub ready_file_written: bool,
    /// A few distinct error messages.
    pub error_samples: Vec<String>,
}

#[derive(Default)]
struct HoldShared {
    open: AtomicU64,
    max_open: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    closed_early: AtomicU64,
}

/// Opens one session per device, holds them all, closes them.
pub async fn hold(
    broker: Arc<Broker>,
    devices: Vec<Device>,
    opts: HoldOptions,
) -> Result<HoldReport> {
    if devices.is_empty() {
        bail!("no devices");
    }
    let start = Instant::now();
    let shared = Arc::new(HoldShared::default());
    let semaphore = Arc::new(tokio::sync::Semaphore::new(opts.parallelism.max(1)));
    let (release, released) = tokio::sync::watch::channel(false);
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        spawn_progress("hold", start, move || {
            let ok = shared.established.load(Ordering::Relaxed);
            let failed = shared.failed.load(Ordering::Relaxed);
            (ok, failed, ok + failed)
        })
    });
    let ping_every = Duration::from_secs(u64::from(opts.keep_alive.max(2)) / 2);
    let tasks: Vec<_> = devices
        .iter()
        .map(|device| {
            let (broker, device, semaphore) = (broker.clone(), device.clone(), semaphore.clone());
            let (shared, mut released) = (shared.clone(), released.clone());
            let (timeout, keep_alive) = (opts.timeout, opts.keep_alive);
            tokio::spawn(async move {
                let permit = semaphore.acquire_owned().await;
                let mut code = None;
                let opened =
                    tokio::time::timeout(timeout, Session::open(&broker, &device, keep_alive, &mut code))
                        .await
                        .unwrap_or_else(|_| Err((MqttError::Timeout, "no CONNACK".into())));
                drop(permit);
                let mut session = match opened {
                    Ok((session, _)) => session,
                    Err(failure) => {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        return Some(failure);
                    }
                };
                let open = shared.open.fetch_add(1, Ordering::Relaxed) + 1;
                shared.max_open.fetch_max(open, Ordering::Relaxed);
                shared.established.fetch_add(1, Ordering::Relaxed);
                let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
                let ended = loop {
                    tokio::select! {
                        _ = released.changed() => break None,
                        _ = ping.tick() => {
                            if let Err(e) = session.send(&codec::pingreq()).await {
                                break Some(io_failure(&e));
                            }
                        }
                        packet = session.next_packet() => match packet {
                            Ok(Some(_)) => {}
                            Ok(None) => break Some((MqttError::Closed, "the broker closed the session".into())),
                            Err(failure) => break Some(failure),
                        },
                    }
                };
                shared.open.fetch_sub(1, Ordering::Relaxed);
                match ended {
                    None => {
                        session.close().await;
                        None
                    }
                    Some(failure) => {
                        shared.closed_early.fetch_add(1, Ordering::Relaxed);
                        Some(failure)
                    }
                }
            })
        })
        .collect();
    // Wait for the ramp to settle.
    let total = devices.len() as u64;
    while shared.established.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < total
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ramp_seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let mut ready_file_written = false;
    if let Some(path) = &opts.ready_file
        && shared.open.load(Ordering::Relaxed) == total
    {
        std::fs::write(path, b"").with_context(|| format!("cannot write {}", path.display()))?;
        ready_file_written = true;
    }
    if opts.progress {
        eprintln!(
            "mqtt hold: {} of {total} sessions open after {ramp_seconds:.1}s; holding {:.0}s",
            shared.open.load(Ordering::Relaxed),
            opts.hold.as_secs_f64()
        );
    }
    tokio::time::sleep(opts.hold).await;
    let open_at_end = shared.open.load(Ordering::Relaxed);
    let _ = release.send(true);
    let mut errors = BTreeMap::new();
    let mut error_samples = Vec::new();
    for task in tasks {
        if let Some((kind, message)) = task.await.context("a hold task panicked")? {
            *errors.entry(kind).or_default() += 1;
            add_sample(&mut error_samples, format!("{}: {message}", kind.as_str()));
        }
    }
    let max_open = shared.max_open.load(Ordering::Relaxed);
    Ok(HoldReport {
        mode: "hold",
        broker: broker.addr.to_string(),
        connections: devices.len(),
        parallelism: opts.parallelism,
        established: shared.established.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        errors: error_map(&errors),
        max_open,
        all_open_at_once: max_open == total,
        ramp_seconds,
        hold_seconds: opts.hold.as_secs_f64(),
        open_at_end,
        closed_early: shared.closed_early.load(Ordering::Relaxed),
        ready_file_written,
        error_samples,
    })
}

// --- command line ----------------------------------------------------------------------

/// `fleetcert-bench mqtt`: the mode and its flags.
#[derive(Debug, clap::Args)]
pub struct MqttArgs {
    #[command(subcommand)]
    mode: MqttMode,
}

#[derive(Debug, clap::Subcommand)]
enum MqttMode {
    /// A new TCP connection, full TLS handshake and MQTT CONNECT per device, round-robin
    /// over --certs (or each device once with --new-devices); CONNACKs per second and
    /// latency (TCP connect to CONNACK). Each accepted session is ended with DISCONNECT.
    Connect(ConnectArgs),
    /// --devices sessions open at once, each publishing QoS 1 messages to its own topic;
    /// PUBACKs per second and PUBLISH → PUBACK latency over --duration seconds (after
    /// --warmup). With --onboard-certs, new devices connect for the first time at
    /// --onboard-rate per second during the measurement.
    Publish(PublishArgs),
    /// --devices sessions open at once for --seconds (for measuring the broker's memory);
    /// --ready-file is written once all are open.
    Hold(HoldArgs),
    /// Devices provisioned by claim, end to end, each once: claim CONNECT → CreateCertificateFromCsr
    /// (or CreateKeysAndCertificate) → RegisterThing → reconnect with the new certificate
    /// and client id = thing name (the AWS IoT Fleet Provisioning MQTT API, as device SDKs
    /// use it). Devices per second and latency per device and per step.
    Claim(ClaimArgs),
}

#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// The broker's MQTT over TLS listener, HOST:PORT.
    #[arg(long)]
    broker: String,
    /// Directory of <name>.crt + <name>.key pairs (chain.pem is skipped); <name> is the
    /// client id. Devices are taken in name order.
    #[arg(long)]
    certs: PathBuf,
    /// PEM trust anchor(s) for the broker's certificate (e.g. `fleetcert ca export`).
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name (SNI, certificate check); default: HOST of --broker.
    #[arg(long)]
    server_name: Option<String>,
    /// Limit for one connect, TCP connect to CONNACK, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Keep-alive announced in CONNECT, seconds (hold sends PINGREQ every half of it).
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Connects in flight at once. Keep it below the number of devices when they are
    /// reused: two live sessions with one client id make the broker drop the older.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Seconds during which connects start.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Use each device at most once (first connects); stop when they run out.
    #[arg(long)]
    new_devices: bool,
    /// Start connects at this many per second, evenly spaced (open loop); latency is then
    /// measured from each connect's scheduled start.
    #[arg(long)]
    rate: Option<f64>,
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Sessions (the first N devices of --certs), all open at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    devices: u32,
    /// Sessions being opened at a time before the measurement.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connect_parallelism: u32,
    /// Closed loop: messages awaiting PUBACK per session.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    window: u32,
    /// Open loop instead: this many messages per second over all sessions, evenly spaced;
    /// latency is then measured from each message's scheduled send.
    #[arg(long)]
    rate: Option<f64>,
    /// Topic each device publishes to; {name} is replaced by the device name.
    #[arg(long, default_value = "devices/{name}/telemetry")]
    topic: String,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Each device subscribes (QoS 0) to its own topic, so every message is delivered
    /// back to it too.
    #[arg(long)]
    echo: bool,
    /// Seconds of publishing before the measurement (not counted).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for outstanding PUBACKs after the measurement.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Devices for background first connects during the measurement (each at most once),
    /// a directory like --certs.
    #[arg(long)]
    onboard_certs: Option<PathBuf>,
    /// First connects per second from --onboard-certs, evenly spaced.
    #[arg(long, default_value_t = 100.0)]
    onboard_rate: f64,
    /// The broker's process id: its CPU time during the measurement (all threads, from
    /// /proc) is reported, and per acknowledged message.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Onboarding connects in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    onboard_concurrency: u32,
}

#[derive(Debug, clap::Args)]
struct HoldArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Sessions (the first N devices of --certs), all open at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    devices: u32,
    /// Sessions being opened at a time during the ramp.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    parallelism: u32,
    /// Seconds to hold every session open after the ramp.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// A file to create (empty) once every session is open.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ClaimArgs {
    /// The broker's MQTT over TLS listener, HOST:PORT.
    #[arg(long)]
    broker: String,
    /// PEM trust anchor(s) for the broker's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name (SNI, certificate check); default: HOST of --broker.
    #[arg(long)]
    server_name: Option<String>,
    /// The claim certificate (`fleetcert claims create` writes NAME.crt).
    #[arg(long)]
    claim_cert: PathBuf,
    /// The claim's private key (NAME.key).
    #[arg(long)]
    claim_key: PathBuf,
    /// The provisioning template RegisterThing names (the claim's template).
    #[arg(long)]
    template: String,
    /// Devices to provision, each once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    devices: u32,
    /// Devices in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// csr: CreateCertificateFromCsr (device keys made before the measurement);
    /// keys: CreateKeysAndCertificate.
    #[arg(long, value_enum, default_value_t = claim::ClaimApi::Csr)]
    api: claim::ClaimApi,
    /// Serial numbers (and the claim session's client ids) are this prefix and a 7-digit
    /// index; pick a new one per run against the same registry.
    #[arg(long, default_value = "bench-")]
    serial_prefix: String,
    /// The template parameter that carries the serial number.
    #[arg(long, default_value = "SerialNumber")]
    parameter: String,
    /// Limit for one device's whole flow, seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Keep-alive announced in CONNECT, seconds.
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

fn seconds(s: f64, what: &str) -> std::result::Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{what} must be a number of seconds >= 0"))
}

fn runtime() -> std::result::Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn json(report: &impl Serialize) -> String {
    serde_json::to_string_pretty(report).expect("report serialises")
}

/// Runs `fleetcert-bench mqtt ...`; the JSON report, or the error to print.
pub fn run_cli(args: MqttArgs) -> std::result::Result<String, String> {
    let rt = runtime()?;
    let err = |e: anyhow::Error| format!("{e:#}");
    match args.mode {
        MqttMode::Connect(a) => {
            let c = &a.common;
            let load = ConnectLoad {
                concurrency: a.concurrency as usize,
                rate: a.rate,
                new_devices: a.new_devices,
                timeout: seconds(c.timeout, "--timeout")?,
                keep_alive: c.keep_alive,
            };
            let duration = seconds(a.duration, "--duration")?;
            rt.block_on(async {
                let broker = Arc::new(Broker::resolve(&c.broker, c.server_name.as_deref()).await?);
                let devices = load_devices(&c.certs, &c.ca, None)?;
                if !c.quiet {
                    eprintln!(
                        "mqtt connect: {} devices from {}, {} at concurrency {}{}{}",
                        devices.len(),
                        c.certs.display(),
                        broker.addr,
                        load.concurrency,
                        load.rate
                            .map(|r| format!(", paced at {r:.0}/s"))
                            .unwrap_or_default(),
                        if load.new_devices {
                            ", each device once"
                        } else {
                            ""
                        }
                    );
                }
                let start = Instant::now();
                connect_load(
                    broker,
                    Arc::new(devices),
                    load,
                    start,
                    start + duration,
                    (!c.quiet).then_some("connect"),
                )
                .await
            })
            .map(|r| json(&r))
            .map_err(err)
        }
        MqttMode::Publish(a) => {
            let c = &a.common;
            let opts_base = (
                seconds(a.warmup, "--warmup")?,
                seconds(a.duration, "--duration")?,
                seconds(a.drain, "--drain")?,
                seconds(c.timeout, "--timeout")?,
            );
            rt.block_on(async {
                let broker = Arc::new(Broker::resolve(&c.broker, c.server_name.as_deref()).await?);
                let devices = load_devices(&c.certs, &c.ca, Some(a.devices as usize))?;
                let onboard = match &a.onboard_certs {
                    Some(dir) => Some((load_devices(dir, &c.ca, None)?, a.onboard_rate)),
                    None => None,
                };
                let opts = PublishOptions {
                    devices: devices.len(),
                    connect_parallelism: a.connect_parallelism as usize,
                    pace: match a.rate {
                        Some(rate) => Pace::Rate(rate),
                        None => Pace::Window(a.window as usize),
                    },
                    topic: a.topic.clone(),
                    payload_bytes: a.payload_bytes,
                    echo: a.echo,
                    warmup: opts_base.0,
                    duration: opts_base.1,
                    drain: opts_base.2,
                    onboard,
                    onboard_concurrency: a.onboard_concurrency as usize,
                    timeout: opts_base.3,
                    keep_alive: c.keep_alive,
                    progress: !c.quiet,
                    broker_pid: a.broker_pid,
                };
                publish(broker, devices, opts).await
            })
            .map(|r| json(&r))
            .map_err(err)
        }
        MqttMode::Hold(a) => {
            let c = &a.common;
            let opts = HoldOptions {
                parallelism: a.parallelism as usize,
                hold: seconds(a.seconds, "--seconds")?,
                ready_file: a.ready_file.clone(),
                timeout: seconds(c.timeout, "--timeout")?,
                keep_alive: c.keep_alive,
                progress: !c.quiet,
            };
            rt.block_on(async {
                let broker = Arc::new(Broker::resolve(&c.broker, c.server_name.as_deref()).await?);
                let devices = load_devices(&c.certs, &c.ca, Some(a.devices as usize))?;
                hold(broker, devices, opts).await
            })
            .map(|r| json(&r))
            .map_err(err)
        }
        MqttMode::Claim(a) => {
            let opts = claim::ClaimOptions {
                devices: a.devices as usize,
                concurrency: a.concurrency as usize,
                template: a.template.clone(),
                api: a.api,
                serial_prefix: a.serial_prefix.clone(),
                parameter: a.parameter.clone(),
                timeout: seconds(a.timeout, "--timeout")?,
                keep_alive: a.keep_alive,
                progress: !a.quiet,
            };
            rt.block_on(async {
                let broker = Arc::new(Broker::resolve(&a.broker, a.server_name.as_deref()).await?);
                let roots = certs::read_roots(&a.ca)?;
                let connector = claim::claim_connector(&roots, &a.claim_cert, &a.claim_key)?;
                claim::claim(broker, connector, roots, opts).await
            })
            .map(|r| json(&r))
            .map_err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_zero_and_ids_in_flight() {
        let mut inflight = HashMap::new();
        let mut next = u16::MAX;
        assert_eq!(next_packet_id(&mut next, &inflight), Some(u16::MAX));
        assert_eq!(next_packet_id(&mut next, &inflight), Some(1));
        inflight.insert(2, Instant::now());
        inflight.insert(3, Instant::now());
        assert_eq!(next_packet_id(&mut next, &inflight), Some(4));
        let full: HashMap<u16, Instant> = (1..=u16::MAX).map(|i| (i, Instant::now())).collect();
        assert_eq!(next_packet_id(&mut next, &full), None);
    }

    #[test]
    fn every_error_kind_is_listed() {
        let mut counts = BTreeMap::new();
        counts.insert(MqttError::Refused, 3);
        let map = error_map(&counts);
        assert_eq!(map.len(), MqttError::ALL.len());
        assert_eq!(map["refused"], 3);
        assert_eq!(map["closed"], 0);
    }

    #[tokio::test]
    async fn broker_addresses() {
        let b = Broker::resolve("127.0.0.1:8883", None).await.unwrap();
        assert_eq!(b.addr.port(), 8883);
        assert_eq!(
            format!("{:?}", b.server_name),
            format!("{:?}", ServerName::try_from("127.0.0.1").unwrap())
        );
        let b = Broker::resolve("[::1]:1883", Some("localhost"))
            .await
            .unwrap();
        assert!(b.addr.is_ipv6());
        assert!(Broker::resolve("127.0.0.1", None).await.is_err());
        assert!(Broker::resolve("127.0.0.1:x", None).await.is_err());
    }
}
