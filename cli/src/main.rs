//! `fleetcert`: the command-line front end. Thin: parsing, output, exit codes; the work
//! is in `fleetcert-lifecycle`.

mod args;
mod audit_cmd;
mod aws_cmd;
mod claims_cmd;
mod commands;
mod context;
mod demo;
mod demo_mqtt;
mod lifecycle_cmds;
mod mosquitto_cmd;
mod output;
mod serve;
mod templates_cmd;

use args::Cli;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETCERT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            output::write_stderr(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // A reader that closed stdout early is not an error (see `output::write_stdout`);
    // any other failure to write the results is.
    let stdout_error = output::stdout_error();
    if let Some(e) = &stdout_error {
        output::write_stderr(&format!("error: cannot write to stdout: {e}"));
    }
    match result {
        Ok(_) if stdout_error.is_some() => ExitCode::from(1),
        Ok(code) => code,
        Err(e) => {
            output::write_stderr(&format!("error: {}", e.message));
            ExitCode::from(e.code)
        }
    }
}
