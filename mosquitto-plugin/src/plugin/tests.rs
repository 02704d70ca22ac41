use super::*;
use crate::fake_serve::{FakeServe, Received};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const CERT: &[u8] = b"not really DER, the plugin only hashes and forwards it";

fn policy() -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Action": "iot:Publish",
              "Resource": "arn:aws:iot:local:000000000000:topic/devices/${iot:Connection.Thing.ThingName}/*" },
            { "Effect": "Allow", "Action": "iot:Subscribe",
              "Resource": "arn:aws:iot:local:000000000000:topicfilter/commands/${iot:Connection.Thing.ThingName}/#" },
            { "Effect": "Allow", "Action": "iot:Receive",
              "Resource": "arn:aws:iot:local:000000000000:topic/commands/${iot:Connection.Thing.ThingName}/*" }
        ]
    })
    .to_string()
}

fn allowed(client_id: &str, cache_seconds: u64) -> String {
    json!({
        "result": "allowed",
        "thing_name": client_id,
        "registered": true,
        "policies": [ { "name": "p", "document": policy() } ],
        "context": { "client_id": client_id, "thing": { "name": client_id } },
        "arn": { "region": "local", "account": "000000000000" },
        "cache_seconds": cache_seconds
    })
    .to_string()
}

/// A fake serve allowing every client id except `intruder`, caching 30 s, and retiring
/// every fingerprint once `retire` is set.
fn serve(retire: Arc<AtomicBool>) -> FakeServe {
    FakeServe::start(move |request: &Received| {
        if request.authorization.as_deref() != Some(&format!("Bearer {SECRET}")) {
            return (401, String::new());
        }
        match request.path.as_str() {
            "/broker/v1/connect" => {
                let client_id = request.body["client_id"].as_str().unwrap_or_default();
                if client_id == "intruder" {
                    (200, json!({"result": "refused", "reason": "not_authorized", "code": "client_id_mismatch", "message": "no"}).to_string())
                } else {
                    (200, allowed(client_id, 30))
                }
            }
            "/broker/v1/disconnect" => (204, String::new()),
            "/broker/v1/sessions" => {
                let retired: Vec<_> = if retire.load(Ordering::SeqCst) {
                    request.body["fingerprints"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| json!({"fingerprint_sha256": f, "reason": "revoked"}))
                        .collect()
                } else {
                    Vec::new()
                };
                (200, json!({ "retired": retired }).to_string())
            }
            _ => (404, String::new()),
        }
    })
}

fn plugin_for(url: &str, dir: &tempfile::TempDir, interval_ms: &str) -> Plugin {
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let options = PluginOptions::parse([
        ("broker_api", url),
        ("secret_file", secret.to_str().unwrap()),
        ("timeout_ms", "1000"),
        ("sessions_interval_ms", interval_ms),
    ])
    .unwrap();
    Plugin::start(&options).unwrap()
}

fn attempt(connection: usize, client_id: &str) -> ConnectAttempt<'_> {
    ConnectAttempt {
        connection: ConnectionKey(connection),
        client_id,
        certificate_der: Some(CERT),
        source_address: "127.0.0.1",
        username: None,
        protocol_version: 4,
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn decides_from_the_session_policies() {
    let fake = serve(Arc::default());
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "60000");
    let key = ConnectionKey(1);
    assert_eq!(
        plugin.authenticate(&attempt(1, "sensor-1")),
        AuthAnswer::Allowed
    );
    assert_eq!(plugin.session_thing(key).as_deref(), Some("sensor-1"));
    let request = &fake.requests_to("/broker/v1/connect")[0];
    assert_eq!(request.body["client_id"], "sensor-1");
    assert_eq!(request.body["source_address"], "127.0.0.1");
    assert!(
        request.body["certificate_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\n")
    );

    let publish = Access::Publish { retain: false };
    assert!(plugin.authorize(key, publish, "devices/sensor-1/telemetry"));
    assert!(!plugin.authorize(key, publish, "devices/sensor-2/telemetry"));
    // Retained publishes also need iot:RetainPublish, which the policy does not grant.
    assert!(!plugin.authorize(
        key,
        Access::Publish { retain: true },
        "devices/sensor-1/telemetry"
    ));
    assert!(plugin.authorize(key, Access::Subscribe, "commands/sensor-1/#"));
    assert!(!plugin.authorize(key, Access::Subscribe, "commands/+/#"));
    assert!(plugin.authorize(key, Access::Receive, "commands/sensor-1/reboot"));
    assert!(!plugin.authorize(key, Access::Receive, "commands/sensor-2/reboot"));
    assert!(plugin.authorize(key, Access::Unsubscribe, "anything"));
    // Over AWS's limits, or $SYS: denied before the policy.
    assert!(!plugin.authorize(
        key,
        publish,
        &format!("devices/sensor-1/{}", "a".repeat(250))
    ));
    assert!(!plugin.authorize(key, publish, "devices/sensor-1/1/2/3/4/5/6/7"));
    assert!(!plugin.authorize(key, Access::Subscribe, "$SYS/#"));
    // Unknown session.
    assert!(!plugin.authorize(ConnectionKey(2), publish, "devices/sensor-1/telemetry"));
    assert!(!plugin.authorize(ConnectionKey(2), Access::Unsubscribe, "x"));
    assert_eq!(
        plugin
            .metrics()
            .acl_decisions(crate::metrics::AclKind::Publish, true),
        1
    );
}

