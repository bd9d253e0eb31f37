//! The watcher: a small process between keyrotate and each hook step, so that no hook
//! outlives the run that started it, whatever kills keyrotate.
//!
//! keyrotate starts `keyrotate __hook-watcher PROGRAM ARGS…` (its own binary, through
//! `/proc/self/exe`) in a process group of its own, with one end of a socket pair as
//! stdin and the hook's output pipes as stdout/stderr. The watcher:
//!
//! - becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`), so everything the hook
//!   starts — even in a new session (`setsid`), even double-forked — stays its
//!   descendant and can be found and killed;
//! - starts the hook in a process group of its own, with `PR_SET_PDEATHSIG` = SIGKILL
//!   (its parent is the watcher, whose only thread lives until the end);
//! - reports on the socket: `pid PID START` once the hook runs, `exit …` when it ends,
//!   and `done` once nothing the hook started is left;
//! - kills the whole tree (SIGTERM to the hook's group and every descendant, SIGKILL
//!   after the grace period) when the hook ends (leftovers), when keyrotate asks (a
//!   `k` byte: the deadline, or a lost ledger lock), and when keyrotate's end of the
//!   socket closes — which is what happens when keyrotate is SIGKILLed.
//!
//! If the watcher alone is killed, keyrotate (a subreaper too) receives the orphans
//! and kills them. What this does not cover: a process the hook hands to another
//! service (systemd-run, `at`, a remote shell) is not its descendant; and if the
//! watcher is SIGKILLed together with keyrotate (a kill of every process of the user,
//! a cgroup-wide OOM kill), the hook's first process still dies (pdeathsig) but its
//! children are orphaned to init. The ledger records the hook's process group and the watcher, so the next
//! run on this host finds such survivors and refuses to proceed while they live.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::process::{self, ProcId};

/// `argv[1]` that turns the keyrotate binary into a watcher.
pub const ARG: &str = "__hook-watcher";

/// How the watcher ends a hook tree: SIGTERM, this long, then SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);

