//! The typed template model and its parser.

use crate::TemplateError;
use crate::expr::{Expr, Shape, SubPart};
use crate::policy;
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value as Y;
use std::collections::BTreeMap;
use std::fmt;

/// A parsed provisioning template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The template's name (file stem), used in errors.
    pub name: String,
    /// `Parameters`: the values the template takes, by name.
    pub parameters: BTreeMap<String, Parameter>,
    /// `Mappings`: map name -> top-level key -> second-level key -> value (a string, number
    /// or list of strings).
    pub mappings: Mappings,
    /// The resources in document order.
    pub resources: Vec<Resource>,
    /// Fleet provisioning's `DeviceConfiguration` (key -> value, intrinsics allowed).
    pub device_configuration: BTreeMap<String, Expr>,
    /// Admitted although its policies fail the least-privilege lint (an operator's
    /// `--allow-overly-permissive`): rendering does not refuse its policies either.
    /// `false` from [`Template::parse`].
    pub allow_overly_permissive: bool,
}

/// Map name -> top-level key -> second-level key -> value.
pub type Mappings = BTreeMap<String, BTreeMap<String, BTreeMap<String, serde_json::Value>>>;

/// A declared parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    /// `String` or `Number`.
    pub kind: ParameterType,
    /// `Default`, as a string.
    pub default: Option<String>,
}

/// A parameter's `Type`. Values always reach the template as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParameterType {
    /// Any string.
    String,
    /// A string that must parse as a number; rendering fails otherwise.
    Number,
}

/// One entry of `Resources`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The logical id (the key under `Resources`).
    pub logical_id: String,
    /// The resource's `Type` and its `Properties`.
    pub kind: ResourceKind,
    /// `OverrideSettings`: property -> what to do when the resource already exists.
    pub override_settings: BTreeMap<String, OverrideAction>,
}

/// A resource's `Type` with its `Properties`: the three types AWS IoT provisioning
/// templates allow.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ResourceKind {
    /// `AWS::IoT::Thing`.
    Thing(ThingResource),
    /// `AWS::IoT::Certificate`.
    Certificate(CertificateResource),
    /// `AWS::IoT::Policy`.
    Policy(PolicyResource),
}

impl ResourceKind {
    /// The `Type` as written in templates: `AWS::IoT::Thing`, `AWS::IoT::Certificate` or
    /// `AWS::IoT::Policy`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ResourceKind::Thing(_) => THING,
            ResourceKind::Certificate(_) => CERTIFICATE,
            ResourceKind::Policy(_) => POLICY,
        }
    }
}

/// `AWS::IoT::Thing` properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ThingResource {
    /// `ThingName` (required); the rendered value must be `[a-zA-Z0-9:_-]{1,128}`.
    pub thing_name: Expr,
    /// `ThingTypeName`.
    pub thing_type_name: Option<Expr>,
    /// `AttributePayload`: attribute name -> value.
    pub attribute_payload: BTreeMap<String, Expr>,
    /// `ThingGroups`: a list, or an intrinsic that yields one (`Fn::Split`…).
    pub thing_groups: Option<Expr>,
    /// `BillingGroup`.
    pub billing_group: Option<Expr>,
}

/// `AWS::IoT::Certificate` properties.
///
/// At least one of `CertificateId`, `CertificatePem` and `CertificateSigningRequest` is
/// present (the parser refuses a certificate resource with none).
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateResource {
    /// `CertificateId`: an existing certificate (in JITP templates, usually
    /// `Ref: AWS::IoT::Certificate::Id`).
    pub certificate_id: Option<Expr>,
    /// `CertificatePem`: the device certificate, PEM.
    pub certificate_pem: Option<Expr>,
    /// `CACertificatePem`: the CA that issued `CertificatePem`.
    pub ca_certificate_pem: Option<Expr>,
    /// `CertificateSigningRequest`: a CSR to issue the certificate from.
    pub certificate_signing_request: Option<Expr>,
    /// `Status`: `ACTIVE` or `INACTIVE` in any case, checked when literal
    /// ([`CertificateStatus`]).
    pub status: Option<Expr>,
}

/// `AWS::IoT::Policy` properties.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyResource {
    /// `PolicyName`: alone, an existing policy to attach; with a document, the name to
    /// give it.
    pub policy_name: Option<Expr>,
    /// The document as an expression tree (a document written as an escaped JSON string is
    /// parsed into a literal tree; policy variables stay in its strings).
    pub policy_document: Option<Expr>,
    /// The document with parameters left as `${Name}` placeholders: what the lint checks
    /// when the template is loaded.
    pub lint_view: Option<serde_json::Value>,
}

/// What AWS does with a property when the resource already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverrideAction {
    /// `DO_NOTHING`: keep the existing value.
    DoNothing,
    /// `REPLACE`: overwrite it with the template's value.
    Replace,
    /// `FAIL`: refuse the provisioning if the existing value differs from the template's.
    Fail,
    /// `MERGE`: add the template's attributes or groups to the existing ones. Only for
    /// `AttributePayload` and `ThingGroups`.
    Merge,
}

impl OverrideAction {
    /// AWS's spelling: `DO_NOTHING`, `REPLACE`, `FAIL`, `MERGE`.
    pub fn as_str(self) -> &'static str {
        match self {
            OverrideAction::DoNothing => "DO_NOTHING",
            OverrideAction::Replace => "REPLACE",
            OverrideAction::Fail => "FAIL",
            OverrideAction::Merge => "MERGE",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::DoNothing, Self::Replace, Self::Fail, Self::Merge]
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for OverrideAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate's status as a template sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertificateStatus {
    /// `ACTIVE`: the device may connect with it.
    Active,
    /// `INACTIVE`: registered, but AWS IoT refuses connections with it until activated.
    Inactive,
}

