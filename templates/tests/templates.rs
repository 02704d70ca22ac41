//! Templates as AWS documents them (JITP and fleet provisioning), in JSON and YAML; the
//! intrinsics; rendering; and the errors.

use fleetcert_templates::{
    CertificateFields, CertificateStatus, DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_YAML,
    OverrideAction, Template, TemplateError, certificate_parameters, check_syntax,
    effective_policy, load, params, render,
};
use serde_json::json;
use std::collections::BTreeMap;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn parse(text: &str) -> Template {
    match load("t", text) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    }
}

fn parse_err(text: &str) -> String {
    match Template::parse("t", text) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The JITP example from the AWS IoT developer guide: the policy document is an escaped JSON
// string, "Status": "ACTIVE".

const JITP_JSON: &str = r#"{
   "Parameters":{
      "AWS::IoT::Certificate::CommonName":{ "Type":"String" },
      "AWS::IoT::Certificate::SerialNumber":{ "Type":"String" },
      "AWS::IoT::Certificate::Country":{ "Type":"String" },
      "AWS::IoT::Certificate::Id":{ "Type":"String" }
   },
   "Resources":{
      "thing":{
         "Type":"AWS::IoT::Thing",
         "Properties":{
            "ThingName":{ "Ref":"AWS::IoT::Certificate::CommonName" },
            "AttributePayload":{
               "version":"v1",
               "serialNumber":{ "Ref":"AWS::IoT::Certificate::SerialNumber" }
            },
            "ThingTypeName":"lightBulb-versionA",
            "ThingGroups":[ "v1-lightbulbs", { "Ref":"AWS::IoT::Certificate::Country" } ]
         },
         "OverrideSettings":{
            "AttributePayload":"MERGE",
            "ThingTypeName":"REPLACE",
            "ThingGroups":"DO_NOTHING"
         }
      },
      "certificate":{
         "Type":"AWS::IoT::Certificate",
         "Properties":{
            "CertificateId":{ "Ref":"AWS::IoT::Certificate::Id" },
            "Status":"ACTIVE"
         }
      },
      "policy":{
         "Type":"AWS::IoT::Policy",
         "Properties":{
            "PolicyDocument":"{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\":[\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/foo/bar\"] }] }"
         }
      }
   }
}"#;

const JITP_YAML: &str = r#"
Parameters:
  AWS::IoT::Certificate::CommonName: {Type: String}
  AWS::IoT::Certificate::SerialNumber: {Type: String}
  AWS::IoT::Certificate::Country: {Type: String}
  AWS::IoT::Certificate::Id: {Type: String}
Resources:
  thing:
    Type: AWS::IoT::Thing
    Properties:
      ThingName: {Ref: "AWS::IoT::Certificate::CommonName"}
      AttributePayload:
        version: v1
        serialNumber: {Ref: "AWS::IoT::Certificate::SerialNumber"}
      ThingTypeName: lightBulb-versionA
      ThingGroups:
        - v1-lightbulbs
        - {Ref: "AWS::IoT::Certificate::Country"}
    OverrideSettings:
      AttributePayload: MERGE
      ThingTypeName: REPLACE
      ThingGroups: DO_NOTHING
  certificate:
    Type: AWS::IoT::Certificate
    Properties:
      CertificateId: {Ref: "AWS::IoT::Certificate::Id"}
      Status: ACTIVE
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyDocument: '{ "Version": "2012-10-17", "Statement": [{ "Effect": "Allow", "Action":["iot:Publish"], "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"] }] }'
"#;

fn jitp_params() -> BTreeMap<String, String> {
    certificate_parameters(&CertificateFields {
        common_name: Some("bulb-0001".into()),
        serial_number: Some("SN-77".into()),
        country: Some("US".into()),
        id: Some("ab".repeat(32)),
        ..CertificateFields::default()
    })
}

#[test]
fn jitp_example_json_and_yaml_render_the_same() {
    let json_template = parse(JITP_JSON);
    let yaml_template = parse(JITP_YAML);
    let a = render(&json_template, &jitp_params()).unwrap();
    let b = render(&yaml_template, &jitp_params()).unwrap();
    assert_eq!(a, b);

    assert_eq!(a.thing.logical_id, "thing");
    assert_eq!(a.thing.name, "bulb-0001");
    assert_eq!(a.thing.thing_type.as_deref(), Some("lightBulb-versionA"));
    assert_eq!(
        a.thing.attributes,
        map(&[("version", "v1"), ("serialNumber", "SN-77")])
    );
    assert_eq!(a.thing.groups, ["v1-lightbulbs", "US"]);
    assert_eq!(a.thing.billing_group, None);
    assert_eq!(
        a.thing.override_settings.get("AttributePayload"),
        Some(&OverrideAction::Merge)
    );
    assert_eq!(
        a.thing.override_settings.get("ThingTypeName"),
        Some(&OverrideAction::Replace)
    );
    assert_eq!(
        a.thing.override_settings.get("ThingGroups"),
        Some(&OverrideAction::DoNothing)
    );

    let cert = a.certificate.as_ref().unwrap();
    assert_eq!(
        cert.certificate_id.as_deref(),
        Some("ab".repeat(32).as_str())
    );
    assert_eq!(cert.status, Some(CertificateStatus::Active));

    assert_eq!(a.policies.len(), 1);
    assert_eq!(a.policies[0].name, None);
    assert_eq!(
        a.policies[0].document,
        Some(json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Action": ["iot:Publish"],
                "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]
            }]
        }))
    );
}

