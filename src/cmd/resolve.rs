//! `keyrotate resolve`: an engineer's recorded review of a run that blocks its domain.
//!
//! It writes who, when and why onto the blocking row (state `resolved`), emits
//! `review.resolved`, and so unblocks the domain. A run that is still marked in flight
//! but whose process is gone (its lock is free) may be resolved directly too.

use super::{clean_text, hostname, load_config, operator, report_failure};
use crate::audit::{Audit, Event};
use crate::backend::keystore::examine;
use crate::cli::{Cli, ResolveArgs};
use crate::config::{Backend, Config, DomainConfig};
use crate::fsutil;
use crate::keystore::Keystore;
use crate::ledger::{Ledger, RunState};
use crate::lock::DomainLocks;
use crate::outcome::{Failure, Outcome};

pub fn run(cli: &Cli, args: &ResolveArgs) -> Outcome {
    match resolve(cli, args) {
        Ok(msg) => {
            out!("{msg}");
            Outcome::Rotated
        }
        Err(f) => report_failure(&f),
    }
}

fn resolve(cli: &Cli, args: &ResolveArgs) -> Result<String, Failure> {
    let config = load_config(cli, Some(&args.domain))?;
    let domain = config.domain(&args.domain).map_err(Failure::usage)?;
    // resolve may repair the key store: it must be writable as configured.
    domain
        .writable()
        .map_err(|e| Failure::usage(format!("{}: {e}", config.path.display())))?;
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
    refuse_while_running(&ledger, &args.run)?;
    // Take the domain's locks, as a rotation would: the review is followed by the
    // repair of the key store (DESIGN 5), which must not race a run. A lock held by
    // someone else means a process is alive: it is named, and nothing is repaired.
    let locks = take_locks(&config, domain, &ledger)?;
    let lock_held = locks.is_none();
    let row = ledger
        .write("resolve", |w| {
            // Locked: of two concurrent resolves, the second reads what the first wrote.
            let Some(row) = w.get_for_update(&args.run)? else {
                return Ok(Err(Failure::usage(format!("run {} is not in the ledger", args.run))));
            };
            if let Err(f) = review(w, &row, domain, lock_held)? {
                return Ok(Err(f));
            }
            if !w.resolve(&row.run_id, &by, &note)? {
                return Ok(Err(Failure::usage(format!("run {} was already resolved", row.run_id))));
            }
            Ok(Ok(row))
        })
        .map_err(|e| Failure::new(Outcome::Aborted, e))??;
    let store_note = match &domain.backend {
        // A shared domain's truth is the shared keyring: this host's copy is `sync`'s.
        Backend::Keystore { .. } if domain.shared().is_some() => {
            "; this host's copy of the shared keyring is brought up to date by keyrotate sync".to_string()
        }
        Backend::Keystore { keystore, .. } if locks.is_some() => repair_after_review(
            &Keystore::new(keystore, &domain.name),
            &ledger,
            &domain.name,
            &row.run_id,
        ),
        _ => String::new(),
    };
    drop(locks);
    announce(&config, domain, &row, &by, &note, &store_note)
}

/// Nothing is resolved while the run, or a hook it started, still runs here: a
/// rotation after the review would run beside it.
fn refuse_while_running(ledger: &Ledger, run: &str) -> Result<(), Failure> {
    let Some(row) = ledger.get(run).map_err(|e| Failure::new(Outcome::Aborted, e))? else {
        return Ok(());
    };
    if row.in_flight() || row.state == RunState::NeedsReview {
        let events = ledger
            .events(&row.run_id)
            .map_err(|e| Failure::new(Outcome::Aborted, e))?;
        if let Some(alive) = crate::process::liveness(&hostname(), &row.host, &events) {
            return Err(Failure::new(
                Outcome::Busy,
                format!("not resolved: {}; then resolve", alive.describe(&row.run_id)),
            ));
        }
    }
    Ok(())
}

/// Inside the resolve transaction: may this run be resolved now? A run found in flight
/// without its lock is first marked stale (it died). `Ok(Err)`: refused, nothing written.
fn review(
    w: &crate::ledger::Writer<'_, '_>,
    row: &crate::ledger::RunRow,
    domain: &DomainConfig,
    lock_held: bool,
) -> Result<Result<(), Failure>, String> {
    if row.domain != domain.name {
        return Ok(Err(Failure::usage(format!(
            "run {} belongs to domain {}, not {}",
            row.run_id, row.domain, domain.name
        ))));
    }
    match row.state {
        RunState::NeedsReview if lock_held => {
            return Ok(Err(Failure::new(
                Outcome::Busy,
                format!(
                    "another keyrotate run of {} holds its lock; resolve again when it has ended (keyrotate status --domain {})",
                    domain.name, domain.name
                ),
            )))
        }
        RunState::NeedsReview => {}
        _ if row.in_flight() && !lock_held => {
            w.mark_stale(
                &row.run_id,
                "stale: the process died mid-rotation; resolved before any later run flagged it",
            )?;
        }
        RunState::Resolved => {
            return Ok(Err(Failure::usage(format!(
                "run {} was already resolved by {} at {}",
                row.run_id,
                row.resolved_by.as_deref().unwrap_or("?"),
                row.resolved_at.as_deref().unwrap_or("?")
            ))))
        }
        state => {
            return Ok(Err(Failure::usage(format!(
                "run {} does not block {}: its state is {state}",
                row.run_id, domain.name
            ))))
        }
    }
    Ok(Ok(()))
}

