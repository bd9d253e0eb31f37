//! The real run: phases 2 to 7 with the lock held, every decision recorded in the
//! ledger and the audit trail, the rotation guarded by signals and the deadline.

use super::*;

pub(super) struct Concluded {
    outcome: Outcome,
    reason: String,
    rotated: Option<Rotated>,
}

pub(super) fn real_run(p: &Prepared) -> Report {
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

pub(super) fn refused_event(p: &Prepared, outcome: Outcome, reason: &str) -> Event {
    Event {
        exit_code: Some(outcome.code()),
        outcome: Some(outcome.name()),
        reason: Some(reason.to_string()),
        ..Event::of(outcome.audit_event(), &p.run)
    }
}

/// Ends a run that has no ledger row (the ledger or the lock file failed it): the
/// audit line is then its only record. A usage error touched nothing and records
/// nothing.
fn stop_unrecorded(p: &Prepared, outcome: Outcome, reason: String) -> Concluded {
    if outcome != Outcome::Usage {
        let _ = p
            .audit
            .emit(refused_event(p, outcome, &format!("{reason} (no ledger row)")));
    }
    stop(outcome, reason)
}

pub(super) fn stop(outcome: Outcome, reason: String) -> Concluded {
    if outcome != Outcome::Rotated {
        tracing::warn!("{}: {reason}", outcome.name());
    }
    Concluded {
        outcome,
        reason,
        rotated: None,
    }
}

pub(super) fn real_run_inner(p: &Prepared) -> Concluded {
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
        Err(e) => return stop_unrecorded(p, Outcome::Aborted, format!("{e}; nothing was changed")),
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
        Err(e) => return stop_unrecorded(p, before_keys(p), format!("{e}; no key was touched")),
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
        Err(e) => return stop_unrecorded(p, before_keys(p), format!("{e}; no key was touched")),
    }

    // The key store's own lock, so that a config with another state folder can never
    // rotate this key store at the same time. A key folder that cannot be prepared is
    // left to the backend, which refuses it with a recorded ABORTED.
    let _keystore_lock = match keystore_of(p) {
        Some(ks) if ks.prepare().is_ok() => match DomainLock::try_acquire(&ks.lock_path()) {
            Err(e) => return refuse_recorded(p, &mut ledger, Outcome::Aborted, format!("{e}; nothing was changed")),
            Ok(Acquire::Busy(holder)) => return refuse_busy_keystore(p, &ks, holder),
            Ok(Acquire::Acquired(mut l)) => {
                if let Err(e) = l.write_holder(&holder) {
                    tracing::warn!("{e}");
                }
                Some(l)
            }
        },
        _ => None,
    };
    // 4-6. stale run, open review, due, budget: decided and recorded in one transaction
    // (after finishing what a committed run left undone)
    match admit_and_record(p, &mut ledger, &guard) {
        Err(f) => return stop_unrecorded(p, f.outcome, f.message),
        Ok(Some(refused)) => return refused,
        Ok(None) => {}
    }
    // Who runs this, so that the next run can tell "still running" from "died".
    if ledger.is_shared() || matches!(p.domain.backend, Backend::Command { .. }) {
        let run_id = p.run.run_id.clone();
        let _ = ledger.write("event", |w| {
            w.event(&run_id, "process", Some(&crate::process::record_me()))
        });
    }
    // The audit trail is part of the run: a run that cannot write it stops here, before
    // any key is touched, with its row saying why (DESIGN section 5).
    let audited = p.audit.preflight(true).and_then(|()| {
        p.audit.emit(Event {
            reason: p.run.requested_reason.clone(),
            ..Event::of("rotation.started", &p.run)
        })
    });
    if let Err(e) = audited {
        let reason = format!("{e}: the audit trail is part of the run; no key was touched");
        conclude(&mut ledger, p, Outcome::Aborted, &reason, None);
        drop(held);
        return stop(Outcome::Aborted, reason);
    }
    tracing::info!(run_id = %p.run.run_id, domain = %p.domain.name, deadline = %p.run.deadline_at, "rotation started");
    let undo = PreCommitUndo::default();
    arm_watchdog(p, &guard, undo.clone());

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
                keystore: Keystore::new(keystore, &p.domain.name).with_access(p.domain.access.clone()),
                algorithm: *algorithm,
                activation: *activation,
                retain: p.domain.retain,
                step,
                undo,
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
    let (outcome, reason) = conclude(&mut ledger, p, outcome, &reason, rotated.as_ref());
    drop(held);
    Concluded {
        outcome,
        reason,
        rotated,
    }
}

