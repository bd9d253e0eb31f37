//! What an operator (or an attacker with an operator's access) can do around a run:
//! close its output, hand it an untrusted config or hook, an unwritable audit file, a
//! broken store under `status`, spoofing characters in `--operator`. Each must leave a
//! true exit code, a true ledger row, and nothing changed that should not be.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use crate::common::{Env, Run};

// ---- item 7: a closed or broken stdout/stderr never changes the outcome -------------

/// Where the output of a run goes in [`run_with_output`].
#[derive(Clone, Copy, Debug)]
enum Sink {
    /// A pipe whose reader has already exited: every write gets EPIPE.
    BrokenPipe,
    /// `/dev/null`.
    Null,
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
}

fn stdio(s: Sink, broken: &std::os::fd::OwnedFd) -> Stdio {
    match s {
        Sink::BrokenPipe => Stdio::from(broken.try_clone().unwrap()),
        Sink::Null => Stdio::null(),
        Sink::Full => Stdio::from(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap()),
    }
}

/// The write end of a pipe whose read end is already closed.
fn broken_pipe() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    writer
}

/// Runs `run` with stdout and stderr sent to `out`/`err`; returns the exit code (a
/// signal as 128+N, so SIGPIPE would show as 141).
fn run_with_output(run: &Run, out: Sink, err: Sink) -> i32 {
    let writer = broken_pipe();
    let status = run
        .command()
        .stdout(stdio(out, &writer))
        .stderr(stdio(err, &writer))
        .status()
        .unwrap();
    status
        .code()
        .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0))
}

/// Every way the output can be lost: stdout broken, stderr broken, both broken, and
/// both closed outright (`>&- 2>&-`).
fn each_lost_output(env: &Env, make: impl Fn() -> Vec<String>, expect: i32, mut after: impl FnMut(&str)) {
    for (what, out, err) in [
        ("stdout to a broken pipe", Sink::BrokenPipe, Sink::Null),
        ("stderr to a broken pipe", Sink::Null, Sink::BrokenPipe),
        ("both to a broken pipe", Sink::BrokenPipe, Sink::BrokenPipe),
        ("both to a full device", Sink::Full, Sink::Full),
    ] {
        let args = make();
        let code = run_with_output(&env.cmd().args(&args), out, err);
        assert_eq!(code, expect, "{args:?} with {what}\n{}", env.listing());
        after(what);
    }
    let args = make();
    let closed = env.cmd().args(&args).shell_prefix("exec >&- 2>&-").output();
    assert_eq!(closed.code, expect, "{args:?} with stdout and stderr closed");
    after("both closed");
}

#[test]
fn a_rotation_with_its_output_gone_still_succeeds_and_says_so_in_the_ledger() {
    let env = Env::new();
    let n = std::cell::Cell::new(0u32);
    let args = || {
        n.set(n.get() + 1);
        [
            "rotate",
            "--domain",
            "sig",
            "--deadline",
            "1m",
            "--force",
            "-v",
            "--run-id",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("lost-output-{}", n.get())])
        .collect::<Vec<_>>()
    };
    let mut version = 0;
    each_lost_output(&env, args, 0, |what| {
        let row = env.last_row();
        assert_eq!(row["state"], "succeeded", "{what}: {row}");
        assert_eq!(row["exit_code"], 0, "{what}: {row}");
        version += 1;
        assert_eq!(env.manifest("sig")["primary"], version, "{what}");
    });
    // The domain is not blocked: a normal run still works.
    env.rotate("sig").arg("--force").status(0);
    // The audit trail has every run's end.
    let ends = env
        .audit()
        .iter()
        .filter(|e| e["event"] == "rotation.succeeded")
        .count();
    assert_eq!(ends, 6);
}

