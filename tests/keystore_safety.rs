//! Never lose a key: what the key store may delete, repair and publish when its
//! manifest, its ledger or a run's deadline do not go as planned (DESIGN 4.4 and 5).
//! Every test drives the real binary; the ones that stop a run at a chosen step need
//! the `failpoints` build.

use std::path::PathBuf;

use crate::common::Env;

/// The `kid`s in jwks.json, sorted.
fn kids(env: &Env, domain: &str) -> Vec<String> {
    let mut k = env.published_kids(domain);
    k.sort();
    k
}

/// The `kid`s every non-destroyed version of keyring.json must have, sorted.
fn live_kids(env: &Env, domain: &str) -> Vec<String> {
    let mut k: Vec<String> = env.manifest(domain)["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] != "destroyed")
        .map(|v| {
            let fp = v["fingerprint"].as_str().unwrap().trim_start_matches("sha256:");
            format!("v{:06}-{}", v["version"].as_u64().unwrap(), &fp[..8])
        })
        .collect();
    k.sort();
    k
}

fn current(env: &Env, domain: &str) -> String {
    std::fs::read_link(env.key_dir(domain).join("current.pem"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Everything under keys/ except the key store's lock file (which names its last
/// holder and is not key state).
fn key_store(env: &Env) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut s = env.snapshot();
    s.retain(|p, _| p.starts_with("keys") && !p.ends_with(".lock"));
    s
}

/// v1..v3 of `sig` (retain = 2: the next rotation destroys v1).
fn three_versions() -> Env {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    env.rotate("sig").arg("--force").status(0);
    env
}

fn row(env: &Env, run_id: &str) -> serde_json::Value {
    env.rows()
        .into_iter()
        .find(|r| r["run_id"] == run_id)
        .unwrap_or_else(|| panic!("no row {run_id}"))
}

// ---- item 1: nothing is deleted that the store cannot prove is garbage ----------------

#[test]
fn a_deleted_keyring_json_keeps_every_key_file_and_needs_review() {
    let env = three_versions();
    std::fs::remove_file(env.key_dir("sig").join("keyring.json")).unwrap();
    let before = key_store(&env);
    // The dry run predicts it...
    let dry = env.rotate("sig").args(["--force", "--dry-run"]).status(4);
    assert!(dry.stdout.contains("v000003.pem"), "{}", dry.stdout);
    // ...and the real run stops, naming every file, deleting none.
    let out = env.rotate("sig").args(["--force", "--run-id", "LOST"]).status(4);
    // (Only the active v3 has a file: retired signature keys keep no private half.)
    for f in env.key_files("sig") {
        assert!(out.stdout.contains(&f), "{f} not named: {}", out.stdout);
    }
    assert!(out.stdout.contains("nothing was changed"), "{}", out.stdout);
    assert_eq!(key_store(&env), before, "the key store was changed");
    assert_eq!(row(&env, "LOST")["state"], "needs_review");
    assert_eq!(env.audit().pop().unwrap()["event"], "rotation.needs_review");
    // Blocked until reviewed, and still not acted on after the review while the files
    // stay unexplained.
    env.rotate("sig").arg("--force").status(4);
    env.resolve("sig", "LOST", "keyring.json is being restored").status(0);
    env.rotate("sig").args(["--force", "--run-id", "STILL"]).status(4);
    assert_eq!(key_store(&env), before, "the key store was changed");
}

#[test]
fn an_older_keyring_json_from_a_backup_is_reported_and_nothing_is_rolled_back() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let backup = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    env.rotate("sig").arg("--force").status(0);
    env.rotate("sig").arg("--force").status(0);
    let jwks_before = kids(&env, "sig");
    let latest = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    std::fs::write(env.key_dir("sig").join("keyring.json"), &backup).unwrap();
    let before = key_store(&env);
    let out = env.rotate("sig").args(["--force", "--run-id", "OLD"]).status(4);
    // The backup's active v1 has no private half any more (retired since, DESIGN 11):
    // the run names the file the old copy expects.
    assert!(out.stdout.contains("v000001.pem"), "{}", out.stdout);
    assert_eq!(key_store(&env), before, "the key store was changed");
    // No "repair" from the old copy: current.pem and jwks.json still serve v3.
    assert_eq!(current(&env, "sig"), "v000003.pem");
    assert_eq!(kids(&env, "sig"), jwks_before);
    // The runbook's repair: put the latest keyring.json back, review, rotate.
    std::fs::write(env.key_dir("sig").join("keyring.json"), &latest).unwrap();
    env.resolve("sig", "OLD", "restored the latest keyring.json").status(0);
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.manifest("sig")["primary"], 4);
    assert_eq!(env.key_files("sig"), ["v000004.pem"]);
}

#[test]
fn a_leftover_its_run_recorded_as_staged_and_never_committed_is_swept() {
    let env = Env::new();
    env.rotate("sig").status(0);
    // The run fails before its commit and cannot even remove what it staged.
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "ABORTED-1"])
        .env("KEYROTATE_FAILPOINTS", "jwks.create=error,unstage.unlink=error")
        .status(3);
    assert!(out.stdout.contains("jwks.json"), "{}", out.stdout);
    assert_eq!(env.key_files("sig"), ["v000001.pem", "v000002.pem"]);
    let dry = env.rotate("sig").args(["--force", "--dry-run"]).status(0);
    assert!(dry.stdout.contains("sweep: remove v000002.pem"), "{}", dry.stdout);
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
}

