//! Dispatch from the parsed command line to one file per subcommand, plus what they
//! share: logging set-up, config loading, who and where we are.
//!
//! Nothing here prints with `println!`/`eprintln!`: they panic when the other end of a
//! pipe is gone (EPIPE), which would turn a finished rotation into exit 101 with its
//! ledger row left open. Output goes through [`out!`] and the log through a writer that
//! drops write errors: a closed or full stdout/stderr never changes the outcome.

/// `println!` that ignores write errors (see the module docs).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cmd::say(format_args!($($arg)*))
    };
}

mod audit;
mod check;
mod history;
mod migrate;
mod resolve;
mod rotate;
mod shell;
mod status;
mod sync;

use std::io::{IsTerminal, Write};
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
            let _ = writeln!(
                std::io::stderr(),
                "keyrotate: {} (see keyrotate --help)",
                message.join(" ").trim_start_matches("error: ")
            );
            return Outcome::Usage.into();
        }
    };
    init_logging(&cli);
    let outcome = match &cli.command {
        Command::Rotate(args) => rotate::run(&cli, args),
        Command::Revoke(args) => rotate::revoke(&cli, args),
        Command::Status(args) => reported(status::run(&cli, args)),
        Command::History(args) => reported(history::run(&cli, args)),
        Command::Resolve(args) => resolve::run(&cli, args),
        Command::Check(args) => reported(check::run(&cli, args)),
        Command::Sync(args) => sync::run(&cli, args),
        Command::Migrate(args) => migrate::run(&cli, args),
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
        .with_writer(|| LossyStderr)
        // Its own error report about a failed write is an eprintln!, which panics on EPIPE.
        .log_internal_errors(false)
        .with_target(false);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// The log's writer: stderr, with every write error dropped. A log nobody can read must
/// not fail (or panic) the run it describes; the ledger and audit trail are the record.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Why a write to stdout failed, if one did (see [`reported`]).
static STDOUT_FAILED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// One line on stdout (used through [`out!`]). A write error never stops the command
/// (a rotation's outcome must stay true); it is remembered for [`reported`].
pub(crate) fn say(line: std::fmt::Arguments) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(line).and_then(|()| o.write_all(b"\n")) {
        note_stdout_error(&e);
    }
}

fn note_stdout_error(e: &std::io::Error) {
    // A reader that closed its pipe on purpose (`| head`) got what it asked for.
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return;
    }
    let mut failed = STDOUT_FAILED.lock().unwrap_or_else(|p| p.into_inner());
    failed.get_or_insert_with(|| crate::fsutil::io_reason(e));
}

/// The outcome of a command whose whole purpose is its output (`status`, `history`,
/// `check`): a success whose output could not be written (a full disk behind a
/// redirection, a closed stdout) is ABORTED (3), so a job or monitor never takes a
/// missing report for a good one; a closed pipe is not a failure (see
/// `note_stdout_error`). `rotate` does not go through here: its outcome is the
/// rotation's.
fn reported(outcome: Outcome) -> Outcome {
    if let Err(e) = std::io::stdout().lock().flush() {
        note_stdout_error(&e);
    }
    let failed = STDOUT_FAILED.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(why) if outcome == Outcome::Rotated => {
            tracing::error!("stdout: the output could not be written ({why})");
            Outcome::Aborted
        }
        _ => outcome,
    }
}

/// Loads the config named by `--config`, `$KEYROTATE_CONFIG` or the default path,
/// refusing (ABORTED) one that someone else could have written (DESIGN section 4.4).
/// With `domain`, only that domain is validated (see [`Config::load_for`]).
pub(crate) fn load_config(cli: &Cli, domain: Option<&str>) -> Result<Config, Failure> {
    let path = config::locate(cli.config.as_deref());
    if let Some(e) = config_distrust(&path) {
        return Err(Failure::new(Outcome::Aborted, format!("{e}; refusing to use it")));
    }
    Config::load_for(&path, domain).map_err(Failure::usage)
}

/// Rewrites the `[metrics] textfile`, if configured, after a command that changed or
/// inspected state (DESIGN section 12). Never changes the command's outcome.
pub(crate) fn write_metrics(config: &Config) {
    status::metrics::write_textfile(config);
}

