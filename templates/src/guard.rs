//! Bounds on template input, checked before the YAML/JSON parser runs, and on what an
//! error message may echo of it.
//!
//! The YAML parser's time grows with the square of the nesting of `[`/`{` collections (a
//! 600 KB file of 100,000 nested JSON objects took 36 s of CPU), and a template file can
//! be anything an operator's directory holds (a symlink to `/etc/shadow` once printed a
//! line of it as an "unknown section"). So: a size cap, a nesting cap found by a linear
//! byte scan, and error messages that quote at most [`MAX_ECHO_CHARS`] of any input.
use crate::TemplateError;

/// Largest template accepted, in bytes (AWS's own limit on a template body is 10 KB).
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;

/// Deepest nesting of collections accepted: `[`/`{` (flow style, all of JSON) or block
/// indentation levels. Real templates nest about 10 deep.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Most `[`/`{` characters a template may contain in all. This bounds the parser's
/// work whatever quoting tricks hide the nesting from the depth scan.
pub const MAX_FLOW_OPENINGS: usize = 4096;

/// Longest piece of input (a key, a value, a file name) an error message quotes.
pub const MAX_ECHO_CHARS: usize = 64;

/// Longest location and reason in an error message.
const MAX_FIELD_CHARS: usize = 400;

/// `text` cut to at most `max` characters, saying how much was left out.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…[{} more bytes]", &text[..cut], text.len() - cut),
    }
}

/// `text` with every double-quoted (Rust `Debug`-style) piece longer than `max`
/// characters cut to `max`, then the whole cut to [`MAX_FIELD_CHARS`].
fn clip_quoted(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_FIELD_CHARS * 2));
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        // The closing quote: the first '"' not escaped by a backslash.
        let mut close = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    close = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = close.unwrap_or(rest.len());
        let quoted = &rest[..end];
        match quoted.char_indices().nth(max) {
            None => out.push_str(quoted),
            Some((cut, _)) => {
                out.push_str(&quoted[..cut]);
                out.push('…');
            }
        }
        match close {
            Some(close) => {
                out.push('"');
                if quoted.len() > max {
                    out.push_str(&format!(" [{} bytes]", quoted.len()));
                }
                rest = &rest[close + 1..];
            }
            None => rest = "",
        }
    }
    out.push_str(rest);
    clip(&out, MAX_FIELD_CHARS)
}

impl TemplateError {
    /// The same error with every piece of echoed input bounded: quoted pieces to
    /// [`MAX_ECHO_CHARS`], whole fields to a few hundred characters.
    pub(crate) fn bounded(self) -> Self {
        let name = |n: String| clip(&n, MAX_ECHO_CHARS);
        let field = |f: String| clip_quoted(&f, MAX_ECHO_CHARS);
        match self {
            TemplateError::InvalidName { name: n, reason } => TemplateError::InvalidName {
                name: name(n),
                reason,
            },
            TemplateError::Syntax { name: n, reason } => TemplateError::Syntax {
                name: name(n),
                reason: field(reason),
            },
            TemplateError::NoResources { name: n } => TemplateError::NoResources { name: name(n) },
            TemplateError::Invalid {
                name: n,
                location,
                reason,
            } => TemplateError::Invalid {
                name: name(n),
                location: field(location),
                reason: field(reason),
            },
            TemplateError::MissingParameter {
                name: n,
                location,
                parameter,
                why,
            } => TemplateError::MissingParameter {
                name: name(n),
                location: field(location),
                parameter: clip(&parameter, MAX_ECHO_CHARS),
                why: field(why),
            },
            TemplateError::Render {
                name: n,
                location,
                reason,
            } => TemplateError::Render {
                name: name(n),
                location: field(location),
                reason: field(reason),
            },
            TemplateError::InvalidThingName {
                name: n,
                thing_name,
                reason,
            } => TemplateError::InvalidThingName {
                name: name(n),
                thing_name: clip(&thing_name, MAX_ECHO_CHARS),
                reason: field(reason),
            },
            other => other,
        }
    }
}

