//! A read-only command whose whole purpose is its output exits 3 (ABORTED) when that
//! output could not be written; `rotate` keeps the rotation's outcome.

use std::process::Stdio;

use crate::common::Env;

/// Runs with stdout on `/dev/full` (every write fails with ENOSPC): (code, stderr).
fn to_full_disk(run: crate::common::Run<'_>) -> Option<(i32, String)> {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").ok()?;
    let out = run
        .command()
        .stdout(Stdio::from(full))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    Some((
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn status_history_and_check_exit_3_when_stdout_cannot_be_written() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let Some((code, stderr)) = to_full_disk(env.rotate("p256")) else {
        println!("SKIPPED: /dev/full is not available here");
        return;
    };
    assert_eq!(code, 0, "rotate keeps its outcome: {stderr}");
    for args in [
        &["status"][..],
        &["status", "--domain", "sig"],
        &["status", "--output", "json"],
        &["history"],
        &["history", "--domain", "sig", "--output", "json"],
        &["check"],
    ] {
        let (code, stderr) = to_full_disk(env.cmd().args(args)).unwrap();
        assert_eq!(code, 3, "{args:?}: {stderr}");
        assert!(
            stderr.contains("stdout") && stderr.contains("no space"),
            "{args:?}: {stderr}"
        );
        // The same command with a working stdout succeeds.
        env.cmd().args(args).status(0);
    }
}
