//! The dry driver: the same phases as the real run (`phases.rs`), probing instead of
//! acquiring and writing, and the plan the backend would carry out.

use super::*;

pub(super) fn dry_run(p: &Prepared) -> Report {
    let mut dry = Dry {
        plan: vec![
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
        ],
        ledger: None,
    };
    // A dry run changes nothing, so a token or folder that never answers is simply
    // left behind at the deadline (a scheduler's dry run must not hang either).
    let backstop = crate::guard::Backstop::arm(&p.deadline, Duration::from_secs(1), dry_timed_out(p));
    let (outcome, reason, versions) = match phases::admission(p, &mut dry) {
        Err(s) => (s.outcome, s.reason, (None, None)),
        Ok(()) => backend_plan(p, dry.ledger.as_ref(), &mut dry.plan),
    };
    backstop.disarm();
    Report {
        from_version: versions.0,
        to_version: versions.1,
        plan: Some(dry.plan),
        ..Report::stopped(p, outcome, reason)
    }
}

/// The dry run's end at its deadline: TIMED_OUT, nothing changed.
fn dry_timed_out(p: &Prepared) -> impl FnOnce() + Send + 'static {
    let snapshot = p.clone();
    move || {
        let reason = format!(
            "deadline {} passed while the dry run was still reading the ledger and the key store \
             (a token or folder that does not answer); nothing was changed",
            snapshot.run.deadline_at
        );
        let report = Report {
            plan: Some(Vec::new()),
            ..Report::stopped(&snapshot, Outcome::TimedOut, reason)
        };
        print_report(&report, snapshot.output);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(Outcome::TimedOut.code()));
    }
}

pub(super) type Versions = (Option<u64>, Option<u64>);

/// The dry driver: what it found, and the plan so far.
struct Dry {
    plan: Vec<String>,
    /// The ledger opened read-only; `None` while it does not exist yet.
    ledger: Option<Ledger>,
}

/// One flock probed in the words of [`DomainLocks`]: named as the real run names it.
fn probe(path: &std::path::Path, which: lock::Which) -> Result<Held, String> {
    Ok(match lock::probe_file(path, which)? {
        Some(busy) => Held::Busy(busy.holder),
        None => Held::Free,
    })
}

fn held_line(held: &Held) -> String {
    match held {
        Held::Free => "free".into(),
        Held::Busy(Some(h)) => format!("held by {}", h.describe()),
        Held::Busy(None) => "held".into(),
    }
}

impl Effects for Dry {
    fn begin(&mut self, p: &Prepared) -> Result<(), String> {
        self.plan
            .push(format!("designation: pool {} is the designated pool", p.pool));
        Ok(())
    }

    fn folders(&mut self, p: &Prepared) -> Result<(), String> {
        for (dir, what) in [
            (&p.config.state_dir, "state folder"),
            (&p.config.lock_dir(), "lock folder"),
        ] {
            if std::fs::symlink_metadata(dir).is_ok() {
                fsutil::check_secure_dir(dir, what).inspect_err(|e| self.plan.push(format!("folders: {e}")))?;
            } else {
                self.plan.push(format!(
                    "folders: {what} {} does not exist yet; the real run creates it (0700)",
                    dir.display()
                ));
            }
        }
        Ok(())
    }

    fn state_lock(&mut self, p: &Prepared) -> Result<Held, String> {
        let path = lock::lock_path(&p.config.lock_dir(), &p.domain.name);
        // A lock file the real run cannot open (a planted symlink, a folder) stops it.
        lock::check_openable(&path).inspect_err(|e| self.plan.push(format!("lock: {e}")))?;
        match probe(&path, lock::Which::State) {
            Ok(held) => {
                self.plan.push(format!("lock: {}", held_line(&held)));
                Ok(held)
            }
            // The real run would find out by taking it; a dry run can only say so.
            Err(e) => {
                self.plan.push(format!("lock: cannot tell whether it is held ({e})"));
                Ok(Held::Free)
            }
        }
    }

    fn open_ledger(&mut self, p: &Prepared) -> Result<(), String> {
        self.ledger =
            Ledger::open_read_only(&p.config.ledger).inspect_err(|e| self.plan.push(format!("ledger: {e}")))?;
        if self.ledger.is_none() {
            self.plan.push(match &p.config.ledger {
                crate::config::LedgerLocation::Sqlite(path) => {
                    format!("ledger: {} does not exist yet; the real run creates it", path.display())
                }
                crate::config::LedgerLocation::Postgres(_) => {
                    "ledger: the database has no keyrotate tables yet; the real run creates them".into()
                }
            });
        }
        Ok(())
    }