#[test]
fn jitp_example_names_the_missing_certificate_field() {
    let t = parse(JITP_JSON);
    let mut p = jitp_params();
    p.remove(params::COUNTRY);
    let err = render(&t, &p).unwrap_err();
    assert!(
        matches!(err, TemplateError::MissingParameter { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("\"AWS::IoT::Certificate::Country\""), "{msg}");
    assert!(
        msg.contains("certificate's subject has no Country"),
        "{msg}"
    );
    assert!(
        msg.contains("resource \"thing\", property ThingGroups"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// The fleet provisioning examples: parameters the device sends, Fn::Join for the thing name,
// OverrideSettings, a PolicyName naming an existing policy, "Status": "Active", Mappings and
// DeviceConfiguration.

const FLEET_JSON: &str = r#"{
  "Parameters": {
    "SerialNumber": { "Type": "String" },
    "DeviceLocation": { "Type": "String", "Default": "Seattle" },
    "AWS::IoT::Certificate::Id": { "Type": "String" }
  },
  "Mappings": {
    "LocationTable": {
      "Seattle": { "LocationUrl": "https://example.aws" }
    }
  },
  "Resources": {
    "certificate": {
      "Properties": {
        "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" },
        "Status": "Active"
      },
      "Type": "AWS::IoT::Certificate"
    },
    "policy": {
      "Properties": { "PolicyName": "MyIotPolicy" },
      "Type": "AWS::IoT::Policy"
    },
    "thing": {
      "OverrideSettings": {
        "AttributePayload": "MERGE",
        "ThingGroups": "DO_NOTHING",
        "ThingTypeName": "REPLACE"
      },
      "Properties": {
        "AttributePayload": {},
        "ThingGroups": [],
        "ThingName": { "Fn::Join": ["", ["ThingPrefix_", { "Ref": "SerialNumber" }]] }
      },
      "Type": "AWS::IoT::Thing"
    }
  },
  "DeviceConfiguration": {
    "FallbackUrl": "https://www.example.com/test-site",
    "LocationUrl": { "Fn::FindInMap": ["LocationTable", { "Ref": "DeviceLocation" }, "LocationUrl"] }
  }
}"#;

const FLEET_YAML: &str = r#"
Parameters:
  SerialNumber: {Type: String}
  DeviceLocation: {Type: String, Default: Seattle}
  AWS::IoT::Certificate::Id: {Type: String}
Mappings:
  LocationTable:
    Seattle: {LocationUrl: "https://example.aws"}
Resources:
  certificate:
    Type: AWS::IoT::Certificate
    Properties:
      CertificateId: !Ref AWS::IoT::Certificate::Id
      Status: Active
  policy:
    Type: AWS::IoT::Policy
    Properties: {PolicyName: MyIotPolicy}
  thing:
    Type: AWS::IoT::Thing
    OverrideSettings: {AttributePayload: MERGE, ThingGroups: DO_NOTHING, ThingTypeName: REPLACE}
    Properties:
      AttributePayload: {}
      ThingGroups: []
      ThingName: !Join ["", [ThingPrefix_, !Ref SerialNumber]]
DeviceConfiguration:
  FallbackUrl: https://www.example.com/test-site
  LocationUrl: !FindInMap [LocationTable, !Ref DeviceLocation, LocationUrl]
"#;

#[test]
fn fleet_provisioning_example_json_and_yaml() {
    let p = map(&[
        ("SerialNumber", "123456"),
        ("AWS::IoT::Certificate::Id", "cafe"),
    ]);
    let a = render(&parse(FLEET_JSON), &p).unwrap();
    let b = render(&parse(FLEET_YAML), &p).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.thing.name, "ThingPrefix_123456");
    assert!(a.thing.attributes.is_empty());
    assert!(a.thing.groups.is_empty());
    assert_eq!(a.thing.override_settings.len(), 3);
    let cert = a.certificate.unwrap();
    assert_eq!(cert.status, Some(CertificateStatus::Active));
    assert_eq!(cert.certificate_id.as_deref(), Some("cafe"));
    assert_eq!(a.policies.len(), 1);
    assert_eq!(a.policies[0].name.as_deref(), Some("MyIotPolicy"));
    assert_eq!(a.policies[0].document, None);
    assert_eq!(
        a.device_configuration["LocationUrl"],
        json!("https://example.aws")
    );
    assert_eq!(
        a.device_configuration["FallbackUrl"],
        json!("https://www.example.com/test-site")
    );
    // A parameter's Default is used when no value comes; a value wins over the Default.
    let mut p2 = p.clone();
    p2.insert("DeviceLocation".into(), "Paris".into());
    let err = render(&parse(FLEET_JSON), &p2).unwrap_err().to_string();
    assert!(err.contains("DeviceConfiguration LocationUrl"), "{err}");
    assert!(err.contains("\"Paris\""), "{err}");
}

#[test]
fn status_is_accepted_in_any_case() {
    for (written, status) in [
        ("ACTIVE", CertificateStatus::Active),
        ("Active", CertificateStatus::Active),
        ("active", CertificateStatus::Active),
        ("INACTIVE", CertificateStatus::Inactive),
        ("Inactive", CertificateStatus::Inactive),
    ] {
        let text = JITP_YAML.replace("Status: ACTIVE", &format!("Status: {written}"));
        let r = render(&parse(&text), &jitp_params()).unwrap();
        assert_eq!(r.certificate.unwrap().status, Some(status), "{written}");
    }
    let text = JITP_YAML.replace("Status: ACTIVE", "Status: REVOKED");
    let err = parse_err(&text);
    assert!(
        err.contains("resource \"certificate\", property Status"),
        "{err}"
    );
}

#[test]
fn status_from_a_parameter_is_normalised_when_rendering() {
    let text = r#"
Parameters:
  S: {Type: String, Default: inactive}
Resources:
  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t1}}
  certificate:
    Type: AWS::IoT::Certificate
    Properties: {CertificatePem: "-----BEGIN CERTIFICATE-----", Status: !Ref S}
"#;
    let t = parse(text);
    let r = render(&t, &BTreeMap::new()).unwrap();
    assert_eq!(
        r.certificate.unwrap().status,
        Some(CertificateStatus::Inactive)
    );
    let err = render(&t, &map(&[("S", "bogus")])).unwrap_err().to_string();
    assert!(
        err.contains("resource \"certificate\", property Status"),
        "{err}"
    );
}

