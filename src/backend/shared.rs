//! The shared key store as a rotation backend (DESIGN 9), for `store = "shared"`.
//!
//! A run on the designated host, after the same admission as every rotation:
//!
//! 1. preflight (the same for the dry run): load the KEK, read the newest committed
//!    keyring in one snapshot, open and verify every live version with the KEK (a host
//!    with another KEK stops here, before sealing anything nobody else could open),
//!    plan with the local store's rules ([`Manifest::plan`]), and for a promotion pass
//!    the convergence gate ([`crate::shared::gate`]);
//! 2. generate the new keys in memory (self-tested), seal them under the KEK;
//! 3. **commit**: one PostgreSQL transaction inserts the versions, changes the states
//!    (a destroyed version loses its sealed material), bumps the epoch *only if it is
//!    still the one read in 1* (the fencing token: a run that lost its advisory lock
//!    can never commit over another run's work) and moves the run's ledger row to
//!    `committed`. Nothing is visible, and nothing is written anywhere, before it: a
//!    crash before the commit leaves nothing to sweep;
//! 4. sync this host's own copy (a failure is a warning: `keyrotate sync` repairs it).
//!
//! `keyrotate revoke` on a shared domain (DESIGN 11) is the same run with
//! [`Manifest::revoke_plan`] as the plan: in the one commit transaction the version
//! becomes `compromised` (time, reason) and loses its sealed material, and its
//! replacement (the pending version promoted, or a fresh key) is inserted sealed. Every
//! other host's next `sync` drops it from `jwks.json` and unlinks its private file.
//!
//! The convergence gate does not hold a revocation back. A leaked active key keeps
//! signing until the revocation commits, on every host that trusts it: refusing would
//! trade a verification outage on a lagging host (which recovers with its next `sync`)
//! for the attacker's continued use of the key everywhere. The gate is still judged,
//! and the lagging hosts and pools (and the stale ones) are named in the outcome and
//! in the dry run, so the operator knows which hosts to sync at once.

use chrono::Utc;

use super::keystore::Revocation;
use super::{Rotated, Step};
use crate::audit::Event;
use crate::config::{Activation, SharedStore};
use crate::kek::Kek;
use crate::keystore::manifest::{now_rfc3339, Manifest, Plan};
use crate::keystore::{Algorithm, KeyFile, Keystore};
use crate::ledger::{
    Fenced, Ledger, RunRow, RunState, SharedCommit, SharedKeyring, SharedVersion, SyncAck, SyncRecord, VersionUpdate,
};
use crate::outcome::{Failure, Outcome};
use crate::shared::{self, gate, Local};

pub struct SharedBackend {
    /// This host's local copy (what `sync` writes; its lock is the run's key store lock).
    pub keystore: Keystore,
    pub algorithm: Algorithm,
    pub activation: Activation,
    pub retain: u32,
    pub store: SharedStore,
    /// Set for `keyrotate revoke`.
    pub revoke: Option<Revocation>,
}

fn aborted(what: String) -> Failure {
    Failure::new(Outcome::Aborted, what)
}

/// What the preflight established (the dry run stops here).
struct Preflight {
    kek: Kek,
    ring: SharedKeyring,
    manifest: Manifest,
    plan: Plan,
    /// The gate's verdict, when the plan promotes.
    gate: Option<gate::Convergence>,
}

impl SharedBackend {
    fn domain(&self) -> &str {
        self.keystore.domain()
    }

    fn kek(&self) -> Result<Kek, Failure> {
        Kek::from_source(&self.store.kek).map_err(|e| aborted(format!("this host's KEK: {e}; nothing was changed")))
    }

