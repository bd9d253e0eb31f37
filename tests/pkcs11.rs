//! `custody = "pkcs11"` (DESIGN section 10) against a real SoftHSM2 token that each
//! test makes for itself (see `common::softhsm`): keys generated in the token and never
//! readable out of it, only public parts on disk, signing through the consumer API
//! verified by openssl from `jwks.json`, retention destroying token objects, the sweep
//! rule for objects nobody can explain, and one-line errors for a bad module or PIN.

use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

use crate::common::softhsm::{self, Hsm, PIN};
use crate::common::{have_openssl, Env};

const ALL: &str = r#"
[domains.ed]
algorithm = "ed25519"
custody = "pkcs11"
[domains.p256]
algorithm = "ecdsa-p256"
custody = "pkcs11"
[domains.p384]
algorithm = "ecdsa-p384"
custody = "pkcs11"
[domains.rsa]
algorithm = "rsa-2048"
custody = "pkcs11"
[domains.mac]
algorithm = "hmac-sha256"
custody = "pkcs11"
[domains.aes]
algorithm = "aes-256"
custody = "pkcs11"
[domains.plain]
algorithm = "ed25519"
"#;

/// An env with a token and the config `domains`, or `None` (SKIPPED).
fn setup(test: &str, domains: &str) -> Option<(Env, Hsm)> {
    let module = softhsm::module(test)?;
    let env = Env::with_config(&softhsm::config(&module, domains));
    let hsm = Hsm::new(&env, test, "")?;
    Some((env, hsm))
}

fn files(env: &Env, domain: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.key_dir(domain))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".lock")
        .collect();
    names.sort();
    names
}

fn example(name: &str) -> std::path::PathBuf {
    crate::consumer_snapshot::example(name)
}

