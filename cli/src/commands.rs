//! One function per command. Each validates its input before touching the CA or the
//! registry, so bad input exits 2 with nothing recorded or written.
use crate::args::*;
use crate::context::*;
use crate::output::{Out, cert_json, rfc3339, timestamp};
use fleetcert_ca::{CertificateSummary, HierarchyOptions, KeyAlgorithm, ThingName};
use fleetcert_lifecycle::provision::{
    self, DeviceReport, DeviceRequest, ProvisionSettings, ProvisionSummary,
};
use fleetcert_lifecycle::{CaInitOptions, DataDir, LifecycleError};
use fleetcert_registry::{
    CertStatus, CertificateFilter, CertificateRecord, EventFilter, ThingFilter,
};
use serde_json::json;
use std::process::ExitCode;
use std::sync::Arc;

type CmdResult = Result<ExitCode, CliError>;

/// Checks a policy name given on the command line: 1 to 128 characters (AWS IoT's
/// limit), no control characters.
fn check_policy_name(name: &str) -> Result<(), CliError> {
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(bad_input(format!(
            "invalid policy name {:?}: it must be 1 to 128 characters, without control characters",
            fleetcert_templates::clip(name, fleetcert_templates::MAX_ECHO_CHARS)
        )));
    }
    Ok(())
}

pub async fn run(cli: Cli) -> CmdResult {
    let ctx = Ctx {
        data: DataDir::new(&cli.data_dir),
        database_url: cli.database_url.clone(),
        out: Out { format: cli.output },
    };
    match cli.command {
        Command::Ca(CaCommand::Init(args)) => ca_init(&ctx, args).await,
        Command::Ca(CaCommand::Show) => ca_show(&ctx),
        Command::Ca(CaCommand::Export { chain }) => ca_export(&ctx, chain),
        Command::Provision(args) => provision_cmd(&ctx, args).await,
        Command::Templates(TemplatesCommand::Lint { files }) => {
            crate::templates_cmd::lint(&ctx, &files)
        }
        Command::Templates(TemplatesCommand::List) => crate::templates_cmd::list(&ctx),
        Command::Policies(PoliciesCommand::List) => policies_list(&ctx).await,
        Command::Policies(PoliciesCommand::Show { name, thing }) => {
            policies_show(&ctx, &name, thing.as_deref()).await
        }
        Command::Serve(args) => crate::serve::run(&ctx, *args).await,
        Command::Things(ThingsCommand::List { limit }) => things_list(&ctx, limit).await,
        Command::Things(ThingsCommand::Show { name }) => things_show(&ctx, &name).await,
        Command::Certs(CertsCommand::List {
            thing,
            status,
            expiring_within,
            limit,
        }) => certs_list(&ctx, thing, status, expiring_within, limit).await,
        Command::Rotate(args) => crate::lifecycle_cmds::rotate(&ctx, args).await,
        Command::Revoke(args) => crate::lifecycle_cmds::revoke(&ctx, args).await,
        Command::Crl(args) => crate::lifecycle_cmds::crl(&ctx, args).await,
        Command::Aws(cmd) => crate::aws_cmd::run(&ctx, cmd).await,
        Command::Mosquitto(MosquittoCommand::Config(args)) => {
            crate::mosquitto_cmd::config(&ctx, args).await
        }
        Command::Claims(cmd) => crate::claims_cmd::run(&ctx, cmd).await,
        Command::Audit(cmd) => crate::audit_cmd::run(&ctx, cmd).await,
        Command::Demo(args) => crate::commands::demo(&ctx, args).await,
    }
}

fn summary_json(s: &CertificateSummary) -> serde_json::Value {
    json!({
        "subject": s.subject,
        "issuer": s.issuer,
        "serial": s.serial_hex,
        "not_before": rfc3339(s.not_before),
        "not_after": rfc3339(s.not_after),
        "fingerprint_sha256": s.fingerprint_sha256_hex,
        "key_algorithm": s.key_algorithm,
        "is_ca": s.is_ca,
        "path_len": s.path_len,
    })
}