    /// Step 1, for the real run and the dry run alike: the same refusal, word for word.
    fn preflight(&self, ledger: Option<&Ledger>) -> Result<Preflight, Failure> {
        let domain = self.domain();
        let kek = self.kek()?;
        let ring = match ledger {
            Some(l) => l
                .shared_keyring(domain)
                .map_err(|e| aborted(format!("{e}; nothing was changed")))?,
            // A dry run before the tables exist: the keyring is empty.
            None => SharedKeyring::default(),
        };
        let opened = shared::open_keyring(domain, &ring, &kek).map_err(|e| {
            aborted(format!(
                "the shared keyring of {domain} (epoch {}) does not verify on this host: {e}; nothing was changed",
                ring.epoch
            ))
        })?;
        let next = opened.manifest.max_version() + 1;
        let plan = match &self.revoke {
            None => opened.manifest.plan(self.algorithm, self.activation, self.retain, next),
            Some(r) => {
                opened
                    .manifest
                    .revocable(r.version)
                    .map_err(|e| Failure::new(Outcome::Usage, format!("{e}; nothing was changed")))?;
                opened
                    .manifest
                    .revoke_plan(r.version, &r.reason, self.algorithm, self.activation, next)
            }
        };
        let gate = match (plan.promote, ledger) {
            (Some(p), Some(l)) => {
                let needed = ring.versions.iter().find(|v| v.version == p).map_or(0, |v| v.epoch);
                let acks = l
                    .shared_acks(domain)
                    .map_err(|e| aborted(format!("{e}; nothing was changed")))?;
                let c = gate::judge(
                    &acks,
                    needed,
                    &self.store.require_pools,
                    self.store.sync_ttl,
                    Utc::now(),
                );
                // A revocation is not held back (see the module header): it names them.
                if !c.ok() && self.revoke.is_none() {
                    return Err(aborted(c.refusal(p, needed)));
                }
                Some(c)
            }
            _ => None,
        };
        Ok(Preflight {
            kek,
            ring,
            manifest: opened.manifest,
            plan,
            gate,
        })
    }

    /// Steps 2 and 3 for a preflight: the versions to insert and the state changes.
    fn commit_of(&self, pf: &Preflight, keys: &[KeyFile], run_id: &str) -> Result<(SharedCommit, Manifest), Failure> {
        let now = Utc::now();
        let ts = now_rfc3339(now);
        let fingerprints: Vec<String> = keys.iter().map(|k| k.fingerprint().to_string()).collect();
        let next = pf.manifest.rotated(&pf.plan, &fingerprints, run_id, now);
        let mut inserts = Vec::new();
        for (n, key) in pf.plan.create.iter().zip(keys) {
            let sealed = pf
                .kek
                .seal(self.domain(), n.version, key.fingerprint(), key.file_bytes())
                .map_err(|e| aborted(format!("{e}; nothing was changed")))?;
            let entry = next
                .get(n.version)
                .expect("the plan's versions are in the next manifest");
            inserts.push(SharedVersion {
                version: n.version,
                state: n.state,
                algorithm: n.algorithm.name().to_string(),
                fingerprint: key.fingerprint().to_string(),
                public_pem: key.public().map(crate::keystore::PublicKey::pem),
                sealed: Some(sealed),
                created_at: ts.clone(),
                activated_at: entry.activated_at.clone(),
                retired_at: None,
                destroyed_at: None,
                compromised_at: None,
                compromise_reason: None,
                created_by_run: run_id.to_string(),
                epoch: 0,
            });
        }
        let updates = next
            .versions
            .iter()
            .filter(|v| pf.manifest.get(v.version).is_some_and(|old| old != *v))
            .map(|v| VersionUpdate {
                version: v.version,
                state: v.state,
                activated_at: v.activated_at.clone(),
                retired_at: v.retired_at.clone(),
                destroyed_at: v.destroyed_at.clone(),
                compromised_at: v.compromised_at.clone(),
                compromise_reason: v.compromise_reason.clone(),
            })
            .collect();
        let commit = SharedCommit {
            domain: self.domain().to_string(),
            from_epoch: pf.ring.epoch,
            run_id: run_id.to_string(),
            at: ts,
            inserts,
            updates,
        };
        Ok((commit, next))
    }

