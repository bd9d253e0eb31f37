//! The command backend: rotate any secret through a hook program run once per step,
//! `create`, `set`, `test`, `finish` (AWS Secrets Manager's four steps, without its
//! retries).
//!
//! The hook runs directly (no shell), stdin closed, in its own process group, with
//! `KEYROTATE_STEP`, `KEYROTATE_DOMAIN`, `KEYROTATE_RUN_ID`, `KEYROTATE_DEADLINE` and
//! `KEYROTATE_STATE_DIR` set, under a watcher process (`watcher.rs`) that kills the
//! whole hook tree — its group and every descendant, `setsid` ones included — when the
//! step ends, at the deadline (SIGTERM, then SIGKILL after a grace period), when the
//! run loses its ledger lock, and when keyrotate dies. Its output is passed to stderr
//! as it runs (capped, and never waiting on our stderr) and its tail kept in the
//! ledger; the pipes are read without ever blocking, so a process that keeps them open
//! cannot hold the run. The ledger records the hook's process group and its watcher
//! (`hook_process` events), so the next run on this host can find survivors.
//!
//! On a shared ledger every step is fenced: the lock is confirmed before each step and
//! every second while one runs (which also keeps the session from going idle).
//!
//! `set` is the commit point: a failure before it leaves the target untouched (ABORTED,
//! or TIMED_OUT at the deadline); from `set` on, the target may hold a half-rotated
//! secret, so any failure is NEEDS_REVIEW and blocks the domain.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{watcher, Rotated, Step};
use crate::outcome::{Failure, Outcome};
use crate::process;

pub const STEPS: [&str; 4] = ["create", "set", "test", "finish"];
/// Between SIGTERM and SIGKILL when a step outlives the deadline.
pub const KILL_GRACE: Duration = watcher::GRACE;
/// Output of one step passed through to stderr; the rest is counted, not shown.
const PASS_THROUGH_LIMIT: usize = 256 * 1024;
/// Output tail kept in the ledger per step.
const TAIL_BYTES: usize = 2048;

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
    /// The lock was lost while the step ran (the hook was killed).
    lost_lock: Option<String>,
    elapsed: Duration,
    tail: String,
}

