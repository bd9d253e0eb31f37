//! `keyrotate rotate`: one rotation attempt of one domain.
//!
//! The real run and the dry run walk the same decisions in DESIGN.md section 5's
//! order, and stop at the first that applies:
//!
//! 1. arguments and config ........ USAGE (2), nothing touched, no ledger row
//! 2. designation ................. NOT_DESIGNATED (6), nothing touched, no ledger row
//! 3. lock ........................ BUSY (5), a closed `refused` row
//! 4. stale run / open review ..... NEEDS_REVIEW (4), a closed `refused` row
//! 5. due ......................... NOT_DUE (7) unless --force
//! 6. deadline budget ............. TIMED_OUT (8)
//! 7. rotation (backend) .......... ROTATED (0), ABORTED (3), NEEDS_REVIEW (4), TIMED_OUT (8)
//!
//! A dry run takes no lock, opens the ledger read-only, writes nothing, and prints the
//! plan with the code the real run would return now.

use std::time::Duration;

use serde::Serialize;

use super::{clean_text, hostname, load_config, operator, print_json};
use crate::audit::{Audit, Event};
use crate::backend::command::{self, CommandRotation};
use crate::backend::keystore::KeystoreRotation;
use crate::backend::{Rotated, Step};
use crate::cli::{Cli, OutputFormat, RotateArgs};
use crate::config::{Backend, Config, DomainConfig};
use crate::deadline::Deadline;
use crate::guard::Guard;
use crate::keystore::{Inspection, Keystore};
use crate::ledger::{DomainRecord, Ledger, NewRun, RunRow};
use crate::lock::{self, Acquire, DomainLock, Holder};
use crate::outcome::{Failure, Outcome};
use crate::{fsutil, keystore::manifest::now_rfc3339};

/// What `rotate` prints on stdout (one line, or this object with `--output json`).
#[derive(Debug, Serialize)]
pub struct Report {
    pub run_id: String,
    pub domain: String,
    pub outcome: &'static str,
    pub exit_code: u8,
    pub from_version: Option<u64>,
    pub to_version: Option<u64>,
    pub reason: String,
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Everything phase 1 established.
struct Prepared {
    config: Config,
    domain: DomainConfig,
    deadline: Deadline,
    pool: String,
    run: NewRun,
    audit: Audit,
    output: OutputFormat,
    dry_run: bool,
}

pub fn run(cli: &Cli, args: &RotateArgs) -> Outcome {
    let p = match prepare(cli, args) {
        Ok(p) => p,
        Err(f) => {
            tracing::error!("{}", f.message);
            let report = Report {
                run_id: args.run_id.clone().unwrap_or_default(),
                domain: args.domain.clone(),
                outcome: f.outcome.name(),
                exit_code: f.outcome.code(),
                from_version: None,
                to_version: None,
                reason: f.message.clone(),
                dry_run: args.dry_run,
                plan: None,
                warnings: Vec::new(),
            };
            print_report(&report, args.output);
            return f.outcome;
        }
    };
    let report = if p.dry_run { dry_run(&p) } else { real_run(&p) };
    print_report(&report, p.output);
    Outcome::from_code(i64::from(report.exit_code)).unwrap_or(Outcome::Aborted)
}

fn print_report(r: &Report, output: OutputFormat) {
    match output {
        OutputFormat::Json => print_json(r),
        OutputFormat::Text => {
            if let Some(plan) = &r.plan {
                println!("plan for {} (dry run, nothing changed):", r.domain);
                for line in plan {
                    println!("  {line}");
                }
            }
            let run = if r.run_id.is_empty() {
                String::new()
            } else {
                format!(" [run {}]", r.run_id)
            };
            let would = if r.dry_run { "would exit " } else { "" };
            println!("{} {}: {}{run} ({would}{})", r.outcome, r.domain, r.reason, r.exit_code);
        }
    }
}

// ---- phase 1: arguments and config -------------------------------------------------

fn prepare(cli: &Cli, args: &RotateArgs) -> Result<Prepared, Failure> {
    let config = load_config(cli)?;
    let domain = config.domain(&args.domain).map_err(Failure::usage)?.clone();
    let deadline = Deadline::parse(&args.deadline, domain.max_deadline).map_err(Failure::usage)?;
    if let Backend::Command { program, .. } = &domain.backend {
        hook_exists(program).map_err(|e| {
            Failure::usage(format!(
                "{}: domains.{}.command: {e}",
                config.path.display(),
                domain.name
            ))
        })?;
    }
    let pool = match args
        .pool
        .clone()
        .or_else(|| std::env::var("KEYROTATE_POOL").ok().filter(|s| !s.is_empty()))
    {
        Some(p) => p,
        None => config.host_pool.clone().ok_or_else(|| {
            Failure::usage(
                "this host's pool is unknown: pass --pool, set KEYROTATE_POOL, or set [host].pool in the config",
            )
        })?,
    };
    let run_id = match &args.run_id {
        Some(id) => validate_run_id(id)?,
        None => generate_run_id(&domain.name),
    };
    let operator_name = clean_text("--operator", &operator(args.operator.as_deref()), 128)?;
    let requested_reason = args
        .reason
        .as_deref()
        .map(|r| clean_text("--reason", r, 1000))
        .transpose()?;
    let manual = args.operator.is_some() || std::io::IsTerminal::is_terminal(&std::io::stdin());
    let run = NewRun {
        run_id,
        domain: domain.name.clone(),
        trigger: if manual { "manual" } else { "scheduled" },
        operator: Some(operator_name),
        host: hostname(),
        pid: std::process::id(),
        pool: Some(pool.clone()),
        started_at: crate::ledger::now(),
        deadline_at: now_rfc3339(deadline.at()),
        forced: args.force,
        requested_reason,
    };
    Ok(Prepared {
        audit: Audit::new(&config.audit_file),
        config,
        domain,
        deadline,
        pool,
        run,
        output: args.output,
        dry_run: args.dry_run,
    })
}

/// A hook that is missing or not executable is a configuration error (USAGE); one
/// that is unsafe to run is refused later, like an unsafe folder (ABORTED).
fn hook_exists(program: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(program).map_err(|e| format!("program {}: {}", program.display(), fsutil::io_reason(&e)))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("program {} is not an executable file", program.display()));
    }
    Ok(())
}

