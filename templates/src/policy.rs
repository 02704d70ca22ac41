//! AWS IoT policy documents: the effective policy for one thing, and the least-privilege
//! lint (Device Defender `IOT_POLICY_OVERLY_PERMISSIVE_CHECK`).
//!
//! The lint reasons about resource patterns as languages: a resource ARN pattern (IAM `*`
//! and `?`, and the MQTT `+` and `#` a topic filter may carry) is checked for overlap with
//! "probe" patterns that stand for resources of *another* device (another client ID, another
//! thing's `$aws/things/<name>/…` topics, another thing's shadow) or for every resource of a
//! kind. `${iot:Connection.Thing.ThingName}` stands for this device only, so a wildcard after
//! it (`topic/devices/${iot:Connection.Thing.ThingName}/*`) stays scoped.

use serde::Serialize;
use serde_json::Value;
use std::fmt;

/// The Device Defender reason code for every finding of this lint.
pub const REASON_BROAD_DATA_PLANE: &str = "ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS";

/// The Device Defender check this lint implements.
pub const OVERLY_PERMISSIVE_CHECK: &str = "IOT_POLICY_OVERLY_PERMISSIVE_CHECK";

/// The policy variable for the connected thing's name.
pub const THING_NAME_VARIABLE: &str = "${iot:Connection.Thing.ThingName}";
/// The policy variable for the MQTT client ID.
pub const CLIENT_ID_VARIABLE: &str = "${iot:ClientId}";
/// The condition key that ties a connection's client ID to a thing attached to its certificate.
pub const IS_ATTACHED_KEY: &str = "iot:Connection.Thing.IsAttached";

/// The policy for one thing: `${iot:Connection.Thing.ThingName}` and `${iot:ClientId}` are
/// replaced in every string value; every other policy variable (`${iot:Certificate…}`,
/// `${aws:…}`, `${*}`…) is left as it is.
pub fn effective_policy(document: &Value, thing_name: &str, client_id: &str) -> Value {
    match document {
        Value::String(s) => Value::String(
            s.replace(THING_NAME_VARIABLE, thing_name)
                .replace(CLIENT_ID_VARIABLE, client_id),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| effective_policy(v, thing_name, client_id))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), effective_policy(v, thing_name, client_id)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Which rule of the lint a finding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LintRule {
    /// `iot:*` or `*` (or an `Allow` with `NotAction`).
    AllActions,
    /// A data-plane action on `*` or an `arn:aws:iot:*:*:*`-like catch-all.
    AllResources,
    /// `iot:Connect` on `client/*` or another client-ID wildcard.
    ConnectAnyClient,
    /// `iot:Connect` on `client/${iot:ClientId}` without `iot:Connection.Thing.IsAttached`.
    ConnectClientIdWithoutIsAttached,
    /// MQTT actions on other things' reserved `$aws/things/<name>/…` topics.
    OtherThingsReservedTopics,
    /// MQTT actions on every topic (`topic/*`, `topic/#`, `topicfilter/*`…).
    AllTopics,
    /// Shadow or job-execution actions on `thing/*`.
    OtherThingsShadowsOrJobs,
}

/// One overly permissive grant in a policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Index of the statement in the document's `Statement` array (0-based; a single
    /// statement object is statement 0).
    pub statement: usize,
    /// The statement's `Sid`, if it has one.
    pub sid: Option<String>,
    /// The action(s) concerned: AWS's names (`iot:Publish`) for data-plane actions, or the
    /// wildcard as written (`iot:*`).
    pub actions: Vec<String>,
    /// The resource pattern as written (`NotResource […]` for an `Allow` with `NotResource`).
    pub resource: String,
    /// Which lint rule the grant breaks.
    pub rule: LintRule,
    /// Always [`REASON_BROAD_DATA_PLANE`].
    pub reason_code: &'static str,
    /// Why this is too broad and what to write instead.
    pub explanation: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "statement {}", self.statement)?;
        if let Some(sid) = &self.sid {
            write!(f, " (Sid {sid:?})")?;
        }
        write!(
            f,
            ": {} on {} — {}: {}",
            self.actions.join(", "),
            self.resource,
            self.reason_code,
            self.explanation
        )
    }
}

// ---------------------------------------------------------------------------------------
// Patterns.

/// One token of a glob: a literal character, any one character, or any run of characters
/// from a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    AnyOne,
    Star(Class),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Any,
    /// One MQTT topic level (`+`).
    NoSlash,
    /// One ARN field.
    NoColon,
}

