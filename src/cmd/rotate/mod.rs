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
//! Phases 2 to 6 (and the audit check that ends admission) are one sequence,
//! `phases::admission`, of one function per phase over the run's context and an
//! [`phases::Effects`] interface. Two drivers implement it: `real.rs` (the live
//! driver) takes the locks, opens the ledger for writing and records every refusal;
//! `dry.rs` (the dry driver) only probes (no lock, the ledger read-only, nothing
//! written) and collects the plan. Every decision and every message is made once, in
//! `phases.rs` and `decide.rs`, so the dry run cannot predict another code or reason
//! than the real run would return now. Phase 7 is the backend's: it runs the rotation
//! in the live driver, and says what it would do (its own preflight, the same as the
//! run's) in the dry one.

mod decide;
mod dry;
mod phases;
mod real;

use std::time::Duration;

use serde::Serialize;

use super::{clean_text, hostname, load_config, operator, print_json};
use crate::audit::{Audit, Event};
use crate::backend::command;
use crate::backend::keystore::Revocation;
use crate::backend::{PreCommitUndo, Rotated, RotationBackend, Step};
use crate::cli::{Cli, OutputFormat, RevokeArgs, RotateArgs};
use crate::config::{Backend, Config, DomainConfig};
use crate::deadline::Deadline;
use crate::fsutil;
use crate::guard::Guard;
use crate::keystore::Keystore;
use crate::ledger::{DomainRecord, Ledger, NewRun, RunRow, RunState};
use crate::lock::{self, DomainLocks, Holder};
use crate::outcome::{Failure, Outcome};
use crate::time::rfc3339 as now_rfc3339;
use phases::{Effects, Held, Record, Stop};

/// What `rotate` prints on stdout (one line, or this object with `--output json`).
/// It carries the outcome itself; the name and the exit code are derived from it
/// only when printed.
#[derive(Debug)]
pub struct Report {
    pub run_id: String,
    pub domain: String,
    pub outcome: Outcome,
    pub from_version: Option<u64>,
    pub to_version: Option<u64>,
    pub reason: String,
    pub dry_run: bool,
    pub plan: Option<Vec<String>>,
    pub warnings: Vec<String>,
}

impl Report {
    /// A report of a run that stopped with `outcome` and changed no version.
    fn stopped(p: &Prepared, outcome: Outcome, reason: String) -> Report {
        Report {
            run_id: p.run.run_id.clone(),
            domain: p.domain.name.clone(),
            outcome,
            from_version: None,
            to_version: None,
            reason,
            dry_run: p.dry_run,
            plan: None,
            warnings: Vec::new(),
        }
    }
}

/// The JSON shape of a [`Report`] (stable field names and order).
#[derive(Serialize)]
struct ReportJson<'a> {
    run_id: &'a str,
    domain: &'a str,
    outcome: &'static str,
    exit_code: u8,
    from_version: Option<u64>,
    to_version: Option<u64>,
    reason: &'a str,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a [String]>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

impl Serialize for Report {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ReportJson {
            run_id: &self.run_id,
            domain: &self.domain,
            outcome: self.outcome.name(),
            exit_code: self.outcome.code(),
            from_version: self.from_version,
            to_version: self.to_version,
            reason: &self.reason,
            dry_run: self.dry_run,
            plan: self.plan.as_deref(),
            warnings: &self.warnings,
        }
        .serialize(s)
    }
}

/// Everything phase 1 established: the run's context. Cloneable, so that the deadline
/// watchdog gets its own copy.
#[derive(Clone)]
struct Prepared {
    config: Config,
    domain: DomainConfig,
    deadline: Deadline,
    pool: String,
    run: NewRun,
    audit: Audit,
    output: OutputFormat,
    dry_run: bool,
    /// `keyrotate revoke`: the same phases, with a revocation as the backend's work.
    revoke: Option<Revocation>,
}

impl Prepared {
    /// The domain's backend (for a revocation, checked in phase 1 to exist).
    fn backend(&self) -> Box<dyn RotationBackend> {
        match &self.revoke {
            None => crate::backend::for_domain(&self.domain, &self.config.state_dir),
            Some(r) => crate::backend::for_revocation(&self.domain, r).expect("checked when prepared"),
        }
    }
}

use decide::*;
use dry::dry_run;
use real::real_run;

pub fn run(cli: &Cli, args: &RotateArgs) -> Outcome {
    execute(prepare(cli, args), args)
}

