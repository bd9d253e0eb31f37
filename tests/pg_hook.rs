//! The example PostgreSQL hook (`examples/hooks/rotate-pg-role`) against a real
//! server (see `common::pg` for how the server is found or started).

use crate::common::pg::{admin, admin_env, psql_as, server};
use crate::common::{mode, Env};

#[test]
fn rotates_a_real_postgresql_role_password() {
    if !server() {
        eprintln!("SKIPPED rotates_a_real_postgresql_role_password: PostgreSQL is not installed");
        return;
    }
    let role = format!("kr_test_{}", std::process::id());
    admin(
        "postgres",
        &format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'old-password-1'"),
    );
    let hook = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hooks/rotate-pg-role");
    let env = Env::with_config(&format!(
        r#"
[state]
dir = "state"
[host]
pool = "p"
[domains.db]
designated_pool = "p"
backend = "command"
command = ["{}", "--role", "{role}", "--secret-file", "secret/db-password", "--test-host", "127.0.0.1"]
min_interval = "0s"
"#,
        hook.display()
    ));
    std::fs::create_dir(env.path("secret")).unwrap();
    // The hook's admin session uses libpq variables, as a job's environment would set
    // them; its relative --secret-file resolves against the job's working folder.
    let run = |id: &str| {
        let mut r = env.rotate("db").args(["--run-id", id]);
        for (k, v) in admin_env() {
            r = r.env(k, v);
        }
        r.status(0)
    };
    let first = run("PG-1");
    let pw1 = std::fs::read_to_string(env.path("secret/db-password")).unwrap();
    assert!(pw1.len() >= 40);
    assert_eq!(mode(&env.path("secret/db-password")), 0o600);
    assert_eq!(psql_as("postgres", &role, &pw1, "SELECT 1").unwrap(), "1");
    assert!(
        psql_as("postgres", &role, "old-password-1", "SELECT 1").is_err(),
        "the old password still works"
    );

    let second = run("PG-2");
    let pw2 = std::fs::read_to_string(env.path("secret/db-password")).unwrap();
    assert_ne!(pw1, pw2);
    assert_eq!(
        std::fs::read_to_string(env.path("secret/db-password.previous")).unwrap(),
        pw1
    );
    assert_eq!(psql_as("postgres", &role, &pw2, "SELECT 1").unwrap(), "1");

    // The password never reaches keyrotate's output, ledger or audit trail.
    let ledger = std::fs::read(env.path("state/ledger.sqlite3")).unwrap();
    let audit = std::fs::read_to_string(env.path("state/audit.jsonl")).unwrap();
    for pw in [&pw1, &pw2] {
        for (what, text) in [
            ("stdout", &first.stdout),
            ("stderr", &first.stderr),
            ("stdout", &second.stdout),
            ("stderr", &second.stderr),
            ("audit", &audit),
        ] {
            assert!(!text.contains(pw.as_str()), "the password leaked into {what}");
        }
        assert!(
            !ledger.windows(pw.len()).any(|w| w == pw.as_bytes()),
            "the password leaked into the ledger"
        );
    }
    admin("postgres", &format!("DROP ROLE {role}"));
}

/// The hook's path in this checkout.
fn hook_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hooks/rotate-pg-role")
}

/// A config running `command` (a TOML array body) for domain `db`, on `ledger` (a
/// `ledger = "…"` line, or empty for SQLite).
fn hook_env(command: &str, ledger: &str) -> Env {
    Env::with_config(&format!(
        r#"
[state]
dir = "state"
{ledger}
[host]
pool = "p"
[domains.db]
designated_pool = "p"
backend = "command"
command = [{command}]
min_interval = "0s"
"#
    ))
}

/// Runs `env`'s domain with the admin's libpq variables, as a job would.
fn run_hook(env: &Env, code: i32) -> crate::common::Out {
    let mut r = env.rotate("db");
    for (k, v) in admin_env() {
        r = r.env(k, v);
    }
    r.status(code)
}

