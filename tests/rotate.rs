//! The rotate job end to end on the built-in key store: files, modes, manifest,
//! symlink, JWKS, ledger row and audit lines, for every exit code it can reach
//! without fault injection.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use base64::Engine;

use crate::common::{have_openssl, mode, Env};

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[test]
fn first_rotation_writes_a_private_verified_key_and_records_it() {
    let env = Env::new();
    let out = env
        .rotate("sig")
        .args(["--run-id", "ORDER1-1", "--output", "json"])
        .status(0);
    let r = out.json();
    assert_eq!(r["outcome"], "ROTATED");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["run_id"], "ORDER1-1");
    assert_eq!(r["from_version"], serde_json::Value::Null);
    assert_eq!(r["to_version"], 1);
    assert_eq!(r["dry_run"], false);

    let dir = env.key_dir("sig");
    assert_eq!(mode(&env.path("keys")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&env.path("state")), 0o700);
    assert_eq!(mode(&dir.join("v000001.pem")), 0o600);
    assert_eq!(mode(&dir.join("keyring.json")), 0o600);
    assert_eq!(
        std::fs::read_link(dir.join("current.pem")).unwrap(),
        std::path::Path::new("v000001.pem")
    );

    let m = env.manifest("sig");
    assert_eq!(m["domain"], "sig");
    assert_eq!(m["primary"], 1);
    let v = &m["versions"][0];
    assert_eq!(v["state"], "active");
    assert_eq!(v["algorithm"], "ed25519");
    assert_eq!(v["created_by_run"], "ORDER1-1");
    assert!(v["fingerprint"].as_str().unwrap().starts_with("sha256:"));

    let row = env.last_row();
    assert_eq!(row["run_id"], "ORDER1-1");
    assert_eq!(row["state"], "succeeded");
    assert_eq!(row["exit_code"], 0);
    assert_eq!(row["to_version"], 1);
    assert_eq!(row["trigger"], "scheduled");
    assert_eq!(row["operator"], "tester");
    assert_eq!(row["pool"], "pool-a");
    assert!(row["ended_at"].as_str().unwrap() >= row["started_at"].as_str().unwrap());

    let events: Vec<String> = env
        .audit()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events, ["rotation.started", "rotation.committed", "rotation.succeeded"]);
    let last = env.audit().pop().unwrap();
    for field in [
        "ts",
        "run_id",
        "domain",
        "host",
        "pool",
        "operator",
        "exit_code",
        "reason",
        "from_version",
        "to_version",
    ] {
        assert!(last.get(field).is_some(), "audit line lacks {field}: {last}");
    }
    assert_eq!(last["exit_code"], 0);
    assert_eq!(last["to_fingerprint"], v["fingerprint"]);
}

