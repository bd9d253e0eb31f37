//! The built-in key store: one folder per domain holding versioned key files, the
//! `keyring.json` manifest, the `current.*` symlink and `jwks.json`.
//!
//! `Keystore` owns every file operation on a domain folder. It never decides *whether*
//! to rotate (that is `rotate`'s job); it inspects, stages, publishes, commits and
//! tidies, each durably, in the order DESIGN.md section 4.2 gives.

mod algorithm;
pub mod custody;
pub mod manifest;
pub mod pkcs11;
mod seen;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

pub use algorithm::{verify, Algorithm, KeyFile, PublicKey};
pub use custody::{Custody, FileCustody, Pkcs11Custody};
use manifest::{parse_version_file, Manifest, VersionEntry, VersionState};
pub use pkcs11::{Token, TokenConfig};

use crate::fsutil::{self, DirSync};

pub const MANIFEST: &str = "keyring.json";
pub const JWKS: &str = "jwks.json";
/// Where a reader of a pkcs11 domain (the consumer API, `status`) may give the token's
/// user PIN instead of the source `keyring.json` records; `rotate` uses its config's.
pub const READER_PIN_ENV: &str = "KEYROTATE_PKCS11_PIN";
/// Key files are small; anything bigger is not ours.
const KEY_FILE_LIMIT: u64 = 64 * 1024;
const MANIFEST_LIMIT: u64 = 16 * 1024 * 1024;

/// One domain's folder in a key store.
#[derive(Clone, Debug)]
pub struct Keystore {
    root: PathBuf,
    dir: PathBuf,
    domain: String,
    /// Who may read the domain's files (`group`, `public_jwks`), when the caller has the
    /// domain's config; otherwise files are written as readable as their folder.
    access: Option<fsutil::Access>,
    /// `custody = "pkcs11"`: the configured token new versions are generated in.
    token_config: Option<TokenConfig>,
    /// The token session, opened on first use and shared by the clones of this
    /// store (the deadline watchdog's among them).
    opened: Arc<Mutex<Option<Arc<Token>>>>,
}

/// Whether a version's private (or secret) half may exist: the one rule for what key
/// material a version keeps (NIST SP 800-57 states, DESIGN 11). Pending and active
/// versions keep it. A retired signature key does not (nothing may sign with it
/// again): its public half in the manifest verifies it until retention destroys it;
/// retired symmetric and encryption keys keep theirs (old data must still open). A
/// retired signature key whose manifest entry predates the recorded public half keeps
/// its file until a commit records the public half from it. Destroyed and compromised
/// versions keep nothing.
///
/// A file this rule disallows is garbage by the manifest's word (see [`judge`]): the
/// commit says so first, then the tidy-up (or the next run's repair) removes it.
pub fn private_half_allowed(v: &VersionEntry) -> bool {
    match v.state {
        VersionState::Pending | VersionState::Active => true,
        VersionState::Retired => v.algorithm().is_symmetric() || v.public_key.is_none(),
        VersionState::Destroyed | VersionState::Compromised => false,
    }
}

/// What a live version holds: its key, or (a retired signature key) only its public
/// half, verified against the fingerprint.
#[derive(Clone, Debug)]
pub enum Half {
    Private(KeyFile),
    Public(PublicKey),
}

impl Half {
    pub fn public(&self) -> Option<&PublicKey> {
        match self {
            Half::Private(k) => k.public(),
            Half::Public(p) => Some(p),
        }
    }
}

/// What is on disk, verified: the manifest, each live version's public key, and the
/// files the manifest does not (or no longer) account for.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub manifest: Manifest,
    pub publics: BTreeMap<u64, PublicKey>,
    /// Key files the manifest no longer allows ([`private_half_allowed`]: destroyed or
    /// compromised versions, private halves of retired signature keys): garbage by the
    /// manifest's word (a tidy-up that did not finish).
    pub destroyed_files: Vec<String>,
    /// Temporaries of interrupted atomic writes (`.NAME.tmp`): never key material that
    /// anything refers to.
    pub temporaries: Vec<String>,
    /// Version files the manifest does not list at all. Garbage only with proof (a run
    /// recorded staging them and is known not to have committed, see [`judge`]);
    /// otherwise evidence of a missing, truncated or restored `keyring.json`.
    pub unlisted: Vec<String>,
    /// The next version number: above every number ever used that the folder shows
    /// (the manifest, files on disk, `kid`s published in `jwks.json`), so a `kid` once
    /// published is never reused for another key.
    pub next_version: u64,
    pub exists: bool,
    /// The bytes of `jwks.json` as this inspection read them, when it is a regular
    /// file (`None`: absent, a symlink, unreadable). What the repair check and the
    /// rotation's first publication compare with instead of reading it again: under
    /// the lock nothing of keyrotate's writes it in between, and a change by anyone
    /// else in between is no different from one just after a second read.
    pub jwks_seen: Option<Vec<u8>>,
}

/// What the ledger knows about the runs that may have touched a domain's key files.
#[derive(Clone, Debug, Default)]
pub struct Provenance {
    /// Whether the ledger has a row for the manifest's `committed_by_run`, of this
    /// domain (`None` when the manifest names no run).
    pub manifest_run_known: Option<bool>,
    /// A run of this domain, on the host of the manifest's `committed_by_run`, that the
    /// ledger records committing after it: `keyring.json` (or the whole domain folder)
    /// is older than the ledger's last commit, i.e. restored from a backup.
    pub later_commit: Option<String>,
    /// Recent runs of the domain that recorded staging files or noticed unlisted ones.
    pub runs: Vec<RunRecord>,
    /// Every version a revocation recorded as compromised (all of the domain's
    /// history, not only recent runs), except by runs known to have stopped before
    /// their commit. A manifest that lists one of them as usable again is older than
    /// that revocation (see [`judge`]).
    pub compromised: Vec<CompromiseRecord>,
}

/// A revocation's record in the ledger: the run, the version and its fingerprint.
#[derive(Clone, Debug, Default)]
pub struct CompromiseRecord {
    pub run_id: String,
    pub version: u64,
    pub fingerprint: String,
}

impl CompromiseRecord {
    /// The `compromised` event's detail: `v7 sha256:…`.
    pub fn detail(version: u64, fingerprint: &str) -> String {
        format!("v{version} {fingerprint}")
    }

    /// Reads an event detail written by [`CompromiseRecord::detail`].
    pub fn parse(run_id: &str, detail: &str) -> Option<CompromiseRecord> {
        let (v, fp) = detail.split_once(' ')?;
        Some(CompromiseRecord {
            run_id: run_id.to_string(),
            version: v.strip_prefix('v')?.parse().ok()?,
            fingerprint: fp.to_string(),
        })
    }
}