    fn ledger_lock(&mut self, p: &Prepared) -> Result<Held, String> {
        let Some(l) = &self.ledger else {
            return Ok(Held::Free);
        };
        let Some(busy) = lock::probe_shared(l, &p.domain.name)? else {
            return Ok(Held::Free);
        };
        let held = Held::Busy(busy.holder);
        self.plan
            .push(format!("lock: the shared ledger's lock is {}", held_line(&held)));
        Ok(held)
    }

    fn keystore_lock(&mut self, _p: &Prepared, ks: &Keystore) -> Result<Held, String> {
        lock::check_openable(&ks.lock_path()).inspect_err(|e| self.plan.push(format!("lock: {e}")))?;
        // The real run opens the key store's lock file for writing: a key store it
        // cannot write (a read-only mount) stops it there with 3, before any other
        // decision, so the plan must say so rather than predict a rotation.
        let target = if ks.dir().is_dir() { ks.dir() } else { ks.root() };
        if target.is_dir() && !fsutil::can_write_dir(target) {
            let why = fsutil::fs_trouble(target).unwrap_or("this user cannot write it");
            let e = format!("key store {}: {why}", target.display());
            self.plan.push(format!("key store: {e}"));
            return Err(e);
        }
        match probe(&ks.lock_path(), lock::Which::KeyStore(ks.lock_path())) {
            Ok(held @ Held::Busy(_)) => {
                self.plan.push(format!(
                    "lock: the key store lock {} is {}",
                    ks.lock_path().display(),
                    held_line(&held)
                ));
                Ok(held)
            }
            // A lock file that cannot be probed is the backend's to refuse.
            _ => Ok(Held::Free),
        }
    }

    fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    fn domain_record(&mut self, p: &Prepared) -> Result<DomainRecord, String> {
        let rec = match &self.ledger {
            None => DomainRecord::default(),
            Some(l) => l.domain_record(&p.domain.name)?,
        };
        if let Some(last) = &rec.last_run {
            self.plan.push(format!(
                "last run: {} {} at {}",
                last.run_id,
                last.state,
                last.ended_at.as_deref().unwrap_or(&last.started_at)
            ));
        }
        Ok(rec)
    }

    fn repair(&mut self, p: &Prepared) -> Option<String> {
        let ks = keystore_of(p)?;
        let (insp, verdict) = crate::backend::keystore::examine(&ks, self.ledger.as_ref(), &p.domain.name).ok()?;
        if !verdict.clean() || !insp.exists {
            return None;
        }
        let todo = ks.repair_needed(&insp);
        for t in &todo {
            self.plan
                .push(format!("repair (the last commit's unfinished tidy-up): {t}"));
        }
        (!todo.is_empty()).then(|| format!("finished the last commit's tidy-up: {}", todo.join(", ")))
    }

    fn admit(
        &mut self,
        p: &Prepared,
        judge: &dyn Fn(&DomainRecord, Duration) -> Result<Admitted, Refusal>,
    ) -> Result<(), Stop> {
        let mut rec = DomainRecord::default();
        if let Some(l) = &self.ledger {
            let failed = |e: crate::ledger::LedgerError| {
                Stop::new(before_keys(p), format!("{e}; no key was touched"), Record::AuditOnly)
            };
            if l.get(&p.run.run_id).map_err(failed)?.is_some() {
                let usage = duplicate_run_id_message(&p.run.run_id);
                return Err(Stop::new(Outcome::Usage, usage, Record::AuditOnly));
            }
            rec = l.domain_record(&p.domain.name).map_err(failed)?;
        }
        match judge(&rec, p.deadline.remaining()) {
            Ok(past) => {
                if let Some((dead, _)) = past {
                    self.plan.push(format!(
                        "ledger: run {dead} is in flight but holds no lock: marked needs_review; the revocation goes ahead"
                    ));
                }
                if let (Some(_), Some(row)) = (&p.revoke, &rec.blocking) {
                    self.plan.push(revoke_past_review(row));
                }
                self.plan.push(if p.revoke.is_some() {
                    "due: a revocation is always due".into()
                } else if p.run.forced && rec.last_success.is_some() {
                    "due: forced".into()
                } else {
                    "due: yes".into()
                });
                Ok(())
            }
            Err(r) => {
                self.plan.push(r.plan);
                Err(Stop::new(r.outcome, r.reason, Record::Done))
            }
        }
    }

    fn audit(&mut self, p: &Prepared) -> Result<(), String> {
        p.audit
            .preflight(false)
            .inspect_err(|e| self.plan.push(format!("audit: {e}")))
    }
}

/// Phase 7, what the backend would do: its own checks (the same as the real run's),
/// then its plan.
fn backend_plan(p: &Prepared, ledger: Option<&Ledger>, plan: &mut Vec<String>) -> (Outcome, String, Versions) {
    match p.backend().plan(ledger, plan) {
        Ok(planned) => (Outcome::Rotated, planned.summary, planned.versions),
        Err(f) => (f.outcome, f.message, (None, None)),
    }
}
