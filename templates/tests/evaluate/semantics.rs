//! Evaluation rules beyond the guide's examples: actions, ARNs, variables, conditions,
//! several policies, escalation through names, and parse errors.

use super::{Want::*, aws, client, decide, policy, table, thing};
use fleetcert_templates::{
    Action, ArnContext, CertificateContext, ConnectionContext, Decision, DenyReason,
    DistinguishedName, Policy, PolicyError, Request, evaluate_policies,
};
use serde_json::{Value, json};

fn allow(action: Value, resource: Value) -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": resource}]})
}

fn with_condition(effect: &str, condition: Value) -> Policy {
    policy(&json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "*"},
        {"Effect": effect, "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/guarded", "Condition": condition}
    ]}))
}

#[test]
fn action_names_are_case_insensitive_globs() {
    let t = thing("dev1");
    for action in [
        "iot:Publish",
        "IOT:publish",
        "iot:Pub*",
        "iot:?ublish",
        "iot:*",
        "*",
    ] {
        let p = policy(&allow(json!(action), json!("*")));
        assert_eq!(
            decide(&p, &aws(), &t, Request::publish("a")),
            Allow,
            "{action}"
        );
    }
    for action in [
        "iot:Publis",
        "iot:Publish2",
        "iot:Subscribe",
        "s3:*",
        "iot:Pub",
    ] {
        let p = policy(&allow(json!(action), json!("*")));
        assert_eq!(
            decide(&p, &aws(), &t, Request::publish("a")),
            Implicit,
            "{action}"
        );
    }
    // `iot:Pub*` does not reach RetainPublish; `iot:*Publish` does.
    let p = policy(&allow(json!("iot:Pub*"), json!("*")));
    assert_eq!(
        decide(&p, &aws(), &t, Request::retain_publish("a")),
        Implicit
    );
    let p = policy(&allow(json!("iot:*Publish"), json!("*")));
    assert_eq!(decide(&p, &aws(), &t, Request::retain_publish("a")), Allow);
    // NotAction: everything but the listed actions.
    let p = policy(&json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "NotAction": ["iot:Connect", "iot:Sub*"], "Resource": "*"}]}));
    assert_eq!(decide(&p, &aws(), &t, Request::publish("a")), Allow);
    assert_eq!(decide(&p, &aws(), &t, Request::connect("dev1")), Implicit);
    assert_eq!(decide(&p, &aws(), &t, Request::subscribe("a")), Implicit);
}

#[test]
fn arn_fields_match_the_deployment() {
    let t = thing("dev1");
    let local = ArnContext::new("local", "000000000000");
    let pinned = policy(&allow(
        json!("iot:Publish"),
        json!("arn:aws:iot:us-east-1:123456789012:topic/a"),
    ));
    assert_eq!(decide(&pinned, &aws(), &t, Request::publish("a")), Allow);
    assert_eq!(decide(&pinned, &local, &t, Request::publish("a")), Implicit);
    let any = policy(&allow(
        json!("iot:Publish"),
        json!("arn:aws:iot:*:*:topic/a"),
    ));
    assert_eq!(decide(&any, &local, &t, Request::publish("a")), Allow);
    let region_glob = policy(&allow(
        json!("iot:Publish"),
        json!("arn:aws:iot:us-*:*:topic/a"),
    ));
    assert_eq!(
        decide(&region_glob, &aws(), &t, Request::publish("a")),
        Allow
    );
    assert_eq!(
        decide(&region_glob, &local, &t, Request::publish("a")),
        Implicit
    );
    // A `*` in the region stays in the region: a topic with colons cannot fake the header.
    let p = policy(&allow(
        json!("iot:Publish"),
        json!("arn:aws:iot:*:*:topic/x"),
    ));
    assert_eq!(
        decide(&p, &aws(), &t, Request::publish("a:b:topic/x")),
        Implicit
    );
    // Other partitions, services and resource types do not match.
    for resource in [
        "arn:aws-cn:iot:*:*:topic/a",
        "arn:aws:s3:*:*:topic/a",
        "arn:aws:iot:*:*:topicfilter/a",
        "arn:aws:iot:*:*:client/a",
    ] {
        let p = policy(&allow(json!("iot:Publish"), json!(resource)));
        assert_eq!(
            decide(&p, &aws(), &t, Request::publish("a")),
            Implicit,
            "{resource}"
        );
    }
    // Fewer than six fields: matched against the whole ARN.
    for resource in ["*", "arn:aws:iot:*", "arn:*"] {
        let p = policy(&allow(json!("iot:Publish"), json!(resource)));
        assert_eq!(
            decide(&p, &local, &t, Request::publish("a/b")),
            Allow,
            "{resource}"
        );
    }
    // Topic names are case-sensitive.
    let p = policy(&allow(
        json!("iot:Publish"),
        json!("arn:aws:iot:*:*:topic/A"),
    ));
    assert_eq!(decide(&p, &aws(), &t, Request::publish("a")), Implicit);
    assert_eq!(
        local.arn(&Request::subscribe("a/+")),
        "arn:aws:iot:local:000000000000:topicfilter/a/+"
    );
}

