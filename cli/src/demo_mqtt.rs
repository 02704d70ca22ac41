//! The demo's MQTT round, run when mosquitto and its clients are installed: mosquitto with
//! the fleetcert plugin, configured by the code `fleetcert mosquitto config` runs and
//! answered by the demo's own serve (the broker API, in process), on a free loopback port.
//! Two new devices connect with their certificates through the mosquitto clients (MQTT
//! 3.1.1): their first CONNECT registers them, one publishes on its own topic and gets its
//! message back, and its publish on the other's topic is refused and never delivered.
use crate::args::DemoArgs;
use crate::context::CliError;
use crate::mosquitto_cmd::{self, BrokerConfig};
use fleetcert_ca::IssuingCa;
use fleetcert_lifecycle::DataDir;
use fleetcert_lifecycle::provision::{self, ProvisionSettings};
use fleetcert_lifecycle::renewal::Clock;
use fleetcert_registry::{CertificateFilter, Registry};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The round's two devices: `DEVICES[0]` publishes, `DEVICES[1]` listens.
pub(crate) const DEVICES: [&str; 2] = ["demo-mqtt-a", "demo-mqtt-b"];

/// How long any one step (a client, the broker's start) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the round needs installed.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    broker: PathBuf,
    sub: PathBuf,
    publish: PathBuf,
    rr: PathBuf,
    plugin: String,
}

/// The round's results (`--output json`: `mqtt`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct MqttFigures {
    /// Whether the round ran.
    pub ran: bool,
    /// Why it did not.
    pub skipped: Option<String>,
    /// `mosquitto version …`.
    pub broker: String,
    /// The broker's TLS listener.
    pub listen: String,
    /// The configuration, as `fleetcert mosquitto config` writes it.
    pub config: Option<PathBuf>,
    pub devices: Vec<String>,
    /// Devices whose certificate their first CONNECT registered.
    pub registered: u64,
    /// `DEVICES[0]`'s message on its own topic came back to it.
    pub own_topic_delivered: bool,
    /// `DEVICES[0]`'s publish on `DEVICES[1]`'s topic was refused (PUBACK not authorized).
    pub foreign_topic_refused: bool,
    /// …and whether `DEVICES[1]`, subscribed to its topics, got it anyway.
    pub foreign_topic_delivered: bool,
    /// Provisioning by claim: the claim the demo made.
    pub claim: Option<String>,
    /// The thing a device holding only the claim got registered as (Fleet Provisioning
    /// API: CreateKeysAndCertificate, RegisterThing).
    pub claim_thing: Option<String>,
    /// That device, reconnected with its own certificate, got its message on its own
    /// topic back.
    pub claim_device_echo: bool,
    pub seconds: f64,
    pub errors: Vec<String>,
}

impl MqttFigures {
    pub(crate) fn skipped(why: String) -> MqttFigures {
        MqttFigures {
            skipped: Some(why),
            ..MqttFigures::default()
        }
    }

