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
struct TokenHeld {
    _files: Vec<std::fs::File>,
}

impl TokenHeld {
    fn new(env: &Env) -> TokenHeld {
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
    let Some((env, hsm)) = setup("pkcs11_attacks::token_hangs", ONE) else {
        return;
    };
    hsm.with(env.rotate("ed")).status(0);
    let before = env.manifest("ed");
    let held = TokenHeld::new(&env);
    let start = Instant::now();
    let mut child = hsm
        .with(env.cmd())
        .args(["rotate", "--domain", "ed", "--force", "--deadline", "3s"])
        .spawn();
    let mut code = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(s) = child.try_wait().unwrap() {
            code = s.code();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = start.elapsed();
    if code.is_none() {
        let _ = child.kill();
    }
    drop(held);
    let _ = child.wait();
    assert!(
        code.is_some(),
        "a run with --deadline 3s was still running after {took:?} on a hung token"
    );
    assert_eq!(code, Some(8), "a hung token is a time-out (exit 8)");
    assert_eq!(env.manifest("ed")["primary"], before["primary"]);
    let _ = PIN;
}
