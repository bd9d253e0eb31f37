//! Hooks cannot escape their run: the deadline holds whatever a hook leaves behind
//! (children in another session holding its pipes), a hook dies with a killed
//! keyrotate (grandchildren included), survivors are found and named by the next run
//! and by `resolve`, and a stderr nobody reads never stalls a hook.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::Env;

/// A hook that logs `begin`/`tick`/`end RUN STEP TIME` and, driven by files named
/// `<behaviour>.<step>` in its folder, leaves a child in a new session holding its
/// pipes (`setsid-bg`), waits for one (`setsid-wait`), ignores SIGTERM
/// (`ignore-term`), leaves a child in its own group (`group-child`), prints 200 kB
/// (`loud`) or works for 3 s (`slow`).
pub const HOOK: &str = r#"#!/bin/sh
here=$(dirname "$0")
log="$here/hook.log"
now() { date +%s.%N; }
on() { [ -e "$here/$1.$KEYROTATE_STEP" ]; }
echo "begin $KEYROTATE_RUN_ID $KEYROTATE_STEP $(now)" >> "$log"
echo $$ > "$here/hook.pid"
echo $PPID > "$here/watcher.pid"
if on ignore-term; then trap '' TERM; fi
if on setsid-bg; then setsid sleep 30 & echo $! > "$here/grandchild.pid"; fi
if on group-child; then sleep 60 & echo $! > "$here/groupchild.pid"; fi
if on setsid-wait; then setsid sleep 30 & echo $! > "$here/grandchild.pid"; wait; fi
if on loud; then head -c 200000 /dev/zero | tr '\0' 'x'; fi
if on slow; then
  i=0
  while [ $i -lt 30 ]; do echo "tick $KEYROTATE_RUN_ID $KEYROTATE_STEP $(now)" >> "$log"; sleep 0.1; i=$((i+1)); done
fi
echo "end $KEYROTATE_RUN_ID $KEYROTATE_STEP $(now)" >> "$log"
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
command = ["./hooks/h"]
min_interval = "0s"
"#,
    );
    std::fs::create_dir(env.path("hooks")).unwrap();
    std::fs::write(env.path("hooks/h"), HOOK).unwrap();
    std::fs::set_permissions(env.path("hooks/h"), std::fs::Permissions::from_mode(0o755)).unwrap();
    env
}

fn flag(env: &Env, name: &str) {
    std::fs::write(env.path(&format!("hooks/{name}")), "").unwrap();
}

fn unflag(env: &Env, name: &str) {
    std::fs::remove_file(env.path(&format!("hooks/{name}"))).unwrap();
}

fn pid_file(env: &Env, name: &str) -> i32 {
    std::fs::read_to_string(env.path(&format!("hooks/{name}")))
        .unwrap_or_else(|e| panic!("hooks/{name}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// Whether a process runs (zombies, which some containers' init never reaps, do not).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn gone_within(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn wait_for_line(log: &std::path::Path, needle: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(20), "never saw {needle:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Per run id, the first and last time its hook wrote to the log.
pub fn intervals(log: &str) -> Vec<(String, f64, f64)> {
    let mut out: Vec<(String, f64, f64)> = Vec::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (run, t) = (f[1].to_string(), f[3].parse::<f64>().unwrap());
        match out.iter_mut().find(|i| i.0 == run) {
            Some(i) => {
                i.1 = i.1.min(t);
                i.2 = i.2.max(t);
            }
            None => out.push((run, t, t)),
        }
    }
    out
}

/// No two runs' hooks ever ran at the same time.
#[track_caller]
pub fn assert_no_overlap(log: &str) {
    let iv = intervals(log);
    for (i, a) in iv.iter().enumerate() {
        for b in &iv[i + 1..] {
            assert!(
                a.2 < b.1 || b.2 < a.1,
                "the hooks of {} ({:.3}..{:.3}) and {} ({:.3}..{:.3}) overlapped:\n{log}",
                a.0,
                a.1,
                a.2,
                b.0,
                b.1,
                b.2
            );
        }
    }
}

#[test]
fn a_child_in_another_session_holding_the_pipes_does_not_hold_the_run() {
    let env = env();
    flag(&env, "setsid-bg.create");
    let start = Instant::now();
    env.cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "4s", "--run-id", "S1"])
        .status(0);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "the run took {took:?}");
    let grandchild = pid_file(&env, "grandchild.pid");
    assert!(
        gone_within(grandchild, Duration::from_secs(1)),
        "the step's child in another session ({grandchild}) outlived the step"
    );
    let log = std::fs::read_to_string(env.path("hooks/hook.log")).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("end S1")).count(), 4, "{log}");
}

