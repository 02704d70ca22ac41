//! The `Condition` block: the string and boolean operators of IAM, on AWS IoT's keys.

use super::PolicyError;
use super::context::{ConnectionContext, Values, Variable};
use super::glob::{Pattern, Syntax};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    /// `StringEquals` / `StringEqualsIgnoreCase` (and their `Not` forms).
    Equals { ignore_case: bool },
    /// `StringLike` (and `StringNotLike`): `*` and `?` are wildcards.
    Like,
    /// `Bool`: `"true"`/`"false"`, case-insensitive.
    Bool,
    /// `Null`: `"true"` means the key is absent.
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qualifier {
    Single,
    ForAnyValue,
    ForAllValues,
}

#[derive(Debug, Clone)]
struct Entry {
    test: Test,
    negated: bool,
    if_exists: bool,
    qualifier: Qualifier,
    key: Variable,
    values: Vec<Pattern>,
}

/// A compiled `Condition` block: every entry must hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Condition {
    entries: Vec<Entry>,
    /// Operators or keys this evaluator does not implement, described for the operator.
    unsupported: Vec<String>,
}

/// The result of a condition block for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Holds,
    Fails,
    /// The block uses an operator or key that is not evaluated.
    Unsupported,
}

fn parse_operator(name: &str) -> Option<(Test, bool, bool, Qualifier)> {
    let lower = name.to_ascii_lowercase();
    let (qualifier, rest) = if let Some(rest) = lower.strip_prefix("foranyvalue:") {
        (Qualifier::ForAnyValue, rest)
    } else if let Some(rest) = lower.strip_prefix("forallvalues:") {
        (Qualifier::ForAllValues, rest)
    } else {
        (Qualifier::Single, lower.as_str())
    };
    let (if_exists, base) = match rest.strip_suffix("ifexists") {
        Some(base) => (true, base),
        None => (false, rest),
    };
    let (test, negated) = match base {
        "stringequals" => (Test::Equals { ignore_case: false }, false),
        "stringnotequals" => (Test::Equals { ignore_case: false }, true),
        "stringequalsignorecase" => (Test::Equals { ignore_case: true }, false),
        "stringnotequalsignorecase" => (Test::Equals { ignore_case: true }, true),
        "stringlike" => (Test::Like, false),
        "stringnotlike" => (Test::Like, true),
        "bool" => (Test::Bool, false),
        "null" if !if_exists && qualifier == Qualifier::Single => (Test::Null, false),
        _ => return None,
    };
    Some((test, negated, if_exists, qualifier))
}

/// A condition value: a string, or a boolean or number written without quotes.
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Condition {
    pub(crate) fn compile(
        condition: Option<&Value>,
        variables: bool,
        at: &dyn Fn(String) -> PolicyError,
    ) -> Result<Condition, PolicyError> {
        let mut out = Condition::default();
        let Some(condition) = condition else {
            return Ok(out);
        };
        let Some(operators) = condition.as_object() else {
            return Err(at("Condition must be an object".into()));
        };
        for (operator, body) in operators {
            let Some(keys) = body.as_object() else {
                return Err(at(format!(
                    "Condition operator {operator:?} must map condition keys to values"
                )));
            };
            let mut texts = Vec::new();
            for (key, value) in keys {
                let values: Vec<String> = match value {
                    Value::Array(items) => items.iter().map(value_text).collect::<Option<_>>(),
                    one => value_text(one).map(|v| vec![v]),
                }
                .ok_or_else(|| {
                    at(format!(
                        "Condition {operator:?} {key:?}: values must be strings, booleans or \
                         numbers, or a list of them"
                    ))
                })?;
                texts.push((key, values));
            }
            let Some((test, negated, if_exists, qualifier)) = parse_operator(operator) else {
                out.unsupported
                    .push(format!("condition operator {operator:?} is not supported"));
                continue;
            };
            for (key, values) in texts {
                let variable = Variable::parse(key);
                if !variable.is_known_key() {
                    out.unsupported.push(format!(
                        "condition key {key:?} (in {operator:?}) is not an AWS IoT key this \
                         broker knows"
                    ));
                    continue;
                }
                let syntax = Syntax {
                    wildcards: test == Test::Like,
                    // Bool and Null compare fixed words.
                    variables: variables && matches!(test, Test::Equals { .. } | Test::Like),
                };
                out.entries.push(Entry {
                    test,
                    negated,
                    if_exists,
                    qualifier,
                    key: variable,
                    values: values.iter().map(|v| Pattern::compile(v, syntax)).collect(),
                });
            }
        }
        Ok(out)
    }

    /// What the compiler could not evaluate.
    pub(crate) fn unsupported(&self) -> &[String] {
        &self.unsupported
    }

    pub(crate) fn evaluate(&self, ctx: &ConnectionContext) -> Outcome {
        if !self.unsupported.is_empty() {
            return Outcome::Unsupported;
        }
        if self.entries.iter().all(|entry| entry.holds(ctx)) {
            Outcome::Holds
        } else {
            Outcome::Fails
        }
    }
}

impl Entry {
    fn holds(&self, ctx: &ConnectionContext) -> bool {
        let key_values = self.key.values(ctx);
        if self.test == Test::Null {
            let absent = key_values.is_none();
            return self.values.iter().any(|v| {
                let word = v.render(&|_| None).unwrap_or_default();
                (word.eq_ignore_ascii_case("true") && absent)
                    || (word.eq_ignore_ascii_case("false") && !absent)
            });
        }
        let Some(key_values) = key_values else {
            // The key is not in the request context (IAM): `…IfExists` holds, a negated
            // operator holds, `ForAllValues:` holds (vacuously), the others fail.
            return self.if_exists
                || match self.qualifier {
                    Qualifier::ForAllValues => true,
                    Qualifier::ForAnyValue => false,
                    Qualifier::Single => self.negated,
                };
        };
        // A policy variable in the values that cannot be resolved: the condition fails.
        let resolve = |v: &Variable| v.substitute(ctx);
        if self
            .values
            .iter()
            .flat_map(Pattern::variables)
            .any(|v| resolve(v).is_none())
        {
            return false;
        }
        let positive = |key_value: &str| -> bool {
            self.values.iter().any(|pattern| match self.test {
                Test::Equals { ignore_case: false } | Test::Like => {
                    pattern.matches(key_value, &resolve)
                }
                Test::Equals { ignore_case: true } => {
                    let wanted = pattern.render(&resolve).unwrap_or_default();
                    wanted.to_lowercase() == key_value.to_lowercase()
                }
                Test::Bool => {
                    let wanted = pattern.render(&resolve).unwrap_or_default();
                    wanted.eq_ignore_ascii_case(key_value)
                }
                Test::Null => false,
            })
        };
        let each = |key_value: &str| positive(key_value) != self.negated;
        match (self.qualifier, key_values) {
            (Qualifier::ForAnyValue, kv) => kv.iter().any(each),
            (Qualifier::ForAllValues, kv) => kv.iter().all(each),
            (Qualifier::Single, Values::One(v)) => each(v),
            // A list key without a set qualifier: any value matches (negated: none does).
            (Qualifier::Single, kv) => kv.iter().any(positive) != self.negated,
        }
    }
}
