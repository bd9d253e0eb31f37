//! Whole-process benchmarks of `keyrotate`, compared in the same run with the shell
//! script a user would otherwise write (`baseline-rotate.sh`: bash + flock + openssl +
//! sqlite3 + jq) and with the machine's floor for the durable writes a rotation needs.
//!
//!     cargo bench --bench rotate                       # everything
//!     cargo bench --bench rotate -- --baseline PATH    # the shell peer to compare with
//!     cargo bench --bench rotate -- --floor PATH       # the C floor program (floor.c)
//!     cargo bench --bench rotate -- --quick            # fewer runs, smaller ledger
//!     cargo bench --bench rotate -- --custody          # only pkcs11 vs file custody
//!     cargo bench --bench rotate -- --shared-only      # only the shared key store case
//!     cargo bench --bench rotate -- --static PATH      # also a faster build (README, Install)
//!
//! Beside the C floor, the bench runs itself as a "stack floor" (`stack_floor`): the
//! same 9 durable writes with the SQLite ledger and an AWS-LC key, nothing else.
//!
//! The faster build of the README's install section (`-C relocation-model=static`,
//! dynamic or static glibc: `target/x86_64-unknown-linux-gnu/release/keyrotate`) is
//! measured beside the default one when it exists (or `--static PATH` names one): same
//! rotations, same interleaving, its process start and its instructions per rotation.
//! The report says which kind of binary it measured (see `build_kind`).
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
    rotate_with(Path::new(KEYROTATE), config, domain)
}

fn rotate_with(bin: &Path, config: &Path, domain: &str) -> Command {
    let mut c = Command::new(bin);
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

/// A faster build to measure beside the default one: `--static PATH`, else the
/// README's `--target x86_64-unknown-linux-gnu` build when it is there.
fn find_static(args: &[String]) -> Option<PathBuf> {
    if let Some(i) = args.iter().position(|a| a == "--static") {
        return args.get(i + 1).map(PathBuf::from);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-gnu/release/keyrotate");
    built.exists().then_some(built)
}

/// Which kind of build `bin` is (the README's Install section lists them), read from
/// its ELF header: position-independent or not (type DYN or EXEC), and dynamically
/// linked or not (a PT_INTERP program header names the loader).
fn build_kind(bin: &Path) -> &'static str {
    let Ok(elf) = std::fs::read(bin) else {
        return "unreadable";
    };
    let u16_at = |o: usize| elf.get(o..o + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        return "not a 64-bit ELF file";
    }
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56) as usize);
    let interp = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == 3);
    match (u16_at(16), interp) {
        (2, true) => "dynamic, not position-independent",
        (2, false) => "static, not position-independent",
        (3, true) => "dynamic, position-independent (the default build)",
        (3, false) => "static-pie: relocates itself at start",
        _ => "unknown ELF type",
    }
}

fn find_floor_source(args: &[String]) -> Option<PathBuf> {
    if let Some(i) = args.iter().position(|a| a == "--floor") {
        return args.get(i + 1).map(PathBuf::from);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    [here.join("../shared/bench/floor.c"), here.join("shared/bench/floor.c")]
        .into_iter()
        .find(|p| p.exists())
}

/// Builds the floor program (the 9 durable writes of a crash-safe rotation in one small
/// C process) with the system's `cc -O2`. None when there is no source or compiler.
fn build_floor(source: &Path, dir: &Path) -> Option<PathBuf> {
    let out = dir.join("floor-c");
    let ok = Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(out)
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
        atomic("jwks.json", false); // tidy-up: no folder sync (the next run repairs)
        append("ledger-wal"); // closed
        append("audit.jsonl"); // last audit line
        times.push(ms(start.elapsed()));
    }
    (median(times), 9)
}

