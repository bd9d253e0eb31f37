//! `keyrotate migrate`: creates or upgrades the ledger's tables, and nothing else.
//!
//! Every other command changes the schema only when it is behind, so once the owner
//! has run this, a role with only SELECT, INSERT and UPDATE runs everything (README,
//! "Operating the PostgreSQL ledger as a DBA"). On the embedded SQLite ledger it
//! creates `<state.dir>/ledger.sqlite3` if needed and applies the same migrations.

use super::{load_config, print_json, report_failure};
use crate::cli::{Cli, MigrateArgs, OutputFormat};
use crate::config::LedgerLocation;
use crate::fsutil;
use crate::ledger::Ledger;
use crate::outcome::{Failure, Outcome};

pub fn run(cli: &Cli, args: &MigrateArgs) -> Outcome {
    match migrate(cli) {
        Ok((label, from, to)) => {
            match args.output {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "ledger": label, "from_version": from, "to_version": to, "migrated": from != to
                })),
                OutputFormat::Text if from == to => {
                    out!("CURRENT ledger {label}: schema version {to}; nothing to do")
                }
                OutputFormat::Text => out!("MIGRATED ledger {label}: schema version {from} -> {to}"),
            }
            Outcome::Rotated
        }
        Err(f) => report_failure(&f),
    }
}

fn migrate(cli: &Cli) -> Result<(String, i64, i64), Failure> {
    let config = load_config(cli, None)?;
    if let LedgerLocation::Sqlite(_) = config.ledger {
        fsutil::ensure_private_dir(&config.state_dir, "state folder").map_err(|e| Failure::new(Outcome::Aborted, e))?;
    }
    Ledger::migrate(&config.ledger, std::time::Duration::from_secs(10)).map_err(|e| Failure::new(Outcome::Aborted, e))
}
