//! Prometheus metrics for `/metrics` on the admin listener.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionResultLabel {
    action: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

fn latency_buckets() -> Histogram {
    // 0.5 ms .. ~4 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 14,
    ))
}

/// Counters and latency histograms of the device listener.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    handshakes: Family<ResultLabel, Counter>,
    connects: Family<StatusLabel, Counter>,
    rejections: Family<ReasonLabel, Counter>,
    handshake_seconds: Histogram,
    connect_seconds: Family<StatusLabel, Histogram>,
    rotations: Family<StageLabel, Counter>,
    requests: Family<EndpointLabel, Counter>,
    mirror_operations: Family<ResultLabel, Counter>,
    mirror_backlog: Family<StateLabel, Gauge>,
    mirror_oldest_pending_seconds: Gauge,
    audit_non_compliant: Family<CheckLabel, Gauge>,
    audit_last_task_timestamp: Gauge,
    open_connections: Gauge,
    broker: BrokerMetrics,
    /// When a device request last got `registry_unavailable` with no registry write
    /// succeeding since: `/healthz` reports that rather than its own small probe, which can
    /// still fit in space a larger registration's commit cannot (a full disk).
    registry_failing_since: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a device request's `registry_unavailable` keeps `/healthz` unhealthy when no
/// registry write succeeds after it (after that, the write probe answers alone).
pub(crate) const REGISTRY_FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// Counts one device connection as open until dropped (see [`Metrics::connection_opened`]).
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every counter at zero, registered under the `fleetcert_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetcert");
        let handshakes = Family::<ResultLabel, Counter>::default();
        let connects = Family::<StatusLabel, Counter>::default();
        let rejections = Family::<ReasonLabel, Counter>::default();
        let handshake_seconds = latency_buckets();
        let connect_seconds =
            Family::<StatusLabel, Histogram>::new_with_constructor(latency_buckets as fn() -> _);
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "device connections accepted and not yet closed (in the handshake or serving)",
            open_connections.clone(),
        );
        registry.register(
            "tls_handshakes",
            "mutual-TLS handshakes on the device listener, by result",
            handshakes.clone(),
        );
        registry.register(
            "connects",
            "POST /v1/connect answered, by status (provisioned = first connect, known = returning)",
            connects.clone(),
        );
        registry.register(
            "rejections",
            "connections or requests refused, by reason",
            rejections.clone(),
        );
        registry.register(
            "tls_handshake_seconds",
            "time to complete a mutual-TLS handshake",
            handshake_seconds.clone(),
        );
        registry.register(
            "connect_seconds",
            "time to answer POST /v1/connect, by status",
            connect_seconds.clone(),
        );
        let rotations = Family::<StageLabel, Counter>::default();
        registry.register(
            "rotations",
            "certificate rotations by stage: due (opened), issued, delivered, confirmed (old certificate revoked after the device used the new one), failed",
            rotations.clone(),
        );
        let requests = Family::<EndpointLabel, Counter>::default();
        registry.register(
            "device_requests",
            "requests answered successfully on the device listener, by endpoint (est_simplereenroll, est_cacerts, replacement, crl)",
            requests.clone(),
        );
        for stage in ["due", "issued", "delivered", "confirmed", "failed"] {
            let _ = rotations.get_or_create(&StageLabel {
                stage: stage.into(),
            });
        }
        let mirror_operations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "mirror_operations",
            "AWS IoT mirror operations by result (applied, retried, parked), since start",
            mirror_operations.clone(),
        );
        let mirror_backlog = Family::<StateLabel, Gauge>::default();
        registry.register(
            "mirror_backlog",
            "AWS IoT mirror outbox: operations pending (all), retrying (after an error), parked",
            mirror_backlog.clone(),
        );
        let mirror_oldest_pending_seconds = Gauge::default();
        registry.register(
            "mirror_oldest_pending_seconds",
            "Age of the oldest pending AWS IoT mirror operation (0 when none)",
            mirror_oldest_pending_seconds.clone(),
        );
        let audit_non_compliant = Family::<CheckLabel, Gauge>::default();
        registry.register(
            "audit_non_compliant_resources",
            "Device Defender audit: unsuppressed non-compliant resources per check, as of the last audit task serve ran",
            audit_non_compliant.clone(),
        );
        let audit_last_task_timestamp = Gauge::default();
        registry.register(
            "audit_last_task_timestamp_seconds",
            "Unix time of the last audit task serve ran (0: none yet)",
            audit_last_task_timestamp.clone(),
        );
        let broker = BrokerMetrics::register(&mut registry);
        Metrics {
            registry,
            broker,
            handshakes,
            connects,
            rejections,
            handshake_seconds,
            connect_seconds,
            rotations,
            requests,
            mirror_operations,
            mirror_backlog,
            mirror_oldest_pending_seconds,
            audit_non_compliant,
            audit_last_task_timestamp,
            open_connections,
            registry_failing_since: std::sync::Mutex::new(None),
        }
    }

    /// Sets the audit gauges from a finished task: (check, unsuppressed non-compliant
    /// resources) for every check it ran, and when it ran.
    pub fn audit_report(&self, checks: &[(&str, u64)], at: i64) {
        for (check, non_compliant) in checks {
            self.audit_non_compliant
                .get_or_create(&CheckLabel {
                    check: (*check).to_owned(),
                })
                .set(i64::try_from(*non_compliant).unwrap_or(i64::MAX));
        }
        self.audit_last_task_timestamp.set(at);
    }

    fn registry_write_ok(&self) {
        *self
            .registry_failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// How long ago device requests last found the registry unavailable, if that is
    /// still the latest news (no write succeeded since, within [`REGISTRY_FAILURE_MEMORY`]).
    pub(crate) fn registry_failing(&self) -> Option<Duration> {
        let since = *self
            .registry_failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        since
            .map(|at| at.elapsed())
            .filter(|ago| *ago < REGISTRY_FAILURE_MEMORY)
    }

    /// Counts a device connection as open until the returned guard is dropped.
    pub(crate) fn connection_opened(&self) -> OpenConnection {
        self.open_connections.inc();
        OpenConnection(self.open_connections.clone())
    }

    pub(crate) fn handshake_ok(&self, took: Duration) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: "ok".into(),
            })
            .inc();
        self.handshake_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn handshake_failed(&self, error: &std::io::Error) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: "failed".into(),
            })
            .inc();
        let reason = match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                "certificate_revoked"
            }
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) => "certificate_expired",
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. },
            )) => "certificate_not_yet_valid",
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                "certificate_unknown_issuer"
            }
            Some(rustls::Error::InvalidCertificate(_)) => "certificate_invalid",
            Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
            Some(rustls::Error::PeerIncompatible(_)) => "incompatible_client",
            Some(_) => "tls_error",
            None => "io_error",
        };
        self.rejected(reason);
    }

    pub(crate) fn rejected(&self, reason: &str) {
        if reason == "registry_unavailable" {
            *self
                .registry_failing_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        }
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn connect(&self, status: &str, took: Duration) {
        if status == "provisioned" {
            self.registry_write_ok();
        }
        let label = StatusLabel {
            status: status.to_owned(),
        };
        self.connects.get_or_create(&label).inc();
        self.connect_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }

    pub(crate) fn request(&self, endpoint: &str) {
        self.requests
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.to_owned(),
            })
            .inc();
    }

    /// Times serve's answer to one broker CONNECT (`POST /broker/v1/connect`).
    pub(crate) fn broker_connect_answered(&self, took: Duration) {
        self.broker.connect_seconds.observe(took.as_secs_f64());
    }

    /// Takes in a broker plugin's counters (cumulative since that plugin `instance`
    /// started): the increments since its previous report are added to the
    /// `fleetcert_broker_*` counters.
    pub(crate) fn broker_report(&self, instance: &str, report: &BrokerCounters) {
        self.broker.report(instance, report);
    }

    /// Brings the rotation counters up to the totals kept by the lifecycle layer (the
    /// worker and the device endpoints count there; this exports them).
    pub fn sync_rotations(&self, stats: &fleetcert_lifecycle::rotation::RotationStats) {
        use std::sync::atomic::Ordering::Relaxed;
        for (stage, total) in [
            ("due", stats.due.load(Relaxed)),
            ("issued", stats.issued.load(Relaxed)),
            ("delivered", stats.delivered.load(Relaxed)),
            ("confirmed", stats.confirmed.load(Relaxed)),
            ("failed", stats.failed.load(Relaxed)),
        ] {
            let counter = self.rotations.get_or_create(&StageLabel {
                stage: stage.into(),
            });
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
    }

    /// Brings the mirror counters up to the worker's totals and sets the backlog gauges.
    pub fn sync_mirror(
        &self,
        stats: &fleetcert_lifecycle::mirror::MirrorStats,
        backlog: &fleetcert_lifecycle::mirror::MirrorBacklog,
        now: i64,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        for (result, total) in [
            ("applied", stats.applied.load(Relaxed)),
            ("retried", stats.retried.load(Relaxed)),
            ("parked", stats.parked.load(Relaxed)),
        ] {
            let counter = self.mirror_operations.get_or_create(&ResultLabel {
                result: result.into(),
            });
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
        for (state, value) in [
            ("pending", backlog.pending),
            ("retrying", backlog.retrying),
            ("parked", backlog.parked),
        ] {
            self.mirror_backlog
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(value);
        }
        self.mirror_oldest_pending_seconds.set(
            backlog
                .oldest_pending
                .as_ref()
                .map_or(0, |op| (now - op.created_at).max(0)),
        );
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// CONNECTs by result as a broker plugin counts them (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub(crate) struct BrokerConnectCounts {
    pub allowed_serve: u64,
    pub allowed_cache: u64,
    pub refused: u64,
    pub unavailable: u64,
}

/// ACL decisions of one kind as a broker plugin counts them (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub(crate) struct BrokerAclCounts {
    pub allowed: u64,
    pub denied: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct BrokerProvisioningCounts {
    pub requests: u64,
    pub replies: u64,
    pub dropped: u64,
}

/// A broker plugin's counters, as it sends them with each sessions poll
/// (docs/broker-api.md). Cumulative since the plugin started, except `serve_micros_max`
/// (the longest call since its previous report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub(crate) struct BrokerCounters {
    pub connects: BrokerConnectCounts,
    /// Absent from plugins older than provisioning by claim.
    #[serde(default)]
    pub provisioning: BrokerProvisioningCounts,
    pub subscribe: BrokerAclCounts,
    pub publish: BrokerAclCounts,
    pub receive: BrokerAclCounts,
    pub kicks: u64,
    pub serve_calls: u64,
    pub serve_failures: u64,
    pub serve_micros_total: u64,
    pub serve_micros_max: u64,
    /// Live sessions at the report (sent beside the counters; kept here for the gauge).
    #[serde(skip)]
    pub sessions: u64,
}

/// Broker plugin instances remembered at most (a restart makes a new one; the oldest
/// are forgotten first).
const BROKER_INSTANCES_KEPT: usize = 64;
/// A broker instance that has not reported for this long no longer counts towards the
/// live-sessions gauge.
const BROKER_REPORT_STALE: Duration = Duration::from_secs(60);

/// The `fleetcert_broker_*` metrics: the mosquitto plugins' own counters, reported with
/// their sessions polls, and serve's time to answer a broker CONNECT.
#[derive(Debug)]
struct BrokerMetrics {
    connects: Family<ResultLabel, Counter>,
    acl: Family<ActionResultLabel, Counter>,
    kicks: Counter,
    provisioning: Family<ResultLabel, Counter>,
    api_calls: Family<ResultLabel, Counter>,
    api_call_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    api_call_max_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    sessions: Gauge,
    connect_seconds: Histogram,
    last: std::sync::Mutex<Vec<(String, std::time::Instant, BrokerCounters)>>,
}

impl BrokerMetrics {
    fn register(registry: &mut Registry) -> BrokerMetrics {
        let metrics = BrokerMetrics {
            connects: Family::default(),
            acl: Family::default(),
            kicks: Counter::default(),
            provisioning: Family::default(),
            api_calls: Family::default(),
            api_call_seconds: Counter::default(),
            api_call_max_seconds: Gauge::default(),
            sessions: Gauge::default(),
            connect_seconds: latency_buckets(),
            last: std::sync::Mutex::new(Vec::new()),
        };
        registry.register(
            "broker_connects",
            "MQTT CONNECTs decided by the mosquitto plugin, by result: allowed_serve (asked serve), allowed_cache (returning device, from the plugin's cache), refused, unavailable (serve unreachable: refused, fail closed)",
            metrics.connects.clone(),
        );
        registry.register(
            "broker_acl_decisions",
            "SUBSCRIBE, PUBLISH and delivery decisions made by the mosquitto plugin in process, by action (subscribe, publish, receive) and result (allowed, denied)",
            metrics.acl.clone(),
        );
        registry.register(
            "broker_kicks",
            "MQTT clients dropped by the plugin because their certificate was revoked or retired by a rotation",
            metrics.kicks.clone(),
        );
        registry.register(
            "broker_provisioning_messages",
            "Fleet Provisioning messages handled by the mosquitto plugin, by result: request (taken off the message path for serve), reply (published to the asking client), dropped (too many waiting, or the asking session gone)",
            metrics.provisioning.clone(),
        );
        registry.register(
            "broker_api_calls",
            "calls from the mosquitto plugin to serve's broker API, by result (ok, failed), as the plugin saw them",
            metrics.api_calls.clone(),
        );
        registry.register(
            "broker_api_call_seconds",
            "time the mosquitto plugin spent in calls to serve's broker API (divide by broker_api_calls for the mean)",
            metrics.api_call_seconds.clone(),
        );
        registry.register(
            "broker_api_call_max_seconds",
            "the longest call from the mosquitto plugin to serve in its latest report interval",
            metrics.api_call_max_seconds.clone(),
        );
        registry.register(
            "broker_sessions",
            "live MQTT sessions on the brokers reporting within the last minute",
            metrics.sessions.clone(),
        );
        registry.register(
            "broker_connect_seconds",
            "time serve took to answer a broker CONNECT (POST /broker/v1/connect), registrations included",
            metrics.connect_seconds.clone(),
        );
        for result in ["allowed_serve", "allowed_cache", "refused", "unavailable"] {
            let _ = metrics.connects.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        metrics
    }

    fn report(&self, instance: &str, report: &BrokerCounters) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let previous = match last.iter().position(|(id, _, _)| id == instance) {
            Some(i) => last.remove(i).2,
            None => BrokerCounters::default(),
        };
        if last.len() >= BROKER_INSTANCES_KEPT {
            last.remove(0);
        }
        last.push((instance.to_owned(), now, *report));
        // Increments since the previous report; a counter that went down (cannot happen
        // within one instance) counts from zero rather than going negative.
        let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
        let add = |counter: &Counter, now: u64, before: u64| {
            let d = delta(now, before);
            if d > 0 {
                counter.inc_by(d);
            }
        };
        let (c, p) = (&report.connects, &previous.connects);
        for (result, now, before) in [
            ("allowed_serve", c.allowed_serve, p.allowed_serve),
            ("allowed_cache", c.allowed_cache, p.allowed_cache),
            ("refused", c.refused, p.refused),
            ("unavailable", c.unavailable, p.unavailable),
        ] {
            add(
                &self.connects.get_or_create(&ResultLabel {
                    result: result.into(),
                }),
                now,
                before,
            );
        }
        for (action, now, before) in [
            ("subscribe", report.subscribe, previous.subscribe),
            ("publish", report.publish, previous.publish),
            ("receive", report.receive, previous.receive),
        ] {
            for (result, n, b) in [
                ("allowed", now.allowed, before.allowed),
                ("denied", now.denied, before.denied),
            ] {
                add(
                    &self.acl.get_or_create(&ActionResultLabel {
                        action: action.into(),
                        result: result.into(),
                    }),
                    n,
                    b,
                );
            }
        }
        add(&self.kicks, report.kicks, previous.kicks);
        let (v, w) = (&report.provisioning, &previous.provisioning);
        for (result, now, before) in [
            ("request", v.requests, w.requests),
            ("reply", v.replies, w.replies),
            ("dropped", v.dropped, w.dropped),
        ] {
            add(
                &self.provisioning.get_or_create(&ResultLabel {
                    result: result.into(),
                }),
                now,
                before,
            );
        }
        let failures = delta(report.serve_failures, previous.serve_failures);
        let calls = delta(report.serve_calls, previous.serve_calls);
        add(
            &self.api_calls.get_or_create(&ResultLabel {
                result: "ok".into(),
            }),
            calls.saturating_sub(failures),
            0,
        );
        add(
            &self.api_calls.get_or_create(&ResultLabel {
                result: "failed".into(),
            }),
            failures,
            0,
        );
        let micros = delta(report.serve_micros_total, previous.serve_micros_total);
        self.api_call_seconds.inc_by(micros as f64 / 1e6);
        self.api_call_max_seconds
            .set(report.serve_micros_max as f64 / 1e6);
        let live: u64 = last
            .iter()
            .filter(|(_, at, _)| now.duration_since(*at) < BROKER_REPORT_STALE)
            .map(|(_, _, r)| r.sessions)
            .sum();
        self.sessions.set(i64::try_from(live).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    /// Cumulative plugin counters become increments per instance; a restarted plugin (a
    /// new instance) starts from zero without taking anything back.
    #[test]
    fn broker_reports_add_increments_per_instance() {
        let metrics = Metrics::new();
        let mut report = BrokerCounters::default();
        report.connects.allowed_serve = 3;
        report.publish.denied = 2;
        report.serve_calls = 4;
        report.serve_failures = 1;
        report.serve_micros_total = 2_000_000;
        report.sessions = 3;
        metrics.broker_report("a", &report);
        report.connects.allowed_serve = 5;
        report.kicks = 1;
        metrics.broker_report("a", &report);
        let mut restarted = BrokerCounters::default();
        restarted.connects.allowed_serve = 1;
        restarted.sessions = 1;
        metrics.broker_report("b", &restarted);
        let text = metrics.encode();
        let has = |prefix: &str, value: &str| {
            let found = line(&text, prefix);
            assert_eq!(
                found.and_then(|l| l.rsplit(' ').next()),
                Some(value),
                "{prefix}: {found:?}\n{text}"
            );
        };
        has(
            "fleetcert_broker_connects_total{result=\"allowed_serve\"}",
            "6",
        );
        has("fleetcert_broker_connects_total{result=\"refused\"}", "0");
        has(
            "fleetcert_broker_acl_decisions_total{action=\"publish\",result=\"denied\"}",
            "2",
        );
        has("fleetcert_broker_kicks_total", "1");
        has("fleetcert_broker_api_calls_total{result=\"ok\"}", "3");
        has("fleetcert_broker_api_calls_total{result=\"failed\"}", "1");
        has("fleetcert_broker_api_call_seconds_total", "2.0");
        has("fleetcert_broker_sessions", "4");
    }
}