fn summary_text(label: &str, s: &CertificateSummary) -> String {
    format!(
        "{label}:\n  subject:     {}\n  issuer:      {}\n  serial:      {}\n  valid:       {} .. {}\n  key:         {}\n  sha256:      {}",
        s.subject,
        s.issuer,
        s.serial_hex,
        rfc3339(s.not_before),
        rfc3339(s.not_after),
        s.key_algorithm,
        s.fingerprint_sha256_hex
    )
}

async fn ca_init(ctx: &Ctx, args: CaInitArgs) -> CmdResult {
    let key_algorithm: KeyAlgorithm = args.key_algorithm.parse()?;
    if args.common_name.trim().is_empty() || args.common_name.len() > 64 {
        return Err(bad_input("--common-name must be 1 to 64 characters"));
    }
    if args.issuing_days > args.root_days {
        return Err(bad_input(format!(
            "--issuing-days ({}) must not exceed --root-days ({}): the issuing CA cannot outlive its root",
            args.issuing_days, args.root_days
        )));
    }
    if ctx.data.has_ca() {
        return Err(LifecycleError::CaExists {
            dir: ctx.data.ca_dir(),
        }
        .into());
    }
    // Reach the registry first: a CA whose registry is unreachable is of no use yet.
    ctx.registry(true).await?;
    let passphrase = passphrase();
    let info = ctx.data.init_ca(
        &CaInitOptions {
            hierarchy: HierarchyOptions {
                common_name: args.common_name,
                key_algorithm,
                root_days: args.root_days,
                issuing_days: args.issuing_days,
            },
            crl_url: args.crl_url,
        },
        passphrase.as_deref(),
    )?;
    let (root, issuing) = ctx.data.ca_certificates()?;
    if ctx.out.is_json() {
        ctx.out.json(&json!({
            "ca_dir": ctx.data.ca_dir(),
            "key_algorithm": info.key_algorithm,
            "keys_encrypted": info.keys_encrypted,
            "crl_url": info.crl_url,
            "root": summary_json(&root),
            "issuing": summary_json(&issuing),
        }));
    } else {
        ctx.out.line(format!(
            "Created CA in {} ({} keys, {})",
            ctx.data.ca_dir().display(),
            info.key_algorithm,
            if info.keys_encrypted {
                "encrypted with FLEETCERT_CA_PASSPHRASE"
            } else {
                "NOT encrypted: set FLEETCERT_CA_PASSPHRASE to encrypt them at rest"
            }
        ));
        ctx.out.line(summary_text("root", &root));
        ctx.out.line(summary_text("issuing", &issuing));
    }
    Ok(ExitCode::SUCCESS)
}

fn ca_show(ctx: &Ctx) -> CmdResult {
    let info = ctx.data.ca_info()?;
    let (root, issuing) = ctx.data.ca_certificates()?;
    if ctx.out.is_json() {
        ctx.out.json(&json!({
            "ca_dir": ctx.data.ca_dir(),
            "key_algorithm": info.key_algorithm,
            "keys_encrypted": info.keys_encrypted,
            "crl_url": info.crl_url,
            "created_at": timestamp(info.created_at),
            "root": summary_json(&root),
            "issuing": summary_json(&issuing),
        }));
    } else {
        ctx.out.line(format!(
            "CA in {} (created {}, keys {}, CRL URL {})",
            ctx.data.ca_dir().display(),
            timestamp(info.created_at),
            if info.keys_encrypted {
                "encrypted"
            } else {
                "not encrypted"
            },
            info.crl_url.as_deref().unwrap_or("none")
        ));
        ctx.out.line(summary_text("root", &root));
        ctx.out.line(summary_text("issuing", &issuing));
    }
    Ok(ExitCode::SUCCESS)
}

