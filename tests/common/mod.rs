//! The test harness: `Env` is a temporary install (config, state and key folders) and
//! `Env::cmd()` a builder that runs the built binary there, `just`-style:
//! `env.rotate("sig").status(0)`. When an expectation fails it prints the command's
//! stdout and stderr and a listing of the folder, so a CI log alone explains it.

#![allow(dead_code)]

pub mod pg;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub const DEFAULT_CONFIG: &str = r#"
[state]
dir = "state"

[host]
pool = "pool-a"

[defaults]
designated_pool = "pool-a"
backend = "keystore"
keystore = "keys"
max_deadline = "1h"
min_interval = "1h"
retain = 2

[domains.sig]
algorithm = "ed25519"

[domains.p256]
algorithm = "ecdsa-p256"

[domains.p384]
algorithm = "ecdsa-p384"

[domains.rsa]
algorithm = "rsa-2048"

[domains.rsa4096]
algorithm = "rsa-4096"

[domains.mac]
algorithm = "hmac-sha256"

[domains.aes]
algorithm = "aes-256"

[domains.elsewhere]
algorithm = "ed25519"
designated_pool = "pool-b"

[domains.pre]
algorithm = "ed25519"
activation = "prepublish"
"#;

/// Every algorithm, one domain each, rotating without a minimum interval.
pub const ALL_ALGORITHMS: &str = r#"
[state]
dir = "state"
[host]
pool = "p"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
min_interval = "0s"
[domains.ed25519]
algorithm = "ed25519"
[domains.p256]
algorithm = "ecdsa-p256"
[domains.p384]
algorithm = "ecdsa-p384"
[domains.rsa2048]
algorithm = "rsa-2048"
[domains.rsa3072]
algorithm = "rsa-3072"
[domains.rsa4096]
algorithm = "rsa-4096"
[domains.hmac]
algorithm = "hmac-sha256"
[domains.aes]
algorithm = "aes-256"
"#;

