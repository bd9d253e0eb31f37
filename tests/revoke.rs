//! `keyrotate revoke` (DESIGN 11): a deliberate, audited revocation through the same
//! phases as a rotation. The revoked version becomes `compromised` (with its time and
//! reason), its key file is destroyed and it leaves `jwks.json`, all in one commit;
//! the domain stays usable; the version never returns to any other state.

use crate::common::Env;

/// The `--reason` of this module's revocations.
const REASON: &str = "private key pasted in a public ticket";

fn current(env: &Env, domain: &str) -> String {
    std::fs::read_link(env.key_dir(domain).join("current.pem"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The steps a command took, from the failpoint log.
fn steps(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect()
}

#[test]
fn the_dry_run_changes_nothing_and_predicts_the_real_run() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let before = env.snapshot();
    let dry = env
        .revoke("sig", 2, REASON)
        .args(["--dry-run", "--output", "json"])
        .status(0);
    env.assert_unchanged(&before, "revoke --dry-run");
    let d = dry.json();
    assert_eq!(
        (d["dry_run"].as_bool(), d["to_version"].as_u64()),
        (Some(true), Some(3))
    );
    let plan = d["plan"].to_string();
    assert!(plan.contains("compromise: v2") && plan.contains("create: v3"), "{plan}");
    // A dry run of a revocation that cannot be done says so with the real code.
    env.revoke("sig", 9, REASON).arg("--dry-run").status(2);
    env.assert_unchanged(&before, "revoke --dry-run of an unknown version");
    let real = env.revoke("sig", 2, REASON).args(["--output", "json"]).status(0).json();
    assert_eq!(real["to_version"], d["to_version"]);
    assert_eq!(real["from_version"], d["from_version"]);
}

#[test]
fn revoking_the_active_key_activates_a_fresh_one_in_the_same_commit() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let log = env.path("steps.log");
    let out = env
        .revoke("sig", 2, REASON)
        .args(["--run-id", "REVOKE-1", "--operator", "oncall"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    assert!(out.stdout.contains("revoked v2"), "{}", out.stdout);
    // One manifest commit: v2 compromised and v3 active together.
    let commits = steps(&log).iter().filter(|s| *s == "commit.rename").count();
    assert_eq!(commits, 1);
    let v2 = env.manifest_version("sig", 2);
    assert_eq!(v2["state"], "compromised");
    assert_eq!(v2["compromise_reason"], "private key pasted in a public ticket");
    assert!(v2["compromised_at"].as_str().unwrap() >= v2["activated_at"].as_str().unwrap());
    assert_eq!(env.manifest_version("sig", 3)["state"], "active");
    assert_eq!(env.manifest("sig")["primary"], 3);
    // Unpublished, its private half destroyed, and nothing signs with it.
    assert_eq!(env.published_versions("sig"), ["v000003", "v000001"]);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
    assert_eq!(current(&env, "sig"), "v000003.pem");
    // The ledger and the audit trail.
    let row = env.last_row();
    assert_eq!(row["run_id"], "REVOKE-1");
    assert_eq!(row["trigger"], "revoke");
    assert_eq!(row["state"], "succeeded");
    assert_eq!(
        (row["from_version"].as_i64(), row["to_version"].as_i64()),
        (Some(2), Some(3))
    );
    assert_eq!(row["forced"], 1);
    assert_eq!(row["requested_reason"], "private key pasted in a public ticket");
    let audit = env.audit();
    let c = audit
        .iter()
        .find(|e| e["event"] == "key.compromised")
        .expect("a key.compromised audit line");
    assert_eq!(c["run_id"], "REVOKE-1");
    assert_eq!(c["from_version"], 2);
    assert_eq!(c["from_fingerprint"], v2["fingerprint"]);
    assert_eq!(c["operator"], "oncall");
    assert!(c["reason"].as_str().unwrap().contains("public ticket"));
    let st = env
        .cmd()
        .args(["status", "--domain", "sig", "--output", "json"])
        .status(0)
        .json();
    assert_eq!(st["domains"][0]["compromised"], serde_json::json!([2]));
    let prom = env
        .cmd()
        .args(["status", "--domain", "sig", "--output", "prometheus"])
        .status(0);
    assert!(
        prom.stdout
            .contains("keyrotate_versions{domain=\"sig\",state=\"compromised\"} 1"),
        "{}",
        prom.stdout
    );
    env.cmd().args(["audit", "verify"]).status(0);
    // min_interval does not hold a revocation back: it is an emergency rotation.
    env.revoke("sig", 3, REASON).status(0);
    assert_eq!(env.manifest("sig")["primary"], 4);
}

#[test]
fn revoking_the_active_key_of_a_prepublish_domain_activates_the_pending_one() {
    let env = Env::new();
    env.rotate("pre").status(0); // v1 active, v2 pending
    env.revoke("pre", 1, REASON).status(0);
    let states: Vec<(u64, String)> = env.versions("pre");
    let want = [(1, "compromised"), (2, "active"), (3, "pending")];
    assert_eq!(
        states,
        want.iter().map(|(n, s)| (*n, s.to_string())).collect::<Vec<_>>()
    );
    // v2 was published one rotation ago: verifiers already have it.
    assert_eq!(env.published_versions("pre"), ["v000003", "v000002"]);
    assert_eq!(env.key_files("pre"), ["v000002.pem", "v000003.pem"]);
    assert_eq!(current(&env, "pre"), "v000002.pem");
    // Revoking the pending key: a fresh pending one takes its place.
    env.revoke("pre", 3, REASON).status(0);
    assert_eq!(env.manifest_version("pre", 3)["state"], "compromised");
    assert_eq!(env.manifest_version("pre", 4)["state"], "pending");
    assert_eq!(env.manifest("pre")["primary"], 2);
    assert_eq!(env.published_versions("pre"), ["v000004", "v000002"]);
    assert_eq!(env.key_files("pre"), ["v000002.pem", "v000004.pem"]);
}

#[test]
fn revoking_a_retired_key_only_unpublishes_and_destroys_it() {
    let env = Env::new();
    for domain in ["sig", "mac"] {
        env.rotate(domain).status(0);
        env.rotate(domain).arg("--force").status(0);
    }
    let active_before = std::fs::read(env.key_dir("sig").join("v000002.pem")).unwrap();
    env.revoke("sig", 1, REASON).status(0);
    assert_eq!(env.versions("sig"), [(1, "compromised".into()), (2, "active".into())]);
    assert_eq!(env.published_versions("sig"), ["v000002"]);
    assert_eq!(
        std::fs::read(env.key_dir("sig").join("v000002.pem")).unwrap(),
        active_before
    );
    assert_eq!(env.last_row()["to_version"], 2);
    // A retired MAC key still has its material: the revocation destroys it.
    assert_eq!(env.key_files("mac"), ["v000001.key", "v000002.key"]);
    env.revoke("mac", 1, REASON).status(0);
    assert_eq!(env.key_files("mac"), ["v000002.key"]);
    assert_eq!(env.versions("mac"), [(1, "compromised".into()), (2, "active".into())]);
}

#[test]
fn a_compromised_version_never_comes_back() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    env.revoke("sig", 1, REASON).status(0);
    let compromised = env.manifest_version("sig", 1);
    // Rotations and retention (retain = 2) go on around it.
    for _ in 0..4 {
        env.rotate("sig").arg("--force").status(0);
    }
    // A crash, its review (resolve writes off lost files) and another rotation.
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "commit.dirsync=kill")
        .output();
    assert_eq!(out.code, 137);
    env.rotate("sig").arg("--force").status(4);
    env.resolve("sig", "KILLED", "crash test").status(0);
    env.rotate("sig").arg("--force").status(0);
    // Adopted into a new ledger after a review: still compromised.
    std::fs::remove_dir_all(env.path("state")).unwrap();
    let out = env.rotate("sig").args(["--force", "--run-id", "NEW-LEDGER"]).status(4);
    assert!(out.stdout.contains("does not know"), "{}", out.stdout);
    env.resolve("sig", "NEW-LEDGER", "moved to a new state folder")
        .status(0);
    env.rotate("sig").arg("--force").status(0);

    assert_eq!(env.manifest_version("sig", 1), compromised, "v1 changed");
    assert!(!env.published_versions("sig").contains(&"v000001".to_string()));
    assert!(!env.key_dir("sig").join("v000001.pem").exists());
    let ring = keyrotate::keyring::Keyring::open(&env.path("keys"), "sig").unwrap();
    assert!(ring.version(1).is_err());
    assert!(ring.verification_keys().unwrap().iter().all(|k| k.version != 1));
    // And it cannot be revoked twice.
    let again = env.revoke("sig", 1, REASON).status(2);
    assert!(again.stdout.contains("already compromised"), "{}", again.stdout);
}

#[test]
fn what_cannot_be_revoked_is_a_usage_error_that_touches_nothing() {
    let env = Env::with_config(&format!(
        "{}\n[domains.pw]\nbackend = \"command\"\ncommand = [\"/bin/true\"]\n",
        crate::common::DEFAULT_CONFIG
    ));
    env.rotate("sig").status(0);
    for _ in 0..3 {
        env.rotate("sig").arg("--force").status(0);
    }
    // (Reading the rows checkpoints the WAL: before the snapshot.)
    let rows = env.rows().len();
    let before = env.snapshot();
    for (domain, n, says) in [
        ("sig", 9, "no such version"),
        ("sig", 1, "was destroyed"),
        ("pw", 1, "command backend"),
        ("mac", 1, "no keyring yet"),
    ] {
        let out = env.revoke(domain, n, REASON).status(2);
        assert!(out.stdout.contains(says), "{domain} v{n}: {}", out.stdout);
        assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    }
    let out = env
        .cmd()
        .args([
            "revoke",
            "--domain",
            "sig",
            "--version",
            "4",
            "--reason",
            " ",
            "--deadline",
            "1m",
        ])
        .status(2);
    assert!(out.stdout.contains("--reason"), "{}", out.stdout);
    env.cmd()
        .args(["revoke", "--domain", "sig", "--version", "4", "--deadline", "1m"])
        .status(2);
    env.assert_unchanged(&before, "refused revocations");
    assert_eq!(env.rows().len(), rows);
    // Another pool's host is not designated, whatever it holds.
    env.revoke("elsewhere", 1, REASON).status(6);
}

/// DESIGN is silent on a revocation of a blocked domain. An on-call engineer who learns
/// that a key leaked must be able to unpublish it now, not after reviewing an
/// unrelated crash: the revocation goes ahead (from a key store that verifies) and the
/// block stays until the review is recorded.
#[test]
fn a_leaked_key_is_revocable_on_a_domain_blocked_for_review() {
    let env = Env::new();
    env.rotate("sig").status(0);
    // A run killed mid-rotation, before its commit: in flight, no lock.
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "DIED"])
        .env("KEYROTATE_FAILPOINTS", "stage.fsync=kill")
        .output();
    assert_eq!(out.code, 137);
    // The revocation passes the dead run (marking it for review) and commits.
    let out = env.revoke("sig", 1, REASON).args(["--run-id", "R1"]).status(0);
    assert!(out.stdout.contains("revoked v1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("blocked by run DIED") && out.stdout.contains("the block stays"),
        "{}",
        out.stdout
    );
    let died = env.rows().into_iter().find(|r| r["run_id"] == "DIED").unwrap();
    assert_eq!(died["state"], "needs_review");
    assert_eq!(env.manifest_version("sig", 1)["state"], "compromised");
    // The v2 the dead run staged was swept (it never committed): the fresh key is v3.
    assert_eq!(env.manifest("sig")["primary"], 3);
    assert_eq!(env.key_files("sig"), ["v000003.pem"]);
    // Blocked still: rotations wait for the review, status says so.
    env.rotate("sig").arg("--force").status(4);
    env.cmd().args(["status", "--domain", "sig"]).status(4);
    // A second leak while still blocked: revocable too; the dry run agrees.
    let dry = env.revoke("sig", 3, REASON).arg("--dry-run").status(0);
    assert!(dry.stdout.contains("the block stays"), "{}", dry.stdout);
    env.revoke("sig", 3, REASON).status(0);
    assert_eq!(env.manifest("sig")["primary"], 4);
    env.resolve("sig", "DIED", "killed during a test").status(0);
    env.rotate("sig").arg("--force").status(0);
}

