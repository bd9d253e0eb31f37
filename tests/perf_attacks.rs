//! Attacks on issue 16's performance changes (one inspection per run, one timer
//! thread, lock files rewritten in place, the cheaper ledger and audit reads), each
//! through the real binary: what an on-call engineer, a hostile local user or a broken
//! disk can do to the folder, the lock files and the audit trail while a run is in
//! flight. Every test here either caught a bug (named in its comment) or pins the
//! behaviour that held.

use std::path::Path;
use std::process::Child;

use crate::common::{strace_works, wait_for_step, Env};

fn finished(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `touch -d WHEN PATH`: a file's mtime set to any instant, as an operator's tools do.
fn touch_d(path: &Path, when: &str) {
    assert!(std::process::Command::new("touch")
        .args(["-d", when])
        .arg(path)
        .status()
        .unwrap()
        .success());
}

/// The paused run, let go, stops with 4 naming the key file's fingerprint mismatch.
fn stopped_on_the_fingerprint(child: Child) {
    let (code, text) = finished(child);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("fingerprint"), "{text}");
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

/// A run paused after its admission (it has inspected the store twice by then and
/// remembered the inspection), while the test changes what it read.
fn paused_after_admission(env: &Env, run_id: &str) -> Child {
    let log = env.path(&format!("{run_id}.steps"));
    let child = env
        .rotate("sig")
        .args(["--force", "--run-id", run_id])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "audit.preflight=sleep(1500)")
        .spawn();
    wait_for_step(&log, "audit.preflight");
    child
}

/// Another valid Ed25519 key file, the same length as `env`'s v1.
fn foreign_key(env: &Env) -> Vec<u8> {
    let other = Env::new();
    other.rotate("sig").status(0);
    let theirs = std::fs::read(other.key_dir("sig").join("v000001.pem")).unwrap();
    assert_eq!(
        std::fs::read(env.key_dir("sig").join("v000001.pem")).unwrap().len(),
        theirs.len()
    );
    theirs
}

fn touch_like(path: &Path, reference: &Path) {
    let ok = std::process::Command::new("touch")
        .arg("-r")
        .arg(reference)
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch -r");
}

/// Held: the same inode rewritten with another valid key of the same size and its
/// mtime put back (`touch -r`): only the change time tells, and the reused inspection
/// is dropped for it.
#[test]
fn a_key_swapped_in_place_with_its_mtime_restored_after_admission_stops_the_rotation() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let theirs = foreign_key(&env);
    let ours = env.key_dir("sig").join("v000001.pem");
    let saved = env.path("mtime-ref");
    std::fs::write(&saved, b"").unwrap();
    touch_like(&saved, &ours);
    let child = paused_after_admission(&env, "PAUSED");
    std::fs::write(&ours, &theirs).unwrap();
    touch_like(&ours, &saved);
    stopped_on_the_fingerprint(child);
    assert_eq!(env.key_files("sig"), ["v000001.pem"], "nothing was staged");
}

/// Held: another key of the same size renamed over ours (another inode), its mtime
/// set to the old one with `touch -d`.
#[test]
fn a_key_renamed_over_ours_with_the_old_mtime_after_admission_stops_the_rotation() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let theirs = foreign_key(&env);
    let ours = env.key_dir("sig").join("v000001.pem");
    let when = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&ours).unwrap();
        format!("@{}.{:09}", m.mtime(), m.mtime_nsec())
    };
    let child = paused_after_admission(&env, "PAUSED");
    let tmp = env.key_dir("sig").join(".swap");
    std::fs::write(&tmp, &theirs).unwrap();
    touch_d(&tmp, &when);
    std::fs::rename(&tmp, &ours).unwrap();
    stopped_on_the_fingerprint(child);
}

/// Held: `keyring.json` put back from an older copy (`cp -p`: old bytes, old mtime)
/// while a run is paused after admission. The rotation judges the restored manifest
/// (a key the ledger says was committed later is missing from it), exactly as a run
/// started after the restore does, and writes nothing over it.
#[test]
fn a_keyring_restored_with_cp_p_while_a_run_is_paused_is_judged_like_a_fresh_run_would() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "R1"]).status(0);
    let keyring = env.key_dir("sig").join("keyring.json");
    let backup = env.path("keyring.backup");
    assert!(std::process::Command::new("cp")
        .arg("-p")
        .arg(&keyring)
        .arg(&backup)
        .status()
        .unwrap()
        .success());
    env.rotate("sig").args(["--force", "--run-id", "R2"]).status(0);
    let child = paused_after_admission(&env, "PAUSED");
    assert!(std::process::Command::new("cp")
        .arg("-p")
        .arg(&backup)
        .arg(&keyring)
        .status()
        .unwrap()
        .success());
    let (code, text) = finished(child);
    let restored = std::fs::read(&keyring).unwrap();
    assert_eq!(
        restored,
        std::fs::read(&backup).unwrap(),
        "nothing written over it: {text}"
    );
    // The same judgement as a run that starts after the restore.
    let fresh = env.rotate("sig").args(["--force", "--run-id", "AFTER"]).output();
    assert_ne!(code, 0, "a rotation built on the newer manifest committed: {text}");
    assert_eq!(
        code, fresh.code,
        "paused: {text}\nfresh: {}{}",
        fresh.stdout, fresh.stderr
    );
}

