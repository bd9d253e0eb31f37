//! The shared key store (DESIGN 9): a domain's keyring in the PostgreSQL ledger's
//! database, private and symmetric material sealed under the KEK ([`crate::kek`]), and
//! on every host a local copy in the section 4.1 layout that applications read as
//! before (`keyrotate::keyring` does not know the difference).
//!
//! How the pieces fit:
//!
//! - the tables and their SQL are the ledger's (`ledger/shared.rs`, migration 004);
//! - a rotation on the designated host is the `shared` backend (`backend/shared.rs`): it reads the
//!   keyring, plans with the same [`Manifest::plan`] as the local store, seals the new
//!   keys and commits keyring, epoch and ledger row in one transaction (the epoch it
//!   started from is the fencing token), then syncs its own copy;
//! - [`sync_domain`] (the `sync` command, and the end of such a rotation) reads the
//!   newest committed keyring in one snapshot, opens and verifies every live version
//!   ([`open_keyring`]), and only then writes the local copy ([`write_local`]),
//!   `keyring.json` last; the caller records the host's acknowledgement;
//! - [`gate`] is the convergence gate a `prepublish` promotion passes.
//!
//! Nothing is written locally before every version verified: a wrong KEK, a damaged
//! row or an unreachable database leaves the local copy as it was.

pub mod gate;

use std::collections::BTreeMap;

use crate::fsutil::DirSync;
use crate::kek::Kek;
use crate::keystore::manifest::{version_file, Manifest, VersionEntry, VersionState};
use crate::keystore::{private_half_allowed, Algorithm, Inspection, KeyFile, Keystore, PublicKey};
use crate::ledger::{Ledger, SharedKeyring};
use crate::outcome::{Failure, Outcome};

/// The keyring as the `keyring.json` of a host's copy, validated as strictly as a
/// manifest read from disk. Every live asymmetric version carries its public half
/// (`public_key`, base64 SPKI DER, from the stored PEM), so that
/// [`private_half_allowed`] answers alike on every host and a retired signature version
/// verifies from it alone.
pub fn manifest(domain: &str, ring: &SharedKeyring) -> Result<Manifest, String> {
    use base64::Engine;
    let mut versions = Vec::new();
    for v in &ring.versions {
        let alg: Algorithm = v.algorithm.parse().map_err(|_| {
            format!(
                "shared keyring of {domain}: v{} has unknown algorithm {:?}",
                v.version, v.algorithm
            )
        })?;
        let public_key = match (&v.public_pem, v.state) {
            (Some(text), VersionState::Pending | VersionState::Active | VersionState::Retired) => {
                let der = ::pem::parse(text)
                    .ok()
                    .filter(|p| p.tag() == "PUBLIC KEY")
                    .ok_or_else(|| {
                        format!(
                            "shared keyring of {domain}: v{} public_pem is not a PUBLIC KEY PEM",
                            v.version
                        )
                    })?;
                Some(base64::engine::general_purpose::STANDARD.encode(der.contents()))
            }
            _ => None,
        };
        versions.push(VersionEntry {
            version: v.version,
            state: v.state,
            algorithm: v.algorithm.clone(),
            created_at: v.created_at.clone(),
            activated_at: v.activated_at.clone(),
            retired_at: v.retired_at.clone(),
            destroyed_at: v.destroyed_at.clone(),
            compromised_at: v.compromised_at.clone(),
            compromise_reason: v.compromise_reason.clone(),
            fingerprint: v.fingerprint.clone(),
            file: version_file(v.version, alg),
            created_by_run: v.created_by_run.clone(),
            public_key,
            object: None,
        });
    }
    let m = Manifest {
        domain: domain.to_string(),
        primary: versions
            .iter()
            .find(|v| v.state == VersionState::Active)
            .map(|v| v.version),
        versions,
        committed_by_run: ring.committed_run.clone(),
        pkcs11: None,
    };
    // The same rules as a keyring.json on disk (one active, versions growing, ...).
    Manifest::parse(&m.to_bytes(), domain)
        .map_err(|e| format!("shared keyring of {domain} (epoch {}): {e}", ring.epoch))
}

/// A keyring whose every live version was opened and verified.
pub struct Opened {
    pub epoch: i64,
    pub manifest: Manifest,
    /// The key of every live version that keeps its private half
    /// ([`private_half_allowed`]).
    pub keys: BTreeMap<u64, KeyFile>,
    /// The public half of every live asymmetric version (retired signature versions
    /// included, which have no entry in `keys`).
    pub publics: BTreeMap<u64, PublicKey>,
}

impl Opened {
    pub fn publics(&self) -> BTreeMap<u64, PublicKey> {
        self.publics.clone()
    }
}

