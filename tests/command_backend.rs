//! The command backend: small hook scripts drive every step outcome, the deadline kill
//! (children included), dry runs, and stale detection when keyrotate dies mid-step.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::common::Env;

/// A hook that logs each step and, driven by files in its folder, fails, hangs (with a
/// child), prints a lot, kills itself, or kills keyrotate (its parent is keyrotate's
/// hook watcher, whose parent is keyrotate).
const HOOK: &str = r#"#!/bin/sh
here=$(dirname "$0")
echo "$KEYROTATE_STEP $KEYROTATE_DOMAIN $KEYROTATE_RUN_ID $KEYROTATE_DEADLINE $KEYROTATE_STATE_DIR $*" >> "$here/steps.log"
echo "hook says: step $KEYROTATE_STEP"
[ -e "$here/fail.$KEYROTATE_STEP" ] && { echo "cannot do $KEYROTATE_STEP" >&2; exit 7; }
[ -e "$here/hang.$KEYROTATE_STEP" ] && { sleep 300 & echo $! > "$here/child.pid"; wait; }
[ -e "$here/loud.$KEYROTATE_STEP" ] && head -c 3000000 /dev/zero | tr '\0' 'x'
[ -e "$here/suicide.$KEYROTATE_STEP" ] && kill -9 $$
[ -e "$here/killparent.$KEYROTATE_STEP" ] && { kill -9 $(awk '{print $4}' /proc/$PPID/stat); sleep 1; }
exit 0
"#;

fn env() -> Env {
    let env = Env::with_config(
        r#"
[state]
dir = "state"
[host]
pool = "pool-a"
[domains.pw]
designated_pool = "pool-a"
backend = "command"
command = ["./hooks/pg", "--role", "orders"]
min_interval = "0s"
"#,
    );
    std::fs::create_dir(env.path("hooks")).unwrap();
    std::fs::write(env.path("hooks/pg"), HOOK).unwrap();
    std::fs::set_permissions(env.path("hooks/pg"), std::fs::Permissions::from_mode(0o755)).unwrap();
    env
}

