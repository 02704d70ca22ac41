use crate::util::*;

const PERMISSIVE: &str = r#"{
  "Parameters": { "AWS::IoT::Certificate::CommonName": { "Type": "String" } },
  "Resources": {
    "thing": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": { "Ref": "AWS::IoT::Certificate::CommonName" } } },
    "policy": { "Type": "AWS::IoT::Policy", "Properties": {
      "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\": [\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/*\"] }] }"
    } }
  }
}"#;

/// AWS's JITP example shape: escaped-JSON policy, scoped by the thing name.
const SCOPED: &str = r#"{
  "Parameters": {
    "AWS::IoT::Certificate::CommonName": { "Type": "String" },
    "AWS::IoT::Certificate::Country": { "Type": "String", "Default": "US" },
    "AWS::IoT::Certificate::Id": { "Type": "String" }
  },
  "Resources": {
    "thing": { "Type": "AWS::IoT::Thing", "Properties": {
      "ThingName": { "Ref": "AWS::IoT::Certificate::CommonName" },
      "AttributePayload": { "version": "v1", "country": { "Ref": "AWS::IoT::Certificate::Country" } }
    } },
    "certificate": { "Type": "AWS::IoT::Certificate", "Properties": {
      "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "Active"
    } },
    "policy": { "Type": "AWS::IoT::Policy", "Properties": {
      "PolicyName": "sensor-policy",
      "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\": [\"iot:Connect\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}\"] }, { \"Effect\": \"Allow\", \"Action\": [\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:Connection.Thing.ThingName}/*\"] }] }"
    } }
  }
}"#;

#[test]
fn lint_flags_overly_permissive_policies_with_the_reason_code() {
    let env = Env::new();
    let bad = env.path("wide.json");
    let good = env.path("scoped.json");
    std::fs::write(&bad, PERMISSIVE).unwrap();
    std::fs::write(&good, SCOPED).unwrap();
    env.ok(&["templates", "lint", good.to_str().unwrap()]);
    let out = env.run(&[
        "templates",
        "lint",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS"),
        "{text}"
    );
    assert!(text.contains("topic/*"), "{text}");
    let broken = env.path("broken.yaml");
    std::fs::write(&broken, "Resources: {thing: {Type: AWS::IoT::Gadget}}").unwrap();
    let err = env.fails(&["templates", "lint", broken.to_str().unwrap()], 2);
    assert!(err.contains("AWS::IoT::Gadget"), "{err}");
}

#[test]
fn provision_refuses_a_permissive_template_unless_told() {
    let env = Env::new();
    env.init_ca();
    let dir = env.data_dir().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("wide.json"), PERMISSIVE).unwrap();
    std::fs::write(dir.join("sensor.json"), SCOPED).unwrap();
    let err = env.fails(
        &["provision", "d1", "--template", "wide", "--out", "out"],
        2,
    );
    assert!(
        err.contains("ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS"),
        "{err}"
    );
    assert!(env.certs().is_empty());
    env.ok(&[
        "provision",
        "d1",
        "--template",
        "wide",
        "--allow-overly-permissive",
        "--out",
        "out",
    ]);
    env.ok(&["provision", "d2", "--template", "sensor", "--out", "out"]);
    let list = env.json(&["templates", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "sensor", "wide"]);
}