#[test]
fn a_deleted_ledger_does_not_unblock_a_blocked_domain() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "FIRST"]).status(0);
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "stage.create=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    env.rotate("sig").arg("--force").status(4); // blocked by the stale KILLED
                                                // "Let the tool start afresh": delete the ledger.
    for f in ["ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"] {
        let _ = std::fs::remove_file(env.path("state").join(f));
    }
    let before = key_store(&env);
    let dry = env.rotate("sig").args(["--force", "--dry-run"]).status(4);
    assert!(dry.stdout.contains("does not know"), "{}", dry.stdout);
    let out = env.rotate("sig").args(["--force", "--run-id", "FRESH"]).status(4);
    assert!(
        out.stdout.contains("FIRST") && out.stdout.contains("does not know"),
        "{}",
        out.stdout
    );
    assert_eq!(key_store(&env), before, "the key store was changed");
    // The run that found it blocks the domain; its review adopts the key store.
    assert_eq!(row(&env, "FRESH")["state"], "needs_review");
    env.rotate("sig").arg("--force").status(4);
    let out = env
        .resolve("sig", "FRESH", "ledger was lost; key store checked")
        .status(0);
    assert!(out.stdout.contains("adopted"), "{}", out.stdout);
    assert_eq!(env.manifest("sig")["committed_by_run"], "FRESH");
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.manifest("sig")["primary"], 2);
}

// ---- item 2: jwks.json is never rolled back after the commit ------------------------

#[test]
fn an_error_after_the_commit_never_republishes_the_old_key_set() {
    for failpoint in ["ledger.committed=error", "commit.dirsync=error"] {
        let env = three_versions();
        let out = env
            .rotate("sig")
            .args(["--force", "--run-id", "LATE-ERROR"])
            .env("KEYROTATE_FAILPOINTS", failpoint)
            .status(4);
        assert_eq!(env.manifest("sig")["primary"], 4, "{failpoint}: {}", out.stdout);
        let published = kids(&env, "sig");
        for kid in live_kids(&env, "sig") {
            assert!(
                published.contains(&kid),
                "{failpoint}: jwks.json lacks {kid} of the committed manifest: {published:?}"
            );
        }
    }
}

// ---- item 3: a crash past the commit is repaired by the next invocation --------------

fn killed_after_the_commit() -> Env {
    let env = three_versions();
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "K"])
        .env("KEYROTATE_FAILPOINTS", "ledger.committed=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert_eq!(env.manifest("sig")["primary"], 4);
    assert_eq!(current(&env, "sig"), "v000003.pem", "the tidy-up should not have run");
    env
}

fn assert_whole(env: &Env, context: &str) {
    assert_eq!(current(env, "sig"), "v000004.pem", "{context}: current.pem");
    assert_eq!(env.key_files("sig"), env.live_files("sig"), "{context}: key files");
    assert_eq!(kids(env, "sig"), live_kids(env, "sig"), "{context}: jwks.json");
}

