//! Power loss at every durable step: the crash suite's SIGKILL, plus the loss of every
//! write the kernel had not been told to make durable.
//!
//! **Mechanism.** The `failpoints` build journals each durable file operation of the
//! key store as it completes (`KEYROTATE_OPLOG`, written by `src/fsutil.rs`, which
//! every durable write goes through): a file created or truncated and written (with
//! its bytes), an fsync of a file, a rename, an unlink, a symlink, an fsync of a
//! folder. For each step k of a rotation the test snapshots the key folder, runs
//! `rotate` with `KEYROTATE_FAILPOINTS=k=kill` (the process dies just before step k),
//! and rebuilds from the snapshot and the journal what a power cut at that instant may
//! leave on disk:
//!
//! - a file's bytes survive only if it was fsynced after its last write (otherwise it
//!   is there but empty: the worst case for a file whose name survived);
//! - a change of a folder's entries (create, rename, unlink, symlink) survives for
//!   sure only if the folder was fsynced after it. Of the changes made since the
//!   folder's last fsync, the test tries every cut POSIX allows that matters here:
//!   none survives (the worst case), all survive, and each one lost while every other,
//!   earlier or later, survives (the reordering in which a staged key's name is lost
//!   while a later `jwks.json` rename naming it survives).
//!
//! On each rebuilt copy (the rest of the install, ledger included, as the kill left
//! it) it asserts: `keyring.json` is the old one or the new one and the store verifies
//! (one active version, every live file present with its fingerprint); then the next
//! `rotate` exits 0 or 4 (4 only naming the dead run, saying truthfully whether it
//! committed), `resolve` unblocks, the next `rotate` exits 0, the store is whole (no
//! orphan or temporary file, `jwks.json` exactly the live versions), versions only
//! grew, and no version number was ever published for two different keys.
//!
//! **Limits of the model.** Only the key folder's files are journalled and cut: the
//! SQLite ledger relies on SQLite's own durability (WAL, `synchronous=FULL`: a
//! committed transaction survives) and is taken as the kill left it; the audit file
//! and the lock files are not key state and are kept as they were. Metadata-only
//! changes (chmod, chown) are not modelled. A surviving file whose data was lost is
//! modelled as empty, not as garbage of the right length. Reorderings are tried one
//! lost change at a time, not every subset. The journal holds key bytes: it exists
//! only in `failpoints` builds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use base64::Engine;

use crate::common::Env;

/// A domain with history: v1..v3 (retain = 2, so the next rotation destroys v1) and a
/// temporary file left by an earlier crash, so every kind of step is on the path.
fn base(domain: &str) -> Env {
    let env = Env::new();
    env.rotate(domain).status(0);
    env.rotate(domain).arg("--force").status(0);
    env.rotate(domain).arg("--force").status(0);
    std::fs::write(env.key_dir(domain).join(".jwks.json.tmp"), "{").unwrap();
    env
}

fn clone_env(from: &Env) -> Env {
    let env = Env::new();
    crate::crash::copy_tree(from.dir.path(), env.dir.path());
    env
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File(usize),
    Symlink(String),
}

/// What the folder holds on disk: names to file bytes or symlink targets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Clone, Debug)]
enum EntryOp {
    Set(String, Node),
    Rename(String, String, Node),
    Remove(String),
}

struct Inode {
    ino: u64,
    /// The bytes a power cut cannot take away (written, then fsynced).
    durable: Option<Vec<u8>>,
    /// The bytes last written.
    latest: Vec<u8>,
}

/// The key folder before the run, and what the run did to it.
struct Model {
    start: BTreeMap<String, Node>,
    inodes: Vec<Inode>,
    /// Entry changes in order, each with whether a later folder fsync made it durable.
    changes: Vec<(EntryOp, bool)>,
    /// Every `jwks.json` the run renamed into place, and every `keyring.json` it wrote.
    written_jwks: Vec<Vec<u8>>,
    written_manifests: Vec<Vec<u8>>,
}

