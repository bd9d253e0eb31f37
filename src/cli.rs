//! The command line: every clap type lives here; each subcommand's behaviour lives in
//! its own file under `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "keyrotate",
    version,
    about = "Rotate one key domain safely, once, within a deadline (built for Control-M OS jobs)",
    after_help = "Exit codes: 0 ROTATED, 2 USAGE, 3 ABORTED, 4 NEEDS_REVIEW, 5 BUSY, 6 NOT_DESIGNATED, 7 NOT_DUE, 8 TIMED_OUT"
)]
pub struct Cli {
    /// Config file [default: $KEYROTATE_CONFIG, else /etc/keyrotate/rotate.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Format of the log on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More log detail on stderr (-v debug, -vv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
// Each subcommand's arguments are built only when that subcommand runs: building,
// propagating and dropping the whole tree cost every invocation about 0.1 M
// instructions (a third of `--version` in a static build). Help and man pages are unchanged;
// completion scripts list a subcommand's global options before its own.
#[command(defer = true)]
pub enum Command {
    /// Rotate one domain's keys (the scheduled job)
    Rotate(RotateArgs),
    /// Revoke a leaked key: mark a version compromised, destroy and unpublish it, and
    /// keep the domain usable (an emergency rotation when it was the active key)
    Revoke(RevokeArgs),
    /// Show each domain's versions, last run, block and next due time
    Status(StatusArgs),
    /// Show ledger rows, newest first
    History(HistoryArgs),
    /// Record the review of a run that blocks its domain, and unblock it
    Resolve(ResolveArgs),
    /// Validate config, folders, permissions and backends without changing anything
    Check(CheckArgs),
    /// Copy every shared-store domain's newest committed keyring to this host's key
    /// store, verified, and acknowledge it (exit 0 synced or current, 2 usage, 3 failed
    /// with the local copy kept, 5 busy, 8 timed out)
    Sync(SyncArgs),
    /// Create or upgrade the ledger's tables (run as the role that owns them)
    Migrate(MigrateArgs),
    /// Check the audit trail's integrity
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a shell completion script (bash, zsh or fish) on stdout
    Completions(CompletionsArgs),
    /// Print the man page (roff) on stdout, or write one page per command into a folder
    Manpage(ManpageArgs),
}

#[derive(Args, Debug)]
pub struct ManpageArgs {
    /// Write keyrotate.1 and a page per subcommand (keyrotate-rotate.1, …) into DIR
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Recompute the audit hash chain and check it against the ledger's anchors
    /// (exit 0 intact, 4 altered/removed/reordered lines or a cut tail, 3 unreadable)
    Verify(AuditVerifyArgs),
}

#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `status --output`: the usual formats, plus the Prometheus exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum StatusOutput {
    #[default]
    Text,
    Json,
    /// The metrics of `[metrics] textfile`, in the Prometheus text format
    Prometheus,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// The key domain to rotate
    #[arg(long, value_name = "NAME")]
    pub domain: String,

    /// When the run must be finished: a duration (90s, 10m, 1h30m) or an RFC 3339 instant
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub deadline: String,

    /// Print the plan and the exit code the real run would return; change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Rotate even if the last success is within min_interval (emergency rotation)
    #[arg(long)]
    pub force: bool,

    /// This host's pool [default: $KEYROTATE_POOL, else the config's host.pool]
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,

    /// External correlation id, unique in the ledger (e.g. %%ORDERID-%%RUNCOUNT)
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,

    /// Who runs it [default: $SUDO_USER, else $USER, else the uid]; marks the run manual
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,

    /// Why this rotation runs (recorded in the ledger and audit)
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The key domain
    #[arg(long, value_name = "NAME")]
    pub domain: String,

    /// The version to revoke (as keyring.json and status number it)
    #[arg(long, value_name = "N")]
    pub version: u64,

    /// Why it is revoked (recorded on the version, in the ledger and in the audit trail)
    #[arg(long, value_name = "TEXT")]
    pub reason: String,

    /// When the run must be finished: a duration (90s, 10m, 1h30m) or an RFC 3339 instant
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub deadline: String,

    /// Print the plan and the exit code the real run would return; change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// This host's pool [default: $KEYROTATE_POOL, else the config's host.pool]
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,

    /// External correlation id, unique in the ledger (e.g. %%ORDERID-%%RUNCOUNT)
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,

    /// Who runs it [default: $SUDO_USER, else $USER, else the uid]
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,

    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: StatusOutput,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// At most this many rows
    #[arg(long, value_name = "N", default_value = "50", allow_hyphen_values = true)]
    pub limit: String,
    /// Only runs started at or after WHEN: a duration ago (24h) or an RFC 3339 instant
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ResolveArgs {
    #[arg(long, value_name = "NAME")]
    pub domain: String,
    /// The run id that blocks the domain (status names it)
    #[arg(long = "run", value_name = "ID")]
    pub run: String,
    /// What was checked and decided
    #[arg(long, value_name = "TEXT")]
    pub note: String,
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Only this shared-store domain [default: every domain with store = "shared"]
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,

    /// When the sync must be finished: a duration (90s, 10m) or an RFC 3339 instant
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub deadline: String,

    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every invocation builds the command line it parses: a subcommand's arguments are
    /// built only when it runs (`defer`), not the whole tree each time (issue 16).
    /// Help, man pages and completions build the whole tree and see every argument.
    #[test]
    fn a_subcommand_s_arguments_are_built_only_when_it_runs() {
        let lazy = Cli::command();
        for sc in lazy.get_subcommands() {
            assert_eq!(sc.get_arguments().count(), 0, "{} built eagerly", sc.get_name());
        }
        let mut full = Cli::command();
        full.build();
        let rotate = full.find_subcommand("rotate").unwrap();
        for id in ["domain", "deadline", "dry_run", "config", "quiet"] {
            assert!(rotate.get_arguments().any(|a| a.get_id() == id), "rotate lacks {id}");
        }
    }
}
