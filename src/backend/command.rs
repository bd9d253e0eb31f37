//! The command backend: rotate any secret through a hook program run once per step,
//! `create`, `set`, `test`, `finish` (AWS Secrets Manager's four steps, without its
//! retries).
//!
//! The hook runs directly (no shell), stdin closed, in its own process group, with
//! `KEYROTATE_STEP`, `KEYROTATE_DOMAIN`, `KEYROTATE_RUN_ID`, `KEYROTATE_DEADLINE` and
//! `KEYROTATE_STATE_DIR` set. Its output is passed to stderr as it runs (capped) and its
//! tail kept in the ledger. At the deadline the whole group gets SIGTERM, then SIGKILL
//! after a grace period; when a step ends, anything it left running in its group is
//! killed too, so no child of a hook outlives its step.
//!
//! `set` is the commit point: a failure before it leaves the target untouched (ABORTED,
//! or TIMED_OUT at the deadline); from `set` on, the target may hold a half-rotated
//! secret, so any failure is NEEDS_REVIEW and blocks the domain.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Rotated, Step};
use crate::outcome::{Failure, Outcome};

pub const STEPS: [&str; 4] = ["create", "set", "test", "finish"];
/// Between SIGTERM and SIGKILL when a step outlives the deadline.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// Output of one step passed through to stderr; the rest is counted, not shown.
const PASS_THROUGH_LIMIT: usize = 256 * 1024;
/// Output tail kept in the ledger per step.
const TAIL_BYTES: usize = 2048;
/// How long a step's output is still read once the step (its process group) has
/// ended. A process that left the group (`setsid`, a daemon started without closing
/// its descriptors) can hold the pipes for as long as it lives: the run must not wait
/// for it, or a `set` that ended in a second holds the run far past its deadline.
const DRAIN_AFTER_END: Duration = Duration::from_millis(500);

pub struct CommandRotation<'a> {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub state_dir: PathBuf,
    pub step: Step<'a>,
}

/// How one hook step ended.
#[derive(Debug)]
struct StepResult {
    ok: bool,
    /// "exit 0", "exit 3", "killed by signal 9", "killed at the deadline"
    status: String,
    timed_out: bool,
    elapsed: Duration,
    tail: String,
}

impl CommandRotation<'_> {
    pub fn run(mut self) -> Result<Rotated, Failure> {
        let guard = self.step.guard.clone();
        crate::cmd::check_program(&self.program)
            .map_err(|e| Failure::new(Outcome::Aborted, format!("{e}; refusing to run it")))?;
        // Orphans of the hook (a double fork, `setsid … &`) become our children rather
        // than init's, so that what a step leaves running can be found and ended even
        // when it left the step's process group.
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        for name in STEPS {
            let committing = name != "create";
            if name == "set" {
                // From here the target changes: signals no longer stop the run, and
                // the deadline is enforced by killing the hook, not the process.
                guard.enter_commit()?;
            } else if !committing {
                guard.checkpoint(name)?;
            }
            let _ = self.step.event(
                &format!("hook.{name}.start"),
                &format!("{} {}", self.program.display(), self.args.join(" ")),
            );
            let result = self.run_step(name).map_err(|e| {
                let outcome = if committing {
                    Outcome::NeedsReview
                } else {
                    Outcome::Aborted
                };
                Failure::new(outcome, format!("hook step '{name}' could not be started: {e}"))
            })?;
            let detail = format!(
                "{} after {} ms; output tail: {}",
                result.status,
                result.elapsed.as_millis(),
                result.tail
            );
            let _ = self.step.event(&format!("hook.{name}.end"), &detail);
            if !result.ok {
                let msg = format!("hook step '{name}' failed ({})", result.status);
                return Err(match (committing, result.timed_out) {
                    (false, true) => Failure::new(Outcome::TimedOut, format!("{msg}; the target was not changed")),
                    (false, false) => Failure::new(Outcome::Aborted, format!("{msg}; the target was not changed")),
                    (true, _) => Failure::new(
                        Outcome::NeedsReview,
                        format!("{msg}; the target may hold the new secret: check it, then resolve"),
                    ),
                });
            }
            if name == "create" {
                self.step
                    .advance("staged", (None, None), "hook created the new secret")
                    .map_err(|e| Failure::new(Outcome::Aborted, e))?;
            }
        }
        let rotated = Rotated {
            summary: format!("hook steps {} succeeded", STEPS.join(", ")),
            ..Rotated::default()
        };
        self.step.committed(&rotated)?;
        Ok(rotated)
    }

    fn run_step(&self, name: &str) -> std::io::Result<StepResult> {
        let deadline = self.step.guard.deadline();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env("KEYROTATE_STEP", name)
            .env("KEYROTATE_DOMAIN", &self.step.run.domain)
            .env("KEYROTATE_RUN_ID", &self.step.run.run_id)
            .env("KEYROTATE_DEADLINE", &self.step.run.deadline_at)
            .env("KEYROTATE_STATE_DIR", &self.state_dir)
            .env_remove("KEYROTATE_FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let pgid = child.id() as i32;
        let watch = DeathWatch::start(pgid);
        let tail = Arc::new(Mutex::new(Tail::default()));
        let readers = [
            pump(
                child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
                name,
                Arc::clone(&tail),
            ),
            pump(
                child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
                name,
                Arc::clone(&tail),
            ),
        ];
        let (status, timed_out) = wait_until(&mut child, pgid, deadline.instant())?;
        // Whatever the step left running in its group does not outlive it.
        kill_group(pgid);
        drop(watch);
        let escaped = kill_escaped();
        let drain_until = Instant::now() + DRAIN_AFTER_END;
        let mut held_open = false;
        for r in readers.into_iter().flatten() {
            while !r.is_finished() && Instant::now() < drain_until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            } else {
                // Left reading (it ends with the pipe or the process); not waited for.
                held_open = true;
            }
        }
        // The step's output before what comes next, unless our stderr is stalled.
        stderr_writer::flush(Duration::from_millis(200));
        let mut text = tail.lock().unwrap_or_else(|e| e.into_inner()).text();
        if escaped > 0 {
            tracing::warn!(
                "hook step '{name}' left {escaped} process(es) running outside its process group; they were killed"
            );
            text.push_str(&format!(
                " | (killed {escaped} process(es) the step left running outside its process group)"
            ));
        }
        if held_open {
            tracing::warn!(
                "hook step '{name}' ended but a process it started outside its process group still holds its output; not waiting for it"
            );
            text.push_str(" | (a process outside the step's process group still held its output: not waited for)");
        }
        let status_text = match (timed_out, status.code(), status.signal()) {
            (true, _, _) => "killed at the deadline".to_string(),
            (false, Some(c), _) => format!("exit {c}"),
            (false, None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended".to_string(),
        };
        Ok(StepResult {
            ok: !timed_out && status.success(),
            status: status_text,
            timed_out,
            elapsed: started.elapsed(),
            tail: text,
        })
    }
}

