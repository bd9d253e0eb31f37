//! Crash consistency of a `custody = "pkcs11"` domain: the crash suite of `crash.rs`
//! with token objects in place of key files (DESIGN 10). A rotation that sweeps a
//! token object left by a killed run, generates a key in the token (`stage.token-create`
//! before the object exists, `stage.token-id` right after), publishes, commits and
//! destroys a version beyond `retain` (`destroy.token-destroy`) is SIGKILLed at every
//! durable step, each time on a fresh copy of the same state and token. After each
//! kill the store must verify with every version still in the token, and the next
//! runs must proceed (or flag the killed run, be resolved, then proceed), ending with
//! no object and no file that the manifest does not account for: never a lost key,
//! never an orphan.

use std::path::Path;

use serde_json::Value;

use crate::common::softhsm::{self, Hsm};
use crate::common::Env;

const DOMAIN: &str = r#"
[domains.sig]
algorithm = "ed25519"
custody = "pkcs11"
"#;

/// A copy of `base`'s folder, token included, with its config and token pointed at it.
fn clone_env(base: &Env, module: &Path) -> (Env, Hsm) {
    let env = Env::new();
    crate::crash::copy_tree(base.dir.path(), env.dir.path());
    let config = std::fs::read_to_string(base.config_path()).unwrap();
    std::fs::write(env.config_path(), config).unwrap();
    let hsm = Hsm::adopt(&env, module, "");
    (env, hsm)
}

