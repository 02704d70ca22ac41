//! The plugin's logic, without FFI: sessions, the CONNECT cache, decisions, and the worker
//! thread that talks to serve off the broker's thread.
//!
//! Threads: [`Plugin::authenticate`], [`Plugin::authorize`], [`Plugin::disconnected`] and
//! [`Plugin::tick`] run on the broker's thread. Only `authenticate` may do I/O (one bounded
//! call to serve, for a device not in the cache). Everything else that talks to serve runs
//! on the worker; what it finds for the broker (kicks, log lines) waits in queues the
//! broker's thread drains.

use crate::metrics::{AclKind, ConnectResult, Metrics, ProvisioningEvent};
use crate::options::{OptionError, PluginOptions};
use crate::serve::{BrokerReport, ConnectAnswer, ConnectRequest, DisconnectRecord, ServeClient};
use crate::topic::check_topic;
use base64::Engine as _;
use fleetcert_templates::{ArnContext, ConnectionContext, Policy, Request, evaluate_policies};
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Log lines kept for the broker's thread at most; older ones are dropped first.
const MAX_QUEUED_LOG_LINES: usize = 10_000;
/// Disconnect records kept while serve is unreachable at most; older ones are dropped.
const MAX_QUEUED_DISCONNECTS: usize = 100_000;
/// How often the worker logs the metrics.
const METRICS_INTERVAL: Duration = Duration::from_secs(60);

/// Identifies one live connection: the address of mosquitto's `struct mosquitto`, which is
/// stable from CONNECT to DISCONNECT (only ever compared, never dereferenced here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionKey(pub usize);

/// A CONNECT to decide.
#[derive(Debug, Clone, Copy)]
pub struct ConnectAttempt<'a> {
    /// The connection.
    pub connection: ConnectionKey,
    /// The MQTT client ID.
    pub client_id: &'a str,
    /// The verified client certificate, DER; `None` when the client sent none.
    pub certificate_der: Option<&'a [u8]>,
    /// The client's address.
    pub source_address: &'a str,
    /// The MQTT username (informational).
    pub username: Option<&'a str>,
    /// The MQTT protocol level: 3 (3.1), 4 (3.1.1) or 5.
    pub protocol_version: i32,
}

/// The answer to a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthAnswer {
    /// Accepted.
    Allowed,
    /// Refused by policy or credentials.
    NotAuthorized,
    /// serve could not be asked: refused, fail closed.
    Unavailable,
}

/// What an ACL check asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// SUBSCRIBE to a filter.
    Subscribe,
    /// PUBLISH by the client; `retain` also needs `iot:RetainPublish`.
    Publish {
        /// The retain flag.
        retain: bool,
    },
    /// Delivery of a message to the client.
    Receive,
    /// UNSUBSCRIBE: AWS IoT does not authorize it.
    Unsubscribe,
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Debug detail.
    Debug,
    /// Normal events.
    Info,
    /// Noteworthy events (refusals, kicks).
    Notice,
    /// Something is wrong but the plugin goes on.
    Warning,
    /// Something failed.
    Error,
}

/// A line for the broker's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// Text, without the `fleetcert:` prefix.
    pub message: String,
}

/// Decisions remembered per grant at most (a device uses few topics; past this the memo
/// is cleared and refilled, so a device cycling through topics costs only evaluations).
const MAX_REMEMBERED_DECISIONS: usize = 256;

/// What serve granted a certificate + client id: compiled policies and their context.
#[derive(Debug)]
struct Grant {
    thing_name: String,
    /// A claim certificate's template: the session may use the Fleet Provisioning API.
    claim_template: Option<String>,
    policies: Vec<Policy>,
    context: ConnectionContext,
    arn: ArnContext,
    /// (access, topic) → allowed: a decision depends only on the grant, the access and
    /// the topic, so each is evaluated once; the message path then costs a lookup.
    decisions: Mutex<Decisions>,
}

/// A grant's remembered decisions: one map per access (retained publishes apart), keyed
/// by topic, so the message path looks a topic up without allocating a key.
#[derive(Debug, Default)]
struct Decisions {
    by_access: [HashMap<Box<str>, bool>; 4],
    len: usize,
}

impl Decisions {
    /// The map an access is remembered in; `None` for UNSUBSCRIBE, never decided here.
    fn slot(access: Access) -> Option<usize> {
        match access {
            Access::Subscribe => Some(0),
            Access::Publish { retain: false } => Some(1),
            Access::Publish { retain: true } => Some(2),
            Access::Receive => Some(3),
            Access::Unsubscribe => None,
        }
    }

    fn get(&self, access: Access, topic: &str) -> Option<bool> {
        self.by_access[Self::slot(access)?].get(topic).copied()
    }

    fn remember(&mut self, access: Access, topic: &str, allowed: bool) {
        let Some(slot) = Self::slot(access) else {
            return;
        };
        if self.len >= MAX_REMEMBERED_DECISIONS {
            self.by_access.iter_mut().for_each(HashMap::clear);
            self.len = 0;
        }
        if self.by_access[slot].insert(topic.into(), allowed).is_none() {
            self.len += 1;
        }
    }
}

