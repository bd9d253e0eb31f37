//! The consumer API under concurrent rotations (DESIGN 4.4): an application reading a
//! domain through `Keyring::open` + `active()` in a loop, in its own process, while
//! `keyrotate rotate` runs again and again beside it with `retain = 0` (so every
//! commit's tidy-up unlinks the key the previous commit made active), in both
//! activation modes. Every read must succeed: a snapshot of the old commit or of the
//! new one, never a vanished file or a mix of two.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::common::Env;

const CONFIG: &str = r#"
[state]
dir = "state"
[host]
pool = "p"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
min_interval = "0s"
retain = 0
[domains.imm]
algorithm = "ed25519"
[domains.pre]
algorithm = "ed25519"
activation = "prepublish"
"#;

/// The `keyring_reader` example, built by `cargo test` next to the test binary; built
/// here if this run skipped examples (`cargo test --test tests`).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    if !path.exists() {
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "--quiet", "--example", name]);
        if cfg!(feature = "failpoints") {
            c.args(["--features", "failpoints"]);
        }
        let ok = c.status().is_ok_and(|s| s.success());
        assert!(ok && path.exists(), "cannot build the {name} example");
    }
    path
}

#[test]
fn readers_never_fail_while_rotations_commit_and_tidy_up_beside_them() {
    let env = Env::with_config(CONFIG);
    env.rotate("imm").status(0);
    env.rotate("pre").status(0);
    let reader = example("keyring_reader");
    let stop = env.path("stop");
    let readers: Vec<_> = ["imm", "pre"]
        .iter()
        .map(|domain| {
            Command::new(&reader)
                .arg(env.path("keys"))
                .arg(domain)
                .arg(&stop)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let rotations = 50;
    let start = Instant::now();
    for _ in 0..rotations {
        for domain in ["imm", "pre"] {
            env.rotate(domain).status(0);
        }
    }
    let elapsed = start.elapsed();
    std::fs::write(&stop, "").unwrap();
    let mut total_reads = 0;
    for (domain, child) in ["imm", "pre"].iter().zip(readers) {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{domain}: a reader failed beside {rotations} rotations: {stdout}{}",
            stderr.lines().take(5).collect::<Vec<_>>().join("\n")
        );
        let reads: u64 = stdout
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{domain}: unexpected reader output {stdout:?}"));
        // The readers must actually have overlapped the rotations to prove anything.
        assert!(reads > rotations as u64, "{domain}: only {reads} reads");
        total_reads += reads;
    }
    // Every rotation really destroyed the key before it (retain = 0).
    assert_eq!(env.versions("imm").last().unwrap().0, rotations as u64 + 1);
    assert_eq!(env.live_files("imm").len(), 1);
    assert_eq!(env.live_files("pre").len(), 2);
    eprintln!(
        "{} rotations in {elapsed:?} beside {total_reads} reads, none failed",
        2 * rotations
    );
}
