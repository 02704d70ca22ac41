//! The plugin's `plugin_opt_*` options from `mosquitto.conf`.

use std::path::PathBuf;
use std::time::Duration;

/// Default bound on the synchronous CONNECT call to serve.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
/// Default period of the `sessions` poll.
pub const DEFAULT_SESSIONS_INTERVAL: Duration = Duration::from_millis(2000);
/// Default period of the CRL check (also checked right after serve retires a certificate).
pub const DEFAULT_CRL_INTERVAL: Duration = Duration::from_millis(60_000);

/// The options, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginOptions {
    /// `plugin_opt_broker_api`: serve's broker API, `http://HOST:PORT` (no TLS: loopback).
    pub broker_api: String,
    /// `plugin_opt_secret_file`: the file holding the bearer secret.
    pub secret_file: PathBuf,
    /// `plugin_opt_timeout_ms`: bound on each call to serve.
    pub timeout: Duration,
    /// `plugin_opt_sessions_interval_ms`: how often live sessions are checked.
    pub sessions_interval: Duration,
    /// `plugin_opt_crl_file`: the listener's `crlfile`. When set, the plugin keeps it equal
    /// to serve's current CRL and makes mosquitto reload it (SIGHUP to its own process)
    /// when it changes; mosquitto refuses every client once a CRL's nextUpdate passes.
    pub crl_file: Option<PathBuf>,
    /// `plugin_opt_crl_interval_ms`: how often the CRL is checked.
    pub crl_interval: Duration,
}

/// An option that is missing or invalid; the message names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError(pub String);

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionError {}

fn milliseconds(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, OptionError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.trim().parse::<u64>() {
        Ok(ms) if (1..=600_000).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(OptionError(format!(
            "plugin_opt_{name} must be a number of milliseconds between 1 and 600000, not {value:?}"
        ))),
    }
}

