//! Phases 4 to 6 of a rotation as pure decisions over what the ledger holds, and every
//! message a rotation stops with before its backend runs: built here once, for the
//! real run and the dry run alike.

use super::*;

/// Phases 4 to 6 as a pure decision over what the ledger holds.
pub(super) enum Admission {
    Stale(RunRow),
    /// In flight, and its process is alive on this host although this run holds the
    /// lock: its lock file was deleted or replaced while it ran.
    Alive(RunRow),
    Blocked(RunRow),
    NotDue {
        last: RunRow,
        next_due: String,
    },
    OverBudget {
        left: Duration,
        need: Duration,
    },
    Go,
    /// A revocation goes ahead past a run found in flight without its lock, which it
    /// marks for review (see [`judge`]).
    GoPast(RunRow),
}

pub(super) fn admit(p: &Prepared, rec: &DomainRecord, remaining: Duration) -> Admission {
    // A revocation is not held back by an earlier run's review: see `judge`.
    let revoking = p.revoke.is_some();
    if let Some(dead) = &rec.in_flight {
        if crate::cmd::run_process_alive(dead) {
            return Admission::Alive(dead.clone());
        }
        if !revoking {
            return Admission::Stale(dead.clone());
        }
    }
    if let Some(blocking) = &rec.blocking {
        if !revoking {
            return Admission::Blocked(blocking.clone());
        }
    }
    if let Some(next_due) = crate::due::next_due(rec.last_success.as_ref(), p.domain.min_interval) {
        if !p.run.forced && next_due > chrono::Utc::now() {
            return Admission::NotDue {
                last: rec.last_success.clone().expect("a due time comes from a success"),
                next_due: now_rfc3339(next_due),
            };
        }
    }
    let need = budget(p);
    if remaining < need {
        return Admission::OverBudget { left: remaining, need };
    }
    match &rec.in_flight {
        Some(dead) => Admission::GoPast(dead.clone()),
        None => Admission::Go,
    }
}

/// A refusal that marks no other run.
fn refusal(outcome: Outcome, state: RunState, reason: String, plan: String) -> Refusal {
    Refusal {
        outcome,
        state,
        reason,
        stale: None,
        plan,
    }
}

/// The refusal for a run found in flight while this one holds the lock.
fn stale_refusal(domain: &str, dead: RunRow, stale: Option<&StaleFacts>) -> Refusal {
    match stale.and_then(|s| s.alive.clone()) {
        // A live process is never called dead: a run that lost its PostgreSQL
        // lock may still run here, and a dead run's hook may outlive it.
        Some(alive @ crate::process::Alive::Run(_)) => refusal(
            Outcome::Busy,
            RunState::Refused,
            format!(
                "another rotation of {domain} is running: {}; it stops at its next step: wait for it",
                alive.describe(&dead.run_id)
            ),
            format!("ledger: {}", alive.describe(&dead.run_id)),
        ),
        alive => {
            let mut diagnosis = stale
                .map(|s| s.diagnosis.clone())
                .unwrap_or_else(|| "the key store was not inspected".into());
            if let Some(alive) = &alive {
                diagnosis = format!("{diagnosis}; {}", alive.describe(&dead.run_id));
            }
            let mark = format!("stale: the process {} mid-rotation; {diagnosis}", ended_how(&dead));
            Refusal {
                outcome: Outcome::NeedsReview,
                state: RunState::Refused,
                reason: stale_message(domain, &dead, &diagnosis),
                plan: format!(
                    "ledger: run {} is still in flight but holds no lock: it {}",
                    dead.run_id,
                    ended_how(&dead)
                ),
                stale: Some((dead.run_id, mark)),
            }
        }
    }
}

/// The least time left at admission that a rotation of this domain can finish in
/// (the backend's floor).
pub(super) fn budget(p: &Prepared) -> Duration {
    p.backend().budget()
}

/// What a stale run's diagnosis found out before the admission transaction: the key
/// store's story and whether one of its processes still lives.
pub(super) struct StaleFacts {
    pub diagnosis: String,
    pub alive: Option<crate::process::Alive>,
}