#[test]
fn a_failed_rotation_with_its_output_gone_keeps_its_true_code() {
    let env = Env::new();
    env.rotate("sig").status(0);
    // Not due: refused (7) with a closed row.
    let n = std::cell::Cell::new(0u32);
    let args = || {
        n.set(n.get() + 1);
        vec![
            "rotate".to_string(),
            "--domain".into(),
            "sig".into(),
            "--deadline".into(),
            "1m".into(),
            "--run-id".into(),
            format!("not-due-{}", n.get()),
        ]
    };
    each_lost_output(&env, args, 7, |what| {
        let row = env.last_row();
        assert_eq!(
            (row["state"].as_str(), row["exit_code"].as_i64()),
            (Some("refused"), Some(7)),
            "{what}"
        );
    });
    // A key store the run must refuse: ABORTED (3), and the row says aborted.
    std::fs::set_permissions(env.key_dir("sig"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let args = || {
        n.set(n.get() + 1);
        vec![
            "rotate".to_string(),
            "--domain".into(),
            "sig".into(),
            "--deadline".into(),
            "1m".into(),
            "--force".into(),
            "--run-id".into(),
            format!("aborted-{}", n.get()),
        ]
    };
    each_lost_output(&env, args, 3, |what| {
        let row = env.last_row();
        assert_eq!(
            (row["state"].as_str(), row["exit_code"].as_i64()),
            (Some("aborted"), Some(3)),
            "{what}"
        );
    });
    assert_eq!(env.manifest("sig")["primary"], 1);
}

/// `each_lost_output` for a command that exists for its output and succeeds: 0 with a
/// broken pipe or closed descriptors, 3 when the output hits a full device.
fn each_lost_report(env: &Env, args: &[&str]) {
    for (what, out, err, expect) in [
        ("stdout to a broken pipe", Sink::BrokenPipe, Sink::Null, 0),
        ("stderr to a broken pipe", Sink::Null, Sink::BrokenPipe, 0),
        ("both to a broken pipe", Sink::BrokenPipe, Sink::BrokenPipe, 0),
        ("both to a full device", Sink::Full, Sink::Full, 3),
        ("stderr to a full device", Sink::Null, Sink::Full, 0),
    ] {
        let code = run_with_output(&env.cmd().args(args), out, err);
        assert_eq!(code, expect, "{args:?} with {what}\n{}", env.listing());
    }
    let closed = env.cmd().args(args).shell_prefix("exec >&- 2>&-").output();
    assert_eq!(closed.code, 0, "{args:?} with stdout and stderr closed");
}

#[test]
fn status_history_and_check_with_their_output_gone_keep_their_codes() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("mac").status(0);
    let words = |w: &[&str]| {
        let w: Vec<String> = w.iter().map(|s| s.to_string()).collect();
        move || w.clone()
    };
    // Their output is their purpose: a full device fails them with 3 (output_errors),
    // a reader that closed its pipe or descriptors closed by the caller do not.
    for args in [
        &["status"][..],
        &["status", "--output", "json"],
        &["history"],
        &["history", "--output", "json"],
        &["check"],
    ] {
        each_lost_report(&env, args);
    }
    each_lost_output(
        &env,
        words(&["rotate", "--domain", "sig", "--deadline", "1m", "--dry-run"]),
        7,
        |_| {},
    );
    // A usage error is reported (to nobody) with its code.
    each_lost_output(&env, words(&["status", "--domain", "nope"]), 2, |_| {});
    each_lost_output(&env, words(&["rotate", "--bogus"]), 2, |_| {});
}

#[test]
fn a_shell_pipeline_into_head_keeps_the_rotation_true() {
    let env = Env::new();
    let out = env.path("pipestatus");
    // `keyrotate … 2>&1 >/dev/null | head -1`: the log goes into a pipe that head stops
    // reading after one line.
    let script = format!(
        "\"$0\" \"$@\" 2>&1 >/dev/null | head -1 >/dev/null; echo ${{PIPESTATUS[0]}} > '{}'",
        out.display()
    );
    let status = env
        .rotate("sig")
        .args(["-vv", "--run-id", "piped"])
        .command()
        .get_args()
        .map(|a| a.to_owned())
        .collect::<Vec<_>>();
    let code = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .arg(crate::common::bin())
        .args(status)
        .current_dir(env.dir.path())
        .env("USER", "tester")
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(code.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "0");
    let row = env.last_row();
    assert_eq!(
        (row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("succeeded"), Some(0))
    );
}

// ---- item 10: status alerts on a broken store or ledger ------------------------------

#[test]
fn status_exits_3_on_a_corrupt_manifest_or_ledger_and_4_when_blocked() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("mac").status(0);
    // Healthy (and domains never rotated are not a problem).
    env.cmd().arg("status").status(0);

    // A corrupt keyring.json: 3, naming the domain.
    let manifest = env.key_dir("sig").join("keyring.json");
    let good = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, b"{ not json").unwrap();
    let out = env.cmd().arg("status").status(3);
    assert!(out.stderr.contains("sig"), "{}", out.stderr);
    env.cmd().args(["status", "--output", "json"]).status(3);
    // Scoped to a healthy domain: 0; to the broken one: 3.
    env.cmd().args(["status", "--domain", "mac"]).status(0);
    env.cmd().args(["status", "--domain", "sig"]).status(3);
    std::fs::write(&manifest, &good).unwrap();
    env.cmd().arg("status").status(0);

    // A manifest whose key file does not verify: 3.
    let key = env.key_dir("mac").join("v000001.key");
    let good_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, b"AAAA\n").unwrap();
    env.cmd().arg("status").status(3);
    std::fs::write(&key, &good_key).unwrap();
    env.cmd().arg("status").status(0);

    // A ledger that is not a database: 3, and the table still shows the key stores.
    let ledger = env.path("state/ledger.sqlite3");
    let good_ledger = std::fs::read(&ledger).unwrap();
    // The WAL is kept between runs: the newest pages may live only there.
    let wal_files: Vec<_> = ["state/ledger.sqlite3-wal", "state/ledger.sqlite3-shm"]
        .iter()
        .map(|f| (env.path(f), std::fs::read(env.path(f)).ok()))
        .collect();
    for (f, _) in &wal_files {
        let _ = std::fs::remove_file(f);
    }
    std::fs::write(&ledger, vec![b'x'; 8192]).unwrap();
    let out = env.cmd().arg("status").status(3);
    assert!(out.stdout.contains("v1"), "{}", out.stdout);
    assert!(out.stderr.contains("ledger"), "{}", out.stderr);
    std::fs::write(&ledger, &good_ledger).unwrap();
    for (f, bytes) in &wal_files {
        if let Some(b) = bytes {
            std::fs::write(f, b).unwrap();
        }
    }
    env.cmd().arg("status").status(0);

    // A ledger whose schema is malformed (the rotations table is gone): 3.
    {
        let conn = rusqlite::Connection::open(&ledger).unwrap();
        conn.execute_batch("ALTER TABLE rotations RENAME TO rotations_gone")
            .unwrap();
    }
    env.cmd().arg("status").status(3);
    {
        let conn = rusqlite::Connection::open(&ledger).unwrap();
        conn.execute_batch("ALTER TABLE rotations_gone RENAME TO rotations")
            .unwrap();
    }
    env.cmd().arg("status").status(0);

    // Blocked wins over broken: 4.
    std::fs::write(&manifest, b"{ not json").unwrap();
    env.rotate("sig").arg("--force").status(4);
    env.cmd().arg("status").status(4);
}

