//! The shared store's KEK kept in a PKCS#11 token (`kek = "pkcs11:object=<label>"`,
//! DESIGN 9 and 10), through the real binary: three simulated hosts on one PostgreSQL
//! database, each with its own SoftHSM2 token folder copied from one token (so each
//! holds the same AES key, as an HSM cluster or a wrapped import gives real hosts).
//!
//! Needs PostgreSQL (see `common::pg`) and SoftHSM2 with opensc's `pkcs11-tool`; says
//! SKIPPED without either.

use std::path::Path;
use std::process::Command;

use crate::common::pg::{server, Database};
use crate::common::softhsm::{self, write_pin, Hsm, PIN, TOKEN};
use crate::common::Env;
use crate::shared_store::{base64_decode, copy_of, epoch, hex_windows, sync};

/// The label of the KEK object in every host's token.
const LABEL: &str = "kr-shared-kek";

/// The module, or `None` after printing SKIPPED (no PostgreSQL or no SoftHSM2).
fn needs(test: &str) -> Option<std::path::PathBuf> {
    if !server() {
        println!("SKIPPED {test}: PostgreSQL is not installed");
        return None;
    }
    softhsm::module(test)
}

/// One simulated host whose shared domains (`sess`: ed25519, prepublish, every pool
/// required; `mac`: hmac-sha256) are sealed under the token KEK `LABEL`.
fn host(db: &Database, module: &Path, name: &str, pool: &str) -> Env {
    Env::with_config(&format!(
        r#"
[state]
dir = "state"
ledger = "{url}"
[host]
name = "{name}"
pool = "{pool}"
[defaults]
designated_pool = "pool-a"
backend = "keystore"
keystore = "keys"
store = "shared"
kek = "pkcs11:object={LABEL}"
min_interval = "0s"
retain = 1
[pkcs11]
module = "{module}"
token = "{TOKEN}"
pin_file = "pin"
[domains.sess]
algorithm = "ed25519"
activation = "prepublish"
require_pools = ["pool-a", "pool-b", "pool-c"]
sync_ttl = "1h"
[domains.mac]
algorithm = "hmac-sha256"
"#,
        url = db.url(),
        module = module.display(),
    ))
}

