use crate::mqtt::{plugin_path, required_env};
use crate::util::*;
use std::path::Path;

#[test]
fn demo_runs_the_factory_line_end_to_end() {
    let env = Env::new();
    let out = env.json(&["demo", "--devices", "200", "--no-mqtt"]);
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["provision"]["issued"], 200);
    assert_eq!(out["verified"], 200);
    assert_eq!(out["private_keys_mode_0600"], 200);
    assert_eq!(out["rerun"]["skipped"], 200);
    assert_eq!(out["registry"]["things"], 200);
    // Every device then connected over mutual TLS: first provisioned, then known.
    assert_eq!(out["jitp"]["first"]["ok"], 200, "{out}");
    assert_eq!(out["jitp"]["returning"]["ok"], 200, "{out}");
    assert_eq!(out["mqtt"]["ran"], false, "{out}");
    assert_eq!(out["mqtt"]["skipped"], "--no-mqtt", "{out}");
    // It ends with an audit of the demo fleet: every check ran; the 2-day certificates of
    // the 200 devices (their rotated ones) are all within the 30-day expiry threshold.
    let audit = &out["audit"];
    assert_eq!(audit["taskStatus"], "COMPLETED", "{audit}");
    assert_eq!(audit["totalChecksCount"], 14, "{audit}");
    let expiring = audit["auditDetails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["checkName"] == "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK")
        .unwrap();
    assert_eq!(expiring["nonCompliantResourcesCount"], 200, "{audit}");
    assert_eq!(audit["nonCompliantChecksCount"], 1, "{audit}");
    // The temporary data directory is gone afterwards.
    assert!(!std::path::Path::new(out["data_dir"].as_str().unwrap()).exists());
}

/// Without mosquitto the demo still succeeds, and says in one line why the MQTT round
/// did not run.
#[test]
fn demo_without_mosquitto_skips_the_mqtt_round_and_says_why() {
    let env = Env::new();
    let missing = env.path("no-such-mosquitto");
    let text = env.ok(&[
        "demo",
        "--devices",
        "5",
        "--mosquitto",
        missing.to_str().unwrap(),
    ]);
    let skipped: Vec<&str> = text.lines().filter(|l| l.contains("mqtt")).collect();
    assert_eq!(skipped.len(), 1, "{text}");
    assert!(
        skipped[0].contains("skipped") && skipped[0].contains("no-such-mosquitto"),
        "{text}"
    );
    assert!(text.contains("result        OK"), "{text}");
}

/// With mosquitto, the demo's MQTT round: mosquitto with the plugin, configured as
/// `fleetcert mosquitto config` writes it; two new devices register by their first
/// CONNECT, one gets its message on its own topic back, its publish on the other's topic
/// is refused and not delivered.
#[test]
#[ignore = "needs mosquitto (scripts/with-mosquitto.sh)"]
fn demo_runs_an_mqtt_round_when_mosquitto_is_installed() {
    let env = Env::new();
    let clients = required_env("FLEETCERT_TEST_MOSQUITTO_PUB");
    let clients = Path::new(&clients).parent().unwrap();
    let out = env.json(&[
        "demo",
        "--devices",
        "20",
        "--mosquitto",
        &required_env("FLEETCERT_TEST_MOSQUITTO"),
        "--mosquitto-clients",
        clients.to_str().unwrap(),
        "--plugin",
        plugin_path().to_str().unwrap(),
    ]);
    let mqtt = &out["mqtt"];
    assert_eq!(mqtt["ran"], true, "{out}");
    assert!(mqtt["skipped"].is_null(), "{mqtt}");
    assert_eq!(mqtt["errors"], serde_json::json!([]), "{mqtt}");
    assert_eq!(mqtt["registered"], 2, "{mqtt}");
    assert_eq!(mqtt["own_topic_delivered"], true, "{mqtt}");
    assert_eq!(mqtt["foreign_topic_refused"], true, "{mqtt}");
    assert_eq!(mqtt["foreign_topic_delivered"], false, "{mqtt}");
    // A device holding only the claim provisioned itself and came back as itself.
    assert_eq!(mqtt["claim"], "demo-claim", "{mqtt}");
    assert_eq!(mqtt["claim_thing"], "demo-claimed-0001", "{mqtt}");
    assert_eq!(mqtt["claim_device_echo"], true, "{mqtt}");
    assert!(
        mqtt["broker"].as_str().unwrap().contains("mosquitto"),
        "{mqtt}"
    );
    assert_eq!(out["ok"], true, "{out}");
    // The round's two devices and the claimed one are in the registry beside the pallet.
    assert_eq!(out["registry"]["things"], 23, "{out}");
}
