//! `fleetcert audit run|findings|tasks|suppress|unsuppress|suppressions|checks`: the
//! Device Defender audit of the fleet (lifecycle::audit).
use crate::args::{AuditCommand, AuditRunArgs};
use crate::context::{CliError, Ctx, bad_input, failed};
use crate::output::timestamp;
use fleetcert_lifecycle::audit::{self, AuditOptions, AuditSettings};
use fleetcert_lifecycle::renewal::clock_from_env;
use fleetcert_registry::{
    AuditFindingFilter, AuditFindingRecord, AuditSuppression, AuditTaskRecord,
};
use serde_json::json;
use std::process::ExitCode;

type CmdResult = Result<ExitCode, CliError>;

/// A check named on the command line: the seed's name or AWS's API name.
fn check_name(name: &str) -> Result<&'static str, CliError> {
    audit::find_check(name).map(|c| c.name).ok_or_else(|| {
        bad_input(format!(
            "unknown audit check {:?}; `fleetcert audit checks` lists them",
            fleetcert_templates::clip(name, fleetcert_templates::MAX_ECHO_CHARS)
        ))
    })
}

fn finding_json(f: &AuditFindingRecord) -> serde_json::Value {
    json!({
        "findingId": f.finding_id,
        "taskId": f.task_id,
        "checkName": f.check_name,
        "severity": f.severity,
        "reasonForNonCompliance": f.reason_description,
        "reasonForNonComplianceCode": f.reason_code,
        "nonCompliantResource": {
            "resourceType": f.resource_type,
            "resourceIdentifier": f.resource_id,
            "additionalInfo": f.detail,
        },
        "isSuppressed": f.suppressed,
        "findingTime": timestamp(f.found_at),
    })
}

fn task_json(t: &AuditTaskRecord) -> serde_json::Value {
    json!({
        "taskId": t.task_id,
        "taskType": t.task_type,
        "taskStatus": t.task_status,
        "taskStartTime": timestamp(t.started_at),
        "nonCompliantChecksCount": t.summary["nonCompliantChecksCount"],
        "totalChecksCount": t.summary["totalChecksCount"],
    })
}

fn suppression_json(s: &AuditSuppression, now: i64) -> serde_json::Value {
    json!({
        "checkName": s.check_name,
        "resourceIdentifier": s.resource_id,
        "expirationDate": s.expires_at.map(timestamp),
        "expired": s.expires_at.is_some_and(|at| at <= now),
        "description": s.description,
        "createdAt": timestamp(s.created_at),
    })
}