/// Ends a run before admission with a closed row (`aborted`) and its audit line.
fn refuse_recorded(p: &Prepared, ledger: &mut Ledger, outcome: Outcome, reason: String) -> Concluded {
    let res = ledger.write("refuse", |w| {
        if w.get(&p.run.run_id)?.is_some() {
            return Err(format!("--run-id {} is already in the ledger", p.run.run_id));
        }
        w.insert(&p.run, Some((outcome.ledger_state(), outcome, &reason)), None)
    });
    if let Err(e) = res {
        return stop_unrecorded(p, outcome, format!("{reason}; {e}"));
    }
    let _ = p.audit.emit(refused_event(p, outcome, &reason));
    stop(outcome, reason)
}

fn keystore_of(p: &Prepared) -> Option<Keystore> {
    match &p.domain.backend {
        Backend::Keystore { keystore, .. } => {
            Some(Keystore::new(keystore, &p.domain.name).with_access(p.domain.access.clone()))
        }
        Backend::Command { .. } => None,
    }
}

/// DESIGN 5, repair after a crash past the commit: under the locks, before any
/// decision, finish the tidy-up the manifest says is due (`current.*`, `jwks.json`,
/// destroyed versions' files), but only on a store nothing contradicts: with a
/// mismatch or unlisted files the manifest may be an old copy, and "repairing" from it
/// would roll the store back. Returns what it did, for the run's reason.
fn repair(p: &Prepared, ledger: &Ledger) -> Option<String> {
    let ks = keystore_of(p)?;
    let (insp, verdict) = crate::backend::keystore::examine(&ks, Some(ledger), &p.domain.name).ok()?;
    if !verdict.clean() || !insp.exists {
        return None;
    }
    match ks.repair(&insp) {
        Ok(done) if done.is_empty() => None,
        Ok(done) => {
            let note = format!("finished the last commit's tidy-up: {}", done.join(", "));
            tracing::info!("{note}");
            Some(note)
        }
        Err(e) => {
            let note = format!(
                "could not finish the last commit's tidy-up: {}",
                crate::fsutil::io_reason(&e)
            );
            tracing::warn!("{note}");
            Some(note)
        }
    }
}

/// The outcome of a ledger failure before any key was touched: TIMED_OUT when the
/// wait for the ledger ran into the deadline, ABORTED otherwise.
fn before_keys(p: &Prepared) -> Outcome {
    if p.deadline.expired() {
        Outcome::TimedOut
    } else {
        Outcome::Aborted
    }
}

pub(super) fn open_ledger(p: &Prepared) -> Result<Ledger, String> {
    // Waiting for another writer is bounded by the deadline (and by 10 s: ledger
    // transactions are milliseconds long; longer means something is wrong).
    let busy = p.deadline.remaining().min(Duration::from_secs(10));
    Ledger::open(&p.config.ledger, busy)
}

