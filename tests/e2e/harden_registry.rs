//! Issue 12, the registry: `serve` recovers once a full disk has space again and
//! `/healthz` says what first connects see (item 1); the registry files are private and
//! `rotate` reports rotations held by another worker's lease (item 10).
use crate::jitp::{Served, curl_connect};
use crate::util::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs of a given size mounted on a directory for the test's lifetime (unmounted
/// when dropped). Needs root; a failed mount fails the test, it is never skipped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs on {} as the data directory and must run as \
             root (or with CAP_SYS_ADMIN); mount failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file open: detach it now, it goes when released.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// GET /healthz on the admin listener: (HTTP status, body).
fn healthz(served: &Served) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "15", "-w", "\n%{http_code}"])
        .arg(format!("http://{}/healthz", served.admin))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn device_files(env: &Env, name: &str) -> (PathBuf, PathBuf) {
    (
        env.out_dir().join(format!("{name}.crt")),
        env.out_dir().join(format!("{name}.key")),
    )
}

/// Fills the file system holding `dir` with `dd` (appending to one filler file), as an
/// operator's runaway log would; returns the filler. Called again before every check:
/// fleetcert itself frees space now and then (a SQLite connection closed as the last one
/// checkpoints and deletes the WAL), which a runaway writer would take at once.
fn fill_disk(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=16k", "oflag=append", "conv=notrunc"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("No space left on device"),
        "dd should have filled the tmpfs: {stderr}"
    );
    filler
}

/// Item 1: the data directory on a 3 MiB tmpfs, 500 devices, `serve`; the disk fills up:
/// first connects get a clean 503 and `/healthz` says the registry is failing; the space
/// is freed: within seconds first connects register again (201) and `/healthz` is ok,
/// without a restart. Before the fix, a connection whose COMMIT failed went back to the
/// pool inside a transaction and every first connect got 503 until a restart
/// ("attempted to call begin_with at non-zero transaction depth"), while `/healthz`
/// (a read) said ok.
#[test]
fn serve_recovers_after_a_full_disk_and_healthz_tells_the_truth() {
    let env = Env::new();
    let _disk = Tmpfs::mount(&env.data_dir(), "3m");
    env.init_ca();
    let devices = 500;
    env.provision_pallet("disk", devices, 365);
    let served = Served::start(&env, &[]);

    let mut next = 0usize;
    let mut first_connect = |expect: &[u16]| {
        assert!(next < devices, "ran out of unregistered devices");
        let name = format!("disk-{next:05}");
        next += 1;
        let (cert, key) = device_files(&env, &name);
        let (status, body) = curl_connect(&env, &served, &cert, &key);
        assert!(
            expect.contains(&status),
            "first connect of {name}: expected {expect:?}, got {status}: {body}"
        );
        (status, body)
    };

    first_connect(&[201]);
    let (status, body) = healthz(&served);
    assert_eq!(
        (status, body.trim()),
        (200, "ok"),
        "before the disk fills up"
    );

    let mut filler = PathBuf::new();
    for _ in 0..5 {
        filler = fill_disk(&env.data_dir());
        let (_, body) = first_connect(&[503]);
        assert!(body.contains("registry_unavailable"), "{body}");
    }
    fill_disk(&env.data_dir());
    let (status, body) = healthz(&served);
    assert_eq!(status, 503, "/healthz while first connects fail: {body}");
    assert!(body.starts_with("unhealthy:"), "{body}");
    eprintln!("/healthz on a full disk: {}", body.trim());

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let deadline = freed + Duration::from_secs(10);
    loop {
        let (status, body) = first_connect(&[201, 503]);
        if status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "first connects still fail 10 s after space was freed: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "first connects register again {:.2} s after space was freed",
        freed.elapsed().as_secs_f64()
    );
    // Not a lucky one: every connection of the pool works again.
    for _ in 0..20 {
        first_connect(&[201]);
    }
    let (status, body) = healthz(&served);
    assert_eq!((status, body.trim()), (200, "ok"), "after space was freed");

    let registered = next;
    let status = served.stop();
    assert!(status.success(), "serve exited with {status:?}");
    // The database is intact and holds the registrations made after the recovery.
    let certs = env.certs();
    let with_registration = certs
        .iter()
        .filter(|c| !c["registered_at"].is_null())
        .count();
    assert!(
        with_registration >= 21 && with_registration < registered,
        "{with_registration} registered of {registered} attempted"
    );
}

/// The permission bits of a file, in octal as `ls -l` users read them.
fn mode_of(path: &Path) -> String {
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode();
    format!("{:o}", mode & 0o777)
}