/// `pkcs11-tool --keygen` of an AES key labelled `label` in `hsm`'s token, the way the
/// README tells an operator to make the KEK; `extra` adds flags.
fn keygen(hsm: &Hsm, label: &str, key_type: &str, extra: &[&str]) {
    let mut args = vec!["--keygen", "--key-type", key_type, "--label", label];
    args.extend(extra);
    let out = hsm.tool(&args);
    assert!(
        out.status.success(),
        "pkcs11-tool --keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh token in `env`'s folder (replacing any), holding an AES KEK made with
/// `extra` flags (none: no KEK object at all).
fn fresh_token(env: &Env, test: &str, kek: Option<(&str, &[&str])>) -> Hsm {
    let _ = std::fs::remove_dir_all(env.path("tokens"));
    let hsm = Hsm::new(env, test, "").expect("SoftHSM2 was found a moment ago");
    if let Some((key_type, extra)) = kek {
        keygen(&hsm, LABEL, key_type, extra);
    }
    hsm
}

/// `from`'s token folder copied to `to` (replacing any), and `to`'s PIN file.
fn copy_token(from: &Env, to: &Env, module: &Path) -> Hsm {
    let _ = std::fs::remove_dir_all(to.path("tokens"));
    let st = Command::new("cp")
        .arg("-a")
        .arg(from.path("tokens"))
        .arg(to.path("tokens"))
        .status()
        .unwrap();
    assert!(st.success());
    write_pin(to, PIN);
    Hsm::adopt(to, module, "")
}

/// Host-a and host-b sharing one token KEK (copied token), `mac` rotated twice on
/// host-a and synced by host-b after the first: host-b's copy is one epoch behind.
fn two_hosts_b_one_epoch_behind(test: &str, module: &Path) -> (Database, Env, Env, Hsm, Hsm) {
    let db = Database::new();
    let a = host(&db, module, "host-a", "pool-a");
    let b = host(&db, module, "host-b", "pool-b");
    let hsm_a = fresh_token(&a, test, Some(("AES:32", &["--sensitive"])));
    let hsm_b = copy_token(&a, &b, module);
    hsm_a.with(a.rotate("mac")).status(0);
    hsm_b.with(sync(&b, Some("mac"))).status(0);
    hsm_a.with(a.rotate("mac")).status(0);
    (db, a, b, hsm_a, hsm_b)
}

/// Every row of the shared store's and the ledger's tables, as text.
fn database_text(db: &Database) -> String {
    db.sql(
        "SELECT string_agg(t, E'\\n') FROM (SELECT v::text AS t FROM shared_key_versions v \
         UNION ALL SELECT k::text FROM shared_keyrings k UNION ALL SELECT r::text FROM rotations r \
         UNION ALL SELECT e::text FROM rotation_events e) x",
    )
}

/// The secret bytes of each key file of a host's copy of `domain` (PEM private keys and
/// symmetric `.key` files).
fn secrets_of(env: &Env, domain: &str) -> Vec<(String, Vec<u8>)> {
    copy_of(env, domain)
        .into_iter()
        .filter(|(n, _)| n.starts_with('v') && (n.ends_with(".pem") || n.ends_with(".key")))
        .map(|(n, bytes)| {
            let text = String::from_utf8(bytes).unwrap();
            let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            let secret = base64_decode(b64.trim());
            // The PKCS#8 DER ends with the private key; a symmetric key is all secret.
            (n, secret[secret.len().saturating_sub(32)..].to_vec())
        })
        .collect()
}

#[test]
fn three_hosts_share_one_token_kek_and_the_database_holds_no_plaintext_key() {
    let test = "three_hosts_share_one_token_kek_and_the_database_holds_no_plaintext_key";
    let Some(module) = needs(test) else { return };
    let db = Database::new();
    let a = host(&db, &module, "host-a", "pool-a");
    let b = host(&db, &module, "host-b", "pool-b");
    let c = host(&db, &module, "host-c", "pool-c");
    let hsm_a = fresh_token(&a, test, Some(("AES:32", &["--sensitive"])));
    let hsm_b = copy_token(&a, &b, &module);
    let hsm_c = copy_token(&a, &c, &module);

    // Every host's check reaches its token and finds a fit KEK.
    for (h, hsm) in [(&a, &hsm_a), (&b, &hsm_b), (&c, &hsm_c)] {
        hsm.with(h.cmd().arg("check")).status(0);
    }
    let mut output = String::new();
    for round in 0..3 {
        for domain in ["sess", "mac"] {
            let out = hsm_a.with(a.rotate(domain)).status(0);
            output.push_str(&out.stdout);
            output.push_str(&out.stderr);
        }
        for (h, hsm) in [(&b, &hsm_b), (&c, &hsm_c)] {
            let out = hsm.with(sync(h, None)).status(0);
            assert!(out.stdout.contains("SYNCED"), "round {round}: {}", out.stdout);
            output.push_str(&out.stdout);
            output.push_str(&out.stderr);
        }
    }
    assert_eq!(epoch(&db, "sess"), "3");
    // Identical copies everywhere, and each verifies (check opens every key file).
    for domain in ["sess", "mac"] {
        let copy = copy_of(&a, domain);
        assert!(copy.iter().any(|(n, _)| n.starts_with('v')), "{copy:?}");
        assert_eq!(copy, copy_of(&b, domain), "{domain}");
        assert_eq!(copy, copy_of(&c, domain), "{domain}");
    }
    for (h, hsm) in [(&a, &hsm_a), (&b, &hsm_b), (&c, &hsm_c)] {
        hsm.with(h.cmd().arg("check")).status(0);
    }
    // Every sealed key carries the token format; no plaintext key is in the database,
    // the audit trail or anything printed.
    assert_eq!(
        db.sql(
            "SELECT count(*) FROM shared_key_versions WHERE sealed IS NOT NULL \
             AND substring(sealed from 1 for 6) <> 'krp11:'::bytea"
        ),
        "0"
    );
    let dump = database_text(&db);
    let audit = std::fs::read_to_string(a.path("state/audit.jsonl")).unwrap()
        + &std::fs::read_to_string(b.path("state/audit.jsonl")).unwrap();
    let mut secrets = 0;
    for domain in ["sess", "mac"] {
        for (name, secret) in secrets_of(&b, domain) {
            for w in hex_windows(&secret) {
                for hay in [&dump, &audit, &output] {
                    assert!(!hay.contains(&w), "a fragment of {name} leaked");
                }
            }
            secrets += 1;
        }
    }
    assert!(secrets >= 3, "the test found only {secrets} key files");
    assert!(!dump.contains(PIN) && !audit.contains(PIN) && !output.contains(PIN));

    // The KEK object cannot be read out of the token: CKA_VALUE is refused.
    let read = hsm_a.tool(&["--read-object", "--type", "secrkey", "--label", LABEL]);
    assert!(
        !read.status.success() || read.stdout.is_empty(),
        "the KEK's value was read: {}",
        String::from_utf8_lossy(&read.stdout)
    );
    let described = hsm_a.describe(LABEL);
    assert!(
        described.contains("sensitive") && described.contains("never extractable"),
        "{described}"
    );
}

#[test]
fn a_host_whose_token_lacks_the_kek_or_holds_another_key_fails_its_sync_and_keeps_its_copy() {
    let test = "a_host_whose_token_lacks_the_kek_or_holds_another_key_fails_its_sync_and_keeps_its_copy";
    let Some(module) = needs(test) else { return };
    let (_db, a, b, _hsm_a, _hsm_b) = two_hosts_b_one_epoch_behind(test, &module);
    let kept = copy_of(&b, "mac");

    // Another AES key under the same label (a token made on its own, not copied).
    let other = fresh_token(&b, test, Some(("AES:32", &["--sensitive"])));
    let out = other.with(sync(&b, Some("mac"))).status(3);
    assert!(out.stdout.contains("does not open"), "{}", out.stdout);
    assert!(out.stdout.contains(LABEL), "{}", out.stdout);
    assert_eq!(copy_of(&b, "mac"), kept, "the local copy changed");

    // No KEK object at all.
    let empty = fresh_token(&b, test, None);
    let out = empty.with(sync(&b, Some("mac"))).status(3);
    assert!(
        out.stdout.contains("no secret key labelled") && out.stdout.contains(LABEL),
        "{}",
        out.stdout
    );
    assert_eq!(copy_of(&b, "mac"), kept, "the local copy changed");

    // The shared token back: it catches up to the same copy as host-a.
    let hsm_b = copy_token(&a, &b, &module);
    let out = hsm_b.with(sync(&b, Some("mac"))).status(0);
    assert!(out.stdout.contains("SYNCED mac: epoch 2"), "{}", out.stdout);
    assert_eq!(copy_of(&a, "mac"), copy_of(&b, "mac"));
}

#[test]
fn check_names_each_kek_problem_and_a_rotation_without_the_kek_aborts() {
    let test = "check_names_each_kek_problem_and_a_rotation_without_the_kek_aborts";
    let Some(module) = needs(test) else { return };
    let db = Database::new();
    let a = host(&db, &module, "host-a", "pool-a");

    // A key anyone could read out: not sensitive, extractable, and AES-128.
    let hsm = fresh_token(&a, test, Some(("AES:16", &["--extractable"])));
    let out = hsm.with(a.cmd().arg("check")).status(2);
    for needle in ["not an AES-256 key", "not CKA_SENSITIVE", "is CKA_EXTRACTABLE"] {
        assert!(out.stdout.contains(needle), "{needle}: {}", out.stdout);
    }
    assert!(out.stdout.contains(".kek"), "{}", out.stdout);
    // The run refuses to seal under it: ABORTED, a row, nothing committed.
    hsm.with(a.rotate("mac").args(["--run-id", "UNFIT-1"])).status(3);
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'UNFIT-1'"),
        "aborted 3"
    );

    // No KEK object.
    let hsm = fresh_token(&a, test, None);
    let out = hsm.with(a.cmd().arg("check")).status(2);
    assert!(out.stdout.contains("no secret key labelled"), "{}", out.stdout);
    hsm.with(a.rotate("mac")).status(3);

    // A wrong PIN: named, and the PIN never shown.
    let hsm = fresh_token(&a, test, Some(("AES:32", &["--sensitive"])));
    hsm.with(a.cmd().arg("check")).status(0);
    write_pin(&a, "wrong-pin-4411");
    let out = hsm.with(a.cmd().arg("check")).status(2);
    assert!(out.stdout.contains("CKR_PIN_INCORRECT"), "{}", out.stdout);
    let out = hsm.with(a.rotate("mac").args(["--run-id", "PIN-1"])).status(3);
    assert!(!out.stdout.contains("wrong-pin-4411") && !out.stderr.contains("wrong-pin-4411"));
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'PIN-1'"),
        "aborted 3"
    );
    let out = hsm.with(sync(&a, Some("mac"))).status(3);
    assert!(out.stdout.contains("CKR_PIN_INCORRECT"), "{}", out.stdout);
    write_pin(&a, PIN);

    // A missing module: check 2, rotation 3.
    let text = std::fs::read_to_string(a.config_path()).unwrap();
    std::fs::write(
        a.config_path(),
        text.replace(
            &module.display().to_string(),
            &a.path("no-such-module.so").display().to_string(),
        ),
    )
    .unwrap();
    let out = hsm.with(a.cmd().arg("check")).status(2);
    assert!(out.stdout.contains("pkcs11.module"), "{}", out.stdout);
    hsm.with(a.rotate("mac")).status(3);
    std::fs::write(a.config_path(), &text).unwrap();
    assert_eq!(epoch(&db, "mac"), "0", "nothing was committed");

    // Config: the token KEK needs the [pkcs11] table; a bad label is refused.
    let start = text.find("[pkcs11]").unwrap();
    let end = text.find("[domains.sess]").unwrap();
    for (edit, needle) in [
        (
            format!("{}{}", &text[..start], &text[end..]),
            "a PKCS#11 KEK needs a [pkcs11] table",
        ),
        (
            text.replace(&format!("pkcs11:object={LABEL}"), "pkcs11:id=01"),
            "expected \"pkcs11:object=<label>\"",
        ),
        // Token custody of a shared domain points at the token KEK instead.
        (
            text.replace("[domains.mac]\n", "[domains.mac]\ncustody = \"pkcs11\"\n"),
            "instead: kek = \"pkcs11:object=<label>\"",
        ),
    ] {
        let e = Env::with_config(&edit);
        write_pin(&e, PIN);
        let out = e.cmd().arg("check").status(2);
        assert!(out.stdout.contains(needle), "{needle}: {}", out.stdout);
    }

    // Fixed: the rotation goes through.
    hsm.with(a.rotate("mac")).status(0);
    assert_eq!(epoch(&db, "mac"), "1");
}