#[test]
fn policy_document_as_object_and_as_string_are_the_same() {
    let as_object = r#"
Resources:
  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t1}}
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: p
      PolicyDocument:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: iot:Publish
            Resource: "arn:aws:iot:*:*:topic/t/${iot:Connection.Thing.ThingName}"
"#;
    let as_string = r#"
Resources:
  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t1}}
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: p
      PolicyDocument: "{\"Version\": \"2012-10-17\", \"Statement\": [{\"Effect\": \"Allow\", \"Action\": \"iot:Publish\", \"Resource\": \"arn:aws:iot:*:*:topic/t/${iot:Connection.Thing.ThingName}\"}]}"
"#;
    let a = render(&parse(as_object), &BTreeMap::new()).unwrap();
    let b = render(&parse(as_string), &BTreeMap::new()).unwrap();
    assert_eq!(a.policies, b.policies);
    // The policy variable is kept in the stored document.
    assert_eq!(
        a.policies[0].document.as_ref().unwrap()["Statement"][0]["Resource"],
        json!("arn:aws:iot:*:*:topic/t/${iot:Connection.Thing.ThingName}")
    );
}

#[test]
fn default_template_loads_renders_and_keeps_policy_variables() {
    check_syntax(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_YAML).unwrap();
    let t = load(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_YAML).unwrap();
    let r = render(
        &t,
        &certificate_parameters(&CertificateFields {
            common_name: Some("sensor-42".into()),
            id: Some("00ff".into()),
            ..CertificateFields::default()
        }),
    )
    .unwrap();
    assert_eq!(r.template, "default");
    assert_eq!(r.thing.name, "sensor-42");
    assert_eq!(
        r.policies[0].name.as_deref(),
        Some("fleetcert-device-default")
    );
    let doc = r.policies[0].document.as_ref().unwrap();
    assert_eq!(
        doc["Statement"][0]["Resource"],
        json!("arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}")
    );
    let effective = effective_policy(doc, "sensor-42", "sensor-42");
    assert_eq!(
        effective["Statement"][0]["Resource"],
        json!("arn:aws:iot:*:*:client/sensor-42")
    );
    assert_eq!(
        effective["Statement"][1]["Resource"],
        json!("arn:aws:iot:*:*:topic/devices/sensor-42/*")
    );
    // Condition keys are not substituted; Version and the rest are untouched.
    assert_eq!(
        effective["Statement"][0]["Condition"],
        json!({"Bool": {"iot:Connection.Thing.IsAttached": "true"}})
    );
}

