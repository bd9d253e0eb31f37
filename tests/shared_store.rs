//! The shared key store (DESIGN 9, issue 13) through the real binary: three simulated
//! hosts (three configs with their own `[host] name`, pool, state and key folders) on
//! one PostgreSQL database. The designated host rotates; `sync` copies the keyring to
//! every host; a `prepublish` promotion waits until every host holds the pending key;
//! the epoch fences a run that lost its lock; a wrong KEK never touches a local copy;
//! the database never holds a key in the clear.
//!
//! Needs PostgreSQL (see `common::pg`); says SKIPPED where none is installed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common::pg::{server, Database};
use crate::common::{have_openssl, Env};

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

/// The KEK every host shares (32 bytes; tests only).
pub const KEK: [u8; 32] = *b"0123456789abcdef0123456789abcdef";

/// One simulated host: `name` in `pool`, its own folders, the shared database, the
/// domains `sess` (ed25519, prepublish, every pool required) and `mac` (hmac-sha256,
/// immediate), both shared, designated to pool-a.
pub fn host(db: &Database, name: &str, pool: &str) -> Env {
    host_at(&db.url(), name, pool)
}

/// [`host`] connecting with `url` (another role).
pub fn host_at(url: &str, name: &str, pool: &str) -> Env {
    let env = Env::with_config(&format!(
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
kek = "file:kek"
min_interval = "0s"
retain = 1
[domains.sess]
algorithm = "ed25519"
activation = "prepublish"
require_pools = ["pool-a", "pool-b", "pool-c"]
sync_ttl = "1h"
[domains.mac]
algorithm = "hmac-sha256"
"#
    ));
    write_kek(&env, &KEK);
    env
}

// The KEK file and `sync` are the fault tests' helpers (`common::shared`).
pub use crate::common::shared::{sync, write_kek};