/// The least a rotation on this project's stack can cost, run as its own process
/// (`--stack-floor DIR`, the bench re-running itself): the C floor's 9 durable writes,
/// with the ledger in SQLite as keyrotate keeps it (the same bundled SQLite and build
/// flags, WAL kept across processes, `synchronous=FULL`, an admission row and a closing
/// update) and an ed25519 key generated and self-tested by AWS-LC. Nothing else: no
/// config, lock files, inspection, provenance, audit chain or report. The gap between
/// it and the C floor is what the two libraries cost before keyrotate does anything.
fn stack_floor(dir: &Path) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let atomic = |name: &str, body: &[u8]| {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .unwrap();
        f.write_all(body).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    };
    let sync_dir = || std::fs::File::open(dir).unwrap().sync_all().unwrap();
    let fresh = !dir.exists();
    std::fs::create_dir_all(dir).unwrap();
    let db = rusqlite::Connection::open(dir.join("ledger.sqlite3")).unwrap();
    db.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .unwrap();
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=100; \
         CREATE TABLE IF NOT EXISTS runs(id INTEGER PRIMARY KEY, state TEXT NOT NULL, at TEXT NOT NULL);",
    )
    .unwrap();
    if fresh {
        sync_dir();
    }
    db.execute("INSERT INTO runs(state, at) VALUES ('admitted', datetime('now'))", [])
        .unwrap(); // 1: admission
    let id = db.last_insert_rowid();
    let pair = Ed25519KeyPair::generate().unwrap();
    let sig = pair.sign(b"self-test");
    UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref())
        .verify(b"self-test", sig.as_ref())
        .unwrap();
    let der = pair.to_pkcs8v1().unwrap();
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
    let key = format!("v{id:06}.pem");
    let mut k = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(&key))
        .unwrap();
    k.write_all(pem.as_bytes()).unwrap();
    k.sync_all().unwrap(); // 2: staged key
    let jwks = format!(
        "{{\"keys\":[{{\"kid\":\"{key}\",\"x\":\"{:?}\"}}]}}",
        pair.public_key().as_ref()
    );
    atomic("jwks.json", jwks.as_bytes()); // 3
    sync_dir(); // 4
    atomic("keyring.json", jwks.as_bytes()); // 5: the commit
    sync_dir(); // 6
    let _ = std::fs::remove_file(dir.join(".current.tmp"));
    std::os::unix::fs::symlink(&key, dir.join(".current.tmp")).unwrap();
    std::fs::rename(dir.join(".current.tmp"), dir.join("current.pem")).unwrap();
    if id > 3 {
        let _ = std::fs::remove_file(dir.join(format!("v{:06}.pem", id - 3)));
    }
    atomic("jwks.json", jwks.as_bytes()); // 7: tidy-up
    db.execute("UPDATE runs SET state = 'succeeded' WHERE id = ?1", [id])
        .unwrap(); // 8: closed
    drop(db);
    let mut audit = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(dir.join("audit.jsonl"))
        .unwrap();
    audit.write_all(b"{\"event\":\"rotation.succeeded\"}\n").unwrap();
    audit.sync_data().unwrap(); // 9
}