fn name_in(dir: &Path, path: &str) -> Option<String> {
    let p = Path::new(path);
    (p.parent()? == dir).then(|| p.file_name().unwrap().to_string_lossy().into_owned())
}

impl Model {
    fn snapshot(dir: &Path) -> Model {
        let mut m = Model {
            start: BTreeMap::new(),
            inodes: Vec::new(),
            changes: Vec::new(),
            written_jwks: Vec::new(),
            written_manifests: Vec::new(),
        };
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let node = if meta.file_type().is_symlink() {
                Node::Symlink(std::fs::read_link(e.path()).unwrap().to_string_lossy().into_owned())
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                m.inodes.push(Inode {
                    ino: meta.ino(),
                    durable: Some(bytes.clone()),
                    latest: bytes,
                });
                Node::File(m.inodes.len() - 1)
            };
            m.start.insert(name, node);
        }
        m
    }

    /// Applies the journal of one run to the snapshot of `dir`.
    fn journal(&mut self, dir: &Path, journal: &str) {
        let b64 = base64::engine::general_purpose::STANDARD;
        // What is really there, op after op: how inode numbers map to files.
        let mut cur = self.start.clone();
        let mut by_ino: HashMap<u64, usize> = self.inodes.iter().enumerate().map(|(i, n)| (n.ino, i)).collect();
        let mut changes: Vec<EntryOp> = Vec::new();
        let mut last_dirsync = 0;
        for line in journal.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f[0] {
                "write" => {
                    let Some(name) = name_in(dir, f[1]) else { continue };
                    let ino: u64 = f[2].parse().unwrap();
                    let bytes = b64.decode(f[3]).unwrap();
                    if name.starts_with(".keyring.json") {
                        self.written_manifests.push(bytes.clone());
                    }
                    match cur.get(&name) {
                        Some(Node::File(id)) if self.inodes[*id].ino == ino => {
                            // Truncated and rewritten in place: nothing durable until fsync.
                            self.inodes[*id].durable = None;
                            self.inodes[*id].latest = bytes;
                        }
                        _ => {
                            self.inodes.push(Inode {
                                ino,
                                durable: None,
                                latest: bytes,
                            });
                            let id = self.inodes.len() - 1;
                            by_ino.insert(ino, id);
                            cur.insert(name.clone(), Node::File(id));
                            changes.push(EntryOp::Set(name, Node::File(id)));
                        }
                    }
                }
                "fsync" => {
                    let ino: u64 = f[1].parse().unwrap();
                    if let Some(&id) = by_ino.get(&ino) {
                        self.inodes[id].durable = Some(self.inodes[id].latest.clone());
                    }
                }
                "rename" => {
                    let (Some(from), Some(to)) = (name_in(dir, f[1]), name_in(dir, f[2])) else {
                        continue;
                    };
                    let node = cur.remove(&from).expect("renamed a file the model does not know");
                    if let (Node::File(id), "jwks.json") = (&node, to.as_str()) {
                        self.written_jwks.push(self.inodes[*id].latest.clone());
                    }
                    cur.insert(to.clone(), node.clone());
                    changes.push(EntryOp::Rename(from, to, node));
                }
                "unlink" => {
                    let Some(name) = name_in(dir, f[1]) else { continue };
                    cur.remove(&name);
                    changes.push(EntryOp::Remove(name));
                }
                "symlink" => {
                    let Some(name) = name_in(dir, f[1]) else { continue };
                    let node = Node::Symlink(f[3].to_string());
                    cur.insert(name.clone(), node.clone());
                    changes.push(EntryOp::Set(name, node));
                }
                "dirsync" if Path::new(f[1]) == dir => last_dirsync = changes.len(),
                _ => {}
            }
        }
        self.changes = changes
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i < last_dirsync))
            .collect();
    }

    /// The folder after a power cut in which exactly the unsynced changes `keep`
    /// (indices into `changes`) reached the disk, besides every synced one.
    fn after_cut(&self, keep: &BTreeSet<usize>) -> BTreeMap<String, Entry> {
        let mut names = self.start.clone();
        for (i, (op, synced)) in self.changes.iter().enumerate() {
            if !synced && !keep.contains(&i) {
                continue;
            }
            match op {
                EntryOp::Set(name, node) => {
                    names.insert(name.clone(), node.clone());
                }
                EntryOp::Rename(from, to, node) => {
                    if names.get(from) == Some(node) {
                        names.remove(from);
                    }
                    names.insert(to.clone(), node.clone());
                }
                EntryOp::Remove(name) => {
                    names.remove(name);
                }
            }
        }
        names
            .into_iter()
            .map(|(name, node)| {
                let entry = match node {
                    Node::File(id) => Entry::File(self.inodes[id].durable.clone().unwrap_or_default()),
                    Node::Symlink(t) => Entry::Symlink(t),
                };
                (name, entry)
            })
            .collect()
    }

    /// Every distinct folder a power cut may leave: none of the unsynced changes, all of
    /// them, and each one lost while all the others survive.
    fn cuts(&self) -> Vec<(String, BTreeMap<String, Entry>)> {
        let unsynced: Vec<usize> = (0..self.changes.len()).filter(|i| !self.changes[*i].1).collect();
        let mut variants = vec![
            ("every unsynced change lost".to_string(), BTreeSet::new()),
            (
                "every unsynced change kept".to_string(),
                unsynced.iter().copied().collect(),
            ),
        ];
        for &lost in &unsynced {
            variants.push((
                format!("only {:?} lost", self.changes[lost].0),
                unsynced.iter().copied().filter(|i| *i != lost).collect(),
            ));
        }
        let mut seen = BTreeSet::new();
        variants
            .into_iter()
            .map(|(what, keep)| (what, self.after_cut(&keep)))
            .filter(|(_, folder)| seen.insert(folder.clone()))
            .collect()
    }
}