#[test]
fn certificate_parameters_use_the_aws_names() {
    let p = certificate_parameters(&CertificateFields {
        common_name: Some("cn".into()),
        serial_number: Some("sn".into()),
        country: Some("FR".into()),
        organization: Some("o".into()),
        organizational_unit: Some("ou".into()),
        distinguished_name_qualifier: Some("dnq".into()),
        state_name: Some("st".into()),
        id: Some("id".into()),
    });
    assert_eq!(
        p,
        map(&[
            ("AWS::IoT::Certificate::CommonName", "cn"),
            ("AWS::IoT::Certificate::SerialNumber", "sn"),
            ("AWS::IoT::Certificate::Country", "FR"),
            ("AWS::IoT::Certificate::Organization", "o"),
            ("AWS::IoT::Certificate::OrganizationalUnit", "ou"),
            ("AWS::IoT::Certificate::DistinguishedNameQualifier", "dnq"),
            ("AWS::IoT::Certificate::StateName", "st"),
            ("AWS::IoT::Certificate::Id", "id"),
        ])
    );
    assert!(certificate_parameters(&CertificateFields::default()).is_empty());
}

#[test]
fn effective_policy_keeps_other_variables() {
    let doc = json!({
        "Statement": [{
            "Effect": "Allow",
            "Action": "iot:Publish",
            "Resource": [
                "arn:aws:iot:*:*:topic/${iot:ClientId}/${iot:Connection.Thing.ThingName}",
                "arn:aws:iot:*:*:topic/${iot:Certificate.Subject.Organization}/${aws:username}/${*}"
            ]
        }]
    });
    let e = effective_policy(&doc, "thing-1", "client-1");
    assert_eq!(
        e["Statement"][0]["Resource"],
        json!([
            "arn:aws:iot:*:*:topic/client-1/thing-1",
            "arn:aws:iot:*:*:topic/${iot:Certificate.Subject.Organization}/${aws:username}/${*}"
        ])
    );
}

// ---------------------------------------------------------------------------------------
// Intrinsics.

fn thing_name_with(expr_yaml: &str, extra: &str, p: &[(&str, &str)]) -> String {
    let text = format!(
        "Parameters:\n  CN: {{Type: String}}\n  Sep: {{Type: String, Default: \"-\"}}\n{extra}\
         Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: {expr_yaml}\n"
    );
    let t = parse(&text);
    render(&t, &map(p)).unwrap().thing.name
}

