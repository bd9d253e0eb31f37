//! NIST SP 800-57 key states (DESIGN 11): transition timestamps on every version, the
//! private half of a retired signature key destroyed at its retirement (its public
//! half verifies it from keyring.json and jwks.json until retention destroys it),
//! symmetric and encryption keys keeping their material while retired, and manifests
//! written before any of this still read.

use keyrotate::keyring::{verify_with_jwk, Keyring};
use serde_json::Value;

use crate::common::Env;

#[test]
fn a_retired_signature_key_keeps_only_its_public_half_and_still_verifies() {
    let env = Env::new();
    for domain in ["sig", "p256", "rsa"] {
        env.rotate(domain).status(0);
        // A token signed by v1 while it is active...
        let ring = Keyring::open(&env.path("keys"), domain).unwrap();
        let active = ring.active().unwrap();
        let signature = active.key.sign(b"payload").unwrap();
        env.rotate(domain).arg("--force").status(0);
        env.rotate(domain).arg("--force").status(0);
        // ...after two rotations v1 and v2 are retired: no private file is left but
        // the active one's, and both stay published.
        let ext = "pem";
        assert_eq!(env.key_files(domain), [format!("v000003.{ext}")], "{domain}");
        assert_eq!(
            env.published_versions(domain),
            ["v000003", "v000002", "v000001"],
            "{domain}"
        );
        for n in [1, 2] {
            let v = env.manifest_version(domain, n);
            assert_eq!(v["state"], "retired", "{domain}");
            assert!(v["public_key"].is_string(), "{domain} v{n}: {v}");
        }
        // The consumer API still verifies v1's token from its public half alone.
        let ring = Keyring::open(&env.path("keys"), domain).unwrap();
        let keys = ring.verification_keys().unwrap();
        assert_eq!(keys.len(), 3, "{domain}");
        let v1 = keys.iter().find(|k| k.version == 1).unwrap();
        assert!(verify_with_jwk(&v1.jwk, b"payload", &signature), "{domain}");
        // And it offers no private half of it to sign with.
        let e = ring.version(1).unwrap_err().to_string();
        assert!(e.contains("public half"), "{domain}: {e}");
        assert!(ring.version(3).is_ok());
        // check and status agree that the store is whole.
        env.cmd().args(["status", "--domain", domain]).status(0);
        env.cmd().args(["check", "--domain", domain]).status(0);
    }
}

#[test]
fn retired_symmetric_and_encryption_keys_keep_their_material() {
    let env = Env::new();
    for domain in ["mac", "aes"] {
        env.rotate(domain).status(0);
        let old = Keyring::open(&env.path("keys"), domain).unwrap().active().unwrap();
        env.rotate(domain).arg("--force").status(0);
        assert_eq!(env.key_files(domain), ["v000001.key", "v000002.key"], "{domain}");
        assert_eq!(env.manifest_version(domain, 1)["state"], "retired");
        // Old data must still open: the retired key is there, the same key.
        let ring = Keyring::open(&env.path("keys"), domain).unwrap();
        let again = ring.version(1).unwrap();
        assert_eq!(again.key.fingerprint(), old.key.fingerprint());
        assert!(env.manifest_version(domain, 1).get("public_key").is_none());
    }
}

#[test]
fn every_transition_is_timestamped_in_the_manifest() {
    let env = Env::new();
    // prepublish, retain = 2: v1 active + v2 pending, then three promotions.
    env.rotate("pre").status(0);
    let v2 = env.manifest_version("pre", 2);
    assert_eq!(v2["state"], "pending");
    assert!(v2["created_at"].is_string() && v2["activated_at"].is_null(), "{v2}");
    for _ in 0..3 {
        env.rotate("pre").arg("--force").status(0);
    }
    let m = env.manifest("pre");
    let states: Vec<&str> = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["destroyed", "retired", "retired", "active", "pending"]);
    let v1 = env.manifest_version("pre", 1);
    let at = |v: &Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} missing: {v}")).to_string();
    assert!(at(&v1, "created_at") <= at(&v1, "activated_at"));
    assert!(at(&v1, "activated_at") < at(&v1, "retired_at"));
    assert!(at(&v1, "retired_at") < at(&v1, "destroyed_at"));
    let v2 = env.manifest_version("pre", 2);
    assert!(at(&v2, "created_at") < at(&v2, "activated_at"), "{v2}");
    assert!(at(&v2, "activated_at") < at(&v2, "retired_at"), "{v2}");
    assert!(v2["destroyed_at"].is_null());
    // Nothing was compromised: no such member is written.
    assert!(v2.get("compromised_at").is_none() && v2.get("compromise_reason").is_none());
}

