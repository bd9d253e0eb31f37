//! Optional group access (DESIGN 4.4): `group = "…"` makes a domain's key files and
//! manifest 0640 and its folder 0750, owned by that group, so an application (or the
//! web server serving `jwks.json`) reads them without running as the keyrotate user;
//! `public_jwks = true` makes `jwks.json` 0644 and the folders traversable by others.
//! Without `group` everything stays 0700/0600 whatever the umask.
//!
//! Changing a file's group to one the user is not in needs root; the tests that do run
//! as root and use the system group `daemon`, and drop privileges with `setpriv` to read
//! as a member of the group and as a stranger. Elsewhere they print SKIPPED.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::common::{mode, Env};

const GROUP: &str = "daemon";
/// `nobody`: a user that owns nothing here.
const STRANGER: u32 = 65534;

fn config(group_line: &str) -> String {
    format!(
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
retain = 1
[domains.sig]
algorithm = "ed25519"
{group_line}
public_jwks = true
[domains.pre]
algorithm = "ecdsa-p256"
activation = "prepublish"
{group_line}
[domains.mac]
algorithm = "hmac-sha256"
{group_line}
[domains.private]
algorithm = "ed25519"
"#
    )
}

/// The gid of `daemon`, when this test can use it (root, `setpriv` present).
fn usable_group(test: &str) -> Option<u32> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: changing a file's group to another group needs root");
        return None;
    }
    let Some(gid) = keyrotate::fsutil::lookup_group(GROUP) else {
        eprintln!("SKIPPED {test}: no group {GROUP:?} on this host");
        return None;
    };
    if !Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED {test}: no setpriv to read as another user");
        return None;
    }
    Some(gid)
}

/// Runs `argv` as the stranger user, in group `gid` if given, else in no group.
fn run_as(gid: Option<u32>, argv: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={STRANGER}")).arg(format!("--regid={STRANGER}"));
    match gid {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg("--").args(argv).output().unwrap()
}

fn can_read(gid: Option<u32>, path: &Path) -> bool {
    run_as(gid, &["cat".as_ref(), path.as_os_str()]).status.success()
}

/// Every entry of a domain folder (temporaries included) has the expected mode and group.
#[track_caller]
fn assert_folder(env: &Env, domain: &str, dir_mode: u32, file_mode: u32, jwks_mode: u32, gid: u32) {
    let dir = env.key_dir(domain);
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(
        (mode(&dir), meta.gid()),
        (dir_mode, gid),
        "{domain} folder\n{}",
        env.listing()
    );
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.file_type().is_symlink() {
            // current.pem: what it points at is checked like any key file.
            let target = std::fs::metadata(e.path()).unwrap();
            assert_eq!(
                (target.mode() & 0o7777, target.gid()),
                (file_mode, gid),
                "{domain}/{name} target"
            );
            continue;
        }
        if name == ".lock" {
            continue; // the key store lock holds no key material
        }
        let want = if name.contains("jwks.json") {
            jwks_mode
        } else {
            file_mode
        };
        assert_eq!(
            (meta.mode() & 0o7777, meta.gid()),
            (want, gid),
            "{domain}/{name}\n{}",
            env.listing()
        );
        seen += 1;
    }
    assert!(seen >= 2, "{domain}: nothing checked");
}