impl CertificateStatus {
    /// AWS's spelling: `ACTIVE` or `INACTIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateStatus::Active => "ACTIVE",
            CertificateStatus::Inactive => "INACTIVE",
        }
    }

    /// `ACTIVE`, `Active`, `active`… (AWS accepts any letter case).
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Inactive]
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl fmt::Display for CertificateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) const THING: &str = "AWS::IoT::Thing";
pub(crate) const CERTIFICATE: &str = "AWS::IoT::Certificate";
pub(crate) const POLICY: &str = "AWS::IoT::Policy";

const THING_PROPERTIES: &[&str] = &[
    "ThingName",
    "ThingTypeName",
    "AttributePayload",
    "ThingGroups",
    "BillingGroup",
];
const CERTIFICATE_PROPERTIES: &[&str] = &[
    "CertificateId",
    "CertificatePem",
    "CACertificatePem",
    "CertificateSigningRequest",
    "Status",
];
const POLICY_PROPERTIES: &[&str] = &["PolicyName", "PolicyDocument"];

/// Where in a template something is: `resource "thing", property ThingGroups[1]`.
#[derive(Debug, Clone)]
pub(crate) struct Loc {
    scope: String,
    path: String,
    /// Inside an intrinsic function's arguments the path stays at the property: the
    /// reason names the function.
    frozen: bool,
}

impl Loc {
    pub(crate) fn new(scope: impl Into<String>) -> Self {
        Loc {
            scope: scope.into(),
            path: String::new(),
            frozen: false,
        }
    }

    pub(crate) fn resource(logical_id: &str) -> Self {
        Loc::new(format!("resource {logical_id:?}"))
    }

    fn frozen(&self) -> Self {
        Loc {
            frozen: true,
            ..self.clone()
        }
    }

    pub(crate) fn key(&self, key: &str) -> Self {
        if self.frozen {
            return self.clone();
        }
        let mut path = self.path.clone();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        Loc {
            scope: self.scope.clone(),
            path,
            frozen: false,
        }
    }

    pub(crate) fn index(&self, index: usize) -> Self {
        if self.frozen {
            return self.clone();
        }
        Loc {
            scope: self.scope.clone(),
            path: format!("{}[{index}]", self.path),
            frozen: false,
        }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.scope)
        } else if self.scope.starts_with("resource ") {
            write!(f, "{}, property {}", self.scope, self.path)
        } else {
            write!(f, "{} {}", self.scope, self.path)
        }
    }
}

/// A scalar as a string (numbers and booleans as YAML/JSON write them).
pub(crate) fn scalar_string(v: &Y) -> Option<String> {
    match v {
        Y::String(s) => Some(s.clone()),
        Y::Number(n) => Some(n.to_string()),
        Y::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn describe(v: &Y) -> &'static str {
    match v {
        Y::Null => "null",
        Y::Bool(_) => "a boolean",
        Y::Number(_) => "a number",
        Y::String(_) => "a string",
        Y::Sequence(_) => "a list",
        Y::Mapping(_) => "a map",
        Y::Tagged(_) => "a tagged value",
    }
}

fn number(n: &serde_yaml_ng::Number) -> Result<serde_json::Number, String> {
    if let Some(i) = n.as_i64() {
        Ok(i.into())
    } else if let Some(u) = n.as_u64() {
        Ok(u.into())
    } else {
        n.as_f64()
            .and_then(serde_json::Number::from_f64)
            .ok_or_else(|| format!("{n} is not a usable number"))
    }
}

/// Parameters a template may reference without declaring them, because AWS supplies them:
/// fleet provisioning passes `AWS::IoT::Certificate::Id` (the AWS IoT developer guide's own
/// fleet provisioning template uses it undeclared). fleetcert supplies it for every device
/// (the SHA-256 of the certificate DER, as AWS computes it). The other
/// `AWS::IoT::Certificate::*` parameters must be declared, as AWS requires for JITP.
pub(crate) const SUPPLIED_PARAMETERS: &[&str] = &[crate::render::params::ID];

/// The intrinsic functions fleetcert evaluates.
pub(crate) const INTRINSICS: &str = "Ref, Fn::Join, Fn::Sub, Fn::FindInMap, Fn::Split, Fn::Select";

struct Parser<'a> {
    name: &'a str,
    parameters: &'a BTreeMap<String, Parameter>,
    mappings: &'a Mappings,
}