// ---- item 9: no audit, no rotation ---------------------------------------------------

const AUDIT_ELSEWHERE: &str = r#"
[state]
dir = "state"
[host]
pool = "p"
[audit]
file = "log/audit.jsonl"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
min_interval = "0s"
[domains.sig]
algorithm = "ed25519"
"#;

#[test]
fn an_audit_file_that_cannot_be_written_aborts_before_any_key_is_touched() {
    type Break = Box<dyn Fn(&Env)>;
    let cases: Vec<(&str, Break)> = vec![
        (
            "a folder",
            Box::new(|env: &Env| std::fs::create_dir_all(env.path("log/audit.jsonl")).unwrap()),
        ),
        (
            "under a regular file",
            Box::new(|env: &Env| std::fs::write(env.path("log"), b"not a folder").unwrap()),
        ),
        (
            "a symlink",
            Box::new(|env: &Env| {
                std::fs::create_dir_all(env.path("log")).unwrap();
                std::fs::write(env.path("elsewhere.jsonl"), b"").unwrap();
                std::os::unix::fs::symlink(env.path("elsewhere.jsonl"), env.path("log/audit.jsonl")).unwrap();
            }),
        ),
        (
            "a symlink to a device",
            Box::new(|env: &Env| {
                std::fs::create_dir_all(env.path("log")).unwrap();
                std::os::unix::fs::symlink("/dev/full", env.path("log/audit.jsonl")).unwrap();
            }),
        ),
    ];
    for (what, damage) in cases {
        let env = Env::with_config(AUDIT_ELSEWHERE);
        // A first rotation with a good audit file, then break it.
        env.rotate("sig").status(0);
        std::fs::remove_dir_all(env.path("log")).unwrap();
        damage(&env);
        let keys_before = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
        let files_before = env.key_files("sig");

        // check lists it, dry run predicts it, both change nothing.
        let snap = env.snapshot();
        let out = env.cmd().arg("check").status(2);
        assert!(out.stdout.contains("audit.file"), "{what}: {}", out.stdout);
        env.rotate("sig").arg("--dry-run").status(3);
        env.assert_unchanged(&snap, what);

        let out = env.rotate("sig").args(["--run-id", "no-audit"]).status(3);
        assert!(out.stdout.contains("audit"), "{what}: {}", out.stdout);
        let row = env.last_row();
        assert_eq!(row["run_id"], "no-audit", "{what}");
        assert_eq!(
            (row["state"].as_str(), row["exit_code"].as_i64()),
            (Some("aborted"), Some(3)),
            "{what}"
        );
        assert!(row["reason"].as_str().unwrap().contains("audit"), "{what}: {row}");
        assert_eq!(
            std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(),
            keys_before,
            "{what}"
        );
        assert_eq!(env.key_files("sig"), files_before, "{what}");
        // The domain is not blocked: fixed, the next run rotates.
        let _ = std::fs::remove_dir_all(env.path("log"));
        let _ = std::fs::remove_file(env.path("log"));
        env.rotate("sig").status(0);
        env.cmd().arg("check").status(0);
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn an_audit_failure_at_the_preflight_aborts_with_a_row_and_the_keys_untouched() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let before = std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap();
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "audit-error"])
        .env("KEYROTATE_FAILPOINTS", "audit.preflight=error")
        .status(3);
    assert!(out.stdout.contains("injected failure"), "{}", out.stdout);
    let row = env.last_row();
    assert_eq!(
        (row["state"].as_str(), row["exit_code"].as_i64()),
        (Some("aborted"), Some(3))
    );
    assert_eq!(std::fs::read(env.key_dir("sig").join("keyring.json")).unwrap(), before);
    assert_eq!(env.key_files("sig"), ["v000001.pem"]);
    env.rotate("sig").arg("--force").status(0);
}

