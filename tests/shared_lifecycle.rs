//! The NIST SP 800-57 lifecycle (DESIGN 11) on the shared key store (DESIGN 9), through
//! the real binary, with three simulated hosts on one PostgreSQL database: a retired
//! signature version keeps no sealed private half in the database and only its public
//! half on every host (which still verifies its old signatures); `revoke` on the
//! designated host makes the version `compromised` in the one commit transaction, and
//! every host's next `sync` unpublishes it and unlinks its file; a compromised version
//! never comes back; the dry run changes nothing; another pool's host gets 6.
//!
//! Needs PostgreSQL (see `common::pg`); says SKIPPED where none is installed.

use keyrotate::keyring::{verify_with_jwk, Keyring};

use crate::common::pg::{psql_as, server, Database, ADMIN_PASSWORD, ADMIN_USER};
use crate::common::Env;
use crate::shared_store::{host, sync};

/// The `--reason` of this module's revocations.
const REASON: &str = "leaked in a build log";

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

/// Every version of `domain` in the database: `N state sealed-is-null`, in order.
fn db_versions(db: &Database, domain: &str) -> String {
    db.sql(&format!(
        "SELECT string_agg(version || ' ' || state || ' ' || (sealed IS NULL), ',' ORDER BY version) \
         FROM shared_key_versions WHERE domain = '{domain}'"
    ))
}

/// The whole shared state of the database (keyrings, versions, acknowledgements), for
/// "nothing changed".
fn db_state(db: &Database) -> String {
    db.sql(
        "SELECT coalesce(string_agg(t, E'\\n' ORDER BY t), '') FROM (SELECT k::text AS t FROM shared_keyrings k \
         UNION ALL SELECT v::text FROM shared_key_versions v UNION ALL SELECT a::text FROM shared_sync_acks a) x",
    )
}

/// The version numbers `jwks.json` of a host's copy publishes.
fn jwks_versions(env: &Env, domain: &str) -> Vec<u64> {
    let mut v: Vec<u64> = env.jwks(domain)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap()[1..7].parse().unwrap())
        .collect();
    v.sort_unstable();
    v
}

/// Two rotations of the prepublish domain `sess` with every host synced: v1 retired,
/// v2 active, v3 pending, epoch 2 everywhere. Returns a signature v1 made on `hosts[1]`
/// while it was active.
fn two_rotations(a: &Env, others: &[&Env]) -> Vec<u8> {
    a.rotate("sess").status(0);
    for h in others {
        sync(h, Some("sess")).status(0);
    }
    let ring = Keyring::open(&others[0].path("keys"), "sess").unwrap();
    let signature = ring.active().unwrap().key.sign(b"payload").unwrap();
    a.rotate("sess").status(0);
    for h in others {
        sync(h, Some("sess")).status(0);
    }
    signature
}