impl Grant {
    fn new(
        thing_name: String,
        policies: Vec<Policy>,
        context: ConnectionContext,
        arn: ArnContext,
    ) -> Grant {
        Grant {
            thing_name,
            claim_template: None,
            policies,
            context,
            arn,
            decisions: Mutex::default(),
        }
    }

    /// Whether the policies allow `access` on `topic` (topic limits checked first).
    fn allows(&self, access: Access, topic: &str) -> bool {
        if let Some(allowed) = lock(&self.decisions).get(access, topic) {
            return allowed;
        }
        let allowed = check_topic(topic).is_ok() && {
            let decide = |request: Request<'_>| {
                evaluate_policies(&self.policies, &self.arn, &self.context, &request).is_allowed()
            };
            match access {
                Access::Subscribe => decide(Request::subscribe(topic)),
                Access::Publish { retain } => {
                    decide(Request::publish(topic))
                        && (!retain || decide(Request::retain_publish(topic)))
                }
                Access::Receive => decide(Request::receive(topic)),
                Access::Unsubscribe => false,
            }
        };
        lock(&self.decisions).remember(access, topic, allowed);
        allowed
    }
}

impl Grant {
    /// A claim grant for another client id: the same policies, `iot:Connect` evaluated on
    /// `client/<client_id>`; `None` when the claim policy does not allow it.
    fn for_client(&self, client_id: &str) -> Option<Grant> {
        let context = ConnectionContext {
            client_id: client_id.to_owned(),
            ..self.context.clone()
        };
        evaluate_policies(
            &self.policies,
            &self.arn,
            &context,
            &Request::connect(client_id),
        )
        .is_allowed()
        .then(|| Grant {
            thing_name: self.thing_name.clone(),
            claim_template: self.claim_template.clone(),
            policies: self.policies.clone(),
            context,
            arn: self.arn.clone(),
            decisions: Mutex::default(),
        })
    }

    /// The grant serve's CONNECT answer describes; an error names the policy that cannot
    /// be compiled (dropping one could drop a Deny, so the whole answer is refused).
    fn from_answer(allowed: &crate::serve::Allowed) -> Result<Grant, String> {
        let mut policies = Vec::with_capacity(allowed.policies.len());
        for text in &allowed.policies {
            policies.push(
                Policy::from_json(&text.document)
                    .map_err(|e| format!("policy {:?} cannot be used: {e}", text.name))?,
            );
        }
        let mut grant = Grant::new(
            allowed.thing_name.clone(),
            policies,
            allowed.context.clone(),
            ArnContext::new(allowed.arn.region.clone(), allowed.arn.account.clone()),
        );
        grant.claim_template = allowed.claim.as_ref().map(|c| c.template.clone());
        Ok(grant)
    }
}

#[derive(Debug)]
struct Session {
    /// Unique per session (instance id + counter): ownership tokens are bound to it.
    id: String,
    client_id: String,
    fingerprint: String,
    source_address: String,
    connected_at: u64,
    grant: Arc<Grant>,
    /// serve said the certificate is retired: deny everything until the kick lands.
    retired: bool,
    /// Another connection was accepted with this client id: mosquitto drops this one.
    taken_over: bool,
}

impl Session {
    /// The record of this session ending now, for serve's connection log.
    fn ended(self, reason: &str) -> DisconnectRecord {
        let reason = if self.taken_over {
            "duplicate_client_id"
        } else if self.retired {
            "certificate_retired"
        } else {
            reason
        };
        DisconnectRecord {
            client_id: self.client_id,
            fingerprint_sha256: self.fingerprint,
            source_address: self.source_address,
            connected_at: self.connected_at,
            disconnected_at: unix_now(),
            reason: reason.to_owned(),
        }
    }
}

#[derive(Debug)]
struct CacheEntry {
    grant: Arc<Grant>,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<ConnectionKey, Session>,
    /// (fingerprint, client id) → grant, for returning devices (and for devices just
    /// registered by RegisterThing, ahead of their first CONNECT).
    cache: HashMap<(String, String), CacheEntry>,
    /// Claim certificate fingerprint → its grant, whatever the client id: every device of
    /// a batch connects with the same claim and its own client id, and the claim policy's
    /// `iot:Connect` is evaluated here for each.
    claims: HashMap<String, CacheEntry>,
    /// Fingerprints serve retired since the last tick: their sessions are kicked there.
    to_kick: HashSet<String>,
}