/// Opens every live version of `ring` with `kek` and verifies it: the key parses, has
/// the recorded fingerprint and public key, and passes the self-test (sign/verify, MAC
/// or seal/open); a retired signature version, which keeps only its public half, has
/// that public key checked against its fingerprint. Any failure names the version and
/// why, never key bytes.
pub fn open_keyring(domain: &str, ring: &SharedKeyring, kek: &Kek) -> Result<Opened, String> {
    let manifest = manifest(domain, ring)?;
    let mut keys = BTreeMap::new();
    let mut publics = BTreeMap::new();
    for entry in manifest.live() {
        let v = ring
            .versions
            .iter()
            .find(|v| v.version == entry.version)
            .expect("the manifest is made of the ring's versions");
        if !private_half_allowed(entry) {
            // Only the public half: it must be the key the fingerprint names.
            let public = Keystore::public_half(entry).map_err(|e| format!("v{} does not verify: {e}", v.version))?;
            publics.insert(v.version, public);
            continue;
        }
        let alg: Algorithm = v
            .algorithm
            .parse()
            .map_err(|_| format!("v{}: unknown algorithm", v.version))?;
        let sealed = v
            .sealed
            .as_deref()
            .ok_or_else(|| format!("v{} is {} but its sealed key is missing", v.version, v.state.as_str()))?;
        let bytes = kek.open(domain, v.version, &v.fingerprint, sealed)?;
        let key = KeyFile::parse(alg, &bytes).map_err(|e| format!("v{} does not verify: {e}", v.version))?;
        if key.fingerprint() != v.fingerprint {
            return Err(format!(
                "v{} does not verify: its key has fingerprint {}, the keyring records {}",
                v.version,
                key.fingerprint(),
                v.fingerprint
            ));
        }
        if key.public().map(PublicKey::pem) != v.public_pem {
            return Err(format!(
                "v{} does not verify: its public key differs from the one the keyring publishes",
                v.version
            ));
        }
        key.self_test()
            .map_err(|e| format!("v{} does not verify: {e}", v.version))?;
        if let Some(p) = key.public() {
            publics.insert(v.version, p.clone());
        }
        keys.insert(v.version, key);
    }
    Ok(Opened {
        epoch: ring.epoch,
        manifest,
        keys,
        publics,
    })
}

/// What [`write_local`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Local {
    /// The local copy already was this keyring, whole: nothing written.
    Unchanged,
    /// What was written (files, then `keyring.json`).
    Written(Vec<String>),
}

/// Makes the local copy of `ks` the keyring `opened`, in the section 4.1 layout, with
/// the key store's durable writers: version files (atomic, 0600), one folder sync,
/// `jwks.json` (the new keys and every key the old copy lists), then `keyring.json`
/// (the commit: atomic and durable), then `current.*`, the removal of destroyed
/// versions' files and the final `jwks.json` (as a rotation's tidy-up: the next sync
/// redoes what a crash left). A local copy that holds a version the
/// keyring does not (same number, another key, or a number it never had) is refused:
/// the database may have been restored from an older backup, and the local keys are
/// evidence, not garbage.
pub fn write_local(ks: &Keystore, opened: &Opened) -> Result<Local, String> {
    ks.prepare()?;
    let inspected = ks.inspect().ok();
    // Temporaries of an interrupted write (a killed sync) are never referenced, and
    // may hold key bytes: removed before anything else.
    if let Some(tmp) = inspected.as_ref().map(|i| &i.temporaries).filter(|t| !t.is_empty()) {
        ks.sweep(tmp).map_err(|e| {
            format!(
                "cannot remove the temporaries {}: {}",
                tmp.join(", "),
                crate::fsutil::io_reason(&e)
            )
        })?;
    }
    let old = inspected.filter(|i| i.exists);
    if let Some(old) = &old {
        refuse_foreign(ks, old, &opened.manifest)?;
        if old.manifest == opened.manifest && ks.repair_needed(old).is_empty() {
            return Ok(Local::Unchanged);
        }
    }
    let io = |what: &str, e: std::io::Error| format!("{what}: {}", crate::fsutil::io_reason(&e));
    // Whatever keyring.json says (it may be missing or damaged), a file that holds
    // another valid key under a number of the shared keyring is never overwritten. A
    // damaged one is replaced by the verified copy.
    for v in opened.manifest.live() {
        let Ok(bytes) = crate::fsutil::read_nofollow(&ks.dir().join(&v.file), 64 * 1024) else {
            continue;
        };
        if KeyFile::parse(v.algorithm(), &bytes).is_ok_and(|k| k.fingerprint() != v.fingerprint) {
            return Err(format!(
                "the local copy {} has a {} holding another key than the shared keyring's v{}; it was kept: \
                 move the folder away after review",
                ks.dir().display(),
                v.file,
                v.version
            ));
        }
    }
    let mut written = Vec::new();
    for v in opened.manifest.live().filter(|v| private_half_allowed(v)) {
        let key = &opened.keys[&v.version];
        if ks
            .install(&v.file, key)
            .map_err(|e| io(&format!("cannot write {}", v.file), e))?
        {
            written.push(v.file.clone());
        }
    }
    ks.sync_folder("install")
        .map_err(|e| io("cannot sync the key folder", e))?;
    // Before the local commit, jwks.json carries the new keys *and* every key the old
    // copy still lists (as a rotation publishes its preview): verifiers learn a key
    // before anything signs with it and lose one only once keyring.json drops it.
    let mut publics = opened.publics();
    let mut preview = opened.manifest.clone();
    if let Some(old) = &old {
        // A compromised version is not carried over: it leaves jwks.json at once.
        for v in preview
            .versions
            .iter_mut()
            .filter(|v| !v.is_live() && v.state != VersionState::Compromised)
        {
            if let (Some(was), Some(p)) = (old.manifest.get(v.version), old.publics.get(&v.version)) {
                if was.is_live() {
                    v.state = VersionState::Retired;
                    publics.insert(v.version, p.clone());
                }
            }
        }
    }
    if ks
        .publish_jwks(&preview, &publics, DirSync::Now)
        .map_err(|e| io("cannot write jwks.json", e))?
    {
        written.push(crate::keystore::JWKS.to_string());
    }
    if let Err(e) = ks.commit(&opened.manifest) {
        // The old keyring.json stands: give it back the jwks.json it describes.
        if let Some(old) = &old {
            let _ = ks.restore_jwks(&old.manifest, &old.publics);
        }
        return Err(io("cannot replace keyring.json (the old local copy stands)", e));
    }
    written.push(crate::keystore::MANIFEST.to_string());
    // Past the local commit: failures here are finished by the next sync (it sees
    // repair work and rewrites), never a reason to report the copy as failed.
    if let Err(e) = ks.point_current(&opened.manifest, DirSync::Deferred) {
        tracing::warn!("cannot update the current symlink: {}", crate::fsutil::io_reason(&e));
    }
    if let Err(e) = ks.destroy_files(&opened.manifest, DirSync::Deferred) {
        tracing::warn!("cannot unlink destroyed versions: {}", crate::fsutil::io_reason(&e));
    }
    if let Err(e) = ks.publish_jwks(&opened.manifest, &opened.publics(), DirSync::Deferred) {
        tracing::warn!("cannot rewrite jwks.json: {}", crate::fsutil::io_reason(&e));
    }
    Ok(Local::Written(written))
}

