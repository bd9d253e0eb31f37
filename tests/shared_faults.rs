//! The shared key store (DESIGN 9) under faults, through the real binary, two or three
//! simulated hosts on one PostgreSQL database (see `common::shared`):
//!
//! - SIGKILL at every database round trip and durable step of a shared rotation and of
//!   a `sync`: no host's copy ever mixes two epochs or fails to verify, and the next run
//!   is NEEDS_REVIEW (naming the killed run, saying whether it committed) or proceeds;
//! - a run whose connection (and so its advisory lock) is dropped at any round trip
//!   before its commit, while another host rotates: never do both commit;
//! - no fragment of any private or symmetric key in a dump of the database, the
//!   ledger, the logs, the outputs or the audit trails;
//! - what an operator hits with `sync`: a wrong KEK, a bad KEK file, the database down,
//!   a second sync beside the first, a past deadline, a deleted key file, a closed pipe.
//!
//! Needs PostgreSQL (see `common::pg`); says SKIPPED where none is installed. The kill
//! tests need the failpoints build.

use std::time::Duration;

use crate::common::pg::{server, Database};
use crate::common::shared::{db_ring, epoch, host, local_ring, sync, verify_copy, verify_interrupted_copy};
use crate::common::{Env, Out};

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

const POOLS: [&str; 2] = ["pool-a", "pool-b"];

