//! Rotation backends: what one rotation does to the keys, once `rotate` has admitted
//! the run. The orchestration (lock, ledger, deadline, audit, exit codes) is the same
//! for every backend; a backend only sees a [`Step`] context through which it reports
//! progress and asks whether it may go on.

pub mod command;
pub mod keystore;
pub mod shared;
pub mod watcher;

use std::path::Path;
use std::time::Duration;

use crate::audit::{Audit, Event};
use crate::config::{Backend, DomainConfig};
use crate::guard::Guard;
use crate::ledger::{Ledger, NewRun, RunRow, RunState, Versions};
use crate::outcome::{Failure, Outcome};

pub use keystore::PreCommitUndo;

/// One rotation backend as `rotate` and `check` see it. Adding a backend is a module
/// implementing this, its config variant, and its line in [`for_domain`]; the phases
/// of `rotate` (and its dry run) do not change.
pub trait RotationBackend {
    /// DESIGN section 5, phase 6: the least time left at admission that a rotation
    /// can finish in. A floor, not an estimate: a run admitted with less would almost
    /// surely time out half-way, so it is better not started.
    fn budget(&self) -> Duration;
    /// How long after the deadline the watchdog abandons the run (zero: at once; a
    /// backend that enforces the deadline itself gets the watchdog as a backstop).
    fn watchdog_grace(&self) -> Duration;
    /// Phase 7 of a dry run: the same checks as [`RotationBackend::run`] makes before
    /// it changes anything (the same refusal, word for word), then the plan lines;
    /// read-only.
    fn plan(&self, ledger: Option<&Ledger>, plan: &mut Vec<String>) -> Result<Planned, Failure>;
    /// What this backend can tell about a run that died mid-rotation: did it commit?
    /// `this_host` is the host the diagnosis runs on.
    fn diagnose(&self, dead: &RunRow, last_step: Option<&str>, ledger: Option<&Ledger>, this_host: &str) -> String;
    /// Before admission, with the key store's lock held: the files the rotation would
    /// create, for the admission transaction to record as the run's `staging` event
    /// (one flushed write instead of two). `None`: nothing to record there; the
    /// backend records what it creates itself ([`Step::staging`]).
    fn planned_files(&self, _ledger: &Ledger) -> Option<Vec<String>> {
        None
    }
    /// What `check` reports: `(config key suffix, problem)`.
    fn check(&self) -> Vec<(&'static str, String)>;
    /// Phase 7: the rotation, reporting through `step`; `undo` is what the deadline
    /// watchdog takes back if it abandons the run before the commit.
    fn run(&self, step: Step<'_>, undo: PreCommitUndo) -> Result<Rotated, Failure>;
}

/// What a dry run's backend would do.
#[derive(Debug, Default)]
pub struct Planned {
    pub summary: String,
    pub versions: Versions,
}

/// The backend a domain's config names.
pub fn for_domain(domain: &DomainConfig, state_dir: &Path) -> Box<dyn RotationBackend> {
    match &domain.backend {
        Backend::Keystore { .. } => keystore_backend(domain, None).expect("matched as a key store"),
        Backend::Command { program, args } => Box::new(command::CommandBackend {
            program: program.clone(),
            args: args.clone(),
            state_dir: state_dir.to_path_buf(),
        }),
    }
}

/// A key store domain's backend (the shared store's or the local one), rotating, or
/// revoking `revoke`. `None` for a command domain.
fn keystore_backend(domain: &DomainConfig, revoke: Option<keystore::Revocation>) -> Option<Box<dyn RotationBackend>> {
    let Backend::Keystore {
        algorithm,
        keystore,
        activation,
        custody,
    } = &domain.backend
    else {
        return None;
    };
    let store = crate::keystore::Keystore::new(keystore, &domain.name).with_access(domain.access.clone());
    Some(match domain.shared() {
        Some(shared_store) => Box::new(shared::SharedBackend {
            keystore: store,
            algorithm: *algorithm,
            activation: *activation,
            retain: domain.retain,
            store: shared_store.clone(),
            revoke,
        }),
        None => Box::new(keystore::KeystoreBackend {
            keystore: store.with_token(custody.clone()),
            algorithm: *algorithm,
            activation: *activation,
            retain: domain.retain,
            revoke,
        }),
    })
}

/// The backend of a `keyrotate revoke` of `revocation` (DESIGN 11): the key store's,
/// whose rotation becomes the revocation's commit. `Err`: why the domain's backend
/// cannot revoke (a usage error).
pub fn for_revocation(
    domain: &DomainConfig,
    revocation: &keystore::Revocation,
) -> Result<Box<dyn RotationBackend>, String> {
    match &domain.backend {
        Backend::Keystore { .. } => {
            Ok(keystore_backend(domain, Some(revocation.clone())).expect("matched as a key store"))
        }
        Backend::Command { .. } => Err(format!(
            "domain {} uses the command backend: keyrotate holds none of its secrets, so it cannot revoke one; \
             rotate it (rotate --force) and revoke the old secret where the hook installed it",
            domain.name
        )),
    }
}

/// A finished rotation.
#[derive(Debug, Default)]
pub struct Rotated {
    pub from_version: Option<u64>,
    pub to_version: Option<u64>,
    pub from_fingerprint: Option<String>,
    pub to_fingerprint: Option<String>,
    /// What went wrong after the commit point: the rotation stands, the next run
    /// finishes the work.
    pub warnings: Vec<String>,
    pub summary: String,
}

/// What a backend may do with the run while it works.
pub struct Step<'a> {
    pub run: &'a NewRun,
    pub guard: &'a Guard,
    pub ledger: &'a mut Ledger,
    pub audit: &'a Audit,
    /// The files the admission transaction recorded as this run's `staging` event.
    pub staged_at_admission: Option<&'a [String]>,
}

impl Step<'_> {
    /// Records progress (`staged`, `committed`) in the ledger: a progress mark, made
    /// durable by the run's closing write.
    pub fn advance(&mut self, state: RunState, versions: Versions, detail: &str) -> Result<(), String> {
        let run_id = self.run.run_id.clone();
        self.ledger
            .write_progress(state.as_str(), |w| w.advance(&run_id, state, versions, detail))
    }