#[test]
fn create_refuses_what_would_fail_after_the_commit_point() {
    if !server() {
        eprintln!("SKIPPED create_refuses_what_would_fail_after_the_commit_point: PostgreSQL is not installed");
        return;
    }
    let role = format!("kr_hookchk_{}", std::process::id());
    admin(
        "postgres",
        &format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'old-password-2'"),
    );
    let hook = hook_path();
    for (args, needle) in [
        (
            format!(r#""--role", "{role}_missing", "--secret-file", "secret/pw""#),
            "does not exist",
        ),
        (
            format!(r#""--role", "{role}", "--secret-file", "no-such-folder/pw""#),
            "no-such-folder",
        ),
        (
            format!(r#""--role", "{role}", "--secret-file", "secret/pw", "--test-host", "/var/run/postgresql""#),
            "Unix socket",
        ),
    ] {
        let env = hook_env(&format!(r#""{}", {args}"#, hook.display()), "");
        std::fs::create_dir(env.path("secret")).unwrap();
        let out = run_hook(&env, 3);
        assert!(
            out.stdout.contains(needle) || out.stderr.contains(needle),
            "{args}: {}{}",
            out.stdout,
            out.stderr
        );
        assert!(out.stdout.contains("create"), "{}", out.stdout);
        // Nothing changed: the old password still works, no secret was installed.
        assert_eq!(psql_as("postgres", &role, "old-password-2", "SELECT 1").unwrap(), "1");
        assert!(!env.path("secret/pw").exists());
        assert_eq!(env.last_row()["state"], "aborted");
    }
    // An admin session without CREATEROLE may not change the password: said in create.
    let plain = format!("{role}_plain");
    admin(
        "postgres",
        &format!("DROP ROLE IF EXISTS {plain}; CREATE ROLE {plain} LOGIN PASSWORD 'plain-pw'"),
    );
    let env = hook_env(
        &format!(
            r#""{}", "--role", "{role}", "--secret-file", "secret/pw""#,
            hook.display()
        ),
        "",
    );
    std::fs::create_dir(env.path("secret")).unwrap();
    let mut r = env.rotate("db");
    for (k, v) in [
        ("PGHOST", "127.0.0.1"),
        ("PGUSER", plain.as_str()),
        ("PGPASSWORD", "plain-pw"),
        ("PGDATABASE", "postgres"),
    ] {
        r = r.env(k, v);
    }
    let out = r.status(3);
    assert!(out.stderr.contains("may not change the password"), "{}", out.stderr);
    assert_eq!(psql_as("postgres", &role, "old-password-2", "SELECT 1").unwrap(), "1");
    admin("postgres", &format!("DROP ROLE {plain}; DROP ROLE {role}"));
}

#[test]
fn on_a_shared_ledger_a_secret_file_only_this_host_reads_is_refused() {
    if !server() {
        eprintln!(
            "SKIPPED on_a_shared_ledger_a_secret_file_only_this_host_reads_is_refused: PostgreSQL is not installed"
        );
        return;
    }
    let db = format!("kr_hookdb_{}", std::process::id());
    let role = format!("kr_hookpool_{}", std::process::id());
    admin(
        "postgres",
        &format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'old-password-3'"),
    );
    admin("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
    admin("postgres", &format!("CREATE DATABASE {db}"));
    let ledger = format!(
        r#"ledger = "postgres://{}:{}@127.0.0.1/{db}""#,
        crate::common::pg::ADMIN_USER,
        crate::common::pg::ADMIN_PASSWORD
    );
    let hook = hook_path();
    let base = format!(
        r#""{}", "--role", "{role}", "--secret-file", "secret/pw", "--test-host", "127.0.0.1""#,
        hook.display()
    );
    let env = hook_env(&base, &ledger);
    std::fs::create_dir(env.path("secret")).unwrap();
    let out = run_hook(&env, 3);
    assert!(
        out.stderr.contains("local file system") && out.stderr.contains("--one-host"),
        "{}",
        out.stderr
    );
    assert_eq!(psql_as("postgres", &role, "old-password-3", "SELECT 1").unwrap(), "1");
    assert!(!env.path("secret/pw").exists());
    // Declared: the role's applications run on this host only.
    let env = hook_env(&format!(r#"{base}, "--one-host""#), &ledger);
    std::fs::create_dir(env.path("secret")).unwrap();
    run_hook(&env, 0);
    let pw = std::fs::read_to_string(env.path("secret/pw")).unwrap();
    assert_eq!(psql_as("postgres", &role, &pw, "SELECT 1").unwrap(), "1");
    admin("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    admin("postgres", &format!("DROP ROLE {role}"));
}

/// Runs SQL as the cluster's superuser (root only): for grants a test needs and the
/// admin role cannot give.
fn as_superuser(sql: &str) -> Result<(), String> {
    let out = std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-qX",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .current_dir("/")
        .env_remove("PGHOST")
        .env_remove("PGUSER")
        .env_remove("PGPASSWORD")
        .env_remove("PGDATABASE")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_failed_alter_role_keeps_the_verifier_out_of_the_server_log() {
    let log = std::path::Path::new("/var/log/postgresql/postgresql-15-main.log");
    // SAFETY: geteuid has no preconditions.
    if !server() || unsafe { libc::geteuid() } != 0 || std::fs::metadata(log).is_err() {
        eprintln!(
            "SKIPPED a_failed_alter_role_keeps_the_verifier_out_of_the_server_log: needs root, PostgreSQL and its log at {}",
            log.display()
        );
        return;
    }
    let pid = std::process::id();
    let (hook_admin, victim) = (format!("kr_hookadm_{pid}"), format!("kr_victim_{pid}"));
    admin(
        "postgres",
        &format!(
            "DROP ROLE IF EXISTS {victim}; DROP ROLE IF EXISTS {hook_admin}; \
             CREATE ROLE {hook_admin} LOGIN CREATEROLE PASSWORD 'hook-admin-pw'; \
             CREATE ROLE {victim} LOGIN PASSWORD 'old-password-4'"
        ),
    );
    as_superuser(&format!(
        "GRANT SET ON PARAMETER log_statement, log_min_error_statement TO {hook_admin}"
    ))
    .unwrap();
    // ALTER ROLE fails after create's checks passed: the role is gone by `set`.
    let env = Env::new();
    let wrapper = env.path("wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$KEYROTATE_STEP\" = set ]; then psql -qX -c 'DROP ROLE {victim}' >/dev/null || exit 9; fi\nexec '{}' \"$@\"\n",
            hook_path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = hook_env(
        &format!(
            r#""{}", "--role", "{victim}", "--secret-file", "secret/pw", "--test-host", "127.0.0.1""#,
            wrapper.display()
        ),
        "",
    );
    std::fs::create_dir(env.path("secret")).unwrap();
    let before = std::fs::metadata(log).unwrap().len();
    let mut r = env.rotate("db");
    for (k, v) in [
        ("PGHOST", "127.0.0.1"),
        ("PGUSER", hook_admin.as_str()),
        ("PGPASSWORD", "hook-admin-pw"),
        ("PGDATABASE", "postgres"),
    ] {
        r = r.env(k, v);
    }
    let out = r.status(4);
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    let text = std::fs::read(log).unwrap();
    let appended = String::from_utf8_lossy(&text[before as usize..]);
    assert!(
        appended.contains(&victim),
        "the failure was not logged at all: {appended}"
    );
    assert!(
        !appended.contains("SCRAM-SHA-256$"),
        "the verifier reached the server log: {appended}"
    );
    as_superuser(&format!(
        "REVOKE SET ON PARAMETER log_statement, log_min_error_statement FROM {hook_admin}"
    ))
    .unwrap();
    admin(
        "postgres",
        &format!("DROP ROLE IF EXISTS {victim}; DROP ROLE {hook_admin}"),
    );
}