fn ca_export(ctx: &Ctx, chain: bool) -> CmdResult {
    let pem = if chain {
        ctx.data.chain_pem()?
    } else {
        ctx.data.root_cert_pem()?
    };
    if ctx.out.is_json() {
        ctx.out
            .json(&json!({ if chain { "chain_pem" } else { "root_pem" }: pem }));
    } else {
        crate::output::write_stdout(pem.as_bytes());
    }
    Ok(ExitCode::SUCCESS)
}

fn report_text(report: &DeviceReport) -> String {
    let at = |line: &Option<u64>| line.map(|l| format!("line {l}: ")).unwrap_or_default();
    match report {
        DeviceReport::Issued {
            line,
            thing_name,
            serial,
            not_after,
            certificate,
            private_key,
            replaced,
            ..
        } => {
            let mut s = format!(
                "{}issued {thing_name}: serial {serial}, valid until {not_after}, certificate {}",
                at(line),
                certificate.display()
            );
            if let Some(key) = private_key {
                s.push_str(&format!(", key {}", key.display()));
            }
            if !replaced.is_empty() {
                s.push_str(&format!(", replaces {}", replaced.join(", ")));
            }
            s
        }
        DeviceReport::Skipped {
            line,
            thing_name,
            serial,
            reason,
        } => format!(
            "{}skipped {thing_name}: {reason} (serial {serial})",
            at(line)
        ),
        DeviceReport::Redelivered {
            line,
            thing_name,
            serial,
            certificate,
            ..
        } => format!(
            "{}delivered {thing_name}: serial {serial} (recorded by an interrupted run), certificate {}",
            at(line),
            certificate.display()
        ),
        DeviceReport::Failed {
            line,
            thing_name,
            error,
        } => {
            if thing_name.is_empty() {
                format!("{}failed: {error}", at(line))
            } else {
                format!("{}failed {thing_name}: {error}", at(line))
            }
        }
    }
}

fn settings_for(ctx: &Ctx, args: &ProvisionArgs) -> Result<ProvisionSettings, CliError> {
    let mut profile = ctx.data.device_profile()?;
    profile.validity_days = args.days;
    let out_dir = match &args.pallet {
        Some(pallet) => match pallet.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        },
        None => args.out.clone(),
    };
    let mut settings = ProvisionSettings::new(out_dir, profile);
    settings.pallet = args.pallet.clone();
    settings.template = args.template.clone();
    settings.reissue = args.reissue;
    settings.fail_fast = args.fail_fast;
    Ok(settings)
}

