//! `keyrotate check`: validates config, folders, permissions, ownership, designation
//! and backend readiness without changing anything. Lists every problem, each naming
//! the config key it comes from, and exits USAGE (2) if there is any.

use super::report_failure;
use crate::audit::Audit;
use crate::cli::{CheckArgs, Cli};
use crate::config::{Backend, Config, DomainConfig};
use crate::fsutil;
use crate::keystore::Keystore;
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
    let pool = std::env::var("KEYROTATE_POOL")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| config.host_pool.clone());
    if pool.is_none() {
        notes.push("host.pool: not set (and no KEYROTATE_POOL): rotate needs --pool".into());
    }
    for d in &domains {
        let key = format!("domains.{}", d.name);
        match &pool {
            Some(p) if *p == d.designated_pool => notes.push(format!("{key}: this host (pool {p}) is designated")),
            Some(p) => notes.push(format!(
                "{key}: this host (pool {p}) is not designated ({}): rotate exits 6",
                d.designated_pool
            )),
            None => {}
        }
        match &d.backend {
            Backend::Keystore { keystore, .. } => {
                let ks = Keystore::new(keystore, &d.name);
                if let Err(e) = ks.check_folders() {
                    problems.push(format!("{file}: {key}.keystore: {e}"));
                } else {
                    if let Err(e) = ks.inspect() {
                        problems.push(format!("{file}: {key}.keystore: inconsistent key store: {e}"));
                    }
                    for e in key_store_access(keystore, ks.dir(), &d.access) {
                        problems.push(format!("{file}: {key}.keystore: {e}"));
                    }
                }
            }
            Backend::Command { program, .. } => {
                if let Err(e) = crate::backend::command::check_program(program) {
                    problems.push(format!("{file}: {key}.command: {e}"));
                }
            }
        }
    }
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

/// What the next rotation would trip over, or what exposes keys, that `inspect` does not
/// look at: a key store this user cannot write (read-only mount, permissions), and key
/// files readable by group or others or owned by someone else.
fn key_store_access(root: &std::path::Path, dir: &std::path::Path, access: &fsutil::Access) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut problems = Vec::new();
    for (folder, what) in [(root, "keystore"), (dir, "key folder")] {
        if !folder.is_dir() {
            continue;
        }
        if let Some(why) = fsutil::fs_trouble(folder) {
            problems.push(format!(
                "{what} {}: {why}: the next rotate cannot write it",
                folder.display()
            ));
        } else if !fsutil::can_write_dir(folder) {
            problems.push(format!(
                "{what} {} is read-only for this user: the next rotate cannot write it",
                folder.display()
            ));
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return problems;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('v') && (n.ends_with(".pem") || n.ends_with(".key")))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        // A domain with `group` grants its group read access; nothing else may.
        if !access.allows_key_file(&meta) {
            problems.push(format!(
                "key file {} is accessible by group or others beyond the domain's access (mode {:04o}); run chmod 600 on it (640 with a configured group)",
                path.display(),
                meta.mode() & 0o7777
            ));
        }
        if meta.uid() != euid {
            problems.push(format!(
                "key file {} is owned by uid {}, not by this user (uid {euid})",
                path.display(),
                meta.uid()
            ));
        }
    }
    problems
}
