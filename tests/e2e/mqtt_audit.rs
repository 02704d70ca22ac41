//! The audit's MQTT-based checks (issue 16) with real MQTT clients through mosquitto and
//! the fleetcert plugin: one certificate used by two client ids at once
//! (DEVICE_CERTIFICATE_SHARED_CHECK), a client id knocked off by another connection
//! (CONFLICTING_CLIENT_IDS_CHECK), the permissive policy that allowed the sharing
//! (IOT_POLICY_OVERLY_PERMISSIVE_CHECK), and a certificate seen connecting after its
//! revocation date (REVOKED_DEVICE_CERT_CHECK: revoked with fleetcert's clock an hour
//! back, so the session it had is after the revocation).
use super::*;
use crate::audit::{audit_at, detail, findings};

/// Any client id may connect, and publish or subscribe anywhere: what the lint refuses
/// unless told otherwise.
const WIDE: &str = r#"{
  "Parameters": { "AWS::IoT::Certificate::CommonName": { "Type": "String" } },
  "Resources": {
    "thing": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": { "Ref": "AWS::IoT::Certificate::CommonName" } } },
    "policy": { "Type": "AWS::IoT::Policy", "Properties": {
      "PolicyName": "wide-open",
      "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\": [\"iot:Connect\", \"iot:Publish\", \"iot:Subscribe\", \"iot:Receive\"], \"Resource\": [\"*\"] }] }"
    } }
  }
}"#;

