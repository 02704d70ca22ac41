//! The policy examples of the AWS IoT Core developer guide (awsdocs/aws-iot-docs,
//! developerguide/pub-sub-policy.md, thing-policy-examples.md, cert-policy-variables.md;
//! the shadow policy of aws-iot-device-sdk-embedded-C's shadow demo), each with allowed and
//! denied requests.

use super::{Want::*, client, policy_text, table, thing};
use fleetcert_templates::{ConnectionContext, DistinguishedName, Request};

const ARN: &str = "arn:aws:iot:us-east-1:123456789012";

fn doc(statements: &str) -> String {
    format!(r#"{{"Version": "2012-10-17", "Statement": [{statements}]}}"#).replace("ARN", ARN)
}

#[test]
fn registered_devices_connect_as_their_thing_and_publish_under_its_name() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Connection.Thing.ThingName}/*"]}"#,
    ));
    let dev1 = thing("dev1");
    table(
        &p,
        &[
            (&dev1, Request::connect("dev1"), Allow),
            (&dev1, Request::connect("dev2"), Implicit),
            (&dev1, Request::publish("dev1/telemetry"), Allow),
            (&dev1, Request::publish("dev1/a/b/c"), Allow),
            (&dev1, Request::publish("dev2/telemetry"), Implicit),
            (&dev1, Request::publish("dev1"), Implicit),
            (&dev1, Request::publish("dev10/telemetry"), Implicit),
            // Only Publish is granted.
            (&dev1, Request::subscribe("dev1/telemetry"), Implicit),
            (&dev1, Request::receive("dev1/telemetry"), Implicit),
            (&dev1, Request::retain_publish("dev1/telemetry"), Implicit),
            // No thing attached: the thing variables do not resolve.
            (&client("dev1"), Request::connect("dev1"), Implicit),
            (
                &client("dev1"),
                Request::publish("dev1/telemetry"),
                Implicit,
            ),
        ],
    );
}

#[test]
fn unregistered_devices_connect_with_listed_client_ids() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/client1", "ARN:client/client2", "ARN:client/client3"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:ClientId}/*"]}"#,
    ));
    let c1 = client("client1");
    table(
        &p,
        &[
            (&c1, Request::connect("client1"), Allow),
            (&client("client3"), Request::connect("client3"), Allow),
            (&client("client4"), Request::connect("client4"), Implicit),
            (&c1, Request::publish("client1/x"), Allow),
            (&c1, Request::publish("client2/x"), Implicit),
        ],
    );
}

#[test]
fn subscribe_to_topic_filters_prefixed_by_the_thing_name() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": ["ARN:topicfilter/${iot:Connection.Thing.ThingName}/room*"]},
           {"Effect": "Allow", "Action": ["iot:Receive"], "Resource": ["ARN:topic/${iot:Connection.Thing.ThingName}/room*"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::subscribe("thing1/room1"), Allow),
            (&t, Request::subscribe("thing1/room2"), Allow),
            // `*` crosses `/`, and `+`/`#` are plain characters of the filter.
            (&t, Request::subscribe("thing1/room/#"), Allow),
            (&t, Request::subscribe("thing1/#"), Implicit),
            (&t, Request::subscribe("thing2/room1"), Implicit),
            (&t, Request::subscribe("+/room1"), Implicit),
            (&t, Request::receive("thing1/room1"), Allow),
            (&t, Request::receive("thing2/room1"), Implicit),
            (&t, Request::publish("thing1/room1"), Implicit),
        ],
    );
}

#[test]
fn topic_filter_with_plus_is_literal() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": ["ARN:topicfilter/some/+/topic"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::subscribe("some/+/topic"), Allow),
            // "Attempts to subscribe to topic filters that match the pattern some/+/topic fail".
            (&t, Request::subscribe("some/x/topic"), Implicit),
            (&t, Request::subscribe("some/#"), Implicit),
            (&t, Request::subscribe("some/+/+"), Implicit),
            // The filter authorizes subscribing, not receiving.
            (&t, Request::receive("some/x/topic"), Implicit),
        ],
    );
}

#[test]
fn subscribe_to_listed_topics_only() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": ["ARN:topicfilter/my/topic", "ARN:topicfilter/my/othertopic"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::subscribe("my/topic"), Allow),
            (&t, Request::subscribe("my/othertopic"), Allow),
            (&t, Request::subscribe("my/#"), Implicit),
            (&t, Request::subscribe("my/+"), Implicit),
            (&t, Request::subscribe("my/topic/sub"), Implicit),
            (&t, Request::subscribe("My/Topic"), Implicit),
        ],
    );
}

#[test]
fn publish_under_own_prefix_except_one_denied_topic() {
    // "Registered devices (9)" with the thing variable as the guide's other examples spell it.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Connection.Thing.ThingName}/*"]},
           {"Effect": "Deny", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Connection.Thing.ThingName}/bar"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::publish("thing1/foo"), Allow),
            (&t, Request::publish("thing1/bar"), DenyBy(2)),
            (&t, Request::publish("thing1/bar/baz"), Allow),
            (&t, Request::publish("thing2/foo"), Implicit),
            // thing2's /bar is not denied by thing1's policy, just not allowed.
            (&t, Request::publish("thing2/bar"), Implicit),
        ],
    );

    // "Unregistered devices (9)", verbatim.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/client1", "ARN:client/client2"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:ClientId}/*"]},
           {"Effect": "Deny", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:ClientId}/bar"]}"#,
    ));
    let c = client("client2");
    table(
        &p,
        &[
            (&c, Request::connect("client2"), Allow),
            (&c, Request::publish("client2/foo"), Allow),
            (&c, Request::publish("client2/bar"), DenyBy(2)),
            (&c, Request::publish("client1/foo"), Implicit),
        ],
    );
}

#[test]
fn the_guides_iot_thing_thingname_spelling_is_not_a_variable() {
    // "Registered devices (8)/(9)/(10)" write `${iot:Thing.ThingName}`, which is not among the
    // documented thing policy variables: it never resolves, so the statements using it
    // match nothing (neither the Allow nor the Deny), which fails closed for the Allow.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Thing.ThingName}/*"]},
           {"Effect": "Deny", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Thing.ThingName}/bar"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::connect("thing1"), Allow),
            (&t, Request::publish("thing1/foo"), Implicit),
            (&t, Request::publish("thing1/bar"), Implicit),
            (&t, Request::publish("${iot:Thing.ThingName}/foo"), Implicit),
        ],
    );
}

#[test]
fn subscribe_but_no_publish_to_own_bar() {
    // "Registered devices (10)", with the documented thing variable.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": ["ARN:topicfilter/my/topic"]},
           {"Effect": "Deny", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Connection.Thing.ThingName}/bar"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::subscribe("my/topic"), Allow),
            (&t, Request::publish("thing1/bar"), DenyBy(2)),
            (&t, Request::publish("my/topic"), Implicit),
        ],
    );
}

#[test]
fn receive_needs_its_own_grant() {
    // "Registered devices (11)".
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": ["ARN:topicfilter/my/topic"]},
           {"Effect": "Allow", "Action": ["iot:Receive"], "Resource": ["ARN:topic/my/topic"]}"#,
    ));
    let t = thing("thing1");
    table(
        &p,
        &[
            (&t, Request::subscribe("my/topic"), Allow),
            (&t, Request::receive("my/topic"), Allow),
            (&t, Request::receive("my/other"), Implicit),
            (&t, Request::publish("my/topic"), Implicit),
        ],
    );
}

#[test]
fn monitoring_topic_for_a_fixed_client() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/client1"]},
           {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": ["ARN:topic/iotmonitor/provisioning/987654321098"]},
           {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": ["ARN:topicfilter/iotmonitor/provisioning/987654321098"]}"#,
    ));
    let c = client("client1");
    table(
        &p,
        &[
            (
                &c,
                Request::publish("iotmonitor/provisioning/987654321098"),
                Allow,
            ),
            (
                &c,
                Request::receive("iotmonitor/provisioning/987654321098"),
                Allow,
            ),
            (
                &c,
                Request::subscribe("iotmonitor/provisioning/987654321098"),
                Allow,
            ),
            (
                &c,
                Request::subscribe("iotmonitor/provisioning/+"),
                Implicit,
            ),
            (
                &c,
                Request::publish("iotmonitor/provisioning/000000000000"),
                Implicit,
            ),
        ],
    );
}

#[test]
fn thing_policy_examples() {
    // Connect if the certificate is attached to the thing.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["*"],
            "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": ["true"]}}}"#,
    ));
    table(
        &p,
        &[
            (&thing("dev1"), Request::connect("dev1"), Allow),
            (&client("dev1"), Request::connect("dev1"), Implicit),
        ],
    );

    // Publish if the thing has a type and an attribute value, and is attached.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Publish"], "Resource": "ARN:topic/device/stats",
            "Condition": {
              "StringEquals": {"iot:Connection.Thing.Attributes[attributeName]": "attributeValue",
                               "iot:Connection.Thing.ThingTypeName": "Thing_Type_Name"},
              "Bool": {"iot:Connection.Thing.IsAttached": "true"}}}"#,
    ));
    let with = |attribute: &str, thing_type: Option<&str>| {
        let mut ctx = thing("dev1");
        let t = ctx.thing.as_mut().unwrap();
        t.attributes
            .insert("attributeName".into(), attribute.into());
        t.thing_type_name = thing_type.map(str::to_owned);
        ctx
    };
    let good = with("attributeValue", Some("Thing_Type_Name"));
    let other_value = with("other", Some("Thing_Type_Name"));
    let no_type = with("attributeValue", None);
    let other_case = with("AttributeValue", Some("Thing_Type_Name"));
    table(
        &p,
        &[
            (&good, Request::publish("device/stats"), Allow),
            (&good, Request::publish("device/other"), Implicit),
            (&other_value, Request::publish("device/stats"), Implicit),
            (&other_case, Request::publish("device/stats"), Implicit),
            (&no_type, Request::publish("device/stats"), Implicit),
            (&client("dev1"), Request::publish("device/stats"), Implicit),
        ],
    );

    // Publish to a topic that starts with an attribute of the thing; unresolved without it.
    let p = policy_text(&doc(r#"{"Effect": "Allow", "Action": ["iot:Publish"],
            "Resource": "ARN:topic/${iot:Connection.Thing.Attributes[attributeName]}/*"}"#));
    table(
        &p,
        &[
            (&good, Request::publish("attributeValue/x"), Allow),
            (&good, Request::publish("other/x"), Implicit),
            (
                &thing("dev1"),
                Request::publish("attributeValue/x"),
                Implicit,
            ),
            (&thing("dev1"), Request::publish("/x"), Implicit),
        ],
    );
}

fn organizations(values: &[&str]) -> ConnectionContext {
    let mut ctx = thing("dev1");
    ctx.certificate.as_mut().unwrap().subject = DistinguishedName {
        organization: values.iter().map(|v| (*v).to_owned()).collect(),
        common_name: vec!["dev1".into()],
        ..Default::default()
    };
    ctx
}

#[test]
fn certificate_organization_list_condition() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Connection.Thing.ThingName}"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/my/topic/${iot:Connection.Thing.ThingName}"],
            "Condition": {"ForAllValues:StringEquals": {"iot:Certificate.Subject.Organization.List": ["Example Corp", "AnyCompany"]}}}"#,
    ));
    let example = organizations(&["Example Corp"]);
    let both = organizations(&["AnyCompany", "Example Corp"]);
    let mixed = organizations(&["Example Corp", "Evil Inc"]);
    let none = organizations(&[]);
    table(
        &p,
        &[
            (&example, Request::publish("my/topic/dev1"), Allow),
            (&both, Request::publish("my/topic/dev1"), Allow),
            (&mixed, Request::publish("my/topic/dev1"), Implicit),
            (&example, Request::publish("my/topic/dev2"), Implicit),
            // IAM: ForAllValues over a key that is absent holds (vacuous truth).
            (&none, Request::publish("my/topic/dev1"), Allow),
        ],
    );
    // ForAnyValue: one listed organization is enough, none is not.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/t"],
            "Condition": {"ForAnyValue:StringEquals": {"iot:Certificate.Subject.Organization.List": ["Example Corp"]}}}"#,
    ));
    table(
        &p,
        &[
            (&mixed, Request::publish("t"), Allow),
            (
                &organizations(&["Evil Inc"]),
                Request::publish("t"),
                Implicit,
            ),
            (&none, Request::publish("t"), Implicit),
        ],
    );
}

#[test]
fn shadow_topics_of_the_own_thing() {
    // The shape of the SDK shadow demo's policy, with the region and account of the guide.
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": "iot:Connect", "Resource": "ARN:client/${iot:Connection.Thing.ThingName}"},
           {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
              "ARN:topicfilter/$aws/things/${iot:Connection.Thing.ThingName}/shadow/update/accepted",
              "ARN:topicfilter/$aws/things/${iot:Connection.Thing.ThingName}/shadow/update/rejected",
              "ARN:topicfilter/$aws/things/${iot:Connection.Thing.ThingName}/shadow/update/delta"]},
           {"Effect": "Allow", "Action": ["iot:Receive", "iot:Publish"], "Resource": [
              "ARN:topic/$aws/things/${iot:Connection.Thing.ThingName}/shadow/*"]},
           {"Effect": "Allow", "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow"],
            "Resource": "ARN:thing/${iot:Connection.Thing.ThingName}"}"#,
    ));
    let t = thing("lamp1");
    table(
        &p,
        &[
            (&t, Request::connect("lamp1"), Allow),
            (
                &t,
                Request::subscribe("$aws/things/lamp1/shadow/update/accepted"),
                Allow,
            ),
            (
                &t,
                Request::subscribe("$aws/things/lamp1/shadow/update/delta"),
                Allow,
            ),
            (
                &t,
                Request::subscribe("$aws/things/lamp1/shadow/#"),
                Implicit,
            ),
            (
                &t,
                Request::subscribe("$aws/things/lamp2/shadow/update/accepted"),
                Implicit,
            ),
            (
                &t,
                Request::subscribe("$aws/things/+/shadow/update/accepted"),
                Implicit,
            ),
            (
                &t,
                Request::publish("$aws/things/lamp1/shadow/update"),
                Allow,
            ),
            (
                &t,
                Request::publish("$aws/things/lamp1/shadow/name/ui/get"),
                Allow,
            ),
            (
                &t,
                Request::publish("$aws/things/lamp2/shadow/update"),
                Implicit,
            ),
            (
                &t,
                Request::receive("$aws/things/lamp1/shadow/update/accepted"),
                Allow,
            ),
            (
                &t,
                Request::receive("$aws/things/lamp2/shadow/update/accepted"),
                Implicit,
            ),
            (
                &t,
                Request::new(fleetcert_templates::Action::GetThingShadow, "lamp1"),
                Allow,
            ),
            (
                &t,
                Request::new(fleetcert_templates::Action::GetThingShadow, "lamp2"),
                Implicit,
            ),
            (
                &t,
                Request::new(fleetcert_templates::Action::DeleteThingShadow, "lamp1"),
                Implicit,
            ),
        ],
    );
}

#[test]
fn certificate_common_name_variable() {
    let p = policy_text(&doc(
        r#"{"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["ARN:client/${iot:Certificate.Subject.CommonName}"]},
           {"Effect": "Allow", "Action": ["iot:Publish"], "Resource": ["ARN:topic/${iot:Certificate.Subject.CommonName}/*"]}"#,
    ));
    let t = thing("dev1");
    table(
        &p,
        &[
            (&t, Request::connect("dev1"), Allow),
            (&t, Request::connect("dev2"), Implicit),
            (&t, Request::publish("dev1/x"), Allow),
            (&t, Request::publish("dev2/x"), Implicit),
            // No certificate in the context: unresolved.
            (&client("dev1"), Request::publish("dev1/x"), Implicit),
        ],
    );
}
