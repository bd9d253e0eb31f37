//! The built-in key store backend: DESIGN.md section 4.2, step by step.
//!
//! Before the commit point every failure removes what this run staged and leaves the
//! old manifest authoritative. The commit is one atomic `keyring.json` replacement.
//! After it, failures are warnings: the rotation stands and the next run tidies up.

use std::collections::BTreeMap;

use chrono::Utc;

use super::{Rotated, Step};
use crate::config::Activation;
use crate::fsutil::DirSync;
use crate::keystore::manifest::{self, Manifest, Plan};
use crate::keystore::{Algorithm, Inspection, KeyFile, Keystore};
use crate::outcome::{Failure, Outcome};

pub struct KeystoreRotation<'a> {
    pub keystore: Keystore,
    pub algorithm: Algorithm,
    pub activation: Activation,
    pub retain: u32,
    pub step: Step<'a>,
}

fn aborted(what: String) -> Failure {
    Failure::new(Outcome::Aborted, what)
}

impl KeystoreRotation<'_> {
    pub fn run(mut self) -> Result<Rotated, Failure> {
        let guard = self.step.guard.clone();
        let ks = self.keystore.clone();

        guard.checkpoint("inspect")?;
        ks.prepare().map_err(aborted)?;
        let inspection = ks.inspect().map_err(|d| {
            Failure::new(
                Outcome::NeedsReview,
                format!("key store is inconsistent, nothing was changed: {d}"),
            )
        })?;
        if !inspection.leftovers.is_empty() {
            guard.checkpoint("sweep")?;
            ks.sweep(&inspection.leftovers).map_err(|e| {
                aborted(format!(
                    "cannot remove files left by an interrupted run: {}",
                    crate::fsutil::io_reason(&e)
                ))
            })?;
            tracing::info!(
                files = inspection.leftovers.len(),
                "removed files left by an interrupted run"
            );
        }
        let plan = inspection
            .manifest
            .plan(self.algorithm, self.activation, self.retain, inspection.next_version);

        guard.checkpoint("generate")?;
        let keys: Vec<KeyFile> = plan
            .create
            .iter()
            .map(|n| n.algorithm.generate())
            .collect::<Result<_, _>>()
            .map_err(|e| aborted(format!("key generation failed: {e}")))?;

        let mut staged = Vec::new();
        let result = self.stage_and_commit(&inspection, &plan, &keys, &mut staged);
        match result {
            Ok(rotated) => Ok(rotated),
            Err(f) => {
                // Before the commit: put the folder back as the old manifest describes.
                guard.stand_down();
                if let Err(e) = ks.unstage(&staged) {
                    tracing::warn!(
                        "could not remove staged files ({}); the next run removes them",
                        crate::fsutil::io_reason(&e)
                    );
                }
                if let Err(e) = ks.publish_jwks(&inspection.manifest, &inspection.publics, DirSync::Now) {
                    tracing::warn!(
                        "could not restore jwks.json ({}); the next rotation rewrites it",
                        crate::fsutil::io_reason(&e)
                    );
                }
                Err(f)
            }
        }
    }

    /// Steps 2 to 6. Returns `Err` only before the commit point, with `staged` naming
    /// the files to remove.
    fn stage_and_commit(
        &mut self,
        inspection: &Inspection,
        plan: &Plan,
        keys: &[KeyFile],
        staged: &mut Vec<String>,
    ) -> Result<Rotated, Failure> {
        let guard = self.step.guard.clone();
        let ks = self.keystore.clone();
        let run_id = self.step.run.run_id.clone();
        let io = |what: &str, e: std::io::Error| aborted(format!("{what}: {}", crate::fsutil::io_reason(&e)));

        for (n, key) in plan.create.iter().zip(keys) {
            guard.checkpoint("stage")?;
            let file = manifest::version_file(n.version, n.algorithm);
            // Record the name before writing: a failed write may leave a partial file.
            staged.push(file.clone());
            ks.stage(&file, key)
                .map_err(|e| io(&format!("cannot stage {file}"), e))?;
        }
        let new_versions: Vec<String> = plan.create.iter().map(|n| format!("v{}", n.version)).collect();
        self.step
            .advance(
                "staged",
                (plan.from_version, Some(plan.to_version)),
                &format!("staged {}", new_versions.join(", ")),
            )
            .map_err(aborted)?;

        guard.checkpoint("verify")?;
        for (file, key) in staged.iter().zip(keys) {
            ks.verify_staged(file, key.algorithm(), key.fingerprint())
                .map_err(aborted)?;
        }

        let now = Utc::now();
        let fingerprints: Vec<String> = keys.iter().map(|k| k.fingerprint().to_string()).collect();
        let next = inspection.manifest.rotated(plan, &fingerprints, &run_id, now);
        let mut publics: BTreeMap<u64, _> = inspection.publics.clone();
        for (n, key) in plan.create.iter().zip(keys) {
            if let Some(p) = key.public() {
                publics.insert(n.version, p.clone());
            }
        }
        guard.checkpoint("publish")?;
        // Verifiers must know every new public key before it can sign anything, and
        // must keep the ones this rotation will destroy until the commit stands.
        let preview = inspection.manifest.rotated(
            &Plan {
                destroy: Vec::new(),
                ..plan.clone()
            },
            &fingerprints,
            &run_id,
            now,
        );
        let published = ks
            .publish_jwks(&preview, &publics, DirSync::Now)
            .map_err(|e| io("cannot write jwks.json", e))?;
        if !published {
            // No JWKS folder sync happened: make the staged names durable before the
            // manifest can refer to them.
            ks.sync_folder("stage")
                .map_err(|e| io("cannot sync the key folder", e))?;
        }

        // Fencing: on a shared ledger the lock may have been lost with its session.
        self.step.confirm_lock("the key-store commit", false)?;
        guard.enter_commit()?;
        if let Err(e) = ks.commit(&next) {
            return match ks.inspect() {
                Ok(i) if i.manifest == inspection.manifest => {
                    Err(io("cannot write keyring.json (the old one stands)", e))
                }
                _ => {
                    staged.clear();
                    Err(Failure::new(
                        Outcome::NeedsReview,
                        format!(
                            "keyring.json was replaced but its folder could not be synced ({}): the commit may not survive a power loss",
                            crate::fsutil::io_reason(&e)
                        ),
                    ))
                }
            };
        }
        staged.clear();

        // Past the commit point: the rotation stands whatever happens next.
        let old_active = inspection.manifest.active();
        let new_active = next.active();
        let mut rotated = Rotated {
            from_version: old_active.map(|v| v.version),
            to_version: new_active.map(|v| v.version),
            from_fingerprint: old_active.map(|v| v.fingerprint.clone()),
            to_fingerprint: new_active.map(|v| v.fingerprint.clone()),
            warnings: Vec::new(),
            summary: summary(plan, &next),
        };
        let recorded = self.step.committed(&rotated);
        let warn =
            |what: &str, e: std::io::Error| format!("{what}: {} (the next run retries)", crate::fsutil::io_reason(&e));
        // The tidy-up: three independent atomic changes, made durable by one folder
        // sync (any subset surviving a power loss is consistent, and the next run
        // redoes what is missing).
        if let Err(e) = ks.point_current(&next, DirSync::Deferred) {
            rotated.warnings.push(warn("cannot update the current symlink", e));
        }
        if let Err(e) = ks.destroy_files(&next, &plan.destroy, DirSync::Deferred) {
            rotated.warnings.push(warn("cannot unlink destroyed versions", e));
        }
        if let Err(e) = ks.publish_jwks(&next, &publics, DirSync::Deferred) {
            rotated.warnings.push(warn("cannot rewrite jwks.json", e));
        }
        if let Err(e) = ks.sync_folder("tidy") {
            rotated.warnings.push(warn("cannot sync the key folder", e));
        }
        recorded?;
        Ok(rotated)
    }
}

fn summary(plan: &Plan, next: &Manifest) -> String {
    let v = |n: Option<u64>| n.map_or("none".to_string(), |n| format!("v{n}"));
    let mut s = format!("active {} -> {}", v(plan.from_version), v(Some(plan.to_version)));
    if let Some(p) = next.pending() {
        s.push_str(&format!(", pending v{}", p.version));
    }
    if let Some(a) = next.active() {
        s.push_str(&format!(" ({} {})", a.algorithm, a.fingerprint));
    }
    if !plan.destroy.is_empty() {
        let d: Vec<String> = plan.destroy.iter().map(|n| format!("v{n}")).collect();
        s.push_str(&format!(", destroyed {}", d.join(", ")));
    }
    s
}