#[derive(Debug)]
struct Shared {
    client: ServeClient,
    /// Random per start, so serve can tell a restarted broker's counters apart.
    instance: String,
    state: Mutex<State>,
    disconnects: Mutex<Vec<DisconnectRecord>>,
    logs: Mutex<Vec<LogLine>>,
    /// Whether `logs` may hold lines: every callback ends by draining them, and most have
    /// none, so the broker's thread checks this instead of taking the lock.
    logs_pending: std::sync::atomic::AtomicBool,
    metrics: Metrics,
    /// Sessions opened since start (for session ids).
    sessions_opened: std::sync::atomic::AtomicU64,
    /// Fleet Provisioning replies waiting for the broker's thread.
    replies: Mutex<Vec<PendingReply>>,
    /// Called when replies are queued.
    wake: std::sync::OnceLock<Wake>,
}

struct Wake(WakeHook);

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wake")
    }
}

/// A Fleet Provisioning request taken off the message path, for the provisioning threads.
#[derive(Debug)]
struct ProvisionJob {
    connection: ConnectionKey,
    session: String,
    client_id: String,
    fingerprint: String,
    topic: String,
    payload: Vec<u8>,
}

/// A reply to publish to one client from the broker's thread.
#[derive(Debug)]
struct PendingReply {
    connection: ConnectionKey,
    session: String,
    client_id: String,
    topic: String,
    payload: Vec<u8>,
}

/// A reply to publish now, to `client_id` only ([`Plugin::take_replies`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingReply {
    /// The client that asked.
    pub client_id: String,
    /// `<request topic>/accepted|rejected`.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Where a claim session's Fleet Provisioning request is re-routed once taken: a topic
/// no session may subscribe to or receive, so the request reaches no other client.
pub const PROVISIONING_SINK_TOPIC: &str = "$fleetcert/provisioning-request";

