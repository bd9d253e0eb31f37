//! Attacks on issue 16's performance changes (one inspection per run, one timer
//! thread, lock files rewritten in place, the cheaper ledger and audit reads), each
//! through the real binary: what an on-call engineer, a hostile local user or a broken
//! disk can do to the folder, the lock files and the audit trail while a run is in
//! flight. Every test here either caught a bug (named in its comment) or pins the
//! behaviour that held.

use std::path::Path;
use std::process::Child;

use crate::common::{wait_for_step, Env};

fn finished(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn strace_works() -> bool {
    std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Bug caught: the lock file's length was taken when it was opened, before the
/// flock. A run that opened the file while a shorter record was in it, then waited
/// for its flock while another run wrote a longer one, wrote its own record over the
/// start and left the longer record's tail behind: the next refused run could not read
/// who held the lock. (strace delays the first flock of the run so the other run fits
/// in the gap between its open and its flock.)
#[test]
fn a_holder_record_written_after_a_longer_one_landed_between_open_and_flock_is_exact() {
    if !strace_works() {
        println!("SKIPPED: strace cannot trace a process here (it delays the flock)");
        return;
    }
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "S"]).status(0);
    let trace = env.path("a.trace");
    let log = env.path("a.steps");
    let prefix = format!(
        "exec strace -f -qq -e trace=openat,flock -e inject=flock:delay_enter=5000000:when=1 -o '{}' \"$0\" \"$@\"",
        trace.display()
    );
    let a = env
        .rotate("sig")
        .args(["--force", "--run-id", "A"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "audit.preflight=sleep(4000)")
        .shell_prefix(&prefix)
        .spawn();
    // A has opened the state lock file (holding S's short record) and waits at its flock.
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&trace).unwrap_or_default().contains("sig.lock") {
        assert!(start.elapsed().as_secs() < 20, "A never opened its lock file");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let long_id = "B".repeat(60);
    env.rotate("sig").args(["--force", "--run-id", &long_id]).status(0);
    wait_for_step(&log, "audit.preflight");
    // A holds the locks now: a refused run names it.
    let c = env.rotate("sig").args(["--force", "--run-id", "C"]).status(5);
    let text = c.stdout.clone() + &c.stderr;
    assert!(text.contains("run A "), "the holder is named: {text}");
    let (code, text) = finished(a);
    assert_eq!(code, 0, "{text}");
    for lock in [env.path("state/locks/sig.lock"), env.key_dir("sig").join(".lock")] {
        let bytes = std::fs::read_to_string(&lock).unwrap();
        let holder: serde_json::Value = serde_json::from_str(bytes.trim())
            .unwrap_or_else(|e| panic!("{}: not one record ({e}): {bytes:?}", lock.display()));
        assert_eq!(holder["run_id"], "A", "{}", lock.display());
        assert_eq!(bytes.lines().count(), 1, "{bytes:?}");
    }
}