/// Waits for the hook; at `deadline` sends SIGTERM to its group, then SIGKILL after
/// the grace period. Returns the exit status and whether the deadline killed it.
fn wait_until(child: &mut Child, pgid: i32, deadline: Instant) -> std::io::Result<(std::process::ExitStatus, bool)> {
    let mut signalled: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, signalled.is_some()));
        }
        let now = Instant::now();
        match signalled {
            None if now >= deadline => {
                unsafe { libc::killpg(pgid, libc::SIGTERM) };
                signalled = Some(now);
            }
            Some(at) if now >= at + KILL_GRACE => {
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                let status = child.wait()?;
                return Ok((status, true));
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Ends a step's process group if keyrotate itself dies mid-step (Control-M's Kill,
/// the OOM killer): a forked watcher, in a process group of its own, waits on a pipe
/// only keyrotate writes; end of file without the "done" byte means keyrotate is gone,
/// and it kills the hook's group, so a hook never runs on beside the next run.
struct DeathWatch {
    pid: libc::pid_t,
    done: libc::c_int,
}

impl DeathWatch {
    fn start(pgid: i32) -> Option<DeathWatch> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is an array of two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        let (r, w) = (fds[0], fds[1]);
        // SAFETY: after fork the child (a copy of a multi-threaded process) calls only
        // async-signal-safe functions (setpgid, close, read, killpg, _exit) and never
        // returns into Rust code.
        match unsafe { libc::fork() } {
            -1 => {
                // SAFETY: closing the two descriptors pipe2 just gave us.
                unsafe {
                    libc::close(r);
                    libc::close(w);
                }
                None
            }
            0 => unsafe {
                libc::setpgid(0, 0);
                libc::close(w);
                let mut byte = 0u8;
                let n = loop {
                    let n = libc::read(r, (&mut byte as *mut u8).cast(), 1);
                    if n >= 0 || *libc::__errno_location() != libc::EINTR {
                        break n;
                    }
                };
                if n <= 0 {
                    libc::killpg(pgid, libc::SIGKILL);
                }
                libc::_exit(0)
            },
            pid => {
                // SAFETY: the read end belongs to the watcher now.
                unsafe { libc::close(r) };
                Some(DeathWatch { pid, done: w })
            }
        }
    }
}

impl Drop for DeathWatch {
    /// The step ended under our eyes: the watcher leaves without killing anything.
    fn drop(&mut self) {
        // SAFETY: writing one byte to and closing our own pipe end, then reaping our
        // own child.
        unsafe {
            libc::write(self.done, b"d".as_ptr().cast(), 1);
            libc::close(self.done);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Kills what a step left running outside its process group: with the subreaper set,
/// every orphan of the hook is a child of this process (the step itself has been
/// waited for, and keyrotate starts no other process). Killing one reparents its own
/// children to us, so this repeats until none is left (bounded). Returns how many.
fn kill_escaped() -> usize {
    let me = std::process::id() as i32;
    let mut killed = 0;
    let until = Instant::now() + KILL_GRACE;
    loop {
        let kids = children_of(me);
        if kids.is_empty() || Instant::now() >= until {
            return killed;
        }
        for pid in kids {
            // SAFETY: plain kill(2)/waitpid(2) of our own child; the status is unused.
            unsafe {
                if libc::kill(pid, libc::SIGKILL) == 0 {
                    killed += 1;
                }
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// The pids whose parent is `ppid` (field 4 of /proc/PID/stat).
fn children_of(ppid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<i32>().ok()
            }) == Some(ppid)
        })
        .collect()
}

fn kill_group(pgid: i32) {
    // Probing with signal 0 tells whether anything is left in the group.
    if unsafe { libc::killpg(pgid, 0) } == 0 {
        unsafe { libc::killpg(pgid, libc::SIGTERM) };
        let start = Instant::now();
        while unsafe { libc::killpg(pgid, 0) } == 0 && start.elapsed() < KILL_GRACE {
            // As the hooks' subreaper we inherit their orphans: one that died in the
            // group stays a member (a zombie) until reaped, so reap what has ended.
            // SAFETY: waitpid with WNOHANG on any child; the status is unused.
            while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            std::thread::sleep(Duration::from_millis(10));
        }
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
}

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    passed: usize,
    truncated_notice: bool,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > TAIL_BYTES {
            let cut = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }
    fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.bytes);
        let s: String = s
            .chars()
            .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
            .collect();
        s.trim().replace('\n', " | ")
    }
}

/// Hook output on its way to our stderr, written by one thread of its own: a slow or
/// stalled reader of our stderr must never stall the pumps, or the hook blocks on a
/// full pipe and is killed at the deadline. What does not fit the queue is dropped
/// (the ledger keeps the tail either way).
mod stderr_writer {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{sync_channel, SyncSender};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    static QUEUE: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();
    static PENDING: AtomicUsize = AtomicUsize::new(0);

    fn queue() -> &'static SyncSender<Vec<u8>> {
        QUEUE.get_or_init(|| {
            let (tx, rx) = sync_channel::<Vec<u8>>(256);
            std::thread::spawn(move || {
                for chunk in rx {
                    let _ = std::io::stderr().lock().write_all(&chunk);
                    PENDING.fetch_sub(1, Ordering::SeqCst);
                }
            });
            tx
        })
    }

    /// Queues `chunk` without waiting; `false` when the queue is full.
    pub fn offer(chunk: Vec<u8>) -> bool {
        PENDING.fetch_add(1, Ordering::SeqCst);
        if queue().try_send(chunk).is_ok() {
            true
        } else {
            PENDING.fetch_sub(1, Ordering::SeqCst);
            false
        }
    }

    /// Waits (at most `limit`) for what is queued to reach stderr.
    pub fn flush(limit: Duration) {
        let until = Instant::now() + limit;
        while PENDING.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Copies a hook's output to our stderr (up to the pass-through limit) and keeps its tail.
fn pump(src: Option<Box<dyn Read + Send>>, step: &str, tail: Arc<Mutex<Tail>>) -> Option<std::thread::JoinHandle<()>> {
    let mut src = src?;
    let prefix = format!("[hook {step}] ");
    Some(std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut at_line_start = true;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            t.push(&buf[..n]);
            if t.passed < PASS_THROUGH_LIMIT {
                t.passed += n;
                let mut out = Vec::with_capacity(n + prefix.len());
                for piece in buf[..n].split_inclusive(|b| *b == b'\n') {
                    if at_line_start {
                        out.extend_from_slice(prefix.as_bytes());
                    }
                    out.extend_from_slice(piece);
                    at_line_start = piece.ends_with(b"\n");
                }
                if !stderr_writer::offer(out) && !t.truncated_notice {
                    t.truncated_notice = true;
                    stderr_writer::offer(
                        format!("\n{prefix}(our stderr is not being read fast enough: some output not shown)\n")
                            .into_bytes(),
                    );
                }
            } else if !t.truncated_notice {
                t.truncated_notice = true;
                stderr_writer::offer(
                    format!("\n{prefix}(output beyond {PASS_THROUGH_LIMIT} bytes not shown)\n").into_bytes(),
                );
            }
        }
    }))
}

/// What `--dry-run` and `check` say about a hook without running it.
pub fn describe(program: &Path, args: &[String]) -> String {
    format!("{} {}", program.display(), args.join(" "))
        .trim_end()
        .to_string()
}
