//! AWS IoT policy evaluation: may this connection do this action on this resource?
//!
//! A [`Policy`] is parsed and compiled once per policy version ([`Policy::parse`]); deciding
//! a request ([`Policy::evaluate`], [`evaluate_policies`] for every policy attached to a
//! certificate) then only walks the compiled statements: no parsing, no regex.
//!
//! The semantics are AWS IoT Core's (developer guide: "AWS IoT Core policies", "AWS IoT
//! Core policy variables", "Thing policy variables", "X.509 Certificate AWS IoT Core policy
//! variables", "Publish/Subscribe policy examples"; IAM user guide: "Policy evaluation
//! logic", "Condition operators", "Variables and tags"):
//!
//! - Default deny; an `Allow` statement that applies allows, unless a `Deny` statement that
//!   applies (in any of the policies) denies: explicit deny always wins.
//! - `Action` / `NotAction`: case-insensitive names with `*` and `?` (`iot:*`, `iot:Pub*`).
//! - `Resource` / `NotResource`: ARNs `arn:aws:iot:REGION:ACCOUNT:TYPE/NAME` with `*`
//!   (any run of characters, `/` included) and `?`, matched field by field against the
//!   request's ARN built from the caller's [`ArnContext`] (a pattern with fewer than six
//!   ARN fields, such as `*`, is matched against the whole ARN). `iot:Connect` is on
//!   `client/<client id>`, `iot:Publish`, `iot:RetainPublish` and `iot:Receive` on
//!   `topic/<topic>`, `iot:Subscribe` on `topicfilter/<filter>`, where MQTT `+` and `#`
//!   are literal characters on both sides.
//! - Policy variables (`${iot:ClientId}`, `${iot:Connection.Thing.*}`,
//!   `${iot:Certificate.*}`) in `Resource` and condition values, from the
//!   [`ConnectionContext`]. A substituted value is literal text: a `*` in a client ID is
//!   not a wildcard. A variable that cannot be resolved (no thing, no such attribute, an
//!   unknown variable, a `.List`, a certificate value with a wildcard character or over
//!   1024 characters) makes that `Resource` entry or that condition not match, for `Allow`
//!   and `Deny` alike. `${*}`, `${?}`, `${$}` are the literal characters. With a `Version`
//!   other than `2012-10-17`, `${…}` is literal text, as in IAM.
//! - `Condition`: `StringEquals`, `StringNotEquals`, `StringEqualsIgnoreCase`,
//!   `StringNotEqualsIgnoreCase`, `StringLike`, `StringNotLike`, `Bool`, `Null`, with
//!   `…IfExists` and the `ForAnyValue:` / `ForAllValues:` qualifiers (for `.List`
//!   certificate keys). Operators AND together, keys AND together, values OR together (a
//!   negated operator holds when no value matches). A key missing from the context fails
//!   the condition, except for negated operators, `…IfExists` and `ForAllValues:`, which
//!   hold (IAM's rules).
//!
//! **Unsupported conditions fail closed.** A condition operator this evaluator does not
//! implement (`Numeric…`, `Date…`, `IpAddress`, `Arn…`, or a misspelling) or a condition key
//! it does not know (`aws:SourceIp`…) cannot be decided. Such an `Allow` statement never
//! applies. Such a `Deny` statement applies whenever its actions and resources match: a
//! deny we cannot evaluate is assumed to hold, so a policy can only ever be stricter here
//! than on AWS, never looser. [`Policy::notes`] lists these statements.

mod condition;
mod context;
mod glob;

pub use context::{
    AlternativeNames, CertificateContext, ConnectionContext, DistinguishedName, ThingContext,
};

use crate::policy::validate_policy_document;
use condition::{Condition, Outcome};
use glob::{Pattern, Syntax};
use serde_json::Value;
use std::fmt;

/// The policy language version in which `${…}` are policy variables.
pub const POLICY_VERSION: &str = "2012-10-17";

/// The region and account of the ARNs requests are made on: AWS's own for a fleet mirrored
/// to AWS, or fleetcert's local ones (e.g. region `local`) for a self-hosted broker. The
/// partition is `aws`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArnContext {
    /// The region, e.g. `us-east-1` or `local`.
    pub region: String,
    /// The account ID, e.g. `123456789012`.
    pub account: String,
}

impl ArnContext {
    /// An ARN context for `region` and `account`.
    pub fn new(region: impl Into<String>, account: impl Into<String>) -> ArnContext {
        ArnContext {
            region: region.into(),
            account: account.into(),
        }
    }

    /// The ARN of a request's resource, e.g.
    /// `arn:aws:iot:local:000000000000:topic/devices/dev1/telemetry`.
    pub fn arn(&self, request: &Request<'_>) -> String {
        format!(
            "arn:aws:iot:{}:{}:{}/{}",
            self.region,
            self.account,
            request.action.resource_type(),
            request.name
        )
    }
}

