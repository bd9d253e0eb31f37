//! A PostgreSQL server for the tests that need one. `.ci/run` starts the machine's
//! PostgreSQL 15 and exports `KEYROTATE_TEST_PG=1`; run as root elsewhere, `server()`
//! starts the installed cluster itself. Only where PostgreSQL is not installed do the
//! tests say SKIPPED.

use std::process::Command;
use std::sync::OnceLock;

pub const ADMIN_USER: &str = "keyrotate_ci";
pub const ADMIN_PASSWORD: &str = "ci-only-password";

/// Makes sure a server and the admin role (CREATEDB, CREATEROLE) are there; `false`
/// only when PostgreSQL is not installed (or, not being root, this process cannot set
/// it up and `KEYROTATE_TEST_PG` is not set). An installed server that cannot be
/// started is a test failure, not a skip.
pub fn server() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        if std::env::var_os("KEYROTATE_TEST_PG").is_some() {
            return true;
        }
        if !std::path::Path::new("/etc/postgresql/15/main").exists() {
            return false;
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
            eprintln!("PostgreSQL is installed but this test run is not root: start it and set KEYROTATE_TEST_PG (see .ci/run)");
            return false;
        }
        let start = Command::new("pg_ctlcluster").args(["15", "main", "start"]).output().expect("pg_ctlcluster");
        let status = Command::new("pg_ctlcluster").args(["15", "main", "status"]).output().expect("pg_ctlcluster");
        assert!(status.status.success(), "PostgreSQL is installed but does not start: {}", String::from_utf8_lossy(&start.stderr));
        let sql = format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ADMIN_USER}') THEN \
             CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE CREATEDB PASSWORD '{ADMIN_PASSWORD}'; END IF; END $$"
        );
        let out = Command::new("runuser").args(["-u", "postgres", "--", "psql", "-qX", "-c", &sql]).output().expect("runuser");
        assert!(out.status.success(), "cannot create the test role: {}", String::from_utf8_lossy(&out.stderr));
        true
    })
}

/// Runs `sql` as `user` over TCP on `db`; the output, or psql's error.
pub fn psql_as(db: &str, user: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            user,
            "-d",
            db,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `sql` as the admin role; panics on error.
pub fn admin(db: &str, sql: &str) -> String {
    psql_as(db, ADMIN_USER, ADMIN_PASSWORD, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// libpq variables that connect a hook or psql as the admin role.
pub fn admin_env() -> [(&'static str, &'static str); 4] {
    [
        ("PGHOST", "127.0.0.1"),
        ("PGUSER", ADMIN_USER),
        ("PGPASSWORD", ADMIN_PASSWORD),
        ("PGDATABASE", "postgres"),
    ]
}

/// Percent-encodes everything but letters and digits.
pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A fresh database on the test server, dropped (with its sessions) when the test ends.
/// Named `kr_test_<pid>_<n>`, which `.ci/run` also sweeps after an aborted run.
pub struct Database(pub String);

impl Database {
    pub fn new() -> Database {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("kr_test_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        admin("postgres", &format!("CREATE DATABASE {name}"));
        Database(name)
    }
    /// The URL for `user` (the password percent-encoded, so any character works).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("postgres://{user}:{}@127.0.0.1/{}", enc(password), self.0)
    }
    /// The admin's URL, its password as written (tests replace it to make it wrong).
    pub fn url(&self) -> String {
        format!("postgres://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1/{}", self.0)
    }
    pub fn sql(&self, sql: &str) -> String {
        admin(&self.0, sql)
    }
    /// Ends keyrotate's sessions on this database, as a DBA or a server restart would.
    pub fn terminate_keyrotate_sessions(&self) {
        self.sql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'keyrotate'",
            self.0
        ));
    }
    /// How many advisory locks are held on this database.
    pub fn advisory_locks(&self) -> String {
        self.sql(&format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' AND d.datname = '{}'",
            self.0
        ))
    }
    /// Every row of both ledger tables, as text.
    pub fn dump(&self) -> String {
        self.sql(
            "SELECT coalesce((SELECT string_agg(r::text, E'\\n') FROM rotations r), '') || E'\\n' || \
             coalesce((SELECT string_agg(e::text, E'\\n') FROM rotation_events e), '')",
        )
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql_as(
            "postgres",
            ADMIN_USER,
            ADMIN_PASSWORD,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0),
        );
    }
}
