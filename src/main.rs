//! The `mistral-bot` binary: parse, validate, set up logging, run, report.

use std::io::IsTerminal;
use std::process::ExitCode;

use mistral_bot::config::{Args, Command, Config};
use mistral_bot::redact::RedactingMakeWriter;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // A missing .env is normal; values already in the environment win over it.
    let _ = dotenvy::dotenv();
    let args = match Command::parse_from(std::env::args_os()) {
        Command::Run(args) => args,
        Command::Doctor(args) => return doctor(args),
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(RedactingMakeWriter::new(std::io::stderr, config.secrets()))
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mistral_bot::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mistral-bot doctor`: the report on stdout; exit 0 when the bot can run as configured.
fn doctor(args: Args) -> ExitCode {
    let report = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(mistral_bot::doctor::run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{report}");
    if report.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
