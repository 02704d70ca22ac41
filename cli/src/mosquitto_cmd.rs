//! `fleetcert mosquitto config`: a mosquitto configuration for the fleet (TLS listener
//! with fleet client certificates and the CRL, the fleetcert plugin), the broker's
//! certificate from the fleet CA, and the broker API secret shared with
//! `serve --broker-api`. Files are written through lifecycle, each atomically; the
//! configuration last, so it never names a file that is not there.
use crate::args::MosquittoConfigArgs;
use crate::context::{CliError, Ctx, bad_input, passphrase};
use crate::output::timestamp;
use fleetcert_ca::IssuingCa;
use fleetcert_lifecycle::DataDir;
use fleetcert_lifecycle::broker::{
    self, BrokerCredentials, SECRET_FILE, SecretOrigin, create_private_dir,
    issue_broker_credentials,
};
use fleetcert_lifecycle::renewal::{Clock, clock_from_env};
use fleetcert_lifecycle::revocation::{CrlPublisher, crl_pem};
use fleetcert_registry::{Registry, StoredCrl};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// The plugin's file name, looked for beside the fleetcert executable.
const PLUGIN_FILE: &str = "libfleetcert_mosquitto.so";

/// Characters allowed in host names and addresses written into mosquitto.conf (its
/// parser splits on whitespace; nothing else may slip into the file).
fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_')
}

/// `HOST:PORT` (IPv6 in brackets) → (host, port).
fn parse_listen(listen: &str) -> Result<(String, u16), CliError> {
    let bad = |why: &str| {
        bad_input(format!(
            "--listen {:?}: {why} (expected HOST:PORT, e.g. 0.0.0.0:8883 or [::]:8883)",
            fleetcert_templates::clip(listen, fleetcert_templates::MAX_ECHO_CHARS)
        ))
    };
    let (host, port) = listen.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.len() > 253 || !host.chars().all(is_host_char) {
        return Err(bad("not a host name or IP address"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("the port must be 1 to 65535"))?;
    Ok((host.to_owned(), port))
}

/// `http://HOST:PORT` (optionally with a trailing `/`).
fn parse_broker_api(url: &str) -> Result<String, CliError> {
    let bad = |why: &str| {
        bad_input(format!(
            "--broker-api {:?}: {why} (expected http://HOST:PORT, the address given to `serve --broker-api`)",
            fleetcert_templates::clip(url, fleetcert_templates::MAX_ECHO_CHARS)
        ))
    };
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("it must start with http://"))?;
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let (host, _) = parse_listen(authority).map_err(|_| bad("not HOST:PORT"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(format!("http://{authority}"))
}

fn check_server_name(name: &str) -> Result<(), CliError> {
    if name.is_empty() || name.len() > 253 || !name.chars().all(is_host_char) {
        return Err(bad_input(format!(
            "--server-name {:?}: not a DNS name or IP address",
            fleetcert_templates::clip(name, fleetcert_templates::MAX_ECHO_CHARS)
        )));
    }
    Ok(())
}

/// A path written into mosquitto.conf: absolute, and without whitespace (mosquitto
/// splits its options on whitespace).
pub(crate) fn conf_path(path: &Path, what: &str) -> Result<String, CliError> {
    let text = path
        .to_str()
        .ok_or_else(|| bad_input(format!("{what} {}: the path is not UTF-8", path.display())))?;
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad_input(format!(
            "{what} {text:?}: mosquitto.conf cannot hold a path with spaces or control characters"
        )));
    }
    Ok(text.to_owned())
}

/// The plugin beside the fleetcert executable, if it is there.
pub(crate) fn plugin_beside_executable() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(PLUGIN_FILE)))
        .filter(|path| path.is_file())
}

pub(crate) fn plugin_path(given: Option<&Path>) -> Result<PathBuf, CliError> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => plugin_beside_executable().ok_or_else(|| {
            bad_input(format!(
                "no {PLUGIN_FILE} beside the fleetcert executable; pass --plugin PATH (the fleetcert mosquitto plugin library)"
            ))
        })?,
    };
    if !path.is_file() {
        return Err(bad_input(format!(
            "--plugin {}: no such file",
            path.display()
        )));
    }
    std::fs::canonicalize(&path).map_err(|e| bad_input(format!("--plugin {}: {e}", path.display())))
}