/// Replaces the key folder's content with `folder` (the lock file, which is not key
/// state and not journalled, stays as the kill left it).
fn materialize(dir: &Path, folder: &BTreeMap<String, Entry>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name() != ".lock" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    for (name, entry) in folder {
        let path = dir.join(name);
        match entry {
            Entry::File(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            }
            Entry::Symlink(t) => std::os::unix::fs::symlink(t, &path).unwrap(),
        }
    }
}

/// `vNNNNNN` → the `kid`s published for it in a `jwks.json`.
fn kids_in(jwks: &[u8], out: &mut BTreeMap<u64, BTreeSet<String>>) {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(jwks) else {
        return;
    };
    for k in doc["keys"].as_array().into_iter().flatten() {
        if let Some(kid) = k["kid"].as_str() {
            if let Some(n) = kid.get(1..7).and_then(|n| n.parse().ok()) {
                out.entry(n).or_default().insert(kid.to_string());
            }
        }
    }
}

fn manifest_kids(env: &Env, domain: &str, out: &mut BTreeMap<u64, BTreeSet<String>>) {
    for v in env.manifest(domain)["versions"].as_array().unwrap() {
        let fp = v["fingerprint"].as_str().unwrap().trim_start_matches("sha256:");
        let n = v["version"].as_u64().unwrap();
        out.entry(n).or_default().insert(format!("v{n:06}-{}", &fp[..8]));
    }
}

/// The store verifies: one active version, every live file present and matching.
fn assert_verifies(env: &Env, domain: &str, context: &str) -> keyrotate::keystore::manifest::Manifest {
    let ks = keyrotate::keystore::Keystore::new(&env.path("keys"), domain);
    let insp = ks
        .inspect()
        .unwrap_or_else(|e| panic!("{context}: the store does not verify: {e}\n{}", env.listing()));
    let active = insp
        .manifest
        .versions
        .iter()
        .filter(|v| v.state == keyrotate::keystore::manifest::VersionState::Active)
        .count();
    assert_eq!(active, 1, "{context}: active versions\n{}", env.listing());
    insp.manifest
}

