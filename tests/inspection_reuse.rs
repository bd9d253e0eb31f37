//! One inspection of the key store per run (issue 16): a run inspects its key store
//! once and reuses that inspection for its later looks (the plan recorded at
//! admission, the rotation), but only while nothing it read has changed. A change to
//! the folder between them, even one that keeps every file's size, is seen by the
//! rotation, exactly as if it had inspected afresh.

use std::path::Path;

use crate::common::{wait_for_step, Env};

/// A run paused after its admission (it has inspected the store twice by then: the
/// repair pass and the admission's plan), while the test changes the key folder.
fn paused_after_admission(env: &Env, log: &Path) -> std::process::Child {
    let child = env
        .rotate("sig")
        .args(["--force", "--run-id", "PAUSED"])
        .env("KEYROTATE_FAILPOINT_LOG", log)
        .env("KEYROTATE_FAILPOINTS", "audit.preflight=sleep(1500)")
        .spawn();
    wait_for_step(log, "audit.preflight");
    child
}

fn finished(child: std::process::Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_key_file_rewritten_in_place_with_the_same_size_after_admission_stops_the_rotation() {
    let env = Env::new();
    env.rotate("sig").status(0);
    // Another Ed25519 key: its file has exactly the same length as ours.
    let other = Env::new();
    other.rotate("sig").status(0);
    let theirs = std::fs::read(other.key_dir("sig").join("v000001.pem")).unwrap();
    let ours = env.key_dir("sig").join("v000001.pem");
    assert_eq!(std::fs::read(&ours).unwrap().len(), theirs.len());

    let log = env.path("steps.log");
    let child = paused_after_admission(&env, &log);
    // Same inode, same size, other bytes: only its change time tells.
    std::fs::write(&ours, &theirs).unwrap();
    let (code, text) = finished(child);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("fingerprint"), "{text}");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        theirs,
        "the substituted file is kept for review"
    );
    assert_eq!(env.key_files("sig"), ["v000001.pem"], "nothing was staged");
}

#[test]
fn a_file_planted_after_admission_is_judged_by_the_rotation() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let log = env.path("steps.log");
    let child = paused_after_admission(&env, &log);
    let planted = env.key_dir("sig").join("v000005.pem");
    std::fs::copy(env.key_dir("sig").join("v000001.pem"), &planted).unwrap();
    let (code, text) = finished(child);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("v000005.pem"), "{text}");
    assert!(planted.exists(), "unproven files are kept");
}

/// Runs `run` under `strace -f`, recording the file syscalls; `None` when strace
/// cannot run here.
fn traced(run: crate::common::Run<'_>, trace: &Path) -> Option<crate::common::Out> {
    if !crate::common::strace_works() {
        return None;
    }
    let prefix = format!(
        "exec strace -f -qq -e trace=%file,%desc -o '{}' \"$0\" \"$@\"",
        trace.display()
    );
    Some(run.shell_prefix(&prefix).output())
}

#[test]
fn a_steady_rotation_reads_the_key_folder_once_and_never_stats_destroyed_versions() {
    let env = Env::new();
    for _ in 0..4 {
        env.rotate("sig").arg("--force").status(0);
    }
    let trace = env.path("trace.txt");
    let Some(out) = traced(env.rotate("sig").arg("--force"), &trace) else {
        println!("SKIPPED: strace cannot trace a process here");
        return;
    };
    assert_eq!(out.code, 0, "{}", out.stderr);
    let trace = std::fs::read_to_string(&trace).unwrap();
    let dir = env.key_dir("sig");
    let reads = |name: &str| {
        let path = format!("\"{}\"", dir.join(name).display());
        trace
            .lines()
            .filter(|l| l.contains("openat(") && l.contains(&path) && l.contains("O_RDONLY"))
            .count()
    };
    // The inspection reads each once; the token lookup of a file-custody domain
    // reads the manifest once more (it names no token).
    assert_eq!(reads("keyring.json"), 2, "{trace}");
    assert_eq!(
        reads("v000004.pem"),
        1,
        "the active key, read once by the inspection\n{trace}"
    );
    // jwks.json too: the repair check and both publications compare with what the
    // inspection read, or with what the run itself wrote last.
    assert_eq!(reads("jwks.json"), 1, "{trace}");
    // The destroyed and retired versions have no file: nothing asks for one by name
    // (the cost of a tidy-up must not grow with the domain's history).
    for gone in ["v000001.pem", "v000002.pem", "v000003.pem"] {
        assert!(!trace.contains(gone), "{gone} named in\n{trace}");
    }
}
