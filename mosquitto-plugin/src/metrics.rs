//! Counters kept by the plugin and logged periodically (no exporter yet).

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

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    connects: [AtomicU64; 4],
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
