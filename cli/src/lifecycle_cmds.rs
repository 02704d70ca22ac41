//! `rotate`, `revoke` and `crl`: the certificate lifecycle after provisioning.
use crate::args::{CrlArgs, RevokeArgs, RotateArgs};
use crate::context::{CliError, Ctx, bad_input, failed, passphrase};
use crate::output::cert_json;
use crate::output::timestamp;
use fleetcert_ca::RevocationReason;
use fleetcert_lifecycle::renewal::clock_from_env;
use fleetcert_lifecycle::revocation::{self, CrlPublisher, crl_pem};
use fleetcert_lifecycle::rotation::{RotationSettings, RotationStats, Rotator, SweepReport};
use fleetcert_registry::{RevocationTarget, RotationBacklog};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

type CmdResult = Result<ExitCode, CliError>;

pub async fn rotate(ctx: &Ctx, args: RotateArgs) -> CmdResult {
    let clock = clock_from_env()?;
    let registry = ctx.registry(false).await?;
    let out = ctx.out();
    if args.dry_run {
        let now = clock.now();
        let expiring_before = args
            .within
            .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)));
        let due = registry
            .due_certificates(now, expiring_before, None)
            .await?;
        let backlog = registry.rotation_backlog(now).await?;
        if out.is_json() {
            let mut doc = json!({
                "dry_run": true,
                "due": due.len(),
                "certificates": due.iter().map(cert_json).collect::<Vec<_>>(),
            });
            add_backlog(&mut doc, &backlog);
            out.json(&doc);
        } else {
            out.line("SERIAL                           THING                            ORIGIN    RENEW_AT              NOT_AFTER");
            for c in &due {
                out.line(format!(
                    "{:<32} {:<32} {:<9} {:<21} {}",
                    c.serial,
                    c.thing_name,
                    c.origin,
                    timestamp(c.renew_at),
                    timestamp(c.not_after)
                ));
            }
            out.note(format!(
                "{} certificates due for rotation{} (dry run: nothing changed)",
                due.len(),
                backlog_text(&backlog)
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let passphrase = passphrase();
    let ca = Arc::new(ctx.data().load_issuing_ca(passphrase.as_deref())?);
    let issuance = Arc::new(ctx.data().issuance(ca)?);
    let sealer = Arc::new(ctx.data().sealer(passphrase.as_deref())?);
    let settings = RotationSettings {
        lease: args.lease,
        batch: args.batch,
        expiring_within: args.within,
        ..RotationSettings::default()
    };
    let rotator = Rotator::new(
        registry,
        issuance,
        sealer,
        clock,
        settings,
        Arc::new(RotationStats::default()),
    );
    let show_progress = std::io::stderr().is_terminal();
    let report = rotator
        .sweep(|r: &SweepReport| {
            if show_progress {
                eprint!(
                    "\rrotate: {} due, {} replacements issued, {} failed",
                    r.opened, r.issued, r.failed
                );
                let _ = std::io::stderr().flush();
            }
        })
        .await?;
    if show_progress {
        eprintln!();
    }
    let backlog = rotator.backlog().await?;
    let rate = if report.seconds > 0.0 {
        report.issued as f64 / report.seconds
    } else {
        0.0
    };
    if out.is_json() {
        let mut doc = json!({
            "worker": rotator.owner(),
            "opened": report.opened,
            "issued": report.issued,
            "lost_leases": report.lost_leases,
            "failed": report.failed,
            "seconds": report.seconds,
            "issued_per_second": rate,
            "phases": {
                "open_seconds": report.open_seconds,
                "claim_seconds": report.claim_seconds,
                "sign_seconds": report.sign_seconds,
                "commit_seconds": report.commit_seconds,
            },
        });
        add_backlog(&mut doc, &backlog);
        out.json(&doc);
    } else {
        out.line(format!(
            "rotation sweep: {} came due, {} replacements issued ({:.0}/s), {} failed, {} lost to another worker, {:.2} s{}",
            report.opened,
            report.issued,
            rate,
            report.failed,
            report.lost_leases,
            report.seconds,
            backlog_text(&backlog)
        ));
        out.note(
            "devices with their own keys re-enroll through EST; generated-key devices fetch their replacement; old certificates are revoked once the new one is used",
        );
    }
    Ok(if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The open rotations a sweep did not (or a dry run would not) issue, as JSON fields:
/// `leased` (under another worker's unexpired lease) with `leased_until` (when the last
/// lease expires), `claimable` (the next sweep takes them), `awaiting_devices` (devices
/// with their own keys that have not re-enrolled yet).
fn add_backlog(doc: &mut serde_json::Value, backlog: &RotationBacklog) {
    doc["leased"] = json!(backlog.leased);
    doc["leased_until"] = json!(backlog.leased_until.map(timestamp));
    doc["claimable"] = json!(backlog.claimable);
    doc["awaiting_devices"] = json!(backlog.awaiting_devices);
}

/// The same for people: empty when nothing is open, else `; open rotations: …`.
fn backlog_text(backlog: &RotationBacklog) -> String {
    let mut parts = Vec::new();
    if backlog.leased > 0 {
        parts.push(format!(
            "{} leased by another worker until {} (a later sweep takes them over)",
            backlog.leased,
            backlog
                .leased_until
                .map(timestamp)
                .unwrap_or_else(|| "?".into())
        ));
    }
    if backlog.claimable > 0 {
        parts.push(format!("{} waiting for the next sweep", backlog.claimable));
    }
    if backlog.awaiting_devices > 0 {
        parts.push(format!(
            "{} waiting for their devices to re-enroll",
            backlog.awaiting_devices
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; open rotations: {}", parts.join(", "))
    }
}

/// A serial as `certs list` prints it: hex, case-insensitive, optional `:` separators.
fn normalise_serial(text: &str) -> Result<String, CliError> {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad_input(format!(
            "invalid serial {text:?}: expected the certificate's serial number in hex (as `fleetcert certs list` shows it)"
        )));
    }
    Ok(hex)
}

pub async fn revoke(ctx: &Ctx, args: RevokeArgs) -> CmdResult {
    let reason: RevocationReason = args
        .reason
        .parse()
        .map_err(|e: fleetcert_ca::CaError| bad_input(e.to_string()))?;
    let target = match (&args.serial, &args.thing) {
        (Some(serial), None) => RevocationTarget::Serial(normalise_serial(serial)?),
        (None, Some(thing)) => {
            crate::context::check_thing_name(thing)?;
            RevocationTarget::Thing(thing.clone())
        }
        _ => return Err(bad_input("give a SERIAL or --thing NAME")),
    };
    let clock = clock_from_env()?;
    let registry = ctx.registry(false).await?;
    let revoked = revocation::revoke(registry.as_ref(), target.clone(), reason, clock.now())
        .await
        .map_err(|e| match e {
            // A well-formed serial or name that is not in the registry: the revocation
            // failed (exit 1), as `things show` of an unknown thing does.
            fleetcert_lifecycle::LifecycleError::Registry(
                fleetcert_registry::RegistryError::NotFound(what),
            ) => failed(format!("no {what} in the registry")),
            other => other.into(),
        })?;
    // The revocation is committed; the CRL follows. A running server would publish it
    // within seconds anyway, so a failure here is reported but does not undo anything.
    let published = match ctx.data().load_issuing_ca(passphrase().as_deref()) {
        Ok(ca) => CrlPublisher::new(registry.clone(), Arc::new(ca), clock.clone())
            .refresh()
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let out = ctx.out();
    if out.is_json() {
        out.json(&json!({
            "revoked": revoked,
            "reason": reason.as_str(),
            "crl": match &published {
                Ok(p) => json!({"number": p.crl.number, "entries": p.crl.entry_count, "next_update": timestamp(p.crl.next_update)}),
                Err(e) => json!({"error": e}),
            },
        }));
    } else {
        if revoked.is_empty() {
            out.line("nothing to revoke: already revoked");
        }
        for r in &revoked {
            out.line(format!(
                "revoked {} ({}), reason {}",
                r.serial,
                r.thing_name,
                r.reason.as_deref().unwrap_or("unspecified")
            ));
        }
        match &published {
            Ok(p) => out.note(format!(
                "CRL #{} published with {} entries (next update {})",
                p.crl.number,
                p.crl.entry_count,
                timestamp(p.crl.next_update)
            )),
            Err(e) => out.note(format!(
                "warning: the revocation is recorded, but no new CRL was published ({e}); `fleetcert serve` or `fleetcert crl` will publish it"
            )),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn crl(ctx: &Ctx, args: CrlArgs) -> CmdResult {
    let clock = clock_from_env()?;
    let ca = Arc::new(ctx.data().load_issuing_ca(passphrase().as_deref())?);
    let registry = ctx.registry(false).await?;
    let published = CrlPublisher::new(registry, ca, clock).refresh().await?;
    let crl = &published.crl;
    let bytes = if args.der {
        crl.der.clone()
    } else {
        crl_pem(&crl.der).into_bytes()
    };
    let out = ctx.out();
    if let Some(path) = &args.out {
        write_atomically(path, &bytes)?;
    } else if !out.is_json() {
        crate::output::write_stdout(&bytes);
    }
    let summary = json!({
        "number": crl.number,
        "this_update": timestamp(crl.this_update),
        "next_update": timestamp(crl.next_update),
        "entries": crl.entry_count,
        "newly_signed": published.signed,
        "out": args.out,
    });
    if out.is_json() {
        let mut summary = summary;
        if args.out.is_none() {
            summary["pem"] = json!(crl_pem(&crl.der));
        }
        out.json(&summary);
    } else {
        out.note(format!(
            "CRL #{} with {} entries, valid until {}{}",
            crl.number,
            crl.entry_count,
            timestamp(crl.next_update),
            args.out
                .as_ref()
                .map(|p| format!(", written to {}", p.display()))
                .unwrap_or_default()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), CliError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    // A missing or unwritable directory is an I/O failure (exit 1), not bad input.
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| failed(format!("cannot write to {}: {e}", path.display())))?;
    temp.write_all(bytes)
        .and_then(|_| temp.as_file().sync_all())
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    temp.persist(path)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}