// ---- item 8: config and hook trust ---------------------------------------------------

/// A case: its name, how to break things, how to repair them.
type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, Box<dyn Fn() + 'a>);

/// Another user's uid (`nobody`); root can hand files to it.
const OTHER_UID: u32 = 65534;

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &std::path::Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_config_someone_else_could_write_is_refused_and_nothing_is_created() {
    let env = Env::new();
    let config = env.config_path();
    let mut cases: Vec<Case> = vec![
        (
            "group-writable",
            Box::new(|| chmod(&config, 0o664)),
            Box::new(|| chmod(&config, 0o644)),
        ),
        (
            "world-writable",
            Box::new(|| chmod(&config, 0o646)),
            Box::new(|| chmod(&config, 0o644)),
        ),
        (
            "in a folder writable by others",
            Box::new(|| chmod(env.dir.path(), 0o777)),
            Box::new(|| chmod(env.dir.path(), 0o700)),
        ),
    ];
    if running_as_root() {
        cases.push((
            "owned by another user",
            Box::new(|| chown(&config, OTHER_UID)),
            Box::new(|| chown(&config, 0)),
        ));
        cases.push((
            "in a folder owned by another user",
            Box::new(|| chown(env.dir.path(), OTHER_UID)),
            Box::new(|| chown(env.dir.path(), 0)),
        ));
    } else {
        println!("SKIPPED: ownership cases need root to chown (running as a normal user)");
    }
    for (what, damage, repair) in cases {
        damage();
        let snap = env.snapshot();
        let out = env.rotate("sig").status(3);
        assert!(out.stderr.contains("config"), "{what}: {}", out.stderr);
        env.rotate("sig").arg("--dry-run").status(3);
        env.cmd().arg("status").status(3);
        env.resolve("sig", "x", "note").status(3);
        let out = env.cmd().arg("check").status(2);
        let named = format!("config {}", config.display());
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("problem: ") && l.contains(&named)),
            "{what}: {}",
            out.stdout
        );
        env.assert_unchanged(&snap, what);
        assert!(!env.path("state").exists(), "{what}");
        repair();
    }
    // A sticky world-writable folder (like /tmp) is fine: others cannot replace the file.
    chmod(env.dir.path(), 0o1777);
    env.rotate("sig").status(0);
    env.cmd().arg("check").status(0);
}