fn serial(env: &Env, thing: &str) -> String {
    env.certs()
        .iter()
        .find(|c| c["thing_name"] == thing)
        .unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `audit run` until `ready` holds for its summary (connection records reach the
/// registry a moment after the sessions end), bounded.
fn audit_until(env: &Env, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, summary) = audit_at(env, 0, &[]);
        if ready(&summary) {
            assert_eq!(code, 1, "{summary}");
            return summary;
        }
        assert!(
            Instant::now() < deadline,
            "the audit never saw it: {summary:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `audit mitigate --task TASK --action ACTION...` (with `--dry-run` if `dry`), its JSON.
fn mitigate_json(env: &Env, task: &str, action: &[&str], dry: bool) -> serde_json::Value {
    let mut args = vec!["audit", "mitigate", "--task", task, "--action"];
    args.extend_from_slice(action);
    if dry {
        args.push("--dry-run");
    }
    env.json(&args)
}

fn non_compliant(summary: &serde_json::Value, check: &str) -> u64 {
    detail(summary, check)["nonCompliantResourcesCount"]
        .as_u64()
        .unwrap()
}

#[test]
#[ignore = "needs mosquitto and paho-mqtt (scripts/with-mosquitto.sh)"]
fn shared_certificates_conflicting_client_ids_and_revoked_certificates_in_use_are_found() {
    let env = Env::new();
    env.init_ca();
    let dir = env.data_dir().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("wide.json"), WIDE).unwrap();
    env.ok(&[
        "provision",
        "cloned",
        "--template",
        "wide",
        "--allow-overly-permissive",
        "--out",
        "out",
    ]);
    let cloned = Device {
        name: "cloned".into(),
        cert: env.out_dir().join("cloned.crt"),
        key: env.out_dir().join("cloned.key"),
    };
    let twin = device(&env, "twin");
    let stolen = device(&env, "stolen");
    let honest = device(&env, "honest");
    let fleet = Fleet::start_with(
        &env,
        FleetOptions {
            allow_overly_permissive: true,
            ..FleetOptions::default()
        },
    );

    // A clean fleet on MQTT first: one ordinary session, nothing found.
    let ok = probe(&fleet, &honest, "honest", &[], &[], 0.2);
    assert_eq!(ok["connack"], SUCCESS, "{ok}\n{}", fleet.broker_log());
    let (code, clean) = audit_at(&env, 0, &[]);
    assert_eq!(code, 0, "{clean:#}");

    // One certificate, two client ids, at the same time (its policy lets any client id in).
    let first = probe_in_background(&fleet, &cloned, "clone-a", &[], 3.0);
    let second = probe_in_background(&fleet, &cloned, "clone-b", &[], 3.0);
    for (name, run) in [("clone-a", first), ("clone-b", second)] {
        let result = run.join().unwrap();
        assert_eq!(
            result["connack"],
            SUCCESS,
            "{name}: {result}\n{}",
            fleet.broker_log()
        );
    }

    // One client id from two connections: the second knocks the first off.
    let held = probe_in_background(&fleet, &twin, "twin", &[], 6.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.broker_log().contains("CONNECT \"twin\"") {
        assert!(Instant::now() < deadline, "{}", fleet.broker_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let again = mosquitto_pub(&fleet, &twin, "twin", "devices/twin/telemetry");
    assert_eq!(again.code, 0, "{}\n{}", again.stderr, fleet.broker_log());
    let _ = held.join();

    // A session, then a revocation dated an hour before it.
    let used = probe(&fleet, &stolen, "stolen", &[], &[], 0.2);
    assert_eq!(used["connack"], SUCCESS, "{used}");
    let stolen_serial = serial(&env, "stolen");
    let out = env
        .cmd()
        .env("FLEETCERT_TIME_OFFSET", "-3600")
        .args(["revoke", &stolen_serial, "--reason", "keyCompromise"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let summary = audit_until(&env, |s| {
        non_compliant(s, "DEVICE_CERTIFICATE_SHARED_CHECK") == 1
            && non_compliant(s, "CONFLICTING_CLIENT_IDS_CHECK") == 1
            && non_compliant(s, "REVOKED_DEVICE_CERT_CHECK") == 1
    });
    let task = summary["taskId"].as_str().unwrap();
    assert_eq!(
        findings(&env, task, "DEVICE_CERTIFICATE_SHARED_CHECK"),
        [(
            serial(&env, "cloned"),
            "CERTIFICATE_SHARED_BY_MULTIPLE_DEVICES".to_owned(),
            false
        )]
    );
    assert_eq!(
        findings(&env, task, "CONFLICTING_CLIENT_IDS_CHECK"),
        [(
            "twin".to_owned(),
            "DUPLICATE_CLIENT_ID_ACROSS_CONNECTIONS".to_owned(),
            false
        )]
    );
    assert_eq!(
        findings(&env, task, "IOT_POLICY_OVERLY_PERMISSIVE_CHECK"),
        [(
            "wide-open".to_owned(),
            "ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS".to_owned(),
            false
        )]
    );
    assert_eq!(
        findings(&env, task, "REVOKED_DEVICE_CERT_CHECK"),
        [(
            stolen_serial.clone(),
            "CERTIFICATE_REVOKED_BY_ISSUER".to_owned(),
            false
        )]
    );
    assert_eq!(summary["nonCompliantChecksCount"], 4, "{summary:#}");
    // The finding names the client ids and times, as AWS's does.
    let shared = env.json(&[
        "audit",
        "findings",
        "--task",
        task,
        "--check",
        "DEVICE_CERTIFICATE_SHARED_CHECK",
    ]);
    let info = &shared[0]["nonCompliantResource"]["additionalInfo"];
    assert_eq!(
        info["clientIds"],
        serde_json::json!(["clone-a", "clone-b"]),
        "{info}"
    );
    assert!(info["connections"][0]["connectedAt"].is_string(), "{info}");
    assert_eq!(shared[0]["severity"], "CRITICAL");
    // Mitigation: revoke the shared certificate. A dry run changes nothing; the real
    // run revokes exactly that certificate.
    let status_of = |thing: &str| -> String {
        env.certs()
            .iter()
            .find(|c| c["thing_name"] == thing)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mitigate = |dry: bool| {
        mitigate_json(
            &env,
            task,
            &["revoke", "--check", "DEVICE_CERTIFICATE_SHARED_CHECK"],
            dry,
        )
    };
    let dry = mitigate(true);
    assert_eq!(dry["actions"][0]["status"], "would_apply", "{dry}");
    assert_eq!(dry["actions"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(status_of("cloned"), "active");
    let applied = mitigate(false);
    assert_eq!(applied["applied"], 1, "{applied}");
    assert_eq!(
        applied["actions"][0]["actionType"],
        "UPDATE_DEVICE_CERTIFICATE"
    );
    assert_eq!(status_of("cloned"), "revoked");
    for thing in ["twin", "honest"] {
        assert_eq!(status_of(thing), "active", "{thing} was touched");
    }
    let again = mitigate(false);
    assert_eq!(again["actions"][0]["status"], "already_done", "{again}");

    // Mitigation: the wide-open policy gets a blank default version. Devices of its
    // template still register (the template renders the earlier version) but may do
    // nothing beyond connecting as themselves.
    let replace = |dry: bool| mitigate_json(&env, task, &["replace-default-policy-version"], dry);
    let dry = replace(true);
    let policy_actions: Vec<&serde_json::Value> = dry["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["checkName"] == "IOT_POLICY_OVERLY_PERMISSIVE_CHECK")
        .collect();
    assert_eq!(policy_actions.len(), 1, "{dry}");
    assert_eq!(policy_actions[0]["status"], "would_apply", "{dry}");
    assert_eq!(
        policy_actions[0]["actionType"],
        "REPLACE_DEFAULT_POLICY_VERSION"
    );
    let wide_doc = || env.json(&["policies", "show", "wide-open"]);
    assert!(
        wide_doc().to_string().contains("iot:Publish"),
        "a dry run changed it"
    );
    let replaced = replace(false);
    assert_eq!(replaced["applied"], 1, "{replaced}");
    let shown = wide_doc().to_string();
    assert!(!shown.contains("iot:Publish"), "{shown}");
    assert!(shown.contains("IsAttached"), "{shown}");
    let again = replace(false);
    assert!(
        again["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["status"] == "already_done"),
        "{again}"
    );
    env.ok(&[
        "provision",
        "late",
        "--template",
        "wide",
        "--allow-overly-permissive",
        "--out",
        "out",
    ]);
    let late = Device {
        name: "late".into(),
        cert: env.out_dir().join("late.crt"),
        key: env.out_dir().join("late.key"),
    };
    let first = probe(&fleet, &late, "late", &[], &["devices/late/telemetry"], 0.2);
    assert_eq!(first["connack"], SUCCESS, "{first}\n{}", fleet.broker_log());
    assert_eq!(first["publish"][0]["reason"], NOT_AUTHORIZED, "{first}");
    let other_id = probe(&fleet, &late, "not-late", &[], &[], 0.2);
    assert_eq!(other_id["connack"], NOT_AUTHORIZED, "{other_id}");
    let (_, after) = audit_at(&env, 0, &["--checks", "IOT_POLICY_OVERLY_PERMISSIVE_CHECK"]);
    assert_eq!(
        non_compliant(&after, "IOT_POLICY_OVERLY_PERMISSIVE_CHECK"),
        0,
        "{after:#}"
    );

    // The honest device is a resource of every device check and never a finding.
    assert_eq!(
        detail(&summary, "DEVICE_CERTIFICATE_SHARED_CHECK")["totalResourcesCount"],
        4,
        "cloned, twin, stolen, honest (before late joined): {summary:#}"
    );
}

/// ADD_THINGS_TO_THING_GROUP as a quarantine, with real MQTT clients: the expiring
/// certificate's thing goes into a thing group that had no policy (so it gets
/// `fleetcert-quarantine`); its live session is dropped within seconds; it may connect
/// again but neither publish nor subscribe, while a device outside the group is untouched.
#[test]
#[ignore = "needs mosquitto and paho-mqtt (scripts/with-mosquitto.sh)"]
fn a_quarantine_thing_group_drops_the_session_and_denies_its_messages() {
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "suspect", "--days", "10", "--out", "out"]);
    let suspect = Device {
        name: "suspect".into(),
        cert: env.out_dir().join("suspect.crt"),
        key: env.out_dir().join("suspect.key"),
    };
    let bystander = device(&env, "bystander");
    let fleet = Fleet::start(&env);

    // Both work before; the suspect's session stays up, waiting for a message.
    let before = probe(
        &fleet,
        &bystander,
        "bystander",
        &[],
        &["devices/bystander/telemetry"],
        0.2,
    );
    // PUBACK below 0x80 is success (0x10: accepted, no subscriber matched).
    let accepted = |reason: &serde_json::Value| reason.as_i64().is_some_and(|c| c < 0x80);
    assert!(accepted(&before["publish"][0]["reason"]), "{before}");
    let session = LiveSession::start(&fleet, &suspect, &["devices/suspect/#"], &[], 1);
    assert_eq!(session.ready["connack"], SUCCESS, "{}", session.ready);

    let (code, summary) = audit_at(
        &env,
        0,
        &["--checks", "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK"],
    );
    assert_eq!(code, 1, "{summary:#}");
    let task = summary["taskId"].as_str().unwrap().to_owned();
    let mitigate = |dry: bool| {
        mitigate_json(
            &env,
            &task,
            &["add-to-thing-group", "--thing-group", "quarantine"],
            dry,
        )
    };
    let groups_of =
        |thing: &str| env.json(&["things", "show", thing])["thing"]["details"]["groups"].clone();
    let dry = mitigate(true);
    assert_eq!(dry["actions"][0]["status"], "would_apply", "{dry}");
    assert_eq!(groups_of("suspect"), serde_json::json!([]));

    let quarantined_at = Instant::now();
    let applied = mitigate(false);
    assert_eq!(applied["applied"], 1, "{applied}");
    assert_eq!(
        applied["actions"][0]["actionType"],
        "ADD_THINGS_TO_THING_GROUP"
    );
    assert!(
        applied["actions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("fleetcert-quarantine"),
        "{applied}"
    );
    assert_eq!(groups_of("suspect"), serde_json::json!(["quarantine"]));
    assert_eq!(groups_of("bystander"), serde_json::json!([]));
    let session = session.go();
    assert!(
        session["disconnected_after"].is_f64(),
        "the quarantined session was not dropped within 10 s: {session}\n{}",
        fleet.broker_log()
    );
    assert!(quarantined_at.elapsed() < Duration::from_secs(11));

    // Connects again, under the group's Deny: nothing goes in or out.
    let after = probe(
        &fleet,
        &suspect,
        "suspect",
        &["devices/suspect/#"],
        &["devices/suspect/telemetry"],
        0.2,
    );
    assert_eq!(after["connack"], SUCCESS, "{after}");
    assert_eq!(after["subscribe"][0]["reason"], NOT_AUTHORIZED, "{after}");
    assert_eq!(after["publish"][0]["reason"], NOT_AUTHORIZED, "{after}");
    let still = probe(
        &fleet,
        &bystander,
        "bystander",
        &[],
        &["devices/bystander/telemetry"],
        0.2,
    );
    assert!(accepted(&still["publish"][0]["reason"]), "{still}");
    // `things show` lists the group's policy with the certificate's own.
    let shown = env.json(&["things", "show", "suspect"]);
    assert!(
        shown["policies"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("fleetcert-quarantine")),
        "{shown}"
    );
    // Applying again changes nothing.
    let again = mitigate(false);
    assert_eq!(again["actions"][0]["status"], "already_done", "{again}");
}