#[test]
fn a_crash_past_the_commit_is_repaired_by_the_stale_run_diagnosis() {
    let env = killed_after_the_commit();
    let dry = env.rotate("sig").args(["--force", "--dry-run"]).status(4);
    assert!(dry.stdout.contains("repair"), "{}", dry.stdout);
    let out = env.rotate("sig").arg("--force").status(4);
    assert!(
        out.stdout.contains("it did commit") && out.stdout.contains("tidy-up"),
        "{}",
        out.stdout
    );
    assert_whole(&env, "after the diagnosis");
    env.resolve("sig", "K", "v4 committed").status(0);
    assert_whole(&env, "after resolve");
}

#[test]
fn a_crash_past_the_commit_is_repaired_by_resolve_without_a_new_rotation() {
    let env = killed_after_the_commit();
    let out = env.resolve("sig", "K", "v4 committed").status(0);
    assert!(out.stdout.contains("tidy-up"), "{}", out.stdout);
    assert_whole(&env, "after resolve");
    assert_eq!(env.manifest("sig")["primary"], 4, "resolve rotated");
}

// ---- item 4: a timeout before the commit takes back what it staged and published -----

#[test]
fn a_deadline_before_the_commit_leaves_no_staged_file_and_no_published_new_key() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let published = kids(&env, "sig");
    let start = std::time::Instant::now();
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
            "SLOW",
        ])
        // After staging v2 and publishing it in jwks.json, before the commit.
        .env("KEYROTATE_FAILPOINTS", "jwks.dirsync=sleep(20000)")
        .status(8);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "outlived the deadline"
    );
    assert!(out.stdout.contains("removed the staged v000002.pem"), "{}", out.stdout);
    assert_eq!(env.key_files("sig"), ["v000001.pem"], "a staged file was left");
    assert_eq!(kids(&env, "sig"), published, "a never-committed key stays published");
    assert_eq!(row(&env, "SLOW")["state"], "timed_out");
    // Not blocked, and v2 is never handed to another key.
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
}

// ---- item 11: the key store itself is locked -----------------------------------------

/// A second install (own config and state folder) on the same key store as `env`.
fn second_config(env: &Env) -> Env {
    Env::with_config(&crate::common::DEFAULT_CONFIG.replace(
        "keystore = \"keys\"",
        &format!("keystore = {:?}", env.path("keys").to_str().unwrap()),
    ))
}

#[test]
fn two_configs_with_different_state_folders_never_rotate_one_key_store_at_once() {
    let a = Env::new();
    a.rotate("sig").args(["--run-id", "A-1"]).status(0);
    let b = second_config(&a);
    let log = a.path("steps.log");
    let holder = a
        .rotate("sig")
        .args(["--force", "--run-id", "A-2"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "stage.create=sleep(3000)")
        .spawn();
    crate::common::wait_for_step(&log, "stage.create");
    let dry = b.rotate("sig").args(["--force", "--dry-run"]).status(5);
    assert!(dry.stdout.contains("A-2"), "{}", dry.stdout);
    let out = b.rotate("sig").args(["--force", "--run-id", "B-1"]).status(5);
    assert!(
        out.stdout.contains("A-2") && out.stdout.contains("key store lock"),
        "{}",
        out.stdout
    );
    let held = holder.wait_with_output().unwrap();
    assert_eq!(held.status.code(), Some(0), "{}", String::from_utf8_lossy(&held.stdout));
    assert_eq!(a.manifest("sig")["primary"], 2);

    // Free now, but B's ledger does not know the run that committed the store.
    let out = b.rotate("sig").args(["--force", "--run-id", "B-2"]).status(4);
    assert!(out.stdout.contains("A-2"), "{}", out.stdout);
    b.resolve("sig", "B-2", "moving sig to the new state folder").status(0);
    b.rotate("sig").args(["--force", "--run-id", "B-3"]).status(0);
    assert_eq!(a.manifest("sig")["primary"], 3);
    // And the old install no longer knows it: it reports, never acts.
    let out = a.rotate("sig").args(["--force", "--run-id", "A-3"]).status(4);
    assert!(out.stdout.contains("B-3"), "{}", out.stdout);
    assert_eq!(a.manifest("sig")["primary"], 3);
}

// ---- item 13: version numbers only grow, even after a power loss ---------------------

#[test]
fn a_number_published_in_jwks_is_never_reused_after_its_file_was_lost() {
    let env = three_versions();
    // Killed between publishing v4 and the commit...
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "PL"])
        .env("KEYROTATE_FAILPOINTS", "commit.create=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert!(kids(&env, "sig").iter().any(|k| k.starts_with("v000004-")));
    // ...and a power loss dropped the staged file's directory entry, while the later
    // jwks.json rename in the same folder survived.
    std::fs::remove_file(env.key_dir("sig").join("v000004.pem")).unwrap();
    env.rotate("sig").arg("--force").status(4);
    env.resolve("sig", "PL", "v4 never committed").status(0);
    env.rotate("sig").arg("--force").status(0);
    assert_eq!(env.manifest("sig")["primary"], 5, "v4's number was reused");
    let numbers: Vec<String> = kids(&env, "sig").iter().map(|k| k[..7].to_string()).collect();
    let mut unique = numbers.clone();
    unique.dedup();
    assert_eq!(numbers, unique, "one number names two keys");
}