    /// Records, durably and before any of them exists, the files this run is about to
    /// stage (a `staging` event naming them): the proof that lets a later run remove
    /// them if this one never commits (DESIGN 4.4). Flushed, unlike the progress marks:
    /// a staged file that survives a power loss must not outlive its record, or it
    /// would have to go to a human.
    ///
    /// When the admission transaction (synchronous=FULL, flushed) recorded exactly
    /// these names, that record is the proof and no second write is made. Any other
    /// list (the store changed in between, which the key store lock should prevent)
    /// is recorded here, flushed, before any file is created: never an unrecorded one.
    pub fn staging(&mut self, files: &[String]) -> Result<(), String> {
        if self.staged_at_admission == Some(files) {
            return Ok(());
        }
        let run_id = self.run.run_id.clone();
        let list = files.join(" ");
        self.ledger
            .write("staging", |w| w.event(&run_id, "staging", Some(&list)))
    }

    /// Records a step event without changing the run's state.
    pub fn event(&mut self, phase: &str, detail: &str) -> Result<(), String> {
        let run_id = self.run.run_id.clone();
        self.ledger.write("event", |w| w.event(&run_id, phase, Some(detail)))
    }

    /// Fencing (DESIGN 8): before `what`, a step that changes something outside the
    /// database, confirm that this run still holds its lock. When it does not, another
    /// host may be running the domain already: stop, ABORTED when nothing was changed
    /// yet, NEEDS_REVIEW once the target (`changed`) may have been.
    pub fn confirm_lock(&self, what: &str, changed: bool) -> Result<(), Failure> {
        if !self.ledger.is_shared() {
            // The embedded ledger's lock is this process's own: it cannot be lost.
            return Ok(());
        }
        let checked = crate::failpoint::hit("ledger", "confirm")
            .map_err(|e| format!("ledger {}: {e}", self.ledger.label()))
            .and_then(|()| Ok(self.ledger.confirm_lock(&self.run.domain)?));
        checked.map_err(|e| {
            if changed {
                Failure::new(
                    Outcome::NeedsReview,
                    format!("lost its lock: {e}; stopped before {what}, but the target may already be changed: check it, then resolve"),
                )
            } else {
                Failure::new(
                    Outcome::Aborted,
                    format!("lost its lock: {e}; stopped before {what}, nothing was changed"),
                )
            }
        })
    }

    /// The commit happened: say so in the ledger and the audit trail. A ledger that
    /// cannot record it leaves the run's outcome uncertain to everyone else.
    pub fn committed(&mut self, r: &Rotated) -> Result<(), Failure> {
        let ledger = self.advance(RunState::Committed, (r.from_version, r.to_version), &r.summary);
        let audit = self.audit.emit(Event {
            reason: Some(r.summary.clone()),
            from_version: r.from_version,
            to_version: r.to_version,
            from_fingerprint: r.from_fingerprint.clone(),
            to_fingerprint: r.to_fingerprint.clone(),
            ..Event::of("rotation.committed", self.run)
        });
        if let Err(e) = ledger {
            return Err(Failure::new(
                Outcome::NeedsReview,
                format!("{}, but the ledger could not record the commit: {e}", r.summary),
            ));
        }
        if let Err(e) = audit {
            tracing::warn!("{e}");
        }
        Ok(())
    }
}
