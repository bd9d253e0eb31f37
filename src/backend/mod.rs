//! Rotation backends: what one rotation does to the keys, once `rotate` has admitted
//! the run. The orchestration (lock, ledger, deadline, audit, exit codes) is the same
//! for every backend; a backend only sees a [`Step`] context through which it reports
//! progress and asks whether it may go on.

pub mod command;
pub mod keystore;
pub mod watcher;

use crate::audit::{Audit, Event};
use crate::guard::Guard;
use crate::ledger::{Ledger, NewRun, Versions};
use crate::outcome::{Failure, Outcome};

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
}

impl Step<'_> {
    /// Records progress (`staged`, `committed`) in the ledger: a progress mark, made
    /// durable by the run's closing write.
    pub fn advance(&mut self, state: &str, versions: Versions, detail: &str) -> Result<(), String> {
        let run_id = self.run.run_id.clone();
        self.ledger
            .write_progress(state, |w| w.advance(&run_id, state, versions, detail))
    }

    /// Records, durably and before any of them exists, the files this run is about to
    /// stage (a `staging` event naming them): the proof that lets a later run remove
    /// them if this one never commits (DESIGN 4.4). Flushed, unlike the progress marks:
    /// a staged file that survives a power loss must not outlive its record, or it
    /// would have to go to a human.
    pub fn staging(&mut self, files: &[String]) -> Result<(), String> {
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
            .and_then(|()| self.ledger.confirm_lock(&self.run.domain));
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
        let ledger = self.advance("committed", (r.from_version, r.to_version), &r.summary);
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