#[derive(Clone, Debug, Default)]
pub struct RunRecord {
    pub run_id: String,
    /// Its row says it ended without success (aborted, timed out, needs review or
    /// resolved): it did not commit unless it recorded so.
    pub ended_uncommitted: bool,
    /// It recorded reaching its commit.
    pub committed: bool,
    /// Files it recorded, before creating them, as staged.
    pub staged: Vec<String>,
    /// Unlisted files it reported for review (their numbers are taken too).
    pub noted: Vec<String>,
}

/// The judgement over an inspection and the ledger's record: what may be removed,
/// what must be reported, and whether the ledger is this key store's record at all.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Files provably garbage: destroyed versions' files, temporaries, and leftovers
    /// staged by runs known not to have committed.
    pub garbage: Vec<String>,
    /// Unlisted version files nothing proves to be garbage.
    pub evidence: Vec<String>,
    /// The manifest names a committing run this ledger does not know.
    pub mismatch: Option<String>,
    /// The next version number, above every number the ledger records too.
    pub next_version: u64,
    /// Versions the manifest lists as usable (pending, active, retired) although a
    /// revocation recorded them as compromised: the manifest is older than the
    /// revocation (restored from a backup, or the revocation never finished). Each
    /// with the revoking run.
    pub resurrected: Vec<(u64, String)>,
}

impl Verdict {
    /// Nothing to report: the store may be tidied and rotated.
    pub fn clean(&self) -> bool {
        self.evidence.is_empty() && self.mismatch.is_none() && self.resurrected.is_empty()
    }

    /// What a revocation may still commit from: a store whose only problem is a
    /// compromised key listed as usable again (revoking it again is the repair, and no
    /// revocation makes anything worse). Unlisted files or a manifest the ledger does
    /// not know still stop it: a commit from an old copy would roll the store back.
    pub fn revocable(&self) -> bool {
        self.evidence.is_empty() && self.mismatch.is_none()
    }

    /// The one-line diagnosis of an unclean store, with what to do.
    pub fn diagnosis(&self, domain: &str) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(m) = &self.mismatch {
            parts.push(m.clone());
        }
        if !self.evidence.is_empty() {
            parts.push(format!(
                "{} file(s) that keyring.json does not list and no run recorded as an abandoned staging: {} \
                 (keyring.json missing, truncated or restored from an older backup?); they were kept; \
                 see the runbook entry \"keyring.json missing or restored from backup\"",
                self.evidence.len(),
                self.evidence.join(", ")
            ));
        }
        for (version, run) in &self.resurrected {
            parts.push(format!(
                "keyring.json lists v{version} as usable, but run {run} revoked it as compromised (keyring.json \
                 restored from a backup taken before that revocation, or the revocation did not finish); a \
                 compromised key is never used again: revoke it again: keyrotate revoke --domain {domain} \
                 --version {version} --reason \"...\" --deadline 10m"
            ));
        }
        if parts.is_empty() {
            return None;
        }
        Some(format!("key store {domain}: {}; nothing was changed", parts.join("; ")))
    }
}

/// Whether a run is known not to have committed: it ended before its commit point by
/// its own account (`aborted`, `timed_out`), or it died or was reviewed
/// (`needs_review`, `resolved`) without recording a commit and without a version of
/// its own in the manifest. (Every later manifest lists every version a committed run
/// created, destroyed ones included, so a run absent from it never committed.)
fn known_not_committed(r: &RunRecord, manifest: &Manifest) -> bool {
    if r.committed || manifest.created_by(&r.run_id).next().is_some() {
        return false;
    }
    r.ended_uncommitted
}

/// DESIGN 4.4, "nothing is deleted that the store cannot prove is garbage".
pub fn judge(insp: &Inspection, prov: &Provenance) -> Verdict {
    let mut garbage: Vec<String> = insp.destroyed_files.iter().chain(&insp.temporaries).cloned().collect();
    let mut evidence = Vec::new();
    for file in &insp.unlisted {
        let proven = prov
            .runs
            .iter()
            .any(|r| r.staged.contains(file) && known_not_committed(r, &insp.manifest));
        if proven {
            garbage.push(file.clone());
        } else {
            evidence.push(file.clone());
        }
    }
    garbage.sort();
    let mismatch = match (&insp.manifest.committed_by_run, prov.manifest_run_known) {
        (Some(run), Some(false)) if insp.exists => Some(format!(
            "keyring.json was last committed by run {run}, which this ledger does not know \
             (ledger deleted or restored, or another state folder rotates this key store); \
             after review, resolve this run to adopt the key store into this ledger"
        )),
        _ => prov.later_commit.as_ref().filter(|_| insp.exists).map(|later| {
            format!(
                "keyring.json was last committed by run {}, but this ledger records a later commit by run {later} \
                 (keyring.json or the domain folder restored from an older backup? the keys of the later \
                 commits are missing from it); after review, resolve this run to adopt the key store as it is",
                insp.manifest.committed_by_run.as_deref().unwrap_or("?")
            )
        }),
    };
    // Item 13: a number any run recorded (staged or reported) is never given to
    // another key, even if its file vanished in a power loss.
    let recorded = prov
        .runs
        .iter()
        .flat_map(|r| r.staged.iter().chain(&r.noted))
        .filter_map(|f| parse_version_file(f))
        // A revoked number is never given to another key either: verifiers may
        // remember its kid as the compromised one.
        .chain(prov.compromised.iter().map(|c| c.version))
        .max()
        .unwrap_or(0);
    // A compromised key listed as usable again: matched by its fingerprint, the key's
    // identity (a number alone could belong to a fresh key store's new key).
    let mut resurrected: Vec<(u64, String)> = Vec::new();
    for v in insp.manifest.live() {
        let revoked = prov.compromised.iter().find(|c| c.fingerprint == v.fingerprint);
        if let Some(c) = revoked {
            resurrected.push((v.version, c.run_id.clone()));
        }
    }
    Verdict {
        garbage,
        evidence,
        mismatch,
        next_version: insp.next_version.max(recorded + 1),
        resurrected,
    }
}

/// The version numbers named by the `kid`s of a `jwks.json` (`v000007-…`).
fn published_versions(bytes: &[u8]) -> Vec<u64> {
    /// The key set as keyrotate writes it, read without building a `Value` tree.
    #[derive(serde::Deserialize)]
    struct Set<'a> {
        #[serde(borrow)]
        keys: Vec<Key<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Key<'a> {
        #[serde(borrow)]
        kid: Option<std::borrow::Cow<'a, str>>,
    }
    let number = |kid: &str| kid.strip_prefix('v')?.split('-').next()?.parse().ok();
    if let Ok(set) = serde_json::from_slice::<Set>(bytes) {
        return set.keys.iter().filter_map(|k| number(k.kid.as_deref()?)).collect();
    }
    // Any other shape (edited by hand, damaged): every string `kid` of every object
    // in `keys` still counts, as far as the document parses at all.
    let Ok(doc) = serde_json::from_slice::<Value>(bytes) else {
        return Vec::new();
    };
    doc["keys"]
        .as_array()
        .map(|keys| keys.iter().filter_map(|k| number(k["kid"].as_str()?)).collect())
        .unwrap_or_default()
}

