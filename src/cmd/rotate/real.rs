//! The real run: phases 2 to 7 with the lock held, every decision recorded in the
//! ledger and the audit trail, the rotation guarded by signals and the deadline.

use super::*;

pub(super) struct Concluded {
    outcome: Outcome,
    reason: String,
    rotated: Option<Rotated>,
}

pub(super) fn real_run(p: &Prepared) -> Report {
    let mut live = Live::default();
    let c = match phases::admission(p, &mut live) {
        Err(s) => live.record(p, s),
        Ok(()) => live.rotate(p),
    };
    let r = c.rotated.unwrap_or_default();
    Report {
        from_version: r.from_version,
        to_version: r.to_version,
        warnings: r.warnings,
        ..Report::stopped(p, c.outcome, c.reason)
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

/// The live driver: what it holds while the run goes on (dropped, so released, when
/// the run ends).
#[derive(Default)]
struct Live {
    guard: Option<Guard>,
    /// The domain's locks, taken one step at a time as the phases reach them.
    locks: DomainLocks,
    ledger: Option<Ledger>,
    /// The files the admission transaction recorded as staging (see `Step::staging`).
    planned: Option<Vec<String>>,
    /// A revocation admitted on a domain blocked for review: what its outcome says
    /// about the block, which stays.
    still_blocked: Option<String>,
    /// Holds the deadline from the admission's first read of the key store (repair,
    /// diagnosis, plan: each may open a token that never answers) until the watchdog
    /// takes over; nothing is recorded before it is disarmed.
    backstop: Option<crate::guard::Backstop>,
}

fn holder_of(p: &Prepared) -> Holder {
    Holder {
        run_id: p.run.run_id.clone(),
        pid: p.run.pid,
        host: p.run.host.clone(),
        started_at: p.run.started_at.clone(),
    }
}

/// What a step of [`DomainLocks`] found, as the phases read it.
fn held(step: Result<(), lock::Busy>) -> Held {
    match step {
        Ok(()) => Held::Free,
        Err(busy) => Held::Busy(busy.holder),
    }
}

impl Effects for Live {
    fn begin(&mut self, p: &Prepared) -> Result<(), String> {
        self.guard = Some(Guard::install(p.deadline)?);
        Ok(())
    }

    fn folders(&mut self, p: &Prepared) -> Result<(), String> {
        fsutil::ensure_private_dir(&p.config.state_dir, "state folder")
            .and_then(|()| fsutil::ensure_private_dir(&p.config.lock_dir(), "lock folder"))
    }

    fn state_lock(&mut self, p: &Prepared) -> Result<Held, String> {
        let me = holder_of(p);
        Ok(held(self.locks.take_state(
            &p.config.lock_dir(),
            &p.domain.name,
            Some(&me),
        )?))
    }

    fn open_ledger(&mut self, p: &Prepared) -> Result<(), String> {
        self.ledger = Some(open_ledger(p)?);
        Ok(())
    }

    fn ledger_lock(&mut self, p: &Prepared) -> Result<Held, String> {
        let ledger = self.ledger.as_ref().expect("opened before");
        Ok(held(self.locks.take_shared(ledger, &p.domain.name)?))
    }

    fn keystore_lock(&mut self, p: &Prepared, ks: &Keystore) -> Result<Held, String> {
        // A key folder that cannot be prepared is left to the backend, which refuses
        // it with a recorded ABORTED.
        if ks.prepare().is_err() {
            return Ok(Held::Free);
        }
        Ok(held(self.locks.take_keystore(&ks.lock_path(), Some(&holder_of(p)))?))
    }

    fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    fn domain_record(&mut self, p: &Prepared) -> Result<DomainRecord, String> {
        if let Some(guard) = &self.guard {
            self.backstop = Some(guard.backstop(Duration::from_secs(1), admission_timed_out(p)));
        }
        self.ledger
            .as_ref()
            .expect("opened before")
            .domain_record(&p.domain.name)
            .map_err(String::from)
    }

    fn repair(&mut self, p: &Prepared) -> Option<String> {
        repair(p, self.ledger.as_ref().expect("opened before"))
    }

    fn admit(
        &mut self,
        p: &Prepared,
        judge: &dyn Fn(&DomainRecord, Duration) -> Result<Admitted, Refusal>,
    ) -> Result<(), Stop> {
        let guard = self.guard.as_ref().expect("installed before");
        let ledger = self.ledger.as_mut().expect("opened before");
        // The key store lock is held: the plan read now is the plan the backend makes.
        let planned = p.backend().planned_files(ledger);
        if let Some(b) = self.backstop.take() {
            b.disarm();
        }
        admit_and_record(p, ledger, guard, judge, planned.as_deref())?;
        self.planned = planned;
        if p.revoke.is_some() {
            // Read after the admission, which may have marked a dead run for review.
            if let Some(row) = ledger.domain_record(&p.domain.name).ok().and_then(|r| r.blocking) {
                let note = revoke_past_review(&row);
                tracing::warn!("{note}");
                self.still_blocked = Some(note);
            }
        }
        // Who runs this, so that the next run can tell "still running" from "died".
        if ledger.is_shared() || matches!(p.domain.backend, Backend::Command { .. }) {
            let run_id = p.run.run_id.clone();
            let _ = ledger.write("event", |w| {
                w.event(&run_id, "process", Some(&crate::process::record_me()))
            });
        }
        Ok(())
    }

    fn audit(&mut self, p: &Prepared) -> Result<(), String> {
        p.audit.preflight(true).and_then(|()| {
            p.audit.emit(Event {
                reason: p.run.requested_reason.clone(),
                ..Event::of("rotation.started", &p.run)
            })
        })
    }
}

impl Live {
    /// Records a run that stopped before its backend ran, as the phase said.
    fn record(&mut self, p: &Prepared, s: Stop) -> Concluded {
        if let Some(b) = self.backstop.take() {
            b.disarm();
        }
        match s.record {
            Record::Nothing | Record::Done => stop(s.outcome, s.reason),
            Record::AuditOnly => stop_unrecorded(p, s.outcome, s.reason),
            Record::Busy => refuse_busy_because(p, s.reason),
            Record::Row => match self.ledger.as_mut() {
                Some(ledger) => refuse_recorded(p, ledger, s.outcome, s.reason),
                None => stop_unrecorded(p, s.outcome, s.reason),
            },
            Record::Close => {
                if let Some(ledger) = self.ledger.as_mut() {
                    conclude(ledger, p, s.outcome, &s.reason, None);
                }
                stop(s.outcome, s.reason)
            }
        }
    }

    /// 7. rotation: the backend runs, guarded by signals and the deadline.
    fn rotate(&mut self, p: &Prepared) -> Concluded {
        let guard = self.guard.as_ref().expect("installed before");
        let ledger = self.ledger.as_mut().expect("opened before");
        tracing::info!(run_id = %p.run.run_id, domain = %p.domain.name, deadline = %p.run.deadline_at, "rotation started");
        let undo = PreCommitUndo::default();
        arm_watchdog(p, guard, undo.clone());
        let step = Step {
            run: &p.run,
            guard,
            ledger,
            audit: &p.audit,
            staged_at_admission: self.planned.as_deref(),
        };
        let result = p.backend().run(step, undo);
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
        let reason = match &self.still_blocked {
            Some(note) => format!("{reason}; {note}"),
            None => reason,
        };
        let (outcome, reason) = conclude(ledger, p, outcome, &reason, rotated.as_ref());
        Concluded {
            outcome,
            reason,
            rotated,
        }
    }
}

/// Ends a run before admission with a closed row (`aborted`) and its audit line.
fn refuse_recorded(p: &Prepared, ledger: &mut Ledger, outcome: Outcome, reason: String) -> Concluded {
    let res = ledger.write("refuse", |w| {
        if w.get(&p.run.run_id)?.is_some() {
            return Err(duplicate_run_id_message(&p.run.run_id));
        }
        w.insert(&p.run, Some((RunState::of(outcome), outcome, &reason)), None)
    });
    if let Err(e) = res {
        return stop_unrecorded(p, outcome, format!("{reason}; {e}"));
    }
    let _ = p.audit.emit(refused_event(p, outcome, &reason));
    stop(outcome, reason)
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

pub(super) fn open_ledger(p: &Prepared) -> Result<Ledger, String> {
    // Waiting for another writer is bounded by the deadline (and by 10 s: ledger
    // transactions are milliseconds long; longer means something is wrong).
    let busy = p.deadline.remaining().min(Duration::from_secs(10));
    Ok(Ledger::open(&p.config.ledger, busy)?)
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
            closed = Ledger::open(&p.config.ledger, Duration::from_secs(5))
                .map_err(String::from)
                .and_then(|mut fresh| close(&mut fresh));
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

fn refuse_busy_because(p: &Prepared, reason: String) -> Concluded {
    // Connected before the audit file is locked: other processes' lines never wait for
    // this connection.
    let ledger = open_ledger(p);
    // The refused row is this run's closing write: it anchors the run's audit line too.
    let ((), _) = p.audit.emit_anchored(refused_event(p, Outcome::Busy, &reason), |head| {
        let recorded = ledger.and_then(|mut ledger| {
            ledger.write("refuse", |w| {
                if w.get(&p.run.run_id)?.is_some() {
                    return Err(duplicate_run_id_message(&p.run.run_id));
                }
                w.insert(&p.run, Some((RunState::Refused, Outcome::Busy, &reason)), None)?;
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

/// Phases 4-6 under the locks: `judge` decides inside the transaction that writes the
/// decision, over the record re-read there. `Ok(())`: admitted, the row is in flight.
fn admit_and_record(
    p: &Prepared,
    ledger: &mut Ledger,
    guard: &Guard,
    judge: &dyn Fn(&DomainRecord, Duration) -> Result<Admitted, Refusal>,
    staging: Option<&[String]>,
) -> Result<(), Stop> {
    let failed = |e: String| Stop::new(before_keys(p), format!("{e}; no key was touched"), Record::AuditOnly);
    let decision = ledger
        .write("admit", |w| {
            if w.get(&p.run.run_id)?.is_some() {
                let usage = duplicate_run_id_message(&p.run.run_id);
                return Ok(Err(Stop::new(Outcome::Usage, usage, Record::AuditOnly)));
            }
            // Re-read inside the transaction: the decision must match what is written.
            let rec = w.domain_record(&p.domain.name)?;
            let refusal = match guard.checkpoint("admission") {
                Err(f) => Refusal {
                    outcome: f.outcome,
                    state: RunState::of(f.outcome),
                    reason: f.message,
                    stale: None,
                    plan: String::new(),
                },
                Ok(()) => match judge(&rec, guard.deadline().remaining()) {
                    Ok(past) => {
                        if let Some((dead, mark)) = &past {
                            w.mark_stale(dead, mark)?;
                        }
                        w.insert(&p.run, None, None)?;
                        // The files the rotation will create, recorded before any
                        // exists (the key-loss rule, DESIGN 4.4), in this flushed
                        // transaction rather than one of their own.
                        if let Some(files) = staging {
                            w.event(&p.run.run_id, "staging", Some(&files.join(" ")))?;
                        }
                        return Ok(Ok(Ok(past)));
                    }
                    Err(r) => r,
                },
            };
            if let Some((dead, mark)) = &refusal.stale {
                w.mark_stale(dead, mark)?;
            }
            w.insert(&p.run, Some((refusal.state, refusal.outcome, &refusal.reason)), None)?;
            Ok(Ok(Err(refusal)))
        })
        .map_err(failed)??;
    let refusal = match decision {
        Ok(past) => {
            if let Some((dead_id, mark)) = past {
                mark_audited(p, ledger, dead_id, mark);
            }
            return Ok(());
        }
        Err(refusal) => refusal,
    };
    if let Some((dead_id, mark)) = refusal.stale {
        mark_audited(p, ledger, dead_id, mark);
    }
    let _ = p.audit.emit(refused_event(p, refusal.outcome, &refusal.reason));
    Err(Stop::new(refusal.outcome, refusal.reason, Record::Done))
}

/// The audit line of a dead run's row marked `needs_review` by this run.
fn mark_audited(p: &Prepared, ledger: &Ledger, dead_id: String, mark: String) {
    let _ = p.audit.emit(Event {
        exit_code: None,
        reason: Some(mark),
        ..Event {
            run_id: dead_id.clone(),
            ..Event::of("rotation.needs_review", &p.run)
        }
    });
    audit_unrecorded_compromise(p, ledger, &dead_id);
}

/// A revocation that died between its commit and its audit lines: the trail must
/// still say that the key was compromised, by which run and why (DESIGN 11), whatever
/// runs next. Written for the dead run by the run that finds it, once: only when the
/// key store's manifest shows the commit landed and the trail lacks the line.
fn audit_unrecorded_compromise(p: &Prepared, ledger: &Ledger, dead_id: &str) {
    let Some(ks) = decide::keystore_of(p) else {
        return;
    };
    let recorded = ledger.events(dead_id).unwrap_or_default();
    let Some(rec) = recorded
        .iter()
        .filter(|(_, phase, _)| phase == "compromised")
        .find_map(|(_, _, detail)| crate::keystore::CompromiseRecord::parse(dead_id, detail.as_deref()?))
    else {
        return;
    };
    let Ok(bytes) = std::fs::read(ks.dir().join("keyring.json")) else {
        return;
    };
    let Ok(manifest) = crate::keystore::manifest::Manifest::parse(&bytes, &p.domain.name) else {
        return;
    };
    let Some(v) = manifest.get(rec.version).filter(|v| {
        v.state == crate::keystore::manifest::VersionState::Compromised && v.fingerprint == rec.fingerprint
    }) else {
        return;
    };
    if p.audit.has_recent(dead_id, "key.compromised") {
        return;
    }
    let _ = p.audit.emit(Event {
        reason: Some(format!(
            "v{} compromised: {} (its revoking run died after the commit, before this line; recorded by run {})",
            v.version,
            v.compromise_reason.as_deref().unwrap_or("no reason recorded"),
            p.run.run_id
        )),
        from_version: Some(v.version),
        from_fingerprint: Some(v.fingerprint.clone()),
        to_version: manifest.active().map(|a| a.version),
        to_fingerprint: manifest.active().map(|a| a.fingerprint.clone()),
        ..Event {
            run_id: dead_id.to_string(),
            ..Event::of("key.compromised", &p.run)
        }
    });
}

/// The admission backstop's end: TIMED_OUT before anything was recorded or changed.
fn admission_timed_out(p: &Prepared) -> impl FnOnce() + Send + 'static {
    let snapshot = p.clone();
    move || {
        let reason = format!(
            "deadline {} passed while the admission was still reading the ledger and the key store \
             (a token or folder that does not answer); nothing was recorded or changed",
            snapshot.run.deadline_at
        );
        let Concluded { outcome, reason, .. } = stop_unrecorded(&snapshot, Outcome::TimedOut, reason);
        print_report(&Report::stopped(&snapshot, outcome, reason), snapshot.output);
        crate::cmd::write_metrics(&snapshot.config);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(outcome.code()));
    }
}

/// At the deadline, if the run is still before its commit point, the watchdog records
/// TIMED_OUT and ends the process: the hung step is abandoned like a crash before the
/// commit, which leaves the old manifest authoritative.
pub(super) fn arm_watchdog(p: &Prepared, guard: &Guard, undo: PreCommitUndo) {
    let ledger_at = p.config.ledger.clone();
    let snapshot = p.clone();
    // A backend that enforces the deadline itself gets the watchdog as a backstop.
    let after = p.backend().watchdog_grace();
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
                let (outcome, reason) = unclosed(Outcome::TimedOut, &reason, &e.to_string());
                let _ = snapshot.audit.emit(refused_event(&snapshot, outcome, &reason));
                tracing::error!("{}: {reason}", outcome.name());
                (outcome, reason)
            }
        };
        print_report(&Report::stopped(&snapshot, outcome, reason), snapshot.output);
        crate::cmd::write_metrics(&snapshot.config);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(outcome.code()));
    });
}
