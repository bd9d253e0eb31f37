//! `keyrotate history`: ledger rows, newest first; on the PostgreSQL ledger also the
//! shared store's syncs (`shared_syncs`), which are not rotations and have no row.

use super::{load_config, print_json, report_failure};
use crate::cli::{Cli, HistoryArgs, OutputFormat};
use crate::deadline::parse_duration;
use crate::ledger::{Ledger, RunRow, SyncRow};
use crate::outcome::{Failure, Outcome};
use crate::time::rfc3339 as now_rfc3339;

pub fn run(cli: &Cli, args: &HistoryArgs) -> Outcome {
    match history(cli, args) {
        Ok(()) => Outcome::Rotated,
        Err(f) => report_failure(&f),
    }
}

/// `--since`: a duration ago (`24h`) or an RFC 3339 instant, as a ledger timestamp.
fn since(when: &str) -> Result<String, Failure> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(when.trim()) {
        return Ok(now_rfc3339(at.with_timezone(&chrono::Utc)));
    }
    let ago = parse_duration(when)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .ok_or_else(|| {
            Failure::usage(format!(
                "--since {when:?} is neither a duration (24h, 7d) nor an RFC 3339 instant"
            ))
        })?;
    Ok(now_rfc3339(ago))
}

fn history(cli: &Cli, args: &HistoryArgs) -> Result<(), Failure> {
    let config = load_config(cli, args.domain.as_deref())?;
    if let Some(d) = &args.domain {
        config.domain(d).map_err(Failure::usage)?;
    }
    let limit: u32 = args
        .limit
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| Failure::usage(format!("--limit {:?} must be a whole number of at least 1", args.limit)))?;
    let since = args.since.as_deref().map(since).transpose()?;
    let ledger = Ledger::open_read_only(&config.ledger).map_err(|e| Failure::new(Outcome::Aborted, e))?;
    // The shared store's syncs (DESIGN 9) are not rotations: their own list, read only
    // where the config has a shared domain (a least-privilege role of a ledger without
    // one has no grant on their table).
    let shared = match &args.domain {
        Some(d) => config.domain(d).is_ok_and(|d| d.shared().is_some()),
        None => config.domains.values().any(|d| d.shared().is_some()),
    };
    let (rows, syncs) = match &ledger {
        None => (Vec::new(), Vec::new()),
        Some(l) => {
            let failed = |e| Failure::new(Outcome::Aborted, e);
            let rows = l
                .history(args.domain.as_deref(), since.as_deref(), limit)
                .map_err(failed)?;
            let syncs = match shared {
                true => l
                    .shared_syncs(args.domain.as_deref(), since.as_deref(), limit)
                    .map_err(failed)?,
                false => Vec::new(),
            };
            (rows, syncs)
        }
    };
    match args.output {
        OutputFormat::Json if shared => print_json(&serde_json::json!({ "runs": rows, "syncs": syncs })),
        OutputFormat::Json => print_json(&serde_json::json!({ "runs": rows })),
        OutputFormat::Text => {
            print_table(&rows);
            print_syncs(&syncs);
        }
    }
    Ok(())
}

/// The shared store's syncs, when there are any.
fn print_syncs(syncs: &[SyncRow]) {
    if syncs.is_empty() {
        return;
    }
    out!("syncs (keyrotate sync, newest first):");
    let table: Vec<[String; 7]> = syncs
        .iter()
        .map(|s| {
            [
                s.at.clone(),
                s.domain.clone(),
                s.host.clone(),
                s.pool.clone().unwrap_or_default(),
                format!("{} ({})", s.outcome, s.exit_code),
                s.epoch.map_or("-".into(), |e| e.to_string()),
                s.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    super::print_table(&["AT", "DOMAIN", "HOST", "POOL", "OUTCOME", "EPOCH", "DETAIL"], &table);
}

fn print_table(rows: &[RunRow]) {
    if rows.is_empty() {
        out!("no runs recorded");
        return;
    }
    let opt = |v: Option<i64>| v.map_or("-".to_string(), |n| format!("v{n}"));
    let table: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.started_at.clone(),
                r.domain.clone(),
                r.run_id.clone(),
                r.state.to_string(),
                r.exit_code.map_or("-".into(), |c| c.to_string()),
                format!("{}/{}", r.trigger, r.operator.as_deref().unwrap_or("-")),
                r.host.clone(),
                match (r.from_version, r.to_version) {
                    (None, None) => "-".to_string(),
                    (f, t) => format!("{}->{}", opt(f), opt(t)),
                },
                match (&r.reason, &r.resolution) {
                    (reason, Some(res)) => format!(
                        "{} | resolved by {}: {res}",
                        reason.as_deref().unwrap_or(""),
                        r.resolved_by.as_deref().unwrap_or("?")
                    ),
                    (reason, None) => reason.clone().unwrap_or_default(),
                },
            ]
        })
        .collect();
    super::print_table(
        &[
            "STARTED",
            "DOMAIN",
            "RUN",
            "STATE",
            "EXIT",
            "TRIGGER/OPERATOR",
            "HOST",
            "VERSIONS",
            "REASON",
        ],
        &table,
    );
}