impl CommandRotation<'_> {
    pub fn run(mut self) -> Result<Rotated, Failure> {
        let guard = self.step.guard.clone();
        preflight(&self.program)?;
        for name in STEPS {
            let committing = name != "create";
            // No step starts after the deadline or without the lock.
            match name {
                "create" | "set" => guard.checkpoint(name)?,
                _ if guard.deadline().expired() => {
                    return Err(Failure::new(
                        Outcome::NeedsReview,
                        format!(
                            "deadline {} reached before hook step '{name}' could start; 'set' had run: the target may hold the new secret: check it, then resolve",
                            self.step.run.deadline_at
                        ),
                    ))
                }
                _ => {}
            }
            self.step
                .confirm_lock(&format!("hook step '{name}'"), matches!(name, "test" | "finish"))?;
            if name == "set" {
                // From here the target changes: signals no longer stop the run, and
                // the deadline is enforced by killing the hook, not the process.
                guard.enter_commit()?;
            }
            let _ = self.step.event(
                &format!("hook.{name}.start"),
                &format!("{} {}", self.program.display(), self.args.join(" ")),
            );
            let _ = crate::failpoint::hit("hook", name);
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
            if let Some(lost) = &result.lost_lock {
                return Err(if committing {
                    Failure::new(
                        Outcome::NeedsReview,
                        format!("lost its lock during hook step '{name}': {lost}; the hook was stopped ({}): the target may hold a half-rotated secret: check it, then resolve", result.status),
                    )
                } else {
                    Failure::new(
                        Outcome::Aborted,
                        format!("lost its lock during hook step '{name}': {lost}; the hook was stopped ({}): the target was not changed", result.status),
                    )
                });
            }
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
                    .advance(
                        crate::ledger::RunState::Staged,
                        (None, None),
                        "hook created the new secret",
                    )
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

    /// Runs one step under a watcher (see `watcher.rs`) and supervises it: passes its
    /// output on, keeps the ledger session alive and confirms the lock every second, and
    /// has the whole hook tree killed at the deadline or when the lock is lost. Nothing
    /// here waits on the hook's pipes: a process that keeps them open after the step
    /// ended (even in another session) cannot hold the run.
    fn run_step(&mut self, name: &str) -> std::io::Result<StepResult> {
        let deadline = self.step.guard.deadline().instant();
        let (mut ours, theirs) = UnixStream::pair()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("keyrotate-hook-watcher")
            .arg(watcher::ARG)
            .arg(&self.program)
            .args(&self.args)
            .env("KEYROTATE_STEP", name)
            .env("KEYROTATE_DOMAIN", &self.step.run.domain)
            .env("KEYROTATE_RUN_ID", &self.step.run.run_id)
            .env("KEYROTATE_DEADLINE", &self.step.run.deadline_at)
            .env("KEYROTATE_STATE_DIR", &self.state_dir)
            .env_remove("KEYROTATE_FAILPOINTS")
            .env_remove("KEYROTATE_FAILPOINT_LOG")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            // Its own group: a signal to keyrotate's group (a terminal, a scheduler)
            // does not take the watcher with it.
            .process_group(0);
        // keyrotate is a subreaper too: if the watcher alone dies (OOM killer, an
        // operator's kill), what the hook left running comes to us, not to init, and
        // is killed below.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let started = Instant::now();
        let mut watcher = cmd.spawn()?;
        // Our copies of the child's ends must go, or their end of file never comes.
        drop(cmd);
        ours.set_nonblocking(true)?;
        let mut streams = [Stream::new(out_r, name)?, Stream::new(err_r, name)?];
        let mut tail = Tail::default();
        let mut control = Control::default();
        let mut hook_pgid: Option<i32> = None;
        let mut kill_at: Option<Instant> = None;
        let mut timed_out = false;
        let mut lost_lock = None;
        let mut next_confirm = Instant::now() + CONFIRM_EVERY;
        let shared = self.step.ledger.is_shared();
        let domain = self.step.run.domain.clone();
        let mut watcher_answered = true;
        let status = loop {
            let mut fds: Vec<libc::pollfd> = streams
                .iter()
                .filter(|s| s.open)
                .map(|s| libc::pollfd {
                    fd: s.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .chain([libc::pollfd {
                    fd: ours.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }])
                .collect();
            // SAFETY: a valid array of pollfds and its length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
            for s in &mut streams {
                s.pump(&mut tail);
            }
            tail.drain();
            match control.read(&mut ours) {
                Report::Nothing => {}
                Report::Started { pid, start } => {
                    hook_pgid = Some(pid);
                    let record = process::HookProcess {
                        step: name.to_string(),
                        leader: process::ProcId { pid, start },
                        watcher: process::ProcId::of(watcher.id() as i32).unwrap_or(process::ProcId {
                            pid: watcher.id() as i32,
                            start: 0,
                        }),
                        boot: process::boot_id(),
                    };
                    let _ = self.step.event("hook_process", &record.record());
                }
                Report::Failed(e) => {
                    let _ = watcher.wait();
                    return Err(std::io::Error::other(e));
                }
                Report::Done(status) => {
                    let (in_group, outside) = control.leftovers;
                    if in_group + outside > 0 {
                        tracing::warn!(
                            "hook step '{name}' left {in_group} process(es) in its process group and {outside} \
                             outside its process group (setsid, double fork) running when it ended: killed; \
                             a hook step must not leave background processes"
                        );
                    }
                    break status;
                }
                Report::Gone => {
                    watcher_answered = false;
                    break "ended without a report (its watcher died)".to_string();
                }
            }
            let now = Instant::now();
            if kill_at.is_none() && now >= deadline {
                timed_out = true;
                kill_at = Some(now);
                let _ = ours.write(b"k");
            }
            if shared && kill_at.is_none() && now >= next_confirm {
                if let Err(e) = self.step.ledger.confirm_lock(&domain) {
                    lost_lock = Some(e.to_string());
                    kill_at = Some(now);
                    let _ = ours.write(b"k");
                }
                next_confirm = Instant::now() + CONFIRM_EVERY;
            }
            if kill_at.is_some_and(|at| now >= at + watcher::GRACE + Duration::from_secs(3)) {
                // The watcher does not answer: end what we know of the tree ourselves.
                watcher_answered = false;
                break "killed (its watcher did not answer)".to_string();
            }
        };
        // Whatever the watcher did, nothing of this step is left running when we go on.
        if let Some(pgid) = hook_pgid {
            // SAFETY: SIGKILL to the hook's own process group (a no-op when it is gone).
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        if !process::wait_for(Duration::from_secs(1), || matches!(watcher.try_wait(), Ok(Some(_)))) {
            let _ = watcher.kill();
            let _ = watcher.wait();
        }
        if !watcher_answered {
            // Orphans of the hook (even in another session) are now our children.
            kill_orphans();
        }
        for s in &mut streams {
            s.pump(&mut tail);
            s.finish();
        }
        // A slow reader gets the rest; one that reads nothing costs at most a moment,
        // and never time past the deadline.
        let flush_until = deadline
            .max(Instant::now())
            .min(Instant::now() + Duration::from_secs(5));
        tail.flush(flush_until, &format!("[hook {name}] "));
        let exited_ok = status == "exit code 0";
        let status_text = if timed_out {
            "killed at the deadline".to_string()
        } else if lost_lock.is_some() {
            format!("killed: the lock was lost; the hook had {status}")
        } else if let Some(c) = status.strip_prefix("exit code ") {
            format!("exit {c}")
        } else if let Some(s) = status.strip_prefix("exit signal ") {
            format!("killed by signal {s}")
        } else {
            status.clone()
        };
        Ok(StepResult {
            ok: !timed_out && lost_lock.is_none() && exited_ok,
            status: status_text,
            timed_out,
            lost_lock,
            elapsed: started.elapsed(),
            tail: tail.text(),
        })
    }
}

/// Kills and reaps every descendant of keyrotate: called only when a step's watcher
/// died without cleaning up, when whatever is left under us is the hook's.
fn kill_orphans() {
    let me = std::process::id() as i32;
    let start = Instant::now();
    loop {
        let rest = process::descendants(me);
        for p in &rest {
            // SAFETY: SIGKILL to our own descendants.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        // SAFETY: reaping our own exited children, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        if rest.is_empty() || start.elapsed() > Duration::from_secs(2) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How often a running step confirms the lock (and keeps the ledger session busy).
const CONFIRM_EVERY: Duration = Duration::from_secs(1);

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, which we own from here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the watcher said since the last look.
enum Report {
    Nothing,
    Started { pid: i32, start: u64 },
    Failed(String),
    Done(String),
    Gone,
}

/// The line protocol with the watcher: `pid PID START`, `exit …`, `error …`, `done`.
#[derive(Default)]
struct Control {
    buf: Vec<u8>,
    status: Option<String>,
    error: Option<String>,
    /// Processes the step left running when it ended (in its group, outside it), which
    /// the watcher killed.
    leftovers: (usize, usize),
}

impl Control {
    fn read(&mut self, sock: &mut UnixStream) -> Report {
        let mut chunk = [0u8; 512];
        let mut eof = false;
        loop {
            match sock.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if let Some(rest) = line.strip_prefix("pid ") {
                let mut it = rest.split(' ');
                if let (Some(Ok(pid)), Some(Ok(start))) = (it.next().map(str::parse), it.next().map(str::parse)) {
                    return Report::Started { pid, start };
                }
            } else if let Some(rest) = line.strip_prefix("leftovers ") {
                let mut it = rest.split(' ').map(|n| n.parse::<usize>().unwrap_or(0));
                self.leftovers = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            } else if line.starts_with("exit ") {
                self.status = Some(line);
            } else if let Some(e) = line.strip_prefix("error ") {
                self.error = Some(e.to_string());
            } else if line == "done" {
                if let Some(e) = self.error.take() {
                    return Report::Failed(e);
                }
                return Report::Done(self.status.take().unwrap_or_else(|| "ended".into()));
            }
        }
        if eof {
            Report::Gone
        } else {
            Report::Nothing
        }
    }
}

/// One of the hook's output pipes, read without ever blocking.
struct Stream {
    fd: OwnedFd,
    open: bool,
    prefix: String,
    at_line_start: bool,
}

impl Stream {
    fn new(fd: OwnedFd, step: &str) -> std::io::Result<Stream> {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Stream {
            fd,
            open: true,
            prefix: format!("[hook {step}] "),
            at_line_start: true,
        })
    }

    /// Reads what is there now (bounded, so one chatty stream cannot starve the loop).
    fn pump(&mut self, tail: &mut Tail) {
        let mut buf = [0u8; 8192];
        for _ in 0..16 {
            if !self.open {
                return;
            }
            // SAFETY: reading into a buffer we own, of the length given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                self.open = false;
                return;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    self.open = false;
                }
                return;
            }
            self.pass_on(&buf[..n as usize], tail);
        }
    }

    /// Keeps the tail and queues the output for our stderr (see [`Tail::drain`]).
    fn pass_on(&mut self, chunk: &[u8], tail: &mut Tail) {
        tail.push(chunk);
        if tail.passed >= PASS_THROUGH_LIMIT {
            if !tail.truncated_notice {
                tail.truncated_notice = true;
                let note = format!(
                    "\n{}(output beyond {PASS_THROUGH_LIMIT} bytes not shown)\n",
                    self.prefix
                );
                tail.pending.extend_from_slice(note.as_bytes());
            }
            return;
        }
        tail.passed += chunk.len();
        for piece in chunk.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                tail.pending.extend_from_slice(self.prefix.as_bytes());
            }
            tail.pending.extend_from_slice(piece);
            self.at_line_start = piece.ends_with(b"\n");
        }
    }

    /// The step is over: stop reading (a process that still holds the pipe gets
    /// SIGPIPE once we close it, not our attention).
    fn finish(&mut self) {
        self.open = false;
    }
}

/// At the end of a step, how long queued output may wait for a stderr that takes
/// nothing at all before it is dropped.
const STDERR_STALL: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    passed: usize,
    truncated_notice: bool,
    /// Output our stderr could not take (a slow or absent reader); not waited for.
    dropped: usize,
    /// Output queued for our stderr (at most the pass-through limit per step): written
    /// as fast as stderr takes it, never waited for while the hook runs.
    pending: Vec<u8>,
}

impl Tail {
    /// Writes what stderr takes now, without waiting.
    fn drain(&mut self) {
        if !self.pending.is_empty() {
            let n = crate::errout::write_some(&self.pending, Duration::ZERO);
            self.pending.drain(..n);
        }
    }

    /// The step is over: write the rest while stderr makes progress (never past
    /// `until`), then drop what a reader does not take, and say so.
    fn flush(&mut self, until: Instant, prefix: &str) {
        let mut last_progress = Instant::now();
        while !self.pending.is_empty() {
            let now = Instant::now();
            if now >= until || now >= last_progress + STDERR_STALL {
                break;
            }
            let n = crate::errout::write_some(&self.pending, Duration::from_millis(50));
            if n > 0 {
                self.pending.drain(..n);
                last_progress = Instant::now();
            }
        }
        if !self.pending.is_empty() {
            self.dropped += self.pending.len();
            self.pending.clear();
            let note = format!(
                "\n{prefix}({} bytes of output not shown: stderr was not writable; the ledger keeps the tail)\n",
                self.dropped
            );
            crate::errout::write_own(note.as_bytes(), Duration::from_millis(100));
        }
    }

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
        let s = s.trim().replace('\n', " | ");
        if self.dropped > 0 {
            format!(
                "{s} ({} bytes of output not passed to stderr: it was not writable)",
                self.dropped
            )
        } else {
            s
        }
    }
}