impl Class {
    fn allows(self, c: char) -> bool {
        match self {
            Class::Any => true,
            Class::NoSlash => c != '/',
            Class::NoColon => c != ':',
        }
    }
}

/// Some character both tokens can consume.
fn share_a_char(a: Tok, b: Tok) -> bool {
    match (a, b) {
        (Tok::Lit(x), Tok::Lit(y)) => x == y,
        (Tok::Lit(_), Tok::AnyOne) | (Tok::AnyOne, Tok::Lit(_)) => true,
        (Tok::Lit(x), Tok::Star(c)) | (Tok::Star(c), Tok::Lit(x)) => c.allows(x),
        // Every class allows 'a'.
        _ => true,
    }
}

/// Whether some string matches both patterns.
fn intersects(p: &[Tok], q: &[Tok]) -> bool {
    let width = q.len() + 1;
    let mut seen = vec![false; (p.len() + 1) * width];
    let mut todo = vec![(0usize, 0usize)];
    while let Some((i, j)) = todo.pop() {
        if std::mem::replace(&mut seen[i * width + j], true) {
            continue;
        }
        if i == p.len() && j == q.len() {
            return true;
        }
        let p_tok = p.get(i).copied();
        let q_tok = q.get(j).copied();
        if let Some(Tok::Star(_)) = p_tok {
            todo.push((i + 1, j));
        }
        if let Some(Tok::Star(_)) = q_tok {
            todo.push((i, j + 1));
        }
        if let (Some(a), Some(b)) = (p_tok, q_tok)
            && share_a_char(a, b)
        {
            let ni = if matches!(a, Tok::Star(_)) { i } else { i + 1 };
            let nj = if matches!(b, Tok::Star(_)) { j } else { j + 1 };
            todo.push((ni, nj));
        }
    }
    false
}

fn lits(s: &str) -> impl Iterator<Item = Tok> + '_ {
    s.chars().map(Tok::Lit)
}

/// Stands for the connected thing's own name (no thing name can contain it).
const SELF: char = '\u{E000}';
/// Stands for a thing or client unrelated to this one.
const STRANGER: char = '\u{E001}';
/// Starts an opaque, scoped value (another policy variable, a template parameter).
const OPAQUE: char = '\u{E002}';
/// A resource (or resource type, or topic) that nothing written in a policy names.
const NOWHERE: char = '\u{E003}';

