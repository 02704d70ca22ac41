//! A batch killed with SIGKILL mid-run can be re-run: every file on disk has a record, no
//! serial is issued twice, and the re-run completes the rest.
use crate::util::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[test]
fn a_batch_killed_mid_run_resumes_without_duplicates() {
    let env = Env::new();
    env.init_ca();
    let devices = 6000;
    let csv = env.path("pallet.csv");
    let body: String = (0..devices).map(|i| format!("dev-{i:05}\n")).collect();
    std::fs::write(&csv, format!("thing_name\n{body}")).unwrap();

    let mut child = env
        .cmd()
        .args([
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--out",
            "out",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some devices are out but (very likely) not all.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let written = files_in(&env.out_dir())
            .iter()
            .filter(|f| f.ends_with(".crt"))
            .count();
        if written >= 500 || Instant::now() > deadline {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Every certificate file on disk has a registry record.
    let recorded: HashMap<String, serde_json::Value> = env
        .certs()
        .into_iter()
        .map(|c| (c["serial"].as_str().unwrap().to_owned(), c))
        .collect();
    let crt_files: Vec<String> = files_in(&env.out_dir())
        .into_iter()
        .filter(|f| f.ends_with(".crt"))
        .collect();
    assert!(
        !crt_files.is_empty(),
        "the run was killed before writing anything"
    );
    eprintln!(
        "killed after {} of {devices} certificate files, {} records",
        crt_files.len(),
        recorded.len()
    );
    for file in &crt_files {
        let serial = serial_of(&env.out_dir().join(file));
        assert!(
            recorded.contains_key(&serial),
            "{file} ({serial}) has no record"
        );
    }

    // The re-run completes the rest.
    let rerun = env.ok(&[
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--out",
        "out",
    ]);
    let summary: serde_json::Value = serde_json::from_str(rerun.lines().last().unwrap()).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    let done = ["issued", "skipped", "redelivered"].map(|k| summary[k].as_u64().unwrap());
    assert_eq!(done.iter().sum::<u64>(), devices as u64, "{summary}");
    let all = env.certs();
    let serials: HashSet<&str> = all.iter().map(|c| c["serial"].as_str().unwrap()).collect();
    assert_eq!(serials.len(), all.len(), "a serial was recorded twice");
    let active: Vec<&serde_json::Value> = all.iter().filter(|c| c["status"] == "active").collect();
    assert_eq!(
        active.len(),
        devices,
        "exactly one active certificate per device"
    );
    // Anything else was never delivered and has been revoked, not left dangling.
    for c in all.iter().filter(|c| c["status"] != "active") {
        assert_eq!(c["status"], "revoked", "{c}");
        assert!(
            c["delivered_at"].is_null(),
            "a delivered certificate was revoked: {c}"
        );
    }
    // Each device's files are its active certificate and the key that goes with it.
    let active_by_thing: HashMap<&str, &str> = active
        .iter()
        .map(|c| {
            (
                c["thing_name"].as_str().unwrap(),
                c["serial"].as_str().unwrap(),
            )
        })
        .collect();
    for i in 0..devices {
        let name = format!("dev-{i:05}");
        let crt = env.out_dir().join(format!("{name}.crt"));
        assert_eq!(serial_of(&crt), active_by_thing[name.as_str()], "{name}");
        assert!(
            env.out_dir().join(format!("{name}.key")).exists(),
            "{name}.key"
        );
    }
    for i in (0..devices).step_by(997) {
        let name = format!("dev-{i:05}");
        let key = env.out_dir().join(format!("{name}.key"));
        let crt = env.out_dir().join(format!("{name}.crt"));
        assert_eq!(
            openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()]),
            openssl(&["x509", "-noout", "-pubkey", "-in", crt.to_str().unwrap()]),
            "{name}: key and certificate do not match"
        );
    }
    assert!(
        files_in(&env.out_dir())
            .iter()
            .all(|f| !f.ends_with(".fleetcert-tmp"))
    );
}
