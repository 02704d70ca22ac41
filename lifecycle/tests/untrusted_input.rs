//! Property tests for every parser that takes input fleetcert does not control: CSRs (PEM
//! and DER), EST request bodies, templates (YAML and JSON), policy documents, batch CSV rows
//! and thing names. Each property says: no panic, a bounded answer (errors quote at most an
//! excerpt of the input), and where there is a reference rule, agreement with it.
//!
//! The test command runs proptest's default of 256 cases per property (a few seconds in a
//! debug build). A longer run, e.g. before a release:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release -p fleetcert-lifecycle --test untrusted_input
//! ```
//!
//! A failing case is shrunk and saved under `lifecycle/proptest-regressions/`; commit that
//! file with the fix so the case is replayed on every run.

use fleetcert_ca::{DeviceCsr, ThingName};
use fleetcert_lifecycle::jitp::decode_csr_body;
use fleetcert_lifecycle::provision::{BatchOptions, validate_batch_csv};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::OnceLock;

/// Longest error text any of these parsers may produce, whatever the input's size: errors
/// name the position and the kind of problem and quote at most an excerpt.
const MAX_ERROR_CHARS: usize = 2048;

/// A valid P-256 CSR (DER), made once: the seed the CSR and EST mutations start from.
fn valid_csr_der() -> &'static [u8] {
    static CSR: OnceLock<Vec<u8>> = OnceLock::new();
    CSR.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("P-256 key");
        let params = rcgen::CertificateParams::new(vec!["sensor-1".to_owned()]).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    })
}

fn base64(der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// A byte string derived from `seed` by overwrites, truncation and insertions: close enough
/// to valid DER that the parser gets deep before it fails.
fn mutated(seed: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..16),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(overwrites, cut, insert, at)| {
            let mut bytes = seed.to_vec();
            for (i, b) in overwrites {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let at = at.index(bytes.len());
            bytes.splice(at..at, insert);
            bytes.truncate(cut.index(bytes.len() + 1).max(1));
            bytes
        })
}

fn assert_bounded(what: &str, message: &str) {
    assert!(
        message.chars().count() <= MAX_ERROR_CHARS,
        "{what}: error of {} chars echoes its input: {}…",
        message.chars().count(),
        message.chars().take(200).collect::<String>()
    );
}