/// Compiles a resource pattern. `client_id_is_anyone` makes `${iot:ClientId}` a wildcard
/// (for `iot:Connect` without the `IsAttached` condition, the client picks its ID).
///
/// In a full ARN (`arn:partition:service:region:account:resource`) a `*` in the first five
/// fields stays within its field: nothing real has a colon in its region or account.
fn compile_resource(resource: &str, client_id_is_anyone: bool) -> Vec<Tok> {
    let header_colons = if resource.starts_with("arn:") && top_level_colons(resource) >= 5 {
        5
    } else {
        0
    };
    let mut colons = 0;
    let mut out = Vec::new();
    let mut rest = resource;
    while let Some(c) = rest.chars().next() {
        if colons < header_colons {
            match c {
                ':' => colons += 1,
                '*' => {
                    out.push(Tok::Star(Class::NoColon));
                    rest = &rest[1..];
                    continue;
                }
                _ => {}
            }
        }
        if let Some(after) = rest.strip_prefix("${")
            && let Some(end) = after.find('}')
        {
            let variable = &after[..end];
            match variable {
                "*" => out.push(Tok::Lit('*')),
                "?" => out.push(Tok::Lit('?')),
                "$" => out.push(Tok::Lit('$')),
                "iot:Connection.Thing.ThingName" => out.push(Tok::Lit(SELF)),
                "iot:ClientId" if client_id_is_anyone => out.push(Tok::Star(Class::Any)),
                "iot:ClientId" => out.push(Tok::Lit(SELF)),
                other => {
                    out.push(Tok::Lit(OPAQUE));
                    out.extend(lits(other));
                    out.push(Tok::Lit(OPAQUE));
                }
            }
            rest = &after[end + 1..];
            continue;
        }
        out.push(match c {
            '*' | '#' => Tok::Star(Class::Any),
            '+' => Tok::Star(Class::NoSlash),
            '?' => Tok::AnyOne,
            c => Tok::Lit(c),
        });
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Colons outside `${…}` variables.
fn top_level_colons(s: &str) -> usize {
    let mut count = 0;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("${")
            && let Some(end) = after.find('}')
        {
            rest = &after[end + 1..];
            continue;
        }
        if c == ':' {
            count += 1;
        }
        rest = &rest[c.len_utf8()..];
    }
    count
}

/// `arn:<partition>:iot:<region>:<account>:` followed by `resource`.
fn iot_arn(resource: &[Tok]) -> Vec<Tok> {
    let mut out: Vec<Tok> = lits("arn:").collect();
    out.push(Tok::Star(Class::NoColon));
    out.extend(lits(":iot:"));
    out.push(Tok::Star(Class::NoColon));
    out.push(Tok::Lit(':'));
    out.push(Tok::Star(Class::NoColon));
    out.push(Tok::Lit(':'));
    out.extend_from_slice(resource);
    out
}

/// Another thing's name: one segment (thing names have no `/`) with a character only a
/// wildcard can produce. This covers unrelated names and ones that merely extend this
/// thing's name (`${iot:Connection.Thing.ThingName}*` reaches `dev1` -> `dev10`), while a
/// literal name (`thing/MyThing1`) is not a wildcard over other things.
fn stranger() -> [Tok; 3] {
    [
        Tok::Star(Class::NoSlash),
        Tok::Lit(STRANGER),
        Tok::Star(Class::NoSlash),
    ]
}

fn probe(prefix: &str, middle: &[Tok], suffix: &[Tok]) -> Vec<Tok> {
    let mut resource: Vec<Tok> = lits(prefix).collect();
    resource.extend_from_slice(middle);
    resource.extend_from_slice(suffix);
    iot_arn(&resource)
}

fn matches_any_resource(p: &[Tok]) -> bool {
    intersects(p, &iot_arn(&[Tok::Lit(NOWHERE)]))
}

fn matches_other_client(p: &[Tok]) -> bool {
    intersects(p, &probe("client/", &stranger(), &[]))
}

fn matches_other_things(p: &[Tok], kind: &str) -> bool {
    intersects(p, &probe(&format!("{kind}/"), &stranger(), &[]))
}

fn matches_other_reserved_topics(p: &[Tok], kind: &str) -> bool {
    let tail = [Tok::Lit('/'), Tok::Star(Class::Any)];
    intersects(
        p,
        &probe(&format!("{kind}/$aws/things/"), &stranger(), &tail),
    )
}

fn matches_all_topics(p: &[Tok], kind: &str) -> bool {
    intersects(p, &probe(&format!("{kind}/"), &[Tok::Lit(NOWHERE)], &[]))
}

// ---------------------------------------------------------------------------------------
// Actions.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Connect,
    /// Actions on `topic/…` resources.
    Topic,
    /// Actions on `topicfilter/…` resources.
    TopicFilter,
    /// Shadow and job-execution actions on `thing/…` resources.
    Thing,
}

/// The data-plane actions the check is about, with AWS's spelling.
const DATA_PLANE_ACTIONS: &[(&str, Group)] = &[
    ("iot:Connect", Group::Connect),
    ("iot:Publish", Group::Topic),
    ("iot:RetainPublish", Group::Topic),
    ("iot:Receive", Group::Topic),
    ("iot:GetRetainedMessage", Group::Topic),
    ("iot:Subscribe", Group::TopicFilter),
    ("iot:GetThingShadow", Group::Thing),
    ("iot:UpdateThingShadow", Group::Thing),
    ("iot:DeleteThingShadow", Group::Thing),
    ("iot:ListNamedShadowsForThing", Group::Thing),
    ("iot:DescribeJobExecution", Group::Thing),
    ("iot:GetPendingJobExecutions", Group::Thing),
    ("iot:StartNextPendingJobExecution", Group::Thing),
    ("iot:UpdateJobExecution", Group::Thing),
];

/// Action names are case-insensitive and may carry `*` and `?`.
fn compile_action(action: &str) -> Vec<Tok> {
    action
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| match c {
            '*' => Tok::Star(Class::Any),
            '?' => Tok::AnyOne,
            c => Tok::Lit(c),
        })
        .collect()
}

fn action_matches(pattern: &[Tok], action: &str) -> bool {
    intersects(pattern, &compile_action(action))
}

