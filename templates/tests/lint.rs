//! The least-privilege lint (Device Defender IOT_POLICY_OVERLY_PERMISSIVE_CHECK).

use fleetcert_templates::{
    DEFAULT_TEMPLATE_YAML, Finding, LintRule, REASON_BROAD_DATA_PLANE, Template, TemplateError,
    check_syntax, lint_policy, lint_template, load,
};
use serde_json::{Value, json};

/// AWS IoT policy evaluation (a module of this binary, so the crate keeps its test binaries).
mod evaluate;

fn statement(action: Value, resource: Value) -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": resource}]})
}

fn rules(doc: &Value) -> Vec<LintRule> {
    lint_policy(doc).into_iter().map(|f| f.rule).collect()
}

fn one(doc: &Value) -> Finding {
    let findings = lint_policy(doc);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    findings.into_iter().next().unwrap()
}

const ARN: &str = "arn:aws:iot:us-east-1:123456789012";

#[test]
fn all_iot_actions_are_flagged() {
    for action in ["iot:*", "*", "IoT:*"] {
        let f = one(&statement(
            json!(action),
            json!("arn:aws:iot:*:*:topic/devices/${iot:Connection.Thing.ThingName}"),
        ));
        assert_eq!(f.rule, LintRule::AllActions, "{action}");
        assert_eq!(f.actions, [action]);
        assert_eq!(f.reason_code, REASON_BROAD_DATA_PLANE);
    }
    // In a list with other actions, on several resources: one finding per resource.
    let findings = lint_policy(&statement(
        json!(["iot:Connect", "iot:*"]),
        json!(["arn:aws:iot:*:*:client/a", "arn:aws:iot:*:*:topic/a"]),
    ));
    assert_eq!(findings.len(), 2);
    assert!(findings.iter().all(|f| f.rule == LintRule::AllActions));
}

#[test]
fn catch_all_resources_are_flagged() {
    for resource in [
        "*",
        "arn:aws:iot:*:*:*",
        &format!("{ARN}:*"),
        "arn:aws:iot:*",
    ] {
        let f = one(&statement(
            json!(["iot:Publish", "iot:Subscribe"]),
            json!(resource),
        ));
        assert_eq!(f.rule, LintRule::AllResources, "{resource}");
        assert_eq!(f.actions, ["iot:Publish", "iot:Subscribe"]);
        assert_eq!(f.resource, resource);
    }
    // Control-plane actions are not this check's business.
    assert!(lint_policy(&statement(json!("iot:DescribeEndpoint"), json!("*"))).is_empty());
    // Other services' ARNs are not IoT resources.
    assert!(
        lint_policy(&statement(
            json!("iot:Publish"),
            json!("arn:aws:s3:::bucket/*")
        ))
        .is_empty()
    );
}

#[test]
fn connect_on_any_client_is_flagged() {
    for resource in [
        format!("{ARN}:client/*"),
        "arn:aws:iot:*:*:client/*".to_owned(),
        "arn:aws:iot:*:*:client/sensor-*".to_owned(),
        // A wildcard straight after the thing name reaches dev1 -> dev10.
        "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}*".to_owned(),
    ] {
        let f = one(&statement(json!("iot:Connect"), json!(resource)));
        assert_eq!(f.rule, LintRule::ConnectAnyClient, "{resource}");
        assert_eq!(f.actions, ["iot:Connect"]);
    }
}

