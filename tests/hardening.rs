//! Hostile files and folders: the corpus of broken configs, symlinks where folders or
//! lock files should be, unsafe permissions, a full disk and a read-only file system.
//! Each gets its documented exit code, one clear line, and nothing written through a
//! link or left half-written.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::{Env, DEFAULT_CONFIG};

#[test]
fn every_config_in_the_corpus_is_a_one_line_usage_error() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        let env = Env::new();
        std::fs::copy(&path, env.config_path()).unwrap();
        for args in [
            vec!["rotate", "--domain", "a", "--deadline", "1m"],
            vec!["check"],
            vec!["status"],
        ] {
            let out = env.cmd().args(&args).output();
            assert_eq!(
                out.code,
                2,
                "{}: {args:?}: {}{}",
                path.display(),
                out.stdout,
                out.stderr
            );
            assert_eq!(out.stderr.lines().count(), 1, "{}: {}", path.display(), out.stderr);
            assert!(
                out.stderr.contains("rotate.toml"),
                "{}: does not name the file: {}",
                path.display(),
                out.stderr
            );
        }
        assert!(env.snapshot().is_empty(), "{}: created files", path.display());
        n += 1;
    }
    assert!(n >= 14, "corpus has only {n} files");
}

#[test]
fn a_state_folder_that_is_a_symlink_or_group_writable_is_refused() {
    let env = Env::new();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), env.path("state")).unwrap();
    let out = env.rotate("sig").status(3);
    assert!(
        out.stdout.contains("state folder") && out.stdout.contains("symlink"),
        "{}",
        out.stdout
    );
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "wrote through the symlink"
    );
    assert!(!env.path("keys").exists());
    env.rotate("sig").arg("--dry-run").status(3);

    let env = Env::new();
    std::fs::create_dir(env.path("state")).unwrap();
    std::fs::set_permissions(env.path("state"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = env.rotate("sig").status(3);
    assert!(out.stdout.contains("writable by group or others"), "{}", out.stdout);
    assert_eq!(std::fs::read_dir(env.path("state")).unwrap().count(), 0);
}

#[test]
fn a_lock_file_replaced_by_a_symlink_or_a_folder_is_refused() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let lock = env.path("state/locks/sig.lock");
    let target = env.path("target-file");
    std::fs::write(&target, "precious").unwrap();
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let out = env.rotate("sig").arg("--force").status(3);
    assert!(out.stdout.contains("lock file"), "{}", out.stdout);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    std::fs::remove_file(&lock).unwrap();
    std::fs::create_dir(&lock).unwrap();
    let out = env.rotate("sig").arg("--force").status(3);
    assert!(out.stdout.contains("lock file"), "{}", out.stdout);
    assert_eq!(env.versions("sig").len(), 1);
}

#[test]
fn symlinked_key_files_and_manifests_are_never_followed() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let dir = env.key_dir("sig");
    let outside = env.path("outside.pem");
    std::fs::rename(dir.join("v000001.pem"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("v000001.pem")).unwrap();
    let out = env.rotate("sig").arg("--force").status(4);
    assert!(out.stdout.contains("v000001.pem"), "{}", out.stdout);
    assert!(std::fs::symlink_metadata(dir.join("v000001.pem"))
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Mounts a small tmpfs for one test, or says why it cannot.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_or_a_read_only_file_system_loses_nothing() {
    let env = Env::with_config(
        &DEFAULT_CONFIG
            .replace("dir = \"state\"", "dir = \"fs/state\"")
            .replace("keystore = \"keys\"", "keystore = \"fs/keys\""),
    );
    let Some(_fs) = Tmpfs::mount(&env.path("fs"), "1m") else {
        eprintln!("SKIPPED full-disk and read-only tests: cannot mount a tmpfs here (needs root)");
        return;
    };
    env.rotate("sig").status(0);
    let manifest = std::fs::read(env.path("fs/keys/sig/keyring.json")).unwrap();
    // Fill the file system to the last byte.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", env.path("fs/filler").display()))
        .output();
    let out = env.rotate("sig").arg("--force").output();
    assert!(
        [3, 4].contains(&out.code),
        "exit {}: {}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("space") || out.stderr.contains("space") || out.stdout.contains("full"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        std::fs::read(env.path("fs/keys/sig/keyring.json")).unwrap(),
        manifest,
        "the manifest changed on a full disk"
    );
    let ks = keyrotate::keystore::Keystore::new(&env.path("fs/keys"), "sig");
    assert!(ks.inspect().is_ok(), "the key store does not verify after a full disk");
    std::fs::remove_file(env.path("fs/filler")).unwrap();

    // Read-only: the same, and the old key stays.
    let ro = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(env.path("fs"))
        .output()
        .unwrap();
    if !ro.status.success() {
        eprintln!("SKIPPED read-only test: remount failed");
        return;
    }
    let out = env.rotate("sig").arg("--force").output();
    let _ = Command::new("mount")
        .args(["-o", "remount,rw"])
        .arg(env.path("fs"))
        .output();
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("read-only"), "{}", out.stdout);
    assert_eq!(std::fs::read(env.path("fs/keys/sig/keyring.json")).unwrap(), manifest);
}
