//! The mutual-TLS load generator: every request is a new TCP connection, a full TLS
//! handshake with a device certificate (no resumption), one HTTP/1.1 request with
//! `connection: close`, the whole response, and the close — what a device does when it
//! connects. Works against any HTTPS server that asks for client certificates.
use crate::certs::{self, DeviceFiles};
use crate::metrics;
use crate::stats::{self, LatencyMs};
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Method;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct JitpOptions {
    /// `https://host:port/path`.
    pub url: String,
    /// Directory of `<name>.crt` + `<name>.key` pairs.
    pub certs: PathBuf,
    /// Trust anchor(s) for the server certificate, PEM.
    pub ca: PathBuf,
    /// Requests in flight at once (one task each).
    pub concurrency: usize,
    /// No request starts after this.
    pub duration: Duration,
    /// TLS server name (SNI and certificate check); defaults to the URL's host.
    pub server_name: Option<String>,
    /// Use each device at most once; stop when they run out.
    pub new_devices: bool,
    /// HTTP method of every request. Default `POST` (`POST /v1/connect` for fleetcert).
    pub method: Method,
    /// Plain-HTTP Prometheus endpoint of the server, scraped before and after.
    pub metrics_url: Option<String>,
    /// Counter summed over its label sets in the scrape.
    pub metrics_counter: String,
    /// Requests started per second, spread evenly (open loop); `None`: as fast as the
    /// `concurrency` tasks go.
    pub rate: Option<f64>,
    /// Per-request limit (connect to close).
    pub timeout: Duration,
    /// One progress line per second on stderr.
    pub progress: bool,
}

impl JitpOptions {
    /// Defaults for everything but the target and identities.
    pub fn new(url: impl Into<String>, certs: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        JitpOptions {
            url: url.into(),
            certs: certs.into(),
            ca: ca.into(),
            concurrency: 32,
            duration: Duration::from_secs(10),
            server_name: None,
            new_devices: false,
            method: Method::POST,
            metrics_url: None,
            metrics_counter: metrics::DEFAULT_COUNTER.to_owned(),
            rate: None,
            timeout: Duration::from_secs(10),
            progress: false,
        }
    }
}

/// Why a request did not get a 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// TCP connect failed.
    Connect,
    /// TLS handshake failed, or the server sent a TLS alert later (TLS 1.3 servers check
    /// the client certificate after the client has finished its side).
    Tls,
    /// The connection broke or HTTP was malformed after the handshake.
    Http,
    /// The request did not finish within the per-request limit.
    Timeout,
    /// A 4xx answer (for a JITP server, usually a refused device).
    Http4xx,
    /// A 5xx answer.
    Http5xx,
    /// 1xx (final) or 3xx.
    HttpOther,
}

impl ErrorKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Http,
        ErrorKind::Timeout,
        ErrorKind::Http4xx,
        ErrorKind::Http5xx,
        ErrorKind::HttpOther,
    ];

    /// The key in reports' `errors` maps: `connect`, `tls`, `http`, `timeout`,
    /// `http_4xx`, `http_5xx`, `http_other`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Http => "http",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Http4xx => "http_4xx",
            ErrorKind::Http5xx => "http_5xx",
            ErrorKind::HttpOther => "http_other",
        }
    }

    pub(crate) fn of_status(status: u16) -> Option<ErrorKind> {
        match status {
            200..=299 => None,
            400..=499 => Some(ErrorKind::Http4xx),
            500..=599 => Some(ErrorKind::Http5xx),
            _ => Some(ErrorKind::HttpOther),
        }
    }
}

