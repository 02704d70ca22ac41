//! Rendering a template with the parameters a device brings.

use crate::TemplateError;
use crate::expr::{Env, EvalError, Expr, scalar_to_string};
use crate::model::{CertificateStatus, Loc, OverrideAction, Template};
use crate::policy::{self, Finding};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// The names of the parameters JITP fills from the device certificate.
pub mod params {
    /// The subject's commonName (CN).
    pub const COMMON_NAME: &str = "AWS::IoT::Certificate::CommonName";
    /// The subject's serialNumber attribute, not the certificate serial.
    pub const SERIAL_NUMBER: &str = "AWS::IoT::Certificate::SerialNumber";
    /// The subject's countryName (C).
    pub const COUNTRY: &str = "AWS::IoT::Certificate::Country";
    /// The subject's organizationName (O).
    pub const ORGANIZATION: &str = "AWS::IoT::Certificate::Organization";
    /// The subject's organizationalUnitName (OU).
    pub const ORGANIZATIONAL_UNIT: &str = "AWS::IoT::Certificate::OrganizationalUnit";
    /// The subject's dnQualifier.
    pub const DISTINGUISHED_NAME_QUALIFIER: &str =
        "AWS::IoT::Certificate::DistinguishedNameQualifier";
    /// The subject's stateOrProvinceName (ST).
    pub const STATE_NAME: &str = "AWS::IoT::Certificate::StateName";
    /// The certificate Id: lowercase hex SHA-256 of the certificate DER. Always supplied,
    /// so templates may use it without declaring it.
    pub const ID: &str = "AWS::IoT::Certificate::Id";
}

/// The certificate fields JITP passes to a template, as plain data (the caller extracts
/// them from the certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateFields {
    /// Subject CN.
    pub common_name: Option<String>,
    /// The subject's serialNumber attribute (not the certificate serial).
    pub serial_number: Option<String>,
    /// Subject C.
    pub country: Option<String>,
    /// Subject O.
    pub organization: Option<String>,
    /// Subject OU.
    pub organizational_unit: Option<String>,
    /// Subject dnQualifier.
    pub distinguished_name_qualifier: Option<String>,
    /// Subject ST.
    pub state_name: Option<String>,
    /// The certificate Id: lowercase hex SHA-256 of the certificate DER, as AWS computes it.
    pub id: Option<String>,
}

/// The JITP parameter map for a certificate: `AWS::IoT::Certificate::CommonName` etc., for
/// the fields that are present.
pub fn certificate_parameters(fields: &CertificateFields) -> BTreeMap<String, String> {
    [
        (params::COMMON_NAME, &fields.common_name),
        (params::SERIAL_NUMBER, &fields.serial_number),
        (params::COUNTRY, &fields.country),
        (params::ORGANIZATION, &fields.organization),
        (params::ORGANIZATIONAL_UNIT, &fields.organizational_unit),
        (
            params::DISTINGUISHED_NAME_QUALIFIER,
            &fields.distinguished_name_qualifier,
        ),
        (params::STATE_NAME, &fields.state_name),
        (params::ID, &fields.id),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.as_ref().map(|v| (name.to_owned(), v.clone())))
    .collect()
}

/// Everything a template provisions for one device, ready to apply in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedProvisioning {
    /// The template's name.
    pub template: String,
    /// The template's one `AWS::IoT::Thing`.
    pub thing: RenderedThing,
    /// The template's `AWS::IoT::Certificate`, if it has one.
    pub certificate: Option<RenderedCertificate>,
    /// In template order.
    pub policies: Vec<RenderedPolicy>,
    /// Fleet provisioning's `DeviceConfiguration`, evaluated.
    pub device_configuration: BTreeMap<String, Value>,
}