#[test]
fn the_key_file_is_readable_by_openssl_and_matches_the_jwks() {
    if !have_openssl() {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let env = Env::new();
    for domain in ["sig", "p256", "p384", "rsa"] {
        env.rotate(domain).status(0);
        let pem = env.key_dir(domain).join("current.pem");
        let der = Command::new("openssl")
            .args(["pkey", "-in"])
            .arg(&pem)
            .args(["-pubout", "-outform", "DER"])
            .output()
            .unwrap();
        assert!(
            der.status.success(),
            "openssl pkey failed on {domain}: {}",
            String::from_utf8_lossy(&der.stderr)
        );
        // The manifest fingerprint is the SHA-256 of the SubjectPublicKeyInfo openssl derives.
        let fp = format!("sha256:{}", sha256_hex(&der.stdout));
        assert_eq!(
            env.manifest(domain)["versions"][0]["fingerprint"],
            fp.as_str(),
            "{domain}"
        );
        let jwks = env.jwks(domain);
        let key = &jwks["keys"][0];
        assert!(key["kid"].as_str().unwrap().starts_with("v000001-"), "{key}");
        assert_eq!(key["use"], "sig");
        match domain {
            "sig" => {
                assert_eq!(
                    (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
                    (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
                );
                // The raw public key is the last 32 bytes of the Ed25519 SPKI.
                assert_eq!(
                    B64URL.decode(key["x"].as_str().unwrap()).unwrap(),
                    der.stdout[der.stdout.len() - 32..]
                );
            }
            "p256" | "p384" => {
                assert_eq!(key["kty"], "EC");
                let n = if domain == "p256" { 32 } else { 48 };
                let point = &der.stdout[der.stdout.len() - 2 * n..];
                assert_eq!(B64URL.decode(key["x"].as_str().unwrap()).unwrap(), point[..n]);
                assert_eq!(B64URL.decode(key["y"].as_str().unwrap()).unwrap(), point[n..]);
            }
            _ => {
                assert_eq!(
                    (key["kty"].as_str(), key["alg"].as_str(), key["e"].as_str()),
                    (Some("RSA"), Some("RS256"), Some("AQAB"))
                );
                assert_eq!(B64URL.decode(key["n"].as_str().unwrap()).unwrap().len(), 256);
            }
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn symmetric_keys_are_one_line_of_base64_and_have_no_jwks() {
    let env = Env::new();
    for domain in ["mac", "aes"] {
        env.rotate(domain).status(0);
        let dir = env.key_dir(domain);
        let text = std::fs::read_to_string(dir.join("v000001.key")).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 1);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim_end())
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert_eq!(
            std::fs::read_link(dir.join("current.key")).unwrap(),
            std::path::Path::new("v000001.key")
        );
        assert!(!dir.join("jwks.json").exists());
        assert_eq!(mode(&dir.join("v000001.key")), 0o600);
    }
}

#[test]
fn retention_destroys_the_oldest_retired_versions_only() {
    let env = Env::new(); // retain = 2
    for _ in 0..5 {
        env.rotate("sig").arg("--force").status(0);
    }
    let states: Vec<(u64, String)> = env.versions("sig");
    let want: Vec<(u64, String)> = [
        (1, "destroyed"),
        (2, "destroyed"),
        (3, "retired"),
        (4, "retired"),
        (5, "active"),
    ]
    .iter()
    .map(|(n, s)| (*n, s.to_string()))
    .collect();
    assert_eq!(states, want);
    // Retired signature keys keep no private half (DESIGN 11); jwks.json still
    // publishes v3 and v4 from the public halves keyring.json records.
    assert_eq!(env.key_files("sig"), ["v000005.pem"]);
    let kids: Vec<String> = env.jwks("sig")["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap()[..7].to_string())
        .collect();
    assert_eq!(kids, ["v000005", "v000004", "v000003"]);
    let m = env.manifest("sig");
    assert!(m["versions"][0]["destroyed_at"].is_string());
    assert_eq!(
        (
            env.last_row()["from_version"].as_i64(),
            env.last_row()["to_version"].as_i64()
        ),
        (Some(4), Some(5))
    );
}

#[test]
fn modes_hold_whatever_the_umask() {
    let env = Env::new();
    env.rotate("sig").shell_prefix("umask 000").status(0);
    env.rotate("mac").shell_prefix("umask 077").status(0);
    for p in ["keys", "keys/sig", "state", "state/locks"] {
        assert_eq!(mode(&env.path(p)), 0o700, "{p}");
    }
    for p in [
        "keys/sig/v000001.pem",
        "keys/sig/keyring.json",
        "keys/sig/jwks.json",
        "state/ledger.sqlite3",
        "state/audit.jsonl",
        "state/locks/sig.lock",
    ] {
        assert_eq!(mode(&env.path(p)), 0o600, "{p}");
    }
}

#[test]
fn not_due_within_min_interval_unless_forced() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let out = env.rotate("sig").status(7);
    assert!(out.stdout.starts_with("NOT_DUE sig: not due"), "{}", out.stdout);
    assert!(out.stdout.contains("--force"));
    let row = env.last_row();
    assert_eq!(
        (row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("refused"), Some(7))
    );
    assert_eq!(env.versions("sig").len(), 1);
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.last_row()["forced"], 1);
    assert_eq!(env.versions("sig").len(), 2);
    assert_eq!(
        env.audit().iter().filter(|e| e["event"] == "rotation.refused").count(),
        1
    );
}

#[test]
fn not_designated_does_nothing_at_all() {
    let env = Env::new();
    let before = env.snapshot();
    let out = env.rotate("elsewhere").status(6);
    assert!(out.stdout.contains("not the designated pool pool-b"), "{}", out.stdout);
    env.assert_unchanged(&before, "a non-designated run");
    // --pool and KEYROTATE_POOL override [host].pool, in that order.
    env.rotate("elsewhere")
        .env("KEYROTATE_POOL", "pool-b")
        .arg("--pool")
        .arg("pool-c")
        .status(6);
    env.rotate("elsewhere").env("KEYROTATE_POOL", "pool-b").status(0);
    env.rotate("sig").env("KEYROTATE_POOL", "pool-b").status(6);
}

#[test]
fn busy_when_the_lock_is_held_names_the_holder() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let lock_path = env.path("state/locks/sig.lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lock_path)
        .unwrap();
    f.lock().unwrap();
    std::fs::write(
        &lock_path,
        r#"{"run_id":"HOLDER-7","pid":4242,"host":"hostx","started_at":"2026-11-25T19:00:00Z"}"#,
    )
    .unwrap();
    let before = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    let out = env.rotate("sig").args(["--force", "--run-id", "B-1"]).status(5);
    assert!(
        out.stdout.contains("HOLDER-7") && out.stdout.contains("4242") && out.stdout.contains("hostx"),
        "{}",
        out.stdout
    );
    assert_eq!(std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(), before);
    let row = env.last_row();
    assert_eq!(
        (row["run_id"].as_str(), row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("B-1"), Some("refused"), Some(5))
    );
    assert!(row["ended_at"].is_string());
    let ev = env.audit().pop().unwrap();
    assert_eq!(
        (ev["event"].as_str(), ev["exit_code"].as_i64()),
        (Some("rotation.refused"), Some(5))
    );
    drop(f);
    env.rotate("sig").arg("--force").status(0);
}

#[test]
fn too_little_time_left_is_timed_out_before_touching_keys() {
    let env = Env::new();
    // An RSA-4096 rotation is not started with less than its 5 s budget.
    let out = env
        .cmd()
        .args(["rotate", "--domain", "rsa4096", "--deadline", "3s"])
        .status(8);
    assert!(out.stdout.contains("deadline budget"), "{}", out.stdout);
    assert!(env.key_files("rsa4096").is_empty());
    let row = env.last_row();
    assert_eq!(
        (row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("timed_out"), Some(8))
    );
}

#[test]
fn unsafe_folders_abort_without_writing_through_them() {
    // group-writable key store
    let env = Env::new();
    std::fs::create_dir_all(env.path("keys")).unwrap();
    std::fs::set_permissions(env.path("keys"), std::fs::Permissions::from_mode(0o770)).unwrap();
    let out = env.rotate("sig").status(3);
    assert!(out.stdout.contains("writable by group or others"), "{}", out.stdout);
    assert!(!env.key_dir("sig").exists());
    assert_eq!(
        (env.last_row()["state"].as_str(), env.last_row()["exit_code"].as_i64()),
        (Some("aborted"), Some(3))
    );

    // a key store that is a symlink
    let env = Env::new();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), env.path("keys")).unwrap();
    let out = env.rotate("sig").status(3);
    assert!(out.stdout.contains("symlink"), "{}", out.stdout);
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "wrote through the symlink"
    );

    // a state folder owned by someone else
    let env = Env::new();
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::set_permissions(env.path("state"), std::fs::Permissions::from_mode(0o700)).unwrap();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(env.path("state"), Some(65534), None).unwrap();
        let out = env.rotate("sig").status(3);
        assert!(out.stdout.contains("owned by uid 65534"), "{}", out.stdout);
        assert!(!env.path("keys").exists());
    }
}

