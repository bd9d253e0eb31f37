//! Attacks on `keyrotate revoke` and the NIST lifecycle states (DESIGN 11), as an
//! on-call engineer under an active leak would run into them. Each test names what it
//! broke (BREAK, fixed in the same branch) or the property it pins (PIN: passed on the
//! code it was written against, kept because a regression there would be a leak).

use std::path::Path;

use crate::common::Env;

/// The `--reason` of this module's revocations.
const REASON: &str = "INC-1: key pasted in a ticket";

fn state(env: &Env, domain: &str, n: u64) -> String {
    env.versions(domain)
        .into_iter()
        .find(|(v, _)| *v == n)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no v{n}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &target).unwrap();
        } else if ft.is_file() {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The domain folder put back from a copy, as `cp -a backup/. keys/D/` after `rm -rf`.
fn restore(env: &Env, domain: &str, backup: &Path) {
    std::fs::remove_dir_all(env.key_dir(domain)).unwrap();
    copy_dir(backup, &env.key_dir(domain));
}

/// BREAK (fixed): the key folder restored from a backup taken before a revocation
/// (keyring.json says the compromised v2 is active, jwks.json publishes it, its
/// private key is back). Before: `resolve` adopted it as it was, `status` said "ok"
/// and v2 signed and verified again. Now the ledger keeps every revocation (run,
/// version, fingerprint), so a manifest that lists a revoked key as usable is refused
/// by every rotation and named by `status` and `resolve`, until the key is revoked
/// again, which a revocation may do from exactly that state.
#[test]
fn a_backup_from_before_a_revocation_never_brings_the_compromised_key_back() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let backup = env.path("backup-sig");
    copy_dir(&env.key_dir("sig"), &backup);
    env.revoke("sig", 2, REASON).args(["--run-id", "REV"]).status(0);
    restore(&env, "sig", &backup);
    assert_eq!(state(&env, "sig", 2), "active");

    let st = env.cmd().args(["status", "--domain", "sig"]).output();
    assert_ne!(st.code, 0, "{}", st.stdout);
    assert!(st.stdout.contains("run REV revoked it"), "{}", st.stdout);
    let out = env.rotate("sig").args(["--force", "--run-id", "AFTER"]).status(4);
    assert!(out.stdout.contains("v2"), "{}", out.stdout);
    // The review adopts the folder, but cannot make v2 usable.
    let res = env
        .resolve("sig", "AFTER", "folder restored from last night's backup")
        .status(0);
    assert!(res.stdout.contains("revoke it again"), "{}", res.stdout);
    let st = env.cmd().args(["status", "--domain", "sig"]).output();
    assert_eq!(st.code, 3, "{}", st.stdout);
    assert!(st.stdout.contains("revoke it again"), "{}", st.stdout);
    let out = env.rotate("sig").args(["--force", "--run-id", "STILL"]).status(4);
    assert!(out.stdout.contains("run REV revoked it"), "{}", out.stdout);
    env.resolve("sig", "STILL", "seen: revoking v2 again").status(0);

    // Revoking it again is the way out, and the dry run says so first.
    let dry = env.revoke("sig", 2, REASON).arg("--dry-run").status(0);
    assert!(dry.stdout.contains("would revoke v2"), "{}", dry.stdout);
    env.revoke("sig", 2, REASON).status(0);
    assert_eq!(state(&env, "sig", 2), "compromised");
    assert!(!env.published_versions("sig").contains(&"v000002".to_string()));
    assert!(!env.key_dir("sig").join("v000002.pem").exists());
    // v3 was the first revocation's key, lost with the restore: its number stays taken.
    assert!(env.manifest("sig")["primary"].as_u64().unwrap() > 3);
    env.cmd().args(["status", "--domain", "sig"]).status(0);
    env.rotate("sig").arg("--force").status(0);
    env.cmd().args(["audit", "verify"]).status(0);
}