impl Parser<'_> {
    fn err(&self, loc: &Loc, reason: impl Into<String>) -> TemplateError {
        TemplateError::Invalid {
            name: self.name.to_owned(),
            location: loc.to_string(),
            reason: reason.into(),
        }
    }

    /// A value that may contain intrinsics anywhere.
    fn expr(&self, v: &Y, loc: &Loc) -> Result<Expr, TemplateError> {
        Ok(match v {
            Y::Null => Expr::Null,
            Y::Bool(b) => Expr::Bool(*b),
            Y::Number(n) => Expr::Number(number(n).map_err(|r| self.err(loc, r))?),
            Y::String(s) => Expr::String(s.clone()),
            Y::Sequence(items) => Expr::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.expr(item, &loc.index(i)))
                    .collect::<Result<_, _>>()?,
            ),
            Y::Mapping(map) => {
                if map.len() == 1 {
                    let (k, arg) = map.iter().next().expect("one entry");
                    if let Some(function) = k.as_str()
                        && (function == "Ref" || function.starts_with("Fn::"))
                    {
                        return self.intrinsic(function, arg, loc);
                    }
                }
                let mut out = BTreeMap::new();
                for (k, v) in map {
                    let key = scalar_string(k).ok_or_else(|| {
                        self.err(
                            loc,
                            format!("map keys must be strings, found {}", describe(k)),
                        )
                    })?;
                    let value = self.expr(v, &loc.key(&key))?;
                    out.insert(key, value);
                }
                Expr::Map(out)
            }
            Y::Tagged(tagged) => {
                let tag = tagged.tag.to_string();
                let short = tag.trim_start_matches('!');
                let function = match short {
                    "Ref" => "Ref".to_owned(),
                    "Join" | "Sub" | "FindInMap" | "Split" | "Select" => format!("Fn::{short}"),
                    _ => {
                        return Err(self.err(
                            loc,
                            format!(
                                "unsupported YAML tag {tag} (fleetcert supports !Ref, !Join, \
                                 !Sub, !FindInMap, !Split, !Select)"
                            ),
                        ));
                    }
                };
                return self.intrinsic(&function, &tagged.value, loc);
            }
        })
    }

    /// A value that must be (or evaluate to) a string.
    fn string_expr(&self, v: &Y, loc: &Loc) -> Result<Expr, TemplateError> {
        let e = self.expr(v, loc)?;
        match e.shape() {
            Shape::Scalar | Shape::Unknown => Ok(e),
            other => Err(self.err(loc, format!("must be a string, found {other}"))),
        }
    }

    /// A value that must be (or evaluate to) a list.
    fn list_expr(&self, v: &Y, loc: &Loc, what: &str) -> Result<Expr, TemplateError> {
        let e = self.expr(v, loc)?;
        match e.shape() {
            Shape::List | Shape::Unknown => Ok(e),
            other => Err(self.err(loc, format!("{what} must be a list, found {other}"))),
        }
    }

    fn args<'y>(
        &self,
        function: &str,
        arg: &'y Y,
        loc: &Loc,
        arity: usize,
        form: &str,
    ) -> Result<&'y [Y], TemplateError> {
        match arg {
            Y::Sequence(items) if items.len() == arity => Ok(items),
            Y::Sequence(items) => Err(self.err(
                loc,
                format!(
                    "{function} expects {arity} arguments {form}, got {}",
                    items.len()
                ),
            )),
            other => Err(self.err(
                loc,
                format!(
                    "{function} expects a list of {arity} arguments {form}, got {}",
                    describe(other)
                ),
            )),
        }
    }

    fn literal_string<'y>(
        &self,
        v: &'y Y,
        loc: &Loc,
        function: &str,
        what: &str,
    ) -> Result<&'y str, TemplateError> {
        v.as_str().ok_or_else(|| {
            self.err(
                loc,
                format!(
                    "{function}: the {what} must be a literal string, got {}",
                    describe(v)
                ),
            )
        })
    }

    fn intrinsic(&self, function: &str, arg: &Y, loc: &Loc) -> Result<Expr, TemplateError> {
        let loc = &loc.frozen();
        match function {
            "Ref" => {
                let Some(parameter) = arg.as_str() else {
                    return Err(self.err(
                        loc,
                        format!("Ref expects a parameter name, got {}", describe(arg)),
                    ));
                };
                if !self.is_parameter(parameter) {
                    return Err(self.err(
                        loc,
                        format!("Ref to unknown parameter {parameter:?}{}", self.declared()),
                    ));
                }
                Ok(Expr::Ref(parameter.to_owned()))
            }
            "Fn::Join" => {
                let args = self.args(function, arg, loc, 2, "[delimiter, [values…]]")?;
                let delimiter = self.literal_string(&args[0], loc, function, "delimiter")?;
                let list = self.list_expr(&args[1], loc, "Fn::Join: the values")?;
                if let Expr::List(items) = &list {
                    for item in items {
                        if !matches!(item.shape(), Shape::Scalar | Shape::Unknown) {
                            return Err(self.err(
                                loc,
                                format!(
                                    "Fn::Join: every value must be a string, found {}",
                                    item.shape()
                                ),
                            ));
                        }
                    }
                }
                Ok(Expr::Join {
                    delimiter: delimiter.to_owned(),
                    list: Box::new(list),
                })
            }
            "Fn::Split" => {
                let args = self.args(function, arg, loc, 2, "[delimiter, source string]")?;
                let delimiter = self.literal_string(&args[0], loc, function, "delimiter")?;
                if delimiter.is_empty() {
                    return Err(self.err(loc, "Fn::Split: the delimiter must not be empty"));
                }
                let source = self
                    .string_expr(&args[1], loc)
                    .map_err(|_| self.err(loc, "Fn::Split: the source must be a string"))?;
                Ok(Expr::Split {
                    delimiter: delimiter.to_owned(),
                    source: Box::new(source),
                })
            }
            "Fn::Select" => {
                let args = self.args(function, arg, loc, 2, "[index, [values…]]")?;
                let index = match &args[0] {
                    Y::Number(n) => match n.as_u64() {
                        Some(i) => Expr::Number(i.into()),
                        None => {
                            return Err(self.err(
                                loc,
                                format!(
                                    "Fn::Select: the index must be a whole number ≥ 0, got {n}"
                                ),
                            ));
                        }
                    },
                    Y::String(s) => {
                        match s.trim().parse::<u64>() {
                            Ok(i) => Expr::Number(i.into()),
                            Err(_) => {
                                return Err(self.err(
                                loc,
                                format!("Fn::Select: the index must be a whole number ≥ 0, got {s:?}"),
                            ));
                            }
                        }
                    }
                    other => {
                        let e = self.expr(other, loc)?;
                        if !matches!(e, Expr::Ref(_) | Expr::FindInMap { .. }) {
                            return Err(self.err(
                                loc,
                                "Fn::Select: the index must be a number, a Ref or a Fn::FindInMap",
                            ));
                        }
                        e
                    }
                };
                let list = self.list_expr(&args[1], loc, "Fn::Select: the values")?;
                if let (Expr::Number(i), Expr::List(items)) = (&index, &list) {
                    let i = i.as_u64().unwrap_or(u64::MAX);
                    if i >= items.len() as u64 {
                        return Err(self.err(
                            loc,
                            format!(
                                "Fn::Select: index {i} is out of range for a list of {} values",
                                items.len()
                            ),
                        ));
                    }
                }
                Ok(Expr::Select {
                    index: Box::new(index),
                    list: Box::new(list),
                })
            }
            "Fn::FindInMap" => {
                let args = self.args(
                    function,
                    arg,
                    loc,
                    3,
                    "[map name, top-level key, second-level key]",
                )?;
                let mut keys = Vec::with_capacity(3);
                for (arg, what) in
                    args.iter()
                        .zip(["map name", "top-level key", "second-level key"])
                {
                    let e = self.expr(arg, loc)?;
                    if !matches!(e.shape(), Shape::Scalar | Shape::Unknown) {
                        return Err(self.err(
                            loc,
                            format!(
                                "Fn::FindInMap: the {what} must be a string, found {}",
                                e.shape()
                            ),
                        ));
                    }
                    keys.push(e);
                }
                self.check_mapping_keys(&keys, loc)?;
                let second = keys.pop().expect("three keys");
                let top = keys.pop().expect("three keys");
                let map = keys.pop().expect("three keys");
                Ok(Expr::FindInMap {
                    map: Box::new(map),
                    top_key: Box::new(top),
                    second_key: Box::new(second),
                })
            }
            "Fn::Sub" => {
                let (text, vars_yaml) = match arg {
                    Y::String(s) => (s.as_str(), None),
                    Y::Sequence(items) if items.len() == 2 => {
                        let text = self.literal_string(&items[0], loc, function, "string")?;
                        let Y::Mapping(vars) = &items[1] else {
                            return Err(self.err(
                                loc,
                                format!(
                                    "Fn::Sub: the variables must be a map, got {}",
                                    describe(&items[1])
                                ),
                            ));
                        };
                        (text, Some(vars))
                    }
                    Y::Sequence(items) => {
                        return Err(self.err(
                            loc,
                            format!(
                                "Fn::Sub expects a string or 2 arguments [string, {{variables}}], \
                                 got {} arguments",
                                items.len()
                            ),
                        ));
                    }
                    other => {
                        return Err(self.err(
                            loc,
                            format!(
                                "Fn::Sub expects a string or [string, {{variables}}], got {}",
                                describe(other)
                            ),
                        ));
                    }
                };
                let mut vars = BTreeMap::new();
                for (k, v) in vars_yaml.into_iter().flatten() {
                    let Some(key) = k.as_str() else {
                        return Err(self.err(loc, "Fn::Sub: variable names must be strings"));
                    };
                    let e = self.expr(v, loc)?;
                    if !matches!(e.shape(), Shape::Scalar | Shape::Unknown) {
                        return Err(self.err(
                            loc,
                            format!(
                                "Fn::Sub: variable {key:?} must be a string, found {}",
                                e.shape()
                            ),
                        ));
                    }
                    vars.insert(key.to_owned(), e);
                }
                let parts = parse_sub(text, |name| {
                    if vars.contains_key(name) || self.is_parameter(name) {
                        Ok(true)
                    } else if is_policy_variable(name) {
                        Ok(false)
                    } else {
                        Err(self.err(
                            loc,
                            format!(
                                "Fn::Sub: ${{{name}}} names no variable and no parameter{}",
                                self.declared()
                            ),
                        ))
                    }
                })?;
                Ok(Expr::Sub { parts, vars })
            }
            other => Err(self.err(
                loc,
                format!("unsupported intrinsic function {other} (fleetcert supports {INTRINSICS})"),
            )),
        }
    }

    /// A declared parameter, or one AWS supplies without a declaration
    /// ([`SUPPLIED_PARAMETERS`]).
    fn is_parameter(&self, name: &str) -> bool {
        self.parameters.contains_key(name) || SUPPLIED_PARAMETERS.contains(&name)
    }

    fn declared(&self) -> String {
        if self.parameters.is_empty() {
            " (the template declares no Parameters)".to_owned()
        } else {
            format!(
                " (declared: {})",
                self.parameters
                    .keys()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// Checks the literal parts of a `Fn::FindInMap` against `Mappings`.
    fn check_mapping_keys(&self, keys: &[Expr], loc: &Loc) -> Result<(), TemplateError> {
        let Some(map_name) = keys[0].literal_string() else {
            return Ok(());
        };
        let Some(map) = self.mappings.get(&map_name) else {
            return Err(self.err(
                loc,
                format!("Fn::FindInMap: no mapping {map_name:?} in Mappings"),
            ));
        };
        let Some(top) = keys[1].literal_string() else {
            return Ok(());
        };
        let Some(second_level) = map.get(&top) else {
            return Err(self.err(
                loc,
                format!("Fn::FindInMap: mapping {map_name:?} has no key {top:?}"),
            ));
        };
        if let Some(second) = keys[2].literal_string()
            && !second_level.contains_key(&second)
        {
            return Err(self.err(
                loc,
                format!("Fn::FindInMap: mapping {map_name:?} has no key {top:?} -> {second:?}"),
            ));
        }
        Ok(())
    }
}

/// `iot:…` and `aws:…` policy variables and the `${*}`, `${?}`, `${$}` escapes.
fn is_policy_variable(name: &str) -> bool {
    name.starts_with("iot:") || name.starts_with("aws:") || matches!(name, "*" | "?" | "$")
}

/// Splits a `Fn::Sub` string into text and references. `${!x}` is the literal `${x}`;
/// `resolve(name)` says whether `${name}` is substituted (true) or kept as written (false,
/// for policy variables).
fn parse_sub(
    text: &str,
    mut resolve: impl FnMut(&str) -> Result<bool, TemplateError>,
) -> Result<Vec<SubPart>, TemplateError> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            literal.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let inner = &after[..end];
        if let Some(escaped) = inner.strip_prefix('!') {
            literal.push_str("${");
            literal.push_str(escaped);
            literal.push('}');
        } else if resolve(inner.trim())? {
            if !literal.is_empty() {
                parts.push(SubPart::Text(std::mem::take(&mut literal)));
            }
            parts.push(SubPart::Var(inner.trim().to_owned()));
        } else {
            literal.push_str(&rest[start..start + 2 + end + 1]);
        }
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(SubPart::Text(literal));
    }
    Ok(parts)
}

