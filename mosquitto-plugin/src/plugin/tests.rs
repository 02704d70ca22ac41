use super::*;
use crate::fake_serve::{FakeServe, Received};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const CERT: &[u8] = b"not really DER, the plugin only hashes and forwards it";
const DEVICE_CERT: &[u8] = b"another certificate, registered by RegisterThing";

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
    Plugin::start(&options, no_reload()).unwrap()
}

fn no_reload() -> ReloadHook {
    Box::new(|| Ok(()))
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
    // Remembered decisions answer the same, per access (publish vs receive vs retain),
    // also after the memo has been cleared by many distinct topics.
    for round in 0..2 {
        assert!(plugin.authorize(key, publish, "devices/sensor-1/telemetry"));
        assert!(!plugin.authorize(key, publish, "devices/sensor-2/telemetry"));
        assert!(!plugin.authorize(key, Access::Receive, "devices/sensor-1/telemetry"));
        assert!(!plugin.authorize(
            key,
            Access::Publish { retain: true },
            "devices/sensor-1/telemetry"
        ));
        for i in 0..(MAX_REMEMBERED_DECISIONS + 10) {
            let allowed = plugin.authorize(key, publish, &format!("devices/sensor-1/t{i}"));
            assert!(allowed, "round {round}, topic {i}");
        }
    }
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
        (1 + 2 * (1 + MAX_REMEMBERED_DECISIONS + 10)) as u64
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
        no_reload(),
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

/// With `crl_file`, the worker keeps the file equal to serve's CRL: written atomically and
/// the broker reloaded when it changes, left alone (no reload) when it does not, checked
/// again right after serve retires a certificate.
#[test]
fn the_crl_file_follows_serve_and_reloads_the_broker_on_change() {
    use std::sync::atomic::AtomicUsize;
    const CRL_1: &str = "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n";
    const CRL_2: &str = "-----BEGIN X509 CRL-----\nBBBB\n-----END X509 CRL-----\n";
    let second = Arc::new(AtomicBool::new(false));
    let retire = Arc::new(AtomicBool::new(false));
    let (second_in, retire_in) = (Arc::clone(&second), Arc::clone(&retire));
    let fake = FakeServe::start(move |request: &Received| match request.path.as_str() {
        "/broker/v1/crl" => (
            200,
            if second_in.load(Ordering::SeqCst) {
                CRL_2
            } else {
                CRL_1
            }
            .to_owned(),
        ),
        "/broker/v1/sessions" => {
            let retired: Vec<_> = if retire_in.swap(false, Ordering::SeqCst) {
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
        "/broker/v1/connect" => (200, allowed("sensor-1", 30)),
        _ => (204, String::new()),
    });
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let crl_file = dir.path().join("crl.pem");
    std::fs::write(&crl_file, "stale").unwrap();
    let reloads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&reloads);
    let options = PluginOptions::parse([
        ("broker_api", fake.url().as_str()),
        ("secret_file", secret.to_str().unwrap()),
        ("sessions_interval_ms", "20"),
        ("crl_file", crl_file.to_str().unwrap()),
        ("crl_interval_ms", "600000"),
    ])
    .unwrap();
    let plugin = Plugin::start(
        &options,
        Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }),
    )
    .unwrap();
    // At start: the stale file is replaced, once.
    wait_until("the first CRL", || reloads.load(Ordering::SeqCst) == 1);
    assert_eq!(std::fs::read_to_string(&crl_file).unwrap(), CRL_1);
    // The interval is long: serve's new CRL is not fetched until a certificate is retired.
    second.store(true, Ordering::SeqCst);
    let polls = fake.requests_to("/broker/v1/sessions").len();
    wait_until("more polls", || {
        fake.requests_to("/broker/v1/sessions").len() > polls + 3
    });
    assert_eq!(fake.requests_to("/broker/v1/crl").len(), 1);
    assert_eq!(std::fs::read_to_string(&crl_file).unwrap(), CRL_1);
    assert_eq!(
        plugin.authenticate(&attempt(1, "sensor-1")),
        AuthAnswer::Allowed
    );
    retire.store(true, Ordering::SeqCst);
    wait_until("the new CRL", || reloads.load(Ordering::SeqCst) == 2);
    assert_eq!(std::fs::read_to_string(&crl_file).unwrap(), CRL_2);
    // Checked again on the next poll too; unchanged, so no third reload.
    wait_until("the follow-up check", || {
        fake.requests_to("/broker/v1/crl").len() >= 3
    });
    assert_eq!(reloads.load(Ordering::SeqCst), 2);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tmp")),
        "a staging file was left behind"
    );
    plugin.shutdown();
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

