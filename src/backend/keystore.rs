//! The built-in key store backend: DESIGN.md section 4.2, step by step.
//!
//! Before the commit point every failure removes what this run staged and leaves the
//! old manifest authoritative. The commit is one atomic `keyring.json` replacement.
//! After it, failures are warnings: the rotation stands and the next run tidies up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;

use super::{Rotated, Step};
use crate::config::Activation;
use crate::fsutil::DirSync;
use crate::keystore::manifest::{Manifest, Plan};
use crate::keystore::{judge, Algorithm, Inspection, KeyFile, Keystore, PublicKey, Verdict};
use crate::ledger::{Ledger, RunRow, RunState};
use crate::outcome::{Failure, Outcome};

/// What `keyrotate revoke` asks of the key store: this version is compromised.
#[derive(Clone, Debug)]
pub struct Revocation {
    pub version: u64,
    pub reason: String,
}

pub struct KeystoreRotation<'a> {
    pub keystore: Keystore,
    pub algorithm: Algorithm,
    pub activation: Activation,
    pub retain: u32,
    /// A revocation instead of a scheduled rotation.
    pub revoke: Option<Revocation>,
    pub step: Step<'a>,
    /// What the deadline watchdog undoes if it abandons this run before the commit.
    pub undo: PreCommitUndo,
}

fn aborted(what: String) -> Failure {
    Failure::new(Outcome::Aborted, what)
}

/// Why a key store could not be judged.
#[derive(Debug)]
pub enum ExamineError {
    /// The store does not verify: the diagnosis.
    Store(String),
    /// The ledger could not be read.
    Ledger(String),
}

impl std::fmt::Display for ExamineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExamineError::Store(d) | ExamineError::Ledger(d) => f.write_str(d),
        }
    }
}

impl ExamineError {
    /// How a run (real or dry) stops on it.
    pub fn refusal(self) -> Failure {
        match self {
            ExamineError::Store(d) => Failure::new(
                Outcome::NeedsReview,
                format!("key store is inconsistent, nothing was changed: {d}"),
            ),
            ExamineError::Ledger(e) => aborted(format!("{e}; no key was touched")),
        }
    }
}

/// A key store on a file system that is (almost) full is refused before anything is
/// written, by the real run and the dry run alike, on the same measure as the audit
/// file's (`fsutil::fs_trouble`): otherwise the dry run predicts 0 and the real run
/// stops half-way with "no space left" (a revocation that cannot even rewrite
/// jwks.json, after the operator was told it would work).
fn room_to_write(ks: &Keystore) -> Result<(), Failure> {
    let folder = if ks.dir().is_dir() { ks.dir() } else { ks.root() };
    match crate::fsutil::fs_trouble(folder) {
        Some(why) if folder.is_dir() => Err(aborted(format!(
            "key store {}: {why}; no key was touched: free some space, then run again",
            folder.display()
        ))),
        _ => Ok(()),
    }
}

/// The refusal a judged key store calls for (NEEDS_REVIEW with its diagnosis), if any:
/// the same for the real run and the dry run. A revocation (`revoking`) goes ahead on a
/// store whose only problem is a compromised key listed as usable again: revoking it
/// again is the repair.
pub fn refusal(verdict: &Verdict, domain: &str, revoking: bool) -> Option<Failure> {
    if revoking && verdict.revocable() {
        return None;
    }
    verdict.diagnosis(domain).map(|d| Failure::new(Outcome::NeedsReview, d))
}

/// Inspects a domain's key store and judges it against the ledger (`None`: there is no
/// ledger yet, so it knows no run).
pub fn examine(
    ks: &Keystore,
    ledger: Option<&Ledger>,
    domain: &str,
) -> Result<(Arc<Inspection>, Verdict), ExamineError> {
    examine_for(ks, ledger, domain, None, None)
}

/// The ledger's record of a domain as the last [`examine`] of this process read it,
/// with the generation of the inspection it judged (see [`Keystore::inspect_seen`]).
static LAST_PROVENANCE: Mutex<Option<(u64, crate::keystore::Provenance)>> = Mutex::new(None);

/// [`examine`] for the admission's prediction of what the run will stage
/// ([`super::RotationBackend::planned_files`]): when the key store is provably
/// unchanged since this process last examined it (the repair pass, moments before
/// under the same locks, with no ledger write in between), that judgement's ledger
/// record is reused instead of queried again. A prediction only: the rotation examines
/// afresh after the admission, compares its staging list with this one and records
/// its own when they differ (`Step::staging`), so a stale record here can cost one
/// flushed write, never an unrecorded file.
fn examine_to_predict(ks: &Keystore, ledger: &Ledger) -> Result<(Arc<Inspection>, Verdict), ExamineError> {
    let (insp, generation) = ks.inspect_seen(None).map_err(ExamineError::Store)?;
    let remembered = generation.and_then(|g| {
        let last = LAST_PROVENANCE.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().filter(|(at, _)| *at == g).map(|(_, prov)| prov.clone())
    });
    let prov = match remembered {
        Some(prov) => prov,
        None => ledger
            .provenance(ks.domain(), insp.manifest.committed_by_run.as_deref())
            .map_err(|e| ExamineError::Ledger(e.into()))?,
    };
    let verdict = judge(&insp, &prov);
    Ok((insp, verdict))
}

