//! Many idle connections at once: opens N mutual-TLS connections (each with a device
//! certificate from a directory, round-robin), sends one HTTP/1.1 keep-alive request on
//! each and reads the whole response, then keeps every connection open and idle for a
//! while before closing them all — the load for measuring a server's memory with N
//! devices connected at the same moment.
//!
//! The ramp is bounded (`parallelism` connections being established at a time). The hold
//! lasts `hold` from the moment the last connection was settled (established or failed),
//! so every connection is idle at least that long unless the server closes it. A
//! connection the server closes before the hold ends is counted (`closed_early`, with how
//! long it had been idle), and so is the largest number of connections open at the same
//! moment (`max_open`), kept with an atomic.
// The argument structs' `///` comments are `--help` text (placeholders like <name>).
#![allow(rustdoc::invalid_html_tags)]
use crate::certs;
use crate::jitp::{ErrorKind, Failure, Target, after_handshake, describe, resolve};
use crate::metrics;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Method;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct HoldOptions {
    /// `https://host:port/path`.
    pub url: String,
    /// Directory of `<name>.crt` + `<name>.key` pairs.
    pub certs: PathBuf,
    /// Trust anchor(s) for the server certificate, PEM.
    pub ca: PathBuf,
    /// TLS server name (SNI and certificate check); defaults to the URL's host.
    pub server_name: Option<String>,
    /// Connections to open and hold at once.
    pub connections: usize,
    /// How long to keep them open after the last one was established (or failed).
    pub hold: Duration,
    /// Connections being established (TCP + TLS + request + response) at a time.
    pub parallelism: usize,
    /// HTTP method of the one request per connection. Default `POST`.
    pub method: Method,
    /// Limit for establishing one connection (TCP connect to the end of the response).
    pub timeout: Duration,
    /// Plain-HTTP Prometheus endpoint of the server: scraped before the ramp, while all
    /// connections are held, and after they are closed.
    pub metrics_url: Option<String>,
    /// Counter (summed over its label sets) that grows by one per answered request.
    pub metrics_counter: String,
    /// One progress line per second on stderr.
    pub progress: bool,
}

impl HoldOptions {
    /// Defaults for everything but the target and identities.
    pub fn new(url: impl Into<String>, certs: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        HoldOptions {
            url: url.into(),
            certs: certs.into(),
            ca: ca.into(),
            server_name: None,
            connections: 1000,
            hold: Duration::from_secs(10),
            parallelism: 64,
            method: Method::POST,
            timeout: Duration::from_secs(10),
            metrics_url: None,
            metrics_counter: metrics::DEFAULT_COUNTER.to_owned(),
            progress: false,
        }
    }
}

/// The JSON document `fleetcert-bench hold` prints.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    /// The target, as given.
    pub url: String,
    /// The HTTP method used.
    pub method: String,
    /// Connections asked for.
    pub connections: usize,
    /// Connections established at a time during the ramp.
    pub parallelism: usize,
    /// Device certificate + key pairs found in the certificates directory.
    pub devices_loaded: usize,
    /// Distinct device certificates used (connections are assigned round-robin).
    pub devices_used: usize,
    /// The process's soft limit on open files, if known (each connection is one).
    pub fd_limit: Option<u64>,
    /// Connections started (TCP connect attempted).
    pub attempted: u64,
    /// Connections that completed the handshake and got a 2xx answer on a kept-alive
    /// connection (they were then held).
    pub established: u64,
    /// Connections that did not get that far.
    pub failed: u64,
    /// `failed` by kind (every kind listed, zero or not).
    pub errors: BTreeMap<&'static str, u64>,
    /// HTTP status codes received (a non-2xx answer is a failure; that connection is
    /// closed at once).
    pub status: BTreeMap<u16, u64>,
    /// The most connections open at the same moment (established and not yet closed).
    pub max_open: u64,
    /// `max_open == connections`.
    pub all_open_at_once: bool,
    /// Seconds from the start until every connection was established (`None` if some
    /// never were; equals `ramp_seconds` otherwise).
    pub establish_all_seconds: Option<f64>,
    /// Seconds from the start until the last connection was settled (established or
    /// failed): the ramp.
    pub ramp_seconds: f64,
    /// Seconds during which all `connections` were open at once (from the moment the
    /// last one was established to the first early close or the end of the hold).
    pub all_open_seconds: Option<f64>,
    /// The hold asked for, seconds (after the ramp).
    pub hold_seconds: f64,
    /// Connections still open when the hold ended (just before closing them).
    pub open_at_end: u64,
    /// Established connections that ended before the hold did (closed by the server or
    /// broken).
    pub closed_early: u64,
    /// `closed_early` by how: `server_closed` (a clean end of the connection) or `error`.
    pub closed_early_by_kind: BTreeMap<&'static str, u64>,
    /// How long connections had been idle (since their response) when they ended early.
    pub closed_early_idle_seconds: Option<MinMax>,
    /// Seconds from the start to the end of the run (connections closed).
    pub duration_seconds: f64,
    /// Scrapes of the server's metrics (`--metrics-url`).
    pub metrics: Option<HoldMetrics>,
    /// A few distinct error messages (failures and early closes), for diagnosis.
    pub error_samples: Vec<String>,
}