/// The JSON document `fleetcert-bench jitp` prints.
#[derive(Debug, Clone, Serialize)]
pub struct JitpReport {
    /// The target, as given.
    pub url: String,
    /// The HTTP method used.
    pub method: String,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Target request rate, if paced.
    pub rate: Option<f64>,
    /// Each device was used at most once (`--new-devices`).
    pub new_devices: bool,
    /// Device certificate + key pairs found in the certificates directory.
    pub devices_loaded: usize,
    /// Distinct devices that made a request.
    pub devices_used: usize,
    /// `--new-devices` only: the run stopped because every device had been used.
    pub devices_exhausted: bool,
    /// Requests started (each a new connection), whatever their outcome.
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Failed requests by kind (every kind listed, zero or not).
    pub errors: BTreeMap<&'static str, u64>,
    /// Sum of `errors`.
    pub errors_total: u64,
    /// HTTP status codes received.
    pub status: BTreeMap<u16, u64>,
    /// Requests answered, by negotiated TLS version, cipher suite, key exchange group and
    /// handshake kind (always `Full`: the client never resumes).
    pub tls_sessions: BTreeMap<String, u64>,
    /// From the start of the load to the end of the last request: a little over the
    /// `duration` asked for, as requests in flight at the deadline are finished.
    pub duration_seconds: f64,
    /// `ok` per second of `duration_seconds`.
    pub requests_per_second: f64,
    /// Latency of 2xx requests, TCP connect to close. When paced, measured from the
    /// scheduled start, so a generator falling behind shows as latency.
    pub latency_ms: LatencyMs,
    /// The server's counter delta over the run (`--metrics-url`).
    pub server_counted: Option<u64>,
    /// `server_counted == ok`: every 2xx the generator saw was counted by the server.
    pub server_counted_matches_ok: Option<bool>,
    /// The raw scrapes behind `server_counted`.
    pub metrics: Option<MetricsScrape>,
    /// A few distinct error messages, for diagnosis.
    pub error_samples: Vec<String>,
}

/// The server's counter before and after a `jitp` run (`--metrics-url`).
#[derive(Debug, Clone, Serialize)]
pub struct MetricsScrape {
    /// The metrics endpoint scraped.
    pub url: String,
    /// The counter read (`--metrics-counter`), summed over its label sets.
    pub counter: String,
    /// Its value before the first request.
    pub before: f64,
    /// Its value after the last request ended.
    pub after: f64,
}

/// Where requests go, resolved once (shared with `hold`).
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) authority: String,
    pub(crate) path: String,
    pub(crate) method: Method,
}

fn parse_target(url: &str) -> Result<(hyper::Uri, String, u16)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    if uri.scheme_str() != Some("https") {
        bail!("the URL must be https://host:port/path, got {url:?}");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("no host in {url:?}"))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    Ok((uri, host, port))
}

/// Parses `https://HOST:PORT/PATH` and resolves HOST; the TLS server name is
/// `server_name` or else HOST.
pub(crate) async fn resolve(
    url: &str,
    server_name: Option<&str>,
    method: &Method,
) -> Result<Target> {
    let (uri, host, port) = parse_target(url)?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} has no address"))?;
    let name = server_name.map(str::to_owned).unwrap_or(host);
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| anyhow!("server name {name:?}: {e}"))?;
    Ok(Target {
        addr,
        server_name,
        authority: uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        method: method.clone(),
    })
}

/// Does the error, or anything it wraps, come from rustls?
pub(crate) fn is_tls_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        // io::Error::source() skips the error it wraps; look at it directly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && is_tls_error(inner)
        {
            return true;
        }
        next = e.source();
    }
    false
}

pub(crate) fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

pub(crate) type Failure = (ErrorKind, String);

/// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519 Full`: what was negotiated, so a comparison
/// between servers can show it compared like with like.
pub(crate) fn describe_session(conn: &rustls::ClientConnection) -> String {
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "?".into());
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "?".into());
    let group = conn
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_else(|| "?".into());
    let kind = conn
        .handshake_kind()
        .map(|k| format!("{k:?}"))
        .unwrap_or_else(|| "?".into());
    format!("{version} {suite} {group} {kind}")
}

pub(crate) fn after_handshake(e: impl std::error::Error + 'static) -> Failure {
    let kind = if is_tls_error(&e) {
        ErrorKind::Tls
    } else {
        ErrorKind::Http
    };
    (kind, describe(&e))
}

/// One device connection: TCP connect, TLS handshake, request, response, close.
async fn one_request(
    target: &Target,
    tls: &tokio_rustls::TlsConnector,
) -> std::result::Result<(u16, String), Failure> {
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| (ErrorKind::Connect, describe(&e)))?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| (ErrorKind::Tls, describe(&e)))?;
    let session = describe_session(stream.get_ref().1);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(after_handshake)?;
    let driver = tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(target.method.clone())
        .uri(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONNECTION, "close");
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
    drop(sender);
    // The connection closes after the response (`connection: close`); wait for it, and
    // prefer its error (a TLS alert, say) to the request's generic one.
    let closed = driver.await;
    match (result, closed) {
        (Ok(status), _) => Ok((status, session)),
        (Err(_), Ok(Err(conn_error))) => Err(after_handshake(conn_error)),
        (Err(e), _) => Err(after_handshake(e)),
    }
}

