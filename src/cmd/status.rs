//! `keyrotate status`: per domain, its versions, last run, block, what is in flight
//! and when it is next due. Exits NEEDS_REVIEW (4) when any domain shown is blocked,
//! else ABORTED (3) when a key store, manifest or ledger cannot be read or does not
//! verify, so Control-M can run it as a monitoring job. Reads only: no file is created or
//! changed, except the `[metrics] textfile` when one is configured (`metrics.rs`).

use serde::Serialize;

use super::{load_config, print_json, report_failure};
use crate::cli::{Cli, StatusArgs, StatusOutput};
use crate::config::{Backend, Config, DomainConfig};
use crate::keystore::manifest::VersionState;
use crate::keystore::Keystore;
use crate::ledger::{DomainRecord, Ledger};
use crate::lock;
use crate::outcome::{Failure, Outcome};
use crate::time::rfc3339 as now_rfc3339;

// A child module, so that it reads the status fields without widening their visibility.
#[path = "metrics.rs"]
pub(super) mod metrics;

#[derive(Serialize, Debug)]
struct DomainStatus {
    domain: String,
    backend: &'static str,
    algorithm: Option<&'static str>,
    designated_pool: String,
    primary: Option<u64>,
    primary_activated_at: Option<String>,
    pending: Option<u64>,
    retired: Vec<u64>,
    /// Versions revoked with `keyrotate revoke` (DESIGN 11); omitted when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    compromised: Vec<u64>,
    last_run: Option<LastRun>,
    next_due: Option<String>,
    blocked_by: Option<String>,
    in_flight: Option<InFlight>,
    /// A shared-store domain's keyring epoch and every host's acknowledgement.
    #[serde(skip_serializing_if = "Option::is_none")]
    sync: Option<SyncStatus>,
    /// Problems found while reading the key store or ledger.
    problems: Vec<String>,
    /// The domain's ledger rows could not be read: whether it is blocked is unknown.
    #[serde(skip)]
    ledger_unread: bool,
    /// For the metrics only (DESIGN section 12).
    #[serde(skip)]
    metrics: MetricInputs,
}