/// Every file of a host's copy of `domain`, with its bytes (symlinks as targets).
pub fn copy_of(env: &Env, domain: &str) -> Vec<(String, Vec<u8>)> {
    let dir = env.key_dir(domain);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != ".lock")
        .map(|e| {
            let name = e.file_name().into_string().unwrap();
            let p = e.path();
            let bytes = match std::fs::read_link(&p) {
                Ok(t) => t.into_os_string().into_encoded_bytes(),
                Err(_) => std::fs::read(&p).unwrap(),
            };
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

pub fn epoch(db: &Database, domain: &str) -> String {
    db.sql(&format!(
        "SELECT coalesce((SELECT epoch FROM shared_keyrings WHERE domain = '{domain}'), 0)"
    ))
}

/// `openssl pkey -pubout` of a private key file: it parses, and its public half.
fn openssl_public(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["pkey", "-in"])
        .arg(path)
        .arg("-pubout")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn three_hosts_rotate_sync_and_the_promotion_waits_for_the_lagging_host() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    // Before anything is committed a sync only registers the host (epoch 0).
    for h in [&b, &c] {
        let out = sync(h, Some("sess")).status(0);
        assert!(out.stdout.contains("CURRENT sess"), "{}", out.stdout);
    }
    // Hosts outside the designated pool never rotate.
    b.rotate("sess").status(6);

    // v1 active, v2 pending; the designated host's own copy follows its rotation.
    let out = a.rotate("sess").status(0);
    assert!(out.stdout.contains("epoch 1"), "{}", out.stdout);
    assert_eq!(epoch(&db, "sess"), "1");
    for h in [&b, &c] {
        let out = sync(h, None).status(0);
        assert!(out.stdout.contains("SYNCED sess: epoch 1"), "{}", out.stdout);
        // Idempotent: nothing is written the second time.
        let before = copy_of(h, "sess");
        let again = sync(h, None).status(0);
        assert!(again.stdout.contains("CURRENT sess: epoch 1"), "{}", again.stdout);
        assert_eq!(copy_of(h, "sess"), before);
    }
    // Every host has the same keyring, and the keys are what openssl reads.
    let copy = copy_of(&a, "sess");
    assert_eq!(copy, copy_of(&b, "sess"));
    assert_eq!(copy, copy_of(&c, "sess"));
    assert!(copy.iter().any(|(n, _)| n == "v000002.pem"), "{copy:?}");
    if have_openssl() {
        for v in [1, 2] {
            let public = openssl_public(&c.key_dir("sess").join(format!("v{v:06}.pem")));
            let stored = db.sql(&format!(
                "SELECT public_pem FROM shared_key_versions WHERE domain = 'sess' AND version = {v}"
            ));
            assert_eq!(public.trim(), stored.trim(), "v{v}");
        }
    } else {
        eprintln!("SKIPPED openssl part: openssl is not installed");
    }

    // Every host holds v2 (epoch 1): it is promoted; v3 becomes pending (epoch 2).
    a.rotate("sess").status(0);
    assert_eq!(a.manifest("sess")["primary"], 2);
    sync(&b, None).status(0);
    // host-c still has epoch 1, which lacks v3: the promotion waits, naming it.
    let versions_before = db.sql("SELECT string_agg(version || ' ' || state, ',' ORDER BY version) FROM shared_key_versions WHERE domain = 'sess'");
    let dry = a.rotate("sess").arg("--dry-run").status(3);
    let out = a.rotate("sess").args(["--run-id", "GATED-1"]).status(3);
    assert!(
        out.stdout.contains("host-c") && out.stdout.contains("pool-c") && out.stdout.contains("convergence gate"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("host-b (pool"),
        "host-b is current: {}",
        out.stdout
    );
    assert!(dry.stdout.contains("host-c"), "{}", dry.stdout);
    assert_eq!(epoch(&db, "sess"), "2", "nothing was committed");
    assert_eq!(
        db.sql("SELECT string_agg(version || ' ' || state, ',' ORDER BY version) FROM shared_key_versions WHERE domain = 'sess'"),
        versions_before
    );
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'GATED-1'"),
        "aborted 3"
    );
    // Once it syncs, the promotion goes through.
    sync(&c, None).status(0);
    a.rotate("sess").status(0);
    assert_eq!(a.manifest("sess")["primary"], 3);
    assert_eq!(epoch(&db, "sess"), "3");
    // retain = 1: v1 is destroyed, its sealed key erased, its file gone everywhere.
    assert_eq!(
        db.sql(
            "SELECT state || ' ' || (sealed IS NULL) FROM shared_key_versions WHERE domain = 'sess' AND version = 1"
        ),
        "destroyed true"
    );
    for h in [&b, &c] {
        sync(h, Some("sess")).status(0);
    }
    let copy = copy_of(&a, "sess");
    assert!(!copy.iter().any(|(n, _)| n == "v000001.pem"), "{copy:?}");
    assert_eq!(copy, copy_of(&b, "sess"));
    assert_eq!(copy, copy_of(&c, "sess"));
}

#[test]
fn a_wrong_kek_fails_the_sync_and_keeps_the_local_copy() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    a.rotate("mac").status(0);
    sync(&b, Some("mac")).status(0);
    a.rotate("mac").status(0);
    let before = b.snapshot();
    write_kek(&b, b"ffffffffffffffffffffffffffffffff");
    let before = {
        // The KEK file itself is the one change the test made.
        let mut s = before;
        s.insert("kek".into(), std::fs::read(b.path("kek")).unwrap());
        s
    };
    let out = sync(&b, Some("mac")).status(3);
    assert!(out.stdout.contains("does not open"), "{}", out.stdout);
    assert!(out.stdout.contains("left as it was"), "{}", out.stdout);
    let mut after = b.snapshot();
    // Only the audit trail and the lock file may change.
    after.retain(|p, _| !p.starts_with("state") && !p.ends_with(".lock"));
    let mut expected = before;
    expected.retain(|p, _| !p.starts_with("state") && !p.ends_with(".lock"));
    assert_eq!(after, expected, "the local copy changed");
    // The kept copy still verifies (check reads it) and is one epoch behind.
    b.cmd().args(["check", "--domain", "mac"]).status(0);
    assert_eq!(b.manifest("mac")["versions"].as_array().unwrap().len(), 1);
    assert_eq!(
        db.sql("SELECT epoch FROM shared_sync_acks WHERE domain = 'mac' AND host = 'host-b'"),
        "1"
    );
    let j = sync(&b, Some("mac")).args(["--output", "json"]).status(3).json();
    assert_eq!(j["host"], "host-b");
    assert_eq!(j["exit_code"], 3);
    assert_eq!(j["domains"][0]["outcome"], "ABORTED", "{j}");
    // With the right KEK back, it catches up.
    write_kek(&b, &KEK);
    let j = sync(&b, Some("mac")).args(["--output", "json"]).status(0).json();
    assert_eq!(j["domains"][0]["outcome"], "SYNCED", "{j}");
    assert_eq!(j["domains"][0]["epoch"], 2, "{j}");
    assert!(
        j["domains"][0]["written"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "keyring.json"),
        "{j}"
    );
    assert_eq!(copy_of(&a, "mac"), copy_of(&b, "mac"));
}

