//! `keyrotate sync [--domain D] --deadline WHEN`: on every host, copy each shared-store
//! domain's newest committed keyring to the local key store and acknowledge it
//! (DESIGN 9). The work per domain is `crate::shared::sync_domain`; this file adds the
//! command's frame: the config, the deadline and signals, the key store's lock (the
//! one a rotation holds, so a sync never writes beside a rotation of this host), the
//! acknowledgement, the record and the audit lines.
//!
//! A sync has no row in `rotations` (it is not a rotation: its one-in-flight rule and
//! admission must never see a sync). It is recorded in `shared_syncs` (every attempt
//! that reached the database) and in the audit trail (`sync.completed`,
//! `sync.failed`); `shared_sync_acks` holds each host's newest acknowledged epoch.
//!
//! Exit codes: 0 synced or already current; 2 usage; 3 failed, the local copy left as
//! it was (a wrong KEK, an unreachable database, a version that does not verify); 5
//! another sync or a rotation holds this host's copy of the domain; 8 the deadline
//! came first. With several domains the worst wins, in the order 3, 8, 5, 0.

use serde::Serialize;

use super::{load_config, print_json, report_failure};
use crate::audit::{Audit, Event};
use crate::cli::{Cli, OutputFormat, SyncArgs};
use crate::config::{Backend, Config, DomainConfig};
use crate::deadline::Deadline;
use crate::guard::Guard;
use crate::kek::Kek;
use crate::keystore::Keystore;
use crate::ledger::{Ledger, SyncAck, SyncRecord};
use crate::lock::{DomainLocks, Holder};
use crate::outcome::{Failure, Outcome};
use crate::shared::{self, Local};

/// What happened to one domain.
#[derive(Serialize, Debug)]
struct DomainSync {
    domain: String,
    /// `SYNCED` (written), `CURRENT` (nothing to write), or the failure's name.
    outcome: &'static str,
    exit_code: u8,
    /// The epoch this host's copy holds now, when known.
    epoch: Option<i64>,
    written: Vec<String>,
    reason: String,
    #[serde(skip)]
    code: Outcome,
}