#[test]
fn not_resource() {
    let p = policy(&json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "*"},
        {"Effect": "Deny", "Action": "iot:Publish", "NotResource": "arn:aws:iot:*:*:topic/${iot:ClientId}/*"}]}));
    let c = client("c1");
    table(
        &p,
        &[
            (&c, Request::publish("c1/x"), Allow),
            (&c, Request::publish("c2/x"), DenyBy(1)),
        ],
    );
}

#[test]
fn special_character_variables_and_old_versions() {
    let p = policy(&allow(
        json!("iot:Publish"),
        json!("arn:aws:iot:*:*:topic/literal/${*}/${?}/${$}"),
    ));
    let t = thing("dev1");
    assert_eq!(
        decide(&p, &aws(), &t, Request::publish("literal/*/?/$")),
        Allow
    );
    assert_eq!(
        decide(&p, &aws(), &t, Request::publish("literal/a/b/$")),
        Implicit
    );
    // Version 2008-10-17 (or none): `${…}` is literal text, as in IAM.
    for version in [json!("2008-10-17"), Value::Null] {
        let mut doc = allow(
            json!("iot:Publish"),
            json!("arn:aws:iot:*:*:topic/${iot:ClientId}"),
        );
        if version.is_null() {
            doc.as_object_mut().unwrap().remove("Version");
        } else {
            doc["Version"] = version;
        }
        let p = policy(&doc);
        assert_eq!(decide(&p, &aws(), &t, Request::publish("dev1")), Implicit);
        assert_eq!(
            decide(&p, &aws(), &t, Request::publish("${iot:ClientId}")),
            Allow
        );
        assert!(p.notes().iter().any(|n| n.message.contains("literal")));
    }
}

fn cert(cn: &str) -> ConnectionContext {
    ConnectionContext {
        client_id: "dev1".into(),
        thing: None,
        certificate: Some(CertificateContext {
            subject: DistinguishedName {
                common_name: vec![cn.into()],
                country: vec!["DE".into(), "FR".into()],
                ..Default::default()
            },
            issuer: DistinguishedName {
                common_name: vec!["Fleet CA".into()],
                ..Default::default()
            },
            serial_number: Some("1234".into()),
            ..Default::default()
        }),
    }
}