/// The range of a set of measurements.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MinMax {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// The server's metrics before the ramp, while every connection was held, and after.
#[derive(Debug, Clone, Serialize)]
pub struct HoldMetrics {
    /// The metrics endpoint scraped.
    pub url: String,
    /// The counter compared with `established` (`--metrics-counter`).
    pub counter: String,
    /// The counter before the ramp (0 if the server does not expose it yet).
    pub before: f64,
    /// Scraped right after the ramp, with every established connection still open.
    pub during_hold: Option<f64>,
    /// Scraped after every connection was closed; `None` if that scrape failed.
    pub after: Option<f64>,
    /// `during_hold - before`: requests the server counted during the ramp.
    pub counted_during_ramp: Option<u64>,
    /// `counted_during_ramp == established`.
    pub counted_matches_established: Option<bool>,
    /// `fleetcert_tls_handshakes_total` (every result) over the ramp.
    pub handshakes_during_ramp: Option<u64>,
    /// Every gauge the server exposed while the connections were held (summed over
    /// label sets).
    pub gauges_during_hold: BTreeMap<String, f64>,
    /// Gauges among those whose name mentions connections: the server's own count of
    /// open connections, if it has one. Empty if it has none.
    pub open_connection_gauges: BTreeMap<String, f64>,
    /// Scrapes that failed during or after the hold (the one before is required).
    pub scrape_errors: Vec<String>,
}

/// Handshake counter read alongside `counter`.
const HANDSHAKES: &str = "fleetcert_tls_handshakes_total";
const MAX_SAMPLES: usize = 8;

fn kind_of_status(status: u16) -> Option<ErrorKind> {
    ErrorKind::of_status(status)
}

/// The task driving one hyper client connection; aborted if dropped unfinished, so a
/// connection given up on (timeout, failure) does not linger.
struct Driver(JoinHandle<hyper::Result<()>>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An established, idle, kept-alive connection.
struct Open {
    sender: SendRequest<Empty<Bytes>>,
    driver: Driver,
}

/// TCP connect, TLS handshake, one keep-alive request, the whole response. Returns the
/// status and, for a 2xx answer, the connection, still open.
async fn establish(
    target: &Target,
    tls: &tokio_rustls::TlsConnector,
) -> std::result::Result<(u16, Option<Open>), Failure> {
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| (ErrorKind::Connect, describe(&e)))?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| (ErrorKind::Tls, describe(&e)))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(after_handshake)?;
    let mut driver = Driver(tokio::spawn(conn));
    let mut request = hyper::Request::builder()
        .method(target.method.clone())
        .uri(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str());
    if target.method == Method::POST || target.method == Method::PUT {
        request = request.header(hyper::header::CONTENT_LENGTH, "0");
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| (ErrorKind::Http, e.to_string()))?;
    let result = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    }
    .await;
    match result {
        Ok(status) if kind_of_status(status).is_none() => {
            Ok((status, Some(Open { sender, driver })))
        }
        Ok(status) => Ok((status, None)),
        Err(e) => {
            drop(sender);
            // Prefer the connection's own error (a TLS alert, say) to the request's
            // generic one; do not wait long for it.
            match tokio::time::timeout(Duration::from_secs(1), &mut driver.0).await {
                Ok(Ok(Err(conn_error))) => Err(after_handshake(conn_error)),
                _ => Err(after_handshake(e)),
            }
        }
    }
}

