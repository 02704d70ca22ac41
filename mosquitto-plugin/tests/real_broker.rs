//! The plugin in a real mosquitto 2.0, with a fake serve: allowed CONNECT and delivery,
//! a publish to another thing's topic not delivered, a refused CONNECT, a kicked revoked
//! device, and fail closed with serve down. Needs `/usr/sbin/mosquitto`,
//! `mosquitto_pub`/`mosquitto_sub` and `openssl`; run with
//! `cargo test -p fleetcert-mosquitto --test real_broker -- --ignored --nocapture`.

#[path = "../src/fake_serve.rs"]
#[allow(dead_code)]
mod fake_serve;

use fake_serve::{FakeServe, Received};
use serde_json::json;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn require_tools() {
    for tool in [MOSQUITTO, "mosquitto_pub", "mosquitto_sub", "openssl"] {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        assert!(
            found,
            "{tool} is not installed: apt-get install mosquitto mosquitto-clients openssl"
        );
    }
}

/// The cdylib next to this test binary (or `FLEETCERT_MOSQUITTO_PLUGIN`).
fn plugin_library() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEETCERT_MOSQUITTO_PLUGIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let candidate = dir.join("libfleetcert_mosquitto.so");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "libfleetcert_mosquitto.so not found near {}: cargo build -p fleetcert-mosquitto",
        exe.display()
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1, and a device certificate per name.
fn make_certificates(dir: &Path, devices: &[&str]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=fleetcert test CA",
        "-days",
        "2",
    ]);
    openssl(dir, &args);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("device.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in
        std::iter::once(("server", "server.ext")).chain(devices.iter().map(|d| (*d, "device.ext")))
    {
        let (key, csr, crt, subject) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("/CN={name}"),
        );
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
}

fn policy() -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Action": "iot:Publish",
              "Resource": "arn:aws:iot:local:000000000000:topic/devices/${iot:Connection.Thing.ThingName}/*" },
            { "Effect": "Allow", "Action": "iot:Subscribe",
              "Resource": "arn:aws:iot:local:000000000000:topicfilter/devices/#" },
            { "Effect": "Allow", "Action": "iot:Receive",
              "Resource": "arn:aws:iot:local:000000000000:topic/devices/*" }
        ]
    })
    .to_string()
}

/// Allows every client id but `intruder` (and `sensor-1` once `revoked` is set, whose
/// certificate, `sensor_1_fingerprint`, `sessions` then retires).
fn fake_serve(revoked: Arc<AtomicBool>, sensor_1_fingerprint: String) -> FakeServe {
    FakeServe::start(move |request: &Received| {
        if request.authorization.as_deref() != Some(&format!("Bearer {SECRET}")) {
            return (401, String::new());
        }
        let revoked = revoked.load(Ordering::SeqCst);
        match request.path.as_str() {
            "/broker/v1/connect" => {
                let client_id = request.body["client_id"].as_str().unwrap_or_default();
                if client_id == "intruder" || (revoked && client_id == "sensor-1") {
                    let code = if client_id == "intruder" {
                        "client_id_mismatch"
                    } else {
                        "revoked"
                    };
                    return (200, json!({"result": "refused", "reason": "not_authorized", "code": code, "message": "test"}).to_string());
                }
                (
                    200,
                    json!({
                        "result": "allowed",
                        "thing_name": client_id,
                        "registered": false,
                        "policies": [ { "name": "test", "document": policy() } ],
                        "context": { "client_id": client_id, "thing": { "name": client_id } },
                        "arn": { "region": "local", "account": "000000000000" },
                        "cache_seconds": 30
                    })
                    .to_string(),
                )
            }
            "/broker/v1/disconnect" => (204, String::new()),
            "/broker/v1/sessions" => {
                let polled = request.body["fingerprints"].as_array().unwrap();
                let retired: Vec<_> = if revoked
                    && polled.iter().any(|f| *f == sensor_1_fingerprint)
                {
                    vec![json!({"fingerprint_sha256": sensor_1_fingerprint, "reason": "revoked"})]
                } else {
                    Vec::new()
                };
                (200, json!({ "retired": retired }).to_string())
            }
            _ => (404, String::new()),
        }
    })
}