impl Keystore {
    pub fn new(root: &Path, domain: &str) -> Keystore {
        Keystore {
            root: root.to_path_buf(),
            dir: root.join(domain),
            domain: domain.to_string(),
            access: None,
            token_config: None,
            opened: Arc::default(),
        }
    }

    /// The domain's custody from its config: `Some` keeps new keys in that token.
    pub fn with_token(mut self, token: Option<TokenConfig>) -> Keystore {
        self.token_config = token;
        self
    }

    /// Where new versions' keys are kept.
    pub fn custody(&self) -> Box<dyn Custody> {
        match &self.token_config {
            Some(_) => Box::new(Pkcs11Custody),
            None => Box::new(FileCustody),
        }
    }

    /// The configured token new versions go to (`custody = "pkcs11"`).
    pub fn custody_token(&self) -> Option<TokenConfig> {
        self.token_config.clone()
    }

    /// The token this store's versions use: the configured one, else the one the
    /// manifest records (a domain switched back to file custody still has token
    /// versions to verify and destroy).
    pub fn token_config(&self) -> Option<TokenConfig> {
        if let Some(c) = &self.token_config {
            return Some(c.clone());
        }
        /// Only the member wanted: the rest of the manifest is skipped unvalidated
        /// (a manifest that does not verify still names its token), not built.
        #[derive(serde::Deserialize)]
        struct TokenOnly {
            pkcs11: Option<TokenConfig>,
        }
        let bytes = fsutil::read_nofollow(&self.dir.join(MANIFEST), MANIFEST_LIMIT).ok()?;
        serde_json::from_slice::<TokenOnly>(&bytes).ok()?.pkcs11
    }

    /// The logged-in token session (opened once per store and its clones).
    pub fn token(&self) -> Result<Arc<Token>, String> {
        let mut slot = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.as_ref() {
            return Ok(Arc::clone(t));
        }
        let mut config = self
            .token_config()
            .ok_or_else(|| format!("key store {}: no pkcs11 token is configured", self.domain))?;
        if self.token_config.is_none() && std::env::var_os(READER_PIN_ENV).is_some_and(|v| !v.is_empty()) {
            // A reader of the store (an application using the consumer API as another
            // user) that cannot read the rotating user's PIN file brings its own PIN.
            config.pin_file = None;
            config.pin_env = Some(READER_PIN_ENV.to_string());
        }
        let token = Arc::new(Token::open(&config)?);
        *slot = Some(Arc::clone(&token));
        Ok(token)
    }

    /// Opens the token when the domain uses one: a wrong PIN or a missing module is
    /// then the run's first failure, before anything is judged or changed.
    pub fn open_custody(&self) -> Result<(), String> {
        match self.token_config() {
            Some(_) => self.token().map(|_| ()),
            None => Ok(()),
        }
    }

    /// Removes what `names` name: files of the domain folder, and token objects
    /// (names with a `/`, `keyrotate/<domain>/v000008`). Each object's destruction is
    /// a durable step of its own.
    pub fn remove(&self, names: &[String], step: &str, sync: DirSync) -> io::Result<()> {
        let (labels, files): (Vec<String>, Vec<String>) = names.iter().cloned().partition(|n| n.contains('/'));
        if !labels.is_empty() {
            let token = self.token().map_err(io::Error::other)?;
            for label in &labels {
                crate::failpoint::hit(step, "token-destroy")?;
                token.destroy(label).map_err(io::Error::other)?;
            }
        }
        fsutil::remove_files(&self.dir, &files, step, sync)
    }

    /// The configured access: [`Keystore::prepare`] brings the folders and files to it.
    pub fn with_access(mut self, access: fsutil::Access) -> Keystore {
        self.access = Some(access);
        self
    }

