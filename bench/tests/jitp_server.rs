//! The load generator against a real in-process fleetcert JITP server on loopback:
//! first connects, returning connects, the server's counters, and TLS refusals.
use fleetcert_bench::jitp::{JitpOptions, run};
use fleetcert_jitp::{Limits, Server, server_tls_config};
use fleetcert_lifecycle::provision::{self, DeviceRequest, ProvisionSettings};
use fleetcert_lifecycle::{CaInitOptions, DataDir};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A data directory with a CA and `devices` provisioned things in `<base>/devices`.
// provision::prepare takes rows as `Result<DeviceRequest, DeviceReport>`; its error is large.
#[allow(clippy::result_large_err)]
async fn fleet(
    base: &Path,
    devices: usize,
) -> (
    DataDir,
    Arc<fleetcert_ca::IssuingCa>,
    Arc<dyn fleetcert_registry::Registry>,
) {
    let data = DataDir::new(base.join("data"));
    data.init_ca(&CaInitOptions::default(), None).unwrap();
    let ca = Arc::new(data.load_issuing_ca(None).unwrap());
    let registry = fleetcert_registry::open(&data.default_database_url())
        .await
        .unwrap();
    let requests = (0..devices)
        .map(|i| {
            Ok(DeviceRequest {
                line: None,
                thing_name: format!("bench-test-{i:03}"),
                csr_path: None,
            })
        })
        .collect();
    let settings = ProvisionSettings::new(base.join("devices"), data.device_profile().unwrap());
    let summary = provision::provision(
        ca.clone(),
        registry.clone(),
        provision::prepare(requests),
        &settings,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(summary.issued, devices as u64);
    std::fs::write(base.join("root.pem"), data.root_cert_pem().unwrap()).unwrap();
    (data, ca, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_and_returning_connects_match_the_server_counters() {
    let temp = tempfile::tempdir().unwrap();
    let base = temp.path();
    let (data, ca, registry) = fleet(base, 6).await;

    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let credentials = data.server_credentials(&ca, &names).unwrap();
    let options =
        fleetcert_lifecycle::jitp::JitpOptions::new(&data, ca.clone(), "default").unwrap();
    let jitp = Arc::new(
        fleetcert_lifecycle::jitp::Jitp::new(&data, registry, options)
            .await
            .unwrap(),
    );
    let tls = server_tls_config(
        &credentials.chain_pem,
        &credentials.key_pem,
        ca.issuing_cert_pem(),
        fleetcert_jitp::ClientAuth::of(&jitp),
    )
    .unwrap();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(loopback, loopback, tls, jitp, Limits::default())
        .await
        .unwrap();
    let (addr, admin) = server.local_addrs().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

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
