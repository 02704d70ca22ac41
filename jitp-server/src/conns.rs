//! Per-connection bookkeeping of the device listener: when the request being received
//! started (for the whole-request deadline), and which certificate holds which open
//! connection (for the per-certificate cap and for closing a revoked certificate's
//! connections).
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// When the first byte of the request now being received arrived (None between
/// requests). Set by [`TimedIo`], cleared by the handler once it has the whole request.
#[derive(Debug, Default)]
pub(crate) struct RequestClock {
    started: Mutex<Option<Instant>>,
}

impl RequestClock {
    fn mark(&self) {
        let mut started = self.started.lock().expect("request clock poisoned");
        if started.is_none() {
            *started = Some(Instant::now());
        }
    }

    /// When the request in progress began; None if no byte of one has arrived.
    pub(crate) fn started(&self) -> Option<Instant> {
        *self.started.lock().expect("request clock poisoned")
    }

    /// The request is complete; the next byte read starts the next one.
    pub(crate) fn reset(&self) {
        *self.started.lock().expect("request clock poisoned") = None;
    }
}

/// The decrypted stream of one connection, noting in a [`RequestClock`] when a request's
/// first byte arrives.
#[derive(Debug)]
pub(crate) struct TimedIo<S> {
    inner: S,
    clock: Arc<RequestClock>,
}

impl<S> TimedIo<S> {
    pub(crate) fn new(inner: S, clock: Arc<RequestClock>) -> Self {
        TimedIo { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.mark();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Open device connections by certificate serial.
#[derive(Debug)]
pub(crate) struct OpenConnections {
    per_certificate: usize,
    next_id: AtomicU64,
    by_serial: Mutex<HashMap<String, HashMap<u64, Arc<Notify>>>>,
}

/// One open connection of a certificate, until dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    open: Arc<OpenConnections>,
    serial: String,
    id: u64,
    close: Arc<Notify>,
}

impl Registration {
    pub(crate) fn serial(&self) -> &str {
        &self.serial
    }

    /// Resolves when the connection must be closed (its certificate was revoked).
    pub(crate) async fn closed(&self) {
        self.close.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut by_serial = self.open.by_serial.lock().expect("connections poisoned");
        if let Some(conns) = by_serial.get_mut(&self.serial) {
            conns.remove(&self.id);
            if conns.is_empty() {
                by_serial.remove(&self.serial);
            }
        }
    }
}

impl OpenConnections {
    pub(crate) fn new(per_certificate: usize) -> Self {
        OpenConnections {
            per_certificate: per_certificate.max(1),
            next_id: AtomicU64::new(0),
            by_serial: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a connection of `serial`; None if that certificate already holds its
    /// share of connections.
    pub(crate) fn register(self: &Arc<Self>, serial: String) -> Option<Registration> {
        let mut by_serial = self.by_serial.lock().expect("connections poisoned");
        let conns = by_serial.entry(serial.clone()).or_default();
        if conns.len() >= self.per_certificate {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        conns.insert(id, close.clone());
        drop(by_serial);
        Some(Registration {
            open: self.clone(),
            serial,
            id,
            close,
        })
    }

    /// Tells every open connection of a certificate for which `is_revoked` holds to close;
    /// returns how many were told.
    pub(crate) fn close_revoked(&self, is_revoked: impl Fn(&str) -> bool) -> usize {
        let by_serial = self.by_serial.lock().expect("connections poisoned");
        let mut told = 0;
        for (serial, conns) in by_serial.iter() {
            if is_revoked(serial) {
                for close in conns.values() {
                    // A stored permit: the connection sees it even if it is not waiting yet.
                    close.notify_one();
                    told += 1;
                }
            }
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_gets_its_share_and_a_slot_back_when_one_closes() {
        let open = Arc::new(OpenConnections::new(2));
        let a1 = open.register("aa".into()).unwrap();
        let _a2 = open.register("aa".into()).unwrap();
        assert!(open.register("aa".into()).is_none());
        let _b1 = open.register("bb".into()).unwrap();
        drop(a1);
        assert!(open.register("aa".into()).is_some());
    }

    #[tokio::test]
    async fn only_the_revoked_certificates_connections_are_told_to_close() {
        let open = Arc::new(OpenConnections::new(4));
        let a = open.register("aa".into()).unwrap();
        let b = open.register("bb".into()).unwrap();
        assert_eq!(open.close_revoked(|s| s == "aa"), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), a.closed())
            .await
            .expect("told to close");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), b.closed())
                .await
                .is_err()
        );
    }
}