async fn run_audit(ctx: &Ctx, args: AuditRunArgs) -> CmdResult {
    let out = ctx.out();
    let checks = audit::select_checks(&args.checks)?;
    let clock = clock_from_env()?;
    let registry = ctx.registry(false).await?;
    let report = audit::run(
        ctx.data(),
        registry.as_ref(),
        &AuditOptions {
            checks,
            task_type: audit::ON_DEMAND,
            settings: AuditSettings {
                expiring_within_days: args.expiring_within_days,
                cert_age_days: args.cert_age_days,
            },
        },
        clock.now(),
    )
    .await?;
    if out.is_json() {
        out.json(&report.task.summary);
    } else {
        out.line(format!(
            "audit {} ({}): {} of {} checks non-compliant",
            report.task.task_id,
            timestamp(report.task.started_at),
            report.task.summary["nonCompliantChecksCount"],
            report.details.len()
        ));
        for d in &report.details {
            out.line(format!(
                "  {:<62} {:<24} {:>6} of {:<6}{}{}",
                d.check_name,
                d.check_run_status,
                d.non_compliant_resources_count,
                d.total_resources_count,
                if d.suppressed_non_compliant_resources_count > 0 {
                    format!(
                        " ({} suppressed)",
                        d.suppressed_non_compliant_resources_count
                    )
                } else {
                    String::new()
                },
                d.message
                    .as_deref()
                    .map(|m| format!("  {m}"))
                    .unwrap_or_default()
            ));
        }
        if report.non_compliant() {
            out.note(format!(
                "see the findings with `fleetcert audit findings --task {}`",
                report.task.task_id
            ));
        }
    }
    Ok(if report.non_compliant() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn run(ctx: &Ctx, cmd: AuditCommand) -> CmdResult {
    let out = ctx.out();
    match cmd {
        AuditCommand::Run(args) => run_audit(ctx, args).await,
        AuditCommand::Findings(args) => {
            let check = args.check.as_deref().map(check_name).transpose()?;
            let registry = ctx.registry(false).await?;
            let findings = registry
                .audit_findings(&AuditFindingFilter {
                    task_id: args.task,
                    check_name: check.map(str::to_owned),
                    resource_id: args.resource,
                    limit: args.limit,
                })
                .await
                .map_err(|e| failed(e.to_string()))?;
            if out.is_json() {
                out.json(&findings.iter().map(finding_json).collect::<Vec<_>>());
            } else if findings.is_empty() {
                out.note("no findings");
            } else {
                for f in &findings {
                    out.line(format!(
                        "{}\t{}\t{}\t{} {}\t{}{}\t{}",
                        timestamp(f.found_at),
                        f.check_name,
                        f.severity,
                        f.resource_type,
                        f.resource_id,
                        f.reason_code,
                        if f.suppressed { " (suppressed)" } else { "" },
                        f.reason_description
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Tasks { limit } => {
            let registry = ctx.registry(false).await?;
            let tasks = registry
                .audit_tasks(limit)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if out.is_json() {
                out.json(&tasks.iter().map(task_json).collect::<Vec<_>>());
            } else if tasks.is_empty() {
                out.note("no audit tasks (run one with `fleetcert audit run`)");
            } else {
                for t in &tasks {
                    out.line(format!(
                        "{}\t{}\t{}\t{}\t{} of {} checks non-compliant",
                        t.task_id,
                        timestamp(t.started_at),
                        t.task_type,
                        t.task_status,
                        t.summary["nonCompliantChecksCount"],
                        t.summary["totalChecksCount"]
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Suppress(args) => {
            let check = check_name(&args.check)?;
            if args.resource.trim().is_empty() || args.resource.len() > 256 {
                return Err(bad_input("--resource must be 1 to 256 characters"));
            }
            let clock = clock_from_env()?;
            let now = clock.now();
            let expires_at = match (&args.expires_in, &args.until) {
                (Some(d), _) => {
                    if d.is_zero() {
                        return Err(bad_input("--expires-in must be more than 0"));
                    }
                    Some(now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
                }
                (None, Some(text)) => {
                    let at = time::OffsetDateTime::parse(
                        text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map_err(|e| bad_input(format!("--until {text:?}: not RFC 3339 ({e})")))?
                    .unix_timestamp();
                    if at <= now {
                        return Err(bad_input(format!("--until {text} is in the past")));
                    }
                    Some(at)
                }
                (None, None) => None,
            };
            let suppression = AuditSuppression {
                check_name: check.to_owned(),
                resource_id: args.resource,
                expires_at,
                description: args.description,
                created_at: now,
            };
            let registry = ctx.registry(false).await?;
            registry
                .put_audit_suppression(&suppression)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if out.is_json() {
                out.json(&suppression_json(&suppression, now));
            } else {
                out.line(format!(
                    "suppressed {} for {} {}",
                    suppression.check_name,
                    suppression.resource_id,
                    suppression
                        .expires_at
                        .map(|at| format!("until {}", timestamp(at)))
                        .unwrap_or_else(|| "until deleted".into())
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Unsuppress { check, resource } => {
            let check = check_name(&check)?;
            let clock = clock_from_env()?;
            let registry = ctx.registry(false).await?;
            let deleted = registry
                .delete_audit_suppression(check, &resource, clock.now())
                .await
                .map_err(|e| failed(e.to_string()))?;
            if !deleted {
                return Err(failed(format!("no suppression of {check} for {resource}")));
            }
            if out.is_json() {
                out.json(
                    &json!({ "checkName": check, "resourceIdentifier": resource, "deleted": true }),
                );
            } else {
                out.line(format!("deleted the suppression of {check} for {resource}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Suppressions => {
            let clock = clock_from_env()?;
            let now = clock.now();
            let registry = ctx.registry(false).await?;
            let list = registry
                .audit_suppressions()
                .await
                .map_err(|e| failed(e.to_string()))?;
            if out.is_json() {
                out.json(
                    &list
                        .iter()
                        .map(|s| suppression_json(s, now))
                        .collect::<Vec<_>>(),
                );
            } else if list.is_empty() {
                out.note("no suppressions");
            } else {
                for s in &list {
                    out.line(format!(
                        "{}\t{}\t{}\t{}",
                        s.check_name,
                        s.resource_id,
                        match s.expires_at {
                            Some(at) if at <= now => format!("expired {}", timestamp(at)),
                            Some(at) => format!("until {}", timestamp(at)),
                            None => "until deleted".into(),
                        },
                        s.description
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Mitigate(args) => {
            let check = args.check.as_deref().map(check_name).transpose()?;
            let reason: fleetcert_ca::RevocationReason = args
                .reason
                .parse()
                .map_err(|e: fleetcert_ca::CaError| bad_input(e.to_string()))?;
            let action = match args.action {
                crate::args::MitigationAction::Revoke => audit::MitigationAction::Revoke(reason),
                crate::args::MitigationAction::Rotate => audit::MitigationAction::Rotate,
                crate::args::MitigationAction::ReplaceDefaultPolicyVersion => {
                    audit::MitigationAction::ReplaceDefaultPolicyVersion
                }
                crate::args::MitigationAction::AddToThingGroup => {
                    audit::check_group_name(&args.thing_group)?;
                    audit::MitigationAction::AddToThingGroup(args.thing_group.clone())
                }
            };
            let revokes = matches!(action, audit::MitigationAction::Revoke(_));
            let clock = clock_from_env()?;
            let registry = ctx.registry(false).await?;
            let actions = audit::mitigate(
                registry.as_ref(),
                &audit::MitigationTarget {
                    task_id: args.task,
                    check_name: check.map(str::to_owned),
                    resource_id: args.resource,
                },
                action,
                args.dry_run,
                clock.now(),
            )
            .await?;
            let applied = actions.iter().filter(|a| a.status == "applied").count();
            // Revocations are committed; the CRL follows (a running serve publishes it
            // within seconds anyway).
            if applied > 0
                && revokes
                && let Ok(ca) = ctx
                    .data()
                    .load_issuing_ca(crate::context::passphrase().as_deref())
            {
                let _ = fleetcert_lifecycle::revocation::CrlPublisher::new(
                    registry.clone(),
                    std::sync::Arc::new(ca),
                    clock.clone(),
                )
                .refresh()
                .await;
            }
            if out.is_json() {
                out.json(
                    &json!({ "dryRun": args.dry_run, "applied": applied, "actions": actions }),
                );
            } else {
                if actions.is_empty() {
                    out.note("no findings to act on");
                }
                for a in &actions {
                    out.line(format!(
                        "{}\t{}\t{}\t{}",
                        a.status, a.check_name, a.resource_identifier, a.message
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checks => {
            if out.is_json() {
                out.json(
                    &audit::CHECKS
                        .iter()
                        .map(|c| {
                            json!({
                                "checkName": c.name,
                                "apiName": c.api_name,
                                "severity": c.severity,
                                "description": c.description,
                                "applicable": c.applicable,
                            })
                        })
                        .collect::<Vec<_>>(),
                );
            } else {
                for c in audit::CHECKS {
                    out.line(format!(
                        "{:<62} {:<9} {}{}",
                        c.name,
                        c.severity.as_str(),
                        c.description,
                        if c.applicable {
                            ""
                        } else {
                            " (not applicable)"
                        }
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
