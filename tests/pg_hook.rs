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