/// What the Prometheus metrics need beyond the fields `status` prints.
#[derive(Debug, Default)]
struct MetricInputs {
    pub last_success_at: Option<String>,
    /// When the next rotation is due; `None` when the domain never rotated.
    pub next_due_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Version count per state, for key store domains whose manifest was read.
    pub versions: Option<Vec<(&'static str, u64)>>,
}

/// DESIGN 9: the shared keyring's epoch and each known host's acknowledgement.
#[derive(Serialize, Debug)]
struct SyncStatus {
    epoch: i64,
    hosts: Vec<HostSync>,
}

#[derive(Serialize, Debug)]
struct HostSync {
    host: String,
    pool: String,
    epoch: i64,
    synced_at: String,
    /// Not seen within `sync_ttl`: never counted as converged.
    stale: bool,
}

#[derive(Serialize, Debug)]
struct LastRun {
    run_id: String,
    state: String,
    outcome: Option<&'static str>,
    exit_code: Option<i64>,
    started_at: String,
    ended_at: Option<String>,
}

#[derive(Serialize, Debug)]
struct InFlight {
    run_id: String,
    state: String,
    pid: i64,
    host: String,
    started_at: String,
    /// False means the process is gone: the next rotate will flag the run for review.
    lock_held: bool,
}

pub fn run(cli: &Cli, args: &StatusArgs) -> Outcome {
    match status(cli, args) {
        Ok(o) => o,
        Err(f) => report_failure(&f),
    }
}

fn status(cli: &Cli, args: &StatusArgs) -> Result<Outcome, Failure> {
    let config = load_config(cli, args.domain.as_deref())?;
    let domains: Vec<&DomainConfig> = match &args.domain {
        Some(d) => vec![config.domain(d).map_err(Failure::usage)?],
        None => config.domains.values().collect(),
    };
    let bound = super::bound_read("status", Outcome::Aborted);
    let statuses = collect(&config, &domains);
    bound.disarm();
    match args.output {
        StatusOutput::Json => print_json(&serde_json::json!({ "domains": statuses })),
        StatusOutput::Text => print_text(&statuses),
        StatusOutput::Prometheus => out!("{}", metrics::render(&statuses).trim_end()),
    }
    // The textfile always carries every domain, whatever --domain narrowed the output to.
    if args.domain.is_none() {
        metrics::write_from(&config, &statuses);
    } else {
        metrics::write_textfile(&config);
    }
    // DESIGN section 5: 4 if any domain is blocked, else 3 if any key store, manifest or
    // ledger cannot be read or does not verify, else 0 (a monitor alerts on both).
    for s in &statuses {
        for p in &s.problems {
            tracing::error!("{}: {p}", s.domain);
        }
    }
    let unread: Vec<&str> = statuses
        .iter()
        .filter(|s| s.ledger_unread)
        .map(|s| s.domain.as_str())
        .collect();
    if !unread.is_empty() {
        // Never 0 for a domain whose rows were not read: it may well be blocked.
        tracing::error!(
            "the ledger rows of {} could not be read: whether they are blocked is unknown",
            unread.join(", ")
        );
    }
    Ok(if statuses.iter().any(|s| s.blocked_by.is_some()) {
        Outcome::NeedsReview
    } else if !unread.is_empty() || statuses.iter().any(|s| !s.problems.is_empty()) {
        Outcome::Aborted
    } else {
        Outcome::Rotated
    })
}

/// The status of `domains`, read from their key stores and the ledger.
fn collect(config: &Config, domains: &[&DomainConfig]) -> Vec<DomainStatus> {
    // A ledger that cannot be read still leaves the key stores worth showing; every
    // domain then carries the ledger's error and the exit code says it (below).
    let (ledger, ledger_err) = match Ledger::open_read_only(&config.ledger) {
        Ok(l) => (l, None),
        Err(e) => (None, Some(e)),
    };
    domains
        .iter()
        .map(|d| {
            let mut s = domain_status(config, d, ledger.as_ref());
            if let Some(e) = &ledger_err {
                s.problems.push(e.to_string());
                s.ledger_unread = true;
            }
            if s.ledger_unread {
                // Without the last success the next due time is unknown, not "now".
                s.next_due = None;
                s.metrics.next_due_at = None;
            }
            s
        })
        .collect()
}

fn domain_status(config: &Config, d: &DomainConfig, ledger: Option<&Ledger>) -> DomainStatus {
    let mut s = DomainStatus {
        domain: d.name.clone(),
        backend: d.backend.name(),
        algorithm: d.backend.algorithm_name(),
        designated_pool: d.designated_pool.clone(),
        primary: None,
        primary_activated_at: None,
        pending: None,
        retired: Vec::new(),
        compromised: Vec::new(),
        last_run: None,
        next_due: None,
        blocked_by: None,
        in_flight: None,
        sync: None,
        problems: Vec::new(),
        ledger_unread: false,
        metrics: MetricInputs::default(),
    };
    if let Backend::Keystore { keystore, .. } = &d.backend {
        key_store_part(&mut s, &Keystore::new(keystore, &d.name));
    }
    ledger_part(&mut s, config, d, ledger);
    if let Some(store) = d.shared() {
        sync_part(&mut s, d, store, ledger);
    }
    s
}

/// A shared-store domain's epoch and acknowledgements (DESIGN 9). A host that has not
/// acknowledged the current epoch although it was committed longer than `sync_ttl`
/// ago is a problem (exit 3): a stale host is named, never taken as converged.
fn sync_part(s: &mut DomainStatus, d: &DomainConfig, store: &crate::config::SharedStore, ledger: Option<&Ledger>) {
    let Some(ledger) = ledger else {
        return;
    };
    let read = ledger
        .shared_keyring(&d.name)
        .and_then(|ring| Ok((ring, ledger.shared_acks(&d.name)?)));
    let (ring, acks) = match read {
        Ok(r) => r,
        Err(e) => {
            s.problems.push(format!("shared keyring: {e}"));
            return;
        }
    };
    let now = chrono::Utc::now();
    let overdue = ring
        .committed_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| now.signed_duration_since(t).to_std().unwrap_or_default() > store.sync_ttl);
    let hosts: Vec<HostSync> = acks
        .iter()
        .map(|a| HostSync {
            host: a.host.clone(),
            pool: a.pool.clone(),
            epoch: a.epoch,
            synced_at: a.synced_at.clone(),
            stale: crate::shared::gate::is_stale(a, store.sync_ttl, now),
        })
        .collect();
    let behind: Vec<String> = hosts
        .iter()
        .filter(|h| h.epoch < ring.epoch && overdue)
        .map(|h| {
            format!(
                "{} (pool {}, epoch {}{})",
                h.host,
                h.pool,
                h.epoch,
                if h.stale { ", stale" } else { "" }
            )
        })
        .collect();
    if !behind.is_empty() {
        s.problems.push(format!(
            "hosts without epoch {} although it was committed more than sync_ttl ({}) ago: {}; run keyrotate sync there",
            ring.epoch,
            humantime::format_duration(store.sync_ttl),
            behind.join(", ")
        ));
    }
    s.sync = Some(SyncStatus {
        epoch: ring.epoch,
        hosts,
    });
}

