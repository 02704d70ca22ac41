//! The Device Defender audit (issue 16) through the real binary: a compliant fleet, a
//! fleet that violates the certificate checks (shifted clocks, short validity), exit
//! codes, suppressions that expire, and serve's scheduled audit with its webhook and
//! metrics. The MQTT-based checks are in `mqtt_audit.rs` (real mosquitto and clients).
use crate::jitp::Served;
use crate::util::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Output;
use std::time::{Duration, Instant};

const DAY: i64 = 86_400;

/// `audit run --output json ARGS` with fleetcert's clock shifted by `offset` seconds.
pub fn audit_at(env: &Env, offset: i64, args: &[&str]) -> (i32, serde_json::Value) {
    let out: Output = env
        .cmd()
        .env("FLEETCERT_TIME_OFFSET", offset.to_string())
        .args(["--output", "json", "audit", "run"])
        .args(args)
        .output()
        .unwrap();
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "audit run printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), summary)
}

/// The summary line of `check`.
pub fn detail<'a>(summary: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    summary["auditDetails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["checkName"] == check)
        .unwrap_or_else(|| panic!("{check} missing from {summary}"))
}

/// (resource, reason code) of `check`'s findings in `task`, sorted.
pub fn findings(env: &Env, task: &str, check: &str) -> Vec<(String, String, bool)> {
    let list = env.json(&["audit", "findings", "--task", task, "--check", check]);
    let mut found: Vec<(String, String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["nonCompliantResource"]["resourceIdentifier"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                f["reasonForNonComplianceCode"].as_str().unwrap().to_owned(),
                f["isSuppressed"].as_bool().unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

fn serials(env: &Env) -> Vec<String> {
    let mut serials: Vec<String> = env
        .certs()
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect();
    serials.sort();
    serials
}

#[test]
fn a_fresh_fleet_complies_with_every_check() {
    let env = Env::new();
    env.init_ca();
    env.provision_pallet("ok", 3, 365);
    let (code, summary) = audit_at(&env, 0, &[]);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["taskStatus"], "COMPLETED");
    assert_eq!(summary["taskType"], "ON_DEMAND_AUDIT_TASK");
    assert_eq!(summary["totalChecksCount"], 14);
    assert_eq!(summary["nonCompliantChecksCount"], 0);
    assert_eq!(summary["compliantChecksCount"], 14);
    for d in summary["auditDetails"].as_array().unwrap() {
        assert_eq!(d["checkRunStatus"], "COMPLETED_COMPLIANT", "{d}");
        assert_eq!(d["nonCompliantResourcesCount"], 0, "{d}");
    }
    assert_eq!(
        detail(&summary, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK")["totalResourcesCount"],
        3
    );
    assert_eq!(
        detail(&summary, "CA_CERT_APPROACHING_EXPIRATION_CHECK")["totalResourcesCount"],
        2
    );
    // Listed, never silently missing: the checks that cannot apply say so.
    let cognito = detail(
        &summary,
        "AUTHENTICATED_COGNITO_ROLE_OVERLY_PERMISSIVE_CHECK",
    );
    assert!(
        cognito["message"]
            .as_str()
            .unwrap()
            .contains("not applicable"),
        "{cognito}"
    );
    let tasks = env.json(&["audit", "tasks"]);
    assert_eq!(tasks.as_array().unwrap().len(), 1);
    assert_eq!(tasks[0]["taskId"], summary["taskId"]);
}

#[test]
fn expiring_aged_certificates_and_cas_are_found_and_suppressions_expire() {
    let env = Env::new();
    env.init_ca();
    env.provision_pallet("short", 2, 20);
    env.provision_pallet("long", 1, 900);
    let all = serials(&env);
    let short: Vec<String> = env
        .certs()
        .iter()
        .filter(|c| c["thing_name"].as_str().unwrap().starts_with("short"))
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!((all.len(), short.len()), (3, 2));

    // Now: the two 20-day certificates are within 30 days of expiry.
    let (code, summary) = audit_at(&env, 0, &[]);
    assert_eq!(code, 1, "{summary}");
    let expiring = detail(&summary, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK");
    assert_eq!(expiring["checkRunStatus"], "COMPLETED_NON_COMPLIANT");
    assert_eq!(expiring["nonCompliantResourcesCount"], 2);
    assert_eq!(expiring["totalResourcesCount"], 3);
    assert_eq!(summary["nonCompliantChecksCount"], 1, "{summary}");
    let task = summary["taskId"].as_str().unwrap().to_owned();
    let first_task = task.clone();
    let mut expected: Vec<(String, String, bool)> = short
        .iter()
        .map(|s| {
            (
                s.clone(),
                "CERTIFICATE_APPROACHING_EXPIRATION".into(),
                false,
            )
        })
        .collect();
    expected.sort();
    assert_eq!(
        findings(&env, &task, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK"),
        expected
    );

    // 400 days later: the short ones are past expiration, the long one is past the age
    // threshold (365 days) and approaching nothing.
    let (code, later) = audit_at(
        &env,
        400 * DAY,
        &[
            "--checks",
            "DEVICE_CERTIFICATE_EXPIRING_CHECK,DEVICE_CERT_AGE_CHECK",
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(
        later["totalChecksCount"], 2,
        "API names are accepted: {later}"
    );
    let task = later["taskId"].as_str().unwrap().to_owned();
    let mut past: Vec<(String, String, bool)> = short
        .iter()
        .map(|s| (s.clone(), "CERTIFICATE_PAST_EXPIRATION".into(), false))
        .collect();
    past.sort();
    assert_eq!(
        findings(&env, &task, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK"),
        past
    );
    let aged = findings(&env, &task, "DEVICE_CERT_AGE_CHECK");
    assert_eq!(aged.len(), 3, "{aged:?}");
    assert!(
        aged.iter()
            .all(|(_, code, _)| code == "CERTIFICATE_PAST_AGE_THRESHOLD")
    );

    // The CAs: the issuing CA (3650 days) is within a 3650-day threshold, the root
    // (7300 days) is not; 7,290 days later the issuing CA has expired and the root is
    // close.
    let ca_check = [
        "--checks",
        "CA_CERT_APPROACHING_EXPIRATION_CHECK",
        "--expiring-within-days",
        "3650",
    ];
    let (code, cas) = audit_at(&env, 0, &ca_check);
    assert_eq!(code, 1);
    let d = detail(&cas, "CA_CERT_APPROACHING_EXPIRATION_CHECK");
    assert_eq!(
        (
            d["nonCompliantResourcesCount"].as_u64(),
            d["totalResourcesCount"].as_u64()
        ),
        (Some(1), Some(2)),
        "{cas}"
    );
    let (_, later) = audit_at(&env, 7290 * DAY, &ca_check[..2]);
    let task = later["taskId"].as_str().unwrap().to_owned();
    let mut codes: Vec<String> = findings(&env, &task, "CA_CERT_APPROACHING_EXPIRATION_CHECK")
        .into_iter()
        .map(|(_, code, _)| code)
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "CERTIFICATE_APPROACHING_EXPIRATION",
            "CERTIFICATE_PAST_EXPIRATION"
        ]
    );

    // A suppression of one certificate for a day: out of the counts until it expires.
    env.ok(&[
        "audit",
        "suppress",
        "--check",
        "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK",
        "--resource",
        &short[0],
        "--expires-in",
        "1d",
        "--description",
        "replacement ordered",
    ]);
    let only_expiry = ["--checks", "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK"];
    let (code, suppressed) = audit_at(&env, 0, &only_expiry);
    assert_eq!(code, 1, "the other short certificate still counts");
    let d = detail(&suppressed, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK");
    assert_eq!(d["nonCompliantResourcesCount"], 1, "{d}");
    assert_eq!(d["suppressedNonCompliantResourcesCount"], 1, "{d}");
    let task = suppressed["taskId"].as_str().unwrap().to_owned();
    assert!(
        findings(&env, &task, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK").contains(&(
            short[0].clone(),
            "CERTIFICATE_APPROACHING_EXPIRATION".into(),
            true
        ))
    );
    env.ok(&[
        "audit",
        "suppress",
        "--check",
        "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK",
        "--resource",
        &short[1],
        "--expires-in",
        "1d",
    ]);
    let (code, quiet) = audit_at(&env, 0, &only_expiry);
    assert_eq!(code, 0, "every finding suppressed: {quiet}");
    // Two days later the suppressions have expired.
    let (code, back) = audit_at(&env, 2 * DAY, &only_expiry);
    assert_eq!(code, 1);
    assert_eq!(
        detail(&back, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK")["nonCompliantResourcesCount"],
        2
    );
    let listed = env.json(&["audit", "suppressions"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    env.ok(&[
        "audit",
        "unsuppress",
        "--check",
        "DEVICE_CERTIFICATE_EXPIRING_CHECK",
        "--resource",
        &short[0],
    ]);
    assert_eq!(
        env.json(&["audit", "suppressions"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Mitigation: rotate the certificates the first task found expiring. A dry run
    // changes nothing; the real run opens exactly their rotations, and a sweep replaces
    // exactly them.
    let mitigate = |dry: bool| {
        let mut args = vec![
            "audit",
            "mitigate",
            "--task",
            &first_task,
            "--action",
            "rotate",
        ];
        if dry {
            args.push("--dry-run");
        }
        env.json(&args)
    };
    let statuses = |v: &serde_json::Value| -> Vec<String> {
        let mut s: Vec<String> = v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["status"].as_str().unwrap().to_owned())
            .collect();
        s.sort();
        s
    };
    assert_eq!(statuses(&mitigate(true)), ["would_apply", "would_apply"]);
    assert_eq!(env.certs().len(), 3, "a dry run changed something");
    let applied = mitigate(false);
    assert_eq!(applied["applied"], 2, "{applied}");
    assert_eq!(
        applied["actions"][0]["actionType"],
        "ROTATE_DEVICE_CERTIFICATE"
    );
    assert_eq!(statuses(&mitigate(false)), ["already_done", "already_done"]);
    env.ok(&["rotate"]);
    let certs = env.certs();
    assert_eq!(certs.len(), 5, "two replacements: {certs:#?}");
    let long_certs = certs
        .iter()
        .filter(|c| c["thing_name"].as_str().unwrap().starts_with("long"))
        .count();
    assert_eq!(long_certs, 1, "the long-lived device was rotated too");
    let mut unknown = env.cmd();
    unknown.args(["audit", "mitigate", "--task", "nope", "--action", "rotate"]);
    assert_eq!(unknown.output().unwrap().status.code(), Some(2));
    // A thing group name AWS would refuse is bad input, and adds nothing anywhere.
    let mut bad_group = env.cmd();
    bad_group.args([
        "audit",
        "mitigate",
        "--task",
        &first_task,
        "--action",
        "add-to-thing-group",
        "--thing-group",
        "no spaces/here",
    ]);
    let out = bad_group.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("thing group name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env.json(&["policies", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "fleetcert-quarantine")
    );
}

#[test]
fn audit_input_errors_exit_2_and_change_nothing() {
    let env = Env::new();
    env.init_ca();
    for args in [
        vec!["audit", "run", "--checks", "NO_SUCH_CHECK"],
        vec!["audit", "run", "--cert-age-days", "10"],
        vec!["audit", "findings", "--check", "NO_SUCH_CHECK"],
        vec![
            "audit",
            "suppress",
            "--check",
            "LOGGING_DISABLED_CHECK",
            "--resource",
            "x",
            "--until",
            "2001-01-01T00:00:00Z",
        ],
        vec![
            "audit",
            "suppress",
            "--check",
            "LOGGING_DISABLED_CHECK",
            "--resource",
            "x",
            "--until",
            "tomorrow",
        ],
    ] {
        let err = env.fails(&args, 2);
        assert!(err.contains("error"), "{args:?}: {err}");
    }
    let err = env.fails(
        &[
            "audit",
            "unsuppress",
            "--check",
            "LOGGING_DISABLED_CHECK",
            "--resource",
            "x",
        ],
        1,
    );
    assert!(err.contains("no suppression"), "{err}");
    assert!(env.json(&["audit", "tasks"]).as_array().unwrap().is_empty());
    assert!(
        env.json(&["audit", "suppressions"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A one-shot HTTP endpoint on loopback: the body of the first POST it gets.
fn webhook() -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/audit", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        let mut stream = stream;
        let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
    });
    (url, rx)
}

#[test]
fn serve_runs_scheduled_audits_posts_them_and_exports_metrics() {
    let env = Env::new();
    env.init_ca();
    env.provision_pallet("soon", 1, 10);
    env.fails(
        &["serve", "--audit-webhook", "https://example.invalid/hook"],
        2,
    );
    env.fails(&["serve", "--audit-interval", "10s"], 2);
    let (url, posted) = webhook();
    let served = Served::start(&env, &["--audit-interval", "1h", "--audit-webhook", &url]);
    // No task yet: the first runs at start.
    let body = posted
        .recv_timeout(Duration::from_secs(20))
        .expect("the scheduled audit's summary was not posted");
    let summary: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(summary["taskType"], "SCHEDULED_AUDIT_TASK", "{summary}");
    assert_eq!(
        detail(&summary, "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK")["nonCompliantResourcesCount"],
        1
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = String::from_utf8(
            std::process::Command::new("curl")
                .args(["-fsS", &format!("http://{}/metrics", served.admin)])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        if text.contains("fleetcert_audit_last_task_timestamp_seconds") || Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metrics.contains(
            "fleetcert_audit_non_compliant_resources{check=\"DEVICE_CERT_APPROACHING_EXPIRATION_CHECK\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "fleetcert_audit_non_compliant_resources{check=\"LOGGING_DISABLED_CHECK\"} 0"
        ),
        "{metrics}"
    );
    served.stop();
    let tasks = env.json(&["audit", "tasks"]);
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
    assert_eq!(tasks[0]["taskType"], "SCHEDULED_AUDIT_TASK");
    // Restarted within the interval: no new task at start.
    let (url, posted) = webhook();
    let served = Served::start(&env, &["--audit-interval", "1h", "--audit-webhook", &url]);
    assert!(posted.recv_timeout(Duration::from_secs(3)).is_err());
    served.stop();
    assert_eq!(env.json(&["audit", "tasks"]).as_array().unwrap().len(), 1);
}
