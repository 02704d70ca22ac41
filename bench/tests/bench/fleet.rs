//! A fleet (CA, registry, provisioned devices) and its JITP server on loopback, shared by
//! the tests of the load tools.
use fleetcert_jitp::{Limits, Server, server_tls_config};
use fleetcert_lifecycle::provision::{self, DeviceRequest, ProvisionSettings};
use fleetcert_lifecycle::{CaInitOptions, DataDir};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// A data directory with a CA and `devices` provisioned things in `<base>/devices`, and
/// the root in `<base>/root.pem`.
// provision::prepare takes rows as `Result<DeviceRequest, DeviceReport>`; its error is large.
#[allow(clippy::result_large_err)]
pub async fn fleet(
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

/// A fleet of `devices` and its JITP server on 127.0.0.1; returns (device address,
/// admin address, stop, the serving task).
pub async fn serve(
    base: &Path,
    devices: usize,
    limits: Limits,
) -> (
    SocketAddr,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (data, ca, registry) = fleet(base, devices).await;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let credentials = data.server_credentials(&ca, &names, None).unwrap();
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
    let server = Server::bind(loopback, loopback, tls, jitp, limits)
        .await
        .unwrap();
    let (addr, admin) = server.local_addrs().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    (addr, admin, stop_tx, serving)
}