#[test]
fn check_refuses_a_bad_kek_file_and_a_shared_store_without_postgres() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    a.cmd().arg("check").status(0);
    let kek = a.path("kek");
    for (what, bytes, mode, needle) in [
        ("short", &KEK[..31], 0o600, "31 bytes"),
        ("group-readable", &KEK[..], 0o640, "mode 0640"),
    ] {
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&kek, bytes).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = a.cmd().arg("check").status(2);
        assert!(
            out.stdout.contains(needle) && out.stdout.contains(".kek"),
            "{what}: {}",
            out.stdout
        );
        // A rotation refuses it too, before anything is written.
        a.rotate("mac").status(3);
    }
    std::fs::remove_file(&kek).unwrap();
    std::os::unix::fs::symlink(a.path("rotate.toml"), &kek).unwrap();
    let out = a.cmd().arg("check").status(2);
    assert!(out.stdout.contains("symlink"), "{}", out.stdout);
    assert_eq!(epoch(&db, "mac"), "0");

    // Config: the shared store needs PostgreSQL and the key store backend; a PKCS#11
    // KEK needs the [pkcs11] table.
    let text = std::fs::read_to_string(a.config_path()).unwrap();
    for (edit, needle) in [
        (
            text.replace(&format!("ledger = \"{}\"", db.url()), ""),
            "needs the PostgreSQL ledger",
        ),
        (
            text.replace("kek = \"file:kek\"", "kek = \"pkcs11:object=kek\""),
            "a PKCS#11 KEK needs a [pkcs11] table",
        ),
        (
            text.replace("kek = \"file:kek\"", "kek = \"kek\""),
            "expected \"file:/path\"",
        ),
        (text.replace("sync_ttl = \"1h\"", "sync_ttl = \"soon\""), "sync_ttl"),
    ] {
        let e = Env::with_config(&edit);
        let out = e.cmd().arg("check").status(2);
        assert!(out.stdout.contains(needle), "{needle}: {}", out.stdout);
        e.rotate("sess").status(2);
    }
}