/// A key store that does not verify is not revoked from: the manifest may be an old
/// copy (the runbook: restore, resolve, then revoke).
#[test]
fn a_key_store_that_does_not_verify_is_not_revoked_from() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    std::fs::copy(
        env.key_dir("sig").join("v000002.pem"),
        env.key_dir("sig").join("v000007.pem"),
    )
    .unwrap();
    let before = env.snapshot();
    let dry = env.revoke("sig", 2, REASON).arg("--dry-run").status(4);
    assert!(dry.stdout.contains("v000007.pem"), "{}", dry.stdout);
    env.assert_unchanged(&before, "dry run");
    let out = env.revoke("sig", 2, REASON).status(4);
    assert!(out.stdout.contains("v000007.pem"), "{}", out.stdout);
    assert_eq!(env.manifest_version("sig", 2)["state"], "active");
    assert_eq!(env.last_row()["trigger"], "revoke");
}

/// An upgrade of a ledger at schema version 2 (before `trigger = 'revoke'`) that has
/// rows: SQLite rebuilds the table (it cannot alter a CHECK), keeping every row, id and
/// index, the partial unique one (one run in flight per domain) included.
#[test]
fn a_version_2_sqlite_ledger_with_rows_upgrades() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::set_permissions(env.path("state"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let db = env.path("state/ledger.sqlite3");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(include_str!("../src/ledger/migrations/sqlite/001_init.sql"))
            .unwrap();
        c.execute_batch(include_str!("../src/ledger/migrations/sqlite/002_audit_anchor.sql"))
            .unwrap();
        c.pragma_update(None, "user_version", 2).unwrap();
        c.execute_batch(
            "INSERT INTO rotations (id, run_id, domain, state, exit_code, trigger, host, pid, started_at, deadline_at, ended_at, to_version) \
             VALUES (7, 'OLD-OK', 'mac', 'succeeded', 0, 'scheduled', 'h', 1, '2020-01-01T00:00:00Z', '2020-01-01T00:01:00Z', '2020-01-01T00:00:01Z', 1); \
             INSERT INTO rotations (id, run_id, domain, state, exit_code, reason, trigger, host, pid, started_at, deadline_at, ended_at) \
             VALUES (9, 'OLD-BLOCK', 'sig', 'needs_review', 4, 'a test block', 'manual', 'h', 2, '2020-01-01T00:00:00Z', '2020-01-01T00:01:00Z', '2020-01-01T00:00:01Z');",
        )
        .unwrap();
    }
    std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let index_sql = |c: &rusqlite::Connection| -> Vec<(String, String)> {
        let mut s = c
            .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'rotations' AND sql IS NOT NULL ORDER BY name")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let indexes_before = index_sql(&rusqlite::Connection::open(&db).unwrap());
    assert_eq!(indexes_before.len(), 5);

    // The blocked domain stays blocked across the upgrade (the row survived)...
    env.rotate("sig").status(4);
    // ...a revocation row can be written...
    env.rotate("pre").status(0);
    env.revoke("pre", 2, REASON).status(0);
    let c = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert!(version >= 3, "schema version {version}");
    let rows = env.rows();
    assert_eq!(
        (rows[0]["id"].as_i64(), rows[0]["run_id"].as_str()),
        (Some(7), Some("OLD-OK"))
    );
    assert_eq!(
        (rows[1]["id"].as_i64(), rows[1]["reason"].as_str()),
        (Some(9), Some("a test block"))
    );
    assert_eq!(rows.last().unwrap()["trigger"], "revoke");
    // ...and every index is back, with the same definition.
    assert_eq!(index_sql(&c), indexes_before);
    let in_flight = "INSERT INTO rotations (run_id, domain, state, trigger, host, pid, started_at, deadline_at) \
                     VALUES (?1, 'x', 'started', 'revoke', 'h', 1, 'a', 'b')";
    c.execute(in_flight, ["A"]).unwrap();
    assert!(
        c.execute(in_flight, ["B"]).is_err(),
        "two runs in flight for one domain"
    );
    assert!(c
        .execute(
            "INSERT INTO rotations (run_id, domain, state, trigger, host, pid, started_at, deadline_at) \
             VALUES ('C', 'y', 'aborted', 'cron', 'h', 1, 'a', 'b')",
            [],
        )
        .is_err());
}

#[test]
fn revoke_on_the_postgresql_ledger() {
    if !crate::common::pg::server() {
        eprintln!("SKIPPED: no PostgreSQL server for this test");
        return;
    }
    let db = crate::common::pg::Database::new();
    let env = Env::with_config(&crate::common::DEFAULT_CONFIG.replace(
        "dir = \"state\"",
        &format!("dir = \"state\"\nledger = \"{}\"", db.url()),
    ));
    env.rotate("sig").status(0);
    env.rotate("sig").arg("--force").status(0);
    let dry = env.revoke("sig", 2, REASON).arg("--dry-run").status(0);
    assert!(dry.stdout.contains("would revoke v2"), "{}", dry.stdout);
    env.revoke("sig", 2, REASON).args(["--run-id", "PG-REVOKE"]).status(0);
    assert_eq!(
        db.sql("SELECT trigger || ' ' || state || ' ' || exit_code FROM rotations WHERE run_id = 'PG-REVOKE'"),
        "revoke succeeded 0"
    );
    assert_eq!(env.manifest_version("sig", 2)["state"], "compromised");
    assert!(!env.published_versions("sig").contains(&"v000002".to_string()));
    env.cmd().args(["history", "--domain", "sig"]).status(0);
}

// ---- crash consistency: SIGKILL at every durable step of a revocation ---------------

/// After a revocation killed at any step, the store verifies and is in the old state
/// (v2 active) or the new one (v2 compromised, v3 active); once the manifest says
/// compromised, jwks.json never lists v2 again. Then the next run flags the killed
/// run, its repair finishes the tidy-up (v2's file goes), a review unblocks, and the
/// revocation (if it had not committed) succeeds.
#[test]
fn sigkill_at_every_durable_step_of_a_revocation_leaves_the_old_or_the_new_state() {
    // An immediate domain (v2 active, v1 retired: a fresh v3 takes over) and a
    // prepublish one (v1 active, v2 pending: v2 takes over, a fresh v3 is pending).
    let mut covered = 0;
    for (domain, rotations, victim, successor) in [("sig", 2, 2, 3), ("pre", 1, 1, 2)] {
        covered += revocation_crash_points(domain, rotations, victim, successor);
    }
    eprintln!("revocation crash points covered with SIGKILL: {covered}");
}

fn revocation_crash_points(domain: &str, rotations: usize, victim: u64, successor: u64) -> usize {
    let base = Env::new();
    base.rotate(domain).status(0);
    for _ in 1..rotations {
        base.rotate(domain).arg("--force").status(0);
    }
    let kid = format!("v{victim:06}");
    let file = format!("v{victim:06}.pem");
    let env = crate::crash::clone_env(&base);
    let log = env.path("steps.log");
    env.revoke(domain, victim, REASON)
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    let all = steps(&log);
    for kind in [
        "stage.fsync",
        "jwks.rename",
        "commit.rename",
        "destroy.unlink",
        "ledger.committed",
    ] {
        assert!(all.iter().any(|s| s == kind), "{domain}: no {kind} step in {all:?}");
    }
    for (i, step) in all.iter().enumerate() {
        let k = i + 1;
        let context = format!("{domain}: SIGKILL at step {k} ({step})");
        let env = crate::crash::clone_env(&base);
        let out = env
            .revoke(domain, victim, REASON)
            .args(["--run-id", "KILLED"])
            .env("KEYROTATE_FAILPOINTS", format!("{k}=kill"))
            .output();
        assert_eq!(out.code, 137, "{context}: {}", out.stderr);
        let insp = keyrotate::keystore::Keystore::new(&env.path("keys"), domain)
            .inspect()
            .unwrap_or_else(|e| panic!("{context}: the key store does not verify: {e}"));
        let committed = match env.manifest_version(domain, victim)["state"].as_str().unwrap() {
            "active" => false,
            "compromised" => {
                assert_eq!(insp.manifest.primary, Some(successor), "{context}");
                assert!(
                    !env.published_versions(domain).contains(&kid),
                    "{context}: the compromised key is published"
                );
                true
            }
            other => panic!("{context}: v{victim} is {other}"),
        };
        let killed_in_flight = env
            .rows()
            .into_iter()
            .any(|r| r["run_id"] == "KILLED" && r["exit_code"].is_null());
        if killed_in_flight {
            env.rotate(domain).arg("--force").status(4);
            env.resolve(domain, "KILLED", "crash test").status(0);
        }
        if committed {
            // The repair (or the tidy-up) took its file and kept it unpublished.
            env.cmd().args(["status", "--domain", domain]).status(0);
            assert!(!env.key_dir(domain).join(&file).exists(), "{context}");
        } else {
            env.revoke(domain, victim, REASON).status(0);
        }
        assert_eq!(
            env.manifest_version(domain, victim)["state"],
            "compromised",
            "{context}"
        );
        assert!(!env.published_versions(domain).contains(&kid), "{context}");
        assert_eq!(env.key_files(domain), env.live_files(domain), "{context}: orphans");
        env.rotate(domain).arg("--force").status(0);
        assert_eq!(env.key_files(domain), env.live_files(domain), "{context}: orphans");
        assert!(!env.published_versions(domain).contains(&kid), "{context}");
    }
    all.len()
}

/// The PostgreSQL upgrade from schema version 2 with rows: the CHECK on `trigger` is
/// replaced in the migration's transaction, the rows stay, and a revocation's row goes in.
#[test]
fn a_version_2_postgresql_ledger_with_rows_upgrades() {
    if !crate::common::pg::server() {
        eprintln!("SKIPPED: no PostgreSQL server for this test");
        return;
    }
    let db = crate::common::pg::Database::new();
    db.sql(include_str!("../src/ledger/migrations/postgres/001_init.sql"));
    db.sql(include_str!("../src/ledger/migrations/postgres/002_audit_anchor.sql"));
    db.sql(
        "CREATE TABLE keyrotate_schema (version BIGINT NOT NULL); INSERT INTO keyrotate_schema (version) VALUES (1), (2); \
         INSERT INTO rotations (run_id, domain, state, exit_code, trigger, host, pid, started_at, deadline_at, ended_at) \
         VALUES ('OLD-OK', 'mac', 'succeeded', 0, 'manual', 'h', 1, '2020-01-01T00:00:00Z', '2020-01-01T00:01:00Z', '2020-01-01T00:00:01Z')",
    );
    let env = Env::with_config(&crate::common::DEFAULT_CONFIG.replace(
        "dir = \"state\"",
        &format!("dir = \"state\"\nledger = \"{}\"", db.url()),
    ));
    let out = env.cmd().arg("migrate").status(0);
    assert!(out.stdout.contains("2 -> "), "{}", out.stdout);
    env.rotate("sig").status(0);
    env.revoke("sig", 1, REASON).args(["--run-id", "PG-UP"]).status(0);
    assert_eq!(
        db.sql("SELECT string_agg(run_id || ':' || trigger, ' ' ORDER BY id) FROM rotations"),
        format!(
            "OLD-OK:manual {}:scheduled PG-UP:revoke",
            db.sql("SELECT run_id FROM rotations WHERE id = 2")
        )
    );
    let bad = crate::common::pg::psql_as(
        &db.0,
        crate::common::pg::ADMIN_USER,
        crate::common::pg::ADMIN_PASSWORD,
        "INSERT INTO rotations (run_id, domain, state, trigger, host, pid, started_at, deadline_at) \
         VALUES ('X', 'x', 'aborted', 'cron', 'h', 1, 'a', 'b')",
    );
    assert!(bad.unwrap_err().contains("rotations_trigger_check"));
}