    /// The access new files get: the configured one, else what the folder grants.
    fn access(&self) -> fsutil::Access {
        match &self.access {
            Some(a) => a.clone(),
            None => fs::symlink_metadata(&self.dir)
                .map(|m| fsutil::Access::of_folder(&m))
                .unwrap_or_default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key store's root folder (the config's `keystore`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The access the domain's config gives, when known.
    pub fn configured_access(&self) -> Option<&fsutil::Access> {
        self.access.as_ref()
    }

    /// Checks the key store and domain folders without creating anything.
    pub fn check_folders(&self) -> Result<(), String> {
        for (path, what) in [(&self.root, "keystore"), (&self.dir, "key folder")] {
            match fs::symlink_metadata(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                _ => fsutil::check_secure_dir(path, what)?,
            }
        }
        Ok(())
    }

    /// Creates the key store and domain folders (0700) if needed and checks both. With
    /// the configured access, the domain folder and the files in it get exactly its
    /// modes and group (a config that gained or dropped `group` takes effect here), and
    /// the key store folder gets the traversal it needs (never less than it had: other
    /// domains may share it).
    pub fn prepare(&self) -> Result<(), String> {
        if seen::prepared_before(&self.root, &self.dir, &self.access) {
            return Ok(());
        }
        self.prepare_anew()?;
        seen::prepared(&self.root, &self.dir, &self.access);
        Ok(())
    }

    fn prepare_anew(&self) -> Result<(), String> {
        fsutil::ensure_private_dir(&self.root, "keystore")?;
        let Some(access) = &self.access else {
            return fsutil::ensure_private_dir(&self.dir, "key folder");
        };
        fsutil::widen_dir(&self.root, "keystore", access.root_traverse_bits())?;
        // Without a group, files go back to this user's own group (a dropped `group`
        // leaves no stale owner behind, though the modes already shut it out).
        let gid = access.gid().unwrap_or_else(fsutil::own_gid);
        fsutil::ensure_dir_with(&self.dir, "key folder", access.dir_mode(), Some(gid))?;
        let entries =
            fs::read_dir(&self.dir).map_err(|e| format!("{}: {}", self.dir.display(), fsutil::io_reason(&e)))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {}", self.dir.display(), fsutil::io_reason(&e)))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let perms = if name == JWKS {
                access.jwks_perms()
            } else if name == MANIFEST || parse_version_file(&name).is_some() {
                access.file_perms()
            } else {
                continue;
            };
            let perms = fsutil::Perms {
                gid: Some(gid),
                ..perms
            };
            // One stat from the listing's folder: only a regular file whose mode or
            // group differs is opened (without following a symlink) and changed.
            if entry.metadata().is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                !m.is_file() || (m.mode() & 0o7777 == perms.mode && Some(m.gid()) == perms.gid)
            }) {
                continue;
            }
            fsutil::set_file_perms(&self.dir, &name, perms).map_err(|e| {
                format!(
                    "cannot set the mode of {}: {}",
                    self.dir.join(&name).display(),
                    fsutil::io_reason(&e)
                )
            })?;
        }
        Ok(())
    }

    /// Reads and verifies the domain's state. `Err` means the key store is not in a
    /// state anyone should rotate from: the message is the diagnosis.
    pub fn inspect(&self) -> Result<Inspection, String> {
        self.inspect_revoking(None)
    }

    /// [`Keystore::inspect`] for a revocation of `revoking`: that version's key may be
    /// missing or unreadable (deleted in a panic after the leak, say) without making
    /// the store unusable, since the revocation destroys and unpublishes it anyway.
    /// It is left out of the public keys.
    pub fn inspect_revoking(&self, revoking: Option<u64>) -> Result<Inspection, String> {
        self.inspect_seen(revoking).map(|(insp, _)| Arc::unwrap_or_clone(insp))
    }

    /// [`Keystore::inspect_revoking`], reusing this process's last inspection of the
    /// folder when nothing it read has changed since (see `seen`), with the
    /// inspection's generation: two results with the same `Some` generation come from
    /// the same reads of an unchanged folder. `None`: an inspection that cannot be
    /// vouched for (a token's objects, a file changed in the tick it was read). Shared,
    /// not copied: the manifest it holds grows with the domain's history.
    pub fn inspect_seen(&self, revoking: Option<u64>) -> Result<(Arc<Inspection>, Option<u64>), String> {
        // A store with a configured token lists its objects in every inspection, so
        // none is remembered; nor may one made without the token be reused for it.
        let recalled = match self.token_config {
            None => seen::recall(&self.dir, &self.domain, revoking),
            Some(_) => None,
        };
        if let Some((insp, generation)) = recalled {
            return Ok((insp, Some(generation)));
        }
        let mut reads = seen::Reads::start();
        let insp = Arc::new(self.inspect_anew(revoking, &mut reads)?);
        let generation = seen::remember(&self.dir, &self.domain, revoking, reads, &insp);
        Ok((insp, generation))
    }

    fn inspect_anew(&self, revoking: Option<u64>, reads: &mut seen::Reads) -> Result<Inspection, String> {
        let manifest_path = self.dir.join(MANIFEST);
        let (manifest, exists) = match fsutil::read_nofollow_meta(&manifest_path, MANIFEST_LIMIT) {
            Ok((bytes, meta)) => {
                reads.read(&manifest_path, &meta);
                (Manifest::parse(&bytes, &self.domain)?, true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                reads.absent(&manifest_path);
                (Manifest::empty(&self.domain), false)
            }
            Err(e) => return Err(format!("{}: {}", manifest_path.display(), fsutil::io_reason(&e))),
        };
        // The token objects under this domain's prefix, listed once: they prove each
        // live token version present and are judged like files below.
        let uses_token = self.token_config.is_some() || manifest.versions.iter().any(|v| v.in_token());
        let objects = if uses_token {
            reads.unprovable();
            // The token the manifest's versions are in, whatever the config now says.
            Some(Pkcs11Custody.list_present(self)?)
        } else {
            None
        };
        let mut publics = BTreeMap::new();
        for v in manifest.live() {
            // A token version whose key may exist must have exactly one object (its
            // label and the id of its fingerprint) among those listed once above.
            let half = if v.in_token() && private_half_allowed(v) {
                let label = v.object.as_deref().unwrap_or_default();
                let id = pkcs11::id_of(&v.fingerprint);
                let found = objects
                    .iter()
                    .flatten()
                    .filter(|o| o.label == label && o.id == id)
                    .count();
                if found != 1 && revoking == Some(v.version) {
                    // The leaked key's own object may already be gone (destroyed by
                    // hand after the leak): its revocation goes ahead.
                    tracing::warn!("the token object of v{} being revoked is missing", v.version);
                    continue;
                }
                if found != 1 {
                    return Err(format!(
                        "{} v{}: {found} token objects labelled {label} with the id of its fingerprint (expected one)",
                        state_article(v.state),
                        v.version
                    ));
                }
                Half::Private(self.load_file(v, Some(&mut *reads))?)
            } else {
                match self.load_half_read(v, reads) {
                    Err(e) if revoking == Some(v.version) => {
                        tracing::warn!("the key of v{} being revoked cannot be loaded: {e}", v.version);
                        continue;
                    }
                    half => half?,
                }
            };
            if let Some(p) = half.public() {
                publics.insert(v.version, p.clone());
            }
        }
        let mut destroyed_files = Vec::new();
        let mut temporaries = Vec::new();
        let mut unlisted = Vec::new();
        let mut next_version = manifest.max_version() + 1;
        reads.before_reading(&self.dir);
        match fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| format!("{}: {}", self.dir.display(), fsutil::io_reason(&e)))?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    if let Some(n) = parse_version_file(&name) {
                        next_version = next_version.max(n + 1);
                        match manifest.versions.iter().find(|v| v.file == name) {
                            Some(v) if private_half_allowed(v) => {}
                            Some(_) => destroyed_files.push(name),
                            None => unlisted.push(name),
                        }
                    } else if name.starts_with('.') && name.ends_with(".tmp") {
                        temporaries.push(name);
                    }
                    // Anything else (`.lock`, `current.*`, jwks.json) is not a leftover.
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {}", self.dir.display(), fsutil::io_reason(&e))),
        }
        if let Some(objects) = objects {
            for o in objects {
                let n = pkcs11::parse_label(&self.domain, &o.label);
                if let Some(n) = n {
                    next_version = next_version.max(n + 1);
                }
                match manifest
                    .versions
                    .iter()
                    .find(|v| v.object.as_deref() == Some(o.label.as_str()))
                {
                    Some(v) if private_half_allowed(v) => {}
                    Some(_) => destroyed_files.push(o.label),
                    None => unlisted.push(o.label),
                }
            }
            destroyed_files.dedup();
            unlisted.dedup();
        }
        // A `kid` published in jwks.json names its number even when a power loss
        // dropped the staged file's directory entry (the file and the jwks rename
        // may reach the disk in either order): never reuse it. Reading the kids costs
        // no fsync, unlike making each staged name durable before publishing.
        let jwks_path = self.dir.join(JWKS);
        reads.before_reading(&jwks_path);
        let jwks_seen = fsutil::read_nofollow(&jwks_path, MANIFEST_LIMIT)
            .ok()
            .map(|b| b.to_vec());
        if let Some(bytes) = &jwks_seen {
            if let Some(n) = published_versions(bytes).into_iter().max() {
                next_version = next_version.max(n + 1);
            }
        }
        destroyed_files.sort();
        temporaries.sort();
        unlisted.sort();
        Ok(Inspection {
            manifest,
            publics,
            destroyed_files,
            temporaries,
            unlisted,
            next_version,
            exists,
            jwks_seen,
        })
    }

    /// A live version as [`private_half_allowed`] says it exists: its key file, or
    /// its public half from the manifest (checked against the fingerprint).
    pub fn load_half(&self, v: &VersionEntry) -> Result<Half, String> {
        if private_half_allowed(v) {
            return self.load_version(v).map(Half::Private);
        }
        Keystore::public_half(v).map(Half::Public)
    }

    /// [`Keystore::load_half`], stamping the file it reads.
    fn load_half_read(&self, v: &VersionEntry, reads: &mut seen::Reads) -> Result<Half, String> {
        if private_half_allowed(v) {
            let key = self.load_file(v, Some(reads))?;
            return self.in_its_token(v, key).map(Half::Private);
        }
        Keystore::public_half(v).map(Half::Public)
    }

    /// The public half a version's manifest entry records, checked against its
    /// fingerprint.
    pub fn public_half(v: &VersionEntry) -> Result<PublicKey, String> {
        use base64::Engine;
        let bad = |why: &str| format!("keyring.json v{}: public_key {why}", v.version);
        let der = base64::engine::general_purpose::STANDARD
            .decode(v.public_key.as_deref().unwrap_or_default())
            .map_err(|_| bad("is not base64"))?;
        let public = PublicKey::from_spki(v.algorithm(), &der).map_err(|e| bad(&e))?;
        if public.fingerprint() != v.fingerprint {
            return Err(bad(&format!(
                "has fingerprint {} but the version records {}",
                public.fingerprint(),
                v.fingerprint
            )));
        }
        Ok(public)
    }

    /// Reads one version's file and checks it against its manifest entry; a token
    /// version's key is found in the token, ready to sign.
    pub fn load_version(&self, v: &VersionEntry) -> Result<KeyFile, String> {
        let key = self.load_file(v, None)?;
        self.in_its_token(v, key)
    }

    /// A token version's key as its token holds it; a file version's as it is.
    fn in_its_token(&self, v: &VersionEntry, key: KeyFile) -> Result<KeyFile, String> {
        let Some(label) = &v.object else {
            return Ok(key);
        };
        // The key itself is in the token: it must be there, under its label and the
        // id of its fingerprint.
        let token = self
            .token()
            .map_err(|e| format!("v{} is kept in token object {label}: {e}", v.version))?;
        let handle = token
            .find_key(label, &pkcs11::id_of(&v.fingerprint))
            .map_err(|e| format!("{} v{}: {e}", state_article(v.state), v.version))?;
        Ok(key.with_token(pkcs11::TokenKey { token, handle }))
    }

    /// Reads one version's file (a token version's public part) and checks it
    /// against its manifest entry.
    fn load_file(&self, v: &VersionEntry, reads: Option<&mut seen::Reads>) -> Result<KeyFile, String> {
        let path = self.dir.join(&v.file);
        let (bytes, meta) = fsutil::read_nofollow_meta(&path, KEY_FILE_LIMIT).map_err(|e| {
            format!(
                "v{} ({}) is {} version but its file {}: {}",
                v.version,
                v.file,
                state_article(v.state),
                path.display(),
                fsutil::io_reason(&e)
            )
        })?;
        let key = match &v.object {
            None => KeyFile::parse(v.algorithm(), &bytes),
            Some(_) => KeyFile::parse_token_file(v.algorithm(), &bytes),
        }
        .map_err(|e| format!("v{} file {} is damaged: {e}", v.version, v.file))?;
        if let Some(reads) = reads {
            reads.read(&path, &meta);
        }
        if key.fingerprint() != v.fingerprint {
            return Err(format!(
                "v{} file {} has fingerprint {} but keyring.json records {}",
                v.version,
                v.file,
                key.fingerprint(),
                v.fingerprint
            ));
        }
        Ok(key)
    }

    /// Removes files and token objects [`judge`] proved to be garbage.
    pub fn sweep(&self, garbage: &[String]) -> io::Result<()> {
        self.remove(garbage, "sweep", DirSync::Now)
    }

    /// The lock file of the key store itself (DESIGN 4.4): held for a whole run next to
    /// the state folder's lock, so that configs with different state folders never
    /// work on one key store at once.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(".lock")
    }

    /// What finishing the last commit's tidy-up would change: `current.*` not on the
    /// active version, `jwks.json` not exactly the manifest's live keys, destroyed
    /// versions' files still present. Empty when the store is whole.
    pub fn repair_needed(&self, insp: &Inspection) -> Vec<String> {
        let mut todo = Vec::new();
        if let Some(active) = insp.manifest.active().filter(|a| a.in_token()) {
            // No file holds a token key: `current.*` must not point at anything.
            for name in ["current.pem", "current.key"] {
                if fs::symlink_metadata(self.dir.join(name)).is_ok() {
                    todo.push(format!("remove {name} (v{} is kept in a token)", active.version));
                }
            }
        } else if let Some(active) = insp.manifest.active() {
            let name = format!("current.{}", active.algorithm().extension());
            if !fs::read_link(self.dir.join(&name)).is_ok_and(|t| t == Path::new(&active.file)) {
                todo.push(format!("point {name} at v{}", active.version));
            }
        }
        if self.jwks_stale_given(&insp.manifest, &insp.publics, insp.jwks_seen.as_deref()) {
            todo.push("rewrite jwks.json from keyring.json".into());
        }
        if !insp.destroyed_files.is_empty() {
            todo.push(format!(
                "unlink {} (key material keyring.json no longer allows)",
                insp.destroyed_files.join(", ")
            ));
        }
        todo
    }

    /// Finishes what a committed run left undone (DESIGN 5, repair after a crash past
    /// the commit). Only for a store [`judge`] found clean: the manifest is the truth
    /// only when nothing contradicts it. Returns what it did.
    pub fn repair(&self, insp: &Inspection) -> io::Result<Vec<String>> {
        let todo = self.repair_needed(insp);
        if todo.is_empty() {
            return Ok(todo);
        }
        self.point_current(&insp.manifest, DirSync::Deferred)?;
        self.remove(&insp.destroyed_files, "repair", DirSync::Deferred)?;
        self.publish_jwks(&insp.manifest, &insp.publics, DirSync::Deferred)?;
        self.sync_folder("repair")?;
        Ok(todo)
    }

    fn jwks_stale(&self, manifest: &Manifest, publics: &BTreeMap<u64, PublicKey>) -> bool {
        self.jwks_stale_given(manifest, publics, None)
    }

    /// [`Keystore::jwks_stale`], given what `jwks.json` holds when that is known
    /// (see [`Inspection::jwks_seen`]); otherwise it is read.
    fn jwks_stale_given(&self, manifest: &Manifest, publics: &BTreeMap<u64, PublicKey>, seen: Option<&[u8]>) -> bool {
        if let Some(old) = seen {
            let bytes = jwks_bytes(manifest, publics).unwrap_or_else(empty_jwks);
            return old != bytes.as_slice();
        }
        let path = self.dir.join(JWKS);
        match jwks_bytes(manifest, publics) {
            None => fs::symlink_metadata(&path).is_ok() && !fs::read(&path).is_ok_and(|b| b == empty_jwks()),
            Some(bytes) => !fs::read(&path).is_ok_and(|old| old == bytes),
        }
    }

    /// Rewrites `jwks.json` for `manifest` through a temporary of its own, for a thread
    /// that restores it while the main thread may be writing it (the deadline
    /// watchdog).
    pub fn restore_jwks(&self, manifest: &Manifest, publics: &BTreeMap<u64, PublicKey>) -> io::Result<()> {
        if !self.jwks_stale(manifest, publics) {
            return Ok(());
        }
        let bytes = jwks_bytes(manifest, publics).unwrap_or_else(empty_jwks);
        fsutil::write_atomic_via_with(
            &self.dir,
            JWKS,
            ".jwks.json.restore.tmp",
            &bytes,
            "restore",
            DirSync::Now,
            self.access().jwks_perms(),
        )
    }

    /// Writes a new version's file (O_EXCL, 0600, fsynced). Its name becomes durable
    /// with the next folder sync, which must come before the commit: the JWKS
    /// publication's, or [`Keystore::sync_folder`] when there is none.
    pub fn stage(&self, file: &str, key: &KeyFile) -> io::Result<()> {
        fsutil::write_new_with(
            &self.dir,
            file,
            key.file_bytes(),
            "stage",
            DirSync::Deferred,
            self.access().file_perms(),
        )
    }

    /// Installs a version's file as `sync` copies it from the shared store: left alone
    /// when it already holds exactly these bytes, else replaced atomically (temporary,
    /// fsync, rename; the folder sync is the caller's, before the manifest names it).
    /// Returns whether it wrote.
    pub fn install(&self, file: &str, key: &KeyFile) -> io::Result<bool> {
        if fsutil::read_nofollow(&self.dir.join(file), KEY_FILE_LIMIT).is_ok_and(|b| b.as_slice() == key.file_bytes()) {
            return Ok(false);
        }
        fsutil::write_atomic_with(
            &self.dir,
            file,
            key.file_bytes(),
            "install",
            DirSync::Deferred,
            self.access().file_perms(),
        )?;
        Ok(true)
    }

    /// Makes every entry change in the domain folder so far durable.
    pub fn sync_folder(&self, step: &str) -> io::Result<()> {
        crate::failpoint::hit(step, "dirsync")?;
        fsutil::fsync_dir(&self.dir)
    }

    /// Reads a staged file back and proves it is the key that was generated.
    pub fn verify_staged(&self, file: &str, algorithm: Algorithm, fingerprint: &str) -> Result<(), String> {
        let bytes = fsutil::read_nofollow(&self.dir.join(file), KEY_FILE_LIMIT)
            .map_err(|e| format!("staged {file} cannot be read back: {}", fsutil::io_reason(&e)))?;
        let key = if file.ends_with(".pub.pem") || file.ends_with(".ref") {
            KeyFile::parse_token_file(algorithm, &bytes)
        } else {
            KeyFile::parse(algorithm, &bytes)
        }
        .map_err(|e| format!("staged {file} does not parse: {e}"))?;
        if key.fingerprint() != fingerprint {
            return Err(format!(
                "staged {file} read back with fingerprint {} instead of {fingerprint}",
                key.fingerprint()
            ));
        }
        Ok(())
    }

    /// Removes a staged file after a failure before the commit.
    pub fn unstage(&self, files: &[String]) -> io::Result<()> {
        self.remove(files, "unstage", DirSync::Now)
    }

    /// Writes `jwks.json` with the public keys of every pending, active and retired
    /// version of `manifest`, unless it already says exactly that. Symmetric-only
    /// domains have no JWKS. Returns whether it wrote (and, with `DirSync::Now`,
    /// synced the folder).
    pub fn publish_jwks(
        &self,
        manifest: &Manifest,
        publics: &BTreeMap<u64, PublicKey>,
        sync: DirSync,
    ) -> io::Result<bool> {
        self.publish_jwks_over(manifest, publics, sync, None)
    }

    /// [`Keystore::publish_jwks`] over a `jwks.json` known to be a regular file holding
    /// `current` (what this run's inspection read, or what it last wrote there itself),
    /// instead of reading it again; `None`: read it.
    pub fn publish_jwks_over(
        &self,
        manifest: &Manifest,
        publics: &BTreeMap<u64, PublicKey>,
        sync: DirSync,
        current: Option<&[u8]>,
    ) -> io::Result<bool> {
        self.publish_jwks_holding(manifest, publics, sync, current)
            .map(|(wrote, _)| wrote)
    }

    /// [`Keystore::publish_jwks_over`], also returning what `jwks.json` then holds
    /// (when it is a file with the manifest's key set): the `current` of the next
    /// publication, which the run makes without anything else writing it in between.
    pub fn publish_jwks_holding(
        &self,
        manifest: &Manifest,
        publics: &BTreeMap<u64, PublicKey>,
        sync: DirSync,
        current: Option<&[u8]>,
    ) -> io::Result<(bool, Option<Vec<u8>>)> {
        let path = self.dir.join(JWKS);
        let bytes = match (jwks_bytes(manifest, publics), current) {
            (Some(b), _) => b,
            // A regular file is there: the key set to write is the empty one.
            (None, Some(_)) => empty_jwks(),
            (None, None) if fs::symlink_metadata(&path).is_err() => return Ok((false, None)),
            (None, None) => empty_jwks(),
        };
        let unchanged = match current {
            Some(old) => old == bytes.as_slice(),
            None => fs::read(&path).is_ok_and(|old| old == bytes),
        };
        if unchanged {
            return Ok((false, Some(bytes)));
        }
        fsutil::write_atomic_with(&self.dir, JWKS, &bytes, "jwks", sync, self.access().jwks_perms())?;
        Ok((true, Some(bytes)))
    }

    /// The commit point: atomically replaces `keyring.json`.
    /// Records, after a review, that the files of retired or pending versions are gone
    /// for good (deleted with no backup): those versions become `destroyed`, which is
    /// what they are, and the domain can rotate again. Only a missing file counts: a
    /// damaged or substituted one is tampering, to be restored from backup, and a lost
    /// active key is never written off here (the run stays blocked until it is back).
    /// Returns the versions written off.
    pub fn record_lost_files(&self) -> Result<Vec<u64>, String> {
        let path = self.dir.join(MANIFEST);
        let bytes = match fsutil::read_nofollow(&path, MANIFEST_LIMIT) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {}", path.display(), fsutil::io_reason(&e))),
        };
        let mut manifest = Manifest::parse(&bytes, &self.domain)?;
        let ts = manifest::now_rfc3339(chrono::Utc::now());
        let mut lost = Vec::new();
        // A token version's key is its object, not its file: it is lost when the token
        // no longer holds an object with its label and id (a lost public file is not a
        // lost key).
        let objects = if manifest.versions.iter().any(|v| v.in_token() && v.is_live()) {
            Pkcs11Custody.list_present(self)?
        } else {
            Vec::new()
        };
        for v in &mut manifest.versions {
            let gone = match &v.object {
                Some(label) => {
                    let id = pkcs11::id_of(&v.fingerprint);
                    !objects.iter().any(|o| o.label == *label && o.id == id)
                }
                None => {
                    matches!(fs::symlink_metadata(self.dir.join(&v.file)), Err(e) if e.kind() == io::ErrorKind::NotFound)
                }
            };
            // A retired signature key has no file (nor object) by design: only a key
            // the version should have can be lost.
            if gone && private_half_allowed(v) && matches!(v.state, VersionState::Retired | VersionState::Pending) {
                v.state = VersionState::Destroyed;
                v.destroyed_at = Some(ts.clone());
                lost.push(v.version);
            }
        }
        if !lost.is_empty() {
            self.commit(&manifest).map_err(|e| {
                format!(
                    "cannot record the lost versions in keyring.json: {}",
                    fsutil::io_reason(&e)
                )
            })?;
        }
        Ok(lost)
    }

    pub fn commit(&self, manifest: &Manifest) -> io::Result<()> {
        self.commit_gated(manifest, || Ok(()))
    }

    /// [`Keystore::commit`], asking `gate` right before the rename (the commit point)
    /// whether it may still happen.
    pub fn commit_gated(&self, manifest: &Manifest, gate: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        fsutil::write_atomic_gated(
            &self.dir,
            MANIFEST,
            &manifest.to_bytes(),
            "commit",
            DirSync::Now,
            self.access().file_perms(),
            gate,
        )
    }

    /// Points `current.pem` (or `current.key`) at the active version.
    pub fn point_current(&self, manifest: &Manifest, sync: DirSync) -> io::Result<()> {
        let Some(active) = manifest.active() else {
            return Ok(());
        };
        if active.in_token() {
            // A symlink named current.pem to a public key would mislead every tool
            // that expects a private key there: a token domain has none.
            let stale: Vec<String> = ["current.pem", "current.key"]
                .into_iter()
                .filter(|n| fs::symlink_metadata(self.dir.join(n)).is_ok())
                .map(String::from)
                .collect();
            return fsutil::remove_files(&self.dir, &stale, "current", sync);
        }
        let ext = active.algorithm().extension();
        let name = format!("current.{ext}");
        let other = format!("current.{}", if ext == "pem" { "key" } else { "pem" });
        if fs::read_link(self.dir.join(&name)).is_ok_and(|t| t == Path::new(&active.file))
            && fs::symlink_metadata(self.dir.join(&other)).is_err()
        {
            return Ok(());
        }
        fsutil::replace_symlink(&self.dir, &name, &active.file, "current", sync)?;
        if fs::symlink_metadata(self.dir.join(&other)).is_ok() {
            fsutil::remove_files(&self.dir, &[other], "current", sync)?;
        }
        Ok(())
    }

    /// Removes the key material the committed `manifest` no longer allows (see
    /// [`private_half_allowed`]): destroyed and compromised versions, and the private
    /// halves of retired signature keys. Files are unlinked; a token version's object
    /// is destroyed through its custody ([`Custody::destroy_private`]).
    pub fn destroy_files(&self, manifest: &Manifest, sync: DirSync) -> io::Result<()> {
        // One listing of the folder rather than a stat per version the manifest ever
        // had (it keeps every destroyed version's entry): the cost stays with what is
        // on disk, not with the domain's history.
        let mut present = std::collections::BTreeSet::new();
        let entries = match fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            listing => Some(listing?),
        };
        for entry in entries.into_iter().flatten() {
            if let Ok(name) = entry?.file_name().into_string() {
                if parse_version_file(&name).is_some() {
                    present.insert(name);
                }
            }
        }
        let files: Vec<String> = manifest
            .versions
            .iter()
            .filter(|v| !private_half_allowed(v) && present.contains(&v.file))
            .map(|v| v.file.clone())
            .collect();
        // Token objects: only those still present (old destroyed versions are long gone).
        let disallowed: Vec<&VersionEntry> = manifest
            .versions
            .iter()
            .filter(|v| v.in_token() && !private_half_allowed(v))
            .collect();
        if !disallowed.is_empty() {
            let present = Pkcs11Custody.list_present(self).map_err(io::Error::other)?;
            for v in disallowed {
                if present.iter().any(|o| Some(o.label.as_str()) == v.object.as_deref()) {
                    Pkcs11Custody.destroy_private(self, v, sync)?;
                }
            }
        }
        fsutil::remove_files(&self.dir, &files, "destroy", sync)
    }
}