/// Every fragment of 12 or more bytes of `secret`, hex encoded (as a bytea prints).
pub fn hex_windows(secret: &[u8]) -> Vec<String> {
    secret
        .windows(12.min(secret.len()))
        .map(|w| w.iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

#[test]
fn no_key_material_in_the_database_the_ledger_or_the_audit_trail() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    let mut stderr = String::new();
    for _ in 0..3 {
        stderr.push_str(&a.rotate("sess").status(0).stderr);
        stderr.push_str(&a.rotate("mac").status(0).stderr);
        stderr.push_str(&sync(&b, None).status(0).stderr);
        stderr.push_str(&sync(&c, None).status(0).stderr);
    }
    let dump = {
        let out = Command::new("pg_dump")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                crate::common::pg::ADMIN_USER,
                "-d",
                &db.0,
                "--data-only",
            ])
            .env("PGPASSWORD", crate::common::pg::ADMIN_PASSWORD)
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            _ => db.sql(
                "SELECT string_agg(t::text, E'\\n') FROM (SELECT v::text AS t FROM shared_key_versions v \
                 UNION ALL SELECT k::text FROM shared_keyrings k UNION ALL SELECT r::text FROM rotations r \
                 UNION ALL SELECT e::text FROM rotation_events e UNION ALL SELECT s::text FROM shared_syncs s) x",
            ),
        }
    };
    assert!(
        dump.contains("shared_key_versions") || dump.contains("sealed") || dump.contains("\\x"),
        "{dump}"
    );
    let audit = std::fs::read_to_string(a.path("state/audit.jsonl")).unwrap()
        + &std::fs::read_to_string(b.path("state/audit.jsonl")).unwrap();
    let mut secrets = 0;
    for env in [&a, &b] {
        for domain in ["sess", "mac"] {
            for (name, bytes) in copy_of(env, domain) {
                let secret: Vec<u8> = if name.ends_with(".pem") && name.starts_with('v') {
                    let text = String::from_utf8(bytes.clone()).unwrap();
                    for line in text.lines().filter(|l| !l.starts_with("-----")) {
                        for hay in [&dump, &audit, &stderr] {
                            assert!(!hay.contains(line), "a line of {name}'s PEM leaked");
                        }
                    }
                    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
                    base64_decode(&b64)
                } else if name.ends_with(".key") && name.starts_with('v') {
                    let line = String::from_utf8(bytes.clone()).unwrap();
                    for hay in [&dump, &audit, &stderr] {
                        assert!(!hay.contains(line.trim()), "{name} leaked");
                    }
                    base64_decode(line.trim())
                } else {
                    continue;
                };
                // The PKCS#8 DER ends with the private key; a symmetric key is all secret.
                let tail = &secret[secret.len().saturating_sub(32)..];
                for w in hex_windows(tail) {
                    for hay in [&dump, &audit, &stderr] {
                        assert!(!hay.contains(&w), "a fragment of {name} leaked");
                    }
                }
                secrets += 1;
            }
        }
    }
    assert!(secrets >= 4, "the test found only {secrets} key files");
}

/// Standard base64 (the tests avoid a dependency for it).
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Waits until `log` (a failpoint log) shows `step`, or panics after 20 s.
#[cfg(feature = "failpoints")]
fn wait_for(log: &Path, step: &str) {
    crate::common::wait_for_step(log, step);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_run_that_lost_its_lock_never_commits_over_another_run() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    // A second host of the designated pool.
    let a2 = host(&db, "host-a2", "pool-a");
    a.rotate("mac").status(0);
    assert_eq!(epoch(&db, "mac"), "1");

    // A reads epoch 1, then stalls before its commit; its session is killed (the
    // server releases its advisory lock). A2 takes the lock but is refused while A
    // lives (a live run is never called dead); A wakes, finds its lock gone and stops
    // without committing; then A2 commits epoch 2.
    let log = a.path("steps.log");
    let child = a
        .rotate("mac")
        .args(["--run-id", "LOST-A"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "ledger.confirm=sleep(3000)")
        .spawn();
    wait_for(&log, "ledger.confirm");
    db.terminate_keyrotate_sessions();
    a2.rotate("mac").args(["--run-id", "BUSY-A2"]).status(5);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("lost its lock"), "{stdout}");
    assert_eq!(epoch(&db, "mac"), "1", "the run without its lock committed");
    a2.rotate("mac").args(["--run-id", "WIN-A2"]).status(0);
    assert_eq!(epoch(&db, "mac"), "2");
    assert_eq!(
        db.sql("SELECT count(*) FROM shared_key_versions WHERE created_by_run = 'LOST-A'"),
        "0"
    );
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'LOST-A'"),
        "aborted 3"
    );

    // The fence itself: B reads epoch 2 and stalls inside its commit transaction, just
    // before the conditional epoch update; meanwhile another writer commits epoch 3
    // (as a run whose lock was lost behind a connection pooler would). B's update
    // finds the epoch moved: nothing of B is committed.
    let log = a.path("steps2.log");
    let child = a
        .rotate("mac")
        .args(["--run-id", "FENCED-B"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "shared.epoch=sleep(2000)")
        .spawn();
    wait_for(&log, "shared.epoch");
    db.sql("UPDATE shared_keyrings SET epoch = epoch + 1, committed_run = 'OTHER' WHERE domain = 'mac'");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("epoch fence") && stdout.contains("OTHER"), "{stdout}");
    assert_eq!(epoch(&db, "mac"), "3");
    assert_eq!(
        db.sql("SELECT count(*) FROM shared_key_versions WHERE created_by_run = 'FENCED-B'"),
        "0"
    );
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'FENCED-B'"),
        "aborted 3"
    );
}