async fn provision_cmd(ctx: &Ctx, args: ProvisionArgs) -> CmdResult {
    // 1. Input first: nothing below runs for a bad name, CSR, CSV or template.
    if let Some(template) = &args.template {
        ctx.data
            .load_template(template, args.allow_overly_permissive)?;
    }
    // clap's `requires = "batch"` does not hold this flag (it goes unchecked with
    // THING_NAME); a flag that would be silently ignored is refused instead.
    if args.allow_absolute_csr_paths && args.batch.is_none() {
        return Err(bad_input(
            "--allow-absolute-csr-paths applies to --batch (the CSV's csr column); for one device, --csr takes any path",
        ));
    }
    if let Some(pallet) = &args.pallet {
        // Checked again when the run opens it; here so that nothing runs first.
        if std::fs::symlink_metadata(pallet).is_ok() {
            return Err(bad_input(format!(
                "{} already exists: a finished pallet is never overwritten (choose another name, or move it away)",
                pallet.display()
            )));
        }
    }
    if let Some(path) = &args.batch {
        return provision_batch_cmd(ctx, &args, path).await;
    }
    let Some(name) = &args.thing_name else {
        unreachable!("clap requires THING_NAME or --batch")
    };
    ThingName::parse(name)?;
    let prepared = provision::prepare(vec![Ok(DeviceRequest {
        line: None,
        thing_name: name.clone(),
        csr_path: args.csr.clone(),
    })]);
    if let Some(Err(DeviceReport::Failed { error, .. })) = prepared.first() {
        return Err(bad_input(error.clone()));
    }
    // 2. CA and registry.
    let settings = settings_for(ctx, &args)?;
    let ca = Arc::new(ctx.data.load_issuing_ca(passphrase().as_deref())?);
    let cap = provision::validity_cap(&ca, &settings.profile)?;
    note_validity_cap(ctx, cap.as_ref());
    let registry = ctx.registry(false).await?;

    // 3. Run.
    let out = ctx.out;
    let mut single: Option<DeviceReport> = None;
    let mut on_report = |report: &DeviceReport| single = Some(report.clone());
    let summary = provision::provision(ca, registry, prepared, &settings, &mut on_report).await?;
    if let Some(report) = &single {
        if out.is_json() {
            let mut value = serde_json::to_value(report).expect("report serialises");
            if let Some(cap) = &summary.validity_capped {
                value["validity_capped"] = json!(cap);
            }
            out.json(&value);
        } else if report.is_failure() {
            out.note(report_text(report));
        } else {
            out.line(report_text(report));
        }
    }
    Ok(if summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Says on stderr that `--days` was cut to the issuing CA's lifetime.
fn note_validity_cap(ctx: &Ctx, cap: Option<&provision::ValidityCap>) {
    if let Some(cap) = cap {
        ctx.out.note(format!(
            "note: --days {} would outlive the issuing CA (valid until {}): certificates are issued for {} days instead",
            cap.requested_days, cap.issuing_ca_not_after, cap.days
        ));
    }
}

async fn provision_batch_cmd(ctx: &Ctx, args: &ProvisionArgs, path: &std::path::Path) -> CmdResult {
    let out = ctx.out;
    let print = |report: &DeviceReport| {
        if out.is_json() {
            out.json(report);
        } else if !matches!(report, DeviceReport::Issued { .. }) {
            eprintln!("{}", report_text(report));
        }
    };
    // 1. Every row is checked (streaming) before anything is signed; bad rows are
    //    reported now.
    let options = provision::BatchOptions {
        allow_outside_csr_paths: args.allow_absolute_csr_paths,
    };
    let batch = provision::validate_batch_csv(path, &options, &mut |r| print(r))?;
    // 2. CA and registry.
    let settings = settings_for(ctx, args)?;
    let ca = Arc::new(ctx.data.load_issuing_ca(passphrase().as_deref())?);
    let cap = provision::validity_cap(&ca, &settings.profile)?;
    note_validity_cap(ctx, cap.as_ref());
    let registry = ctx.registry(false).await?;

    // 3. Run, reporting as devices complete.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(batch.rows()),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} devices ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    bar.set_position(batch.failures());
    let mut on_report = |report: &DeviceReport| {
        bar.inc(1);
        bar.suspend(|| print(report));
    };
    let outcome = provision::provision_batch(ca, registry, batch, &settings, &mut on_report).await;
    bar.finish_and_clear();
    let mut summary = outcome.summary;
    // The devices already delivered were reported; the summary says how far the run got.
    if let Some(error) = outcome.error {
        summary.error = Some(error.to_string());
        print_batch_summary(ctx, &summary);
        return Err(error.into());
    }
    print_batch_summary(ctx, &summary);
    Ok(if summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_batch_summary(ctx: &Ctx, summary: &ProvisionSummary) {
    if summary.resumed_from_pallet > 0 {
        ctx.out.note(format!(
            "{} devices of the interrupted run were already in the pallet and are kept",
            summary.resumed_from_pallet
        ));
    }
    if ctx.out.is_json() {
        let mut value = serde_json::to_value(summary).expect("summary serialises");
        value["result"] = json!("summary");
        ctx.out.json(&value);
    } else {
        ctx.out.line(format!(
            "{} issued, {} skipped, {} delivered again, {} failed in {:.2}s ({:.0} certificates/s) -> {}{}",
            summary.issued,
            summary.skipped,
            summary.redelivered,
            summary.failed,
            summary.elapsed_seconds,
            summary.issued_per_second,
            match &summary.pallet {
                Some(pallet) if summary.stopped_early || summary.error.is_some() => format!(
                    "{} (unfinished: re-run the same command to complete it)",
                    pallet.display()
                ),
                Some(pallet) => pallet.display().to_string(),
                None => summary.out_dir.display().to_string(),
            },
            if summary.stopped_early {
                " (stopped at the first failure: --fail-fast)"
            } else {
                ""
            }
        ));
    }
}

async fn things_list(ctx: &Ctx, limit: Option<u32>) -> CmdResult {
    let registry = ctx.registry(false).await?;
    let things = registry
        .list_things(&ThingFilter { limit, after: None })
        .await?;
    if ctx.out.is_json() {
        ctx.out.json(&things);
    } else {
        ctx.out
            .line(format!("{:<40} {:<20} CREATED", "NAME", "TEMPLATE"));
        for t in &things {
            ctx.out.line(format!(
                "{:<40} {:<20} {}",
                t.name,
                t.template.as_deref().unwrap_or("-"),
                timestamp(t.created_at)
            ));
        }
        ctx.out.note(format!("{} things", things.len()));
    }
    Ok(ExitCode::SUCCESS)
}

fn cert_row(c: &CertificateRecord) -> String {
    format!(
        "{:<32} {:<32} {:<10} {:<9} {}",
        c.serial,
        c.thing_name,
        c.status,
        c.origin,
        timestamp(c.not_after)
    )
}

const CERT_HEADER: &str = "SERIAL                           THING                            STATUS     ORIGIN    NOT_AFTER";

async fn things_show(ctx: &Ctx, name: &str) -> CmdResult {
    check_thing_name(name)?;
    let registry = ctx.registry(false).await?;
    let thing = registry
        .get_thing(name)
        .await?
        .ok_or_else(|| failed(format!("no thing named {name:?} in the registry")))?;
    let certs = registry
        .list_certificates(&CertificateFilter {
            thing_name: Some(name.to_owned()),
            ..Default::default()
        })
        .await?;
    let events = registry
        .list_events(&EventFilter {
            thing_name: Some(name.to_owned()),
            ..Default::default()
        })
        .await?;
    let policies: Vec<String> = registry
        .policies_of_thing(name)
        .await?
        .into_iter()
        .map(|p| p.name)
        .collect();
    let mut connections = Vec::new();
    // Every certificate's: a revoked certificate seen connecting matters most.
    for c in &certs {
        connections.extend(registry.recent_connections(&c.fingerprint_sha256).await?);
    }
    connections.sort_by_key(|c| std::cmp::Reverse(c.at));
    if ctx.out.is_json() {
        ctx.out.json(&json!({
            "thing": thing,
            "policies": policies,
            "recent_connections": connections,
            "certificates": certs.iter().map(cert_json).collect::<Vec<_>>(),
            "events": events,
        }));
    } else {
        ctx.out.line(format!(
            "thing {}\n  template:   {}\n  type:       {}\n  attributes: {}\n  groups:     {}\n  policies:   {}\n  created:    {}\n  updated:    {}\ncertificates:",
            thing.name,
            thing.template.as_deref().unwrap_or("-"),
            thing.details.thing_type.as_deref().unwrap_or("-"),
            serde_json::to_string(&thing.details.attributes).unwrap_or_default(),
            thing.details.groups.join(", "),
            policies.join(", "),
            timestamp(thing.created_at),
            timestamp(thing.updated_at)
        ));
        ctx.out.line(format!("  {CERT_HEADER}"));
        for c in &certs {
            ctx.out.line(format!("  {}", cert_row(c)));
        }
        ctx.out.line("events:");
        for e in &events {
            ctx.out.line(format!(
                "  {} {:<24} {} {}",
                timestamp(e.at),
                e.kind,
                e.serial.as_deref().unwrap_or("-"),
                e.detail
            ));
        }
        ctx.out.line("recent connections:");
        if connections.is_empty() {
            ctx.out.line("  none recorded");
        }
        for c in &connections {
            ctx.out.line(format!("  {}", connection_row(c)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One connection record for `things show`: when, how, who, from where, until when, the
/// certificate (fingerprint prefix).
fn connection_row(c: &fleetcert_registry::ConnectionRecord) -> String {
    let mut row = format!(
        "{} {:<5} from {}",
        timestamp(c.at),
        c.transport,
        c.client_addr
    );
    if let Some(client_id) = &c.client_id {
        row.push_str(&format!(" client id {client_id:?}"));
    }
    if let Some(until) = c.disconnected_at {
        row.push_str(&format!(" until {}", timestamp(until)));
    }
    if let Some(reason) = &c.disconnect_reason {
        row.push_str(&format!(" ({reason})"));
    }
    row.push_str(&format!(
        " certificate sha256:{}",
        c.fingerprint_sha256
            .get(..16)
            .unwrap_or(&c.fingerprint_sha256)
    ));
    row
}

async fn certs_list(
    ctx: &Ctx,
    thing: Option<String>,
    status: Option<String>,
    expiring_within: Option<std::time::Duration>,
    limit: Option<u32>,
) -> CmdResult {
    if let Some(thing) = &thing {
        check_thing_name(thing)?;
    }
    let status: Option<CertStatus> = status.map(|s| s.parse()).transpose()?;
    let expires_before = expiring_within.map(|d| {
        fleetcert_lifecycle::unix_now()
            .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
    });
    let registry = ctx.registry(false).await?;
    let certs = registry
        .list_certificates(&CertificateFilter {
            thing_name: thing,
            status,
            expires_before,
            limit,
        })
        .await?;
    if ctx.out.is_json() {
        ctx.out
            .json(&certs.iter().map(cert_json).collect::<Vec<_>>());
    } else {
        ctx.out.line(CERT_HEADER);
        for c in &certs {
            ctx.out.line(cert_row(c));
        }
        ctx.out.note(format!("{} certificates", certs.len()));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn demo(ctx: &Ctx, args: DemoArgs) -> CmdResult {
    crate::demo::run(ctx.out, args).await
}

async fn policies_list(ctx: &Ctx) -> CmdResult {
    let registry = ctx.registry(false).await?;
    let policies = registry.list_policies().await?;
    if ctx.out.is_json() {
        ctx.out.json(&policies);
    } else {
        for p in &policies {
            ctx.out.line(format!(
                "{:<40} updated {}",
                p.name,
                timestamp(p.updated_at)
            ));
        }
        ctx.out.note(format!("{} policies", policies.len()));
    }
    Ok(ExitCode::SUCCESS)
}

async fn policies_show(ctx: &Ctx, name: &str, thing: Option<&str>) -> CmdResult {
    check_policy_name(name)?;
    if let Some(thing) = thing {
        check_thing_name(thing)?;
    }
    let registry = ctx.registry(false).await?;
    let policy = registry
        .get_policy(name)
        .await?
        .ok_or_else(|| failed(format!("no policy named {name:?} in the registry")))?;
    let document = match thing {
        None => policy.document.clone(),
        Some(thing) => {
            if registry.get_thing(thing).await?.is_none() {
                return Err(failed(format!("no thing named {thing:?} in the registry")));
            }
            // Client ID = thing name (AWS IoT practice), so both variables resolve alike.
            fleetcert_templates::effective_policy(&policy.document, thing, thing)
        }
    };
    if ctx.out.is_json() {
        ctx.out.json(&json!({
            "name": policy.name,
            "thing": thing,
            "effective": thing.is_some(),
            "document": document,
        }));
    } else {
        ctx.out
            .line(serde_json::to_string_pretty(&document).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}