    /// Step 3: the one transaction. `Ok(epoch)` when it committed.
    fn commit(&self, step: &mut Step<'_>, commit: &SharedCommit, rotated: &Rotated) -> Result<i64, Failure> {
        let run_id = step.run.run_id.clone();
        let mut fenced: Option<Fenced> = None;
        let mut epoch = 0;
        // Whether every statement succeeded: only then may a failure be the COMMIT's,
        // whose fate is unknown. Before that, the server rolled everything back.
        let mut complete = false;
        let versions = (rotated.from_version, rotated.to_version);
        let res = step.ledger.write("shared_commit", |w| {
            match w.shared_commit(commit)? {
                Ok(e) => epoch = e,
                Err(f) => {
                    fenced = Some(f);
                    return Err("fenced".into());
                }
            }
            w.advance(&run_id, RunState::Committed, versions, &rotated.summary)?;
            complete = true;
            Ok(())
        });
        let Err(e) = res else {
            return Ok(epoch);
        };
        if let Some(f) = fenced {
            return Err(aborted(format!(
                "epoch fence: the shared keyring of {} is at epoch {} (committed by run {}), not at epoch {} which \
                 this run started from: another run committed meanwhile (did this run lose its lock?); nothing was \
                 committed",
                commit.domain,
                f.epoch,
                f.committed_run.as_deref().unwrap_or("?"),
                commit.from_epoch
            )));
        }
        if !complete {
            return Err(aborted(format!(
                "the commit transaction failed before its end ({e}): the server rolled it back, nothing was committed"
            )));
        }
        // A connection lost around the COMMIT leaves its fate unknown until the
        // keyring is read again.
        match step.ledger.shared_keyring(&commit.domain) {
            Ok(ring) if ring.committed_run.as_deref() == Some(run_id.as_str()) => Ok(ring.epoch),
            Ok(_) => Err(aborted(format!(
                "the commit transaction failed ({e}); the shared keyring does not have it: nothing was committed"
            ))),
            Err(again) => Err(Failure::new(
                Outcome::NeedsReview,
                format!(
                    "the commit transaction failed ({e}) and the keyring cannot be read to tell whether it \
                     happened ({again}): check the shared keyring's committed_run, then resolve"
                ),
            )),
        }
    }

    /// Step 4: this host's own copy, and its acknowledgement. A warning on failure.
    fn sync_own_copy(&self, step: &mut Step<'_>, kek: &Kek) -> Option<String> {
        let domain = self.domain().to_string();
        let synced = shared::sync_domain(step.ledger, &self.keystore, kek, &domain, &|_| Ok(()));
        let pool = step.run.pool.clone().unwrap_or_default();
        match synced {
            Ok(s) => {
                let detail = match &s.local {
                    Local::Unchanged => "already current".to_string(),
                    Local::Written(files) => format!("wrote {}", files.join(" ")),
                };
                let ack = SyncAck {
                    domain: domain.clone(),
                    host: self.store.host.clone(),
                    pool: pool.clone(),
                    epoch: s.epoch,
                    synced_at: crate::time::now(),
                };
                let record = SyncRecord {
                    domain,
                    host: self.store.host.clone(),
                    pool: Some(pool),
                    epoch: Some(s.epoch),
                    outcome: "SYNCED".into(),
                    exit_code: 0,
                    detail: format!("by run {}: {detail}", step.run.run_id),
                };
                step.ledger.shared_record_sync(&record, Some(&ack)).err().map(|e| {
                    format!(
                        "this host's copy is synced but its acknowledgement was not recorded ({e}): run keyrotate sync"
                    )
                })
            }
            Err(f) => Some(format!(
                "this host's copy was not synced ({}): run keyrotate sync",
                f.message
            )),
        }
    }
}

/// What a revocation that promoted `version` past a gate that did not pass says: the
/// lagging hosts and the required pools without a host that holds it (they cannot
/// verify the new active key until their next `sync`). `None` when the gate passed.
fn gate_note(c: &gate::Convergence, version: u64) -> Option<String> {
    if c.ok() {
        return None;
    }
    let mut parts = Vec::new();
    if !c.lagging.is_empty() {
        let hosts: Vec<String> = c
            .lagging
            .iter()
            .map(|a| format!("{} (pool {}, epoch {})", a.host, a.pool, a.epoch))
            .collect();
        parts.push(format!("lagging hosts: {}", hosts.join(", ")));
    }
    if !c.missing_pools.is_empty() {
        parts.push(format!(
            "required pools without a host that holds it: {}",
            c.missing_pools.join(", ")
        ));
    }
    Some(format!(
        "convergence gate not passed, waived for the revocation (a leaked key must stop signing now): v{version} is \
         not on every host yet; {}; run keyrotate sync there at once",
        parts.join("; ")
    ))
}

