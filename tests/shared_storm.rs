//! A storm on the shared key store (DESIGN 9): four simulated hosts (two in the
//! designated pool-a, one each in pool-b and pool-c; own configs, names, state and key
//! folders; one database) start, in every round, a rotation of two domains and a sync
//! each, all released at the same instant (they wait in a shell loop for one file).
//! The rotation holds its lock over a second longer than usual (a 600 ms failpoint
//! sleep at each keyring read: its preflight and its own-copy sync), so every rotation
//! of a round overlaps the others even on a loaded machine.
//!
//! Per round: at most one rotation per domain commits,
//! the epoch grows by the number of commits, the others are BUSY, NOT_DESIGNATED or —
//! for `sess` (prepublish) — refused by the convergence gate; every sync is 0 or BUSY
//! (a rotation or sync on its host holds the key store);
//! every host's copy verifies and is exactly one committed keyring, and its
//! acknowledgement never claims a newer epoch than its copy holds. After a final sync every copy is byte-identical and current.
//!
//! Needs PostgreSQL (see `common::pg`) and the failpoints build; says SKIPPED where
//! PostgreSQL is not installed.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::pg::{server, Database};
use crate::common::shared::{copy_of, db_ring, epoch, host, sync, verify_copy};
use crate::common::Env;

macro_rules! need_postgres {
    () => {
        if !server() {
            eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
            return;
        }
    };
}

const ROUNDS: usize = 6;
const DOMAINS: [&str; 2] = ["sess", "mac"];

struct Launched {
    host: usize,
    /// `Some(domain)` for a rotation, `None` for a sync of every domain.
    rotate: Option<&'static str>,
    child: std::process::Child,
}

/// The epoch whose committed keyring the host's copy of `domain` is (0: no copy).
#[track_caller]
fn copy_epoch(env: &Env, domain: &str, rings: &BTreeMap<(String, i64), String>, context: &str) -> i64 {
    if !env.key_dir(domain).join("keyring.json").exists() {
        return 0;
    }
    let copy = verify_copy(env, domain, context);
    rings
        .iter()
        .find(|((d, _), ring)| d == domain && **ring == copy)
        .map(|((_, e), _)| *e)
        .unwrap_or_else(|| panic!("{context}: the copy of {domain} is no committed keyring: {copy}\n{rings:?}"))
}