#[test]
fn a_configured_group_reads_the_keys_and_nobody_else_does() {
    let Some(gid) = usable_group("a_configured_group_reads_the_keys_and_nobody_else_does") else {
        return;
    };
    let env = Env::with_config(&config(&format!("group = {GROUP:?}")));
    // The stranger must be able to reach the key store at all (the temp folder is 0700).
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    for domain in ["sig", "pre", "mac", "private"] {
        env.rotate(domain).shell_prefix("umask 000").status(0);
        env.rotate(domain).shell_prefix("umask 077").status(0);
    }
    assert_eq!(mode(&env.path("keys")), 0o711, "the key store only grants traversal");
    assert_folder(&env, "sig", 0o751, 0o640, 0o644, gid);
    assert_folder(&env, "pre", 0o750, 0o640, 0o640, gid);
    assert_folder(&env, "mac", 0o750, 0o640, 0o640, gid);
    assert_folder(&env, "private", 0o700, 0o600, 0o600, 0);

    // Temporaries and a staged key have their final mode and group from the start: a
    // run killed just before each rename leaves them behind to be looked at.
    let kills = if cfg!(feature = "failpoints") {
        vec![
            ("stage.fsync", "v000003.pem", 0o640),
            ("jwks.rename", ".jwks.json.tmp", 0o644),
            ("commit.rename", ".keyring.json.tmp", 0o640),
        ]
    } else {
        eprintln!("SKIPPED the temporaries' modes: they need the failpoints build");
        vec![]
    };
    for (step, file, want) in kills {
        let run = format!("KILLED-{step}");
        let out = env
            .rotate("sig")
            .args(["--run-id", &run])
            .env("KEYROTATE_FAILPOINTS", format!("{step}=kill"))
            .output();
        assert_eq!(out.code, 137, "{step}: {}", out.stderr);
        let meta = std::fs::symlink_metadata(env.key_dir("sig").join(file))
            .unwrap_or_else(|e| panic!("{step}: {file}: {e}\n{}", env.listing()));
        assert_eq!((meta.mode() & 0o7777, meta.gid()), (want, gid), "{step}: {file}");
        env.rotate("sig").status(4);
        env.resolve("sig", &run, "group test").status(0);
    }
    env.rotate("sig").status(0);
    assert_folder(&env, "sig", 0o751, 0o640, 0o644, gid);
    if cfg!(feature = "failpoints") {
        // A run killed past its commit leaves jwks.json and current.pem to the repair,
        // here by `resolve` (which is not given the domain's config): what it rewrites
        // keeps the folder's access.
        let out = env
            .rotate("sig")
            .args(["--run-id", "PAST-COMMIT"])
            .env("KEYROTATE_FAILPOINTS", "ledger.committed=kill")
            .output();
        assert_eq!(out.code, 137, "{}", out.stderr);
        env.resolve("sig", "PAST-COMMIT", "group test").status(0);
        assert_folder(&env, "sig", 0o751, 0o640, 0o644, gid);
        env.rotate("sig").status(0);
        assert_folder(&env, "sig", 0o751, 0o640, 0o644, gid);
    }

    // A member of the group uses the consumer API; a stranger cannot read a key.
    let reader = crate::consumer_snapshot::example("keyring_reader");
    let stop = env.path("stop");
    std::fs::write(&stop, "").unwrap();
    for domain in ["sig", "pre"] {
        let keys = env.path("keys");
        let argv = [reader.as_os_str(), keys.as_os_str(), domain.as_ref(), stop.as_os_str()];
        let out = run_as(Some(gid), &argv);
        assert!(
            out.status.success(),
            "{domain}: a group member cannot use the keys: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run_as(None, &argv);
        assert!(!out.status.success(), "{domain}: a stranger read the keys");
        assert!(String::from_utf8_lossy(&out.stderr).contains("ermission denied"));
    }
    let sig = env.key_dir("sig");
    assert!(
        can_read(None, &sig.join("jwks.json")),
        "public_jwks: anyone reads jwks.json"
    );
    assert!(!can_read(None, &sig.join("keyring.json")));
    assert!(!can_read(None, &sig.join("current.pem")));
    assert!(
        !can_read(None, &env.key_dir("pre").join("jwks.json")),
        "pre's JWKS is not public"
    );
    assert!(can_read(Some(gid), &env.key_dir("pre").join("jwks.json")));
    assert!(!can_read(Some(gid), &env.key_dir("private").join("keyring.json")));
    let ls = run_as(None, &["ls".as_ref(), sig.as_os_str()]);
    assert!(!ls.status.success(), "others may traverse the folder, never list it");
}

#[test]
fn dropping_the_group_makes_everything_private_again_and_writable_folders_are_refused() {
    let Some(gid) = usable_group("dropping_the_group_makes_everything_private_again_and_writable_folders_are_refused")
    else {
        return;
    };
    let env = Env::with_config(&config(&format!("group = {GROUP:?}")));
    env.rotate("pre").status(0);
    assert_folder(&env, "pre", 0o750, 0o640, 0o640, gid);
    // A group-readable folder owned by the group passes every safety check...
    env.cmd().args(["check"]).status(0);
    env.cmd().args(["status", "--domain", "pre"]).status(0);
    env.rotate("pre").arg("--dry-run").status(0);

    // ...a group-writable one never does, and nothing is touched.
    std::fs::set_permissions(env.key_dir("pre"), std::os::unix::fs::PermissionsExt::from_mode(0o770)).unwrap();
    let keys_only = |s: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>| {
        s.into_iter().filter(|(p, _)| p.starts_with("keys")).collect::<Vec<_>>()
    };
    let before = keys_only(env.snapshot());
    let out = env.rotate("pre").status(3);
    assert!(out.stdout.contains("writable by group"), "{}", out.stdout);
    assert!(
        keys_only(env.snapshot()) == before,
        "a refused run changed the key store"
    );
    std::fs::set_permissions(env.key_dir("pre"), std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();

    // The config loses its group: the next rotation takes every file back, whatever
    // the umask.
    std::fs::write(env.config_path(), config("")).unwrap();
    env.rotate("pre").shell_prefix("umask 000").status(0);
    // SAFETY: getegid has no preconditions and cannot fail.
    let own_gid = unsafe { libc::getegid() };
    assert_folder(&env, "pre", 0o700, 0o600, 0o600, own_gid);
}

#[test]
fn an_unknown_group_is_a_config_error_naming_the_key() {
    let env = Env::with_config(&config("group = \"no-such-group-kr\""));
    let before = env.snapshot();
    // A rotation validates only its own domain: `sig` has the group, `private` not.
    for args in [vec!["check"], vec!["rotate", "--domain", "sig", "--deadline", "1m"]] {
        let out = env.cmd().args(args.clone()).status(2);
        let text = format!("{}{}", out.stdout, out.stderr);
        let line = text
            .lines()
            .find(|l| l.contains("group"))
            .unwrap_or_else(|| panic!("{args:?}: {text}"));
        assert!(
            line.contains("domains.") && line.contains(".group") && line.contains("no-such-group-kr"),
            "{args:?}: {line}"
        );
    }
    // A host outside the designated pool need not have the group: it does nothing and
    // says so (6), as every other host of a RunOnAllAgentsInGroup job does.
    let out = env
        .cmd()
        .args(["rotate", "--domain", "sig", "--deadline", "1m", "--pool", "elsewhere"])
        .status(6);
    assert!(out.stdout.contains("NOT_DESIGNATED"), "{}", out.stdout);
    env.cmd()
        .args(["resolve", "--domain", "sig", "--run", "X", "--note", "n"])
        .status(2);
    env.assert_unchanged(&before, "a config error");
}
