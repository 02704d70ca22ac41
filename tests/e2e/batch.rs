use crate::util::*;
use std::collections::HashMap;

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_batch_reports_bad_rows_by_line_and_provisions_the_rest() {
    let env = Env::new();
    env.init_ca();
    let dir = env.dir.path();
    let csr = p256_csr(dir, "csr-dev");
    let weak = openssl_csr(dir, "weak", &["-newkey", "rsa:1024"], "/CN=weak", &[]);
    let csv = env.path("pallet.csv");
    std::fs::write(
        &csv,
        format!(
            "thing_name,csr\n\
             good-1,\n\
             bad*name,\n\
             good-2,\n\
             dup,\n\
             csr-dev,{}\n\
             too,many,fields\n\
             dup,\n\
             weak-dev,{}\n\
             ,\n",
            csr.file_name().unwrap().to_str().unwrap(),
            // Relative to the CSV's directory: absolute paths need
            // --allow-absolute-csr-paths.
            weak.file_name().unwrap().to_str().unwrap()
        ),
    )
    .unwrap();
    let out = env.run(&[
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--out",
        "out",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&String::from_utf8(out.stdout).unwrap());
    let summary = lines.last().unwrap();
    assert_eq!(summary["result"], "summary");
    assert_eq!(summary["issued"], 3);
    assert_eq!(summary["failed"], 6);
    let failed: HashMap<u64, String> = lines
        .iter()
        .filter(|l| l["result"] == "failed")
        .map(|l| {
            (
                l["line"].as_u64().unwrap(),
                l["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(failed[&3].contains("invalid thing name"), "{failed:?}");
    assert!(
        failed[&5].contains("duplicate") && failed[&8].contains("duplicate"),
        "{failed:?}"
    );
    assert!(failed[&7].contains("unreadable row"), "{failed:?}");
    assert!(failed[&9].contains("1024"), "{failed:?}");
    assert!(failed[&10].contains("empty"), "{failed:?}");
    let issued: Vec<&str> = lines
        .iter()
        .filter(|l| l["result"] == "issued")
        .map(|l| l["thing_name"].as_str().unwrap())
        .collect();
    assert_eq!(issued.len(), 3);
    for name in ["good-1", "good-2", "csr-dev"] {
        assert!(issued.contains(&name), "{issued:?}");
        assert!(
            env.openssl_verify(&env.out_dir().join(format!("{name}.crt")))
                .status
                .success()
        );
    }
    assert_eq!(env.certs().len(), 3);
    assert!(!env.out_dir().join("dup.crt").exists());
}

#[test]
fn rerunning_a_batch_skips_what_is_done_and_reissue_forces_it() {
    let env = Env::new();
    env.init_ca();
    let csv = env.path("pallet.csv");
    let body: String = (0..50).map(|i| format!("dev-{i}\n")).collect();
    std::fs::write(&csv, format!("thing_name\n{body}")).unwrap();
    let batch = [
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--out",
        "out",
    ];
    let first = json_lines(&env.ok(&batch));
    assert_eq!(first.last().unwrap()["issued"], 50);
    let second = json_lines(&env.ok(&batch));
    assert_eq!(second.last().unwrap()["issued"], 0);
    assert_eq!(second.last().unwrap()["skipped"], 50);
    assert_eq!(env.certs().len(), 50);

    let mut forced = batch.to_vec();
    forced.push("--reissue");
    let third = json_lines(&env.ok(&forced));
    assert_eq!(third.last().unwrap()["issued"], 50);
    assert_eq!(
        env.json(&["certs", "list", "--status", "superseded"])
            .as_array()
            .unwrap()
            .len(),
        50
    );
    let active = env.json(&["certs", "list", "--status", "active"]);
    assert_eq!(active.as_array().unwrap().len(), 50);
    // The files on disk are the active certificates.
    for cert in active.as_array().unwrap() {
        let name = cert["thing_name"].as_str().unwrap();
        assert_eq!(
            serial_of(&env.out_dir().join(format!("{name}.crt"))),
            cert["serial"].as_str().unwrap()
        );
    }
}

#[test]
fn fail_fast_issues_nothing_when_a_row_is_bad() {
    let env = Env::new();
    env.init_ca();
    let csv = env.path("pallet.csv");
    std::fs::write(&csv, "thing_name\nok-1\nok-2\nbad/name\nok-3\n").unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--out",
            "out",
            "--fail-fast",
        ],
        1,
    );
    assert!(err.contains("line 4") && err.contains("bad/name"), "{err}");
    assert!(env.certs().is_empty());
}

#[test]
fn whole_file_problems_are_usage_errors() {
    let env = Env::new();
    env.init_ca();
    let no_column = env.path("a.csv");
    std::fs::write(&no_column, "name,csr\nx,\n").unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            no_column.to_str().unwrap(),
            "--out",
            "out",
        ],
        2,
    );
    assert!(err.contains("thing_name"), "{err}");
    let empty = env.path("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            empty.to_str().unwrap(),
            "--out",
            "out",
        ],
        2,
    );
    assert!(err.contains("empty"), "{err}");
    let err = env.fails(&["provision", "--batch", "missing.csv", "--out", "out"], 2);
    assert!(err.contains("missing.csv"), "{err}");
    let binary = env.path("bin.csv");
    std::fs::write(&binary, b"thing_name\nok\n\xff\xfe\n").unwrap();
    let err = env.fails(
        &[
            "provision",
            "--batch",
            binary.to_str().unwrap(),
            "--out",
            "out",
        ],
        1,
    );
    assert!(err.contains("line 3") && err.contains("UTF-8"), "{err}");
    assert_eq!(env.certs().len(), 1);
}
