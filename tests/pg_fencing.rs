//! Fencing on the shared (PostgreSQL) ledger: a run confirms its lock before every
//! external step and every second during hook steps (which also keeps its session
//! from `idle_session_timeout`), stops when the lock is gone, is never called dead
//! while it runs, and under SIGKILL at every database round trip and every hook step
//! no two runs ever change the target at once (a shared hook log with timestamps
//! proves it) and every row ends truthful.
//!
//! Two "hosts" are two configs (own state folders) on one database. Needs PostgreSQL
//! (see `common::pg`); says SKIPPED where none is installed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::pg::{server, Database};
use crate::common::Env;
use crate::hook_safety::assert_no_overlap;

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

/// Every step logs `begin`/`tick`/`end RUN STEP TIME` to `$HOOK_LOG` (one file shared by
/// the hosts); `slow.<step>` in the hook's folder makes that step tick for 3 s,
/// `sleep5.<step>` makes it sleep 5 s without a sound.
const HOOK: &str = r#"#!/bin/sh
here=$(dirname "$0")
now() { date +%s.%N; }
on() { [ -e "$here/$1.$KEYROTATE_STEP" ]; }
echo "begin $KEYROTATE_RUN_ID $KEYROTATE_STEP $(now)" >> "$HOOK_LOG"
n=2
if on slow; then n=30; fi
i=0
while [ $i -lt $n ]; do echo "tick $KEYROTATE_RUN_ID $KEYROTATE_STEP $(now)" >> "$HOOK_LOG"; sleep 0.1; i=$((i+1)); done
if on sleep5; then sleep 5; fi
echo "end $KEYROTATE_RUN_ID $KEYROTATE_STEP $(now)" >> "$HOOK_LOG"
exit 0
"#;

/// One "host": its own state folder and hook, the shared ledger.
fn host(db: &Database) -> Env {
    let env = Env::with_config(&format!(
        r#"
[state]
dir = "state"
ledger = "{}"
[host]
pool = "pool-a"
[domains.pw]
designated_pool = "pool-a"
backend = "command"
command = ["./hooks/h"]
min_interval = "0s"
[domains.sig]
designated_pool = "pool-a"
backend = "keystore"
algorithm = "ed25519"
keystore = "keys"
min_interval = "0s"
"#,
        db.url()
    ));
    std::fs::create_dir(env.path("hooks")).unwrap();
    std::fs::write(env.path("hooks/h"), HOOK).unwrap();
    std::fs::set_permissions(env.path("hooks/h"), std::fs::Permissions::from_mode(0o755)).unwrap();
    env
}

fn flag(env: &Env, name: &str) {
    std::fs::write(env.path(&format!("hooks/{name}")), "").unwrap();
}

fn wait_for_line(log: &Path, needle: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(20), "never saw {needle:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hook_log(env: &Env) -> PathBuf {
    env.path("hook.log")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn a_hook_step_longer_than_idle_session_timeout_keeps_the_lock() {
    need_postgres!();
    let db = Database::new();
    // Per database, never server-wide: other tests share the server.
    db.sql(&format!("ALTER DATABASE {} SET idle_session_timeout = '2s'", db.0));
    let a = host(&db);
    flag(&a, "sleep5.set");
    let log = hook_log(&a);
    let out = a
        .rotate("pw")
        .args(["--run-id", "IDLE-1"])
        .env("HOOK_LOG", &log)
        .status(0);
    assert!(out.stdout.contains("ROTATED"), "{}", out.stdout);
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'IDLE-1'"),
        "succeeded 0"
    );
    assert!(read(&log).contains("end IDLE-1 finish"));
}