/// An `AWS::IoT::Thing` resource with every property evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedThing {
    /// The resource's logical id.
    pub logical_id: String,
    /// Checked against `[a-zA-Z0-9:_-]{1,128}`.
    pub name: String,
    /// `ThingTypeName`.
    pub thing_type: Option<String>,
    /// `AttributePayload`: attribute name -> value.
    pub attributes: BTreeMap<String, String>,
    /// `ThingGroups`: non-empty names, duplicates removed, in template order.
    pub groups: Vec<String>,
    /// `BillingGroup`.
    pub billing_group: Option<String>,
    /// `OverrideSettings`: property -> action when the thing already exists.
    pub override_settings: BTreeMap<String, OverrideAction>,
}

/// An `AWS::IoT::Certificate` resource with every property evaluated. Each string
/// property is `None` when the template leaves it out, never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedCertificate {
    /// The resource's logical id.
    pub logical_id: String,
    /// `CertificateId`.
    pub certificate_id: Option<String>,
    /// `CertificatePem`.
    pub certificate_pem: Option<String>,
    /// `CACertificatePem`.
    pub ca_certificate_pem: Option<String>,
    /// `CertificateSigningRequest`.
    pub certificate_signing_request: Option<String>,
    /// `None` when the template does not set `Status`.
    pub status: Option<CertificateStatus>,
    /// `OverrideSettings`: property -> action when the certificate already exists.
    pub override_settings: BTreeMap<String, OverrideAction>,
}

/// An `AWS::IoT::Policy` resource with its name and document evaluated; at least one of
/// the two is present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedPolicy {
    /// The resource's logical id.
    pub logical_id: String,
    /// `None` when the template gives only a document (AWS then names the policy itself).
    pub name: Option<String>,
    /// `None` when the template attaches an existing policy by name. Policy variables
    /// (`${iot:Connection.Thing.ThingName}`…) are kept: see [`crate::effective_policy`].
    pub document: Option<Value>,
}

/// A lint finding in one of a template's policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateFinding {
    /// The policy resource's logical id.
    pub resource: String,
    /// What the lint found (serialised flattened into this object).
    #[serde(flatten)]
    pub finding: Finding,
}

impl fmt::Display for TemplateFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resource {:?}: {}", self.resource, self.finding)
    }
}

/// Checks a thing name against AWS IoT's rule, `[a-zA-Z0-9:_-]{1,128}`, so that a name
/// substituted into a policy can never carry `*`, `/`, `+` or `#`.
pub fn validate_thing_name(thing_name: &str) -> Result<(), String> {
    if thing_name.is_empty() {
        return Err("it is empty".into());
    }
    if thing_name.len() > 128 {
        return Err(format!(
            "it is {} characters long; the limit is 128",
            thing_name.chars().count()
        ));
    }
    if let Some(c) = thing_name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')))
    {
        return Err(format!(
            "character {c:?} is not allowed (only letters, digits, ':', '_' and '-')"
        ));
    }
    Ok(())
}

fn missing_why(parameter: &str) -> String {
    let Some(field) = parameter.strip_prefix("AWS::IoT::Certificate::") else {
        return "no value was supplied for it".into();
    };
    let attribute = match field {
        "CommonName" => "CommonName (CN)",
        "SerialNumber" => "serialNumber attribute",
        "Country" => "Country (C)",
        "Organization" => "Organization (O)",
        "OrganizationalUnit" => "OrganizationalUnit (OU)",
        "DistinguishedNameQualifier" => "dnQualifier",
        "StateName" => "StateOrProvinceName (ST)",
        "Id" => return "the certificate's Id was not supplied".into(),
        other => return format!("the certificate does not supply {other}"),
    };
    format!("the certificate's subject has no {attribute}")
}

fn eval_error(template: &Template, symbolic: bool, loc: &Loc, e: EvalError) -> TemplateError {
    match e {
        EvalError::Missing(parameter) => TemplateError::MissingParameter {
            name: template.name.clone(),
            location: loc.to_string(),
            why: missing_why(&parameter),
            parameter,
        },
        EvalError::Other(reason) if symbolic => TemplateError::Invalid {
            name: template.name.clone(),
            location: loc.to_string(),
            reason,
        },
        EvalError::Other(reason) => TemplateError::Render {
            name: template.name.clone(),
            location: loc.to_string(),
            reason,
        },
    }
}

