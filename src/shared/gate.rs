//! The convergence gate (DESIGN 9): a `prepublish` rotation promotes the pending
//! version only when every host seen within `sync_ttl` acknowledged an epoch that
//! contains it, and every pool of `require_pools` has at least one such host. Hosts
//! not seen within `sync_ttl` are stale: they never hold a promotion back, and are
//! never counted as converged (a required pool whose only host is stale is missing).
//! A pure decision over the acknowledgements, so the real run and the dry run judge
//! alike.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::ledger::SyncAck;

/// The gate's verdict for one pending version.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Convergence {
    /// Hosts seen within `sync_ttl` that hold the pending version.
    pub converged: Vec<SyncAck>,
    /// Hosts seen within `sync_ttl` whose copy does not hold it yet.
    pub lagging: Vec<SyncAck>,
    /// Hosts not seen within `sync_ttl`.
    pub stale: Vec<SyncAck>,
    /// Required pools without a converged host.
    pub missing_pools: Vec<String>,
}

/// Whether an acknowledgement is older than `ttl` (an unreadable time counts as
/// stale: never as converged).
pub fn is_stale(ack: &SyncAck, ttl: Duration, now: DateTime<Utc>) -> bool {
    match DateTime::parse_from_rfc3339(&ack.synced_at) {
        Ok(t) => {
            now.signed_duration_since(t.with_timezone(&Utc))
                .to_std()
                .unwrap_or_default()
                > ttl
        }
        Err(_) => true,
    }
}

/// Judges `acks` for a version first contained in epoch `needed`.
pub fn judge(
    acks: &[SyncAck],
    needed: i64,
    require_pools: &[String],
    ttl: Duration,
    now: DateTime<Utc>,
) -> Convergence {
    let mut c = Convergence::default();
    for a in acks {
        if is_stale(a, ttl, now) {
            c.stale.push(a.clone());
        } else if a.epoch >= needed {
            c.converged.push(a.clone());
        } else {
            c.lagging.push(a.clone());
        }
    }
    c.missing_pools = require_pools
        .iter()
        .filter(|p| !c.converged.iter().any(|a| &a.pool == *p))
        .cloned()
        .collect();
    c
}

fn names(acks: &[SyncAck]) -> String {
    acks.iter()
        .map(|a| {
            format!(
                "{} (pool {}, epoch {}, synced {})",
                a.host, a.pool, a.epoch, a.synced_at
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Convergence {
    pub fn ok(&self) -> bool {
        self.lagging.is_empty() && self.missing_pools.is_empty()
    }

    /// The note on stale hosts a run's report carries (promoted or not).
    pub fn stale_note(&self) -> Option<String> {
        (!self.stale.is_empty()).then(|| {
            format!(
                "stale hosts (not seen within sync_ttl, not counted as converged): {}",
                names(&self.stale)
            )
        })
    }

    /// Why the promotion of `version` (first in epoch `needed`) waits: lagging hosts,
    /// missing pools, and the stale hosts, by name.
    pub fn refusal(&self, version: u64, needed: i64) -> String {
        let mut parts = Vec::new();
        if !self.lagging.is_empty() {
            parts.push(format!("lagging hosts: {}", names(&self.lagging)));
        }
        if !self.missing_pools.is_empty() {
            parts.push(format!(
                "required pools without a host that holds it: {}",
                self.missing_pools.join(", ")
            ));
        }
        parts.extend(self.stale_note());
        format!(
            "convergence gate: pending v{version} (epoch {needed}) is not on every host yet, so it was not promoted; {}; \
             run `keyrotate sync` on those hosts, then rotate again; nothing was changed",
            parts.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(host: &str, pool: &str, epoch: i64, ago_secs: i64) -> SyncAck {
        SyncAck {
            domain: "d".into(),
            host: host.into(),
            pool: pool.into(),
            epoch,
            synced_at: crate::time::rfc3339(Utc::now() - chrono::Duration::seconds(ago_secs)),
        }
    }

    #[test]
    fn lagging_stale_and_missing_pools() {
        let ttl = Duration::from_secs(3600);
        let now = Utc::now();
        let acks = [ack("a1", "a", 3, 10), ack("b1", "b", 2, 10), ack("c1", "c", 1, 7200)];
        let c = judge(&acks, 3, &["a".into(), "b".into(), "c".into()], ttl, now);
        assert!(!c.ok());
        assert_eq!(c.lagging, [acks[1].clone()]);
        assert_eq!(c.stale, [acks[2].clone()]);
        assert_eq!(c.missing_pools, ["b", "c"]);
        let msg = c.refusal(5, 3);
        assert!(
            msg.contains("b1") && msg.contains("c1") && msg.contains("stale"),
            "{msg}"
        );
        // A stale host never holds the promotion back, but a required pool whose only
        // host is stale is still missing.
        let c = judge(&acks[..1], 3, &[], ttl, now);
        assert!(c.ok());
        let c = judge(&[acks[0].clone(), ack("c1", "c", 9, 7200)], 3, &["c".into()], ttl, now);
        assert!(!c.ok() && c.missing_pools == ["c"]);
        // Garbage in synced_at is stale, not converged.
        let mut bad = ack("x", "a", 9, 0);
        bad.synced_at = "yesterday".into();
        assert!(is_stale(&bad, ttl, now));
    }
}