impl SharedBackend {
    /// The audit trail's record of a revocation (DESIGN 11), as the local store's.
    fn audit_compromise(&self, step: &Step<'_>, before: &Manifest, version: u64, reason: &str, r: &Rotated) {
        let audited = step.audit.emit(Event {
            reason: Some(format!("v{version} compromised: {reason}")),
            from_version: Some(version),
            from_fingerprint: before.get(version).map(|v| v.fingerprint.clone()),
            to_version: r.to_version,
            to_fingerprint: r.to_fingerprint.clone(),
            ..Event::of("key.compromised", step.run)
        });
        if let Err(e) = audited {
            tracing::warn!("{e}");
        }
    }
}

fn summary(plan: &Plan, next: &Manifest, epoch: Option<i64>) -> String {
    let mut s = super::keystore::summary(plan, next, "sealed key erased, unpublished at every host's next sync");
    if let Some(e) = epoch {
        s.push_str(&format!(", shared keyring epoch {e}"));
    }
    s
}

impl super::RotationBackend for SharedBackend {
    fn budget(&self) -> std::time::Duration {
        super::keystore::keygen_budget(self.algorithm)
    }

    fn watchdog_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    fn plan(&self, ledger: Option<&Ledger>, plan: &mut Vec<String>) -> Result<super::Planned, Failure> {
        let pf = self
            .preflight(ledger)
            .inspect_err(|f| plan.push(format!("shared store: {}", f.message)))?;
        plan.push(format!(
            "shared keyring: epoch {}{}",
            pf.ring.epoch,
            pf.ring
                .committed_run
                .as_deref()
                .map(|r| format!(" (committed by run {r})"))
                .unwrap_or_else(|| " (nothing committed yet)".into())
        ));
        for n in &pf.plan.create {
            plan.push(
                format!(
                    "create: v{} ({}, {:?}), sealed under the KEK",
                    n.version, n.algorithm, n.state
                )
                .to_lowercase(),
            );
        }
        if let Some(v) = pf.plan.promote {
            plan.push(format!("promote: v{v} pending -> active"));
        }
        if let Some((n, reason)) = &pf.plan.compromise {
            plan.push(format!(
                "compromise: v{n} -> compromised ({reason}); its sealed key is erased in the commit, every host's \
                 next sync unpublishes it and unlinks its file"
            ));
        }
        if let Some(c) = &pf.gate {
            match gate_note(c, pf.plan.promote.unwrap_or_default()) {
                Some(note) => plan.push(note),
                None => plan.push(format!(
                    "convergence gate: passed ({} host(s) hold it)",
                    c.converged.len()
                )),
            }
            if let Some(note) = c.stale_note() {
                plan.push(note);
            }
        }
        for v in &pf.plan.retire {
            plan.push(format!("retire: v{v}"));
        }
        for v in &pf.plan.destroy {
            plan.push(format!(
                "destroy: v{v} (beyond retain = {}; its sealed key is erased)",
                self.retain
            ));
        }
        plan.push(format!(
            "commit: one PostgreSQL transaction (versions, states, epoch {} -> {} only if still {}, the ledger row); then sync this host's copy in {}",
            pf.ring.epoch,
            pf.ring.epoch + 1,
            pf.ring.epoch,
            self.keystore.dir().display()
        ));
        let v = |n: Option<u64>| n.map_or("none".into(), |n| format!("v{n}"));
        let verb = match &pf.plan.compromise {
            Some((n, _)) => format!("would revoke v{n}"),
            None => "would rotate".into(),
        };
        Ok(super::Planned {
            summary: format!(
                "{verb}: active {} -> {}",
                v(pf.plan.from_version),
                v(Some(pf.plan.to_version))
            ),
            versions: (pf.plan.from_version, Some(pf.plan.to_version)),
        })
    }