#[test]
fn refusals_and_fail_closed() {
    let mut fake = serve(Arc::default());
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "60000");
    assert_eq!(
        plugin.authenticate(&attempt(1, "intruder")),
        AuthAnswer::NotAuthorized
    );
    let mut no_certificate = attempt(2, "sensor-1");
    no_certificate.certificate_der = None;
    assert_eq!(
        plugin.authenticate(&no_certificate),
        AuthAnswer::NotAuthorized
    );
    assert_eq!(
        fake.requests_to("/broker/v1/connect").len(),
        1,
        "no certificate: serve not asked"
    );
    assert!(!plugin.authorize(ConnectionKey(1), Access::Subscribe, "x"));

    // Wrong secret: serve answers 401, which is "unavailable".
    let other = tempfile::tempdir().unwrap();
    let secret = other.path().join("secret");
    std::fs::write(&secret, "f".repeat(64)).unwrap();
    let wrong = Plugin::start(
        &PluginOptions::parse([
            ("broker_api", fake.url().as_str()),
            ("secret_file", secret.to_str().unwrap()),
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        wrong.authenticate(&attempt(3, "sensor-1")),
        AuthAnswer::Unavailable
    );

    fake.stop();
    assert_eq!(
        plugin.authenticate(&attempt(4, "sensor-1")),
        AuthAnswer::Unavailable
    );
    let logs = plugin.drain_logs();
    assert!(
        logs.iter()
            .any(|l| l.message.contains("client_id_mismatch")),
        "{logs:?}"
    );
    assert!(
        logs.iter().any(|l| l.message.contains("serve unavailable")),
        "{logs:?}"
    );
}

#[test]
fn a_bad_policy_refuses_the_connection() {
    let fake = FakeServe::start(|_: &Received| {
        let mut answer: serde_json::Value = serde_json::from_str(&allowed("sensor-1", 30)).unwrap();
        answer["policies"][0]["document"] = json!("{ not json");
        (200, answer.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "60000");
    assert_eq!(
        plugin.authenticate(&attempt(1, "sensor-1")),
        AuthAnswer::Unavailable
    );
    assert!(plugin.session_thing(ConnectionKey(1)).is_none());
}

#[test]
fn returning_devices_are_answered_from_the_cache() {
    let mut fake = serve(Arc::default());
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "60000");
    assert_eq!(
        plugin.authenticate(&attempt(1, "sensor-1")),
        AuthAnswer::Allowed
    );
    plugin.disconnected(ConnectionKey(1));
    fake.stop();
    // Same certificate and client id: no call to serve, which is down anyway.
    assert_eq!(
        plugin.authenticate(&attempt(2, "sensor-1")),
        AuthAnswer::Allowed
    );
    assert!(plugin.authorize(
        ConnectionKey(2),
        Access::Publish { retain: false },
        "devices/sensor-1/t"
    ));
    // Another client id with the same certificate is not a cache hit.
    assert_eq!(
        plugin.authenticate(&attempt(3, "sensor-2")),
        AuthAnswer::Unavailable
    );
    assert_eq!(
        plugin
            .metrics()
            .connects(crate::metrics::ConnectResult::AllowedFromCache),
        1
    );
}

#[test]
fn the_worker_sends_disconnects_and_kicks_retired_certificates() {
    let retire = Arc::new(AtomicBool::new(false));
    let fake = serve(Arc::clone(&retire));
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "20");
    assert_eq!(
        plugin.authenticate(&attempt(1, "sensor-1")),
        AuthAnswer::Allowed
    );
    assert_eq!(
        plugin.authenticate(&attempt(2, "sensor-2")),
        AuthAnswer::Allowed
    );
    plugin.disconnected(ConnectionKey(2));
    plugin.disconnected(ConnectionKey(2)); // twice: one record
    wait_until("a disconnect batch", || {
        !fake.requests_to("/broker/v1/disconnect").is_empty()
    });
    let batch = &fake.requests_to("/broker/v1/disconnect")[0].body["sessions"];
    assert_eq!(batch.as_array().unwrap().len(), 1);
    assert_eq!(batch[0]["client_id"], "sensor-2");
    assert_eq!(batch[0]["fingerprint_sha256"], fingerprint_sha256(CERT));
    assert_eq!(batch[0]["reason"], "disconnected");
    wait_until("a sessions poll", || {
        !fake.requests_to("/broker/v1/sessions").is_empty()
    });
    // The counters ride along, from one instance.
    let polls = fake.requests_to("/broker/v1/sessions");
    let broker = &polls.last().unwrap().body["broker"];
    assert_eq!(broker["instance"].as_str().unwrap().len(), 32, "{broker}");
    assert_eq!(
        broker["metrics"]["connects"]["allowed_serve"], 2,
        "{broker}"
    );
    assert_eq!(broker["sessions"], 1, "{broker}");
    assert!(
        broker["metrics"]["serve_calls"].as_u64().unwrap() >= 3,
        "{broker}"
    );
    assert!(plugin.tick().is_empty());

    retire.store(true, Ordering::SeqCst);
    let mut kicks = Vec::new();
    wait_until("a kick", || {
        kicks = plugin.tick();
        !kicks.is_empty()
    });
    assert_eq!(kicks, ["sensor-1"]);
    assert!(!plugin.authorize(
        ConnectionKey(1),
        Access::Publish { retain: false },
        "devices/sensor-1/t"
    ));
    // The cache entry is gone: the next CONNECT asks serve again.
    let asked = fake.requests_to("/broker/v1/connect").len();
    let _ = plugin.authenticate(&attempt(3, "sensor-2"));
    assert_eq!(fake.requests_to("/broker/v1/connect").len(), asked + 1);
}

/// Why each session ended reaches serve: a takeover of the client id, a kick, the broker
/// stopping with sessions open.
#[test]
fn disconnect_records_say_why_the_session_ended() {
    let retire = Arc::new(AtomicBool::new(false));
    let fake = serve(Arc::clone(&retire));
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "20");
    let sent = |fake: &FakeServe| -> Vec<(String, String)> {
        fake.requests_to("/broker/v1/disconnect")
            .iter()
            .flat_map(|r| r.body["sessions"].as_array().unwrap().clone())
            .map(|s| {
                (
                    s["client_id"].as_str().unwrap().to_owned(),
                    s["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    // Two connections with one client id: mosquitto drops the first.
    assert_eq!(
        plugin.authenticate(&attempt(1, "sensor-1")),
        AuthAnswer::Allowed
    );
    assert_eq!(
        plugin.authenticate(&attempt(2, "sensor-1")),
        AuthAnswer::Allowed
    );
    plugin.disconnected(ConnectionKey(1));
    wait_until("the takeover record", || !sent(&fake).is_empty());
    assert_eq!(
        sent(&fake),
        [("sensor-1".to_owned(), "duplicate_client_id".to_owned())]
    );
    // A refused CONNECT with a live client id takes nothing over.
    assert_eq!(
        plugin.authenticate(&attempt(3, "intruder")),
        AuthAnswer::NotAuthorized
    );
    // Retired, kicked, then disconnected by mosquitto.
    retire.store(true, Ordering::SeqCst);
    wait_until("a kick", || !plugin.tick().is_empty());
    plugin.disconnected(ConnectionKey(2));
    wait_until("the kick record", || sent(&fake).len() == 2);
    assert_eq!(
        sent(&fake)[1],
        ("sensor-1".to_owned(), "certificate_retired".to_owned())
    );
    // Still open when the broker stops.
    retire.store(false, Ordering::SeqCst);
    assert_eq!(
        plugin.authenticate(&attempt(4, "sensor-4")),
        AuthAnswer::Allowed
    );
    plugin.shutdown();
    assert_eq!(
        sent(&fake)[2],
        ("sensor-4".to_owned(), "broker_stopped".to_owned())
    );
}

#[test]
fn pem_and_fingerprint() {
    let pem = certificate_pem(&[0u8; 100]);
    assert!(pem.lines().all(|l| l.len() <= 64));
    assert_eq!(pem.lines().count(), 5); // 136 base64 characters: 3 lines
    assert_eq!(
        fingerprint_sha256(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}
