//! The shared key store (DESIGN 9) under faults, through the real binary, two or three
//! simulated hosts on one PostgreSQL database (see `common::shared`):
//!
//! - SIGKILL at every database round trip and durable step of a shared rotation and of
//!   a `sync`: no host's copy ever mixes two epochs or fails to verify, and the next run
//!   is NEEDS_REVIEW (naming the killed run, saying whether it committed) or proceeds;
//!   a SIGTERM at every step ends the run by itself with its true outcome;
//! - a run whose connection (and so its advisory lock) is dropped at any round trip
//!   before its commit, while another host rotates: never do both commit;
//! - no fragment of any private or symmetric key in a dump of the database, the
//!   ledger, the logs, the outputs or the audit trails;
//! - an application reading a host's copy while `sync` rewrites it: never an error,
//!   never a keyring no commit made;
//! - what an operator hits with `sync`: a wrong KEK, a bad KEK file, the database down,
//!   a second sync beside the first, a past deadline, a deleted key file, a closed pipe.
//!
//! Needs PostgreSQL (see `common::pg`); says SKIPPED where none is installed. The kill
//! tests need the failpoints build.

// The kill tests and their helpers need the failpoints build; the rest runs in both.
#![cfg_attr(not(feature = "failpoints"), allow(dead_code, unused_imports))]

use std::time::Duration;

use crate::common::pg::{server, Database};
use crate::common::shared::{db_ring, epoch, host, local_ring, sync, verify_copy, verify_interrupted_copy};
use crate::common::{Env, Out};

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

const POOLS: [&str; 2] = ["pool-a", "pool-b"];