#[test]
fn status_shows_each_hosts_acknowledgement_and_a_stale_host_is_never_converged() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    a.rotate("mac").status(0);
    sync(&b, Some("mac")).status(0);
    let s = a
        .cmd()
        .args(["status", "--domain", "mac", "--output", "json"])
        .status(0)
        .json();
    let sync_json = &s["domains"][0]["sync"];
    assert_eq!(sync_json["epoch"], 1, "{s}");
    let hosts = sync_json["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{s}");
    assert_eq!(hosts[1]["host"], "host-b");
    assert_eq!(hosts[1]["pool"], "pool-b");
    assert_eq!(hosts[1]["epoch"], 1);
    assert_eq!(hosts[1]["stale"], false);
    assert!(hosts[1]["synced_at"].as_str().unwrap().ends_with('Z'), "{s}");
    let text = a.cmd().args(["status", "--domain", "mac"]).status(0).stdout;
    assert!(
        text.contains("sync mac: epoch 1") && text.contains("host-b (pool pool-b) epoch 1"),
        "{text}"
    );
    let prom = a.cmd().args(["status", "--output", "prometheus"]).status(0).stdout;
    assert!(
        prom.contains(r#"keyrotate_sync_epoch{domain="mac",host="host-b",pool="pool-b"} 1"#),
        "{prom}"
    );
    crate::observability::promtool_check(&prom);

    // host-b falls behind past sync_ttl (the default 7 days): status exits 3 naming it.
    a.rotate("mac").status(0);
    db.sql("UPDATE shared_keyrings SET committed_at = '2020-01-01T00:00:00.000Z' WHERE domain = 'mac'");
    db.sql("UPDATE shared_sync_acks SET synced_at = '2020-01-01T00:00:00.000Z' WHERE host = 'host-b'");
    let out = a
        .cmd()
        .args(["status", "--domain", "mac", "--output", "json"])
        .status(3);
    let s = out.json();
    let hosts = s["domains"][0]["sync"]["hosts"].as_array().unwrap().clone();
    assert_eq!(hosts[1]["stale"], true, "{s}");
    assert!(
        out.stderr.contains("host-b (pool pool-b, epoch 1, stale)"),
        "{}",
        out.stderr
    );

    // A promotion: host-c's acknowledgement is stale, so pool-c has no converged host
    // (sess requires it): the gate names it stale and does not promote.
    a.rotate("sess").status(0);
    sync(&b, Some("sess")).status(0);
    sync(&c, Some("sess")).status(0);
    db.sql(
        "UPDATE shared_sync_acks SET synced_at = '2020-01-01T00:00:00.000Z' WHERE host = 'host-c' AND domain = 'sess'",
    );
    let out = a.rotate("sess").status(3);
    assert!(
        out.stdout.contains("stale hosts") && out.stdout.contains("host-c") && out.stdout.contains("pool-c"),
        "{}",
        out.stdout
    );
    sync(&c, Some("sess")).status(0);
    a.rotate("sess").status(0);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_rotation_killed_before_or_after_its_commit_is_diagnosed_from_the_shared_keyring() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    a.rotate("mac").status(0);
    // Killed inside the commit transaction: the server rolls it back.
    let out = a
        .rotate("mac")
        .args(["--run-id", "KILLED-BEFORE"])
        .env("KEYROTATE_FAILPOINTS", "shared.insert=kill")
        .status(137);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(epoch(&db, "mac"), "1");
    let out = a.rotate("mac").status(4);
    assert!(
        out.stdout.contains("it did not commit") && out.stdout.contains("nothing to sweep"),
        "{}",
        out.stdout
    );
    a.resolve("mac", "KILLED-BEFORE", "checked: epoch 1 stands").status(0);
    a.rotate("mac").status(0);
    assert_eq!(epoch(&db, "mac"), "2");

    // Killed right after the commit, before its own copy was synced.
    a.rotate("mac")
        .args(["--run-id", "KILLED-AFTER"])
        .env("KEYROTATE_FAILPOINTS", "install.rename=kill")
        .status(137);
    assert_eq!(epoch(&db, "mac"), "3");
    let out = a.rotate("mac").status(4);
    assert!(out.stdout.contains("it did commit"), "{}", out.stdout);
    let resolved = a.resolve("mac", "KILLED-AFTER", "committed epoch 3; syncing").status(0);
    assert!(
        resolved.stdout.contains("keyrotate sync") || resolved.stderr.contains("keyrotate sync"),
        "{}",
        resolved.stdout
    );
    // Every host's sync gives the whole committed keyring.
    for h in [&a, &b] {
        sync(h, Some("mac")).status(0);
        h.cmd().args(["check", "--domain", "mac"]).status(0);
    }
    assert_eq!(copy_of(&a, "mac"), copy_of(&b, "mac"));
    a.rotate("mac").status(0);
}

