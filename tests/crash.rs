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

pub(crate) fn copy_tree(from: &Path, to: &Path) {
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

pub(crate) fn clone_env(base: &Env) -> Env {
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
        // A file the manifest still allows must be there (a retired signature key's
        // private half is destroyed at its retirement, DESIGN 11).
        if state != "destroyed" && keyrotate::keystore::private_half_allowed(v) {
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
    // The commit point is keyring.json's rename: a signal that arrives while its
    // temporary is written still stops the run.
    let commit_at = steps.iter().position(|s| s == "commit.rename").unwrap() + 1;
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
        // during the commit (its rename onwards) lets it finish first.
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

// ---- the key store safety steps: repair, resolve, adoption, sweep rule ----------------

/// The steps a command takes from `base`, as the failpoint log lists them.
fn steps_of(base: &Env, args: &[&str], code: i32) -> Vec<String> {
    let env = clone_env(base);
    let log = env.path("steps.log");
    env.cmd().args(args).env("KEYROTATE_FAILPOINT_LOG", &log).status(code);
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect()
}

/// `base()` with a run killed right after its commit: `current.pem`, the destroyed v1
/// and `jwks.json` wait for a repair, and the run's row is in flight.
fn killed_past_the_commit() -> Env {
    let env = base();
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "ledger.committed=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    env
}

/// The committed v4 is whole: current.pem on it, no file the manifest does not list
/// as live, jwks.json exactly the live versions.
fn assert_whole(env: &Env, context: &str) {
    assert_eq!(
        std::fs::read_link(env.key_dir("sig").join("current.pem")).unwrap(),
        Path::new("v000004.pem"),
        "{context}: current.pem"
    );
    no_orphans(env, context);
    let kids: Vec<u64> = env.jwks("sig")["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap()[1..7].parse().unwrap())
        .collect();
    let mut kids = kids;
    kids.sort();
    let live: Vec<u64> = env
        .versions("sig")
        .into_iter()
        .filter(|(_, s)| s != "destroyed")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(kids, live, "{context}: jwks.json");
}

#[test]
fn sigkill_or_sigterm_during_the_repair_of_a_crash_past_the_commit_loses_nothing() {
    let base = killed_past_the_commit();
    let base_versions = base.versions("sig");
    let rotate = ["rotate", "--domain", "sig", "--deadline", "1m", "--force"];
    let steps = steps_of(&base, &rotate, 4);
    assert!(
        steps.iter().any(|s| s == "repair.dirsync"),
        "the diagnosing run did not repair: {steps:?}"
    );
    for action in ["kill", "term"] {
        for (i, step) in steps.iter().enumerate() {
            let k = i + 1;
            let context = format!("{action} at step {k} ({step}) of the diagnosing run");
            let env = clone_env(&base);
            let out = env
                .cmd()
                .args(rotate)
                .env("KEYROTATE_FAILPOINTS", format!("{k}={action}"))
                .output();
            let expected: &[i32] = if action == "kill" { &[137] } else { &[3, 4] };
            assert!(
                expected.contains(&out.code),
                "{context}: exit {}: {}",
                out.code,
                out.stdout
            );
            assert_consistent(&env, &base_versions, &context);
            assert_eq!(env.manifest("sig")["primary"], 4, "{context}: the commit was lost");
            // The next run still flags KILLED (and repairs), the review unblocks, and
            // the store is whole without a new rotation.
            if row(&env, "KILLED").is_some_and(|r| r["state"] != "needs_review") {
                let out = env.rotate("sig").arg("--force").status(4);
                assert!(out.stdout.contains("it did commit"), "{context}: {}", out.stdout);
            }
            env.resolve("sig", "KILLED", "crash test").status(0);
            assert_whole(&env, &context);
            env.rotate("sig").arg("--force").status(0);
            assert_consistent(&env, &base_versions, &context);
            no_orphans(&env, &context);
        }
    }
    eprintln!("repair steps covered with SIGKILL and SIGTERM: {}", steps.len());
}

#[test]
fn sigkill_at_every_step_of_resolve_and_its_repair_loses_nothing() {
    let base = killed_past_the_commit();
    let base_versions = base.versions("sig");
    let resolve = ["resolve", "--domain", "sig", "--run", "KILLED", "--note", "crash test"];
    let steps = steps_of(&base, &resolve, 0);
    for kind in ["ledger.resolve", "repair.unlink", "repair.dirsync"] {
        assert!(steps.iter().any(|s| s == kind), "no {kind} step in {steps:?}");
    }
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGKILL at step {k} ({step}) of resolve");
        let env = clone_env(&base);
        let out = env
            .cmd()
            .args(resolve)
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .output();
        assert_eq!(out.code, 137, "{context}: {}", out.stdout);
        assert_consistent(&env, &base_versions, &context);
        // Resolve again (or, if the review was recorded, it says so), then the next
        // invocation holding the lock finishes the repair before anything else.
        let again = env.cmd().args(resolve).output();
        assert!(
            again.code == 0 || again.stdout.contains("already resolved") || again.stderr.contains("already resolved"),
            "{context}: {} {}",
            again.stdout,
            again.stderr
        );
        env.rotate("sig").arg("--force").status(0);
        assert_consistent(&env, &base_versions, &context);
        no_orphans(&env, &context);
    }
    eprintln!("resolve steps covered with SIGKILL: {}", steps.len());
}

#[test]
fn sigkill_at_every_step_of_adopting_a_key_store_into_a_new_ledger_loses_nothing() {
    let base = base();
    for f in ["ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"] {
        let _ = std::fs::remove_file(base.path("state").join(f));
    }
    base.rotate("sig").args(["--force", "--run-id", "FOUND"]).status(4);
    let base_versions = base.versions("sig");
    let resolve = ["resolve", "--domain", "sig", "--run", "FOUND", "--note", "adopt"];
    let steps = steps_of(&base, &resolve, 0);
    assert!(steps.iter().any(|s| s == "commit.rename"), "no adoption in {steps:?}");
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGKILL at step {k} ({step}) of an adopting resolve");
        let env = clone_env(&base);
        let out = env
            .cmd()
            .args(resolve)
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .output();
        assert_eq!(out.code, 137, "{context}: {}", out.stdout);
        assert_consistent(&env, &base_versions, &context);
        // Killed before the review was recorded: review again. Killed after it but
        // before the adoption: the next run reports the mismatch again, and its own
        // review adopts.
        let _ = env.cmd().args(resolve).output();
        let out = env.rotate("sig").args(["--force", "--run-id", "AFTER"]).output();
        if out.code == 4 {
            assert!(out.stdout.contains("does not know"), "{context}: {}", out.stdout);
            env.resolve("sig", "AFTER", "adopt").status(0);
            env.rotate("sig").arg("--force").status(0);
        } else {
            assert_eq!(out.code, 0, "{context}: {}", out.stdout);
        }
        assert_consistent(&env, &base_versions, &context);
        no_orphans(&env, &context);
    }
    eprintln!("adoption steps covered with SIGKILL: {}", steps.len());
}

#[test]
fn sigkill_at_every_step_of_sweeping_a_recorded_leftover_loses_nothing() {
    let base = base();
    // An aborted run that could not remove what it staged: its staging record is the
    // proof that lets the next run remove v4.
    base.rotate("sig")
        .args(["--force", "--run-id", "LEFT"])
        .env("KEYROTATE_FAILPOINTS", "jwks.create=error,unstage.unlink=error")
        .status(3);
    assert!(base.key_files("sig").contains(&"v000004.pem".to_string()));
    let base_versions = base.versions("sig");
    let rotate = ["rotate", "--domain", "sig", "--deadline", "1m", "--force"];
    let steps = steps_of(&base, &rotate, 0);
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGKILL at step {k} ({step}) of a sweeping run");
        let env = clone_env(&base);
        let out = env
            .cmd()
            .args(rotate)
            .args(["--run-id", "SWEEPER"])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .output();
        assert_eq!(out.code, 137, "{context}: {}", out.stdout);
        assert_consistent(&env, &base_versions, &context);
        if row(&env, "SWEEPER").is_some_and(|r| r["exit_code"].is_null()) {
            env.rotate("sig").arg("--force").status(4);
            env.resolve("sig", "SWEEPER", "crash test").status(0);
        }
        env.rotate("sig").arg("--force").status(0);
        assert_consistent(&env, &base_versions, &context);
        no_orphans(&env, &context);
        assert!(
            env.manifest("sig")["primary"].as_u64().unwrap() >= 5,
            "{context}: v4's number was reused"
        );
    }
    eprintln!("sweep steps covered with SIGKILL: {}", steps.len());
}
