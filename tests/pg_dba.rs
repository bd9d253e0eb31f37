//! The PostgreSQL ledger on a DBA's terms (DESIGN section 8): passwords in every URL
//! form never reach an output, the password file and `PGPASSWORD`, `status` that
//! cannot read a domain's rows, least privilege and `keyrotate migrate`, concurrent
//! `resolve`s, a closing write that fails, BUSY at the connection limit, and `sslmode`
//! on a Unix socket. Every test drives the real binary against the real server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::pg::{admin, server, Database, ADMIN_PASSWORD, ADMIN_USER};
use crate::common::Env;

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A login role, dropped (with what it owns) when the test ends.
struct Role(String);

impl Role {
    fn new(password: &str, extra: &str) -> Role {
        let name = unique("kr_role");
        admin(
            "postgres",
            &format!(
                "CREATE ROLE {name} LOGIN {extra} PASSWORD '{}'; GRANT {name} TO {ADMIN_USER}",
                password.replace('\'', "''")
            ),
        );
        Role(name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = crate::common::pg::psql_as(
            "postgres",
            ADMIN_USER,
            ADMIN_PASSWORD,
            &format!("DROP ROLE IF EXISTS {}", self.0),
        );
    }
}

/// One "host" on the ledger at `url`.
fn host(url: &str) -> Env {
    Env::with_config(&format!(
        r#"
[state]
dir = "state"
ledger = "{}"
[host]
pool = "pool-a"
[defaults]
designated_pool = "pool-a"
backend = "keystore"
keystore = "keys"
min_interval = "1h"
[domains.sig]
algorithm = "ed25519"
"#,
        url.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// What a role needs to create the ledger's tables in `db`.
fn grant_create(db: &Database, role: &str) {
    db.sql(&format!(
        "GRANT CONNECT, CREATE ON DATABASE {} TO {role}; GRANT CREATE ON SCHEMA public TO {role}",
        db.0
    ));
}

/// The grants of the README's least-privilege role, on a migrated database.
fn grant_app(db: &Database, role: &str) {
    db.sql(&format!(
        "GRANT CONNECT ON DATABASE {db} TO {role}; \
         GRANT SELECT ON keyrotate_schema TO {role}; \
         GRANT SELECT, INSERT, UPDATE ON rotations, rotation_events TO {role}; \
         GRANT USAGE ON SEQUENCE rotations_id_seq, rotation_events_id_seq TO {role}",
        db = db.0
    ));
}

fn audit_text(env: &Env) -> String {
    std::fs::read_to_string(env.path("state/audit.jsonl")).unwrap_or_default()
}

/// Fails if any of `secrets` appears in any of `texts`.
#[track_caller]
fn assert_no_secret(secrets: &[&str], texts: &[(&str, &str)]) {
    for s in secrets {
        for (what, text) in texts {
            assert!(!text.contains(s), "{s:?} leaked into {what}:\n{text}");
        }
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn a_password_in_any_url_form_never_reaches_an_output() {
    need_postgres!();
    // Every character a URL reserves, unencoded where the form allows it.
    let password = "Pw/x:y#z?Secret9";
    let role = Role::new(password, "");
    let db = Database::new();
    grant_create(&db, &role.0);
    let base = format!("127.0.0.1/{}", db.0);
    let r = &role.0;
    let forms = [
        format!("postgres://{r}:{}@{base}", crate::common::pg::enc(password)),
        format!("postgres://{r}:{password}@{base}"),
        format!("postgres://{r}@{base}?password={}", crate::common::pg::enc(password)),
        format!("postgresql://{r}@{base}?sslmode=disable&password={password}"),
    ];
    let secrets = [password, "Secret9", "Pw%2Fx", "x:y#z"];
    for (i, url) in forms.iter().enumerate() {
        let env = host(url);
        let id = |s: &str| format!("F{i}-{s}");
        let mut outs: Vec<crate::common::Out> = Vec::new();
        // It works: a real rotation with that URL.
        outs.push(env.rotate("sig").args(["--force", "--run-id", &id("OK")]).status(0));
        // A failure whose message names the ledger, recorded in the row and the audit.
        let failed = env
            .rotate("sig")
            .args(["--force", "--run-id", &id("FAIL")])
            .env("KEYROTATE_FAILPOINTS", "ledger.staged=error")
            .output();
        assert_eq!(failed.code, 3, "{url}: {}{}", failed.stdout, failed.stderr);
        assert!(failed.stdout.contains("injected failure"), "{}", failed.stdout);
        outs.push(failed);
        outs.push(env.cmd().args(["history", "--output", "json"]).status(0));
        outs.push(env.cmd().args(["history"]).status(0));
        outs.push(env.cmd().args(["status", "--output", "json"]).status(0));
        outs.push(env.cmd().arg("check").status(0));
        // The server refuses: a database that does not exist, in the same URL form.
        let elsewhere = host(&url.replace(&db.0, "no_such_db"));
        let refused = elsewhere.rotate("sig").output();
        assert_eq!(refused.code, 3, "{}", refused.stdout);
        assert!(refused.stdout.contains("no_such_db"), "{}", refused.stdout);
        outs.push(refused);
        outs.push(elsewhere.cmd().arg("status").output());
        outs.push(elsewhere.rotate("sig").arg("--dry-run").output());
        outs.push(elsewhere.cmd().arg("check").output());
        let mut texts: Vec<(String, String)> = Vec::new();
        for o in &outs {
            texts.push(("stdout".into(), o.stdout.clone()));
            texts.push(("stderr".into(), o.stderr.clone()));
        }
        texts.push(("audit".into(), audit_text(&env)));
        texts.push(("audit".into(), audit_text(&elsewhere)));
        let texts: Vec<(&str, &str)> = texts.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_no_secret(&secrets, &texts);
        // The failed run's reason names the ledger, masked.
        assert!(
            db.sql(&format!("SELECT reason FROM rotations WHERE run_id = '{}'", id("FAIL")))
                .contains("***"),
            "{url}"
        );
    }
    assert_no_secret(&secrets, &[("ledger", &db.dump())]);
}

#[test]
fn an_unencoded_at_sign_in_the_password_is_refused_without_echoing_it() {
    let env = host("postgres://kr:p@ss-Secret9@127.0.0.1/db");
    let out = env.rotate("sig").status(2);
    assert!(
        out.stderr.contains("%40") && out.stderr.contains("state.ledger"),
        "{}",
        out.stderr
    );
    assert_no_secret(
        &["p@ss", "Secret9"],
        &[("stdout", &out.stdout), ("stderr", &out.stderr)],
    );
}

#[test]
fn the_password_file_and_pgpassword_are_used_as_libpq_uses_them() {
    need_postgres!();
    // A password needing both escapes of the file format.
    let password = "pa:ss\\wo-rd";
    let role = Role::new(password, "");
    let db = Database::new();
    grant_create(&db, &role.0);
    let url = format!("postgres://{}@127.0.0.1/{}", role.0, db.0);
    let env = host(&url);
    let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
    let file = env.path("pgpass");
    std::fs::write(
        &file,
        format!(
            "# first match wins\n\
             127.0.0.1:5432:other_db:{r}:wrong\n\
             127.0.0.1:*:{d}:{r}:{escaped}\n\
             *:*:*:*:wrong-too\n",
            r = role.0,
            d = db.0
        ),
    )
    .unwrap();
    let set_mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set_mode(0o600);
    // No password anywhere: libpq's "password missing", one line.
    let out = env
        .rotate("sig")
        .env("PGPASSWORD", "")
        .env("PGPASSFILE", "")
        .env("HOME", env.path("nohome"))
        .status(3);
    assert!(out.stdout.contains("password missing"), "{}", out.stdout);
    // PGPASSFILE.
    env.rotate("sig")
        .args(["--force"])
        .env("PGPASSWORD", "")
        .env("PGPASSFILE", &file)
        .status(0);
    // Readable by others: ignored, with a warning naming the file and the fix.
    set_mode(0o640);
    let out = env
        .rotate("sig")
        .args(["--force"])
        .env("PGPASSWORD", "")
        .env("PGPASSFILE", &file)
        .status(3);
    assert!(
        out.stderr.contains("group or world access") && out.stderr.contains("0600"),
        "{}",
        out.stderr
    );
    // ~/.pgpass when PGPASSFILE is not set.
    let home = env.path("home");
    std::fs::create_dir(&home).unwrap();
    set_mode(0o600);
    std::fs::copy(&file, home.join(".pgpass")).unwrap();
    env.rotate("sig")
        .args(["--force"])
        .env("PGPASSWORD", "")
        .env("PGPASSFILE", "")
        .env("HOME", &home)
        .status(0);
    // PGPASSWORD comes before the file (here: a file that would not match).
    env.rotate("sig")
        .args(["--force"])
        .env("PGPASSWORD", password)
        .env("PGPASSFILE", env.path("nothing"))
        .status(0);
    // A password in the URL comes before both.
    let out = host(&format!("postgres://{}:wrong@127.0.0.1/{}", role.0, db.0))
        .rotate("sig")
        .env("PGPASSWORD", password)
        .env("PGPASSFILE", &file)
        .status(3);
    assert!(out.stdout.contains("password authentication failed"), "{}", out.stdout);
    assert_eq!(db.sql("SELECT count(*) FROM rotations WHERE state = 'succeeded'"), "3");
}

#[test]
fn status_never_exits_0_for_a_domain_whose_rows_it_cannot_read() {
    need_postgres!();
    // A column the queries need was dropped.
    let db = Database::new();
    let a = host(&db.url());
    a.rotate("sig").status(0);
    db.sql("ALTER TABLE rotations DROP COLUMN requested_reason");
    let out = a.cmd().arg("status").status(3);
    assert!(
        out.stdout.contains("sig") && out.stdout.contains("requested_reason"),
        "{}",
        out.stdout
    );
    let json = a.cmd().args(["status", "--output", "json"]).status(3).json();
    assert!(json["domains"][0]["problems"][0]
        .as_str()
        .unwrap()
        .contains("requested_reason"));

    // The schema version row was deleted: say so, in status and rotate, never
    // "relation already exists".
    let db = Database::new();
    let a = host(&db.url());
    a.rotate("sig").status(0);
    db.sql("DELETE FROM keyrotate_schema");
    let out = a.cmd().arg("status").status(3);
    assert!(
        out.stdout.contains("sig") && out.stdout.contains("records no schema version"),
        "{}",
        out.stdout
    );
    let out = a.rotate("sig").arg("--force").status(3);
    assert!(out.stdout.contains("records no schema version"), "{}", out.stdout);
    assert!(!out.stdout.contains("already exists"), "{}", out.stdout);
    assert_eq!(db.sql("SELECT count(*) FROM rotations"), "1", "a row was added");

    // A DBA's lock held past the statement timeout (LOCK TABLE, VACUUM FULL).
    // Every migration records its row.
    let migrations = migration_count();
    db.sql(&format!(
        "INSERT INTO keyrotate_schema (version) SELECT generate_series(1, {migrations})"
    ));
    let mut holder = locker(&db);
    holder
        .batch_execute("BEGIN; LOCK TABLE rotations IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let start = Instant::now();
    let out = a.cmd().arg("status").status(3);
    assert!(
        out.stdout.contains("sig") && out.stdout.contains("timeout"),
        "{}",
        out.stdout
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    holder.batch_execute("COMMIT").unwrap();
    a.cmd().arg("status").status(0);
}

/// A session of the admin role on `db`, to hold locks.
fn locker(db: &Database) -> postgres::Client {
    postgres::Client::connect(
        &format!(
            "host=127.0.0.1 user={ADMIN_USER} password={ADMIN_PASSWORD} dbname={}",
            db.0
        ),
        postgres::NoTls,
    )
    .unwrap()
}

#[test]
fn a_role_with_only_select_insert_update_runs_everything_after_migrate() {
    need_postgres!();
    // Declared first, dropped last: a role with grants on a database outlives it.
    let app_password = "app-only-password";
    let app = Role::new(app_password, "");
    let db = Database::new();
    let owner = host(&db.url());
    // The owner migrates; a second migrate has nothing to do.
    let latest = migration_count();
    let out = owner.cmd().arg("migrate").status(0);
    assert!(
        out.stdout.contains("MIGRATED") && out.stdout.contains(&format!("0 -> {latest}")),
        "{}",
        out.stdout
    );
    let out = owner.cmd().args(["migrate", "--output", "json"]).status(0).json();
    assert_eq!(out["migrated"], false);
    assert_eq!(out["to_version"], latest);
    grant_app(&db, &app.0);

    let a = host(&db.url_as(&app.0, app_password));
    a.rotate("sig").args(["--run-id", "LP-1"]).status(0);
    a.cmd().arg("status").status(0);
    a.cmd().arg("history").status(0);
    a.cmd().arg("check").status(0);
    a.rotate("sig").arg("--dry-run").status(7);
    // Blocked, then resolved, as that role.
    std::fs::write(a.key_dir("sig").join("keyring.json"), "{").unwrap();
    a.rotate("sig").args(["--force", "--run-id", "LP-BAD"]).status(4);
    a.cmd().arg("status").status(4);
    a.cmd()
        .args(["resolve", "--domain", "sig", "--run", "LP-BAD", "--note", "checked"])
        .status(0);
    assert_eq!(
        db.sql("SELECT state FROM rotations WHERE run_id = 'LP-BAD'"),
        "resolved"
    );
    // The app role never changed the schema.
    assert_eq!(db.sql("SELECT count(*) FROM keyrotate_schema"), latest.to_string());

    // A database the owner has not migrated: one line saying what to run.
    let fresh = Database::new();
    fresh.sql(&format!("GRANT CONNECT ON DATABASE {} TO {}", fresh.0, app.0));
    let b = host(&fresh.url_as(&app.0, app_password));
    let out = b.rotate("sig").status(3);
    assert!(
        out.stdout.contains("keyrotate migrate") && out.stdout.contains("owns the tables"),
        "{}",
        out.stdout
    );
    let out = b.cmd().arg("migrate").status(3);
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    // The embedded ledger migrates the same way.
    let local = Env::new();
    let out = local.cmd().arg("migrate").status(0);
    assert!(out.stdout.contains("MIGRATED"), "{}", out.stdout);
    assert!(local.path("state/ledger.sqlite3").exists());
    let out = local.cmd().arg("migrate").status(0);
    assert!(out.stdout.contains("CURRENT"), "{}", out.stdout);
}

#[test]
fn of_two_concurrent_resolves_exactly_one_succeeds() {
    need_postgres!();
    let db = Database::new();
    let a = host(&db.url());
    a.rotate("sig").status(0);
    std::fs::write(a.key_dir("sig").join("keyring.json"), "{").unwrap();
    a.rotate("sig").args(["--force", "--run-id", "TWICE"]).status(4);
    // Hold both resolves inside their transactions until both have read the row.
    let mut holder = locker(&db);
    holder
        .batch_execute("BEGIN; LOCK TABLE rotation_events IN EXCLUSIVE MODE")
        .unwrap();
    let children: Vec<_> = ["one", "two"]
        .iter()
        .map(|who| {
            a.cmd()
                .args([
                    "resolve",
                    "--domain",
                    "sig",
                    "--run",
                    "TWICE",
                    "--note",
                    "checked",
                    "--operator",
                    who,
                ])
                .spawn()
        })
        .collect();
    let start = Instant::now();
    while db.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'keyrotate' \
         AND wait_event_type = 'Lock'",
        db.0
    )) != "2"
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the resolves never both waited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    holder.batch_execute("COMMIT").unwrap();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let codes: Vec<i32> = outs.iter().map(|o| o.status.code().unwrap_or(-1)).collect();
    let text: Vec<String> = outs
        .iter()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .collect();
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 2], "{text:?}");
    let loser = &text[codes.iter().position(|c| *c == 2).unwrap()];
    assert!(loser.contains("already resolved"), "{loser}");
    let resolved_lines = audit_text(&a).lines().filter(|l| l.contains("review.resolved")).count();
    assert_eq!(resolved_lines, 1, "{}", audit_text(&a));
    assert_eq!(
        db.sql("SELECT count(*) FROM rotation_events WHERE run_id = 'TWICE' AND phase = 'resolved'"),
        "1"
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn a_run_whose_closing_write_fails_exits_as_the_next_run_will_see_it() {
    need_postgres!();
    let db = Database::new();
    for env in [Env::new(), host(&db.url())] {
        let out = env
            .rotate("sig")
            .args(["--run-id", "UNCLOSED"])
            .env("KEYROTATE_FAILPOINTS", "ledger.close=error")
            .status(4);
        assert!(out.stdout.contains("stays in flight"), "{}", out.stdout);
        let audit = env.audit();
        let last = audit.last().unwrap();
        assert_eq!(last["run_id"], "UNCLOSED");
        assert_eq!(last["exit_code"], 4);
        // The next run sees what this one said.
        let next = env.rotate("sig").arg("--force").status(4);
        assert!(next.stdout.contains("UNCLOSED"), "{}", next.stdout);
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn busy_at_the_connection_limit_says_it_has_no_ledger_row() {
    need_postgres!();
    let app = Role::new("limit-password", "CONNECTION LIMIT 1");
    let db = Database::new();
    host(&db.url()).cmd().arg("migrate").status(0);
    grant_app(&db, &app.0);
    let a = host(&db.url_as(&app.0, "limit-password"));
    let log = a.path("steps.log");
    let holder = a
        .rotate("sig")
        .args(["--run-id", "HOLDER"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "stage.create=sleep(2500)")
        .spawn();
    crate::common::wait_for_step(&log, "stage.create");
    let out = a.rotate("sig").args(["--run-id", "NO-ROW"]).status(5);
    assert!(out.stdout.contains("HOLDER"), "{}", out.stdout);
    assert_eq!(holder.wait_with_output().unwrap().status.code(), Some(0));
    assert_eq!(db.sql("SELECT count(*) FROM rotations WHERE run_id = 'NO-ROW'"), "0");
    let audit = a.audit();
    let line = audit.iter().find(|l| l["run_id"] == "NO-ROW").expect("an audit line");
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.contains("no ledger row") && reason.contains("too many connections"),
        "{reason}"
    );
}

#[test]
fn sslmode_is_ignored_on_a_unix_socket_as_libpq_does() {
    need_postgres!();
    let socket = std::path::Path::new("/var/run/postgresql/.s.PGSQL.5432");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !socket.exists() || !root {
        eprintln!(
            "SKIPPED {}: needs the server's socket in /var/run/postgresql and root (peer authentication as role root)",
            module_path!()
        );
        return;
    }
    let db = Database::new();
    admin(
        "postgres",
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'root') THEN CREATE ROLE root LOGIN; END IF; END $$",
    );
    grant_create(&db, "root");
    for mode in ["require", "verify-full", "prefer", "disable"] {
        let env = host(&format!(
            "postgres://root@%2Fvar%2Frun%2Fpostgresql/{}?sslmode={mode}",
            db.0
        ));
        let out = env.rotate("sig").arg("--force").output();
        assert_eq!(out.code, 0, "sslmode={mode}: {}{}", out.stdout, out.stderr);
    }
}

/// The schema version this keyrotate migrates to: one per migration file.
fn migration_count() -> usize {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ledger/migrations/postgres"))
        .unwrap()
        .count()
}