/// The command's context.
struct Ctx {
    config: Config,
    domains: Vec<DomainConfig>,
    host: String,
    pool: String,
    guard: Guard,
    audit: Audit,
    /// Names this sync in the lock file and the audit lines.
    id: String,
    /// The domains whose outcome is already audited: a sync ended by its timer reports
    /// (and audits) TIMED_OUT only for the others.
    finished: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn run(cli: &Cli, args: &SyncArgs) -> Outcome {
    let ctx = match prepare(cli, args) {
        Ok(c) => c,
        Err(f) => return report_failure(&f),
    };
    // A step that never answers (a token whose module waits on a lock, a database or a
    // hard-mounted folder that stops responding) is ended a second after the deadline
    // by the process's timer, as a rotation's is before admission: nothing more is
    // written, and every local copy is whole (each file is replaced atomically and
    // `keyring.json`, the one readers trust, last), as after a kill at that step.
    let backstop = crate::guard::Backstop::arm(
        ctx.guard.deadline(),
        std::time::Duration::from_secs(1),
        timed_out(&ctx, args.output),
    );
    let results = sync_all(&ctx);
    backstop.disarm();
    let outcome = [Outcome::Aborted, Outcome::TimedOut, Outcome::Busy]
        .into_iter()
        .find(|o| results.iter().any(|r| r.code == *o))
        .unwrap_or(Outcome::Rotated);
    print(&ctx, &results, outcome, args.output);
    super::write_metrics(&ctx.config);
    outcome
}

/// What the timer does when a sync is still waiting a second after its deadline: a
/// `sync.failed` audit line (TIMED_OUT) for each domain not yet finished, the report
/// the operator and Control-M read (8), then the end of the process. The audit lines
/// are written by a thread the timer waits for at most a second: the trail's disk may
/// be what hangs, and the process must end either way. No `shared_syncs` row: the
/// database may be what hangs.
fn timed_out(ctx: &Ctx, output: OutputFormat) -> impl FnOnce() + Send + 'static {
    let (host, pool, id) = (ctx.host.clone(), ctx.pool.clone(), ctx.id.clone());
    let audit_file = ctx.config.audit_file.clone();
    let domains: Vec<String> = ctx.domains.iter().map(|d| d.name.clone()).collect();
    let finished = std::sync::Arc::clone(&ctx.finished);
    let deadline = crate::time::rfc3339(ctx.guard.deadline().at());
    move || {
        let reason = format!(
            "deadline {deadline} passed while the sync was still waiting (a token, the database or \
             a folder that does not answer); each local copy is whole (the epoch it held or the \
             new one): sync again once it answers"
        );
        tracing::error!("TIMED_OUT: {reason}");
        let done = finished.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stopped: Vec<DomainSync> = domains
            .iter()
            .filter(|d| !done.contains(d))
            .map(|d| DomainSync {
                domain: d.clone(),
                outcome: Outcome::TimedOut.name(),
                exit_code: Outcome::TimedOut.code(),
                epoch: None,
                written: Vec::new(),
                reason: reason.clone(),
                code: Outcome::TimedOut,
            })
            .collect();
        let events: Vec<Event> = stopped.iter().map(|r| event(&id, &host, &pool, r)).collect();
        let (wrote, written) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let trail = Audit::new(&audit_file);
            for e in events {
                if let Err(e) = trail.emit(e) {
                    tracing::warn!("{e}");
                }
            }
            let _ = wrote.send(());
        });
        if written.recv_timeout(std::time::Duration::from_secs(1)).is_err() {
            tracing::warn!("the audit trail did not take the TIMED_OUT lines within a second");
        }
        match output {
            OutputFormat::Json => print_json(&serde_json::json!({
                "host": host,
                "pool": pool,
                "exit_code": Outcome::TimedOut.code(),
                "domains": stopped,
            })),
            OutputFormat::Text => {
                for r in &stopped {
                    out!("{} {}: {} ({})", r.outcome, r.domain, r.reason, r.exit_code);
                }
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(i32::from(Outcome::TimedOut.code()));
    }
}

fn prepare(cli: &Cli, args: &SyncArgs) -> Result<Ctx, Failure> {
    let config = load_config(cli, args.domain.as_deref())?;
    let domains: Vec<DomainConfig> = match &args.domain {
        Some(d) => {
            let dc = config.domain(d).map_err(Failure::usage)?;
            if dc.shared().is_none() {
                return Err(Failure::usage(format!(
                    "{}: domains.{d}: not a shared-store domain (store = \"shared\"): sync has nothing to copy",
                    config.path.display()
                )));
            }
            vec![dc.clone()]
        }
        None => config
            .domains
            .values()
            .filter(|d| d.shared().is_some())
            .cloned()
            .collect(),
    };
    let max = domains
        .iter()
        .map(|d| d.max_deadline)
        .max()
        .unwrap_or(std::time::Duration::from_secs(3600));
    let deadline = Deadline::parse(&args.deadline, max).map_err(Failure::usage)?;
    let pool = std::env::var("KEYROTATE_POOL")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| config.host_pool.clone())
        .ok_or_else(|| {
            Failure::usage("this host's pool is unknown (its acknowledgement names it): set KEYROTATE_POOL or [host].pool in the config")
        })?;
    let guard = Guard::install(deadline).map_err(|e| Failure::new(Outcome::Aborted, e))?;
    Ok(Ctx {
        host: config.host_name.clone(),
        audit: Audit::new(&config.audit_file),
        id: format!(
            "sync-{}-{}-{}",
            config.host_name,
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            std::process::id()
        ),
        config,
        domains,
        pool,
        guard,
        finished: Default::default(),
    })
}