#[test]
fn certificate_variables() {
    let p = policy(&allow(
        json!("iot:Publish"),
        json!([
            "arn:aws:iot:*:*:topic/cn/${iot:Certificate.Subject.CommonName}",
            "arn:aws:iot:*:*:topic/c0/${iot:Certificate.Subject.Country}",
            "arn:aws:iot:*:*:topic/c1/${iot:Certificate.Subject.Country.1}",
            "arn:aws:iot:*:*:topic/c2/${iot:Certificate.Subject.Country.2}",
            "arn:aws:iot:*:*:topic/list/${iot:Certificate.Subject.Country.List}",
            "arn:aws:iot:*:*:topic/issuer/${iot:Certificate.Issuer.CommonName}",
            "arn:aws:iot:*:*:topic/serial/${iot:Certificate.SerialNumber}",
            "arn:aws:iot:*:*:topic/san/${iot:Certificate.Subject.AlternativeName.DNSName}",
        ]),
    ));
    let c = cert("dev1");
    table(
        &p,
        &[
            (&c, Request::publish("cn/dev1"), Allow),
            (&c, Request::publish("c0/DE"), Allow),
            (&c, Request::publish("c1/FR"), Allow),
            // No third value: no substitution, no match.
            (&c, Request::publish("c2/"), Implicit),
            // A list is not substituted.
            (&c, Request::publish("list/DE"), Implicit),
            (&c, Request::publish("issuer/Fleet CA"), Allow),
            (&c, Request::publish("serial/1234"), Allow),
            (&c, Request::publish("san/"), Implicit),
        ],
    );
    // A certificate value with a wildcard character or over 1024 characters is not
    // substituted (AWS's documented limits).
    for cn in ["dev*", "dev+", "dev#", "dev?", "dev$"] {
        let c = cert(cn);
        assert_eq!(
            decide(&p, &aws(), &c, Request::publish(&format!("cn/{cn}"))),
            Implicit,
            "{cn}"
        );
    }
    let long = "x".repeat(1025);
    assert_eq!(
        decide(
            &p,
            &aws(),
            &cert(&long),
            Request::publish(&format!("cn/{long}"))
        ),
        Implicit
    );
    let ok = "x".repeat(1024);
    assert_eq!(
        decide(
            &p,
            &aws(),
            &cert(&ok),
            Request::publish(&format!("cn/{ok}"))
        ),
        Allow
    );
}

#[test]
fn names_with_wildcards_cannot_escalate() {
    // fleetcert refuses such thing names (validate_thing_name), but the evaluator must not
    // depend on it: a substituted value is literal text.
    let p = policy(&json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": "arn:aws:iot:*:*:topic/devices/${iot:Connection.Thing.ThingName}/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": "arn:aws:iot:*:*:topicfilter/devices/${iot:Connection.Thing.ThingName}/*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/by-client/${iot:ClientId}"}
    ]}));
    for name in ["*", "+", "#", "?", "dev*", "*/*", "${iot:ClientId}"] {
        let evil = thing(name);
        table(
            &p,
            &[
                (&evil, Request::connect("dev2"), Implicit),
                (&evil, Request::publish("devices/dev2/telemetry"), Implicit),
                (&evil, Request::receive("devices/dev2/telemetry"), Implicit),
                (
                    &evil,
                    Request::subscribe("devices/dev2/telemetry"),
                    Implicit,
                ),
                (&evil, Request::subscribe("devices/dev2/#"), Implicit),
                (&evil, Request::publish("by-client/dev2"), Implicit),
            ],
        );
        // Its own, literal, resources are its own.
        let own = format!("devices/{name}/telemetry");
        table(
            &p,
            &[
                (&evil, Request::connect(name), Allow),
                (&evil, Request::publish(&own), Allow),
            ],
        );
    }
    // A thing named "+" may subscribe to the literal filter "devices/+/x" (as on AWS, where
    // the filter is a string), but every delivery from another device is a Receive on that
    // device's topic, and refused.
    let plus = thing("+");
    table(
        &p,
        &[
            (&plus, Request::subscribe("devices/+/x"), Allow),
            (&plus, Request::receive("devices/dev2/x"), Implicit),
        ],
    );
}

