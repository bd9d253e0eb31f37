//! The dry run predicts the real run: for every decision `rotate` can make, a dry run
//! followed at once by the real run returns the same exit code and, when it refuses,
//! the same reason, word for word. Both walk the same phases (`cmd/rotate/phases.rs`);
//! this shows that the two drivers cannot drift.

use std::os::unix::fs::PermissionsExt;

use crate::common::Env;

/// Runs `rotate --dry-run` then the real `rotate` with the same arguments and checks
/// that both say `code` and, unless the run rotates, the same reason. Returns the real
/// run's report.
#[track_caller]
fn same(env: &Env, domain: &str, extra: &[&str], code: i32) -> serde_json::Value {
    same_with(env, domain, "1m", extra, code)
}

#[track_caller]
fn same_with(env: &Env, domain: &str, deadline: &str, extra: &[&str], code: i32) -> serde_json::Value {
    let run = || {
        env.cmd()
            .args(["rotate", "--domain", domain, "--deadline", deadline])
            .args(extra)
            .args(["--output", "json"])
    };
    let dry = run().arg("--dry-run").output();
    let real = run().output();
    assert_eq!(
        (dry.code, real.code),
        (code, code),
        "dry: {}{}\nreal: {}{}",
        dry.stdout,
        dry.stderr,
        real.stdout,
        real.stderr
    );
    if dry.stdout.trim().is_empty() {
        // Refused before a report (a config that does not load): the same line on stderr.
        assert_eq!(dry.stderr, real.stderr);
        return serde_json::Value::Null;
    }
    let (d, r) = (dry.json(), real.json());
    assert_eq!(
        (d["dry_run"].as_bool(), r["dry_run"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(d["outcome"], r["outcome"], "{d}\n{r}");
    if code == 0 {
        assert_eq!(
            (&d["from_version"], &d["to_version"]),
            (&r["from_version"], &r["to_version"]),
            "{d}\n{r}"
        );
    } else {
        assert_eq!(d["reason"], r["reason"], "dry and real disagree on the reason");
    }
    r
}

#[test]
fn fresh_not_due_and_forced() {
    let env = Env::new();
    same(&env, "sig", &[], 0);
    let r = same(&env, "sig", &[], 7);
    assert!(r["reason"].as_str().unwrap().starts_with("not due"), "{r}");
    same(&env, "sig", &["--force"], 0);
}

#[test]
fn another_pool() {
    let env = Env::new();
    same(&env, "elsewhere", &[], 6);
}

#[test]
fn a_held_state_lock_and_a_held_key_store_lock() {
    let env = Env::new();
    env.rotate("sig").status(0);
    for lock in ["state/locks/sig.lock", "keys/sig/.lock"] {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(env.path(lock))
            .unwrap();
        f.lock().unwrap();
        let r = same(&env, "sig", &["--force"], 5);
        assert!(r["reason"].as_str().unwrap().contains("another"), "{lock}: {r}");
        drop(f);
    }
    same(&env, "sig", &["--force"], 0);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_stale_run_then_the_blocked_domain() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "GONE"])
        .env("KEYROTATE_FAILPOINTS", "ledger.staged=kill")
        .output();
    assert_eq!(out.code, 137);
    // The dry run predicts the stale run's review; the real run marks it.
    let r = same(&env, "sig", &["--force"], 4);
    assert!(r["reason"].as_str().unwrap().contains("GONE"), "{r}");
    // From then on the domain is blocked by it.
    let r = same(&env, "sig", &["--force"], 4);
    assert!(r["reason"].as_str().unwrap().contains("blocked by run GONE"), "{r}");
}

#[test]
fn a_corrupt_manifest_then_the_blocked_domain() {
    let env = Env::new();
    env.rotate("sig").status(0);
    std::fs::write(env.key_dir("sig").join("keyring.json"), "{}").unwrap();
    same(&env, "sig", &["--force"], 4);
    let r = same(&env, "sig", &["--force"], 4);
    assert!(r["reason"].as_str().unwrap().contains("blocked by run"), "{r}");
}

#[test]
fn a_missing_manifest_with_key_files() {
    let env = Env::new();
    for _ in 0..3 {
        env.rotate("sig").arg("--force").status(0);
    }
    std::fs::remove_file(env.key_dir("sig").join("keyring.json")).unwrap();
    let r = same(&env, "sig", &["--force"], 4);
    assert!(r["reason"].as_str().unwrap().contains("v000003.pem"), "{r}");
}

#[test]
fn a_manifest_the_ledger_contradicts() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let backup = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    env.rotate("sig").arg("--force").status(0);
    env.rotate("sig").arg("--force").status(0);
    std::fs::write(env.key_dir("sig").join("keyring.json"), &backup).unwrap();
    let r = same(&env, "sig", &["--force"], 4);
    // The backup's active v1 has no private half any more (retired since, DESIGN 11).
    assert!(r["reason"].as_str().unwrap().contains("v000001.pem"), "{r}");
}

#[test]
fn unsafe_folders() {
    // the state folder
    let env = Env::new();
    env.rotate("sig").status(0);
    std::fs::set_permissions(env.path("state"), std::fs::Permissions::from_mode(0o777)).unwrap();
    same(&env, "sig", &["--force"], 3);
    // the key store
    let env = Env::new();
    std::fs::create_dir_all(env.path("keys")).unwrap();
    std::fs::set_permissions(env.path("keys"), std::fs::Permissions::from_mode(0o770)).unwrap();
    same(&env, "sig", &[], 3);
}

#[test]
fn a_bad_config() {
    let env = Env::with_config("[state]\ndir = \"state\"\n[domains.sig]\nalgorithm = \"rot13\"\n");
    same(&env, "sig", &[], 2);
    // a domain the config does not have
    let env = Env::new();
    same(&env, "nope", &[], 2);
}

#[test]
fn too_little_time_for_the_budget() {
    let env = Env::new();
    let r = same_with(&env, "rsa4096", "3s", &[], 8);
    assert!(r["reason"].as_str().unwrap().contains("deadline budget"), "{r}");
}

const HOOKED: &str = r#"
[state]
dir = "state"
[host]
pool = "pool-a"
[domains.pw]
designated_pool = "pool-a"
backend = "command"
command = ["./hooks/pg"]
min_interval = "0s"
"#;

#[test]
fn a_missing_or_unsafe_hook() {
    let env = Env::with_config(HOOKED);
    // missing
    same(&env, "pw", &[], 2);
    std::fs::create_dir(env.path("hooks")).unwrap();
    std::fs::write(env.path("hooks/pg"), "#!/bin/sh\nexit 0\n").unwrap();
    // not trusted
    std::fs::set_permissions(env.path("hooks/pg"), std::fs::Permissions::from_mode(0o777)).unwrap();
    same(&env, "pw", &[], 3);
    // fine
    std::fs::set_permissions(env.path("hooks/pg"), std::fs::Permissions::from_mode(0o755)).unwrap();
    same(&env, "pw", &[], 0);
}

#[test]
fn an_audit_file_that_cannot_be_written() {
    let env = Env::with_config(
        r#"
[state]
dir = "state"
[host]
pool = "p"
[audit]
file = "log/audit.jsonl"
[domains.sig]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
algorithm = "ed25519"
min_interval = "0s"
"#,
    );
    std::fs::create_dir_all(env.path("log/audit.jsonl")).unwrap();
    let r = same(&env, "sig", &[], 3);
    assert!(r["reason"].as_str().unwrap().contains("audit"), "{r}");
}