/// Held: a huge (sparse) lock file left by someone is written over in place and cut
/// to the holder's record.
#[test]
fn a_huge_lock_file_is_cut_to_the_holder_record() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let lock = env.path("state/locks/sig.lock");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lock)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    env.rotate("sig").args(["--force", "--run-id", "BIG"]).status(0);
    let bytes = std::fs::read_to_string(&lock).unwrap();
    assert!(bytes.len() < 4096, "{} bytes left", bytes.len());
    let holder: serde_json::Value = serde_json::from_str(bytes.trim()).unwrap();
    assert_eq!(holder["run_id"], "BIG");
}

/// Held: a FIFO in place of the lock file is refused at once (no hang on open, no
/// pwrite into a pipe), named in one line.
#[test]
fn a_fifo_lock_file_is_refused_without_hanging() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let lock = env.path("state/locks/sig.lock");
    std::fs::remove_file(&lock).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&lock)
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    let out = env.rotate("sig").args(["--force", "--run-id", "FIFO"]).output();
    assert!(start.elapsed().as_secs() < 20);
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(
        (out.stdout.clone() + &out.stderr).contains("not a regular file"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(env.manifest("sig")["primary"], 1, "nothing rotated");
}

fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn audit_lines(env: &Env) -> Vec<Vec<u8>> {
    std::fs::read(env.path("state/audit.jsonl"))
        .unwrap()
        .split(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// Held: a last audit line longer than the tail's read block (20 000 bytes, three
/// blocks, its newline before it exactly on a block boundary from the end) is found
/// whole: the next line chains to its seq and hash.
#[test]
fn an_audit_line_longer_than_the_tail_block_is_chained_to_whole() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let path = env.path("state/audit.jsonl");
    let mut line = br#"{"seq":777,"note":""#.to_vec();
    // 16 384 bytes of line plus its newline: the previous newline sits two blocks back.
    while line.len() < 16384 - 2 {
        line.push(b'a');
    }
    line.extend_from_slice(b"\"}");
    assert_eq!(line.len(), 16384);
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &line).unwrap();
    std::io::Write::write_all(&mut f, b"\n").unwrap();
    drop(f);
    env.rotate("sig").args(["--force", "--run-id", "LONG"]).status(0);
    let lines = audit_lines(&env);
    let at = lines.iter().position(|l| *l == line).expect("the long line is kept");
    let next: serde_json::Value = serde_json::from_slice(&lines[at + 1]).unwrap();
    assert_eq!(next["seq"], 778, "{next}");
    assert_eq!(next["prev"], sha256_hex(&line), "{next}");
}

/// Held: an audit trail cut mid-line (a full disk), its last line long and without a
/// newline: the next line starts on its own line, the cut one kept for `verify`.
#[test]
fn an_audit_trail_cut_mid_line_gets_the_next_line_on_its_own() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let path = env.path("state/audit.jsonl");
    let mut cut = br#"{"seq":5,"note":""#.to_vec();
    cut.resize(9000, b'z');
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &cut).unwrap();
    drop(f);
    env.rotate("sig").args(["--force", "--run-id", "CUT"]).status(0);
    let lines = audit_lines(&env);
    let at = lines
        .iter()
        .position(|l| *l == cut)
        .expect("the cut line is kept as it was");
    let next: serde_json::Value = serde_json::from_slice(&lines[at + 1]).expect("own line");
    assert_eq!(next["prev"], sha256_hex(&cut), "{next}");
    assert!(lines.last().unwrap().is_empty(), "the trail ends with a newline");
    let verify = env.cmd().args(["audit", "verify"]).output();
    assert_ne!(verify.code, 0, "the cut line is reported: {}", verify.stdout);
}