    /// A round that ran did all it should; one that was skipped is no failure.
    pub(crate) fn ok(&self) -> bool {
        !self.ran
            || (self.errors.is_empty()
                && self.registered == DEVICES.len() as u64
                && self.own_topic_delivered
                && self.foreign_topic_refused
                && !self.foreign_topic_delivered
                && self.claim_thing.is_some()
                && self.claim_device_echo)
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` in one of `dirs`.
fn find_in(name: &str, dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

/// Finds mosquitto, its clients and the plugin; `Err` says why the round is skipped.
pub(crate) fn find_tools(args: &DemoArgs) -> Result<Tools, String> {
    if args.no_mqtt {
        return Err("--no-mqtt".into());
    }
    let broker = match &args.mosquitto {
        Some(path) if is_executable(path) => path.clone(),
        Some(path) => {
            return Err(format!(
                "{} (--mosquitto / FLEETCERT_MOSQUITTO) is not an executable file",
                path.display()
            ));
        }
        None => {
            let mut dirs = path_dirs();
            dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
            find_in("mosquitto", dirs).ok_or(
                "mosquitto is not installed (not on PATH nor in /usr/sbin; Debian: apt-get install mosquitto mosquitto-clients)",
            )?
        }
    };
    let client_dirs = match &args.mosquitto_clients {
        Some(dir) => vec![dir.clone()],
        None => path_dirs(),
    };
    let client = |name: &str| {
        find_in(name, client_dirs.clone()).ok_or_else(|| {
            format!(
                "{name} is not installed ({}; Debian: apt-get install mosquitto-clients)",
                match &args.mosquitto_clients {
                    Some(dir) => format!("not in {} (--mosquitto-clients)", dir.display()),
                    None => "not on PATH".to_owned(),
                }
            )
        })
    };
    let (sub, publish, rr) = (
        client("mosquitto_sub")?,
        client("mosquitto_pub")?,
        client("mosquitto_rr")?,
    );
    let plugin = match &args.plugin {
        Some(path) => mosquitto_cmd::plugin_path(Some(path)).map_err(|e| e.message)?,
        None => mosquitto_cmd::plugin_beside_executable().ok_or(
            "no libfleetcert_mosquitto.so beside the fleetcert executable (`cargo build --workspace` puts it there; or pass --plugin PATH)",
        )?,
    };
    let plugin = mosquitto_cmd::conf_path(&plugin, "--plugin").map_err(|e| e.message)?;
    Ok(Tools {
        broker,
        sub,
        publish,
        rr,
        plugin,
    })
}

/// The broker API's secret in `dir` (and the data directory), then the listener itself
/// on a free loopback port, for the demo's server.
pub(crate) async fn bind_broker_api(
    data: &DataDir,
    ca: &IssuingCa,
    dir: &Path,
) -> Result<fleetcert_jitp::BrokerApi, CliError> {
    fleetcert_lifecycle::broker::create_private_dir(dir)?;
    let (secret, _) = data.ensure_broker_secret(dir)?;
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    fleetcert_jitp::BrokerApi::bind(
        loopback,
        false,
        secret,
        ca.issuing_cert_pem(),
        fleetcert_templates::ArnContext::new("local", "000000000000"),
    )
    .await
    .map_err(|e| crate::context::failed(e.to_string()))
}

/// What [`run`] works with.
pub(crate) struct Round<'a> {
    pub tools: Tools,
    pub data: &'a DataDir,
    pub ca: &'a Arc<IssuingCa>,
    pub registry: Arc<dyn Registry>,
    pub clock: Arc<dyn Clock>,
    pub settings: &'a ProvisionSettings,
    /// Where the broker's files go.
    pub dir: PathBuf,
    /// The broker API of the demo's server.
    pub api: SocketAddr,
}

/// The round: provision the devices, write the configuration, run mosquitto and the
/// clients, stop mosquitto, and read the registrations back from the registry.
pub(crate) async fn run(round: Round<'_>) -> MqttFigures {
    let started = Instant::now();
    let mut figures = MqttFigures {
        ran: true,
        devices: DEVICES.iter().map(|d| d.to_string()).collect(),
        ..MqttFigures::default()
    };
    if let Err(e) = run_inner(&round, &mut figures).await {
        figures.errors.push(e);
    }
    figures.seconds = started.elapsed().as_secs_f64();
    figures.errors.truncate(5);
    figures
}

async fn run_inner(round: &Round<'_>, figures: &mut MqttFigures) -> Result<(), String> {
    // Two new devices, as the factory line makes them.
    let csv = round.dir.join("mqtt-devices.csv");
    std::fs::write(&csv, format!("thing_name\n{}\n", DEVICES.join("\n")))
        .map_err(|e| format!("{}: {e}", csv.display()))?;
    let options = provision::BatchOptions::default();
    let validated = provision::validate_batch_csv(&csv, &options, &mut |_| {})
        .map_err(|e| format!("provision: {e}"))?;
    let summary = provision::provision_batch(
        round.ca.clone(),
        round.registry.clone(),
        validated,
        round.settings,
        &mut |_| {},
    )
    .await
    .into_result()
    .map_err(|e| format!("provision: {e}"))?;
    if summary.issued != DEVICES.len() as u64 {
        return Err(format!("provision: {} issued", summary.issued));
    }

    // The configuration `fleetcert mosquitto config` writes, on a free loopback port.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let written = mosquitto_cmd::write_config(
        round.data,
        round.ca,
        round.registry.clone(),
        round.clock.clone(),
        &BrokerConfig {
            host: "127.0.0.1",
            port,
            broker_api: &format!("http://{}", round.api),
            names: &names,
            plugin: &round.tools.plugin,
            dir: &round.dir,
        },
    )
    .await
    .map_err(|e| format!("mosquitto config: {}", e.message))?;
    // A claim for the provisioning-by-claim part, bound to CLAIM_TEMPLATE (written into
    // the data directory before the demo's serve started).
    let claim = fleetcert_lifecycle::claims::create(
        round.data,
        round.registry.as_ref(),
        round.ca,
        &fleetcert_lifecycle::claims::ClaimRequest {
            name: CLAIM.to_owned(),
            template: CLAIM_TEMPLATE.to_owned(),
            days: 1,
            max_uses: Some(1),
            out_dir: round.dir.clone(),
        },
        round.clock.now(),
    )
    .await
    .map_err(|e| format!("claims create: {e}"))?;
    figures.claim = Some(CLAIM.to_owned());
    let conf = written.dir.join("mosquitto.conf");
    // Two additions for the demo: subscriptions are logged as well (the demo waits for
    // one), and, started as root, mosquitto stays root (it would otherwise switch to its
    // own user, who cannot read the demo's private files).
    let mut text = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
    text.push_str(
        "\n# fleetcert demo: the default log types, and subscriptions.\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
         log_type subscribe\n",
    );
    if std::fs::metadata(&written.dir).is_ok_and(|m| m.uid() == 0) {
        text.push_str("# fleetcert demo: runs as root, so it stays root.\nuser root\n");
    }
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    figures.config = Some(conf.clone());
    figures.listen = format!("127.0.0.1:{port}");

    let session = Session {
        tools: round.tools.clone(),
        port,
        cafile: written.dir.join("ca.pem"),
        devices: round.settings.out_dir.clone(),
        log: written.dir.join("mosquitto.log"),
        claim_cert: claim.certificate_path,
        claim_key: claim.key_path,
    };
    let clients = tokio::task::spawn_blocking(move || session.run(&conf))
        .await
        .map_err(|e| e.to_string())?;
    figures.broker = clients.broker;
    figures.own_topic_delivered = clients.own_topic_delivered;
    figures.foreign_topic_refused = clients.foreign_topic_refused;
    figures.foreign_topic_delivered = clients.foreign_topic_delivered;
    figures.claim_device_echo = clients.claim_device_echo;
    figures.errors.extend(clients.errors);
    // The claimed device is in the registry with its certificate registered.
    if let Some(thing) = clients.claim_thing {
        let certs = round
            .registry
            .list_certificates(&CertificateFilter {
                thing_name: Some(thing.clone()),
                ..CertificateFilter::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if certs.iter().any(|c| c.registered_at.is_some()) {
            figures.claim_thing = Some(thing);
        } else {
            figures.errors.push(format!(
                "{thing} has no registered certificate after RegisterThing"
            ));
        }
    }

    for device in DEVICES {
        let certs = round
            .registry
            .list_certificates(&CertificateFilter {
                thing_name: Some(device.to_owned()),
                ..CertificateFilter::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if certs.iter().any(|c| c.registered_at.is_some()) {
            figures.registered += 1;
        }
    }
    Ok(())
}

/// The blocking part: mosquitto and its clients.
struct Session {
    tools: Tools,
    port: u16,
    cafile: PathBuf,
    /// Where `<thing>.crt` and `<thing>.key` are.
    devices: PathBuf,
    log: PathBuf,
    claim_cert: PathBuf,
    claim_key: PathBuf,
}

#[derive(Default)]
struct ClientResults {
    broker: String,
    own_topic_delivered: bool,
    foreign_topic_refused: bool,
    foreign_topic_delivered: bool,
    claim_thing: Option<String>,
    claim_device_echo: bool,
    errors: Vec<String>,
}

/// A child process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Session {
    fn client(&self, tool: &Path, device: &str, args: &[&str]) -> Command {
        let mut command = Command::new(tool);
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-i",
                device,
            ])
            .arg("--cafile")
            .arg(&self.cafile)
            .arg("--cert")
            .arg(self.devices.join(format!("{device}.crt")))
            .arg("--key")
            .arg(self.devices.join(format!("{device}.key")))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn run(self, conf: &Path) -> ClientResults {
        let mut results = ClientResults::default();
        let version = Command::new(&self.tools.broker).arg("-h").output();
        results.broker = version
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| l.contains("version"))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "mosquitto".to_owned());
        if let Err(e) = self.run_clients(conf, &mut results) {
            results.errors.push(e);
        }
        results
    }

    /// Whether the broker's log has `needle`, waiting for it at most [`STEP_TIMEOUT`].
    fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(needle)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn run_clients(&self, conf: &Path, results: &mut ClientResults) -> Result<(), String> {
        let log = std::fs::File::create(&self.log).map_err(|e| e.to_string())?;
        let mut broker = Running(
            Command::new(&self.tools.broker)
                .arg("-c")
                .arg(conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("{}: {e}", self.tools.broker.display()))?,
        );
        let deadline = Instant::now() + STEP_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = broker.0.try_wait() {
                return Err(format!("mosquitto exited ({status}): {}", self.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("mosquitto did not listen: {}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        let [me, other] = DEVICES;
        // The other device listens on its own topics (its first CONNECT registers it).
        let filter = format!("devices/{other}/#");
        let mut listener = Running(
            self.client(
                &self.tools.sub,
                other,
                &["-V", "mqttv311", "-q", "1", "-v", "-t", &filter],
            )
            .spawn()
            .map_err(|e| format!("{}: {e}", self.tools.sub.display()))?,
        );
        let lines = spawn_line_reader(listener.0.stdout.take());
        // mosquitto logs `ID QOS FILTER` once the subscription is in place (QoS 1 granted).
        if !self.wait_for_log(&format!("{other} 1 {filter}")) {
            let _ = listener.0.kill();
            let stderr = read_all(listener.0.stderr.take());
            return Err(format!(
                "{other} could not subscribe to its own topics: {} (broker: {})",
                stderr.trim(),
                self.log_tail()
            ));
        }
        let mut heard = Vec::new();

        // This device's first CONNECT registers it; it subscribes to its own topic,
        // publishes there and receives its message (mosquitto_rr: one connection).
        let message = format!("hello from {me}");
        let echo_topic = format!("devices/{me}/echo");
        let echo = run_bounded(self.client(
            &self.tools.rr,
            me,
            &[
                "-V",
                "mqttv311",
                "-q",
                "1",
                "-t",
                &echo_topic,
                "-e",
                &echo_topic,
                "-m",
                &message,
                "-W",
                "10",
            ],
        ))?;
        results.own_topic_delivered = echo.ok && echo.stdout.trim() == message;
        if !results.own_topic_delivered {
            results.errors.push(format!(
                "{me} on its own topic: {} {} (broker: {})",
                echo.stdout.trim(),
                echo.stderr.trim(),
                self.log_tail()
            ));
        }

        // Its publish on the other device's topic: MQTT 5, so the refusal has a reason code.
        let forged = format!("forged by {me}");
        let foreign = run_bounded(self.client(
            &self.tools.publish,
            me,
            &[
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                &format!("devices/{other}/telemetry"),
                "-m",
                &forged,
            ],
        ))?;
        results.foreign_topic_refused = foreign.stderr.to_lowercase().contains("not authorized");
        if !results.foreign_topic_refused {
            results.errors.push(format!(
                "{me} on {other}'s topic was not refused: {} {}",
                foreign.stdout.trim(),
                foreign.stderr.trim()
            ));
        }
        // The broker routes a publish before it answers it, so anything delivered is on the
        // listener's connection by now; it gets a moment to print it.
        let grace = Instant::now() + Duration::from_millis(500);
        while let Ok(line) = lines.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            heard.push(line);
        }
        drop(listener);
        results.foreign_topic_delivered = heard.iter().any(|l| l.contains(&forged));

        // A device that holds only the claim provisions itself, then comes back as itself.
        // (On the blocking thread of the broker's session; the client is async.)
        let claimed = tokio::runtime::Handle::current().block_on(tokio::time::timeout(
            STEP_TIMEOUT,
            provision_by_claim(self.port, &self.cafile, &self.claim_cert, &self.claim_key),
        ));
        match claimed {
            Ok(Ok((thing, echo))) => {
                results.claim_thing = Some(thing);
                results.claim_device_echo = echo;
                if !echo {
                    results.errors.push(
                        "the claimed device's message on its own topic did not come back".into(),
                    );
                }
            }
            Ok(Err(e)) => results.errors.push(format!(
                "provisioning by claim: {e} (broker: {})",
                self.log_tail()
            )),
            Err(_) => results.errors.push(format!(
                "provisioning by claim took more than {STEP_TIMEOUT:?} (broker: {})",
                self.log_tail()
            )),
        }
        drop(broker);
        Ok(())
    }
}

/// The claim the demo makes (at most one device), and its template.
pub(crate) const CLAIM: &str = "demo-claim";
pub(crate) const CLAIM_TEMPLATE: &str = "demo-claim";
/// The serial number the claimed device reports; its thing is `demo-claimed-<serial>`.
const CLAIM_SERIAL: &str = "0001";

/// A Fleet Provisioning template: the thing is named from the device's SerialNumber and
/// may use only its own topics.
pub(crate) const CLAIM_TEMPLATE_YAML: &str = r#"# fleetcert demo: devices provisioned by claim.
Parameters:
  SerialNumber:
    Type: String
  AWS::IoT::Certificate::Id:
    Type: String
Resources:
  thing:
    Type: AWS::IoT::Thing
    Properties:
      ThingName: {"Fn::Join": ["", ["demo-claimed-", {Ref: SerialNumber}]]}
      AttributePayload:
        serial: {Ref: SerialNumber}
  certificate:
    Type: AWS::IoT::Certificate
    Properties:
      CertificateId: {Ref: "AWS::IoT::Certificate::Id"}
      Status: ACTIVE
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: demo-claimed
      PolicyDocument:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: iot:Connect
            Resource: "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"
          - Effect: Allow
            Action: [iot:Publish, iot:Receive]
            Resource: "arn:aws:iot:*:*:topic/devices/${iot:Connection.Thing.ThingName}/*"
          - Effect: Allow
            Action: iot:Subscribe
            Resource: "arn:aws:iot:*:*:topicfilter/devices/${iot:Connection.Thing.ThingName}/*"
"#;

/// A device holding only the claim: CreateKeysAndCertificate and RegisterThing over the
/// Fleet Provisioning MQTT API, then a new session with its own certificate and client
/// id = thing name, which subscribes to its own topic and publishes there. The thing
/// name, and whether the message came back.
async fn provision_by_claim(
    port: u16,
    cafile: &Path,
    claim_cert: &Path,
    claim_key: &Path,
) -> Result<(String, bool), String> {
    use fleetcert_mqtt_client::fleet_provisioning::{self as fp, Create};
    use fleetcert_mqtt_client::{Client, identity};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(cafile)?) {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", cafile.display()))?)
            .map_err(|e| format!("{}: {e}", cafile.display()))?;
    }
    let key = PrivateKeyDer::from_pem_slice(&read(claim_key)?)
        .map_err(|e| format!("{}: {e}", claim_key.display()))?;
    let claim = identity(&roots, &read(claim_cert)?, key).map_err(|e| e.to_string())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let name = ServerName::try_from("localhost").expect("a valid name");
    let step =
        |what: &'static str| move |e: fleetcert_mqtt_client::ClientError| format!("{what}: {e}");

    let mut session = Client::connect(addr, name.clone(), &claim, "demo-claim-boot", 30)
        .await
        .map_err(step("CONNECT with the claim"))?;
    let create = Create::KeysAndCertificate;
    fp::subscribe_to_replies(&mut session, create, CLAIM_TEMPLATE)
        .await
        .map_err(step("SUBSCRIBE"))?;
    let created = fp::create_certificate(&mut session, create)
        .await
        .map_err(step("CreateKeysAndCertificate"))?;
    let mut parameters = serde_json::Map::new();
    parameters.insert("SerialNumber".into(), CLAIM_SERIAL.into());
    let registered = fp::register_thing(
        &mut session,
        CLAIM_TEMPLATE,
        &created.ownership_token,
        &parameters,
    )
    .await
    .map_err(step("RegisterThing"))?;
    session.disconnect().await;

    let key_pem = created.private_key_pem.unwrap_or_default();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("the privateKey of CreateKeysAndCertificate: {e}"))?;
    let own =
        identity(&roots, created.certificate_pem.as_bytes(), key).map_err(|e| e.to_string())?;
    let thing = registered.thing_name;
    let mut device = Client::connect(addr, name, &own, &thing, 30)
        .await
        .map_err(step("CONNECT with the new certificate"))?;
    let topic = format!("devices/{thing}/hello");
    let granted = device
        .subscribe(&[(&topic, 1)])
        .await
        .map_err(step("SUBSCRIBE to its own topic"))?;
    if granted.first().is_none_or(|c| *c > 2) {
        return Err(format!("its own topic was refused (SUBACK {granted:?})"));
    }
    let message = format!("hello from {thing}");
    let mut delivered = device
        .publish(&topic, message.as_bytes())
        .await
        .map_err(step("PUBLISH on its own topic"))?;
    if delivered.is_empty() {
        delivered.push(device.next_message().await.map_err(step("the echo"))?);
    }
    device.disconnect().await;
    let echo = delivered
        .iter()
        .any(|(t, payload)| *t == topic && payload.as_slice() == message.as_bytes());
    Ok((thing, echo))
}

fn spawn_line_reader(stdout: Option<std::process::ChildStdout>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn read_all(stream: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(mut stream) = stream {
        let _ = stream.read_to_string(&mut text);
    }
    text
}

struct Finished {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a client to its end, killing it after [`STEP_TIMEOUT`].
fn run_bounded(mut command: Command) -> Result<Finished, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = Running(command.spawn().map_err(|e| format!("{program}: {e}"))?);
    let (stdout, stderr) = (child.0.stdout.take(), child.0.stderr.take());
    let out = std::thread::spawn(move || read_all(stdout));
    let err = std::thread::spawn(move || read_all(stderr));
    let deadline = Instant::now() + STEP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!(
            " ({program} did not finish within {STEP_TIMEOUT:?})"
        ));
    }
    Ok(Finished {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    })
}
