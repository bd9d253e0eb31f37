//! The built-in key store: one folder per domain holding versioned key files, the
//! `keyring.json` manifest, the `current.*` symlink and `jwks.json`.
//!
//! `Keystore` owns every file operation on a domain folder. It never decides *whether*
//! to rotate (that is `rotate`'s job); it inspects, stages, publishes, commits and
//! tidies, each durably, in the order DESIGN.md section 4.2 gives.

mod algorithm;
pub mod manifest;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub use algorithm::{verify, Algorithm, KeyFile, PublicKey};
use manifest::{parse_version_file, Manifest, VersionEntry, VersionState};

use crate::fsutil::{self, DirSync};

pub const MANIFEST: &str = "keyring.json";
pub const JWKS: &str = "jwks.json";
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
}

/// What is on disk, verified: the manifest, each live version's public key, and the
/// leftovers of interrupted runs.
#[derive(Debug)]
pub struct Inspection {
    pub manifest: Manifest,
    pub publics: BTreeMap<u64, PublicKey>,
    /// Files a crash left behind: unreferenced versions, destroyed versions' files,
    /// temporaries. Safe to remove under the lock.
    pub leftovers: Vec<String>,
    /// The next version number: above every number ever used, orphans included, so a
    /// `kid` once published is never reused for another key.
    pub next_version: u64,
    pub exists: bool,
}

impl Keystore {
    pub fn new(root: &Path, domain: &str) -> Keystore {
        Keystore {
            root: root.to_path_buf(),
            dir: root.join(domain),
            domain: domain.to_string(),
            access: None,
        }
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
            let Ok(name) = entry
                .map_err(|e| format!("{}: {}", self.dir.display(), fsutil::io_reason(&e)))?
                .file_name()
                .into_string()
            else {
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
        let manifest_path = self.dir.join(MANIFEST);
        let (manifest, exists) = match fsutil::read_nofollow(&manifest_path, MANIFEST_LIMIT) {
            Ok(bytes) => (Manifest::parse(&bytes, &self.domain)?, true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Manifest::empty(&self.domain), false),
            Err(e) => return Err(format!("{}: {}", manifest_path.display(), fsutil::io_reason(&e))),
        };
        let mut publics = BTreeMap::new();
        for v in manifest.live() {
            let key = self.load_version(v)?;
            if let Some(p) = key.public() {
                publics.insert(v.version, p.clone());
            }
        }
        let mut leftovers = Vec::new();
        let mut next_version = manifest.max_version() + 1;
        match fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| format!("{}: {}", self.dir.display(), fsutil::io_reason(&e)))?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    if let Some(n) = parse_version_file(&name) {
                        next_version = next_version.max(n + 1);
                        let referenced = manifest.live().any(|v| v.file == name);
                        if !referenced {
                            leftovers.push(name);
                        }
                    } else if name.starts_with('.') && name.ends_with(".tmp") {
                        leftovers.push(name);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {}", self.dir.display(), fsutil::io_reason(&e))),
        }
        leftovers.sort();
        Ok(Inspection {
            manifest,
            publics,
            leftovers,
            next_version,
            exists,
        })
    }