#[cfg(feature = "failpoints")]
#[test]
fn sync_exit_codes_busy_timed_out_unreachable_and_usage() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    a.rotate("mac").status(0);
    sync(&b, None).status(0);
    a.rotate("mac").status(0);
    let before = copy_of(&b, "mac");

    // 5: another sync of the domain holds this host's copy.
    let log = b.path("steps.log");
    let first = sync(&b, Some("mac"))
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "ledger.shared_read=sleep(2000)")
        .spawn();
    crate::common::wait_for_step(&log, "ledger.shared_read");
    let out = sync(&b, Some("mac")).status(5);
    assert!(
        out.stdout.contains("BUSY mac") && out.stdout.contains("sync-host-b-"),
        "{}",
        out.stdout
    );
    assert!(first.wait_with_output().unwrap().status.success());
    assert_ne!(copy_of(&b, "mac"), before, "the first sync did its work");

    // 8: the deadline comes while the keyring is read; nothing is written.
    a.rotate("mac").status(0);
    let before = copy_of(&b, "mac");
    let out = b
        .cmd()
        .args(["sync", "--domain", "mac", "--deadline", "1s"])
        .env("KEYROTATE_FAILPOINTS", "ledger.shared_read=sleep(1500)")
        .status(8);
    assert!(out.stdout.contains("TIMED_OUT mac"), "{}", out.stdout);
    assert_eq!(copy_of(&b, "mac"), before);

    // 3: the database cannot be reached; the copy stays as it was and verifies.
    let text = std::fs::read_to_string(b.config_path()).unwrap();
    std::fs::write(b.config_path(), text.replace("@127.0.0.1/", "@127.0.0.1:1/")).unwrap();
    let out = b.cmd().args(["sync", "--deadline", "10s"]).status(3);
    assert!(out.stdout.contains("left as they were"), "{}", out.stdout);
    assert_eq!(copy_of(&b, "mac"), before);
    std::fs::write(b.config_path(), &text).unwrap();
    b.cmd().args(["check", "--domain", "mac"]).status(0);

    // 2: a domain that is not shared, or no deadline.
    let out = b.cmd().args(["sync", "--domain", "nope", "--deadline", "1m"]).status(2);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
    b.cmd().args(["sync"]).status(2);
    // And the audit trail has every attempt.
    let audit = std::fs::read_to_string(b.path("state/audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"sync.completed\"") && audit.contains("\"sync.failed\""),
        "{audit}"
    );
    assert!(db
        .sql("SELECT string_agg(DISTINCT outcome, ',' ORDER BY outcome) FROM shared_syncs WHERE host = 'host-b'")
        .contains("BUSY"));
    // history shows the syncs beside the rotations.
    let h = b
        .cmd()
        .args(["history", "--domain", "mac", "--output", "json"])
        .status(0)
        .json();
    let syncs = h["syncs"].as_array().unwrap();
    assert!(
        syncs
            .iter()
            .any(|s| s["host"] == "host-b" && s["outcome"] == "BUSY" && s["exit_code"] == 5),
        "{h}"
    );
    assert!(syncs.iter().any(|s| s["outcome"] == "SYNCED"), "{h}");
    assert!(!h["runs"].as_array().unwrap().is_empty(), "{h}");
    let text = b.cmd().args(["history", "--domain", "mac"]).status(0).stdout;
    assert!(
        text.contains("syncs (keyrotate sync") && text.contains("TIMED_OUT (8)"),
        "{text}"
    );
}