/// What `--dry-run` and `check` say about a hook without running it.
pub fn describe(program: &Path, args: &[String]) -> String {
    format!("{} {}", program.display(), args.join(" "))
        .trim_end()
        .to_string()
}

/// A hook program that can run at all: it exists and is an executable regular file.
/// Missing that is a configuration error (USAGE) for `rotate`.
pub fn program_runnable(program: &std::path::Path) -> Result<u32, String> {
    let meta = std::fs::metadata(program)
        .map_err(|e| format!("program {}: {}", program.display(), crate::fsutil::io_reason(&e)))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if !meta.is_file() {
        return Err(format!(
            "program {} is not an executable file (not a regular file)",
            program.display()
        ));
    }
    if mode & 0o111 == 0 {
        return Err(format!(
            "program {} is not an executable file (mode {:04o})",
            program.display(),
            mode & 0o7777
        ));
    }
    Ok(mode)
}

/// A hook program must also be trusted (anyone who can write it, or replace it through
/// a folder above it, runs code as keyrotate): not writable by group or others, owned
/// by root or this user, in folders nobody else can change (DESIGN section 4.4).
/// `rotate` refuses such a program (ABORTED).
pub fn check_program(program: &std::path::Path) -> Result<(), String> {
    program_runnable(program)?;
    crate::fsutil::check_trusted(program, "program")
}