/// A failure that came once the deadline had passed is the deadline's (8), as a
/// rotation's is: the database's `statement_timeout` and `lock_timeout` are set to the
/// time left, so a statement that waits on a lock (a DBA's `LOCK TABLE`) is cancelled
/// right at the deadline, a second before the timer's backstop, and its "canceling
/// statement" error must not read as ABORTED (3), which sends the operator to fix
/// something rather than to sync again.
fn past_deadline(ctx: &Ctx, f: Failure) -> Failure {
    if f.outcome == Outcome::Aborted && ctx.guard.deadline().expired() {
        Failure::new(Outcome::TimedOut, f.message)
    } else {
        f
    }
}

fn failed(d: &DomainConfig, f: Failure) -> DomainSync {
    DomainSync {
        domain: d.name.clone(),
        outcome: f.outcome.name(),
        exit_code: f.outcome.code(),
        epoch: None,
        written: Vec::new(),
        reason: f.message,
        code: f.outcome,
    }
}

fn sync_all(ctx: &Ctx) -> Vec<DomainSync> {
    if ctx.domains.is_empty() {
        tracing::info!(
            "no domain with store = \"shared\" in {}: nothing to sync",
            ctx.config.path.display()
        );
        return Vec::new();
    }
    // The audit trail is part of the sync, as of a rotation: checked before any write.
    let before = ctx
        .audit
        .preflight(true)
        .map_err(|e| format!("{e}: the audit trail is part of the sync"))
        .and_then(|()| {
            let busy = ctx.guard.deadline().remaining().min(std::time::Duration::from_secs(10));
            Ledger::open(&ctx.config.ledger, busy).map_err(|e| e.to_string())
        });
    let mut ledger = match before {
        Ok(l) => l,
        Err(e) => {
            let why = format!("{e}; the local copies were left as they were");
            return ctx
                .domains
                .iter()
                .map(|d| {
                    let r = failed(d, past_deadline(ctx, Failure::new(Outcome::Aborted, why.clone())));
                    audit(ctx, &r);
                    r
                })
                .collect();
        }
    };
    ctx.domains
        .iter()
        .map(|d| {
            let r = sync_one(ctx, &mut ledger, d);
            let r = record(ctx, &mut ledger, r);
            audit(ctx, &r);
            ctx.finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(r.domain.clone());
            r
        })
        .collect()
}

/// One domain, under its key store's lock.
fn sync_one(ctx: &Ctx, ledger: &mut Ledger, d: &DomainConfig) -> DomainSync {
    let (Backend::Keystore { keystore, .. }, Some(store)) = (&d.backend, d.shared()) else {
        return failed(d, Failure::usage("not a shared-store domain"));
    };
    let ks = Keystore::new(keystore, &d.name).with_access(d.access.clone());
    let aborted = |e: String| Failure::new(Outcome::Aborted, format!("{e}; the local copy was left as it was"));
    if let Err(e) = d.writable().and_then(|()| ks.prepare()) {
        return failed(d, aborted(e));
    }
    let me = Holder {
        run_id: ctx.id.clone(),
        pid: std::process::id(),
        host: super::hostname(),
        started_at: crate::time::now(),
    };
    let mut locks = DomainLocks::default();
    match locks.take_keystore(&ks.lock_path(), Some(&me)) {
        Err(e) => return failed(d, aborted(e)),
        Ok(Err(busy)) => {
            let who = busy.holder.map_or("another process".to_string(), |h| h.describe());
            return failed(
                d,
                Failure::new(
                    Outcome::Busy,
                    format!(
                        "the key store lock {} of {} is held by {who} (another sync, or a rotation on this host); \
                         nothing was changed: sync again after it",
                        ks.lock_path().display(),
                        d.name
                    ),
                ),
            );
        }
        Ok(Ok(())) => {}
    }
    let kek = Kek::from_source(&store.kek).map_err(|e| aborted(format!("this host's KEK: {e}")));
    let synced = kek.and_then(|kek| shared::sync_domain(ledger, &ks, &kek, &d.name, &|s| ctx.guard.checkpoint(s)));
    match synced {
        Err(f) => failed(d, past_deadline(ctx, f)),
        Ok(s) => {
            let (outcome, written, reason) = match s.local {
                Local::Unchanged if s.epoch == 0 => ("CURRENT", Vec::new(), "nothing committed yet".to_string()),
                Local::Unchanged => ("CURRENT", Vec::new(), format!("epoch {}: already current", s.epoch)),
                Local::Written(w) => {
                    let reason = format!("epoch {}: wrote {}", s.epoch, w.join(", "));
                    ("SYNCED", w, reason)
                }
            };
            DomainSync {
                domain: d.name.clone(),
                outcome,
                exit_code: 0,
                epoch: Some(s.epoch),
                written,
                reason,
                code: Outcome::Rotated,
            }
        }
    }
}

