//! The command-line contract (see PRODUCT.md): names and flags here are what factory
//! scripts and operators script against.
//!
//! The `///` comments below are `--help` text, which clap prints as written: placeholders
//! such as `<data-dir>` stay as they are, not as rustdoc markup.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "fleetcert",
    version,
    about = "Fleet provisioning and certificate lifecycle manager for IoT devices",
    long_about = "fleetcert runs a local CA for a device fleet: it signs a unique certificate \
                  for every device on the factory line and keeps a registry of things, \
                  certificates and events (SQLite by default, PostgreSQL with a postgres:// URL).\n\n\
                  Exit codes: 0 success, 1 operation failed, 2 usage or bad input."
)]
pub struct Cli {
    /// Data directory: CA keys and certificates, the SQLite registry, templates.
    #[arg(
        long,
        global = true,
        env = "FLEETCERT_DATA_DIR",
        default_value = "./fleetcert-data"
    )]
    pub data_dir: PathBuf,

    /// Registry database: a SQLite file path, or postgres://user:pass@host:port/db.
    /// Default: <data-dir>/registry.db.
    #[arg(long, global = true, env = "FLEETCERT_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Output format. `json` prints one JSON document (or one JSON line per device for
    /// streams) on stdout and nothing else there; messages and progress go to stderr.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect and export the fleet CA (root + issuing).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue device certificates: one thing, or a batch from a CSV file.
    Provision(ProvisionArgs),
    /// Run the JITP server: mutual-TLS device listener and plain-HTTP admin listener;
    /// with --broker-api, also the broker API the mosquitto plugin asks about every
    /// CONNECT (set up with `fleetcert mosquitto config`).
    Serve(Box<ServeArgs>),
    /// Provisioning templates: lint files, list the data directory's templates.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// Policies stored by first connects (with their policy variables, as AWS keeps them).
    #[command(subcommand)]
    Policies(PoliciesCommand),
    /// Things in the registry.
    #[command(subcommand)]
    Things(ThingsCommand),
    /// Certificates in the registry.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// One rotation sweep (for cron): open rotations for certificates past their renewal
    /// point and issue replacements for keys fleetcert generated. `serve` runs the same
    /// sweep on an interval. Also reports the open rotations it could not take: leased by
    /// another worker (and until when), or waiting for devices to re-enroll.
    Rotate(RotateArgs),
    /// Revoke a certificate (by serial) or every certificate of a thing, and publish a
    /// new CRL. A running server refuses the certificate within seconds.
    Revoke(RevokeArgs),
    /// Print the current CRL (PEM, or DER with --der), publishing a new one first if the
    /// revoked set changed or the stored one is half-way to its nextUpdate.
    Crl(CrlArgs),
    /// Run the lifecycle end to end in a temporary data directory and print a summary.
    Demo(DemoArgs),
    /// Mirror the registry into AWS IoT Core: things, certificates, policies,
    /// attachments and status changes, through an outbox that survives outages.
    #[command(subcommand)]
    Aws(AwsCommand),
    /// The MQTT broker integration: mosquitto with the fleetcert plugin, which asks
    /// `serve --broker-api` about every CONNECT.
    #[command(subcommand)]
    Mosquitto(MosquittoCommand),
    /// Provisioning by claim: claim certificates shared by a batch of devices, which may
    /// only ask the AWS IoT Fleet Provisioning MQTT API (through mosquitto with the
    /// fleetcert plugin) for each device's own certificate and registration.
    #[command(subcommand)]
    Claims(ClaimsCommand),
    /// Device Defender audit of the fleet, offline: AWS IoT Device Defender's audit checks
    /// (expiring and aged certificates, weak keys, overly permissive policies, shared
    /// certificates and conflicting client ids on MQTT, revoked certificates still in use,
    /// revoked CAs) over the registry and the CA files, with tasks, findings and
    /// suppressions stored in the registry.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Run an audit task now and print its summary, in the shape of AWS's audit
    /// notification (taskId, taskStatus, auditDetails[] with checkName, checkRunStatus,
    /// nonCompliantResourcesCount, totalResourcesCount). Exit 1 when any check is
    /// non-compliant or FAILED (e.g. the mirrored AWS account could not be read), 0 when
    /// every check complies (so CI can gate on it).
    Run(AuditRunArgs),
    /// List findings, newest first: check, severity, reason code and text, resource.
    Findings(AuditFindingsArgs),
    /// List audit tasks, newest first.
    Tasks {
        /// At most this many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// Keep a check's findings for one resource out of the non-compliant counts (they
    /// are still recorded, marked suppressed) until the suppression expires. Setting it
    /// again replaces it.
    Suppress(AuditSuppressArgs),
    /// Delete a suppression.
    Unsuppress {
        /// The check (its name, or AWS's API name).
        #[arg(long)]
        check: String,
        /// The resource (a certificate serial, policy name, client id, CA serial).
        #[arg(long)]
        resource: String,
    },
    /// List the suppressions, expired ones marked.
    Suppressions,
    /// List the checks: name, AWS's API name, severity, what a finding means.
    Checks,
    /// Apply a mitigation action to a task's findings (unsuppressed ones only). On device
    /// certificates: `revoke` is AWS's UPDATE_DEVICE_CERTIFICATE — each is revoked (an
    /// event each; the CRL follows, and a running serve drops its live MQTT sessions);
    /// `rotate` opens a rotation of each now (`rotation.due` events), which the rotation
    /// worker (`serve`, or `fleetcert rotate`) carries out; `add-to-thing-group` is
    /// ADD_THINGS_TO_THING_GROUP, the quarantine. On overly permissive policies:
    /// `replace-default-policy-version` (BLANK_POLICY). Each applied action writes an
    /// event. --dry-run lists what it would do and changes nothing.
    Mitigate(AuditMitigateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MitigationAction {
    /// Revoke the findings' device certificates (UPDATE_DEVICE_CERTIFICATE).
    Revoke,
    /// Rotate them now: replacement issued, old one revoked once the device uses it.
    Rotate,
    /// Add the certificates' things to --thing-group (ADD_THINGS_TO_THING_GROUP). A group
    /// with no policy gets `fleetcert-quarantine` (deny publish, subscribe and receive)
    /// first; the group's policies apply from the devices' next CONNECT, and the broker
    /// drops their live sessions within seconds.
    AddToThingGroup,
    /// Give each overly permissive policy a new default version that grants only
    /// iot:Connect as the device's own thing (REPLACE_DEFAULT_POLICY_VERSION, BLANK_POLICY);
    /// earlier versions are kept, and devices get the new one from their next CONNECT.
    ReplaceDefaultPolicyVersion,
}

#[derive(Debug, Args)]
pub struct AuditMitigateArgs {
    /// The task whose findings are acted on (`fleetcert audit tasks`).
    #[arg(long)]
    pub task: String,
    /// What to do.
    #[arg(long, value_enum)]
    pub action: MitigationAction,
    /// Only this check's findings (its name, or AWS's API name).
    #[arg(long)]
    pub check: Option<String>,
    /// Only this resource's findings.
    #[arg(long)]
    pub resource: Option<String>,
    /// The revocation reason (RFC 5280 name), for `revoke`.
    #[arg(long, default_value = "keyCompromise")]
    pub reason: String,
    /// The thing group, for `add-to-thing-group`.
    #[arg(long, default_value = "quarantine")]
    pub thing_group: String,
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct AuditRunArgs {
    /// Only these checks (comma-separated; the seed's names or AWS's API names). Default:
    /// every check.
    #[arg(long, value_delimiter = ',')]
    pub checks: Vec<String>,
    /// A certificate expiring within this many days is approaching expiration.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub expiring_within_days: u32,
    /// A device certificate at least this many days old is past the age threshold
    /// (DEVICE_CERT_AGE_CHECK; AWS allows 30 to 3652).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(30..=3652))]
    pub cert_age_days: u32,
}

#[derive(Debug, Args)]
pub struct AuditFindingsArgs {
    /// Only this task's findings (default: every task's).
    #[arg(long)]
    pub task: Option<String>,
    /// Only this check's.
    #[arg(long)]
    pub check: Option<String>,
    /// Only this resource's.
    #[arg(long)]
    pub resource: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct AuditSuppressArgs {
    /// The check (its name, or AWS's API name).
    #[arg(long)]
    pub check: String,
    /// The resource (a certificate serial, policy name, client id, CA serial), as the
    /// findings name it.
    #[arg(long)]
    pub resource: String,
    /// How long it lasts (`7d`, `12h`, ...). Without it (or --until), until deleted.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "until")]
    pub expires_in: Option<std::time::Duration>,
    /// When it ends (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long)]
    pub until: Option<String>,
    /// Why (kept with the suppression).
    #[arg(long, default_value = "")]
    pub description: String,
}

#[derive(Debug, Subcommand)]
pub enum ClaimsCommand {
    /// Issue a claim certificate bound to one template: writes NAME.crt (the claim
    /// certificate, then the issuing CA) and NAME.key (mode 0600) into --out. The claim
    /// is recorded before the files are written; existing files are never overwritten.
    Create(ClaimsCreateArgs),
    /// List the claims: template, uses, limit, validity, status.
    List,
    /// Revoke a claim: a running server drops its sessions within seconds, the CRL lists
    /// it, and certificates it got that still wait for RegisterThing are revoked too.
    Revoke {
        /// The claim's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ClaimsCreateArgs {
    /// The claim's name (letters, digits, `:`, `_`, `-`; up to 128).
    pub name: String,
    /// The provisioning template devices are registered with (RegisterThing must name it).
    #[arg(long)]
    pub template: String,
    /// Validity of the claim certificate in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// How many devices the claim may provision (default: no limit).
    #[arg(long)]
    pub max_uses: Option<u32>,
    /// Directory for NAME.crt and NAME.key (default: the current directory).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum MosquittoCommand {
    /// Write a mosquitto configuration for the fleet into --out (default
    /// <data-dir>/mosquitto): mosquitto.conf (a TLS listener requiring fleet client
    /// certificates, checked against the CRL, and the fleetcert plugin), ca.pem (issuing
    /// CA + root), server.crt/server.key (the broker's certificate from the fleet CA,
    /// for localhost, 127.0.0.1 and each --server-name), crl.pem (the current CRL) and
    /// broker-api.secret (the shared secret, mode 0600; the same secret is kept at
    /// <data-dir>/broker/broker-api.secret for `serve --broker-api`). An existing secret
    /// is reused, never replaced. Then start `fleetcert serve --broker-api ADDR` and
    /// `mosquitto -c DIR/mosquitto.conf`. The plugin keeps crl.pem current (it fetches
    /// serve's CRL every minute and right after a revocation, replaces the file and makes
    /// mosquitto reload it), so DIR must stay writable by mosquitto: a broker whose CRL
    /// file is past its nextUpdate refuses every client.
    Config(MosquittoConfigArgs),
}

#[derive(Debug, Args)]
pub struct MosquittoConfigArgs {
    /// The broker's MQTT listener, HOST:PORT (e.g. 0.0.0.0:8883, [::]:8883).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Where the plugin reaches `fleetcert serve --broker-api`, e.g.
    /// http://127.0.0.1:8884.
    #[arg(long, value_name = "URL")]
    pub broker_api: String,
    /// Directory to write into (created, mode 0700). Default: <data-dir>/mosquitto.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Host name devices use to reach the broker; the broker's certificate names it,
    /// plus localhost and 127.0.0.1. Repeatable.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,
    /// The plugin library. Default: libfleetcert_mosquitto.so beside the fleetcert
    /// executable.
    #[arg(long, value_name = "PATH")]
    pub plugin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AwsCommand {
    /// Register the issuing CA with AWS IoT, store the mirror settings and queue
    /// everything the registry holds. From then on every change is queued in the same
    /// transaction as the change; `serve` (or `aws sync`) applies the queue.
    /// Credentials come from the standard AWS chain (environment, profile,
    /// web identity, ECS/EC2 roles).
    Enable(AwsEnableArgs),
    /// Stop queueing changes (what is queued stays; `aws enable` resumes and queues
    /// everything again).
    Disable,
    /// The outbox: pending and retrying operations, the oldest one, parked ones with
    /// their errors.
    Status(AwsStatusArgs),
    /// Apply the queued operations now, including those waiting out a backoff. While
    /// another process (`serve`) is applying operations under its lease, wait for them
    /// (at most --timeout). Exits 0 once AWS has caught up; 1 if AWS is unreachable or
    /// refuses something (parked operations), or if the time runs out, saying what is
    /// still pending.
    Sync(AwsSyncArgs),
    /// Compare the registry with AWS IoT (CA, things, certificates and their status,
    /// thing attachments, policies and their attachments) and queue what is missing or
    /// different; then `aws sync` (or `serve`) applies it.
    Reconcile(AwsReconcileArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CaModeArg {
    /// Register with a verification certificate (CN = the account's registration
    /// code) signed by the CA: proves possession of the CA key.
    Default,
    /// certificateMode SNI_ONLY: no verification certificate; devices must send SNI.
    SniOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RotatedStatusArg {
    Revoked,
    Inactive,
}

#[derive(Debug, Args)]
pub struct AwsEnableArgs {
    /// AWS region of the IoT Core account, e.g. eu-west-1.
    #[arg(long, env = "AWS_REGION")]
    pub region: String,
    /// Another endpoint for the AWS IoT API (a VPC endpoint, or moto for tests).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    #[arg(long, value_enum, default_value_t = CaModeArg::Default)]
    pub ca_mode: CaModeArg,
    /// What a certificate replaced by a confirmed rotation becomes in AWS (it is also
    /// detached from its thing). Revoked certificates (`fleetcert revoke`) are always
    /// REVOKED.
    #[arg(long, value_enum, default_value_t = RotatedStatusArg::Revoked)]
    pub rotated_status: RotatedStatusArg,
    /// Do not contact AWS now: the CA registration is queued like everything else.
    #[arg(long)]
    pub no_register: bool,
}

#[derive(Debug, Args)]
pub struct AwsStatusArgs {
    /// Parked operations to list.
    #[arg(long, default_value_t = 20)]
    pub parked: u32,
}

#[derive(Debug, Args)]
pub struct AwsSyncArgs {
    /// Put parked operations back in their queues first (after fixing their cause).
    #[arg(long)]
    pub retry_parked: bool,
    /// Operations applied at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// How long to wait for operations that another process (`serve`) holds under its
    /// lease; 0s does not wait. At most 24h.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct AwsReconcileArgs {
    /// Report the drift only; queue nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Also rotate every active certificate that expires within this long (e.g. 30d),
    /// whatever its renewal point.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub within: Option<std::time::Duration>,
    /// List the certificates that are due and count the open rotations not issued yet
    /// (leased by another worker, waiting); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rotations claimed, signed and committed together.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
    /// How long a claim on a batch is exclusive; a worker killed mid-sweep holds its
    /// batch this long before another sweep takes it over (10s to 1d).
    #[arg(long, default_value = "5m", value_parser = lease)]
    pub lease: std::time::Duration,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["serial", "thing"])))]
pub struct RevokeArgs {
    /// Serial number of the certificate (hex, as `certs list` shows it).
    pub serial: Option<String>,
    /// Revoke every certificate of this thing instead.
    #[arg(long, conflicts_with = "serial")]
    pub thing: Option<String>,
    /// RFC 5280 reason: unspecified, keyCompromise, affiliationChanged, superseded,
    /// cessationOfOperation, privilegeWithdrawn.
    #[arg(long, default_value = "unspecified")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct CrlArgs {
    /// Write the CRL to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// DER instead of PEM.
    #[arg(long)]
    pub der: bool,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a self-signed root and an issuing CA. Never overwrites an existing CA.
    /// With FLEETCERT_CA_PASSPHRASE set, the keys are encrypted at rest.
    Init(CaInitArgs),
    /// Show the CA certificates.
    Show,
    /// Print the root CA certificate (the fleet's trust anchor) as PEM.
    Export {
        /// Print the issuing CA certificate followed by the root.
        #[arg(long)]
        chain: bool,
    },
}

#[derive(Debug, Args)]
pub struct CaInitArgs {
    /// Base common name: the CAs are "<CN> Root CA" and "<CN> Issuing CA".
    #[arg(long, default_value = "fleetcert")]
    pub common_name: String,
    /// CA key algorithm.
    #[arg(long, default_value = "p256", value_parser = ["p256", "p384", "ed25519", "rsa2048", "rsa3072"])]
    pub key_algorithm: String,
    /// Root CA validity in days.
    #[arg(long, default_value_t = 7300, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub root_days: u32,
    /// Issuing CA validity in days (at most the root's).
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub issuing_days: u32,
    /// CRL Distribution Point (http:// URL) written into every device certificate; the
    /// JITP server serves the CRL at /crl on its admin listener.
    #[arg(long, env = "FLEETCERT_CRL_URL")]
    pub crl_url: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["thing_name", "batch"])))]
pub struct ProvisionArgs {
    /// Thing name ([a-zA-Z0-9:_-]{1,128}); becomes the certificate's common name.
    pub thing_name: Option<String>,
    /// CSV file with a header row: thing_name (required), csr (optional path, relative to
    /// the CSV file's directory and inside it; see --allow-absolute-csr-paths).
    #[arg(long, conflicts_with_all = ["thing_name", "csr"])]
    pub batch: Option<PathBuf>,
    /// The device's CSR (PEM or DER; a regular file of at most 64 KiB). Without it,
    /// fleetcert generates a P-256 key and writes it next to the certificate (mode 0600).
    #[arg(long)]
    pub csr: Option<PathBuf>,
    /// Template recorded on the thing (a file stem in <data-dir>/templates/, or `default`).
    #[arg(long)]
    pub template: Option<String>,
    /// Certificate validity in days (cut to the issuing CA's remaining lifetime, with a
    /// note on stderr, if it would outlive it).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Output directory for <thing>.crt, <thing>.key and chain.pem.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Write one pallet file instead of two files per device (for a batch, or one device):
    /// JSON lines,
    /// first the chain ({"fleetcert_pallet":1,"issuer":…,"chain":PEM}), then one line per
    /// device (thing_name, serial, not_after, origin, certificate, private_key for a
    /// generated key). Mode 0600. It appears under this name only when the whole batch is
    /// done; an interrupted run leaves .<name>.fleetcert-tmp beside it, and re-running the
    /// same command completes it. An existing pallet is never overwritten.
    #[arg(long, value_name = "FILE", conflicts_with = "out")]
    pub pallet: Option<PathBuf>,
    /// Issue a new certificate even if the thing already has an active one (the old one
    /// becomes superseded).
    #[arg(long)]
    pub reissue: bool,
    /// Stop at the first failed row (rows that fail validation stop the batch before
    /// anything is issued).
    #[arg(long)]
    pub fail_fast: bool,
    /// Accept a --template whose policy fails the least-privilege lint.
    #[arg(long)]
    pub allow_overly_permissive: bool,
    /// Let the CSV's csr column name files outside the CSV file's directory (absolute
    /// paths, `..`, symbolic links leading out). Either way a CSR must be a regular file
    /// of at most 64 KiB.
    #[arg(long, requires = "batch")]
    pub allow_absolute_csr_paths: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Device listener (mutual TLS): POST /v1/connect, EST re-enrollment
    /// (/.well-known/est/simplereenroll, /cacerts), POST /v1/replacement, GET /crl.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: std::net::SocketAddr,
    /// Admin listener (plain HTTP): GET /healthz, GET /metrics, GET /crl (the CRL
    /// Distribution Point relying parties fetch). Keep it on loopback or behind a proxy.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: std::net::SocketAddr,
    /// Template for first connects of things provisioned without one.
    #[arg(long, default_value = "default")]
    pub template: String,
    /// Host name devices use to reach the server; the server certificate (issued by the
    /// fleet CA on first start) names it, plus localhost and 127.0.0.1. Repeatable.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// Load templates whose policies fail the least-privilege lint.
    #[arg(long)]
    pub allow_overly_permissive: bool,
    /// Time a device has to complete the TLS handshake (1s to 10m).
    #[arg(long, default_value = "10s", value_parser = handshake_timeout)]
    pub handshake_timeout: std::time::Duration,
    /// Time a device has to send a whole request, headers and body, from its first byte
    /// (then 408 and the connection is closed); a keep-alive connection idle this long
    /// is closed too. From 1ms to 1h.
    #[arg(long, default_value = "10s", value_parser = parse_request_timeout)]
    pub request_timeout: std::time::Duration,
    /// Largest request body accepted (bytes); a larger body gets 413. A Content-Length
    /// over 16 times this (at least 1 MiB) is refused before any of the body is read.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub max_body_bytes: u64,
    /// Largest request line plus headers accepted (bytes); more gets 431 and the
    /// connection is closed.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024))]
    pub max_header_bytes: u32,
    /// Concurrent device connections; more are closed at once.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Connections one certificate may hold open at once, so that one device (or one
    /// stolen key) cannot take every slot; more are closed right after the handshake
    /// (counted as fleetcert_rejections_total{reason="certificate_connection_limit"}).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_certificate: u32,
    /// How often the built-in rotation worker sweeps, as `fleetcert rotate` does (1s
    /// to 7d).
    #[arg(long, default_value = "1m", value_parser = rotation_interval)]
    pub rotation_interval: std::time::Duration,
    /// Do not run the rotation worker in this process (e.g. when cron runs `rotate`).
    #[arg(long)]
    pub no_rotation_worker: bool,
    /// How often the AWS mirror worker (run when `aws enable` was used) applies the
    /// outbox (100ms to 1h).
    #[arg(long, default_value = "2s", value_parser = mirror_interval)]
    pub mirror_interval: std::time::Duration,
    /// Do not run the AWS mirror worker in this process (e.g. when cron runs `aws sync`).
    #[arg(long)]
    pub no_mirror_worker: bool,
    /// How often serve runs a scheduled Device Defender audit (every check; the MQTT
    /// checks read sessions since the previous task): `fleetcert audit tasks` lists them,
    /// /metrics has the non-compliant resources per check. The first runs at start if
    /// the newest task is older than this. `0s` turns it off; else 1m to 31d.
    #[arg(long, default_value = "1d", value_parser = audit_interval)]
    pub audit_interval: std::time::Duration,
    /// POST each scheduled audit's summary (the JSON `audit run --output json` prints)
    /// to this http:// URL.
    #[arg(long, value_name = "URL")]
    pub audit_webhook: Option<String>,
    /// A device whose certificate expired at most this long ago (e.g. 30d) may still
    /// re-enroll with it (EST or replacement fetch, nothing else). Default: no window;
    /// at most 3650d.
    #[arg(long, default_value = "0s", value_parser = renew_after_expiry)]
    pub renew_after_expiry: std::time::Duration,
    /// Also answer the mosquitto plugin on this address (plain HTTP/1.1, e.g.
    /// 127.0.0.1:8884): POST /broker/v1/connect, /broker/v1/disconnect,
    /// /broker/v1/sessions (docs/broker-api.md). Requests must carry the secret in
    /// <data-dir>/broker/broker-api.secret, written by `fleetcert mosquitto config`.
    /// Loopback only unless --broker-api-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub broker_api: Option<std::net::SocketAddr>,
    /// Let --broker-api listen on a non-loopback address (the secret then travels in
    /// clear text on that network: use it only on a trusted one).
    #[arg(long, requires = "broker_api")]
    pub broker_api_allow_remote: bool,
    /// The AWS region policy resources are matched in on the broker
    /// (`arn:aws:iot:REGION:ACCOUNT:topic/...`). Set it, with --broker-account, to the
    /// account the AWS mirror writes to when policies name a real region and account
    /// rather than `*`; the default template's policies use `*` and match any.
    #[arg(long, requires = "broker_api", value_name = "REGION", default_value = "local", value_parser = parse_region)]
    pub broker_region: String,
    /// The AWS account ID (12 digits) policy resources are matched in on the broker.
    #[arg(long, requires = "broker_api", value_name = "ACCOUNT", default_value = "000000000000", value_parser = parse_account)]
    pub broker_account: String,
}

fn parse_region(text: &str) -> Result<String, String> {
    if !text.is_empty()
        && text.len() <= 32
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a region name (lowercase letters, digits and '-', e.g. us-east-1)"
        ))
    }
}