// ---- manifests written before `committed_by_run` --------------------------------------

#[test]
fn a_manifest_without_committed_by_run_still_parses_rotates_and_serves_consumers() {
    let env = three_versions();
    let path = env.key_dir("sig").join("keyring.json");
    let mut m = env.manifest("sig");
    assert_eq!(
        m["committed_by_run"],
        env.manifest("sig")["versions"][2]["created_by_run"]
    );
    m.as_object_mut().unwrap().remove("committed_by_run");
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let ring = keyrotate::keyring::Keyring::open(&env.path("keys"), "sig").unwrap();
    assert_eq!(ring.active().unwrap().version, 3);
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "AFTER-UPGRADE"])
        .status(0);
    assert!(out.stdout.contains("v3 -> v4"), "{}", out.stdout);
    assert_eq!(env.manifest("sig")["committed_by_run"], "AFTER-UPGRADE");
    let ring = keyrotate::keyring::Keyring::open(&env.path("keys"), "sig").unwrap();
    assert_eq!(ring.active().unwrap().version, 4);
}

// ---- resolve takes the domain's locks -------------------------------------------------

#[test]
fn resolve_is_busy_beside_a_live_run_and_repairs_once_it_ends() {
    if std::process::Command::new("flock").arg("--version").output().is_err() {
        eprintln!("SKIPPED resolve_is_busy_beside_a_live_run_and_repairs_once_it_ends: no flock(1)");
        return;
    }
    let env = killed_after_the_commit();
    env.rotate("sig").arg("--force").status(4); // flags K (and repairs)
                                                // Another process holds the key store's lock (as a run of another config would).
    let lock = env.key_dir("sig").join(".lock");
    // -o: the lock stays with flock itself (not its child), so killing it frees it.
    let mut holder = std::process::Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while keyrotate::lock::probe(&lock).unwrap().is_none() {
        assert!(start.elapsed().as_secs() < 10, "flock never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = env.resolve("sig", "K", "v4 committed").status(5);
    assert!(
        out.stdout.contains("holds its lock") || out.stderr.contains("holds its lock"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(row(&env, "K")["state"], "needs_review", "resolved beside a live run");
    holder.kill().unwrap();
    holder.wait().unwrap();
    env.resolve("sig", "K", "v4 committed").status(0);
    assert_whole(&env, "after resolve");
}

#[test]
fn a_key_store_lock_that_cannot_be_opened_aborts_with_a_recorded_row() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let lock = env.key_dir("sig").join(".lock");
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(env.path("elsewhere"), &lock).unwrap();
    let before = key_store(&env);
    let out = env.rotate("sig").args(["--force", "--run-id", "BADLOCK"]).status(3);
    assert!(out.stdout.contains(".lock"), "{}", out.stdout);
    assert!(!env.path("elsewhere").exists(), "followed the symlink");
    assert_eq!(row(&env, "BADLOCK")["exit_code"], 3);
    assert_eq!(key_store(&env), before, "the key store was changed");
}
