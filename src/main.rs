//! `updog-backup`: parse the command line, set up logging, run the command, report the error
//! chain once with the exit code its class earns (README.md: 1 operational, 2 usage).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use updog_backup::cli::{self, Cli};

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The daemon's log is its report; a one-shot command's report is on stdout, and info
    // lines interleaved with it (JSON when stderr is not a terminal) would bury it.
    let default_level = match cli.command {
        cli::Command::Daemon => "info",
        _ => "warn",
    };
    init_tracing(default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = format!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(&format!("\n  caused by: {text}"));
                }
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `updog-backup list | head` closes stdout early, and `println!` then panics with a backtrace
/// that reads like a crash. A reader that stopped reading is no error of ours: exit at once
/// as a command killed by SIGPIPE would (141), which is what `set -o pipefail` scripts expect.
/// (Restoring SIGPIPE's default action instead would need `unsafe`, which this crate forbids.)
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// Human-readable logs on a terminal, JSON lines otherwise; level from `UPDOG_BACKUP_LOG`
/// (or `RUST_LOG`), default `default_level` (server notices relayed by tokio-postgres only
/// from `warn`).
fn init_tracing(default_level: &str) {
    let filter = EnvFilter::try_from_env("UPDOG_BACKUP_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},tokio_postgres=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.with_target(false).init();
    } else {
        builder.json().flatten_event(true).init();
    }
}