/// Counters shared by the connection tasks.
struct Shared {
    attempted: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
    closed_early: AtomicU64,
    /// Microseconds from the start when `open` first reached `connections`.
    all_open_at: AtomicU64,
    /// Microseconds from the start of the first early close.
    first_early_close_at: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            attempted: AtomicU64::new(0),
            established: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            all_open_at: AtomicU64::new(u64::MAX),
            first_early_close_at: AtomicU64::new(u64::MAX),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn sample(&self, text: String) {
        let mut samples = self.samples.lock().expect("samples lock");
        if samples.len() < MAX_SAMPLES && !samples.contains(&text) {
            samples.push(text);
        }
    }
}

/// How one connection ended.
enum Outcome {
    /// Did not get established (or got a non-2xx answer).
    Failed {
        kind: ErrorKind,
        status: Option<u16>,
    },
    /// Held until the end of the hold, then closed by us.
    Held { status: u16 },
    /// Established, then ended before the hold did.
    ClosedEarly {
        status: u16,
        clean: bool,
        idle: Duration,
    },
}

struct Plan {
    target: Target,
    connectors: Vec<tokio_rustls::TlsConnector>,
    connections: usize,
    timeout: Duration,
    start: Instant,
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
}

async fn connection(
    index: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    ramp: Arc<Semaphore>,
    settled: mpsc::UnboundedSender<()>,
    mut release: watch::Receiver<bool>,
) -> Outcome {
    let permit = ramp
        .acquire_owned()
        .await
        .expect("the ramp semaphore is never closed");
    shared.attempted.fetch_add(1, Ordering::Relaxed);
    let connector = &plan.connectors[index % plan.connectors.len()];
    let outcome = tokio::time::timeout(plan.timeout, establish(&plan.target, connector))
        .await
        .unwrap_or_else(|_| {
            Err((
                ErrorKind::Timeout,
                format!("not established within {:?}", plan.timeout),
            ))
        });
    drop(permit);
    let (status, open) = match outcome {
        Ok((status, Some(open))) => (status, open),
        Ok((status, None)) => {
            let kind = kind_of_status(status).unwrap_or(ErrorKind::HttpOther);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.sample(format!("{}: HTTP {status}", kind.as_str()));
            let _ = settled.send(());
            return Outcome::Failed {
                kind,
                status: Some(status),
            };
        }
        Err((kind, message)) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.sample(format!("{}: {message}", kind.as_str()));
            let _ = settled.send(());
            return Outcome::Failed { kind, status: None };
        }
    };
    let idle_since = Instant::now();
    let now_open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_open.fetch_max(now_open, Ordering::SeqCst);
    if now_open == plan.connections as u64 {
        let _ = shared.all_open_at.compare_exchange(
            u64::MAX,
            micros_since(plan.start),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
    shared.established.fetch_add(1, Ordering::Relaxed);
    let _ = settled.send(());
    drop(settled);

    let Open { sender, mut driver } = open;
    let ended = tokio::select! {
        // The hold is over (or the run is being torn down).
        _ = async { let _ = release.wait_for(|done| *done).await; } => None,
        ended = &mut driver.0 => Some(ended),
    };
    shared.open.fetch_sub(1, Ordering::SeqCst);
    drop(sender);
    let Some(ended) = ended else {
        // Close it ourselves: hyper shuts the connection down (TLS close_notify, FIN) once
        // the sender is gone; give it a moment, then the Driver's drop aborts it.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut driver.0).await;
        return Outcome::Held { status };
    };
    shared
        .first_early_close_at
        .fetch_min(micros_since(plan.start), Ordering::SeqCst);
    shared.closed_early.fetch_add(1, Ordering::Relaxed);
    let idle = idle_since.elapsed();
    let (clean, message) = match ended {
        Ok(Ok(())) => (true, "the server closed the connection".to_owned()),
        Ok(Err(e)) => (false, describe(&e)),
        Err(e) => (false, format!("connection task: {e}")),
    };
    shared.sample(format!(
        "closed early ({}): {message}",
        if clean { "server_closed" } else { "error" }
    ));
    Outcome::ClosedEarly {
        status,
        clean,
        idle,
    }
}

/// The soft limit on open files of this process (Linux: `/proc/self/limits`).
fn fd_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Names of the metrics declared `# TYPE <name> gauge` in a Prometheus exposition.
fn gauge_names(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
            let name = words.next()?;
            (words.next()? == "gauge").then(|| name.to_owned())
        })
        .collect()
}