#[test]
fn connect_on_client_id_needs_is_attached() {
    let resource = json!(format!("{ARN}:client/${{iot:ClientId}}"));
    let f = one(&statement(json!("iot:Connect"), resource.clone()));
    assert_eq!(f.rule, LintRule::ConnectClientIdWithoutIsAttached);
    assert!(f.explanation.contains("iot:Connection.Thing.IsAttached"));

    let with = |condition: Value| {
        json!({"Statement": [{"Effect": "Allow", "Action": "iot:Connect",
            "Resource": resource, "Condition": condition}]})
    };
    for accepted in [
        json!({"Bool": {"iot:Connection.Thing.IsAttached": "true"}}),
        json!({"Bool": {"iot:Connection.Thing.IsAttached": true}}),
        json!({"Bool": {"iot:Connection.Thing.IsAttached": ["true"]}}),
        json!({"StringEquals": {"iot:Connection.Thing.IsAttached": "true"}}),
    ] {
        assert!(
            lint_policy(&with(accepted.clone())).is_empty(),
            "{accepted}"
        );
    }
    for refused in [
        json!({"Bool": {"iot:Connection.Thing.IsAttached": "false"}}),
        json!({"BoolIfExists": {"iot:Connection.Thing.IsAttached": "true"}}),
        json!({"Bool": {"iot:Connection.Thing.IsAttached": ["true", "false"]}}),
        json!({"StringEquals": {"iot:ClientId": "x"}}),
    ] {
        assert_eq!(
            rules(&with(refused.clone())),
            [LintRule::ConnectClientIdWithoutIsAttached],
            "{refused}"
        );
    }
    // IsAttached does not make client/* acceptable.
    let doc = json!({"Statement": [{"Effect": "Allow", "Action": "iot:Connect",
        "Resource": "arn:aws:iot:*:*:client/*",
        "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}}]});
    assert_eq!(rules(&doc), [LintRule::ConnectAnyClient]);
}

#[test]
fn publish_and_subscribe_catch_alls_are_flagged() {
    for (action, resource) in [
        ("iot:Publish", "arn:aws:iot:*:*:topic/*"),
        ("iot:Publish", "arn:aws:iot:*:*:topic/#"),
        ("iot:Receive", "arn:aws:iot:*:*:topic/*"),
        ("iot:Subscribe", "arn:aws:iot:*:*:topicfilter/*"),
        ("iot:Subscribe", "arn:aws:iot:*:*:topicfilter/#"),
        ("iot:Subscribe", "arn:aws:iot:*:*:topicfilter/+"),
    ] {
        let f = one(&statement(json!(action), json!(resource)));
        assert_eq!(f.rule, LintRule::AllTopics, "{action} {resource}");
        assert_eq!(f.actions, [action]);
    }
    // Actions are case-insensitive, as in AWS.
    let f = one(&statement(
        json!("IOT:PUBLISH"),
        json!("arn:aws:iot:*:*:topic/*"),
    ));
    assert_eq!(f.actions, ["iot:Publish"]);
}

#[test]
fn other_things_reserved_topics_are_flagged() {
    for (action, resource) in [
        ("iot:Subscribe", format!("{ARN}:topicfilter/$aws/things/*")),
        ("iot:Subscribe", format!("{ARN}:topicfilter/$aws/things/#")),
        (
            "iot:Subscribe",
            format!("{ARN}:topicfilter/$aws/things/+/shadow/update"),
        ),
        (
            "iot:Publish",
            format!("{ARN}:topic/$aws/things/*/shadow/update"),
        ),
        ("iot:Publish", format!("{ARN}:topic/$aws/things/*")),
        ("iot:Publish", format!("{ARN}:topic/$aws/*")),
        (
            "iot:Receive",
            format!("{ARN}:topic/$aws/things/*/jobs/notify"),
        ),
    ] {
        let f = one(&statement(json!(action), json!(resource)));
        assert_eq!(
            f.rule,
            LintRule::OtherThingsReservedTopics,
            "{action} {resource}"
        );
    }
    // Device Defender: Receive on a topicfilter ARN grants nothing (Receive is checked
    // against topic ARNs), so it is compliant.
    assert!(
        lint_policy(&statement(
            json!("iot:Receive"),
            json!(format!("{ARN}:topicfilter/$aws/things/*"))
        ))
        .is_empty()
    );
}

#[test]
fn shadow_and_job_actions_on_every_thing_are_flagged() {
    for action in [
        "iot:GetThingShadow",
        "iot:UpdateThingShadow",
        "iot:DeleteThingShadow",
        "iot:DescribeJobExecution",
        "iot:GetPendingJobExecutions",
        "iot:StartNextPendingJobExecution",
        "iot:UpdateJobExecution",
    ] {
        let f = one(&statement(json!(action), json!(format!("{ARN}:thing/*"))));
        assert_eq!(f.rule, LintRule::OtherThingsShadowsOrJobs, "{action}");
        assert_eq!(f.actions, [action]);
    }
    // Action wildcards expand to the actions they cover.
    let f = one(&statement(
        json!("iot:*ThingShadow"),
        json!("arn:aws:iot:*:*:thing/*"),
    ));
    assert_eq!(
        f.actions,
        [
            "iot:GetThingShadow",
            "iot:UpdateThingShadow",
            "iot:DeleteThingShadow"
        ]
    );
    // Named things are fine (Device Defender's compliant example).
    assert!(
        lint_policy(&statement(
            json!(["iot:GetThingShadow", "iot:UpdateJobExecution"]),
            json!([
                format!("{ARN}:thing/MyThing1"),
                format!("{ARN}:thing/MyThing2")
            ])
        ))
        .is_empty()
    );
}

#[test]
fn scoped_policies_are_accepted() {
    let typical = json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": format!("{ARN}:client/${{iot:Connection.Thing.ThingName}}")},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive", "iot:RetainPublish"],
             "Resource": [
                format!("{ARN}:topic/devices/${{iot:Connection.Thing.ThingName}}/*"),
                format!("{ARN}:topic/$aws/things/${{iot:Connection.Thing.ThingName}}/shadow/*"),
                format!("{ARN}:topic/$aws/things/${{iot:Connection.Thing.ThingName}}/jobs/*"),
                format!("{ARN}:topic/fleet/broadcast")
             ]},
            {"Sid": "Subscribe", "Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": [
                format!("{ARN}:topicfilter/devices/${{iot:Connection.Thing.ThingName}}/#"),
                format!("{ARN}:topicfilter/$aws/things/${{iot:Connection.Thing.ThingName}}/shadow/+/accepted"),
                format!("{ARN}:topicfilter/$aws/things/${{iot:Connection.Thing.ThingName}}/jobs/*")
             ]},
            {"Effect": "Allow",
             "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow", "iot:DescribeJobExecution",
                        "iot:GetPendingJobExecutions", "iot:StartNextPendingJobExecution",
                        "iot:UpdateJobExecution"],
             "Resource": format!("{ARN}:thing/${{iot:Connection.Thing.ThingName}}")},
            // Publishing on one's own client-id topic once Connect is scoped.
            {"Effect": "Allow", "Action": "iot:Publish",
             "Resource": format!("{ARN}:topic/clients/${{iot:ClientId}}/*")}
        ]
    });
    assert_eq!(lint_policy(&typical), []);
    // The single-statement form (Statement as an object).
    let single = json!({"Statement": {"Effect": "Allow", "Action": "iot:Publish",
        "Resource": "arn:aws:iot:*:*:topic/d/${iot:Connection.Thing.ThingName}/*"}});
    assert_eq!(lint_policy(&single), []);
    // The default template.
    let t = load("default", DEFAULT_TEMPLATE_YAML).unwrap();
    assert!(lint_template(&t).is_empty());
}

