//! The PostgreSQL ledger: the whole failure model on a shared database, two "hosts"
//! (two state and key folders, one database) competing for one domain, a holder
//! killed on one host caught on the other, and connection failures.
//!
//! Needs a PostgreSQL server. `.ci/run` starts the machine's PostgreSQL 15 and exports
//! libpq variables for an admin role (`KEYROTATE_TEST_PG=1`); run as root elsewhere,
//! the tests start the installed cluster themselves. Each test creates its own
//! database. Only where no PostgreSQL is installed do they say SKIPPED and return.

use std::process::Command;

use crate::common::pg::{admin, server, Database, ADMIN_PASSWORD, ADMIN_USER};
#[cfg(feature = "failpoints")]
use crate::common::wait_for_step;
use crate::common::Env;

/// One "host": its own state and key folders, the shared ledger.
fn host(url: &str) -> Env {
    Env::with_config(&format!(
        r#"
[state]
dir = "state"
ledger = "{url}"
[host]
pool = "pool-a"
[defaults]
designated_pool = "pool-a"
backend = "keystore"
keystore = "keys"
min_interval = "1h"
[domains.sig]
algorithm = "ed25519"
"#
    ))
}

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

#[test]
fn every_command_works_against_a_postgres_ledger() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db.url());
    let out = a.rotate("sig").args(["--run-id", "PG-A1"]).status(0);
    assert!(!out.stdout.contains(ADMIN_PASSWORD) && !out.stderr.contains(ADMIN_PASSWORD));
    assert!(
        !a.path("state/ledger.sqlite3").exists(),
        "a SQLite ledger was created too"
    );
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code || ' ' || to_version FROM rotations WHERE run_id = 'PG-A1'"),
        "succeeded 0 1"
    );
    assert!(
        db.sql("SELECT count(*) FROM rotation_events WHERE run_id = 'PG-A1'")
            .parse::<i32>()
            .unwrap()
            >= 4
    );
    a.rotate("sig").args(["--run-id", "PG-A2"]).status(7);

    let before = db.sql("SELECT count(*) FROM rotations");
    a.rotate("sig").args(["--dry-run"]).status(7);
    let plan = a
        .rotate("sig")
        .args(["--dry-run", "--force", "--output", "json"])
        .status(0)
        .json();
    assert_eq!(plan["to_version"], 2);
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations"),
        before,
        "a dry run wrote to the database"
    );

    let status = a.cmd().args(["status", "--output", "json"]).status(0).json();
    assert_eq!(status["domains"][0]["last_run"]["run_id"], "PG-A2");
    let history = a.cmd().args(["history", "--output", "json"]).status(0).json();
    assert_eq!(history["runs"].as_array().unwrap().len(), 2);
    a.cmd().arg("check").status(0);

    // Blocked and resolved, as on one host.
    std::fs::write(a.key_dir("sig").join("keyring.json"), "{").unwrap();
    a.rotate("sig").args(["--force", "--run-id", "PG-BAD"]).status(4);
    a.cmd().args(["status"]).status(4);
    let good = keyrotate_manifest_for(&a);
    std::fs::write(a.key_dir("sig").join("keyring.json"), good).unwrap();
    a.rotate("sig").arg("--force").status(4);
    a.cmd()
        .args([
            "resolve",
            "--domain",
            "sig",
            "--run",
            "PG-BAD",
            "--note",
            "restored keyring.json from backup",
        ])
        .status(0);
    assert_eq!(
        db.sql("SELECT state || ' ' || resolved_by FROM rotations WHERE run_id = 'PG-BAD'"),
        "resolved tester"
    );
    a.rotate("sig").arg("--force").status(0);
}

/// A valid manifest for `env`'s v1 (rebuilt from the key file, as an operator
/// restoring from backup would).
fn keyrotate_manifest_for(env: &Env) -> String {
    let key = std::fs::read(env.key_dir("sig").join("v000001.pem")).unwrap();
    let parsed = keyrotate::keystore::KeyFile::parse(keyrotate::keystore::Algorithm::Ed25519, &key).unwrap();
    serde_json::json!({
        "domain": "sig", "primary": 1,
        "versions": [{"version": 1, "state": "active", "algorithm": "ed25519", "created_at": "2026-01-01T00:00:00.000Z",
            "activated_at": "2026-01-01T00:00:00.000Z", "retired_at": null, "destroyed_at": null,
            "fingerprint": parsed.fingerprint(), "file": "v000001.pem", "created_by_run": "PG-A1"}]
    })
    .to_string()
}

