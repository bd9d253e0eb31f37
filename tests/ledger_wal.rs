//! The embedded ledger's WAL across processes (issue "Near the floor"): it outlives
//! each process (no checkpoint on close), its folder is synced only when it is new,
//! and the readers (`status`, `history`, the dry run) read it in place, with no
//! private copy of the database, even while another process holds it open.

use crate::common::Env;

/// The durable steps of one forced rotation, as the failpoint log names them.
#[cfg(feature = "failpoints")]
fn steps_of_a_rotation(env: &Env, log: &str) -> Vec<String> {
    let log = env.path(log);
    env.rotate("sig")
        .arg("--force")
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect()
}

#[cfg(feature = "failpoints")]
#[test]
fn the_wal_outlives_each_run_and_its_folder_is_synced_only_when_new() {
    let env = Env::new();
    let first = steps_of_a_rotation(&env, "first.log");
    assert!(
        first.iter().any(|s| s == "ledger.dirsync"),
        "a new ledger's folder must be synced: {first:?}"
    );
    let wal = env.path("state/ledger.sqlite3-wal");
    assert!(wal.exists(), "the WAL was removed on close\n{}", env.listing());
    let main = std::fs::read(env.path("state/ledger.sqlite3")).unwrap();

    let second = steps_of_a_rotation(&env, "second.log");
    assert!(
        !second.iter().any(|s| s == "ledger.dirsync"),
        "the WAL existed: no folder sync for it: {second:?}"
    );
    // The tidy-up's changes are left to the kernel: the next run repairs a lost one.
    assert!(!second.iter().any(|s| s == "tidy.dirsync"), "{second:?}");
    assert!(wal.exists(), "the WAL was removed on close\n{}", env.listing());
    assert_eq!(
        std::fs::read(env.path("state/ledger.sqlite3")).unwrap(),
        main,
        "a small WAL was checkpointed into the database on close"
    );
    // The rows live in the WAL only: a reader must see them there.
    assert_eq!(env.rows().len(), 2, "{:?}", env.rows());
}

#[test]
fn readers_read_a_live_wal_in_place_with_no_temporary_copy() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").args(["--force", "--run-id", "LATEST"]).status(0);
    assert!(env.path("state/ledger.sqlite3-wal").exists(), "{}", env.listing());

    // Another process holds the WAL open in a read transaction.
    let holder = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    holder.execute_batch("BEGIN").unwrap();
    let n: i64 = holder
        .query_row("SELECT count(*) FROM rotations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);

    // A temporary folder that cannot be used: a reader that copied the database fails.
    let no_tmp = env.path("no-such-tmp");
    let before = env.snapshot();
    let out = env
        .cmd()
        .args(["status", "--domain", "sig"])
        .env("TMPDIR", &no_tmp)
        .status(0);
    assert!(out.stdout.contains("v2"), "{}", out.stdout);
    let out = env
        .cmd()
        .args(["history", "--limit", "5"])
        .env("TMPDIR", &no_tmp)
        .status(0);
    assert!(out.stdout.contains("LATEST"), "{}", out.stdout);
    let out = env
        .rotate("sig")
        .args(["--dry-run", "--force", "--output", "json"])
        .env("TMPDIR", &no_tmp)
        .status(0);
    assert_eq!(out.json()["dry_run"], true);
    // Reading in place changed no file, the WAL's index included.
    env.assert_unchanged(&before, "the readers");
    holder.execute_batch("COMMIT").unwrap();
}
