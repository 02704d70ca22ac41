//! Template values with intrinsic functions, and their evaluation.

use crate::model::{ParameterType, Template};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// A template value: a literal (scalar, list, map) or an intrinsic function.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Expr {
    /// `null` (or an empty YAML value).
    Null,
    /// A boolean literal.
    Bool(bool),
    /// A number literal.
    Number(serde_json::Number),
    /// A string literal, kept as written (policy variables included).
    String(String),
    /// A list whose items may themselves be intrinsics.
    List(Vec<Expr>),
    /// A map that is not an intrinsic call; its values may be intrinsics.
    Map(BTreeMap<String, Expr>),
    /// `{"Ref": "Param"}` / `!Ref Param`.
    Ref(String),
    /// `{"Fn::Join": [delimiter, list]}`.
    Join {
        /// Written between the items; may be empty.
        delimiter: String,
        /// Must evaluate to a list of strings.
        list: Box<Expr>,
    },
    /// `{"Fn::Sub": "text"}` or `{"Fn::Sub": ["text", {vars}]}`; policy variables
    /// (`${iot:…}`, `${aws:…}`) stay in the text.
    Sub {
        /// The text split into literal pieces and `${Name}` references.
        parts: Vec<SubPart>,
        /// The variables given with the text (empty in the one-argument form); they take
        /// precedence over parameters of the same name.
        vars: BTreeMap<String, Expr>,
    },
    /// `{"Fn::FindInMap": [map, top-level key, second-level key]}`.
    FindInMap {
        /// Name of a map under `Mappings`.
        map: Box<Expr>,
        /// Key in that map.
        top_key: Box<Expr>,
        /// Key under the top-level key; its value is the result.
        second_key: Box<Expr>,
    },
    /// `{"Fn::Split": [delimiter, source]}`.
    Split {
        /// The separator, matched literally.
        delimiter: String,
        /// Must evaluate to a string.
        source: Box<Expr>,
    },
    /// `{"Fn::Select": [index, list]}`.
    Select {
        /// 0-based; a number, or a string holding one (a parameter value).
        index: Box<Expr>,
        /// Must evaluate to a list at least `index + 1` long.
        list: Box<Expr>,
    },
}

/// A piece of a `Fn::Sub` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubPart {
    /// Text kept as is (including policy variables).
    Text(String),
    /// `${Name}`: a `Fn::Sub` variable, else a parameter.
    Var(String),
}

/// What an expression evaluates to, as far as it is known before rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Scalar,
    List,
    Map,
    Unknown,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Shape::Scalar => "a scalar",
            Shape::List => "a list",
            Shape::Map => "a map",
            Shape::Unknown => "a value",
        })
    }
}

impl Expr {
    pub(crate) fn shape(&self) -> Shape {
        match self {
            Expr::Null => Shape::Unknown,
            Expr::Bool(_) | Expr::Number(_) | Expr::String(_) => Shape::Scalar,
            Expr::List(_) | Expr::Split { .. } => Shape::List,
            Expr::Map(_) => Shape::Map,
            Expr::Ref(_) | Expr::Join { .. } | Expr::Sub { .. } => Shape::Scalar,
            Expr::Select { list, .. } => match list.as_ref() {
                Expr::List(items) if items.iter().all(|i| i.shape() == Shape::Scalar) => {
                    Shape::Scalar
                }
                Expr::Split { .. } => Shape::Scalar,
                _ => Shape::Unknown,
            },
            Expr::FindInMap { .. } => Shape::Unknown,
        }
    }

    /// The string a literal scalar stands for.
    pub(crate) fn literal_string(&self) -> Option<String> {
        match self {
            Expr::String(s) => Some(s.clone()),
            Expr::Number(n) => Some(n.to_string()),
            Expr::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// A literal tree (no intrinsics) from JSON.
    pub(crate) fn literal(v: &Value) -> Expr {
        match v {
            Value::Null => Expr::Null,
            Value::Bool(b) => Expr::Bool(*b),
            Value::Number(n) => Expr::Number(n.clone()),
            Value::String(s) => Expr::String(s.clone()),
            Value::Array(items) => Expr::List(items.iter().map(Expr::literal).collect()),
            Value::Object(map) => Expr::Map(
                map.iter()
                    .map(|(k, v)| (k.clone(), Expr::literal(v)))
                    .collect(),
            ),
        }
    }
}

/// Why an evaluation failed.
#[derive(Debug)]
pub(crate) enum EvalError {
    /// A parameter has no value and no Default.
    Missing(String),
    Other(String),
}

/// What parameters evaluate to: the given values, or (for linting a template before any
/// device shows up) `${Name}` placeholders.
pub(crate) struct Env<'a> {
    pub(crate) template: &'a Template,
    pub(crate) params: Option<&'a BTreeMap<String, String>>,
}

/// A value that depends on parameters not known yet (symbolic evaluation only).
fn unknown(what: &str) -> Value {
    Value::String(format!("${{{what}}}"))
}

fn is_placeholder(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.contains("${"))
}