/// Why the config file at `path` cannot be trusted, if it exists and cannot be. A
/// missing file is left to `Config::load`, which reports it as a usage error.
pub(crate) fn config_distrust(path: &std::path::Path) -> Option<String> {
    if std::fs::symlink_metadata(path).is_err() {
        return None;
    }
    crate::fsutil::check_trusted(path, "config").err()
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
    // SAFETY: getuid has no preconditions and cannot fail.
    format!("uid:{}", unsafe { libc::getuid() })
}

/// Validates a free-text value that lands in the ledger and audit (operator, reason,
/// note): bounded, and free of control characters (which forge log lines) and of
/// invisible format characters such as bidirectional overrides (U+202E shows
/// "alice\u{202E}nimda" as "alicenimda" backwards) and zero-width ones, which make
/// `history` show someone or something else than what was recorded.
pub(crate) fn clean_text(what: &str, value: &str, max: usize) -> Result<String, Failure> {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    if value.chars().count() > max {
        return Err(Failure::usage(format!("{what} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Failure::usage(format!("{what} contains control characters")));
    }
    let invisible = value.chars().find(|c| {
        matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::PrivateUse
                | GeneralCategory::Surrogate
        )
    });
    if let Some(c) = invisible {
        return Err(Failure::usage(format!(
            "{what} contains the invisible or formatting character U+{:04X}; use plain text",
            u32::from(c)
        )));
    }
    Ok(value.to_string())
}

pub(crate) fn hostname() -> String {
    crate::process::hostname()
}

/// Prints one JSON object on stdout.
/// Prints a table (see [`crate::table::render`]).
pub(crate) fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    for line in crate::table::render(headers, rows) {
        out!("{line}");
    }
}

pub(crate) fn print_json(value: &impl serde::Serialize) {
    out!("{}", serde_json::to_string(value).expect("json"));
}

/// Whether the process of an in-flight run is still alive on this host: same host
/// name, its pid exists, and that process started when the run did (so a pid reused
/// since is not taken for it). A run found in flight while this one holds the lock is
/// normally dead; alive, it means its lock file was deleted or replaced while it ran
/// (an on-call "clean-up" of lock files), and calling it dead would be false.
pub(crate) fn run_process_alive(row: &crate::ledger::RunRow) -> bool {
    if row.host != hostname() || row.pid <= 0 || i64::from(std::process::id()) == row.pid {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", row.pid)) else {
        return false;
    };
    // Fields 3 (state) and 22 (start time), counted after the parenthesised command
    // name (which may hold spaces). A zombie (killed, not yet reaped) is dead.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    if matches!(fields.first(), None | Some(&"Z") | Some(&"X")) {
        return false;
    }
    let Some(start_ticks) = fields.get(19).and_then(|t| t.parse::<u64>().ok()) else {
        return false;
    };
    let Some(btime) = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<i64>().ok()))
    }) else {
        return false;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return false;
    }
    let started_ms = btime * 1000 + (start_ticks as i64) * 1000 / hz as i64;
    let Ok(recorded) = chrono::DateTime::parse_from_rfc3339(&row.started_at) else {
        return false;
    };
    let recorded_ms = recorded.timestamp_millis();
    // The process starts before it records its row: allow for a slow start, and for
    // the clock-tick and boot-time rounding after.
    (recorded_ms - 120_000..=recorded_ms + 2_000).contains(&started_ms)
}

/// How long `check` and `status` wait for what they read (a key store, a PKCS#11
/// token): they take no `--deadline`, and a monitor or an operator must get an answer
/// even from a token that never answers (another process holding its files). Longer
/// than the ledger's own timeouts (10s), which report more precisely.
pub(crate) const READ_BOUND: std::time::Duration = std::time::Duration::from_secs(20);

/// Ends a read-only command with `code` and one line if it has not disarmed the
/// returned backstop within `READ_BOUND`.
pub(crate) fn bound_read(what: &'static str, code: Outcome) -> crate::guard::Backstop {
    let bound = crate::deadline::Deadline::parse("20s", READ_BOUND).expect("a fixed, valid bound");
    crate::guard::Backstop::arm(&bound, std::time::Duration::ZERO, move || {
        tracing::error!(
            "{what} did not finish within {}s: a key store or its PKCS#11 token does not answer \
             (another process may hold the token's files); nothing was changed",
            READ_BOUND.as_secs()
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(code.code()));
    })
}