/// What goes into a broker's configuration (checked by the caller).
pub(crate) struct BrokerConfig<'a> {
    /// The MQTT listener's host and port.
    pub host: &'a str,
    pub port: u16,
    /// `http://HOST:PORT` of `serve --broker-api`.
    pub broker_api: &'a str,
    /// The broker certificate's names.
    pub names: &'a [String],
    /// The plugin library, absolute, as written into the configuration.
    pub plugin: &'a str,
    /// Where the files go (created mode 0700 if missing).
    pub dir: &'a Path,
}

/// What [`write_config`] wrote.
pub(crate) struct WrittenConfig {
    /// The directory, canonical.
    pub dir: PathBuf,
    pub credentials: BrokerCredentials,
    pub crl: Arc<StoredCrl>,
    pub origin: SecretOrigin,
}

/// Writes a broker's configuration: `ca.pem`, `server.crt`/`server.key`, `crl.pem`, the
/// broker API secret (reused if there is one), then `mosquitto.conf`, each atomically.
/// `fleetcert mosquitto config` and `fleetcert demo` both write through this.
pub(crate) async fn write_config(
    data: &DataDir,
    ca: &Arc<IssuingCa>,
    registry: Arc<dyn Registry>,
    clock: Arc<dyn Clock>,
    config: &BrokerConfig<'_>,
) -> Result<WrittenConfig, CliError> {
    let BrokerConfig {
        host,
        port,
        broker_api,
        names,
        plugin,
        dir,
    } = *config;
    let chain = data.chain_pem()?;
    let crl = CrlPublisher::new(registry, ca.clone(), clock)
        .refresh()
        .await?
        .crl;
    let credentials = issue_broker_credentials(ca, names)?;

    create_private_dir(dir)?;
    let dir =
        std::fs::canonicalize(dir).map_err(|e| fleetcert_lifecycle::LifecycleError::Read {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
    let at = |name: &str| dir.join(name);
    let (secret, origin) = data.ensure_broker_secret(&dir)?;
    drop(secret);
    broker::write_public_file(&at("ca.pem"), chain.as_bytes())?;
    broker::write_public_file(&at("server.crt"), credentials.chain_pem.as_bytes())?;
    broker::write_secret_file(&at("server.key"), credentials.key_pem.as_bytes())?;
    broker::write_public_file(&at("crl.pem"), crl_pem(&crl.der).as_bytes())?;
    let path = |name: &str| conf_path(&at(name), "--out");
    let conf = format!(
        "# Written by `fleetcert mosquitto config`. The plugin keeps crlfile current: it\n\
         # fetches serve's CRL (every minute, and right after a revocation), replaces the\n\
         # file when it changed and makes mosquitto reload it (SIGHUP to itself). The CRL\n\
         # written now is valid until {next_update}; a broker whose crlfile is stale\n\
         # refuses every client, so mosquitto must be able to write this directory.\n\
         # Revocations reach connected devices sooner through the plugin.\n\
         per_listener_settings false\n\
         # Every CONNECT goes to the plugin (MOSQ_EVT_BASIC_AUTH); nobody is anonymous.\n\
         allow_anonymous false\n\
         \n\
         listener {port} {host}\n\
         # The fleet chain: device certificates chain to the issuing CA, then the root.\n\
         cafile {cafile}\n\
         certfile {certfile}\n\
         keyfile {keyfile}\n\
         crlfile {crlfile}\n\
         require_certificate true\n\
         # Minimum TLS version (1.3 is negotiated when the device offers it).\n\
         tls_version tlsv1.2\n\
         # Without it every CONNACK waits ~40 ms for Nagle + delayed ACK.\n\
         set_tcp_nodelay true\n\
         \n\
         plugin {plugin}\n\
         plugin_opt_broker_api {broker_api}\n\
         plugin_opt_secret_file {secret_file}\n\
         plugin_opt_timeout_ms 2000\n\
         plugin_opt_sessions_interval_ms 2000\n\
         plugin_opt_crl_file {crlfile}\n\
         plugin_opt_crl_interval_ms 60000\n",
        next_update = timestamp(crl.next_update),
        cafile = path("ca.pem")?,
        certfile = path("server.crt")?,
        keyfile = path("server.key")?,
        crlfile = path("crl.pem")?,
        secret_file = path(SECRET_FILE)?,
    );
    broker::write_public_file(&at("mosquitto.conf"), conf.as_bytes())?;
    Ok(WrittenConfig {
        dir,
        credentials,
        crl,
        origin,
    })
}

pub async fn config(ctx: &Ctx, args: MosquittoConfigArgs) -> Result<ExitCode, CliError> {
    // Every input is checked before anything is read or written.
    let (host, port) = parse_listen(&args.listen)?;
    let broker_api = parse_broker_api(&args.broker_api)?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for name in &args.server_names {
        check_server_name(name)?;
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let plugin = plugin_path(args.plugin.as_deref())?;
    let plugin = conf_path(&plugin, "--plugin")?;
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| ctx.data().root().join("mosquitto"));
    conf_path(&dir, "--out")?;

    let clock = clock_from_env()?;
    let ca = Arc::new(ctx.data().load_issuing_ca(passphrase().as_deref())?);
    let registry = ctx.registry(false).await?;
    let written = write_config(
        ctx.data(),
        &ca,
        registry,
        clock,
        &BrokerConfig {
            host: &host,
            port,
            broker_api: &broker_api,
            names: &names,
            plugin: &plugin,
            dir: &dir,
        },
    )
    .await?;
    let WrittenConfig {
        dir,
        credentials,
        crl,
        origin,
    } = written;
    let at = |name: &str| dir.join(name);
    let conf_file = at("mosquitto.conf");
    let command = format!("mosquitto -c {}", conf_file.display());
    let files = [
        "mosquitto.conf",
        "ca.pem",
        "server.crt",
        "server.key",
        "crl.pem",
        SECRET_FILE,
    ];
    let out = ctx.out();
    let secret_reused = origin == SecretOrigin::Reused;
    if out.is_json() {
        out.json(&json!({
            "dir": dir,
            "files": files.iter().map(|f| at(f)).collect::<Vec<_>>(),
            "config": conf_file,
            "listen": { "host": host, "port": port },
            "broker_api": broker_api,
            "plugin": plugin,
            "server_names": credentials.names,
            "server_certificate_not_after": timestamp(credentials.not_after),
            "crl": { "number": crl.number, "entries": crl.entry_count, "next_update": timestamp(crl.next_update) },
            "secret_file": at(SECRET_FILE),
            "serve_secret_file": ctx.data().broker_secret_path(),
            "secret_reused": secret_reused,
            "command": command,
        }));
    } else {
        out.line(format!("wrote {}:", dir.display()));
        for file in files {
            out.line(format!("  {file}"));
        }
        out.line(format!(
            "broker certificate for {} (until {}); CRL #{} with {} entries (next update {})",
            credentials.names.join(", "),
            timestamp(credentials.not_after),
            crl.number,
            crl.entry_count,
            timestamp(crl.next_update)
        ));
        out.line(format!(
            "broker API secret {} (also in {} for serve)",
            if secret_reused { "reused" } else { "generated" },
            ctx.data().broker_secret_path().display()
        ));
        out.line(format!(
            "next: fleetcert serve --broker-api {} …, then: {command}",
            broker_api.trim_start_matches("http://")
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("0.0.0.0:8883").ok(),
            Some(("0.0.0.0".into(), 8883))
        );
        assert_eq!(parse_listen("[::]:8883").ok(), Some(("::".into(), 8883)));
        assert_eq!(
            parse_listen("mqtt.example.com:1").ok(),
            Some(("mqtt.example.com".into(), 1))
        );
        for bad in ["8883", ":8883", "host:0", "host:70000", "a b:1", "h\nx:1"] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn broker_api_urls() {
        assert_eq!(
            parse_broker_api("http://127.0.0.1:8884/").ok(),
            Some("http://127.0.0.1:8884".into())
        );
        for bad in [
            "127.0.0.1:8884",
            "https://127.0.0.1:8884",
            "http://x",
            "http://x:1/path",
        ] {
            assert!(parse_broker_api(bad).is_err(), "{bad:?}");
        }
    }
}