/// Refuses, before any parsing, a template that is too large or nests too deep. Linear
/// in the text's length.
pub(crate) fn check_input(name: &str, text: &str) -> Result<(), TemplateError> {
    let refuse = |reason: String| TemplateError::Syntax {
        name: clip(name, MAX_ECHO_CHARS),
        reason,
    };
    if text.len() > MAX_TEMPLATE_BYTES {
        return Err(refuse(format!(
            "it is {} bytes; the limit is {} bytes",
            text.len(),
            MAX_TEMPLATE_BYTES
        )));
    }
    let bytes = text.as_bytes();
    let (mut line, mut line_start) = (1usize, 0usize);
    let at = |line: usize, line_start: usize, i: usize| {
        format!(
            "line {line} column {}",
            text[line_start..i].chars().count() + 1
        )
    };
    // Flow collections: every '[' / '{' counts (quoted or not: counting too many is
    // safe), a closing bracket ends one.
    let (mut depth, mut openings) = (0usize, 0usize);
    // Block collections: the stack of indentations of the lines that opened them.
    let mut indents: Vec<usize> = Vec::new();
    let mut line_has_content = false;
    let mut indent = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\n' => {
                line += 1;
                line_start = i + 1;
                line_has_content = false;
                indent = 0;
                continue;
            }
            b' ' if !line_has_content => {
                indent += 1;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                openings += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(refuse(format!(
                        "collections nest deeper than {MAX_NESTING_DEPTH} levels at {}",
                        at(line, line_start, i)
                    )));
                }
                if openings > MAX_FLOW_OPENINGS {
                    return Err(refuse(format!(
                        "more than {MAX_FLOW_OPENINGS} '[' and '{{' in all (at {})",
                        at(line, line_start, i)
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if !line_has_content && !matches!(b, b'\r' | b'\t') {
            line_has_content = true;
            if b != b'#' {
                while indents.last().is_some_and(|&top| top >= indent) {
                    indents.pop();
                }
                indents.push(indent);
                if indents.len() > MAX_NESTING_DEPTH {
                    return Err(refuse(format!(
                        "indentation nests deeper than {MAX_NESTING_DEPTH} levels at {}",
                        at(line, line_start, i)
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…[1 more bytes]");
        assert_eq!(clip("ééé", 2), "éé…[2 more bytes]");
    }

    #[test]
    fn quoted_pieces_are_cut() {
        let long = "x".repeat(1000);
        let text = format!("unknown section {long:?} (expected Resources)");
        let cut = clip_quoted(&text, 8);
        assert_eq!(
            cut,
            "unknown section \"xxxxxxxx…\" [1000 bytes] (expected Resources)"
        );
        assert_eq!(clip_quoted("a \"b\\\"c\" d", 8), "a \"b\\\"c\" d");
        assert!(clip_quoted(&format!("\"{long}"), 8).starts_with("\"xxxxxxxx…"));
        assert!(clip_quoted(&"y".repeat(5000), 8).len() < 500);
    }

    #[test]
    fn deep_nesting_is_refused_with_its_position() {
        let deep = format!("{}{}", "{\"a\":".repeat(100), "1");
        let err = check_input("deep", &deep).unwrap_err().to_string();
        assert!(
            err.contains("deeper than 64") && err.contains("line 1 column"),
            "{err}"
        );
        let yaml: String = (0..100)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        let err = check_input("deep", &yaml).unwrap_err().to_string();
        assert!(
            err.contains("indentation") && err.contains("line 65"),
            "{err}"
        );
        let many = "[".repeat(MAX_FLOW_OPENINGS + 1).replace('[', "[]");
        let err = check_input("many", &many).unwrap_err().to_string();
        assert!(err.contains("4096"), "{err}");
        let big = "#".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(check_input("big", &big).is_err());
    }

    #[test]
    fn ordinary_templates_pass() {
        check_input("default", crate::DEFAULT_TEMPLATE_YAML).unwrap();
        check_input(
            "json",
            r#"{"Resources": {"t": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::Join": ["", ["a", {"Ref": "p"}]]}}}}}"#,
        )
        .unwrap();
    }
}