/// `keyrotate revoke` (DESIGN 11): the phases of a rotation (admission, lock,
/// decision, commit, tidy-up), in both drivers, with a revocation as the backend's
/// work. It is an emergency rotation: `min_interval` does not apply (the row says
/// `forced`), its trigger is `revoke`, and the operator's reason is the run's.
pub fn revoke(cli: &Cli, args: &RevokeArgs) -> Outcome {
    let as_rotate = RotateArgs {
        domain: args.domain.clone(),
        deadline: args.deadline.clone(),
        dry_run: args.dry_run,
        force: true,
        pool: args.pool.clone(),
        run_id: args.run_id.clone(),
        operator: args.operator.clone(),
        reason: Some(args.reason.clone()),
        output: args.output,
    };
    let prepared = prepare(cli, &as_rotate).and_then(|mut p| {
        let reason = clean_text("--reason", &args.reason, 1000)?;
        if reason.trim().is_empty() {
            return Err(Failure::usage("--reason must say why the key is revoked"));
        }
        let revocation = Revocation {
            version: args.version,
            reason,
        };
        crate::backend::for_revocation(&p.domain, &revocation)
            .map_err(|e| Failure::usage(format!("{}: {e}", p.config.path.display())))?;
        revocable_now(&p, args.version)?;
        p.run.trigger = "revoke";
        p.revoke = Some(revocation);
        Ok(p)
    });
    execute(prepared, &as_rotate)
}

/// Phase 1 of a revocation: a version the key store does not hold (unknown, destroyed,
/// already compromised) is a usage error before anything is touched. Only where this
/// host rotates the domain (another pool's host answers NOT_DESIGNATED, whatever its
/// copy holds) and only on a manifest that reads; a store that does not verify is the
/// backend's to refuse, under the locks. The backend checks again under the locks.
fn revocable_now(p: &Prepared, version: u64) -> Result<(), Failure> {
    if p.pool != p.domain.designated_pool {
        return Ok(());
    }
    // A shared domain's local copy is a replica that may lag: the keyring in the
    // database is the one to ask. A database that cannot be read here is the
    // backend's to refuse, under the locks (it asks again there in any case).
    if p.domain.shared().is_some() {
        let ring = match Ledger::open_read_only(&p.config.ledger) {
            Ok(Some(l)) => l.shared_keyring(&p.domain.name).ok(),
            _ => None,
        };
        return match ring.map(|r| (r.epoch, crate::shared::manifest(&p.domain.name, &r))) {
            Some((0, _)) => Err(Failure::usage(format!(
                "--version {version}: shared domain {} has no committed keyring yet: nothing to revoke",
                p.domain.name
            ))),
            Some((_, Ok(m))) => m.revocable(version).map(|_| ()).map_err(Failure::usage),
            _ => Ok(()),
        };
    }
    let Some(ks) = keystore_of(p) else {
        return Ok(());
    };
    match ks.inspect() {
        Ok(i) if !i.exists => Err(Failure::usage(format!(
            "--version {version}: domain {} has no keyring yet in {}: nothing to revoke",
            p.domain.name,
            ks.dir().display()
        ))),
        // A revocation that committed but was interrupted before its tidy-up (the key
        // file, or current.* naming it, still there) is finished by running it again.
        Ok(i) if crate::backend::keystore::revocation_unfinished(&ks, &i.manifest, version).is_some() => Ok(()),
        Ok(i) => i.manifest.revocable(version).map(|_| ()).map_err(Failure::usage),
        Err(_) => Ok(()),
    }
}

fn execute(prepared: Result<Prepared, Failure>, args: &RotateArgs) -> Outcome {
    let p = match prepared {
        Ok(p) => p,
        Err(f) => {
            tracing::error!("{}", f.message);
            let report = Report {
                run_id: args.run_id.clone().unwrap_or_default(),
                domain: args.domain.clone(),
                outcome: f.outcome,
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
    if !p.dry_run {
        // After the report: the outcome is final, the metrics only describe it.
        super::write_metrics(&p.config);
    }
    report.outcome
}

fn print_report(r: &Report, output: OutputFormat) {
    match output {
        OutputFormat::Json => print_json(r),
        OutputFormat::Text => {
            if let Some(plan) = &r.plan {
                out!("plan for {} (dry run, nothing changed):", r.domain);
                for line in plan {
                    out!("  {line}");
                }
            }
            let run = if r.run_id.is_empty() {
                String::new()
            } else {
                format!(" [run {}]", r.run_id)
            };
            let would = if r.dry_run { "would exit " } else { "" };
            let (name, code) = (r.outcome.name(), r.outcome.code());
            out!("{name} {}: {}{run} ({would}{code})", r.domain, r.reason);
        }
    }
}

// ---- phase 1: arguments and config -------------------------------------------------

fn prepare(cli: &Cli, args: &RotateArgs) -> Result<Prepared, Failure> {
    let config = load_config(cli, Some(&args.domain))?;
    let domain = config.domain(&args.domain).map_err(Failure::usage)?.clone();
    let deadline = Deadline::parse(&args.deadline, domain.max_deadline).map_err(Failure::usage)?;
    if let Backend::Command { program, .. } = &domain.backend {
        command::program_runnable(program).map_err(|e| {
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
        revoke: None,
    })
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