/// A keyring.json written before the public halves and the compromised state: every
/// asymmetric version without `public_key`, a retired signature key with its private
/// file. It reads (status, the consumer API), rotates, and that commit records the
/// public halves and lets the retired private file go.
#[test]
fn a_manifest_from_before_the_lifecycle_states_still_reads_and_upgrades() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let v1_file = std::fs::read(env.key_dir("sig").join("v000001.pem")).unwrap();
    env.rotate("sig").arg("--force").status(0);
    // Turn it into the old shape: no public halves, v1's private file back.
    let path = env.key_dir("sig").join("keyring.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for v in m["versions"].as_array_mut().unwrap() {
        v.as_object_mut().unwrap().remove("public_key");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    std::fs::write(env.key_dir("sig").join("v000001.pem"), &v1_file).unwrap();
    std::fs::set_permissions(
        env.key_dir("sig").join("v000001.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();

    // It reads: the retired key's file is where its public key is.
    env.cmd().args(["status", "--domain", "sig"]).status(0);
    let ring = Keyring::open(&env.path("keys"), "sig").unwrap();
    assert_eq!(ring.verification_keys().unwrap().len(), 2);
    assert_eq!(env.published_versions("sig"), ["v000002", "v000001"]);
    // A rotation records every public half, and v1's private file goes.
    env.rotate("sig").arg("--force").status(0);
    for n in [1, 2, 3] {
        assert!(env.manifest_version("sig", n)["public_key"].is_string(), "v{n}");
    }
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
    assert_eq!(env.published_versions("sig"), ["v000003", "v000002", "v000001"]);
    env.cmd().args(["status", "--domain", "sig"]).status(0);
}

/// The retirement commit says "no private half" first; the file goes in the tidy-up.
/// A crash between leaves a private file that the garbage rule recognises by the
/// manifest's word (retired signature key), so the next invocation's repair removes it
/// before deciding anything; it is never taken for evidence.
#[cfg(feature = "failpoints")]
#[test]
fn a_retired_private_half_left_by_a_crash_is_garbage_not_evidence() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "destroy.unlink=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert_eq!(env.manifest_version("sig", 1)["state"], "retired");
    assert_eq!(env.key_files("sig"), ["v000001.pem", "v000002.pem"]);
    // The dry run plans the removal as the last commit's tidy-up.
    let dry = env.rotate("sig").args(["--force", "--dry-run"]).status(4);
    assert!(dry.stdout.contains("unlink v000001.pem"), "{}", dry.stdout);
    // The next run repairs first (then flags the killed run for review).
    let next = env.rotate("sig").arg("--force").status(4);
    assert!(next.stdout.contains("KILLED"), "{}", next.stdout);
    assert!(!next.stdout.contains("does not list"), "{}", next.stdout);
    assert_eq!(env.key_files("sig"), ["v000002.pem"]);
    env.resolve("sig", "KILLED", "crash after the retirement commit")
        .status(0);
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
}

/// A public half in keyring.json that is not the version's key (edited, or swapped for
/// another key's) is refused: its fingerprint is the version's identity.
#[test]
fn a_swapped_public_half_is_refused() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    env.rotate("sig").arg("--force").status(0);
    let path = env.key_dir("sig").join("keyring.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let v2_public = m["versions"][1]["public_key"].clone();
    m["versions"][0]["public_key"] = v2_public;
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let st = env.cmd().args(["status", "--domain", "sig"]).status(3);
    assert!(st.stderr.contains("public_key has fingerprint"), "{}", st.stderr);
    // The consumer API refuses to verify with it (the active key still signs).
    let ring = Keyring::open(&env.path("keys"), "sig").unwrap();
    let e = ring.verification_keys().unwrap_err().to_string();
    assert!(e.contains("fingerprint"), "{e}");
    assert!(ring.active().is_ok());
    env.rotate("sig").arg("--force").status(4);
}
