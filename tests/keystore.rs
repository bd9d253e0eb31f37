//! Key store completeness: pre-publication over several rotations and mode switches,
//! every algorithm's files through the real `openssl`, JWKS entries, and the consumer
//! API with its example program.

use std::process::Command;

use crate::common::{have_openssl, Env, ALL_ALGORITHMS, DEFAULT_CONFIG};

fn state_of(env: &Env, domain: &str) -> Vec<(u64, String)> {
    env.versions(domain)
}

fn pairs(list: &[(u64, &str)]) -> Vec<(u64, String)> {
    list.iter().map(|(n, s)| (*n, s.to_string())).collect()
}

#[test]
fn prepublish_publishes_each_key_one_rotation_before_it_signs() {
    let env = Env::new(); // domain "pre": ed25519, prepublish, retain 2
    let out = env.rotate("pre").args(["--output", "json"]).status(0).json();
    assert_eq!(
        (out["from_version"].as_u64(), out["to_version"].as_u64()),
        (None, Some(1))
    );
    assert_eq!(state_of(&env, "pre"), pairs(&[(1, "active"), (2, "pending")]));
    assert_eq!(
        std::fs::read_link(env.key_dir("pre").join("current.pem"))
            .unwrap()
            .to_str(),
        Some("v000001.pem")
    );
    let k = env.published_kids("pre");
    assert!(
        k[0].starts_with("v000002-") && k[1].starts_with("v000001-"),
        "pending first, then active: {k:?}"
    );

    env.rotate("pre").arg("--force").status(0);
    assert_eq!(
        state_of(&env, "pre"),
        pairs(&[(1, "retired"), (2, "active"), (3, "pending")])
    );
    assert_eq!(
        std::fs::read_link(env.key_dir("pre").join("current.pem"))
            .unwrap()
            .to_str(),
        Some("v000002.pem")
    );
    let k = env.published_kids("pre");
    assert_eq!(
        k.iter().map(|k| &k[..7]).collect::<Vec<_>>(),
        ["v000003", "v000002", "v000001"]
    );
    let m = env.manifest("pre");
    assert_eq!(m["primary"], 2);
    assert!(m["versions"][1]["activated_at"].as_str().unwrap() > m["versions"][1]["created_at"].as_str().unwrap());

    env.rotate("pre").arg("--force").status(0);
    env.rotate("pre").arg("--force").status(0);
    assert_eq!(
        state_of(&env, "pre"),
        pairs(&[
            (1, "destroyed"),
            (2, "retired"),
            (3, "retired"),
            (4, "active"),
            (5, "pending")
        ])
    );
    // Retired signature keys keep no private half (DESIGN 11); jwks.json still
    // publishes them from the public halves keyring.json records.
    assert_eq!(env.key_files("pre"), ["v000004.pem", "v000005.pem"]);
    assert_eq!(env.published_kids("pre").len(), 4);
}