/// Runs `rotate` on `env` with run id `id`; a BUSY that only means the server has not
/// yet ended a killed run's session (its advisory lock) is retried a moment later.
fn rotate_after_kill(env: &Env, domain: &str, id: &str) -> Out {
    for attempt in 0..20 {
        let out = env
            .rotate(domain)
            .args(["--run-id", &format!("{id}-{attempt}")])
            .output();
        if out.code != 5 {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{id}: BUSY for 4 s after the kill");
}

/// The step names a run passes, from a `KEYROTATE_FAILPOINT_LOG` file.
fn steps_of(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect()
}

fn killed(out: &Out, context: &str) {
    assert_eq!(out.code, 137, "{context}: not killed\n{}{}", out.stdout, out.stderr);
}

/// After a fault: the copy of `env` verifies and is one of the committed keyrings
/// `rings`, and the host's acknowledgement claims no newer epoch than the copy holds.
#[track_caller]
fn copy_is_one_of(db: &Database, env: &Env, name: &str, rings: &[(i64, String)], context: &str) {
    let copy = verify_interrupted_copy(env, "sess", context);
    let held = rings
        .iter()
        .find(|(_, r)| *r == copy)
        .map(|(e, _)| *e)
        .unwrap_or_else(|| panic!("{context}: {name}'s copy mixes epochs: {copy}\nvs {rings:?}"));
    let acked: i64 = db
        .sql(&format!(
            "SELECT coalesce((SELECT epoch FROM shared_sync_acks WHERE domain = 'sess' AND host = '{name}'), 0)"
        ))
        .parse()
        .unwrap();
    assert!(
        acked <= held,
        "{context}: {name} acknowledged epoch {acked} but holds {held}"
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_step_of_a_shared_rotation_never_leaves_a_copy_mixing_epochs() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    // v1 retired, v2 active, v3 pending on both hosts: the next rotation promotes,
    // retires, destroys (retain = 1) and creates, so every kind of step is on its path.
    for _ in 0..3 {
        a.rotate("sess").status(0);
        sync(&b, Some("sess")).status(0);
    }
    let log = a.path("steps.log");
    a.rotate("sess")
        .args(["--run-id", "ENUM"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    sync(&b, Some("sess")).status(0);
    let steps = steps_of(&log);
    for needed in [
        "ledger.lock",
        "ledger.admit",
        "ledger.shared_read",
        "ledger.shared_acks",
        "ledger.confirm",
        "ledger.shared_commit",
        "shared.epoch",
        "shared.insert",
        "shared.update",
        "install.rename",
        "commit.rename",
        "destroy.unlink",
        "ledger.shared_ack",
        "ledger.close",
    ] {
        assert!(steps.iter().any(|s| s == needed), "no {needed} in {steps:?}");
    }
    let (mut committed, mut reviewed) = (0, 0);
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("killed at step {k} ({step})");
        let (e0, ring0) = (epoch(&db, "sess"), db_ring(&db, "sess"));
        let id = format!("K{k}");
        killed(
            &a.rotate("sess")
                .args(["--run-id", &id])
                .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
                .output(),
            &context,
        );
        // The database holds the old keyring or the killed run's whole commit.
        let (e1, ring1) = (epoch(&db, "sess"), db_ring(&db, "sess"));
        if e1 == e0 {
            assert_eq!(ring1, ring0, "{context}: the keyring changed without a commit");
        } else {
            assert_eq!(e1, e0 + 1, "{context}");
            assert_eq!(
                db.sql("SELECT committed_run FROM shared_keyrings WHERE domain = 'sess'"),
                id,
                "{context}"
            );
            committed += 1;
        }
        let rings = [(e0, ring0), (e1, ring1.clone())];
        copy_is_one_of(&db, &a, "host-a", &rings, &context);
        copy_is_one_of(&db, &b, "host-b", &rings, &context);
        // Another host's sync is whole and current.
        sync(&b, Some("sess")).status(0);
        assert_eq!(verify_copy(&b, "sess", &context), ring1, "{context}");

        // The next run: NEEDS_REVIEW while the killed run's row is in flight, naming it
        // and whether it committed; else it proceeds.
        let row = db.sql(&format!("SELECT count(*) FROM rotations WHERE run_id = '{id}'"));
        let next = rotate_after_kill(&a, "sess", &format!("N{k}"));
        if row == "1" {
            assert_eq!(next.code, 4, "{context}: {}{}", next.stdout, next.stderr);
            assert!(next.stdout.contains(&id), "{context}: {}", next.stdout);
            let diagnosis = db.sql(&format!("SELECT reason FROM rotations WHERE run_id = '{id}'"));
            let said = if e1 > e0 { "it did commit" } else { "it did not commit" };
            assert!(diagnosis.contains(said), "{context}: diagnosis {diagnosis:?}");
            a.resolve("sess", &id, "crash test: keyring checked").status(0);
            reviewed += 1;
            // The Control-M flow syncs every host before the rotation.
            sync(&a, Some("sess")).status(0);
            sync(&b, Some("sess")).status(0);
            a.rotate("sess").args(["--run-id", &format!("OK{k}")]).status(0);
        } else {
            assert_eq!(next.code, 0, "{context}: {}{}", next.stdout, next.stderr);
            assert_eq!(e1, e0, "{context}: committed without a row");
        }
        sync(&b, Some("sess")).status(0);
        assert_eq!(verify_copy(&a, "sess", &context), db_ring(&db, "sess"), "{context}");
        assert_eq!(verify_copy(&b, "sess", &context), db_ring(&db, "sess"), "{context}");
    }
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations WHERE exit_code IS NULL AND state <> 'resolved'"),
        "0",
        "a row was left open"
    );
    assert!(
        committed > 0 && reviewed > committed,
        "{committed} committed, {reviewed} reviewed"
    );
    eprintln!(
        "shared rotation crash points: {} steps, {committed} kills after the commit, {reviewed} needed review",
        steps.len()
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_step_of_a_sync_leaves_the_old_copy_or_the_new_one() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    for _ in 0..3 {
        a.rotate("sess").status(0);
        sync(&b, Some("sess")).status(0);
    }
    a.rotate("sess").status(0);
    let log = b.path("steps.log");
    sync(&b, Some("sess")).env("KEYROTATE_FAILPOINT_LOG", &log).status(0);
    let steps = steps_of(&log);
    for needed in [
        "ledger.connect",
        "ledger.shared_read",
        "install.fsync",
        "install.rename",
        "jwks.rename",
        "commit.rename",
        "commit.dirsync",
        "current.rename",
        "destroy.unlink",
        "ledger.shared_ack",
    ] {
        assert!(steps.iter().any(|s| s == needed), "no {needed} in {steps:?}");
    }
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("sync killed at step {k} ({step})");
        let (e0, ring0) = (epoch(&db, "sess"), local_ring(&b, "sess"));
        assert_eq!(ring0, verify_copy(&b, "sess", &context));
        a.rotate("sess").status(0);
        let ring1 = db_ring(&db, "sess");
        killed(
            &sync(&b, Some("sess"))
                .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
                .output(),
            &context,
        );
        copy_is_one_of(&db, &b, "host-b", &[(e0, ring0), (e0 + 1, ring1.clone())], &context);
        // The next sync proceeds and repairs whatever the kill left.
        sync(&b, Some("sess")).status(0);
        assert_eq!(verify_copy(&b, "sess", &context), ring1, "{context}");
        let stray: Vec<String> = std::fs::read_dir(b.key_dir("sess"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('v') && !b.live_files("sess").contains(n))
            .collect();
        assert!(
            stray.is_empty(),
            "{context}: files of destroyed versions left: {stray:?}"
        );
    }
    eprintln!("sync crash points: {} steps", steps.len());
}