/// Evaluates a policy document (with `params`, or with `${Name}` placeholders when `None`),
/// parses it when it evaluates to a JSON string, and checks its structure.
pub(crate) fn policy_document(
    template: &Template,
    logical_id: &str,
    document: &Expr,
    params: Option<&BTreeMap<String, String>>,
) -> Result<Value, TemplateError> {
    let loc = Loc::resource(logical_id).key("PolicyDocument");
    let env = Env { template, params };
    let fail =
        |reason: String| eval_error(template, params.is_none(), &loc, EvalError::Other(reason));
    let value = env
        .eval(document)
        .map_err(|e| eval_error(template, params.is_none(), &loc, e))?;
    let value = match value {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| fail(format!("evaluates to a string that is not valid JSON: {e}")))?,
        v => v,
    };
    policy::validate_policy_document(&value).map_err(fail)?;
    Ok(value)
}

/// The lint findings of every policy document in a template (parameters left as `${Name}`
/// placeholders, which the lint treats as scoped; [`render`] lints again with the values).
pub fn lint_template(template: &Template) -> Vec<TemplateFinding> {
    template
        .policies()
        .flat_map(|(resource, policy)| {
            policy
                .lint_view
                .as_ref()
                .map(policy::lint_policy)
                .unwrap_or_default()
                .into_iter()
                .map(|finding| TemplateFinding {
                    resource: resource.logical_id.clone(),
                    finding,
                })
        })
        .collect()
}

