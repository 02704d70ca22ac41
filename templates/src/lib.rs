//! fleetcert's provisioning templates.
//!
//! For now: the name rule for templates and the built-in default template (a thing per
//! device with a least-privilege policy scoped by `${iot:Connection.Thing.ThingName}`).
//! The full AWS IoT template grammar, rendering and the least-privilege lint come with
//! the JITP server.
#![forbid(unsafe_code)]

/// Name of the built-in template used when none is given.
pub const DEFAULT_TEMPLATE_NAME: &str = "default";

/// The built-in default template, in the AWS IoT provisioning-template grammar.
pub const DEFAULT_TEMPLATE_YAML: &str = include_str!("default-template.yaml");

/// Errors about templates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("invalid template name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("template {name:?} is not valid YAML or JSON: {reason}")]
    Syntax { name: String, reason: String },
    #[error("template {name:?} has no Resources section")]
    NoResources { name: String },
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

/// Checks that a template's text parses as YAML (JSON is YAML) and has `Resources`.
/// The full grammar check arrives with template rendering.
pub fn check_syntax(name: &str, text: &str) -> Result<(), TemplateError> {
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| TemplateError::Syntax {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
    if value.get("Resources").is_none() {
        return Err(TemplateError::NoResources {
            name: name.to_owned(),
        });
    }
    Ok(())
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