/// A refusal decided at admission: the row's state and outcome, the reason, and for a
/// stale run the mark to put on the dead run's row.
pub(super) struct Refusal {
    pub outcome: Outcome,
    pub state: RunState,
    pub reason: String,
    /// The dead run and the mark its row gets (stale runs only).
    pub stale: Option<(String, String)>,
    /// The dry run's plan line.
    pub plan: String,
}

/// A run admitted: with, for a revocation that found a dead run in flight, that run
/// and the mark its row gets (needs review), written in the admission transaction.
pub(super) type Admitted = Option<(String, String)>;

/// Phases 4 to 6: the decision the admission makes over the domain's record.
/// `Ok(_)`: the run is admitted.
///
/// A revocation goes ahead on a domain blocked for review, and past a run that died
/// in flight (whose row it marks for review, as a rotation would): an operator who
/// learns that a key leaked must be able to unpublish it now, not after a review of
/// an unrelated failure. That is safe because the revocation commits only from a key
/// store that verifies (the backend refuses an inconsistent one with NEEDS_REVIEW, as
/// for any rotation), and the block stays: the review still has to happen. A run still
/// alive is never passed (BUSY).
pub(super) fn judge(
    p: &Prepared,
    rec: &DomainRecord,
    remaining: Duration,
    stale: Option<&StaleFacts>,
) -> Result<Admitted, Refusal> {
    let domain = &p.domain.name;
    Err(match admit(p, rec, remaining) {
        Admission::Go => return Ok(None),
        Admission::GoPast(dead) => {
            let r = stale_refusal(domain, dead, stale);
            match r.stale {
                Some(mark) if r.outcome == Outcome::NeedsReview => return Ok(Some(mark)),
                _ => r,
            }
        }
        Admission::Stale(dead) => stale_refusal(domain, dead, stale),
        Admission::Alive(row) => refusal(
            Outcome::Busy,
            RunState::Refused,
            alive_message(&row, !matches!(p.config.ledger, crate::config::LedgerLocation::Sqlite(_))),
            format!("ledger: run {} is in flight and its process is alive", row.run_id),
        ),
        Admission::Blocked(row) => refusal(
            Outcome::NeedsReview,
            RunState::Refused,
            blocked_message(domain, &row),
            format!("ledger: blocked by run {}", row.run_id),
        ),
        Admission::NotDue { last, next_due } => refusal(
            Outcome::NotDue,
            RunState::Refused,
            format!(
                "not due: run {} succeeded at {}; next due {next_due} (min_interval {}); use --force for an emergency rotation",
                last.run_id,
                last.ended_at.as_deref().unwrap_or(&last.started_at),
                humantime::format_duration(p.domain.min_interval)
            ),
            format!("due: no, next due {next_due}"),
        ),
        Admission::OverBudget { left, need } => refusal(
            Outcome::TimedOut,
            RunState::TimedOut,
            format!(
                "deadline budget: {} left, a {} rotation needs at least {}; nothing was changed",
                // Whole seconds: the dry run, a moment earlier, says the same.
                humantime::format_duration(Duration::from_secs(left.as_secs())),
                p.domain.backend.algorithm_name().unwrap_or("command"),
                humantime::format_duration(need)
            ),
            "deadline: too little time left".into(),
        ),
    })
}

pub(super) fn not_designated_message(p: &Prepared) -> String {
    format!(
        "this host's pool {} is not the designated pool {}; nothing done",
        p.pool, p.domain.designated_pool
    )
}

pub(super) fn duplicate_run_id_message(run_id: &str) -> String {
    format!("--run-id {run_id} is already in the ledger; a re-run is a new attempt with a new id")
}

pub(super) fn busy_message(domain: &str, holder: Option<Holder>) -> String {
    format!("another rotation of {domain} is running: {}", who(holder))
}

pub(super) fn keystore_busy_message(p: &Prepared, ks: &Keystore, holder: Option<Holder>) -> String {
    format!(
        "another run holds the key store lock {} of {}: {} (a config with another state folder may rotate this key store)",
        ks.lock_path().display(),
        p.domain.name,
        who(holder)
    )
}

