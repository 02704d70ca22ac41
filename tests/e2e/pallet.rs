//! `provision --pallet FILE`: one JSON-lines file instead of two files per device, with
//! the device files' guarantees (commit before release, never half-written, resumable).
use crate::util::*;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn temp_of(pallet: &Path) -> PathBuf {
    pallet.with_file_name(format!(
        ".{}.fleetcert-tmp",
        pallet.file_name().unwrap().to_str().unwrap()
    ))
}

/// The pallet's header and device lines.
fn read_pallet(path: &Path) -> (serde_json::Value, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "the pallet ends in a torn line");
    let mut lines = text.lines().map(|l| serde_json::from_str(l).unwrap());
    let header: serde_json::Value = lines.next().expect("a header line");
    (header, lines.collect())
}

fn write_csv(env: &Env, name: &str, rows: &[String]) -> PathBuf {
    let csv = env.path(name);
    std::fs::write(&csv, format!("thing_name,csr\n{}\n", rows.join("\n"))).unwrap();
    csv
}

#[test]
fn a_pallet_holds_every_device_once_and_each_verifies_with_openssl() {
    let env = Env::new();
    env.init_ca();
    let dir = env.dir.path();
    let csr = p256_csr(dir, "csr-dev");
    let mut rows: Vec<String> = (0..40).map(|i| format!("gen-{i:02},")).collect();
    rows.push(format!(
        "csr-dev,{}",
        csr.file_name().unwrap().to_str().unwrap()
    ));
    let csv = write_csv(&env, "line.csv", &rows);
    let pallet = env.path("pallets/line-7.jsonl");

    let stdout = env.ok(&[
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--pallet",
        pallet.to_str().unwrap(),
    ]);
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = reports.last().unwrap();
    assert_eq!(summary["issued"], 41, "{summary}");
    assert_eq!(summary["pallet"], pallet.to_str().unwrap(), "{summary}");
    assert!(
        reports[..41]
            .iter()
            .all(|r| r["certificate"] == pallet.to_str().unwrap())
    );

    // One file, mode 0600 (it holds keys), no device files, no temporary file left.
    assert_eq!(files_in(&env.path("pallets")), vec!["line-7.jsonl"]);
    let mode = std::fs::metadata(&pallet).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!env.out_dir().exists(), "device files were written too");

    let (header, devices) = read_pallet(&pallet);
    assert_eq!(header["fleetcert_pallet"], 1);
    assert_eq!(
        header["chain"],
        env.ok(&["ca", "export", "--chain"]).as_str()
    );
    assert_eq!(devices.len(), 41);
    let registry: HashMap<String, serde_json::Value> = env
        .certs()
        .into_iter()
        .map(|c| (c["serial"].as_str().unwrap().to_owned(), c))
        .collect();
    let mut things = HashSet::new();
    for (i, device) in devices.iter().enumerate() {
        let thing = device["thing_name"].as_str().unwrap();
        assert!(things.insert(thing.to_owned()), "{thing} twice");
        let serial = device["serial"].as_str().unwrap();
        let record = &registry[serial];
        assert_eq!(record["thing_name"], thing);
        assert_eq!(record["status"], "active");
        assert!(!record["delivered_at"].is_null(), "{record}");
        let crt = env.path(&format!("{thing}.crt"));
        std::fs::write(&crt, device["certificate"].as_str().unwrap()).unwrap();
        assert_eq!(serial_of(&crt), serial);
        if thing == "csr-dev" {
            assert_eq!(device["origin"], "csr");
            assert!(device.get("private_key").is_none(), "{device}");
            assert_eq!(
                openssl(&["x509", "-noout", "-pubkey", "-in", crt.to_str().unwrap()]),
                openssl(&[
                    "pkey",
                    "-pubout",
                    "-in",
                    env.path("csr-dev.devkey").to_str().unwrap()
                ])
            );
        } else {
            assert_eq!(device["origin"], "generated");
            if i % 10 == 0 {
                let verify = env.openssl_verify(&crt);
                assert!(
                    verify.status.success(),
                    "{}",
                    String::from_utf8_lossy(&verify.stderr)
                );
                let key = env.path(&format!("{thing}.key"));
                std::fs::write(&key, device["private_key"].as_str().unwrap()).unwrap();
                assert_eq!(
                    openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()]),
                    openssl(&["x509", "-noout", "-pubkey", "-in", crt.to_str().unwrap()]),
                    "{thing}: key and certificate do not match"
                );
            }
        }
    }

    // A finished pallet is never overwritten, and nothing runs.
    let before = std::fs::read(&pallet).unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--reissue",
            "--pallet",
            pallet.to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("never overwritten"), "{err}");
    assert_eq!(std::fs::read(&pallet).unwrap(), before);
    assert_eq!(env.certs().len(), 41, "the refused run issued something");

    // The same batch into a new pallet: everything is already delivered.
    let again = env.path("pallets/line-7b.jsonl");
    let stdout = env.ok(&[
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--pallet",
        again.to_str().unwrap(),
    ]);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (summary["issued"].as_u64(), summary["skipped"].as_u64()),
        (Some(0), Some(41))
    );
    assert_eq!(read_pallet(&again).1.len(), 0);
}