/// The store is whole: only live key files, no temporaries, jwks.json = live versions.
fn assert_whole(env: &Env, domain: &str, context: &str) {
    assert_eq!(
        env.key_files(domain),
        env.live_files(domain),
        "{context}: orphan or missing key files"
    );
    let tmp: Vec<String> = std::fs::read_dir(env.key_dir(domain))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{context}: temporaries left: {tmp:?}");
    let mut published = BTreeMap::new();
    kids_in(
        &std::fs::read(env.key_dir(domain).join("jwks.json")).unwrap(),
        &mut published,
    );
    let live: Vec<u64> = env
        .versions(domain)
        .into_iter()
        .filter(|(_, s)| s != "destroyed")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        published.keys().copied().collect::<Vec<_>>(),
        live,
        "{context}: jwks.json"
    );
    let m = env.manifest(domain);
    let active = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == "active")
        .unwrap();
    let file = active["file"].as_str().unwrap();
    let link = format!("current.{}", file.rsplit('.').next().unwrap());
    assert_eq!(
        std::fs::read_link(env.key_dir(domain).join(&link)).ok(),
        Some(std::path::PathBuf::from(file)),
        "{context}: {link} is not on the active version"
    );
}

/// What one power-cut scenario runs: `args` (with `--run-id VICTIM`) from `base`,
/// which exits `code` when nothing stops it and must name `steps` on the way.
struct Scenario<'a> {
    base: &'a Env,
    domain: &'a str,
    args: Vec<String>,
    code: i32,
    steps: &'a [&'a str],
    /// Runs already dead in `base` (in flight in its ledger).
    dead: &'a [&'a str],
}

const VICTIM: &str = "VICTIM";