/// A sync whose token never answers (another process holds the token's files, and
/// SoftHSM2 waits for them without a timeout) ends a second after its deadline with 8,
/// in text and in JSON, and leaves the local copy as it was; once the token answers,
/// the same sync succeeds.
#[test]
fn a_sync_whose_token_hangs_ends_at_its_deadline_and_keeps_the_copy() {
    use std::time::Duration;
    let test = "a_sync_whose_token_hangs_ends_at_its_deadline_and_keeps_the_copy";
    let Some(module) = needs(test) else { return };
    let (_db, a, b, _hsm_a, hsm_b) = two_hosts_b_one_epoch_behind(test, &module);
    let kept = copy_of(&b, "mac");

    for json in [false, true] {
        let held = crate::pkcs11_attacks::TokenHeld::new(&b);
        let mut cmd = hsm_b
            .with(b.cmd())
            .args(["sync", "--domain", "mac", "--deadline", "3s"]);
        if json {
            cmd = cmd.args(["--output", "json"]);
        }
        let mut child = cmd.spawn();
        let (code, took) = crate::common::wait_at_most(&mut child, Duration::from_secs(30));
        drop(held);
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            code.is_some(),
            "sync --deadline 3s still ran after {took:?} on a hung token"
        );
        assert_eq!(code, Some(8), "a hung token is a time-out: {stdout}");
        assert!(took < Duration::from_secs(15), "ended only after {took:?}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON report");
            assert_eq!(v["exit_code"], 8, "{stdout}");
            assert_eq!(v["domains"][0]["outcome"], "TIMED_OUT", "{stdout}");
        } else {
            assert!(stdout.contains("TIMED_OUT mac: deadline"), "{stdout}");
        }
        assert_eq!(copy_of(&b, "mac"), kept, "the local copy changed");
        // The attempt is in the audit trail, as every sync's is.
        let trail = std::fs::read_to_string(b.path("state/audit.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(trail.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "sync.failed", "{last}");
        assert_eq!(last["outcome"], "TIMED_OUT", "{last}");
        assert_eq!(last["domain"], "mac", "{last}");
        assert_eq!(last["exit_code"], 8, "{last}");
    }
    let out = hsm_b.with(sync(&b, Some("mac"))).status(0);
    assert!(out.stdout.contains("SYNCED mac: epoch 2"), "{}", out.stdout);
    assert_eq!(copy_of(&a, "mac"), copy_of(&b, "mac"));
}