/// `examine` for the run `own_run`, leaving out its own staging record: the names it
/// recorded at admission are its plan, not numbers some other run took.
fn examine_for(
    ks: &Keystore,
    ledger: Option<&Ledger>,
    domain: &str,
    own_run: Option<&str>,
    revoking: Option<u64>,
) -> Result<(Arc<Inspection>, Verdict), ExamineError> {
    let (insp, generation) = ks.inspect_seen(revoking).map_err(ExamineError::Store)?;
    let prov = match ledger {
        Some(l) => {
            let mut prov = l
                .provenance(domain, insp.manifest.committed_by_run.as_deref())
                .map_err(|e| ExamineError::Ledger(e.into()))?;
            let mut last = LAST_PROVENANCE.lock().unwrap_or_else(|e| e.into_inner());
            *last = match (generation, own_run, revoking) {
                (Some(g), None, None) if domain == ks.domain() => Some((g, prov.clone())),
                _ => None,
            };
            drop(last);
            prov.runs.retain(|r| Some(r.run_id.as_str()) != own_run);
            prov
        }
        None => crate::keystore::Provenance {
            manifest_run_known: insp.manifest.committed_by_run.as_ref().map(|_| false),
            runs: Vec::new(),
            later_commit: None,
            compromised: Vec::new(),
        },
    };
    let verdict = judge(&insp, &prov);
    Ok((insp, verdict))
}

/// What a run abandoned by the deadline watchdog before its commit must take back:
/// the files it staged and the `jwks.json` it published. Shared with the watchdog
/// thread; the lock is only ever held for a moment, never across I/O, so the watchdog
/// never waits on a hung step.
#[derive(Clone, Default)]
pub struct PreCommitUndo(Arc<Mutex<Option<Undo>>>);

struct Undo {
    ks: Keystore,
    staged: Vec<String>,
    manifest: Manifest,
    publics: BTreeMap<u64, PublicKey>,
}

impl PreCommitUndo {
    fn set(&self, undo: Option<Undo>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = undo;
    }

    fn staging(&self, file: &str) {
        if let Some(u) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            u.staged.push(file.to_string());
        }
    }

    /// Removes what the run staged and puts back the old `jwks.json`. Returns a note
    /// for the run's reason. Racing the abandoned step is harmless: each file written
    /// before this is removed here, and one written after it is named by the run's
    /// staging record, which lets the next run remove it.
    pub fn undo(&self) -> Option<String> {
        let mut u = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let mut notes = Vec::new();
        // Token objects are left to the next run (the staging record names them): a
        // token call may be what hangs, holding the session this thread would need.
        u.staged.retain(|n| !n.contains('/'));
        match u.ks.unstage(&u.staged) {
            Ok(()) if u.staged.is_empty() => {}
            Ok(()) => notes.push(format!("removed the staged {}", u.staged.join(", "))),
            Err(e) => notes.push(format!(
                "could not remove the staged {} ({}): the next run removes them",
                u.staged.join(", "),
                crate::fsutil::io_reason(&e)
            )),
        }
        match u.ks.restore_jwks(&u.manifest, &u.publics) {
            Ok(()) => notes.push("jwks.json lists the committed keys only".into()),
            Err(e) => notes.push(format!(
                "could not restore jwks.json ({}): the next run rewrites it",
                crate::fsutil::io_reason(&e)
            )),
        }
        Some(notes.join("; "))
    }
}

/// The files (and token objects) a plan creates, in its order.
fn file_names(ks: &Keystore, plan: &Plan) -> Vec<String> {
    let custody = ks.custody();
    plan.create
        .iter()
        .flat_map(|n| custody.staged_names(ks.domain(), n.version, n.algorithm))
        .collect()
}