/// The AWS IoT data-plane actions a broker authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// `iot:Connect`, on `client/<client id>`.
    Connect,
    /// `iot:Publish`, on `topic/<topic>`.
    Publish,
    /// `iot:RetainPublish` (a publish with the retain flag), on `topic/<topic>`.
    RetainPublish,
    /// `iot:Receive` (delivery of a message to the client), on `topic/<topic>`.
    Receive,
    /// `iot:Subscribe`, on `topicfilter/<filter>`.
    Subscribe,
    /// `iot:GetRetainedMessage`, on `topic/<topic>`.
    GetRetainedMessage,
    /// `iot:GetThingShadow`, on `thing/<thing name>`.
    GetThingShadow,
    /// `iot:UpdateThingShadow`, on `thing/<thing name>`.
    UpdateThingShadow,
    /// `iot:DeleteThingShadow`, on `thing/<thing name>`.
    DeleteThingShadow,
}

impl Action {
    /// Every action, in declaration order.
    pub const ALL: [Action; 9] = [
        Action::Connect,
        Action::Publish,
        Action::RetainPublish,
        Action::Receive,
        Action::Subscribe,
        Action::GetRetainedMessage,
        Action::GetThingShadow,
        Action::UpdateThingShadow,
        Action::DeleteThingShadow,
    ];

