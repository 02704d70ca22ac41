//! `fleetcert claims create|list|revoke`: claim certificates for provisioning by claim.
use crate::args::ClaimsCommand;
use crate::context::{CliError, Ctx, bad_input, failed, passphrase};
use crate::output::timestamp;
use fleetcert_lifecycle::claims::{self, ClaimRequest};
use fleetcert_lifecycle::renewal::clock_from_env;
use fleetcert_registry::ClaimRecord;
use serde_json::json;
use std::process::ExitCode;

type CmdResult = Result<ExitCode, CliError>;

fn claim_json(c: &ClaimRecord) -> serde_json::Value {
    json!({
        "name": c.name,
        "template": c.template,
        "serial": c.serial,
        "fingerprint_sha256": c.fingerprint_sha256,
        "status": if c.revoked { "revoked" } else { "active" },
        "uses": c.uses,
        "max_uses": c.max_uses,
        "not_before": timestamp(c.not_before),
        "not_after": timestamp(c.not_after),
        "created_at": timestamp(c.created_at),
        "revoked_at": c.revoked_at.map(timestamp),
    })
}

pub async fn run(ctx: &Ctx, cmd: ClaimsCommand) -> CmdResult {
    let out = ctx.out();
    match cmd {
        ClaimsCommand::Create(args) => {
            crate::context::check_thing_name(&args.name).map_err(|_| {
                bad_input(format!(
                    "claim name {:?}: use letters, digits, ':', '_' and '-' (up to 128)",
                    fleetcert_templates::clip(&args.name, fleetcert_templates::MAX_ECHO_CHARS)
                ))
            })?;
            fleetcert_templates::validate_name(&args.template)
                .map_err(|e| bad_input(format!("--template: {e}")))?;
            let clock = clock_from_env()?;
            let ca = ctx.data().load_issuing_ca(passphrase().as_deref())?;
            let registry = ctx.registry(false).await?;
            let created = claims::create(
                ctx.data(),
                registry.as_ref(),
                &ca,
                &ClaimRequest {
                    name: args.name,
                    template: args.template,
                    days: args.days,
                    max_uses: args.max_uses,
                    out_dir: args.out,
                },
                clock.now(),
            )
            .await?;
            if out.is_json() {
                let mut value = claim_json(&created.record);
                value["certificate_file"] = json!(created.certificate_path);
                value["key_file"] = json!(created.key_path);
                out.json(&value);
            } else {
                out.line(format!(
                    "claim {} for template {} (serial {}, valid until {}{})",
                    created.record.name,
                    created.record.template,
                    created.record.serial,
                    timestamp(created.record.not_after),
                    created
                        .record
                        .max_uses
                        .map(|m| format!(", at most {m} devices"))
                        .unwrap_or_default()
                ));
                out.line(format!("wrote {}", created.certificate_path.display()));
                out.line(format!("wrote {} (mode 0600)", created.key_path.display()));
            }
            Ok(ExitCode::SUCCESS)
        }
        ClaimsCommand::List => {
            let registry = ctx.registry(false).await?;
            let list = registry
                .list_claims()
                .await
                .map_err(|e| failed(e.to_string()))?;
            if out.is_json() {
                out.json(&list.iter().map(claim_json).collect::<Vec<_>>());
            } else if list.is_empty() {
                out.note("no claims (create one with `fleetcert claims create NAME --template T`)");
            } else {
                for c in &list {
                    out.line(format!(
                        "{}\t{}\t{}\tuses {}{}\tuntil {}",
                        c.name,
                        c.template,
                        if c.revoked { "revoked" } else { "active" },
                        c.uses,
                        c.max_uses.map(|m| format!("/{m}")).unwrap_or_default(),
                        timestamp(c.not_after)
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ClaimsCommand::Revoke { name } => {
            let clock = clock_from_env()?;
            let registry = ctx.registry(false).await?;
            let revoked = claims::revoke(registry.as_ref(), &name, clock.now())
                .await
                .map_err(|e| match e {
                    fleetcert_lifecycle::LifecycleError::Registry(
                        fleetcert_registry::RegistryError::NotFound(what),
                    ) => failed(what),
                    other => other.into(),
                })?;
            if out.is_json() {
                out.json(&json!({ "claim": name, "revoked": revoked }));
            } else if revoked {
                out.line(format!(
                    "claim {name} revoked; a running server drops its sessions within seconds"
                ));
            } else {
                out.line(format!("claim {name} was revoked already"));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