struct Broker {
    child: Child,
    log: PathBuf,
}

impl Broker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times `needle` is in the broker's log so far.
    fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits (at most 10 s) until `needle` is in the log more than `before` times:
    /// mosquitto writes (and flushes) each line as it acts, e.g. `Sending SUBACK to ID`
    /// once that client's subscription is in place.
    fn wait_for(&self, needle: &str, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count(needle) <= before {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the broker log within 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker(dir: &Path, serve_url: &str) -> (Broker, u16) {
    let port = free_port();
    std::fs::write(dir.join("broker-api.secret"), SECRET).unwrap();
    let d = dir.display();
    let conf = format!(
        "per_listener_settings false\nallow_anonymous false\nuser root\n\
         log_dest file {d}/mosquitto.log\nlog_type all\n\
         listener {port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nrequire_certificate true\n\
         plugin {}\nplugin_opt_broker_api {serve_url}\nplugin_opt_secret_file {d}/broker-api.secret\n\
         plugin_opt_timeout_ms 1000\nplugin_opt_sessions_interval_ms 200\n",
        plugin_library().display()
    );
    std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut broker = Broker {
        child,
        log: dir.join("mosquitto.log"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = broker.child.try_wait() {
            panic!("mosquitto exited ({status}):\n{}", broker.log());
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (broker, port)
}

fn client(
    tool: &str,
    dir: &Path,
    port: u16,
    device: &str,
    client_id: &str,
    rest: &[&str],
) -> Command {
    let mut command = Command::new(tool);
    command
        .current_dir(dir)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cafile",
            "ca.crt",
        ])
        .args([
            "--cert",
            &format!("{device}.crt"),
            "--key",
            &format!("{device}.key"),
            "-i",
            client_id,
        ])
        .args(rest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits for `child`, killing it after `limit`.
fn finish(mut child: Child, limit: Duration) -> (Output, bool) {
    let deadline = Instant::now() + limit;
    let timed_out = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = child.wait().unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        timed_out,
    )
}

fn run(mut command: Command) -> Output {
    finish(command.spawn().unwrap(), Duration::from_secs(15)).0
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
#[ignore = "needs mosquitto, mosquitto-clients and openssl installed"]
fn real_broker() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    make_certificates(dir, &["sensor-1", "sensor-2", "sensor-3"]);
    let revoked = Arc::new(AtomicBool::new(false));
    openssl(
        dir,
        &[
            "x509",
            "-in",
            "sensor-1.crt",
            "-outform",
            "der",
            "-out",
            "sensor-1.der",
        ],
    );
    let sensor_1 = fleetcert_mosquitto::plugin::fingerprint_sha256(
        &std::fs::read(dir.join("sensor-1.der")).unwrap(),
    );
    let mut serve = fake_serve(Arc::clone(&revoked), sensor_1);
    let (broker, port) = start_broker(dir, &serve.url());
    let v311 = ["-V", "mqttv311"];

    // sensor-1 watches every device's telemetry.
    let subscribed = "Sending SUBACK to sensor-1";
    let watch = client(
        "mosquitto_sub",
        dir,
        port,
        "sensor-1",
        "sensor-1",
        &[&v311[..], &["-t", "devices/#", "-v", "-C", "1", "-W", "15"]].concat(),
    )
    .spawn()
    .unwrap();
    broker.wait_for(subscribed, 0);
    // sensor-2 forges sensor-1's topic (denied, not delivered), then publishes on its own.
    for (topic, message) in [
        ("devices/sensor-1/telemetry", "forged"),
        ("devices/sensor-2/telemetry", "genuine"),
    ] {
        let output = run(client(
            "mosquitto_pub",
            dir,
            port,
            "sensor-2",
            "sensor-2",
            &[&v311[..], &["-t", topic, "-m", message]].concat(),
        ));
        assert!(
            output.status.success(),
            "publish to {topic}: {}\n{}",
            text(&output),
            broker.log()
        );
    }
    let (watched, timed_out) = finish(watch, Duration::from_secs(20));
    println!("sensor-1 received: {:?}", text(&watched));
    assert!(
        !timed_out && watched.status.success(),
        "{}\n{}",
        text(&watched),
        broker.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&watched.stdout).trim(),
        "devices/sensor-2/telemetry genuine"
    );

    // serve refuses: CONNACK "not authorised", in both protocol versions.
    for version in ["mqttv311", "mqttv5"] {
        let refused = run(client(
            "mosquitto_pub",
            dir,
            port,
            "sensor-3",
            "intruder",
            &["-V", version, "-t", "devices/intruder/t", "-m", "x"],
        ));
        println!(
            "refused CONNECT ({version}): status {:?}: {:?}",
            refused.status.code(),
            text(&refused)
        );
        assert!(!refused.status.success());
        assert!(
            text(&refused).to_lowercase().contains("not author"),
            "{}",
            text(&refused)
        );
    }

    // Revocation: the live sensor-1 session is kicked, and its reconnect is refused.
    let before = broker.count(subscribed);
    let live = client(
        "mosquitto_sub",
        dir,
        port,
        "sensor-1",
        "sensor-1",
        &[&v311[..], &["-t", "devices/#", "-W", "20"]].concat(),
    )
    .spawn()
    .unwrap();
    broker.wait_for(subscribed, before);
    revoked.store(true, Ordering::SeqCst);
    let (kicked, timed_out) = finish(live, Duration::from_secs(15));
    println!(
        "revoked sensor-1: status {:?}: {:?}",
        kicked.status.code(),
        text(&kicked)
    );
    assert!(!timed_out, "sensor-1 was not kicked:\n{}", broker.log());
    assert!(
        broker.log().contains("kicking \"sensor-1\""),
        "{}",
        broker.log()
    );
    revoked.store(false, Ordering::SeqCst);

    // serve down: a device not in the cache is refused; sensor-2 (cached 30 s) still gets in.
    serve.stop();
    let unavailable = run(client(
        "mosquitto_pub",
        dir,
        port,
        "sensor-3",
        "sensor-3",
        &["-V", "mqttv5", "-t", "devices/sensor-3/t", "-m", "x"],
    ));
    println!(
        "serve down, new device (v5): status {:?}: {:?}",
        unavailable.status.code(),
        text(&unavailable)
    );
    assert!(!unavailable.status.success());
    let unavailable = run(client(
        "mosquitto_pub",
        dir,
        port,
        "sensor-3",
        "sensor-3",
        &[&v311[..], &["-t", "devices/sensor-3/t", "-m", "x"]].concat(),
    ));
    println!(
        "serve down, new device (3.1.1): status {:?}: {:?}",
        unavailable.status.code(),
        text(&unavailable)
    );
    assert!(!unavailable.status.success());
    let cached = run(client(
        "mosquitto_pub",
        dir,
        port,
        "sensor-2",
        "sensor-2",
        &[&v311[..], &["-t", "devices/sensor-2/t", "-m", "x"]].concat(),
    ));
    println!(
        "serve down, cached device: status {:?}: {:?}",
        cached.status.code(),
        text(&cached)
    );
    assert!(
        cached.status.success(),
        "{}\n{}",
        text(&cached),
        broker.log()
    );

    let log = broker.log();
    println!("--- fleetcert lines of the broker log ---");
    for line in log.lines().filter(|l| l.contains("fleetcert")) {
        println!("{line}");
    }
}

#[test]
#[ignore = "needs mosquitto installed"]
fn missing_option_stops_the_broker() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nuser root\nlistener {port} 127.0.0.1\nplugin {}\nplugin_opt_secret_file /nonexistent\n",
            plugin_library().display()
        ),
    )
    .unwrap();
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (output, timed_out) = finish(child, Duration::from_secs(10));
    println!("{}", text(&output));
    assert!(
        !timed_out,
        "mosquitto started without plugin_opt_broker_api"
    );
    assert!(!output.status.success());
    assert!(
        text(&output).contains("plugin_opt_broker_api"),
        "{}",
        text(&output)
    );
}
