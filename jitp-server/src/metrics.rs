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
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
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
    open_connections: Gauge,
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
        Metrics {
            registry,
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
            open_connections,
            registry_failing_since: std::sync::Mutex::new(None),
        }
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