#[allow(clippy::zombie_processes)] // children are reaped with wait4
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` from tooling
    }
    if let Some(i) = args.iter().position(|a| a == "--stack-floor") {
        stack_floor(Path::new(&args[i + 1]));
        return;
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
    if args.iter().any(|a| a == "--custody") {
        pkcs11_vs_file(dir, runs);
        return;
    }

    if args.iter().any(|a| a == "--shared-only") {
        shared_store(dir, runs);
        return;
    }

    // 1. one ed25519 rotation vs the shell peer, interleaved
    let config = write_config(dir, &["bench".to_string()]);
    run(&mut rotate(&config, "bench")); // warm-up: creates folders and ledger
    let baseline = find_baseline(&args);
    let floor_bin = find_floor_source(&args).and_then(|src| build_floor(&src, dir));
    let floor_state = dir.join("floor-state");
    let peer_state = dir.join("peer");
    let mut ours = Vec::new();
    let mut ours_cpu = Vec::new();
    let mut peer = Vec::new();
    let mut ratios = Vec::new();
    let mut floor_c = Vec::new();
    let mut floor_ratios = Vec::new();
    let mut rss = Vec::new();
    let static_bin = find_static(&args);
    let (mut st, mut st_cpu, mut st_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let me = std::env::current_exe().unwrap();
    let stack_state = dir.join("stack-floor");
    let (mut stack_c, mut stack_ratios) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let a = run(&mut rotate(&config, "bench"));
        assert_eq!(a.code, 0, "keyrotate rotate failed");
        ours.push(ms(a.wall));
        ours_cpu.push(ms(a.cpu));
        rss.push(a.max_rss_kib as f64);
        let b = static_bin.as_ref().map(|bin| {
            let b = run(&mut rotate_with(bin, &config, "bench"));
            assert_eq!(b.code, 0, "the static keyrotate failed");
            st.push(ms(b.wall));
            st_cpu.push(ms(b.cpu));
            b
        });
        if let Some(f) = &floor_bin {
            let s = run(Command::new(f).arg(&floor_state));
            assert_eq!(s.code, 0, "the floor program failed");
            floor_c.push(ms(s.wall));
            floor_ratios.push(ms(a.wall) / ms(s.wall));
            let k = run(Command::new(&me).arg("--stack-floor").arg(&stack_state));
            assert_eq!(k.code, 0, "the stack floor failed");
            stack_c.push(ms(k.wall));
            stack_ratios.push(ms(k.wall) / ms(s.wall));
            if let Some(b) = &b {
                st_ratios.push(ms(b.wall) / ms(s.wall));
            }
        }
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
    if floor_bin.is_some() {
        println!("  floor (floor.c, 9 durable writes) {:8.2} ms wall", median(floor_c));
        println!(
            "  keyrotate / floor       {:8.2}x  (median of pairwise ratios; target <= 1.5x)",
            median(floor_ratios)
        );
        println!(
            "  stack floor             {:8.2} ms wall  (this bench as a minimal Rust rotation: SQLite ledger + AWS-LC key + the 9 writes)",
            median(stack_c)
        );
        println!(
            "  stack floor / floor     {:8.2}x  (median of pairwise ratios: what the libraries alone cost)",
            median(stack_ratios)
        );
    } else {
        println!("  floor.c not found or no `cc`: pass --floor PATH");
    }
    match &static_bin {
        Some(bin) => {
            println!(
                "  fast build (Install)    {:8.2} ms wall  {:6.2} ms cpu  ({}; {})",
                median(st),
                median(st_cpu),
                bin.display(),
                build_kind(bin)
            );
            if !st_ratios.is_empty() {
                println!(
                    "  fast build / floor      {:8.2}x  (median of pairwise ratios; target <= 1.5x)",
                    median(st_ratios)
                );
            }
        }
        None => println!("  fast build not found: see README, Install, or pass --static PATH"),
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
    if let Some(bin) = &static_bin {
        // Interleaved with the dynamic binary, so that drift hits both alike.
        let (mut dynamic, mut stat) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            dynamic.push(ms(run(Command::new(KEYROTATE).arg("--version")).wall));
            stat.push(ms(run(Command::new(bin).arg("--version")).wall));
        }
        println!(
            "  process start, default / fast build (interleaved) {:6.2} ms / {:6.2} ms",
            median(dynamic),
            median(stat)
        );
    }

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

    // 5. config scale: one rotation with 5,000 domains configured vs three, interleaved
    config_scale(dir, runs);

    // 6. scale: history rows across many domains (500k rows in --quick)
    let (rows, domains) = if quick { (500_000, 1_000) } else { (1_000_000, 10_000) };
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
    // The readers with no WAL (the filling connection checkpointed and removed it) ...
    let wal = big.join("state/ledger.sqlite3-wal");
    assert!(!wal.exists(), "the fill left a WAL");
    let readers = readers_of(&big_config);
    let no_wal: Vec<f64> = readers.iter().map(|r| time_reader(r, runs)).collect();
    let full: Vec<f64> = (0..runs)
        .map(|_| ms(run(&mut rotate(&big_config, "d00002")).wall))
        .collect();
    // ... and with the WAL the rotations left, held open by another reader.
    assert!(wal.exists(), "the rotations left no WAL");
    let holder = rusqlite::Connection::open(big.join("state/ledger.sqlite3")).unwrap();
    holder.execute_batch("BEGIN").unwrap();
    let _: i64 = holder
        .query_row("SELECT count(*) FROM rotations", [], |r| r.get(0))
        .unwrap();
    let tmp_before = temp_entries();
    let with_wal: Vec<f64> = readers.iter().map(|r| time_reader(r, runs)).collect();
    let copies = temp_entries().saturating_sub(tmp_before);
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
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
    println!("  readers, no WAL vs a live WAL held open by another reader (target <= 3x):");
    for ((name, _), (a, b)) in readers.iter().zip(no_wal.iter().zip(&with_wal)) {
        println!("    {name:24} {a:8.2} ms  {b:8.2} ms  ({:.2}x)", b / a);
    }
    println!("    new entries in the temp folder while reading: {copies}");
    println!(
        "  status (all {domains})  {:8.2} ms, exit {}",
        ms(status_all.wall),
        status_all.code
    );

    // 7. fsyncs per steady-state rotation, by file, as the kernel saw them
    fsyncs_per_rotation(dir);

    // 8. the shared key store (PostgreSQL) against the local store
    shared_store(dir, runs);

    // 9. instructions per rotation: the figure a loaded machine does not blur
    instructions_per_rotation(dir, static_bin.as_deref());

    // 10. custody: a rotation whose key is generated in a PKCS#11 token vs one kept in a
    //    file, interleaved
    pkcs11_vs_file(dir, runs);
}

/// User-space instructions of one steady-state rotation, counted by valgrind's
/// callgrind (deterministic up to the growth of the files a rotation reads), with three
/// domains configured and with 5,000; and of `--version`, what every invocation pays
/// before any command's work. The faster build of the README, when there is one, is
/// counted beside the default one.
fn instructions_per_rotation(dir: &Path, static_bin: Option<&Path>) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("\ninstructions per rotation: SKIPPED (valgrind not installed)");
        return;
    }
    let rotation = |bin: &Path, config: &Path, domain: &str| {
        callgrind(bin, |c| {
            c.arg("--config")
                .arg(config)
                .args(["-q", "rotate", "--domain", domain, "--deadline", "1m", "--force"]);
        })
    };
    let shown = |i: Option<u64>| {
        i.map_or("SKIPPED (callgrind gave no count)".to_string(), |i| {
            format!("{:.2} M", i as f64 / 1e6)
        })
    };
    let dynamic = Path::new(KEYROTATE);
    println!("\ninstructions per rotation (callgrind, user space, after 5 warm-up rotations)");
    for n in [3usize, 5_000] {
        let sub = dir.join(format!("instructions-{n}"));
        std::fs::create_dir(&sub).unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("d{i:05}")).collect();
        let config = write_config(&sub, &names);
        for _ in 0..5 {
            run(&mut rotate(&config, "d00001"));
        }
        println!(
            "  {n:5} domains configured  {:>8}",
            shown(rotation(dynamic, &config, "d00001"))
        );
        // On the same state: one more rotation of the same domain.
        if let Some(bin) = static_bin {
            println!(
                "  {n:5} domains, fast build  {}",
                shown(rotation(bin, &config, "d00001"))
            );
        }
    }
    let version = |bin: &Path| {
        callgrind(bin, |c| {
            c.arg("--version");
        })
    };
    match static_bin {
        Some(bin) => println!(
            "  process start (--version), default / fast build: {} / {}",
            shown(version(dynamic)),
            shown(version(bin))
        ),
        None => println!("  process start (--version): {}", shown(version(dynamic))),
    }
}

/// The user-space instructions callgrind counts for one run of `bin` with the
/// arguments `args` adds.
fn callgrind(bin: &Path, args: impl FnOnce(&mut Command)) -> Option<u64> {
    let mut c = Command::new("valgrind");
    c.args(["--tool=callgrind", "--callgrind-out-file=/dev/null"]).arg(bin);
    args(&mut c);
    let out = c.stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("Collected :"))?;
    line.rsplit(':').next()?.trim().replace(',', "").parse().ok()
}

/// Where Debian and other distributions put SoftHSM2's module.
const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// One ed25519 domain kept in a file and one in a fresh SoftHSM2 token (DESIGN 10),
/// rotated in turn: the price of custody as a ratio (token / file), pair by pair.
fn pkcs11_vs_file(dir: &Path, runs: usize) {
    println!(
        "
custody: ed25519 rotation, key in a SoftHSM2 token vs in a file ({runs} runs, medians)"
    );
    let Some(module) = SOFTHSM_MODULES.iter().map(Path::new).find(|p| p.is_file()) else {
        println!("  SKIPPED: no SoftHSM2 module (Debian package softhsm2)");
        return;
    };
    let p11 = dir.join("p11");
    std::fs::create_dir_all(p11.join("tokens")).unwrap();
    let conf = p11.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            p11.join("tokens").display()
        ),
    )
    .unwrap();
    let init = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output();
    if !init.is_ok_and(|o| o.status.success()) {
        println!("  SKIPPED: softhsm2-util could not make a token");
        return;
    }
    let pin = p11.join("pin");
    std::fs::write(&pin, "1234").unwrap();
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = p11.join("rotate.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"state\"\n[host]\npool = \"p\"\n[defaults]\ndesignated_pool = \"p\"\nbackend = \"keystore\"\n\
             keystore = \"keys\"\nalgorithm = \"ed25519\"\nmin_interval = \"0s\"\nretain = 3\n\
             [pkcs11]\nmodule = \"{}\"\ntoken = \"bench\"\npin_file = \"pin\"\n\
             [domains.file]\n[domains.token]\ncustody = \"pkcs11\"\n",
            module.display()
        ),
    )
    .unwrap();
    let rot = |domain: &str| {
        let mut c = rotate(&config, domain);
        c.env("SOFTHSM2_CONF", &conf);
        c
    };
    // Warm-up: folders, ledger, and past `retain` so that every timed run destroys one.
    for _ in 0..5 {
        assert_eq!(run(&mut rot("file")).code, 0, "file rotation failed");
        assert_eq!(run(&mut rot("token")).code, 0, "pkcs11 rotation failed");
    }
    let (mut file, mut token, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let a = run(&mut rot("file"));
        let b = run(&mut rot("token"));
        assert_eq!((a.code, b.code), (0, 0), "a rotation failed");
        file.push(ms(a.wall));
        token.push(ms(b.wall));
        ratios.push(ms(b.wall) / ms(a.wall));
    }
    println!("  custody = \"file\"        {:8.2} ms wall", median(file));
    println!("  custody = \"pkcs11\"      {:8.2} ms wall", median(token));
    println!(
        "  pkcs11 / file           {:8.2}x  (median of pairwise ratios)",
        median(ratios)
    );
}

type Reader = (&'static str, Vec<String>);

fn readers_of(config: &Path) -> Vec<Reader> {
    let c = config.display().to_string();
    let with = |name: &'static str, rest: &[&str]| {
        let mut v = vec!["--config".to_string(), c.clone()];
        v.extend(rest.iter().map(|s| s.to_string()));
        (name, v)
    };
    vec![
        with("status --domain", &["status", "--domain", "d00003"]),
        with("history --limit 5", &["history", "--limit", "5"]),
        with(
            "rotate --dry-run",
            &[
                "rotate",
                "--domain",
                "d00003",
                "--deadline",
                "1m",
                "--force",
                "--dry-run",
            ],
        ),
    ]
}

fn time_reader((name, args): &Reader, runs: usize) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let s = run(Command::new(KEYROTATE).args(args));
                assert_eq!(s.code, 0, "{name} failed");
                ms(s.wall)
            })
            .collect(),
    )
}

/// Entries in the temporary folder: a reader that copied the ledger leaves a trace
/// while it runs (counted at the end, so this catches only leaked copies; the test
/// suite proves no copy is made at all).
fn temp_entries() -> usize {
    std::fs::read_dir(std::env::temp_dir()).map_or(0, |d| d.count())
}

/// One rotation with 5,000 domains configured against one with three, interleaved.
fn config_scale(dir: &Path, runs: usize) {
    let mut configs = Vec::new();
    for n in [3usize, 5_000] {
        let sub = dir.join(format!("config-{n}"));
        std::fs::create_dir(&sub).unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("d{i:05}")).collect();
        let config = write_config(&sub, &names);
        assert_eq!(run(&mut rotate(&config, "d00001")).code, 0);
        configs.push(config);
    }
    let (mut small, mut large, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let a = ms(run(&mut rotate(&configs[0], "d00001")).wall);
        let b = ms(run(&mut rotate(&configs[1], "d00001")).wall);
        small.push(a);
        large.push(b);
        ratios.push(b / a);
    }
    println!("\nconfig scale: rotating one domain (interleaved, medians; target <= 1.3x)");
    println!("  3 domains configured    {:8.2} ms", median(small));
    println!(
        "  5,000 domains           {:8.2} ms  ({:.2}x)",
        median(large),
        median(ratios)
    );
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

/// `psql` with the caller's libpq settings (PGHOST, PGUSER, PGPASSWORD, …); its output,
/// or `None` when it fails.
fn psql(db: &str, sql: &str) -> Option<String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A host of the shared-store case: its config (ed25519, immediate, retain 3, shared)
/// and KEK in `dir`.
fn shared_host(dir: &Path, url: &str, name: &str, pool: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let kek = dir.join("kek");
    std::fs::write(&kek, b"benchmark-kek-benchmark-kek-32b!").unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.join("rotate.toml");
    std::fs::write(
        &path,
        format!(
            "[state]\ndir = \"state\"\nledger = \"{url}\"\n[host]\nname = \"{name}\"\npool = \"{pool}\"\n\
             [domains.bench]\ndesignated_pool = \"pool-a\"\nbackend = \"keystore\"\nkeystore = \"keys\"\n\
             algorithm = \"ed25519\"\nstore = \"shared\"\nkek = \"file:kek\"\nmin_interval = \"0s\"\nretain = 3\n"
        ),
    )
    .unwrap();
    path
}

fn sync(config: &Path) -> Command {
    let mut c = Command::new(KEYROTATE);
    c.arg("--config")
        .arg(config)
        .args(["-q", "sync", "--domain", "bench", "--deadline", "1m"]);
    c
}

/// `sync` of an unchanged and of a changed domain, and a shared rotation, each as a
/// ratio to the local-store rotation (SQLite ledger) in the same interleaved run. The
/// database is a fresh one created (and dropped) with the caller's libpq settings.
fn shared_store(dir: &Path, runs: usize) {
    let title = "\nshared key store (ed25519, immediate, retain 3; interleaved with the local-store rotation)";
    let Some(user) = std::env::var("PGUSER")
        .ok()
        .filter(|_| psql("postgres", "SELECT 1").is_some())
    else {
        println!(
            "{title}: SKIPPED (no PostgreSQL reachable: set PGHOST, PGUSER and PGPASSWORD as for psql, for a role \
             that may CREATE DATABASE)"
        );
        return;
    };
    let db = format!("kr_test_bench_{}", std::process::id());
    if psql("postgres", &format!("CREATE DATABASE {db}")).is_none() {
        println!("{title}: SKIPPED (this role cannot CREATE DATABASE)");
        return;
    }
    let host = std::env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into());
    let url = format!("postgres://{user}@{host}/{db}");
    let work = dir.join("shared");
    let local = write_config(
        &{
            let d = work.join("local");
            std::fs::create_dir_all(&d).unwrap();
            d
        },
        &["bench".to_string()],
    );
    let a = shared_host(&work.join("host-a"), &url, "bench-a", "pool-a");
    let b = shared_host(&work.join("host-b"), &url, "bench-b", "pool-b");
    // Past `retain` on both sides, so every rotation also destroys: steady state.
    for _ in 0..5 {
        assert_eq!(run(&mut rotate(&local, "bench")).code, 0, "local rotation failed");
        assert_eq!(run(&mut rotate(&a, "bench")).code, 0, "shared rotation failed");
        assert_eq!(run(&mut sync(&b)).code, 0, "sync failed");
    }
    let names = [
        "local-store rotation",
        "shared rotation",
        "sync, changed domain",
        "sync, unchanged domain",
    ];
    let mut wall: [Vec<f64>; 4] = Default::default();
    let mut ratio: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        let samples = [
            run(&mut rotate(&local, "bench")),
            run(&mut rotate(&a, "bench")),
            run(&mut sync(&b)),
            run(&mut sync(&b)),
        ];
        for (i, s) in samples.iter().enumerate() {
            assert_eq!(s.code, 0, "{} failed", names[i]);
            wall[i].push(ms(s.wall));
            ratio[i].push(ms(s.wall) / ms(samples[0].wall));
        }
    }
    println!("{title}, {runs} runs, medians; ratios pair by pair");
    for i in 0..4 {
        println!(
            "  {:24} {:8.2} ms  ({:.2}x)",
            names[i],
            median(wall[i].clone()),
            median(ratio[i].clone())
        );
    }
    let _ = psql("postgres", &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}
