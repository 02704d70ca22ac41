//! Issue 12, items 4, 8 and 10 (provisioning): the CSV `csr` column reads only regular,
//! small files inside the CSV's directory; errors never echo a huge field; a full `--out`
//! leaves no staging directories and still reports what was delivered; `--days` never
//! outlives the issuing CA.
use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a command, killing it (and failing the test) if it takes longer than `limit`:
/// a FIFO must not hang the batch.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).unwrap();
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).unwrap();
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fleetcert did not finish within {limit:?} (hung on a special file?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

const LIMIT: Duration = Duration::from_secs(60);

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `error` of the failed report for `line`.
fn failure_at(lines: &[serde_json::Value], line: u64) -> String {
    lines
        .iter()
        .find(|l| l["result"] == "failed" && l["line"] == line)
        .unwrap_or_else(|| panic!("no failure reported for line {line}: {lines:?}"))["error"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn batch_json(env: &Env, csv: &Path, extra: &[&str]) -> Output {
    let mut cmd = env.cmd();
    cmd.args(["--output", "json", "provision", "--batch"])
        .arg(csv)
        .args(["--out", "out"])
        .args(extra);
    output_within(cmd, LIMIT)
}

/// A station directory holding the CSV, with CSRs inside it and one outside it.
fn station(env: &Env) -> PathBuf {
    let station = env.path("station");
    std::fs::create_dir_all(station.join("csrs")).unwrap();
    p256_csr(&station.join("csrs"), "inside");
    for name in ["outside-a", "outside-b", "outside-c"] {
        p256_csr(env.dir.path(), name);
    }
    station
}

#[test]
fn csr_paths_that_leave_the_csv_directory_are_refused() {
    let env = Env::new();
    env.init_ca();
    let station = station(&env);
    std::os::unix::fs::symlink("../outside-b.csr", station.join("escape.csr")).unwrap();
    std::os::unix::fs::symlink("csrs/inside.csr", station.join("alias.csr")).unwrap();
    let outside = env.path("outside-a.csr");
    let csv = station.join("pallet.csv");
    std::fs::write(
        &csv,
        format!(
            "thing_name,csr\n\
             ok-1,csrs/inside.csr\n\
             passwd,../../../../../../etc/passwd\n\
             absolute,{}\n\
             escape,escape.csr\n\
             dotdot,../outside-c.csr\n\
             ok-2,alias.csr\n",
            outside.display()
        ),
    )
    .unwrap();
    let out = batch_json(&env, &csv, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = json_lines(&out.stdout);
    for line in 3..=6 {
        let error = failure_at(&lines, line);
        assert!(
            error.contains("outside the CSV file's directory")
                && error.contains("--allow-absolute-csr-paths"),
            "line {line}: {error}"
        );
    }
    let summary = lines.last().unwrap();
    assert_eq!(summary["result"], "summary");
    assert_eq!(summary["issued"], 2, "{summary}");
    assert_eq!(summary["failed"], 4, "{summary}");
    assert!(env.out_dir().join("ok-1.crt").exists());
    assert!(env.out_dir().join("ok-2.crt").exists());

    // With the flag, the CSRs outside the directory are read (and the escape rows issued).
    let out = batch_json(&env, &csv, &["--allow-absolute-csr-paths"]);
    let lines = json_lines(&out.stdout);
    let summary = lines.last().unwrap();
    assert_eq!(summary["skipped"], 2, "{summary}");
    assert_eq!(summary["issued"], 3, "{summary}");
    // /etc/passwd is a regular file but not a CSR.
    let error = failure_at(&lines, 3);
    assert!(error.contains("CSR"), "{error}");
    assert!(
        !error.contains("root:"),
        "no file contents in errors: {error}"
    );
}

#[test]
fn special_and_oversized_csr_files_are_refused_without_hanging() {
    let env = Env::new();
    env.init_ca();
    let station = station(&env);
    let fifo = station.join("pipe.csr");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::os::unix::fs::symlink("pipe.csr", station.join("fifo-link.csr")).unwrap();
    std::fs::create_dir(station.join("a-directory.csr")).unwrap();
    // A valid PEM CSR padded past the cap with trailing text: the size, not the
    // contents, is what gets it refused.
    let mut big = std::fs::read(station.join("csrs/inside.csr")).unwrap();
    big.extend(std::iter::repeat_n(b'#', 70 * 1024));
    std::fs::write(station.join("big.csr"), big).unwrap();
    let csv = station.join("pallet.csv");
    std::fs::write(
        &csv,
        "thing_name,csr\n\
         fifo,pipe.csr\n\
         fifo-link,fifo-link.csr\n\
         dir,a-directory.csr\n\
         big,big.csr\n\
         ok,csrs/inside.csr\n",
    )
    .unwrap();
    let out = batch_json(&env, &csv, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = json_lines(&out.stdout);
    assert!(failure_at(&lines, 2).contains("a FIFO, not a regular file"));
    assert!(failure_at(&lines, 3).contains("a FIFO, not a regular file"));
    assert!(failure_at(&lines, 4).contains("a directory, not a regular file"));
    assert!(failure_at(&lines, 5).contains("larger than 64 KiB"));
    assert_eq!(lines.last().unwrap()["issued"], 1);

    // /dev/zero with the flag that allows absolute paths: refused as a device, at once,
    // instead of reading without end.
    let zero_csv = station.join("zero.csv");
    std::fs::write(&zero_csv, "thing_name,csr\nzero,/dev/zero\n").unwrap();
    let out = batch_json(&env, &zero_csv, &["--allow-absolute-csr-paths"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = json_lines(&out.stdout);
    let error = failure_at(&lines, 2);
    assert!(error.contains("a character device"), "{error}");

    // A single device's --csr gets the same checks (exit 2: bad input).
    for (csr, expect) in [
        ("/dev/zero", "a character device"),
        ("station/pipe.csr", "a FIFO"),
        ("station/a-directory.csr", "a directory"),
        ("station/big.csr", "larger than 64 KiB"),
    ] {
        let mut cmd = env.cmd();
        cmd.args(["provision", "single", "--csr", csr, "--out", "out"]);
        let out = output_within(cmd, LIMIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{csr}: {stderr}");
        assert!(
            stderr.contains(expect) && stderr.contains(csr),
            "{csr}: {stderr}"
        );
    }
    assert!(!env.out_dir().join("single.crt").exists());
}

#[test]
fn a_ten_megabyte_field_is_not_echoed_in_errors() {
    let env = Env::new();
    env.init_ca();
    let huge = "A".repeat(10 * 1024 * 1024);
    let csv = env.path("pallet.csv");
    std::fs::write(
        &csv,
        format!("thing_name,csr\n{huge},\nhuge-path,{huge}\nok,\n"),
    )
    .unwrap();
    for json in [true, false] {
        let mut cmd = env.cmd();
        if json {
            cmd.args(["--output", "json"]);
        }
        cmd.args(["provision", "--batch"])
            .arg(&csv)
            .args(["--out", "out"]);
        let out = output_within(cmd, LIMIT);
        assert_eq!(out.status.code(), Some(1), "exit");
        let all = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
        assert!(
            all.len() < 16 * 1024,
            "{} bytes of output for a 10 MB field",
            all.len()
        );
        let text = String::from_utf8_lossy(&all);
        assert!(
            text.contains("line 2") || text.contains("\"line\":2"),
            "{text}"
        );
        assert!(
            text.contains("line 3") || text.contains("\"line\":3"),
            "{text}"
        );
        assert!(text.contains("invalid thing name"), "{text}");
        assert!(text.contains(&format!("{}…", &huge[..64])), "{text}");
    }
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs at {} (root needed)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_out_directory_leaves_no_staging_folders_and_reports_what_was_delivered() {
    let env = Env::new();
    env.init_ca();
    // Room for the first group of 1024 devices (two 4 KiB pages each) but not the second.
    let out_dir = env.out_dir();
    let tmpfs = Tmpfs::mount(&out_dir, "10m");
    let devices = 2100;
    let csv = env.path("pallet.csv");
    let body: String = (0..devices).map(|i| format!("full-{i:05}\n")).collect();
    std::fs::write(&csv, format!("thing_name\n{body}")).unwrap();
    let out = batch_json(&env, &csv, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let files = files_in(&out_dir);
    let staging: Vec<&String> = files.iter().filter(|f| f.contains("staging")).collect();
    assert!(staging.is_empty(), "staging folders left: {staging:?}");
    assert!(
        !files.iter().any(|f| f.ends_with(".fleetcert-tmp")),
        "temporary files left: {files:?}"
    );
    // The devices delivered before the disk filled up are reported, then the summary.
    let lines = json_lines(&out.stdout);
    let summary = lines.last().expect("a summary line");
    assert_eq!(summary["result"], "summary", "{summary}");
    assert!(
        summary["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{summary}"
    );
    let issued: Vec<&str> = lines
        .iter()
        .filter(|l| l["result"] == "issued")
        .map(|l| l["thing_name"].as_str().unwrap())
        .collect();
    assert_eq!(summary["issued"], issued.len() as u64, "{summary}");
    assert!(!issued.is_empty(), "the first group fits and is reported");
    let written = files.iter().filter(|f| f.ends_with(".crt")).count();
    assert_eq!(written, issued.len(), "every reported device has its files");
    for name in &issued {
        assert!(out_dir.join(format!("{name}.key")).exists(), "{name}");
    }

    // With room again, a re-run delivers the rest.
    tmpfs.resize("64m");
    let out = batch_json(&env, &csv, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = files_in(&out_dir);
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".crt")).count(),
        devices
    );
    assert!(!files.iter().any(|f| f.contains("staging")), "{files:?}");
}

#[test]
fn days_are_capped_at_the_issuing_cas_not_after() {
    let env = Env::new();
    env.ok(&[
        "ca",
        "init",
        "--issuing-days",
        "30",
        "--crl-url",
        "http://127.0.0.1:9090/crl",
    ]);
    let (_, issuing) = env.chain_files();
    let ca_not_after = fleetcert_ca::describe_certificate(&std::fs::read(&issuing).unwrap())
        .unwrap()
        .not_after;

    let out = env.run(&[
        "--output",
        "json",
        "provision",
        "long-lived",
        "--days",
        "36500",
        "--out",
        "out",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("would outlive the issuing CA"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["validity_capped"]["requested_days"], 36500,
        "{report}"
    );
    let days = report["validity_capped"]["days"].as_u64().unwrap();
    assert!((28..=30).contains(&days), "{report}");
    let cert = fleetcert_ca::describe_certificate(
        &std::fs::read(env.out_dir().join("long-lived.crt")).unwrap(),
    )
    .unwrap();
    assert!(
        cert.not_after <= ca_not_after,
        "device notAfter {} is past the issuing CA's {}",
        cert.not_after,
        ca_not_after
    );
    assert!(
        env.openssl_verify(&env.out_dir().join("long-lived.crt"))
            .status
            .success()
    );

    // A batch says so in its summary.
    let csv = env.path("pallet.csv");
    std::fs::write(&csv, "thing_name\nbatch-1\nbatch-2\n").unwrap();
    let out = batch_json(&env, &csv, &["--days", "36500"]);
    assert_eq!(out.status.code(), Some(0));
    let lines = json_lines(&out.stdout);
    let summary = lines.last().unwrap();
    assert_eq!(
        summary["validity_capped"]["requested_days"], 36500,
        "{summary}"
    );
    for name in ["batch-1", "batch-2"] {
        let cert = fleetcert_ca::describe_certificate(
            &std::fs::read(env.out_dir().join(format!("{name}.crt"))).unwrap(),
        )
        .unwrap();
        assert!(cert.not_after <= ca_not_after, "{name}");
    }
    // Within the CA's lifetime nothing is capped or said.
    let out = env.run(&["provision", "short", "--days", "10", "--out", "out"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("outlive"));
}

/// The peak resident set (`VmHWM`, KiB) of a running process, from /proc.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Item 10: a batch CSV is streamed, not loaded whole. 600,000 rows (the last one
/// invalid, with `--fail-fast`, so validation reads every row and nothing is issued)
/// stay far below the ~270 MB that holding every row took before the fix (1 million
/// rows: 445 MB). The peak is sampled from /proc while the process runs; `VmHWM` only
/// grows, so the last sample is within 20 ms of the end.
#[test]
fn a_large_batch_csv_is_streamed_not_loaded_whole() {
    let env = Env::new();
    env.init_ca();
    let rows = 600_000;
    let csv = env.path("pallets.csv");
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        writeln!(w, "thing_name").unwrap();
        for i in 0..rows {
            writeln!(w, "pallet-{i:08}").unwrap();
        }
        writeln!(w, "not*valid").unwrap();
    }
    let mut child = env
        .cmd()
        .args(["--output", "json", "provision", "--fail-fast", "--batch"])
        .arg(&csv)
        .args(["--out", "out"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).unwrap();
        v
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).unwrap();
        v
    });
    let started = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("validating {rows} rows took over 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    eprintln!(
        "{rows} rows validated in {:?}, peak RSS {} MiB",
        started.elapsed(),
        peak / 1024
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = json_lines(&stdout);
    let failure = failure_at(&lines, rows as u64 + 2);
    assert!(failure.contains("not*valid"), "{failure}");
    assert!(
        env.certs().is_empty(),
        "nothing is issued when validation fails with --fail-fast"
    );
    assert!(peak > 0, "could not read the process's peak RSS");
    assert!(
        peak < 120 * 1024,
        "peak RSS {} MiB for {rows} rows: the CSV is held in memory",
        peak / 1024
    );
}
