//! One timer thread per run, and lock files whose holder record is rewritten in place.

use std::path::Path;

use crate::common::{wait_for_step, Env};

/// The threads of a live process other than its main thread, by thread id.
fn other_threads(pid: u32) -> Vec<String> {
    let mut tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|t| *t != pid.to_string())
        .collect();
    tids.sort();
    tids
}

/// The admission backstop (armed at the first read of the key store) and the deadline
/// watchdog (armed after admission) are one timer thread: the thread that watches the
/// admission's repair is the one that still watches the rotation.
#[test]
fn a_rotation_runs_one_timer_thread_from_its_first_read_to_its_commit() {
    if !Path::new("/proc/self/task").exists() {
        eprintln!("SKIPPED a_rotation_runs_one_timer_thread_from_its_first_read_to_its_commit: no /proc/PID/task");
        return;
    }
    let env = Env::new();
    env.rotate("sig").status(0);
    // A tidy-up left undone: the next run repairs it while the backstop watches.
    env.rotate("sig")
        .arg("--force")
        .env("KEYROTATE_FAILPOINTS", "current.symlink=error")
        .status(0);
    let log = env.path("steps.log");
    let mut child = env
        .rotate("sig")
        .arg("--force")
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "1=sleep(1500),stage.fsync=sleep(1500)")
        .spawn();
    wait_for_step(&log, "1 current.symlink");
    let in_admission = other_threads(child.id());
    wait_for_step(&log, "stage.fsync");
    let in_rotation = other_threads(child.id());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(in_admission.len(), 1, "threads during the admission: {in_admission:?}");
    assert_eq!(in_rotation, in_admission, "a second thread for the watchdog");
}

/// A record left by an earlier holder (a longer run id, a killed run's leftovers, junk)
/// never shows through the next holder's shorter record: a refused run names the
/// holder that is running now.
#[test]
fn a_busy_run_names_the_current_holder_after_a_longer_record() {
    let env = Env::new();
    let long_id = format!("LONG-{}", "x".repeat(120));
    env.rotate("sig").args(["--run-id", &long_id]).status(0);
    let state_lock = env.path("state/locks/sig.lock");
    let ks_lock = env.key_dir("sig").join(".lock");
    assert!(std::fs::read_to_string(&state_lock).unwrap().contains(&long_id));
    // And a killed run's record trailed by junk, longer still, in the key store's.
    std::fs::write(
        &ks_lock,
        format!(
            "{{\"run_id\":\"DEAD-1\",\"pid\":999999,\"host\":\"gone\",\"started_at\":\"2026-01-01T00:00:00Z\"}}\n{}",
            "#".repeat(9000)
        ),
    )
    .unwrap();

    let log = env.path("steps.log");
    let mut holder = env
        .rotate("sig")
        .args(["--force", "--run-id", "B-1"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "stage.fsync=sleep(3000)")
        .spawn();
    wait_for_step(&log, "stage.fsync");
    for lock in [&state_lock, &ks_lock] {
        let text = std::fs::read_to_string(lock).unwrap();
        let record: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not exactly one record ({e}): {text:?}", lock.display()));
        assert_eq!(record["run_id"], "B-1", "{}", lock.display());
        assert_eq!(record["pid"], holder.id(), "{}", lock.display());
        assert!(text.ends_with("}\n"), "{text:?}");
    }
    let out = env.rotate("sig").args(["--force", "--run-id", "C-1"]).status(5);
    assert!(
        out.stdout.contains("run B-1") && out.stdout.contains(&format!("pid {}", holder.id())),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("LONG-") && !out.stdout.contains("DEAD-1"),
        "{}",
        out.stdout
    );
    // The dry run reads the same record.
    let dry = env.rotate("sig").args(["--force", "--dry-run"]).status(5);
    assert!(dry.stdout.contains("run B-1"), "{}", dry.stdout);
    assert_eq!(holder.wait().unwrap().code(), Some(0));

    // A shorter record after that one (the same length or longer is the common case,
    // written without changing the length) reads back exactly too.
    env.rotate("sig").args(["--force", "--run-id", "D"]).status(0);
    for lock in [&state_lock, &ks_lock] {
        let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lock).unwrap()).unwrap();
        assert_eq!(record["run_id"], "D", "{}", lock.display());
    }
}