fn steps(env: &Env) -> Vec<String> {
    std::fs::read_to_string(env.path("hooks/steps.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

fn flag(env: &Env, name: &str) {
    std::fs::write(env.path(&format!("hooks/{name}")), "").unwrap();
}

fn events(env: &Env, run_id: &str) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    let mut stmt = conn
        .prepare("SELECT phase, coalesce(detail, '') FROM rotation_events WHERE run_id = ?1 ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; kill has no memory
    // preconditions.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn runs_the_four_steps_in_order_with_the_documented_environment() {
    let env = env();
    let out = env.rotate("pw").args(["--run-id", "C1"]).status(0);
    assert_eq!(steps(&env), ["create", "set", "test", "finish"]);
    let first = std::fs::read_to_string(env.path("hooks/steps.log")).unwrap();
    let fields: Vec<&str> = first.lines().next().unwrap().split(' ').collect();
    assert_eq!(&fields[1..3], ["pw", "C1"]);
    assert!(
        fields[3].ends_with('Z') && fields[3].contains('T'),
        "deadline {}",
        fields[3]
    );
    assert!(fields[4].ends_with("/state"));
    assert_eq!(&fields[5..], ["--role", "orders"]);
    assert!(
        out.stderr.contains("[hook create] hook says: step create"),
        "{}",
        out.stderr
    );
    let phases: Vec<String> = events(&env, "C1").into_iter().map(|e| e.0).collect();
    for p in [
        "hook.create.start",
        "hook.create.end",
        "staged",
        "hook.set.start",
        "hook.finish.end",
        "committed",
        "succeeded",
    ] {
        assert!(phases.iter().any(|x| x == p), "no {p} event in {phases:?}");
    }
    let end = events(&env, "C1")
        .into_iter()
        .find(|e| e.0 == "hook.test.end")
        .unwrap()
        .1;
    assert!(
        end.starts_with("exit 0 after") && end.contains("hook says: step test"),
        "{end}"
    );
    let row = env.last_row();
    assert_eq!(
        (row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("succeeded"), Some(0))
    );
}

#[test]
fn a_failed_create_aborts_and_later_steps_block_the_domain() {
    for (step, code) in [("create", 3), ("set", 4), ("test", 4), ("finish", 4)] {
        let env = env();
        flag(&env, &format!("fail.{step}"));
        let out = env.rotate("pw").args(["--run-id", "F1"]).status(code);
        assert!(
            out.stdout.contains(&format!("hook step '{step}' failed (exit 7)")),
            "{}",
            out.stdout
        );
        let ran = steps(&env);
        assert_eq!(ran.last().unwrap(), step, "steps after a failure must not run: {ran:?}");
        let tail = events(&env, "F1")
            .into_iter()
            .find(|e| e.0 == format!("hook.{step}.end"))
            .unwrap()
            .1;
        assert!(tail.contains(&format!("cannot do {step}")), "{tail}");
        std::fs::remove_file(env.path(&format!("hooks/fail.{step}"))).unwrap();
        if code == 3 {
            assert_eq!(env.last_row()["state"], "aborted");
            env.rotate("pw").status(0);
        } else {
            assert_eq!(env.last_row()["state"], "needs_review");
            env.rotate("pw").status(4);
            env.cmd().args(["status"]).status(4);
            env.resolve("pw", "F1", "role password verified").status(0);
            env.rotate("pw").status(0);
        }
    }
}

#[test]
fn a_hung_step_and_its_children_are_killed_at_the_deadline() {
    for (step, code) in [("create", 8), ("set", 4)] {
        let env = env();
        flag(&env, &format!("hang.{step}"));
        let start = Instant::now();
        let out = env
            .cmd()
            .args(["rotate", "--domain", "pw", "--deadline", "2s"])
            .status(code);
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(2) + Duration::from_secs(3),
            "{step}: returned after {took:?}"
        );
        assert!(out.stdout.contains("killed at the deadline"), "{}", out.stdout);
        let child: i32 = std::fs::read_to_string(env.path("hooks/child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!pid_alive(child), "{step}: the hook's child {child} survived");
        let row = env.last_row();
        assert_eq!(row["exit_code"], code);
        assert!(!row["ended_at"].is_null());
    }
}

#[test]
fn hooks_that_misbehave_get_a_clear_outcome() {
    let env = env();
    flag(&env, "loud.create");
    let out = env.rotate("pw").args(["--run-id", "L1"]).status(0);
    assert!(out.stderr.contains("not shown"), "no truncation notice");
    assert!(
        out.stderr.len() < 1_000_000,
        "stderr carried {} bytes",
        out.stderr.len()
    );
    let tail = events(&env, "L1")
        .into_iter()
        .find(|e| e.0 == "hook.create.end")
        .unwrap()
        .1;
    assert!(tail.len() < 4096, "tail of {} bytes", tail.len());

    let env2 = env_with_flag("suicide.create");
    let out = env2.rotate("pw").status(3);
    assert!(out.stdout.contains("killed by signal 9"), "{}", out.stdout);
}

fn env_with_flag(name: &str) -> Env {
    let env = env();
    flag(&env, name);
    env
}

#[test]
fn a_missing_or_unsafe_program_is_refused_before_anything_runs() {
    let env = env();
    std::fs::set_permissions(env.path("hooks/pg"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.rotate("pw").status(2);
    assert!(
        out.stderr.contains("domains.pw.command") && out.stderr.contains("not an executable"),
        "{}",
        out.stderr
    );
    env.rotate("pw").arg("--dry-run").status(2);
    std::fs::set_permissions(env.path("hooks/pg"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = env.rotate("pw").status(3);
    assert!(out.stdout.contains("writable by group or others"), "{}", out.stdout);
    env.rotate("pw").arg("--dry-run").status(3);
    let out = env.cmd().arg("check").status(2);
    assert!(out.stdout.contains("domains.pw.command"), "{}", out.stdout);
    std::fs::remove_file(env.path("hooks/pg")).unwrap();
    let out = env.rotate("pw").status(2);
    assert!(out.stderr.contains("no such file"), "{}", out.stderr);
    assert!(steps(&env).is_empty());
}

#[test]
fn a_dry_run_runs_no_hook() {
    let env = env();
    let before = env.snapshot();
    let out = env.rotate("pw").args(["--dry-run", "--output", "json"]).status(0);
    let plan = out.json()["plan"].to_string();
    assert!(
        plan.contains("KEYROTATE_STEP=create") && plan.contains("KEYROTATE_STEP=finish"),
        "{plan}"
    );
    assert!(steps(&env).is_empty(), "a dry run ran the hook");
    env.assert_unchanged(&before, "a dry run");
}

#[test]
fn keyrotate_killed_during_set_is_caught_as_stale_naming_the_step() {
    let env = env();
    flag(&env, "killparent.set");
    let out = env.rotate("pw").args(["--run-id", "K1"]).output();
    assert_eq!(out.code, 137);
    std::thread::sleep(Duration::from_millis(1200));
    std::fs::remove_file(env.path("hooks/killparent.set")).unwrap();
    let out = env.rotate("pw").status(4);
    assert!(
        out.stdout.contains("K1") && out.stdout.contains("hook step 'set' was running"),
        "{}",
        out.stdout
    );
    env.resolve("pw", "K1", "set was applied; verified").status(0);
    env.rotate("pw").status(0);
}
