//! fleetcert's shipped policies: the built-in default template, the AWS guide's JITP
//! template fixture and the template the end-to-end tests provision with. A device may
//! connect as itself and use its own topics, and nothing of another device.

use super::{Want::*, client, decide, policy, table, thing};
use fleetcert_templates::{
    ArnContext, DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_YAML, Policy, Request, load, params, render,
};
use std::collections::BTreeMap;

fn rendered_policies(name: &str, text: &str, common_name: &str) -> Vec<Policy> {
    let template = load(name, text).unwrap();
    let params: BTreeMap<String, String> = [
        (params::COMMON_NAME, common_name),
        (params::SERIAL_NUMBER, "0001"),
        (params::COUNTRY, "DE"),
        (params::ID, "ab12"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let rendered = render(&template, &params).unwrap();
    rendered
        .policies
        .iter()
        .filter_map(|p| p.document.as_ref())
        .map(policy)
        .collect()
}

#[test]
fn default_template_scopes_a_device_to_itself() {
    let policies = rendered_policies(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_YAML, "dev1");
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert!(p.notes().is_empty(), "{:?}", p.notes());
    let dev1 = thing("dev1");
    table(
        p,
        &[
            (&dev1, Request::connect("dev1"), Allow),
            (&dev1, Request::connect("dev2"), Implicit),
            (&dev1, Request::publish("devices/dev1/telemetry"), Allow),
            (&dev1, Request::publish("devices/dev1/a/b"), Allow),
            (
                &dev1,
                Request::retain_publish("devices/dev1/telemetry"),
                Implicit,
            ),
            (&dev1, Request::receive("devices/dev1/commands"), Allow),
            (&dev1, Request::subscribe("devices/dev1/commands"), Allow),
            (&dev1, Request::subscribe("devices/dev1/#"), Allow),
            (&dev1, Request::subscribe("devices/dev1/+/x"), Allow),
            (&dev1, Request::publish("devices/dev2/telemetry"), Implicit),
            (&dev1, Request::receive("devices/dev2/commands"), Implicit),
            (&dev1, Request::subscribe("devices/dev2/commands"), Implicit),
            (&dev1, Request::subscribe("devices/+/commands"), Implicit),
            (&dev1, Request::subscribe("devices/#"), Implicit),
            (&dev1, Request::subscribe("#"), Implicit),
            (&dev1, Request::publish("devices/dev1"), Implicit),
            (
                &dev1,
                Request::publish("$aws/things/dev1/shadow/update"),
                Implicit,
            ),
            // A certificate not attached to the thing: IsAttached is false, no connect.
            (&client("dev1"), Request::connect("dev1"), Implicit),
        ],
    );
    // The same holds in fleetcert's local deployment.
    let local = ArnContext::new("local", "000000000000");
    assert_eq!(decide(p, &local, &dev1, Request::connect("dev1")), Allow);
    assert_eq!(
        decide(p, &local, &dev1, Request::publish("devices/dev2/telemetry")),
        Implicit
    );
}

#[test]
fn aws_guide_jitp_template_allows_only_its_topic() {
    let text = include_str!("../fixtures/aws-guide-jitp.json");
    let policies = rendered_policies("jitp", text, "dev1");
    let p = &policies[0];
    let dev1 = thing("dev1");
    table(
        p,
        &[
            (&dev1, Request::publish("foo/bar"), Allow),
            (&dev1, Request::publish("foo/baz"), Implicit),
            (&dev1, Request::connect("dev1"), Implicit),
            (&dev1, Request::subscribe("foo/bar"), Implicit),
        ],
    );
    // Pinned to us-east-1 / 123456789012: nothing in another account.
    let other = ArnContext::new("us-east-1", "999999999999");
    assert_eq!(
        decide(p, &other, &dev1, Request::publish("foo/bar")),
        Implicit
    );
}

#[test]
fn end_to_end_sensor_template() {
    // The policy of tests/e2e/templates.rs's second template.
    let text = r#"{
      "Parameters": {"AWS::IoT::Certificate::CommonName": {"Type": "String"}},
      "Resources": {
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}}},
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "sensor",
          "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\": [\"iot:Connect\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}\"] }, { \"Effect\": \"Allow\", \"Action\": [\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:Connection.Thing.ThingName}/*\"] }] }"}}
      }
    }"#;
    let policies = rendered_policies("sensor", text, "s-17");
    let p = &policies[0];
    let s17 = thing("s-17");
    table(
        p,
        &[
            (&s17, Request::connect("s-17"), Allow),
            (&s17, Request::connect("s-18"), Implicit),
            (&s17, Request::publish("sensors/s-17/temp"), Allow),
            (&s17, Request::publish("sensors/s-18/temp"), Implicit),
            (&s17, Request::publish("sensors/s-1/temp"), Implicit),
        ],
    );
}