#[test]
fn a_run_whose_lock_is_taken_away_mid_set_stops_and_is_never_called_dead() {
    need_postgres!();
    let db = Database::new();
    let (a, b) = (host(&db), host(&db));
    a.cmd().arg("check").status(0);
    flag(&a, "slow.set");
    let log = hook_log(&a);
    let child = a
        .rotate("pw")
        .args(["--run-id", "LOST-A"])
        .env("HOOK_LOG", &log)
        .spawn();
    wait_for_line(&log, "tick LOST-A set");
    // Freeze it, take its session away (the server releases its advisory lock).
    let pid = child.id() as i32;
    // SAFETY: SIGSTOP to the keyrotate process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    db.terminate_keyrotate_sessions();
    let start = Instant::now();
    while db.advisory_locks() != "0" {
        assert!(start.elapsed() < Duration::from_secs(10), "the lock was never released");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The other "host" (here: the same machine) gets the lock, but the run is alive.
    let out = b.rotate("pw").args(["--run-id", "B-1"]).env("HOOK_LOG", &log).status(5);
    assert!(
        out.stdout.contains("LOST-A lost its lock, still running (pid ") && !out.stdout.contains("died"),
        "{}",
        out.stdout
    );
    let dry = b.rotate("pw").arg("--dry-run").status(5);
    assert!(
        dry.stdout.contains("LOST-A lost its lock, still running"),
        "{}",
        dry.stdout
    );
    assert_eq!(
        db.sql("SELECT state FROM rotations WHERE run_id = 'LOST-A'"),
        "staged",
        "the live run's row was taken over"
    );
    // Resumed, it notices within a second, stops its hook, and says so.
    // SAFETY: SIGCONT to the process stopped above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(
        resumed.elapsed() < Duration::from_secs(4),
        "took {:?} to stop",
        resumed.elapsed()
    );
    assert!(stdout.contains("lost its lock"), "{stdout}");
    let text = read(&log);
    assert!(
        !text.contains("LOST-A test") && !text.contains("LOST-A finish") && !text.contains("end LOST-A set"),
        "the run went on without its lock:\n{text}"
    );
    // Its row is closed with the truth, through a new session.
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'LOST-A'"),
        "needs_review 4"
    );
    assert!(db
        .sql("SELECT reason FROM rotations WHERE run_id = 'LOST-A'")
        .contains("lost its lock"));
    b.rotate("pw").env("HOOK_LOG", &log).status(4);
    b.resolve("pw", "LOST-A", "set verified on the target").status(0);
    b.rotate("pw").args(["--run-id", "B-2"]).env("HOOK_LOG", &log).status(0);
    assert_no_overlap(&read(&log));
}

#[cfg(feature = "failpoints")]
#[test]
fn a_key_store_commit_is_not_made_without_the_lock() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db);
    a.rotate("sig").args(["--run-id", "KS-1"]).status(0);
    let before = std::fs::read(a.key_dir("sig").join("keyring.json")).unwrap();
    let steps = a.path("steps.log");
    // Held just before the commit (after the last database round trip before it).
    let child = a
        .rotate("sig")
        .args(["--run-id", "KS-2"])
        .env("KEYROTATE_FAILPOINT_LOG", &steps)
        .env("KEYROTATE_FAILPOINTS", "jwks.create=sleep(1500)")
        .spawn();
    crate::common::wait_for_step(&steps, "jwks.create");
    db.terminate_keyrotate_sessions();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("lost its lock") && stdout.contains("nothing was changed"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(a.key_dir("sig").join("keyring.json")).unwrap(),
        before,
        "committed without the lock"
    );
    assert_eq!(
        db.sql("SELECT state || ' ' || exit_code FROM rotations WHERE run_id = 'KS-2'"),
        "aborted 3"
    );
    a.rotate("sig").args(["--run-id", "KS-3"]).status(0);
}