fn state_article(s: VersionState) -> &'static str {
    match s {
        VersionState::Pending => "a pending",
        VersionState::Active => "the active",
        VersionState::Retired => "a retired",
        VersionState::Destroyed => "a destroyed",
        VersionState::Compromised => "a compromised",
    }
}

/// The `kid` of a version: its number and the start of its fingerprint, so a number
/// reused after a lost orphan could never alias another key in a verifier's cache.
pub fn kid(v: &VersionEntry) -> String {
    let fp = v.fingerprint.strip_prefix("sha256:").unwrap_or(&v.fingerprint);
    format!("v{:06}-{}", v.version, &fp[..fp.len().min(8)])
}

/// `jwks.json`'s bytes for `manifest`: [`jwks`] as pretty JSON, serialized straight
/// from the public keys (no `Value` tree is built and no JWK copied). The same bytes,
/// as `jwks_bytes_match_the_key_set_value` checks.
fn jwks_bytes(manifest: &Manifest, publics: &BTreeMap<u64, PublicKey>) -> Option<Vec<u8>> {
    /// One published key: its JWK members, with its `kid` where `jwks` puts it
    /// (replacing one already there in place, else last).
    struct Jwk<'a> {
        members: &'a serde_json::Map<String, Value>,
        kid: String,
    }
    impl serde::Serialize for Jwk<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let has_kid = self.members.contains_key("kid");
            let mut map = s.serialize_map(Some(self.members.len() + usize::from(!has_kid)))?;
            for (k, v) in self.members {
                if k == "kid" {
                    map.serialize_entry(k, &self.kid)?;
                } else {
                    map.serialize_entry(k, v)?;
                }
            }
            if !has_kid {
                map.serialize_entry("kid", &self.kid)?;
            }
            map.end()
        }
    }
    #[derive(serde::Serialize)]
    struct Set<'a> {
        keys: Vec<Jwk<'a>>,
    }
    let live = published(manifest, publics);
    if live.is_empty() {
        return None;
    }
    let keys = live
        .into_iter()
        .map(|v| Jwk {
            members: &publics[&v.version].jwk,
            kid: kid(v),
        })
        .collect();
    let mut bytes = serde_json::to_vec_pretty(&Set { keys }).expect("json");
    bytes.push(b'\n');
    Some(bytes)
}