#[test]
fn switching_activation_modes_keeps_every_key() {
    let env = Env::new();
    env.rotate("sig").status(0);
    // immediate -> prepublish: an active domain without a pending version gets one,
    // nothing is promoted.
    std::fs::write(
        env.config_path(),
        DEFAULT_CONFIG.replace(
            "[domains.sig]\nalgorithm = \"ed25519\"",
            "[domains.sig]\nalgorithm = \"ed25519\"\nactivation = \"prepublish\"",
        ),
    )
    .unwrap();
    let out = env.rotate("sig").args(["--force", "--output", "json"]).status(0).json();
    assert_eq!(
        (out["from_version"].as_u64(), out["to_version"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(state_of(&env, "sig"), pairs(&[(1, "active"), (2, "pending")]));
    // prepublish -> immediate: a new active key; the published pending one is kept
    // (retired), never activated behind the operator's back, never lost.
    std::fs::write(env.config_path(), DEFAULT_CONFIG).unwrap();
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(
        state_of(&env, "sig"),
        pairs(&[(1, "retired"), (2, "retired"), (3, "active")])
    );
    assert_eq!(env.published_kids("sig").len(), 3);
}

#[test]
fn every_algorithm_is_readable_by_openssl_with_a_correct_jwk() {
    let env = Env::with_config(ALL_ALGORITHMS);
    for (domain, kty, crv, alg, openssl_name) in [
        ("ed25519", "OKP", Some("Ed25519"), "EdDSA", "ED25519"),
        ("p256", "EC", Some("P-256"), "ES256", "prime256v1"),
        ("p384", "EC", Some("P-384"), "ES384", "secp384r1"),
        ("rsa2048", "RSA", None, "RS256", "(2048 bit"),
        ("rsa3072", "RSA", None, "RS256", "(3072 bit"),
        ("rsa4096", "RSA", None, "RS256", "(4096 bit"),
    ] {
        env.rotate(domain).status(0);
        let jwk = &env.jwks(domain)["keys"][0];
        assert_eq!(jwk["kty"], kty, "{domain}");
        assert_eq!(jwk["crv"].as_str(), crv, "{domain}");
        assert_eq!(jwk["alg"], alg, "{domain}");
        assert_eq!(jwk["use"], "sig");
        for member in match kty {
            "OKP" => &["x"][..],
            "EC" => &["x", "y"][..],
            _ => &["n", "e"][..],
        } {
            assert!(
                jwk[member]
                    .as_str()
                    .is_some_and(|s| !s.contains('=') && !s.contains('+')),
                "{domain}: {member} is not base64url"
            );
        }
        let jwk_map = jwk.as_object().unwrap();
        assert_eq!(
            keyrotate::keyring::jwk_algorithm(jwk_map).map(|a| a.name()),
            Some(domain).map(|d| match d {
                "ed25519" => "ed25519",
                "p256" => "ecdsa-p256",
                "p384" => "ecdsa-p384",
                "rsa2048" => "rsa-2048",
                "rsa3072" => "rsa-3072",
                _ => "rsa-4096",
            })
        );
        if !have_openssl() {
            eprintln!("SKIPPED openssl interop for {domain}: openssl is not installed");
            continue;
        }
        let text = Command::new("openssl")
            .args(["pkey", "-noout", "-text", "-in"])
            .arg(env.key_dir(domain).join("v000001.pem"))
            .output()
            .unwrap();
        assert!(
            text.status.success(),
            "{domain}: {}",
            String::from_utf8_lossy(&text.stderr)
        );
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(openssl_name),
            "{domain}: openssl says {}",
            text.lines().next().unwrap_or("")
        );
    }
    for domain in ["hmac", "aes"] {
        env.rotate(domain).status(0);
        assert!(!env.key_dir(domain).join("jwks.json").exists());
    }
}

fn example_binary() -> std::path::PathBuf {
    // target/debug/deps/integration-… -> target/debug/examples/sign_with_active
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/sign_with_active")
}

#[test]
fn the_consumer_example_signs_with_the_active_key_and_verifies_from_jwks() {
    let env = Env::with_config(ALL_ALGORITHMS);
    let example = example_binary();
    assert!(
        example.exists(),
        "{} was not built (cargo test builds examples)",
        example.display()
    );
    for domain in ["ed25519", "p256", "p384", "rsa2048"] {
        env.rotate(domain).status(0);
        env.rotate(domain).arg("--force").status(0);
        let out = Command::new(&example)
            .arg(env.path("keys"))
            .arg(domain)
            .arg("hello, verifier")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{domain}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.starts_with("kid v000002-") && stdout.trim_end().ends_with("verified"),
            "{domain}: {stdout}"
        );
    }
    // No active key, or a key with no public half: a clear failure, never "verified".
    let out = Command::new(&example)
        .arg(env.path("keys"))
        .arg("hmac")
        .arg("x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no keyring"));
}

#[test]
fn the_consumer_api_refuses_a_damaged_store_and_lists_verification_keys() {
    use keyrotate::keyring::{verify_with_jwk, Keyring, KeyringError};
    let env = Env::new();
    env.rotate("pre").status(0);
    let ring = Keyring::open(&env.path("keys"), "pre").unwrap();
    let active = ring.active().unwrap();
    let pending = ring.pending().unwrap().expect("a pending version");
    assert_eq!((active.version, pending.version), (1, 2));
    let keys = ring.verification_keys().unwrap();
    assert_eq!(keys.iter().map(|k| k.version).collect::<Vec<_>>(), [2, 1]);
    let sig = active.key.sign(b"m").unwrap();
    assert!(verify_with_jwk(&keys[1].jwk, b"m", &sig));
    assert!(
        !verify_with_jwk(&keys[0].jwk, b"m", &sig),
        "the pending key must not verify the active key's signature"
    );
    assert!(!verify_with_jwk(&keys[1].jwk, b"other", &sig));
    // The published JWKS is what the API derives.
    assert_eq!(
        env.jwks("pre")["keys"][1],
        serde_json::Value::Object(keys[1].jwk.clone())
    );

    // A swapped key file is an error, not a different key.
    let other = keyrotate::keystore::Algorithm::Ed25519.generate().unwrap();
    std::fs::write(env.key_dir("pre").join("v000001.pem"), other.file_bytes()).unwrap();
    let ring = Keyring::open(&env.path("keys"), "pre").unwrap();
    let err = ring.active().unwrap_err();
    assert!(
        matches!(err, KeyringError::Invalid { .. }) && err.to_string().contains("fingerprint"),
        "{err}"
    );
    assert!(matches!(
        Keyring::open(&env.path("keys"), "sig"),
        Err(KeyringError::NotFound { .. })
    ));
    assert!(Keyring::open(&env.path("keys"), "../etc").is_err());
}