/// Closes the run's row and writes its last audit line. Used by the main thread and by
/// the deadline watchdog. Returns the outcome the run must exit with: when the closing
/// write fails the row stays in flight, the next run will find it and block the domain,
/// so the run says so now (NEEDS_REVIEW) instead of an exit code nobody will see again.
pub(super) fn conclude(
    ledger: &mut Ledger,
    p: &Prepared,
    outcome: Outcome,
    reason: &str,
    rotated: Option<&Rotated>,
) -> (Outcome, String) {
    let to_version = rotated.and_then(|r| r.to_version);
    let from_version = rotated.and_then(|r| r.from_version);
    let run_id = p.run.run_id.clone();
    let event = |outcome: Outcome, reason: &str| Event {
        exit_code: Some(outcome.code()),
        outcome: Some(outcome.name()),
        reason: Some(reason.to_string()),
        from_version,
        to_version,
        from_fingerprint: rotated.and_then(|r| r.from_fingerprint.clone()),
        to_fingerprint: rotated.and_then(|r| r.to_fingerprint.clone()),
        ..Event::of(outcome.audit_event(), &p.run)
    };
    // The closing transaction also records the chain head that this run's last audit
    // line becomes (DESIGN section 12); the line is appended right after it commits.
    // If it fails, no anchor was recorded and the line says what the run now is.
    let ((outcome, reason), audited) = p.audit.emit_anchored(event(outcome, reason), |head| {
        let close = |ledger: &mut Ledger| {
            ledger.write("close", |w| {
                w.close(&run_id, outcome, reason, (from_version, to_version))?;
                match &head {
                    Some(head) => w.anchor(&run_id, head),
                    None => Ok(()),
                }
            })
        };
        let mut closed = close(ledger);
        if closed.is_err() && ledger.is_shared() {
            // The session that held the lock may be gone (that may be why the run
            // ends): closing our own row needs no lock, so a new session records the
            // truth.
            closed = Ledger::open(&p.config.ledger, Duration::from_secs(5)).and_then(|mut fresh| close(&mut fresh));
        }
        match closed {
            Ok(()) => ((outcome, reason.to_string()), None),
            Err(e) => {
                let (o, r) = unclosed(outcome, reason, &e);
                let line = event(o, &r);
                ((o, r), Some(line))
            }
        }
    });
    let reason = reason.as_str();
    if let Err(e) = audited {
        tracing::error!("{e}");
    }
    match outcome {
        Outcome::Rotated => tracing::info!("{}: {reason}", outcome.name()),
        _ => tracing::error!("{}: {reason}", outcome.name()),
    }
    (outcome, reason.to_string())
}

/// The outcome and reason of a run whose row could not be closed (`e`): it stays in
/// flight, which the next run on any host reads as a run that died, and blocks on.
fn unclosed(outcome: Outcome, reason: &str, e: &str) -> (Outcome, String) {
    (
        Outcome::NeedsReview,
        format!(
            "{reason}; but the ledger could not record this ({e}): the run's row stays in flight, so the domain \
             is blocked until `keyrotate resolve` (the run itself ended {})",
            outcome.name()
        ),
    )
}

fn refuse_busy_keystore(p: &Prepared, ks: &Keystore, holder: Option<Holder>) -> Concluded {
    let who = holder.map_or("another process (the lock file does not name it)".to_string(), |h| {
        h.describe()
    });
    let reason = format!(
        "another run holds the key store lock {} of {}: {who} (a config with another state folder may rotate this key store)",
        ks.lock_path().display(),
        p.domain.name
    );
    refuse_busy_because(p, reason)
}

pub(super) fn refuse_busy(p: &Prepared, holder: Option<Holder>) -> Concluded {
    let who = holder.map_or("another process (the lock file does not name it)".to_string(), |h| {
        h.describe()
    });
    refuse_busy_because(p, format!("another rotation of {} is running: {who}", p.domain.name))
}

fn refuse_busy_because(p: &Prepared, reason: String) -> Concluded {
    // Connected before the audit file is locked: other processes' lines never wait for
    // this connection.
    let ledger = open_ledger(p);
    // The refused row is this run's closing write: it anchors the run's audit line too.
    let ((), _) = p.audit.emit_anchored(refused_event(p, Outcome::Busy, &reason), |head| {
        let recorded = ledger.and_then(|mut ledger| {
            ledger.write("refuse", |w| {
                if w.get(&p.run.run_id)?.is_some() {
                    return Err(format!("--run-id {} is already in the ledger", p.run.run_id));
                }
                w.insert(&p.run, Some(("refused", Outcome::Busy, &reason)), None)?;
                match head {
                    Some(head) => w.anchor(&p.run.run_id, head),
                    None => Ok(()),
                }
            })
        });
        match recorded {
            Ok(()) => ((), None),
            // Without its row (the database at its connection limit, say) the audit
            // line is the run's only record: it must say so.
            Err(e) => {
                tracing::error!("{e}");
                let line = refused_event(p, Outcome::Busy, &format!("{reason} (no ledger row: {e})"));
                ((), Some(line))
            }
        }
    });
    stop(Outcome::Busy, reason)
}

