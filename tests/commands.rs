//! `status`, `history`, `check`, JSON outputs, stderr log formats and the Control-M
//! example job definitions.

use crate::common::Env;

#[test]
fn status_reports_versions_last_run_and_due_and_exits_4_when_blocked() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "S1"]).status(0);
    env.rotate("sig").args(["--run-id", "S2", "--force"]).status(0);
    let out = env.cmd().args(["status", "--output", "json"]).status(0);
    let v = out.json();
    let domains = v["domains"].as_array().unwrap();
    assert_eq!(domains.len(), 9);
    let sig = domains.iter().find(|d| d["domain"] == "sig").unwrap();
    for field in [
        "domain",
        "backend",
        "algorithm",
        "primary",
        "pending",
        "retired",
        "last_run",
        "next_due",
        "blocked_by",
        "in_flight",
    ] {
        assert!(sig.get(field).is_some(), "status lacks {field}: {sig}");
    }
    assert_eq!(sig["primary"], 2);
    assert_eq!(sig["retired"], serde_json::json!([1]));
    assert_eq!(sig["last_run"]["run_id"], "S2");
    assert_eq!(sig["last_run"]["outcome"], "ROTATED");
    assert!(sig["next_due"].as_str().unwrap().starts_with("20"));
    let mac = domains.iter().find(|d| d["domain"] == "mac").unwrap();
    assert_eq!(
        (mac["primary"].is_null(), mac["next_due"].as_str()),
        (true, Some("now"))
    );

    let text = env.cmd().arg("status").status(0).stdout;
    let header = text.lines().next().unwrap();
    for col in ["DOMAIN", "ACTIVE", "PENDING", "LAST RUN", "NEXT DUE", "STATE"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("sig ") && l.contains("v2") && l.contains("S2 ROTATED")),
        "{text}"
    );

    std::fs::write(env.key_dir("sig").join("keyring.json"), "garbage").unwrap();
    env.rotate("sig").args(["--force", "--run-id", "S3"]).status(4);
    let v = env
        .cmd()
        .args(["status", "--domain", "sig", "--output", "json"])
        .status(4)
        .json();
    assert_eq!(v["domains"][0]["blocked_by"], "S3");
    assert!(env
        .cmd()
        .args(["status", "--domain", "sig"])
        .status(4)
        .stdout
        .contains("BLOCKED by S3"));
    // other domains are not blocked
    env.cmd().args(["status", "--domain", "p256"]).status(0);
    env.cmd().args(["status", "--domain", "nosuch"]).status(2);
}

#[test]
fn status_and_history_create_nothing() {
    let env = Env::new();
    env.cmd().arg("status").status(0);
    env.cmd().arg("history").status(0);
    env.cmd().arg("check").status(0);
    assert!(env.snapshot().is_empty(), "{}", env.listing());
}

#[test]
fn history_is_newest_first_with_limit_and_since() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "H1"]).status(0);
    env.rotate("sig").args(["--run-id", "H2"]).status(7);
    env.rotate("p256").args(["--run-id", "H3"]).status(0);
    let runs = env.cmd().args(["history", "--output", "json"]).status(0).json()["runs"]
        .as_array()
        .unwrap()
        .clone();
    let ids: Vec<&str> = runs.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["H3", "H2", "H1"]);
    for col in [
        "id",
        "run_id",
        "domain",
        "state",
        "exit_code",
        "reason",
        "trigger",
        "operator",
        "host",
        "pid",
        "pool",
        "started_at",
        "deadline_at",
        "ended_at",
        "from_version",
        "to_version",
        "forced",
        "resolved_by",
        "resolved_at",
        "resolution",
    ] {
        assert!(runs[0].get(col).is_some(), "history lacks {col}");
    }
    let sig = env
        .cmd()
        .args(["history", "--domain", "sig", "--limit", "1", "--output", "json"])
        .status(0)
        .json();
    assert_eq!(sig["runs"].as_array().unwrap().len(), 1);
    assert_eq!(sig["runs"][0]["run_id"], "H2");
    let future = env
        .cmd()
        .args(["history", "--since", "2999-01-01T00:00:00Z", "--output", "json"])
        .status(0)
        .json();
    assert!(future["runs"].as_array().unwrap().is_empty());
    let recent = env
        .cmd()
        .args(["history", "--since", "1h", "--output", "json"])
        .status(0)
        .json();
    assert_eq!(recent["runs"].as_array().unwrap().len(), 3);
    let text = env.cmd().arg("history").status(0).stdout;
    assert!(
        text.lines().next().unwrap().contains("RUN") && text.contains("H1"),
        "{text}"
    );
    for bad in [
        vec!["--limit", "0"],
        vec!["--limit", "-3"],
        vec!["--limit", "x"],
        vec!["--since", "yesterday-ish"],
        vec!["--domain", "nosuch"],
    ] {
        let out = env.cmd().arg("history").args(&bad).status(2);
        assert_eq!(out.stderr.lines().count(), 1, "{bad:?}: {}", out.stderr);
    }
}