/// BREAK (fixed): a revocation killed after it started on the key store but before
/// its commit (Control-M's Kill) was forgotten once its run was reviewed: the next
/// scheduled rotation just retired v2 and kept publishing it in jwks.json, so the key
/// the operator had declared compromised went on verifying for `retain` rotations.
/// Now the interrupted revocation stays on the record until it is done.
#[test]
fn a_revocation_killed_before_its_commit_is_not_forgotten() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let out = env
        .revoke("sig", 2, REASON)
        .args(["--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "jwks.rename=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert_eq!(state(&env, "sig", 2), "active");
    env.rotate("sig").args(["--force", "--run-id", "NEXT"]).status(4);
    env.resolve("sig", "KILLED", "Control-M killed the revocation")
        .status(0);
    let out = env.rotate("sig").args(["--force", "--run-id", "SCHEDULED"]).status(4);
    assert!(out.stdout.contains("run KILLED revoked it"), "{}", out.stdout);
    assert_eq!(state(&env, "sig", 2), "active", "the refused rotation changed keys");
    env.revoke("sig", 2, REASON).status(0);
    assert_eq!(state(&env, "sig", 2), "compromised");
    assert!(!env.published_versions("sig").contains(&"v000002".to_string()));
}

/// PIN: a revocation that stopped before its commit by its own account (ABORTED, here
/// an injected I/O error staging the fresh key) leaves the old state, and blocks
/// nothing: it is not a recorded compromise, and the next revocation goes ahead.
#[test]
fn an_aborted_revocation_is_not_a_recorded_compromise() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let out = env
        .revoke("sig", 2, REASON)
        .env("KEYROTATE_FAILPOINTS", "jwks.rename=error")
        .status(3);
    assert!(out.stdout.contains("jwks.json"), "{}", out.stdout);
    assert_eq!(state(&env, "sig", 2), "active");
    assert!(env.published_versions("sig").contains(&"v000002".to_string()));
    env.cmd().args(["status", "--domain", "sig"]).status(0);
    env.rotate("sig").arg("--force").status(0);
    env.revoke("sig", 2, REASON).status(0);
    assert_eq!(state(&env, "sig", 2), "compromised");
}