/// The command backend's own check before any hook step, shared by the real run and
/// the dry run: a program that is not trusted is refused (ABORTED).
pub fn preflight(program: &Path) -> Result<(), Failure> {
    check_program(program).map_err(|e| Failure::new(Outcome::Aborted, format!("{e}; refusing to run it")))
}

/// The command backend as a [`super::RotationBackend`].
pub struct CommandBackend {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub state_dir: PathBuf,
}

impl super::RotationBackend for CommandBackend {
    fn budget(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// The backend kills its own hung hooks at the deadline (SIGTERM, grace, SIGKILL);
    /// the watchdog is only a backstop behind that.
    fn watchdog_grace(&self) -> Duration {
        KILL_GRACE + Duration::from_secs(5)
    }

    fn plan(&self, _ledger: Option<&crate::ledger::Ledger>, plan: &mut Vec<String>) -> Result<super::Planned, Failure> {
        preflight(&self.program).inspect_err(|f| plan.push(format!("hook: {}", f.message)))?;
        // Quoted the way a shell would need it, so the plan shows exactly which
        // arguments the hook gets (an argument with a space is one argument).
        let words: Vec<String> = std::iter::once(self.program.to_string_lossy().into_owned())
            .chain(self.args.iter().cloned())
            .collect();
        let shown = shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| format!("{words:?}"));
        for step in STEPS {
            plan.push(format!("run: KEYROTATE_STEP={step} {shown}"));
        }
        plan.push("commit point: the 'set' step; a failure from there on blocks the domain".into());
        Ok(super::Planned {
            summary: "would run the hook's four steps".into(),
            versions: (None, None),
        })
    }

