//! Issue 12, items 5, 6, 7 and 10 (the CLI's part): errors never print file contents or
//! unbounded input, templates are not read through symlinks out of their directory,
//! deep nesting is refused before parsing, database passwords are masked, nonsense
//! durations are refused, exit codes follow the README rule (2 = bad input, 1 = the
//! operation failed), and a closed stdout is not a panic.
use crate::util::*;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd`, killing it after `limit` (a hang guard, not a performance assertion):
/// `None` if it had to be killed.
fn output_within(mut cmd: Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipes.0.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipes.1.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

fn run_within(env: &Env, args: &[&str], limit: Duration) -> Output {
    let mut cmd = env.cmd();
    cmd.args(args);
    output_within(cmd, limit)
        .unwrap_or_else(|| panic!("fleetcert {args:?} did not finish within {limit:?}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The longest run of `c` in `s`.
fn longest_run(s: &str, c: char) -> usize {
    s.split(|x| x != c).map(str::len).max().unwrap_or(0)
}

/// A file that looks like /etc/shadow, outside the data directory.
const SHADOW: &str =
    "root:*:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\nsecret-marker-q7:x:1:::\n";

#[test]
fn templates_are_not_read_through_symlinks_out_of_their_directory() {
    let env = Env::new();
    env.init_ca();
    let shadow = env.path("shadow");
    std::fs::write(&shadow, SHADOW).unwrap();
    let templates = env.data_dir().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::os::unix::fs::symlink(&shadow, templates.join("evil.yaml")).unwrap();
    let leaked = |s: &str| s.contains("root:*") || s.contains("20228") || s.contains("marker");

    // templates list: the entry is reported invalid, naming why, not what it holds.
    let out = env.run(&["templates", "list"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!leaked(&stdout) && !leaked(&stderr), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("evil") && stdout.contains("outside the templates directory"),
        "{stdout}"
    );

    // provision --template: refused as bad input before anything is issued.
    let err = env.fails(
        &["provision", "dev-1", "--template", "evil", "--out", "out"],
        2,
    );
    assert!(!leaked(&err), "{err}");
    assert!(err.contains("outside the templates directory"), "{err}");
    assert!(env.certs().is_empty());

    // serve loads every template at start: it refuses to start, without the contents.
    let out = run_within(
        &env,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(60),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!leaked(&err), "{err}");
    assert!(err.contains("outside the templates directory"), "{err}");

    // A symlink that stays inside the directory is fine.
    std::fs::remove_file(templates.join("evil.yaml")).unwrap();
    std::fs::write(
        templates.join("real.yaml"),
        fleetcert_templates::DEFAULT_TEMPLATE_YAML,
    )
    .unwrap();
    std::os::unix::fs::symlink("real.yaml", templates.join("alias.yaml")).unwrap();
    let listed = env.ok(&["templates", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("alias ") && l.contains(" ok ")),
        "{listed}"
    );
}

#[test]
fn a_fifo_in_the_templates_directory_does_not_hang_anything() {
    let env = Env::new();
    env.init_ca();
    let templates = env.data_dir().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    let fifo = templates.join("pipe.yaml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let out = run_within(&env, &["templates", "list"], Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("pipe") && stdout.contains("not a regular file"),
        "{stdout}"
    );
    let out = run_within(
        &env,
        &["provision", "dev-1", "--template", "pipe", "--out", "out"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not a regular file"));
}

#[test]
fn template_errors_quote_at_most_64_characters_of_the_input() {
    let env = Env::new();
    // Plain YAML keys stay under the parser's 1024-character limit for simple keys.
    let long_key = "A".repeat(1000);
    let cases = [
        // An unknown section named by a huge key.
        ("section.yaml", format!("{long_key}: 1\nResources: {{}}\n")),
        // A huge logical id with an unknown type.
        (
            "resource.yaml",
            format!("Resources:\n  {long_key}:\n    Type: AWS::IoT::Gadget\n"),
        ),
        // A huge unknown resource type.
        (
            "type.yaml",
            format!("Resources:\n  thing:\n    Type: {}\n", "A".repeat(100_000)),
        ),
        // A huge duplicate key (a YAML parser error).
        ("dup.yaml", format!("{long_key}: 1\n{long_key}: 2\n")),
    ];
    for (file, body) in cases {
        let path = env.path(file);
        std::fs::write(&path, &body).unwrap();
        for args in [
            vec!["templates", "lint", path.to_str().unwrap()],
            vec![
                "--output",
                "json",
                "templates",
                "lint",
                path.to_str().unwrap(),
            ],
        ] {
            let out = env.run(&args);
            let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert_eq!(out.status.code(), Some(2), "{file}: {all}");
            assert!(
                longest_run(&all, 'A') <= 64,
                "{file}: echoed {} characters of input",
                longest_run(&all, 'A')
            );
            assert!(all.len() < 2_000, "{file}: {} bytes of message", all.len());
        }
    }
    // An explicit file that is not a template at all: the message says what is wrong
    // and quotes no more than 64 characters of it.
    let shadow = env.path("shadow");
    let mut body = format!("{}:x:1:::\n", "B".repeat(1000));
    body.push_str(SHADOW);
    std::fs::write(&shadow, body).unwrap();
    let err = env.fails(&["templates", "lint", shadow.to_str().unwrap()], 2);
    assert!(longest_run(&err, 'B') <= 64, "{err}");
    // A device file is not read at all.
    let err = env.fails(&["templates", "lint", "/dev/zero"], 2);
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn deeply_nested_templates_are_refused_before_parsing() {
    let env = Env::new();
    // 100,000 nested JSON objects (about 600 KB): used to take 36 s of CPU.
    let depth = 100_000;
    let mut json = String::with_capacity(depth * 6 + 16);
    for _ in 0..depth {
        json.push_str("{\"a\":");
    }
    json.push('1');
    json.push_str(&"}".repeat(depth));
    let json_path = env.path("deep.json");
    std::fs::write(&json_path, &json).unwrap();
    // The same in YAML flow style, and as block indentation.
    let flow_path = env.path("flow.yaml");
    std::fs::write(
        &flow_path,
        format!("Resources: {}{}\n", "[".repeat(depth), "]".repeat(depth)),
    )
    .unwrap();
    let block_path = env.path("block.yaml");
    let block: String = (0..1000)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    std::fs::write(&block_path, block).unwrap();
    for (path, what) in [
        (
            &json_path,
            "collections nest deeper than 64 levels at line 1",
        ),
        (
            &flow_path,
            "collections nest deeper than 64 levels at line 1",
        ),
        (
            &block_path,
            "indentation nests deeper than 64 levels at line 65",
        ),
    ] {
        // The limit only guards against a hang; the assertion is on the message.
        let out = run_within(
            &env,
            &["templates", "lint", path.to_str().unwrap()],
            Duration::from_secs(120),
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(what), "{}: {err}", path.display());
    }
    // In the templates directory, serve and provision refuse it the same way.
    env.init_ca();
    let templates = env.data_dir().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::copy(&json_path, templates.join("deep.json")).unwrap();
    let out = run_within(
        &env,
        &["provision", "dev-1", "--template", "deep", "--out", "out"],
        Duration::from_secs(120),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("deeper than 64"), "{err}");
    // A size cap too: a template over 1 MiB is refused whatever it holds.
    let big = env.path("big.yaml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    let err = env.fails(&["templates", "lint", big.to_str().unwrap()], 2);
    assert!(err.contains("larger than"), "{err}");
}

#[test]
fn a_database_password_in_the_url_query_is_masked() {
    let env = Env::new();
    // Nothing listens on port 1: the open fails fast and names the URL.
    for url in [
        "postgres://fleet@127.0.0.1:1/fleetcert?password=hunter2-q-secret",
        "postgres://fleet@127.0.0.1:1/fleetcert?sslmode=disable&password=hunter2-q-secret",
        "postgres://fleet:hunter2-q-secret@127.0.0.1:1/fleetcert",
    ] {
        let err = env.fails(&["--database-url", url, "things", "list"], 1);
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("***") && err.contains("127.0.0.1:1"), "{err}");
    }
}

#[test]
fn nonsense_durations_are_refused_as_bad_input() {
    let env = Env::new();
    for (args, flag) in [
        (
            vec!["serve", "--rotation-interval", "0s"],
            "--rotation-interval",
        ),
        (
            vec!["serve", "--handshake-timeout", "0s"],
            "--handshake-timeout",
        ),
        (
            vec!["serve", "--handshake-timeout", "30d"],
            "--handshake-timeout",
        ),
        (
            vec!["serve", "--mirror-interval", "0s"],
            "--mirror-interval",
        ),
        (
            vec!["serve", "--renew-after-expiry", "100000d"],
            "--renew-after-expiry",
        ),
        (vec!["rotate", "--lease", "0s"], "--lease"),
    ] {
        let err = env.fails(&args, 2);
        assert!(
            err.contains(flag) && err.contains("must be between"),
            "{args:?}: {err}"
        );
    }
    // Sensible values still parse (and then fail for the missing CA, exit 1).
    env.fails(
        &[
            "serve",
            "--rotation-interval",
            "30s",
            "--handshake-timeout",
            "5s",
            "--renew-after-expiry",
            "30d",
        ],
        1,
    );
}

#[test]
fn exit_codes_follow_the_rule_bad_input_2_failed_1() {
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "dev-1", "--out", "out"]);

    // A valid name (or serial) that is not in the registry: the operation failed, 1.
    let err = env.fails(&["things", "show", "nosuch"], 1);
    assert!(err.contains("no thing named"), "{err}");
    let err = env.fails(&["revoke", "--thing", "nosuch"], 1);
    assert!(err.contains("nosuch"), "{err}");
    let err = env.fails(&["revoke", "0123456789abcdef"], 1);
    assert!(err.contains("0123456789abcdef"), "{err}");
    env.fails(&["policies", "show", "nosuch"], 1);

    // A name that cannot exist: bad input, 2, saying so.
    for args in [
        vec!["things", "show", "a*"],
        vec!["certs", "list", "--thing", "a*"],
        vec!["revoke", "--thing", "a*"],
        vec!["policies", "show", "p", "--thing", "a/b"],
    ] {
        let err = env.fails(&args, 2);
        assert!(err.contains("invalid thing name"), "{args:?}: {err}");
    }
    let long = "n".repeat(100_000);
    let err = env.fails(&["things", "show", &long], 2);
    assert!(err.contains("invalid thing name"), "{err}");
    assert!(err.len() < 500, "the name was echoed: {} bytes", err.len());
    env.fails(&["policies", "show", ""], 2);
    env.fails(&["revoke", "not-hex"], 2);

    // An I/O failure writing the output is the operation failing: 1.
    let err = env.fails(&["crl", "--out", "/missing/dir/x.crl"], 1);
    assert!(err.contains("/missing/dir/x.crl"), "{err}");
    // Nothing was revoked by any of this.
    assert!(env.certs().iter().all(|c| c["status"] == "active"));
}

/// Runs fleetcert with its stdout a pipe whose reader is already gone.
fn run_with_closed_stdout(env: &Env, args: &[&str]) -> Output {
    let mut child = env
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    let env = Env::new();
    env.init_ca();
    env.provision_pallet("dev", 1500, 30);

    // What users type: the output (~180 KB) is far more than the pipe holds, so
    // fleetcert writes after head has gone.
    for (cmd, expect_first) in [
        ("certs list | head -1", "SERIAL"),
        ("things list | head -1", "NAME"),
        ("certs list 2>&1 | head -1", "SERIAL"),
        ("--output json certs list | head -c 1", "["),
    ] {
        let script = format!(
            "\"$FLEETCERT\" {cmd}; echo \"status=${{PIPESTATUS[0]}}\"",
            cmd = cmd
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .env("FLEETCERT", BIN)
            .env("FLEETCERT_DATA_DIR", env.data_dir())
            .env_remove("FLEETCERT_DATABASE_URL")
            .current_dir(env.dir.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(stdout.starts_with(expect_first), "{cmd}: {stdout}");
        assert!(stdout.contains("status=0"), "{cmd}: {stdout}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{cmd}: {stderr}");
    }

    // Every command that prints results, with stdout closed before it writes.
    for args in [
        vec!["certs", "list"],
        vec!["things", "list"],
        vec!["things", "show", "dev-00001"],
        vec!["ca", "export", "--chain"],
        vec!["ca", "show"],
        vec!["crl"],
        vec!["templates", "list"],
        vec!["--output", "json", "certs", "list"],
        vec!["rotate", "--dry-run", "--within", "3650d"],
    ] {
        let out = run_with_closed_stdout(&env, &args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