#[test]
fn a_config_reached_through_a_symlinked_folder_works() {
    let env = Env::new();
    let link = env.path("etc-link");
    std::os::unix::fs::symlink(env.dir.path(), &link).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(crate::common::bin())
            .arg("--config")
            .arg(link.join("rotate.toml"))
            .args(args)
            .env("USER", "tester")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["rotate", "--domain", "sig", "--deadline", "1m"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run(&["check"]).status.code(), Some(0));
    if running_as_root() {
        // ... but a symlink another user owns can be repointed by them.
        chown(&link, OTHER_UID);
        let out = run(&["status"]);
        assert_eq!(out.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"));
    }
}

#[test]
fn the_example_config_of_a_fresh_clone_is_trusted() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rotate.toml.example");
    let out = std::process::Command::new(crate::common::bin())
        .arg("--config")
        .arg(&example)
        .arg("check")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("problem: config"), "{stdout}");
    assert!(!stdout.contains("problem: program"), "{stdout}");
}

const HOOK_CONFIG: &str = r#"
[state]
dir = "state"
[host]
pool = "p"
[domains.pw]
designated_pool = "p"
backend = "command"
command = ["./hooks/bin/rotate-pw", "--role", "orders"]
min_interval = "0s"
"#;

fn hook_env() -> Env {
    let env = Env::with_config(HOOK_CONFIG);
    std::fs::create_dir_all(env.path("hooks/bin")).unwrap();
    std::fs::write(
        env.path("hooks/bin/rotate-pw"),
        "#!/bin/sh\necho \"$KEYROTATE_STEP\" >> \"$(dirname \"$0\")/steps.log\"\n",
    )
    .unwrap();
    chmod(&env.path("hooks/bin/rotate-pw"), 0o755);
    env
}