/// The versions `jwks.json` publishes, in its order: pending, then active, then
/// retired, newest first within each; only those with a public key.
fn published<'a>(manifest: &'a Manifest, publics: &BTreeMap<u64, PublicKey>) -> Vec<&'a VersionEntry> {
    let order = |s: VersionState| match s {
        VersionState::Pending => 0,
        VersionState::Active => 1,
        _ => 2,
    };
    let mut live: Vec<&VersionEntry> = manifest.live().filter(|v| publics.contains_key(&v.version)).collect();
    live.sort_by_key(|v| (order(v.state), std::cmp::Reverse(v.version)));
    live
}

fn empty_jwks() -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(&json!({"keys": []})).expect("json");
    bytes.push(b'\n');
    bytes
}

/// The RFC 7517 key set for `manifest`, or `None` when no version has a public key.
pub fn jwks(manifest: &Manifest, publics: &BTreeMap<u64, PublicKey>) -> Option<Value> {
    let live = published(manifest, publics);
    if live.is_empty() {
        return None;
    }
    let keys: Vec<Value> = live
        .into_iter()
        .map(|v| {
            let mut jwk = publics[&v.version].jwk.clone();
            jwk.insert("kid".into(), kid(v).into());
            Value::Object(jwk)
        })
        .collect();
    Some(json!({ "keys": keys }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_published_in_jwks_is_taken_even_without_its_file() {
        let d = tempfile::tempdir().unwrap();
        let ks = Keystore::new(d.path(), "d");
        ks.prepare().unwrap();
        std::fs::write(
            ks.dir().join(JWKS),
            r#"{"keys":[{"kid":"v000007-0123abcd"},{"kid":"v000003-ffffffff"},{"kid":"junk"}]}"#,
        )
        .unwrap();
        let insp = ks.inspect().unwrap();
        assert_eq!(insp.next_version, 8);
        // And a number the ledger recorded beats both.
        let prov = Provenance {
            manifest_run_known: None,
            later_commit: None,
            compromised: Vec::new(),
            runs: vec![RunRecord {
                run_id: "r".into(),
                ended_uncommitted: true,
                noted: vec!["v000011.pem".into()],
                ..Default::default()
            }],
        };
        assert_eq!(judge(&insp, &prov).next_version, 12);
    }

    #[test]
    fn jwks_bytes_match_the_key_set_value() {
        let key = |alg: Algorithm| alg.generate().unwrap();
        let keys = [
            key(Algorithm::Ed25519),
            key(Algorithm::EcdsaP256),
            key(Algorithm::Ed25519),
            key(Algorithm::EcdsaP384),
        ];
        let mut m = Manifest::empty("d");
        let mut publics = BTreeMap::new();
        for (i, (k, state)) in keys
            .iter()
            .zip([
                VersionState::Retired,
                VersionState::Retired,
                VersionState::Active,
                VersionState::Pending,
            ])
            .enumerate()
        {
            let version = i as u64 + 1;
            m.versions.push(VersionEntry {
                version,
                state,
                algorithm: k.algorithm().name().to_string(),
                created_at: "2026-01-01T00:00:00Z".into(),
                activated_at: None,
                retired_at: None,
                destroyed_at: None,
                compromised_at: None,
                compromise_reason: None,
                fingerprint: k.fingerprint().to_string(),
                file: manifest::version_file(version, k.algorithm()),
                created_by_run: "r".into(),
                object: None,
                public_key: None,
            });
            publics.insert(version, k.public().unwrap().clone());
        }
        let mut expected = serde_json::to_vec_pretty(&jwks(&m, &publics).unwrap()).unwrap();
        expected.push(b'\n');
        assert_eq!(
            String::from_utf8(jwks_bytes(&m, &publics).unwrap()).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        // The kids read back in the order written.
        assert_eq!(published_versions(&jwks_bytes(&m, &publics).unwrap()), [4, 3, 2, 1]);
        assert!(jwks_bytes(&Manifest::empty("d"), &publics).is_none());
    }

    #[test]
    fn kids_are_read_from_any_shape_of_key_set() {
        // Not keyrotate's shape (a key that is not an object, a kid that is not a
        // string): every string kid of an object still counts.
        let odd = br#"{"keys":[7,{"kid":5},{"kid":"v000004-x"},{"kid":"v000009-y","extra":[1]}]}"#;
        assert_eq!(published_versions(odd), [4, 9]);
        assert_eq!(
            published_versions(br#"{"keys":{"kid":"v000003-z"}}"#),
            Vec::<u64>::new()
        );
        assert_eq!(published_versions(b"not json"), Vec::<u64>::new());
        assert_eq!(published_versions(br#"{"keys":[{"kid":"v\u0030000012-e"}]}"#), [12]);
    }

    #[test]
    fn only_files_staged_by_runs_that_never_committed_are_garbage() {
        let d = tempfile::tempdir().unwrap();
        let ks = Keystore::new(d.path(), "d");
        ks.prepare().unwrap();
        let key = Algorithm::Ed25519.generate().unwrap();
        for f in ["v000001.pem", "v000002.pem", "v000003.pem"] {
            std::fs::write(ks.dir().join(f), key.file_bytes()).unwrap();
        }
        std::fs::write(ks.dir().join(".lock"), "").unwrap();
        let insp = ks.inspect().unwrap();
        assert_eq!(insp.unlisted, ["v000001.pem", "v000002.pem", "v000003.pem"]);
        // `ended_uncommitted` as the ledger derives it from the row's state: true for
        // an aborted or resolved run, false for a successful one.
        let run = |id: &str, ended_uncommitted: bool, committed: bool, file: &str| RunRecord {
            run_id: id.into(),
            ended_uncommitted,
            committed,
            staged: vec![file.into()],
            noted: Vec::new(),
        };
        let prov = Provenance {
            manifest_run_known: None,
            later_commit: None,
            compromised: Vec::new(),
            runs: vec![
                run("a", true, false, "v000001.pem"),  // aborted
                run("b", false, false, "v000002.pem"), // succeeded
                run("c", true, true, "v000003.pem"),   // resolved, recorded its commit
            ],
        };
        let v = judge(&insp, &prov);
        assert_eq!(v.garbage, ["v000001.pem"]);
        assert_eq!(v.evidence, ["v000002.pem", "v000003.pem"]);
        assert!(!v.clean());
    }
}