/// `*`, `iot:*`, `i*`…: a pattern that also matches IoT actions that do not exist yet.
fn is_all_actions(pattern: &[Tok]) -> bool {
    let mut unknown: Vec<Tok> = lits("iot:").collect();
    unknown.push(Tok::Lit(NOWHERE));
    intersects(pattern, &unknown)
}

// ---------------------------------------------------------------------------------------
// The lint.

/// A string or a list of strings (anything else yields nothing).
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn is_true(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::String(s) => s.eq_ignore_ascii_case("true"),
        Value::Array(items) => !items.is_empty() && items.iter().all(is_true),
        _ => false,
    }
}

/// Whether the statement's condition requires `iot:Connection.Thing.IsAttached` to be true
/// (with `Bool`, `StringEquals` or `StringEqualsIgnoreCase`; an `…IfExists` operator does not
/// require it).
fn requires_is_attached(statement: &serde_json::Map<String, Value>) -> bool {
    let Some(Value::Object(condition)) = statement.get("Condition") else {
        return false;
    };
    condition.iter().any(|(operator, body)| {
        let operator = operator.to_ascii_lowercase();
        matches!(
            operator.as_str(),
            "bool" | "stringequals" | "stringequalsignorecase"
        ) && body.as_object().is_some_and(|keys| {
            keys.iter()
                .any(|(key, value)| key.eq_ignore_ascii_case(IS_ATTACHED_KEY) && is_true(value))
        })
    })
}

/// Runs the least-privilege lint over one policy document. `Deny` statements are not
/// findings; an `Allow` statement is checked resource by resource. Malformed statements
/// (no `Effect`, no `Action`…) are skipped: templates are validated for structure when
/// parsed.
pub fn lint_policy(document: &Value) -> Vec<Finding> {
    let mut findings = Vec::new();
    let items = match document.get("Statement") {
        Some(Value::Array(items)) => items.iter().collect::<Vec<_>>(),
        Some(other) => vec![other],
        None => Vec::new(),
    };
    for (index, item) in items.into_iter().enumerate() {
        if let Some(statement) = item.as_object() {
            lint_statement(index, statement, &mut findings);
        }
    }
    findings
}

