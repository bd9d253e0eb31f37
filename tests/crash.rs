//! Crash consistency: a real `keyrotate rotate` is stopped at **every** durable step.
//!
//! Mechanism: the test-only `failpoints` build calls `failpoint::hit` before each
//! fsync, rename, unlink, symlink, file creation and ledger transaction (they all go
//! through `fsutil` and `Ledger::write`, so a new durable step cannot be added without
//! a hit). A first run with `KEYROTATE_FAILPOINT_LOG` lists the steps of a rotation
//! that sweeps a leftover, stages, publishes, commits, destroys beyond `retain` and
//! closes its row. Then, for each step k, a fresh copy of the same state is rotated
//! with `KEYROTATE_FAILPOINTS=k=kill` (the process SIGKILLs itself there, exactly as
//! Control-M's Kill would) and with `k=term` (a SIGTERM arrives there).
//!
//! After each kill the key store must verify (one active version whose file exists
//! and matches its fingerprint, every retired file present), versions only grow, and
//! the next runs must do the right thing: NEEDS_REVIEW if the killed run is still in
//! flight, then `resolve`, then a successful rotation that leaves no orphan file.
//! After each SIGTERM the run must end by itself with 0 (the commit was reached) or 3
//! (aborted, old manifest byte-identical, nothing staged left), its row closed with
//! that code.

use std::path::Path;

use serde_json::Value;

use crate::common::Env;