#[test]
fn a_retired_signature_version_has_no_sealed_key_and_only_its_public_half_on_every_host() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    let signature = two_rotations(&a, &[&b, &c]);
    // The commit that retired v1 erased its sealed private half in the database.
    assert_eq!(
        db_versions(&db, "sess"),
        "1 retired true,2 active false,3 pending false"
    );
    for h in [&a, &b, &c] {
        // b and c held v1's private file before the sync: it is gone.
        assert_eq!(h.key_files("sess"), ["v000002.pem", "v000003.pem"]);
        let v1 = h.manifest_version("sess", 1);
        assert_eq!(v1["state"], "retired");
        assert!(v1["public_key"].is_string(), "{v1}");
        assert_eq!(jwks_versions(h, "sess"), [1, 2, 3]);
        // The public half alone still verifies what v1 signed.
        let ring = Keyring::open(&h.path("keys"), "sess").unwrap();
        let keys = ring.verification_keys().unwrap();
        let k1 = keys.iter().find(|k| k.version == 1).unwrap();
        assert!(verify_with_jwk(&k1.jwk, b"payload", &signature));
        assert!(ring.version(1).is_err(), "no private half of v1 is offered");
        h.cmd().args(["check", "--domain", "sess"]).status(0);
        // Already current: a second sync writes nothing.
        let again = sync(h, Some("sess")).status(0);
        assert!(again.stdout.contains("CURRENT sess"), "{}", again.stdout);
    }
    // Symmetric keys keep their sealed material while retired (old data must open).
    a.rotate("mac").status(0);
    a.rotate("mac").status(0);
    assert_eq!(db_versions(&db, "mac"), "1 retired false,2 active false");
    sync(&b, Some("mac")).status(0);
    assert_eq!(b.key_files("mac"), ["v000001.key", "v000002.key"]);
    // The database refuses a retired signature version that keeps its sealed key.
    let e = psql_as(
        &db.0,
        ADMIN_USER,
        ADMIN_PASSWORD,
        "UPDATE shared_key_versions SET sealed = '\\x00' WHERE domain = 'sess' AND version = 1",
    )
    .unwrap_err();
    assert!(e.contains("check constraint"), "{e}");
}

#[test]
fn revoking_the_active_key_reaches_every_host_and_never_comes_back() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    two_rotations(&a, &[&b, &c]);
    let before_db = db_state(&db);

    // Another pool's host never revokes: 6, nothing touched.
    let before_b = b.snapshot();
    let out = b.revoke("sess", 2, REASON).status(6);
    assert!(out.stdout.contains("NOT_DESIGNATED"), "{}", out.stdout);
    assert_eq!(db_state(&db), before_db);
    let mut after_b = b.snapshot();
    after_b.retain(|p, _| !p.starts_with("state"));
    let mut expect_b = before_b;
    expect_b.retain(|p, _| !p.starts_with("state"));
    assert_eq!(after_b, expect_b, "host-b's copy changed");

    // The dry run predicts the revocation and changes nothing.
    let before_a = a.snapshot();
    let dry = a
        .revoke("sess", 2, REASON)
        .args(["--dry-run", "--output", "json"])
        .status(0)
        .json();
    let plan = dry["plan"].to_string();
    assert!(plan.contains("compromise: v2"), "{plan}");
    assert!(plan.contains("promote: v3"), "{plan}");
    assert!(plan.contains("create: v4"), "{plan}");
    assert!(dry["reason"].as_str().unwrap().contains("would revoke v2"), "{dry}");
    assert_eq!(db_state(&db), before_db, "the dry run wrote to the database");
    a.assert_unchanged(&before_a, "revoke --dry-run");

    // The revocation: one commit, v2 compromised with its sealed key erased, the
    // pending v3 (already on every host) active, a fresh v4 pending.
    let out = a.revoke("sess", 2, REASON).args(["--run-id", "REVOKE-1"]).status(0);
    assert!(out.stdout.contains("revoked v2"), "{}", out.stdout);
    assert!(!out.stdout.contains("lagging"), "{}", out.stdout);
    assert_eq!(
        db_versions(&db, "sess"),
        "1 retired true,2 compromised true,3 active false,4 pending false"
    );
    assert_eq!(
        db.sql(
            "SELECT compromise_reason || ' ' || (compromised_at IS NOT NULL) FROM shared_key_versions \
             WHERE domain = 'sess' AND version = 2"
        ),
        "leaked in a build log true"
    );
    assert_eq!(
        db.sql("SELECT trigger || ' ' || state FROM rotations WHERE run_id = 'REVOKE-1'"),
        "revoke succeeded"
    );
    assert!(a
        .audit()
        .iter()
        .any(|e| e["event"] == "key.compromised" && e["from_version"] == 2));
    // The designated host's own copy followed at once; b still publishes v2 until it
    // syncs.
    assert_eq!(jwks_versions(&a, "sess"), [1, 3, 4]);
    assert_eq!(jwks_versions(&b, "sess"), [1, 2, 3]);
    for h in [&b, &c] {
        sync(h, Some("sess")).status(0);
    }
    for h in [&a, &b, &c] {
        assert_eq!(jwks_versions(h, "sess"), [1, 3, 4]);
        assert_eq!(h.key_files("sess"), ["v000003.pem", "v000004.pem"]);
        let v2 = h.manifest_version("sess", 2);
        assert_eq!(v2["state"], "compromised");
        assert_eq!(v2["compromise_reason"], "leaked in a build log");
        assert_eq!(h.manifest("sess")["primary"], 3);
        h.cmd().args(["check", "--domain", "sess"]).status(0);
        // status and the metrics show it as a local domain's.
        let s = h
            .cmd()
            .args(["status", "--domain", "sess", "--output", "json"])
            .status(0)
            .json();
        assert_eq!(s["domains"][0]["compromised"], serde_json::json!([2]), "{s}");
    }
    let metrics = a.cmd().args(["status", "--output", "prometheus"]).status(0).stdout;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyrotate_versions{") && l.contains("state=\"compromised\"") && l.ends_with(" 1")),
        "{metrics}"
    );

    // Never again: not by revoke, rotations, a killed run and its resolve, nor sync.
    let again = a.revoke("sess", 2, REASON).status(2);
    assert!(again.stdout.contains("already compromised"), "{}", again.stdout);
    a.rotate("sess")
        .args(["--run-id", "KILLED"])
        .env("KEYROTATE_FAILPOINTS", "shared.update=kill")
        .status(137);
    a.resolve("sess", "KILLED", "killed in its commit transaction: rolled back")
        .status(0);
    for _ in 0..3 {
        a.rotate("sess").status(0);
        for h in [&b, &c] {
            sync(h, Some("sess")).status(0);
        }
    }
    assert_eq!(
        db.sql(
            "SELECT state || ' ' || (sealed IS NULL) FROM shared_key_versions WHERE domain = 'sess' AND version = 2"
        ),
        "compromised true"
    );
    for h in [&a, &b, &c] {
        assert_eq!(h.manifest_version("sess", 2)["state"], "compromised");
        assert!(!jwks_versions(h, "sess").contains(&2));
    }
    // Not even by hand: the database refuses to change a compromised version.
    let e = psql_as(
        &db.0,
        ADMIN_USER,
        ADMIN_PASSWORD,
        "UPDATE shared_key_versions SET state = 'retired', compromised_at = NULL, compromise_reason = NULL \
         WHERE domain = 'sess' AND version = 2",
    )
    .unwrap_err();
    assert!(e.contains("never changes state again"), "{e}");
}