fn lint_statement(
    index: usize,
    statement: &serde_json::Map<String, Value>,
    findings: &mut Vec<Finding>,
) {
    let allow = statement
        .get("Effect")
        .and_then(Value::as_str)
        .is_some_and(|e| e.eq_ignore_ascii_case("allow"));
    if !allow {
        return;
    }
    let sid = statement
        .get("Sid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let finding = |actions: Vec<String>, resource: &str, rule: LintRule, why: String| Finding {
        statement: index,
        sid: sid.clone(),
        actions,
        resource: resource.to_owned(),
        rule,
        reason_code: REASON_BROAD_DATA_PLANE,
        explanation: why,
    };

    // Which actions the statement allows.
    let not_action = strings(statement.get("NotAction"));
    let written_actions = strings(statement.get("Action"));
    let (wildcards, granted): (Vec<String>, Vec<(&str, Group)>) = if !not_action.is_empty() {
        let excluded: Vec<Vec<Tok>> = not_action.iter().map(|a| compile_action(a)).collect();
        (
            vec![format!("NotAction [{}]", not_action.join(", "))],
            DATA_PLANE_ACTIONS
                .iter()
                .copied()
                .filter(|(name, _)| !excluded.iter().any(|p| action_matches(p, name)))
                .collect(),
        )
    } else {
        let patterns: Vec<(&String, Vec<Tok>)> = written_actions
            .iter()
            .map(|a| (a, compile_action(a)))
            .collect();
        (
            patterns
                .iter()
                .filter(|(_, p)| is_all_actions(p))
                .map(|(a, _)| (*a).clone())
                .collect(),
            DATA_PLANE_ACTIONS
                .iter()
                .copied()
                .filter(|(name, _)| patterns.iter().any(|(_, p)| action_matches(p, name)))
                .collect(),
        )
    };
    if wildcards.is_empty() && granted.is_empty() {
        return;
    }

    // Which resources: `NotResource` in an Allow reaches everything not listed.
    let not_resource = strings(statement.get("NotResource"));
    let resources: Vec<(String, String)> = if !not_resource.is_empty() {
        vec![(
            format!("NotResource [{}]", not_resource.join(", ")),
            "*".to_owned(),
        )]
    } else {
        strings(statement.get("Resource"))
            .into_iter()
            .map(|r| (r.clone(), r))
            .collect()
    };
    let attached = requires_is_attached(statement);
    let names = |group: Option<Group>| -> Vec<String> {
        granted
            .iter()
            .filter(|(_, g)| group.is_none_or(|group| *g == group))
            .map(|(name, _)| (*name).to_owned())
            .collect()
    };

    for (shown, pattern) in &resources {
        if !wildcards.is_empty() {
            findings.push(finding(
                wildcards.clone(),
                shown,
                LintRule::AllActions,
                "allows every AWS IoT action, so a compromised device could connect as any \
                 client, publish or subscribe anywhere and read or change any device's shadow \
                 and jobs; list only the actions the device needs"
                    .to_owned(),
            ));
            continue;
        }
        let p = compile_resource(pattern, false);
        if matches_any_resource(&p) {
            findings.push(finding(
                names(None),
                shown,
                LintRule::AllResources,
                "the resource covers every client ID, topic and thing in the account, so a \
                 compromised device could act as or on any other device; scope the resource \
                 with ${iot:Connection.Thing.ThingName}"
                    .to_owned(),
            ));
            continue;
        }
        let connect = names(Some(Group::Connect));
        if !connect.is_empty() {
            let as_anyone = compile_resource(pattern, !attached);
            if matches_other_client(&as_anyone) {
                let via_client_id = !matches_other_client(&p);
                let (rule, why) = if via_client_id {
                    (
                        LintRule::ConnectClientIdWithoutIsAttached,
                        format!(
                            "${{iot:ClientId}} is whatever client ID the device presents, so \
                             without the condition \"Bool\": {{\"{IS_ATTACHED_KEY}\": \"true\"}} \
                             this is equivalent to client/*; add the condition or use \
                             client/{THING_NAME_VARIABLE}"
                        ),
                    )
                } else {
                    (
                        LintRule::ConnectAnyClient,
                        format!(
                            "the device may connect with the client ID of any other device and \
                             take over its session; use client/{THING_NAME_VARIABLE}"
                        ),
                    )
                };
                findings.push(finding(connect, shown, rule, why));
            }
        }
        for (group, kind) in [(Group::Topic, "topic"), (Group::TopicFilter, "topicfilter")] {
            let actions = names(Some(group));
            if actions.is_empty() {
                continue;
            }
            if matches_all_topics(&p, kind) {
                findings.push(finding(
                    actions,
                    shown,
                    LintRule::AllTopics,
                    format!(
                        "the resource matches every {} in the account, so the device can \
                         exchange messages on every other device's topics; scope it, e.g. \
                         {kind}/devices/{THING_NAME_VARIABLE}/*",
                        if kind == "topic" {
                            "topic"
                        } else {
                            "topic filter"
                        }
                    ),
                ));
            } else if matches_other_reserved_topics(&p, kind) {
                findings.push(finding(
                    actions,
                    shown,
                    LintRule::OtherThingsReservedTopics,
                    format!(
                        "the resource reaches the reserved $aws/things/<thing>/ topics of every \
                         thing, so the device can read or change other devices' shadows and \
                         jobs; use {kind}/$aws/things/{THING_NAME_VARIABLE}/…"
                    ),
                ));
            }
        }
        let actions = names(Some(Group::Thing));
        if !actions.is_empty() && matches_other_things(&p, "thing") {
            findings.push(finding(
                actions,
                shown,
                LintRule::OtherThingsShadowsOrJobs,
                format!(
                    "the resource covers other things, so the device can read, change or delete \
                     other devices' shadows or job executions; use thing/{THING_NAME_VARIABLE}"
                ),
            ));
        }
    }
}