impl PluginOptions {
    /// Validates the `(key, value)` pairs mosquitto passes (keys without `plugin_opt_`).
    /// Unknown keys are refused too: a misspelt option must not be silently ignored.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<PluginOptions, OptionError> {
        let mut broker_api = None;
        let mut secret_file = None;
        let mut timeout = None;
        let mut sessions_interval = None;
        let mut crl_file = None;
        let mut crl_interval = None;
        for (key, value) in pairs {
            let slot = match key {
                "broker_api" => &mut broker_api,
                "secret_file" => &mut secret_file,
                "timeout_ms" => &mut timeout,
                "sessions_interval_ms" => &mut sessions_interval,
                "crl_file" => &mut crl_file,
                "crl_interval_ms" => &mut crl_interval,
                other => {
                    return Err(OptionError(format!(
                        "unknown option plugin_opt_{other} (known: broker_api, secret_file, timeout_ms, sessions_interval_ms, crl_file, crl_interval_ms)"
                    )));
                }
            };
            if slot.replace(value).is_some() {
                return Err(OptionError(format!("plugin_opt_{key} is given twice")));
            }
        }
        let broker_api = broker_api
            .ok_or_else(|| {
                OptionError("plugin_opt_broker_api is missing (e.g. http://127.0.0.1:8884)".into())
            })?
            .trim()
            .trim_end_matches('/')
            .to_string();
        let authority = broker_api.strip_prefix("http://").ok_or_else(|| {
            OptionError(format!(
                "plugin_opt_broker_api must be an http:// URL (serve's loopback listener), not {broker_api:?}"
            ))
        })?;
        if authority.is_empty() || authority.contains('/') {
            return Err(OptionError(format!(
                "plugin_opt_broker_api must be http://HOST:PORT without a path, not {broker_api:?}"
            )));
        }
        let secret_file = secret_file
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| OptionError("plugin_opt_secret_file is missing".into()))?;
        Ok(PluginOptions {
            broker_api,
            secret_file: PathBuf::from(secret_file.trim()),
            timeout: milliseconds("timeout_ms", timeout, DEFAULT_TIMEOUT)?,
            sessions_interval: milliseconds(
                "sessions_interval_ms",
                sessions_interval,
                DEFAULT_SESSIONS_INTERVAL,
            )?,
            crl_file: match crl_file.map(str::trim) {
                None => None,
                Some("") => return Err(OptionError("plugin_opt_crl_file is empty".into())),
                Some(path) => Some(PathBuf::from(path)),
            },
            crl_interval: milliseconds("crl_interval_ms", crl_interval, DEFAULT_CRL_INTERVAL)?,
        })
    }

    /// Reads the bearer secret: the first line of the secret file, 64 hex characters.
    pub fn read_secret(&self) -> Result<String, OptionError> {
        let path = self.secret_file.display();
        let text = std::fs::read_to_string(&self.secret_file)
            .map_err(|e| OptionError(format!("plugin_opt_secret_file: cannot read {path}: {e}")))?;
        let secret = text.trim();
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(OptionError(format!(
                "plugin_opt_secret_file: {path} does not hold a 64-character hex secret"
            )));
        }
        Ok(secret.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let options = PluginOptions::parse([
            ("broker_api", "http://127.0.0.1:8884/"),
            ("secret_file", "/tmp/s"),
        ])
        .unwrap();
        assert_eq!(options.broker_api, "http://127.0.0.1:8884");
        assert_eq!(options.timeout, DEFAULT_TIMEOUT);
        assert_eq!(options.sessions_interval, DEFAULT_SESSIONS_INTERVAL);
        let options = PluginOptions::parse([
            ("broker_api", "http://127.0.0.1:8884"),
            ("secret_file", "/tmp/s"),
            ("timeout_ms", "500"),
            ("sessions_interval_ms", "100"),
        ])
        .unwrap();
        assert_eq!(options.timeout, Duration::from_millis(500));
        assert_eq!(options.sessions_interval, Duration::from_millis(100));
        assert_eq!(options.crl_file, None);
        let options = PluginOptions::parse([
            ("broker_api", "http://127.0.0.1:8884"),
            ("secret_file", "/tmp/s"),
            ("crl_file", "/etc/mosquitto/crl.pem"),
            ("crl_interval_ms", "5000"),
        ])
        .unwrap();
        assert_eq!(
            options.crl_file,
            Some(PathBuf::from("/etc/mosquitto/crl.pem"))
        );
        assert_eq!(options.crl_interval, Duration::from_millis(5000));
    }

    #[test]
    fn errors_name_the_option() {
        let error =
            |pairs: &[(&str, &str)]| PluginOptions::parse(pairs.iter().copied()).unwrap_err().0;
        assert!(error(&[("secret_file", "/s")]).contains("plugin_opt_broker_api"));
        assert!(
            error(&[("broker_api", "https://x:1"), ("secret_file", "/s")])
                .contains("plugin_opt_broker_api")
        );
        assert!(error(&[("broker_api", "http://x:1")]).contains("plugin_opt_secret_file"));
        assert!(
            error(&[
                ("broker_api", "http://x:1"),
                ("secret_file", "/s"),
                ("timeout_ms", "0")
            ])
            .contains("plugin_opt_timeout_ms")
        );
        assert!(error(&[("brokr_api", "x")]).contains("plugin_opt_brokr_api"));
    }

    #[test]
    fn secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let options = PluginOptions::parse([
            ("broker_api", "http://127.0.0.1:1"),
            ("secret_file", path.to_str().unwrap()),
        ])
        .unwrap();
        assert!(options.read_secret().unwrap_err().0.contains("cannot read"));
        std::fs::write(&path, "abc\n").unwrap();
        assert!(
            options
                .read_secret()
                .unwrap_err()
                .0
                .contains("64-character")
        );
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(options.read_secret().unwrap(), "ab".repeat(32));
    }
}
