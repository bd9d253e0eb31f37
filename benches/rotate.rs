//! Whole-process benchmarks of `keyrotate`, compared in the same run with the shell
//! script a user would otherwise write (`baseline-rotate.sh`: bash + flock + openssl +
//! sqlite3 + jq) and with the machine's floor for the durable writes a rotation needs.
//!
//!     cargo bench --bench rotate                       # everything
//!     cargo bench --bench rotate -- --baseline PATH    # the shell peer to compare with
//!     cargo bench --bench rotate -- --quick            # fewer runs, smaller ledger
//!
//! Each figure is the median of interleaved runs (A B A B …), so drift in the
//! machine's speed hits both sides alike; ratios are computed pair by pair.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEYROTATE: &str = env!("CARGO_BIN_EXE_keyrotate");

struct Sample {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    code: i32,
}

/// Runs a command to completion and reads its own resource usage with wait4 (which
/// also reaps it: clippy cannot see that).
#[allow(clippy::zombie_processes)]
fn run(cmd: &mut Command) -> Sample {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: rusage is a plain C struct, valid all-zero.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid and ours.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let wall = start.elapsed();
    let tv = |t: libc::timeval| Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64);
    Sample {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
        code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn write_config(dir: &Path, domains: &[String]) -> PathBuf {
    let mut text = String::from("[state]\ndir = \"state\"\n[host]\npool = \"p\"\n[defaults]\ndesignated_pool = \"p\"\nbackend = \"keystore\"\nkeystore = \"keys\"\nalgorithm = \"ed25519\"\nmin_interval = \"0s\"\nretain = 3\n");
    for d in domains {
        text.push_str(&format!("[domains.{d}]\n"));
    }
    let path = dir.join("rotate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn rotate(config: &Path, domain: &str) -> Command {
    let mut c = Command::new(KEYROTATE);
    c.arg("--config")
        .arg(config)
        .args(["-q", "rotate", "--domain", domain, "--deadline", "1m", "--force"]);
    c
}

fn find_baseline(args: &[String]) -> Option<PathBuf> {
    if let Some(i) = args.iter().position(|a| a == "--baseline") {
        return args.get(i + 1).map(PathBuf::from);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        here.join("../shared/bench/baseline-rotate.sh"),
        here.join("shared/bench/baseline-rotate.sh"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// The machine's floor for what a rotation must make durable: the same sequence of
/// file operations and fsyncs a rotation does, with none of the logic, in the same
/// file system. Returns the median time of the sequence and its fsync count.
fn durable_floor(dir: &Path, n: usize) -> (f64, usize) {
    use std::io::Write;
    let dir = dir.join("floor");
    std::fs::create_dir_all(&dir).unwrap();
    let sync_dir = || std::fs::File::open(&dir).unwrap().sync_all().unwrap();
    let atomic = |name: &str, sync: bool| {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(&[b'x'; 600]).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
        if sync {
            sync_dir();
        }
    };
    let append = |name: &str| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join(name))
            .unwrap();
        f.write_all(&[b'y'; 300]).unwrap();
        f.sync_data().unwrap();
    };
    let mut times = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        append("ledger-wal"); // admitted
        let mut key = std::fs::File::create(dir.join(format!("v{i:06}.pem"))).unwrap();
        key.write_all(&[b'k'; 119]).unwrap();
        key.sync_all().unwrap(); // staged key
        atomic("jwks.json", true); // published
        atomic("keyring.json", true); // commit
        let _ = std::fs::remove_file(dir.join(".current.tmp"));
        std::os::unix::fs::symlink(format!("v{i:06}.pem"), dir.join(".current.tmp")).unwrap();
        std::fs::rename(dir.join(".current.tmp"), dir.join("current.pem")).unwrap();
        if i > 0 {
            std::fs::remove_file(dir.join(format!("v{:06}.pem", i - 1))).unwrap();
        }
        atomic("jwks.json", false);
        sync_dir(); // tidy-up
        append("ledger-wal"); // closed
        append("audit.jsonl"); // last audit line
        times.push(ms(start.elapsed()));
    }
    (median(times), 10)
}

#[allow(clippy::zombie_processes)] // children are reaped with wait4
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` from tooling
    }
    let quick = args.iter().any(|a| a == "--quick");
    let runs = if quick { 11 } else { 31 };
    let work = tempfile::Builder::new().prefix("keyrotate-bench").tempdir().unwrap();
    let dir = work.path();
    println!(
        "keyrotate benchmarks ({} cores, {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { "quick" } else { "full" }
    );

    // 1. one ed25519 rotation vs the shell peer, interleaved
    let config = write_config(dir, &["bench".to_string()]);
    run(&mut rotate(&config, "bench")); // warm-up: creates folders and ledger
    let baseline = find_baseline(&args);
    let peer_state = dir.join("peer");
    let mut ours = Vec::new();
    let mut ours_cpu = Vec::new();
    let mut peer = Vec::new();
    let mut ratios = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let a = run(&mut rotate(&config, "bench"));
        assert_eq!(a.code, 0, "keyrotate rotate failed");
        ours.push(ms(a.wall));
        ours_cpu.push(ms(a.cpu));
        rss.push(a.max_rss_kib as f64);
        if let Some(b) = &baseline {
            let s = run(Command::new("bash").arg(b).arg(&peer_state).arg("bench"));
            assert_eq!(
                s.code, 0,
                "the baseline script failed (needs flock, openssl, sqlite3, jq)"
            );
            peer.push(ms(s.wall));
            ratios.push(ms(s.wall) / ms(a.wall));
        }
    }
    let ours_med = median(ours.clone());
    println!("\nrotation, ed25519, immediate, whole process ({runs} runs, medians)");
    println!(
        "  keyrotate rotate        {:8.2} ms wall  {:6.2} ms cpu  peak RSS {:.0} KiB",
        ours_med,
        median(ours_cpu),
        median(rss)
    );
    if baseline.is_some() {
        println!("  baseline-rotate.sh      {:8.2} ms wall", median(peer));
        println!(
            "  speed-up (peer/ours)    {:8.1}x  (median of pairwise ratios)",
            median(ratios)
        );
    } else {
        println!("  baseline-rotate.sh not found: pass --baseline PATH");
    }

    // 2. the floor: what keyrotate's own durable writes cost on this file system with no
    //    logic, and what starting this binary costs (`--version` does nothing else)
    let (floor, fsyncs) = durable_floor(dir, runs);
    let start = median(
        (0..runs)
            .map(|_| ms(run(Command::new(KEYROTATE).arg("--version")).wall))
            .collect(),
    );
    println!("\nfloor: the same {fsyncs} fsyncs and file operations with no logic (same file system, same run)");
    println!(
        "  fsync floor             {floor:8.2} ms; keyrotate / floor = {:.2}x",
        ours_med / floor
    );
    println!(
        "  process start           {start:8.2} ms; keyrotate / (start + floor) = {:.2}x",
        ours_med / (start + floor)
    );

    // 3. key generation per algorithm, in process
    println!("\nkey generation + self-test per algorithm (in process, median)");
    for alg in keyrotate::keystore::Algorithm::ALL {
        let n = if alg.name().starts_with("rsa") {
            if quick {
                3
            } else {
                9
            }
        } else {
            runs
        };
        let times: Vec<f64> = (0..n)
            .map(|_| {
                let start = Instant::now();
                let k = alg.generate().unwrap();
                std::hint::black_box(k.fingerprint());
                ms(start.elapsed())
            })
            .collect();
        println!("  {:12} {:9.3} ms  (n={n})", alg.name(), median(times));
    }

    // 4. contention: 50 concurrent rotations of one domain
    let storm = dir.join("storm");
    std::fs::create_dir(&storm).unwrap();
    let mut text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("min_interval = \"0s\"", "min_interval = \"1h\"");
    text = text.replace("[domains.bench]", "[domains.storm]");
    std::fs::write(storm.join("rotate.toml"), text).unwrap();
    let start = Instant::now();
    let children: Vec<_> = (0..50)
        .map(|_| {
            Command::new(KEYROTATE)
                .arg("--config")
                .arg(storm.join("rotate.toml"))
                .args(["-q", "rotate", "--domain", "storm", "--deadline", "1m"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut codes = std::collections::BTreeMap::new();
    let mut cpu = Duration::ZERO;
    for c in children {
        let mut status = 0;
        // SAFETY: rusage is a plain C struct, valid all-zero.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; `status` and `usage` are valid and ours.
        unsafe { libc::wait4(c.id() as i32, &mut status, 0, &mut usage) };
        let tv = |t: libc::timeval| Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64);
        cpu += tv(usage.ru_utime) + tv(usage.ru_stime);
        *codes.entry(libc::WEXITSTATUS(status)).or_insert(0) += 1;
    }
    println!("\ncontention: 50 concurrent `rotate` of one domain");
    println!(
        "  exit codes {codes:?} (0 ROTATED, 5 BUSY, 7 NOT_DUE); wall {:.0} ms, cpu total {:.0} ms",
        ms(start.elapsed()),
        ms(cpu)
    );
    assert_eq!(codes.get(&0), Some(&1), "exactly one run must rotate");
    assert!(codes.keys().all(|c| [0, 5, 7].contains(c)));

    // 5. scale: 1,000,000 history rows across 10,000 domains
    let (rows, domains) = if quick { (100_000, 1_000) } else { (1_000_000, 10_000) };
    let big = dir.join("big");
    std::fs::create_dir(&big).unwrap();
    let names: Vec<String> = (0..domains).map(|i| format!("d{i:05}")).collect();
    let big_config = write_config(&big, &names);
    run(&mut rotate(&big_config, "d00000")); // creates the ledger with its schema
    let empty: Vec<f64> = (0..runs)
        .map(|_| ms(run(&mut rotate(&big_config, "d00001")).wall))
        .collect();
    let fill = Instant::now();
    {
        let conn = rusqlite::Connection::open(big.join("state/ledger.sqlite3")).unwrap();
        conn.execute_batch("PRAGMA synchronous=OFF; BEGIN").unwrap();
        let mut stmt = conn
            .prepare(
                "INSERT INTO rotations (run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool, started_at, deadline_at, ended_at, from_version, to_version) \
                 VALUES (?1, ?2, 'succeeded', 0, 'synthetic history', 'scheduled', 'bench', 'h', 1, 'p', ?3, ?3, ?3, 1, 2)",
            )
            .unwrap();
        for i in 0..rows {
            let at = format!("2025-{:02}-{:02}T00:00:{:02}.000Z", 1 + i % 12, 1 + i % 28, i % 60);
            stmt.execute(rusqlite::params![format!("hist-{i}"), names[i % domains], at])
                .unwrap();
        }
        drop(stmt);
        conn.execute_batch("COMMIT").unwrap();
    }
    let full: Vec<f64> = (0..runs)
        .map(|_| ms(run(&mut rotate(&big_config, "d00002")).wall))
        .collect();
    let status_one: Vec<f64> = (0..runs)
        .map(|_| {
            ms(run(Command::new(KEYROTATE)
                .arg("--config")
                .arg(&big_config)
                .args(["status", "--domain", "d00003"]))
            .wall)
        })
        .collect();
    let status_all = run(Command::new(KEYROTATE)
        .arg("--config")
        .arg(&big_config)
        .args(["status", "--output", "json"]));
    println!(
        "\nscale: {rows} history rows across {domains} domains (filled in {:.1} s)",
        fill.elapsed().as_secs_f64()
    );
    println!("  rotate, empty ledger    {:8.2} ms", median(empty.clone()));
    println!(
        "  rotate, full ledger     {:8.2} ms  ({:.2}x)",
        median(full.clone()),
        median(full) / median(empty)
    );
    println!("  status --domain         {:8.2} ms", median(status_one));
    println!(
        "  status (all {domains})  {:8.2} ms, exit {}",
        ms(status_all.wall),
        status_all.code
    );

    // 6. fsyncs per steady-state rotation, by file, as the kernel saw them
    fsyncs_per_rotation(dir);
}

/// Counts fsync/fdatasync calls of whole rotations with `strace -f -y` (which names the
/// file of each descriptor), so a change that adds a flush to a rotation shows here.
/// The audit hash chain reads the tail of the file it appends to: its only flush is the
/// closing line's fdatasync, which predates the chain.
fn fsyncs_per_rotation(dir: &Path) {
    if Command::new("strace").arg("-V").output().is_err() {
        println!(
            "
fsyncs per rotation: SKIPPED (strace not installed)"
        );
        return;
    }
    let work = dir.join("fsyncs");
    std::fs::create_dir_all(&work).unwrap();
    let config = write_config(&work, &["counted".to_string()]);
    // Past `retain`, every rotation also destroys the oldest version: steady state.
    for _ in 0..5 {
        run(&mut rotate(&config, "counted"));
    }
    let mut totals = Vec::new();
    let mut audit = Vec::new();
    for i in 0..5 {
        let log = work.join(format!("strace-{i}.log"));
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-y", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&log)
            .arg(KEYROTATE)
            .arg("--config")
            .arg(&config)
            .args(["-q", "rotate", "--domain", "counted", "--deadline", "1m", "--force"]);
        assert_eq!(run(&mut cmd).code, 0, "rotation under strace failed");
        let text = std::fs::read_to_string(&log).unwrap();
        let calls: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
            .collect();
        totals.push(calls.len() as f64);
        audit.push(calls.iter().filter(|l| l.contains("audit.jsonl")).count() as f64);
    }
    println!(
        "
fsyncs per rotation (strace -f, 5 steady-state rotations, median)"
    );
    println!("  fsync + fdatasync       {:8.0}", median(totals));
    println!(
        "  of which on audit.jsonl {:8.0}  (the closing line; the hash chain adds none)",
        median(audit)
    );
}