impl KeystoreRotation<'_> {
    pub fn run(mut self) -> Result<Rotated, Failure> {
        let guard = self.step.guard.clone();
        let ks = self.keystore.clone();

        guard.checkpoint("inspect")?;
        ks.prepare().map_err(aborted)?;
        // A token that cannot be opened (module, token label, PIN) stops the run here,
        // before anything is judged or changed.
        ks.open_custody()
            .map_err(|e| aborted(format!("{e}; no key was touched")))?;
        room_to_write(&ks)?;
        let (inspection, verdict) = examine_for(
            &ks,
            Some(&*self.step.ledger),
            &self.step.run.domain,
            Some(&self.step.run.run_id),
            self.revoke.as_ref().map(|r| r.version),
        )
        .map_err(ExamineError::refusal)?;
        if let Some(refused) = refusal(&verdict, &self.step.run.domain, self.revoke.is_some()) {
            if !verdict.evidence.is_empty() {
                // Their numbers are taken: no later key may get one of them.
                let _ = self.step.event("unlisted", &verdict.evidence.join(" "));
            }
            return Err(refused);
        }
        if !verdict.garbage.is_empty() {
            guard.checkpoint("sweep")?;
            ks.sweep(&verdict.garbage).map_err(|e| {
                aborted(format!(
                    "cannot remove files left by an interrupted run: {}",
                    crate::fsutil::io_reason(&e)
                ))
            })?;
            tracing::info!(files = %verdict.garbage.join(", "), "removed files proven to be garbage");
            // What was deleted, and why it could be, is on the record (a progress mark:
            // durable with the run's closing write).
            let run_id = self.step.run.run_id.clone();
            let detail = format!("removed {} (proven garbage)", verdict.garbage.join(" "));
            if let Err(e) = self
                .step
                .ledger
                .write_progress("swept", |w| w.event(&run_id, "swept", Some(&detail)))
            {
                tracing::warn!("{e}");
            }
        }
        if let Some(done) = self
            .revoke
            .as_ref()
            .and_then(|r| already_revoked(&inspection.manifest, r.version))
        {
            let finished = finish_revocation(&ks, &inspection.manifest, done)?;
            // The interrupted run may have died before its own `key.compromised` line
            // (between its commit and the audit write): the trail gets one now.
            let reason = format!(
                "{} (revoked at {} by run {}, interrupted before its tidy-up; finished by this run)",
                done.compromise_reason.as_deref().unwrap_or("no reason recorded"),
                done.compromised_at.as_deref().unwrap_or("an unrecorded time"),
                inspection.manifest.committed_by_run.as_deref().unwrap_or("?")
            );
            self.compromised(&inspection.manifest, done.version, &reason, &finished);
            return Ok(finished);
        }
        let plan = plan_for(
            &inspection.manifest,
            (self.algorithm, self.activation, self.retain),
            self.revoke.as_ref(),
            verdict.next_version,
        )?;

        guard.checkpoint("generate")?;
        // Key files are generated here, in memory; a token generates each key when it
        // is staged, after the staging record (the object is then durable at once).
        let custody = ks.custody();
        let keys: Vec<Option<KeyFile>> = plan
            .create
            .iter()
            .map(|n| custody.pregenerate(n.algorithm))
            .collect::<Result<_, _>>()
            .map_err(|e| aborted(format!("key generation failed: {e}")))?;

        let mut staged = Vec::new();
        let mut committed = None;
        let result = self.stage_and_commit(&inspection, &plan, keys, &mut staged, &mut committed);
        self.undo.set(None);
        match result {
            Ok(rotated) => Ok(rotated),
            Err(f) => {
                guard.stand_down();
                match committed {
                    // Past the commit: never roll jwks.json back. It carries every
                    // version the new manifest keeps, and those it destroys until
                    // that commit is known to stand.
                    Some((next, publics)) => {
                        if let Err(e) = ks.publish_jwks(&next, &publics, DirSync::Now) {
                            tracing::warn!(
                                "could not rewrite jwks.json ({}); the next run finishes it",
                                crate::fsutil::io_reason(&e)
                            );
                        }
                    }
                    // Before the commit: put the folder back as the old manifest describes.
                    None => {
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
                    }
                }
                Err(f)
            }
        }
    }

    /// Steps 2 to 6. Returns `Err` before the commit point with `staged` naming the
    /// files to remove, or after it with `committed` holding the manifest that stands
    /// (or may stand) and the public keys it names.
    fn stage_and_commit(
        &mut self,
        inspection: &Inspection,
        plan: &Plan,
        pregenerated: Vec<Option<KeyFile>>,
        staged: &mut Vec<String>,
        committed: &mut Option<(Manifest, BTreeMap<u64, PublicKey>)>,
    ) -> Result<Rotated, Failure> {
        let guard = self.step.guard.clone();
        let ks = self.keystore.clone();
        let run_id = self.step.run.run_id.clone();
        let io = |what: &str, e: std::io::Error| aborted(format!("{what}: {}", crate::fsutil::io_reason(&e)));

        let files = file_names(&ks, plan);
        let custody = ks.custody();
        guard.checkpoint("stage")?;
        if !files.is_empty() {
            self.step.staging(&files).map_err(aborted)?;
        }
        self.undo.set(Some(Undo {
            ks: ks.clone(),
            staged: Vec::new(),
            manifest: inspection.manifest.clone(),
            publics: inspection.publics.clone(),
        }));
        let mut keys = Vec::new();
        for (n, pre) in plan.create.iter().zip(pregenerated) {
            guard.checkpoint("stage")?;
            // Record the names before creating: a failed write may leave a partial file.
            for name in custody.staged_names(ks.domain(), n.version, n.algorithm) {
                self.undo.staging(&name);
            }
            let key = custody
                .generate(&ks, n.version, n.algorithm, pre, staged)
                .map_err(aborted)?;
            keys.push(key);
        }
        let keys = &keys;

        let new_versions: Vec<String> = plan.create.iter().map(|n| format!("v{}", n.version)).collect();
        self.step
            .advance(
                RunState::Staged,
                (plan.from_version, Some(plan.to_version)),
                &format!("staged {}", new_versions.join(", ")),
            )
            .map_err(aborted)?;

        guard.checkpoint("verify")?;
        for (n, key) in plan.create.iter().zip(keys) {
            let file = custody.file(n.version, n.algorithm);
            ks.verify_staged(&file, key.algorithm(), key.fingerprint())
                .map_err(aborted)?;
        }

        let now = Utc::now();
        let fingerprints: Vec<String> = keys.iter().map(|k| k.fingerprint().to_string()).collect();
        let created: Vec<u64> = plan.create.iter().map(|n| n.version).collect();
        let in_custody = |m: Manifest| match ks.custody_token() {
            Some(t) => m.in_token(&created, &t),
            None => m,
        };
        let mut publics: BTreeMap<u64, _> = inspection.publics.clone();
        for (n, key) in plan.create.iter().zip(keys) {
            if let Some(p) = key.public() {
                publics.insert(n.version, p.clone());
            }
        }
        // Every public half is recorded in the manifest, so that a signature key's
        // private half can go at its retirement (see `private_half_allowed`).
        let next =
            in_custody(inspection.manifest.rotated(plan, &fingerprints, &run_id, now)).with_public_keys(&publics);
        if let Some((n, _)) = &plan.compromise {
            // On the record before the commit, in the ledger that outlives any copy of
            // the key folder: a keyring.json older than this revocation (a backup put
            // back, or this run dying before its commit) can never make the key usable
            // again unnoticed (see `judge`).
            let fp = inspection
                .manifest
                .get(*n)
                .map(|v| v.fingerprint.as_str())
                .unwrap_or_default();
            self.step
                .event("compromised", &crate::keystore::CompromiseRecord::detail(*n, fp))
                .map_err(|e| {
                    aborted(format!(
                        "the ledger cannot record the revocation: {e}; nothing was changed"
                    ))
                })?;
        }
        guard.checkpoint("publish")?;
        // Verifiers must know every new public key before it can sign anything, and
        // must keep the ones this rotation will destroy until the commit stands.
        // A compromised key leaves jwks.json already here: verifiers stop trusting it
        // as early as possible (an abort before the commit puts it back).
        let preview = in_custody(inspection.manifest.rotated(
            &Plan {
                destroy: Vec::new(),
                ..plan.clone()
            },
            &fingerprints,
            &run_id,
            now,
        ))
        .with_public_keys(&publics);
        let (published, jwks_held) = ks
            .publish_jwks_holding(&preview, &publics, DirSync::Now, inspection.jwks_seen.as_deref())
            .map_err(|e| io("cannot write jwks.json", e))?;
        if !published {
            // No JWKS folder sync happened: make the staged names durable before the
            // manifest can refer to them.
            ks.sync_folder("stage")
                .map_err(|e| io("cannot sync the key folder", e))?;
        }

        // Fencing: on a shared ledger the lock may have been lost with its session.
        self.step.confirm_lock("the key-store commit", false)?;
        // The deadline and signals are checked right before the rename, not before the
        // temporary is written: a slow write of keyring.json must not commit after the
        // deadline (the watchdog abandons the run while it is still before the rename).
        guard.checkpoint("commit")?;
        let mut stopped = None;
        let committed_now = ks.commit_gated(&next, || {
            guard.enter_commit().map_err(|f| {
                stopped = Some(f);
                std::io::Error::other("stopped before the commit")
            })
        });
        if let Some(f) = stopped {
            return Err(f);
        }
        if let Err(e) = committed_now {
            return match ks.inspect() {
                Ok(i) if i.manifest == inspection.manifest => {
                    Err(io("cannot write keyring.json (the old one stands)", e))
                }
                _ => {
                    staged.clear();
                    // Readers may already use the new keys: no later run may treat
                    // them as an abandoned staging, whichever manifest survives.
                    let _ = self.step.event(
                        RunState::Committed.as_str(),
                        "keyring.json was replaced; its folder sync failed",
                    );
                    // The new manifest is in place but may not survive a power loss:
                    // keep publishing every key of both (the preview) until a run
                    // under review knows which one stands.
                    *committed = Some((preview, publics));
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
        *committed = Some((next.clone(), publics.clone()));

        // Past the commit point: the rotation stands whatever happens next.
        let old_active = inspection.manifest.active();
        let new_active = next.active();
        let mut rotated = Rotated {
            from_version: old_active.map(|v| v.version),
            to_version: new_active.map(|v| v.version),
            from_fingerprint: old_active.map(|v| v.fingerprint.clone()),
            to_fingerprint: new_active.map(|v| v.fingerprint.clone()),
            warnings: Vec::new(),
            summary: summary(plan, &next, "private half destroyed, unpublished"),
        };
        let recorded = self.step.committed(&rotated);
        if let Some((n, reason)) = &plan.compromise {
            self.compromised(&inspection.manifest, *n, reason, &rotated);
        }
        let warn =
            |what: &str, e: std::io::Error| format!("{what}: {} (the next run retries)", crate::fsutil::io_reason(&e));
        // The tidy-up: three independent atomic changes, left for the kernel to make
        // durable (no folder sync): any subset surviving a power loss is the consistent
        // post-commit state (`keyring.json` new and synced; `current.*`, the destroyed
        // files and `jwks.json` as the commit's preview left them), which the next
        // invocation repairs under the lock before it decides anything.
        if let Err(e) = ks.point_current(&next, DirSync::Deferred) {
            rotated.warnings.push(warn("cannot update the current symlink", e));
        }
        if let Err(e) = ks.destroy_files(&next, DirSync::Deferred) {
            rotated.warnings.push(warn("cannot unlink destroyed versions", e));
        }
        // Nothing wrote jwks.json since the preview's publication: no need to read it.
        if let Err(e) = ks.publish_jwks_over(&next, &publics, DirSync::Deferred, jwks_held.as_deref()) {
            rotated.warnings.push(warn("cannot rewrite jwks.json", e));
        }
        recorded?;
        if let Some(left) = plan
            .compromise
            .as_ref()
            .and_then(|(n, _)| compromised_left(&ks, &next, *n))
        {
            // The tidy-up is usually a warning (the rotation stands and the next run
            // finishes it), but a revocation that leaves the compromised key's file, or
            // `current.*` pointing at it, has not done what the operator ran it for:
            // applications reading `current.*` would keep signing with the leaked key.
            return Err(Failure::new(
                Outcome::NeedsReview,
                format!(
                    "{}; but {left} ({}): review it and run keyrotate resolve, which finishes the revocation",
                    rotated.summary,
                    rotated.warnings.join("; ")
                ),
            ));
        }
        Ok(rotated)
    }
}

/// `version`, when the manifest already records it compromised: a revocation that
/// committed and was interrupted before its tidy-up, run again (see
/// [`revocation_unfinished`]).
fn already_revoked(manifest: &Manifest, version: u64) -> Option<&crate::keystore::manifest::VersionEntry> {
    manifest
        .get(version)
        .filter(|v| v.state == crate::keystore::manifest::VersionState::Compromised)
}

/// A revocation run again after the one that committed it was interrupted (killed
/// between its commit and its tidy-up): the run's repair, under the locks, has just
/// finished the tidy-up; this says so, or (the repair could not finish it) stops with
/// NEEDS_REVIEW naming what is left. No commit: the manifest already says it all.
fn finish_revocation(
    ks: &Keystore,
    manifest: &Manifest,
    v: &crate::keystore::manifest::VersionEntry,
) -> Result<Rotated, Failure> {
    let active = manifest.active();
    let at = v.compromised_at.as_deref().unwrap_or("an unrecorded time");
    if let Some(left) = compromised_left(ks, manifest, v.version) {
        return Err(Failure::new(
            Outcome::NeedsReview,
            format!(
                "v{} was revoked at {at}, but {left}, and the tidy-up could not finish it: review the key folder \
                 and run keyrotate resolve",
                v.version
            ),
        ));
    }
    Ok(Rotated {
        from_version: active.map(|a| a.version),
        to_version: active.map(|a| a.version),
        from_fingerprint: active.map(|a| a.fingerprint.clone()),
        to_fingerprint: active.map(|a| a.fingerprint.clone()),
        warnings: Vec::new(),
        summary: format!(
            "v{} was already revoked at {at}; what that interrupted revocation left is finished now: its key file \
             is destroyed and nothing points at it or publishes it",
            v.version
        ),
    })
}

/// Whether the revocation of `version` committed but did not finish (its key file, or
/// `current.*` naming it, still there): then running `revoke` again finishes it rather
/// than answering "already compromised" while the leaked key is still in use.
pub fn revocation_unfinished(ks: &Keystore, manifest: &Manifest, version: u64) -> Option<String> {
    already_revoked(manifest, version)?;
    compromised_left(ks, manifest, version)
}

/// What a committed revocation of `version` left behind that it should not have: the
/// version's key file, or `current.*` still naming it.
fn compromised_left(ks: &Keystore, next: &Manifest, version: u64) -> Option<String> {
    let file = &next.get(version)?.file;
    let mut left = Vec::new();
    if std::fs::symlink_metadata(ks.dir().join(file)).is_ok() {
        left.push(format!("the compromised key's file {file} is still on disk"));
    }
    for current in ["current.pem", "current.key"] {
        if std::fs::read_link(ks.dir().join(current)).is_ok_and(|t| t == std::path::Path::new(file)) {
            left.push(format!("{current} still points at it"));
        }
    }
    (!left.is_empty()).then(|| left.join(" and "))
}

impl KeystoreRotation<'_> {
    /// The audit trail's record of a revocation (DESIGN 11): `key.compromised`, naming
    /// the version, its fingerprint and the operator's reason, and the version that is
    /// active now.
    fn compromised(&mut self, before: &Manifest, version: u64, reason: &str, r: &Rotated) {
        let audited = self.step.audit.emit(crate::audit::Event {
            reason: Some(format!("v{version} compromised: {reason}")),
            from_version: Some(version),
            from_fingerprint: before.get(version).map(|v| v.fingerprint.clone()),
            to_version: r.to_version,
            to_fingerprint: r.to_fingerprint.clone(),
            ..crate::audit::Event::of("key.compromised", self.step.run)
        });
        if let Err(e) = audited {
            tracing::warn!("{e}");
        }
    }
}

/// What this run does to `manifest`: a rotation's plan, or a revocation's. A version
/// that cannot be revoked (unknown, destroyed, already compromised) is a usage error.
fn plan_for(
    manifest: &Manifest,
    (algorithm, activation, retain): (Algorithm, Activation, u32),
    revoke: Option<&Revocation>,
    next: u64,
) -> Result<Plan, Failure> {
    let Some(r) = revoke else {
        return Ok(manifest.plan(algorithm, activation, retain, next));
    };
    manifest
        .revocable(r.version)
        .map_err(|e| Failure::new(Outcome::Usage, format!("{e}; nothing was changed")))?;
    Ok(manifest.revoke_plan(r.version, &r.reason, algorithm, activation, next))
}

/// The outcome line's account of a key store's commit; `erased` says what became of a
/// revoked key's material in this store (shared with the shared store's backend).
pub(super) fn summary(plan: &Plan, next: &Manifest, erased: &str) -> String {
    let v = |n: Option<u64>| n.map_or("none".to_string(), |n| format!("v{n}"));
    let mut s = match &plan.compromise {
        Some((n, _)) => format!(
            "revoked v{n} (compromised: {erased}); active {} -> {}",
            v(plan.from_version),
            v(Some(plan.to_version))
        ),
        None => format!("active {} -> {}", v(plan.from_version), v(Some(plan.to_version))),
    };
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

/// The built-in key store as a [`super::RotationBackend`].
pub struct KeystoreBackend {
    pub keystore: Keystore,
    pub algorithm: Algorithm,
    pub activation: Activation,
    pub retain: u32,
    /// Set for `keyrotate revoke`.
    pub revoke: Option<Revocation>,
}

impl KeystoreBackend {
    fn plan_for(&self, manifest: &Manifest, next: u64) -> Result<Plan, Failure> {
        plan_for(
            manifest,
            (self.algorithm, self.activation, self.retain),
            self.revoke.as_ref(),
            next,
        )
    }
}

/// The time a rotation of `algorithm` needs at the least (key generation dominates),
/// for the local and the shared key store alike.
pub(super) fn keygen_budget(algorithm: Algorithm) -> std::time::Duration {
    use std::time::Duration;
    match algorithm {
        Algorithm::Rsa4096 => Duration::from_secs(5),
        Algorithm::Rsa3072 => Duration::from_secs(2),
        Algorithm::Rsa2048 => Duration::from_millis(800),
        _ => Duration::from_millis(200),
    }
}

impl super::RotationBackend for KeystoreBackend {
    fn budget(&self) -> std::time::Duration {
        keygen_budget(self.algorithm)
    }

    fn watchdog_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    fn planned_files(&self, ledger: &Ledger) -> Option<Vec<String>> {
        let ks = &self.keystore;
        let (insp, verdict) = examine_to_predict(ks, ledger).ok()?;
        if refusal(&verdict, ks.domain(), self.revoke.is_some()).is_some() {
            // The run will refuse the store: it creates nothing, so records nothing.
            return None;
        }
        let plan = self.plan_for(&insp.manifest, verdict.next_version).ok()?;
        Some(file_names(ks, &plan)).filter(|f| !f.is_empty())
    }

    fn plan(&self, ledger: Option<&Ledger>, plan: &mut Vec<String>) -> Result<super::Planned, Failure> {
        let ks = &self.keystore;
        let domain = ks.domain().to_string();
        let judged = ks
            .check_folders()
            .and_then(|()| ks.open_custody().map_err(|e| format!("{e}; no key was touched")))
            .map_err(aborted)
            .and_then(|()| room_to_write(ks))
            .and_then(|()| {
                examine_for(ks, ledger, &domain, None, self.revoke.as_ref().map(|r| r.version))
                    .map_err(ExamineError::refusal)
            })
            .and_then(
                |(insp, verdict)| match refusal(&verdict, &domain, self.revoke.is_some()) {
                    Some(f) => Err(f),
                    None => Ok((insp, verdict)),
                },
            );
        let (insp, verdict) = judged.inspect_err(|f| plan.push(format!("key store: {}", f.message)))?;
        if !insp.exists {
            plan.push(format!(
                "key store: {} has no keyring yet (first rotation)",
                ks.dir().display()
            ));
        }
        // The real run removes the garbage and replaces jwks.json: a folder planted
        // under one of those names stops it with 3 ("is a directory").
        let jwks = (!self.algorithm.is_symmetric()).then_some(crate::keystore::JWKS);
        for name in verdict.garbage.iter().map(String::as_str).chain(jwks) {
            if std::fs::symlink_metadata(ks.dir().join(name)).is_ok_and(|m| m.is_dir()) {
                let e = format!("{} is a directory", ks.dir().join(name).display());
                plan.push(format!("key store: {e}"));
                return Err(aborted(format!("{e}; the real run would stop there (move it away)")));
            }
        }
        if !verdict.garbage.is_empty() {
            plan.push(format!(
                "sweep: remove {} (proven garbage: destroyed versions, temporaries, files staged by runs that never committed)",
                verdict.garbage.join(", ")
            ));
        }
        if let Some(v) = self
            .revoke
            .as_ref()
            .and_then(|r| already_revoked(&insp.manifest, r.version))
        {
            let at = v.compromised_at.as_deref().unwrap_or("an unrecorded time");
            plan.push(format!(
                "revoke: v{} was already revoked at {at}; the run finishes what that revocation left (above)",
                v.version
            ));
            let active = insp.manifest.active().map(|a| a.version);
            return Ok(super::Planned {
                summary: format!("would finish the interrupted revocation of v{}", v.version),
                versions: (active, active),
            });
        }
        let rp = self
            .plan_for(&insp.manifest, verdict.next_version)
            .inspect_err(|f| plan.push(format!("revoke: {}", f.message)))?;
        if let Some((n, reason)) = &rp.compromise {
            plan.push(format!(
                "compromise: v{n} ({reason}): marked compromised, its key file destroyed, removed from jwks.json"
            ));
        }
        let custody = ks.custody();
        for n in &rp.create {
            let kept = match ks.custody_token() {
                Some(t) => format!(
                    " in token {:?} as {}, public part",
                    t.token,
                    crate::keystore::pkcs11::label(&domain, n.version)
                ),
                None => String::new(),
            };
            plan.push(format!(
                "create: v{} ({}, {}){kept} as {}",
                n.version,
                n.algorithm,
                format!("{:?}", n.state).to_lowercase(),
                custody.file(n.version, n.algorithm)
            ));
        }
        if let Some(v) = rp.promote {
            plan.push(format!("promote: v{v} pending -> active"));
        }
        for v in &rp.retire {
            // The version's own algorithm (the config's may have changed since).
            let symmetric = insp.manifest.get(*v).is_some_and(|e| e.algorithm().is_symmetric());
            plan.push(if symmetric {
                format!("retire: v{v} (its key stays, to open old data)")
            } else {
                format!("retire: v{v} (its private half destroyed; its public key stays in jwks.json)")
            });
        }
        for v in &rp.destroy {
            plan.push(format!("destroy: v{v} (beyond retain = {})", self.retain));
        }
        // Symmetric keys have no public half: no jwks.json is written for them.
        plan.push(if self.algorithm.is_symmetric() {
            "commit: replace keyring.json atomically; update the current.key symlink".into()
        } else {
            "commit: replace keyring.json atomically; update the current.pem symlink and jwks.json".into()
        });
        let v = |n: Option<u64>| n.map_or("none".into(), |n| format!("v{n}"));
        let what = match &rp.compromise {
            Some((n, _)) => format!("would revoke v{n}"),
            None => "would rotate".into(),
        };
        Ok(super::Planned {
            summary: format!("{what}: active {} -> {}", v(rp.from_version), v(Some(rp.to_version))),
            versions: (rp.from_version, Some(rp.to_version)),
        })
    }

    fn diagnose(&self, dead: &RunRow, last_step: Option<&str>, ledger: Option<&Ledger>, this_host: &str) -> String {
        let step = last_step
            .map(|s| format!("its last recorded step was '{s}'; "))
            .unwrap_or_default();
        // With a shared ledger the dead run may have been on another host, whose key
        // store this host cannot see.
        if dead.host != this_host {
            return format!(
                "{step}it ran on host {}: inspect the key store there to see whether it committed",
                dead.host
            );
        }
        let domain = self.keystore.domain().to_string();
        match examine(&self.keystore, ledger, &domain) {
            Err(d) => format!("{step}the key store is inconsistent: {d}"),
            Ok((i, verdict)) => {
                let mine: Vec<String> = i
                    .manifest
                    .created_by(&dead.run_id)
                    .map(|v| format!("v{}", v.version))
                    .collect();
                let primary = i.manifest.primary.map_or("empty".into(), |n| format!("v{n}"));
                if mine.is_empty() {
                    format!(
                        "{step}keyring primary is {primary}, not created by that run: it did not commit, the old key state stands{}",
                        leftovers_note(&i, &verdict)
                    )
                } else {
                    format!(
                        "{step}keyring primary is {primary}; {} created by that run: it did commit{}",
                        mine.join(", "),
                        leftovers_note(&i, &verdict)
                    )
                }
            }
        }
    }

    fn check(&self) -> Vec<(&'static str, String)> {
        let ks = &self.keystore;
        if let Err(e) = ks.check_folders() {
            return vec![("keystore", e)];
        }
        let mut problems = Vec::new();
        if ks.custody_token().is_some() {
            // The token first: without it the store cannot be inspected either.
            match ks.token() {
                Err(e) => return vec![("custody", e)],
                Ok(token) => match token.missing_mechanisms(self.algorithm) {
                    Ok(missing) if missing.is_empty() => {}
                    Ok(missing) => problems.push((
                        "algorithm",
                        format!(
                            "{}: the pkcs11 token lacks {} (custody = \"pkcs11\")",
                            self.algorithm,
                            missing.join(", ")
                        ),
                    )),
                    Err(e) => problems.push(("custody", e)),
                },
            }
        }
        if let Err(e) = ks.inspect() {
            problems.push(("keystore", format!("inconsistent key store: {e}")));
        }
        let access = ks.configured_access().cloned().unwrap_or_default();
        for e in key_store_access(ks.root(), ks.dir(), &access) {
            problems.push(("keystore", e));
        }
        problems
    }

    fn run(&self, step: Step<'_>, undo: PreCommitUndo) -> Result<Rotated, Failure> {
        KeystoreRotation {
            keystore: self.keystore.clone(),
            algorithm: self.algorithm,
            activation: self.activation,
            retain: self.retain,
            revoke: self.revoke.clone(),
            step,
            undo,
        }
        .run()
    }
}

/// What the diagnosis adds about files the manifest does not list.
fn leftovers_note(i: &Inspection, verdict: &Verdict) -> String {
    let mut note = String::new();
    if !i.unlisted.is_empty() {
        note.push_str(&format!(
            "; file(s) not in keyring.json: {} (the first rotation after review removes those a run recorded as staged and never committed, and reports any other)",
            i.unlisted.join(", ")
        ));
    }
    if let Some(m) = &verdict.mismatch {
        note.push_str(&format!("; {m}"));
    }
    note
}

/// What the next rotation would trip over, or what exposes keys, that `inspect` does not
/// look at: a key store this user cannot write (read-only mount, permissions), and key
/// files readable by group or others or owned by someone else.
fn key_store_access(root: &std::path::Path, dir: &std::path::Path, access: &crate::fsutil::Access) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut problems = Vec::new();
    for (folder, what) in [(root, "keystore"), (dir, "key folder")] {
        if !folder.is_dir() {
            continue;
        }
        if let Some(why) = crate::fsutil::fs_trouble(folder) {
            problems.push(format!(
                "{what} {}: {why}: the next rotate cannot write it",
                folder.display()
            ));
        } else if !crate::fsutil::can_write_dir(folder) {
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