#[cfg(feature = "failpoints")]
/// A run killed at `kill` (a failpoint spec, or `None` with `during` = a hook step to
/// SIGKILL it in), then the other host straight away, then review and a good run:
/// nothing overlaps and every row ends closed and truthful.
fn kill_then_other_host(db: &Database, a: &Env, b: &Env, run: &str, kill: Option<String>, during: Option<&str>) {
    let log = hook_log(a);
    let context = format!("{run}: kill at {kill:?} / during {during:?}");
    let mut cmd = a.rotate("pw").args(["--force", "--run-id", run]).env("HOOK_LOG", &log);
    if let Some(k) = &kill {
        cmd = cmd.env("KEYROTATE_FAILPOINTS", format!("{k}=kill"));
    }
    if let Some(step) = during {
        // A long step, so that a hook outliving its run would overlap the next ones.
        flag(a, &format!("slow.{step}"));
    }
    let mut child = cmd.spawn();
    if let Some(step) = during {
        wait_for_line(&log, &format!("tick {run} {step}"));
        // SAFETY: SIGKILL to the keyrotate process this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let killed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        std::fs::remove_file(a.path(&format!("hooks/slow.{step}"))).unwrap();
        // On another host nothing could see this hook: it must die with its run.
        std::thread::sleep(Duration::from_millis(1500));
        let last = crate::hook_safety::intervals(&read(&log))
            .into_iter()
            .find(|i| i.0 == run)
            .map(|i| i.2)
            .unwrap();
        assert!(
            last < killed_at + 1.0,
            "{context}: the hook went on {:.3} s after keyrotate was killed",
            last - killed_at
        );
    }
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{context}: {status:?}");

    // The other host, right after the kill.
    let b_run = format!("{run}-B");
    let mut out = b
        .rotate("pw")
        .args(["--force", "--run-id", &b_run])
        .env("HOOK_LOG", &log)
        .output();
    if out.code == 5 {
        // The server had not yet ended the killed run's session: a moment later.
        std::thread::sleep(Duration::from_millis(300));
        out = b
            .rotate("pw")
            .args(["--force", "--run-id", &format!("{b_run}2")])
            .env("HOOK_LOG", &log)
            .output();
    }
    assert!(
        [0, 4].contains(&out.code),
        "{context}: the other host exited {}: {}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    let row = db.sql(&format!(
        "SELECT coalesce(state, '') FROM rotations WHERE run_id = '{run}'"
    ));
    if out.code == 4 {
        assert!(out.stdout.contains(run), "{context}: {}", out.stdout);
        assert_eq!(row, "needs_review", "{context}");
        // resolve refuses while anything of the killed run still runs here.
        let start = Instant::now();
        loop {
            let r = b.resolve("pw", run, "crash test: target checked").output();
            if r.code == 0 {
                break;
            }
            assert_eq!(r.code, 5, "{context}: resolve: {}", r.stderr);
            assert!(start.elapsed() < Duration::from_secs(10), "{context}: {}", r.stderr);
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        assert!(
            row.is_empty() || row == "succeeded" || row == "needs_review",
            "{context}: the killed run's row is {row:?}"
        );
        if row == "needs_review" {
            b.resolve("pw", run, "crash test").status(0);
        }
    }
    b.rotate("pw")
        .args(["--force", "--run-id", &format!("{run}-OK")])
        .env("HOOK_LOG", &log)
        .status(0);
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations WHERE state IN ('started','staged','committed') OR exit_code IS NULL AND state <> 'resolved'"),
        "0",
        "{context}: a row was left open"
    );
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations WHERE state = 'needs_review'"),
        "0",
        "{context}"
    );
    assert_no_overlap(&read(&log));
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_database_round_trip_and_hook_step_never_overlaps_two_runs() {
    need_postgres!();
    let db = Database::new();
    let (a, b) = (host(&db), host(&db));
    let steps_log = a.path("steps.log");
    a.rotate("pw")
        .args(["--run-id", "ENUM"])
        .env("HOOK_LOG", hook_log(&a))
        .env("KEYROTATE_FAILPOINT_LOG", &steps_log)
        .status(0);
    let steps: Vec<String> = read(&steps_log)
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    for needed in [
        "ledger.connect",
        "ledger.lock",
        "ledger.domain_record",
        "ledger.admit",
        "ledger.confirm",
        "hook.create",
        "hook.set",
        "hook.test",
        "hook.finish",
        "ledger.committed",
        "ledger.close",
    ] {
        assert!(steps.iter().any(|s| s == needed), "no {needed} in {steps:?}");
    }
    for k in 1..=steps.len() {
        kill_then_other_host(&db, &a, &b, &format!("K{k}"), Some(k.to_string()), None);
    }
    for step in ["create", "set", "test", "finish"] {
        kill_then_other_host(&db, &a, &b, &format!("D-{step}"), None, Some(step));
    }
    eprintln!(
        "shared-ledger crash points covered: {} round trips and hook steps, and 4 kills mid-step",
        steps.len()
    );
}
