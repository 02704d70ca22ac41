//! Patterns compiled once per policy version: literal runs, IAM wildcards (`*` any run of
//! characters, `/` and `:` included; `?` exactly one character) and policy variables that
//! are looked up when a request is evaluated. Matching never builds a regex and never
//! allocates: it is the classic greedy wildcard match with one backtrack point.

use super::context::Variable;

/// One piece of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Text that must appear as written.
    Lit(String),
    /// `*`: any run of characters, possibly empty.
    Star,
    /// `?`: exactly one character.
    One,
    /// `${…}`: a policy variable; its value is literal text (a `*` in it is not a wildcard).
    Var(Variable),
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Pattern {
    pieces: Vec<Piece>,
}

/// How a string is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Syntax {
    /// `*` and `?` are wildcards (resources, `StringLike`); otherwise literal (`StringEquals`).
    pub wildcards: bool,
    /// `${…}` are policy variables (policy `Version` `2012-10-17`); otherwise literal text,
    /// as IAM treats them in older policy versions.
    pub variables: bool,
}

impl Pattern {
    /// Compiles `text`. `${*}`, `${?}` and `${$}` stand for the literal characters; a `${`
    /// without a closing `}` is literal text.
    pub(crate) fn compile(text: &str, syntax: Syntax) -> Pattern {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if syntax.variables
                && let Some(after) = rest.strip_prefix("${")
                && let Some(end) = after.find('}')
            {
                match Variable::parse(&after[..end]) {
                    Variable::Char(c) => lit.push(c),
                    variable => {
                        if !lit.is_empty() {
                            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                        }
                        pieces.push(Piece::Var(variable));
                    }
                }
                rest = &after[end + 1..];
                continue;
            }
            match c {
                '*' | '?' if syntax.wildcards => {
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    // `**` is the same as `*`.
                    if !(c == '*' && pieces.last() == Some(&Piece::Star)) {
                        pieces.push(if c == '*' { Piece::Star } else { Piece::One });
                    }
                }
                c => lit.push(c),
            }
            rest = &rest[c.len_utf8()..];
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Pattern { pieces }
    }

    /// The pattern's variables.
    pub(crate) fn variables(&self) -> impl Iterator<Item = &Variable> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            _ => None,
        })
    }

    /// The pattern as text with its variables substituted (wildcards as written), or
    /// `None` when a variable cannot be resolved.
    pub(crate) fn render<'c>(
        &self,
        resolve: &impl Fn(&Variable) -> Option<&'c str>,
    ) -> Option<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(text) => out.push_str(text),
                Piece::Star => out.push('*'),
                Piece::One => out.push('?'),
                Piece::Var(v) => out.push_str(resolve(v)?),
            }
        }
        Some(out)
    }

    /// Whether the whole of `subject` matches. `resolve` gives a variable's value, or
    /// `None` when it cannot be resolved: then nothing matches.
    pub(crate) fn matches<'c>(
        &self,
        subject: &str,
        resolve: &impl Fn(&Variable) -> Option<&'c str>,
    ) -> bool {
        // An unresolved variable anywhere means no match, whatever path matching takes.
        if self.variables().any(|v| resolve(v).is_none()) {
            return false;
        }
        let pieces = &self.pieces;
        let (mut p, mut i) = (0usize, 0usize);
        // After a `*`: the piece following it, and where in the subject it was tried.
        let mut star: Option<(usize, usize)> = None;
        loop {
            let advanced = match pieces.get(p) {
                Some(Piece::Star) => {
                    star = Some((p + 1, i));
                    p += 1;
                    continue;
                }
                Some(Piece::One) => match subject[i..].chars().next() {
                    Some(c) => {
                        i += c.len_utf8();
                        true
                    }
                    None => false,
                },
                Some(Piece::Lit(text)) => eat(subject, &mut i, text),
                Some(Piece::Var(v)) => match resolve(v) {
                    Some(text) => eat(subject, &mut i, text),
                    None => return false,
                },
                None if i == subject.len() => return true,
                None => false,
            };
            if advanced {
                p += 1;
                continue;
            }
            // Mismatch: let the last `*` take one more character.
            match star {
                Some((after, from)) => match subject[from..].chars().next() {
                    Some(c) => {
                        let next = from + c.len_utf8();
                        star = Some((after, next));
                        p = after;
                        i = next;
                    }
                    None => return false,
                },
                None => return false,
            }
        }
    }
}

fn eat(subject: &str, i: &mut usize, text: &str) -> bool {
    if subject[*i..].starts_with(text) {
        *i += text.len();
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GLOB: Syntax = Syntax {
        wildcards: true,
        variables: true,
    };

    fn m(pattern: &str, subject: &str) -> bool {
        Pattern::compile(pattern, GLOB).matches(subject, &|_| Some("x*"))
    }

    #[test]
    fn wildcards() {
        assert!(m("*", ""));
        assert!(m("*", "a/b:c"));
        assert!(m("a*c", "abbbc"));
        assert!(m("a*c", "ac"));
        assert!(!m("a*c", "acb"));
        assert!(m("a?c", "abc"));
        assert!(m("a?c", "aéc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*a*b*", "xxaxxbxx"));
        assert!(!m("*a*b*", "xxbxxaxx"));
        assert!(m("a**b", "ab"));
        assert!(m("+/#", "+/#"));
        assert!(!m("+/#", "a/b"));
        assert!(m("${*}", "*"));
        assert!(!m("${*}", "a"));
        assert!(m("${?}${$}", "?$"));
        assert!(m("${unclosed", "${unclosed"));
    }

    #[test]
    fn variables_are_literal() {
        // The resolver gives "x*": the star in the value is a literal.
        assert!(m("t/${iot:ClientId}", "t/x*"));
        assert!(!m("t/${iot:ClientId}", "t/xy"));
        assert!(m("t/${iot:ClientId}/*", "t/x*/a/b"));
        let p = Pattern::compile("t/${iot:ClientId}*", GLOB);
        assert!(!p.matches("t/anything", &|_| None));
        assert!(!p.matches("t/", &|_| None));
    }

    #[test]
    fn without_variables_or_wildcards() {
        let literal = Syntax {
            wildcards: false,
            variables: false,
        };
        let p = Pattern::compile("a*${iot:ClientId}", literal);
        assert!(p.matches("a*${iot:ClientId}", &|_| None));
        assert!(!p.matches("ab", &|_| None));
    }
}