/// A domain with history: v1..v3 (retain = 2, so the next rotation destroys v1) and a
/// temporary file left by an earlier crash, so every kind of step is on the path.
fn base() -> Env {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    env.rotate("sig").arg("--force").status(0);
    std::fs::write(env.key_dir("sig").join(".jwks.json.tmp"), "{").unwrap();
    env
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
            std::fs::set_permissions(&dst, e.metadata().unwrap().permissions()).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

fn clone_env(base: &Env) -> Env {
    let env = Env::new();
    copy_tree(base.dir.path(), env.dir.path());
    env
}

fn steps(base: &Env) -> Vec<String> {
    let env = clone_env(base);
    let log = env.path("steps.log");
    env.rotate("sig")
        .arg("--force")
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    let steps: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    for kind in [
        "sweep.unlink",
        "stage.fsync",
        "ledger.staged",
        "jwks.rename",
        "commit.fsync",
        "commit.rename",
        "commit.dirsync",
        "ledger.committed",
        "current.symlink",
        "current.rename",
        "destroy.unlink",
        "tidy.dirsync",
        "ledger.close",
    ] {
        assert!(steps.iter().any(|s| s == kind), "no {kind} step in {steps:?}");
    }
    steps
}

/// The key store verifies, and nothing the base state had was lost or renumbered.
fn assert_consistent(env: &Env, base_versions: &[(u64, String)], context: &str) {
    let ks = keyrotate::keystore::Keystore::new(&env.path("keys"), "sig");
    let insp = ks
        .inspect()
        .unwrap_or_else(|e| panic!("{context}: key store does not verify: {e}\n{}", env.listing()));
    let m = &insp.manifest;
    assert_eq!(
        m.versions
            .iter()
            .filter(|v| v.state == keyrotate::keystore::manifest::VersionState::Active)
            .count(),
        1,
        "{context}"
    );
    for (n, state) in base_versions {
        let v = m
            .get(*n)
            .unwrap_or_else(|| panic!("{context}: v{n} vanished from the manifest"));
        if state != "destroyed" && v.state != keyrotate::keystore::manifest::VersionState::Destroyed {
            assert!(
                env.key_dir("sig").join(&v.file).exists(),
                "{context}: v{n}'s file was lost"
            );
        }
    }
    assert!(
        m.max_version() >= base_versions.last().unwrap().0,
        "{context}: versions went backwards"
    );
}

fn no_orphans(env: &Env, context: &str) {
    assert_eq!(
        env.key_files("sig"),
        env.live_files("sig"),
        "{context}: orphan or missing key files"
    );
    let tmp: Vec<String> = std::fs::read_dir(env.key_dir("sig"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{context}: temporaries left: {tmp:?}");
}

fn row(env: &Env, run_id: &str) -> Option<Value> {
    env.rows().into_iter().find(|r| r["run_id"] == run_id)
}

#[test]
fn sigkill_at_every_durable_step_leaves_a_consistent_store_and_a_flagged_run() {
    let base = base();
    let base_versions = base.versions("sig");
    let steps = steps(&base);
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGKILL at step {k} ({step})");
        let env = clone_env(&base);
        let out = env
            .rotate("sig")
            .args(["--force", "--run-id", "KILLED"])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .output();
        assert_eq!(out.code, 137, "{context}: {}", out.stderr);
        assert_consistent(&env, &base_versions, &context);

        match row(&env, "KILLED") {
            Some(r) if r["exit_code"].is_null() => {
                // Died in flight: the next run must flag it, and only a review unblocks.
                let out = env.rotate("sig").arg("--force").status(4);
                assert!(out.stdout.contains("KILLED"), "{context}: {}", out.stdout);
                let committed = env.manifest("sig")["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["created_by_run"] == "KILLED");
                let said = if committed {
                    "it did commit"
                } else {
                    "it did not commit"
                };
                assert!(
                    out.stdout.contains(said),
                    "{context}: expected {said:?} in {}",
                    out.stdout
                );
                env.cmd()
                    .args(["resolve", "--domain", "sig", "--run", "KILLED", "--note", "crash test"])
                    .status(0);
            }
            Some(r) => assert_eq!(r["exit_code"], 0, "{context}: closed with an unexpected code"),
            None => {} // killed before its row was written: nothing to review
        }
        env.rotate("sig").arg("--force").status(0);
        assert_consistent(&env, &base_versions, &context);
        no_orphans(&env, &context);
    }
    eprintln!("crash points covered with SIGKILL: {}", steps.len());
}

#[test]
fn sigterm_at_every_durable_step_ends_the_run_itself_with_0_or_3() {
    let base = base();
    let base_versions = base.versions("sig");
    let base_manifest = std::fs::read(base.key_dir("sig").join("keyring.json")).unwrap();
    let steps = steps(&base);
    let commit_at = steps.iter().position(|s| s == "commit.create").unwrap() + 1;
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGTERM at step {k} ({step})");
        let env = clone_env(&base);
        let out = env
            .rotate("sig")
            .args(["--force", "--run-id", "TERMED"])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=term"))
            .output();
        // A signal that arrives before the commit stops the run; one that arrives
        // during the commit (its first step onwards) lets it finish first.
        let expected = if k < commit_at { 3 } else { 0 };
        assert_eq!(out.code, expected, "{context}: {}{}", out.stdout, out.stderr);
        let r = row(&env, "TERMED").unwrap_or_else(|| panic!("{context}: no ledger row"));
        assert_eq!(r["exit_code"], expected, "{context}: row closed with another code");
        assert_eq!(env.audit().pop().unwrap()["exit_code"], expected, "{context}: audit");
        assert_consistent(&env, &base_versions, &context);
        if expected == 3 {
            assert!(out.stdout.contains("terminated"), "{context}: {}", out.stdout);
            assert_eq!(
                std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(),
                base_manifest,
                "{context}"
            );
            let staged: Vec<String> = env
                .key_files("sig")
                .into_iter()
                .filter(|f| f.as_str() > "v000003.pem")
                .collect();
            assert!(staged.is_empty(), "{context}: staged files left: {staged:?}");
        } else {
            assert_eq!(env.manifest("sig")["primary"], 4, "{context}");
            no_orphans(&env, &context);
        }
        env.rotate("sig").arg("--force").status(0);
        no_orphans(&env, &context);
    }
    eprintln!("crash points covered with SIGTERM: {}", steps.len());
}
