//! The provisioning templates a server uses: loaded once at start (parsed and linted),
//! rendered per first connect, with AWS OverrideSettings applied to the existing thing.
use crate::LifecycleError;
use crate::datadir::DataDir;
use fleetcert_ca::DeviceIdentity;
use fleetcert_registry::{PolicyWrite, ThingDetails};
use fleetcert_templates::{CertificateFields, OverrideAction, Template, TemplateError};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What a template produced for one device, ready for a
/// [`fleetcert_registry::Registration`].
#[derive(Debug, Clone)]
pub(crate) struct RenderedRegistration {
    pub thing_name: String,
    pub details: ThingDetails,
    pub policies: Vec<PolicyWrite>,
}

/// Reads a template file of `<data-dir>/templates/` (`dir`): it must be a regular file
/// inside `dir` — a symbolic link is followed only if it resolves inside the directory —
/// of at most [`fleetcert_templates::MAX_TEMPLATE_BYTES`]. Never blocks on a FIFO or a
/// device. Errors name the file and the problem, never its contents.
pub fn read_template_file(dir: &Path, path: &Path) -> Result<String, LifecycleError> {
    let real_dir = std::fs::canonicalize(dir).map_err(|e| LifecycleError::read(dir, e))?;
    let real = std::fs::canonicalize(path).map_err(|e| LifecycleError::read(path, e))?;
    if !real.starts_with(&real_dir) {
        return Err(LifecycleError::BadFile {
            path: path.to_owned(),
            reason: "a symbolic link to a file outside the templates directory: not followed \
                     (copy the template into the directory instead)"
                .into(),
        });
    }
    read_regular(&real, path, rustix::fs::OFlags::NOFOLLOW)
}

/// Reads a template file named on the command line (`templates lint FILE`): a regular
/// file (symbolic links followed) of at most [`fleetcert_templates::MAX_TEMPLATE_BYTES`].
pub fn read_template_path(path: &Path) -> Result<String, LifecycleError> {
    read_regular(path, path, rustix::fs::OFlags::empty())
}

