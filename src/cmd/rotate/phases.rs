//! Phases 2 to 6 of DESIGN section 5 (and the audit check that ends admission) as one
//! sequence of functions over the run's context and an [`Effects`] interface. The live
//! driver (`real.rs`) acquires and writes; the dry driver (`dry.rs`) only probes and
//! collects the plan. A phase decides; a driver only reports what it found, so both
//! stop at the same phase with the same outcome and the same reason.

use super::*;

/// How a run that stops before its rotation is recorded by the live driver (the dry
/// driver records nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Record {
    /// No trace: nothing was touched (another pool, a refused folder, usage).
    Nothing,
    /// No ledger row could be written: the audit line is the run's only record.
    AuditOnly,
    /// A closed row with the outcome's state, and its audit line.
    Row,
    /// A closed `refused` row (BUSY) with its anchored audit line.
    Busy,
    /// The admission transaction wrote the row and the audit lines already.
    Done,
    /// The run's row is in flight: the closing write ends it.
    Close,
}

/// Where and why a run stops before its backend runs.
#[derive(Debug)]
pub(super) struct Stop {
    pub outcome: Outcome,
    pub reason: String,
    pub record: Record,
}

impl Stop {
    pub fn new(outcome: Outcome, reason: String, record: Record) -> Stop {
        Stop {
            outcome,
            reason,
            record,
        }
    }
}

/// What a lock acquisition (live) or probe (dry) found.
pub(super) enum Held {
    /// Ours (live), or free (dry).
    Free,
    /// Held by someone else, named if the lock says who.
    Busy(Option<Holder>),
}

/// What a phase needs from the world. Errors are the bare cause; the phase turns it
/// into the run's outcome and reason.
pub(super) trait Effects {
    /// Before the first lock: the live driver installs its signal and deadline guard.
    fn begin(&mut self, p: &Prepared) -> Result<(), String>;
    /// The state and lock folders: created (live) or checked where they exist (dry).
    fn folders(&mut self, p: &Prepared) -> Result<(), String>;
    /// The domain's state lock.
    fn state_lock(&mut self, p: &Prepared) -> Result<Held, String>;
    /// Opens the ledger (for writing, or read-only where it exists).
    fn open_ledger(&mut self, p: &Prepared) -> Result<(), String>;
    /// The shared ledger's lock on the domain (always free on an embedded ledger).
    fn ledger_lock(&mut self, p: &Prepared) -> Result<Held, String>;
    /// The key store's own lock.
    fn keystore_lock(&mut self, p: &Prepared, ks: &Keystore) -> Result<Held, String>;
    /// The ledger, once open (the dry driver may have none: it does not exist yet).
    fn ledger(&self) -> Option<&Ledger>;
    /// What the ledger holds about the domain.
    fn domain_record(&mut self, p: &Prepared) -> Result<DomainRecord, String>;
    /// Finishes (live) or plans (dry) the last commit's tidy-up; a note for the reason.
    fn repair(&mut self, p: &Prepared) -> Option<String>;
    /// Decides admission with `judge` over the domain's record and the time left,
    /// and records the decision (live: in one transaction; dry: in the plan).
    fn admit(
        &mut self,
        p: &Prepared,
        judge: &dyn Fn(&DomainRecord, Duration) -> Result<Admitted, Refusal>,
    ) -> Result<(), Stop>;
    /// The audit trail can take the run's lines.
    fn audit(&mut self, p: &Prepared) -> Result<(), String>;
}

/// Phases 2 to 6, in DESIGN order: `Ok(())` when the backend may run.
pub(super) fn admission<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    designation(p)?;
    p.domain.writable().map_err(|e| {
        Stop::new(
            Outcome::Usage,
            format!("{}: {e}", p.config.path.display()),
            Record::Nothing,
        )
    })?;
    fx.begin(p)
        .map_err(|e| Stop::new(Outcome::Aborted, e, Record::Nothing))?;
    folders(p, fx)?;
    state_lock(p, fx)?;
    ledger(p, fx)?;
    keystore_lock(p, fx)?;
    admit(p, fx)?;
    audit(p, fx)
}

/// 2. designation: only the designated pool rotates.
fn designation(p: &Prepared) -> Result<(), Stop> {
    if p.pool == p.domain.designated_pool {
        return Ok(());
    }
    Err(Stop::new(
        Outcome::NotDesignated,
        not_designated_message(p),
        Record::Nothing,
    ))
}

/// 3a. the state and lock folders are private.
fn folders<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    fx.folders(p)
        .map_err(|e| Stop::new(Outcome::Aborted, format!("{e}; nothing was changed"), Record::Nothing))
}

fn busy(reason: String) -> Stop {
    Stop::new(Outcome::Busy, reason, Record::Busy)
}

/// 3b. the domain's state lock.
fn state_lock<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    match fx.state_lock(p) {
        Ok(Held::Free) => Ok(()),
        Ok(Held::Busy(holder)) => Err(busy(busy_message(&p.domain.name, holder))),
        Err(e) => Err(Stop::new(
            Outcome::Aborted,
            format!("{e}; nothing was changed"),
            Record::AuditOnly,
        )),
    }
}

/// 3c. the ledger, and on a shared ledger its lock, which guards the pool's other hosts.
fn ledger<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    let failed = |e: String| Stop::new(before_keys(p), format!("{e}; no key was touched"), Record::AuditOnly);
    fx.open_ledger(p).map_err(failed)?;
    match fx.ledger_lock(p).map_err(failed)? {
        Held::Free => Ok(()),
        Held::Busy(holder) => Err(busy(busy_message(&p.domain.name, holder))),
    }
}

/// 3d. the key store's own lock, so that a config with another state folder can never
/// rotate this key store at the same time.
fn keystore_lock<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    let Some(ks) = keystore_of(p) else {
        return Ok(());
    };
    match fx.keystore_lock(p, &ks) {
        Ok(Held::Free) => Ok(()),
        Ok(Held::Busy(holder)) => Err(busy(keystore_busy_message(p, &ks, holder))),
        Err(e) => Err(Stop::new(
            Outcome::Aborted,
            format!("{e}; nothing was changed"),
            Record::Row,
        )),
    }
}

/// 4-6. repair, stale run, open review, due, budget.
fn admit<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    let rec = fx
        .domain_record(p)
        .map_err(|e| Stop::new(before_keys(p), format!("{e}; no key was touched"), Record::AuditOnly))?;
    // Before deciding anything: finish what a committed run left undone.
    let repaired = fx.repair(p);
    // The diagnosis reads the key store, so it is made before the admission.
    let stale = rec.in_flight.as_ref().map(|dead| {
        let events = fx
            .ledger()
            .and_then(|l| l.events(&dead.run_id).ok())
            .unwrap_or_default();
        let d = diagnose(p, dead, last_step(&events), fx.ledger());
        StaleFacts {
            diagnosis: match &repaired {
                Some(r) => format!("{d}; {r}"),
                None => d,
            },
            alive: crate::process::liveness(&p.run.host, &dead.host, &events),
        }
    });
    fx.admit(p, &|rec, remaining| judge(p, rec, remaining, stale.as_ref()))
}

/// The audit trail is part of the run: a run that cannot write it stops before any
/// key is touched, with its row saying why (DESIGN section 5).
fn audit<E: Effects>(p: &Prepared, fx: &mut E) -> Result<(), Stop> {
    fx.audit(p)
        .map_err(|e| Stop::new(Outcome::Aborted, audit_message(&e), Record::Close))
}