    /// AWS's name, e.g. `iot:Publish`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "iot:Connect",
            Action::Publish => "iot:Publish",
            Action::RetainPublish => "iot:RetainPublish",
            Action::Receive => "iot:Receive",
            Action::Subscribe => "iot:Subscribe",
            Action::GetRetainedMessage => "iot:GetRetainedMessage",
            Action::GetThingShadow => "iot:GetThingShadow",
            Action::UpdateThingShadow => "iot:UpdateThingShadow",
            Action::DeleteThingShadow => "iot:DeleteThingShadow",
        }
    }

    /// The resource type the action is authorized on: `client`, `topic`, `topicfilter`
    /// or `thing`.
    pub fn resource_type(self) -> &'static str {
        match self {
            Action::Connect => "client",
            Action::Publish
            | Action::RetainPublish
            | Action::Receive
            | Action::GetRetainedMessage => "topic",
            Action::Subscribe => "topicfilter",
            Action::GetThingShadow | Action::UpdateThingShadow | Action::DeleteThingShadow => {
                "thing"
            }
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One request to authorize: an action on a named resource (a client ID, a topic, a topic
/// filter or a thing name, per [`Action::resource_type`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The action.
    pub action: Action,
    /// The resource's name, without the `TYPE/` prefix.
    pub name: &'a str,
}

impl<'a> Request<'a> {
    /// `action` on the resource `name`.
    pub fn new(action: Action, name: &'a str) -> Request<'a> {
        Request { action, name }
    }
    /// `iot:Connect` with this client ID.
    pub fn connect(client_id: &'a str) -> Request<'a> {
        Request::new(Action::Connect, client_id)
    }
    /// `iot:Publish` to this topic.
    pub fn publish(topic: &'a str) -> Request<'a> {
        Request::new(Action::Publish, topic)
    }
    /// `iot:RetainPublish` to this topic.
    pub fn retain_publish(topic: &'a str) -> Request<'a> {
        Request::new(Action::RetainPublish, topic)
    }
    /// `iot:Receive` of a message on this topic.
    pub fn receive(topic: &'a str) -> Request<'a> {
        Request::new(Action::Receive, topic)
    }
    /// `iot:Subscribe` to this topic filter (`+` and `#` are plain characters of its name).
    pub fn subscribe(filter: &'a str) -> Request<'a> {
        Request::new(Action::Subscribe, filter)
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// Some `Allow` statement applies and no `Deny` statement does.
    Allow,
    /// Refused, and why.
    Deny {
        /// Why.
        reason: DenyReason,
    },
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// Why a request is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// A `Deny` statement applies (the first one found).
    ExplicitDeny {
        /// Index of the policy among those evaluated (0 for [`Policy::evaluate`]).
        policy: usize,
        /// Index of the statement in that policy's `Statement` list.
        statement: usize,
    },
    /// No `Allow` statement applies (AWS's implicit deny).
    NoMatchingAllow,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Deny {
                reason: DenyReason::ExplicitDeny { policy, statement },
            } => write!(
                f,
                "denied by statement {statement} of policy {policy} (explicit deny)"
            ),
            Decision::Deny {
                reason: DenyReason::NoMatchingAllow,
            } => f.write_str("denied: no statement allows it"),
        }
    }
}

/// A policy document that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The text is not JSON.
    #[error("the policy document is not JSON: {reason}")]
    Json {
        /// What the JSON parser says.
        reason: String,
    },
    /// The document does not follow the policy grammar.
    #[error("invalid policy document: {reason}")]
    Invalid {
        /// What is wrong, and where.
        reason: String,
    },
}

/// Something about a policy worth logging when it is loaded: a statement that is evaluated
/// more strictly than AWS would (see the module documentation), or variables that are
/// literal text because of the policy `Version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyNote {
    /// The statement's index, if the note is about one statement.
    pub statement: Option<usize>,
    /// What, in words.
    pub message: String,
}

impl fmt::Display for PolicyNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.statement {
            Some(index) => write!(f, "statement {index}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

/// A `Resource` entry.
#[derive(Debug, Clone)]
enum ResourcePattern {
    /// `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE`, each field its own pattern (a `*`
    /// in the region stays in the region).
    Fields(Box<[Pattern; 6]>),
    /// Fewer than six fields (`*`, `arn:aws:iot:*`): matched against the whole ARN.
    Whole(Pattern),
}

#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    sid: Option<String>,
    /// Which [`Action`]s the statement covers (`NotAction` already inverted).
    actions: u16,
    resources: Vec<ResourcePattern>,
    not_resource: bool,
    condition: Condition,
}

/// A parsed, validated and compiled AWS IoT policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    statements: Vec<Statement>,
    notes: Vec<PolicyNote>,
}

/// A string or a list of strings (validated before).
fn strings(value: Option<&Value>) -> Vec<&str> {
    match value {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Splits an ARN pattern at its first five colons outside `${…}`.
fn arn_fields(text: &str, variables: bool) -> Option<[&str; 6]> {
    let mut cuts = [0usize; 5];
    let mut found = 0;
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < bytes.len() && found < 5 {
        if variables
            && text[i..].starts_with("${")
            && let Some(end) = text[i..].find('}')
        {
            i += end + 1;
            continue;
        }
        if bytes[i] == b':' {
            cuts[found] = i;
            found += 1;
        }
        i += 1;
    }
    if found < 5 {
        return None;
    }
    Some([
        &text[..cuts[0]],
        &text[cuts[0] + 1..cuts[1]],
        &text[cuts[1] + 1..cuts[2]],
        &text[cuts[2] + 1..cuts[3]],
        &text[cuts[3] + 1..cuts[4]],
        &text[cuts[4] + 1..],
    ])
}

impl Policy {
    /// Parses a policy document from its JSON text.
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        let document: Value = serde_json::from_str(text).map_err(|e| PolicyError::Json {
            reason: e.to_string(),
        })?;
        Policy::parse(&document)
    }

    /// Validates a policy document (the same grammar templates are checked with) and
    /// compiles it for evaluation.
    pub fn parse(document: &Value) -> Result<Policy, PolicyError> {
        validate_policy_document(document).map_err(|reason| PolicyError::Invalid { reason })?;
        let variables = document.get("Version").and_then(Value::as_str) == Some(POLICY_VERSION);
        let items: Vec<&Value> = match document.get("Statement") {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(one) => vec![one],
            None => Vec::new(),
        };
        let mut notes = Vec::new();
        let mut statements = Vec::with_capacity(items.len());
        let mut literal_variables = false;
        for (index, item) in items.into_iter().enumerate() {
            let at = |reason: String| PolicyError::Invalid {
                reason: format!("Statement[{index}]: {reason}"),
            };
            let effect = match item.get("Effect").and_then(Value::as_str) {
                Some(e) if e.eq_ignore_ascii_case("deny") => Effect::Deny,
                _ => Effect::Allow,
            };
            let sid = item.get("Sid").and_then(Value::as_str).map(str::to_owned);

            let (action_list, not_action) = match item.get("NotAction") {
                Some(v) => (strings(Some(v)), true),
                None => (strings(item.get("Action")), false),
            };
            let action_syntax = Syntax {
                wildcards: true,
                variables: false,
            };
            let patterns: Vec<Pattern> = action_list
                .iter()
                .map(|a| Pattern::compile(&a.to_lowercase(), action_syntax))
                .collect();
            let mut actions = 0u16;
            for action in Action::ALL {
                let name = action.name().to_lowercase();
                if patterns.iter().any(|p| p.matches(&name, &|_| None)) != not_action {
                    actions |= action.bit();
                }
            }

            let (resource_list, not_resource) = match item.get("NotResource") {
                Some(v) => (strings(Some(v)), true),
                None => (strings(item.get("Resource")), false),
            };
            let syntax = Syntax {
                wildcards: true,
                variables,
            };
            let resources = resource_list
                .iter()
                .map(|r| {
                    if !variables && r.contains("${") {
                        literal_variables = true;
                    }
                    match arn_fields(r, variables) {
                        Some(fields) => ResourcePattern::Fields(Box::new(
                            fields.map(|field| Pattern::compile(field, syntax)),
                        )),
                        None => ResourcePattern::Whole(Pattern::compile(r, syntax)),
                    }
                })
                .collect();

            let condition = Condition::compile(item.get("Condition"), variables, &at)?;
            for what in condition.unsupported() {
                notes.push(PolicyNote {
                    statement: Some(index),
                    message: format!(
                        "{what}; this {} statement {}",
                        if effect == Effect::Allow {
                            "Allow"
                        } else {
                            "Deny"
                        },
                        if effect == Effect::Allow {
                            "never applies"
                        } else {
                            "applies whenever its actions and resources match"
                        }
                    ),
                });
            }
            statements.push(Statement {
                effect,
                sid,
                actions,
                resources,
                not_resource,
                condition,
            });
        }
        if literal_variables {
            notes.push(PolicyNote {
                statement: None,
                message: format!(
                    "the policy Version is not {POLICY_VERSION}, so ${{…}} in its resources is \
                     literal text, not a policy variable"
                ),
            });
        }
        Ok(Policy { statements, notes })
    }

    /// How many statements the policy has.
    pub fn statement_count(&self) -> usize {
        self.statements.len()
    }

    /// The `Sid` of statement `index`, if it has one.
    pub fn sid(&self, index: usize) -> Option<&str> {
        self.statements.get(index)?.sid.as_deref()
    }

    /// Statements evaluated more strictly than AWS would, and the like: worth a log line
    /// when the policy is loaded.
    pub fn notes(&self) -> &[PolicyNote] {
        &self.notes
    }

    /// Decides `request` for a connection against this policy alone.
    pub fn evaluate(
        &self,
        arn: &ArnContext,
        ctx: &ConnectionContext,
        request: &Request<'_>,
    ) -> Decision {
        evaluate_policies([self], arn, ctx, request)
    }
}

/// The request's ARN, built once per decision.
struct Target<'a> {
    arn: &'a ArnContext,
    whole: String,
    /// Where `TYPE/NAME` starts in `whole`.
    resource_at: usize,
}

impl Target<'_> {
    fn matches(&self, pattern: &ResourcePattern, ctx: &ConnectionContext) -> bool {
        let resolve = |v: &context::Variable| v.substitute(ctx);
        match pattern {
            ResourcePattern::Whole(p) => p.matches(&self.whole, &resolve),
            ResourcePattern::Fields(fields) => {
                let [arn, partition, service, region, account, resource] = &**fields;
                arn.matches("arn", &resolve)
                    && partition.matches("aws", &resolve)
                    && service.matches("iot", &resolve)
                    && region.matches(&self.arn.region, &resolve)
                    && account.matches(&self.arn.account, &resolve)
                    && resource.matches(&self.whole[self.resource_at..], &resolve)
            }
        }
    }
}

impl Statement {
    fn applies(&self, action: Action, target: &Target<'_>, ctx: &ConnectionContext) -> bool {
        if self.actions & action.bit() == 0 {
            return false;
        }
        let listed = self.resources.iter().any(|r| target.matches(r, ctx));
        if listed == self.not_resource {
            return false;
        }
        match self.condition.evaluate(ctx) {
            Outcome::Holds => true,
            Outcome::Fails => false,
            // Fail closed: an undecidable Deny denies, an undecidable Allow does not allow.
            Outcome::Unsupported => self.effect == Effect::Deny,
        }
    }
}

/// Decides `request` against every policy attached to the connection's certificate (and
/// thing): denied if any `Deny` statement of any policy applies, else allowed if any
/// `Allow` statement applies, else denied.
pub fn evaluate_policies<'p>(
    policies: impl IntoIterator<Item = &'p Policy, IntoIter: Clone>,
    arn: &ArnContext,
    ctx: &ConnectionContext,
    request: &Request<'_>,
) -> Decision {
    let policies = policies.into_iter();
    let whole = arn.arn(request);
    let resource_at = whole.len() - request.name.len() - request.action.resource_type().len() - 1;
    let target = Target {
        arn,
        whole,
        resource_at,
    };
    let mut allowed = false;
    for (p, policy) in policies.clone().enumerate() {
        for (s, statement) in policy.statements.iter().enumerate() {
            if statement.effect == Effect::Deny && statement.applies(request.action, &target, ctx) {
                return Decision::Deny {
                    reason: DenyReason::ExplicitDeny {
                        policy: p,
                        statement: s,
                    },
                };
            }
        }
    }
    'outer: for policy in policies {
        for statement in &policy.statements {
            if statement.effect == Effect::Allow && statement.applies(request.action, &target, ctx)
            {
                allowed = true;
                break 'outer;
            }
        }
    }
    if allowed {
        Decision::Allow
    } else {
        Decision::Deny {
            reason: DenyReason::NoMatchingAllow,
        }
    }
}