    fn diagnose(
        &self,
        _dead: &crate::ledger::RunRow,
        last_step: Option<&str>,
        _ledger: Option<&crate::ledger::Ledger>,
        _this_host: &str,
    ) -> String {
        match last_step.and_then(|s| s.strip_prefix("hook.")) {
            Some(hook) => {
                let (name, phase) = hook.split_once('.').unwrap_or((hook, ""));
                let when = if phase == "start" { "was running" } else { "had ended" };
                let target = if name == "create" && phase == "start" {
                    "the target was not changed yet"
                } else {
                    "the target may hold a half-rotated secret: check it"
                };
                format!("the hook step '{name}' {when} when it died; {target}")
            }
            None => {
                let step = last_step
                    .map(|s| format!("its last recorded step was '{s}'; "))
                    .unwrap_or_default();
                format!("{step}no hook step had started: the target was not changed")
            }
        }
    }

    fn check(&self) -> Vec<(&'static str, String)> {
        check_program(&self.program)
            .err()
            .map(|e| ("command", e))
            .into_iter()
            .collect()
    }

    fn run(&self, step: Step<'_>, _undo: super::PreCommitUndo) -> Result<Rotated, Failure> {
        CommandRotation {
            program: self.program.clone(),
            args: self.args.clone(),
            state_dir: self.state_dir.clone(),
            step,
        }
        .run()
    }
}