#[test]
fn a_hook_someone_else_could_change_is_refused_before_it_runs() {
    let env = hook_env();
    let hook = env.path("hooks/bin/rotate-pw");
    let bin = env.path("hooks/bin");
    let hooks = env.path("hooks");
    let mut cases: Vec<Case> = vec![
        (
            "group-writable",
            Box::new(|| chmod(&hook, 0o775)),
            Box::new(|| chmod(&hook, 0o755)),
        ),
        (
            "world-writable",
            Box::new(|| chmod(&hook, 0o757)),
            Box::new(|| chmod(&hook, 0o755)),
        ),
        (
            "in a folder writable by others",
            Box::new(|| chmod(&bin, 0o777)),
            Box::new(|| chmod(&bin, 0o755)),
        ),
        (
            "under a folder writable by others",
            Box::new(|| chmod(&hooks, 0o757)),
            Box::new(|| chmod(&hooks, 0o755)),
        ),
    ];
    if running_as_root() {
        cases.push((
            "owned by another user",
            Box::new(|| chown(&hook, OTHER_UID)),
            Box::new(|| chown(&hook, 0)),
        ));
        cases.push((
            "in a folder owned by another user",
            Box::new(|| chown(&bin, OTHER_UID)),
            Box::new(|| chown(&bin, 0)),
        ));
    } else {
        println!("SKIPPED: ownership cases need root to chown (running as a normal user)");
    }
    for (n, (what, damage, repair)) in cases.into_iter().enumerate() {
        damage();
        let out = env.cmd().arg("check").status(2);
        assert!(out.stdout.contains("domains.pw.command"), "{what}: {}", out.stdout);
        env.cmd()
            .args(["rotate", "--domain", "pw", "--deadline", "1m", "--dry-run"])
            .status(3);
        let id = format!("untrusted-{n}");
        env.cmd()
            .args(["rotate", "--domain", "pw", "--deadline", "1m", "--run-id", &id])
            .status(3);
        let row = env.last_row();
        assert_eq!(
            (row["run_id"].as_str(), row["state"].as_str()),
            (Some(id.as_str()), Some("aborted")),
            "{what}"
        );
        assert!(!env.path("hooks/bin/steps.log").exists(), "{what}: the hook ran");
        repair();
    }
    // A sticky world-writable folder is fine.
    chmod(&bin, 0o1777);
    env.cmd().arg("check").status(0);
    env.cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "1m"])
        .status(0);
    assert!(env.path("hooks/bin/steps.log").exists());
}

// ---- item 12: the smaller ones -------------------------------------------------------

#[test]
fn operator_reason_and_note_refuse_invisible_and_bidi_characters() {
    let env = Env::new();
    for bad in [
        "alice\u{202E}nimda",
        "\u{202A}bob",
        "carol\u{2066}x\u{2069}",
        "da\u{200B}ve",
        "eve\u{200F}",
        "fred\u{FEFF}",
        "gina\u{2028}next line",
        "hugo\u{E000}",
    ] {
        let snap = env.snapshot();
        let out = env.rotate("sig").args(["--operator", bad]).status(2);
        assert!(out.stderr.contains("--operator"), "{bad:?}: {}", out.stderr);
        env.rotate("sig").args(["--reason", bad]).status(2);
        env.rotate("sig").env("USER", bad).status(2);
        env.assert_unchanged(&snap, "a refused --operator");
    }
    // Plain text from any script is fine.
    env.rotate("sig")
        .args(["--operator", "José Ñúñez", "--reason", "Schlüsselwechsel — 定期"])
        .status(0);
    assert_eq!(env.last_row()["operator"], "José Ñúñez");
    // resolve's --note and --operator too.
    let run = env.last_row()["run_id"].as_str().unwrap().to_string();
    let out = env.resolve("sig", &run, "looked \u{202E}ok").status(2);
    assert!(
        out.stderr.contains("--note") && out.stderr.contains("U+202E"),
        "{}",
        out.stderr
    );
    let out = env
        .resolve("sig", &run, "fine")
        .args(["--operator", "x\u{200D}y"])
        .status(2);
    assert!(
        out.stderr.contains("--operator") && out.stderr.contains("U+200D"),
        "{}",
        out.stderr
    );
}