#[test]
fn conditions_on_thing_and_client_keys() {
    let attached = thing("dev1");
    let stranger = client("dev1");
    let cases: Vec<(Value, bool, bool)> = vec![
        // (condition, holds for the attached thing, holds for the unattached client)
        (
            json!({"Bool": {"iot:Connection.Thing.IsAttached": "true"}}),
            true,
            false,
        ),
        (
            json!({"Bool": {"iot:Connection.Thing.IsAttached": true}}),
            true,
            false,
        ),
        (
            json!({"Bool": {"iot:Connection.Thing.IsAttached": "TRUE"}}),
            true,
            false,
        ),
        (
            json!({"Bool": {"iot:Connection.Thing.IsAttached": "false"}}),
            false,
            true,
        ),
        (
            json!({"StringEquals": {"iot:ClientId": "dev1"}}),
            true,
            true,
        ),
        (
            json!({"StringEquals": {"IOT:CLIENTID": "dev1"}}),
            true,
            true,
        ),
        (
            json!({"StringEquals": {"iot:ClientId": ["a", "dev1"]}}),
            true,
            true,
        ),
        (
            json!({"StringEquals": {"iot:ClientId": "DEV1"}}),
            false,
            false,
        ),
        (
            json!({"StringEqualsIgnoreCase": {"iot:ClientId": "DEV1"}}),
            true,
            true,
        ),
        (
            json!({"StringNotEquals": {"iot:ClientId": ["a", "b"]}}),
            true,
            true,
        ),
        (
            json!({"StringNotEquals": {"iot:ClientId": ["a", "dev1"]}}),
            false,
            false,
        ),
        (
            json!({"StringNotEqualsIgnoreCase": {"iot:ClientId": "DEV1"}}),
            false,
            false,
        ),
        (json!({"StringLike": {"iot:ClientId": "dev*"}}), true, true),
        (json!({"StringLike": {"iot:ClientId": "d?v1"}}), true, true),
        (json!({"StringLike": {"iot:ClientId": "x*"}}), false, false),
        (json!({"StringNotLike": {"iot:ClientId": "x*"}}), true, true),
        (
            json!({"StringNotLike": {"iot:ClientId": "dev*"}}),
            false,
            false,
        ),
        // Variables in values: the client ID must equal the thing name.
        (
            json!({"StringEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}}),
            true,
            false,
        ),
        // A missing key: positive operators fail, negated ones hold, IfExists holds.
        (
            json!({"StringEquals": {"iot:Connection.Thing.ThingTypeName": "lamp"}}),
            false,
            false,
        ),
        (
            json!({"StringNotEquals": {"iot:Connection.Thing.ThingTypeName": "lamp"}}),
            true,
            true,
        ),
        (
            json!({"StringEqualsIfExists": {"iot:Connection.Thing.ThingTypeName": "lamp"}}),
            true,
            true,
        ),
        (
            json!({"StringEqualsIfExists": {"iot:ClientId": "other"}}),
            false,
            false,
        ),
        (
            json!({"Null": {"iot:Connection.Thing.ThingName": "true"}}),
            false,
            true,
        ),
        (
            json!({"Null": {"iot:Connection.Thing.ThingName": "false"}}),
            true,
            false,
        ),
        // Keys and operators AND together.
        (
            json!({"StringEquals": {"iot:ClientId": "dev1", "iot:Connection.Thing.ThingName": "dev1"}}),
            true,
            false,
        ),
        (
            json!({"StringEquals": {"iot:ClientId": "dev1"}, "Bool": {"iot:Connection.Thing.IsAttached": "true"}}),
            true,
            false,
        ),
    ];
    for (condition, for_thing, for_client) in cases {
        for (ctx, holds) in [(&attached, for_thing), (&stranger, for_client)] {
            let only_allow = policy(&json!({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/guarded", "Condition": condition.clone()}]}));
            assert_eq!(
                decide(&only_allow, &aws(), ctx, Request::publish("guarded")),
                if holds { Allow } else { Implicit },
                "Allow {condition} for {:?}",
                ctx.client_id
            );
            let deny = with_condition("Deny", condition.clone());
            assert_eq!(
                decide(&deny, &aws(), ctx, Request::publish("guarded")),
                if holds { DenyBy(1) } else { Allow },
                "Deny {condition} for {:?}",
                ctx.client_id
            );
        }
    }
}

#[test]
fn unresolved_variables_in_conditions_skip_the_statement() {
    let stranger = client("dev1");
    let condition =
        json!({"StringNotEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}});
    // Neither the Allow nor the Deny applies when the thing name is unknown.
    let deny = with_condition("Deny", condition.clone());
    assert_eq!(
        decide(&deny, &aws(), &stranger, Request::publish("guarded")),
        Allow
    );
    let only_allow = policy(&json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "*", "Condition": condition}]}));
    assert_eq!(
        decide(&only_allow, &aws(), &stranger, Request::publish("x")),
        Implicit
    );
}

#[test]
fn unsupported_conditions_fail_closed() {
    let t = thing("dev1");
    for condition in [
        json!({"NumericLessThan": {"iot:ClientId": "3"}}),
        json!({"DateGreaterThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}}),
        json!({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}),
        json!({"StringEqualz": {"iot:ClientId": "dev1"}}),
        // A known operator on a key the broker does not know.
        json!({"StringEquals": {"aws:SourceIp": "10.0.0.1"}}),
        json!({"StringNotEquals": {"iot:Connection.Thing.Color": "red"}}),
    ] {
        // An Allow we cannot decide never allows…
        let only_allow = policy(&json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Publish", "Resource": "*", "Condition": condition.clone()}]}));
        assert_eq!(
            decide(&only_allow, &aws(), &t, Request::publish("x")),
            Implicit,
            "{condition}"
        );
        assert_eq!(only_allow.notes().len(), 1, "{condition}");
        assert!(only_allow.notes()[0].to_string().contains("never applies"));
        // …and a Deny we cannot decide always denies (where its actions and resources match).
        let deny = with_condition("Deny", condition.clone());
        assert_eq!(
            decide(&deny, &aws(), &t, Request::publish("guarded")),
            DenyBy(1),
            "{condition}"
        );
        assert_eq!(
            decide(&deny, &aws(), &t, Request::publish("other")),
            Allow,
            "{condition}"
        );
        assert!(deny.notes()[0].to_string().contains("statement 1"));
    }
}

#[test]
fn explicit_deny_wins_across_policies() {
    let allow_all = policy(&allow(json!("iot:*"), json!("*")));
    let deny_bar = policy(&json!({"Version": "2012-10-17", "Statement": [
        {"Sid": "a", "Effect": "Allow", "Action": "iot:Publish", "Resource": "*"},
        {"Sid": "no-bar", "Effect": "Deny", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/bar"}]}));
    let t = thing("dev1");
    let r = Request::publish("bar");
    assert_eq!(
        evaluate_policies([&allow_all, &deny_bar], &aws(), &t, &r),
        Decision::Deny {
            reason: DenyReason::ExplicitDeny {
                policy: 1,
                statement: 1
            }
        }
    );
    assert_eq!(deny_bar.sid(1), Some("no-bar"));
    assert_eq!(deny_bar.statement_count(), 2);
    assert!(
        evaluate_policies(
            [&allow_all, &deny_bar],
            &aws(),
            &t,
            &Request::publish("foo")
        )
        .is_allowed()
    );
    assert_eq!(
        evaluate_policies(std::iter::empty::<&Policy>(), &aws(), &t, &r),
        Decision::Deny {
            reason: DenyReason::NoMatchingAllow
        }
    );
    let d = evaluate_policies([&allow_all, &deny_bar], &aws(), &t, &r);
    assert_eq!(
        d.to_string(),
        "denied by statement 1 of policy 1 (explicit deny)"
    );
}

#[test]
fn parse_errors() {
    for (document, needle) in [
        (json!([]), "JSON object"),
        (json!({"Version": "2012-10-17"}), "no Statement"),
        (
            json!({"Statement": [{"Effect": "Maybe", "Action": "iot:*", "Resource": "*"}]}),
            "Effect",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Resource": "*"}]}),
            "no Action",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*", "Condition": {"Bool": "x"}}]}),
            "Condition",
        ),
        (
            json!({"Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*", "Condition": {"Bool": {"k": {"x": 1}}}}]}),
            "values",
        ),
    ] {
        match Policy::parse(&document) {
            Err(PolicyError::Invalid { reason }) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("{document}: {other:?}"),
        }
    }
    assert!(matches!(
        Policy::from_json("{"),
        Err(PolicyError::Json { .. })
    ));
    // A single statement object is fine.
    let p = policy(
        &json!({"Version": "2012-10-17", "Statement": {"Effect": "allow", "Action": "iot:Connect", "Resource": "*"}}),
    );
    assert!(
        p.evaluate(&aws(), &thing("a"), &Request::connect("a"))
            .is_allowed()
    );
    assert_eq!(Action::Subscribe.to_string(), "iot:Subscribe");
}