fn validate_run_id(id: &str) -> Result<String, Failure> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "._:@+-%".contains(c));
    if !ok {
        return Err(Failure::usage(format!(
            "--run-id {:?} must be 1-128 characters of A-Z a-z 0-9 . _ : @ + - %",
            id.escape_debug().to_string()
        )));
    }
    Ok(id.to_string())
}

fn generate_run_id(domain: &str) -> String {
    let mut rnd = [0u8; 4];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut rnd);
    format!(
        "{domain}-{}-{}-{:02x}{:02x}{:02x}{:02x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        std::process::id(),
        rnd[0],
        rnd[1],
        rnd[2],
        rnd[3]
    )
}

// ---- the shared decisions ------------------------------------------------------------

/// Phases 4 to 6 as a pure decision over what the ledger holds.
enum Admission {
    Stale(RunRow),
    Blocked(RunRow),
    NotDue { last: RunRow, next_due: String },
    OverBudget { left: Duration, need: Duration },
    Go,
}

fn admit(p: &Prepared, rec: &DomainRecord, remaining: Duration) -> Admission {
    if let Some(dead) = &rec.in_flight {
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
fn budget(d: &DomainConfig) -> Duration {
    use crate::keystore::Algorithm::*;
    match &d.backend {
        Backend::Keystore { algorithm: Rsa4096, .. } => Duration::from_secs(5),
        Backend::Keystore { algorithm: Rsa3072, .. } => Duration::from_secs(2),
        Backend::Keystore { algorithm: Rsa2048, .. } => Duration::from_millis(800),
        Backend::Keystore { .. } => Duration::from_millis(200),
        Backend::Command { .. } => Duration::from_secs(1),
    }
}

fn blocked_message(domain: &str, row: &RunRow) -> String {
    format!(
        "domain is blocked by run {} ({}); after review: keyrotate resolve --domain {domain} --run {} --note \"...\"",
        row.run_id,
        row.reason.as_deref().unwrap_or("needs review"),
        row.run_id
    )
}

fn stale_message(domain: &str, dead: &RunRow, diagnosis: &str) -> String {
    format!(
        "run {} (pid {} on {}, started {}) died while {}: {diagnosis}; after review: keyrotate resolve --domain {domain} --run {} --note \"...\"",
        dead.run_id, dead.pid, dead.host, dead.started_at, dead.state, dead.run_id
    )
}

/// The step a dead run was in: its last hook step if it ran hooks, else its last event.
fn last_step(events: &[(String, String, Option<String>)]) -> Option<&str> {
    events
        .iter()
        .rev()
        .find(|e| e.1.starts_with("hook."))
        .or(events.last())
        .map(|e| e.1.as_str())
}

/// What the key store shows about a run that died: did it commit?
fn diagnose(p: &Prepared, dead: &RunRow, last_step: Option<&str>) -> String {
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
            match ks.inspect() {
                Err(d) => format!("{step}the key store is inconsistent: {d}"),
                Ok(i) => {
                    let mine: Vec<String> = i
                        .manifest
                        .versions
                        .iter()
                        .filter(|v| v.created_by_run == dead.run_id)
                        .map(|v| format!("v{}", v.version))
                        .collect();
                    let primary = i.manifest.primary.map_or("empty".into(), |n| format!("v{n}"));
                    if mine.is_empty() {
                        format!(
                            "{step}keyring primary is {primary}, not created by that run: it did not commit, the old key state stands{}",
                            leftovers_note(&i)
                        )
                    } else {
                        format!(
                            "{step}keyring primary is {primary}; {} created by that run: it did commit (its tidy-up may be unfinished){}",
                            mine.join(", "),
                            leftovers_note(&i)
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

fn leftovers_note(i: &Inspection) -> String {
    if i.leftovers.is_empty() {
        String::new()
    } else {
        format!(
            "; {} leftover file(s) ({}) will be removed by the next rotation",
            i.leftovers.len(),
            i.leftovers.join(", ")
        )
    }
}

// ---- the real run ---------------------------------------------------------------------

struct Concluded {
    outcome: Outcome,
    reason: String,
    rotated: Option<Rotated>,
}

fn real_run(p: &Prepared) -> Report {
    let c = real_run_inner(p);
    let r = c.rotated.unwrap_or_default();
    Report {
        run_id: p.run.run_id.clone(),
        domain: p.domain.name.clone(),
        outcome: c.outcome.name(),
        exit_code: c.outcome.code(),
        from_version: r.from_version,
        to_version: r.to_version,
        reason: c.reason,
        dry_run: false,
        plan: None,
        warnings: r.warnings,
    }
}

fn refused_event(p: &Prepared, outcome: Outcome, reason: &str) -> Event {
    Event {
        exit_code: Some(outcome.code()),
        outcome: Some(outcome.name()),
        reason: Some(reason.to_string()),
        ..Event::of(outcome.audit_event(), &p.run)
    }
}

fn stop(outcome: Outcome, reason: String) -> Concluded {
    if outcome != Outcome::Rotated {
        tracing::warn!("{}: {reason}", outcome.name());
    }
    Concluded {
        outcome,
        reason,
        rotated: None,
    }
}

fn real_run_inner(p: &Prepared) -> Concluded {
    // 2. designation
    if p.pool != p.domain.designated_pool {
        return stop(
            Outcome::NotDesignated,
            format!(
                "this host's pool {} is not the designated pool {}; nothing done",
                p.pool, p.domain.designated_pool
            ),
        );
    }

    // 3. lock
    let guard = match Guard::install(p.deadline) {
        Ok(g) => g,
        Err(e) => return stop(Outcome::Aborted, e),
    };
    if let Err(e) = fsutil::ensure_private_dir(&p.config.state_dir, "state folder")
        .and_then(|()| fsutil::ensure_private_dir(&p.config.lock_dir(), "lock folder"))
    {
        return stop(Outcome::Aborted, format!("{e}; nothing was changed"));
    }
    let lock_path = lock::lock_path(&p.config.lock_dir(), &p.domain.name);
    let mut held = match DomainLock::try_acquire(&lock_path) {
        Err(e) => return stop(Outcome::Aborted, format!("{e}; nothing was changed")),
        Ok(Acquire::Busy(holder)) => return refuse_busy(p, holder),
        Ok(Acquire::Acquired(l)) => l,
    };
    let holder = Holder {
        run_id: p.run.run_id.clone(),
        pid: p.run.pid,
        host: p.run.host.clone(),
        started_at: p.run.started_at.clone(),
    };
    if let Err(e) = held.write_holder(&holder) {
        tracing::warn!("{e}");
    }
    let mut ledger = match open_ledger(p) {
        Ok(l) => l,
        Err(e) => return stop(Outcome::Aborted, format!("{e}; no key was touched")),
    };
    // A shared ledger also guards the other hosts of the pool.
    match ledger.lock_domain(&p.domain.name) {
        Ok(true) => {}
        Ok(false) => {
            let holder = ledger
                .domain_record(&p.domain.name)
                .ok()
                .and_then(|r| r.in_flight)
                .map(|r| Holder {
                    run_id: r.run_id,
                    pid: r.pid as u32,
                    host: r.host,
                    started_at: r.started_at,
                });
            return refuse_busy(p, holder);
        }
        Err(e) => return stop(Outcome::Aborted, format!("{e}; no key was touched")),
    }

    // 4-6. stale run, open review, due, budget: decided and recorded in one transaction
    match admit_and_record(p, &mut ledger, &guard) {
        Err(f) => return stop(f.outcome, f.message),
        Ok(Some(refused)) => return refused,
        Ok(None) => {}
    }
    let _ = p.audit.emit(Event {
        reason: p.run.requested_reason.clone(),
        ..Event::of("rotation.started", &p.run)
    });
    tracing::info!(run_id = %p.run.run_id, domain = %p.domain.name, deadline = %p.run.deadline_at, "rotation started");
    arm_watchdog(p, &guard);

    // 7. rotation
    let result = {
        let step = Step {
            run: &p.run,
            guard: &guard,
            ledger: &mut ledger,
            audit: &p.audit,
        };
        match &p.domain.backend {
            Backend::Keystore {
                algorithm,
                keystore,
                activation,
            } => KeystoreRotation {
                keystore: Keystore::new(keystore, &p.domain.name),
                algorithm: *algorithm,
                activation: *activation,
                retain: p.domain.retain,
                step,
            }
            .run(),
            Backend::Command { program, args } => CommandRotation {
                program: program.clone(),
                args: args.clone(),
                state_dir: p.config.state_dir.clone(),
                step,
            }
            .run(),
        }
    };
    guard.stand_down();
    let (outcome, reason, rotated) = match result {
        Ok(r) if r.warnings.is_empty() => (Outcome::Rotated, r.summary.clone(), Some(r)),
        Ok(r) => (
            Outcome::Rotated,
            format!("{}; warning: {}", r.summary, r.warnings.join("; ")),
            Some(r),
        ),
        Err(f) => (f.outcome, f.message, None),
    };
    conclude(&mut ledger, p, outcome, &reason, rotated.as_ref());
    drop(held);
    Concluded {
        outcome,
        reason,
        rotated,
    }
}

fn open_ledger(p: &Prepared) -> Result<Ledger, String> {
    // Waiting for another writer is bounded by the deadline (and by 10 s: ledger
    // transactions are milliseconds long; longer means something is wrong).
    let busy = p.deadline.remaining().min(Duration::from_secs(10));
    Ledger::open(&p.config.ledger, busy)
}

/// Closes the run's row and writes its last audit line. Used by the main thread and by
/// the deadline watchdog.
fn conclude(ledger: &mut Ledger, p: &Prepared, outcome: Outcome, reason: &str, rotated: Option<&Rotated>) {
    let to_version = rotated.and_then(|r| r.to_version);
    let from_version = rotated.and_then(|r| r.from_version);
    let run_id = p.run.run_id.clone();
    if let Err(e) = ledger.write("close", |w| {
        w.close(&run_id, outcome, reason, (from_version, to_version))
    }) {
        tracing::error!("{e}; the run's row stays open and the next run will flag it for review");
    }
    let event = Event {
        exit_code: Some(outcome.code()),
        outcome: Some(outcome.name()),
        reason: Some(reason.to_string()),
        from_version,
        to_version,
        from_fingerprint: rotated.and_then(|r| r.from_fingerprint.clone()),
        to_fingerprint: rotated.and_then(|r| r.to_fingerprint.clone()),
        ..Event::of(outcome.audit_event(), &p.run)
    };
    if let Err(e) = p.audit.emit(event) {
        tracing::error!("{e}");
    }
    match outcome {
        Outcome::Rotated => tracing::info!("{}: {reason}", outcome.name()),
        _ => tracing::error!("{}: {reason}", outcome.name()),
    }
}

fn refuse_busy(p: &Prepared, holder: Option<Holder>) -> Concluded {
    let who = holder.map_or("another process (the lock file does not name it)".to_string(), |h| {
        h.describe()
    });
    let reason = format!("another rotation of {} is running: {who}", p.domain.name);
    match open_ledger(p) {
        Ok(mut ledger) => {
            let res = ledger.write("refuse", |w| {
                if w.get(&p.run.run_id)?.is_some() {
                    return Err(format!("--run-id {} is already in the ledger", p.run.run_id));
                }
                w.insert(&p.run, Some(("refused", Outcome::Busy, &reason)), None)
            });
            if let Err(e) = res {
                tracing::error!("{e}");
            }
        }
        Err(e) => tracing::error!("{e}"),
    }
    let _ = p.audit.emit(refused_event(p, Outcome::Busy, &reason));
    stop(Outcome::Busy, reason)
}

/// Phases 4-6 under the lock. `Ok(None)`: admitted, the row is in flight.
fn admit_and_record(p: &Prepared, ledger: &mut Ledger, guard: &Guard) -> Result<Option<Concluded>, Failure> {
    let rec = ledger
        .domain_record(&p.domain.name)
        .map_err(|e| Failure::new(Outcome::Aborted, e))?;
    // The diagnosis reads the key store, so it is made before the write transaction.
    let stale_diagnosis = rec.in_flight.as_ref().map(|dead| {
        let events = ledger.events(&dead.run_id).unwrap_or_default();
        diagnose(p, dead, last_step(&events))
    });
    let domain = p.domain.name.clone();
    let decision = ledger
        .write("admit", |w| {
            if w.get(&p.run.run_id)?.is_some() {
                return Ok(Err(Failure::usage(format!(
                    "--run-id {} is already in the ledger; a re-run is a new attempt with a new id",
                    p.run.run_id
                ))));
            }
            // Re-read inside the transaction: the decision must match what is written.
            let rec = w.domain_record(&domain)?;
            if let Err(f) = guard.checkpoint("admission") {
                w.insert(&p.run, Some((f.outcome.ledger_state(), f.outcome, &f.message)), None)?;
                return Ok(Ok(Some((f.outcome, f.message, None))));
            }
            let from = None;
            let verdict = match admit(p, &rec, guard.deadline().remaining()) {
                Admission::Go => {
                    w.insert(&p.run, None, from)?;
                    return Ok(Ok(None));
                }
                Admission::Stale(dead) => {
                    let diagnosis = stale_diagnosis.clone().unwrap_or_else(|| "the key store was not inspected".into());
                    let mark = format!("stale: the process died mid-rotation; {diagnosis}");
                    w.mark_stale(&dead.run_id, &mark)?;
                    let reason = stale_message(&domain, &dead, &diagnosis);
                    (Outcome::NeedsReview, "refused", reason, Some((dead.run_id, mark)))
                }
                Admission::Blocked(row) => (Outcome::NeedsReview, "refused", blocked_message(&domain, &row), None),
                Admission::NotDue { last, next_due } => (
                    Outcome::NotDue,
                    "refused",
                    format!(
                        "not due: run {} succeeded at {}; next due {next_due} (min_interval {}); use --force for an emergency rotation",
                        last.run_id,
                        last.ended_at.as_deref().unwrap_or(&last.started_at),
                        humantime::format_duration(p.domain.min_interval)
                    ),
                    None,
                ),
                Admission::OverBudget { left, need } => (
                    Outcome::TimedOut,
                    "timed_out",
                    format!(
                        "deadline budget: {} left, a {} rotation needs at least {}; nothing was changed",
                        humantime::format_duration(Duration::from_millis(left.as_millis() as u64)),
                        p.domain.backend.algorithm_name().unwrap_or("command"),
                        humantime::format_duration(need)
                    ),
                    None,
                ),
            };
            let (outcome, state, reason, stale) = verdict;
            w.insert(&p.run, Some((state, outcome, &reason)), from)?;
            Ok(Ok(Some((outcome, reason, stale))))
        })
        .map_err(|e| Failure::new(Outcome::Aborted, format!("{e}; no key was touched")))??;
    let Some((outcome, reason, stale)) = decision else {
        return Ok(None);
    };
    if let Some((dead_id, mark)) = stale {
        let _ = p.audit.emit(Event {
            exit_code: None,
            reason: Some(mark),
            ..Event {
                run_id: dead_id,
                ..Event::of("rotation.needs_review", &p.run)
            }
        });
    }
    let _ = p.audit.emit(refused_event(p, outcome, &reason));
    Ok(Some(stop(outcome, reason)))
}

/// At the deadline, if the run is still before its commit point, the watchdog records
/// TIMED_OUT and ends the process: the hung step is abandoned like a crash before the
/// commit, which leaves the old manifest authoritative.
fn arm_watchdog(p: &Prepared, guard: &Guard) {
    let ledger_at = p.config.ledger.clone();
    let snapshot = Prepared {
        config: p.config.clone(),
        domain: p.domain.clone(),
        deadline: p.deadline,
        pool: p.pool.clone(),
        run: p.run.clone(),
        audit: p.audit.clone(),
        output: p.output,
        dry_run: false,
    };
    // The command backend kills its own hung hooks at the deadline (SIGTERM, grace,
    // SIGKILL); its watchdog is only a backstop behind that.
    let after = match p.domain.backend {
        Backend::Keystore { .. } => Duration::ZERO,
        Backend::Command { .. } => command::KILL_GRACE + Duration::from_secs(3),
    };
    guard.spawn_watchdog(after, move |step| {
        let reason = format!(
            "deadline {} reached while '{step}' was still running: the step was abandoned before the commit point; \
             the old key state stands and what the step left is cleaned up by the next run",
            snapshot.run.deadline_at
        );
        match Ledger::open(&ledger_at, Duration::from_secs(2)) {
            Ok(mut ledger) => conclude(&mut ledger, &snapshot, Outcome::TimedOut, &reason, None),
            Err(e) => tracing::error!("{e}"),
        }
        print_report(
            &Report {
                run_id: snapshot.run.run_id.clone(),
                domain: snapshot.domain.name.clone(),
                outcome: Outcome::TimedOut.name(),
                exit_code: Outcome::TimedOut.code(),
                from_version: None,
                to_version: None,
                reason,
                dry_run: false,
                plan: None,
                warnings: Vec::new(),
            },
            snapshot.output,
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(Outcome::TimedOut.code()));
    });
}

// ---- the dry run ----------------------------------------------------------------------

fn dry_run(p: &Prepared) -> Report {
    let mut plan = vec![
        format!(
            "domain {} (backend {}{})",
            p.domain.name,
            p.domain.backend.name(),
            p.domain
                .backend
                .algorithm_name()
                .map(|a| format!(", {a}"))
                .unwrap_or_default()
        ),
        format!(
            "deadline {} ({} from now)",
            p.run.deadline_at,
            humantime::format_duration(Duration::from_secs(p.deadline.remaining().as_secs()))
        ),
    ];
    let (outcome, reason, versions) = dry_run_decide(p, &mut plan);
    Report {
        run_id: p.run.run_id.clone(),
        domain: p.domain.name.clone(),
        outcome: outcome.name(),
        exit_code: outcome.code(),
        from_version: versions.0,
        to_version: versions.1,
        reason,
        dry_run: true,
        plan: Some(plan),
        warnings: Vec::new(),
    }
}

type Versions = (Option<u64>, Option<u64>);

fn dry_run_decide(p: &Prepared, plan: &mut Vec<String>) -> (Outcome, String, Versions) {
    let none = (None, None);
    if p.pool != p.domain.designated_pool {
        plan.push(format!(
            "designation: this host's pool {} is not the designated pool {}",
            p.pool, p.domain.designated_pool
        ));
        return (
            Outcome::NotDesignated,
            "this host is not in the designated pool; the real run would do nothing".into(),
            none,
        );
    }
    plan.push(format!("designation: pool {} is the designated pool", p.pool));

    for (dir, what) in [
        (&p.config.state_dir, "state folder"),
        (&p.config.lock_dir(), "lock folder"),
    ] {
        if dir.exists() || std::fs::symlink_metadata(dir).is_ok() {
            if let Err(e) = fsutil::check_secure_dir(dir, what) {
                plan.push(format!("folders: {e}"));
                return (Outcome::Aborted, format!("{e}; the real run would refuse it"), none);
            }
        } else {
            plan.push(format!(
                "folders: {what} {} does not exist yet; the real run creates it (0700)",
                dir.display()
            ));
        }
    }
    let lock_path = lock::lock_path(&p.config.lock_dir(), &p.domain.name);
    match lock::probe(&lock_path) {
        Ok(Some(pid)) => {
            let who = lock::read_holder(&lock_path).map_or(format!("pid {pid}"), |h| h.describe());
            plan.push(format!("lock: held by {who}"));
            return (Outcome::Busy, format!("another rotation is running: {who}"), none);
        }
        Ok(None) => plan.push("lock: free".into()),
        Err(e) => plan.push(format!("lock: cannot tell whether it is held ({e})")),
    }

    let ledger = match Ledger::open_read_only(&p.config.ledger) {
        Ok(l) => l,
        Err(e) => {
            plan.push(format!("ledger: {e}"));
            return (
                Outcome::Aborted,
                format!("{e}; the real run would stop before touching any key"),
                none,
            );
        }
    };
    if let Some(l) = &ledger {
        match l.domain_locked_elsewhere(&p.domain.name) {
            Ok(true) => {
                let who = l
                    .domain_record(&p.domain.name)
                    .ok()
                    .and_then(|r| r.in_flight)
                    .map_or("a session on another host".to_string(), |r| {
                        format!("run {} (pid {} on {}, since {})", r.run_id, r.pid, r.host, r.started_at)
                    });
                plan.push(format!("lock: the shared ledger's lock is held by {who}"));
                return (Outcome::Busy, format!("another rotation is running: {who}"), none);
            }
            Ok(false) => {}
            Err(e) => return (Outcome::Aborted, e, none),
        }
    }
    let rec = match &ledger {
        None => {
            plan.push(match &p.config.ledger {
                crate::config::LedgerLocation::Sqlite(path) => {
                    format!("ledger: {} does not exist yet; the real run creates it", path.display())
                }
                crate::config::LedgerLocation::Postgres(_) => {
                    "ledger: the database has no keyrotate tables yet; the real run creates them".into()
                }
            });
            DomainRecord::default()
        }
        Some(l) => {
            if let Ok(Some(_)) = l.get(&p.run.run_id) {
                return (
                    Outcome::Usage,
                    format!("--run-id {} is already in the ledger", p.run.run_id),
                    none,
                );
            }
            match l.domain_record(&p.domain.name) {
                Ok(r) => r,
                Err(e) => return (Outcome::Aborted, e, none),
            }
        }
    };
    if let Some(last) = &rec.last_run {
        plan.push(format!(
            "last run: {} {} at {}",
            last.run_id,
            last.state,
            last.ended_at.as_deref().unwrap_or(&last.started_at)
        ));
    }
    match admit(p, &rec, p.deadline.remaining()) {
        Admission::Stale(dead) => {
            let events = ledger
                .as_ref()
                .and_then(|l| l.events(&dead.run_id).ok())
                .unwrap_or_default();
            let diagnosis = diagnose(p, &dead, last_step(&events));
            plan.push(format!(
                "ledger: run {} is still in flight but holds no lock: it died",
                dead.run_id
            ));
            return (
                Outcome::NeedsReview,
                stale_message(&p.domain.name, &dead, &diagnosis),
                none,
            );
        }
        Admission::Blocked(row) => {
            plan.push(format!("ledger: blocked by run {}", row.run_id));
            return (Outcome::NeedsReview, blocked_message(&p.domain.name, &row), none);
        }
        Admission::NotDue { last, next_due } => {
            plan.push(format!("due: no, next due {next_due}"));
            return (
                Outcome::NotDue,
                format!(
                    "not due: run {} succeeded recently; next due {next_due}; --force would override",
                    last.run_id
                ),
                none,
            );
        }
        Admission::OverBudget { left, need } => {
            return (
                Outcome::TimedOut,
                format!("deadline budget: {left:?} left, at least {need:?} needed"),
                none,
            );
        }
        Admission::Go => plan.push(if p.run.forced && rec.last_success.is_some() {
            "due: forced".into()
        } else {
            "due: yes".into()
        }),
    }

    match &p.domain.backend {
        Backend::Keystore {
            keystore,
            algorithm,
            activation,
        } => {
            let ks = Keystore::new(keystore, &p.domain.name);
            if let Err(e) = ks.check_folders() {
                plan.push(format!("key store: {e}"));
                return (Outcome::Aborted, format!("{e}; the real run would refuse it"), none);
            }
            let insp = match ks.inspect() {
                Ok(i) => i,
                Err(d) => {
                    plan.push(format!("key store: inconsistent: {d}"));
                    return (Outcome::NeedsReview, format!("key store is inconsistent: {d}"), none);
                }
            };
            if !insp.exists {
                plan.push(format!(
                    "key store: {} has no keyring yet (first rotation)",
                    ks.dir().display()
                ));
            }
            if !insp.leftovers.is_empty() {
                plan.push(format!(
                    "sweep: remove {} left by an interrupted run",
                    insp.leftovers.join(", ")
                ));
            }
            let rp = insp
                .manifest
                .plan(*algorithm, *activation, p.domain.retain, insp.next_version);
            for n in &rp.create {
                plan.push(
                    format!(
                        "create: v{} ({}, {:?}) as {}",
                        n.version,
                        n.algorithm,
                        n.state,
                        crate::keystore::manifest::version_file(n.version, n.algorithm)
                    )
                    .to_lowercase(),
                );
            }
            if let Some(v) = rp.promote {
                plan.push(format!("promote: v{v} pending -> active"));
            }
            for v in &rp.retire {
                plan.push(format!("retire: v{v}"));
            }
            for v in &rp.destroy {
                plan.push(format!("destroy: v{v} (beyond retain = {})", p.domain.retain));
            }
            plan.push("commit: replace keyring.json atomically; update current symlink and jwks.json".into());
            let v = |n: Option<u64>| n.map_or("none".into(), |n| format!("v{n}"));
            (
                Outcome::Rotated,
                format!(
                    "would rotate: active {} -> {}",
                    v(rp.from_version),
                    v(Some(rp.to_version))
                ),
                (rp.from_version, Some(rp.to_version)),
            )
        }
        Backend::Command { program, args } => {
            if let Err(e) = crate::cmd::check_program(program) {
                plan.push(format!("hook: {e}"));
                return (
                    Outcome::Aborted,
                    format!("{e}; the real run would refuse to run it"),
                    none,
                );
            }
            for step in command::STEPS {
                plan.push(format!(
                    "run: KEYROTATE_STEP={step} {}",
                    command::describe(program, args)
                ));
            }
            plan.push("commit point: the 'set' step; a failure from there on blocks the domain".into());
            (Outcome::Rotated, "would run the hook's four steps".into(), none)
        }
    }
}
