//! `rotate --dry-run`: the plan, the exit code the real run would return now, and
//! nothing changed: every file under the state and key folders byte-identical.

use crate::common::Env;

#[track_caller]
fn dry(env: &Env, domain: &str, extra: &[&str], code: i32) -> serde_json::Value {
    let before = env.snapshot();
    let out = env
        .rotate(domain)
        .arg("--dry-run")
        .args(extra)
        .args(["--output", "json"])
        .status(code);
    env.assert_unchanged(&before, "a dry run");
    let r = out.json();
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["exit_code"], code);
    assert!(r["plan"].as_array().is_some_and(|p| !p.is_empty()), "{r}");
    r
}

#[test]
fn on_a_fresh_install_it_creates_nothing_and_predicts_success() {
    let env = Env::new();
    let r = dry(&env, "sig", &[], 0);
    assert!(env.snapshot().is_empty(), "{}", env.listing());
    let plan = r["plan"].to_string();
    for needle in [
        "designated pool",
        "does not exist yet",
        "lock: free",
        "create: v1 (ed25519, active)",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle:?}: {plan}");
    }
    assert_eq!(r["to_version"], 1);
    // And the real run does what the dry run said.
    env.rotate("sig").status(0);
    assert_eq!(env.manifest("sig")["primary"], 1);
}

#[test]
fn after_a_success_it_predicts_not_due_and_with_force_the_plan() {
    let env = Env::new();
    for _ in 0..3 {
        env.rotate("sig").arg("--force").status(0);
    }
    dry(&env, "sig", &[], 7);
    let r = dry(&env, "sig", &["--force"], 0);
    let plan = r["plan"].to_string();
    for needle in [
        "create: v4",
        "retire: v3 (its private half destroyed",
        "destroy: v1 (beyond retain = 2)",
        "due: forced",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle:?}: {plan}");
    }
    assert_eq!(
        (r["from_version"].as_u64(), r["to_version"].as_u64()),
        (Some(3), Some(4))
    );
    let text = env.rotate("sig").args(["--dry-run", "--force"]).status(0).stdout;
    assert!(
        text.contains("would exit 0") && text.starts_with("plan for sig"),
        "{text}"
    );
}

#[test]
fn it_predicts_every_refusal() {
    let env = Env::new();
    dry(&env, "elsewhere", &[], 6);
    env.rotate("sig").args(["--run-id", "R1"]).status(0);
    dry(&env, "sig", &["--run-id", "R1"], 2);
    // blocked by a corrupt manifest's review
    std::fs::write(env.key_dir("sig").join("keyring.json"), "{}").unwrap();
    dry(&env, "sig", &["--force"], 4);
    env.rotate("sig").args(["--force", "--run-id", "BAD"]).status(4);
    let r = dry(&env, "sig", &["--force"], 4);
    assert!(r["reason"].as_str().unwrap().contains("blocked by run BAD"), "{r}");
}

#[test]
fn while_another_process_holds_the_lock_it_says_busy_without_taking_it() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.path("state/locks/sig.lock"))
        .unwrap();
    f.lock().unwrap();
    let r = dry(&env, "sig", &["--force"], 5);
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("another rotation of sig is running"),
        "{r}"
    );
    drop(f);
    dry(&env, "sig", &["--force"], 0);
}

#[cfg(feature = "failpoints")]
#[test]
fn after_a_crash_it_predicts_needs_review_and_changes_nothing() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "GONE"])
        .env("KEYROTATE_FAILPOINTS", "ledger.staged=kill")
        .output();
    assert_eq!(out.code, 137);
    // The crash left a -wal file; reading through it must not change any other file.
    let r = dry(&env, "sig", &["--force"], 4);
    assert!(r["reason"].as_str().unwrap().contains("GONE"), "{r}");
}
