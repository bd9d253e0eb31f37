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
    let (outcome, reason, versions) = match phases::admission(p, &mut dry) {
        Err(s) => (s.outcome, s.reason, (None, None)),
        Ok(()) => backend_plan(p, dry.ledger.as_ref(), &mut dry.plan),
    };
    Report {
        from_version: versions.0,
        to_version: versions.1,
        plan: Some(dry.plan),
        ..Report::stopped(p, outcome, reason)
    }
}

pub(super) type Versions = (Option<u64>, Option<u64>);

/// The dry driver: what it found, and the plan so far.
struct Dry {
    plan: Vec<String>,
    /// The ledger opened read-only; `None` while it does not exist yet.
    ledger: Option<Ledger>,
}

fn probe(path: &std::path::Path) -> Result<Held, String> {
    match lock::probe(path)? {
        // Named as the real run names it: by the lock file, or not at all.
        Some(_pid) => Ok(Held::Busy(lock::read_holder(path))),
        None => Ok(Held::Free),
    }
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
        match probe(&path) {
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
        if !l.domain_locked_elsewhere(&p.domain.name)? {
            return Ok(Held::Free);
        }
        let held = Held::Busy(ledger_holder(l, &p.domain.name));
        self.plan
            .push(format!("lock: the shared ledger's lock is {}", held_line(&held)));
        Ok(held)
    }

    fn keystore_lock(&mut self, _p: &Prepared, ks: &Keystore) -> Result<Held, String> {
        match probe(&ks.lock_path()) {
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
        judge: &dyn Fn(&DomainRecord, Duration) -> Result<(), Refusal>,
    ) -> Result<(), Stop> {
        let mut rec = DomainRecord::default();
        if let Some(l) = &self.ledger {
            let failed = |e: String| Stop::new(before_keys(p), format!("{e}; no key was touched"), Record::AuditOnly);
            if l.get(&p.run.run_id).map_err(failed)?.is_some() {
                let usage = duplicate_run_id_message(&p.run.run_id);
                return Err(Stop::new(Outcome::Usage, usage, Record::AuditOnly));
            }
            rec = l.domain_record(&p.domain.name).map_err(failed)?;
        }
        match judge(&rec, p.deadline.remaining()) {
            Ok(()) => {
                self.plan.push(if p.run.forced && rec.last_success.is_some() {
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

/// Phase 7, what the backend would do: its own preflight (the same as the real
/// run's), then its plan.
fn backend_plan(p: &Prepared, ledger: Option<&Ledger>, plan: &mut Vec<String>) -> (Outcome, String, Versions) {
    let none = (None, None);
    match &p.domain.backend {
        Backend::Keystore {
            keystore,
            algorithm,
            activation,
        } => {
            let ks = Keystore::new(keystore, &p.domain.name);
            if let Err(e) = ks.check_folders() {
                plan.push(format!("key store: {e}"));
                return (Outcome::Aborted, e, none);
            }
            let judged = crate::backend::keystore::examine(&ks, ledger, &p.domain.name)
                .map_err(crate::backend::keystore::ExamineError::refusal)
                .and_then(
                    |(insp, verdict)| match crate::backend::keystore::refusal(&verdict, &p.domain.name) {
                        Some(f) => Err(f),
                        None => Ok((insp, verdict)),
                    },
                );
            let (insp, verdict) = match judged {
                Ok(j) => j,
                Err(f) => {
                    plan.push(format!("key store: {}", f.message));
                    return (f.outcome, f.message, none);
                }
            };
            if !insp.exists {
                plan.push(format!(
                    "key store: {} has no keyring yet (first rotation)",
                    ks.dir().display()
                ));
            }
            if !verdict.garbage.is_empty() {
                plan.push(format!(
                    "sweep: remove {} (proven garbage: destroyed versions, temporaries, files staged by runs that never committed)",
                    verdict.garbage.join(", ")
                ));
            }
            let rp = insp
                .manifest
                .plan(*algorithm, *activation, p.domain.retain, verdict.next_version);
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
            // Symmetric keys have no public half: no jwks.json is written for them.
            plan.push(if algorithm.is_symmetric() {
                "commit: replace keyring.json atomically; update the current.key symlink".into()
            } else {
                "commit: replace keyring.json atomically; update the current.pem symlink and jwks.json".into()
            });
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
            if let Err(f) = command::preflight(program) {
                plan.push(format!("hook: {}", f.message));
                return (f.outcome, f.message, none);
            }
            // Quoted the way a shell would need it, so the plan shows exactly which
            // arguments the hook gets (an argument with a space is one argument).
            let words: Vec<String> = std::iter::once(program.to_string_lossy().into_owned())
                .chain(args.iter().cloned())
                .collect();
            let shown = shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| format!("{words:?}"));
            for step in command::STEPS {
                plan.push(format!("run: KEYROTATE_STEP={step} {shown}"));
            }
            plan.push("commit point: the 'set' step; a failure from there on blocks the domain".into());
            (Outcome::Rotated, "would run the hook's four steps".into(), none)
        }
    }
}