/// Fleet Provisioning requests waiting for the provisioning threads at most; past this
/// a request is dropped (the device times out and retries) rather than block the broker.
const MAX_QUEUED_PROVISION_REQUESTS: usize = 10_000;
/// Requests sent to serve in one call at most.
const PROVISION_BATCH: usize = 256;
/// Threads relaying Fleet Provisioning requests (a slow request does not hold the others).
const PROVISION_THREADS: usize = 2;
/// How long serve may take to answer a batch of Fleet Provisioning requests.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a topic is a Fleet Provisioning request (not a reply).
fn is_provisioning_request(topic: &str) -> bool {
    (topic.starts_with("$aws/certificates/create")
        || topic.starts_with("$aws/provisioning-templates/"))
        && (topic.ends_with("/json") || topic.ends_with("/cbor"))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock was caught at the FFI boundary; the maps are still
    // consistent (each update is one insert or remove), so go on rather than deny forever.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 16 random bytes, hex.
fn instance_id() -> Result<String, OptionError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| OptionError("the system random generator failed".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 of a certificate's DER, lowercase hex.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate's DER as PEM.
pub fn certificate_pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

impl Shared {
    /// Queues ended sessions for the worker (the oldest are dropped past the bound).
    fn queue_disconnects(&self, records: impl IntoIterator<Item = DisconnectRecord>) {
        let mut queue = lock(&self.disconnects);
        queue.extend(records);
        let excess = queue.len().saturating_sub(MAX_QUEUED_DISCONNECTS);
        queue.drain(..excess);
    }

    fn log(&self, level: LogLevel, message: impl Into<String>) {
        let mut logs = lock(&self.logs);
        if logs.len() >= MAX_QUEUED_LOG_LINES {
            logs.remove(0);
        }
        logs.push(LogLine {
            level,
            message: message.into(),
        });
        self.logs_pending
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Makes the broker reload its configuration (and with it the listener's CRL file): in
/// the broker, a SIGHUP to its own process ([`crate::ffi`]); in tests, a counter.
pub type ReloadHook = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Wakes the broker's event loop so `MOSQ_EVT_TICK` runs soon: mosquitto 2.0 waits up to
/// 100 ms for socket events between ticks, and Fleet Provisioning replies (made on the
/// provisioning threads) are published from the tick. In the broker, a signal to its
/// thread ([`crate::ffi`]); unset in tests (replies then wait for the next tick).
pub type WakeHook = Box<dyn Fn() + Send + Sync>;

/// Keeps the listener's `crlfile` equal to serve's current CRL (worker thread only).
struct CrlKeeper {
    file: std::path::PathBuf,
    interval: Duration,
    reload: ReloadHook,
    /// When the CRL was last checked.
    checked: Option<Instant>,
    /// Checks still to make at the next polls, whatever the interval (after serve retired
    /// a certificate: its CRL may be published a moment after the revocation is seen).
    soon: u8,
}

impl std::fmt::Debug for CrlKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlKeeper")
            .field("file", &self.file)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl CrlKeeper {
    fn due(&self) -> bool {
        self.soon > 0 || self.checked.is_none_or(|at| at.elapsed() >= self.interval)
    }

    /// Fetches serve's CRL; when it differs from the file, replaces the file atomically
    /// (a temporary file in the same directory, renamed over it) and reloads the broker.
    fn check(&mut self, shared: &Shared) {
        self.soon = self.soon.saturating_sub(1);
        self.checked = Some(Instant::now());
        let started = Instant::now();
        let fetched = shared.client.crl();
        shared
            .metrics
            .serve_call(started.elapsed(), fetched.is_ok());
        let pem = match fetched {
            Ok(pem) => pem,
            Err(e) => {
                shared.log(LogLevel::Warning, format!("CRL check failed: {e}"));
                return;
            }
        };
        if std::fs::read_to_string(&self.file).is_ok_and(|current| current == pem) {
            return;
        }
        match replace_file(&self.file, pem.as_bytes()) {
            Ok(()) => {
                shared.log(
                    LogLevel::Notice,
                    format!(
                        "{} replaced with serve's current CRL; reloading the broker",
                        self.file.display()
                    ),
                );
                if let Err(e) = (self.reload)() {
                    shared.log(
                        LogLevel::Error,
                        format!("cannot make the broker reload the CRL: {e}"),
                    );
                }
            }
            Err(e) => shared.log(
                LogLevel::Error,
                format!("cannot write {}: {e}", self.file.display()),
            ),
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and
/// renamed over it: mosquitto never reads half a CRL.
fn replace_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the CRL path names no file"))?;
    let staging = dir.join(format!(".{}.fleetcert-tmp", name.to_string_lossy()));
    let mut file = std::fs::File::create(&staging)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&staging, path)
}

/// The running plugin: its state and its worker thread.
#[derive(Debug)]
pub struct Plugin {
    shared: Arc<Shared>,
    stop: Option<Sender<()>>,
    worker: Option<JoinHandle<()>>,
    provisions: Option<std::sync::mpsc::SyncSender<ProvisionJob>>,
    provisioners: Vec<JoinHandle<()>>,
}

impl Plugin {
    /// Reads the secret and starts the worker. `reload` makes the broker reload its
    /// configuration; it is called (from the worker) when `plugin_opt_crl_file` was
    /// replaced with a newer CRL.
    pub fn start(options: &PluginOptions, reload: ReloadHook) -> Result<Plugin, OptionError> {
        let secret = options.read_secret()?;
        let client = ServeClient::new(&options.broker_api, &secret, options.timeout);
        let shared = Arc::new(Shared {
            client,
            instance: instance_id()?,
            state: Mutex::default(),
            disconnects: Mutex::default(),
            logs: Mutex::default(),
            logs_pending: std::sync::atomic::AtomicBool::new(false),
            metrics: Metrics::default(),
            sessions_opened: std::sync::atomic::AtomicU64::new(0),
            replies: Mutex::default(),
            wake: std::sync::OnceLock::new(),
        });
        let (stop, stopped) = channel();
        let worker_shared = Arc::clone(&shared);
        let interval = options.sessions_interval;
        let mut crl = options.crl_file.clone().map(|file| CrlKeeper {
            file,
            interval: options.crl_interval,
            reload,
            checked: None,
            soon: 0,
        });
        let worker = std::thread::Builder::new()
            .name("fleetcert-broker-api".into())
            .spawn(move || worker(&worker_shared, interval, crl.as_mut(), &stopped))
            .map_err(|e| OptionError(format!("cannot start the worker thread: {e}")))?;
        shared.log(
            LogLevel::Info,
            format!(
                "broker API {} (timeout {} ms, sessions every {} ms)",
                options.broker_api,
                options.timeout.as_millis(),
                options.sessions_interval.as_millis()
            ),
        );
        let (provisions, jobs) = std::sync::mpsc::sync_channel(MAX_QUEUED_PROVISION_REQUESTS);
        let jobs = Arc::new(Mutex::new(jobs));
        let provision_client = ServeClient::new(&options.broker_api, &secret, PROVISION_TIMEOUT);
        let mut provisioners = Vec::with_capacity(PROVISION_THREADS);
        for index in 0..PROVISION_THREADS {
            let shared = Arc::clone(&shared);
            let jobs = Arc::clone(&jobs);
            let client = provision_client.clone();
            let thread = std::thread::Builder::new()
                .name(format!("fleetcert-provision-{index}"))
                .spawn(move || provisioner(&shared, &client, &jobs))
                .map_err(|e| OptionError(format!("cannot start a provisioning thread: {e}")))?;
            provisioners.push(thread);
        }
        Ok(Plugin {
            shared,
            stop: Some(stop),
            worker: Some(worker),
            provisions: Some(provisions),
            provisioners,
        })
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Decides a CONNECT: from the cache for a returning device, else by asking serve
    /// (bounded by the timeout). Records the session when allowed.
    pub fn authenticate(&self, attempt: &ConnectAttempt<'_>) -> AuthAnswer {
        let shared = &*self.shared;
        let Some(der) = attempt.certificate_der else {
            shared.metrics.connect(ConnectResult::Refused);
            shared.log(
                LogLevel::Notice,
                format!(
                    "CONNECT {:?} refused: no client certificate",
                    attempt.client_id
                ),
            );
            return AuthAnswer::NotAuthorized;
        };
        let fingerprint = fingerprint_sha256(der);
        let key = (fingerprint.clone(), attempt.client_id.to_string());
        let (cached, claim) = {
            let now = Instant::now();
            let mut state = lock(&shared.state);
            let cached = match state.cache.get(&key) {
                Some(entry) if entry.expires_at > now => Some(Arc::clone(&entry.grant)),
                Some(_) => {
                    state.cache.remove(&key);
                    None
                }
                None => None,
            };
            let claim = match (&cached, state.claims.get(&fingerprint)) {
                (None, Some(entry)) if entry.expires_at > now => Some(Arc::clone(&entry.grant)),
                _ => None,
            };
            (cached, claim)
        };
        let cached = match (cached, claim) {
            (Some(grant), _) => Some(grant),
            (None, Some(claim)) => match claim.for_client(attempt.client_id) {
                Some(grant) => Some(Arc::new(grant)),
                None => {
                    shared.metrics.connect(ConnectResult::Refused);
                    shared.log(
                        LogLevel::Notice,
                        format!(
                            "CONNECT {:?} from {} refused: the claim policy does not allow iot:Connect",
                            attempt.client_id, attempt.source_address
                        ),
                    );
                    return AuthAnswer::NotAuthorized;
                }
            },
            (None, None) => None,
        };
        if let Some(grant) = cached {
            shared.metrics.connect(ConnectResult::AllowedFromCache);
            shared.log(
                LogLevel::Info,
                format!(
                    "CONNECT {:?} from {} allowed from the cache: thing {:?}",
                    attempt.client_id, attempt.source_address, grant.thing_name
                ),
            );
            self.open_session(attempt, fingerprint, grant);
            return AuthAnswer::Allowed;
        }

        let pem = certificate_pem(der);
        let request = ConnectRequest {
            client_id: attempt.client_id,
            certificate_pem: &pem,
            source_address: attempt.source_address,
            username: attempt.username,
        };
        let started = Instant::now();
        let answer = shared.client.connect(&request);
        shared.metrics.serve_call(started.elapsed(), answer.is_ok());
        let allowed = match answer {
            Err(e) => {
                shared.metrics.connect(ConnectResult::Unavailable);
                shared.log(
                    LogLevel::Error,
                    format!(
                        "CONNECT {:?} refused: serve unavailable: {e}",
                        attempt.client_id
                    ),
                );
                return AuthAnswer::Unavailable;
            }
            Ok(ConnectAnswer::Refused(refused)) => {
                shared.metrics.connect(ConnectResult::Refused);
                shared.log(
                    LogLevel::Notice,
                    format!(
                        "CONNECT {:?} from {} refused by serve: {} ({}) {}",
                        attempt.client_id,
                        attempt.source_address,
                        refused.reason,
                        refused.code,
                        refused.message
                    ),
                );
                return AuthAnswer::NotAuthorized;
            }
            Ok(ConnectAnswer::Allowed(allowed)) => allowed,
        };
        if allowed.context.client_id != attempt.client_id {
            shared.metrics.connect(ConnectResult::Unavailable);
            shared.log(
                LogLevel::Error,
                format!(
                    "CONNECT {:?} refused: serve answered for client id {:?}",
                    attempt.client_id, allowed.context.client_id
                ),
            );
            return AuthAnswer::Unavailable;
        }
        let grant = match Grant::from_answer(&allowed) {
            Ok(grant) => Arc::new(grant),
            Err(e) => {
                shared.metrics.connect(ConnectResult::Unavailable);
                shared.log(
                    LogLevel::Error,
                    format!("CONNECT {:?} refused: {e}", attempt.client_id),
                );
                return AuthAnswer::Unavailable;
            }
        };
        if allowed.cache_seconds > 0 {
            let entry = CacheEntry {
                grant: Arc::clone(&grant),
                expires_at: Instant::now() + Duration::from_secs(allowed.cache_seconds),
            };
            let mut state = lock(&shared.state);
            if grant.claim_template.is_some() {
                state.claims.insert(key.0, entry);
            } else {
                state.cache.insert(key, entry);
            }
        }
        shared.metrics.connect(ConnectResult::AllowedByServe);
        shared.log(
            LogLevel::Info,
            format!(
                "CONNECT {:?} from {} (MQTT level {}) allowed: thing {:?}{}",
                attempt.client_id,
                attempt.source_address,
                attempt.protocol_version,
                allowed.thing_name,
                if allowed.registered {
                    " (registered now)"
                } else {
                    ""
                }
            ),
        );
        self.open_session(attempt, fingerprint, grant);
        AuthAnswer::Allowed
    }

    fn open_session(&self, attempt: &ConnectAttempt<'_>, fingerprint: String, grant: Arc<Grant>) {
        let number = self
            .shared
            .sessions_opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = Session {
            id: format!("{}-{number}", self.shared.instance),
            client_id: attempt.client_id.to_string(),
            fingerprint,
            source_address: attempt.source_address.to_string(),
            connected_at: unix_now(),
            grant,
            retired: false,
            taken_over: false,
        };
        let mut state = lock(&self.shared.state);
        // mosquitto disconnects a live connection whose client id a new one takes
        // (session takeover): the audit's CONFLICTING_CLIENT_IDS check reads this.
        for other in state.sessions.values_mut() {
            if other.client_id == attempt.client_id {
                other.taken_over = true;
            }
        }
        state.sessions.insert(attempt.connection, session);
    }

    /// Decides a SUBSCRIBE, PUBLISH or delivery in process: the session's policies, no I/O.
    /// An unknown or retired session is denied.
    pub fn authorize(&self, connection: ConnectionKey, access: Access, topic: &str) -> bool {
        let shared = &*self.shared;
        // Taken Fleet Provisioning requests go there: nobody subscribes or receives.
        if topic.starts_with("$fleetcert") && !matches!(access, Access::Publish { .. }) {
            return false;
        }
        let grant = {
            let state = lock(&shared.state);
            match state.sessions.get(&connection) {
                Some(session) if !session.retired => Some(Arc::clone(&session.grant)),
                _ => None,
            }
        };
        let kind = match access {
            Access::Subscribe => AclKind::Subscribe,
            Access::Publish { .. } => AclKind::Publish,
            Access::Receive => AclKind::Receive,
            Access::Unsubscribe => return grant.is_some(),
        };
        let allowed = grant.is_some_and(|grant| grant.allows(access, topic));
        shared.metrics.acl(kind, allowed);
        if !allowed {
            shared.log(
                LogLevel::Debug,
                format!(
                    "{kind:?} {topic:?} denied for connection {:#x}",
                    connection.0
                ),
            );
        }
        allowed
    }

    /// Forgets a session and queues its record for the worker.
    pub fn disconnected(&self, connection: ConnectionKey) {
        let Some(session) = lock(&self.shared.state).sessions.remove(&connection) else {
            return;
        };
        self.shared
            .queue_disconnects(std::iter::once(session.ended("disconnected")));
    }

    /// On the broker's thread, periodically: the client ids to kick now (sessions of
    /// certificates serve retired). Only sessions still live with a retired certificate are
    /// named, so a client id reused by a new certificate is not kicked.
    pub fn tick(&self) -> Vec<String> {
        let mut state = lock(&self.shared.state);
        if state.to_kick.is_empty() {
            return Vec::new();
        }
        let retired = std::mem::take(&mut state.to_kick);
        let kicks: Vec<String> = state
            .sessions
            .values()
            .filter(|s| retired.contains(&s.fingerprint))
            .map(|s| s.client_id.clone())
            .collect();
        drop(state);
        self.shared.metrics.kicks(kicks.len());
        for client_id in &kicks {
            self.shared.log(
                LogLevel::Notice,
                format!("kicking {client_id:?}: certificate retired"),
            );
        }
        kicks
    }

    /// On the broker's thread, for every PUBLISH that passed its ACL check: a claim
    /// session's Fleet Provisioning request is taken (queued for the provisioning threads,
    /// which ask serve) and must not be routed — true means: re-route it to
    /// [`PROVISIONING_SINK_TOPIC`], not retained. The reply goes to this client only.
    pub fn take_provisioning_request(
        &self,
        connection: ConnectionKey,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        if !is_provisioning_request(topic) {
            return false;
        }
        let job = {
            let state = lock(&self.shared.state);
            let Some(session) = state.sessions.get(&connection) else {
                return false;
            };
            if session.grant.claim_template.is_none() {
                return false;
            }
            ProvisionJob {
                connection,
                session: session.id.clone(),
                client_id: session.client_id.clone(),
                fingerprint: session.fingerprint.clone(),
                topic: topic.to_owned(),
                payload: payload.to_vec(),
            }
        };
        let queued = self
            .provisions
            .as_ref()
            .is_some_and(|tx| tx.try_send(job).is_ok());
        self.shared.metrics.provisioning(
            if queued {
                ProvisioningEvent::Request
            } else {
                ProvisioningEvent::Dropped
            },
            1,
        );
        if !queued {
            self.shared.log(
                LogLevel::Warning,
                format!("Fleet Provisioning request on {topic:?} dropped: too many waiting"),
            );
        }
        // Taken either way: a claim session's request is never routed to other clients.
        true
    }

    /// On the broker's thread: Fleet Provisioning replies to publish now, each to the
    /// client that asked — only while the session that asked is still connected and
    /// has not been taken over by another connection with its client id.
    pub fn take_replies(&self) -> Vec<OutgoingReply> {
        let pending = std::mem::take(&mut *lock(&self.shared.replies));
        if pending.is_empty() {
            return Vec::new();
        }
        let state = lock(&self.shared.state);
        let waiting = pending.len();
        let live: Vec<OutgoingReply> = pending
            .into_iter()
            .filter(|reply| {
                state.sessions.get(&reply.connection).is_some_and(|s| {
                    s.id == reply.session && !s.taken_over && s.client_id == reply.client_id
                })
            })
            .map(|reply| OutgoingReply {
                client_id: reply.client_id,
                topic: reply.topic,
                payload: reply.payload,
            })
            .collect();
        let metrics = &self.shared.metrics;
        metrics.provisioning(ProvisioningEvent::Reply, live.len());
        metrics.provisioning(ProvisioningEvent::Dropped, waiting - live.len());
        live
    }

    /// The log lines waiting for the broker's log.
    pub fn drain_logs(&self) -> Vec<LogLine> {
        use std::sync::atomic::Ordering::{Acquire, Release};
        if !self.shared.logs_pending.load(Acquire) {
            return Vec::new();
        }
        let mut logs = lock(&self.shared.logs);
        // Cleared under the lock: a line pushed after this sets it again.
        self.shared.logs_pending.store(false, Release);
        std::mem::take(&mut *logs)
    }

    /// The thing of a live session (for tests and diagnostics).
    pub fn session_thing(&self, connection: ConnectionKey) -> Option<String> {
        lock(&self.shared.state)
            .sessions
            .get(&connection)
            .map(|s| s.grant.thing_name.clone())
    }

    /// Sets how the provisioning threads wake the broker's loop when replies are ready
    /// (once; later calls are ignored).
    pub fn set_wake_hook(&self, wake: WakeHook) {
        let _ = self.shared.wake.set(Wake(wake));
    }

    /// Stops the worker (it sends what is queued first, within one timeout per call).
    pub fn shutdown(mut self) {
        self.stop_worker();
    }

    fn stop_worker(&mut self) {
        // Sessions still open when the broker stops are recorded as ended now (the worker
        // sends what is queued before it returns).
        if self.stop.is_some() {
            let live: Vec<Session> = lock(&self.shared.state)
                .sessions
                .drain()
                .map(|(_, session)| session)
                .collect();
            self.shared
                .queue_disconnects(live.into_iter().map(|s| s.ended("broker_stopped")));
        }
        drop(self.stop.take());
        drop(self.provisions.take());
        for thread in self.provisioners.drain(..) {
            let _ = thread.join();
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// The worker: every `interval`, sends queued disconnects and asks which live sessions
/// must go. Returns when `stop` is dropped.
fn worker(
    shared: &Shared,
    interval: Duration,
    mut crl: Option<&mut CrlKeeper>,
    stop: &Receiver<()>,
) {
    let mut last_metrics = Instant::now();
    loop {
        let stopping = !matches!(stop.recv_timeout(interval), Err(RecvTimeoutError::Timeout));
        send_disconnects(shared);
        if stopping {
            shared.log(LogLevel::Info, shared.metrics.summary());
            return;
        }
        let retired = poll_sessions(shared);
        if let Some(crl) = crl.as_deref_mut() {
            if retired {
                crl.soon = 2;
            }
            if crl.due() {
                crl.check(shared);
            }
        }
        if last_metrics.elapsed() >= METRICS_INTERVAL {
            last_metrics = Instant::now();
            shared.log(LogLevel::Info, shared.metrics.summary());
        }
    }
}

/// A provisioning thread: takes the waiting requests (up to a batch), asks serve for
/// the replies in one call, and leaves them for the broker's thread. Returns when the
/// plugin stops.
fn provisioner(shared: &Shared, client: &ServeClient, jobs: &Mutex<Receiver<ProvisionJob>>) {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::STANDARD;
    loop {
        let batch: Vec<ProvisionJob> = {
            let jobs = lock(jobs);
            let Ok(first) = jobs.recv() else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < PROVISION_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        let requests: Vec<crate::serve::ProvisionRequest> = batch
            .iter()
            .enumerate()
            .map(|(id, job)| crate::serve::ProvisionRequest {
                id: id as u64,
                session: job.session.clone(),
                fingerprint_sha256: job.fingerprint.clone(),
                topic: job.topic.clone(),
                payload_b64: b64.encode(&job.payload),
            })
            .collect();
        let started = Instant::now();
        let answered = client.provision(&requests);
        shared
            .metrics
            .serve_call(started.elapsed(), answered.is_ok());
        let mut replies = Vec::with_capacity(batch.len());
        match answered {
            Ok(answers) => {
                for answer in answers {
                    let (Some(job), Ok(payload)) = (
                        usize::try_from(answer.id).ok().and_then(|i| batch.get(i)),
                        b64.decode(&answer.payload_b64),
                    ) else {
                        continue;
                    };
                    // serve answers on the request's own accepted/rejected topics only.
                    if !(answer.topic == format!("{}/accepted", job.topic)
                        || answer.topic == format!("{}/rejected", job.topic))
                    {
                        continue;
                    }
                    if let Some(allowed) = &answer.grant {
                        remember_ahead(shared, allowed);
                    }
                    replies.push(PendingReply {
                        connection: job.connection,
                        session: job.session.clone(),
                        client_id: job.client_id.clone(),
                        topic: answer.topic,
                        payload,
                    });
                }
            }
            Err(e) => {
                shared.log(
                    LogLevel::Error,
                    format!(
                        "{} Fleet Provisioning requests failed: serve unavailable: {e}",
                        batch.len()
                    ),
                );
                // Fail visibly: a JSON request gets AWS's ServiceUnavailable rejection.
                for job in batch.iter().filter(|j| j.topic.ends_with("/json")) {
                    let payload = serde_json::json!({
                        "statusCode": 503,
                        "errorCode": "ServiceUnavailable",
                        "errorMessage": "fleetcert cannot be reached; try again",
                    });
                    replies.push(PendingReply {
                        connection: job.connection,
                        session: job.session.clone(),
                        client_id: job.client_id.clone(),
                        topic: format!("{}/rejected", job.topic),
                        payload: payload.to_string().into_bytes(),
                    });
                }
            }
        }
        lock(&shared.replies).extend(replies);
        if let Some(Wake(wake)) = shared.wake.get() {
            wake();
        }
    }
}

/// Caches the answer serve gave ahead for a device RegisterThing just registered (its
/// certificate and client id = thing name), so its first CONNECT is answered at once
/// instead of by a call on the broker's thread.
fn remember_ahead(shared: &Shared, allowed: &crate::serve::Allowed) {
    if allowed.cache_seconds == 0
        || allowed.claim.is_some()
        || allowed.fingerprint_sha256.is_empty()
    {
        return;
    }
    match Grant::from_answer(allowed) {
        Ok(grant) => {
            let key = (
                allowed.fingerprint_sha256.to_ascii_lowercase(),
                allowed.context.client_id.clone(),
            );
            let entry = CacheEntry {
                grant: Arc::new(grant),
                expires_at: Instant::now() + Duration::from_secs(allowed.cache_seconds),
            };
            lock(&shared.state).cache.insert(key, entry);
        }
        Err(e) => shared.log(
            LogLevel::Warning,
            format!(
                "a grant made ahead for thing {:?} is not cached: {e}",
                allowed.thing_name
            ),
        ),
    }
}

fn send_disconnects(shared: &Shared) {
    let batch = std::mem::take(&mut *lock(&shared.disconnects));
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let result = shared.client.disconnect(&batch);
    shared.metrics.serve_call(started.elapsed(), result.is_ok());
    if let Err(e) = result {
        shared.log(
            LogLevel::Warning,
            format!(
                "could not send {} disconnect records (kept for the next try): {e}",
                batch.len()
            ),
        );
        let mut queue = lock(&shared.disconnects);
        let newer = std::mem::replace(&mut *queue, batch);
        queue.extend(newer);
        let excess = queue.len().saturating_sub(MAX_QUEUED_DISCONNECTS);
        queue.drain(..excess);
    }
}

/// Asks serve which live sessions must go and marks them; true when serve retired any.
fn poll_sessions(shared: &Shared) -> bool {
    // Cached certificates too: a revoked device must not come back from the cache.
    let (fingerprints, sessions): (Vec<String>, usize) = {
        let mut state = lock(&shared.state);
        // Expired entries go here (a lookup only drops its own key): devices that never
        // come back, and grants made ahead for devices that never connect.
        let now = Instant::now();
        state.cache.retain(|_, entry| entry.expires_at > now);
        state.claims.retain(|_, entry| entry.expires_at > now);
        let mut all: HashSet<&String> = state.sessions.values().map(|s| &s.fingerprint).collect();
        all.extend(state.cache.keys().map(|(fingerprint, _)| fingerprint));
        all.extend(state.claims.keys());
        (all.into_iter().cloned().collect(), state.sessions.len())
    };
    // Asked even with no sessions: the counters reach serve's /metrics this way.
    let report = BrokerReport {
        instance: shared.instance.clone(),
        sessions: sessions as u64,
        metrics: shared.metrics.snapshot(),
    };
    let started = Instant::now();
    let result = shared.client.sessions(&fingerprints, &report);
    shared.metrics.serve_call(started.elapsed(), result.is_ok());
    let retired = match result {
        Ok(retired) => retired,
        Err(e) => {
            shared.log(LogLevel::Warning, format!("sessions poll failed: {e}"));
            return false;
        }
    };
    if retired.is_empty() {
        return false;
    }
    let mut state = lock(&shared.state);
    for entry in retired {
        let fingerprint = entry.fingerprint_sha256.to_ascii_lowercase();
        state.cache.retain(|(cached, _), _| *cached != fingerprint);
        state.claims.remove(&fingerprint);
        let mut live = false;
        for session in state.sessions.values_mut() {
            if session.fingerprint == fingerprint {
                session.retired = true;
                live = true;
            }
        }
        if live {
            state.to_kick.insert(fingerprint.clone());
        }
        shared.log(
            LogLevel::Notice,
            format!(
                "certificate {fingerprint} retired by serve ({})",
                entry.reason
            ),
        );
    }
    true
}

#[cfg(test)]
mod tests;