/// Every gauge in the exposition, summed over its label sets.
pub fn gauges(exposition: &str) -> BTreeMap<String, f64> {
    gauge_names(exposition)
        .into_iter()
        .filter_map(|name| metrics::counter_sum(exposition, &name).map(|v| (name, v)))
        .collect()
}

fn delta(before: f64, after: f64) -> u64 {
    (after - before).max(0.0).round() as u64
}

/// Loads the devices, opens and holds the connections, closes them, and reports.
pub async fn run(opts: &HoldOptions) -> Result<HoldReport> {
    if opts.connections == 0 {
        bail!("connections must be at least 1");
    }
    if opts.parallelism == 0 {
        bail!("parallelism must be at least 1");
    }
    let target = resolve(&opts.url, opts.server_name.as_deref(), &opts.method).await?;
    let roots = certs::read_roots(&opts.ca)?;
    let devices = certs::list_devices(&opts.certs)?;
    let devices_used = devices.len().min(opts.connections);
    // One client configuration per device used, built before the clock starts.
    let connectors = devices[..devices_used]
        .iter()
        .map(|d| certs::client_config(&roots, d).map(tokio_rustls::TlsConnector::from))
        .collect::<Result<Vec<_>>>()?;
    let fd_limit = fd_soft_limit();
    if let Some(limit) = fd_limit
        && (opts.connections as u64) + 32 > limit
    {
        eprintln!(
            "hold: warning: {} connections but the open-file limit is {limit}; raise it \
             (ulimit -n) or connections will fail with 'Too many open files'",
            opts.connections
        );
    }
    if opts.progress {
        eprintln!(
            "hold: {} connections ({} devices from {}), {} {}, {} at a time, held {:.1}s",
            opts.connections,
            devices_used,
            opts.certs.display(),
            opts.method,
            opts.url,
            opts.parallelism,
            opts.hold.as_secs_f64()
        );
    }
    let mut scrape_errors = Vec::new();
    let (before, before_handshakes) = match &opts.metrics_url {
        Some(url) => {
            let text = metrics::fetch(url).await?;
            (
                Some(metrics::counter_sum(&text, &opts.metrics_counter).unwrap_or(0.0)),
                metrics::counter_sum(&text, HANDSHAKES),
            )
        }
        None => (None, None),
    };

    let start = Instant::now();
    let plan = Arc::new(Plan {
        target,
        connectors,
        connections: opts.connections,
        timeout: opts.timeout,
        start,
    });
    let shared = Arc::new(Shared::new());
    let ramp = Arc::new(Semaphore::new(opts.parallelism));
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = watch::channel(false);
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
            loop {
                tick.tick().await;
                eprintln!(
                    "hold: {:>4.0}s  attempted {:>6}  established {:>6}  failed {:>5}  open {:>6}  closed early {:>5}",
                    start.elapsed().as_secs_f64(),
                    shared.attempted.load(Ordering::Relaxed),
                    shared.established.load(Ordering::Relaxed),
                    shared.failed.load(Ordering::Relaxed),
                    shared.open.load(Ordering::Relaxed),
                    shared.closed_early.load(Ordering::Relaxed),
                );
            }
        })
    });
    let tasks: Vec<_> = (0..opts.connections)
        .map(|i| {
            tokio::spawn(connection(
                i,
                plan.clone(),
                shared.clone(),
                ramp.clone(),
                settled_tx.clone(),
                release_rx.clone(),
            ))
        })
        .collect();
    drop(settled_tx);
    drop(release_rx);

    // The ramp: every connection established or failed (each is bounded by `timeout`).
    let mut settled = 0;
    while settled < opts.connections && settled_rx.recv().await.is_some() {
        settled += 1;
    }
    let ramp_seconds = start.elapsed().as_secs_f64();
    let established_after_ramp = shared.established.load(Ordering::SeqCst);

    // While everything is held: what the server says.
    let mut during_text = None;
    if let Some(url) = &opts.metrics_url {
        match metrics::fetch(url).await {
            Ok(text) => during_text = Some(text),
            Err(e) => scrape_errors.push(format!("during the hold: {e:#}")),
        }
    }
    if established_after_ramp > 0 {
        let hold_end = start + Duration::from_secs_f64(ramp_seconds) + opts.hold;
        tokio::time::sleep_until(hold_end).await;
    }
    let release_at = micros_since(start);
    let open_at_end = shared.open.load(Ordering::SeqCst);
    let _ = release_tx.send(true);

    let mut errors: BTreeMap<&'static str, u64> =
        ErrorKind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    let mut status = BTreeMap::new();
    let mut closed_early_by_kind: BTreeMap<&'static str, u64> =
        [("server_closed", 0), ("error", 0)].into_iter().collect();
    let mut idle: Option<MinMax> = None;
    for task in tasks {
        match task.await.context("a connection task panicked")? {
            Outcome::Failed { kind, status: code } => {
                *errors.entry(kind.as_str()).or_default() += 1;
                if let Some(code) = code {
                    *status.entry(code).or_default() += 1;
                }
            }
            Outcome::Held { status: code } => *status.entry(code).or_default() += 1,
            Outcome::ClosedEarly {
                status: code,
                clean,
                idle: idle_for,
            } => {
                *status.entry(code).or_default() += 1;
                *closed_early_by_kind
                    .entry(if clean { "server_closed" } else { "error" })
                    .or_default() += 1;
                let s = idle_for.as_secs_f64();
                idle = Some(match idle {
                    None => MinMax { min: s, max: s },
                    Some(m) => MinMax {
                        min: m.min.min(s),
                        max: m.max.max(s),
                    },
                });
            }
        }
    }
    let duration_seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }

    let established = shared.established.load(Ordering::SeqCst);
    let max_open = shared.max_open.load(Ordering::SeqCst);
    let all_open_at = shared.all_open_at.load(Ordering::SeqCst);
    let all_open_seconds = (all_open_at != u64::MAX).then(|| {
        let end = shared
            .first_early_close_at
            .load(Ordering::SeqCst)
            .min(release_at);
        end.saturating_sub(all_open_at) as f64 / 1e6
    });
    let metrics = match (&opts.metrics_url, before) {
        (Some(url), Some(before)) => {
            let after = match metrics::fetch(url).await {
                Ok(text) => metrics::counter_sum(&text, &opts.metrics_counter).or(Some(0.0)),
                Err(e) => {
                    scrape_errors.push(format!("after the hold: {e:#}"));
                    None
                }
            };
            let during = during_text
                .as_deref()
                .map(|t| metrics::counter_sum(t, &opts.metrics_counter).unwrap_or(0.0));
            let counted = during.map(|d| delta(before, d));
            let gauges_during_hold = during_text.as_deref().map(gauges).unwrap_or_default();
            let open_connection_gauges = gauges_during_hold
                .iter()
                .filter(|(name, _)| name.contains("connection"))
                .map(|(name, v)| (name.clone(), *v))
                .collect();
            Some(HoldMetrics {
                url: url.clone(),
                counter: opts.metrics_counter.clone(),
                before,
                during_hold: during,
                after,
                counted_during_ramp: counted,
                counted_matches_established: counted.map(|c| c == established_after_ramp),
                handshakes_during_ramp: match (
                    before_handshakes,
                    during_text
                        .as_deref()
                        .and_then(|t| metrics::counter_sum(t, HANDSHAKES)),
                ) {
                    (b, Some(d)) => Some(delta(b.unwrap_or(0.0), d)),
                    _ => None,
                },
                gauges_during_hold,
                open_connection_gauges,
                scrape_errors,
            })
        }
        _ => None,
    };
    let error_samples = shared.samples.lock().expect("samples lock").clone();
    Ok(HoldReport {
        url: opts.url.clone(),
        method: opts.method.to_string(),
        connections: opts.connections,
        parallelism: opts.parallelism,
        devices_loaded: devices.len(),
        devices_used,
        fd_limit,
        attempted: shared.attempted.load(Ordering::SeqCst),
        established,
        failed: shared.failed.load(Ordering::SeqCst),
        errors,
        status,
        max_open,
        all_open_at_once: max_open == opts.connections as u64,
        establish_all_seconds: (established_after_ramp == opts.connections as u64)
            .then_some(ramp_seconds),
        ramp_seconds,
        all_open_seconds,
        hold_seconds: opts.hold.as_secs_f64(),
        open_at_end,
        closed_early: shared.closed_early.load(Ordering::SeqCst),
        closed_early_by_kind,
        closed_early_idle_seconds: idle,
        duration_seconds,
        metrics,
        error_samples,
    })
}

