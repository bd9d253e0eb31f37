//! The failure model: inconsistent key stores, blocked domains, `resolve`, stale runs,
//! signals, deadlines and panics. Tests that need a process to die or stall at a
//! precise step use the `failpoints` build (see src/failpoint.rs).

use crate::common::Env;

fn needs_review_then_resolve(env: &Env, domain: &str, blocking: &str) {
    let out = env.rotate(domain).arg("--force").status(4);
    assert!(
        out.stdout.contains(blocking),
        "does not name {blocking}: {}",
        out.stdout
    );
    assert_eq!(env.last_row()["state"], "refused");
    env.cmd()
        .args([
            "resolve",
            "--domain",
            domain,
            "--run",
            blocking,
            "--note",
            "checked the key store",
            "--operator",
            "oncall",
        ])
        .status(0);
}

#[test]
fn a_corrupt_manifest_blocks_the_domain_and_nothing_is_rewritten() {
    type Damage = Box<dyn Fn(&std::path::Path)>;
    let env = Env::new();
    env.rotate("sig").status(0);
    let dir = env.key_dir("sig");
    let good_manifest = std::fs::read(dir.join("keyring.json")).unwrap();
    let good_key = std::fs::read(dir.join("v000001.pem")).unwrap();
    let cases: Vec<(&str, Damage)> = vec![
        (
            "not a valid manifest",
            Box::new(|d| std::fs::write(d.join("keyring.json"), "{ not json").unwrap()),
        ),
        (
            "no active version",
            Box::new(|d| {
                let s = std::fs::read_to_string(d.join("keyring.json"))
                    .unwrap()
                    .replace("\"active\"", "\"retired\"");
                std::fs::write(d.join("keyring.json"), s).unwrap()
            }),
        ),
        (
            "the active version but its file",
            Box::new(|d| std::fs::remove_file(d.join("v000001.pem")).unwrap()),
        ),
        (
            "has fingerprint",
            Box::new(|d| {
                let other = keyrotate::keystore::Algorithm::Ed25519.generate().unwrap();
                std::fs::write(d.join("v000001.pem"), other.file_bytes()).unwrap();
            }),
        ),
    ];
    let keys_only = |mut snap: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>| {
        // The key store's lock file names its last holder: not key state.
        snap.retain(|p, _| p.starts_with("keys") && !p.ends_with(".lock"));
        snap
    };
    for (i, (diagnosis, damage)) in cases.iter().enumerate() {
        damage(&dir);
        let before = keys_only(env.snapshot());
        let id = format!("CORRUPT-{i}");
        let out = env.rotate("sig").args(["--force", "--run-id", &id]).status(4);
        assert!(out.stdout.contains(diagnosis), "{}", out.stdout);
        assert!(out.stdout.contains("nothing was changed"), "{}", out.stdout);
        assert_eq!(keys_only(env.snapshot()), before, "the key store was changed");
        let row = env.last_row();
        assert_eq!(
            (row["state"].as_str(), row["exit_code"].as_i64()),
            (Some("needs_review"), Some(4))
        );
        assert_eq!(env.cmd().args(["status", "--domain", "sig"]).output().code, 4);
        // Repair; the domain still needs a recorded review before it rotates again.
        std::fs::write(dir.join("keyring.json"), &good_manifest).unwrap();
        std::fs::write(dir.join("v000001.pem"), &good_key).unwrap();
        needs_review_then_resolve(&env, "sig", &id);
        assert_eq!(env.cmd().args(["status", "--domain", "sig"]).output().code, 0);
    }
    env.rotate("sig").arg("--force").status(0);
}

#[test]
fn resolve_refuses_what_it_cannot_resolve() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "OK-1"]).status(0);
    env.rotate("p256").args(["--run-id", "OTHER-1"]).status(0);
    for (args, needle) in [
        (
            vec!["--domain", "sig", "--run", "NOPE", "--note", "x"],
            "not in the ledger",
        ),
        (
            vec!["--domain", "sig", "--run", "OTHER-1", "--note", "x"],
            "belongs to domain p256",
        ),
        (
            vec!["--domain", "sig", "--run", "OK-1", "--note", "x"],
            "does not block",
        ),
        (
            vec!["--domain", "sig", "--run", "OK-1", "--note", "   "],
            "--note is empty",
        ),
        (
            vec!["--domain", "nosuch", "--run", "OK-1", "--note", "x"],
            "not configured",
        ),
    ] {
        let out = env.cmd().arg("resolve").args(args).status(2);
        assert!(out.stderr.contains(needle), "{}", out.stderr);
    }
    assert!(env.audit().iter().all(|e| e["event"] != "review.resolved"));
}