/// Refuses a local copy that holds a version the shared keyring does not have, or has
/// with another key.
fn refuse_foreign(ks: &Keystore, old: &Inspection, target: &Manifest) -> Result<(), String> {
    for v in &old.manifest.versions {
        match target.get(v.version) {
            Some(t) if t.fingerprint == v.fingerprint => {}
            Some(_) => {
                return Err(format!(
                    "the local copy {} has v{} with another key than the shared keyring's (a key store used \
                     before the domain was shared, or a database restored from an older backup?); it was kept: \
                     move the folder away after review",
                    ks.dir().display(),
                    v.version
                ))
            }
            None => {
                return Err(format!(
                    "the local copy {} has v{}, which the shared keyring does not (a database restored from an \
                     older backup, or a key store used before the domain was shared?); it was kept: move the \
                     folder away after review",
                    ks.dir().display(),
                    v.version
                ))
            }
        }
    }
    Ok(())
}

/// What one sync of a domain did.
#[derive(Debug)]
pub struct Synced {
    /// The epoch the local copy holds now.
    pub epoch: i64,
    pub local: Local,
}

/// One sync of `domain` to the local copy `ks` (the caller holds its lock): read the
/// newest committed keyring, open and verify every live version, write the local copy.
/// `checkpoint` is asked before each step (deadline, signals). ABORTED (3) with the
/// local copy as it was when anything fails before `keyring.json` is replaced. The
/// caller records the acknowledgement.
pub fn sync_domain(
    ledger: &Ledger,
    ks: &Keystore,
    kek: &Kek,
    domain: &str,
    checkpoint: &dyn Fn(&'static str) -> Result<(), Failure>,
) -> Result<Synced, Failure> {
    let aborted = |e: String| Failure::new(Outcome::Aborted, format!("{e}; the local copy was left as it was"));
    checkpoint("read")?;
    let ring = ledger.shared_keyring(domain).map_err(|e| aborted(e.to_string()))?;
    if ring.epoch == 0 {
        return Ok(Synced {
            epoch: 0,
            local: Local::Unchanged,
        });
    }
    checkpoint("verify")?;
    let opened = open_keyring(domain, &ring, kek).map_err(|e| aborted(format!("epoch {}: {e}", ring.epoch)))?;
    checkpoint("write")?;
    let local = write_local(ks, &opened).map_err(aborted)?;
    Ok(Synced {
        epoch: ring.epoch,
        local,
    })
}
