//! The ledger's contract, one story told against both engines through the same
//! function (atuin's pattern): what `rotate`, `resolve`, `status` and `history` rely on
//! must hold on SQLite and on PostgreSQL alike, so a query written for one engine that
//! the other reads differently fails here. The PostgreSQL half needs a server (see the
//! integration tests' `common/pg.rs`); without `KEYROTATE_TEST_PG` it says SKIPPED.

use super::*;
use crate::outcome::Outcome;

fn run(run_id: &str, domain: &str, started_at: &str) -> NewRun {
    NewRun {
        run_id: run_id.into(),
        domain: domain.into(),
        trigger: "scheduled",
        operator: None,
        host: "host-a".into(),
        pid: 4242,
        pool: Some("blue".into()),
        started_at: started_at.into(),
        deadline_at: "2099-01-01T00:00:00Z".into(),
        forced: false,
        requested_reason: None,
    }
}

fn ids(rows: &[RunRow]) -> Vec<&str> {
    rows.iter().map(|r| r.run_id.as_str()).collect()
}

/// The story: a rotation from start to close, a refused second run in flight, a dead
/// run marked stale and resolved, then what history, provenance and the audit
/// anchors read back.
fn story(location: &LedgerLocation) {
    let mut l = Ledger::open(location, Duration::from_secs(10)).expect("open");
    let (a, c) = (
        run("run-a", "web", "2026-01-01T00:00:00Z"),
        run("run-c", "web", "2026-01-02T00:00:00Z"),
    );
    l.write("start", |w| w.insert(&a, None, Some(1))).expect("insert");
    let rec = l.domain_record("web").expect("record");
    assert_eq!(rec.in_flight.as_ref().map(|r| r.run_id.as_str()), Some("run-a"));
    assert_eq!(rec.in_flight.as_ref().map(|r| r.state), Some(RunState::Started));

    // One run in flight per domain: the partial unique index refuses a second, and the
    // refused transaction leaves nothing behind.
    let second = l.write("start", |w| {
        w.insert(&run("run-b", "web", "2026-01-01T00:00:01Z"), None, None)
    });
    assert!(second.is_err(), "a second in-flight row of one domain was accepted");
    assert!(l.get("run-b").expect("get").is_none(), "the refused row was kept");
    // ...while another domain may have its own.
    l.write("start", |w| {
        w.insert(&run("run-x", "db", "2026-01-01T00:00:02Z"), None, None)
    })
    .expect("another domain's run in flight");

    l.write("stage", |w| {
        w.event("run-a", "staging", Some("v2.pem.tmp"))?;
        w.advance("run-a", RunState::Staged, (Some(1), Some(2)), "staged v2")
    })
    .expect("staged");
    assert_eq!(l.get("run-a").unwrap().unwrap().state, RunState::Staged);
    l.write("commit", |w| {
        w.advance("run-a", RunState::Committed, (Some(1), Some(2)), "v2 active")
    })
    .expect("committed");
    assert!(
        l.domain_record("web").unwrap().in_flight.is_some(),
        "committed is still in flight"
    );
    l.write("close", |w| {
        w.close("run-a", Outcome::Rotated, "rotated", (Some(1), Some(2)))?;
        w.anchor(
            "run-a",
            &crate::audit::Head {
                seq: 7,
                hash: "h7".into(),
            },
        )
    })
    .expect("closed");
    let row = l.get("run-a").unwrap().unwrap();
    assert_eq!(row.state, RunState::of(Outcome::Rotated));
    assert_eq!(row.exit_code, Some(i64::from(Outcome::Rotated.code())));
    assert_eq!((row.from_version, row.to_version), (Some(1), Some(2)));
    assert!(row.ended_at.is_some());
    let rec = l.domain_record("web").unwrap();
    assert!(rec.in_flight.is_none());
    assert_eq!(rec.last_success.map(|r| r.run_id), Some("run-a".into()));

    // A run that died in flight: marked stale it blocks the domain until resolved, once.
    l.write("start", |w| w.insert(&c, None, Some(2))).expect("insert c");
    l.write("stale", |w| w.mark_stale("run-c", "the process is gone"))
        .expect("stale");
    let rec = l.domain_record("web").unwrap();
    assert!(rec.in_flight.is_none(), "needs_review is not in flight");
    assert_eq!(rec.blocking.map(|r| r.run_id), Some("run-c".into()));
    assert!(l.write("resolve", |w| w.resolve("run-c", "alice", "checked")).unwrap());
    assert!(
        !l.write("resolve", |w| w.resolve("run-c", "bob", "again")).unwrap(),
        "resolved twice"
    );
    let row = l.get("run-c").unwrap().unwrap();
    assert_eq!(row.state, RunState::Resolved);
    assert_eq!(
        (row.resolved_by.as_deref(), row.resolution.as_deref()),
        (Some("alice"), Some("checked"))
    );
    assert!(l.domain_record("web").unwrap().blocking.is_none());
    let phases: Vec<String> = l.events("run-c").unwrap().into_iter().map(|e| e.1).collect();
    assert_eq!(phases, ["started", "needs_review", "resolved"]);

    // History: newest first, by domain, since an instant, limited.
    assert_eq!(ids(&l.history(Some("web"), None, 10).unwrap()), ["run-c", "run-a"]);
    assert_eq!(ids(&l.history(Some("web"), None, 1).unwrap()), ["run-c"]);
    assert_eq!(
        ids(&l.history(Some("web"), Some("2026-01-01T12:00:00Z"), 10).unwrap()),
        ["run-c"]
    );
    assert_eq!(ids(&l.history(None, None, 10).unwrap()), ["run-c", "run-x", "run-a"]);

    // Provenance: the manifest's run is known, with its staged files and its commit.
    let prov = l.provenance("web", Some("run-a")).unwrap();
    assert_eq!(prov.manifest_run_known, Some(true));
    let a_rec = prov.runs.iter().find(|r| r.run_id == "run-a").expect("run-a's record");
    assert_eq!(a_rec.staged, ["v2.pem.tmp"]);
    assert!(a_rec.committed);
    assert_eq!(
        l.provenance("web", Some("run-unknown")).unwrap().manifest_run_known,
        Some(false)
    );
    assert_eq!(
        l.provenance("db", Some("run-a")).unwrap().manifest_run_known,
        Some(false)
    );

    // Audit anchors: the chain heads of this host's runs.
    let anchors = l.audit_anchors("host-a").unwrap();
    assert_eq!(anchors.len(), 1);
    assert_eq!(
        (anchors[0].run_id.as_str(), anchors[0].seq, anchors[0].hash.as_str()),
        ("run-a", 7, "h7")
    );
    assert!(l.audit_anchors("host-b").unwrap().is_empty());
}

#[test]
fn the_ledger_story_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    story(&LedgerLocation::Sqlite(dir.path().join("ledger.sqlite3")));
}

#[test]
// SKIPPED is the test's own report, not the binary's output (which the lint guards).
#[allow(clippy::print_stderr)]
fn the_ledger_story_on_postgres() {
    if std::env::var_os("KEYROTATE_TEST_PG").is_none() {
        eprintln!("SKIPPED: no PostgreSQL server (set KEYROTATE_TEST_PG and PGHOST/PGUSER/PGPASSWORD)");
        return;
    }
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let (host, user, password) = (
        var("PGHOST", "127.0.0.1"),
        var("PGUSER", "postgres"),
        var("PGPASSWORD", ""),
    );
    let admin_url = format!(
        "host={host} user={user} password={password} dbname={}",
        var("PGDATABASE", "postgres")
    );
    let mut admin = ::postgres::Client::connect(&admin_url, ::postgres::NoTls).expect("admin connection");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let db = format!("kr_test_contract_{}_{nanos}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .expect("create database");
    let url = format!("postgres://{user}:{password}@{host}/{db}?sslmode=disable");
    let result = std::panic::catch_unwind(|| story(&LedgerLocation::Postgres(url)));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .expect("drop database");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