#[test]
fn check_lists_every_problem_with_its_key() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.cmd().arg("check").status(0);
    std::fs::set_permissions(env.path("keys"), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::write(env.key_dir("sig").join("keyring.json"), "{").unwrap();
    let out = env.cmd().arg("check").status(2);
    let problems: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("problem:")).collect();
    assert!(problems.len() >= 9, "{}", out.stdout);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("domains.sig.keystore") && p.contains("writable by group")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("domains.elsewhere: this host (pool pool-a) is not designated"),
        "{}",
        out.stdout
    );
    std::fs::set_permissions(env.path("keys"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = env.cmd().args(["check", "--domain", "sig"]).status(2);
    assert!(
        out.stdout.contains("domains.sig.keystore: inconsistent key store"),
        "{}",
        out.stdout
    );
    env.cmd().args(["check", "--domain", "p256"]).status(0);
    env.cmd().args(["check", "--domain", "nosuch"]).status(2);
}

#[test]
fn json_logs_on_stderr_are_one_object_per_line() {
    let env = Env::new();
    let out = env
        .cmd()
        .args(["--log-format", "json", "rotate", "--domain", "sig", "--deadline", "1m"])
        .status(0);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some() && v.get("timestamp").is_some(), "{l}");
    }
    let quiet = env
        .cmd()
        .args(["-q", "rotate", "--domain", "p256", "--deadline", "1m"])
        .status(0);
    assert!(quiet.stderr.is_empty(), "{}", quiet.stderr);
}

#[test]
fn controlm_examples_map_every_outcome() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/controlm");
    let mut all_agents = false;
    let mut monitor = false;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for folder in v.as_object().unwrap().values() {
            for job in folder
                .as_object()
                .unwrap()
                .values()
                .filter(|j| j["Type"] == "Job:Command")
            {
                let command = job["Command"].as_str().unwrap();
                let codes: Vec<&str> = job
                    .as_object()
                    .unwrap()
                    .values()
                    .filter(|b| b["Type"] == "If:CompletionStatus")
                    .map(|b| b["CompletionStatus"].as_str().unwrap())
                    .collect();
                if command.contains(" rotate ") {
                    assert!(
                        command.contains("--run-id %%ORDERID-%%RUNCOUNT") && command.contains("--deadline"),
                        "{command}"
                    );
                    for code in ["2", "3", "4", "5", "6", "7", "8", "101", "137"] {
                        assert!(
                            codes.contains(&code),
                            "{}: no If:CompletionStatus for {code}",
                            path.display()
                        );
                    }
                    all_agents |= job["RunOnAllAgentsInGroup"] == true;
                } else if command.contains(" sync ") {
                    // A shared store's sync (see controlm_flow): every failure is NOTOK.
                    assert!(command.contains("--deadline"), "{command}");
                    for code in ["2", "3", "5", "8"] {
                        assert!(
                            codes.contains(&code),
                            "{}: no If:CompletionStatus for {code}",
                            path.display()
                        );
                    }
                } else {
                    assert!(command.ends_with(" status"), "{command}");
                    // 4: a domain is blocked; 3: a store or the ledger is broken.
                    for code in ["3", "4"] {
                        assert!(
                            codes.contains(&code),
                            "{}: no If:CompletionStatus for {code}",
                            path.display()
                        );
                    }
                    monitor = true;
                }
            }
        }
    }
    assert!(all_agents && monitor);
}