/// Renders a template for one device. `params` are the parameter values (for JITP:
/// [`certificate_parameters`]); a parameter the template uses that has neither a value nor
/// a `Default` is an error naming it. The rendered policies are linted again with the
/// values in place, so a parameter cannot widen a policy (e.g. an OU of `*`).
pub fn render(
    template: &Template,
    params: &BTreeMap<String, String>,
) -> Result<RenderedProvisioning, TemplateError> {
    let env = Env {
        template,
        params: Some(params),
    };
    let string = |logical_id: &str, key: &str, e: &Expr| -> Result<String, TemplateError> {
        let loc = Loc::resource(logical_id).key(key);
        let v = env
            .eval(e)
            .map_err(|err| eval_error(template, false, &loc, err))?;
        let s = scalar_to_string(&v).ok_or_else(|| TemplateError::Render {
            name: template.name.clone(),
            location: loc.to_string(),
            reason: format!("must evaluate to a string, got {v}"),
        })?;
        if s.is_empty() {
            return Err(TemplateError::Render {
                name: template.name.clone(),
                location: loc.to_string(),
                reason: "evaluates to an empty string".into(),
            });
        }
        Ok(s)
    };
    let optional = |logical_id: &str, key: &str, e: &Option<Expr>| {
        e.as_ref().map(|e| string(logical_id, key, e)).transpose()
    };

    let (resource, thing) = template.thing().ok_or_else(|| TemplateError::Invalid {
        name: template.name.clone(),
        location: "Resources".into(),
        reason: "a template must declare exactly one AWS::IoT::Thing resource, found 0".into(),
    })?;
    let id = resource.logical_id.as_str();
    let name = string(id, "ThingName", &thing.thing_name)?;
    validate_thing_name(&name).map_err(|reason| TemplateError::InvalidThingName {
        name: template.name.clone(),
        thing_name: name.clone(),
        reason,
    })?;
    let mut attributes = BTreeMap::new();
    for (key, e) in &thing.attribute_payload {
        let loc = Loc::resource(id).key("AttributePayload").key(key);
        let v = env
            .eval(e)
            .map_err(|err| eval_error(template, false, &loc, err))?;
        let s = scalar_to_string(&v).ok_or_else(|| TemplateError::Render {
            name: template.name.clone(),
            location: loc.to_string(),
            reason: format!("must evaluate to a string, got {v}"),
        })?;
        attributes.insert(key.clone(), s);
    }
    let mut groups = Vec::new();
    if let Some(e) = &thing.thing_groups {
        let loc = Loc::resource(id).key("ThingGroups");
        let v = env
            .eval(e)
            .map_err(|err| eval_error(template, false, &loc, err))?;
        let Value::Array(items) = v else {
            return Err(TemplateError::Render {
                name: template.name.clone(),
                location: loc.to_string(),
                reason: format!("must evaluate to a list of group names, got {v}"),
            });
        };
        for (i, item) in items.iter().enumerate() {
            match scalar_to_string(item) {
                Some(g) if !g.is_empty() => {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
                _ => {
                    return Err(TemplateError::Render {
                        name: template.name.clone(),
                        location: loc.index(i).to_string(),
                        reason: format!("must be a non-empty group name, got {item}"),
                    });
                }
            }
        }
    }
    let rendered_thing = RenderedThing {
        logical_id: id.to_owned(),
        name,
        thing_type: optional(id, "ThingTypeName", &thing.thing_type_name)?,
        attributes,
        groups,
        billing_group: optional(id, "BillingGroup", &thing.billing_group)?,
        override_settings: resource.override_settings.clone(),
    };

    let certificate = match template.certificate() {
        None => None,
        Some((resource, c)) => {
            let id = resource.logical_id.as_str();
            let status =
                match optional(id, "Status", &c.status)? {
                    None => None,
                    Some(s) => Some(CertificateStatus::parse(&s).ok_or_else(|| {
                        TemplateError::Render {
                            name: template.name.clone(),
                            location: Loc::resource(id).key("Status").to_string(),
                            reason: format!(
                                "{s:?} is not a certificate status (expected ACTIVE or INACTIVE)"
                            ),
                        }
                    })?),
                };
            Some(RenderedCertificate {
                logical_id: id.to_owned(),
                certificate_id: optional(id, "CertificateId", &c.certificate_id)?,
                certificate_pem: optional(id, "CertificatePem", &c.certificate_pem)?,
                ca_certificate_pem: optional(id, "CACertificatePem", &c.ca_certificate_pem)?,
                certificate_signing_request: optional(
                    id,
                    "CertificateSigningRequest",
                    &c.certificate_signing_request,
                )?,
                status,
                override_settings: resource.override_settings.clone(),
            })
        }
    };

    let mut policies = Vec::new();
    let mut findings = Vec::new();
    for (resource, p) in template.policies() {
        let id = resource.logical_id.as_str();
        let document = p
            .policy_document
            .as_ref()
            .map(|doc| policy_document(template, id, doc, Some(params)))
            .transpose()?;
        if let Some(doc) = &document {
            findings.extend(
                policy::lint_policy(doc)
                    .into_iter()
                    .map(|finding| TemplateFinding {
                        resource: id.to_owned(),
                        finding,
                    }),
            );
        }
        policies.push(RenderedPolicy {
            logical_id: id.to_owned(),
            name: optional(id, "PolicyName", &p.policy_name)?,
            document,
        });
    }
    if !findings.is_empty() && !template.allow_overly_permissive {
        return Err(TemplateError::OverlyPermissive {
            name: template.name.clone(),
            findings,
        });
    }

    let mut device_configuration = BTreeMap::new();
    for (key, e) in &template.device_configuration {
        let loc = Loc::new("DeviceConfiguration").key(key);
        let v = env
            .eval(e)
            .map_err(|err| eval_error(template, false, &loc, err))?;
        device_configuration.insert(key.clone(), v);
    }

    Ok(RenderedProvisioning {
        template: template.name.clone(),
        thing: rendered_thing,
        certificate,
        policies,
        device_configuration,
    })
}