#[test]
fn a_storm_from_two_hosts_rotates_exactly_once() {
    need_postgres!();
    let db = Database::new();
    let (a, b) = (host(&db.url()), host(&db.url()));
    // Both hosts are set up (folders, schema) before the storm.
    a.cmd().arg("check").status(0);
    let mut children = Vec::new();
    for i in 0..16 {
        let h = if i % 2 == 0 { &a } else { &b };
        children.push(h.rotate("sig").spawn());
    }
    let codes: Vec<i32> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap_or(-1))
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 1, "codes {codes:?}");
    assert!(codes.iter().all(|c| [0, 5, 7].contains(c)), "codes {codes:?}");
    assert_eq!(db.sql("SELECT count(*) FROM rotations WHERE state = 'succeeded'"), "1");
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations"),
        "16",
        "every run has exactly one row"
    );
    let rotated = [&a, &b]
        .iter()
        .filter(|h| h.key_dir("sig").join("keyring.json").exists())
        .count();
    assert_eq!(rotated, 1, "both hosts rotated");
}

#[cfg(feature = "failpoints")]
#[test]
fn a_holder_killed_on_one_host_is_caught_on_the_other() {
    need_postgres!();
    let db = Database::new();
    let (a, b) = (host(&db.url()), host(&db.url()));
    let out = a
        .rotate("sig")
        .args(["--run-id", "DEAD-A"])
        .env("KEYROTATE_FAILPOINTS", "commit.rename=kill")
        .output();
    assert_eq!(out.code, 137);
    assert_eq!(db.sql("SELECT state FROM rotations WHERE run_id = 'DEAD-A'"), "staged");
    // The server released host A's advisory lock with its session: B is not BUSY.
    let out = b.rotate("sig").args(["--force", "--run-id", "B-1"]).status(4);
    assert!(out.stdout.contains("DEAD-A"), "{}", out.stdout);
    assert_eq!(
        db.sql("SELECT state FROM rotations WHERE run_id = 'DEAD-A'"),
        "needs_review"
    );
    b.cmd().args(["status"]).status(4);
    a.cmd().args(["status"]).status(4);
    a.rotate("sig").arg("--force").status(4);
    b.cmd()
        .args([
            "resolve",
            "--domain",
            "sig",
            "--run",
            "DEAD-A",
            "--note",
            "host A never committed",
        ])
        .status(0);
    b.rotate("sig").arg("--force").status(0);
    a.rotate("sig").status(7);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_run_holding_the_lock_makes_the_other_host_busy_and_its_dry_run_say_so() {
    need_postgres!();
    let db = Database::new();
    let (a, b) = (host(&db.url()), host(&db.url()));
    let log = a.path("steps.log");
    let child = a
        .rotate("sig")
        .args(["--run-id", "SLOW-A"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        // Long enough for the other host's real and dry runs even on a loaded machine.
        .env("KEYROTATE_FAILPOINTS", "stage.create=sleep(6000)")
        .spawn();
    wait_for_step(&log, "stage.create");
    let out = b.rotate("sig").args(["--run-id", "B-BUSY"]).status(5);
    assert!(out.stdout.contains("SLOW-A"), "{}", out.stdout);
    let dry = b.rotate("sig").arg("--dry-run").status(5);
    assert!(dry.stdout.contains("SLOW-A"), "{}", dry.stdout);
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
    assert_eq!(db.sql("SELECT exit_code FROM rotations WHERE run_id = 'B-BUSY'"), "5");
}

#[test]
fn unreachable_or_refusing_databases_stop_the_run_before_any_key() {
    need_postgres!();
    let db = Database::new();
    for (url, needle) in [
        (
            db.url().replace(ADMIN_PASSWORD, "wrong-password"),
            "password authentication failed",
        ),
        ("postgres://keyrotate_ci:x@127.0.0.1:1/nodb".to_string(), "onnect"),
        (
            "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/postgres".to_string(),
            "authentication failed",
        ),
    ] {
        let env = host(&url);
        let out = env.rotate("sig").status(3);
        assert!(out.stdout.contains(needle), "{url}: {}", out.stdout);
        assert!(out.stdout.contains("no key was touched"), "{}", out.stdout);
        assert!(
            !out.stdout.contains("wrong-password") && !out.stderr.contains("wrong-password"),
            "the password leaked"
        );
        assert!(!env.path("keys").exists());
        env.rotate("sig").arg("--dry-run").status(3);
        env.cmd().arg("check").status(2);
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn a_session_that_disappears_mid_run_stops_it_before_any_key_and_its_row_is_closed() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db.url());
    let log = a.path("steps.log");
    let child = a
        .rotate("sig")
        .args(["--run-id", "CUT-1"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "stage.create=sleep(1500)")
        .spawn();
    wait_for_step(&log, "stage.create");
    db.sql(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'keyrotate'", db.0));
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Its row is closed through a new session, so ABORTED is the whole truth (a row
    // that cannot be closed at all would make it NEEDS_REVIEW, DESIGN 8).
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        !a.key_dir("sig").join("keyring.json").exists(),
        "rotated without its ledger"
    );
    // The run closes its own row through a new session: nothing is left for review.
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'CUT-1'"),
        "aborted 3"
    );
    a.rotate("sig").status(0);
}

#[test]
fn tls_follows_sslmode_and_verifies_what_it_is_asked_to() {
    need_postgres!();
    let snakeoil = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    if admin("postgres", "SHOW ssl") != "on" || !std::path::Path::new(snakeoil).exists() {
        eprintln!(
            "SKIPPED {}: the server has no TLS certificate to test against",
            module_path!()
        );
        return;
    }
    let db = Database::new();
    let url = |host: &str, query: &str| format!("postgres://{ADMIN_USER}:{ADMIN_PASSWORD}@{host}/{}?{query}", db.0);
    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("ca.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=other",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(other.path().join("ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // Debian's certificate is self-signed for "localhost".
    for (u, code, needle) in [
        (
            url("localhost", &format!("sslmode=verify-full&sslrootcert={snakeoil}")),
            0,
            "",
        ),
        (
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={snakeoil}")),
            0,
            "",
        ),
        (
            url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={snakeoil}")),
            3,
            "invalid peer certificate",
        ),
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
            ),
            3,
            "invalid peer certificate",
        ),
        (url("localhost", "sslmode=require"), 0, ""),
        (url("localhost", "sslmode=disable"), 0, ""),
    ] {
        let env = host(&u);
        let out = env.rotate("sig").arg("--force").output();
        assert_eq!(out.code, code, "{u}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains(needle), "{u}: {}", out.stdout);
        assert!(!out.stdout.contains(ADMIN_PASSWORD) && !out.stderr.contains(ADMIN_PASSWORD));
    }
    let bad = host(&url("localhost", "sslmode=sometimes"));
    let out = bad.rotate("sig").status(2);
    assert!(
        out.stderr.contains("state.ledger") && out.stderr.contains("sslmode=sometimes"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_database_lock_is_waited_for_only_until_the_deadline() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db.url());
    a.rotate("sig").status(0);
    // Another session holds the ledger's table for longer than the run may take.
    let holder = Command::new("psql")
        .args(["-X", "-q", "-h", "127.0.0.1", "-U", ADMIN_USER, "-d", &db.0, "-c"])
        .arg("BEGIN; LOCK TABLE rotations IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;")
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while db.sql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'rotations' AND l.mode = 'AccessExclusiveLock' AND l.granted") != "1" {
        assert!(start.elapsed().as_secs() < 10, "the holder never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = std::fs::read(a.key_dir("sig").join("keyring.json")).unwrap();
    let start = std::time::Instant::now();
    let out = a
        .cmd()
        .args(["rotate", "--domain", "sig", "--force", "--deadline", "2s"])
        .status(8);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "waited {:?}",
        start.elapsed()
    );
    assert!(
        out.stdout.contains("timeout") && out.stdout.contains("no key was touched"),
        "{}",
        out.stdout
    );
    assert_eq!(std::fs::read(a.key_dir("sig").join("keyring.json")).unwrap(), before);
    let _ = holder.wait_with_output();
    a.rotate("sig").arg("--force").status(0);
}