#[test]
fn a_revocation_is_not_held_back_by_a_lagging_host_but_names_it() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    a.rotate("sess").status(0);
    for h in [&b, &c] {
        sync(h, Some("sess")).status(0);
    }
    a.rotate("sess").status(0);
    // host-c stays at epoch 1, without the pending v3: a rotation would wait for it.
    sync(&b, Some("sess")).status(0);
    let gated = a.rotate("sess").arg("--dry-run").status(3);
    assert!(gated.stdout.contains("host-c"), "{}", gated.stdout);
    // A leaked active key goes at once; the outcome names the host that lags.
    let dry = a.revoke("sess", 2, REASON).arg("--dry-run").status(0);
    assert!(
        dry.stdout.contains("waived") && dry.stdout.contains("host-c (pool pool-c, epoch 1)"),
        "{}",
        dry.stdout
    );
    assert!(!dry.stdout.contains("host-b (pool"), "{}", dry.stdout);
    let out = a.revoke("sess", 2, REASON).status(0);
    assert!(
        out.stdout.contains("revoked v2") && out.stdout.contains("lagging hosts: host-c (pool pool-c, epoch 1)"),
        "{}",
        out.stdout
    );
    assert_eq!(
        db_versions(&db, "sess"),
        "1 retired true,2 compromised true,3 active false,4 pending false"
    );
    // The lagging host catches up in one sync: v2 gone, v3 active.
    assert!(jwks_versions(&c, "sess").contains(&2));
    sync(&c, Some("sess")).status(0);
    assert_eq!(jwks_versions(&c, "sess"), [1, 3, 4]);
    assert_eq!(c.key_files("sess"), ["v000003.pem", "v000004.pem"]);
}

