//! `fleetcert demo`: the factory line end to end in a temporary data directory — create a
//! CA, provision a batch, verify every certificate against the chain with webpki, re-run
//! the batch to show it is idempotent, connect every device to the JITP server, rotate
//! and revoke, then (when mosquitto is installed) the MQTT round of `demo_mqtt`, and
//! summarise.
use crate::args::DemoArgs;
use crate::context::CliError;
use crate::demo_mqtt::{self, MqttFigures};
use crate::output::Out;
use fleetcert_device_auth::ChainVerifier;
use fleetcert_lifecycle::provision::{self, DeviceReport, ProvisionSettings};
use fleetcert_lifecycle::{CaInitOptions, DataDir};
use serde_json::json;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Validity of the demo batch; the rotation step rotates everything expiring within it.
const DEMO_VALIDITY_DAYS: u32 = 2;

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: 1,
        message: e.to_string(),
    }
}

pub async fn run(out: Out, args: DemoArgs) -> Result<ExitCode, CliError> {
    let temp = tempfile::Builder::new()
        .prefix("fleetcert-demo-")
        .tempdir()
        .map_err(|e| failed(format!("cannot create a temporary directory: {e}")))?;
    let base = temp.path().to_path_buf();
    let data = DataDir::new(base.join("data"));
    let out_dir = base.join("devices");
    out.note(format!("demo: working in {}", base.display()));

    // 1. The CA.
    let started = Instant::now();
    let ca_info = data.init_ca(
        &CaInitOptions {
            crl_url: Some("http://127.0.0.1:9090/crl".into()),
            ..CaInitOptions::default()
        },
        None,
    )?;
    let ca = Arc::new(data.load_issuing_ca(None)?);
    let registry = fleetcert_registry::open(&data.default_database_url()).await?;
    let ca_seconds = started.elapsed().as_secs_f64();
    out.note(format!(
        "demo: created a {} CA in {ca_seconds:.2}s",
        ca_info.key_algorithm
    ));

    // 2. A pallet of devices, as a factory station would send it.
    let batch = base.join("pallet.csv");
    let mut csv = String::from("thing_name\n");
    for i in 1..=args.devices {
        let _ = writeln!(csv, "demo-device-{i:06}");
    }
    std::fs::write(&batch, csv)
        .map_err(|e| failed(format!("cannot write {}: {e}", batch.display())))?;
    // Short-lived certificates, so that the rotation step below has something to do.
    let mut profile = data.device_profile()?;
    profile.validity_days = DEMO_VALIDITY_DAYS;
    let settings = ProvisionSettings::new(&out_dir, profile);
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(args.devices as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let mut failures = Vec::new();
    let mut on_report = |r: &DeviceReport| {
        bar.inc(1);
        if r.is_failure() {
            failures.push(r.clone());
        }
    };
    let options = provision::BatchOptions::default();
    let validated = provision::validate_batch_csv(&batch, &options, &mut on_report)?;
    let first = provision::provision_batch(
        ca.clone(),
        registry.clone(),
        validated,
        &settings,
        &mut on_report,
    )
    .await
    .into_result()?;
    bar.finish_and_clear();
    out.note(format!(
        "demo: provisioned {} devices in {:.2}s ({:.0}/s)",
        first.issued, first.elapsed_seconds, first.issued_per_second
    ));

    // 3. Verify every certificate file against the chain, as a TLS server would.
    let chain = data.chain_pem()?;
    let verifier = ChainVerifier::from_chain_pem(&chain)?;
    let now = rustls_pki_types::UnixTime::now();
    let (mut verified, mut rejected, mut keys_private) = (0u64, Vec::new(), 0u64);
    for entry in std::fs::read_dir(&out_dir).map_err(failed)? {
        let path = entry.map_err(failed)?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => {
                let pem = std::fs::read(&path).map_err(failed)?;
                let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
                    .map(|d: rustls_pki_types::CertificateDer<'_>| d.to_vec())
                    .map_err(|e| format!("{}: {e}", path.display()));
                match der.and_then(|der| {
                    verifier
                        .verify(&der, now)
                        .map_err(|e| format!("{}: {e}", path.display()))
                }) {
                    Ok(_) => verified += 1,
                    Err(e) => rejected.push(e),
                }
            }
            Some("key") => {
                let mode = std::fs::metadata(&path)
                    .map_err(failed)?
                    .permissions()
                    .mode();
                if mode & 0o077 == 0 {
                    keys_private += 1;
                } else {
                    rejected.push(format!("{} has mode {:o}", path.display(), mode & 0o777));
                }
            }
            _ => {}
        }
    }

    // 4. Re-run the same pallet: nothing new is issued.
    let validated = provision::validate_batch_csv(&batch, &options, &mut |_| {})?;
    let ca_for_server = ca.clone();
    let second =
        provision::provision_batch(ca, registry.clone(), validated, &settings, &mut |_| {})
            .await
            .into_result()?;
    // 5. Each device connects to the JITP server over real mutual TLS on loopback: the
    //    first connect registers it, the second is a returning device. 6. With mosquitto
    //    installed, new devices connect over MQTT through the same server's broker API.
    let mqtt_tools = demo_mqtt::find_tools(&args);
    if mqtt_tools.is_ok() {
        // The MQTT round provisions a device by claim with this template; serve loads
        // templates when it starts.
        let path = data
            .root()
            .join("templates")
            .join(format!("{}.yaml", demo_mqtt::CLAIM_TEMPLATE));
        std::fs::create_dir_all(path.parent().expect("a templates directory"))
            .and_then(|()| std::fs::write(&path, demo_mqtt::CLAIM_TEMPLATE_YAML))
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    }
    let (jitp_figures, mqtt) = jitp_round_trips(
        &data,
        &ca_for_server,
        registry.clone(),
        &settings,
        args.devices,
        mqtt_tools,
    )
    .await?;
    // 7. The Device Defender audit of the demo fleet, as `fleetcert audit run` does it.
    let audit = fleetcert_lifecycle::audit::run(
        &data,
        registry.as_ref(),
        &fleetcert_lifecycle::audit::AuditOptions {
            checks: fleetcert_lifecycle::audit::CHECKS.iter().collect(),
            task_type: fleetcert_lifecycle::audit::ON_DEMAND,
            settings: fleetcert_lifecycle::audit::AuditSettings::default(),
        },
        fleetcert_lifecycle::renewal::clock_from_env()?.now(),
    )
    .await?;
    let counts = registry.counts().await?;

    let rotation = &jitp_figures.rotation;
    let ok = failures.is_empty()
        && jitp_figures.first.ok == args.devices as u64
        && jitp_figures.returning.ok == args.devices as u64
        && rotation.issued == args.devices as u64
        && rotation.fetched == args.devices as u64
        && rotation.new_certificates_connected == args.devices as u64
        && rotation.old_certificate_refused
        && rotation.crl_entries == args.devices as i64
        && rejected.is_empty()
        && first.issued == args.devices as u64
        && verified == args.devices as u64
        && second.issued == 0
        && second.skipped == args.devices as u64
        && mqtt.ok();
    if out.is_json() {
        out.json(&json!({
            "ok": ok,
            "data_dir": data.root(),
            "ca": { "key_algorithm": ca_info.key_algorithm, "seconds": ca_seconds },
            "provision": first,
            "verified": verified,
            "private_keys_mode_0600": keys_private,
            "rejected": rejected,
            "rerun": second,
            "jitp": jitp_figures,
            "mqtt": mqtt,
            "audit": audit.task.summary,
            "registry": counts,
        }));
    } else {
        out.line("fleetcert demo");
        out.line(format!(
            "  CA            {} root + issuing, created in {ca_seconds:.2}s",
            ca_info.key_algorithm
        ));
        out.line(format!(
            "  provision     {} devices in {:.2}s: {:.0} certificates/s (generated P-256 keys, SQLite, files synced)",
            first.issued, first.elapsed_seconds, first.issued_per_second
        ));
        out.line(format!(
            "  verify        {verified}/{} certificates verify against the chain (webpki, clientAuth); {keys_private} keys are mode 0600",
            args.devices
        ));
        out.line(format!(
            "  re-run        {} issued, {} skipped (already provisioned)",
            second.issued, second.skipped
        ));
        for (label, f) in [
            ("first connect", &jitp_figures.first),
            ("returning", &jitp_figures.returning),
        ] {
            out.line(format!(
                "  {label:<13} {}/{} devices answered {} over mutual TLS in {:.2}s: {:.0} connections/s (32 at a time, a new TLS connection each)",
                f.ok, args.devices, f.expected_status, f.seconds, f.per_second
            ));
        }
        out.line(format!(
            "  rotate        {} of {} due certificates replaced in {:.2}s ({:.0}/s, keys sealed at rest); {} devices fetched theirs over mutual TLS and connected with it",
            rotation.issued, rotation.opened, rotation.sweep_seconds,
            rotation.issued as f64 / rotation.sweep_seconds.max(1e-9),
            rotation.new_certificates_connected
        ));
        out.line(format!(
            "  revoke        old certificates revoked once the new ones were used; an old one is {} at the handshake; CRL #{} lists {} entries ({} bytes, http://<admin>/crl)",
            if rotation.old_certificate_refused { "refused" } else { "STILL ACCEPTED" },
            rotation.crl_number, rotation.crl_entries, rotation.crl_bytes
        ));
        mqtt_lines(&out, &mqtt);
        let flagged: Vec<String> = audit
            .details
            .iter()
            .filter(|d| d.non_compliant_resources_count > 0)
            .map(|d| format!("{} ({})", d.check_name, d.non_compliant_resources_count))
            .collect();
        out.line(format!(
            "  audit         {} of {} Device Defender checks non-compliant{}{} (`fleetcert audit findings --task {}`)",
            flagged.len(),
            audit.details.len(),
            if flagged.is_empty() { "" } else { ": " },
            flagged.join(", "),
            audit.task.task_id
        ));
        if audit.details.iter().any(|d| {
            d.check_name == fleetcert_lifecycle::audit::DEVICE_CERT_APPROACHING_EXPIRATION
                && d.non_compliant_resources_count > 0
        }) {
            out.line(format!(
                "                (the demo issues its pallet {DEMO_VALIDITY_DAYS}-day certificates, inside the 30-day expiry threshold)"
            ));
        }
        out.line(format!(
            "  registry      {} things, certificates {:?}, {} events",
            counts.things, counts.certificates_by_status, counts.events
        ));
        for r in failures
            .iter()
            .map(|f| format!("{f:?}"))
            .chain(rejected.iter().cloned())
            .take(10)
        {
            out.note(format!("  problem: {r}"));
        }
        out.line(if ok {
            "  result        OK"
        } else {
            "  result        FAILED"
        });
    }
    if args.keep {
        let kept = temp.keep();
        out.note(format!("demo: kept {}", kept.display()));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The MQTT round's lines of the summary (one line when it was skipped).
fn mqtt_lines(out: &Out, mqtt: &MqttFigures) {
    if let Some(why) = &mqtt.skipped {
        out.line(format!("  mqtt          skipped: {why}"));
        return;
    }
    let [me, other] = demo_mqtt::DEVICES;
    let yes_no = |b: bool, yes: &str, no: &str| if b { yes.to_owned() } else { no.to_owned() };
    out.line(format!(
        "  mqtt          {} on {} with the fleetcert plugin (configured as `fleetcert mosquitto config` does), asking this demo's serve; {:.2}s",
        mqtt.broker, mqtt.listen, mqtt.seconds
    ));
    out.line(format!(
        "  mqtt connect  {}/{} new devices registered by their first CONNECT (mosquitto_sub, mosquitto_rr; MQTT 3.1.1, their own certificates)",
        mqtt.registered,
        mqtt.devices.len()
    ));
    out.line(format!(
        "  mqtt publish  {me} on devices/{me}/echo: {}; on devices/{other}/telemetry: {}, {}",
        yes_no(
            mqtt.own_topic_delivered,
            "delivered back to it",
            "NOT DELIVERED"
        ),
        yes_no(
            mqtt.foreign_topic_refused,
            "refused (MQTT 5 PUBACK: not authorized)",
            "NOT REFUSED"
        ),
        yes_no(
            mqtt.foreign_topic_delivered,
            &format!("DELIVERED to {other}"),
            &format!("not delivered to {other} (subscribed there)")
        ),
    ));
    out.line(format!(
        "  mqtt claim    a device holding only claim {:?}: {}",
        mqtt.claim.as_deref().unwrap_or("-"),
        match &mqtt.claim_thing {
            Some(thing) => format!(
                "CreateKeysAndCertificate + RegisterThing made it {thing}; back as itself, its own topic {}",
                yes_no(mqtt.claim_device_echo, "echoed its message", "DID NOT ECHO")
            ),
            None => "NOT PROVISIONED".to_owned(),
        }
    ));
    for e in &mqtt.errors {
        out.note(format!("  problem: mqtt: {e}"));
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct RoundFigures {
    expected_status: u16,
    ok: u64,
    seconds: f64,
    per_second: f64,
    errors: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct JitpFigures {
    first: RoundFigures,
    returning: RoundFigures,
    rotation: RotationFigures,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct RotationFigures {
    opened: u64,
    issued: u64,
    sweep_seconds: f64,
    fetched: u64,
    new_certificates_connected: u64,
    old_certificate_refused: bool,
    crl_number: i64,
    crl_entries: i64,
    crl_bytes: usize,
    errors: Vec<String>,
}

async fn jitp_round_trips(
    data: &DataDir,
    ca: &Arc<fleetcert_ca::IssuingCa>,
    registry: Arc<dyn fleetcert_registry::Registry>,
    settings: &ProvisionSettings,
    devices: u32,
    mqtt_tools: Result<demo_mqtt::Tools, String>,
) -> Result<(JitpFigures, MqttFigures), CliError> {
    let out_dir = &settings.out_dir;
    use fleetcert_jitp::{DeviceClient, Limits, Server, server_tls_config};
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let credentials = data.server_credentials(ca, &names, None)?;
    let options = fleetcert_lifecycle::jitp::JitpOptions::new(data, ca.clone(), "default")?;
    let rotator = fleetcert_lifecycle::rotation::Rotator::new(
        registry.clone(),
        options.issuance.clone(),
        options.sealer.clone(),
        options.clock.clone(),
        fleetcert_lifecycle::rotation::RotationSettings {
            expiring_within: Some(std::time::Duration::from_secs(
                u64::from(DEMO_VALIDITY_DAYS) * 86_400 + 3600,
            )),
            ..Default::default()
        },
        options.stats.clone(),
    );
    let clock = options.clock.clone();
    let jitp =
        Arc::new(fleetcert_lifecycle::jitp::Jitp::new(data, registry.clone(), options).await?);
    let tls = server_tls_config(
        &credentials.chain_pem,
        &credentials.key_pem,
        ca.issuing_cert_pem(),
        fleetcert_jitp::ClientAuth::of(&jitp),
    )
    .map_err(failed)?;
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let mut server = Server::bind(loopback, loopback, tls, jitp.clone(), Limits::default())
        .await
        .map_err(failed)?;
    // The MQTT round's broker asks this same server (its broker API) about CONNECTs.
    let broker_dir = data.root().join("mosquitto");
    let mqtt_tools = match mqtt_tools {
        Ok(tools) => {
            let api = demo_mqtt::bind_broker_api(data, ca, &broker_dir).await?;
            server = server.with_broker_api(api);
            Ok(tools)
        }
        Err(why) => Err(why),
    };
    let broker_api = server.broker_api_addr();
    let (addr, _) = server.local_addrs().map_err(failed)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let root = data.root_cert_pem()?;
    let mut clients = Vec::with_capacity(devices as usize);
    for i in 1..=devices {
        let name = format!("demo-device-{i:06}");
        let read = |ext: &str| {
            let path = out_dir.join(format!("{name}.{ext}"));
            std::fs::read_to_string(&path).map_err(|e| failed(format!("{}: {e}", path.display())))
        };
        clients.push(Arc::new(
            DeviceClient::new(&root, &read("crt")?, &read("key")?, "localhost").map_err(failed)?,
        ));
    }
    let first = round(&clients, addr, 201).await;
    let returning = round(&clients, addr, 200).await;
    let rotation = rotate_all(&rotator, &clients, &root, addr, registry.as_ref()).await;
    let mqtt = match (mqtt_tools, broker_api) {
        (Ok(tools), Some(api)) => {
            demo_mqtt::run(demo_mqtt::Round {
                tools,
                data,
                ca,
                registry: registry.clone(),
                clock,
                settings,
                dir: broker_dir,
                api,
            })
            .await
        }
        (Ok(_), None) => MqttFigures::skipped("the broker API did not start".into()),
        (Err(why), _) => MqttFigures::skipped(why),
    };
    let _ = stop_tx.send(());
    let _ = serving.await;
    Ok((
        JitpFigures {
            first,
            returning,
            rotation,
        },
        mqtt,
    ))
}

/// The rotation step: one sweep issues a replacement for every (short-lived) device
/// certificate; each device fetches its replacement over mutual TLS and connects with
/// it, which revokes the old one; an old certificate is then refused at the handshake
/// and the CRL lists every old certificate.
async fn rotate_all(
    rotator: &fleetcert_lifecycle::rotation::Rotator,
    clients: &[Arc<fleetcert_jitp::DeviceClient>],
    root: &str,
    addr: std::net::SocketAddr,
    registry: &dyn fleetcert_registry::Registry,
) -> RotationFigures {
    let mut figures = RotationFigures::default();
    match rotator.sweep(|_| {}).await {
        Ok(report) => {
            figures.opened = report.opened;
            figures.issued = report.issued;
            figures.sweep_seconds = report.seconds;
        }
        Err(e) => {
            figures.errors.push(format!("sweep: {e}"));
            return figures;
        }
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, limit, root) = (client.clone(), limit.clone(), root.to_owned());
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            let (status, body) = client
                .post(addr, fleetcert_jitp::FETCH_REPLACEMENT_PATH)
                .await
                .map_err(|e| format!("fetch: {e}"))?;
            if status != 200 {
                return Err(format!("fetch: HTTP {status}: {body}"));
            }
            let fetched: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("fetch: {e}"))?;
            let field = |name: &str| fetched[name].as_str().unwrap_or_default().to_owned();
            let renewed = fleetcert_jitp::DeviceClient::new(
                &root,
                &field("certificate_pem"),
                &field("private_key_pem"),
                "localhost",
            )
            .map_err(|e| format!("new credentials: {e}"))?;
            match renewed.connect(addr).await {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!(
                    "connect with the new certificate: HTTP {status}: {body}"
                )),
                Err(e) => Err(format!("connect with the new certificate: {e}")),
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(())) => {
                figures.fetched += 1;
                figures.new_certificates_connected += 1;
            }
            Ok(Err(e)) => figures.errors.push(e),
            Err(e) => figures.errors.push(e.to_string()),
        }
    }
    // The old certificates are revoked; the handshake view and the CRL follow within
    // moments.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    if let Some(old) = clients.first() {
        while Instant::now() < deadline {
            if old.connect(addr).await.is_err() {
                figures.old_certificate_refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    while Instant::now() < deadline {
        if let Ok(Some(crl)) = registry.latest_crl().await
            && crl.entry_count as usize >= clients.len()
        {
            figures.crl_number = crl.number;
            figures.crl_entries = crl.entry_count;
            figures.crl_bytes = crl.der.len();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    figures.errors.truncate(5);
    figures
}

async fn round(
    clients: &[Arc<fleetcert_jitp::DeviceClient>],
    addr: std::net::SocketAddr,
    expected: u16,
) -> RoundFigures {
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let client = client.clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            client.connect(addr).await
        });
    }
    let (mut ok, mut errors) = (0u64, Vec::new());
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok((status, _))) if status == expected => ok += 1,
            Ok(Ok((status, body))) => errors.push(format!("HTTP {status}: {body}")),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.truncate(5);
    let seconds = started.elapsed().as_secs_f64();
    RoundFigures {
        expected_status: expected,
        ok,
        seconds,
        per_second: clients.len() as f64 / seconds.max(1e-9),
        errors,
    }
}
