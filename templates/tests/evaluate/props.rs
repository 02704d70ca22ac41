//! Property tests: an explicit deny always wins and the decision composes statement by
//! statement; parsing and evaluating never panic, whatever the document and the request.

use fleetcert_templates::{
    Action, ArnContext, CertificateContext, ConnectionContext, Decision, DenyReason,
    DistinguishedName, Policy, Request, ThingContext, evaluate_policies,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn action_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "iot:Connect",
            "iot:Publish",
            "iot:Subscribe",
            "iot:Receive",
            "iot:RetainPublish",
            "iot:GetThingShadow",
            "iot:*",
            "iot:Pub*",
            "IOT:PUBLISH",
            "*",
            "iot:?eceive",
            "s3:GetObject",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z:*?]{0,14}",
    ]
}

fn resource_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "*",
            "arn:aws:iot:*:*:*",
            "arn:aws:iot:*:*:topic/a/*",
            "arn:aws:iot:*:*:topic/${iot:ClientId}/*",
            "arn:aws:iot:*:*:topic/${iot:Connection.Thing.ThingName}",
            "arn:aws:iot:*:*:topicfilter/a/+",
            "arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.ThingName}/#",
            "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}",
            "arn:aws:iot:local:*:client/*",
            "arn:aws:iot:*:*:topic/${iot:Connection.Thing.Attributes[x]}",
            "arn:aws:iot:*:*:topic/${iot:Certificate.Subject.CommonName}?",
            "arn:aws:iot:*:*:thing/${iot:Connection.Thing.ThingName}",
            "arn:aws:iot:*:*:topic/?",
            "arn:aws:iot:*",
        ])
        .prop_map(str::to_owned),
        "arn:aws:iot:[a-z*]{0,3}:[0-9*]{0,3}:(client|topic|topicfilter|thing)/[a-z*?/+#$]{0,8}",
        "[a-z*?/+#:${}.]{0,16}",
    ]
}

fn condition() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(json!({"Bool": {"iot:Connection.Thing.IsAttached": "true"}}))),
        1 => Just(Some(json!({"StringLike": {"iot:ClientId": "a*"}}))),
        1 => Just(Some(json!({"StringNotEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}}))),
        1 => Just(Some(json!({"ForAnyValue:StringEquals": {"iot:Certificate.Subject.Organization.List": ["O1"]}}))),
        1 => Just(Some(json!({"NumericLessThan": {"iot:ClientId": "3"}}))),
        1 => Just(Some(json!({"StringEqualsIfExists": {"aws:SourceIp": "x"}}))),
        1 => ("[a-zA-Z:]{0,20}", "[a-zA-Z:.\\[\\]]{0,30}", "[a-z*?${}]{0,8}")
            .prop_map(|(op, key, value)| Some(json!({op: {key: value}}))),
    ]
}

fn statement() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(action_pattern(), 1..3),
        any::<bool>(),
        prop::collection::vec(resource_pattern(), 1..3),
        condition(),
    )
        .prop_map(
            |(deny, not_action, actions, not_resource, resources, condition)| {
                let mut s = Map::new();
                s.insert("Effect".into(), json!(if deny { "Deny" } else { "Allow" }));
                s.insert(
                    if not_action { "NotAction" } else { "Action" }.into(),
                    json!(actions),
                );
                s.insert(
                    if not_resource {
                        "NotResource"
                    } else {
                        "Resource"
                    }
                    .into(),
                    json!(resources),
                );
                if let Some(c) = condition {
                    s.insert("Condition".into(), c);
                }
                Value::Object(s)
            },
        )
}

fn document(statements: &[Value]) -> Value {
    json!({"Version": "2012-10-17", "Statement": statements})
}

fn context() -> impl Strategy<Value = ConnectionContext> {
    (
        prop::sample::select(vec!["a1", "dev1", "*", "+", "#", "a*", ""]),
        prop::option::of((
            prop::sample::select(vec!["dev1", "a1", "*", "x/y"]),
            prop::option::of("[a-z*]{0,3}"),
        )),
        prop::option::of(prop::collection::vec(
            prop::sample::select(vec!["O1", "O2", "*"]),
            0..3,
        )),
    )
        .prop_map(|(client_id, thing, orgs)| ConnectionContext {
            client_id: client_id.to_owned(),
            thing: thing.map(|(name, attribute)| ThingContext {
                name: name.to_owned(),
                thing_type_name: None,
                attributes: attribute.map(|a| ("x".to_owned(), a)).into_iter().collect(),
            }),
            certificate: orgs.map(|orgs| CertificateContext {
                subject: DistinguishedName {
                    common_name: vec![client_id.to_owned()],
                    organization: orgs.into_iter().map(str::to_owned).collect(),
                    ..Default::default()
                },
                ..Default::default()
            }),
        })
}