#[test]
fn every_algorithm_is_generated_in_the_token_with_only_public_parts_on_disk() {
    let Some((env, hsm)) = setup("pkcs11::every_algorithm", ALL) else {
        return;
    };
    for d in ["ed", "p256", "p384", "rsa", "mac", "aes", "plain"] {
        hsm.with(env.rotate(d)).status(0);
    }
    for (d, public) in [
        ("ed", true),
        ("p256", true),
        ("p384", true),
        ("rsa", true),
        ("mac", false),
        ("aes", false),
    ] {
        let expected: Vec<&str> = if public {
            vec!["jwks.json", "keyring.json", "v000001.pub.pem"]
        } else {
            vec!["keyring.json", "v000001.ref"]
        };
        assert_eq!(files(&env, d), expected, "{d}");
        for f in files(&env, d) {
            let text = std::fs::read_to_string(env.key_dir(d).join(&f)).unwrap();
            assert!(!text.contains("PRIVATE"), "{d}/{f} holds a private key");
        }
        let v = &env.manifest(d)["versions"][0];
        assert_eq!(v["object"], format!("keyrotate/{d}/v000001"), "{d}");
        assert_eq!(env.manifest(d)["pkcs11"]["token"], softhsm::TOKEN);
        // CKA_ID is the fingerprint's digest.
        let desc = hsm.describe(&format!("keyrotate/{d}/v000001"));
        let fp = v["fingerprint"].as_str().unwrap().strip_prefix("sha256:").unwrap();
        assert!(
            desc.contains(fp),
            "{d}: the object's ID is not its fingerprint:\n{desc}"
        );
        assert!(
            desc.contains("sensitive") && desc.contains("never extractable"),
            "{d}:\n{desc}"
        );
    }
    // The file-custody domain beside them is unchanged: its key is a file.
    assert!(env.key_dir("plain").join("v000001.pem").exists());
    let labels = hsm.labels();
    assert_eq!(
        labels,
        ["aes", "ed", "mac", "p256", "p384", "rsa"].map(|d| format!("keyrotate/{d}/v000001")),
        "one token object per version (the public halves are on disk only)"
    );
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` from a JOSE ECDSA signature (r || s).
fn ecdsa_der(raw: &[u8]) -> Vec<u8> {
    fn int(v: &[u8]) -> Vec<u8> {
        let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        let mut body = if v.first().is_some_and(|b| b & 0x80 != 0) {
            vec![0]
        } else {
            Vec::new()
        };
        body.extend(v);
        let mut out = vec![0x02, body.len() as u8];
        out.extend(body);
        out
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let body: Vec<u8> = [int(r), int(s)].concat();
    let mut out = vec![0x30];
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend(body);
    out
}

/// The SubjectPublicKeyInfo PEM of an EC or OKP JWK (fixed DER prefixes per curve).
fn jwk_pem(jwk: &Value) -> String {
    let b = |m: &str| URL_SAFE_NO_PAD.decode(jwk[m].as_str().unwrap()).unwrap();
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let der: Vec<u8> = match jwk["crv"].as_str().unwrap() {
        "Ed25519" => [hex("302a300506032b6570032100"), b("x")].concat(),
        "P-256" => [
            hex("3059301306072a8648ce3d020106082a8648ce3d030107034200"),
            vec![4],
            b("x"),
            b("y"),
        ]
        .concat(),
        "P-384" => [
            hex("3076301006072a8648ce3d020106052b81040022036200"),
            vec![4],
            b("x"),
            b("y"),
        ]
        .concat(),
        other => panic!("no PEM for curve {other}"),
    };
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn signs_through_the_token_and_openssl_verifies_from_jwks() {
    let Some((env, hsm)) = setup("pkcs11::signs_through_the_token", ALL) else {
        return;
    };
    if !have_openssl() {
        println!("SKIPPED pkcs11::signs_through_the_token: openssl is not installed");
        return;
    }
    let message = env.path("message");
    std::fs::write(&message, b"pay 100 to alice").unwrap();
    for d in ["ed", "p256", "p384", "rsa"] {
        hsm.with(env.rotate(d)).status(0);
        hsm.with(env.rotate(d)).arg("--force").status(0);
        // The example of the consumer API, unchanged.
        let out = hsm
            .command(example("sign_with_active"))
            .arg(env.path("keys"))
            .arg(d)
            .arg("hello, verifier")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("v000002"),
            "{d}: sign_with_active: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A raw signature, verified by openssl with the key jwks.json publishes.
        let sig = env.path(&format!("{d}.sig"));
        let out = hsm
            .command(example("sign_message"))
            .arg(env.path("keys"))
            .arg(d)
            .arg(&message)
            .arg(&sig)
            .output()
            .unwrap();
        assert!(out.status.success(), "{d}: {}", String::from_utf8_lossy(&out.stderr));
        let kid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let jwks = env.jwks(d);
        let jwk = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("{d}: kid {kid} not in jwks.json"))
            .clone();
        let pem = env.path(&format!("{d}.jwk.pem"));
        let pem_s = pem.to_str().unwrap();
        let (msg_s, sig_s) = (message.to_str().unwrap(), sig.to_str().unwrap());
        let (ok, said) = match d {
            "ed" => {
                std::fs::write(&pem, jwk_pem(&jwk)).unwrap();
                openssl(&[
                    "pkeyutl", "-verify", "-pubin", "-inkey", pem_s, "-rawin", "-in", msg_s, "-sigfile", sig_s,
                ])
            }
            "p256" | "p384" => {
                std::fs::write(&pem, jwk_pem(&jwk)).unwrap();
                let der = env.path(&format!("{d}.sig.der"));
                std::fs::write(&der, ecdsa_der(&std::fs::read(&sig).unwrap())).unwrap();
                let dgst = if d == "p256" { "-sha256" } else { "-sha384" };
                openssl(&[
                    "dgst",
                    dgst,
                    "-verify",
                    pem_s,
                    "-signature",
                    der.to_str().unwrap(),
                    msg_s,
                ])
            }
            _ => {
                // RSA: the public file's modulus must be the JWK's n, then openssl
                // verifies with that file.
                let file = env.key_dir(d).join("v000002.pub.pem");
                let (ok, modulus) = openssl(&["rsa", "-pubin", "-noout", "-modulus", "-in", file.to_str().unwrap()]);
                assert!(ok, "{d}: {modulus}");
                let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
                let n_hex: String = n.iter().map(|b| format!("{b:02X}")).collect();
                assert!(modulus.contains(&n_hex), "{d}: jwks n is not the public file's modulus");
                openssl(&[
                    "dgst",
                    "-sha256",
                    "-verify",
                    file.to_str().unwrap(),
                    "-signature",
                    sig_s,
                    msg_s,
                ])
            }
        };
        assert!(
            ok && (said.contains("Verified OK") || said.contains("Signature Verified Successfully")),
            "{d}: openssl: {said}"
        );
        // A different message does not verify: the check is real.
        std::fs::write(env.path("other"), b"pay 100 to mallory").unwrap();
        if d == "ed" {
            let (ok, _) = openssl(&[
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                pem_s,
                "-rawin",
                "-in",
                env.path("other").to_str().unwrap(),
                "-sigfile",
                sig_s,
            ]);
            assert!(!ok, "{d}: a signature verified over another message");
        }
    }
    // HMAC through the token: the consumer API MACs there (the same MAC twice).
    hsm.with(env.rotate("mac")).status(0);
    let mac = |out: &str| {
        let path = env.path(out);
        let o = hsm
            .command(example("sign_message"))
            .arg(env.path("keys"))
            .arg("mac")
            .arg(&message)
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "mac: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(path).unwrap()
    };
    let (a, b) = (mac("mac1"), mac("mac2"));
    assert_eq!(a.len(), 32);
    assert_eq!(a, b);
}

#[test]
fn the_private_key_cannot_be_read_out_of_the_token() {
    let Some((env, hsm)) = setup("pkcs11::cannot_be_read_out", ALL) else {
        return;
    };
    for d in ["ed", "p384", "rsa", "mac", "aes"] {
        hsm.with(env.rotate(d)).status(0);
        let label = format!("keyrotate/{d}/v000001");
        // Asked through cryptoki (the token_audit example): the token marks the key
        // sensitive, never extractable and private, and refuses its value
        // (CKA_VALUE, or an RSA key's CKA_PRIVATE_EXPONENT).
        let out = hsm
            .command(example("token_audit"))
            .arg(env.path("keys"))
            .arg(d)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{d}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!(
                "{label} sensitive=true extractable=false never_extractable=true private=true value=refused"
            )),
            "{d}: {text}"
        );
        let desc = hsm.describe(&label);
        assert!(
            desc.contains("never extractable") && desc.contains("sensitive"),
            "{d}:\n{desc}"
        );
    }
    // And through opensc's pkcs11-tool, which reads a secret key's CKA_VALUE: refused.
    let out = hsm.tool(&["--read-object", "--type", "secrkey", "--label", "keyrotate/mac/v000001"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("CKR_ATTRIBUTE_SENSITIVE"),
        "{said}"
    );
}

#[test]
fn retention_destroys_token_objects() {
    let Some((env, hsm)) = setup("pkcs11::retention", ALL) else {
        return;
    };
    for _ in 0..4 {
        hsm.with(env.rotate("ed")).arg("--force").status(0);
        hsm.with(env.rotate("mac")).arg("--force").status(0);
    }
    // retain = 1: v4 active, v3 retired, v1 and v2 destroyed (object and file). The
    // retired signature key's private half went at its retirement (its public half
    // is in keyring.json); the retired HMAC key keeps its object.
    assert_eq!(
        hsm.labels(),
        ["keyrotate/ed/v000004", "keyrotate/mac/v000003", "keyrotate/mac/v000004"]
    );
    assert_eq!(files(&env, "ed"), ["jwks.json", "keyring.json", "v000004.pub.pem"]);
    assert_eq!(files(&env, "mac"), ["keyring.json", "v000003.ref", "v000004.ref"]);
    let states: Vec<String> = env.manifest("ed")["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["destroyed", "destroyed", "retired", "active"]);
    assert_eq!(env.jwks("ed")["keys"].as_array().unwrap().len(), 2);
}

#[test]
fn an_object_nobody_can_explain_is_evidence_and_is_kept() {
    let Some((env, hsm)) = setup("pkcs11::unexplained_object", ALL) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    // An object under the domain's prefix that no manifest lists and no run staged
    // (e.g. keyring.json restored from an older backup).
    let out = hsm.tool(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "keyrotate/ed/v000007",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = hsm.labels();
    let out = hsm.with(env.rotate("ed")).arg("--force").status(4);
    assert!(out.stdout.contains("keyrotate/ed/v000007"), "{}", out.stdout);
    assert_eq!(hsm.labels(), before, "an unexplained object was destroyed");
    assert_eq!(env.manifest("ed")["primary"], 1);
    // Another domain's objects are not this domain's business.
    hsm.with(env.rotate("p256")).status(0);
}

fn ledger_and_audit_bytes(env: &Env) -> Vec<u8> {
    let mut all = Vec::new();
    for f in ["state/ledger.sqlite3", "state/ledger.sqlite3-wal", "state/audit.jsonl"] {
        all.extend(std::fs::read(env.path(f)).unwrap_or_default());
    }
    all
}

#[test]
fn a_wrong_pin_is_one_line_exit_3_at_run_time_and_2_from_check() {
    let Some((env, hsm)) = setup("pkcs11::wrong_pin", ALL) else {
        return;
    };
    // The PIN is read and used, never shown, even at the most verbose log level.
    let ok = hsm
        .with(env.rotate("ed"))
        .args(["-vv", "--log-format", "json"])
        .status(0);
    let before = env.snapshot();
    softhsm::write_pin(&env, "not-the-pin-4d2");
    let verbose = hsm.with(env.rotate("ed")).args(["--force", "-vv"]).status(3);
    let out = hsm
        .with(env.rotate("ed"))
        .args(["--force", "--run-id", "WRONGPIN"])
        .status(3);
    assert!(out.stdout.contains("PIN"), "{}", out.stdout);
    assert!(out.stdout.contains("pin_file"), "names the config key: {}", out.stdout);
    assert_eq!(out.stdout.trim().lines().count(), 1, "{}", out.stdout);
    let row = env
        .rows()
        .into_iter()
        .find(|r| r["run_id"] == "WRONGPIN")
        .expect("a ledger row");
    assert_eq!(row["exit_code"], 3);
    let keys = |s: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>| {
        s.into_iter()
            .filter(|(p, _)| p.starts_with(env.path("keys")) && !p.ends_with(".lock"))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(before), keys(env.snapshot()), "keys were touched");
    // The dry run stops where the real run would, with the same reason.
    let dry = hsm.with(env.rotate("ed")).args(["--force", "--dry-run"]).status(3);
    assert!(dry.stdout.contains("CKR_PIN_INCORRECT"), "{}", dry.stdout);
    let out = hsm.with(env.cmd()).arg("check").status(2);
    assert!(
        out.stdout.contains("domains.ed.custody") && out.stdout.contains("PIN"),
        "{}",
        out.stdout
    );
    // Neither PIN ever shows.
    for text in [
        out.stdout.as_bytes(),
        out.stderr.as_bytes(),
        ok.stdout.as_bytes(),
        ok.stderr.as_bytes(),
        verbose.stdout.as_bytes(),
        verbose.stderr.as_bytes(),
        &ledger_and_audit_bytes(&env),
        &std::fs::read(env.key_dir("ed").join("keyring.json")).unwrap(),
    ] {
        let text = String::from_utf8_lossy(text);
        assert!(!text.contains(PIN) && !text.contains("not-the-pin-4d2"), "a PIN leaked");
    }
}

#[test]
fn a_missing_module_is_exit_3_at_run_time_and_2_from_check() {
    let Some(module) = softhsm::module("pkcs11::missing_module") else {
        return;
    };
    let env =
        Env::with_config(&softhsm::config(&module, ALL).replace(module.to_str().unwrap(), "/nonexistent/libpkcs11.so"));
    let Some(hsm) = Hsm::new(&env, "pkcs11::missing_module", "") else {
        return;
    };
    let out = hsm.with(env.rotate("ed")).args(["--run-id", "NOMODULE"]).status(3);
    assert!(
        out.stdout.contains("pkcs11.module /nonexistent/libpkcs11.so"),
        "{}",
        out.stdout
    );
    assert_eq!(out.stdout.trim().lines().count(), 1, "{}", out.stdout);
    assert_eq!(
        env.rows().into_iter().find(|r| r["run_id"] == "NOMODULE").unwrap()["exit_code"],
        3
    );
    assert!(!env.key_dir("ed").join("keyring.json").exists());
    let out = hsm.with(env.cmd()).arg("check").status(2);
    assert!(
        out.stdout.contains("domains.ed.custody: pkcs11.module"),
        "{}",
        out.stdout
    );
    // The file-custody domain still rotates: the token is the pkcs11 domains' business.
    hsm.with(env.rotate("plain")).status(0);
}

#[test]
fn config_errors_name_the_key() {
    let Some(module) = softhsm::module("pkcs11::config_errors") else {
        return;
    };
    let env = Env::with_config(&softhsm::config(&module, ALL));
    // A PIN file others can read.
    softhsm::write_pin(&env, PIN);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.path("pin"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.rotate("ed").status(2);
    assert!(
        out.stdout.contains("pkcs11.pin_file") && out.stdout.contains("0644"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains(PIN));
    // A symlink to it.
    std::fs::set_permissions(env.path("pin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(env.path("pin"), env.path("real-pin")).unwrap();
    std::os::unix::fs::symlink(env.path("real-pin"), env.path("pin")).unwrap();
    let out = env.rotate("ed").status(2);
    assert!(
        out.stdout.contains("pkcs11.pin_file") && out.stdout.contains("symlink"),
        "{}",
        out.stdout
    );
    // A file-custody domain does not depend on the PIN file.
    env.rotate("plain").status(0);
    // custody = "pkcs11" without a [pkcs11] table; an unknown custody.
    let no_table = crate::common::DEFAULT_CONFIG.replace(
        "[domains.sig]\nalgorithm = \"ed25519\"",
        "[domains.sig]\nalgorithm = \"ed25519\"\ncustody = \"pkcs11\"",
    );
    let env = Env::with_config(&no_table);
    let out = env.rotate("sig").status(2);
    assert!(
        out.stdout.contains("domains.sig.custody") && out.stdout.contains("[pkcs11]"),
        "{}",
        out.stdout
    );
    std::fs::write(
        env.config_path(),
        no_table.replace("custody = \"pkcs11\"", "custody = \"vault\""),
    )
    .unwrap();
    let out = env.rotate("sig").status(2);
    assert!(out.stdout.contains("domains.sig.custody"), "{}", out.stdout);
    // Both PIN sources, or neither.
    let env = Env::with_config(
        &softhsm::config(&module, ALL).replace("pin_file = \"pin\"", "pin_file = \"pin\"\npin_env = \"X\""),
    );
    let out = env.rotate("ed").status(2);
    assert!(
        out.stdout.contains("pkcs11") && out.stdout.contains("not both"),
        "{}",
        out.stdout
    );
}

#[test]
fn the_pin_may_come_from_an_environment_variable() {
    let Some(module) = softhsm::module("pkcs11::pin_env") else {
        return;
    };
    let env = Env::with_config(
        &softhsm::config(&module, ALL).replace("pin_file = \"pin\"", "pin_env = \"KR_TEST_TOKEN_PIN\""),
    );
    let Some(hsm) = Hsm::new(&env, "pkcs11::pin_env", "") else {
        return;
    };
    let out = hsm.with(env.rotate("ed")).status(3);
    assert!(
        out.stdout.contains("pkcs11.pin_env") && out.stdout.contains("KR_TEST_TOKEN_PIN"),
        "{}",
        out.stdout
    );
    hsm.with(env.rotate("ed")).env("KR_TEST_TOKEN_PIN", PIN).status(0);
}

#[test]
fn check_names_each_domain_whose_algorithm_the_token_lacks() {
    let Some(module) = softhsm::module("pkcs11::check_mechanisms") else {
        return;
    };
    let env = Env::with_config(&softhsm::config(&module, ALL));
    // SoftHSM2 can hide mechanisms from a slot: a token without EdDSA nor HMAC.
    let Some(hsm) = Hsm::new(
        &env,
        "pkcs11::check_mechanisms",
        // SoftHSM 2.6 reads "-A,B,C" as "all but B and C" and takes A as a
        // name (its leading "-" kept), unknown and ignored: A is a placeholder.
        "slots.mechanisms = -CKM_PLACEHOLDER,CKM_EC_EDWARDS_KEY_PAIR_GEN,CKM_EDDSA,CKM_SHA256_HMAC",
    ) else {
        return;
    };
    let out = hsm.with(env.cmd()).arg("check").status(2);
    assert!(
        out.stdout.contains("domains.ed.algorithm") && out.stdout.contains("CKM_EDDSA"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("domains.mac.algorithm") && out.stdout.contains("CKM_SHA256_HMAC"),
        "{}",
        out.stdout
    );
    for fine in [
        "domains.p256.algorithm",
        "domains.rsa.algorithm",
        "domains.aes.algorithm",
        "domains.plain",
    ] {
        assert!(
            !out.stdout.contains(&format!("{fine}:")) || out.stdout.contains(&format!("{fine}: this host")),
            "{fine}: {}",
            out.stdout
        );
    }
    // With every mechanism back, check passes.
    Hsm::adopt(&env, &hsm.module, "");
    hsm.with(env.cmd()).arg("check").status(0);
}

#[test]
fn a_dry_run_plans_the_token_object_and_changes_nothing() {
    let Some((env, hsm)) = setup("pkcs11::dry_run", ALL) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let labels = hsm.labels();
    let before = env.snapshot();
    let out = hsm.with(env.rotate("ed")).args(["--force", "--dry-run"]).status(0);
    assert!(
        out.stdout.contains("keyrotate/ed/v000002") && out.stdout.contains("v000002.pub.pem"),
        "{}",
        out.stdout
    );
    assert_eq!(hsm.labels(), labels);
    let after = env.snapshot();
    for (p, b) in &before {
        if p.starts_with(env.path("keys")) {
            assert_eq!(after.get(p), Some(b), "{} changed", p.display());
        }
    }
}

#[test]
fn a_domain_moves_between_file_and_token_custody_without_losing_a_version() {
    let Some(module) = softhsm::module("pkcs11::custody_switch") else {
        return;
    };
    let file_config = softhsm::config(&module, "[domains.ed]\nalgorithm = \"ed25519\"\n");
    let token_config = softhsm::config(&module, "[domains.ed]\nalgorithm = \"ed25519\"\ncustody = \"pkcs11\"\n");
    let env = Env::with_config(&file_config);
    let Some(hsm) = Hsm::new(&env, "pkcs11::custody_switch", "") else {
        return;
    };
    let sign = || {
        let out = hsm
            .command(example("sign_with_active"))
            .arg(env.path("keys"))
            .arg("ed")
            .arg("hello")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    hsm.with(env.rotate("ed")).status(0);
    assert!(env.key_dir("ed").join("current.pem").exists());
    // file -> pkcs11: v2 in the token; v1 retired (its private file gone at
    // retirement, its public half in keyring.json) and still published.
    std::fs::write(env.config_path(), &token_config).unwrap();
    hsm.with(env.rotate("ed")).status(0);
    assert_eq!(files(&env, "ed"), ["jwks.json", "keyring.json", "v000002.pub.pem"]);
    assert_eq!(hsm.labels(), ["keyrotate/ed/v000002"]);
    assert_eq!(env.jwks("ed")["keys"].as_array().unwrap().len(), 2);
    assert!(sign().contains("v000002"));
    // pkcs11 -> file: v3 a file; the token's v2, retired, loses its object there
    // (through the token the manifest names) and stays published from keyring.json.
    std::fs::write(env.config_path(), &file_config).unwrap();
    hsm.with(env.rotate("ed")).status(0);
    assert!(sign().contains("v000003"));
    assert_eq!(
        hsm.labels(),
        Vec::<String>::new(),
        "the retired v2 kept its private half"
    );
    assert_eq!(env.jwks("ed")["keys"].as_array().unwrap().len(), 2);
    hsm.with(env.rotate("ed")).status(0);
    assert_eq!(
        files(&env, "ed"),
        ["current.pem", "jwks.json", "keyring.json", "v000004.pem"]
    );
}

#[test]
fn an_application_without_the_pin_file_brings_its_own_pin() {
    let Some((env, hsm)) = setup("pkcs11::reader_pin", ALL) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    // The application cannot read the rotating user's PIN file (here: it is gone).
    std::fs::remove_file(env.path("pin")).unwrap();
    let sign = |pin: Option<&str>| {
        let mut c = hsm.command(example("sign_with_active"));
        c.arg(env.path("keys"))
            .arg("ed")
            .arg("hello")
            .env_remove("KEYROTATE_PKCS11_PIN");
        if let Some(p) = pin {
            c.env("KEYROTATE_PKCS11_PIN", p);
        }
        c.output().unwrap()
    };
    let out = sign(None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pkcs11.pin_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sign(Some(PIN));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A wrong one is refused by the token, and the message never holds it.
    let out = sign(Some("wrong-pin-93"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("CKR_PIN_INCORRECT") && !said.contains("wrong-pin-93"),
        "{said}"
    );
}

#[test]
fn a_retired_object_deleted_from_the_token_is_written_off_only_by_a_review() {
    let Some((env, hsm)) = setup("pkcs11::lost_object", ALL) else {
        return;
    };
    hsm.with(env.rotate("mac")).status(0);
    hsm.with(env.rotate("mac")).arg("--force").status(0);
    // Someone deletes the retired v1 (a secret key keeps its object when retired) (no backup of the token).
    let out = hsm.tool(&[
        "--delete-object",
        "--type",
        "secrkey",
        "--label",
        "keyrotate/mac/v000001",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = hsm
        .with(env.rotate("mac"))
        .args(["--force", "--run-id", "FOUND"])
        .status(4);
    assert!(out.stdout.contains("keyrotate/mac/v000001"), "{}", out.stdout);
    assert_eq!(
        env.manifest("mac")["versions"][0]["state"],
        "retired",
        "nothing written off without a review"
    );
    let out = hsm
        .with(env.resolve("mac", "FOUND", "v1 deleted from the token by mistake"))
        .status(0);
    assert!(out.stdout.contains("v1 recorded as destroyed"), "{}", out.stdout);
    assert_eq!(env.manifest("mac")["versions"][0]["state"], "destroyed");
    hsm.with(env.rotate("mac")).arg("--force").status(0);
    assert_eq!(hsm.labels(), ["keyrotate/mac/v000002", "keyrotate/mac/v000003"]);
}

#[test]
fn revoking_a_token_key_destroys_its_object_and_activates_a_fresh_one_in_the_token() {
    let Some((env, hsm)) = setup("pkcs11::revoke", ALL) else {
        return;
    };
    hsm.with(env.rotate("mac")).status(0);
    hsm.with(env.rotate("mac")).arg("--force").status(0);
    hsm.with(env.rotate("ed")).status(0);
    let revoke = |domain: &str, version: &str| {
        hsm.with(env.cmd()).args([
            "revoke",
            "--domain",
            domain,
            "--version",
            version,
            "--reason",
            "token PIN seen in a screen share",
            "--deadline",
            "1m",
        ])
    };
    // The active signature key: a fresh one is generated in the token and activated
    // in the same commit; the compromised object is gone, and so is its public key.
    revoke("ed", "1").status(0);
    let m = env.manifest("ed");
    assert_eq!(m["versions"][0]["state"], "compromised");
    assert_eq!(m["versions"][1]["state"], "active");
    assert_eq!(m["versions"][1]["object"], "keyrotate/ed/v000002");
    let kids: Vec<String> = env.jwks("ed")["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert!(kids.len() == 1 && kids[0].starts_with("v000002"), "{kids:?}");
    // A retired secret key (it kept its object): only destroyed.
    revoke("mac", "1").status(0);
    assert_eq!(env.manifest("mac")["versions"][0]["state"], "compromised");
    assert_eq!(env.manifest("mac")["primary"], 2);
    assert_eq!(
        hsm.labels(),
        ["keyrotate/ed/v000002", "keyrotate/mac/v000002"],
        "a compromised key is still in the token"
    );
    // The fresh key signs through the token.
    let out = hsm
        .command(example("sign_with_active"))
        .arg(env.path("keys"))
        .arg("ed")
        .arg("after the revocation")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn token_custody_is_refused_for_a_shared_store_domain() {
    let Some(module) = softhsm::module("pkcs11::shared_store") else {
        return;
    };
    let config = softhsm::config(
        &module,
        "[domains.s]\nalgorithm = \"ed25519\"\nstore = \"shared\"\nkek = \"file:kek\"\ncustody = \"pkcs11\"\n",
    )
    .replace(
        "dir = \"state\"",
        "dir = \"state\"\nledger = \"postgres://keyrotate@127.0.0.1/kr\"",
    );
    let env = Env::with_config(&config);
    softhsm::write_pin(&env, PIN);
    std::fs::write(env.path("kek"), [7u8; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.path("kek"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = env.cmd().arg("check").status(2);
    assert!(
        out.stdout.contains("domains.s.custody") && out.stdout.contains("store = \"shared\""),
        "{}",
        out.stdout
    );
}