#[test]
fn temporaries_are_swept_but_an_unrecorded_key_file_is_evidence_and_its_number_is_never_reused() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let dir = env.key_dir("sig");
    // A v2 no run recorded staging (e.g. keyring.json restored from an older backup)
    // and a temporary of an interrupted atomic write.
    std::fs::copy(dir.join("v000001.pem"), dir.join("v000002.pem")).unwrap();
    std::fs::write(dir.join(".keyring.json.tmp"), "partial").unwrap();
    let out = env.rotate("sig").args(["--force", "--run-id", "SEES-V2"]).status(4);
    assert!(out.stdout.contains("v000002.pem"), "{}", out.stdout);
    assert_eq!(
        env.key_files("sig"),
        ["v000001.pem", "v000002.pem"],
        "evidence was deleted"
    );
    // The operator moves it aside after review; the number stays taken.
    std::fs::rename(dir.join("v000002.pem"), env.path("v000002.pem.reviewed")).unwrap();
    env.resolve("sig", "SEES-V2", "v2 was a stray copy of v1").status(0);
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
    assert!(!dir.join(".keyring.json.tmp").exists());
    assert_eq!(env.manifest("sig")["primary"], 3);
}

#[test]
fn a_manual_run_is_marked_manual_and_keeps_its_reason() {
    let env = Env::new();
    env.rotate("sig")
        .args(["--operator", "alice", "--reason", "key exposure drill"])
        .status(0);
    let row = env.last_row();
    assert_eq!(row["trigger"], "manual");
    assert_eq!(row["operator"], "alice");
    assert_eq!(row["requested_reason"], "key exposure drill");
    assert_eq!(env.audit()[0]["reason"], "key exposure drill");
}

#[test]
fn a_run_id_already_in_the_ledger_is_a_usage_error() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "R-1"]).status(0);
    let before = env.snapshot();
    let out = env.rotate("sig").args(["--run-id", "R-1", "--force"]).status(2);
    assert!(out.stdout.contains("already in the ledger"), "{}", out.stdout);
    // Only the lock file's holder line may change (taken before `rows()`, whose own
    // connection checkpoints the kept WAL when it closes).
    let mut after = env.snapshot();
    assert_eq!(env.rows().len(), 1);
    after.remove(std::path::Path::new("state/locks/sig.lock"));
    let mut before = before;
    before.remove(std::path::Path::new("state/locks/sig.lock"));
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    assert_eq!(
        after.get(std::path::Path::new("keys/sig/keyring.json")),
        before.get(std::path::Path::new("keys/sig/keyring.json"))
    );
}