/// Bug caught: `sync` against a database that stops answering (a DBA's `LOCK TABLE` on
/// the shared keyring held by another session) had its statement cancelled by the
/// `statement_timeout` set to the time left, right at the deadline and before the
/// timer's backstop, and answered ABORTED (3). It is the deadline's: TIMED_OUT (8) by
/// deadline + 1 s, the host's copy as it was.
#[test]
fn a_sync_whose_database_hangs_on_a_table_lock_ends_by_deadline_plus_one_second_with_8() {
    use crate::common::pg::{server, Database, ADMIN_PASSWORD, ADMIN_USER};
    use crate::common::shared::{copy_of, host, sync};
    if !server() {
        println!("SKIPPED: PostgreSQL is not reachable here (KEYROTATE_TEST_PG)");
        return;
    }
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &["pool-a"]);
    let b = host(&db, "host-b", "pool-b", &["pool-a"]);
    a.rotate("mac").status(0);
    sync(&b, None).status(0);
    a.rotate("mac").status(0);
    let before = copy_of(&b, "mac");
    let mut holder = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 user={ADMIN_USER} password={ADMIN_PASSWORD} dbname={}",
            db.0
        ),
        postgres::NoTls,
    )
    .unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE shared_keyrings IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let start = std::time::Instant::now();
    let out = b.cmd().args(["sync", "--domain", "mac", "--deadline", "2s"]).output();
    let took = start.elapsed();
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(out.code, 8, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("TIMED_OUT mac"), "{}", out.stdout);
    // The deadline is 2 s; the timer ends the process a second later. Slack for a
    // loaded machine's start-up, not for another wait.
    assert!(took < std::time::Duration::from_millis(5500), "took {took:?}");
    assert_eq!(copy_of(&b, "mac"), before, "the copy is as it was");
    sync(&b, Some("mac")).status(0);
    assert_ne!(copy_of(&b, "mac"), before, "the next sync does the work");
}

/// Held: every file's mtime set far into the future or the past (a clock that was
/// wrong, `touch -d`) proves nothing either way: the reuse rests on change times the
/// kernel sets, so a same-size swap after admission is still seen.
#[test]
fn mtimes_from_a_wrong_clock_do_not_let_a_swap_after_admission_through() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let theirs = foreign_key(&env);
    let dir = env.key_dir("sig");
    for (name, when) in [
        ("keyring.json", "2099-01-01"),
        ("v000001.pem", "1999-01-01"),
        ("jwks.json", "2099-01-01"),
    ] {
        assert!(std::process::Command::new("touch")
            .args(["-d", when])
            .arg(dir.join(name))
            .status()
            .unwrap()
            .success());
    }
    env.rotate("sig").args(["--force", "--run-id", "SKEWED"]).status(0);
    let ours = dir.join("v000002.pem");
    let other = Env::new();
    other.rotate("sig").status(0);
    other.rotate("sig").arg("--force").status(0);
    let theirs2 = std::fs::read(other.key_dir("sig").join("v000002.pem")).unwrap();
    assert_eq!(theirs2.len(), theirs.len());
    touch_d(&ours, "2099-01-01");
    let child = paused_after_admission(&env, "PAUSED");
    std::fs::write(&ours, &theirs2).unwrap();
    touch_d(&ours, "2099-01-01");
    stopped_on_the_fingerprint(child);
}

/// Held: `jwks.json` replaced by a symlink to a file elsewhere after admission: the
/// run never writes through it (the publication renames a new file over the link),
/// and the file it pointed at is untouched.
#[test]
fn a_jwks_symlink_planted_after_admission_is_never_written_through() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let victim = env.path("victim.json");
    std::fs::write(&victim, b"{\"keys\":[]}\n").unwrap();
    let jwks = env.key_dir("sig").join("jwks.json");
    let child = paused_after_admission(&env, "PAUSED");
    std::fs::remove_file(&jwks).unwrap();
    std::os::unix::fs::symlink(&victim, &jwks).unwrap();
    let (code, text) = finished(child);
    assert_eq!(std::fs::read(&victim).unwrap(), b"{\"keys\":[]}\n", "{text}");
    if code == 0 {
        let meta = std::fs::symlink_metadata(&jwks).unwrap();
        assert!(meta.is_file(), "a file, not the planted link: {text}");
        assert_eq!(env.published_versions("sig").len(), 2, "{text}");
    } else {
        assert_eq!(code, 4, "{text}");
    }
}

/// Held: the ledger put back from an older copy (the provenance question, now one
/// statement, meets a manifest committed by a run the ledger does not know): the
/// domain is held for review, nothing rotated over it.
#[test]
fn a_ledger_restored_from_an_older_copy_holds_the_domain_for_review() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "R1"]).status(0);
    // The database and its write-ahead log, copied together (as a file backup would).
    let files = ["ledger.sqlite3", "ledger.sqlite3-wal"];
    for f in files {
        if env.path(&format!("state/{f}")).exists() {
            std::fs::copy(env.path(&format!("state/{f}")), env.path(&format!("{f}.backup"))).unwrap();
        }
    }
    env.rotate("sig").args(["--force", "--run-id", "R2"]).status(0);
    let manifest = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    for f in ["ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"] {
        let _ = std::fs::remove_file(env.path(&format!("state/{f}")));
    }
    for f in files {
        if env.path(&format!("{f}.backup")).exists() {
            std::fs::copy(env.path(&format!("{f}.backup")), env.path(&format!("state/{f}"))).unwrap();
        }
    }
    assert!(env.path("state/ledger.sqlite3").exists());
    let out = env.rotate("sig").args(["--force", "--run-id", "R3"]).output();
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("R2"), "the unknown run is named: {}", out.stdout);
    assert_eq!(
        std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(),
        manifest,
        "nothing rotated"
    );
}