/// `fleetcert-bench hold`'s arguments.
#[derive(Debug, clap::Args)]
pub struct HoldArgs {
    /// https://HOST:PORT/PATH
    #[arg(long)]
    url: String,
    /// Directory of <name>.crt + <name>.key pairs (chain.pem is skipped); one per
    /// connection, round-robin.
    #[arg(long)]
    certs: PathBuf,
    /// PEM trust anchor(s) for the server certificate (e.g. `fleetcert ca export`).
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name (SNI, certificate check); default: the URL's host.
    #[arg(long)]
    server_name: Option<String>,
    /// Connections to open and hold open at the same time.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections: u32,
    /// Seconds to keep them all open and idle once the last one is established.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Connections being established at a time during the ramp.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    parallelism: u32,
    /// HTTP method of the one request sent on each connection.
    #[arg(long, default_value = "POST", value_parser = ["POST", "GET"])]
    method: String,
    /// Seconds to establish one connection (connect to the end of the response).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The server's plain-HTTP Prometheus endpoint: scraped before, while all
    /// connections are held, and after.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Counter (summed over labels) that should grow by one per answered request.
    #[arg(long, default_value = metrics::DEFAULT_COUNTER)]
    metrics_counter: String,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// Runs `fleetcert-bench hold` on its own runtime: the JSON report, or the error text.
pub fn run_cli(args: HoldArgs) -> std::result::Result<String, String> {
    let seconds = |s: f64, what: &str| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| format!("{what} must be a number of seconds >= 0"))
    };
    let mut opts = HoldOptions::new(args.url, args.certs, args.ca);
    opts.server_name = args.server_name;
    opts.connections = args.connections as usize;
    opts.hold = seconds(args.seconds, "--seconds")?;
    opts.parallelism = args.parallelism as usize;
    opts.method = args.method.parse().map_err(|e| format!("--method: {e}"))?;
    opts.timeout = seconds(args.timeout, "--timeout")?;
    opts.metrics_url = args.metrics_url;
    opts.metrics_counter = args.metrics_counter;
    opts.progress = !args.quiet;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let report = runtime.block_on(run(&opts)).map_err(|e| format!("{e:#}"))?;
    Ok(serde_json::to_string_pretty(&report).expect("report serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_found_by_their_type_line() {
        let text = "# HELP fleetcert_open_connections open device connections.\n\
                    # TYPE fleetcert_open_connections gauge\n\
                    fleetcert_open_connections 1000\n\
                    # TYPE fleetcert_mirror_backlog gauge\n\
                    fleetcert_mirror_backlog{state=\"pending\"} 2\n\
                    fleetcert_mirror_backlog{state=\"parked\"} 1\n\
                    # TYPE fleetcert_connects counter\n\
                    fleetcert_connects_total{status=\"known\"} 7\n\
                    # EOF\n";
        let g = gauges(text);
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!(g["fleetcert_open_connections"], 1000.0);
        assert_eq!(g["fleetcert_mirror_backlog"], 3.0);
    }

    #[test]
    fn statuses_other_than_2xx_are_failures() {
        assert_eq!(kind_of_status(200), None);
        assert_eq!(kind_of_status(201), None);
        assert_eq!(kind_of_status(405), Some(ErrorKind::Http4xx));
        assert_eq!(kind_of_status(502), Some(ErrorKind::Http5xx));
        assert_eq!(kind_of_status(101), Some(ErrorKind::HttpOther));
    }
}
