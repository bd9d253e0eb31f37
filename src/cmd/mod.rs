//! Dispatch from the parsed command line to one file per subcommand, plus what they
//! share: logging set-up, config loading, who and where we are.

mod audit;
mod check;
mod history;
mod resolve;
mod rotate;
mod shell;
mod status;

pub(crate) use check::{check_program, program_runnable};

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, LogFormat};
use crate::config::{self, Config};
use crate::outcome::{Failure, Outcome};

/// The whole program: parse, set up logging, run one subcommand, map to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if !e.use_stderr() {
                // --help and --version
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap explains over several lines; a scheduler log wants one.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            eprintln!(
                "keyrotate: {} (see keyrotate --help)",
                message.join(" ").trim_start_matches("error: ")
            );
            return Outcome::Usage.into();
        }
    };
    init_logging(&cli);
    let outcome = match &cli.command {
        Command::Rotate(args) => rotate::run(&cli, args),
        Command::Status(args) => status::run(&cli, args),
        Command::History(args) => history::run(&cli, args),
        Command::Resolve(args) => resolve::run(&cli, args),
        Command::Check(args) => check::run(&cli, args),
        Command::Audit(crate::cli::AuditCommand::Verify(args)) => audit::verify(&cli, args),
        Command::Completions(args) => shell::completions(args),
        Command::Manpage(args) => shell::manpage(args),
    };
    outcome.into()
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("KEYROTATE_LOG").unwrap_or_else(|_| EnvFilter::new(format!("keyrotate={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// Loads the config named by `--config`, `$KEYROTATE_CONFIG` or the default path.
pub(crate) fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let path = config::locate(cli.config.as_deref());
    Config::load(&path).map_err(Failure::usage)
}

/// Rewrites the `[metrics] textfile`, if configured, after a command that changed or
/// inspected state (DESIGN section 12). Never changes the command's outcome.
pub(crate) fn write_metrics(config: &Config) {
    status::metrics::write_textfile(config);
}

/// Prints a failure the way every command does: one line on stderr.
pub(crate) fn report_failure(f: &Failure) -> Outcome {
    tracing::error!("{}", f.message);
    f.outcome
}

/// Who runs this: `--operator`, else `$SUDO_USER`, else `$USER`, else the uid.
pub(crate) fn operator(flag: Option<&str>) -> String {
    if let Some(op) = flag.filter(|s| !s.is_empty()) {
        return op.to_string();
    }
    for var in ["SUDO_USER", "USER"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return v;
            }
        }
    }
    format!("uid:{}", unsafe { libc::getuid() })
}

/// Validates a free-text value that lands in the ledger and audit (operator, reason,
/// note): bounded and free of control characters, so it cannot forge log lines.
pub(crate) fn clean_text(what: &str, value: &str, max: usize) -> Result<String, Failure> {
    if value.chars().count() > max {
        return Err(Failure::usage(format!("{what} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Failure::usage(format!("{what} contains control characters")));
    }
    Ok(value.to_string())
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Prints one JSON object on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).expect("json"));
}