/// Phases 4-6 under the lock. `Ok(None)`: admitted, the row is in flight.
pub(super) fn admit_and_record(p: &Prepared, ledger: &mut Ledger, guard: &Guard) -> Result<Option<Concluded>, Failure> {
    let rec = ledger
        .domain_record(&p.domain.name)
        .map_err(|e| Failure::new(before_keys(p), format!("{e}; no key was touched")))?;
    // Before deciding anything: finish what a committed run left undone.
    let repaired = repair(p, ledger);
    // The diagnosis reads the key store, so it is made before the write transaction.
    let stale_events = rec
        .in_flight
        .as_ref()
        .map(|dead| ledger.events(&dead.run_id).unwrap_or_default());
    let stale_diagnosis = rec.in_flight.as_ref().zip(stale_events.as_ref()).map(|(dead, events)| {
        let d = diagnose(p, dead, last_step(events), Some(&*ledger));
        match &repaired {
            Some(r) => format!("{d}; {r}"),
            None => d,
        }
    });
    // A live process is never called dead: a run that lost its PostgreSQL lock may
    // still run here, and a dead run's hook may outlive it.
    let still_running = rec
        .in_flight
        .as_ref()
        .zip(stale_events.as_ref())
        .and_then(|(dead, events)| crate::process::liveness(&p.run.host, &dead.host, events));
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
                Admission::Stale(dead) if matches!(still_running, Some(crate::process::Alive::Run(_))) => {
                    let alive = still_running.clone().expect("matched above");
                    let reason = format!(
                        "another rotation of {domain} is running: {}; it stops at its next step: wait for it",
                        alive.describe(&dead.run_id)
                    );
                    (Outcome::Busy, "refused", reason, None)
                }
                Admission::Stale(dead) => {
                    let mut diagnosis =
                        stale_diagnosis.clone().unwrap_or_else(|| "the key store was not inspected".into());
                    if let Some(alive) = &still_running {
                        diagnosis = format!("{diagnosis}; {}", alive.describe(&dead.run_id));
                    }
                    let mark = format!("stale: the process {} mid-rotation; {diagnosis}", ended_how(&dead));
                    w.mark_stale(&dead.run_id, &mark)?;
                    let reason = stale_message(&domain, &dead, &diagnosis);
                    (Outcome::NeedsReview, "refused", reason, Some((dead.run_id, mark)))
                }
                Admission::Alive(row) => (Outcome::Busy, "refused", alive_message(&row, !matches!(p.config.ledger, crate::config::LedgerLocation::Sqlite(_))), None),
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
        .map_err(|e| Failure::new(before_keys(p), format!("{e}; no key was touched")))??;
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
pub(super) fn arm_watchdog(p: &Prepared, guard: &Guard, undo: PreCommitUndo) {
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
        Backend::Command { .. } => command::KILL_GRACE + Duration::from_secs(5),
    };
    guard.spawn_watchdog(after, move |step| {
        // Take back what the abandoned run staged and published, as a run ending
        // before its commit by itself would.
        let undone = undo
            .undo()
            .unwrap_or_else(|| "what the step left is cleaned up by the next run".into());
        let reason = format!(
            "deadline {} reached while '{step}' was still running: the step was abandoned before the commit point; \
             the old key state stands; {undone}",
            snapshot.run.deadline_at
        );
        let (outcome, reason) = match Ledger::open(&ledger_at, Duration::from_secs(2)) {
            Ok(mut ledger) => conclude(&mut ledger, &snapshot, Outcome::TimedOut, &reason, None),
            Err(e) => {
                let (outcome, reason) = unclosed(Outcome::TimedOut, &reason, &e);
                let _ = snapshot.audit.emit(refused_event(&snapshot, outcome, &reason));
                tracing::error!("{}: {reason}", outcome.name());
                (outcome, reason)
            }
        };
        print_report(
            &Report {
                run_id: snapshot.run.run_id.clone(),
                domain: snapshot.domain.name.clone(),
                outcome: outcome.name(),
                exit_code: outcome.code(),
                from_version: None,
                to_version: None,
                reason,
                dry_run: false,
                plan: None,
                warnings: Vec::new(),
            },
            snapshot.output,
        );
        crate::cmd::write_metrics(&snapshot.config);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(outcome.code()));
    });
}