/// Runs `rotate` on `env` with run id `id`; a BUSY that only means the server has not
/// yet ended a killed run's session (its advisory lock) is retried a moment later.
fn rotate_after_kill(env: &Env, domain: &str, id: &str) -> Out {
    for attempt in 0..50 {
        let out = env
            .rotate(domain)
            .args(["--run-id", &format!("{id}-{attempt}")])
            .output();
        if out.code != 5 {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{id}: BUSY for 10 s after the kill");
}

/// The step names a run passes, from a `KEYROTATE_FAILPOINT_LOG` file.
fn steps_of(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect()
}

fn killed(out: &Out, context: &str) {
    assert_eq!(out.code, 137, "{context}: not killed\n{}{}", out.stdout, out.stderr);
}

/// After a fault: the copy of `env` verifies and is one of the committed keyrings
/// `rings`, and the host's acknowledgement claims no newer epoch than the copy holds.
#[track_caller]
fn copy_is_one_of(db: &Database, env: &Env, name: &str, rings: &[(i64, String)], context: &str) {
    let copy = verify_interrupted_copy(env, "sess", context);
    let held = rings
        .iter()
        .find(|(_, r)| *r == copy)
        .map(|(e, _)| *e)
        .unwrap_or_else(|| panic!("{context}: {name}'s copy mixes epochs: {copy}\nvs {rings:?}"));
    let acked: i64 = db
        .sql(&format!(
            "SELECT coalesce((SELECT epoch FROM shared_sync_acks WHERE domain = 'sess' AND host = '{name}'), 0)"
        ))
        .parse()
        .unwrap();
    assert!(
        acked <= held,
        "{context}: {name} acknowledged epoch {acked} but holds {held}"
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_step_of_a_shared_rotation_never_leaves_a_copy_mixing_epochs() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    // v1 retired, v2 active, v3 pending on both hosts: the next rotation promotes,
    // retires, destroys (retain = 1) and creates, so every kind of step is on its path.
    for _ in 0..3 {
        a.rotate("sess").status(0);
        sync(&b, Some("sess")).status(0);
    }
    let log = a.path("steps.log");
    a.rotate("sess")
        .args(["--run-id", "ENUM"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    sync(&b, Some("sess")).status(0);
    let steps = steps_of(&log);
    for needed in [
        "ledger.lock",
        "ledger.admit",
        "ledger.shared_read",
        "ledger.shared_acks",
        "ledger.confirm",
        "ledger.shared_commit",
        "shared.epoch",
        "shared.insert",
        "shared.update",
        "install.rename",
        "commit.rename",
        "destroy.unlink",
        "ledger.shared_ack",
        "ledger.close",
    ] {
        assert!(steps.iter().any(|s| s == needed), "no {needed} in {steps:?}");
    }
    let (mut committed, mut reviewed) = (0, 0);
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("killed at step {k} ({step})");
        let (e0, ring0) = (epoch(&db, "sess"), db_ring(&db, "sess"));
        let id = format!("K{k}");
        killed(
            &a.rotate("sess")
                .args(["--run-id", &id])
                .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
                .output(),
            &context,
        );
        // The database holds the old keyring or the killed run's whole commit.
        let (e1, ring1) = (epoch(&db, "sess"), db_ring(&db, "sess"));
        if e1 == e0 {
            assert_eq!(ring1, ring0, "{context}: the keyring changed without a commit");
        } else {
            assert_eq!(e1, e0 + 1, "{context}");
            assert_eq!(
                db.sql("SELECT committed_run FROM shared_keyrings WHERE domain = 'sess'"),
                id,
                "{context}"
            );
            committed += 1;
        }
        let rings = [(e0, ring0), (e1, ring1.clone())];
        copy_is_one_of(&db, &a, "host-a", &rings, &context);
        copy_is_one_of(&db, &b, "host-b", &rings, &context);
        // Another host's sync is whole and current.
        sync(&b, Some("sess")).status(0);
        assert_eq!(verify_copy(&b, "sess", &context), ring1, "{context}");

        // The next run: NEEDS_REVIEW while the killed run's row is in flight, naming it
        // and whether it committed; else it proceeds.
        let row = db.sql(&format!("SELECT count(*) FROM rotations WHERE run_id = '{id}'"));
        let next = rotate_after_kill(&a, "sess", &format!("N{k}"));
        if row == "1" {
            assert_eq!(next.code, 4, "{context}: {}{}", next.stdout, next.stderr);
            assert!(next.stdout.contains(&id), "{context}: {}", next.stdout);
            let diagnosis = db.sql(&format!("SELECT reason FROM rotations WHERE run_id = '{id}'"));
            let said = if e1 > e0 { "it did commit" } else { "it did not commit" };
            assert!(diagnosis.contains(said), "{context}: diagnosis {diagnosis:?}");
            a.resolve("sess", &id, "crash test: keyring checked").status(0);
            reviewed += 1;
            // The Control-M flow syncs every host before the rotation.
            sync(&a, Some("sess")).status(0);
            sync(&b, Some("sess")).status(0);
            a.rotate("sess").args(["--run-id", &format!("OK{k}")]).status(0);
        } else {
            assert_eq!(next.code, 0, "{context}: {}{}", next.stdout, next.stderr);
            assert_eq!(e1, e0, "{context}: committed without a row");
        }
        sync(&b, Some("sess")).status(0);
        assert_eq!(verify_copy(&a, "sess", &context), db_ring(&db, "sess"), "{context}");
        assert_eq!(verify_copy(&b, "sess", &context), db_ring(&db, "sess"), "{context}");
    }
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations WHERE exit_code IS NULL AND state <> 'resolved'"),
        "0",
        "a row was left open"
    );
    assert!(
        committed > 0 && reviewed > committed,
        "{committed} committed, {reviewed} reviewed"
    );
    eprintln!(
        "shared rotation crash points: {} steps, {committed} kills after the commit, {reviewed} needed review",
        steps.len()
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_step_of_a_sync_leaves_the_old_copy_or_the_new_one() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    for _ in 0..3 {
        a.rotate("sess").status(0);
        sync(&b, Some("sess")).status(0);
    }
    a.rotate("sess").status(0);
    let log = b.path("steps.log");
    sync(&b, Some("sess")).env("KEYROTATE_FAILPOINT_LOG", &log).status(0);
    let steps = steps_of(&log);
    for needed in [
        "ledger.connect",
        "ledger.shared_read",
        "install.fsync",
        "install.rename",
        "jwks.rename",
        "commit.rename",
        "commit.dirsync",
        "current.rename",
        "destroy.unlink",
        "ledger.shared_ack",
    ] {
        assert!(steps.iter().any(|s| s == needed), "no {needed} in {steps:?}");
    }
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let context = format!("sync killed at step {k} ({step})");
        let (e0, ring0) = (epoch(&db, "sess"), local_ring(&b, "sess"));
        assert_eq!(ring0, verify_copy(&b, "sess", &context));
        a.rotate("sess").status(0);
        let ring1 = db_ring(&db, "sess");
        killed(
            &sync(&b, Some("sess"))
                .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
                .output(),
            &context,
        );
        copy_is_one_of(&db, &b, "host-b", &[(e0, ring0), (e0 + 1, ring1.clone())], &context);
        // The next sync proceeds and repairs whatever the kill left.
        sync(&b, Some("sess")).status(0);
        assert_eq!(verify_copy(&b, "sess", &context), ring1, "{context}");
        let stray: Vec<String> = std::fs::read_dir(b.key_dir("sess"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('v') && !b.live_files("sess").contains(n))
            .collect();
        assert!(
            stray.is_empty(),
            "{context}: files of destroyed versions left: {stray:?}"
        );
    }
    eprintln!("sync crash points: {} steps", steps.len());
}

/// Whether this test run can give a process its own host name (`unshare --uts`, root),
/// so that a run looks as if it ran on another machine: one whose processes the next
/// run cannot see, so it is judged by the ledger alone.
fn can_fake_machine() -> bool {
    std::process::Command::new("unshare")
        .args(["--uts", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Spawns `run` as if on the machine `machine` (its own UTS namespace and host name).
fn spawn_on_machine(run: crate::common::Run<'_>, machine: &str) -> std::process::Child {
    use std::process::{Command, Stdio};
    let c = run.command();
    let mut u = Command::new("unshare");
    u.args([
        "--uts",
        "sh",
        "-c",
        &format!("hostname {machine} && exec \"$0\" \"$@\""),
    ])
    .arg(c.get_program())
    .args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => u.env(k, v),
            None => u.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        u.current_dir(d);
    }
    u.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A run X on one machine is paused at a round trip before or inside its commit and
/// loses its connection there (and so its advisory lock: `pg_terminate_backend`, as a
/// DBA, a failover or a network cut would). On another machine the next run finds X's
/// row in flight (NEEDS_REVIEW), the operator resolves it, and a run Y commits — all
/// while X still sleeps. Then X wakes and goes on to its commit: it must not commit
/// (its session is gone, and the epoch it read is no longer the newest), the epoch grew
/// once, and nothing of X is in the keyring.
#[cfg(feature = "failpoints")]
#[test]
fn a_run_that_loses_its_connection_before_the_commit_never_commits_beside_another() {
    need_postgres!();
    if !can_fake_machine() {
        eprintln!(
            "SKIPPED {}: needs `unshare --uts` (root) to run X as another machine",
            module_path!()
        );
        return;
    }
    let db = Database::new();
    let pools = ["pool-a", "pool-b"];
    let a1 = host(&db, "host-a1", "pool-a", &pools);
    let a2 = host(&db, "host-a2", "pool-a", &pools);
    let b = host(&db, "host-b", "pool-b", &pools);
    let sync_all = || {
        for h in [&a1, &a2, &b] {
            sync(h, Some("sess")).status(0);
        }
    };
    a1.rotate("sess").status(0);
    sync_all();
    let log = a1.path("steps.log");
    a1.rotate("sess")
        .args(["--run-id", "ENUM"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    sync_all();
    let steps = steps_of(&log);
    // Every round trip from the keyring read to the last statement of the commit.
    let first = steps.iter().position(|s| s == "ledger.shared_read").unwrap();
    let last = steps.iter().rposition(|s| s.starts_with("shared.")).unwrap();
    let mut raced = 0;
    for k in first + 1..=last + 1 {
        let step = &steps[k - 1];
        let e0 = epoch(&db, "sess");
        let flog = a1.path(&format!("fp{k}.log"));
        let x_id = format!("X{k}");
        let mut x = spawn_on_machine(
            a1.rotate("sess")
                .args(["--run-id", &x_id])
                .env("KEYROTATE_FAILPOINT_LOG", &flog)
                .env("KEYROTATE_FAILPOINTS", format!("{k}=sleep(6000)")),
            "machine-x",
        );
        crate::common::wait_for_step(&flog, &format!("{k} {step}"));
        db.terminate_keyrotate_sessions();
        // The other machine, at once: X's row is in flight and its lock is gone.
        let y = rotate_after_kill(&a2, "sess", &format!("Y{k}"));
        let mut context = format!(
            "connection dropped at step {k} ({step}); Y exit {}: {}",
            y.code, y.stdout
        );
        assert_eq!(y.code, 4, "{context}{}", y.stderr);
        assert!(y.stdout.contains(&x_id), "{context}");
        a2.resolve("sess", &x_id, "fencing test: X lost its session").status(0);
        let z = a2.rotate("sess").args(["--run-id", &format!("Z{k}")]).status(0);
        let x_still_paused = x.try_wait().unwrap().is_none();
        raced += usize::from(x_still_paused);
        let x = x.wait_with_output().unwrap();
        let x_code = x.status.code().unwrap_or(-1);
        context.push_str(&format!(
            "\nZ: {}X exit {x_code} (still paused when Z committed: {x_still_paused}): {}{}",
            z.stdout,
            String::from_utf8_lossy(&x.stdout),
            String::from_utf8_lossy(&x.stderr)
        ));
        assert!([3, 4].contains(&x_code), "{context}");
        assert_eq!(
            db.sql(&format!(
                "SELECT count(*) FROM shared_key_versions WHERE domain = 'sess' AND created_by_run = '{x_id}'"
            )),
            "0",
            "{context}: the run without its lock committed"
        );
        assert_eq!(epoch(&db, "sess"), e0 + 1, "{context}: only Z's commit");
        assert_eq!(
            db.sql("SELECT committed_run FROM shared_keyrings WHERE domain = 'sess'"),
            format!("Z{k}"),
            "{context}"
        );
        assert_eq!(
            db.sql(&format!("SELECT state FROM rotations WHERE run_id = '{x_id}'")),
            "resolved",
            "{context}: X's row was rewritten after the review"
        );
        sync_all();
        for h in [&a1, &a2, &b] {
            assert_eq!(verify_copy(h, "sess", &context), db_ring(&db, "sess"), "{context}");
        }
    }
    let total = last + 1 - first;
    assert!(
        raced * 2 >= total,
        "only {raced} of {total} steps had X wake after Z's commit: the machine is too slow for this test"
    );
    eprintln!("connection drops: {total} round trips, X still paused at Z's commit in {raced}");
}

/// The private scalar of a PKCS#8 key, or the whole of a symmetric key file's key: the
/// bytes that must never leave the key files. Ed25519 (`04 22 04 20` + 32-byte seed)
/// and P-256 (`02 01 01 04 20` + 32-byte scalar, the SEC1 key inside PKCS#8).
fn secret_of(name: &str, bytes: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    if name.ends_with(".key") {
        return b64.decode(text.trim()).unwrap();
    }
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = b64.decode(body).unwrap();
    for prefix in [&[0x04, 0x22, 0x04, 0x20][..], &[0x02, 0x01, 0x01, 0x04, 0x20][..]] {
        if let Some(i) = der.windows(prefix.len()).position(|w| w == prefix) {
            let start = i + prefix.len();
            return der[start..start + 32].to_vec();
        }
    }
    panic!("{name}: no private key found in its PKCS#8");
}

/// Every way a fragment of `secret` could be written down: each 8-byte window raw and
/// in hex (both cases), and each 12-character group of its standard and URL-safe
/// base64 at every byte alignment (9 secret bytes each).
fn fragments(secret: &[u8]) -> (Vec<Vec<u8>>, Vec<String>) {
    use base64::Engine;
    let raw: Vec<Vec<u8>> = secret.windows(8).map(<[u8]>::to_vec).collect();
    let mut text = Vec::new();
    for w in &raw {
        let hex: String = w.iter().map(|b| format!("{b:02x}")).collect();
        text.push(hex.to_uppercase());
        text.push(hex);
    }
    for engine in [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for skip in 0..3 {
            let s = engine.encode(&secret[skip..]);
            // Whole groups only: the last group may mix in the padding.
            let whole = (secret.len() - skip) / 3 * 4;
            for start in (0..whole.saturating_sub(11)).step_by(4) {
                text.push(s[start..start + 12].to_string());
            }
        }
    }
    (raw, text)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` except key files (`v*.pem`, `v*.key`, `current.*`), as
/// `(path, bytes)`.
fn files_except_keys(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name().into_string().unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            files_except_keys(&p, out);
        } else if ft.is_file()
            && !((name.starts_with('v') || name.starts_with("current."))
                && (name.ends_with(".pem") || name.ends_with(".key")))
        {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

/// Three hosts rotate and sync every algorithm family a few times (so versions are
/// also destroyed), with verbose and JSON logs, then every output, log, audit line, file
/// outside the key files and a full dump of the database is searched for every key
/// that ever existed.
#[test]
fn no_fragment_of_any_key_in_the_database_dump_the_ledger_logs_outputs_or_audit() {
    need_postgres!();
    let db = Database::new();
    let pools = ["pool-a", "pool-b", "pool-c"];
    let hosts = [
        host(&db, "host-a", "pool-a", &pools),
        host(&db, "host-b", "pool-b", &pools),
        host(&db, "host-c", "pool-c", &pools),
    ];
    let domains = ["sess", "ec", "mac", "aes"];
    let mut outputs: Vec<u8> = Vec::new();
    let mut keep = |o: Out| {
        outputs.extend(o.stdout.as_bytes());
        outputs.extend(o.stderr.as_bytes());
    };
    // Every key ever written, by file name and domain (destroyed ones included).
    let mut secrets: std::collections::BTreeMap<(String, String), Vec<u8>> = Default::default();
    for round in 0..3 {
        let log = if round % 2 == 0 { ["-vv"] } else { ["--log-format=json"] };
        for d in domains {
            keep(hosts[0].rotate(d).args(log).status(0));
        }
        for h in &hosts {
            keep(sync(h, None).args(log).status(0));
            for d in domains {
                for (name, bytes) in crate::common::shared::copy_of(h, d) {
                    if name.starts_with('v') && (name.ends_with(".pem") || name.ends_with(".key")) {
                        let s = secret_of(&name, &bytes);
                        secrets.insert((d.to_string(), name), s);
                    }
                }
            }
        }
    }
    for h in &hosts {
        keep(h.cmd().args(["status", "--output", "json"]).output());
        keep(h.cmd().arg("status").output());
        keep(h.cmd().args(["history", "--output", "json"]).output());
        keep(h.cmd().arg("history").output());
        keep(h.cmd().arg("check").output());
    }
    let destroyed = db.sql("SELECT count(*) FROM shared_key_versions WHERE state = 'destroyed'");
    assert_ne!(
        destroyed, "0",
        "no version was destroyed: the test does not cover erased keys"
    );
    let dump = std::process::Command::new("pg_dump")
        .args(["-h", "127.0.0.1", "-U", crate::common::pg::ADMIN_USER, "-d", &db.0])
        .env("PGPASSWORD", crate::common::pg::ADMIN_PASSWORD)
        .output();
    let dump: Vec<u8> = match dump {
        Ok(o) if o.status.success() => o.stdout,
        _ => {
            eprintln!("pg_dump unavailable: every table SELECTed instead");
            let tables = db
                .sql("SELECT string_agg(table_name, ' ') FROM information_schema.tables WHERE table_schema = 'public'");
            tables
                .split_whitespace()
                .map(|t| db.sql(&format!("SELECT coalesce(string_agg(x::text, E'\\n'), '') FROM {t} x")))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        }
    };
    assert!(contains(&dump, b"shared_key_versions") || contains(&dump, b"sealed"));
    let mut haystacks: Vec<(String, Vec<u8>)> =
        vec![("database dump".into(), dump), ("outputs and logs".into(), outputs)];
    for h in &hosts {
        files_except_keys(h.dir.path(), &mut haystacks);
    }
    assert!(haystacks.iter().any(|(n, _)| n.ends_with("audit.jsonl")));
    assert!(haystacks.iter().any(|(n, _)| n.ends_with("jwks.json")));
    let mut found_in_own_file = 0;
    for ((domain, name), secret) in &secrets {
        let (raw, text) = fragments(secret);
        for (what, hay) in &haystacks {
            for w in &raw {
                assert!(!contains(hay, w), "8 bytes of {domain}/{name} are in {what}");
            }
            for t in &text {
                assert!(!contains(hay, t.as_bytes()), "{t:?} (of {domain}/{name}) is in {what}");
            }
        }
        // The search finds a key where it is: in its own file, in base64, on every
        // host whose manifest allows that private half; a destroyed version or a
        // retired signature key (DESIGN 11: public half only) has no file left.
        let keep_private = keyrotate::keyring::Keyring::open(&hosts[0].path("keys"), domain)
            .unwrap()
            .manifest()
            .versions
            .iter()
            .find(|v| v.file == *name)
            .is_some_and(keyrotate::keystore::private_half_allowed);
        for h in &hosts {
            let own = std::fs::read(h.key_dir(domain).join(name)).ok();
            if !keep_private {
                assert!(
                    own.is_none(),
                    "{domain}/{name} is still on disk on {}",
                    h.dir.path().display()
                );
                continue;
            }
            let own = own.unwrap_or_else(|| panic!("{domain}/{name} is missing from a copy"));
            assert!(
                text.iter().any(|t| contains(&own, t.as_bytes())),
                "the search does not find {domain}/{name} in its own file"
            );
        }
        if keep_private {
            found_in_own_file += 1;
        }
    }
    // Each domain keeps at least its active key; the hmac and aes domains also a
    // retired one (symmetric keys keep their material), sess its pending one.
    assert!(
        secrets.len() >= 12 && found_in_own_file >= 7,
        "{} keys, {found_in_own_file} checked in place",
        secrets.len()
    );
    eprintln!(
        "key fragments: {} keys ({destroyed} destroyed in the database) searched in {} haystacks",
        secrets.len(),
        haystacks.len()
    );
}

/// Every file of a host's key folder (lock files left out), for "left as it was".
fn keys_of(env: &Env) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut s = env.snapshot();
    s.retain(|p, _| p.starts_with("keys") && !p.ends_with(".lock"));
    s
}

/// What an operator meets with `sync` on a consumer host: a KEK file that is a symlink
/// or readable by others (check 2, sync 3, the copy left as it was and verifying), a
/// deadline in the past (2, as for every command), a key file deleted or truncated by
/// hand (sync rewrites it), and the output piped into `head -c1` or a closed pipe (the
/// sync is done and acknowledged, exit 0).
#[test]
fn sync_as_an_operator_meets_it_bad_kek_files_past_deadline_damaged_copy_closed_pipe() {
    need_postgres!();
    use std::os::unix::fs::PermissionsExt;
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    for d in ["ec", "mac"] {
        a.rotate(d).status(0);
    }
    sync(&b, None).status(0);
    for d in ["ec", "mac"] {
        a.rotate(d).status(0);
    }
    // b is one epoch behind on both domains from here.
    let before = keys_of(&b);
    let kek = b.path("kek");

    // The KEK as a symlink (to a file with the right bytes and mode): refused.
    let real = b.path("kek.real");
    std::fs::rename(&kek, &real).unwrap();
    std::os::unix::fs::symlink(&real, &kek).unwrap();
    let out = b.cmd().arg("check").status(2);
    assert!(out.stdout.contains("symlink"), "{}", out.stdout);
    let out = sync(&b, None).status(3);
    assert!(
        out.stdout.contains("symlink") && out.stdout.contains("left as it was"),
        "{}",
        out.stdout
    );
    assert_eq!(keys_of(&b), before, "a refused KEK changed the copy");
    std::fs::remove_file(&kek).unwrap();
    std::fs::rename(&real, &kek).unwrap();

    // Readable by the group: refused, naming the mode.
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = b.cmd().arg("check").status(2);
    assert!(out.stdout.contains("mode 0640"), "{}", out.stdout);
    let out = sync(&b, Some("ec")).status(3);
    assert!(out.stdout.contains("mode 0640"), "{}", out.stdout);
    assert_eq!(keys_of(&b), before);
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o400)).unwrap();
    for d in ["ec", "mac"] {
        verify_copy(&b, d, "after the refused KEKs");
        assert_ne!(local_ring(&b, d), db_ring(&db, d), "{d}: b should still lag");
    }

    // A deadline already past is a usage error, as for rotate: nothing is read.
    for past in ["2020-01-01T00:00:00Z", "0s"] {
        let out = b.cmd().args(["sync", "--deadline", past]).status(2);
        assert!(out.stderr.contains("--deadline"), "{past}: {}", out.stderr);
    }
    assert_eq!(keys_of(&b), before);

    // Closed pipes: the sync happens and is acknowledged; its outcome stays 0.
    let pipe = |domain: &str, reader: &str| {
        let c = sync(&b, Some(domain)).command();
        let mut line = format!("{:?}", c.get_program());
        for arg in c.get_args() {
            line.push_str(&format!(" {arg:?}"));
        }
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{line} 2>/dev/null | {reader} >/dev/null; echo ${{PIPESTATUS[0]}}"
            ))
            .current_dir(b.dir.path())
            .env_remove("KEYROTATE_FAILPOINTS")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(pipe("ec", "head -c1"), "0");
    assert_eq!(pipe("mac", "true"), "0");
    for d in ["ec", "mac"] {
        assert_eq!(verify_copy(&b, d, "synced into a closed pipe"), db_ring(&db, d), "{d}");
        assert_eq!(
            db.sql(&format!(
                "SELECT epoch FROM shared_sync_acks WHERE domain = '{d}' AND host = 'host-b'"
            )),
            epoch(&db, d).to_string(),
            "{d}: not acknowledged"
        );
    }

    // A key file deleted, or truncated, by hand: check says so, sync rewrites it.
    let synced = keys_of(&b);
    let active = |d: &str| {
        let m = b.manifest(d);
        let v = m["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["state"] == "active")
            .unwrap()
            .clone();
        b.key_dir(d).join(v["file"].as_str().unwrap())
    };
    std::fs::remove_file(active("ec")).unwrap();
    std::fs::write(active("mac"), "dGhpcyBpcyBub3QgdGhlIGtleQ==\n").unwrap();
    let out = b.cmd().arg("check").status(2);
    assert!(out.stdout.contains("does not verify"), "{}", out.stdout);
    let out = sync(&b, None).status(0);
    assert!(
        out.stdout.contains("SYNCED ec") && out.stdout.contains("SYNCED mac"),
        "{}",
        out.stdout
    );
    for d in ["ec", "mac"] {
        assert_eq!(verify_copy(&b, d, "repaired"), db_ring(&db, d), "{d}");
    }
    assert_eq!(keys_of(&b), synced, "the repaired copy differs from the synced one");
    b.cmd().arg("check").status(0);
}

/// A SIGTERM (Control-M's or an operator's polite stop) arriving at each step of a
/// shared rotation: the run ends by itself with its true outcome — 0 when it reached
/// its commit (the commit finishes first), else 3 with nothing committed — and its row
/// is closed with that code; every copy still verifies.
#[cfg(feature = "failpoints")]
#[test]
fn sigterm_at_every_step_of_a_shared_rotation_ends_it_with_its_true_outcome() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    for _ in 0..3 {
        a.rotate("sess").status(0);
        sync(&b, Some("sess")).status(0);
    }
    let log = a.path("steps.log");
    a.rotate("sess")
        .args(["--run-id", "ENUM"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    sync(&b, Some("sess")).status(0);
    let steps = steps_of(&log);
    let (mut committed, mut aborted) = (0, 0);
    for (i, step) in steps.iter().enumerate() {
        let k = i + 1;
        let id = format!("T{k}");
        let (e0, ring0) = (epoch(&db, "sess"), db_ring(&db, "sess"));
        let out = a
            .rotate("sess")
            .args(["--run-id", &id])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=term"))
            .output();
        let context = format!(
            "SIGTERM at step {k} ({step}): exit {}\n{}{}",
            out.code, out.stdout, out.stderr
        );
        let (e1, ring1) = (epoch(&db, "sess"), db_ring(&db, "sess"));
        let row = db.sql(&format!(
            "SELECT coalesce((SELECT state || ' ' || exit_code FROM rotations WHERE run_id = '{id}'), 'none')"
        ));
        match out.code {
            0 => {
                assert_eq!(e1, e0 + 1, "{context}");
                assert_eq!(row, "succeeded 0", "{context}");
                committed += 1;
            }
            3 => {
                assert_eq!((e1, &ring1), (e0, &ring0), "{context}: committed, yet exit 3");
                assert!(row == "aborted 3" || row == "none", "{context}: row {row}");
                aborted += 1;
            }
            _ => panic!("{context}"),
        }
        copy_is_one_of(&db, &a, "host-a", &[(e0, ring0), (e1, ring1)], &context);
        for h in [&a, &b] {
            sync(h, Some("sess")).status(0);
            assert_eq!(verify_copy(h, "sess", &context), db_ring(&db, "sess"), "{context}");
        }
    }
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations WHERE exit_code IS NULL"),
        "0",
        "a row was left open"
    );
    assert!(committed > 0 && aborted > 0, "{committed} committed, {aborted} aborted");
    eprintln!(
        "SIGTERM points: {} steps, {committed} ended 0, {aborted} ended 3",
        steps.len()
    );
}

/// An application reading its host's copy (`keyrotate::keyring`) while `sync` rewrites
/// it, round after round, never gets an error and never a keyring that mixes two
/// epochs: every snapshot it sees is a committed keyring, every live key loads.
#[test]
fn a_reader_of_a_hosts_copy_never_fails_or_mixes_epochs_while_sync_rewrites_it() {
    need_postgres!();
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a", &POOLS);
    let b = host(&db, "host-b", "pool-b", &POOLS);
    a.rotate("sess").status(0);
    sync(&b, Some("sess")).status(0);
    let mut committed = std::collections::BTreeSet::from([db_ring(&db, "sess")]);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, keys) = (stop.clone(), b.path("keys"));
        std::thread::spawn(move || {
            let (mut seen, mut failures, mut reads) = (std::collections::BTreeSet::new(), Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                reads += 1;
                match keyrotate::keyring::Keyring::open(&keys, "sess") {
                    Ok(ring) => {
                        let mut items = Vec::new();
                        // Every live version verifies (a retired signature key by
                        // the public half its entry records, DESIGN 11)...
                        let verifiers = ring.verification_keys().unwrap_or_else(|e| {
                            failures.push(e.to_string());
                            Vec::new()
                        });
                        for v in &ring.manifest().versions {
                            let state = serde_json::to_value(v.state).unwrap();
                            items.push(format!("{}:{}:{}", v.version, state.as_str().unwrap(), v.fingerprint));
                            if !v.is_live() {
                                continue;
                            }
                            if !verifiers.iter().any(|k| k.version == v.version) {
                                failures.push(format!("v{}: no verification key", v.version));
                            }
                            // ...and every private half the manifest allows loads.
                            if keyrotate::keystore::private_half_allowed(v) {
                                if let Err(e) = ring.version(v.version) {
                                    failures.push(format!("v{}: {e}", v.version));
                                }
                            }
                        }
                        seen.insert(items.join(" "));
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (seen, failures, reads)
        })
    };
    for _ in 0..12 {
        a.rotate("sess").status(0);
        committed.insert(db_ring(&db, "sess"));
        sync(&b, Some("sess")).status(0);
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, failures, reads) = reader.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {reads} reads failed: {failures:?}",
        failures.len()
    );
    for ring in &seen {
        assert!(
            committed.contains(ring),
            "a reader saw a keyring no commit made: {ring}"
        );
    }
    assert!(
        seen.len() >= 3,
        "the reader saw only {} keyrings in {reads} reads",
        seen.len()
    );
    eprintln!(
        "reader: {reads} reads, {} distinct committed keyrings, no failure",
        seen.len()
    );
}