fn power_loss_at_every_step(sc: &Scenario) {
    let (base, domain) = (sc.base, sc.domain);
    let base_max = base.versions(domain).last().unwrap().0;
    let base_manifest = std::fs::read(base.key_dir(domain).join("keyring.json")).unwrap();
    let rotate = ["rotate", "--domain", domain, "--deadline", "1m", "--force"];
    let mut args = sc.args.clone();
    args.extend(["--run-id".to_string(), VICTIM.to_string()]);

    // The steps of the command from this state.
    let probe = clone_env(base);
    let log = probe.path("steps.log");
    probe
        .cmd()
        .args(&args)
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(sc.code);
    let steps: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    for kind in sc.steps {
        assert!(steps.iter().any(|s| s == kind), "no {kind} step in {steps:?}");
    }

    let mut cuts_tried = 0;
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let killed = clone_env(base);
        let dir = killed.key_dir(domain);
        let mut model = Model::snapshot(&dir);
        let journal = killed.path("oplog");
        let out = killed
            .cmd()
            .args(&args)
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .env("KEYROTATE_OPLOG", &journal)
            .output();
        assert_eq!(out.code, 137, "kill at step {k} ({step}): {}", out.stderr);
        model.journal(&dir, &std::fs::read_to_string(&journal).unwrap_or_default());

        for (what, folder) in model.cuts() {
            cuts_tried += 1;
            let context = format!("power cut at step {k} ({step}), {what}");
            let env = clone_env(&killed);
            materialize(&env.key_dir(domain), &folder);

            // Every version number ever published, and for which key.
            let mut published = BTreeMap::new();
            for j in &model.written_jwks {
                kids_in(j, &mut published);
            }
            if let Some(Entry::File(j)) = folder.get("jwks.json") {
                kids_in(j, &mut published);
            }
            manifest_kids(base, domain, &mut published);

            // Old or new, and it verifies.
            let manifest = std::fs::read(env.key_dir(domain).join("keyring.json")).unwrap();
            assert!(
                manifest == base_manifest || model.written_manifests.contains(&manifest),
                "{context}: keyring.json is neither the old nor the new one\n{}",
                env.listing()
            );
            let m = assert_verifies(&env, domain, &context);
            // A number the victim recorded in the ledger is its own, even if its file
            // was lost.
            let recorded = env
                .rows()
                .into_iter()
                .find(|r| r["run_id"] == VICTIM)
                .and_then(|r| r["to_version"].as_u64());

            // The next runs: 0, or 4 naming a dead run (and saying truthfully whether it
            // committed), resolved one by one, then 0.
            let mut resolved = Vec::new();
            loop {
                let out = env.cmd().args(rotate).output();
                if out.code == 0 {
                    break;
                }
                let blocker = sc
                    .dead
                    .iter()
                    .chain([&VICTIM])
                    .find(|id| out.stdout.contains(**id) && !resolved.contains(*id));
                let (4, Some(blocker)) = (out.code, blocker) else {
                    panic!(
                        "{context}: the next run exited {}\n{}{}\n{}",
                        out.code,
                        out.stdout,
                        out.stderr,
                        env.listing()
                    );
                };
                let committed = m.versions.iter().any(|v| v.created_by_run == **blocker);
                for (said, truth) in [("it did commit", true), ("it did not commit", false)] {
                    assert!(
                        !out.stdout.contains(said) || committed == truth,
                        "{context}: {blocker} committed: {committed}, but: {}",
                        out.stdout
                    );
                }
                env.resolve(domain, blocker, "power-loss test").status(0);
                resolved.push(*blocker);
            }
            let m = assert_verifies(&env, domain, &context);
            assert_whole(&env, domain, &context);
            assert!(m.max_version() > base_max, "{context}: versions went backwards");
            manifest_kids(&env, domain, &mut published);
            kids_in(
                &std::fs::read(env.key_dir(domain).join("jwks.json")).unwrap(),
                &mut published,
            );
            for (n, kids) in &published {
                assert_eq!(kids.len(), 1, "{context}: v{n} names two keys: {kids:?}");
            }
            if let Some(v) = recorded.and_then(|n| m.get(n)).filter(|v| v.version > base_max) {
                assert_eq!(
                    v.created_by_run, VICTIM,
                    "{context}: v{} was recorded by the dead run, then reused",
                    v.version
                );
            }
        }
    }
    eprintln!(
        "{domain} {:?}: {} steps, {cuts_tried} power cuts, each old-or-new and repaired",
        sc.args,
        steps.len()
    );
}

fn rotation(domain: &str) -> Vec<String> {
    ["rotate", "--domain", domain, "--deadline", "1m", "--force"]
        .map(String::from)
        .to_vec()
}

#[test]
fn power_loss_at_every_durable_step_of_an_immediate_rotation() {
    let base = base("sig");
    power_loss_at_every_step(&Scenario {
        base: &base,
        domain: "sig",
        args: rotation("sig"),
        code: 0,
        steps: &["stage.fsync", "jwks.rename", "commit.rename", "commit.dirsync"],
        dead: &[],
    });
}

#[test]
fn power_loss_at_every_durable_step_of_a_prepublish_rotation() {
    let base = base("pre");
    power_loss_at_every_step(&Scenario {
        base: &base,
        domain: "pre",
        args: rotation("pre"),
        code: 0,
        steps: &["stage.fsync", "jwks.rename", "commit.rename", "commit.dirsync"],
        dead: &[],
    });
}

/// A run killed right after its commit leaves the tidy-up (current.pem, the destroyed
/// v1, jwks.json) to the next invocation holding the lock, which repairs before it
/// reports the dead run: a power cut during that repair too.
#[test]
fn power_loss_at_every_durable_step_of_the_repair_after_a_crash_past_the_commit() {
    let base = base("sig");
    let out = base
        .rotate("sig")
        .args(["--force", "--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "ledger.committed=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    power_loss_at_every_step(&Scenario {
        base: &base,
        domain: "sig",
        args: rotation("sig"),
        code: 4,
        steps: &["repair.dirsync"],
        dead: &["KILLED"],
    });
}