pub fn bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("keyrotate")
}

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env::with_config(DEFAULT_CONFIG)
    }

    pub fn with_config(text: &str) -> Env {
        let dir = tempfile::Builder::new().prefix("keyrotate-test").tempdir().unwrap();
        std::fs::write(dir.path().join("rotate.toml"), text).unwrap();
        Env { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("rotate.toml")
    }

    pub fn cmd(&self) -> Run<'_> {
        Run {
            env: self,
            args: vec!["--config".into(), self.config_path().into()],
            vars: vec![("USER".into(), "tester".into())],
            shell_prefix: None,
        }
    }

    /// `rotate --domain D --deadline 1m`
    pub fn rotate(&self, domain: &str) -> Run<'_> {
        self.cmd().args(["rotate", "--domain", domain, "--deadline", "1m"])
    }

    pub fn key_dir(&self, domain: &str) -> PathBuf {
        self.path("keys").join(domain)
    }

    pub fn manifest(&self, domain: &str) -> Value {
        let bytes = std::fs::read(self.key_dir(domain).join("keyring.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    pub fn jwks(&self, domain: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.key_dir(domain).join("jwks.json")).unwrap()).unwrap()
    }

    /// The `kid` of every key `jwks.json` publishes, in its order.
    pub fn published_kids(&self, domain: &str) -> Vec<String> {
        self.jwks(domain)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    }

    /// The version part (`v000007`) of every published `kid`, in `jwks.json`'s order.
    pub fn published_versions(&self, domain: &str) -> Vec<String> {
        self.published_kids(domain)
            .into_iter()
            .map(|k| k[..7].to_string())
            .collect()
    }

    /// Version `n`'s entry in `keyring.json`.
    pub fn manifest_version(&self, domain: &str, n: u64) -> Value {
        self.manifest(domain)["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no v{n}"))
    }

    /// `revoke --domain D --version N --reason R --deadline 1m`.
    pub fn revoke(&self, domain: &str, version: u64, reason: &str) -> Run<'_> {
        self.cmd().args([
            "revoke",
            "--domain",
            domain,
            "--version",
            &version.to_string(),
            "--reason",
            reason,
            "--deadline",
            "1m",
        ])
    }

    pub fn audit(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.path("state/audit.jsonl")) {
            Ok(s) => s
                .lines()
                .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Every row of `rotations`, oldest first, as JSON objects.
    pub fn rows(&self) -> Vec<Value> {
        let conn = rusqlite::Connection::open(self.path("state/ledger.sqlite3")).unwrap();
        let mut stmt = conn.prepare("SELECT * FROM rotations ORDER BY id").unwrap();
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let rows = stmt
            .query_map([], |r| {
                let mut m = serde_json::Map::new();
                for (i, n) in names.iter().enumerate() {
                    let v: rusqlite::types::Value = r.get(i)?;
                    m.insert(
                        n.clone(),
                        match v {
                            rusqlite::types::Value::Null => Value::Null,
                            rusqlite::types::Value::Integer(i) => i.into(),
                            rusqlite::types::Value::Real(f) => f.into(),
                            rusqlite::types::Value::Text(t) => t.into(),
                            rusqlite::types::Value::Blob(_) => "blob".into(),
                        },
                    );
                }
                Ok(Value::Object(m))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    }

    pub fn last_row(&self) -> Value {
        self.rows().pop().expect("a ledger row")
    }

    /// Every file under the temp folder except the config, with its bytes (symlinks as
    /// their target), for byte-identity checks.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }

    /// Panics naming every path that differs between two snapshots.
    #[track_caller]
    pub fn assert_unchanged(&self, before: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
        let after = self.snapshot();
        let mut diffs = Vec::new();
        for (p, b) in before {
            match after.get(p) {
                None => diffs.push(format!("removed {}", p.display())),
                Some(a) if a != b => diffs.push(format!("changed {}", p.display())),
                _ => {}
            }
        }
        for p in after.keys().filter(|p| !before.contains_key(*p)) {
            diffs.push(format!("added {}", p.display()));
        }
        assert!(diffs.is_empty(), "{what} changed files: {diffs:?}\n{}", self.listing());
    }

    pub fn listing(&self) -> String {
        let mut s = String::new();
        let mut map = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut map);
        for p in map.keys() {
            let meta = std::fs::symlink_metadata(self.dir.path().join(p)).unwrap();
            s.push_str(&format!(
                "{:o} {:>8} {}\n",
                meta.mode() & 0o7777,
                meta.len(),
                p.display()
            ));
        }
        s
    }

    pub fn versions(&self, domain: &str) -> Vec<(u64, String)> {
        self.manifest(domain)["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap().to_string()))
            .collect()
    }

    /// `resolve --domain D --run RUN --note NOTE`
    pub fn resolve(&self, domain: &str, run: &str, note: &str) -> Run<'_> {
        self.cmd()
            .args(["resolve", "--domain", domain, "--run", run, "--note", note])
    }

    /// The key files the manifest says exist, sorted: pending and active versions,
    /// and retired ones except signature keys (whose private half is destroyed at
    /// retirement, DESIGN 11).
    pub fn live_files(&self, domain: &str) -> Vec<String> {
        let mut v: Vec<String> = self.manifest(domain)["versions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| match v["state"].as_str().unwrap() {
                "pending" | "active" => true,
                "retired" => v["file"].as_str().unwrap().ends_with(".key"),
                _ => false,
            })
            .map(|v| v["file"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    pub fn key_files(&self, domain: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.key_dir(domain))
            .map(|rd| rd.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        v.retain(|n| n.starts_with('v'));
        v.sort();
        v
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            out.insert(
                rel,
                std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes(),
            );
        } else if ft.is_dir() {
            out.insert(
                rel.join(""),
                format!("dir {:o}", e.metadata().unwrap().permissions().mode()).into_bytes(),
            );
            walk(root, &p, out);
        } else if rel != Path::new("rotate.toml") {
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
}

pub struct Run<'a> {
    env: &'a Env,
    args: Vec<OsString>,
    vars: Vec<(OsString, OsString)>,
    shell_prefix: Option<String>,
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{}", self.stdout))
    }
}

impl<'a> Run<'a> {
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<OsString>) -> Self {
        self.vars.push((k.into(), v.into()));
        self
    }

    /// Runs through `sh -c 'PREFIX; exec keyrotate ...'` (e.g. `umask 000`).
    pub fn shell_prefix(mut self, prefix: &str) -> Self {
        self.shell_prefix = Some(prefix.to_string());
        self
    }

    pub fn command(&self) -> Command {
        let mut c = match &self.shell_prefix {
            None => Command::new(bin()),
            Some(prefix) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("{prefix}; exec \"$0\" \"$@\"")).arg(bin());
                c
            }
        };
        c.args(&self.args).current_dir(self.env.dir.path()).stdin(Stdio::null());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KEYROTATE_") {
                c.env_remove(k);
            }
        }
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    pub fn spawn(&self) -> Child {
        self.command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn output(&self) -> Out {
        let o: Output = self.command().output().unwrap();
        Out {
            code: o
                .status
                .code()
                .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&o.status).unwrap_or(0)),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Runs and asserts the exit code; on mismatch prints everything needed to debug.
    #[track_caller]
    pub fn status(&self, code: i32) -> Out {
        let out = self.output();
        if out.code != code {
            panic!(
                "expected exit {code}, got {}\ncommand: {:?}\n--- stdout\n{}--- stderr\n{}--- files\n{}",
                out.code,
                self.args,
                out.stdout,
                out.stderr,
                self.env.listing()
            );
        }
        out
    }
}

/// Waits until a failpoint log shows that a process reached `step`.
pub fn wait_for_step(log: &Path, step: &str) {
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(step) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "never reached {step}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Mode bits of a path (not following symlinks).
pub fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

pub fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh SoftHSM2 token per test (the pkcs11 custody tests).
pub mod softhsm;

pub mod shared;

/// Whether `strace` can trace a child here (installed, and ptrace allowed in this
/// container): the system-call count tests say SKIPPED when it cannot.
pub fn strace_works() -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=none", "-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits for `child` at most `limit`: its exit code (`None` for a signal), or `None`
/// after killing it when it was still running then. Also how long it took.
pub fn wait_at_most(child: &mut Child, limit: std::time::Duration) -> (Option<i32>, std::time::Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return (s.code(), start.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    (None, start.elapsed())
}