fn action() -> impl Strategy<Value = Action> {
    prop::sample::select(Action::ALL.to_vec())
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["a/b", "a1/x", "dev1", "a/+", "?", "*", "dev1/#", ""])
            .prop_map(str::to_owned),
        "[a-z0-9/+#*?$:]{0,10}",
    ]
}

fn arn() -> impl Strategy<Value = ArnContext> {
    prop::sample::select(vec![
        ArnContext::new("us-east-1", "123456789012"),
        ArnContext::new("local", "000000000000"),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The decision of a policy is: the first Deny statement that denies on its own, else
    /// Allow if some Allow statement allows on its own, else no matching allow. In
    /// particular an explicit deny always wins, wherever it is.
    #[test]
    fn deny_wins_and_statements_compose(
        statements in prop::collection::vec(statement(), 1..6),
        ctx in context(),
        action in action(),
        name in name(),
        arn in arn(),
    ) {
        let request = Request::new(action, &name);
        let whole = Policy::parse(&document(&statements)).unwrap();
        let mut first_deny = None;
        let mut some_allow = false;
        for (i, s) in statements.iter().enumerate() {
            let alone = Policy::parse(&document(std::slice::from_ref(s))).unwrap();
            match alone.evaluate(&arn, &ctx, &request) {
                Decision::Deny { reason: DenyReason::ExplicitDeny { statement: 0, .. } } => {
                    first_deny.get_or_insert(i);
                }
                Decision::Allow => some_allow = true,
                _ => {}
            }
        }
        let expected = match first_deny {
            Some(statement) => Decision::Deny {
                reason: DenyReason::ExplicitDeny { policy: 0, statement },
            },
            None if some_allow => Decision::Allow,
            None => Decision::Deny { reason: DenyReason::NoMatchingAllow },
        };
        prop_assert_eq!(whole.evaluate(&arn, &ctx, &request), expected);
    }

    /// Adding a policy never turns an explicit deny into an allow, and a deny from any of
    /// several policies is a deny of all of them.
    #[test]
    fn deny_wins_across_policies(
        a in prop::collection::vec(statement(), 1..4),
        b in prop::collection::vec(statement(), 1..4),
        ctx in context(),
        action in action(),
        name in name(),
    ) {
        let arn = ArnContext::new("us-east-1", "123456789012");
        let request = Request::new(action, &name);
        let pa = Policy::parse(&document(&a)).unwrap();
        let pb = Policy::parse(&document(&b)).unwrap();
        let da = pa.evaluate(&arn, &ctx, &request);
        let db = pb.evaluate(&arn, &ctx, &request);
        let both = evaluate_policies([&pa, &pb], &arn, &ctx, &request);
        let explicit = |d: Decision| matches!(d, Decision::Deny { reason: DenyReason::ExplicitDeny { .. } });
        if explicit(da) || explicit(db) {
            prop_assert!(explicit(both), "{:?} {:?} -> {:?}", da, db, both);
        } else if da.is_allowed() || db.is_allowed() {
            prop_assert!(both.is_allowed());
        } else {
            prop_assert_eq!(both, Decision::Deny { reason: DenyReason::NoMatchingAllow });
        }
    }

    /// Whatever the structured-but-random policy and request: no panic.
    #[test]
    fn never_panics_on_random_statements(
        statements in prop::collection::vec(statement(), 0..5),
        ctx in context(),
        action in action(),
        name in ".{0,40}",
        region in ".{0,6}",
    ) {
        if let Ok(p) = Policy::parse(&document(&statements)) {
            let arn = ArnContext::new(region, "1");
            let _ = p.evaluate(&arn, &ctx, &Request::new(action, &name));
            let _ = p.notes();
        }
    }

    /// Arbitrary JSON, shaped a little like a policy: parsing and evaluating never panic.
    #[test]
    fn never_panics_on_arbitrary_documents(doc in arbitrary_json(), name in ".{0,20}") {
        if let Ok(p) = Policy::parse(&doc) {
            let ctx = ConnectionContext { client_id: name.clone(), ..Default::default() };
            for action in Action::ALL {
                let _ = p.evaluate(&ArnContext::new("r", "a"), &ctx, &Request::new(action, &name));
            }
        }
        let _ = Policy::from_json(&doc.to_string());
    }
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let words = prop::sample::select(vec![
        "Version",
        "Statement",
        "Effect",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
        "Sid",
        "Allow",
        "Deny",
        "StringLike",
        "ForAllValues:StringEquals",
        "Bool",
        "Null",
        "iot:ClientId",
        "iot:Certificate.Subject.Country.List",
        "2012-10-17",
        "*",
        "${iot:ClientId}",
        "arn:aws:iot:*:*:topic/*",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        words.clone().prop_map(|w| json!(w)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![words.clone().prop_map(str::to_owned), ".{0,6}"],
                    inner
                ),
                0..5
            )
            .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}
