//! The staging record rides in the admission transaction (issue 16): a rotation
//! records the files it will create inside the flushed transaction that admits it,
//! not in a flushed transaction of its own, and still never creates a file no record
//! names (DESIGN 4.4, the key-loss rule).

use crate::common::{wait_for_step, Env};

fn events(env: &Env, run_id: &str) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(env.path("state/ledger.sqlite3")).unwrap();
    let mut stmt = conn
        .prepare("SELECT phase, coalesce(detail, '') FROM rotation_events WHERE run_id = ?1 ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

fn staging(env: &Env, run_id: &str) -> Vec<String> {
    events(env, run_id)
        .into_iter()
        .filter(|(phase, _)| phase == "staging")
        .map(|(_, detail)| detail)
        .collect()
}

fn steps(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect()
}

#[test]
fn the_admission_records_the_files_and_no_second_write_is_made() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let log = env.path("steps.log");
    env.rotate("sig")
        .args(["--force", "--run-id", "R2"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .status(0);
    let steps = steps(&log);
    assert!(!steps.iter().any(|s| s == "ledger.staging"), "{steps:?}");
    let phases: Vec<(String, String)> = events(&env, "R2");
    assert_eq!(phases[0].0, "started", "{phases:?}");
    assert_eq!(phases[1], ("staging".into(), "v000002.pem".into()), "{phases:?}");
}

#[test]
fn a_run_killed_right_after_admission_already_has_its_files_on_record() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let out = env
        .rotate("sig")
        .args(["--force", "--run-id", "K"])
        .env("KEYROTATE_FAILPOINTS", "audit.preflight=kill")
        .output();
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert_eq!(staging(&env, "K"), ["v000002.pem"]);
    assert_eq!(env.key_files("sig"), ["v000001.pem"]);
}

#[test]
fn a_plan_that_changed_after_admission_is_recorded_again_before_any_file() {
    let env = Env::new();
    env.rotate("sig").status(0);
    let log = env.path("steps.log");
    let child = env
        .rotate("sig")
        .args(["--force", "--run-id", "MOVED"])
        .env("KEYROTATE_FAILPOINT_LOG", &log)
        .env("KEYROTATE_FAILPOINTS", "audit.preflight=sleep(1500)")
        .spawn();
    wait_for_step(&log, "audit.preflight");
    // Between admission and staging, a kid v000009 appears in jwks.json: that number
    // (and all below) is taken, so the rotation must create v000010 instead.
    let jwks_path = env.key_dir("sig").join("jwks.json");
    let mut jwks: serde_json::Value = serde_json::from_slice(&std::fs::read(&jwks_path).unwrap()).unwrap();
    let mut planted = jwks["keys"][0].clone();
    planted["kid"] = "v000009-deadbeef".into();
    jwks["keys"].as_array_mut().unwrap().push(planted);
    std::fs::write(&jwks_path, serde_json::to_vec(&jwks).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(staging(&env, "MOVED"), ["v000002.pem", "v000010.pem"]);
    let steps = steps(&log);
    let recorded = steps
        .iter()
        .position(|s| s == "ledger.staging")
        .expect("no second record");
    let created = steps.iter().position(|s| s == "stage.create").unwrap();
    assert!(recorded < created, "{steps:?}");
    assert_eq!(env.key_files("sig"), ["v000010.pem"]);
}