    /// Reads one version's file and checks it against its manifest entry.
    pub fn load_version(&self, v: &VersionEntry) -> Result<KeyFile, String> {
        let path = self.dir.join(&v.file);
        let bytes = fsutil::read_nofollow(&path, KEY_FILE_LIMIT).map_err(|e| {
            format!(
                "v{} ({}) is {} version but its file {}: {}",
                v.version,
                v.file,
                state_article(v.state),
                path.display(),
                fsutil::io_reason(&e)
            )
        })?;
        let key = KeyFile::parse(v.algorithm(), &bytes)
            .map_err(|e| format!("v{} file {} is damaged: {e}", v.version, v.file))?;
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

    /// Removes what interrupted runs left behind.
    pub fn sweep(&self, leftovers: &[String]) -> io::Result<()> {
        fsutil::remove_files(&self.dir, leftovers, "sweep", DirSync::Now)
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

    /// Makes every entry change in the domain folder so far durable.
    pub fn sync_folder(&self, step: &str) -> io::Result<()> {
        crate::failpoint::hit(step, "dirsync")?;
        fsutil::fsync_dir(&self.dir)
    }

    /// Reads a staged file back and proves it is the key that was generated.
    pub fn verify_staged(&self, file: &str, algorithm: Algorithm, fingerprint: &str) -> Result<(), String> {
        let bytes = fsutil::read_nofollow(&self.dir.join(file), KEY_FILE_LIMIT)
            .map_err(|e| format!("staged {file} cannot be read back: {}", fsutil::io_reason(&e)))?;
        let key = KeyFile::parse(algorithm, &bytes).map_err(|e| format!("staged {file} does not parse: {e}"))?;
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
        fsutil::remove_files(&self.dir, files, "unstage", DirSync::Now)
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
        let doc = jwks(manifest, publics);
        let path = self.dir.join(JWKS);
        if doc.is_none() && fs::symlink_metadata(&path).is_err() {
            return Ok(false);
        }
        let mut bytes = serde_json::to_vec_pretty(&doc.unwrap_or_else(|| json!({"keys": []}))).expect("json");
        bytes.push(b'\n');
        if fs::read(&path).is_ok_and(|old| old == bytes) {
            return Ok(false);
        }
        fsutil::write_atomic_with(&self.dir, JWKS, &bytes, "jwks", sync, self.access().jwks_perms())?;
        Ok(true)
    }

    /// The commit point: atomically replaces `keyring.json`.
    pub fn commit(&self, manifest: &Manifest) -> io::Result<()> {
        fsutil::write_atomic_with(
            &self.dir,
            MANIFEST,
            &manifest.to_bytes(),
            "commit",
            DirSync::Now,
            self.access().file_perms(),
        )
    }

    /// Points `current.pem` (or `current.key`) at the active version.
    pub fn point_current(&self, manifest: &Manifest, sync: DirSync) -> io::Result<()> {
        let Some(active) = manifest.active() else {
            return Ok(());
        };
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

    /// Unlinks the files of destroyed versions (marked destroyed by the commit).
    pub fn destroy_files(&self, manifest: &Manifest, versions: &[u64], sync: DirSync) -> io::Result<()> {
        let files: Vec<String> = versions
            .iter()
            .filter_map(|n| manifest.get(*n))
            .map(|v| v.file.clone())
            .collect();
        fsutil::remove_files(&self.dir, &files, "destroy", sync)
    }
}

fn state_article(s: VersionState) -> &'static str {
    match s {
        VersionState::Pending => "a pending",
        VersionState::Active => "the active",
        VersionState::Retired => "a retired",
        VersionState::Destroyed => "a destroyed",
    }
}

/// The `kid` of a version: its number and the start of its fingerprint, so a number
/// reused after a lost orphan could never alias another key in a verifier's cache.
pub fn kid(v: &VersionEntry) -> String {
    let fp = v.fingerprint.strip_prefix("sha256:").unwrap_or(&v.fingerprint);
    format!("v{:06}-{}", v.version, &fp[..fp.len().min(8)])
}

/// The RFC 7517 key set for `manifest`, or `None` when no version has a public key.
pub fn jwks(manifest: &Manifest, publics: &BTreeMap<u64, PublicKey>) -> Option<Value> {
    let order = |s: VersionState| match s {
        VersionState::Pending => 0,
        VersionState::Active => 1,
        _ => 2,
    };
    let mut live: Vec<&VersionEntry> = manifest.live().filter(|v| publics.contains_key(&v.version)).collect();
    live.sort_by_key(|v| (order(v.state), std::cmp::Reverse(v.version)));
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
