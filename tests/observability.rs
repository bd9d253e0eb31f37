//! Observability and audit integrity (DESIGN section 12): the Prometheus textfile and
//! `status --output prometheus`, the audit hash chain and `audit verify`, shell
//! completions and the man page.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{mode, Env, DEFAULT_CONFIG};

const METRICS: &str = "\n[metrics]\ntextfile = \"prom/keyrotate.prom\"\n";

fn metrics_env() -> Env {
    let env = Env::with_config(&format!("{DEFAULT_CONFIG}{METRICS}"));
    std::fs::create_dir(env.path("prom")).unwrap();
    env
}

fn textfile(env: &Env) -> PathBuf {
    env.path("prom/keyrotate.prom")
}

/// The value of one sample line, e.g. `keyrotate_domain_blocked{domain="sig"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
}

pub fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        println!("SKIPPED: promtool not installed (Debian package prometheus); the metrics were not linted");
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_textfile_appears_after_a_rotation_0644_atomic_and_promtool_clean() {
    let env = metrics_env();
    assert!(!textfile(&env).exists());
    // Whatever the umask, node_exporter (another user) must be able to read it.
    env.rotate("sig").shell_prefix("umask 077").status(0);
    let path = textfile(&env);
    assert_eq!(mode(&path), 0o644, "{}", env.listing());
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        sample(&first, "keyrotate_active_version{domain=\"sig\"}"),
        Some(1.0),
        "{first}"
    );
    assert_eq!(
        sample(&first, "keyrotate_last_exit_code{domain=\"sig\"}"),
        Some(0.0),
        "{first}"
    );
    assert_eq!(
        sample(&first, "keyrotate_domain_blocked{domain=\"sig\"}"),
        Some(0.0),
        "{first}"
    );
    assert_eq!(
        sample(&first, "keyrotate_versions{domain=\"sig\",state=\"active\"}"),
        Some(1.0),
        "{first}"
    );
    let now = chrono::Utc::now().timestamp() as f64;
    let success = sample(&first, "keyrotate_last_success_timestamp_seconds{domain=\"sig\"}").unwrap();
    assert!((now - success).abs() < 120.0, "{first}");
    // min_interval is 1h in this config.
    let due = sample(&first, "keyrotate_next_due_timestamp_seconds{domain=\"sig\"}").unwrap();
    assert!((due - success - 3600.0).abs() < 2.0, "{first}");
    // A domain that never rotated: due since forever, no active version.
    assert_eq!(
        sample(&first, "keyrotate_next_due_timestamp_seconds{domain=\"p256\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&first, "keyrotate_active_version{domain=\"p256\"}"), None);
    promtool_check(&first);

    // Replaced by rename (a new inode), never rewritten in place; no temporary left.
    let inode = std::fs::metadata(&path).unwrap().ino();
    env.rotate("sig").arg("--force").status(0);
    let second = std::fs::read_to_string(&path).unwrap();
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
    assert_eq!(sample(&second, "keyrotate_active_version{domain=\"sig\"}"), Some(2.0));
    assert_eq!(
        sample(&second, "keyrotate_versions{domain=\"sig\",state=\"retired\"}"),
        Some(1.0)
    );
    let names: Vec<String> = std::fs::read_dir(env.path("prom"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["keyrotate.prom"]);

    // A reader polling the file while commands rewrite it only ever sees whole files.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.ends_with("# EOF\n"), "a partial textfile was read:\n{text}");
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..5 {
        env.cmd().arg("status").status(0);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);
}

#[test]
fn status_prints_the_same_metrics_and_a_blocked_domain_reads_1() {
    let env = metrics_env();
    env.rotate("sig").status(0);
    env.rotate("mac").status(0);
    // A corrupt manifest: the next rotation records needs_review and blocks the domain.
    std::fs::write(env.key_dir("sig").join("keyring.json"), "{ not json").unwrap();
    env.rotate("sig").args(["--force", "--run-id", "BLOCKER-1"]).status(4);
    let text = std::fs::read_to_string(textfile(&env)).unwrap();
    assert_eq!(
        sample(&text, "keyrotate_domain_blocked{domain=\"sig\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyrotate_last_exit_code{domain=\"sig\"}"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyrotate_domain_blocked{domain=\"mac\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyrotate_domain_problems{domain=\"sig\"}"),
        Some(1.0),
        "{text}"
    );

    // status exits 4 (blocked) and prints the exposition; the textfile is rewritten too.
    let out = env.cmd().args(["status", "--output", "prometheus"]).status(4);
    assert_eq!(
        sample(&out.stdout, "keyrotate_domain_blocked{domain=\"sig\"}"),
        Some(1.0),
        "{}",
        out.stdout
    );
    let strip_age = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("keyrotate_active_key_age_seconds"))
            .map(|l| {
                // The versions family comes out in no fixed order.
                l.to_string()
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let file = std::fs::read_to_string(textfile(&env)).unwrap();
    assert_eq!(strip_age(&out.stdout), strip_age(&file));
    promtool_check(&out.stdout);

    // resolve unblocks, and the textfile says so at once.
    std::fs::remove_file(env.key_dir("sig").join("keyring.json")).unwrap();
    env.resolve("sig", "BLOCKER-1", "restored from backup").status(0);
    let text = std::fs::read_to_string(textfile(&env)).unwrap();
    assert_eq!(
        sample(&text, "keyrotate_domain_blocked{domain=\"sig\"}"),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn metrics_are_not_written_by_a_dry_run_and_a_missing_folder_never_changes_the_outcome() {
    let env = Env::with_config(&format!("{DEFAULT_CONFIG}{METRICS}"));
    std::fs::create_dir(env.path("prom")).unwrap();
    env.rotate("sig").arg("--dry-run").status(0);
    assert!(!textfile(&env).exists());
    std::fs::remove_dir(env.path("prom")).unwrap();
    let out = env.rotate("sig").status(0);
    assert!(out.stderr.contains("metrics textfile"), "{}", out.stderr);
    assert_eq!(env.last_row()["state"], "succeeded");
}

#[test]
fn a_metrics_textfile_not_named_prom_is_a_usage_error() {
    let env = Env::with_config(&format!("{DEFAULT_CONFIG}\n[metrics]\ntextfile = \"keyrotate.txt\"\n"));
    let out = env.cmd().arg("status").status(2);
    assert!(
        out.stderr.contains("metrics.textfile") && out.stderr.contains(".prom"),
        "{}",
        out.stderr
    );
}

// ---- the audit hash chain -------------------------------------------------------

fn audit_path(env: &Env) -> PathBuf {
    env.path("state/audit.jsonl")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn sha256_hex(s: &str) -> String {
    keyrotate::audit::line_hash(s.as_bytes())
}

fn verify(env: &Env, code: i32) -> Value {
    env.cmd()
        .args(["audit", "verify", "--output", "json"])
        .status(code)
        .json()
}

/// Three rotations and a BUSY-free refusal: a trail of several runs.
fn trail() -> Env {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("sig").status(7);
    env.rotate("sig").arg("--force").status(0);
    env.rotate("mac").status(0);
    env
}

#[test]
fn every_line_carries_seq_and_prev_and_verify_accepts_an_intact_trail() {
    let env = trail();
    let lines = lines(&audit_path(&env));
    let mut prev = "0".repeat(64);
    for (i, l) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["seq"], i as u64 + 1, "{l}");
        assert_eq!(v["prev"], prev.as_str(), "{l}");
        prev = sha256_hex(l);
    }
    // Each run that reached its closing write anchored its last line in the ledger.
    let anchored: Vec<Value> = env.rows().into_iter().filter(|r| !r["audit_seq"].is_null()).collect();
    assert!(anchored.len() >= 3, "{anchored:?}");
    for r in &anchored {
        let seq = r["audit_seq"].as_u64().unwrap();
        let line = &lines[seq as usize - 1];
        assert_eq!(r["audit_hash"], sha256_hex(line).as_str());
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["run_id"], r["run_id"], "the anchor is the run's own last line");
        assert!(v["exit_code"].is_number(), "{line}");
    }
    let v = verify(&env, 0);
    assert_eq!(v["intact"], true);
    assert_eq!(v["lines"], lines.len());
    assert_eq!(v["anchors_checked"], anchored.len());
    let text = env.cmd().args(["audit", "verify"]).status(0);
    assert!(text.stdout.starts_with("INTACT"), "{}", text.stdout);
}

#[test]
fn verify_exits_4_on_an_edited_a_deleted_a_swapped_line_and_a_cut_tail() {
    let env = trail();
    let path = audit_path(&env);
    let good = lines(&path);
    assert!(good.len() >= 8, "{good:?}");

    // An edited line (its seq and prev intact): named by its number.
    let mut edited = good.clone();
    edited[2] = edited[2].replace("\"domain\":\"sig\"", "\"domain\":\"xxx\"");
    assert_ne!(edited[2], good[2]);
    write_lines(&path, &edited);
    let v = verify(&env, 4);
    assert_eq!(v["first_bad"]["line"], 3, "{v}");
    assert!(v["first_bad"]["reason"].as_str().unwrap().contains("altered"), "{v}");
    let text = env.cmd().args(["audit", "verify"]).status(4);
    assert!(text.stdout.contains("audit.jsonl:3"), "{}", text.stdout);

    // A deleted line.
    let mut deleted = good.clone();
    deleted.remove(4);
    write_lines(&path, &deleted);
    let v = verify(&env, 4);
    assert_eq!(v["first_bad"]["line"], 5, "{v}");
    assert!(v["first_bad"]["reason"].as_str().unwrap().contains("removed"), "{v}");

    // A swapped pair.
    let mut swapped = good.clone();
    swapped.swap(3, 4);
    write_lines(&path, &swapped);
    let v = verify(&env, 4);
    assert_eq!(v["first_bad"]["line"], 4, "{v}");

    // The last line cut: only the ledger's anchor can tell.
    write_lines(&path, &good[..good.len() - 1]);
    let v = verify(&env, 4);
    assert!(
        v["first_bad"]["reason"]
            .as_str()
            .unwrap()
            .contains("removed from its end"),
        "{v}"
    );
    assert_eq!(v["first_bad"]["seq"], good.len());

    // The whole last run's lines cut.
    write_lines(&path, &good[..good.len() - 3]);
    verify(&env, 4);

    // The first line deleted.
    write_lines(&path, &good[1..]);
    verify(&env, 4);

    // Restored: intact again.
    write_lines(&path, &good);
    verify(&env, 0);
}

#[test]
fn verify_exits_3_when_the_trail_cannot_be_read() {
    let env = trail();
    let path = audit_path(&env);
    std::fs::rename(&path, env.path("elsewhere.jsonl")).unwrap();
    std::os::unix::fs::symlink(env.path("elsewhere.jsonl"), &path).unwrap();
    let out = env.cmd().args(["audit", "verify"]).status(3);
    assert!(out.stderr.contains("audit.jsonl"), "{}", out.stderr);
}

#[test]
fn the_chain_continues_across_a_rotated_audit_file() {
    let env = Env::new();
    env.rotate("sig").status(0);
    env.rotate("mac").status(0);
    let path = audit_path(&env);
    let old = lines(&path);
    // logrotate with `create`: the file moves to .1, an empty one takes its place.
    std::fs::rename(&path, env.path("state/audit.jsonl.1")).unwrap();
    std::fs::write(&path, "").unwrap();
    env.rotate("aes").status(0);
    let new = lines(&path);
    let first: Value = serde_json::from_str(&new[0]).unwrap();
    assert_eq!(first["seq"], old.len() as u64 + 1);
    assert_eq!(first["prev"], sha256_hex(old.last().unwrap()).as_str());
    let v = verify(&env, 0);
    assert_eq!(v["files"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["lines"], old.len() + new.len());

    // A second rotation, without `create` this time (keyrotate creates the file).
    std::fs::rename(env.path("state/audit.jsonl.1"), env.path("state/audit.jsonl.2")).unwrap();
    std::fs::rename(&path, env.path("state/audit.jsonl.1")).unwrap();
    env.rotate("p256").status(0);
    assert_eq!(verify(&env, 0)["files"].as_array().unwrap().len(), 3);

    // An edit in a rotated file breaks the chain at that file's line.
    let one = env.path("state/audit.jsonl.1");
    let kept = lines(&one);
    let mut edited = kept.clone();
    edited[0] = edited[0].replace("\"domain\":\"aes\"", "\"domain\":\"zzz\"");
    assert_ne!(edited, kept);
    write_lines(&one, &edited);
    let v = verify(&env, 4);
    assert!(
        v["first_bad"]["file"].as_str().unwrap().ends_with("audit.jsonl.1"),
        "{v}"
    );
    assert_eq!(v["first_bad"]["line"], 1, "{v}");
    write_lines(&one, &kept);
    verify(&env, 0);

    // logrotate removed the oldest file: what is kept still verifies; the anchors of
    // the runs whose lines went with it are reported as older than the trail.
    std::fs::remove_file(env.path("state/audit.jsonl.2")).unwrap();
    let v = verify(&env, 0);
    assert_eq!(v["anchors_before_trail"], 2, "{v}");
    assert_eq!(v["first_seq"], old.len() as u64 + 1, "{v}");
}

#[test]
fn lines_from_before_the_chain_are_accepted_only_at_its_start() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("state")).unwrap();
    let legacy = r#"{"ts":"2026-01-01T00:00:00Z","event":"rotation.succeeded","run_id":"old","domain":"sig"}"#;
    std::fs::write(audit_path(&env), format!("{legacy}\n")).unwrap();
    std::fs::set_permissions(env.path("state"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    env.rotate("sig").status(0);
    let all = lines(&audit_path(&env));
    let first: Value = serde_json::from_str(&all[1]).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["prev"], sha256_hex(legacy).as_str());
    let v = verify(&env, 0);
    assert_eq!(v["unchained_lines"], 1);
    // The same unchained line inserted later is an insertion.
    let mut inserted = all.clone();
    inserted.insert(2, legacy.to_string());
    write_lines(&audit_path(&env), &inserted);
    assert_eq!(verify(&env, 4)["first_bad"]["line"], 3);
}

#[test]
fn concurrent_processes_keep_one_unbroken_chain() {
    let env = Env::with_config(
        r#"
[state]
dir = "state"
[host]
pool = "p"
[defaults]
designated_pool = "p"
backend = "keystore"
keystore = "keys"
min_interval = "0s"
[domains.a]
algorithm = "ed25519"
[domains.b]
algorithm = "ed25519"
[domains.c]
algorithm = "hmac-sha256"
[domains.d]
algorithm = "aes-256"
"#,
    );
    // Create the ledger first, so that every process below races for the audit file,
    // not for creating the ledger.
    env.rotate("a").status(0);
    for round in 0..2 {
        let children: Vec<_> = ["a", "b", "c", "d", "a", "b", "c", "d", "a", "b"]
            .iter()
            .enumerate()
            .map(|(i, d)| (env.rotate(d).args(["--run-id", &format!("R{round}-{i}")]).spawn(), *d))
            .collect();
        let mut busy = 0;
        for (c, d) in children {
            let out = c.wait_with_output().unwrap();
            let code = out.status.code().unwrap();
            assert!(
                code == 0 || code == 5,
                "{d}: exit {code}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            busy += usize::from(code == 5);
        }
        println!("round {round}: {busy} BUSY refusals");
    }
    let all = lines(&audit_path(&env));
    for (i, l) in all.iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["seq"], i as u64 + 1, "the chain forked or skipped at line {}", i + 1);
    }
    let v = verify(&env, 0);
    let anchored = env.rows().iter().filter(|r| !r["audit_seq"].is_null()).count();
    assert_eq!(anchored, 21, "every run (rotated or BUSY) anchors its last line");
    assert_eq!(v["anchors_checked"], anchored);
}

// ---- shell integration ----------------------------------------------------------

/// The subcommands `--help` lists (besides `help`), so a new one is checked too.
fn subcommands(env: &Env, parent: &[&str]) -> Vec<String> {
    let help = env.cmd().args(parent).arg("--help").status(0).stdout;
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn completions_and_the_man_page_cover_every_subcommand() {
    let env = Env::new();
    let top = subcommands(&env, &[]);
    for expected in [
        "rotate",
        "status",
        "history",
        "resolve",
        "check",
        "audit",
        "completions",
        "manpage",
    ] {
        assert!(top.iter().any(|c| c == expected), "--help lacks {expected}: {top:?}");
    }
    let audit = subcommands(&env, &["audit"]);
    assert_eq!(audit, ["verify"]);
    let mut all = top.clone();
    all.extend(audit);
    for shell in ["bash", "zsh", "fish"] {
        let out = env.cmd().args(["completions", shell]).status(0).stdout;
        for c in &all {
            assert!(out.contains(c.as_str()), "{shell} completion lacks {c}");
        }
        // And the flags of the subcommands, e.g. rotate's --deadline.
        assert!(out.contains("deadline"), "{shell} completion lacks --deadline");
    }
    env.cmd().args(["completions", "powershell"]).status(2);
    let man = env.cmd().arg("manpage").status(0).stdout;
    assert!(man.contains(".TH keyrotate"), "not roff:\n{man}");
    for c in &top {
        assert!(man.contains(c.as_str()), "the man page lacks {c}");
    }
    // One page per command, which the main page's SUBCOMMANDS section refers to.
    env.cmd().args(["manpage", "--dir"]).arg(env.path("man")).status(0);
    let mut pages: Vec<String> = std::fs::read_dir(env.path("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    let mut expected: Vec<String> = top.iter().map(|c| format!("keyrotate-{c}.1")).collect();
    expected.push("keyrotate-audit-verify.1".into());
    expected.push("keyrotate.1".into());
    expected.sort();
    assert_eq!(pages, expected);
    let rotate = std::fs::read_to_string(env.path("man/keyrotate-rotate.1")).unwrap();
    assert!(rotate.contains("deadline"), "{rotate}");
    // Works without any config: packaging runs it at build time.
    let out = Command::new(crate::common::bin())
        .arg("manpage")
        .env("KEYROTATE_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success());
}

// ---- Control-M examples ---------------------------------------------------------

#[test]
fn controlm_rotation_jobs_warn_before_their_deadline() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/controlm");
    let mut rotation_jobs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for folder in v.as_object().unwrap().values() {
            for job in folder
                .as_object()
                .unwrap()
                .values()
                .filter(|j| j["Type"] == "Job:Command")
            {
                let command = job["Command"].as_str().unwrap();
                if !command.contains(" rotate ") {
                    continue;
                }
                rotation_jobs += 1;
                let deadline = command
                    .split_whitespace()
                    .skip_while(|w| *w != "--deadline")
                    .nth(1)
                    .unwrap();
                let deadline_min = humantime::parse_duration(deadline).unwrap().as_secs() / 60;
                let notify = job
                    .as_object()
                    .unwrap()
                    .values()
                    .find(|b| b["Type"] == "Notify:ExecutionTime")
                    .unwrap_or_else(|| panic!("{}: no Notify:ExecutionTime", path.display()));
                assert_eq!(notify["Criteria"], "GreaterThan");
                let minutes: u64 = notify["Value"].as_str().unwrap().parse().unwrap();
                assert!(
                    minutes > 0 && minutes < deadline_min,
                    "{}: ExecutionTime {minutes} min is not below the {deadline_min} min deadline",
                    path.display()
                );
            }
        }
    }
    assert!(rotation_jobs >= 2);
}

#[test]
fn the_packaged_example_config_is_valid_with_and_without_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/rotate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = keyrotate::config::Config::parse(&text, &path).unwrap();
    assert_eq!(c.metrics_textfile, None);
    let enabled = text
        .replace("# [metrics]", "[metrics]")
        .replace("# textfile = ", "textfile = ");
    let c = keyrotate::config::Config::parse(&enabled, &path).unwrap();
    assert_eq!(
        c.metrics_textfile.as_deref(),
        Some(Path::new("/var/lib/node_exporter/textfile_collector/keyrotate.prom"))
    );
}

#[test]
fn verify_checks_the_anchors_of_a_postgresql_ledger() {
    use crate::common::pg::{admin, psql_as, server, ADMIN_PASSWORD, ADMIN_USER};
    if !server() {
        eprintln!("SKIPPED {}: PostgreSQL is not installed", module_path!());
        return;
    }
    let db = format!("kr_test_{}_obs", std::process::id());
    admin("postgres", &format!("CREATE DATABASE {db}"));
    struct DropDb(String);
    impl Drop for DropDb {
        fn drop(&mut self) {
            let _ = psql_as(
                "postgres",
                ADMIN_USER,
                ADMIN_PASSWORD,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0),
            );
        }
    }
    let _drop = DropDb(db.clone());
    let env = Env::with_config(&format!(
        "[state]\ndir = \"state\"\nledger = \"postgres://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1/{db}\"\n\
         [host]\npool = \"p\"\n[defaults]\ndesignated_pool = \"p\"\nbackend = \"keystore\"\nkeystore = \"keys\"\n\
         min_interval = \"0s\"\n[domains.sig]\nalgorithm = \"ed25519\"\n"
    ));
    env.rotate("sig").args(["--run-id", "PG-1"]).status(0);
    env.rotate("sig").args(["--run-id", "PG-2"]).status(0);
    let anchor = admin(
        &db,
        "SELECT audit_seq || ' ' || audit_hash FROM rotations WHERE run_id = 'PG-2'",
    );
    let path = audit_path(&env);
    let all = lines(&path);
    assert_eq!(anchor, format!("{} {}", all.len(), sha256_hex(all.last().unwrap())));
    assert_eq!(verify(&env, 0)["anchors_checked"], 2);
    write_lines(&path, &all[..all.len() - 1]);
    let v = verify(&env, 4);
    assert!(v["first_bad"]["reason"].as_str().unwrap().contains("PG-2"), "{v}");
}

/// A closing write that fails records no anchor; the run's last line, rewritten to say
/// NEEDS_REVIEW, still takes its place in the chain.
#[cfg(feature = "failpoints")]
#[test]
fn a_failed_closing_write_keeps_the_chain_whole_without_an_anchor() {
    let env = Env::new();
    env.rotate("sig").args(["--run-id", "FIRST"]).status(0);
    env.rotate("sig")
        .args(["--force", "--run-id", "UNCLOSED"])
        .env("KEYROTATE_FAILPOINTS", "ledger.close=error")
        .status(4);
    let all = lines(&audit_path(&env));
    let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!(
        (last["run_id"].as_str(), last["exit_code"].as_i64()),
        (Some("UNCLOSED"), Some(4))
    );
    assert_eq!(last["seq"], all.len());
    let row = env.rows().into_iter().find(|r| r["run_id"] == "UNCLOSED").unwrap();
    assert!(row["audit_seq"].is_null(), "{row}");
    assert_eq!(verify(&env, 0)["anchors_checked"], 1);
}
