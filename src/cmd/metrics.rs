//! The Prometheus metrics of DESIGN section 12: `status --output prometheus`, and the
//! `[metrics] textfile` that node_exporter's textfile collector reads, rewritten after
//! every `rotate`, `sync`, `resolve` and `status`.
//!
//! The exposition format comes from the `prometheus-client` crate. The textfile is
//! written to a temporary file in the same folder, made 0644 and renamed over the old
//! one, so a scrape sees the old file or the new one, never half of one. It is not
//! fsynced: it is derived data (the ledger and key stores are the truth), the next
//! command rewrites it, and an fsync would add a disk flush to every rotation for
//! nothing; after a power loss the worst case is an empty or old file, which the next
//! command replaces. Failing to write it is a warning: it never changes an outcome.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::DomainStatus;
use crate::config::Config;

type Labels = Vec<(&'static str, String)>;

fn unix_seconds(rfc3339: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| t.timestamp())
}

/// The gauge families keyrotate exports.
struct Gauges {
    last_success: Family<Labels, Gauge>,
    last_run: Family<Labels, Gauge>,
    last_exit: Family<Labels, Gauge>,
    blocked: Family<Labels, Gauge>,
    active: Family<Labels, Gauge>,
    age: Family<Labels, Gauge>,
    next_due: Family<Labels, Gauge>,
    versions: Family<Labels, Gauge>,
    problems: Family<Labels, Gauge>,
    shared_epoch: Family<Labels, Gauge>,
    sync_epoch: Family<Labels, Gauge>,
}

impl Gauges {
    fn register(registry: &mut Registry) -> Gauges {
        let mut gauge = |name: &str, help: &str| {
            let family = Family::<Labels, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        Gauges {
            last_success: gauge(
                "keyrotate_last_success_timestamp_seconds",
                "When the domain's last successful rotation ended (Unix time)",
            ),
            last_run: gauge(
                "keyrotate_last_run_timestamp_seconds",
                "When the domain's last recorded run ended, or started if still running (Unix time)",
            ),
            last_exit: gauge(
                "keyrotate_last_exit_code",
                "Exit code of the domain's last closed run (0 ROTATED, 3 ABORTED, 4 NEEDS_REVIEW, 5 BUSY, 7 NOT_DUE, 8 TIMED_OUT)",
            ),
            blocked: gauge(
                "keyrotate_domain_blocked",
                "1 when the domain is blocked until an engineer runs keyrotate resolve, else 0",
            ),
            active: gauge("keyrotate_active_version", "Version number of the domain's active key"),
            age: gauge(
                "keyrotate_active_key_age_seconds",
                "Seconds since the domain's active key was activated",
            ),
            next_due: gauge(
                "keyrotate_next_due_timestamp_seconds",
                "When the next rotation is due (Unix time); 0 when the domain never rotated successfully",
            ),
            versions: gauge(
                "keyrotate_versions",
                "Key versions in the domain's manifest, by NIST SP 800-57 state",
            ),
            problems: gauge(
                "keyrotate_domain_problems",
                "Problems met reading the domain's key store or ledger (0 when all was readable)",
            ),
            shared_epoch: gauge(
                "keyrotate_shared_epoch",
                "Epoch of a shared-store domain's newest committed keyring",
            ),
            sync_epoch: gauge(
                "keyrotate_sync_epoch",
                "Epoch of the shared keyring each host last acknowledged (keyrotate sync)",
            ),
        }
    }

    /// Sets one domain's gauges (`now` in Unix seconds).
    fn record(&self, s: &DomainStatus, now: i64) {
        let l = vec![("domain", s.domain.clone())];
        if let Some(t) = s.metrics.last_success_at.as_deref().and_then(unix_seconds) {
            self.last_success.get_or_create(&l).set(t);
        }
        if let Some(r) = &s.last_run {
            if let Some(t) = unix_seconds(r.ended_at.as_deref().unwrap_or(&r.started_at)) {
                self.last_run.get_or_create(&l).set(t);
            }
            if let Some(code) = r.exit_code {
                self.last_exit.get_or_create(&l).set(code);
            }
        }
        // Unknown when the ledger could not be read: absent, not 0 (problems says why).
        if !s.ledger_unread {
            self.blocked.get_or_create(&l).set(i64::from(s.blocked_by.is_some()));
        }
        if let Some(v) = s.primary {
            self.active.get_or_create(&l).set(v as i64);
        }
        if let Some(t) = s.primary_activated_at.as_deref().and_then(unix_seconds) {
            self.age.get_or_create(&l).set((now - t).max(0));
        }
        if !s.ledger_unread {
            self.next_due
                .get_or_create(&l)
                .set(s.metrics.next_due_at.map_or(0, |t| t.timestamp()));
        }
        for (state, n) in s.metrics.versions.iter().flatten() {
            let labels = vec![("domain", s.domain.clone()), ("state", (*state).to_string())];
            self.versions.get_or_create(&labels).set(*n as i64);
        }
        self.problems.get_or_create(&l).set(s.problems.len() as i64);
        if let Some(sync) = &s.sync {
            self.shared_epoch.get_or_create(&l).set(sync.epoch);
            for h in &sync.hosts {
                let labels = vec![
                    ("domain", s.domain.clone()),
                    ("host", h.host.clone()),
                    ("pool", h.pool.clone()),
                ];
                self.sync_epoch.get_or_create(&labels).set(h.epoch);
            }
        }
    }
}

/// The metrics of `statuses` in the Prometheus text exposition format.
pub(super) fn render(statuses: &[DomainStatus]) -> String {
    let mut registry = Registry::default();
    let gauges = Gauges::register(&mut registry);
    let now = chrono::Utc::now().timestamp();
    for s in statuses {
        gauges.record(s, now);
    }
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// Rewrites the textfile, if one is configured, from the state of every domain now.
pub(crate) fn write_textfile(config: &Config) {
    if config.metrics_textfile.is_none() {
        return;
    }
    // A narrowed load validated one domain; the textfile carries every one.
    let all = config.all_domains();
    let domains: Vec<_> = all.iter().collect();
    write_from(config, &super::collect(config, &domains));
}

/// Rewrites the textfile, if one is configured, from `statuses` (every domain).
pub(super) fn write_from(config: &Config, statuses: &[DomainStatus]) {
    let Some(path) = &config.metrics_textfile else {
        return;
    };
    if let Err(e) = replace_0644(path, render(statuses).as_bytes()) {
        tracing::warn!(
            "metrics textfile {}: {}; it keeps its previous content until a later command writes it",
            path.display(),
            crate::fsutil::io_reason(&e)
        );
    }
}

/// Replaces `path` atomically (temporary file in the same folder, then rename) with a
/// world-readable file: node_exporter runs as its own user.
fn replace_0644(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Not ending in .prom: the collector must never read the half-written file.
    let mut tmp = tempfile::Builder::new()
        .prefix(".keyrotate-metrics")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