/// The watcher process. `args`: PROGRAM ARGS… (after [`ARG`]).
pub fn main(args: Vec<std::ffi::OsString>) -> ExitCode {
    // A polite stop aimed at the watcher means: end the hook tree, then go.
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let _ = signal_hook::flag::register_usize(sig, Arc::clone(&stop), sig as usize);
    }
    // SAFETY: prctl with integer arguments, and a NUL-terminated name that outlives it.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // `ps` would otherwise show "exe" (we run through /proc/self/exe).
        libc::prctl(libc::PR_SET_NAME, c"kr-hook-watch".as_ptr(), 0, 0, 0);
    }
    // SAFETY: fstat into a zeroed struct we own; fd 0 is the socket keyrotate passed,
    // duplicated so that fd 0 itself can be pointed at /dev/null below.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, a valid stat we own; a bad fd is an error return.
    let is_socket = unsafe { libc::fstat(0, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK;
    let dup = if is_socket {
        // SAFETY: F_DUPFD_CLOEXEC only duplicates fd 0 (checked above to be a socket)
        // onto a new descriptor; it touches no memory.
        unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) }
    } else {
        -1
    };
    if dup < 0 {
        // Not started by keyrotate (no socket): there is nobody to watch for.
        let _ = writeln!(
            std::io::stderr(),
            "keyrotate: {ARG} is internal to keyrotate's command backend"
        );
        return ExitCode::from(2);
    }
    // SAFETY: `dup` is a fresh descriptor that nothing else owns.
    let mut sock = unsafe { UnixStream::from_raw_fd(dup) };
    let Some((program, rest)) = args.split_first() else {
        let _ = sock.write_all(b"error no program given\ndone\n");
        return ExitCode::from(2);
    };
    let me = std::process::id() as i32;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            // The watcher may have died between fork and prctl: then go no further.
            if libc::getppid() != me {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(sock, "error {}", e.to_string().replace('\n', " "));
            let _ = sock.write_all(b"done\n");
            return ExitCode::from(2);
        }
    };
    drop(cmd);
    // From here the output pipes belong to the hook alone: their end of file means
    // every process holding them is gone.
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null");
    if let Ok(null) = &null {
        for fd in [0, 1, 2] {
            // SAFETY: dup2 onto our own standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let hook = child.id() as i32;
    let start = ProcId::of(hook).map_or(0, |p| p.start);
    let _ = writeln!(sock, "pid {hook} {start}");
    let _ = sock.set_nonblocking(true);

    let mut status: Option<std::process::ExitStatus> = None;
    let mut kill_asked = false;
    loop {
        let mut byte = [0u8; 16];
        let peer_gone = match sock.read(&mut byte) {
            Ok(0) => true,
            Ok(n) => {
                kill_asked |= byte[..n].contains(&b'k');
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(_) => true,
        };
        if peer_gone || stop.load(Ordering::SeqCst) != 0 {
            // keyrotate is gone (or we are told to stop): nobody will read a report.
            kill_tree(hook, &mut status);
            return ExitCode::SUCCESS;
        }
        if kill_asked {
            kill_tree(hook, &mut status);
        }
        reap(hook, &mut status);
        if status.is_some() {
            // The step ended and its outcome is about to be recorded: whatever it left
            // running must not act after that, so it gets no grace (SIGKILL at once).
            let (in_group, outside) = kill_leftovers(hook, &mut status);
            if in_group + outside > 0 {
                let _ = sock.set_nonblocking(false);
                let _ = writeln!(sock, "leftovers {in_group} {outside}");
            }
            let s = status.expect("set above");
            let line = match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}\n"),
                (None, Some(sig)) => format!("exit signal {sig}\n"),
                _ => "exit unknown\n".to_string(),
            };
            let _ = sock.set_nonblocking(false);
            let _ = sock.write_all(line.as_bytes());
            let _ = sock.write_all(b"done\n");
            return ExitCode::SUCCESS;
        }
        let mut fds = [libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd. The timeout bounds how late a child's exit is seen.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) };
    }
}

/// Reaps every exited child (orphans of the tree come to us as subreaper), noting the
/// hook's own status.
fn reap(hook: i32, status: &mut Option<std::process::ExitStatus>) {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid on our own children, without blocking.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == hook {
            *status = Some(std::process::ExitStatus::from_raw(raw));
        }
    }
}

/// Everything left of the hook: its process group and every descendant of the watcher.
fn signal_tree(hook: i32, sig: i32) -> usize {
    let rest = process::descendants(std::process::id() as i32);
    // SAFETY: signals to the hook's group and to our own descendants.
    unsafe {
        libc::killpg(hook, sig);
        for p in &rest {
            libc::kill(*p, sig);
        }
    }
    rest.len()
}

/// What a step that has ended left running, killed at once: returns how many were in
/// the hook's process group and how many outside it (a `setsid` or double fork).
fn kill_leftovers(hook: i32, status: &mut Option<std::process::ExitStatus>) -> (usize, usize) {
    let left = process::descendants(std::process::id() as i32);
    let outside = left
        .iter()
        .filter(|p| process::stat(**p).is_some_and(|s| s.pgrp != hook))
        .count();
    let in_group = left.len() - outside;
    let start = Instant::now();
    while signal_tree(hook, libc::SIGKILL) > 0 && start.elapsed() < Duration::from_secs(2) {
        reap(hook, status);
        std::thread::sleep(Duration::from_millis(5));
    }
    reap(hook, status);
    (in_group, outside)
}

/// SIGTERM to the whole tree, then SIGKILL after the grace period; returns when
/// nothing of it is left (or, for a process that cannot die, after a bounded wait).
fn kill_tree(hook: i32, status: &mut Option<std::process::ExitStatus>) {
    if signal_tree(hook, libc::SIGTERM) == 0 {
        reap(hook, status);
        return;
    }
    let start = Instant::now();
    while start.elapsed() < GRACE {
        reap(hook, status);
        if process::descendants(std::process::id() as i32).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    while signal_tree(hook, libc::SIGKILL) > 0 && start.elapsed() < Duration::from_secs(2) {
        reap(hook, status);
        std::thread::sleep(Duration::from_millis(10));
    }
    reap(hook, status);
}
