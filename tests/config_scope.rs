//! A command validates only the domains it touches (issue 16): a typo in one domain
//! does not stop another from rotating, while that domain's own runs, the commands
//! over every domain and `check` still report it. A TOML syntax error anywhere still
//! fails every command: the file as a whole cannot be read.

use crate::common::{Env, DEFAULT_CONFIG};

/// The default config plus two broken domains: an unknown key and a bad algorithm.
fn with_broken_domains(extra: &str) -> Env {
    Env::with_config(&format!(
        "{DEFAULT_CONFIG}\n[domains.typo]\nalgorithm = \"ed25519\"\ncolour = \"red\"\n\n\
         [domains.weak]\nalgorithm = \"rsa-512\"\n{extra}"
    ))
}

#[test]
fn a_broken_domain_does_not_stop_another_from_rotating() {
    let env = with_broken_domains("");
    env.rotate("sig").status(0);
    env.cmd().args(["status", "--domain", "sig"]).status(0);
    env.cmd().args(["history", "--domain", "sig"]).status(0);
    env.cmd()
        .args(["rotate", "--domain", "sig", "--deadline", "1m", "--dry-run"])
        .status(7);
}

#[test]
fn a_broken_domain_fails_its_own_runs_and_every_all_domain_command() {
    let env = with_broken_domains("");
    let out = env.rotate("typo").status(2);
    assert!(
        out.stderr.contains("domains.typo.colour") && out.stderr.contains("unknown field"),
        "{}",
        out.stderr
    );
    let out = env.rotate("weak").status(2);
    assert!(out.stderr.contains("domains.weak.algorithm"), "{}", out.stderr);
    let out = env.cmd().args(["status", "--domain", "weak"]).status(2);
    assert!(out.stderr.contains("domains.weak.algorithm"), "{}", out.stderr);
    // Over every domain: both problems, the first named and the count of the rest.
    let out = env.cmd().arg("status").status(2);
    assert!(out.stderr.contains("domains.typo.colour"), "{}", out.stderr);
    assert!(out.stderr.contains("1 more problem"), "{}", out.stderr);
    env.cmd().arg("history").status(2);
    // check lists every problem.
    let out = env.cmd().arg("check").status(2);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("domains.typo.colour") && all.contains("domains.weak.algorithm"),
        "{all}"
    );
}

#[test]
fn an_unknown_domain_lists_every_configured_one() {
    let env = with_broken_domains("");
    let out = env.rotate("nope").status(2);
    assert!(
        out.stderr.contains("typo") && out.stderr.contains("weak") && out.stderr.contains("sig"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_syntax_error_anywhere_fails_every_command() {
    // An unterminated string in a domain no command names.
    let env = with_broken_domains("\n[domains.zz]\nalgorithm = \"ed25519\n");
    for args in [
        &["rotate", "--domain", "sig", "--deadline", "1m"][..],
        &["status", "--domain", "sig"],
        &["history", "--domain", "sig"],
    ] {
        let out = env.cmd().args(args).status(2);
        assert!(out.stderr.contains("rotate.toml:"), "{args:?}: {}", out.stderr);
    }
    assert!(!env.path("state").exists(), "a run touched the state folder");
}

#[test]
fn the_metrics_textfile_still_carries_every_valid_domain() {
    let env = with_broken_domains("\n[metrics]\ntextfile = \"keyrotate.prom\"\n");
    env.rotate("sig").status(0);
    let text = std::fs::read_to_string(env.path("keyrotate.prom")).unwrap();
    for d in ["sig", "p256", "rsa", "pre"] {
        assert!(text.contains(&format!("domain=\"{d}\"")), "{d} missing:\n{text}");
    }
    assert!(!text.contains("domain=\"typo\""), "{text}");
}