/// A small tmpfs mounted at `dir` (root only), unmounted when dropped. `None` (after
/// printing SKIPPED) where this test cannot mount.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=700"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIPPED: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// BREAK (fixed): with the key store's file system full (the state folder elsewhere),
/// `revoke --dry-run` said "would exit 0" and the real revocation then stopped with 3
/// ("cannot write jwks.json: no space left on device"): the operator was told a
/// revocation would work that could not. Now both stop with 3 before anything is
/// written, naming the full key store, and after space is freed the revocation works.
#[test]
fn a_full_key_store_is_predicted_by_the_dry_run_and_touched_by_neither() {
    let env = Env::new();
    let Some(_fs) = Tmpfs::mount(&env.path("keys"), "1m") else {
        return;
    };
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let filler = env.path("keys/filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    for v in [1, 2] {
        let dry = env.revoke("sig", v, REASON).arg("--dry-run").output();
        let real = env.revoke("sig", v, REASON).output();
        assert_eq!(
            (dry.code, real.code),
            (3, 3),
            "v{v}: dry run {}: {}\nreal run {}: {}",
            dry.code,
            dry.stdout,
            real.code,
            real.stdout
        );
        assert!(dry.stdout.contains("no space left"), "{}", dry.stdout);
        assert!(real.stdout.contains("no space left"), "{}", real.stdout);
    }
    assert_eq!(
        (state(&env, "sig", 1), state(&env, "sig", 2)),
        ("retired".into(), "active".into())
    );
    assert_eq!(env.published_versions("sig"), ["v000002", "v000001"]);
    assert_eq!(env.key_files("sig"), ["v000002.pem"]);
    assert!(
        !std::fs::read_dir(env.key_dir("sig")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")),
        "a temporary was left"
    );
    std::fs::remove_file(&filler).unwrap();
    env.revoke("sig", 2, REASON).arg("--dry-run").status(0);
    env.revoke("sig", 2, REASON).status(0);
    assert_eq!(state(&env, "sig", 2), "compromised");
}

/// BREAK (fixed): a revocation whose tidy-up failed after its commit (here injected
/// I/O errors on the `current.pem` update and the unlink) exited 0, "done" by the
/// runbook, while `current.pem` still pointed at the compromised v2 and its private key
/// was still on disk: an application reading `current.pem` kept signing with the
/// leaked key. Now such a revocation exits NEEDS_REVIEW naming what is left, and the
/// review (`resolve`) finishes it.
#[test]
fn a_revocation_that_leaves_the_compromised_key_in_place_is_not_reported_done() {
    for failpoints in ["current.symlink=error,destroy.unlink=error", "destroy.unlink=error"] {
        let env = Env::new();
        env.rotate("sig").status(0);
        env.rotate("sig").arg("--force").status(0);
        let out = env
            .revoke("sig", 2, REASON)
            .args(["--run-id", "REV"])
            .env("KEYROTATE_FAILPOINTS", failpoints)
            .status(4);
        assert!(
            out.stdout.contains("v000002.pem is still on disk"),
            "{failpoints}: {}",
            out.stdout
        );
        // The commit stands: v2 is compromised and unpublished, v3 active.
        assert_eq!(state(&env, "sig", 2), "compromised");
        assert_eq!(env.published_versions("sig"), ["v000003", "v000001"]);
        env.cmd().args(["status", "--domain", "sig"]).status(4);
        let res = env.resolve("sig", "REV", "unlink failed; checked the disk").status(0);
        assert!(res.stdout.contains("v000002.pem"), "{}", res.stdout);
        assert_eq!(env.key_files("sig"), ["v000003.pem"]);
        let current = std::fs::read_link(env.key_dir("sig").join("current.pem")).unwrap();
        assert_eq!(current, Path::new("v000003.pem"));
        env.cmd().args(["status", "--domain", "sig"]).status(0);
        env.cmd().args(["audit", "verify"]).status(0);
    }
}

/// PIN: applications reading through the consumer API (the `keyring_reader` example:
/// open, sign with the active key, verify with the snapshot's own JWK, load the
/// pending key) in a tight loop beside revocation after revocation, of active, pending
/// and retired versions, in both activation modes: no read ever fails, and once a
/// revocation has exited, a fresh snapshot never hands out or trusts a compromised key,
/// and `jwks.json` never publishes one.
#[test]
fn readers_never_fail_and_never_use_a_compromised_key_beside_revocations() {
    use keyrotate::keyring::Keyring;
    use std::process::{Command, Stdio};
    let env = Env::with_config(
        r#"
[state]
dir = "state"
[host]
pool = "p"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
min_interval = "0s"
retain = 2
[domains.imm]
algorithm = "ecdsa-p256"
[domains.pre]
algorithm = "ed25519"
activation = "prepublish"
"#,
    );
    for d in ["imm", "pre"] {
        env.rotate(d).status(0);
        env.rotate(d).status(0);
    }
    let reader = crate::consumer_snapshot::example("keyring_reader");
    let stop = env.path("stop");
    let readers: Vec<_> = ["imm", "pre"]
        .iter()
        .map(|d| {
            Command::new(&reader)
                .arg(env.path("keys"))
                .arg(d)
                .arg(&stop)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut revoked = 0;
    for round in 0..12 {
        for d in ["imm", "pre"] {
            let m = env.manifest(d);
            let pick = |s: &str| {
                m["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|v| v["state"] == s)
                    .map(|v| v["version"].as_u64().unwrap())
                    .next_back()
            };
            // Active, then pending (or retired), then a rotation to make more.
            let victim = match round % 3 {
                0 => pick("active"),
                1 => pick("pending").or(pick("retired")),
                _ => None,
            };
            match victim {
                Some(n) => {
                    env.revoke(d, n, REASON).status(0);
                    revoked += 1;
                }
                None => {
                    env.rotate(d).status(0);
                }
            }
            let compromised: Vec<u64> = env
                .versions(d)
                .into_iter()
                .filter(|(_, s)| s == "compromised")
                .map(|(n, _)| n)
                .collect();
            let ring = Keyring::open(&env.path("keys"), d).unwrap();
            let active = ring.active().unwrap();
            assert!(!compromised.contains(&active.version), "{d}: active {}", active.kid);
            for k in ring.verification_keys().unwrap() {
                assert!(!compromised.contains(&k.version), "{d}: trusts {}", k.kid);
            }
            for n in &compromised {
                assert!(ring.version(*n).is_err(), "{d}: v{n} handed out");
                let kid = format!("v{n:06}");
                assert!(!env.published_versions(d).contains(&kid), "{d}: {kid} published");
            }
        }
    }
    std::fs::write(&stop, "").unwrap();
    for (d, child) in ["imm", "pre"].iter().zip(readers) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{d}: a reader failed beside the revocations: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(revoked >= 12, "only {revoked} revocations");
    env.cmd().args(["audit", "verify"]).status(0);
}

/// Moves every ledger row of the test's SQLite ledger back to 2020, as if the last
/// rotation had run long ago (`min_interval` has passed).
fn age_the_ledger(env: &Env) {
    let c = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    c.execute(
        "UPDATE rotations SET started_at = '2020-01-01T00:00:00.000Z', ended_at = '2020-01-01T00:00:01.000Z'",
        [],
    )
    .unwrap();
}

/// BREAK (fixed): revoking a version that is not the active one (a retired key, or the
/// pending key of a prepublish domain) counted as the domain's last successful
/// rotation, so the scheduled rotation that was due became NOT_DUE for another
/// `min_interval` and `status`/the metrics said the active key was freshly rotated,
/// while the active key only grew older. Only a revocation that activates a new key
/// restarts the clock.
#[test]
fn revoking_a_key_that_is_not_active_does_not_postpone_the_next_rotation() {
    let env = Env::new();
    for d in ["sig", "pre"] {
        env.rotate(d).status(0);
        env.rotate(d).arg("--force").status(0);
    }
    age_the_ledger(&env);
    env.revoke("sig", 1, REASON).status(0); // retired
    env.revoke("pre", 3, REASON).status(0); // pending
    for d in ["sig", "pre"] {
        let st = env
            .cmd()
            .args(["status", "--domain", d, "--output", "json"])
            .status(0)
            .json();
        let next_due = st["domains"][0]["next_due"].as_str().unwrap().to_string();
        assert!(
            next_due.starts_with("2020") || next_due == "now",
            "{d}: next due {next_due}"
        );
        let dry = env.rotate(d).arg("--dry-run").output();
        assert_eq!(dry.code, 0, "{d}: {}", dry.stdout);
        env.rotate(d).status(0);
    }
    // A revocation of the active key is a rotation: the clock restarts.
    age_the_ledger(&env);
    env.revoke("sig", 3, REASON).status(0);
    env.rotate("sig").status(7);
}

/// BREAK (fixed): a revocation killed after its commit but before its tidy-up (Control-M's
/// Kill at `current.pem`'s update, or at the unlink) left `current.pem` pointing at the
/// compromised key and its private key on disk; running the revocation again, as
/// anyone would after exit 137, answered "already compromised" (exit 2) and changed
/// nothing, so applications reading `current.pem` kept signing with the leaked key
/// until some later rotation (and killed right after the commit, the audit trail never
/// got its `key.compromised` line). Now the second run finishes it (the dry run says so
/// first) and writes the line, and only a third says "already compromised".
#[test]
fn revoking_again_after_a_kill_past_the_commit_finishes_the_revocation() {
    // `ledger.committed`: right after the commit, before the run's audit lines.
    for kill_at in ["ledger.committed", "current.symlink", "destroy.unlink"] {
        let env = Env::new();
        env.rotate("sig").status(0);
        env.rotate("sig").arg("--force").status(0);
        let out = env
            .revoke("sig", 2, REASON)
            .args(["--run-id", "KILLED"])
            .env("KEYROTATE_FAILPOINTS", format!("{kill_at}=kill"))
            .output();
        assert_eq!(out.code, 137, "{kill_at}: {}", out.stderr);
        assert_eq!(state(&env, "sig", 2), "compromised", "{kill_at}");
        assert!(env.key_dir("sig").join("v000002.pem").exists(), "{kill_at}");
        let before = env.snapshot();
        let dry = env.revoke("sig", 2, REASON).arg("--dry-run").status(0);
        assert!(dry.stdout.contains("interrupted revocation of v2"), "{}", dry.stdout);
        env.assert_unchanged(&before, "revoke --dry-run");
        let out = env.revoke("sig", 2, REASON).status(0);
        assert!(out.stdout.contains("already revoked"), "{}", out.stdout);
        assert_eq!(env.key_files("sig"), ["v000003.pem"], "{kill_at}");
        let current = std::fs::read_link(env.key_dir("sig").join("current.pem")).unwrap();
        assert_eq!(current, Path::new("v000003.pem"), "{kill_at}");
        assert_eq!(env.published_versions("sig"), ["v000003", "v000001"], "{kill_at}");
        // The audit trail says v2 was compromised, and why, whichever run wrote it.
        let lines = env.audit();
        let said = lines
            .iter()
            .filter(|l| l["event"] == "key.compromised" && l["from_version"] == 2)
            .collect::<Vec<_>>();
        assert!(!said.is_empty(), "{kill_at}: no key.compromised line");
        assert!(
            said.iter().all(|l| l["reason"].as_str().unwrap().contains("INC-1")),
            "{kill_at}: {said:?}"
        );
        let again = env.revoke("sig", 2, REASON).status(2);
        assert!(again.stdout.contains("already compromised"), "{}", again.stdout);
        // The killed run still waits for its review; then the domain rotates.
        env.rotate("sig").arg("--force").status(4);
        env.resolve("sig", "KILLED", "killed by Control-M after its commit")
            .status(0);
        env.rotate("sig").arg("--force").status(0);
        env.cmd().args(["audit", "verify"]).status(0);
    }
}

/// The PostgreSQL ledger keeps the revocation record too: the backup put back over a
/// revocation is refused there the same way, and a second revocation ends it.
#[test]
fn a_backup_from_before_a_revocation_is_refused_on_the_postgresql_ledger() {
    if !crate::common::pg::server() {
        eprintln!("SKIPPED: no PostgreSQL server for this test");
        return;
    }
    let db = crate::common::pg::Database::new();
    let env = Env::with_config(&crate::common::DEFAULT_CONFIG.replace(
        "dir = \"state\"",
        &format!("dir = \"state\"\nledger = \"{}\"", db.url()),
    ));
    env.rotate("pre").status(0); // v1 active, v2 pending
    let backup = env.path("backup-pre");
    copy_dir(&env.key_dir("pre"), &backup);
    env.revoke("pre", 2, REASON).args(["--run-id", "PG-REV"]).status(0);
    assert_eq!(
        db.sql("SELECT detail FROM rotation_events WHERE run_id = 'PG-REV' AND phase = 'compromised'"),
        format!("v2 {}", {
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(backup.join("keyring.json")).unwrap()).unwrap();
            m["versions"][1]["fingerprint"].as_str().unwrap().to_string()
        })
    );
    restore(&env, "pre", &backup);
    let out = env.rotate("pre").args(["--force", "--run-id", "PG-AFTER"]).status(4);
    assert!(out.stdout.contains("run PG-REV revoked it"), "{}", out.stdout);
    env.resolve("pre", "PG-AFTER", "restored a backup").status(0);
    env.cmd().args(["status", "--domain", "pre"]).status(3);
    env.revoke("pre", 2, REASON).status(0);
    assert_eq!(state(&env, "pre", 2), "compromised");
    assert!(!env.published_versions("pre").contains(&"v000002".to_string()));
    env.cmd().args(["status", "--domain", "pre"]).status(0);
}

/// PIN: a revocation while a rotation of the domain runs is BUSY (5), real and dry
/// alike, naming the rotation's run, pid and host; its refused row says `revoke`; and
/// once the rotation ends the revocation goes through (the runbook's "run it again").
#[test]
fn a_revocation_beside_a_running_rotation_is_busy_and_names_it() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let log = env.path("steps.log");
    let mut long = env
        .rotate("sig")
        .args(["--force", "--run-id", "LONG"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "stage.fsync=sleep(3000)")
        .spawn();
    crate::common::wait_for_step(&log, "stage.fsync");
    let dry = env.revoke("sig", 1, REASON).arg("--dry-run").status(5);
    let real = env.revoke("sig", 1, REASON).args(["--run-id", "R-BUSY"]).status(5);
    let pid = long.id().to_string();
    for out in [&dry, &real] {
        assert!(
            out.stdout.contains("run LONG") && out.stdout.contains(&pid),
            "{}",
            out.stdout
        );
    }
    assert!(long.wait().unwrap().success());
    let row = env.rows().into_iter().find(|r| r["run_id"] == "R-BUSY").unwrap();
    assert_eq!(
        (row["state"].as_str(), row["trigger"].as_str()),
        (Some("refused"), Some("revoke"))
    );
    // v1 is retired now: the revocation only unpublishes it.
    env.revoke("sig", 1, REASON).status(0);
    assert_eq!(state(&env, "sig", 1), "compromised");
    assert_eq!(env.published_versions("sig"), ["v000002"]);
}

/// PIN: a Control-M job whose output goes through `| head -1`, or to nobody (stdout
/// closed before keyrotate writes): the exit code and the ledger row stay the
/// revocation's, dry run or real, success or refusal.
#[test]
fn a_closed_stdout_never_changes_a_revocations_outcome() {
    use std::process::Stdio;
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let closed = |run: crate::common::Run<'_>| -> i32 {
        let mut c = run.command();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let out = child.wait_with_output().unwrap();
        out.status.code().unwrap_or(-1)
    };
    assert_eq!(closed(env.revoke("sig", 2, REASON).arg("--dry-run")), 0);
    assert_eq!(closed(env.revoke("sig", 9, REASON)), 2);
    assert_eq!(closed(env.revoke("sig", 2, REASON).args(["--run-id", "PIPED"])), 0);
    let row = env.last_row();
    assert_eq!(
        (row["run_id"].as_str(), row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("PIPED"), Some("succeeded"), Some(0))
    );
    assert_eq!(state(&env, "sig", 2), "compromised");
    // And through `head -1` in a shell, as a job definition would write it.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(
            "set -o pipefail; \"$0\" --config \"$1\" revoke --domain sig --version 3 --reason 'INC-2' \
             --deadline 1m --dry-run 2>/dev/null | head -1; echo \"exit=${PIPESTATUS[0]}\"",
        )
        .arg(crate::common::bin())
        .arg(env.config_path())
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("exit=0\n"), "{text}");
}