pub(crate) fn scalar_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

impl Env<'_> {
    fn symbolic(&self) -> bool {
        self.params.is_none()
    }

    fn parameter(&self, name: &str) -> Result<Value, EvalError> {
        let Some(params) = self.params else {
            return Ok(unknown(name));
        };
        let declared = self.template.parameters.get(name);
        let value = params
            .get(name)
            .cloned()
            .or_else(|| declared.and_then(|p| p.default.clone()))
            .ok_or_else(|| EvalError::Missing(name.to_owned()))?;
        if declared.is_some_and(|p| p.kind == ParameterType::Number)
            && value.trim().parse::<f64>().is_err()
        {
            return Err(EvalError::Other(format!(
                "parameter {name:?} is a Number but its value {value:?} is not a number"
            )));
        }
        Ok(Value::String(value))
    }

    fn string(&self, e: &Expr, what: &str) -> Result<String, EvalError> {
        let v = self.eval(e)?;
        scalar_to_string(&v).ok_or_else(|| {
            EvalError::Other(format!("{what} must be a string, got {}", kind_of(&v)))
        })
    }

    pub(crate) fn eval(&self, e: &Expr) -> Result<Value, EvalError> {
        Ok(match e {
            Expr::Null => Value::Null,
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Number(n) => Value::Number(n.clone()),
            Expr::String(s) => Value::String(s.clone()),
            Expr::List(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.eval(i))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Map(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.eval(v)?)))
                    .collect::<Result<_, EvalError>>()?,
            ),
            Expr::Ref(name) => self.parameter(name)?,
            Expr::Join { delimiter, list } => {
                let list = self.eval(list)?;
                match list {
                    Value::Array(items) => {
                        let mut parts = Vec::with_capacity(items.len());
                        for item in &items {
                            parts.push(scalar_to_string(item).ok_or_else(|| {
                                EvalError::Other(format!(
                                    "Fn::Join: every value must be a string, got {}",
                                    kind_of(item)
                                ))
                            })?);
                        }
                        Value::String(parts.join(delimiter))
                    }
                    v if self.symbolic() && is_placeholder(&v) => unknown("Fn::Join"),
                    v => {
                        return Err(EvalError::Other(format!(
                            "Fn::Join: the values must be a list, got {}",
                            kind_of(&v)
                        )));
                    }
                }
            }
            Expr::Sub { parts, vars } => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        SubPart::Text(t) => out.push_str(t),
                        SubPart::Var(name) => match vars.get(name) {
                            Some(v) => out
                                .push_str(&self.string(v, &format!("Fn::Sub: variable {name:?}"))?),
                            None => {
                                let v = self.parameter(name)?;
                                out.push_str(v.as_str().unwrap_or_default());
                            }
                        },
                    }
                }
                Value::String(out)
            }
            Expr::FindInMap {
                map,
                top_key,
                second_key,
            } => {
                let map_name = self.string(map, "Fn::FindInMap: the map name")?;
                let top = self.string(top_key, "Fn::FindInMap: the top-level key")?;
                let second = self.string(second_key, "Fn::FindInMap: the second-level key")?;
                let found = self
                    .template
                    .mappings
                    .get(&map_name)
                    .and_then(|m| m.get(&top))
                    .and_then(|m| m.get(&second));
                match found {
                    Some(v) => v.clone(),
                    None if self.symbolic()
                        && [&map_name, &top, &second].iter().any(|k| k.contains("${")) =>
                    {
                        unknown("Fn::FindInMap")
                    }
                    None => {
                        return Err(EvalError::Other(format!(
                            "Fn::FindInMap: no value for {map_name:?} -> {top:?} -> {second:?} in \
                             Mappings"
                        )));
                    }
                }
            }
            Expr::Split { delimiter, source } => {
                let source = self.string(source, "Fn::Split: the source")?;
                Value::Array(
                    source
                        .split(delimiter.as_str())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                )
            }
            Expr::Select { index, list } => {
                let index_value = self.eval(index)?;
                let list = self.eval(list)?;
                let parsed = match &index_value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match (parsed, list) {
                    (Some(i), Value::Array(items)) => {
                        let len = items.len();
                        usize::try_from(i)
                            .ok()
                            .and_then(|i| items.into_iter().nth(i))
                            .ok_or_else(|| {
                                EvalError::Other(format!(
                                    "Fn::Select: index {i} is out of range for a list of {len} \
                                     values"
                                ))
                            })?
                    }
                    (None, _) if self.symbolic() && is_placeholder(&index_value) => {
                        unknown("Fn::Select")
                    }
                    (_, v) if self.symbolic() && is_placeholder(&v) => unknown("Fn::Select"),
                    (None, _) => {
                        return Err(EvalError::Other(format!(
                            "Fn::Select: the index must be a whole number ≥ 0, got {index_value}"
                        )));
                    }
                    (Some(_), v) => {
                        return Err(EvalError::Other(format!(
                            "Fn::Select: the values must be a list, got {}",
                            kind_of(&v)
                        )));
                    }
                }
            }
        })
    }
}