#[test]
fn ref_and_join() {
    assert_eq!(thing_name_with("{Ref: CN}", "", &[("CN", "a")]), "a");
    assert_eq!(
        thing_name_with(
            r#"{"Fn::Join": ["_", [x, {Ref: CN}, 3]]}"#,
            "",
            &[("CN", "a")]
        ),
        "x_a_3"
    );
    assert_eq!(
        thing_name_with(r#"!Join [":", [x, !Ref CN]]"#, "", &[("CN", "a")]),
        "x:a"
    );
}

#[test]
fn join_of_select_of_split() {
    // "factory/line-7/unit-42" -> "line-7_unit-42"
    let expr = r#"{"Fn::Join": ["_", [{"Fn::Select": [1, {"Fn::Split": ["/", {Ref: CN}]}]}, {"Fn::Select": ["2", {"Fn::Split": ["/", {Ref: CN}]}]}]]}"#;
    assert_eq!(
        thing_name_with(expr, "", &[("CN", "factory/line-7/unit-42")]),
        "line-7_unit-42"
    );
    let short =
        r#"!Join ["_", [!Select [1, !Split ["/", !Ref CN]], !Select [2, !Split ["/", !Ref CN]]]]"#;
    assert_eq!(
        thing_name_with(short, "", &[("CN", "factory/line-7/unit-42")]),
        "line-7_unit-42"
    );
    // A Join straight over a Split.
    assert_eq!(
        thing_name_with(
            r#"{"Fn::Join": ["-", {"Fn::Split": [".", {Ref: CN}]}]}"#,
            "",
            &[("CN", "a.b.c")]
        ),
        "a-b-c"
    );
}

#[test]
fn select_out_of_range_when_rendering() {
    let text = "Parameters:\n  CN: {Type: String}\nResources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: !Select [3, !Split [\"/\", !Ref CN]]\n";
    let t = parse(text);
    let err = render(&t, &map(&[("CN", "a/b")])).unwrap_err().to_string();
    assert!(
        err.contains("resource \"thing\", property ThingName"),
        "{err}"
    );
    assert!(err.contains("index 3 is out of range"), "{err}");
}

#[test]
fn find_in_map_with_mappings() {
    let mappings = "Mappings:\n  Sites:\n    paris: {Prefix: par}\n    lyon: {Prefix: lyo}\n";
    assert_eq!(
        thing_name_with(
            r#"{"Fn::Join": ["-", [{"Fn::FindInMap": [Sites, {Ref: CN}, Prefix]}, x]]}"#,
            mappings,
            &[("CN", "lyon")]
        ),
        "lyo-x"
    );
    assert_eq!(
        thing_name_with(
            "!FindInMap [Sites, paris, Prefix]",
            mappings,
            &[("CN", "unused")]
        ),
        "par"
    );
    // A literal key that is not in Mappings is caught when parsing.
    let text = format!(
        "{mappings}Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: !FindInMap [Sites, rome, Prefix]\n"
    );
    let err = parse_err(&text);
    assert!(
        err.contains("resource \"thing\", property ThingName"),
        "{err}"
    );
    assert!(err.contains("\"rome\""), "{err}");
    let text = format!(
        "{mappings}Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: !FindInMap [Nope, rome, Prefix]\n"
    );
    assert!(parse_err(&text).contains("no mapping \"Nope\""));
}

#[test]
fn sub_both_forms() {
    assert_eq!(
        thing_name_with(r#"{"Fn::Sub": "dev${Sep}${CN}"}"#, "", &[("CN", "a")]),
        "dev-a"
    );
    assert_eq!(
        thing_name_with(
            r#"{"Fn::Sub": ["${Site}${Sep}${CN}", {Site: {"Fn::Join": ["", [p, q]]}}]}"#,
            "",
            &[("CN", "a")]
        ),
        "pq-a"
    );
    assert_eq!(
        thing_name_with(r#"!Sub "x_${CN}""#, "", &[("CN", "a")]),
        "x_a"
    );
    // Parameter names with "::".
    let text = "Parameters:\n  AWS::IoT::Certificate::CommonName: {Type: String}\nResources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: !Sub \"d-${AWS::IoT::Certificate::CommonName}\"\n";
    let r = render(&parse(text), &map(&[(params::COMMON_NAME, "7")])).unwrap();
    assert_eq!(r.thing.name, "d-7");
}

#[test]
fn sub_keeps_policy_variables_in_policy_documents() {
    let text = r#"
Parameters:
  Prefix: {Type: String, Default: fleet}
Resources:
  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t1}}
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: !Sub "${Prefix}-device"
      PolicyDocument:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: iot:Publish
            Resource: !Sub "arn:aws:iot:*:*:topic/${Prefix}/${iot:Connection.Thing.ThingName}/${!Literal}"
          - Effect: Allow
            Action: iot:Subscribe
            Resource:
              Fn::Sub:
                - "arn:aws:iot:*:*:topicfilter/${P}/${iot:Connection.Thing.ThingName}/${aws:username}"
                - {P: !Ref Prefix}
"#;
    let r = render(&parse(text), &BTreeMap::new()).unwrap();
    let policy = &r.policies[0];
    assert_eq!(policy.name.as_deref(), Some("fleet-device"));
    let doc = policy.document.as_ref().unwrap();
    assert_eq!(
        doc["Statement"][0]["Resource"],
        json!("arn:aws:iot:*:*:topic/fleet/${iot:Connection.Thing.ThingName}/${Literal}")
    );
    assert_eq!(
        doc["Statement"][1]["Resource"],
        json!(
            "arn:aws:iot:*:*:topicfilter/fleet/${iot:Connection.Thing.ThingName}/${aws:username}"
        )
    );
}

#[test]
fn policy_document_built_with_sub_as_a_json_string() {
    let text = r#"
Parameters:
  Prefix: {Type: String}
Resources:
  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t1}}
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyDocument: !Sub '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/${Prefix}/${iot:Connection.Thing.ThingName}"}]}'
"#;
    let t = parse(text);
    let r = render(&t, &map(&[("Prefix", "plant")])).unwrap();
    assert_eq!(
        r.policies[0].document.as_ref().unwrap()["Statement"][0]["Resource"],
        json!("arn:aws:iot:*:*:topic/plant/${iot:Connection.Thing.ThingName}")
    );
}

#[test]
fn a_parameter_cannot_widen_a_policy() {
    // Scoped when loaded (the parameter is opaque), refused when the value is "*".
    let text = r#"
Parameters:
  AWS::IoT::Certificate::OrganizationalUnit: {Type: String}
Resources:
  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t1}}
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: p
      PolicyDocument:
        Statement:
          - Effect: Allow
            Action: iot:Publish
            Resource: !Join ["", ["arn:aws:iot:*:*:topic/", !Ref "AWS::IoT::Certificate::OrganizationalUnit"]]