impl Template {
    /// Parses a template (YAML or JSON) into the typed model. Fails with the resource
    /// logical id and property named for an unknown resource type, a `Ref` to an unknown
    /// parameter, a malformed intrinsic, an invalid policy document… This does not run the
    /// least-privilege lint: see [`crate::load`] and [`crate::lint_template`].
    ///
    /// A text over [`crate::MAX_TEMPLATE_BYTES`] or nesting deeper than
    /// [`crate::MAX_NESTING_DEPTH`] is refused before parsing; errors quote at most
    /// [`crate::MAX_ECHO_CHARS`] characters of any input.
    pub fn parse(name: &str, text: &str) -> Result<Template, TemplateError> {
        crate::guard::check_input(name, text)?;
        Self::parse_document(name, text).map_err(TemplateError::bounded)
    }

    fn parse_document(name: &str, text: &str) -> Result<Template, TemplateError> {
        let syntax = |e: serde_yaml_ng::Error| TemplateError::Syntax {
            name: name.to_owned(),
            reason: e.to_string(),
        };
        let mut root: Y = serde_yaml_ng::from_str(text).map_err(syntax)?;
        // YAML merge keys (`<<: *anchor`), for templates that share blocks.
        root.apply_merge().map_err(syntax)?;
        let invalid = |location: &str, reason: String| TemplateError::Invalid {
            name: name.to_owned(),
            location: location.to_owned(),
            reason,
        };
        let Y::Mapping(root) = root else {
            return Err(TemplateError::Syntax {
                name: name.to_owned(),
                reason: format!("the template must be a map, found {}", describe(&root)),
            });
        };
        let mut sections: BTreeMap<String, &Y> = BTreeMap::new();
        for (k, v) in &root {
            let Some(key) = k.as_str() else {
                return Err(invalid(
                    "the template",
                    format!("section names must be strings, found {}", describe(k)),
                ));
            };
            if !matches!(
                key,
                "Parameters"
                    | "Mappings"
                    | "Resources"
                    | "DeviceConfiguration"
                    | "Description"
                    | "AWSTemplateFormatVersion"
            ) {
                return Err(invalid(
                    "the template",
                    format!(
                        "unknown section {key:?} (expected Parameters, Mappings, Resources, \
                         DeviceConfiguration)"
                    ),
                ));
            }
            sections.insert(key.to_owned(), v);
        }

        let parameters = parse_parameters(name, sections.get("Parameters").copied())?;
        let mappings = parse_mappings(name, sections.get("Mappings").copied())?;
        let parser = Parser {
            name,
            parameters: &parameters,
            mappings: &mappings,
        };

        let resources_yaml = match sections.get("Resources") {
            None | Some(Y::Null) => {
                return Err(TemplateError::NoResources {
                    name: name.to_owned(),
                });
            }
            Some(Y::Mapping(m)) if m.is_empty() => {
                return Err(TemplateError::NoResources {
                    name: name.to_owned(),
                });
            }
            Some(Y::Mapping(m)) => m,
            Some(other) => {
                return Err(invalid(
                    "Resources",
                    format!(
                        "must be a map of logical id -> resource, found {}",
                        describe(other)
                    ),
                ));
            }
        };
        let mut resources = Vec::new();
        for (k, v) in resources_yaml {
            let Some(logical_id) = scalar_string(k) else {
                return Err(invalid(
                    "Resources",
                    format!("logical ids must be strings, found {}", describe(k)),
                ));
            };
            resources.push(parser.resource(&logical_id, v)?);
        }
        let things = resources
            .iter()
            .filter(|r| matches!(r.kind, ResourceKind::Thing(_)))
            .count();
        let certificates = resources
            .iter()
            .filter(|r| matches!(r.kind, ResourceKind::Certificate(_)))
            .count();
        if things != 1 {
            return Err(invalid(
                "Resources",
                format!("a template must declare exactly one {THING} resource, found {things}"),
            ));
        }
        if certificates > 1 {
            return Err(invalid(
                "Resources",
                format!(
                    "a template may declare at most one {CERTIFICATE} resource, found {certificates}"
                ),
            ));
        }

        let mut device_configuration = BTreeMap::new();
        match sections.get("DeviceConfiguration") {
            None | Some(Y::Null) => {}
            Some(Y::Mapping(m)) => {
                let loc = Loc::new("DeviceConfiguration");
                for (k, v) in m {
                    let Some(key) = scalar_string(k) else {
                        return Err(invalid(
                            "DeviceConfiguration",
                            "keys must be strings".to_owned(),
                        ));
                    };
                    let e = parser.expr(v, &loc.key(&key))?;
                    device_configuration.insert(key, e);
                }
            }
            Some(other) => {
                return Err(invalid(
                    "DeviceConfiguration",
                    format!("must be a map, found {}", describe(other)),
                ));
            }
        }

        let mut template = Template {
            name: name.to_owned(),
            parameters,
            mappings,
            resources,
            device_configuration,
            allow_overly_permissive: false,
        };
        // The lint view of each policy: evaluated with parameters as placeholders.
        let views = template
            .resources
            .iter()
            .map(|r| match &r.kind {
                ResourceKind::Policy(p) => p
                    .policy_document
                    .as_ref()
                    .map(|doc| crate::render::policy_document(&template, &r.logical_id, doc, None))
                    .transpose(),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (resource, view) in template.resources.iter_mut().zip(views) {
            if let ResourceKind::Policy(p) = &mut resource.kind {
                p.lint_view = view;
            }
        }
        Ok(template)
    }

    /// The `AWS::IoT::Thing` resource (a parsed template has exactly one).
    pub fn thing(&self) -> Option<(&Resource, &ThingResource)> {
        self.resources.iter().find_map(|r| match &r.kind {
            ResourceKind::Thing(t) => Some((r, t)),
            _ => None,
        })
    }

    /// The `AWS::IoT::Certificate` resource, if any.
    pub fn certificate(&self) -> Option<(&Resource, &CertificateResource)> {
        self.resources.iter().find_map(|r| match &r.kind {
            ResourceKind::Certificate(c) => Some((r, c)),
            _ => None,
        })
    }

    /// The `AWS::IoT::Policy` resources, in document order.
    pub fn policies(&self) -> impl Iterator<Item = (&Resource, &PolicyResource)> {
        self.resources.iter().filter_map(|r| match &r.kind {
            ResourceKind::Policy(p) => Some((r, p)),
            _ => None,
        })
    }
}

fn parse_parameters(
    name: &str,
    section: Option<&Y>,
) -> Result<BTreeMap<String, Parameter>, TemplateError> {
    let invalid = |location: String, reason: String| TemplateError::Invalid {
        name: name.to_owned(),
        location,
        reason,
    };
    let mut out = BTreeMap::new();
    let map = match section {
        None | Some(Y::Null) => return Ok(out),
        Some(Y::Mapping(m)) => m,
        Some(other) => {
            return Err(invalid(
                "Parameters".into(),
                format!(
                    "must be a map of name -> {{Type, Default}}, found {}",
                    describe(other)
                ),
            ));
        }
    };
    for (k, v) in map {
        let Some(parameter) = k.as_str() else {
            return Err(invalid(
                "Parameters".into(),
                format!("parameter names must be strings, found {}", describe(k)),
            ));
        };
        let location = format!("parameter {parameter:?}");
        let Y::Mapping(fields) = v else {
            return Err(invalid(
                location,
                format!(
                    "must be a map with Type (and optionally Default), found {}",
                    describe(v)
                ),
            ));
        };
        let mut kind = None;
        let mut default = None;
        for (fk, fv) in fields {
            match fk.as_str() {
                Some("Type") => {
                    kind = Some(match fv.as_str() {
                        Some("String") => ParameterType::String,
                        Some("Number") => ParameterType::Number,
                        _ => {
                            return Err(invalid(
                                location,
                                format!(
                                    "Type must be \"String\" or \"Number\", found {}",
                                    scalar_string(fv).map_or_else(
                                        || describe(fv).to_owned(),
                                        |s| format!("{s:?}")
                                    )
                                ),
                            ));
                        }
                    });
                }
                Some("Default") => {
                    default = Some(scalar_string(fv).ok_or_else(|| {
                        invalid(
                            location.clone(),
                            format!(
                                "Default must be a string or a number, found {}",
                                describe(fv)
                            ),
                        )
                    })?);
                }
                Some("Description") => {}
                _ => {
                    return Err(invalid(
                        location,
                        format!(
                            "unknown key {} (expected Type, Default)",
                            scalar_string(fk)
                                .map_or_else(|| describe(fk).to_owned(), |s| format!("{s:?}"))
                        ),
                    ));
                }
            }
        }
        let Some(kind) = kind else {
            return Err(invalid(location, "has no Type".into()));
        };
        if kind == ParameterType::Number
            && let Some(d) = &default
            && d.parse::<f64>().is_err()
        {
            return Err(invalid(location, format!("Default {d:?} is not a number")));
        }
        out.insert(parameter.to_owned(), Parameter { kind, default });
    }
    Ok(out)
}

fn parse_mappings(name: &str, section: Option<&Y>) -> Result<Mappings, TemplateError> {
    let invalid = |location: String, reason: String| TemplateError::Invalid {
        name: name.to_owned(),
        location,
        reason,
    };
    let mut out = Mappings::new();
    let map = match section {
        None | Some(Y::Null) => return Ok(out),
        Some(Y::Mapping(m)) => m,
        Some(other) => {
            return Err(invalid(
                "Mappings".into(),
                format!("must be a map, found {}", describe(other)),
            ));
        }
    };
    for (mk, mv) in map {
        let Some(map_name) = scalar_string(mk) else {
            return Err(invalid(
                "Mappings".into(),
                "mapping names must be strings".into(),
            ));
        };
        let location = format!("mapping {map_name:?}");
        let Y::Mapping(tops) = mv else {
            return Err(invalid(
                location,
                format!(
                    "must be a map of top-level key -> {{second-level key: value}}, found {}",
                    describe(mv)
                ),
            ));
        };
        let mut top_out = BTreeMap::new();
        for (tk, tv) in tops {
            let Some(top) = scalar_string(tk) else {
                return Err(invalid(location, "keys must be strings".into()));
            };
            let Y::Mapping(seconds) = tv else {
                return Err(invalid(
                    format!("{location} key {top:?}"),
                    format!(
                        "must be a map of second-level key -> value, found {}",
                        describe(tv)
                    ),
                ));
            };
            let mut second_out = BTreeMap::new();
            for (sk, sv) in seconds {
                let Some(second) = scalar_string(sk) else {
                    return Err(invalid(location, "keys must be strings".into()));
                };
                let value_location = format!("{location} key {top:?} -> {second:?}");
                let value = match sv {
                    Y::String(_) | Y::Number(_) | Y::Bool(_) => {
                        serde_json::Value::String(scalar_string(sv).expect("scalar"))
                    }
                    Y::Sequence(items) => serde_json::Value::Array(
                        items
                            .iter()
                            .map(|i| {
                                scalar_string(i)
                                    .map(serde_json::Value::String)
                                    .ok_or_else(|| {
                                        invalid(
                                            value_location.clone(),
                                            "list values must be strings".into(),
                                        )
                                    })
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                    other => {
                        return Err(invalid(
                            value_location,
                            format!(
                                "must be a string or a list of strings, found {}",
                                describe(other)
                            ),
                        ));
                    }
                };
                second_out.insert(second, value);
            }
            top_out.insert(top, second_out);
        }
        out.insert(map_name, top_out);
    }
    Ok(out)
}

impl Parser<'_> {
    fn resource(&self, logical_id: &str, v: &Y) -> Result<Resource, TemplateError> {
        let loc = Loc::resource(logical_id);
        let Y::Mapping(fields) = v else {
            return Err(self.err(
                &loc,
                format!(
                    "must be a map with Type and Properties, found {}",
                    describe(v)
                ),
            ));
        };
        let mut type_name = None;
        let mut properties = None;
        let mut overrides = None;
        for (k, v) in fields {
            match k.as_str() {
                Some("Type") => {
                    type_name = Some(v.as_str().ok_or_else(|| {
                        self.err(
                            &loc,
                            format!("Type must be a string, found {}", describe(v)),
                        )
                    })?);
                }
                Some("Properties") => properties = Some(v),
                Some("OverrideSettings") => overrides = Some(v),
                _ => {
                    return Err(self.err(
                        &loc,
                        format!(
                            "unknown key {} (expected Type, Properties, OverrideSettings)",
                            scalar_string(k)
                                .map_or_else(|| describe(k).to_owned(), |s| format!("{s:?}"))
                        ),
                    ));
                }
            }
        }
        let Some(type_name) = type_name else {
            return Err(self.err(&loc, "has no Type"));
        };
        let allowed = match type_name {
            THING => THING_PROPERTIES,
            CERTIFICATE => CERTIFICATE_PROPERTIES,
            POLICY => POLICY_PROPERTIES,
            other => {
                return Err(self.err(
                    &loc,
                    format!(
                        "unknown resource type {other:?} (expected {THING}, {CERTIFICATE} or {POLICY})"
                    ),
                ));
            }
        };
        let mut props: BTreeMap<&str, &Y> = BTreeMap::new();
        match properties {
            None | Some(Y::Null) => {}
            Some(Y::Mapping(m)) => {
                for (k, v) in m {
                    let key = k.as_str().unwrap_or_default();
                    let Some(known) = allowed.iter().find(|p| **p == key) else {
                        return Err(self.err(
                            &loc,
                            format!(
                                "unknown {type_name} property {} (expected one of {})",
                                scalar_string(k)
                                    .map_or_else(|| describe(k).to_owned(), |s| format!("{s:?}")),
                                allowed.join(", ")
                            ),
                        ));
                    };
                    props.insert(known, v);
                }
            }
            Some(other) => {
                return Err(self.err(
                    &loc,
                    format!("Properties must be a map, found {}", describe(other)),
                ));
            }
        }
        let string = |key: &str| -> Result<Option<Expr>, TemplateError> {
            props
                .get(key)
                .filter(|v| !v.is_null())
                .map(|v| self.string_expr(v, &loc.key(key)))
                .transpose()
        };

        let kind = match type_name {
            THING => {
                let thing_name = string("ThingName")?
                    .ok_or_else(|| self.err(&loc.key("ThingName"), "is required"))?;
                let mut attribute_payload = BTreeMap::new();
                match props.get("AttributePayload") {
                    None | Some(Y::Null) => {}
                    Some(Y::Mapping(m)) => {
                        let at = loc.key("AttributePayload");
                        for (k, v) in m {
                            let Some(key) = scalar_string(k) else {
                                return Err(self.err(&at, "attribute names must be strings"));
                            };
                            let e = self.string_expr(v, &at.key(&key))?;
                            attribute_payload.insert(key, e);
                        }
                    }
                    Some(other) => {
                        return Err(self.err(
                            &loc.key("AttributePayload"),
                            format!(
                                "must be a map of attribute -> value, found {}",
                                describe(other)
                            ),
                        ));
                    }
                }
                let thing_groups = match props.get("ThingGroups") {
                    None | Some(Y::Null) => None,
                    Some(v) => {
                        let at = loc.key("ThingGroups");
                        let e = self.list_expr(v, &at, "ThingGroups")?;
                        if let Expr::List(items) = &e {
                            for (i, item) in items.iter().enumerate() {
                                if !matches!(item.shape(), Shape::Scalar | Shape::Unknown) {
                                    return Err(self.err(
                                        &at.index(i),
                                        format!("must be a string, found {}", item.shape()),
                                    ));
                                }
                            }
                        }
                        Some(e)
                    }
                };
                ResourceKind::Thing(ThingResource {
                    thing_name,
                    thing_type_name: string("ThingTypeName")?,
                    attribute_payload,
                    thing_groups,
                    billing_group: string("BillingGroup")?,
                })
            }
            CERTIFICATE => {
                let status = string("Status")?;
                if let Some(s) = status.as_ref().and_then(Expr::literal_string)
                    && CertificateStatus::parse(&s).is_none()
                {
                    return Err(self.err(
                        &loc.key("Status"),
                        format!("{s:?} is not a certificate status (expected ACTIVE or INACTIVE, in any case)"),
                    ));
                }
                let certificate = CertificateResource {
                    certificate_id: string("CertificateId")?,
                    certificate_pem: string("CertificatePem")?,
                    ca_certificate_pem: string("CACertificatePem")?,
                    certificate_signing_request: string("CertificateSigningRequest")?,
                    status,
                };
                if certificate.certificate_id.is_none()
                    && certificate.certificate_pem.is_none()
                    && certificate.certificate_signing_request.is_none()
                {
                    return Err(self.err(
                        &loc,
                        "an AWS::IoT::Certificate needs CertificateId, CertificatePem or \
                         CertificateSigningRequest",
                    ));
                }
                ResourceKind::Certificate(certificate)
            }
            _ => {
                let policy_name = string("PolicyName")?;
                let policy_document = match props.get("PolicyDocument") {
                    None | Some(Y::Null) => None,
                    Some(Y::String(text)) => {
                        let at = loc.key("PolicyDocument");
                        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                            self.err(&at, format!("is a string but not valid JSON: {e}"))
                        })?;
                        policy::validate_policy_document(&json).map_err(|r| self.err(&at, r))?;
                        Some(Expr::literal(&json))
                    }
                    Some(v) => {
                        let at = loc.key("PolicyDocument");
                        let e = self.expr(v, &at)?;
                        if !matches!(e.shape(), Shape::Map | Shape::Scalar | Shape::Unknown) {
                            return Err(self.err(
                                &at,
                                format!(
                                    "must be a policy document (a map, or a JSON string), found {}",
                                    e.shape()
                                ),
                            ));
                        }
                        Some(e)
                    }
                };
                if policy_name.is_none() && policy_document.is_none() {
                    return Err(self.err(
                        &loc,
                        "an AWS::IoT::Policy needs a PolicyName (an existing policy), a \
                         PolicyDocument, or both",
                    ));
                }
                ResourceKind::Policy(PolicyResource {
                    policy_name,
                    policy_document,
                    lint_view: None,
                })
            }
        };

        let mut override_settings = BTreeMap::new();
        match overrides {
            None | Some(Y::Null) => {}
            Some(Y::Mapping(m)) => {
                let at = loc.key("OverrideSettings");
                for (k, v) in m {
                    let Some(property) = k.as_str() else {
                        return Err(self.err(&at, "property names must be strings"));
                    };
                    if !allowed.contains(&property) {
                        return Err(self.err(
                            &at.key(property),
                            format!("{property:?} is not a {type_name} property"),
                        ));
                    }
                    let action = v.as_str().and_then(OverrideAction::parse).ok_or_else(|| {
                        self.err(
                            &at.key(property),
                            format!(
                                "must be DO_NOTHING, REPLACE, FAIL or MERGE, found {}",
                                scalar_string(v)
                                    .map_or_else(|| describe(v).to_owned(), |s| format!("{s:?}"))
                            ),
                        )
                    })?;
                    if action == OverrideAction::Merge
                        && !matches!(property, "AttributePayload" | "ThingGroups")
                    {
                        return Err(self.err(
                            &at.key(property),
                            "MERGE applies only to AttributePayload and ThingGroups",
                        ));
                    }
                    override_settings.insert(property.to_owned(), action);
                }
            }
            Some(other) => {
                return Err(self.err(
                    &loc.key("OverrideSettings"),
                    format!(
                        "must be a map of property -> action, found {}",
                        describe(other)
                    ),
                ));
            }
        }

        Ok(Resource {
            logical_id: logical_id.to_owned(),
            kind,
            override_settings,
        })
    }
}
