//! `keyrotate check`: validates config, folders, permissions, ownership, designation
//! and backend readiness without changing anything. Lists every problem, each naming
//! the config key it comes from, and exits USAGE (2) if there is any.

use super::report_failure;
use crate::audit::Audit;
use crate::cli::{CheckArgs, Cli};
use crate::config::{Config, DomainConfig};
use crate::fsutil;
use crate::ledger::Ledger;
use crate::outcome::{Failure, Outcome};

pub fn run(cli: &Cli, args: &CheckArgs) -> Outcome {
    // An untrusted config is one of the problems listed, not the end of the check.
    let path = crate::config::locate(cli.config.as_deref());
    let distrust = super::config_distrust(&path);
    let config = match Config::load_all(&path) {
        Ok(c) => c,
        Err(errors) => {
            for p in distrust.iter().chain(&errors) {
                out!("problem: {p}");
            }
            tracing::error!(
                "{} problem(s) found in {}",
                errors.len() + usize::from(distrust.is_some()),
                path.display()
            );
            return Outcome::Usage;
        }
    };
    let domains: Vec<&DomainConfig> = match &args.domain {
        Some(d) => match config.domain(d) {
            Ok(d) => vec![d],
            Err(e) => return report_failure(&Failure::usage(e)),
        },
        None => config.domains.values().collect(),
    };
    let mut problems: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let file = config.path.display().to_string();
    problems.extend(distrust);
    let bound = super::bound_read("check", Outcome::Usage);
    check_state(&config, &mut problems, &mut notes);
    check_domains(&config, &domains, &mut problems, &mut notes);
    bound.disarm();
    for n in &notes {
        out!("note: {n}");
    }
    for p in &problems {
        out!("problem: {p}");
    }
    if problems.is_empty() {
        out!("OK {}: {} domain(s) checked, no problems", file, domains.len());
        Outcome::Rotated
    } else {
        tracing::error!("{} problem(s) found in {file}", problems.len());
        Outcome::Usage
    }
}

/// The state folder, the ledger and the audit file.
fn check_state(config: &Config, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    let file = config.path.display().to_string();
    for (dir, key) in [
        (config.state_dir.clone(), "state.dir"),
        (config.lock_dir(), "state.dir (locks/)"),
    ] {
        if std::fs::symlink_metadata(&dir).is_ok() {
            if let Err(e) = fsutil::check_secure_dir(&dir, "folder") {
                problems.push(format!("{file}: {key}: {e}"));
            }
        } else {
            notes.push(format!(
                "{key}: {} does not exist yet; the first rotate creates it",
                dir.display()
            ));
        }
    }
    if let Err(e) = Ledger::open_read_only(&config.ledger) {
        problems.push(format!("{file}: state.dir: {e}"));
    }
    if let Err(e) = Audit::new(&config.audit_file).preflight(false) {
        problems.push(format!("{file}: audit.file: {e}"));
    }
}

/// Each domain: is this host designated, and what its backend finds wrong.
fn check_domains(config: &Config, domains: &[&DomainConfig], problems: &mut Vec<String>, notes: &mut Vec<String>) {
    let file = config.path.display().to_string();
    let pool = std::env::var("KEYROTATE_POOL")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| config.host_pool.clone());
    if pool.is_none() {
        notes.push("host.pool: not set (and no KEYROTATE_POOL): rotate needs --pool".into());
    }
    for d in domains {
        let key = format!("domains.{}", d.name);
        match &pool {
            Some(p) if *p == d.designated_pool => notes.push(format!("{key}: this host (pool {p}) is designated")),
            Some(p) => notes.push(format!(
                "{key}: this host (pool {p}) is not designated ({}): rotate exits 6",
                d.designated_pool
            )),
            None => {}
        }
        if let Err(e) = d.writable() {
            problems.push(format!("{file}: {e}"));
        }
        for (what, e) in crate::backend::for_domain(d, &config.state_dir).check() {
            problems.push(format!("{file}: {key}.{what}: {e}"));
        }
    }
}
