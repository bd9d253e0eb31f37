//! The example PostgreSQL hook (`examples/hooks/rotate-pg-role`) against a real
//! server. `.ci/run` starts the machine's PostgreSQL and exports `KEYROTATE_TEST_PG=1`
//! with libpq variables for an admin role; elsewhere the test says SKIPPED and returns.

use std::process::Command;

use crate::common::{mode, Env};

fn psql_as(user: &str, password: &str, sql: &str) -> Result<String, String> {
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
            "postgres",
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

fn admin(sql: &str) {
    let out = Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn rotates_a_real_postgresql_role_password() {
    if std::env::var_os("KEYROTATE_TEST_PG").is_none() {
        eprintln!("SKIPPED rotates_a_real_postgresql_role_password: KEYROTATE_TEST_PG is not set (.ci/run starts PostgreSQL and sets it)");
        return;
    }
    let role = format!("kr_test_{}", std::process::id());
    admin(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'old-password-1'"
    ));
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
    // libpq variables (PGHOST, PGUSER, PGPASSWORD…) come from the CI environment; the
    // hook's relative --secret-file resolves against the job's working folder.
    let run = |id: &str| env.rotate("db").args(["--run-id", id]).status(0);
    let first = run("PG-1");
    let pw1 = std::fs::read_to_string(env.path("secret/db-password")).unwrap();
    assert!(pw1.len() >= 40);
    assert_eq!(mode(&env.path("secret/db-password")), 0o600);
    assert_eq!(psql_as(&role, &pw1, "SELECT 1").unwrap(), "1");
    assert!(
        psql_as(&role, "old-password-1", "SELECT 1").is_err(),
        "the old password still works"
    );

    let second = run("PG-2");
    let pw2 = std::fs::read_to_string(env.path("secret/db-password")).unwrap();
    assert_ne!(pw1, pw2);
    assert_eq!(
        std::fs::read_to_string(env.path("secret/db-password.previous")).unwrap(),
        pw1
    );
    assert_eq!(psql_as(&role, &pw2, "SELECT 1").unwrap(), "1");

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
    admin(&format!("DROP ROLE {role}"));
}
