//! What the JITP use case keeps in memory between requests: the replies of returning
//! devices (a short-lived cache, so a returning device costs no registry round trip) and
//! the connection records buffered until the next flush.
use super::connect::ConnectReply;
use fleetcert_registry::ConnectionRecord;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// A registered certificate, remembered so a returning device costs no registry round
/// trip. Short-lived: status changes (rotation, revocation) reach it within the TTL, and
/// revocation is enforced at the handshake anyway.
#[derive(Debug, Clone)]
struct Known {
    reply: ConnectReply,
    cached_at: Instant,
}

const KNOWN_TTL: Duration = Duration::from_secs(5);
const KNOWN_CAPACITY: usize = 100_000;
/// Connection records buffered before new ones are dropped (counted) rather than growing
/// memory without bound while the registry is slow.
const CONNECTION_BUFFER: usize = 50_000;

/// The returning-device cache and the connection-record buffer.
#[derive(Debug, Default)]
pub(super) struct Caches {
    known: RwLock<HashMap<String, Known>>,
    connections: Mutex<Vec<ConnectionRecord>>,
    dropped_connection_records: AtomicU64,
}

impl Caches {
    /// The cached reply for this certificate fingerprint, if still fresh.
    pub(super) fn cached(&self, fingerprint: &str) -> Option<ConnectReply> {
        let known = self.known.read().expect("cache poisoned");
        let entry = known.get(fingerprint)?;
        (entry.cached_at.elapsed() < KNOWN_TTL).then(|| entry.reply.clone())
    }

    /// Remembers the reply for a registered certificate.
    pub(super) fn cache(&self, fingerprint: String, reply: ConnectReply) {
        let mut known = self.known.write().expect("cache poisoned");
        if known.len() >= KNOWN_CAPACITY {
            known.clear();
        }
        known.insert(
            fingerprint,
            Known {
                reply,
                cached_at: Instant::now(),
            },
        );
    }

    /// Drops the cached reply of a certificate whose state just changed.
    pub(super) fn forget(&self, fingerprint: &str) {
        self.known
            .write()
            .expect("cache poisoned")
            .remove(fingerprint);
    }

    /// Buffers a connection record (dropped, and counted, when the buffer is full).
    pub(super) fn remember_connection(&self, record: ConnectionRecord) {
        let mut buffer = self.connections.lock().expect("buffer poisoned");
        if buffer.len() >= CONNECTION_BUFFER {
            self.dropped_connection_records
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        buffer.push(record);
    }

    /// The buffered connection records, emptying the buffer.
    pub(super) fn take_connections(&self) -> Vec<ConnectionRecord> {
        std::mem::take(&mut *self.connections.lock().expect("buffer poisoned"))
    }
}