/// Records the sync in `shared_syncs` and, when it succeeded, the acknowledgement: a
/// copy that is current but not acknowledged does not count for the gate, so a failed
/// acknowledgement fails the sync (3).
fn record(ctx: &Ctx, ledger: &mut Ledger, mut r: DomainSync) -> DomainSync {
    let ack = (r.code == Outcome::Rotated).then(|| SyncAck {
        domain: r.domain.clone(),
        host: ctx.host.clone(),
        pool: ctx.pool.clone(),
        epoch: r.epoch.unwrap_or(0),
        synced_at: crate::time::now(),
    });
    let rec = SyncRecord {
        domain: r.domain.clone(),
        host: ctx.host.clone(),
        pool: Some(ctx.pool.clone()),
        epoch: r.epoch,
        outcome: r.outcome.to_string(),
        exit_code: r.exit_code,
        detail: r.reason.clone(),
    };
    if let Err(e) = ledger.shared_record_sync(&rec, ack.as_ref()) {
        if ack.is_some() {
            r.reason = format!(
                "{}; but the acknowledgement could not be recorded ({e}): sync again",
                r.reason
            );
            r.outcome = Outcome::Aborted.name();
            r.exit_code = Outcome::Aborted.code();
            r.code = Outcome::Aborted;
        } else {
            tracing::warn!("{e}");
        }
    }
    r
}

fn audit(ctx: &Ctx, r: &DomainSync) {
    if let Err(e) = ctx.audit.emit(event(&ctx.id, &ctx.host, &ctx.pool, r)) {
        tracing::warn!("{e}");
    }
}

/// The audit line of one domain's sync outcome.
fn event(id: &str, host: &str, pool: &str, r: &DomainSync) -> Event {
    let event = if r.code == Outcome::Rotated {
        "sync.completed"
    } else {
        "sync.failed"
    };
    Event {
        ts: String::new(),
        event,
        run_id: id.to_string(),
        domain: r.domain.clone(),
        host: host.to_string(),
        pool: Some(pool.to_string()),
        operator: Some(super::operator(None)),
        exit_code: Some(r.exit_code),
        outcome: Some(r.outcome),
        reason: Some(r.reason.clone()),
        ..Event::default()
    }
}

fn print(ctx: &Ctx, results: &[DomainSync], outcome: Outcome, output: OutputFormat) {
    for r in results.iter().filter(|r| r.code != Outcome::Rotated) {
        tracing::error!("{} {}: {}", r.outcome, r.domain, r.reason);
    }
    match output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "host": ctx.host,
            "pool": ctx.pool,
            "exit_code": outcome.code(),
            "domains": results,
        })),
        OutputFormat::Text => {
            if results.is_empty() {
                out!("CURRENT: no shared-store domain in {}", ctx.config.path.display());
            }
            for r in results {
                out!("{} {}: {} ({})", r.outcome, r.domain, r.reason, r.exit_code);
            }
        }
    }
}