#[test]
fn deny_statements_are_not_findings() {
    let doc = json!({"Statement": [
        {"Effect": "Deny", "Action": "iot:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/*"}
    ]});
    let findings = lint_policy(&doc);
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].statement, 2);
}

#[test]
fn not_action_and_not_resource_in_allow_are_broad() {
    let doc = json!({"Statement": [{"Effect": "Allow", "NotAction": "iot:Connect",
        "Resource": "arn:aws:iot:*:*:topic/x"}]});
    assert_eq!(rules(&doc), [LintRule::AllActions]);
    let doc = json!({"Statement": [{"Effect": "Allow", "Action": "iot:Publish",
        "NotResource": "arn:aws:iot:*:*:topic/secret"}]});
    let f = one(&doc);
    assert_eq!(f.rule, LintRule::AllResources);
    assert!(f.resource.starts_with("NotResource"));
}

#[test]
fn findings_display_statement_sid_action_resource_and_reason() {
    let doc = json!({"Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/ok"},
        {"Sid": "AllowAll", "Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/*"}
    ]});
    let f = one(&doc);
    assert_eq!(f.statement, 2);
    assert_eq!(f.sid.as_deref(), Some("AllowAll"));
    let shown = f.to_string();
    assert!(
        shown.starts_with(
            "statement 2 (Sid \"AllowAll\"): iot:Publish on arn:aws:iot:*:*:topic/* — \
             ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS: "
        ),
        "{shown}"
    );
    // Findings serialise for --output json.
    let v = serde_json::to_value(&f).unwrap();
    assert_eq!(v["rule"], "all_topics");
    assert_eq!(v["reason_code"], REASON_BROAD_DATA_PLANE);
}

#[test]
fn overly_permissive_templates_are_refused_when_loaded() {
    let text = r#"{
      "Parameters": {"AWS::IoT::Certificate::CommonName": {"Type": "String"}},
      "Resources": {
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}}},
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {
          "PolicyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Sid\":\"AllowAll\",\"Effect\":\"Allow\",\"Action\":\"iot:*\",\"Resource\":\"*\"}]}"
        }}
      }
    }"#;
    // Parsing alone succeeds, and the findings are available for `templates lint`.
    let t = Template::parse("wide", text).unwrap();
    let findings = lint_template(&t);
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].resource, "policy");
    // Rendering it refuses the rendered policy too, unless the operator admitted it
    // (`--allow-overly-permissive`): then a device with it can register.
    let params: std::collections::BTreeMap<String, String> = [(
        "AWS::IoT::Certificate::CommonName".to_owned(),
        "d1".to_owned(),
    )]
    .into();
    assert!(matches!(
        fleetcert_templates::render(&t, &params),
        Err(TemplateError::OverlyPermissive { .. })
    ));
    let mut admitted = t.clone();
    admitted.allow_overly_permissive = true;
    let rendered = fleetcert_templates::render(&admitted, &params).unwrap();
    assert_eq!(rendered.thing.name, "d1");
    // Loading (and so check_syntax, which callers run on load) refuses it.
    let err = check_syntax("wide", text).unwrap_err();
    assert!(matches!(err, TemplateError::OverlyPermissive { .. }));
    let msg = err.to_string();
    assert!(msg.contains("template \"wide\""), "{msg}");
    assert!(msg.contains("IOT_POLICY_OVERLY_PERMISSIVE_CHECK"), "{msg}");
    assert!(
        msg.contains("resource \"policy\": statement 0 (Sid \"AllowAll\"): iot:* on *"),
        "{msg}"
    );
}
