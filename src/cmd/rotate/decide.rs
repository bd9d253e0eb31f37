//! Phases 4 to 6 of a rotation as pure decisions over what the ledger holds (shared by
//! the real run and the dry run), and the messages and diagnoses they produce.

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
}

pub(super) fn admit(p: &Prepared, rec: &DomainRecord, remaining: Duration) -> Admission {
    if let Some(dead) = &rec.in_flight {
        if crate::cmd::run_process_alive(dead) {
            return Admission::Alive(dead.clone());
        }
        return Admission::Stale(dead.clone());
    }
    if let Some(blocking) = &rec.blocking {
        return Admission::Blocked(blocking.clone());
    }
    if let Some(next_due) = next_due(rec.last_success.as_ref(), p.domain.min_interval) {
        if !p.run.forced && next_due > chrono::Utc::now() {
            return Admission::NotDue {
                last: rec.last_success.clone().expect("a due time comes from a success"),
                next_due: now_rfc3339(next_due),
            };
        }
    }
    let need = budget(&p.domain);
    if remaining < need {
        return Admission::OverBudget { left: remaining, need };
    }
    Admission::Go
}

/// When a domain is next due, from its last success.
pub(crate) fn next_due(last_success: Option<&RunRow>, min_interval: Duration) -> Option<chrono::DateTime<chrono::Utc>> {
    let last = last_success?;
    let at = last.ended_at.as_deref().unwrap_or(&last.started_at);
    let at = chrono::DateTime::parse_from_rfc3339(at)
        .ok()?
        .with_timezone(&chrono::Utc);
    Some(at + chrono::Duration::from_std(min_interval).unwrap_or(chrono::Duration::MAX))
}

/// The least time left at admission that a rotation of this domain can finish in.
/// A floor, not an estimate: a run admitted with less would almost surely time out
/// half-way, so it is better not started.
pub(super) fn budget(d: &DomainConfig) -> Duration {
    use crate::keystore::Algorithm::*;
    match &d.backend {
        Backend::Keystore { algorithm: Rsa4096, .. } => Duration::from_secs(5),
        Backend::Keystore { algorithm: Rsa3072, .. } => Duration::from_secs(2),
        Backend::Keystore { algorithm: Rsa2048, .. } => Duration::from_millis(800),
        Backend::Keystore { .. } => Duration::from_millis(200),
        Backend::Command { .. } => Duration::from_secs(1),
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

/// What the key store shows about a run that died: did it commit?
pub(super) fn diagnose(p: &Prepared, dead: &RunRow, last_step: Option<&str>, ledger: Option<&Ledger>) -> String {
    let step = last_step
        .map(|s| format!("its last recorded step was '{s}'; "))
        .unwrap_or_default();
    match &p.domain.backend {
        // With a shared ledger the dead run may have been on another host, whose key
        // store this host cannot see.
        Backend::Keystore { .. } if dead.host != p.run.host => {
            format!(
                "{step}it ran on host {}: inspect the key store there to see whether it committed",
                dead.host
            )
        }
        Backend::Keystore { keystore, .. } => {
            let ks = Keystore::new(keystore, &p.domain.name);
            match crate::backend::keystore::examine(&ks, ledger, &p.domain.name) {
                Err(d) => format!("{step}the key store is inconsistent: {d}"),
                Ok((i, verdict)) => {
                    let mine: Vec<String> = i
                        .manifest
                        .created_by(&dead.run_id)
                        .map(|v| format!("v{}", v.version))
                        .collect();
                    let primary = i.manifest.primary.map_or("empty".into(), |n| format!("v{n}"));
                    if mine.is_empty() {
                        format!(
                            "{step}keyring primary is {primary}, not created by that run: it did not commit, the old key state stands{}",
                            leftovers_note(&i, &verdict)
                        )
                    } else {
                        format!(
                            "{step}keyring primary is {primary}; {} created by that run: it did commit{}",
                            mine.join(", "),
                            leftovers_note(&i, &verdict)
                        )
                    }
                }
            }
        }
        Backend::Command { .. } => match last_step.and_then(|s| s.strip_prefix("hook.")) {
            Some(hook) => {
                let (name, phase) = hook.split_once('.').unwrap_or((hook, ""));
                let when = if phase == "start" { "was running" } else { "had ended" };
                let target = if name == "create" && phase == "start" {
                    "the target was not changed yet"
                } else {
                    "the target may hold a half-rotated secret: check it"
                };
                format!("the hook step '{name}' {when} when it died; {target}")
            }
            None => format!("{step}no hook step had started: the target was not changed"),
        },
    }
}

/// What the diagnosis adds about files the manifest does not list.
pub(super) fn leftovers_note(i: &Inspection, verdict: &crate::keystore::Verdict) -> String {
    let mut note = String::new();
    if !i.unlisted.is_empty() {
        note.push_str(&format!(
            "; file(s) not in keyring.json: {} (the first rotation after review removes those a run recorded as staged and never committed, and reports any other)",
            i.unlisted.join(", ")
        ));
    }
    if let Some(m) = &verdict.mismatch {
        note.push_str(&format!("; {m}"));
    }
    note
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
