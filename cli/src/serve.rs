//! `fleetcert serve`: the JITP server until SIGTERM or Ctrl-C.
use crate::args::ServeArgs;
use crate::context::{CliError, Ctx, bad_input, failed, passphrase};
use fleetcert_jitp::{ClientAuth, Limits, Server, server_tls_config};
use fleetcert_lifecycle::jitp::{Jitp, JitpOptions};
use fleetcert_lifecycle::mirror::{self, Mirror, MirrorOptions};
use fleetcert_lifecycle::renewal::clock_from_env;
use fleetcert_lifecycle::rotation::{RotationSettings, RotationStats, Rotator};
use std::process::ExitCode;
use std::sync::Arc;

pub async fn run(ctx: &Ctx, args: ServeArgs) -> Result<ExitCode, CliError> {
    fleetcert_templates::validate_name(&args.template).map_err(|e| CliError {
        code: 2,
        message: e.to_string(),
    })?;
    if let Some(addr) = args.broker_api
        && !addr.ip().is_loopback()
        && !args.broker_api_allow_remote
    {
        return Err(bad_input(
            fleetcert_jitp::BrokerApiError::NotLoopback(addr).to_string(),
        ));
    }
    if let Some(url) = &args.audit_webhook {
        fleetcert_lifecycle::audit::check_webhook_url(url)?;
        if args.audit_interval.is_zero() {
            return Err(bad_input(
                "--audit-webhook needs scheduled audits (--audit-interval is 0s)",
            ));
        }
    }
    // The broker API's secret must exist before anything starts.
    let broker_secret = match args.broker_api {
        Some(_) => Some(ctx.data().read_broker_secret()?),
        None => None,
    };
    let clock = clock_from_env()?;
    let passphrase = passphrase();
    let ca = Arc::new(ctx.data().load_issuing_ca(passphrase.as_deref())?);
    let registry = ctx.registry(false).await?;
    let issuance = Arc::new(ctx.data().issuance(ca.clone())?);
    let sealer = Arc::new(ctx.data().sealer(passphrase.as_deref())?);
    let stats = Arc::new(RotationStats::default());
    let mut names = args.server_names.clone();
    for default in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.to_owned());
        }
    }
    let credentials = ctx
        .data()
        .server_credentials(&ca, &names, passphrase.as_deref())?;
    let renew_after_expiry_secs = i64::try_from(args.renew_after_expiry.as_secs()).unwrap_or(0);
    let jitp = Arc::new(
        Jitp::new(
            ctx.data(),
            registry.clone(),
            JitpOptions {
                default_template: args.template.clone(),
                allow_overly_permissive: args.allow_overly_permissive,
                issuance: issuance.clone(),
                sealer: sealer.clone(),
                clock: clock.clone(),
                renew_after_expiry_secs,
                stats: stats.clone(),
            },
        )
        .await?,
    );
    let tls = server_tls_config(
        &credentials.chain_pem,
        &credentials.key_pem,
        ca.issuing_cert_pem(),
        ClientAuth::of(&jitp),
    )
    .map_err(|e| failed(e.to_string()))?;
    let limits = Limits {
        handshake_timeout: args.handshake_timeout,
        request_timeout: args.request_timeout,
        max_body_bytes: usize::try_from(args.max_body_bytes).unwrap_or(usize::MAX),
        max_header_bytes: args.max_header_bytes as usize,
        max_connections: args.max_connections as usize,
        max_connections_per_certificate: args.max_connections_per_certificate as usize,
        ..Limits::default()
    };
    let mut server = Server::bind(args.listen, args.admin_listen, tls, jitp.clone(), limits)
        .await
        .map_err(|e| failed(e.to_string()))?;
    // The AWS mirror runs when `aws enable` was used (and not disabled).
    let mirror = match registry.mirror_settings().await? {
        Some(settings) if settings.enabled && !args.no_mirror_worker => {
            let api = mirror::connect(&settings.region, settings.endpoint_url.as_deref()).await?;
            let worker = Arc::new(
                Mirror::new(
                    registry.clone(),
                    api,
                    ca.clone(),
                    clock.clone(),
                    MirrorOptions::default(),
                )
                .await?,
            );
            server = server.with_mirror(worker.clone());
            Some(worker)
        }
        _ => None,
    };
    if let (Some(addr), Some(secret)) = (args.broker_api, broker_secret) {
        let api = fleetcert_jitp::BrokerApi::bind(
            addr,
            args.broker_api_allow_remote,
            secret,
            ca.issuing_cert_pem(),
            fleetcert_templates::ArnContext::new(&args.broker_region, &args.broker_account),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        server = server.with_broker_api(api);
    }
    let broker_addr = server.broker_api_addr();
    let metrics = server.metrics();
    let (audit_registry, audit_clock) = (registry.clone(), clock.clone());
    let (device_addr, admin_addr) = server.local_addrs().map_err(|e| failed(e.to_string()))?;
    let out = ctx.out();
    if out.is_json() {
        out.json(&serde_json::json!({
            "listening": device_addr,
            "admin": admin_addr,
            "server_names": credentials.names,
            "server_certificate_issued": credentials.issued,
            "template": args.template,
            "rotation_worker": !args.no_rotation_worker,
            "mirror_worker": mirror.is_some(),
            "broker_api": broker_addr,
        }));
    } else {
        out.note(format!(
            "fleetcert serve: devices on https://{device_addr} (mutual TLS: /v1/connect, EST re-enrollment, /v1/replacement, /crl), admin on http://{admin_addr} (/healthz, /metrics, /crl); server certificate for {} {}",
            credentials.names.join(", "),
            if credentials.issued { "issued now" } else { "reused" }
        ));
        if let Some(addr) = broker_addr {
            out.note(format!(
                "fleetcert serve: broker API for the mosquitto plugin on http://{addr} (/broker/v1/connect, /disconnect, /sessions, /crl); policy resources matched as arn:aws:iot:{}:{}:…",
                args.broker_region, args.broker_account
            ));
        }
    }
    let worker = (!args.no_rotation_worker).then(|| {
        let rotator = Arc::new(Rotator::new(
            registry,
            issuance,
            sealer,
            clock,
            RotationSettings::default(),
            stats,
        ));
        tokio::spawn(rotator.run(args.rotation_interval))
    });
    let audits = (!args.audit_interval.is_zero()).then(|| {
        tokio::spawn(scheduled_audits(ScheduledAudits {
            data: ctx.data().clone(),
            registry: audit_registry.clone(),
            clock: audit_clock.clone(),
            interval: args.audit_interval,
            webhook: args.audit_webhook.clone(),
            metrics: metrics.clone(),
        }))
    });
    let (stop_mirror, mirror_stopped) = tokio::sync::watch::channel(false);
    let mirror_task = mirror.map(|m| tokio::spawn(m.run(args.mirror_interval, mirror_stopped)));
    server.run(shutdown_signal()).await;
    if let Some(worker) = worker {
        worker.abort();
    }
    if let Some(audits) = audits {
        audits.abort();
    }
    let _ = stop_mirror.send(true);
    if let Some(task) = mirror_task {
        // A round in flight finishes (its results are recorded) or is cut short after a
        // grace period; unfinished operations stay leased and are retried after the lease.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
    }
    out.note("fleetcert serve: stopped");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// What the scheduled audit loop needs.
struct ScheduledAudits {
    data: fleetcert_lifecycle::DataDir,
    registry: Arc<dyn fleetcert_registry::Registry>,
    clock: Arc<dyn fleetcert_lifecycle::renewal::Clock>,
    interval: std::time::Duration,
    webhook: Option<String>,
    metrics: Arc<fleetcert_jitp::Metrics>,
}

/// Runs a SCHEDULED_AUDIT_TASK every `interval` (the first when the newest task is that
/// old), sets the audit gauges and posts the summary to the webhook. Failures are logged
/// and retried at the next interval.
async fn scheduled_audits(s: ScheduledAudits) {
    use fleetcert_lifecycle::audit;
    let options = audit::AuditOptions {
        checks: audit::CHECKS.iter().collect(),
        task_type: audit::SCHEDULED,
        settings: audit::AuditSettings::default(),
    };
    loop {
        let now = s.clock.now();
        let due = match audit::next_scheduled(s.registry.as_ref(), s.interval, now).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!("cannot read the last audit task: {e}");
                now.saturating_add(60)
            }
        };
        let wait = u64::try_from(due.saturating_sub(now)).unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
        match audit::run(&s.data, s.registry.as_ref(), &options, s.clock.now()).await {
            Ok(report) => {
                let counts: Vec<(&str, u64)> = report
                    .details
                    .iter()
                    .map(|d| (d.check_name, d.non_compliant_resources_count))
                    .collect();
                s.metrics.audit_report(&counts, report.task.started_at);
                tracing::info!(
                    task = %report.task.task_id,
                    non_compliant_checks = %report.task.summary["nonCompliantChecksCount"],
                    "scheduled audit finished"
                );
                if let Some(url) = s.webhook.clone() {
                    let summary = report.task.summary.clone();
                    let sent =
                        tokio::task::spawn_blocking(move || audit::notify(&url, &summary)).await;
                    match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("audit notification not delivered: {e}"),
                        Err(e) => tracing::warn!("audit notification not delivered: {e}"),
                    }
                }
            }
            Err(e) => {
                tracing::warn!("scheduled audit failed: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
        }
    }
}