#[test]
fn revoking_a_retired_or_unknown_shared_version() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    // Nothing committed yet: nothing to revoke (asked of the database, not of this
    // host's copy, which may lag).
    a.cmd().arg("migrate").status(0);
    let out = a.revoke("sess", 1, REASON).status(2);
    assert!(out.stdout.contains("no committed keyring yet"), "{}", out.stdout);
    two_rotations(&a, &[&b, &c]);
    // An unknown version is a usage error: nothing committed, no ledger row.
    let rows = || db.sql("SELECT count(*) FROM rotations");
    let (before, before_rows) = (db_state(&db), rows());
    let out = a.revoke("sess", 9, REASON).status(2);
    assert!(out.stdout.contains("no such version"), "{}", out.stdout);
    let out = a.revoke("sess", 9, REASON).arg("--dry-run").status(2);
    assert!(out.stdout.contains("no such version"), "{}", out.stdout);
    assert_eq!(db_state(&db), before);
    assert_eq!(rows(), before_rows);
    // A retired version: compromised, unpublished; the active one stays.
    a.revoke("sess", 1, REASON).status(0);
    assert_eq!(
        db_versions(&db, "sess"),
        "1 compromised true,2 active false,3 pending false"
    );
    sync(&b, Some("sess")).status(0);
    assert_eq!(jwks_versions(&b, "sess"), [2, 3]);
    assert_eq!(b.manifest("sess")["primary"], 2);
    // A symmetric version: its sealed key is erased, the file goes on every host.
    a.rotate("mac").status(0);
    sync(&b, Some("mac")).status(0);
    assert_eq!(b.key_files("mac"), ["v000001.key"]);
    a.revoke("mac", 1, REASON).status(0);
    assert_eq!(db_versions(&db, "mac"), "1 compromised true,2 active false");
    sync(&b, Some("mac")).status(0);
    assert_eq!(b.key_files("mac"), ["v000002.key"]);
}

#[test]
fn a_revocation_killed_in_its_commit_transaction_commits_nothing_and_can_be_run_again() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db, "host-a", "pool-a");
    let b = host(&db, "host-b", "pool-b");
    let c = host(&db, "host-c", "pool-c");
    two_rotations(&a, &[&b, &c]);
    let before = db_state(&db);
    let before_a = a.snapshot();
    for step in ["shared.epoch", "shared.insert", "shared.update"] {
        a.revoke("sess", 2, REASON)
            .env("KEYROTATE_FAILPOINTS", format!("{step}=kill"))
            .status(137);
        // The server rolled the transaction back: the keyring and this host's copy
        // are as they were (the run's ledger row and lock file aside).
        assert_eq!(db_state(&db), before, "{step}");
        let mut now = a.snapshot();
        now.retain(|p, _| !p.starts_with("state") && !p.ends_with(".lock"));
        let mut was = before_a.clone();
        was.retain(|p, _| !p.starts_with("state") && !p.ends_with(".lock"));
        assert_eq!(now, was, "{step}");
    }
    // The dead runs do not hold the revocation back: it goes ahead and commits once.
    let out = a.revoke("sess", 2, REASON).status(0);
    assert!(out.stdout.contains("revoked v2"), "{}", out.stdout);
    assert_eq!(
        db_versions(&db, "sess"),
        "1 retired true,2 compromised true,3 active false,4 pending false"
    );
    assert_eq!(jwks_versions(&a, "sess"), [1, 3, 4]);
}
