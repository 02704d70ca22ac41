//! `fleetcert aws enable|disable|status|sync|reconcile`: the AWS IoT Core mirror.
use crate::args::{
    AwsCommand, AwsEnableArgs, AwsReconcileArgs, AwsStatusArgs, AwsSyncArgs, CaModeArg,
    RotatedStatusArg,
};
use crate::context::{CliError, Ctx, bad_input, failed, passphrase};
use crate::output::timestamp;
use fleetcert_lifecycle::mirror::{self, Mirror, MirrorOptions};
use fleetcert_lifecycle::renewal::clock_from_env;
use fleetcert_registry::{MirrorOp, Registry};
use serde_json::json;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

type CmdResult = Result<ExitCode, CliError>;

pub async fn run(ctx: &Ctx, cmd: AwsCommand) -> CmdResult {
    match cmd {
        AwsCommand::Enable(args) => enable(ctx, args).await,
        AwsCommand::Disable => disable(ctx).await,
        AwsCommand::Status(args) => status(ctx, args).await,
        AwsCommand::Sync(args) => sync(ctx, args).await,
        AwsCommand::Reconcile(args) => reconcile(ctx, args).await,
    }
}

async fn enable(ctx: &Ctx, args: AwsEnableArgs) -> CmdResult {
    if args.region.trim().is_empty()
        || !args
            .region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(bad_input(format!(
            "invalid --region {:?} (e.g. eu-west-1)",
            args.region
        )));
    }
    if let Some(url) = &args.endpoint_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(bad_input(format!(
            "invalid --endpoint-url {url:?}: expected an http:// or https:// URL"
        )));
    }
    let clock = clock_from_env()?;
    let registry = ctx.registry(false).await?;
    let ca = ctx.data().load_issuing_ca(passphrase().as_deref())?;
    let request = mirror::EnableMirror {
        region: args.region.clone(),
        endpoint_url: args.endpoint_url.clone(),
        ca_mode: match args.ca_mode {
            CaModeArg::Default => mirror::CaMode::Default,
            CaModeArg::SniOnly => mirror::CaMode::SniOnly,
        },
        rotated_status: match args.rotated_status {
            RotatedStatusArg::Revoked => mirror::RotatedStatus::Revoked,
            RotatedStatusArg::Inactive => mirror::RotatedStatus::Inactive,
        },
        register_now: !args.no_register,
    };
    let enabled = mirror::enable(registry.as_ref(), &ca, &request, clock.now())
        .await
        .map_err(|e| match e {
            mirror::EnableMirrorError::Store(e) => CliError::from(e),
            register => failed(register.to_string()),
        })?;
    let (settings, queued) = (&enabled.settings, enabled.queued);
    let registered = enabled.ca_certificate_id.as_ref();
    let out = ctx.out();
    if out.is_json() {
        out.json(&json!({
            "enabled": true,
            "region": settings.region,
            "endpoint_url": settings.endpoint_url,
            "ca_mode": settings.ca_mode,
            "rotated_status": settings.rotated_status,
            "ca_certificate_id": registered,
            "queued": queued,
        }));
    } else {
        match registered {
            Some(id) => out.line(format!("issuing CA registered with AWS IoT: {id}")),
            None => out.line("issuing CA registration queued (--no-register)"),
        }
        out.line(format!(
            "AWS mirror enabled ({}{}); {queued} operations queued for what the registry already holds",
            settings.region,
            settings
                .endpoint_url
                .as_deref()
                .map(|u| format!(", endpoint {u}"))
                .unwrap_or_default()
        ));
        out.note(
            "`fleetcert serve` applies the queue continuously; `fleetcert aws sync` applies it now",
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn disable(ctx: &Ctx) -> CmdResult {
    let clock = clock_from_env()?;
    let registry = ctx.registry(false).await?;
    let mirror::MirrorDisabled { changed, pending } =
        mirror::disable(registry.as_ref(), clock.now()).await?;
    let out = ctx.out();
    if out.is_json() {
        out.json(&json!({ "enabled": false, "changed": changed, "pending": pending }));
    } else if changed {
        out.line(format!(
            "AWS mirror disabled; {pending} queued operations kept (`aws enable` resumes)"
        ));
    } else {
        out.line("AWS mirror was not enabled");
    }
    Ok(ExitCode::SUCCESS)
}

fn op_json(op: &MirrorOp, now: i64) -> serde_json::Value {
    json!({
        "id": op.id,
        "kind": op.kind,
        "subject": op.subject,
        "queue": op.queue,
        "state": op.state,
        "created_at": timestamp(op.created_at),
        "age_seconds": (now - op.created_at).max(0),
        "attempts": op.attempts,
        "next_attempt_at": (op.not_before > now).then(|| timestamp(op.not_before)),
        "last_error": op.last_error,
    })
}

async fn status(ctx: &Ctx, args: AwsStatusArgs) -> CmdResult {
    let clock = clock_from_env()?;
    let registry = ctx.registry(false).await?;
    let settings = registry.mirror_settings().await?;
    let backlog = registry.mirror_backlog(args.parked).await?;
    let now = clock.now();
    let out = ctx.out();
    if out.is_json() {
        out.json(&json!({
            "configured": settings.is_some(),
            "enabled": settings.as_ref().is_some_and(|s| s.enabled),
            "settings": settings,
            "pending": backlog.pending,
            "retrying": backlog.retrying,
            "in_flight": backlog.in_flight,
            "parked": backlog.parked,
            "oldest_pending": backlog.oldest_pending.as_ref().map(|op| op_json(op, now)),
            "parked_operations": backlog.parked_ops.iter().map(|op| op_json(op, now)).collect::<Vec<_>>(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    match &settings {
        None => out.line("AWS mirror: not configured (`fleetcert aws enable --region R`)"),
        Some(s) => out.line(format!(
            "AWS mirror: {} — region {}{}, CA mode {}, rotated certificates become {}, CA id {}",
            if s.enabled { "enabled" } else { "disabled" },
            s.region,
            s.endpoint_url
                .as_deref()
                .map(|u| format!(" via {u}"))
                .unwrap_or_default(),
            s.ca_mode,
            s.rotated_status,
            s.ca_certificate_id
                .as_deref()
                .unwrap_or("(not registered yet)")
        )),
    }
    out.line(format!(
        "backlog: {} pending ({} retrying after errors, {} being applied), {} parked",
        backlog.pending, backlog.retrying, backlog.in_flight, backlog.parked
    ));
    if let Some(op) = &backlog.oldest_pending {
        out.line(format!(
            "oldest pending: #{} {} {} queued {} ({} s ago), {} attempts{}",
            op.id,
            op.kind,
            op.subject,
            timestamp(op.created_at),
            (now - op.created_at).max(0),
            op.attempts,
            op.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ));
    }
    for op in &backlog.parked_ops {
        out.line(format!(
            "parked: #{} {} {} after {} attempts: {}",
            op.id,
            op.kind,
            op.subject,
            op.attempts,
            op.last_error.as_deref().unwrap_or("")
        ));
    }
    Ok(ExitCode::SUCCESS)
}

async fn worker(
    ctx: &Ctx,
    registry: Arc<dyn Registry>,
    concurrency: usize,
) -> Result<Arc<Mirror>, CliError> {
    let settings = registry.mirror_settings().await?.ok_or_else(|| {
        bad_input("the AWS mirror is not set up: run `fleetcert aws enable --region R` first")
    })?;
    let clock = clock_from_env()?;
    let ca = Arc::new(ctx.data().load_issuing_ca(passphrase().as_deref())?);
    let api = mirror::connect(&settings.region, settings.endpoint_url.as_deref()).await?;
    let options = MirrorOptions {
        concurrency,
        ..MirrorOptions::default()
    };
    Ok(Arc::new(
        Mirror::new(registry, api, ca, clock, options).await?,
    ))
}

/// Longest `aws sync --timeout`.
const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How often `aws sync` looks again while another process applies operations.
const SYNC_POLL: Duration = Duration::from_millis(250);

async fn sync(ctx: &Ctx, args: AwsSyncArgs) -> CmdResult {
    if args.timeout > MAX_SYNC_TIMEOUT {
        return Err(bad_input(format!(
            "invalid --timeout {}: at most 24h",
            humantime::format_duration(args.timeout)
        )));
    }
    let registry = ctx.registry(false).await?;
    let mirror = worker(ctx, registry.clone(), usize::from(args.concurrency)).await?;
    let clock = clock_from_env()?;
    let requeued = if args.retry_parked {
        mirror.requeue_parked().await?
    } else {
        0
    };
    let outcome = mirror.sync(args.timeout, SYNC_POLL).await?;
    let (report, backlog) = (&outcome.report, &outcome.backlog);
    let rate = if report.seconds > 0.0 {
        report.applied as f64 / report.seconds
    } else {
        0.0
    };
    let now = clock.now();
    let out = ctx.out();
    if out.is_json() {
        out.json(&json!({
            "requeued": requeued,
            "applied": report.applied,
            "retried": report.retried,
            "parked": report.parked,
            "rounds": report.rounds,
            "seconds": report.seconds,
            "applied_per_second": rate,
            "errors": report.errors,
            "timed_out": outcome.timed_out,
            "pending_after": backlog.pending,
            "in_flight_after": backlog.in_flight,
            "parked_after": backlog.parked,
            "oldest_pending": backlog.oldest_pending.as_ref().map(|op| op_json(op, now)),
        }));
    } else {
        out.line(format!(
            "aws sync: {} operations applied ({rate:.0}/s), {} to retry, {} parked, in {:.2} s; {} pending, {} parked now",
            report.applied, report.retried, report.parked, report.seconds, backlog.pending, backlog.parked
        ));
        for e in &report.errors {
            out.note(format!("  {e}"));
        }
    }
    if outcome.timed_out {
        out.note(format!(
            "aws sync: timed out after {}: {} operations still pending, {} of them in flight \
             under another worker's lease{}",
            humantime::format_duration(args.timeout),
            backlog.pending,
            backlog.in_flight,
            backlog
                .oldest_pending
                .as_ref()
                .map(|op| format!(
                    "; oldest: #{} {} {} ({} attempts{})",
                    op.id,
                    op.kind,
                    op.subject,
                    op.attempts,
                    op.last_error
                        .as_deref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        ));
    }
    Ok(if backlog.pending > 0 || backlog.parked > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn reconcile(ctx: &Ctx, args: AwsReconcileArgs) -> CmdResult {
    let registry = ctx.registry(false).await?;
    let mirror = worker(ctx, registry, 16).await?;
    let report = mirror.reconcile(args.dry_run).await?;
    let out = ctx.out();
    if out.is_json() {
        out.json(&json!({
            "dry_run": args.dry_run,
            "things_checked": report.things_checked,
            "certificates_checked": report.certificates_checked,
            "drift": report.drift,
            "queued": report.queued,
            "seconds": report.seconds,
        }));
    } else {
        for d in &report.drift {
            out.line(format!("{:<24} {} {}", d.kind, d.subject, d.detail));
        }
        out.line(format!(
            "aws reconcile: {} things and {} certificates checked, {} differences, {}",
            report.things_checked,
            report.certificates_checked,
            report.drift.len(),
            if args.dry_run {
                "nothing queued (dry run)".to_owned()
            } else {
                format!(
                    "{} operations queued (`aws sync` applies them)",
                    report.queued
                )
            }
        ));
    }
    Ok(ExitCode::SUCCESS)
}
