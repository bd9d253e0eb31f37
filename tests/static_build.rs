//! The static glibc build (README, "A faster-starting binary") against the real binary:
//! it rotates a plain domain, and refuses (2, one line) a config that would make it load
//! a shared module — a group lookup through NSS, a PKCS#11 token, a KEK in a token —
//! where it would otherwise crash (SIGSEGV, 139). Needs that build, named by
//! `KEYROTATE_STATIC_BIN` (`.ci/run` builds it); says SKIPPED without it.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common::{Env, DEFAULT_CONFIG};

fn static_bin(test: &str) -> Option<PathBuf> {
    match std::env::var_os("KEYROTATE_STATIC_BIN") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            println!("SKIPPED {test}: KEYROTATE_STATIC_BIN does not name a static glibc build");
            None
        }
    }
}

fn run(bin: &PathBuf, env: &Env, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("--config")
        .arg(env.config_path())
        .args(args)
        .current_dir(env.dir.path())
        .env_remove("KEYROTATE_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn a_static_build_rotates_a_plain_domain_and_refuses_what_would_load_a_module() {
    let test = "a_static_build_rotates_a_plain_domain_and_refuses_what_would_load_a_module";
    let Some(bin) = static_bin(test) else { return };
    let file = String::from_utf8(Command::new("file").arg(&bin).output().unwrap().stdout).unwrap_or_default();
    assert!(
        file.contains("statically linked") || file.is_empty(),
        "not a static build: {file}"
    );

    let plain = Env::new();
    let out = run(&bin, &plain, &["rotate", "--domain", "sig", "--deadline", "1m"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(plain.key_dir("sig").join("keyring.json").exists());

    let pkcs11 = "[pkcs11]\nmodule = \"/nonexistent/libsofthsm2.so\"\ntoken = \"t\"\npin_env = \"PIN\"\n";
    // The shared store's KEK in a token: refused while the config is read, before any
    // connection (the ledger URL points nowhere).
    let shared_kek = format!(
        "{}{pkcs11}",
        DEFAULT_CONFIG
            .replace(
                "dir = \"state\"\n",
                "dir = \"state\"\nledger = \"postgres://u@127.0.0.1:1/db\"\n"
            )
            .replace("[host]\n", "[host]\nname = \"h1\"\n")
            .replace(
                "[domains.sig]\n",
                "[domains.sig]\nstore = \"shared\"\nkek = \"pkcs11:object=k\"\n"
            )
    );
    let cases = [
        ("kek", shared_kek),
        (
            "group",
            DEFAULT_CONFIG.replace("[domains.sig]\n", "[domains.sig]\ngroup = \"kr-no-such-group-7\"\n"),
        ),
        (
            "custody",
            format!(
                "{}{pkcs11}",
                DEFAULT_CONFIG.replace("[domains.sig]\n", "[domains.sig]\ncustody = \"pkcs11\"\n")
            ),
        ),
    ];
    for (key, config) in cases {
        let env = Env::with_config(&config);
        for args in [&["check"][..], &["rotate", "--domain", "sig", "--deadline", "1m"][..]] {
            let out = run(&bin, &env, args);
            // `check` lists problems on stdout; the other commands say them on stderr.
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(2), "{key} {args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("domains.sig.{key}")) && stderr.contains("static glibc build"),
                "{key} {args:?}: {stderr}"
            );
            assert!(
                !env.key_dir("sig").exists(),
                "{key} {args:?}: the key store was touched"
            );
        }
    }
}