#[test]
fn a_local_file_holding_another_key_is_never_overwritten_by_sync() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    a.rotate("mac").status(0);
    sync(&b, Some("mac")).status(0);
    // keyring.json lost, and v000001.key holds some other valid key.
    let dir = b.key_dir("mac");
    std::fs::write(dir.join("keyring.json"), "{").unwrap();
    let other = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n";
    std::fs::write(dir.join("v000001.key"), other).unwrap();
    let out = sync(&b, Some("mac")).status(3);
    assert!(out.stdout.contains("another key"), "{}", out.stdout);
    assert_eq!(std::fs::read_to_string(dir.join("v000001.key")).unwrap(), other);
    // Moved away after review, the next sync rebuilds the copy.
    std::fs::rename(&dir, b.path("keys/mac.reviewed")).unwrap();
    sync(&b, Some("mac")).status(0);
    assert_eq!(copy_of(&a, "mac"), copy_of(&b, "mac"));
}

/// A login role for one test, dropped after the databases it was granted on.
struct TempRole(String);

impl Drop for TempRole {
    fn drop(&mut self) {
        let _ = crate::common::pg::psql_as(
            "postgres",
            crate::common::pg::ADMIN_USER,
            crate::common::pg::ADMIN_PASSWORD,
            &format!("DROP ROLE IF EXISTS {}", self.0),
        );
    }
}