/// Writes the review's audit line and the metrics, and says what was done.
fn announce(
    config: &Config,
    domain: &DomainConfig,
    row: &crate::ledger::RunRow,
    by: &str,
    note: &str,
    store_note: &str,
) -> Result<String, Failure> {
    let audit = Audit::new(&config.audit_file);
    let event = Event {
        run_id: row.run_id.clone(),
        domain: domain.name.clone(),
        host: hostname(),
        pool: config.host_pool.clone(),
        operator: Some(by.to_string()),
        reason: Some(format!("{note}{store_note}")),
        ..Event::default()
    };
    let audited = audit.emit(Event {
        event: "review.resolved",
        ..event
    });
    // The domain is unblocked in the ledger whatever the audit file said: so say the metrics.
    super::write_metrics(config);
    audited.map_err(|e| {
        Failure::new(
            Outcome::Aborted,
            format!("the review was recorded in the ledger, but {e}"),
        )
    })?;
    Ok(format!(
        "RESOLVED {}: run {} reviewed by {by}; the domain is unblocked{store_note}",
        domain.name, row.run_id
    ))
}

/// The state lock, the shared ledger's lock and the key store's lock, all free and now
/// held; `None` when any of them is held by a live process.
fn take_locks(config: &Config, domain: &DomainConfig, ledger: &Ledger) -> Result<Option<DomainLocks>, Failure> {
    let aborted = |e: String| Failure::new(Outcome::Aborted, e);
    fsutil::ensure_private_dir(&config.state_dir, "state folder").map_err(aborted)?;
    fsutil::ensure_private_dir(&config.lock_dir(), "lock folder").map_err(aborted)?;
    // Only an existing key folder is locked: resolving creates no key store.
    let keystore_lock = match &domain.backend {
        Backend::Keystore { keystore, .. } => {
            let ks = Keystore::new(keystore, &domain.name);
            (ks.check_folders().is_ok() && ks.dir().is_dir()).then(|| ks.lock_path())
        }
        _ => None,
    };
    // A review is not a run: it names no holder in the lock files.
    DomainLocks::acquire(&config.lock_dir(), &domain.name, ledger, keystore_lock.as_deref(), None)
        .map(Result::ok)
        .map_err(aborted)
}

/// After the review, under the locks: adopt a key store whose manifest this ledger
/// does not know (DESIGN 4.4: the reviewed store becomes this ledger's), then finish
/// the last commit's tidy-up, so the store is whole without a new rotation. What
/// still needs a human (unlisted files, a store that does not verify) is said, and
/// left alone. Returns a note for the message and the audit line.
fn repair_after_review(ks: &Keystore, ledger: &Ledger, domain: &str, run_id: &str) -> String {
    let mut notes = Vec::new();
    // The review is the deliberate act that writes off key files that are gone for good.
    match ks.record_lost_files() {
        Ok(lost) if lost.is_empty() => {}
        Ok(lost) => {
            let names: Vec<String> = lost.iter().map(|n| format!("v{n}")).collect();
            notes.push(format!(
                "{} recorded as destroyed: the file was missing at this review",
                names.join(", ")
            ));
        }
        Err(e) => return format!("; {e}: the next rotation stops again"),
    }
    let (mut insp, mut verdict) = match examine(ks, Some(ledger), domain) {
        Ok(x) => x,
        Err(d) => {
            let before: String = notes.iter().map(|n| format!("; {n}")).collect();
            return format!("{before}; the key store does not verify ({d}): the next rotation stops again");
        }
    };
    if verdict.mismatch.is_some() {
        let mut adopted = insp.manifest.clone();
        adopted.committed_by_run = Some(run_id.to_string());
        if let Err(e) = ks.commit(&adopted) {
            return format!(
                "; could not adopt the key store into this ledger ({})",
                fsutil::io_reason(&e)
            );
        }
        notes.push(format!("the key store was adopted into this ledger under run {run_id}"));
        match examine(ks, Some(ledger), domain) {
            Ok(x) => (insp, verdict) = x,
            Err(d) => return format!("; the key store does not verify ({d}): the next rotation stops again"),
        }
    }
    if verdict.clean() && insp.exists {
        match ks.repair(&insp) {
            Ok(done) if done.is_empty() => {}
            Ok(done) => notes.push(format!("finished the last commit's tidy-up: {}", done.join(", "))),
            Err(e) => notes.push(format!(
                "could not finish the last commit's tidy-up ({}): the next run retries",
                fsutil::io_reason(&e)
            )),
        }
    } else if !verdict.resurrected.is_empty() {
        let v: Vec<String> = verdict.resurrected.iter().map(|(n, _)| format!("v{n}")).collect();
        let n = match verdict.resurrected.as_slice() {
            [(n, _)] => n.to_string(),
            _ => "N".into(),
        };
        notes.push(format!(
            "keyring.json lists {} as usable, but the ledger records a revocation of it: revoke it again \
             (keyrotate revoke --domain {domain} --version {n} --reason \"...\" --deadline 10m); every rotation stops until then",
            v.join(", ")
        ));
    } else if !verdict.evidence.is_empty() {
        notes.push(format!(
            "the key store still holds files keyring.json does not list ({}): the next rotation stops again until they are moved away or keyring.json is put back",
            verdict.evidence.join(", ")
        ));
    }
    notes.iter().map(|n| format!("; {n}")).collect()
}