#[test]
fn a_step_waiting_on_a_child_in_another_session_ends_at_the_deadline() {
    let env = env();
    flag(&env, "setsid-wait.set");
    let start = Instant::now();
    let out = env
        .cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "3s", "--run-id", "S2"])
        .status(4);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3) + Duration::from_secs(3),
        "the run took {took:?}"
    );
    assert!(out.stdout.contains("killed at the deadline"), "{}", out.stdout);
    let grandchild = pid_file(&env, "grandchild.pid");
    assert!(gone_within(grandchild, Duration::from_secs(1)), "{grandchild} survived");
    // No step starts after the deadline.
    let log = std::fs::read_to_string(env.path("hooks/hook.log")).unwrap();
    assert!(
        !log.contains(" test ") && !log.contains(" finish "),
        "a step ran after the deadline:\n{log}"
    );
    let row = env.last_row();
    assert_eq!(
        (row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("needs_review"), Some(4))
    );
}

#[test]
fn a_killed_keyrotate_takes_its_hook_and_grandchildren_with_it() {
    let env = env();
    flag(&env, "slow.set");
    flag(&env, "setsid-bg.set");
    let log = env.path("hooks/hook.log");
    let mut child = env.rotate("pw").args(["--run-id", "K1"]).spawn();
    wait_for_line(&log, "tick K1 set");
    let (hook, grandchild) = (pid_file(&env, "hook.pid"), pid_file(&env, "grandchild.pid"));
    assert!(alive(hook) && alive(grandchild));
    // SAFETY: SIGKILL to the keyrotate process this test started (as Control-M's Kill).
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let _ = child.wait();
    assert!(
        gone_within(hook, Duration::from_secs(2)),
        "the hook {hook} outlived keyrotate"
    );
    assert!(
        gone_within(grandchild, Duration::from_secs(2)),
        "the hook's child in another session ({grandchild}) outlived keyrotate"
    );
    eprintln!("hook tree gone {:?} after the kill", killed.elapsed());

    unflag(&env, "slow.set");
    unflag(&env, "setsid-bg.set");
    let out = env.rotate("pw").args(["--run-id", "K2"]).status(4);
    assert!(
        out.stdout.contains("K1") && out.stdout.contains("'set' was running") && out.stdout.contains("died"),
        "{}",
        out.stdout
    );
    env.resolve("pw", "K1", "set applied; checked").status(0);
    env.rotate("pw").args(["--run-id", "K3"]).status(0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("end K1 set"), "the killed set went on:\n{text}");
    assert_no_overlap(&text);
}

#[test]
fn a_hook_that_outlives_keyrotate_and_its_watcher_is_named_and_blocks_resolve() {
    let env = env();
    // Keyrotate and the watcher are both SIGKILLed (as a kill of every process of the
    // job would): the hook's own process dies with its watcher (pdeathsig), but a child
    // it left in its group lives on, and only the ledger's record can find it.
    flag(&env, "group-child.set");
    flag(&env, "slow.set");
    let log = env.path("hooks/hook.log");
    let mut child = env.rotate("pw").args(["--run-id", "W1"]).spawn();
    wait_for_line(&log, "tick W1 set");
    let watcher = pid_file(&env, "watcher.pid");
    let survivor = pid_file(&env, "groupchild.pid");
    // SAFETY: signals to processes this test started (keyrotate and its watcher):
    // both stopped first, so that neither sees the other die and cleans up.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGSTOP);
        libc::kill(watcher, libc::SIGSTOP);
        libc::kill(watcher, libc::SIGKILL);
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    let hook = pid_file(&env, "hook.pid");
    assert!(
        gone_within(hook, Duration::from_secs(2)),
        "pdeathsig did not end the hook {hook}"
    );
    assert!(alive(survivor), "the test needs a survivor");
    unflag(&env, "group-child.set");
    unflag(&env, "slow.set");

    let dry = env.rotate("pw").arg("--dry-run").status(4);
    assert!(dry.stdout.contains("still running"), "{}", dry.stdout);
    let out = env.rotate("pw").args(["--run-id", "W2"]).status(4);
    assert!(
        out.stdout.contains("W1") && out.stdout.contains("still running") && out.stdout.contains(&format!("-{hook}")),
        "{}",
        out.stdout
    );
    let out = env.resolve("pw", "W1", "checked").status(5);
    assert!(
        out.stderr.contains("still running") && out.stderr.contains(&format!("process group {hook}")),
        "{}",
        out.stderr
    );
    // What the runbook says: stop the group, then resolve.
    // SAFETY: SIGTERM to the surviving process group this test's hook left.
    unsafe { libc::killpg(hook, libc::SIGTERM) };
    assert!(gone_within(survivor, Duration::from_secs(2)));
    env.resolve("pw", "W1", "stopped the leftover hook; set verified")
        .status(0);
    env.rotate("pw").args(["--run-id", "W3"]).status(0);
}

