//! The load generator against a real in-process fleetcert JITP server on loopback:
//! first connects, returning connects, the server's counters, and TLS refusals.
use crate::fleet::{fleet, serve};
use fleetcert_bench::jitp::{JitpOptions, run};
use fleetcert_jitp::Limits;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_and_returning_connects_match_the_server_counters() {
    let temp = tempfile::tempdir().unwrap();
    let base = temp.path();
    let (addr, admin, stop_tx, serving) = serve(base, 6, Limits::default()).await;

    let mut opts = JitpOptions::new(
        format!("https://127.0.0.1:{}/v1/connect", addr.port()),
        base.join("devices"),
        base.join("root.pem"),
    );
    opts.server_name = Some("localhost".into());
    opts.metrics_url = Some(format!("http://{admin}/metrics"));
    opts.concurrency = 4;

    // First connects: each device once, all answered 201, the run stops when they run out.
    opts.new_devices = true;
    opts.duration = Duration::from_secs(30);
    let first = run(&opts).await.unwrap();
    assert_eq!(first.errors_total, 0, "{first:#?}");
    assert_eq!((first.ok, first.requests), (6, 6), "{first:#?}");
    assert_eq!(first.status.get(&201), Some(&6), "{first:#?}");
    assert!(
        first.devices_exhausted && first.devices_used == 6,
        "{first:#?}"
    );
    assert_eq!(first.server_counted, Some(6), "{first:#?}");
    assert_eq!(first.server_counted_matches_ok, Some(true));

    // Returning devices, round-robin, for a second.
    opts.new_devices = false;
    opts.duration = Duration::from_secs(1);
    let returning = run(&opts).await.unwrap();
    assert!(returning.ok > 0, "{returning:#?}");
    assert_eq!(returning.errors_total, 0, "{returning:#?}");
    assert_eq!(returning.status.get(&200), Some(&returning.ok));
    assert_eq!(
        returning.server_counted,
        Some(returning.ok),
        "{returning:#?}"
    );
    assert_eq!(returning.server_counted_matches_ok, Some(true));
    // Every connection was a full handshake.
    assert_eq!(
        returning.tls_sessions.values().sum::<u64>(),
        returning.requests
    );
    assert!(
        returning.tls_sessions.keys().all(|k| k.ends_with(" Full")),
        "{:?}",
        returning.tls_sessions
    );
    assert!(returning.latency_ms.p50 > 0.0 && returning.latency_ms.max >= returning.latency_ms.p99);

    // Paced, GET (405 from fleetcert: an HTTP 4xx, never counted by the server).
    opts.rate = Some(20.0);
    opts.method = hyper::Method::GET;
    let paced = run(&opts).await.unwrap();
    assert_eq!(paced.ok, 0, "{paced:#?}");
    assert!(paced.requests > 0 && paced.requests <= 21, "{paced:#?}");
    assert_eq!(paced.errors["http_4xx"], paced.requests, "{paced:#?}");
    assert_eq!(paced.status.get(&405), Some(&paced.requests));
    assert_eq!(paced.server_counted, Some(0));

    // Devices of another fleet are refused in the TLS handshake.
    let other = tempfile::tempdir().unwrap();
    fleet(other.path(), 2).await;
    let mut strangers = opts.clone();
    strangers.certs = other.path().join("devices");
    strangers.method = hyper::Method::POST;
    strangers.rate = None;
    strangers.new_devices = true;
    let refused = run(&strangers).await.unwrap();
    assert_eq!(refused.ok, 0, "{refused:#?}");
    assert_eq!(refused.errors["tls"], 2, "{refused:#?}");
    assert_eq!(refused.server_counted, Some(0));

    let _ = stop_tx.send(());
    serving.await.unwrap();
}
