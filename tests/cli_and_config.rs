//! Bad input of every kind on the command line and in the config: exit 2 (USAGE),
//! one clear line on stderr, and nothing created or changed on disk.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use crate::common::{Env, Out};

#[track_caller]
fn usage_error(env: &Env, out: Out, needle: &str) {
    assert_eq!(out.code, 2, "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{}", out.stderr);
    assert!(lines[0].contains(needle), "{:?} does not mention {needle:?}", lines[0]);
    assert!(env.snapshot().is_empty(), "files were created:\n{}", env.listing());
}

#[test]
fn bad_deadlines() {
    let env = Env::new();
    for (deadline, needle) in [
        ("-5m", "negative"),
        ("0s", "zero"),
        ("soon", "neither a duration"),
        ("2020-01-01T00:00:00Z", "in the past"),
        ("2h", "longer than max_deadline 1h"),
        ("99999999999999h", "--deadline"),
        ("2026-13-45T00:00:00Z", "RFC 3339"),
    ] {
        let out = env
            .cmd()
            .args(["rotate", "--domain", "sig", "--deadline", deadline])
            .output();
        usage_error(&env, out, needle);
    }
    let out = env.cmd().args(["rotate", "--domain", "sig"]).output();
    usage_error(&env, out, "--deadline");
}

#[test]
fn bad_domain_names() {
    let env = Env::new();
    let long = "a".repeat(65);
    for (domain, needle) in [
        ("../etc", "must start with"),
        ("A", "must start with"),
        ("", "empty"),
        (long.as_str(), "longer than 64"),
        ("a\u{7}b", "only a-z"),
        ("a/b", "only a-z"),
        ("nosuch", "not configured"),
    ] {
        let out = env
            .cmd()
            .args(["rotate", "--deadline", "1m", "--domain", domain])
            .output();
        usage_error(&env, out, needle);
    }
    let out = env
        .cmd()
        .args(["rotate", "--deadline", "1m", "--domain"])
        .arg(OsString::from_vec(vec![b's', 0xff, b'g']))
        .output();
    usage_error(&env, out, "UTF-8");
}

#[test]
fn bad_arguments() {
    let env = Env::new();
    for (args, needle) in [
        (
            vec!["rotate", "--domain", "sig", "--deadline", "1m", "--frobnicate"],
            "--frobnicate",
        ),
        (
            vec!["rotate", "--domain", "sig", "--deadline", "1m", "--run-id", "a b"],
            "--run-id",
        ),
        (
            vec!["rotate", "--domain", "sig", "--deadline", "1m", "--output", "xml"],
            "xml",
        ),
        (
            vec!["rotate", "--domain", "sig", "--deadline", "1m", "--operator", "x\ny"],
            "control characters",
        ),
        (vec!["explode"], "explode"),
        (vec![], "subcommand"),
    ] {
        let out = env.cmd().args(args).output();
        usage_error(&env, out, needle);
    }
}

#[test]
fn no_pool_known_is_a_usage_error() {
    let env = Env::with_config(&crate::common::DEFAULT_CONFIG.replace("[host]\npool = \"pool-a\"", ""));
    let out = env.rotate("sig").output();
    usage_error(&env, out, "pool is unknown");
}

#[test]
fn bad_configs() {
    let good = crate::common::DEFAULT_CONFIG;
    let garbage: String = (0..(1 << 20) + 1).map(|i| (b'!' + (i % 90) as u8) as char).collect();
    // A problem inside one domain fails that domain's runs (here sig2, rsa, aes) and
    // the commands over every domain (`status`), not another domain's rotation (see
    // config_scope).
    for (text, needle, domain) in [
        (
            format!("{good}\n[domains.sig2]\nalgorithm = \"ed25519\"\ncolour = \"red\"\n"),
            "unknown field `colour`",
            "sig2",
        ),
        (good.replace("retain = 2", "retain = \"two\""), "rotate.toml:", "aes"),
        (good.replace("retain = 2", "retain = -1"), "domains.aes.retain", "aes"),
        (
            good.replace("algorithm = \"rsa-2048\"", "algorithm = \"rsa-512\""),
            "domains.rsa.algorithm",
            "rsa",
        ),
        (
            good.replace("[state]\ndir = \"state\"", ""),
            "missing field `state`",
            "aes",
        ),
        (
            good.replace("min_interval = \"1h\"", "min_interval = \"often\""),
            "min_interval",
            "aes",
        ),
        (
            good.replace("max_deadline = \"1h\"", "max_deadline = \"0s\""),
            "max_deadline",
            "aes",
        ),
        (format!("{good}\n[state]\ndir = \"again\"\n"), "rotate.toml:", "aes"),
        (
            good.replace("designated_pool = \"pool-a\"\nbackend", "backend"),
            "designated_pool",
            "aes",
        ),
        (
            good.replace("[domains.sig]", "[domains.\"../sig\"]"),
            "domains.../sig",
            "",
        ),
        (garbage, "too large", "aes"),
    ] {
        let env = Env::with_config(&text);
        // The invalid name cannot be named on the command line: `status` covers it.
        let run = || match domain {
            "" => env.cmd().arg("status").output(),
            d => env.rotate(d).output(),
        };
        usage_error(&env, run(), needle);
        let out = run();
        assert!(
            out.stderr.contains(&env.config_path().display().to_string()),
            "error does not name the file: {}",
            out.stderr
        );
    }
}

#[test]
fn config_lookup_order() {
    let env = Env::new();
    let missing = env.path("nope.toml");
    let out = std::process::Command::new(crate::common::bin())
        .arg("--config")
        .arg(&missing)
        .args(["rotate", "--domain", "sig", "--deadline", "1m"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nope.toml") && stderr.contains("no such file"),
        "{stderr}"
    );
    // $KEYROTATE_CONFIG is used when --config is absent.
    let out = std::process::Command::new(crate::common::bin())
        .args(["rotate", "--domain", "sig", "--deadline", "1m"])
        .env("KEYROTATE_CONFIG", env.config_path())
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // Relative paths resolve against the config file's folder, not the working directory.
    assert!(env.key_dir("sig").join("keyring.json").exists());
}

#[test]
fn help_and_version_exit_zero() {
    let env = Env::new();
    let out = env.cmd().arg("--help").status(0);
    assert!(out.stdout.contains("Exit codes"));
    env.cmd().arg("--version").status(0);
}