#[test]
fn dry_run_plans_say_what_the_run_would_really_do() {
    let env = Env::new();
    for domain in ["mac", "aes"] {
        let out = env.rotate(domain).arg("--dry-run").status(0);
        assert!(!out.stdout.contains("jwks"), "{domain}: {}", out.stdout);
        assert!(out.stdout.contains("current.key"), "{domain}: {}", out.stdout);
    }
    let out = env.rotate("sig").arg("--dry-run").status(0);
    assert!(
        out.stdout.contains("jwks.json") && out.stdout.contains("current.pem"),
        "{}",
        out.stdout
    );

    // Hook arguments are shown quoted, one shell word each.
    let env = Env::with_config(&HOOK_CONFIG.replace(
        r#"["./hooks/bin/rotate-pw", "--role", "orders"]"#,
        r#"["./hooks/bin/rotate-pw", "--role", "orders team", "it's", "$HOME", ""]"#,
    ));
    std::fs::create_dir_all(env.path("hooks/bin")).unwrap();
    std::fs::write(env.path("hooks/bin/rotate-pw"), "#!/bin/sh\nexit 0\n").unwrap();
    chmod(&env.path("hooks/bin/rotate-pw"), 0o755);
    let out = env
        .cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "1m", "--dry-run"])
        .status(0);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("KEYROTATE_STEP=create"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    let shown = line.split_once("KEYROTATE_STEP=create ").unwrap().1;
    let words = shlex::split(shown).unwrap_or_else(|| panic!("not shell words: {shown}"));
    assert_eq!(&words[1..], ["--role", "orders team", "it's", "$HOME", ""], "{line}");
    assert!(words[0].ends_with("hooks/bin/rotate-pw"), "{line}");
}

#[test]
fn defaults_that_do_not_apply_to_a_backend_are_not_errors() {
    let text = r#"
[state]
dir = "state"
[host]
pool = "p"
[defaults]
designated_pool = "p"
backend = "keystore"
algorithm = "ed25519"
keystore = "keys"
activation = "immediate"
retain = 2
min_interval = "0s"
[domains.sig]
[domains.pw]
backend = "command"
command = ["./hook"]
"#;
    let env = Env::with_config(text);
    std::fs::write(env.path("hook"), "#!/bin/sh\nexit 0\n").unwrap();
    chmod(&env.path("hook"), 0o755);
    env.cmd().arg("check").status(0);
    env.rotate("sig").status(0);
    env.cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "1m"])
        .status(0);
    // The same key set on the command domain itself is still an error.
    std::fs::write(
        env.config_path(),
        text.replace("command = [\"./hook\"]", "command = [\"./hook\"]\nkeystore = \"keys\""),
    )
    .unwrap();
    let out = env.cmd().arg("check").status(2);
    assert!(out.stdout.contains("domains.pw.keystore"), "{}", out.stdout);
    let out = env
        .cmd()
        .args(["rotate", "--domain", "pw", "--deadline", "1m"])
        .status(2);
    assert!(out.stderr.contains("domains.pw.keystore"), "{}", out.stderr);
    // And a default command does not break keystore domains.
    std::fs::write(
        env.config_path(),
        text.replace("[defaults]\n", "[defaults]\ncommand = [\"./hook\"]\n")
            .replace("backend = \"command\"\ncommand = [\"./hook\"]", "backend = \"command\""),
    )
    .unwrap();
    env.cmd().arg("check").status(0);
    env.rotate("sig").status(0);
}

#[test]
fn a_state_folder_under_a_symlinked_parent_works_but_a_symlinked_state_folder_does_not() {
    let env =
        Env::with_config(&crate::common::DEFAULT_CONFIG.replace("dir = \"state\"", "dir = \"var-lib/keyrotate\""));
    std::fs::create_dir(env.path("data")).unwrap();
    std::os::unix::fs::symlink(env.path("data"), env.path("var-lib")).unwrap();
    env.rotate("sig").status(0);
    assert!(env.path("data/keyrotate/ledger.sqlite3").metadata().unwrap().len() > 0);
    env.cmd().arg("status").status(0);
    let out = env.cmd().args(["history", "--output", "json"]).status(0);
    assert_eq!(out.json()["runs"].as_array().unwrap().len(), 1);
    env.cmd().arg("check").status(0);
    env.rotate("sig").arg("--dry-run").status(7);
    env.rotate("sig").arg("--force").status(0);

    // The configured folder itself may not be a symlink.
    let env = Env::with_config(&crate::common::DEFAULT_CONFIG.replace("dir = \"state\"", "dir = \"state-link\""));
    std::fs::create_dir(env.path("real-state")).unwrap();
    chmod(&env.path("real-state"), 0o700);
    std::os::unix::fs::symlink(env.path("real-state"), env.path("state-link")).unwrap();
    let out = env.rotate("sig").status(3);
    assert!(out.stdout.contains("symlink"), "{}", out.stdout);
    assert_eq!(std::fs::read_dir(env.path("real-state")).unwrap().count(), 0);
}

