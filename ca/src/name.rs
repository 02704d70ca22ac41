use crate::CaError;
use std::fmt;

/// A thing name as AWS IoT defines it: `[a-zA-Z0-9:_-]{1,128}`.
///
/// It becomes the certificate's common name and is substituted into policies for
/// `${iot:Connection.Thing.ThingName}`, so it must never carry MQTT wildcards (`+`, `#`),
/// policy wildcards (`*`) or topic separators (`/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThingName(String);

impl ThingName {
    /// The longest thing name AWS IoT accepts, in bytes (all characters are ASCII).
    pub const MAX_LEN: usize = 128;

    /// Checks `name` against `[a-zA-Z0-9:_-]{1,128}`; [`CaError::InvalidThingName`] says
    /// what is wrong otherwise.
    pub fn parse(name: &str) -> Result<Self, CaError> {
        let invalid = |reason: String| CaError::InvalidThingName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if name.len() > Self::MAX_LEN {
            return Err(invalid(format!(
                "it is {} characters long; the limit is {}",
                name.chars().count(),
                Self::MAX_LEN
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')))
        {
            return Err(invalid(format!(
                "character {c:?} is not allowed (only letters, digits, ':', '_' and '-')"
            )));
        }
        Ok(ThingName(name.to_owned()))
    }

    /// The name, as given to [`ThingName::parse`].
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ThingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ThingName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_aws_alphabet() {
        for ok in ["a", "sensor-01", "line:3_dev-9", &"x".repeat(128)] {
            assert!(ThingName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_wildcards_separators_and_bad_lengths() {
        for bad in [
            "",
            "a*b",
            "x/y",
            "room#1",
            "plus+",
            "sp ace",
            "é",
            &"x".repeat(129),
        ] {
            let err = ThingName::parse(bad).unwrap_err();
            assert!(
                matches!(err, CaError::InvalidThingName { .. }),
                "{bad}: {err}"
            );
        }
    }
}