proptest! {
    // ---- CSRs ----

    #[test]
    fn csr_parse_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = DeviceCsr::parse(&bytes) {
            assert_bounded("CSR", &e.to_string());
        }
    }

    #[test]
    fn csr_parse_survives_mutated_der(bytes in mutated(valid_csr_der())) {
        match DeviceCsr::parse(&bytes) {
            // A mutation can land in a part the signature does not cover (e.g. past the end
            // of the outer SEQUENCE is refused, but a truncation to the exact length is the
            // original); whatever is accepted must be the same key.
            Ok(csr) => {
                let original = DeviceCsr::parse(valid_csr_der()).unwrap();
                prop_assert_eq!(csr.public_key_sha256_hex(), original.public_key_sha256_hex());
            }
            Err(e) => assert_bounded("CSR", &e.to_string()),
        }
    }

    #[test]
    fn csr_parse_survives_pem_with_garbage(body in "[A-Za-z0-9+/=\n]{0,600}", label in prop::sample::select(vec!["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST", "CERTIFICATE", "X"])) {
        let pem = format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n");
        if let Err(e) = DeviceCsr::parse(pem.as_bytes()) {
            assert_bounded("CSR PEM", &e.to_string());
        }
    }

    // ---- EST bodies (RFC 7030: base64 of the DER, line breaks allowed; PEM and DER too) ----

    #[test]
    fn est_body_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Some(der) = decode_csr_body(&bytes) {
            let _ = DeviceCsr::parse(&der);
        }
    }

    #[test]
    fn est_body_base64_with_any_line_breaks_decodes_to_the_csr(breaks in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec!["\n", "\r\n", " ", "\t"])), 0..12)) {
        let mut text = base64(valid_csr_der());
        let mut positions: Vec<(usize, &str)> =
            breaks.iter().map(|(i, s)| (i.index(text.len() + 1), *s)).collect();
        positions.sort_by_key(|p| std::cmp::Reverse(p.0));
        for (at, s) in positions {
            text.insert_str(at, s);
        }
        let der = decode_csr_body(text.as_bytes()).expect("line-broken base64 is an EST body");
        prop_assert_eq!(&der[..], valid_csr_der());
        prop_assert!(DeviceCsr::parse(&der).is_ok());
    }

    #[test]
    fn est_body_survives_mutated_base64(bytes in mutated(valid_csr_der())) {
        let body = base64(&bytes);
        if let Some(der) = decode_csr_body(body.as_bytes()) {
            prop_assert_eq!(&der, &bytes);
            if let Err(e) = DeviceCsr::parse(&der) {
                assert_bounded("EST CSR", &e.to_string());
            }
        }
    }

    // ---- thing names: AWS IoT's rule, [a-zA-Z0-9:_-]{1,128} ----

    #[test]
    fn thing_name_rule_is_awss(name in prop_oneof![
        "[a-zA-Z0-9:_-]{0,140}",
        ".{0,40}",
        "[a-z]{1,10}[*/+#$ {}\\\\.\u{0}\u{00e9}][a-z]{0,10}",
    ]) {
        let expected = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
        let ca = ThingName::parse(&name);
        prop_assert_eq!(ca.is_ok(), expected, "ThingName::parse({:?})", name);
        prop_assert_eq!(fleetcert_templates::validate_thing_name(&name).is_ok(), expected);
        if let Ok(thing) = ca {
            prop_assert_eq!(thing.as_str(), name.as_str());
        }
    }

    // ---- templates (YAML or JSON) ----

    #[test]
    fn template_load_survives_arbitrary_text(text in ".{0,400}") {
        if let Err(e) = fleetcert_templates::load("fuzz", &text) {
            assert_bounded("template", &e.to_string());
        }
    }

    #[test]
    fn template_load_survives_mutated_default(edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec!["", "{", "[", "}", "]", ":", "\n", "  ", "-", "\"", "!", "&a", "*a", "${", "}", "Fn::Sub", "Ref", "#"])), 1..6)) {
        let mut text = fleetcert_templates::DEFAULT_TEMPLATE_YAML.to_owned();
        for (at, s) in edits {
            let mut at = at.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.insert_str(at, s);
        }
        if let Err(e) = fleetcert_templates::load("fuzz", &text) {
            assert_bounded("template", &e.to_string());
        }
    }

    #[test]
    fn template_errors_never_echo_long_values(junk in "[a-zA-Z0-9 ]{3000,6000}", json in any::<bool>()) {
        // An unknown top-level section whose name is the junk (the /etc/shadow case).
        let text = if json {
            format!("{{\"{junk}\": 1, \"Resources\": {{}}}}")
        } else {
            format!("\"{junk}\": 1\nResources: {{}}\n")
        };
        let e = fleetcert_templates::load("fuzz", &text).expect_err("unknown section");
        assert_bounded("template", &e.to_string());
    }

    #[test]
    fn template_nesting_is_refused_not_recursed(depth in 65usize..5000, json in any::<bool>()) {
        let (open, close) = if json { ("{\"a\":", "}") } else { ("[", "]") };
        let text = format!("{}1{}", open.repeat(depth), close.repeat(depth));
        let e = fleetcert_templates::load("fuzz", &text).expect_err("nesting deeper than the bound");
        assert_bounded("template", &e.to_string());
    }

    // ---- policy documents ----

    #[test]
    fn policy_checks_survive_any_json(document in json_value()) {
        let _ = fleetcert_templates::lint_policy(&document);
        if let Err(e) = fleetcert_templates::validate_policy_document(&document) {
            assert_bounded("policy", &e);
        }
        let _ = fleetcert_templates::effective_policy(&document, "sensor-1", "sensor-1");
    }

    #[test]
    fn a_wildcard_allow_is_always_found(extra in json_object(), action in prop::sample::select(vec!["iot:*", "*", "iot:Publish"]), resource in prop::sample::select(vec!["*", "arn:aws:iot:*:*:topic/*"])) {
        let mut statement = json!({"Effect": "Allow", "Action": action, "Resource": resource});
        if let (Value::Object(s), Value::Object(extra)) = (&mut statement, extra) {
            for (k, v) in extra {
                // Keys the lint reads keep their meaning; anything else rides along.
                if !matches!(k.as_str(), "Effect" | "Action" | "Resource" | "NotAction" | "NotResource" | "Condition") {
                    s.insert(k, v);
                }
            }
        }
        let document = json!({"Version": "2012-10-17", "Statement": [statement]});
        prop_assert!(!fleetcert_templates::lint_policy(&document).is_empty(), "{}", document);
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop::sample::select(vec![
            "Allow",
            "Deny",
            "*",
            "iot:*",
            "iot:Connect",
            "iot:Publish",
            "arn:aws:iot:*:*:client/${iot:ClientId}",
            "arn:aws:iot:us-east-1:1:topic/${iot:Connection.Thing.ThingName}/*",
            "${iot:Connection.Thing.Attributes[",
            "${",
            "Statement",
            "Effect",
            "Action",
            "Resource",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "Version",
                    "Statement",
                    "Effect",
                    "Action",
                    "NotAction",
                    "Resource",
                    "NotResource",
                    "Condition",
                    "Bool",
                    "StringEquals",
                    "x",
                ])
                .prop_map(str::to_owned),
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[A-Za-z]{1,8}", json_value(), 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

// ---- batch CSV rows ----

fn csv_field() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9:_-]{1,20}",
        ".{0,30}",
        "[a-z]{5000,9000}",
        Just("\"".to_owned()),
        Just("a,b".to_owned()),
        Just("../../etc/passwd".to_owned()),
        Just("/dev/zero".to_owned()),
        Just("#comment".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.min(64), ..ProptestConfig::default() })]

    #[test]
    fn batch_csv_rows_are_reported_bounded(
        header in prop::sample::select(vec!["thing_name", "thing_name,csr", "csr,thing_name", "name", ""]),
        rows in prop::collection::vec(prop::collection::vec(csv_field(), 0..4), 0..12),
        raw_tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batch.csv");
        let mut text = format!("{header}\n").into_bytes();
        for row in &rows {
            text.extend_from_slice(row.join(",").as_bytes());
            text.push(b'\n');
        }
        text.extend_from_slice(&raw_tail);
        std::fs::write(&path, &text).unwrap();

        let mut reports = Vec::new();
        let result = validate_batch_csv(&path, &BatchOptions::default(), &mut |r| {
            reports.push(serde_json::to_string(r).unwrap());
        });
        match result {
            Ok(batch) => {
                prop_assert!(batch.failures() <= batch.rows());
                prop_assert_eq!(reports.len() as u64, batch.failures());
            }
            Err(e) => assert_bounded("batch CSV", &e.to_string()),
        }
        for report in &reports {
            assert_bounded("batch CSV row report", report);
        }
    }
}