fn parse_account(text: &str) -> Result<String, String> {
    if text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit()) {
        Ok(text.to_owned())
    } else {
        Err(format!("{text:?} is not an AWS account ID (12 digits)"))
    }
}

#[derive(Debug, Subcommand)]
pub enum TemplatesCommand {
    /// Parse templates and run the least-privilege lint (Device Defender
    /// IOT_POLICY_OVERLY_PERMISSIVE_CHECK). Exit 1 on any finding, 2 on an invalid template.
    Lint {
        /// Template files (YAML or JSON), named by their file stem.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Templates in <data-dir>/templates/ (plus the built-in `default`), with their status.
    List,
}

#[derive(Debug, Subcommand)]
pub enum PoliciesCommand {
    /// All stored policies, by name.
    List,
    /// One policy's document; with --thing, the effective policy for that thing (policy
    /// variables substituted).
    Show {
        name: String,
        #[arg(long)]
        thing: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ThingsCommand {
    /// List things, ordered by name.
    List {
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// One thing with its certificates and recent events.
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// List certificates.
    List {
        /// Only this thing's certificates.
        #[arg(long)]
        thing: Option<String>,
        /// Only certificates with this status.
        #[arg(long, value_parser = ["active", "superseded", "revoked"])]
        status: Option<String>,
        /// Only certificates that expire within this duration (e.g. 30d, 12h).
        #[arg(long, value_parser = humantime::parse_duration)]
        expiring_within: Option<std::time::Duration>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Devices in the demo batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,
    /// Keep the demo data directory (its path is printed) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Skip the MQTT round (run when mosquitto and its clients are installed).
    #[arg(long)]
    pub no_mqtt: bool,
    /// The mosquitto broker for the MQTT round [default: `mosquitto` on PATH, then
    /// /usr/sbin/mosquitto].
    #[arg(long, env = "FLEETCERT_MOSQUITTO", value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// The directory holding mosquitto_sub, mosquitto_pub and mosquitto_rr [default: PATH].
    #[arg(long, env = "FLEETCERT_MOSQUITTO_CLIENTS", value_name = "DIR")]
    pub mosquitto_clients: Option<PathBuf>,
    /// The fleetcert mosquitto plugin (libfleetcert_mosquitto.so) [default: beside the
    /// fleetcert executable].
    #[arg(long, value_name = "PATH")]
    pub plugin: Option<PathBuf>,
}

/// A duration (`humantime`: `90s`, `5m`, `1h30m`, `7d`) within `min..=max`: zero or an
/// absurd value (a busy loop, a timeout nobody can meet) is refused with exit 2.
fn duration_within(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn handshake_timeout(text: &str) -> Result<Duration, String> {
    duration_within(text, SECOND, 10 * MINUTE)
}

fn audit_interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Ok(d);
    }
    duration_within(text, MINUTE, 31 * DAY)
}

fn rotation_interval(text: &str) -> Result<Duration, String> {
    duration_within(text, SECOND, 7 * DAY)
}

fn mirror_interval(text: &str) -> Result<Duration, String> {
    duration_within(text, Duration::from_millis(100), HOUR)
}

fn renew_after_expiry(text: &str) -> Result<Duration, String> {
    duration_within(text, Duration::ZERO, 3650 * DAY)
}

fn lease(text: &str) -> Result<Duration, String> {
    duration_within(text, 10 * SECOND, DAY)
}

/// `serve --request-timeout`: 0 would refuse every request; days would let slow clients
/// hold connections.
fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    duration_within(text, Duration::from_millis(1), HOUR)
}