/// PIN: the key store's file system remounted read-only under an active leak: the dry
/// run and the real revocation both exit 3 naming it, nothing changes, the refusal is
/// on the record (row and audit line), and once it is writable the revocation works.
#[test]
fn a_read_only_key_store_refuses_a_revocation_the_dry_run_predicted() {
    let env = Env::new();
    let Some(fs) = Tmpfs::mount(&env.path("keys"), "1m") else {
        return;
    };
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&fs.0)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: cannot remount the tmpfs read-only here");
        return;
    }
    let dry = env.revoke("sig", 2, REASON).arg("--dry-run").status(3);
    let real = env.revoke("sig", 2, REASON).args(["--run-id", "RO"]).status(3);
    for out in [&dry, &real] {
        assert!(out.stdout.contains("read-only"), "{}", out.stdout);
    }
    let row = env.last_row();
    assert_eq!(
        (row["run_id"].as_str(), row["exit_code"].as_i64()),
        (Some("RO"), Some(3))
    );
    assert!(env.audit().iter().any(|l| l["run_id"] == "RO" && l["exit_code"] == 3));
    assert_eq!(state(&env, "sig", 2), "active");
    assert!(std::process::Command::new("mount")
        .args(["-o", "remount,rw"])
        .arg(&fs.0)
        .status()
        .unwrap()
        .success());
    env.revoke("sig", 2, REASON).status(0);
    assert_eq!(state(&env, "sig", 2), "compromised");
}