/// What the key store's manifest says about the domain.
fn key_store_part(s: &mut DomainStatus, ks: &Keystore) {
    {
        match ks.check_folders().and_then(|()| ks.inspect()) {
            Ok(i) => {
                let m = &i.manifest;
                s.primary = m.primary;
                s.primary_activated_at = m.active().and_then(|v| v.activated_at.clone());
                s.pending = m.pending().map(|v| v.version);
                s.retired = m
                    .versions
                    .iter()
                    .filter(|v| v.state == VersionState::Retired)
                    .map(|v| v.version)
                    .collect();
                s.compromised = m
                    .versions
                    .iter()
                    .filter(|v| v.state == VersionState::Compromised)
                    .map(|v| v.version)
                    .collect();
                let count = |state: VersionState| m.versions.iter().filter(|v| v.state == state).count() as u64;
                s.metrics.versions = Some(vec![
                    ("pending", count(VersionState::Pending)),
                    ("active", count(VersionState::Active)),
                    ("retired", count(VersionState::Retired)),
                    ("destroyed", count(VersionState::Destroyed)),
                    ("compromised", count(VersionState::Compromised)),
                ]);
            }
            Err(e) => s.problems.push(format!("key store: {e}")),
        }
    }
}

/// What the ledger says about the domain: its last run, when it is due, what blocks it.
fn ledger_part(s: &mut DomainStatus, config: &Config, d: &DomainConfig, ledger: Option<&Ledger>) {
    let rec = match ledger.map(|l| l.domain_record(&d.name)) {
        None => DomainRecord::default(),
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            s.problems.push(e.to_string());
            s.ledger_unread = true;
            DomainRecord::default()
        }
    };
    s.last_run = rec.last_run.as_ref().map(|r| LastRun {
        run_id: r.run_id.clone(),
        state: r.state.to_string(),
        outcome: r.exit_code.and_then(Outcome::from_code).map(Outcome::name),
        exit_code: r.exit_code,
        started_at: r.started_at.clone(),
        ended_at: r.ended_at.clone(),
    });
    s.metrics.last_success_at = rec
        .last_success
        .as_ref()
        .map(|r| r.ended_at.clone().unwrap_or_else(|| r.started_at.clone()));
    s.metrics.next_due_at = crate::due::next_due(rec.last_success.as_ref(), d.min_interval);
    s.next_due = Some(match crate::due::next_due(rec.last_success.as_ref(), d.min_interval) {
        Some(t) if t > chrono::Utc::now() => now_rfc3339(t),
        _ => "now".to_string(),
    });
    if let Some(r) = &rec.in_flight {
        let lock_held = lock::probe(&lock::lock_path(&config.lock_dir(), &d.name))
            .ok()
            .flatten()
            .is_some()
            || ledger.is_some_and(|l| l.domain_locked_elsewhere(&d.name).unwrap_or(false))
            || crate::cmd::run_process_alive(r);
        if !lock_held {
            // A rotate now would flag it and refuse: report it as the block it is.
            s.blocked_by = Some(r.run_id.clone());
        }
        s.in_flight = Some(InFlight {
            run_id: r.run_id.clone(),
            state: r.state.to_string(),
            pid: r.pid,
            host: r.host.clone(),
            started_at: r.started_at.clone(),
            lock_held,
        });
    }
    if let Some(b) = &rec.blocking {
        s.blocked_by = Some(b.run_id.clone());
    }
    // Not judged beside a run in flight: its staged file is unlisted until it commits.
    // A shared domain's local copy is a replica: its lag is the sync section's story.
    if s.problems.is_empty() && rec.in_flight.is_none() && d.shared().is_none() {
        s.problems.extend(store_problem(d, ledger));
    }
}