#[derive(Default)]
struct Shared {
    next_device: AtomicUsize,
    next_ticket: AtomicU64,
    requests: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    exhausted: std::sync::atomic::AtomicBool,
}

struct WorkerTally {
    latency: Histogram<u64>,
    errors: BTreeMap<ErrorKind, u64>,
    status: BTreeMap<u16, u64>,
    sessions: BTreeMap<String, u64>,
    samples: Vec<String>,
}

const MAX_SAMPLES: usize = 8;

struct Plan {
    target: Target,
    connectors: Vec<tokio_rustls::TlsConnector>,
    new_devices: bool,
    rate: Option<f64>,
    timeout: Duration,
    start: Instant,
    deadline: Instant,
}

async fn worker(plan: Arc<Plan>, shared: Arc<Shared>) -> WorkerTally {
    let mut tally = WorkerTally {
        latency: stats::new_histogram(),
        errors: BTreeMap::new(),
        status: BTreeMap::new(),
        sessions: BTreeMap::new(),
        samples: Vec::new(),
    };
    let devices = plan.connectors.len();
    loop {
        let begin = match plan.rate {
            Some(rate) => {
                let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
                let at = plan.start + Duration::from_secs_f64(ticket as f64 / rate);
                if at >= plan.deadline {
                    break;
                }
                tokio::time::sleep_until(at).await;
                at
            }
            None => {
                let now = Instant::now();
                if now >= plan.deadline {
                    break;
                }
                now
            }
        };
        let index = shared.next_device.fetch_add(1, Ordering::Relaxed);
        let device = if plan.new_devices {
            if index >= devices {
                shared.exhausted.store(true, Ordering::Relaxed);
                break;
            }
            index
        } else {
            index % devices
        };
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = tokio::time::timeout(
            plan.timeout,
            one_request(&plan.target, &plan.connectors[device]),
        )
        .await
        .unwrap_or_else(|_| {
            Err((
                ErrorKind::Timeout,
                format!("no answer within {:?}", plan.timeout),
            ))
        });
        let failure = match outcome {
            Ok((status, session)) => {
                *tally.status.entry(status).or_default() += 1;
                *tally.sessions.entry(session).or_default() += 1;
                match ErrorKind::of_status(status) {
                    None => {
                        shared.ok.fetch_add(1, Ordering::Relaxed);
                        stats::record(&mut tally.latency, begin.elapsed());
                        continue;
                    }
                    Some(kind) => (kind, format!("HTTP {status}")),
                }
            }
            Err(failure) => failure,
        };
        shared.failed.fetch_add(1, Ordering::Relaxed);
        *tally.errors.entry(failure.0).or_default() += 1;
        let sample = format!("{}: {}", failure.0.as_str(), failure.1);
        if tally.samples.len() < MAX_SAMPLES && !tally.samples.contains(&sample) {
            tally.samples.push(sample);
        }
    }
    tally
}