#[test]
fn a_pallet_run_killed_mid_batch_resumes_into_one_complete_pallet() {
    let env = Env::new();
    env.init_ca();
    let devices = 10_000;
    let rows: Vec<String> = (0..devices).map(|i| format!("dev-{i:05},")).collect();
    let csv = write_csv(&env, "big.csv", &rows);
    let pallet = env.path("big.jsonl");
    let temp = temp_of(&pallet);
    let run = || {
        env.cmd()
            .args([
                "provision",
                "--batch",
                csv.to_str().unwrap(),
                "--pallet",
                pallet.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = run();
    // Groups are 1,024 devices and at most two are being written at once, so once a third
    // group's lines appear the first group is marked delivered: the resume has something
    // to keep as well as (likely) something to drop.
    let wanted = 2 * 1024 + 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let big_enough = std::fs::metadata(&temp).is_ok_and(|m| m.len() > wanted as u64 * 900);
        let lines = if big_enough {
            std::fs::read(&temp)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0)
        } else {
            0
        };
        if lines > wanted || Instant::now() > deadline {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !pallet.exists(),
        "an unfinished pallet appeared under its name"
    );
    assert!(temp.exists(), "the run was killed before writing anything");
    // Every line written so far has a committed record.
    let recorded: HashSet<String> = env
        .certs()
        .into_iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect();
    let text = std::fs::read_to_string(&temp).unwrap();
    let complete = text.lines().count() - usize::from(!text.ends_with('\n'));
    eprintln!(
        "killed with {} device lines in the temporary pallet",
        complete - 1
    );
    for line in text.lines().skip(1).take(complete - 1) {
        let device: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            recorded.contains(device["serial"].as_str().unwrap()),
            "{line:.80} has no record"
        );
    }

    // The re-run keeps what was delivered and completes the pallet.
    let stdout = env.ok(&[
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--pallet",
        pallet.to_str().unwrap(),
    ]);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(
        summary["resumed_from_pallet"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
    assert!(!temp.exists());
    let (_, lines) = read_pallet(&pallet);
    let all = env.certs();
    let active: HashMap<&str, &str> = all
        .iter()
        .filter(|c| c["status"] == "active")
        .map(|c| {
            (
                c["thing_name"].as_str().unwrap(),
                c["serial"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(active.len(), devices);
    assert_eq!(lines.len(), devices, "each device exactly once");
    let mut seen = HashSet::new();
    for device in &lines {
        let thing = device["thing_name"].as_str().unwrap();
        assert!(seen.insert(thing), "{thing} twice");
        assert_eq!(
            active[thing],
            device["serial"].as_str().unwrap(),
            "{thing}: not its active certificate"
        );
        assert!(device["private_key"].is_string());
    }
    for c in all.iter().filter(|c| c["status"] != "active") {
        assert_eq!(c["status"], "revoked", "{c}");
        assert!(
            c["delivered_at"].is_null(),
            "a delivered certificate was revoked: {c}"
        );
    }
}

#[test]
fn pallet_usage_errors_change_nothing() {
    let env = Env::new();
    env.init_ca();
    let csv = write_csv(&env, "b.csv", &["a-1,".to_owned()]);
    let err = env.fails(
        &[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--pallet",
            "p.jsonl",
            "--out",
            "o",
        ],
        2,
    );
    assert!(err.contains("--pallet"), "{err}");
    // Another run holds the pallet.
    let pallet = env.path("p.jsonl");
    let temp = std::fs::File::create(temp_of(&pallet)).unwrap();
    rustix::fs::flock(&temp, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--pallet",
            "p.jsonl",
        ],
        2,
    );
    assert!(err.contains("another provisioning run"), "{err}");
    drop(temp);
    // Something that is not a pallet in the temporary file's place is left alone.
    std::fs::write(temp_of(&pallet), "not json\n").unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--pallet",
            "p.jsonl",
        ],
        2,
    );
    assert!(err.contains("not a fleetcert pallet"), "{err}");
    assert_eq!(
        std::fs::read_to_string(temp_of(&pallet)).unwrap(),
        "not json\n"
    );
    assert!(env.certs().is_empty());
}