#[test]
fn a_storm_of_rotations_and_syncs_from_four_hosts_commits_at_most_one_rotation_per_round() {
    need_postgres!();
    let db = Database::new();
    let req = ["pool-a", "pool-b", "pool-c"];
    let names = ["host-a1", "host-a2", "host-b", "host-c"];
    let pools = ["pool-a", "pool-a", "pool-b", "pool-c"];
    let hosts: Vec<Env> = names.iter().zip(pools).map(|(n, p)| host(&db, n, p, &req)).collect();
    // The schema first, so that the first round's processes race only over the keys.
    hosts[0].cmd().arg("migrate").status(0);
    let barrier = tempfile::tempdir().unwrap();
    // Every committed keyring by (domain, epoch): with at most one commit per round,
    // every epoch is seen.
    let mut rings: BTreeMap<(String, i64), String> =
        DOMAINS.iter().map(|d| ((d.to_string(), 0), String::new())).collect();
    let mut commits: BTreeMap<&str, usize> = BTreeMap::new();
    let mut gated = 0;
    for round in 0..ROUNDS {
        let go = barrier.path().join(format!("go{round}"));
        let wait = format!("while [ ! -e '{}' ]; do sleep 0.01; done", go.display());
        let before: Vec<i64> = DOMAINS.iter().map(|d| epoch(&db, d)).collect();
        let mut launched = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            for d in DOMAINS {
                let child = h
                    .rotate(d)
                    .args(["--run-id", &format!("R{round}-{}-{d}", names[i])])
                    .env("KEYROTATE_FAILPOINTS", "ledger.shared_read=sleep(600)")
                    .shell_prefix(&wait)
                    .spawn();
                launched.push(Launched {
                    host: i,
                    rotate: Some(d),
                    child,
                });
            }
            // Syncs start before, during or after the round's commit, varying by host
            // and round, so the next round's gate sees both current and lagging hosts.
            let delay = format!("{wait}; sleep {}", ((round + i) % 3) as f64 * 0.6);
            launched.push(Launched {
                host: i,
                rotate: None,
                child: sync(h, None).shell_prefix(&delay).spawn(),
            });
        }
        // Every process waits at the barrier; release them together.
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&go, "").unwrap();
        let mut round_commits: BTreeMap<&str, usize> = BTreeMap::new();
        for l in launched {
            let out = l.child.wait_with_output().unwrap();
            let code = out.status.code().unwrap_or(-1);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let context = format!(
                "round {round}, {} {:?}: exit {code}\n{stdout}{}",
                names[l.host],
                l.rotate,
                String::from_utf8_lossy(&out.stderr)
            );
            match l.rotate {
                Some(d) => match code {
                    0 => *round_commits.entry(d).or_default() += 1,
                    5 => assert!(pools[l.host] == "pool-a", "{context}"),
                    6 => assert!(pools[l.host] != "pool-a", "{context}"),
                    3 => {
                        assert!(d == "sess" && stdout.contains("convergence gate"), "{context}");
                        gated += 1;
                    }
                    _ => panic!("{context}"),
                },
                None => assert!(code == 0 || code == 5, "{context}"),
            }
        }
        for (d, e0) in DOMAINS.iter().zip(before) {
            let n = round_commits.get(d).copied().unwrap_or(0);
            let e = epoch(&db, d);
            assert!(n <= 1, "round {round}: {n} rotations of {d} committed");
            assert_eq!(
                e - e0,
                n as i64,
                "round {round}: {d}: epoch {e0} -> {e} for {n} commits"
            );
            rings.insert((d.to_string(), e), db_ring(&db, d));
            *commits.entry(d).or_default() += n;
        }
        // Every copy verifies, is one committed keyring, and is acknowledged for no
        // more than it holds.
        for (i, h) in hosts.iter().enumerate() {
            for d in DOMAINS {
                let context = format!("round {round}, {} {d}", names[i]);
                let held = copy_epoch(h, d, &rings, &context);
                let acked: i64 = db
                    .sql(&format!(
                        "SELECT coalesce((SELECT epoch FROM shared_sync_acks WHERE domain = '{d}' AND host = '{}'), 0)",
                        names[i]
                    ))
                    .parse()
                    .unwrap();
                assert!(
                    acked <= held,
                    "{context}: acknowledged epoch {acked}, holds epoch {held}"
                );
            }
        }
        // Every other round ends with every host synced, so the next one can promote.
        if round % 2 == 0 {
            for h in &hosts {
                sync(h, None).status(0);
            }
        }
    }
    // (A rotation is also BUSY when its own host's sync holds the domain's key store.)
    for d in DOMAINS {
        assert!(
            commits[d] >= 2,
            "{d} committed only {} times in {ROUNDS} rounds",
            commits[d]
        );
    }
    for h in &hosts {
        sync(h, None).status(0);
    }
    for d in DOMAINS {
        let reference = copy_of(&hosts[0], d);
        for (i, h) in hosts.iter().enumerate() {
            let context = format!("final, {} {d}", names[i]);
            assert_eq!(verify_copy(h, d, &context), db_ring(&db, d), "{context}");
            assert_eq!(copy_of(h, d), reference, "{context}: not byte-identical to host-a1's");
        }
        assert_eq!(
            db.sql(&format!(
                "SELECT count(*) FROM shared_sync_acks WHERE domain = '{d}' AND epoch = {}",
                epoch(&db, d)
            )),
            "4",
            "{d}: every host acknowledged the final epoch"
        );
    }
    assert_eq!(
        db.sql("SELECT count(*) FROM rotations WHERE exit_code IS NULL"),
        "0",
        "a rotation row was left open"
    );
    eprintln!("storm: {ROUNDS} rounds, commits {commits:?}, {gated} sess rotations held by the convergence gate");
}