/// Loads the devices, runs the load, and reports.
pub async fn run(opts: &JitpOptions) -> Result<JitpReport> {
    if opts.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    if let Some(rate) = opts.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("rate must be a positive number of requests per second");
    }
    let target = resolve(&opts.url, opts.server_name.as_deref(), &opts.method).await?;
    let roots = certs::read_roots(&opts.ca)?;
    let devices: Vec<DeviceFiles> = certs::list_devices(&opts.certs)?;
    // One client configuration per device, built before the clock starts.
    let connectors = devices
        .iter()
        .map(|d| certs::client_config(&roots, d).map(tokio_rustls::TlsConnector::from))
        .collect::<Result<Vec<_>>>()?;
    if opts.progress {
        eprintln!(
            "jitp: {} devices from {}, {} {} at concurrency {}{}",
            devices.len(),
            opts.certs.display(),
            opts.method,
            opts.url,
            opts.concurrency,
            opts.rate
                .map(|r| format!(", paced at {r:.0}/s"))
                .unwrap_or_default()
        );
    }
    let before = match &opts.metrics_url {
        Some(url) => Some(metrics::fetch_counter(url, &opts.metrics_counter).await?),
        None => None,
    };

    let start = Instant::now();
    let plan = Arc::new(Plan {
        target,
        connectors,
        new_devices: opts.new_devices,
        rate: opts.rate,
        timeout: opts.timeout,
        start,
        deadline: start + opts.duration,
    });
    let shared = Arc::new(Shared::default());
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
            let mut last_ok = 0;
            loop {
                tick.tick().await;
                let ok = shared.ok.load(Ordering::Relaxed);
                let failed = shared.failed.load(Ordering::Relaxed);
                let requests = shared.requests.load(Ordering::Relaxed);
                eprintln!(
                    "jitp: {:>4.0}s  ok {ok:>8}  failed {failed:>6}  in flight {:>5}  {:>6} ok/s",
                    start.elapsed().as_secs_f64(),
                    requests.saturating_sub(ok + failed),
                    ok - last_ok
                );
                last_ok = ok;
            }
        })
    });
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|_| tokio::spawn(worker(plan.clone(), shared.clone())))
        .collect();
    let mut latency = stats::new_histogram();
    let mut errors: BTreeMap<&'static str, u64> =
        ErrorKind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    let mut status = BTreeMap::new();
    let mut tls_sessions = BTreeMap::new();
    let mut error_samples = Vec::new();
    for w in workers {
        let tally = w.await.context("a load task panicked")?;
        latency
            .add(&tally.latency)
            .expect("histograms of the same bounds");
        for (kind, n) in tally.errors {
            *errors.entry(kind.as_str()).or_default() += n;
        }
        for (code, n) in tally.status {
            *status.entry(code).or_default() += n;
        }
        for (session, n) in tally.sessions {
            *tls_sessions.entry(session).or_default() += n;
        }
        for sample in tally.samples {
            if error_samples.len() < MAX_SAMPLES && !error_samples.contains(&sample) {
                error_samples.push(sample);
            }
        }
    }
    let duration_seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }

    let after = match &opts.metrics_url {
        Some(url) => Some(metrics::fetch_counter(url, &opts.metrics_counter).await?),
        None => None,
    };
    let requests = shared.requests.load(Ordering::Relaxed);
    let ok = shared.ok.load(Ordering::Relaxed);
    let devices_used = if opts.new_devices {
        shared
            .next_device
            .load(Ordering::Relaxed)
            .min(devices.len())
    } else {
        (requests as usize).min(devices.len())
    };
    let (server_counted, metrics) = match (before, after, &opts.metrics_url) {
        (Some(before), Some(after), Some(url)) => (
            Some((after - before).max(0.0).round() as u64),
            Some(MetricsScrape {
                url: url.clone(),
                counter: opts.metrics_counter.clone(),
                before,
                after,
            }),
        ),
        _ => (None, None),
    };
    Ok(JitpReport {
        url: opts.url.clone(),
        method: opts.method.to_string(),
        concurrency: opts.concurrency,
        rate: opts.rate,
        new_devices: opts.new_devices,
        devices_loaded: devices.len(),
        devices_used,
        devices_exhausted: shared.exhausted.load(Ordering::Relaxed),
        requests,
        ok,
        errors_total: errors.values().sum(),
        errors,
        status,
        tls_sessions,
        duration_seconds,
        requests_per_second: if duration_seconds > 0.0 {
            ok as f64 / duration_seconds
        } else {
            0.0
        },
        latency_ms: stats::summarize(&latency),
        server_counted_matches_ok: server_counted.map(|n| n == ok),
        server_counted,
        metrics,
        error_samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(ErrorKind::of_status(200), None);
        assert_eq!(ErrorKind::of_status(201), None);
        assert_eq!(ErrorKind::of_status(403), Some(ErrorKind::Http4xx));
        assert_eq!(ErrorKind::of_status(503), Some(ErrorKind::Http5xx));
        assert_eq!(ErrorKind::of_status(301), Some(ErrorKind::HttpOther));
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        assert!(is_tls_error(&io));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!is_tls_error(&plain));
    }

    #[test]
    fn only_https_urls() {
        assert!(parse_target("http://127.0.0.1:1/").is_err());
        let (uri, host, port) = parse_target("https://[::1]:8443/v1/connect").unwrap();
        assert_eq!(
            (host.as_str(), port, uri.path()),
            ("::1", 8443, "/v1/connect")
        );
    }
}
