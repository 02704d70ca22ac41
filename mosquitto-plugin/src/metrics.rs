//! Counters kept by the plugin: logged periodically, and sent to serve with every sessions
//! poll ([`Metrics::snapshot`]), which exports them on its `/metrics` as
//! `fleetcert_broker_*` (docs/broker-api.md).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How a CONNECT ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectResult {
    /// Allowed by serve.
    AllowedByServe,
    /// Allowed from the cache, without asking serve.
    AllowedFromCache,
    /// Refused (serve's decision, or no certificate).
    Refused,
    /// serve could not be reached or answered nonsense: refused, fail closed.
    Unavailable,
}

/// What an ACL check was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclKind {
    /// SUBSCRIBE (`iot:Subscribe`).
    Subscribe,
    /// PUBLISH from the client (`iot:Publish`).
    Publish,
    /// Delivery to the client (`iot:Receive`).
    Receive,
}

/// What happened to a Fleet Provisioning message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisioningEvent {
    /// A claim session's request, taken off the message path for serve.
    Request,
    /// A reply published to the client that asked.
    Reply,
    /// A request or reply dropped: too many waiting, or the asking session is gone.
    Dropped,
}

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    connects: [AtomicU64; 4],
    provisioning: [AtomicU64; 3],
    acl: [[AtomicU64; 2]; 3],
    kicks: AtomicU64,
    serve_calls: AtomicU64,
    serve_failures: AtomicU64,
    serve_micros_total: AtomicU64,
    serve_micros_max: AtomicU64,
}

impl Metrics {
    /// Counts a CONNECT.
    pub fn connect(&self, result: ConnectResult) {
        self.connects[result as usize].fetch_add(1, Relaxed);
    }

    /// Counts an ACL decision.
    pub fn acl(&self, kind: AclKind, allowed: bool) {
        self.acl[kind as usize][usize::from(allowed)].fetch_add(1, Relaxed);
    }

    /// Counts Fleet Provisioning messages.
    pub fn provisioning(&self, event: ProvisioningEvent, count: usize) {
        self.provisioning[event as usize].fetch_add(count as u64, Relaxed);
    }

    /// Fleet Provisioning messages of this kind so far.
    pub fn provisioning_count(&self, event: ProvisioningEvent) -> u64 {
        self.provisioning[event as usize].load(Relaxed)
    }

    /// Counts kicked clients.
    pub fn kicks(&self, count: usize) {
        self.kicks.fetch_add(count as u64, Relaxed);
    }

    /// Counts one call to serve and how long it took.
    pub fn serve_call(&self, took: Duration, ok: bool) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.serve_calls.fetch_add(1, Relaxed);
        if !ok {
            self.serve_failures.fetch_add(1, Relaxed);
        }
        self.serve_micros_total.fetch_add(micros, Relaxed);
        self.serve_micros_max.fetch_max(micros, Relaxed);
    }

    /// Connects with this result so far.
    pub fn connects(&self, result: ConnectResult) -> u64 {
        self.connects[result as usize].load(Relaxed)
    }

    /// ACL decisions of this kind and result so far.
    pub fn acl_decisions(&self, kind: AclKind, allowed: bool) -> u64 {
        self.acl[kind as usize][usize::from(allowed)].load(Relaxed)
    }

    /// Every counter so far (cumulative since the plugin started), for serve. The
    /// longest serve call is the longest since the previous snapshot.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let a = |kind| AclCounts {
            allowed: self.acl_decisions(kind, true),
            denied: self.acl_decisions(kind, false),
        };
        MetricsSnapshot {
            connects: ConnectCounts {
                allowed_serve: self.connects(ConnectResult::AllowedByServe),
                allowed_cache: self.connects(ConnectResult::AllowedFromCache),
                refused: self.connects(ConnectResult::Refused),
                unavailable: self.connects(ConnectResult::Unavailable),
            },
            subscribe: a(AclKind::Subscribe),
            publish: a(AclKind::Publish),
            receive: a(AclKind::Receive),
            kicks: self.kicks.load(Relaxed),
            provisioning: ProvisioningCounts {
                requests: self.provisioning_count(ProvisioningEvent::Request),
                replies: self.provisioning_count(ProvisioningEvent::Reply),
                dropped: self.provisioning_count(ProvisioningEvent::Dropped),
            },
            serve_calls: self.serve_calls.load(Relaxed),
            serve_failures: self.serve_failures.load(Relaxed),
            serve_micros_total: self.serve_micros_total.load(Relaxed),
            serve_micros_max: self.serve_micros_max.swap(0, Relaxed),
        }
    }

    /// One log line with every counter.
    pub fn summary(&self) -> String {
        let c = |r| self.connects(r);
        let a = |k, allowed| self.acl_decisions(k, allowed);
        let calls = self.serve_calls.load(Relaxed);
        let mean = self
            .serve_micros_total
            .load(Relaxed)
            .checked_div(calls)
            .unwrap_or(0);
        format!(
            "metrics: connects allowed_serve={} allowed_cache={} refused={} unavailable={}; \
             subscribe allowed={} denied={}; publish allowed={} denied={}; receive allowed={} denied={}; \
             kicks={}; serve calls={} failures={} mean_us={} max_us={}",
            c(ConnectResult::AllowedByServe),
            c(ConnectResult::AllowedFromCache),
            c(ConnectResult::Refused),
            c(ConnectResult::Unavailable),
            a(AclKind::Subscribe, true),
            a(AclKind::Subscribe, false),
            a(AclKind::Publish, true),
            a(AclKind::Publish, false),
            a(AclKind::Receive, true),
            a(AclKind::Receive, false),
            self.kicks.load(Relaxed),
            calls,
            self.serve_failures.load(Relaxed),
            mean,
            self.serve_micros_max.load(Relaxed),
        )
    }
}

/// CONNECTs by result, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnectCounts {
    /// Allowed by serve.
    pub allowed_serve: u64,
    /// Allowed from the cache.
    pub allowed_cache: u64,
    /// Refused (serve's decision, or no certificate).
    pub refused: u64,
    /// Refused because serve could not be reached (fail closed).
    pub unavailable: u64,
}

/// Fleet Provisioning messages, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProvisioningCounts {
    /// Requests taken off the message path for serve.
    pub requests: u64,
    /// Replies published to the asking client.
    pub replies: u64,
    /// Requests or replies dropped (too many waiting, or the asking session gone).
    pub dropped: u64,
}

/// ACL decisions of one kind, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AclCounts {
    /// Allowed.
    pub allowed: u64,
    /// Denied.
    pub denied: u64,
}

/// The plugin's counters as sent to serve (`POST /broker/v1/sessions`, `broker.metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// CONNECTs by result.
    pub connects: ConnectCounts,
    /// SUBSCRIBE decisions (`iot:Subscribe`).
    pub subscribe: AclCounts,
    /// PUBLISH decisions (`iot:Publish`).
    pub publish: AclCounts,
    /// Delivery decisions (`iot:Receive`).
    pub receive: AclCounts,
    /// Clients kicked (retired certificates).
    pub kicks: u64,
    /// Fleet Provisioning messages.
    pub provisioning: ProvisioningCounts,
    /// Calls to serve (connect, disconnect, sessions).
    pub serve_calls: u64,
    /// Calls to serve that failed (unreachable, timeout, bad answer).
    pub serve_failures: u64,
    /// Time spent in calls to serve, microseconds.
    pub serve_micros_total: u64,
    /// The longest call to serve since the previous snapshot, microseconds.
    pub serve_micros_max: u64,
}
