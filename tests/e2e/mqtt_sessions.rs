//! Connection records of MQTT sessions (issue 14, item 5): the plugin reports each ended
//! session to serve, which records client id, address, connect and disconnect times and
//! why it ended; `things show` lists them. A session taken over by another connection
//! with the same client id (two devices sharing one certificate) says so — the audit's
//! CONFLICTING_CLIENT_IDS and DEVICE_CERTIFICATE_SHARED checks read these records.
use super::*;

/// `things show` until `ready` holds for its MQTT connection records (bounded).
fn mqtt_connections(
    env: &Env,
    thing: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let show = env.json(&["things", "show", thing]);
        let records: Vec<serde_json::Value> = show["recent_connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["transport"] == "mqtt")
            .cloned()
            .collect();
        if ready(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "connection records of {thing} never became complete: {show:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs mosquitto and paho-mqtt (scripts/with-mosquitto.sh)"]
fn ended_sessions_are_recorded_with_client_id_times_and_why_they_ended() {
    let env = Env::new();
    env.init_ca();
    let one = device(&env, "sensor-1");
    let fleet = Fleet::start(&env);
    let before = fleetcert_lifecycle_now();

    // A session that ends by itself.
    let first = probe(&fleet, &one, "sensor-1", &[], &[], 0.5);
    assert_eq!(first["connack"], SUCCESS, "{first}\n{}", fleet.broker_log());
    let records = mqtt_connections(&env, "sensor-1", |r| !r.is_empty());
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!(record["client_id"], "sensor-1");
    assert_eq!(record["disconnect_reason"], "disconnected");
    assert_eq!(record["client_addr"], "127.0.0.1");
    let (at, until) = (
        record["at"].as_i64().unwrap(),
        record["disconnected_at"].as_i64().unwrap(),
    );
    assert!(at >= before && until >= at, "{record}");

    // The same certificate and client id from a second connection while the first is up:
    // mosquitto drops the first (session takeover).
    let held = probe_in_background(&fleet, &one, "sensor-1", &[], 8.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let allowed_connects = |log: &str| {
        log.lines()
            .filter(|l| l.contains("CONNECT \"sensor-1\"") && l.contains("allowed"))
            .count()
    };
    while allowed_connects(&fleet.broker_log()) < 2 {
        assert!(Instant::now() < deadline, "{}", fleet.broker_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = mosquitto_pub(&fleet, &one, "sensor-1", "devices/sensor-1/telemetry");
    assert_eq!(second.code, 0, "{}\n{}", second.stderr, fleet.broker_log());
    let records = mqtt_connections(&env, "sensor-1", |r| {
        r.iter()
            .any(|c| c["disconnect_reason"] == "duplicate_client_id")
    });
    assert!(records.len() >= 2, "{records:#?}");
    let taken_over: Vec<_> = records
        .iter()
        .filter(|c| c["disconnect_reason"] == "duplicate_client_id")
        .collect();
    assert_eq!(taken_over.len(), 1, "{records:#?}");
    assert_eq!(taken_over[0]["client_id"], "sensor-1");
    let _ = held.join();

    // The plugin's counters reach serve's /metrics with its sessions polls.
    let served = fleet.served.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = crate::jitp::metrics(served);
        let value = |m: &str| crate::jitp::metric(&text, m);
        let connects = value("fleetcert_broker_connects_total{result=\"allowed_serve\"}")
            + value("fleetcert_broker_connects_total{result=\"allowed_cache\"}");
        let published =
            value("fleetcert_broker_acl_decisions_total{action=\"publish\",result=\"allowed\"}");
        if connects >= 3.0 && published >= 1.0 {
            assert!(
                value("fleetcert_broker_api_calls_total{result=\"ok\"}") >= 1.0,
                "{text}"
            );
            assert!(
                value("fleetcert_broker_connect_seconds_count") >= 1.0,
                "{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin's counters never reached /metrics: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // The human view lists them too.
    let text = env.ok(&["things", "show", "sensor-1"]);
    assert!(text.contains("recent connections:"), "{text}");
    assert!(
        text.contains("mqtt") && text.contains("(duplicate_client_id)"),
        "{text}"
    );
}

fn fleetcert_lifecycle_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