/// A loop-mounted ext4 with 128-byte inodes (whole-second timestamps, as ext3, old
/// ext4 and some NFS servers keep), unmounted on drop. `None` where this process
/// cannot make or mount one (not root, no loop device).
struct SecondsFs {
    at: std::path::PathBuf,
}

impl SecondsFs {
    fn mount(at: &Path, image: &Path) -> Option<SecondsFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let ok = |c: &mut std::process::Command| {
            c.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        std::fs::create_dir_all(at).ok()?;
        let made = ok(std::process::Command::new("truncate").args(["-s", "8M"]).arg(image))
            && ok(std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-I", "128"])
                .arg(image));
        if !made
            || !ok(std::process::Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(at))
        {
            return None;
        }
        Some(SecondsFs { at: at.to_path_buf() })
    }
}

impl Drop for SecondsFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.at).status();
    }
}

fn ctime(path: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.ctime(), m.ctime_nsec())
}

/// Bug caught: on a file system that keeps whole seconds, a key file changed early in
/// a second and inspected later in the same second has a change time older than the
/// inspection's start, so the inspection was remembered as settled; another key of
/// the same size written in place before that second ends gets the very same stamp
/// (inode, size, mode, mtime and ctime all equal), and the rotation reused the stale
/// inspection. A change time with no fraction now counts as settled only two whole
/// seconds later.
#[test]
fn on_a_whole_second_file_system_a_swap_in_the_same_second_is_still_seen() {
    for attempt in 0..6 {
        let env = Env::new();
        let Some(_fs) = SecondsFs::mount(&env.path("keys"), &env.path("keys.img")) else {
            println!("SKIPPED: cannot loop-mount an ext4 with whole-second timestamps here (needs root)");
            return;
        };
        env.rotate("sig").status(0);
        let theirs = foreign_key(&env);
        let ours = env.key_dir("sig").join("v000001.pem");
        let mine = std::fs::read(&ours).unwrap();
        // Early in a fresh second: rewrite our own bytes (a backup tool, a chmod would
        // do), so the file's change time is this second.
        while std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis()
            > 30
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::fs::write(&ours, &mine).unwrap();
        let changed = ctime(&ours);
        assert_eq!(changed.1, 0, "whole-second change times on this file system");
        let child = paused_after_admission(&env, "PAUSED");
        std::fs::write(&ours, &theirs).unwrap();
        if ctime(&ours) != changed {
            // The run or the swap spilled into the next second: its stamp differs
            // anyway, which proves nothing about the same-second case. Try again.
            let _ = finished(child);
            println!("attempt {attempt}: the swap landed in the next second; again");
            continue;
        }
        let (code, text) = finished(child);
        assert_eq!(code, 4, "the stale inspection was reused: {text}");
        assert!(text.contains("fingerprint"), "{text}");
        return;
    }
    println!("SKIPPED: this machine never fitted a run's admission and the swap in one second");
}

/// Bug caught: the audit tail's last line was joined block by block onto everything
/// read so far and searched whole each time, so its cost grew with the square of its
/// length. A trail ending in 20 MB without a newline (a torn write, a hostile append)
/// held a rotation with a one-minute deadline for over seven minutes, the deadline's
/// own audit line reading the same tail again. Now it costs the line's length.
#[test]
fn a_megabytes_long_torn_audit_tail_costs_its_length_not_its_square() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let path = env.path("state/audit.jsonl");
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &vec![b'a'; 20_000_000]).unwrap();
    drop(f);
    let start = std::time::Instant::now();
    env.cmd()
        .args([
            "rotate",
            "--domain",
            "sig",
            "--deadline",
            "30s",
            "--force",
            "--run-id",
            "TAIL",
        ])
        .status(0);
    let took = start.elapsed();
    assert!(took < std::time::Duration::from_secs(15), "took {took:?}");
    let lines = audit_lines(&env);
    let torn = lines.iter().position(|l| l.len() == 20_000_000).expect("kept");
    let next: serde_json::Value = serde_json::from_slice(&lines[torn + 1]).expect("own line");
    assert_eq!(next["prev"], sha256_hex(&lines[torn]), "{next}");
}