/// A fake serve for provisioning by claim: CONNECTs with `CERT` are the claim's (the AWS
/// claim policy, client ids `boot-*` only); a RegisterThing reply carries the grant of the
/// device's next CONNECT (certificate `DEVICE_CERT`, client id "sensor-9").
fn claim_serve() -> FakeServe {
    FakeServe::start(move |request: &Received| match request.path.as_str() {
        "/broker/v1/connect" => {
            let client_id = request.body["client_id"].as_str().unwrap_or_default();
            let claim_policy = json!({
                "Version": "2012-10-17",
                "Statement": [
                    { "Effect": "Allow", "Action": "iot:Connect",
                      "Resource": "arn:aws:iot:local:000000000000:client/boot-*" },
                    { "Effect": "Allow", "Action": "iot:Publish",
                      "Resource": "arn:aws:iot:local:000000000000:topic/$aws/certificates/create/*" }
                ]
            });
            (
                200,
                json!({
                    "result": "allowed",
                    "thing_name": "line-7",
                    "policies": [ { "name": "claim", "document": claim_policy.to_string() } ],
                    "context": { "client_id": client_id },
                    "arn": { "region": "local", "account": "000000000000" },
                    "cache_seconds": 30,
                    "claim": { "name": "line-7", "template": "sensors" }
                })
                .to_string(),
            )
        }
        "/broker/v1/provision" => {
            let replies: Vec<_> = request.body["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let mut grant: serde_json::Value =
                        serde_json::from_str(&allowed("sensor-9", 30)).unwrap();
                    grant["fingerprint_sha256"] =
                        json!(fingerprint_sha256(DEVICE_CERT).to_ascii_uppercase());
                    json!({
                        "id": r["id"],
                        "topic": format!("{}/accepted", r["topic"].as_str().unwrap()),
                        "payload_b64": "e30=",
                        "grant": grant,
                    })
                })
                .collect();
            (200, json!({ "replies": replies }).to_string())
        }
        "/broker/v1/sessions" => (200, json!({ "retired": [] }).to_string()),
        _ => (204, String::new()),
    })
}

#[test]
fn claims_are_cached_by_certificate_and_registered_devices_ahead_of_their_connect() {
    let fake = claim_serve();
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_for(&fake.url(), &dir, "60000");
    // Every device of a batch brings the claim with its own client id: serve is asked once.
    for (connection, client_id) in [(1, "boot-1"), (2, "boot-2"), (3, "boot-3")] {
        assert_eq!(
            plugin.authenticate(&attempt(connection, client_id)),
            AuthAnswer::Allowed,
            "{client_id}"
        );
    }
    assert_eq!(fake.requests_to("/broker/v1/connect").len(), 1);
    // The claim policy is still evaluated for each client id.
    assert_eq!(
        plugin.authenticate(&attempt(4, "not-a-boot-id")),
        AuthAnswer::NotAuthorized
    );
    assert_eq!(fake.requests_to("/broker/v1/connect").len(), 1);
    // ${iot:ClientId} and the claim's topics are per session.
    assert!(plugin.take_provisioning_request(
        ConnectionKey(2),
        "$aws/provisioning-templates/sensors/provision/json",
        b"{}"
    ));
    // The RegisterThing reply brings the new certificate's grant: its CONNECT is answered
    // from the cache, without serve.
    wait_until("the reply", || !lock(&plugin.shared.replies).is_empty());
    let replies = plugin.take_replies();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].client_id, "boot-2");
    let count = |e| plugin.metrics().provisioning_count(e);
    use crate::metrics::ProvisioningEvent::{Dropped, Reply, Request};
    assert_eq!((count(Request), count(Reply), count(Dropped)), (1, 1, 0));
    // A request from a session that is not a claim's is not taken (not counted either).
    assert!(!plugin.take_provisioning_request(
        ConnectionKey(99),
        "$aws/certificates/create/json",
        b"{}"
    ));
    assert_eq!(count(Request), 1);
    let device = ConnectAttempt {
        certificate_der: Some(DEVICE_CERT),
        ..attempt(5, "sensor-9")
    };
    assert_eq!(plugin.authenticate(&device), AuthAnswer::Allowed);
    assert_eq!(
        fake.requests_to("/broker/v1/connect").len(),
        1,
        "the registered device's CONNECT went to serve"
    );
    assert!(plugin.authorize(
        ConnectionKey(5),
        Access::Publish { retain: false },
        "devices/sensor-9/t"
    ));
    // Only for that client id.
    let other = ConnectAttempt {
        certificate_der: Some(DEVICE_CERT),
        ..attempt(6, "sensor-10")
    };
    plugin.authenticate(&other);
    assert_eq!(fake.requests_to("/broker/v1/connect").len(), 2);
}