"#;
    let t = parse(text);
    render(&t, &map(&[(params::ORGANIZATIONAL_UNIT, "ops")])).unwrap();
    let err = render(&t, &map(&[(params::ORGANIZATIONAL_UNIT, "*")])).unwrap_err();
    assert!(
        matches!(err, TemplateError::OverlyPermissive { .. }),
        "{err:?}"
    );
}

#[test]
fn thing_names_are_checked_when_rendering() {
    let t = parse(JITP_JSON);
    for bad in ["a/b", "a+b", "#", "*", "", &"x".repeat(129)] {
        let mut p = jitp_params();
        p.insert(params::COMMON_NAME.into(), bad.into());
        let err = render(&t, &p).unwrap_err();
        assert!(
            matches!(
                err,
                TemplateError::InvalidThingName { .. } | TemplateError::Render { .. }
            ),
            "{bad}: {err:?}"
        );
    }
}

#[test]
fn numbers_and_booleans_become_strings() {
    let text = r#"
Resources:
  thing:
    Type: AWS::IoT::Thing
    Properties:
      ThingName: 12345
      AttributePayload: {version: 2, beta: true, ratio: 1.5}
      ThingGroups: [1, two]
"#;
    let r = render(&parse(text), &BTreeMap::new()).unwrap();
    assert_eq!(r.thing.name, "12345");
    assert_eq!(
        r.thing.attributes,
        map(&[("version", "2"), ("beta", "true"), ("ratio", "1.5")])
    );
    assert_eq!(r.thing.groups, ["1", "two"]);
}

// ---------------------------------------------------------------------------------------
// Errors name the resource and the field.

const THING_ONLY: &str =
    "Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: ";

#[test]
fn unknown_resource_type() {
    let text = "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n  bucket:\n    Type: AWS::S3::Bucket\n";
    let err = parse_err(text);
    assert!(err.contains("template \"t\""), "{err}");
    assert!(err.contains("resource \"bucket\""), "{err}");
    assert!(
        err.contains("unknown resource type \"AWS::S3::Bucket\""),
        "{err}"
    );
}

#[test]
fn unknown_ref() {
    let err = parse_err(&format!(
        "Parameters:\n  CN: {{Type: String}}\n{THING_ONLY}{{Ref: Foo}}\n"
    ));
    assert!(
        err.contains("resource \"thing\", property ThingName: Ref to unknown parameter \"Foo\""),
        "{err}"
    );
    // Nested, and in a Sub.
    let err = parse_err(&format!("{THING_ONLY}!Join [\"\", [a, !Ref Foo]]\n"));
    assert!(
        err.contains("property ThingName: Ref to unknown parameter \"Foo\""),
        "{err}"
    );
    let err = parse_err(&format!("{THING_ONLY}!Sub \"a-${{Foo}}\"\n"));
    assert!(err.contains("property ThingName: Fn::Sub: ${Foo}"), "{err}");
    // In a list: the index is named.
    let err = parse_err(
        "Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: t\n      ThingGroups: [a, !Ref Foo]\n",
    );
    assert!(
        err.contains("property ThingGroups[1]: Ref to unknown"),
        "{err}"
    );
}