fn age(since: Option<&str>) -> String {
    let Some(t) = since.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return String::new();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0) as u64;
    let rounded = if secs >= 86_400 {
        secs / 3600 * 3600
    } else if secs >= 3600 {
        secs / 60 * 60
    } else {
        secs
    };
    format!(
        " ({} ago)",
        humantime::format_duration(std::time::Duration::from_secs(rounded))
    )
}

fn print_text(statuses: &[DomainStatus]) {
    let v = |n: Option<u64>| n.map_or("-".to_string(), |n| format!("v{n}"));
    let rows: Vec<[String; 8]> = statuses
        .iter()
        .map(|s| {
            [
                s.domain.clone(),
                format!(
                    "{}{}",
                    s.backend,
                    s.algorithm.map(|a| format!("/{a}")).unwrap_or_default()
                ),
                format!("{}{}", v(s.primary), age(s.primary_activated_at.as_deref())),
                v(s.pending),
                s.retired.len().to_string(),
                s.last_run.as_ref().map_or("-".into(), |r| {
                    format!(
                        "{} {}{}",
                        r.run_id,
                        r.outcome.unwrap_or(&r.state),
                        age(r.ended_at.as_deref().or(Some(&r.started_at)))
                    )
                }),
                s.next_due.clone().unwrap_or_default(),
                match (&s.blocked_by, &s.in_flight) {
                    (Some(b), _) => format!("BLOCKED by {b}"),
                    (None, _) if s.ledger_unread => format!("UNKNOWN: {}", s.problems.join("; ")),
                    (None, Some(f)) => format!("running: {} pid {} on {}", f.run_id, f.pid, f.host),
                    (None, None) if !s.problems.is_empty() => s.problems.join("; "),
                    _ => "ok".into(),
                },
            ]
        })
        .collect();
    super::print_table(
        &[
            "DOMAIN", "BACKEND", "ACTIVE", "PENDING", "RETIRED", "LAST RUN", "NEXT DUE", "STATE",
        ],
        &rows,
    );
    for s in statuses {
        let Some(sync) = &s.sync else { continue };
        let hosts: Vec<String> = sync
            .hosts
            .iter()
            .map(|h| {
                format!(
                    "{} (pool {}) epoch {}{}{}",
                    h.host,
                    h.pool,
                    h.epoch,
                    age(Some(&h.synced_at)),
                    if h.stale { " STALE" } else { "" }
                )
            })
            .collect();
        out!(
            "sync {}: epoch {}; hosts: {}",
            s.domain,
            sync.epoch,
            if hosts.is_empty() {
                "none yet".to_string()
            } else {
                hosts.join("; ")
            }
        );
    }
}

/// A store the next rotation would refuse (unlisted key files, a manifest this ledger
/// does not know or that is older than its last commit), or whose published files do
/// not match its manifest: a problem now, not after the next run blocks the domain.
/// Judged twice, so that a rotation committing between the manifest read and the
/// folder listing is not reported.
fn store_problem(d: &DomainConfig, ledger: Option<&Ledger>) -> Option<String> {
    let Backend::Keystore { keystore, .. } = &d.backend else {
        return None;
    };
    let ks = Keystore::new(keystore, &d.name);
    let diagnose = || {
        let (insp, verdict) = crate::backend::keystore::examine(&ks, ledger, &d.name).ok()?;
        if let Some(diag) = verdict.diagnosis(&d.name) {
            let diag = diag.strip_suffix("; nothing was changed").unwrap_or(&diag);
            return Some(format!(
                "{diag}; the next rotation (when due) stops with NEEDS_REVIEW (4)"
            ));
        }
        // What consumers read (current.*, jwks.json) must match keyring.json: a
        // jwks.json without the active key makes every relying party reject its
        // tokens, however green the manifest is.
        let todo = if insp.exists {
            ks.repair_needed(&insp)
        } else {
            Vec::new()
        };
        (!todo.is_empty()).then(|| {
            format!(
                "key store {}: the published files do not match keyring.json (to do: {}); any \
                 `keyrotate rotate --domain {}` run repairs this before anything else, even when not due",
                d.name,
                todo.join(", "),
                d.name
            )
        })
    };
    diagnose().and_then(|_| diagnose())
}
