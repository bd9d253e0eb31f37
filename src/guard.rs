//! What may stop a run before its commit point: the deadline and termination signals.
//!
//! `checkpoint` is called before every step that cannot be undone; it turns a pending
//! SIGTERM/SIGINT/SIGHUP into ABORTED and an expired deadline into TIMED_OUT. A step
//! that hangs never reaches the next checkpoint, so a watchdog thread fires at the
//! deadline and ends the process itself (the hung step is abandoned, exactly like a
//! crash before the commit: the old manifest stays authoritative). The main thread and
//! the watchdog race for one atomic phase, so the watchdog can never fire once the
//! commit has begun, and the commit can never begin once the watchdog has fired.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::deadline::Deadline;
use crate::outcome::{Failure, Outcome};

const PRE_COMMIT: u8 = 0;
const PAST_WATCH: u8 = 1;
const FIRED: u8 = 2;

#[derive(Clone)]
pub struct Guard {
    deadline: Deadline,
    signal: Arc<AtomicUsize>,
    phase: Arc<AtomicU8>,
    step: Arc<Mutex<&'static str>>,
}

fn signal_name(sig: usize) -> &'static str {
    match sig as i32 {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

impl Guard {
    /// Installs the signal flags. From here on SIGTERM/SIGINT/SIGHUP no longer kill
    /// the process; they are honoured at the next checkpoint.
    pub fn install(deadline: Deadline) -> Result<Guard, String> {
        let signal = Arc::new(AtomicUsize::new(0));
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)
                .map_err(|e| format!("cannot install a handler for signal {sig}: {e}"))?;
        }
        Ok(Guard {
            deadline,
            signal,
            phase: Arc::new(AtomicU8::new(PRE_COMMIT)),
            step: Arc::new(Mutex::new("start")),
        })
    }

    pub fn deadline(&self) -> &Deadline {
        &self.deadline
    }

    /// The signal received so far, if any.
    pub fn terminated(&self) -> Option<&'static str> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(signal_name(s)),
        }
    }

    /// Called before `step`: stop here if a signal came or the deadline passed.
    pub fn checkpoint(&self, step: &'static str) -> Result<(), Failure> {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = step;
        if let Some(sig) = self.terminated() {
            return Err(Failure::new(
                Outcome::Aborted,
                format!("terminated ({sig} received before {step})"),
            ));
        }
        if self.deadline.expired() {
            return Err(Failure::new(
                Outcome::TimedOut,
                format!(
                    "deadline {} reached before {step}",
                    crate::time::rfc3339(self.deadline.at())
                ),
            ));
        }
        Ok(())
    }

    /// The last checkpoint: after it the watchdog stands down and the commit runs to
    /// completion whatever arrives.
    pub fn enter_commit(&self) -> Result<(), Failure> {
        self.checkpoint("commit")?;
        self.stand_down();
        Ok(())
    }

    /// Stops the watchdog (commit started, or the run is ending on its own). If the
    /// watchdog won the race it is ending the process: wait for it.
    pub fn stand_down(&self) {
        match self
            .phase
            .compare_exchange(PRE_COMMIT, PAST_WATCH, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(PAST_WATCH) => {}
            Err(_) => loop {
                std::thread::park();
            },
        }
    }

    /// Bounds a step that runs before the watchdog is armed (the admission's reading
    /// of the plan, which may open a PKCS#11 token that never answers): at the
    /// deadline, unless `Backstop::disarm` came first, `on_fire` runs on its own
    /// thread and must end the process. Nothing is recorded before it is disarmed.
    /// It fires `after` the deadline, so that a step that bounds its own wait (the
    /// ledger's lock timeout) reports its own, more precise, time-out first.
    pub fn backstop(&self, after: std::time::Duration, on_fire: impl FnOnce() + Send + 'static) -> Backstop {
        Backstop::arm(&self.deadline, after, on_fire)
    }

    /// Starts the watchdog: `after` the deadline, if the run is still before its
    /// commit, `on_fire(step)` runs on the watchdog thread and must end the process.
    /// (A backend that kills its own hung steps at the deadline gets a late watchdog,
    /// as a backstop.)
    pub fn spawn_watchdog(&self, after: std::time::Duration, on_fire: impl FnOnce(&'static str) + Send + 'static) {
        let guard = self.clone();
        std::thread::Builder::new()
            .name("deadline-watchdog".into())
            .spawn(move || {
                let at = guard.deadline.instant() + after;
                loop {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    std::thread::park_timeout(at - now);
                    if guard.phase.load(Ordering::SeqCst) != PRE_COMMIT {
                        return;
                    }
                }
                if guard
                    .phase
                    .compare_exchange(PRE_COMMIT, FIRED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    let step = *guard.step.lock().unwrap_or_else(|e| e.into_inner());
                    on_fire(step);
                }
            })
            .expect("spawning the watchdog thread");
    }
}

/// See `Guard::backstop`.
pub struct Backstop {
    state: Arc<AtomicU8>,
    thread: std::thread::JoinHandle<()>,
}

impl Backstop {
    /// See `Guard::backstop`; also for a run without a guard (a dry run).
    pub fn arm(deadline: &Deadline, after: std::time::Duration, on_fire: impl FnOnce() + Send + 'static) -> Backstop {
        let state = Arc::new(AtomicU8::new(PRE_COMMIT));
        let watched = Arc::clone(&state);
        let at = deadline.instant() + after;
        let thread = std::thread::Builder::new()
            .name("admission-backstop".into())
            .spawn(move || {
                loop {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    std::thread::park_timeout(at - now);
                    if watched.load(Ordering::SeqCst) != PRE_COMMIT {
                        return;
                    }
                }
                if watched
                    .compare_exchange(PRE_COMMIT, FIRED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    on_fire();
                }
            })
            .expect("spawning the backstop thread");
        Backstop { state, thread }
    }

    /// Stands the backstop down. If it has already fired it is ending the process:
    /// the caller must not go on, so this never returns then.
    pub fn disarm(self) {
        if self
            .state
            .compare_exchange(PRE_COMMIT, PAST_WATCH, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            loop {
                std::thread::park();
            }
        }
        self.thread.thread().unpark();
    }
}