#[test]
fn bad_intrinsic_arity() {
    for (expr, needle) in [
        (r#"{"Fn::Join": [""]}"#, "Fn::Join expects 2 arguments"),
        (
            r#"{"Fn::Join": ["", "a", "b"]}"#,
            "Fn::Join expects 2 arguments",
        ),
        (
            r#"{"Fn::Join": "abc"}"#,
            "Fn::Join expects a list of 2 arguments",
        ),
        (r#"{"Fn::Join": ["", "notalist"]}"#, "must be a list"),
        (r#"{"Fn::Select": [0]}"#, "Fn::Select expects 2 arguments"),
        (r#"{"Fn::Select": [5, [a, b]]}"#, "index 5 is out of range"),
        (r#"{"Fn::Select": [-1, [a]]}"#, "whole number"),
        (r#"{"Fn::Split": ["/"]}"#, "Fn::Split expects 2 arguments"),
        (r#"{"Fn::Split": ["", x]}"#, "delimiter must not be empty"),
        (
            r#"{"Fn::FindInMap": [A, b]}"#,
            "Fn::FindInMap expects 3 arguments",
        ),
        (
            r#"{"Fn::Sub": [a, {}, c]}"#,
            "Fn::Sub expects a string or 2 arguments",
        ),
        (r#"{"Fn::Sub": [a, b]}"#, "variables must be a map"),
        (
            r#"{"Fn::GetAtt": [a, b]}"#,
            "unsupported intrinsic function Fn::GetAtt",
        ),
        (r#"{"Ref": [a]}"#, "Ref expects a parameter name"),
        ("!GetAtt a.b", "unsupported YAML tag !GetAtt"),
    ] {
        let err = parse_err(&format!("{THING_ONLY}{expr}\n"));
        assert!(
            err.contains("resource \"thing\", property ThingName"),
            "{expr}: {err}"
        );
        assert!(err.contains(needle), "{expr}: {err}");
    }
}

#[test]
fn missing_parameter_names_it_and_the_certificate() {
    let t = parse(DEFAULT_TEMPLATE_YAML);
    let err = render(&t, &map(&[(params::ID, "x")])).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, TemplateError::MissingParameter { parameter, .. } if parameter == params::COMMON_NAME),
        "{err:?}"
    );
    assert!(
        msg.contains("resource \"thing\", property ThingName"),
        "{msg}"
    );
    assert!(msg.contains("no value and no Default"), "{msg}");
    assert!(
        msg.contains("certificate's subject has no CommonName (CN)"),
        "{msg}"
    );
    // A non-certificate parameter says so.
    let t = parse(&format!(
        "Parameters:\n  X: {{Type: String}}\n{THING_ONLY}!Ref X\n"
    ));
    let msg = render(&t, &BTreeMap::new()).unwrap_err().to_string();
    assert!(msg.contains("parameter \"X\" has no value"), "{msg}");
    assert!(msg.contains("no value was supplied"), "{msg}");
}

#[test]
fn structural_errors() {
    for (text, needle) in [
        ("Resources: [", "not valid YAML or JSON"),
        ("Parameters: {}", "no Resources section"),
        ("Resources: {}", "no Resources section"),
        (
            "Resource: {}\nResources: {x: {Type: AWS::IoT::Thing}}",
            "unknown section \"Resource\"",
        ),
        (
            "Resources:\n  p: {Type: AWS::IoT::Policy, Properties: {PolicyName: x}}\n",
            "exactly one AWS::IoT::Thing",
        ),
        (
            "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {}}\n",
            "resource \"thing\", property ThingName: is required",
        ),
        (
            "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t, Colour: red}}\n",
            "unknown AWS::IoT::Thing property \"Colour\"",
        ),
        (
            "Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties: {ThingName: t}\n    OverrideSettings: {ThingName: MERGE}\n",
            "property OverrideSettings.ThingName: MERGE applies only",
        ),
        (
            "Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties: {ThingName: t}\n    OverrideSettings: {ThingTypeName: OVERWRITE}\n",
            "must be DO_NOTHING, REPLACE, FAIL or MERGE",
        ),
        (
            "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n  p: {Type: AWS::IoT::Policy, Properties: {PolicyDocument: '{not json'}}\n",
            "resource \"p\", property PolicyDocument: is a string but not valid JSON",
        ),
        (
            "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n  p: {Type: AWS::IoT::Policy, Properties: {PolicyDocument: {Statement: [{Effect: Allow, Action: iot:Connect}]}}}\n",
            "resource \"p\", property PolicyDocument: Statement[0]: has no Resource",
        ),
        (
            "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n  p: {Type: AWS::IoT::Policy}\n",
            "resource \"p\": an AWS::IoT::Policy needs a PolicyName",
        ),
        (
            "Resources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n  c: {Type: AWS::IoT::Certificate, Properties: {Status: ACTIVE}}\n",
            "resource \"c\": an AWS::IoT::Certificate needs CertificateId",
        ),
        (
            "Parameters:\n  N: {Type: Number, Default: abc}\nResources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n",
            "parameter \"N\": Default \"abc\" is not a number",
        ),
        (
            "Parameters:\n  N: {Type: List}\nResources:\n  thing: {Type: AWS::IoT::Thing, Properties: {ThingName: t}}\n",
            "parameter \"N\": Type must be",
        ),
    ] {
        let err = parse_err(text);
        assert!(err.contains(needle), "{text}\n=> {err}");
        assert!(check_syntax("t", text).is_err());
    }
}

#[test]
fn yaml_merge_keys_are_applied() {
    let text = r#"
Resources:
  thing:
    Type: AWS::IoT::Thing
    Properties:
      ThingName: t1
      AttributePayload:
        <<: &common {vendor: acme, line: "7"}
        model: x
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: p
      PolicyDocument:
        Statement:
          - &publish
            Effect: Allow
            Action: iot:Publish
            Resource: "arn:aws:iot:*:*:topic/a/${iot:Connection.Thing.ThingName}"
          - <<: *publish
            Action: iot:Receive
"#;
    let r = render(&parse(text), &BTreeMap::new()).unwrap();
    assert_eq!(
        r.thing.attributes,
        map(&[("vendor", "acme"), ("line", "7"), ("model", "x")])
    );
    let doc = r.policies[0].document.as_ref().unwrap();
    assert_eq!(doc["Statement"][1]["Action"], json!("iot:Receive"));
    assert_eq!(doc["Statement"][1]["Effect"], json!("Allow"));
}

// ---------------------------------------------------------------------------------------
// The AWS IoT developer guide's own templates, verbatim (tests/fixtures/README.md says
// where they come from): they load and render as AWS documents them.

const GUIDE_JITP: &str = include_str!("fixtures/aws-guide-jitp.json");
const GUIDE_FLEET: &str = include_str!("fixtures/aws-guide-fleet-provisioning.json");

#[test]
fn aws_guide_jitp_template_loads_verbatim_and_renders() {
    let t = parse(GUIDE_JITP);
    let r = render(&t, &jitp_params()).unwrap();
    assert_eq!(r.thing.name, "bulb-0001");
    assert_eq!(r.thing.thing_type.as_deref(), Some("lightBulb-versionA"));
    assert_eq!(
        r.thing.attributes,
        map(&[("version", "v1"), ("serialNumber", "SN-77")])
    );
    assert_eq!(r.thing.groups, ["v1-lightbulbs", "US"]);
    let cert = r.certificate.as_ref().unwrap();
    assert_eq!(
        cert.certificate_id.as_deref(),
        Some("ab".repeat(32).as_str())
    );
    assert_eq!(cert.status, Some(CertificateStatus::Active));
    assert_eq!(
        cert.override_settings.get("Status"),
        Some(&OverrideAction::DoNothing)
    );
    assert_eq!(r.policies.len(), 1);
    assert_eq!(
        r.policies[0].document.as_ref().unwrap()["Statement"][0]["Action"],
        json!(["iot:Publish"])
    );
    // The guide's trimmed copy above renders the same thing, certificate id and policy.
    let trimmed = render(&parse(JITP_JSON), &jitp_params()).unwrap();
    assert_eq!(trimmed.thing, r.thing);
    assert_eq!(trimmed.policies, r.policies);
}

#[test]
fn aws_guide_fleet_provisioning_template_loads_verbatim_and_renders() {
    // AWS supplies AWS::IoT::Certificate::Id without a declaration.
    let t = parse(GUIDE_FLEET);
    assert!(!t.parameters.contains_key(params::ID));
    assert_eq!(t.device_configuration.len(), 2);
    let p = map(&[
        ("ThingName", "bulb-0042"),
        ("SerialNumber", "123456"),
        ("DeviceLocation", "Seattle"),
        (params::ID, "cafe01"),
    ]);
    let r = render(&t, &p).unwrap();
    assert_eq!(r.thing.name, "bulb-0042");
    assert_eq!(r.thing.thing_type.as_deref(), Some("ThingPrefix_123456"));
    assert_eq!(
        r.thing.attributes,
        map(&[("version", "v1"), ("serialNumber", "serialNumber")])
    );
    assert_eq!(r.thing.groups, ["v1-lightbulbs", "WA"]);
    assert_eq!(
        r.thing.billing_group.as_deref(),
        Some("LightBulbBillingGroup")
    );
    assert_eq!(r.thing.override_settings.len(), 3);
    let cert = r.certificate.as_ref().unwrap();
    assert_eq!(cert.certificate_id.as_deref(), Some("cafe01"));
    assert_eq!(cert.status, Some(CertificateStatus::Active));
    assert_eq!(
        r.policies[0].document,
        Some(json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Action": ["iot:Publish"],
                "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]
            }]
        }))
    );
    assert_eq!(
        r.device_configuration,
        BTreeMap::from([
            (
                "FallbackUrl".to_owned(),
                json!("https://www.example.com/test-site")
            ),
            ("LocationUrl".to_owned(), json!("https://example.aws")),
        ])
    );

    // Without the id (nothing supplied it), rendering names it.
    let mut without = p.clone();
    without.remove(params::ID);
    let err = render(&t, &without).unwrap_err().to_string();
    assert!(err.contains("\"AWS::IoT::Certificate::Id\""), "{err}");
    assert!(err.contains("certificate's Id was not supplied"), "{err}");
}

#[test]
fn only_the_certificate_id_is_supplied_without_a_declaration() {
    let thing =
        "Resources:\n  thing:\n    Type: AWS::IoT::Thing\n    Properties:\n      ThingName: ";
    // The id, by Ref and in a Fn::Sub.
    parse(&format!("{thing}!Ref AWS::IoT::Certificate::Id\n"));
    let t = parse(&format!(
        "{thing}!Sub \"dev-${{AWS::IoT::Certificate::Id}}\"\n"
    ));
    let r = render(&t, &map(&[(params::ID, "beef")])).unwrap();
    assert_eq!(r.thing.name, "dev-beef");
    // Other certificate fields must be declared, as AWS requires for JITP.
    let err = parse_err(&format!("{thing}!Ref AWS::IoT::Certificate::CommonName\n"));
    assert!(
        err.contains("Ref to unknown parameter \"AWS::IoT::Certificate::CommonName\""),
        "{err}"
    );
}
