//! What every invocation pays before the command's work (issue 16, process start).
//!
//! Costs are not asserted in time (the machine's load changes them); what is asserted
//! is the absence of work that start-up used to do, seen from outside the process.

use std::process::{Command, Stdio};

use crate::common::{strace_works, Env};

/// A rotation's threads (the deadline watchdog, hook watchers) allocate in the main
/// malloc arena. glibc would otherwise give the first allocating thread an arena of
/// its own: a 64 MiB reservation mapped at twice that size (PROT_NONE, MAP_NORESERVE)
/// and trimmed, then page faults for its first pages, in every process.
#[test]
fn a_rotation_creates_no_second_malloc_arena() {
    if !strace_works() {
        println!("SKIPPED: strace is not installed or ptrace is not allowed here");
        return;
    }
    let env = Env::new();
    let trace = env.path("strace.log");
    let run = env.rotate("sig").command();
    let mut c = Command::new("strace");
    c.args(["-f", "-e", "trace=mmap,clone,clone3", "-o"])
        .arg(&trace)
        .arg(run.get_program())
        .args(run.get_args())
        .current_dir(env.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in run.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let status = c.status().unwrap();
    assert_eq!(status.code(), Some(0), "the rotation under strace failed");
    let log = std::fs::read_to_string(&trace).unwrap();
    let arenas: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mmap(") && l.contains("PROT_NONE") && l.contains("MAP_NORESERVE"))
        .collect();
    assert!(
        arenas.is_empty(),
        "a thread reserved a malloc arena of its own:\n{}",
        arenas.join("\n")
    );
}

/// SQLite is built without global allocation statistics (`.cargo/config.toml`), so its
/// malloc and free take no global mutex (about 6% of a rotation's instructions). Read
/// from the SQLite these tests link, which the same build flags built.
#[test]
fn sqlite_is_built_without_allocation_statistics() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    let mut stmt = conn.prepare("PRAGMA compile_options").unwrap();
    let options: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
        "SQLite keeps allocation statistics: {options:?}"
    );
}
