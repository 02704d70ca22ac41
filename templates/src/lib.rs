//! fleetcert's provisioning templates: the AWS IoT provisioning-template grammar (YAML or
//! JSON), rendering from certificate fields, policy documents and the least-privilege lint.
//!
//! - [`Template::parse`] reads a template into a typed model (`Parameters`, `Mappings`,
//!   `Resources` of type `AWS::IoT::Thing` / `AWS::IoT::Certificate` / `AWS::IoT::Policy`,
//!   `OverrideSettings`, `DeviceConfiguration`, and the intrinsics `Ref`, `Fn::Join`,
//!   `Fn::Sub`, `Fn::FindInMap`, `Fn::Split`, `Fn::Select`, also as YAML short forms).
//! - [`load`] parses and runs the least-privilege lint; [`check_syntax`] is `load` without
//!   the result.
//! - [`render`] evaluates a template for one device ([`certificate_parameters`] builds the
//!   JITP parameters), keeping policy variables such as `${iot:Connection.Thing.ThingName}`.
//! - [`effective_policy`] substitutes the thing name and client ID for one thing.
//! - [`lint_policy`] / [`lint_template`]: Device Defender's `IOT_POLICY_OVERLY_PERMISSIVE_CHECK`.
//! - [`Policy`] / [`evaluate_policies`]: AWS IoT policy evaluation — may this connection
//!   do this action on this resource — compiled once per policy version, cheap per request.
//!
//! Pure: no file, network or environment access.

mod evaluate;
mod expr;
mod guard;
mod model;
mod policy;
mod render;

pub use evaluate::{
    Action, AlternativeNames, ArnContext, CertificateContext, ConnectionContext, Decision,
    DenyReason, DistinguishedName, POLICY_VERSION, Policy, PolicyError, PolicyNote, Request,
    ThingContext, evaluate_policies,
};
pub use expr::{Expr, SubPart};
pub use guard::{MAX_ECHO_CHARS, MAX_FLOW_OPENINGS, MAX_NESTING_DEPTH, MAX_TEMPLATE_BYTES, clip};
pub use model::{
    CertificateResource, CertificateStatus, Mappings, OverrideAction, Parameter, ParameterType,
    PolicyResource, Resource, ResourceKind, Template, ThingResource,
};
pub use policy::{
    CLIENT_ID_VARIABLE, Finding, IS_ATTACHED_KEY, LintRule, OVERLY_PERMISSIVE_CHECK,
    REASON_BROAD_DATA_PLANE, THING_NAME_VARIABLE, effective_policy, lint_policy,
    validate_policy_document,
};
pub use render::{
    CertificateFields, RenderedCertificate, RenderedPolicy, RenderedProvisioning, RenderedThing,
    TemplateFinding, certificate_parameters, lint_template, params, render, validate_thing_name,
};

/// Name of the built-in template used when none is given.
pub const DEFAULT_TEMPLATE_NAME: &str = "default";

/// The built-in default template, in the AWS IoT provisioning-template grammar.
pub const DEFAULT_TEMPLATE_YAML: &str = include_str!("default-template.yaml");

/// Errors about templates. Messages name where the problem is and what it is; any
/// piece of the template they quote is cut to [`MAX_ECHO_CHARS`] characters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A template name [`validate_name`] refuses.
    #[error("invalid template name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The text is not YAML or JSON, is not a map at the top, or is too large or nested
    /// too deep to parse ([`MAX_TEMPLATE_BYTES`], [`MAX_NESTING_DEPTH`]).
    #[error("template {name:?} is not valid YAML or JSON: {reason}")]
    Syntax {
        /// The template's name.
        name: String,
        /// What is wrong, with line and column where known.
        reason: String,
    },
    /// The document has no `Resources` section, so there is nothing to provision.
    #[error("template {name:?} has no Resources section")]
    NoResources {
        /// The template's name.
        name: String,
    },
    /// The template breaks the grammar: `location` is like `resource "thing", property
    /// ThingName`.
    #[error("template {name:?}: {location}: {reason}")]
    Invalid {
        /// The template's name.
        name: String,
        /// Where in the template.
        location: String,
        /// What is wrong there.
        reason: String,
    },
    /// A parameter the template uses has no value and no `Default`.
    #[error(
        "template {name:?}: {location}: parameter {parameter:?} has no value and no Default: {why}"
    )]
    MissingParameter {
        /// The template's name.
        name: String,
        /// Where the parameter is used.
        location: String,
        /// The parameter's name, e.g. `AWS::IoT::Certificate::SerialNumber`.
        parameter: String,
        /// Why there is no value, e.g. which subject attribute the certificate lacks.
        why: String,
    },
    /// Evaluation failed with these parameter values (index out of range, no such mapping
    /// key, a list where a string belongs…).
    #[error("template {name:?}: {location}: {reason}")]
    Render {
        /// The template's name.
        name: String,
        /// Where evaluation failed.
        location: String,
        /// What went wrong.
        reason: String,
    },
    /// The rendered thing name is not `[a-zA-Z0-9:_-]{1,128}`.
    #[error("template {name:?}: thing name {thing_name:?} is not allowed: {reason}")]
    InvalidThingName {
        /// The template's name.
        name: String,
        /// The thing name as rendered.
        thing_name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A policy fails the least-privilege lint.
    #[error(
        "template {name:?} is refused: its policy is overly permissive ({check}): {list}",
        check = OVERLY_PERMISSIVE_CHECK,
        list = findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    OverlyPermissive {
        /// The template's name.
        name: String,
        /// Every finding, in resource and statement order.
        findings: Vec<TemplateFinding>,
    },
}

/// Template names are file stems in `<data-dir>/templates/`: keep them to a safe
/// alphabet so a name can never walk out of that directory.
pub fn validate_name(name: &str) -> Result<(), TemplateError> {
    let invalid = |reason| TemplateError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("it must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        return Err(invalid(
            "only letters, digits, '-', '_' and '.' are allowed, and it must not start with '.'",
        ));
    }
    Ok(())
}

/// Parses a template and runs the least-privilege lint over its policies: a template whose
/// policy is overly permissive is refused with the statements and the reasons.
pub fn load(name: &str, text: &str) -> Result<Template, TemplateError> {
    let template = Template::parse(name, text)?;
    let findings = lint_template(&template);
    if !findings.is_empty() {
        return Err(TemplateError::OverlyPermissive {
            name: name.to_owned(),
            findings,
        });
    }
    Ok(template)
}

/// Checks a template's text: it parses (YAML or JSON), follows the grammar, and its
/// policies pass the least-privilege lint. The same as [`load`], without the result.
pub fn check_syntax(name: &str, text: &str) -> Result<(), TemplateError> {
    load(name, text).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_parses() {
        check_syntax(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE_YAML).unwrap();
    }

    #[test]
    fn names_cannot_escape_the_templates_dir() {
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_name("sensor-v2").unwrap();
    }

    #[test]
    fn syntax_errors_name_the_template() {
        let err = check_syntax("broken", "Resources: [").unwrap_err();
        assert!(err.to_string().contains("broken"));
        let err = check_syntax("empty", "Parameters: {}").unwrap_err();
        assert!(matches!(err, TemplateError::NoResources { .. }));
    }
}
