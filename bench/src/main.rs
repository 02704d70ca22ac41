//! `fleetcert-bench`: see the `fleetcert_bench` library docs.

use clap::{Parser, Subcommand};
use fleetcert_bench::{issuance, jitp, metrics};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "fleetcert-bench",
    version,
    about = "fleetcert's benchmark tools. Results are one JSON document on stdout; progress goes to stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mutual-TLS load: a new TCP connection and full TLS handshake per request, with
    /// device certificates from --certs, round-robin. Works against any HTTPS server that
    /// asks for client certificates.
    Jitp(JitpArgs),
    /// In-process issuance throughput (generated keys and CSRs) and the crypto floor.
    Issuance(IssuanceArgs),
    /// Many idle connections at once: opens --connections mutual-TLS connections (device
    /// certificates from --certs, round-robin), one keep-alive request on each, then holds
    /// them all open for --seconds (for measuring a server's memory); counts early closes.
    Hold(fleetcert_bench::hold::HoldArgs),
    /// Device CSRs for issuance benchmarks: --count fresh P-256 keys and PKCS#10 requests
    /// as <out>/<prefix>-<index>.csr, optionally a `provision --batch` pallet naming them.
    /// Prints a one-line JSON summary.
    Csrs(fleetcert_bench::csrs::CsrsArgs),
    /// MQTT 3.1.1 over mutual TLS against a broker that authenticates devices by client
    /// certificate (mosquitto, with or without the fleetcert plugin): `connect` (a new
    /// connection and CONNECT per device), `publish` (QoS 1 throughput and latency,
    /// optionally while new devices onboard) and `hold` (N sessions open, for memory).
    /// Client id = the device's name; see `fleetcert-bench mqtt MODE --help`.
    Mqtt(fleetcert_bench::mqtt::MqttArgs),
}

#[derive(Debug, clap::Args)]
struct JitpArgs {
    /// https://HOST:PORT/PATH
    #[arg(long)]
    url: String,
    /// Directory of <name>.crt + <name>.key pairs (chain.pem is skipped).
    #[arg(long)]
    certs: PathBuf,
    /// PEM trust anchor(s) for the server certificate (e.g. `fleetcert ca export`).
    #[arg(long)]
    ca: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Seconds during which requests start.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// TLS server name (SNI, certificate check); default: the URL's host.
    #[arg(long)]
    server_name: Option<String>,
    /// Use each device at most once (first connects); stop when they run out.
    #[arg(long)]
    new_devices: bool,
    /// HTTP method.
    #[arg(long, default_value = "POST", value_parser = ["POST", "GET"])]
    method: String,
    /// Start requests at this many per second, evenly spaced (open loop); latency is
    /// then measured from each request's scheduled start.
    #[arg(long)]
    rate: Option<f64>,
    /// Per-request time limit in seconds (connect to close).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The server's plain-HTTP Prometheus endpoint, scraped before and after the run.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Counter (summed over labels) that should grow by one per 2xx answer.
    #[arg(long, default_value = metrics::DEFAULT_COUNTER)]
    metrics_counter: String,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct IssuanceArgs {
    /// Certificates of each kind (generated keys, CSRs).
    #[arg(long, default_value_t = 20_000)]
    devices: usize,
    /// Signing threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Interleaved rounds; the best of each measurement is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

fn seconds(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{what} must be a number of seconds >= 0"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Jitp(args) => run_jitp(args),
        Command::Hold(args) => fleetcert_bench::hold::run_cli(args),
        Command::Csrs(args) => fleetcert_bench::csrs::run_cli(args),
        Command::Mqtt(args) => fleetcert_bench::mqtt::run_cli(args),
        Command::Issuance(args) => {
            let threads = args.threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            issuance::run(args.devices, threads, args.rounds, !args.quiet)
                .map_err(|e| format!("{e:#}"))
                .map(|r| serde_json::to_string_pretty(&r).expect("report serialises"))
        }
    };
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetcert-bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_jitp(args: JitpArgs) -> Result<String, String> {
    let mut opts = jitp::JitpOptions::new(args.url, args.certs, args.ca);
    opts.concurrency = args.concurrency as usize;
    opts.duration = seconds(args.duration, "--duration")?;
    opts.timeout = seconds(args.timeout, "--timeout")?;
    opts.server_name = args.server_name;
    opts.new_devices = args.new_devices;
    opts.method = args.method.parse().map_err(|e| format!("--method: {e}"))?;
    opts.rate = args.rate;
    opts.metrics_url = args.metrics_url;
    opts.metrics_counter = args.metrics_counter;
    opts.progress = !args.quiet;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let report = runtime
        .block_on(jitp::run(&opts))
        .map_err(|e| format!("{e:#}"))?;
    Ok(serde_json::to_string_pretty(&report).expect("report serialises"))
}
