//! `fleetcert templates lint|list`.
use crate::context::{CliError, Ctx};
use fleetcert_templates::{Template, lint_template};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

/// Parses and lints one template text: Ok(findings) or Err(why it is invalid).
fn check(name: &str, text: &str) -> Result<Vec<fleetcert_templates::TemplateFinding>, String> {
    let template = Template::parse(name, text).map_err(|e| e.to_string())?;
    Ok(lint_template(&template))
}

pub fn lint(ctx: &Ctx, files: &[PathBuf]) -> Result<ExitCode, CliError> {
    let out = ctx.out();
    let (mut invalid, mut permissive) = (0, 0);
    let mut results = Vec::new();
    for file in files {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("template")
            .to_owned();
        let outcome = fleetcert_lifecycle::read_template_path(file)
            .map_err(|e| e.to_string())
            .and_then(|text| check(&name, &text));
        match &outcome {
            Ok(findings) if findings.is_empty() => {
                out.line(format!("{}: ok", file.display()));
                results.push(json!({ "file": file, "ok": true, "findings": [] }));
            }
            Ok(findings) => {
                permissive += 1;
                for f in findings {
                    out.line(format!("{}: {f}", file.display()));
                }
                results.push(json!({ "file": file, "ok": false, "findings": findings }));
            }
            Err(error) => {
                invalid += 1;
                out.note(format!("{}: {error}", file.display()));
                results.push(json!({ "file": file, "ok": false, "error": error }));
            }
        }
    }
    if out.is_json() {
        out.json(&results);
    }
    Ok(if invalid > 0 {
        ExitCode::from(2)
    } else if permissive > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn list(ctx: &Ctx) -> Result<ExitCode, CliError> {
    let out = ctx.out();
    let mut rows = Vec::new();
    let files = ctx.data().template_files()?;
    let has_default = files
        .iter()
        .any(|(n, _)| n == fleetcert_templates::DEFAULT_TEMPLATE_NAME);
    let mut entries: Vec<(String, Option<PathBuf>, Result<String, String>)> = files
        .into_iter()
        .map(|(name, path)| {
            let text = ctx
                .data()
                .read_template_file(&path)
                .map_err(|e| e.to_string());
            (name, Some(path), text)
        })
        .collect();
    if !has_default {
        entries.push((
            fleetcert_templates::DEFAULT_TEMPLATE_NAME.to_owned(),
            None,
            Ok(fleetcert_templates::DEFAULT_TEMPLATE_YAML.to_owned()),
        ));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, path, text) in entries {
        let status = match text.and_then(|t| check(&name, &t)) {
            Ok(f) if f.is_empty() => "ok".to_owned(),
            Ok(f) => format!("refused: {} least-privilege finding(s)", f.len()),
            Err(e) => format!("invalid: {e}"),
        };
        let source = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in".into());
        out.line(format!("{name:<24} {status:<40} {source}"));
        rows.push(json!({ "name": name, "status": status, "source": source }));
    }
    if out.is_json() {
        out.json(&rows);
    }
    Ok(ExitCode::SUCCESS)
}