/// Checks a policy document's structure: an object whose `Statement` is a statement or a
/// list of them, each with `Effect` `Allow`/`Deny`, `Action` or `NotAction`, `Resource` or
/// `NotResource` (strings or lists of strings), and optionally `Sid` and `Condition`.
pub fn validate_policy_document(document: &Value) -> Result<(), String> {
    let Some(object) = document.as_object() else {
        return Err("a policy document must be a JSON object".into());
    };
    for key in object.keys() {
        if !matches!(key.as_str(), "Version" | "Statement" | "Id") {
            return Err(format!(
                "unknown policy document key {key:?} (expected Version, Statement)"
            ));
        }
    }
    let items: Vec<&Value> = match object.get("Statement") {
        Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
        Some(Value::Array(_)) => return Err("Statement is empty".into()),
        Some(v @ Value::Object(_)) => vec![v],
        Some(_) => return Err("Statement must be an object or a list of objects".into()),
        None => return Err("the policy document has no Statement".into()),
    };
    let string_or_list = |v: &Value| match v {
        Value::String(_) => true,
        Value::Array(items) => !items.is_empty() && items.iter().all(Value::is_string),
        _ => false,
    };
    for (index, item) in items.into_iter().enumerate() {
        let at = |reason: String| format!("Statement[{index}]: {reason}");
        let Some(statement) = item.as_object() else {
            return Err(at("a statement must be an object".into()));
        };
        for key in statement.keys() {
            if !matches!(
                key.as_str(),
                "Sid"
                    | "Effect"
                    | "Action"
                    | "NotAction"
                    | "Resource"
                    | "NotResource"
                    | "Condition"
            ) {
                return Err(at(format!("unknown statement key {key:?}")));
            }
        }
        match statement.get("Effect").and_then(Value::as_str) {
            Some(e) if e.eq_ignore_ascii_case("allow") || e.eq_ignore_ascii_case("deny") => {}
            _ => return Err(at("Effect must be \"Allow\" or \"Deny\"".into())),
        }
        for (one, other) in [("Action", "NotAction"), ("Resource", "NotResource")] {
            match (statement.get(one), statement.get(other)) {
                (Some(v), None) | (None, Some(v)) if string_or_list(v) => {}
                (Some(_), Some(_)) => return Err(at(format!("has both {one} and {other}"))),
                (None, None) => return Err(at(format!("has no {one}"))),
                _ => {
                    return Err(at(format!(
                        "{one} must be a string or a non-empty list of strings"
                    )));
                }
            }
        }
        if let Some(sid) = statement.get("Sid")
            && !sid.is_string()
        {
            return Err(at("Sid must be a string".into()));
        }
        if let Some(condition) = statement.get("Condition")
            && !condition.is_object()
        {
            return Err(at("Condition must be an object".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        compile_resource(s, false)
    }

    #[test]
    fn glob_intersection() {
        assert!(intersects(&toks("a*c"), &toks("abc")));
        assert!(intersects(&toks("a*"), &toks("*c")));
        assert!(!intersects(&toks("a*"), &toks("b*")));
        assert!(intersects(&toks("a+/b"), &toks("ax/b")));
        assert!(!intersects(&toks("a+/b"), &toks("a/x/b")));
        assert!(intersects(&toks("a?c"), &toks("abc")));
        assert!(!intersects(&toks("a?c"), &toks("ac")));
    }

    #[test]
    fn probes() {
        let scoped = toks("arn:aws:iot:*:*:topic/devices/${iot:Connection.Thing.ThingName}/*");
        assert!(!matches_any_resource(&scoped));
        assert!(!matches_all_topics(&scoped, "topic"));
        assert!(!matches_other_reserved_topics(&scoped, "topic"));
        assert!(matches_any_resource(&toks("*")));
        assert!(matches_any_resource(&toks("arn:aws:iot:*:*:*")));
        assert!(matches_any_resource(&toks(
            "arn:aws:iot:us-east-1:123456789012:*"
        )));
        assert!(!matches_any_resource(&toks("arn:aws:iot:*:*:topic/*")));
        assert!(matches_all_topics(
            &toks("arn:aws:iot:*:*:topic/*"),
            "topic"
        ));
        assert!(matches_all_topics(
            &toks("arn:aws:iot:*:*:topic/#"),
            "topic"
        ));
        assert!(!matches_all_topics(&toks("arn:aws:s3:::bucket/*"), "topic"));
        assert!(matches_other_things(
            &toks("arn:aws:iot:*:*:thing/${iot:Connection.Thing.ThingName}*"),
            "thing"
        ));
    }

    #[test]
    fn actions_are_case_insensitive_globs() {
        assert!(action_matches(
            &compile_action("IOT:publish"),
            "iot:Publish"
        ));
        assert!(action_matches(
            &compile_action("iot:*Shadow"),
            "iot:GetThingShadow"
        ));
        assert!(!action_matches(
            &compile_action("iot:*Shadow"),
            "iot:Publish"
        ));
        assert!(is_all_actions(&compile_action("iot:*")));
        assert!(is_all_actions(&compile_action("*")));
        assert!(is_all_actions(&compile_action("IoT:*")));
        assert!(!is_all_actions(&compile_action("iot:Get*")));
    }
}
