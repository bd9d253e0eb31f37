//! The dry run: the same decisions as the real run, read-only, with the plan it would
//! carry out.

use super::*;

pub(super) fn dry_run(p: &Prepared) -> Report {
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

pub(super) type Versions = (Option<u64>, Option<u64>);

pub(super) fn dry_run_decide(p: &Prepared, plan: &mut Vec<String>) -> (Outcome, String, Versions) {
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
        if std::fs::symlink_metadata(dir).is_ok() {
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
    if let Err(e) = lock::check_openable(&lock_path) {
        plan.push(format!("lock: {e}"));
        return (Outcome::Aborted, format!("{e}; the real run would stop there"), none);
    }
    match lock::probe(&lock_path) {
        Ok(Some(pid)) => {
            let who = lock::read_holder(&lock_path).map_or(format!("pid {pid}"), |h| h.describe());
            plan.push(format!("lock: held by {who}"));
            return (Outcome::Busy, format!("another rotation is running: {who}"), none);
        }
        Ok(None) => plan.push("lock: free".into()),
        Err(e) => plan.push(format!("lock: cannot tell whether it is held ({e})")),
    }
    if let Backend::Keystore { keystore, .. } = &p.domain.backend {
        let ks_lock = Keystore::new(keystore, &p.domain.name).lock_path();
        if let Err(e) = lock::check_openable(&ks_lock) {
            plan.push(format!("lock: {e}"));
            return (Outcome::Aborted, format!("{e}; the real run would stop there"), none);
        }
        if let Ok(Some(pid)) = lock::probe(&ks_lock) {
            let who = lock::read_holder(&ks_lock).map_or(format!("pid {pid}"), |h| h.describe());
            plan.push(format!(
                "lock: the key store lock {} is held by {who}",
                ks_lock.display()
            ));
            return (
                Outcome::Busy,
                format!("another run holds the key store lock: {who}"),
                none,
            );
        }
        // The real run opens the key store's lock file for writing next: a key store it
        // cannot write (a read-only mount) stops it there with 3, before any other
        // decision, so the plan must say so rather than predict a rotation.
        let ks = Keystore::new(keystore, &p.domain.name);
        let target = if ks.dir().is_dir() {
            ks.dir()
        } else {
            keystore.as_path()
        };
        if target.is_dir() && !fsutil::can_write_dir(target) {
            let why = fsutil::fs_trouble(target).unwrap_or("this user cannot write it");
            let e = format!("key store {}: {why}", target.display());
            plan.push(format!("key store: {e}"));
            return (
                Outcome::Aborted,
                format!("{e}; the real run would stop before touching any key"),
                none,
            );
        }
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
    if let Backend::Keystore { keystore, .. } = &p.domain.backend {
        let ks = Keystore::new(keystore, &p.domain.name);
        if let Ok((insp, verdict)) = crate::backend::keystore::examine(&ks, ledger.as_ref(), &p.domain.name) {
            if verdict.clean() && insp.exists {
                for todo in ks.repair_needed(&insp) {
                    plan.push(format!("repair (the last commit's unfinished tidy-up): {todo}"));
                }
            }
        }
    }
    match admit(p, &rec, p.deadline.remaining()) {
        Admission::Stale(dead) => {
            let events = ledger
                .as_ref()
                .and_then(|l| l.events(&dead.run_id).ok())
                .unwrap_or_default();
            // As the real run decides: a live process is never called dead.
            match crate::process::liveness(&p.run.host, &dead.host, &events) {
                Some(alive @ crate::process::Alive::Run(_)) => {
                    plan.push(format!("ledger: {}", alive.describe(&dead.run_id)));
                    return (
                        Outcome::Busy,
                        format!(
                            "another rotation of {} is running: {}; it stops at its next step: wait for it",
                            p.domain.name,
                            alive.describe(&dead.run_id)
                        ),
                        none,
                    );
                }
                alive => {
                    let mut diagnosis = diagnose(p, &dead, last_step(&events), ledger.as_ref());
                    if let Some(a) = alive {
                        diagnosis = format!("{diagnosis}; {}", a.describe(&dead.run_id));
                    }
                    plan.push(format!(
                        "ledger: run {} is still in flight but holds no lock: it {}",
                        dead.run_id,
                        ended_how(&dead)
                    ));
                    return (
                        Outcome::NeedsReview,
                        stale_message(&p.domain.name, &dead, &diagnosis),
                        none,
                    );
                }
            }
        }
        Admission::Alive(row) => {
            plan.push(format!(
                "ledger: run {} is in flight and its process is alive",
                row.run_id
            ));
            return (
                Outcome::Busy,
                alive_message(
                    &row,
                    !matches!(p.config.ledger, crate::config::LedgerLocation::Sqlite(_)),
                ),
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

    if let Err(e) = p.audit.preflight(false) {
        plan.push(format!("audit: {e}"));
        return (
            Outcome::Aborted,
            format!("{e}; the real run would stop before touching any key"),
            none,
        );
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
            let (insp, verdict) = match crate::backend::keystore::examine(&ks, ledger.as_ref(), &p.domain.name) {
                Ok(i) => i,
                Err(crate::backend::keystore::ExamineError::Ledger(e)) => {
                    plan.push(format!("ledger: {e}"));
                    return (
                        Outcome::Aborted,
                        format!("{e}; the real run would stop before touching any key"),
                        none,
                    );
                }
                Err(d) => {
                    plan.push(format!("key store: inconsistent: {d}"));
                    return (Outcome::NeedsReview, format!("key store is inconsistent: {d}"), none);
                }
            };
            if let Some(d) = verdict.diagnosis(&p.domain.name) {
                plan.push(format!("key store: {d}"));
                return (Outcome::NeedsReview, d, none);
            }
            if !insp.exists {
                plan.push(format!(
                    "key store: {} has no keyring yet (first rotation)",
                    ks.dir().display()
                ));
            }
            // The real run removes the garbage and replaces jwks.json: a folder planted
            // under one of those names stops it with 3 ("is a directory").
            let jwks = (!algorithm.is_symmetric()).then_some(crate::keystore::JWKS);
            for name in verdict.garbage.iter().map(String::as_str).chain(jwks) {
                if std::fs::symlink_metadata(ks.dir().join(name)).is_ok_and(|m| m.is_dir()) {
                    let e = format!("{} is a directory", ks.dir().join(name).display());
                    plan.push(format!("key store: {e}"));
                    return (
                        Outcome::Aborted,
                        format!("{e}; the real run would stop there (move it away)"),
                        none,
                    );
                }
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
            if let Err(e) = crate::cmd::check_program(program) {
                plan.push(format!("hook: {e}"));
                return (
                    Outcome::Aborted,
                    format!("{e}; the real run would refuse to run it"),
                    none,
                );
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
