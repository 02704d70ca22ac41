//! `hold` against a real in-process fleetcert JITP server on loopback: connections held
//! open at once, refusals counted by kind, and idle connections the server closes early.
use crate::fleet::serve;
use fleetcert_bench::hold::{HoldOptions, run};
use fleetcert_jitp::Limits;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn options(addr: SocketAddr, base: &Path) -> HoldOptions {
    let mut opts = HoldOptions::new(
        format!("https://127.0.0.1:{}/v1/connect", addr.port()),
        base.join("devices"),
        base.join("root.pem"),
    );
    opts.server_name = Some("localhost".into());
    opts.parallelism = 8;
    opts.timeout = Duration::from_secs(10);
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_connections_open_at_once_and_counts_failures_and_early_closes() {
    // Fleet A: default limits (10 s for a request, so idle connections last 10 s).
    let a = tempfile::tempdir().unwrap();
    let (addr_a, admin_a, stop_a, serving_a) = serve(a.path(), 6, Limits::default()).await;
    // Fleet B: its server closes a connection that sends no request for 1 s.
    let b = tempfile::tempdir().unwrap();
    let short = Limits {
        request_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (addr_b, _admin_b, stop_b, serving_b) = serve(b.path(), 3, short).await;

    // 20 connections over 6 devices, all open at the same moment, held ~1 s.
    let mut opts = options(addr_a, a.path());
    opts.connections = 20;
    opts.hold = Duration::from_secs(1);
    opts.metrics_url = Some(format!("http://{admin_a}/metrics"));
    let held = run(&opts).await.unwrap();
    assert_eq!(held.attempted, 20, "{held:#?}");
    assert_eq!(held.established, 20, "{held:#?}");
    assert_eq!(held.failed, 0, "{held:#?}");
    assert_eq!(held.errors.values().sum::<u64>(), 0, "{held:#?}");
    assert_eq!(held.max_open, 20, "{held:#?}");
    assert!(held.all_open_at_once, "{held:#?}");
    assert_eq!(held.open_at_end, 20, "{held:#?}");
    assert_eq!(held.closed_early, 0, "{held:#?}");
    assert_eq!(held.devices_used, 6);
    assert!(held.establish_all_seconds.is_some(), "{held:#?}");
    // Held for the second asked for, all 20 open throughout.
    assert!(held.all_open_seconds.unwrap() >= 0.9, "{held:#?}");
    assert!(
        held.duration_seconds >= held.ramp_seconds + 1.0,
        "{held:#?}"
    );
    // Every answer a 2xx: 201 for a first connect, 200 after.
    assert_eq!(held.status.values().sum::<u64>(), 20, "{held:#?}");
    assert!(
        held.status.keys().all(|s| (200..300).contains(s)),
        "{held:#?}"
    );
    let m = held.metrics.as_ref().unwrap();
    assert_eq!(m.counted_during_ramp, Some(20), "{m:#?}");
    assert_eq!(m.counted_matches_established, Some(true));
    assert_eq!(m.handshakes_during_ramp, Some(20), "{m:#?}");
    assert!(m.after.unwrap() >= m.before + 20.0, "{m:#?}");
    assert!(m.scrape_errors.is_empty(), "{m:#?}");
    // The server's own count of open connections agrees while they are held.
    assert_eq!(
        m.open_connection_gauges.get("fleetcert_open_connections"),
        Some(&20.0),
        "{m:#?}"
    );

    // Devices of another fleet: refused in the TLS handshake, nothing held.
    let mut strangers = options(addr_a, a.path());
    strangers.certs = b.path().join("devices");
    strangers.connections = 5;
    strangers.hold = Duration::from_secs(30);
    let refused = run(&strangers).await.unwrap();
    assert_eq!(refused.attempted, 5, "{refused:#?}");
    assert_eq!(refused.established, 0, "{refused:#?}");
    assert_eq!(refused.failed, 5, "{refused:#?}");
    assert_eq!(refused.errors["tls"], 5, "{refused:#?}");
    assert_eq!(refused.max_open, 0, "{refused:#?}");
    assert!(!refused.all_open_at_once);
    assert!(refused.establish_all_seconds.is_none());
    assert!(!refused.error_samples.is_empty());
    // Nothing was open, so there was nothing to hold for 30 s.
    assert!(refused.duration_seconds < 15.0, "{refused:#?}");

    // The wrong trust anchor for the server certificate: the client refuses the server.
    let mut wrong_ca = options(addr_a, a.path());
    wrong_ca.ca = b.path().join("root.pem");
    wrong_ca.connections = 3;
    let distrusted = run(&wrong_ca).await.unwrap();
    assert_eq!(distrusted.errors["tls"], 3, "{distrusted:#?}");
    assert_eq!(distrusted.established, 0);

    // Nothing listening: connect errors. Not TLS at all: TLS errors.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut nowhere = options(closed_port, a.path());
    nowhere.connections = 3;
    let refused_tcp = run(&nowhere).await.unwrap();
    assert_eq!(refused_tcp.errors["connect"], 3, "{refused_tcp:#?}");
    assert_eq!(refused_tcp.failed, 3);

    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    let garbage_server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut tcp, _)) = garbage.accept().await {
            let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\n\r\nnot TLS\n").await;
        }
    });
    let mut not_tls = options(garbage_addr, a.path());
    not_tls.connections = 3;
    let garbled = run(&not_tls).await.unwrap();
    assert_eq!(garbled.errors["tls"], 3, "{garbled:#?}");
    assert_eq!(garbled.established, 0);
    garbage_server.abort();

    // Server B closes idle connections after 1 s: held for 3 s, all are closed early,
    // after about a second idle, and counted.
    let mut idle = options(addr_b, b.path());
    idle.connections = 3;
    idle.hold = Duration::from_secs(3);
    let closed = run(&idle).await.unwrap();
    assert_eq!(closed.established, 3, "{closed:#?}");
    assert_eq!(closed.max_open, 3, "{closed:#?}");
    assert_eq!(closed.closed_early, 3, "{closed:#?}");
    assert_eq!(
        closed.closed_early_by_kind.values().sum::<u64>(),
        3,
        "{closed:#?}"
    );
    assert_eq!(closed.open_at_end, 0, "{closed:#?}");
    let idle_s = closed.closed_early_idle_seconds.unwrap();
    assert!(idle_s.min >= 0.9 && idle_s.max < 2.9, "{closed:#?}");
    assert!(closed.all_open_seconds.unwrap() < 1.5, "{closed:#?}");

    let _ = stop_a.send(());
    let _ = stop_b.send(());
    serving_a.await.unwrap();
    serving_b.await.unwrap();
}
