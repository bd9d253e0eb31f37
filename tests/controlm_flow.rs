//! The Control-M examples against the real CLI, and the shared store's flow
//! (`examples/controlm/shared-store-flow.json`) played through on three simulated hosts.
//!
//! Every `Job:Command` of every example runs a subcommand that exists with flags that
//! subcommand accepts (its `--help`). The shared-store flow is then scheduled as
//! Control-M would: a job starts when every event it waits for exists; a
//! `RunOnAllAgentsInGroup` job runs on every host and ends OK only when every copy did;
//! a job that ends OK adds and deletes its events. Three weekly orders must each end
//! with every job OK and every host holding the same verified keyring; an order in which
//! one host's sync fails never starts the rotation, and rotations forced anyway are
//! refused by the convergence gate, naming that host, once they would promote a key it
//! does not hold.
//!
//! The flow part needs PostgreSQL (see `common::pg`); it says SKIPPED where none is
//! installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::pg::{server, Database};
use crate::common::shared::{copy_of, db_ring, verify_copy, write_kek};
use crate::common::{bin, Env};

fn examples() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/controlm");
    let mut out: Vec<(PathBuf, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every `Job:Command` of a definition file, by name.
fn jobs(v: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for folder in v.as_object().unwrap().values() {
        for (name, job) in folder.as_object().unwrap() {
            if job["Type"] == "Job:Command" {
                out.insert(name.clone(), job.clone());
            }
        }
    }
    out
}

/// The events of a job's `WaitForEvents`/`AddEvents`/`DeleteEvents` block.
fn events(job: &Value, kind: &str) -> Vec<String> {
    job.as_object()
        .unwrap()
        .values()
        .filter(|b| b["Type"] == kind)
        .flat_map(|b| b["Events"].as_array().unwrap().iter())
        .map(|e| e["Event"].as_str().unwrap().to_string())
        .collect()
}

/// The exit codes a job's `If:CompletionStatus` blocks turn into OK.
fn ok_codes(job: &Value) -> BTreeSet<i32> {
    let mut ok: BTreeSet<i32> = [0].into();
    for b in job.as_object().unwrap().values() {
        if b["Type"] == "If:CompletionStatus" && b.as_object().unwrap().values().any(|a| a["Type"] == "Action:SetToOK")
        {
            ok.insert(b["CompletionStatus"].as_str().unwrap().parse().unwrap());
        }
    }
    ok
}

#[test]
fn every_example_job_runs_a_subcommand_and_flags_that_exist() {
    let mut checked = 0;
    for (path, v) in examples() {
        for (name, job) in jobs(&v) {
            let command = job["Command"].as_str().unwrap();
            let words: Vec<&str> = command.split_whitespace().collect();
            assert!(
                words[0].ends_with("/keyrotate"),
                "{}: {name}: {command}",
                path.display()
            );
            // The first word that is neither a global option nor its value.
            let mut i = 1;
            while words[i].starts_with('-') {
                i += if words[i].contains('=') { 1 } else { 2 };
            }
            let sub = words[i];
            let help = std::process::Command::new(bin())
                .args([sub, "--help"])
                .output()
                .unwrap();
            assert!(
                help.status.success(),
                "{}: {name}: `{sub}` is no keyrotate subcommand",
                path.display()
            );
            let help = String::from_utf8_lossy(&help.stdout).into_owned();
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    help.contains(flag),
                    "{}: {name}: `{sub}` has no {flag}:\n{help}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} jobs");
}

const FLOW: &str = "shared-store-flow.json";

fn flow() -> BTreeMap<String, Value> {
    let (_, v) = examples()
        .into_iter()
        .find(|(p, _)| p.ends_with(FLOW))
        .expect("the shared store's flow example");
    jobs(&v)
}

#[test]
fn the_shared_store_flow_syncs_every_agent_before_and_after_the_rotation() {
    let jobs = flow();
    let (syncs, rotations): (Vec<_>, Vec<_>) = jobs
        .iter()
        .partition(|(_, j)| j["Command"].as_str().unwrap().contains(" sync "));
    assert_eq!((syncs.len(), rotations.len()), (2, 1), "{jobs:?}");
    let (_, rotate) = rotations[0];
    for (name, s) in &syncs {
        assert_eq!(s["RunOnAllAgentsInGroup"], true, "{name}: must run on every agent");
    }
    // One sync adds what the rotation waits for; the other waits for the rotation.
    let waits = events(rotate, "WaitForEvents");
    assert!(!waits.is_empty());
    assert!(syncs
        .iter()
        .any(|(_, s)| waits.iter().all(|e| events(s, "AddEvents").contains(e))));
    let added = events(rotate, "AddEvents");
    assert!(syncs
        .iter()
        .any(|(_, s)| !events(s, "WaitForEvents").is_empty()
            && events(s, "WaitForEvents").iter().all(|e| added.contains(e))));
    // Consumed events: next week's rotation needs next week's sync.
    assert_eq!(events(rotate, "DeleteEvents"), waits);
}

/// One simulated host for the flow: `session-signing` as in the examples.
fn flow_host(db: &Database, name: &str, pool: &str) -> Env {
    let env = Env::with_config(&format!(
        r#"
[state]
dir = "state"
ledger = "{url}"
[host]
name = "{name}"
pool = "{pool}"
[domains.session-signing]
designated_pool = "pool-a"
backend = "keystore"
algorithm = "ed25519"
store = "shared"
keystore = "keys"
kek = "file:kek"
activation = "prepublish"
require_pools = ["pool-a", "pool-b", "pool-c"]
sync_ttl = "7d"
min_interval = "0s"
max_deadline = "1h"
"#,
        url = db.url()
    ));
    write_kek(&env, &crate::common::shared::KEK);
    env
}

/// Runs a job's command on `env` as its agent would: the binary and config of this
/// test, the order id for `%%ORDERID-%%RUNCOUNT`.
fn run_on(env: &Env, command: &str, order: &str) -> (i32, String) {
    let mut words: Vec<String> = command.split_whitespace().map(String::from).collect();
    let at = words.iter().position(|w| w == "--config").unwrap();
    words[at + 1] = env.config_path().display().to_string();
    for w in &mut words {
        *w = w.replace("%%ORDERID-%%RUNCOUNT", order);
    }
    let mut c = std::process::Command::new(bin());
    c.args(&words[1..]).current_dir(env.dir.path()).env("USER", "tester");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KEYROTATE_") {
            c.env_remove(k);
        }
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// One order of the flow: every job runs once its events exist; returns each job's
/// verdict (`Some(true)` OK, `Some(false)` NOTOK, `None` never started) and the outputs.
fn order(
    jobs: &BTreeMap<String, Value>,
    hosts: &[(&str, &Env)],
    events_now: &mut BTreeSet<String>,
    id: &str,
) -> (BTreeMap<String, Option<bool>>, String) {
    let mut verdict: BTreeMap<String, Option<bool>> = jobs.keys().map(|k| (k.clone(), None)).collect();
    let mut log = String::new();
    while let Some((name, job)) = jobs
        .iter()
        .find(|(n, j)| verdict[*n].is_none() && events(j, "WaitForEvents").iter().all(|e| events_now.contains(e)))
    {
        let agents: Vec<&(&str, &Env)> = if job["RunOnAllAgentsInGroup"] == true {
            hosts.iter().collect()
        } else {
            // The designated pool's host group.
            assert_eq!(job["Host"], "keyrotate-pool-a", "{name}");
            hosts.iter().filter(|(p, _)| *p == "pool-a").collect()
        };
        let ok = ok_codes(job);
        let mut all_ok = true;
        for (pool, env) in agents {
            let (code, out) = run_on(env, job["Command"].as_str().unwrap(), id);
            log.push_str(&format!("{id} {name} on {pool}: exit {code}\n{out}"));
            all_ok &= ok.contains(&code);
        }
        verdict.insert(name.clone(), Some(all_ok));
        if all_ok {
            events_now.extend(events(job, "AddEvents"));
            for e in events(job, "DeleteEvents") {
                events_now.remove(&e);
            }
        }
    }
    (verdict, log)
}

#[test]
fn the_shared_store_flow_played_on_three_hosts_converges_every_week() {
    if !server() {
        eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
        return;
    }
    let jobs = flow();
    let db = Database::new();
    let a = flow_host(&db, "app-a-01", "pool-a");
    let b = flow_host(&db, "app-b-01", "pool-b");
    let c = flow_host(&db, "app-c-01", "pool-c");
    let hosts = [("pool-a", &a), ("pool-b", &b), ("pool-c", &c)];
    let domain = "session-signing";
    let mut events_now = BTreeSet::new();
    for week in 1..=3 {
        let (verdict, log) = order(&jobs, &hosts, &mut events_now, &format!("W{week}"));
        assert!(
            verdict.values().all(|v| *v == Some(true)),
            "week {week}: {verdict:?}\n{log}"
        );
        let reference = copy_of(&a, domain);
        for (pool, h) in &hosts {
            let context = format!("week {week}, {pool}");
            assert_eq!(verify_copy(h, domain, &context), db_ring(&db, domain), "{context}");
            assert_eq!(copy_of(h, domain), reference, "{context}");
        }
        // Week 1 prepares v1 (active) and v2 (pending); every later week promotes.
        assert_eq!(a.manifest(domain)["primary"], week, "week {week}");
        assert!(events_now.is_empty(), "week {week}: events left {events_now:?}");
    }

    // Week 4: host-c's KEK is wrong, so its sync fails: the rotation never starts.
    let good = std::fs::read(c.path("kek")).unwrap();
    write_kek(&c, b"this is not the KEK of the fleet");
    let before = db_ring(&db, domain);
    let (verdict, log) = order(&jobs, &hosts, &mut events_now, "W4");
    let sync_before = jobs
        .iter()
        .find(|(_, j)| events(j, "WaitForEvents").is_empty())
        .map(|(n, _)| n.clone())
        .unwrap();
    assert_eq!(verdict[&sync_before], Some(false), "{log}");
    assert!(
        verdict
            .iter()
            .filter(|(n, _)| **n != sync_before)
            .all(|(_, v)| v.is_none()),
        "{verdict:?}\n{log}"
    );
    assert_eq!(db_ring(&db, domain), before);
    // Forced by hand anyway, the rotation goes through: host-c cannot sync, but it
    // already holds the pending key being promoted (last week's sync), so it verifies
    // what the new key signs. The rotation after that would promote a key host-c never
    // got: the convergence gate refuses it, naming host-c, and changes nothing.
    let (_, rotate) = jobs
        .iter()
        .find(|(_, j)| j["Command"].as_str().unwrap().contains(" rotate "))
        .unwrap();
    let (code, out) = run_on(&a, rotate["Command"].as_str().unwrap(), "W4-forced");
    assert_eq!(code, 0, "{out}");
    let (_, sync_job) = jobs.iter().find(|(n, _)| **n == sync_before).unwrap();
    assert_eq!(run_on(&b, sync_job["Command"].as_str().unwrap(), "W4-b").0, 0);
    assert_eq!(run_on(&c, sync_job["Command"].as_str().unwrap(), "W4-c").0, 3);
    let before = db_ring(&db, domain);
    let (code, out) = run_on(&a, rotate["Command"].as_str().unwrap(), "W4-forced-again");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("app-c-01") && out.contains("convergence gate"), "{out}");
    assert!(!out.contains("app-b-01 ("), "host-b holds the pending key: {out}");
    assert_eq!(db_ring(&db, domain), before);
    // With its KEK back, the next order goes through.
    write_kek(&c, &good);
    let (verdict, log) = order(&jobs, &hosts, &mut events_now, "W5");
    assert!(verdict.values().all(|v| *v == Some(true)), "{verdict:?}\n{log}");
    assert_eq!(a.manifest(domain)["primary"], 5);
}