/// Item 10: `registry.db` and its `-wal` and `-shm` are mode 0600 like the keys, and a
/// database left 0644 by an older version is narrowed on the next open.
#[test]
fn registry_files_are_readable_by_their_owner_only() {
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "private-1", "--out", "out"]);
    let db = env.data_dir().join("registry.db");
    assert_eq!(mode_of(&db), "600", "registry.db");

    // While serve runs, the WAL and its index exist.
    let served = Served::start(&env, &[]);
    let (cert, key) = device_files(&env, "private-1");
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 201);
    for suffix in ["-wal", "-shm"] {
        let file = env.data_dir().join(format!("registry.db{suffix}"));
        assert_eq!(mode_of(&file), "600", "registry.db{suffix}");
    }
    assert!(served.stop().success());

    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.ok(&["things", "list"]);
    assert_eq!(
        mode_of(&db),
        "600",
        "registry.db left 0644 by an older version"
    );
}

/// `sqlite3` on the registry (a reader beside fleetcert): the first column of the first
/// row of `sql`.
fn sqlite_count(db: &Path, sql: &str) -> i64 {
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 10000"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 (the SQLite command-line shell) is needed");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn rotate(env: &Env, offset: i64, args: &[&str]) -> std::process::Output {
    env.cmd()
        .env("FLEETCERT_TIME_OFFSET", offset.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn rotate_json(env: &Env, offset: i64, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json", "rotate", "--within", "60d"];
    full.extend_from_slice(args);
    let out = rotate(env, offset, &full);
    assert!(
        out.status.success(),
        "rotate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Item 10: after a `rotate` killed mid-sweep, its batch waits under its lease. A re-run
/// and `--dry-run` used to say "0 due" and nothing else; they now say how many
/// rotations are leased by another worker and until when (text and JSON), and the
/// sweep after the lease expires issues exactly those.
#[test]
fn rotate_reports_rotations_leased_by_a_killed_worker() {
    let env = Env::new();
    env.init_ca();
    let devices = 3000;
    env.provision_pallet("lease", devices, 30);
    let db = env.data_dir().join("registry.db");
    let leased_sql = "SELECT count(*) FROM rotations WHERE state = 'due' \
                      AND lease_until IS NOT NULL AND lease_until >= strftime('%s','now')";

    let mut child = env
        .cmd()
        .args(["rotate", "--within", "60d", "--batch", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep finished before any lease was seen; nothing to test"
        );
        if sqlite_count(&db, leased_sql) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no lease was taken within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill(); // SIGKILL, mid-sweep
    child.wait().unwrap();
    let leased = sqlite_count(&db, leased_sql);
    let issued_before = (env.certs().len() - devices) as i64;
    assert!(leased > 0, "the killed sweep left no lease");
    eprintln!("killed sweep: {issued_before} issued, {leased} leased");

    // Dry run: nothing newly due, but the leased ones are reported.
    let dry = rotate_json(&env, 0, &["--dry-run"]);
    assert_eq!(dry["due"], 0, "{dry}");
    assert_eq!(dry["leased"], leased, "{dry}");
    let until = dry["leased_until"].as_str().unwrap_or_default().to_owned();
    assert!(until.len() >= 20, "leased_until: {dry}");
    let text = rotate(&env, 0, &["rotate", "--within", "60d", "--dry-run"]);
    assert!(text.status.success());
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        stderr.contains(&format!(
            "0 certificates due for rotation; open rotations: {leased} leased by another worker until {until}"
        )),
        "{stderr}"
    );

    // A re-run: issues what was not leased, reports what still is.
    let rerun = rotate_json(&env, 0, &[]);
    assert_eq!(rerun["leased"], leased, "{rerun}");
    assert_eq!(rerun["leased_until"], until.as_str(), "{rerun}");
    assert_eq!(
        rerun["issued"].as_i64().unwrap(),
        devices as i64 - issued_before - leased,
        "{rerun}"
    );
    let text = rotate(&env, 0, &["rotate", "--within", "60d"]);
    assert!(text.status.success());
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("0 replacements issued (0/s), 0 failed, 0 lost to another worker")
            && stdout.contains(&format!(
                "; open rotations: {leased} leased by another worker until {until}"
            )),
        "{stdout}"
    );

    // Past the killed worker's 5-minute leases: the next sweep issues exactly those.
    let after = rotate_json(&env, 400, &[]);
    assert_eq!(after["issued"], leased, "{after}");
    assert_eq!(after["leased"], 0, "{after}");
    assert_eq!(after["leased_until"], Value::Null, "{after}");
    assert_eq!(env.certs().len(), 2 * devices);
}