#[test]
fn a_role_with_the_documented_grants_runs_the_shared_store() {
    need_postgres!();
    // Declared before the database: dropped after it.
    let role = TempRole(format!("kr_shared_role_{}", std::process::id()));
    let password = "shared-role-password";
    crate::common::pg::admin(
        "postgres",
        &format!(
            "DROP ROLE IF EXISTS {r}; CREATE ROLE {r} LOGIN PASSWORD '{password}'",
            r = role.0
        ),
    );
    let db = Database::new();
    // The owner creates the tables; the job role gets the README's grants only.
    host(&db, "owner", "pool-a").cmd().arg("migrate").status(0);
    db.sql(&format!(
        "GRANT CONNECT ON DATABASE {db} TO {r}; \
         GRANT SELECT ON keyrotate_schema TO {r}; \
         GRANT SELECT, INSERT, UPDATE ON rotations, rotation_events TO {r}; \
         GRANT USAGE ON SEQUENCE rotations_id_seq, rotation_events_id_seq TO {r}; \
         GRANT SELECT, INSERT, UPDATE ON shared_keyrings, shared_key_versions, shared_sync_acks, shared_syncs TO {r}; \
         GRANT USAGE ON SEQUENCE shared_syncs_id_seq TO {r}",
        db = db.0,
        r = role.0
    ));
    let url = db.url_as(&role.0, password);
    let a = host_at(&url, "host-a", "pool-a");
    let b = host_at(&url, "host-b", "pool-b");
    let c = host_at(&url, "host-c", "pool-c");
    for _ in 0..3 {
        a.rotate("sess").status(0);
        for h in [&b, &c] {
            sync(h, None).status(0);
        }
    }
    // retain = 1 destroyed v1, and retiring v2 (a signature key) erased its sealed
    // private half, both through an UPDATE: no DELETE needed.
    assert_eq!(
        db.sql(
            "SELECT string_agg(version || ' ' || state || ' ' || (sealed IS NULL), ',' ORDER BY version) \
             FROM shared_key_versions WHERE domain = 'sess'"
        ),
        "1 destroyed true,2 retired true,3 active false,4 pending false"
    );
    for h in [&a, &b, &c] {
        h.cmd().arg("status").status(0);
        h.cmd().arg("history").status(0);
        h.cmd().arg("check").status(0);
    }
    a.rotate("sess").arg("--dry-run").status(0);
}

#[test]
fn the_audit_chain_with_sync_lines_verifies() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    a.rotate("mac").status(0);
    sync(&a, None).status(0);
    a.rotate("mac").status(0);
    sync(&a, None).status(0);
    let audit = std::fs::read_to_string(a.path("state/audit.jsonl")).unwrap();
    assert!(audit.contains("\"sync.completed\""), "{audit}");
    a.cmd().args(["audit", "verify"]).status(0);
}

/// The `kid`s in a host's `jwks.json` of `domain`, as version numbers.
#[cfg(feature = "failpoints")]
fn jwks_versions(env: &Env, domain: &str) -> Vec<u64> {
    let mut v: Vec<u64> = env.jwks(domain)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap()[1..7].parse().unwrap())
        .collect();
    v.sort();
    v
}

#[cfg(feature = "failpoints")]
#[test]
fn a_sync_killed_before_its_local_commit_leaves_a_copy_that_verifies_and_publishes_every_key() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    for _ in 0..2 {
        a.rotate("sess").status(0);
        sync(&b, None).status(0);
        sync(&c, None).status(0);
    }
    // b holds v1 retired, v2 active, v3 pending; the next rotation destroys v1 (retain
    // = 1) and creates v4.
    assert_eq!(jwks_versions(&b, "sess"), [1, 2, 3]);
    a.rotate("sess").status(0);
    let before = std::fs::read(b.key_dir("sess").join("keyring.json")).unwrap();
    sync(&b, Some("sess"))
        .env("KEYROTATE_FAILPOINTS", "commit.rename=kill")
        .status(137);
    // The old keyring.json stands, whole; jwks.json already has v4 and still has v1.
    assert_eq!(std::fs::read(b.key_dir("sess").join("keyring.json")).unwrap(), before);
    b.cmd().args(["check", "--domain", "sess"]).status(0);
    assert_eq!(jwks_versions(&b, "sess"), [1, 2, 3, 4]);
    // The next sync finishes: v1 leaves jwks.json and the folder.
    sync(&b, Some("sess")).status(0);
    assert_eq!(jwks_versions(&b, "sess"), [2, 3, 4]);
    assert!(!b.key_dir("sess").join("v000001.pem").exists());
    assert_eq!(copy_of(&a, "sess"), copy_of(&b, "sess"));
}
