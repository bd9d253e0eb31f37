//! `keyrotate resolve`: an engineer's recorded review of a run that blocks its domain.
//!
//! It writes who, when and why onto the blocking row (state `resolved`), emits
//! `review.resolved`, and so unblocks the domain. A run that is still marked in flight
//! but whose process is gone (its lock is free) may be resolved directly too.

use super::{clean_text, hostname, load_config, operator, report_failure};
use crate::audit::{Audit, Event};
use crate::cli::{Cli, ResolveArgs};
use crate::ledger::Ledger;
use crate::lock;
use crate::outcome::{Failure, Outcome};

pub fn run(cli: &Cli, args: &ResolveArgs) -> Outcome {
    match resolve(cli, args) {
        Ok(msg) => {
            println!("{msg}");
            Outcome::Rotated
        }
        Err(f) => report_failure(&f),
    }
}

fn resolve(cli: &Cli, args: &ResolveArgs) -> Result<String, Failure> {
    let config = load_config(cli)?;
    let domain = config.domain(&args.domain).map_err(Failure::usage)?;
    let note = clean_text("--note", args.note.trim(), 2000)?;
    if note.is_empty() {
        return Err(Failure::usage("--note is empty: say what was checked and decided"));
    }
    let by = clean_text("--operator", &operator(args.operator.as_deref()), 128)?;
    // Only look: resolving must not create a ledger that was never there. Whether the
    // run exists is decided inside the write transaction below.
    if Ledger::open_read_only(&config.ledger)
        .map_err(|e| Failure::new(Outcome::Aborted, e))?
        .is_none()
    {
        return Err(Failure::usage("there is no ledger yet: there is nothing to resolve"));
    }
    let mut ledger = Ledger::open(&config.ledger, std::time::Duration::from_secs(10))
        .map_err(|e| Failure::new(Outcome::Aborted, e))?;
    let held_elsewhere = ledger
        .domain_locked_elsewhere(&domain.name)
        .map_err(|e| Failure::new(Outcome::Aborted, e))?;
    let lock_held = held_elsewhere
        || lock::probe(&lock::lock_path(&config.lock_dir(), &domain.name))
            .unwrap_or(None)
            .is_some();
    let row = ledger
        .write("resolve", |w| {
            let Some(row) = w.get(&args.run)? else {
                return Ok(Err(format!("run {} is not in the ledger", args.run)));
            };
            if row.domain != domain.name {
                return Ok(Err(format!(
                    "run {} belongs to domain {}, not {}",
                    row.run_id, row.domain, domain.name
                )));
            }
            match row.state.as_str() {
                "needs_review" => {}
                _ if row.in_flight() && !lock_held => {
                    w.mark_stale(
                        &row.run_id,
                        "stale: the process died mid-rotation; resolved before any later run flagged it",
                    )?;
                }
                "resolved" => {
                    return Ok(Err(format!(
                        "run {} was already resolved by {} at {}",
                        row.run_id,
                        row.resolved_by.as_deref().unwrap_or("?"),
                        row.resolved_at.as_deref().unwrap_or("?")
                    )))
                }
                state => {
                    return Ok(Err(format!(
                        "run {} does not block {}: its state is {state}",
                        row.run_id, domain.name
                    )))
                }
            }
            w.resolve(&row.run_id, &by, &note)?;
            Ok(Ok(row))
        })
        .map_err(|e| Failure::new(Outcome::Aborted, e))?
        .map_err(Failure::usage)?;
    let audit = Audit::new(&config.audit_file);
    let event = Event {
        run_id: row.run_id.clone(),
        domain: domain.name.clone(),
        host: hostname(),
        pool: config.host_pool.clone(),
        operator: Some(by.clone()),
        reason: Some(note),
        ..Event::default()
    };
    let audited = audit.emit(Event {
        event: "review.resolved",
        ..event
    });
    // The domain is unblocked in the ledger whatever the audit file said: so say the metrics.
    super::write_metrics(&config);
    audited.map_err(|e| {
        Failure::new(
            Outcome::Aborted,
            format!("the review was recorded in the ledger, but {e}"),
        )
    })?;
    Ok(format!(
        "RESOLVED {}: run {} reviewed by {by}; the domain is unblocked",
        domain.name, row.run_id
    ))
}