fn read_regular(
    open: &Path,
    shown: &Path,
    extra: rustix::fs::OFlags,
) -> Result<String, LifecycleError> {
    use rustix::fs::{Mode, OFlags};
    let bad = |reason: String| LifecycleError::BadFile {
        path: shown.to_owned(),
        reason,
    };
    // Non-blocking: opening a FIFO must not wait for a writer.
    let fd = rustix::fs::open(
        open,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | extra,
        Mode::empty(),
    )
    .map_err(|e| LifecycleError::read(shown, std::io::Error::from(e)))?;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| LifecycleError::read(shown, e))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let limit = fleetcert_templates::MAX_TEMPLATE_BYTES;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| LifecycleError::read(shown, e))?;
    if bytes.len() > limit {
        return Err(bad(format!(
            "larger than {limit} bytes, the limit for a template"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The template files of `dir` (`<stem>.yaml|yml|json`), sorted by name; none if the
/// directory does not exist.
pub fn template_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, LifecycleError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(LifecycleError::read(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| LifecycleError::read(dir, e))?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        if let (Some(stem), true) = (
            path.file_stem().and_then(|s| s.to_str()),
            matches!(ext, "yaml" | "yml" | "json"),
        ) {
            found.push((stem.to_owned(), path.clone()));
        }
    }
    found.sort();
    Ok(found)
}

pub(crate) struct TemplateSet {
    templates: HashMap<String, Template>,
}

impl TemplateSet {
    /// Every template in `<data-dir>/templates/` plus the built-in `default` (unless a
    /// file overrides it). A template that fails the least-privilege lint is refused,
    /// naming the statement and the reason, unless `allow_overly_permissive`.
    pub(crate) fn load(
        data: &DataDir,
        default_template: &str,
        allow_overly_permissive: bool,
    ) -> Result<Self, LifecycleError> {
        let mut templates = HashMap::new();
        let parse = |name: &str, text: &str| -> Result<Template, LifecycleError> {
            Ok(if allow_overly_permissive {
                let mut template = Template::parse(name, text)?;
                template.allow_overly_permissive = true;
                template
            } else {
                fleetcert_templates::load(name, text)?
            })
        };
        let dir = data.templates_dir();
        for (stem, path) in template_files(&dir)? {
            fleetcert_templates::validate_name(&stem)?;
            let text = read_template_file(&dir, &path)?;
            templates.insert(stem.clone(), parse(&stem, &text)?);
        }
        if !templates.contains_key(fleetcert_templates::DEFAULT_TEMPLATE_NAME) {
            templates.insert(
                fleetcert_templates::DEFAULT_TEMPLATE_NAME.to_owned(),
                parse(
                    fleetcert_templates::DEFAULT_TEMPLATE_NAME,
                    fleetcert_templates::DEFAULT_TEMPLATE_YAML,
                )?,
            );
        }
        if !templates.contains_key(default_template) {
            return Err(LifecycleError::TemplateNotFound {
                name: default_template.to_owned(),
                dir,
            });
        }
        Ok(TemplateSet { templates })
    }

    /// Renders `name` for a device and merges the result into the thing's `current`
    /// details.
    pub(crate) fn render(
        &self,
        name: &str,
        identity: &DeviceIdentity,
        current: &ThingDetails,
    ) -> Result<RenderedRegistration, TemplateError> {
        let params = fleetcert_templates::certificate_parameters(&CertificateFields {
            common_name: identity.common_name.clone(),
            serial_number: identity.serial_number.clone(),
            country: identity.country.clone(),
            organization: identity.organization.clone(),
            organizational_unit: identity.organizational_unit.clone(),
            distinguished_name_qualifier: identity.distinguished_name_qualifier.clone(),
            state_name: identity.state_name.clone(),
            id: Some(identity.fingerprint_sha256_hex.clone()),
        });
        let rendered = self.render_with_parameters(name, &params)?;
        Self::merge(name, &rendered, current)
    }
}

impl TemplateSet {
    /// Whether a template of this name is loaded.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.templates.contains_key(name)
    }

    /// Renders `name` with parameter values: a certificate's (JITP), or RegisterThing's
    /// (the device's, plus `AWS::IoT::Certificate::Id`, which the caller sets).
    pub(crate) fn render_with_parameters(
        &self,
        name: &str,
        params: &std::collections::BTreeMap<String, String>,
    ) -> Result<fleetcert_templates::RenderedProvisioning, TemplateError> {
        let template = self
            .templates
            .get(name)
            .ok_or_else(|| TemplateError::Invalid {
                name: name.to_owned(),
                location: "template".into(),
                reason: "not loaded by this server (add it to <data-dir>/templates/ and restart)"
                    .into(),
            })?;
        fleetcert_templates::render(template, params)
    }

    /// A rendered template as a registration, merged into the thing's `current` details
    /// (AWS OverrideSettings).
    pub(crate) fn merge(
        name: &str,
        rendered: &fleetcert_templates::RenderedProvisioning,
        current: &ThingDetails,
    ) -> Result<RenderedRegistration, TemplateError> {
        let details = apply_overrides(name, current, &rendered.thing)?;
        let policies = rendered
            .policies
            .iter()
            .map(|p| PolicyWrite {
                // AWS names a nameless policy itself; ours is stable per template.
                name: p
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{name}-{}", p.logical_id)),
                document: p.document.clone(),
            })
            .collect();
        Ok(RenderedRegistration {
            thing_name: rendered.thing.name.clone(),
            details,
            policies,
        })
    }
}

/// AWS OverrideSettings against the thing as it exists. Without a setting, a property
/// the thing does not have yet is filled in and one it has is kept: operator-set values
/// are never overwritten silently.
fn apply_overrides(
    template: &str,
    current: &ThingDetails,
    rendered: &fleetcert_templates::RenderedThing,
) -> Result<ThingDetails, TemplateError> {
    let action = |property: &str| rendered.override_settings.get(property).copied();
    let conflict = |property: &str| TemplateError::Render {
        name: template.to_owned(),
        location: format!(
            "resource {:?}, OverrideSettings {property}",
            rendered.logical_id
        ),
        reason: "FAIL: the existing thing has a different value".into(),
    };
    let scalar = |property: &str,
                  existing: &Option<String>,
                  new: &Option<String>|
     -> Result<Option<String>, TemplateError> {
        match (action(property), existing, new) {
            (_, _, None) => Ok(existing.clone()),
            (Some(OverrideAction::Replace | OverrideAction::Merge), _, Some(_)) => Ok(new.clone()),
            (Some(OverrideAction::Fail), Some(old), Some(n)) if old != n => Err(conflict(property)),
            (_, None, Some(_)) => Ok(new.clone()),
            (_, Some(_), Some(_)) => Ok(existing.clone()),
        }
    };
    let thing_type = scalar("ThingTypeName", &current.thing_type, &rendered.thing_type)?;
    let billing_group = scalar(
        "BillingGroup",
        &current.billing_group,
        &rendered.billing_group,
    )?;
    let attributes = match action("AttributePayload") {
        Some(OverrideAction::Replace) => rendered.attributes.clone(),
        Some(OverrideAction::Fail)
            if !current.attributes.is_empty() && current.attributes != rendered.attributes =>
        {
            return Err(conflict("AttributePayload"));
        }
        Some(OverrideAction::DoNothing) if !current.attributes.is_empty() => {
            current.attributes.clone()
        }
        _ => {
            // MERGE, or no setting: template values fill in, existing keys win unless MERGE.
            let mut merged = current.attributes.clone();
            for (k, v) in &rendered.attributes {
                if action("AttributePayload") == Some(OverrideAction::Merge)
                    || !merged.contains_key(k)
                {
                    merged.insert(k.clone(), v.clone());
                }
            }
            merged
        }
    };
    let mut groups = match action("ThingGroups") {
        Some(OverrideAction::Replace) => rendered.groups.clone(),
        Some(OverrideAction::Fail) if !current.groups.is_empty() => {
            let mut a = current.groups.clone();
            let mut b = rendered.groups.clone();
            a.sort();
            b.sort();
            if a != b {
                return Err(conflict("ThingGroups"));
            }
            a
        }
        Some(OverrideAction::DoNothing) if !current.groups.is_empty() => current.groups.clone(),
        _ => current
            .groups
            .iter()
            .chain(rendered.groups.iter())
            .cloned()
            .collect(),
    };
    groups.sort();
    groups.dedup();
    Ok(ThingDetails {
        thing_type,
        attributes,
        groups,
        billing_group,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rendered(overrides: &[(&str, OverrideAction)]) -> fleetcert_templates::RenderedThing {
        fleetcert_templates::RenderedThing {
            logical_id: "thing".into(),
            name: "dev".into(),
            thing_type: Some("sensor".into()),
            attributes: BTreeMap::from([("fw".into(), "2".into()), ("site".into(), "b".into())]),
            groups: vec!["new".into()],
            billing_group: None,
            override_settings: overrides.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn existing() -> ThingDetails {
        ThingDetails {
            thing_type: Some("meter".into()),
            attributes: BTreeMap::from([("fw".into(), "1".into())]),
            groups: vec!["old".into()],
            billing_group: Some("bg".into()),
        }
    }

    #[test]
    fn an_empty_thing_takes_the_template_values() {
        let d = apply_overrides("t", &ThingDetails::default(), &rendered(&[])).unwrap();
        assert_eq!(d.thing_type.as_deref(), Some("sensor"));
        assert_eq!(d.attributes.len(), 2);
        assert_eq!(d.groups, ["new"]);
    }

    #[test]
    fn without_settings_existing_values_are_kept_and_gaps_filled() {
        let d = apply_overrides("t", &existing(), &rendered(&[])).unwrap();
        assert_eq!(d.thing_type.as_deref(), Some("meter"));
        assert_eq!(d.attributes["fw"], "1");
        assert_eq!(d.attributes["site"], "b");
        assert_eq!(d.groups, ["new", "old"]);
        assert_eq!(d.billing_group.as_deref(), Some("bg"));
    }

    #[test]
    fn replace_merge_do_nothing_and_fail() {
        let d = apply_overrides(
            "t",
            &existing(),
            &rendered(&[
                ("ThingTypeName", OverrideAction::Replace),
                ("AttributePayload", OverrideAction::Merge),
                ("ThingGroups", OverrideAction::DoNothing),
            ]),
        )
        .unwrap();
        assert_eq!(d.thing_type.as_deref(), Some("sensor"));
        assert_eq!(d.attributes["fw"], "2");
        assert_eq!(d.groups, ["old"]);
        let err = apply_overrides(
            "t",
            &existing(),
            &rendered(&[("ThingTypeName", OverrideAction::Fail)]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ThingTypeName"), "{err}");
    }
}