/// v1 destroyed, v2 retired, v3 active (retain = 1), and the object v4 left in the
/// token by a run killed right after creating it, resolved since: the next rotation
/// sweeps it, creates v5 and destroys v2.
fn base(module: &Path) -> Option<(Env, Hsm)> {
    let env = Env::with_config(&softhsm::config(module, DOMAIN));
    let hsm = Hsm::new(&env, "pkcs11_crash", "")?;
    for _ in 0..3 {
        hsm.with(env.rotate("sig")).arg("--force").status(0);
    }
    let out = hsm
        .with(env.rotate("sig"))
        .args(["--force", "--run-id", "OLD"])
        .env("KEYROTATE_FAILPOINTS", "stage.token-id=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert!(hsm.labels().contains(&"keyrotate/sig/v000004".to_string()));
    hsm.with(env.rotate("sig")).arg("--force").status(4);
    hsm.with(env.resolve("sig", "OLD", "crash test base")).status(0);
    Some((env, hsm))
}

fn steps(base: &Env, module: &Path) -> Vec<String> {
    let (env, hsm) = clone_env(base, module);
    let log = env.path("steps.log");
    hsm.with(env.rotate("sig"))
        .arg("--force")
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    let steps: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    for kind in [
        "sweep.token-destroy",
        "stage.token-create",
        "stage.token-id",
        "ledger.staged",
        "jwks.rename",
        "commit.rename",
        "commit.dirsync",
        "ledger.committed",
        "destroy.token-destroy",
        "destroy.unlink",
        "ledger.close",
    ] {
        assert!(steps.iter().any(|s| s == kind), "no {kind} step in {steps:?}");
    }
    steps
}

/// Whether a version keeps its key (DESIGN 11): pending and active ones do; a retired
/// signature key only until its public half is in the manifest.
fn keeps_key(v: &Value) -> bool {
    match v["state"].as_str() {
        Some("pending" | "active") => true,
        Some("retired") => v["public_key"].is_null(),
        _ => false,
    }
}

fn versions(m: &Value) -> Vec<Value> {
    m["versions"].as_array().cloned().unwrap_or_default()
}

/// The manifest verifies: one active version; every version the base kept live is
/// still listed, and while it keeps its key its public file and its token object are
/// there; numbers never went back.
fn assert_consistent(env: &Env, hsm: &Hsm, base: &Value, context: &str) {
    let m = env.manifest("sig");
    let vs = versions(&m);
    assert_eq!(vs.iter().filter(|v| v["state"] == "active").count(), 1, "{context}");
    let labels = hsm.labels();
    for b in versions(base).iter().filter(|v| v["state"] != "destroyed") {
        let v = vs
            .iter()
            .find(|v| v["version"] == b["version"])
            .unwrap_or_else(|| panic!("{context}: v{} vanished from the manifest", b["version"]));
        if keeps_key(v) {
            let file = v["file"].as_str().unwrap();
            assert!(env.key_dir("sig").join(file).exists(), "{context}: {file} was lost");
            let label = v["object"].as_str().unwrap().to_string();
            assert!(labels.contains(&label), "{context}: token object {label} was lost");
        }
    }
    assert!(vs.len() >= versions(base).len(), "{context}: versions went backwards");
}

/// Nothing in the token or the folder that the manifest does not account for.
fn no_orphans(env: &Env, hsm: &Hsm, context: &str) {
    let m = env.manifest("sig");
    let live: Vec<Value> = versions(&m).into_iter().filter(keeps_key).collect();
    let mut objects: Vec<String> = live.iter().map(|v| v["object"].as_str().unwrap().to_string()).collect();
    objects.sort();
    assert_eq!(hsm.labels(), objects, "{context}: orphan or missing token objects");
    let mut files: Vec<String> = live.iter().map(|v| v["file"].as_str().unwrap().to_string()).collect();
    files.sort();
    let mut on_disk: Vec<String> = std::fs::read_dir(env.key_dir("sig"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('v') || n.ends_with(".tmp"))
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, files, "{context}: orphan or missing files");
}

#[test]
fn sigkill_at_every_durable_step_of_a_token_rotation_never_loses_a_key() {
    let Some(module) = softhsm::module("pkcs11_crash::sigkill_at_every_durable_step") else {
        return;
    };
    let Some((base, _)) = base(&module) else {
        return;
    };
    let base_manifest = base.manifest("sig");
    let steps = steps(&base, &module);
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGKILL at step {k} ({step})");
        let (env, hsm) = clone_env(&base, &module);
        let out = hsm
            .with(env.rotate("sig"))
            .args(["--force", "--run-id", "KILLED"])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .output();
        assert_eq!(out.code, 137, "{context}: {}", out.stderr);
        assert_consistent(&env, &hsm, &base_manifest, &context);

        let row = env.rows().into_iter().find(|r| r["run_id"] == "KILLED");
        match row {
            Some(r) if r["exit_code"].is_null() => {
                let out = hsm.with(env.rotate("sig")).arg("--force").status(4);
                assert!(out.stdout.contains("KILLED"), "{context}: {}", out.stdout);
                let committed = versions(&env.manifest("sig"))
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
                hsm.with(env.resolve("sig", "KILLED", "crash test")).status(0);
            }
            Some(r) => assert_eq!(r["exit_code"], 0, "{context}: closed with an unexpected code"),
            None => {}
        }
        hsm.with(env.rotate("sig")).arg("--force").status(0);
        assert_consistent(&env, &hsm, &base_manifest, &context);
        no_orphans(&env, &hsm, &context);
        // The active key still signs through the token after all that.
        let out = hsm
            .command(crate::consumer_snapshot::example("sign_with_active"))
            .arg(env.path("keys"))
            .arg("sig")
            .arg("after the crash")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{context}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("pkcs11 crash points covered with SIGKILL: {}", steps.len());
}

#[test]
fn sigterm_at_every_durable_step_of_a_token_rotation_ends_with_0_or_3() {
    let Some(module) = softhsm::module("pkcs11_crash::sigterm_at_every_durable_step") else {
        return;
    };
    let Some((base, base_hsm)) = base(&module) else {
        return;
    };
    let base_manifest = base.manifest("sig");
    let base_bytes = std::fs::read(base.key_dir("sig").join("keyring.json")).unwrap();
    let base_labels = base_hsm.labels();
    let steps = steps(&base, &module);
    let commit_at = steps.iter().position(|s| s == "commit.rename").unwrap() + 1;
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("SIGTERM at step {k} ({step})");
        let (env, hsm) = clone_env(&base, &module);
        let out = hsm
            .with(env.rotate("sig"))
            .args(["--force", "--run-id", "TERMED"])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=term"))
            .output();
        let expected = if k < commit_at { 3 } else { 0 };
        assert_eq!(out.code, expected, "{context}: {}{}", out.stdout, out.stderr);
        let row = env.rows().into_iter().find(|r| r["run_id"] == "TERMED").unwrap();
        assert_eq!(row["exit_code"], expected, "{context}");
        assert_consistent(&env, &hsm, &base_manifest, &context);
        if expected == 3 {
            // Stopped before the commit: the old manifest, and nothing it created left
            // in the token (the leftover it may have swept is gone for good reason).
            assert_eq!(
                std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(),
                base_bytes,
                "{context}"
            );
            for l in hsm.labels() {
                assert!(base_labels.contains(&l), "{context}: {l} left in the token");
            }
        } else {
            no_orphans(&env, &hsm, &context);
        }
        hsm.with(env.rotate("sig")).arg("--force").status(0);
        no_orphans(&env, &hsm, &context);
    }
}