#[test]
fn a_ledger_that_is_not_sqlite_stops_the_run_before_any_key() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::set_permissions(env.path("state"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(env.path("state/ledger.sqlite3"), vec![b'#'; 8192]).unwrap();
    let out = env.rotate("sig").status(3);
    assert!(out.stdout.contains("not a SQLite database"), "{}", out.stdout);
    assert!(!env.path("keys").exists());
    assert_eq!(
        std::fs::read(env.path("state/ledger.sqlite3")).unwrap(),
        vec![b'#'; 8192]
    );
    // With no ledger row possible, the audit line is the run's record.
    let last = env.audit().pop().expect("an audit line");
    assert_eq!(
        (last["event"].as_str(), last["exit_code"].as_i64()),
        (Some("rotation.aborted"), Some(3))
    );
}

#[cfg(feature = "failpoints")]
mod injected {
    use std::time::{Duration, Instant};

    use crate::common::{wait_for_step, Env};

    #[test]
    fn a_killed_run_is_caught_as_stale_with_what_the_key_store_shows() {
        for (point, committed) in [("commit.rename", false), ("ledger.committed", true)] {
            let env = Env::new();
            env.rotate("sig").status(0);
            let out = env
                .rotate("sig")
                .args(["--force", "--run-id", "DEAD-1"])
                .env("KEYROTATE_FAILPOINTS", format!("{point}=kill"))
                .output();
            assert_eq!(out.code, 137, "{}", out.stderr);
            let dead = env.rows().into_iter().find(|r| r["run_id"] == "DEAD-1").unwrap();
            assert!(dead["exit_code"].is_null() && ["staged", "committed"].contains(&dead["state"].as_str().unwrap()));

            let status = env
                .cmd()
                .args(["status", "--domain", "sig", "--output", "json"])
                .status(4);
            assert_eq!(status.json()["domains"][0]["blocked_by"], "DEAD-1");

            let out = env.rotate("sig").args(["--force", "--run-id", "NEXT-1"]).status(4);
            assert!(out.stdout.contains("DEAD-1"), "{}", out.stdout);
            let said = if committed {
                "it did commit"
            } else {
                "it did not commit"
            };
            assert!(out.stdout.contains(said), "{point}: {}", out.stdout);
            let rows = env.rows();
            let dead = rows.iter().find(|r| r["run_id"] == "DEAD-1").unwrap();
            assert_eq!(dead["state"], "needs_review");
            assert!(dead["reason"].as_str().unwrap().contains(said));
            let next = rows.iter().find(|r| r["run_id"] == "NEXT-1").unwrap();
            assert_eq!(
                (next["state"].as_str(), next["exit_code"].as_i64()),
                (Some("refused"), Some(4))
            );
            let events: Vec<String> = env
                .audit()
                .iter()
                .map(|e| format!("{} {}", e["event"].as_str().unwrap(), e["run_id"].as_str().unwrap()))
                .collect();
            assert!(
                events.contains(&"rotation.needs_review DEAD-1".to_string()),
                "{events:?}"
            );

            // Blocked, with or without --force, until resolved.
            env.rotate("sig").arg("--force").status(4);
            env.cmd()
                .args([
                    "resolve",
                    "--domain",
                    "sig",
                    "--run",
                    "DEAD-1",
                    "--note",
                    "verified keyring",
                    "--operator",
                    "bob",
                ])
                .status(0);
            let dead = env.rows().into_iter().find(|r| r["run_id"] == "DEAD-1").unwrap();
            assert_eq!(
                (
                    dead["state"].as_str(),
                    dead["resolved_by"].as_str(),
                    dead["resolution"].as_str()
                ),
                (Some("resolved"), Some("bob"), Some("verified keyring"))
            );
            assert!(dead["resolved_at"].is_string());
            assert_eq!(env.audit().pop().unwrap()["event"], "review.resolved");
            env.rotate("sig").arg("--force").status(0);
            assert_eq!(
                env.key_files("sig"),
                env.live_files("sig"),
                "orphans remain after the next success"
            );
        }
    }

    #[test]
    fn a_panic_exits_101_and_is_caught_next_time() {
        let env = Env::new();
        let out = env
            .rotate("sig")
            .args(["--run-id", "P-1"])
            .env("KEYROTATE_FAILPOINTS", "stage.fsync=panic")
            .output();
        assert_eq!(out.code, 101, "{}", out.stderr);
        let out = env.rotate("sig").status(4);
        assert!(
            out.stdout.contains("P-1") && out.stdout.contains("did not commit"),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn sigterm_before_the_commit_aborts_and_cleans_up() {
        let env = Env::new();
        env.rotate("sig").status(0);
        let before = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
        let log = env.path("steps.log");
        let child = env
            .rotate("sig")
            .args(["--force", "--run-id", "TERM-1"])
            .env("KEYROTATE_FAILPOINT_LOG", &log)
            .env("KEYROTATE_FAILPOINTS", "stage.fsync=sleep(3000)")
            .spawn();
        wait_for_step(&log, "stage.fsync");
        // SAFETY: a signal to a process this test started; kill has no memory preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{stdout}");
        assert!(stdout.contains("terminated (SIGTERM received"), "{stdout}");
        assert_eq!(std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(), before);
        assert_eq!(env.key_files("sig"), ["v000001.pem"], "the staged file was not removed");
        let row = env.last_row();
        assert_eq!(
            (row["state"].as_str(), row["exit_code"].as_i64()),
            (Some("aborted"), Some(3))
        );
        assert_eq!(env.audit().pop().unwrap()["exit_code"], 3);
        env.rotate("sig").arg("--force").status(0);
    }

    #[test]
    fn a_step_hung_past_the_deadline_is_abandoned_as_timed_out() {
        let env = Env::new();
        env.rotate("sig").status(0);
        let before = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
        let start = Instant::now();
        let out = env
            .cmd()
            .args([
                "rotate",
                "--domain",
                "sig",
                "--force",
                "--deadline",
                "1s",
                "--run-id",
                "SLOW-1",
            ])
            .env("KEYROTATE_FAILPOINTS", "stage.fsync=sleep(20000)")
            .status(8);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the run outlived its deadline by far"
        );
        assert!(out.stdout.contains("'stage' was still running"), "{}", out.stdout);
        assert_eq!(std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(), before);
        let row = env.last_row();
        assert_eq!(
            (row["state"].as_str(), row["exit_code"].as_i64()),
            (Some("timed_out"), Some(8))
        );
        assert_eq!(env.audit().pop().unwrap()["event"], "rotation.timed_out");
        // Not blocked: the next run sweeps the abandoned staged file and rotates.
        env.rotate("sig").arg("--force").status(0);
        // (v1, retired, keeps no private half: DESIGN 11.)
        assert_eq!(env.key_files("sig"), ["v000003.pem"]);
    }

    #[test]
    fn a_second_run_while_one_is_in_progress_is_busy() {
        let env = Env::new();
        let log = env.path("steps.log");
        let child = env
            .rotate("sig")
            .args(["--run-id", "HOLDER-1"])
            .env("KEYROTATE_FAILPOINT_LOG", &log)
            .env("KEYROTATE_FAILPOINTS", "stage.create=sleep(1500)")
            .spawn();
        wait_for_step(&log, "stage.create");
        let out = env.rotate("sig").args(["--run-id", "SECOND-1"]).status(5);
        assert!(
            out.stdout.contains("HOLDER-1") && out.stdout.contains(&format!("pid {}", child.id())),
            "{}",
            out.stdout
        );
        let dry = env.rotate("sig").arg("--dry-run").status(5);
        assert!(dry.stdout.contains("HOLDER-1"), "{}", dry.stdout);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let rows = env.rows();
        assert_eq!(rows.iter().filter(|r| r["state"] == "succeeded").count(), 1);
        assert_eq!(rows.iter().find(|r| r["run_id"] == "SECOND-1").unwrap()["exit_code"], 5);
    }
}

#[test]
fn a_ledger_held_by_another_writer_until_the_deadline_is_timed_out() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let holder = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let before = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    let out = env
        .cmd()
        .args(["rotate", "--domain", "sig", "--force", "--deadline", "2s"])
        .status(8);
    assert!(
        out.stdout.contains("busy") && out.stdout.contains("no key was touched"),
        "{}",
        out.stdout
    );
    assert_eq!(std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(), before);
    holder.execute_batch("ROLLBACK").unwrap();
    env.rotate("sig").arg("--force").status(0);
}