/// BREAK (fixed): a revocation killed right after its commit, before its audit lines,
/// whose next invocation is a rotation (or `resolve`) rather than the same `revoke`
/// again: the repair finished the key files, but no `key.compromised` line was ever
/// written, so the audit trail did not say that v2 was compromised, by whom or why.
/// The run that finds the dead revocation now writes the line for it, once.
#[test]
fn a_revocation_killed_after_its_commit_is_in_the_audit_trail_whatever_runs_next() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let out = env
        .revoke("sig", 2, REASON)
        .args(["--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "ledger.committed=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    env.rotate("sig").arg("--force").status(4);
    env.resolve("sig", "KILLED", "killed after its commit").status(0);
    assert!(
        env.audit()
            .iter()
            .any(|l| l["event"] == "key.compromised" && l["from_version"] == 2),
        "no key.compromised line for v2"
    );
    let lines = env
        .audit()
        .iter()
        .filter(|l| l["event"] == "key.compromised" && l["run_id"] == "KILLED")
        .count();
    assert_eq!(lines, 1, "one key.compromised line for the killed run");
    env.cmd().args(["audit", "verify"]).status(0);
}

/// BREAK (fixed): the leaked key's file deleted before the revocation (a panicked
/// `rm v000002.pem`, or a retired HMAC key's file) made the key store "inconsistent":
/// `revoke` exited 4 and blocked the domain, and the leaked key stayed published in
/// jwks.json (verifying forged tokens) until someone restored the very file that had
/// leaked. The file of the version being revoked is the one thing a revocation does
/// not need: it now goes ahead, dry run first.
#[test]
fn a_leaked_key_whose_file_was_already_deleted_is_still_revocable() {
    let env = Env::new();
    for d in ["sig", "mac"] {
        env.rotate(d).status(0);
        env.rotate(d).arg("--force").status(0);
    }
    std::fs::remove_file(env.key_dir("sig").join("v000002.pem")).unwrap(); // active
    std::fs::remove_file(env.key_dir("mac").join("v000001.key")).unwrap(); // retired
    for (d, v) in [("sig", 2), ("mac", 1)] {
        let before = env.snapshot();
        env.revoke(d, v, REASON).arg("--dry-run").status(0);
        env.assert_unchanged(&before, "revoke --dry-run");
        env.revoke(d, v, REASON).status(0);
        assert_eq!(state(&env, d, v), "compromised");
        env.cmd().args(["status", "--domain", d]).status(0);
    }
    assert_eq!(env.published_versions("sig"), ["v000003", "v000001"]);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
    assert_eq!(env.key_files("mac"), ["v000002.key"]);
    // Only the version being revoked is excused: another missing file still stops it.
    env.rotate("mac").arg("--force").status(0); // v3 active, v2 retired
    std::fs::remove_file(env.key_dir("mac").join("v000003.key")).unwrap();
    let out = env.revoke("mac", 2, REASON).status(4);
    assert!(out.stdout.contains("v000003.key"), "{}", out.stdout);
    assert_eq!(state(&env, "mac", 2), "retired");
}

/// BREAK: `revoke` on a shared domain (`store = "shared"`, DESIGN 9) went to the local
/// key store backend: it marked the key compromised in this host's copy only and
/// exited 0, while the shared keyring in PostgreSQL (the truth every host syncs from)
/// still had it active: the next `sync` put the compromised key back, here and on
/// every other host it never reached. The shared backend now revokes in the shared
/// keyring itself, so no host's sync ever brings the key back.
#[test]
fn a_revocation_of_a_shared_domain_is_never_undone_by_sync() {
    if !crate::common::pg::server() {
        eprintln!("SKIPPED: no PostgreSQL server for this test");
        return;
    }
    let db = crate::common::pg::Database::new();
    let a = crate::shared_store::host(&db, "host-a", "pool-a");
    let b = crate::shared_store::host(&db, "host-b", "pool-b");
    a.rotate("mac").status(0);
    a.rotate("mac").status(0); // v2 active, v1 retired
    crate::shared_store::sync(&a, Some("mac")).status(0);
    crate::shared_store::sync(&b, Some("mac")).status(0);
    a.revoke("mac", 2, REASON).status(0);
    // Sync must not bring v2 back anywhere: the shared keyring says compromised.
    crate::shared_store::sync(&a, Some("mac")).status(0);
    crate::shared_store::sync(&b, Some("mac")).status(0);
    for (host, env) in [("a", &a), ("b", &b)] {
        assert_eq!(state(env, "mac", 2), "compromised", "host {host}: v2 came back");
        assert!(!env.key_dir("mac").join("v000002.key").exists(), "host {host}");
    }
}