fn who(holder: Option<Holder>) -> String {
    holder.map_or("another process (the lock file does not name it)".to_string(), |h| {
        h.describe()
    })
}

pub(super) fn audit_message(e: &str) -> String {
    format!("{e}: the audit trail is part of the run; no key was touched")
}

/// The outcome of a ledger failure before any key was touched: TIMED_OUT when the
/// wait for the ledger ran into the deadline, ABORTED otherwise.
pub(super) fn before_keys(p: &Prepared) -> Outcome {
    if p.deadline.expired() {
        Outcome::TimedOut
    } else {
        Outcome::Aborted
    }
}

/// The key store of a key store domain, with the domain's access.
pub(super) fn keystore_of(p: &Prepared) -> Option<Keystore> {
    match &p.domain.backend {
        Backend::Keystore { keystore, custody, .. } => Some(
            Keystore::new(keystore, &p.domain.name)
                .with_access(p.domain.access.clone())
                .with_token(custody.clone()),
        ),
        Backend::Command { .. } => None,
    }
}

pub(super) fn blocked_message(domain: &str, row: &RunRow) -> String {
    format!(
        "domain is blocked by run {} ({}); after review: keyrotate resolve --domain {domain} --run {} --note \"...\"",
        row.run_id,
        row.reason.as_deref().unwrap_or("needs review"),
        row.run_id
    )
}

pub(super) fn stale_message(domain: &str, dead: &RunRow, diagnosis: &str) -> String {
    format!(
        "run {} (pid {} on {}, started {}) {} while {}: {diagnosis}; after review: keyrotate resolve --domain {domain} --run {} --note \"...\"",
        dead.run_id,
        dead.pid,
        dead.host,
        dead.started_at,
        ended_how(dead),
        dead.state,
        dead.run_id
    )
}

/// How a run that no longer holds its lock ended, as far as this host can tell: its
/// own processes are checked (a live one is never called dead, see `real.rs`); another
/// host's are not visible from here (a shared ledger).
pub(super) fn ended_how(dead: &RunRow) -> &'static str {
    if dead.host == hostname() {
        "died"
    } else {
        "died or lost its ledger lock (on another host, whose processes this host cannot see)"
    }
}

/// The step a dead run was in: its last hook step if it ran hooks, else its last event.
pub(super) fn last_step(events: &[(String, String, Option<String>)]) -> Option<&str> {
    events
        .iter()
        .rev()
        .find(|e| e.1.starts_with("hook."))
        .or(events.last())
        .map(|e| e.1.as_str())
}

/// What the backend shows about a run that died: did it commit?
pub(super) fn diagnose(p: &Prepared, dead: &RunRow, last_step: Option<&str>, ledger: Option<&Ledger>) -> String {
    p.backend().diagnose(dead, last_step, ledger, &p.run.host)
}

pub(super) fn alive_message(row: &RunRow, shared: bool) -> String {
    // One wording for both ways a live run loses its lock, so that nobody reading it
    // takes the run for dead (DESIGN 8: never call a live process dead).
    let cause = if shared {
        "its session to the shared ledger ended (server restart, pg_terminate_backend, a proxy) \
         or its lock file was deleted"
    } else {
        "its lock file was deleted or replaced while it ran (never delete lock files of a live run)"
    };
    format!(
        "another rotation is running: run {} lost its lock, still running (pid {} on {}, since {}): {cause}; nothing was changed",
        row.run_id, row.pid, row.host, row.started_at
    )
}

/// What a revocation on a domain blocked by `row` says (the plan line, the log line):
/// it goes ahead, the block stays.
pub(super) fn revoke_past_review(row: &RunRow) -> String {
    format!(
        "review: the domain is blocked by run {} ({}); a revocation goes ahead, the block stays until \
         keyrotate resolve --domain {} --run {} --note \"...\"",
        row.run_id,
        row.reason.as_deref().unwrap_or("needs review"),
        row.domain,
        row.run_id
    )
}