#[test]
fn a_stderr_nobody_reads_does_not_stall_a_hook() {
    let env = env();
    flag(&env, "loud.create");
    flag(&env, "loud.test");
    let mut fds = [0; 2];
    // SAFETY: a fresh pipe whose two ends this test owns from here.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just returned by pipe(2) and are owned by nothing else.
    let (read_end, write_end) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
    let start = Instant::now();
    let mut cmd = env
        .cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "8s", "--run-id", "P1"])
        .command();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::from(write_end))
        .output()
        .unwrap();
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(took < Duration::from_secs(5), "the run took {took:?}");
    let tail = env.rows();
    assert_eq!(tail.last().unwrap()["state"], "succeeded");
    let conn = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    let end: String = conn
        .query_row(
            "SELECT detail FROM rotation_events WHERE run_id = 'P1' AND phase = 'hook.test.end'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(end.contains("not passed to stderr"), "{end}");
    // What did reach stderr is whole lines, and keyrotate's own lines fit after it.
    let mut got = Vec::new();
    let mut read_end = read_end;
    drop(cmd);
    read_end.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("[hook create] x"), "{}", &text[..text.len().min(200)]);
    assert!(
        text.contains("ROTATED") || text.contains("hook steps"),
        "keyrotate's last log lines are missing"
    );
}

#[test]
fn a_slow_stderr_reader_still_gets_all_hook_output() {
    let env = env();
    flag(&env, "loud.create");
    let mut child = env
        .cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "30s", "--run-id", "SLOW1"])
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        // A reader slower than the hook writes: 8 KiB every 20 ms.
        std::thread::sleep(Duration::from_millis(20));
        match stderr.read(&mut buf).unwrap() {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = String::from_utf8_lossy(&got);
    let passed: usize = text
        .lines()
        .filter_map(|l| l.strip_prefix("[hook create] "))
        .map(|l| l.matches('x').count())
        .sum();
    assert_eq!(passed, 200_000, "hook output was lost for a reader that was only slow");
    assert!(
        !text.contains("not shown"),
        "{}",
        &text[text.len().saturating_sub(500)..]
    );
}

#[test]
fn a_killed_watcher_leaves_nothing_of_the_hook_behind() {
    let env = env();
    flag(&env, "slow.set");
    flag(&env, "setsid-bg.set");
    let log = env.path("hooks/hook.log");
    let child = env.rotate("pw").args(["--run-id", "WK1"]).spawn();
    wait_for_line(&log, "tick WK1 set");
    let (watcher, grandchild) = (pid_file(&env, "watcher.pid"), pid_file(&env, "grandchild.pid"));
    // SAFETY: SIGKILL to the watcher process this test's run started (an OOM kill).
    unsafe { libc::kill(watcher, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(stdout.contains("watcher died"), "{stdout}");
    assert!(
        gone_within(grandchild, Duration::from_secs(2)),
        "the hook's child in another session ({grandchild}) outlived its watcher"
    );
    assert!(!alive(pid_file(&env, "hook.pid")));
}

#[cfg(feature = "failpoints")]
#[test]
fn no_step_starts_after_the_deadline() {
    let env = env();
    let steps = env.path("steps.log");
    env.rotate("pw")
        .args(["--run-id", "N0"])
        .env("KEYROTATE_FAILPOINT_LOG", &steps)
        .status(0);
    let names: Vec<String> = std::fs::read_to_string(&steps)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    // The ledger write that records the end of `set` comes two steps before `test`
    // starts (then the event `hook.test.start`, then the step itself).
    let test_at = names.iter().position(|n| n == "hook.test").unwrap();
    assert_eq!(names[test_at - 2], "ledger.event", "{names:?}");
    // 1-based index of that write in the next run, which finds the ledger's WAL in
    // place and so has no `ledger.dirsync` step.
    let set_end = test_at - 1 - names[..test_at].iter().filter(|n| *n == "ledger.dirsync").count();
    let out = env
        .cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "3s", "--run-id", "N1"])
        .env("KEYROTATE_FAILPOINTS", format!("{set_end}=sleep(3500)"))
        .status(4);
    assert!(
        out.stdout.contains("reached before hook step 'test' could start"),
        "{}",
        out.stdout
    );
    let log = std::fs::read_to_string(env.path("hooks/hook.log")).unwrap();
    assert!(log.contains("end N1 set"), "{log}");
    assert!(
        !log.contains("N1 test") && !log.contains("N1 finish"),
        "a step started after the deadline:\n{log}"
    );
}
