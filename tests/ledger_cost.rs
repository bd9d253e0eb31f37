//! What the embedded ledger and the audit trail cost a rotation in system calls
//! (issue "Near the floor"): counted with `strace -f -y`, which names the file of each
//! descriptor. Each bound is what one steady-state rotation needs today; a change that
//! adds a read transaction or a read of the audit file per line shows here.

use crate::common::Env;

/// The system calls named in `trace` made by one forced rotation of `sig`, one line
/// each; `None` (after printing SKIPPED) when `strace` cannot run here.
fn traced_rotation(env: &Env, trace: &str, log: &str) -> Option<Vec<String>> {
    if !crate::common::strace_works() {
        println!("SKIPPED: strace is not installed or cannot trace here");
        return None;
    }
    let log = env.path(log);
    env.rotate("sig")
        .arg("--force")
        .shell_prefix(&format!(
            "exec strace -f -y -qq -e trace={trace} -o '{}' \"$0\" \"$@\"",
            log.display()
        ))
        .status(0);
    Some(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

/// Lines of `calls` on a file whose name ends with one of `names`.
fn on_files<'a>(calls: &'a [String], names: &[&str]) -> Vec<&'a String> {
    calls
        .iter()
        .filter(|l| names.iter().any(|n| l.contains(&format!("{n}>"))))
        .collect()
}

fn audit_lines(env: &Env) -> usize {
    std::fs::read_to_string(env.path("state/audit.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Each audit line continues the hash chain from the file's last line: a line that
/// fits in one block is found with one read (the block also tells whether the file
/// ends with a newline), not a one-byte read and then the block.
#[test]
fn each_audit_line_reads_the_trails_tail_once() {
    let env = Env::new();
    for _ in 0..3 {
        env.rotate("sig").arg("--force").status(0);
    }
    let before = audit_lines(&env);
    let Some(calls) = traced_rotation(&env, "pread64", "audit.strace") else {
        return;
    };
    let written = audit_lines(&env) - before;
    assert!(
        written >= 2,
        "a rotation writes its started and closing lines: {written}"
    );
    let reads = on_files(&calls, &["audit.jsonl"]);
    assert_eq!(
        reads.len(),
        written,
        "one read of the tail per appended line ({written} lines):\n{reads:#?}"
    );
}

/// The ledger's reads before admission (the domain's record, what the key store's
/// files owe to recent runs) run as few statements, so as few read transactions and
/// their locks (`fcntl` on the database and its `-shm` index), as the questions need:
/// the domain's four rows in two statements, not four.
#[test]
fn a_rotation_takes_few_ledger_locks() {
    let env = Env::new();
    for _ in 0..3 {
        env.rotate("sig").arg("--force").status(0);
    }
    let Some(calls) = traced_rotation(&env, "fcntl", "ledger.strace") else {
        return;
    };
    let locks = on_files(&calls, &["ledger.sqlite3", "ledger.sqlite3-shm", "ledger.sqlite3-wal"]);
    // 67 on this code (77 when the domain's record took four statements and the
    // provenance's known-run question one more).
    const BOUND: usize = 67;
    assert!(
        locks.len() <= BOUND,
        "{} lock calls on the ledger, more than {BOUND}:\n{}",
        locks.len(),
        locks.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
    );
}