    fn diagnose(&self, dead: &RunRow, last_step: Option<&str>, ledger: Option<&Ledger>, _this_host: &str) -> String {
        let step = last_step
            .map(|s| format!("its last recorded step was '{s}'; "))
            .unwrap_or_default();
        let Some(ring) = ledger.and_then(|l| l.shared_keyring(self.domain()).ok()) else {
            return format!("{step}the shared keyring could not be read: check whether it committed");
        };
        let mine: Vec<String> = ring
            .versions
            .iter()
            .filter(|v| v.created_by_run == dead.run_id)
            .map(|v| format!("v{}", v.version))
            .collect();
        if mine.is_empty() && ring.committed_run.as_deref() != Some(dead.run_id.as_str()) {
            format!(
                "{step}the shared keyring is at epoch {} (committed by run {}), with nothing of that run: it did not \
                 commit, the old key state stands (a shared rotation writes nothing before its commit: nothing to sweep)",
                ring.epoch,
                ring.committed_run.as_deref().unwrap_or("none")
            )
        } else {
            format!(
                "{step}the shared keyring (epoch {}) has {} created by that run: it did commit; every host's copy \
                 follows with `keyrotate sync`",
                ring.epoch,
                mine.join(", ")
            )
        }
    }

    fn check(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        problems.extend(crate::kek::check(&self.store.kek).into_iter().map(|e| ("kek", e)));
        if let Err(e) = self.keystore.check_folders() {
            problems.push(("keystore", e));
        } else if let Err(e) = self.keystore.inspect() {
            problems.push((
                "keystore",
                format!("this host's copy does not verify: {e} (keyrotate sync rewrites it)"),
            ));
        }
        problems
    }

    fn run(&self, mut step: Step<'_>, _undo: super::PreCommitUndo) -> Result<Rotated, Failure> {
        // Nothing is written before the commit: the watchdog has nothing to undo.
        let guard = step.guard.clone();
        guard.checkpoint("inspect")?;
        let pf = self.preflight(Some(&*step.ledger))?;
        guard.checkpoint("generate")?;
        let keys: Vec<KeyFile> = pf
            .plan
            .create
            .iter()
            .map(|n| n.algorithm.generate())
            .collect::<Result<_, _>>()
            .map_err(|e| aborted(format!("key generation failed: {e}")))?;
        let run_id = step.run.run_id.clone();
        let (commit, next) = self.commit_of(&pf, &keys, &run_id)?;
        let old_active = pf.manifest.active();
        let new_active = next.active();
        let mut rotated = Rotated {
            from_version: old_active.map(|v| v.version),
            to_version: new_active.map(|v| v.version),
            from_fingerprint: old_active.map(|v| v.fingerprint.clone()),
            to_fingerprint: new_active.map(|v| v.fingerprint.clone()),
            warnings: Vec::new(),
            summary: summary(&pf.plan, &next, Some(pf.ring.epoch + 1)),
        };
        step.confirm_lock("the shared keyring commit", false)?;
        guard.checkpoint("commit")?;
        guard.enter_commit()?;
        let epoch = self.commit(&mut step, &commit, &rotated)?;
        rotated.summary = summary(&pf.plan, &next, Some(epoch));
        if let Some(note) = pf
            .gate
            .as_ref()
            .and_then(|c| gate_note(c, pf.plan.promote.unwrap_or_default()))
        {
            rotated.summary.push_str(&format!("; {note}"));
        }
        if let Some(note) = pf.gate.as_ref().and_then(gate::Convergence::stale_note) {
            rotated.summary.push_str(&format!("; {note}"));
        }
        if let Some((n, reason)) = &pf.plan.compromise {
            self.audit_compromise(&step, &pf.manifest, *n, reason, &rotated);
        }
        if let Err(e) = step.audit.emit(Event {
            reason: Some(rotated.summary.clone()),
            from_version: rotated.from_version,
            to_version: rotated.to_version,
            from_fingerprint: rotated.from_fingerprint.clone(),
            to_fingerprint: rotated.to_fingerprint.clone(),
            ..Event::of("rotation.committed", step.run)
        }) {
            tracing::warn!("{e}");
        }
        rotated.warnings.extend(self.sync_own_copy(&mut step, &pf.kek));
        Ok(rotated)
    }
}