fn chown_tree(p: &std::path::Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

#[test]
fn check_catches_exposed_key_files_and_a_key_store_it_cannot_write() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("mac").status(0);
    env.cmd().arg("check").status(0);
    let key = env.key_dir("sig").join("v000001.pem");
    chmod(&key, 0o644);
    let out = env.cmd().arg("check").status(2);
    assert!(
        out.stdout.contains("v000001.pem") && out.stdout.contains("0644"),
        "{}",
        out.stdout
    );
    chmod(&key, 0o600);
    env.cmd().arg("check").status(0);

    if !running_as_root() {
        println!("SKIPPED: the read-only key store case runs keyrotate as another user, which needs root");
        return;
    }
    // As another user who owns everything, a key folder it cannot write (0500) is a
    // problem, as is one still owned by root.
    // The binary copied where the other user can run it: the checkout may sit in a
    // folder only root can enter (a clone in `mktemp -d` is 0700).
    let bin = env.path("keyrotate-as-other");
    std::fs::copy(env!("CARGO_BIN_EXE_keyrotate"), &bin).unwrap();
    chown_tree(env.dir.path(), OTHER_UID);
    let as_other = |args: &[&str]| {
        use std::os::unix::process::CommandExt;
        let run = env.cmd().args(args).command();
        let mut c = std::process::Command::new(&bin);
        c.args(run.get_args());
        for (k, v) in run.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = run.get_current_dir() {
            c.current_dir(d);
        }
        c.uid(OTHER_UID).gid(OTHER_UID);
        let o = c.output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (code, stdout) = as_other(&["check"]);
    assert_eq!(code, Some(0), "{stdout}");
    chmod(&env.key_dir("mac"), 0o500);
    let (code, stdout) = as_other(&["check"]);
    assert_eq!(code, Some(2), "{stdout}");
    assert!(
        stdout.contains("read-only") && stdout.contains("domains.mac"),
        "{stdout}"
    );
    assert!(
        !stdout
            .lines()
            .any(|l| l.starts_with("problem: ") && l.contains("domains.sig")),
        "{stdout}"
    );
    chmod(&env.key_dir("mac"), 0o700);
    chown(&env.key_dir("sig").join("v000001.pem"), 0);
    let (code, stdout) = as_other(&["check"]);
    assert_eq!(code, Some(2), "{stdout}");
    assert!(stdout.contains("owned by uid 0"), "{stdout}");
}

#[test]
fn check_lists_every_config_problem_and_rotate_says_there_are_more() {
    let env = Env::with_config(
        r#"
[state]
dir = "state"
[host]
pool = "bad pool"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
[domains.one]
algorithm = "rsa-512"
retain = -1
activation = "later"
[domains.two]
algorithm = "ed25519"
colour = "blue"
retain = "many"
[domains.three]
backend = "command"
[domains.four]
algorithm = "ed25519"
max_deadline = "0s"
[domains.good]
algorithm = "ed25519"
"#,
    );
    let out = env.cmd().arg("check").status(2);
    let problems: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("problem: ")).collect();
    for key in [
        "host.pool",
        "domains.one.algorithm",
        "domains.one.retain",
        "domains.one.activation",
        "domains.two.colour: unknown field `colour`",
        "domains.two.retain: invalid type",
        "domains.three.command",
        "domains.four.max_deadline",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(key)),
            "{key} not listed:\n{}",
            out.stdout
        );
    }
    assert_eq!(problems.len(), 8, "{}", out.stdout);
    // rotate reports the first, on one line, and says how many more there are in what
    // it validated: the top-level keys and its own domain (`one`: three problems).
    let out = env.rotate("one").status(2);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("host.pool"))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(line.contains("3 more problems"), "{line}");
    assert!(env.snapshot().is_empty(), "{}", env.listing());
}
