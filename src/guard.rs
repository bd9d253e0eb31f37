//! What may stop a run before its commit point: the deadline and termination signals.
//!
//! `checkpoint` is called before every step that cannot be undone; it turns a pending
//! SIGTERM/SIGINT/SIGHUP into ABORTED and an expired deadline into TIMED_OUT. A step
//! that hangs never reaches the next checkpoint, so a watchdog (on the process's one
//! timer thread, see the `timer` module below) fires at the deadline and ends the
//! process itself (the hung step is abandoned, exactly like a crash before the commit:
//! the old manifest stays authoritative). The main thread and
//! the watchdog race for one atomic phase, so the watchdog can never fire once the
//! commit has begun, and the commit can never begin once the watchdog has fired.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    /// deadline, unless `Backstop::disarm` came first, `on_fire` runs on the timer
    /// thread and must end the process. Nothing is recorded before it is disarmed.
    /// It fires `after` the deadline, so that a step that bounds its own wait (the
    /// ledger's lock timeout) reports its own, more precise, time-out first.
    pub fn backstop(&self, after: std::time::Duration, on_fire: impl FnOnce() + Send + 'static) -> Backstop {
        Backstop::arm(&self.deadline, after, on_fire)
    }

    /// Starts the watchdog: `after` the deadline, if the run is still before its
    /// commit, `on_fire(step)` runs on the timer thread and must end the process.
    /// (A backend that kills its own hung steps at the deadline gets a late watchdog,
    /// as a backstop.)
    pub fn spawn_watchdog(&self, after: std::time::Duration, on_fire: impl FnOnce(&'static str) + Send + 'static) {
        let step = Arc::clone(&self.step);
        timer::arm(
            self.deadline.instant(),
            after,
            Arc::clone(&self.phase),
            Box::new(move || {
                let step = *step.lock().unwrap_or_else(|e| e.into_inner());
                on_fire(step);
            }),
        );
    }
}

/// See `Guard::backstop`.
pub struct Backstop {
    phase: Arc<AtomicU8>,
}

impl Backstop {
    /// See `Guard::backstop`; also for a run without a guard (a dry run).
    pub fn arm(deadline: &Deadline, after: std::time::Duration, on_fire: impl FnOnce() + Send + 'static) -> Backstop {
        let phase = Arc::new(AtomicU8::new(PRE_COMMIT));
        timer::arm(deadline.instant(), after, Arc::clone(&phase), Box::new(on_fire));
        Backstop { phase }
    }

    /// Stands the backstop down. If it has already fired it is ending the process:
    /// the caller must not go on, so this never returns then.
    pub fn disarm(self) {
        if self
            .phase
            .compare_exchange(PRE_COMMIT, PAST_WATCH, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            loop {
                std::thread::park();
            }
        }
        // The timer is not woken: it drops this entry when it next wakes. Waking it
        // now would cost a futex call and a context switch for nothing.
    }
}

/// The process's one timer thread, shared by every bound a run sets (the admission
/// backstop, then the deadline watchdog; a dry run's or a read-only command's
/// backstop). A thread costs a clone, a stack mapping and, with glibc, a malloc arena
/// of its own: a run pays for one, started the first time a bound is armed, and a run
/// that arms none (refused before it reads anything) starts none.
///
/// Why a thread at all: a step can hang where no signal reaches it (a read on a hard
/// NFS mount, a PKCS#11 module waiting on its token), and the end of a run at its
/// deadline records the outcome (ledger, audit line, report), which a signal handler
/// cannot do. Only another thread can.
mod timer {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use super::{FIRED, PRE_COMMIT};

    /// One armed bound: `after` its deadline, if `phase` is still `PRE_COMMIT`, the
    /// timer claims it (`FIRED`) and runs `action`, which ends the process. Whoever
    /// moves `phase` on first wins: the armer by standing down, or the timer by firing.
    struct Entry {
        deadline: Instant,
        at: Instant,
        phase: Arc<AtomicU8>,
        action: Box<dyn FnOnce() + Send>,
    }

    impl Entry {
        /// When the timer must look at this entry next. Before the deadline it looks
        /// at the deadline itself, not `after` it: a run arms its bounds one after the
        /// other (the backstop fires a second after the deadline, the watchdog that
        /// replaces it at the deadline), and a timer already due at the deadline needs
        /// no wake-up (a futex call and a context switch) when the next one is armed.
        fn look_at(&self, now: Instant) -> Instant {
            if now < self.deadline {
                self.deadline
            } else {
                self.at
            }
        }
    }

    /// What the timer thread is doing, so that arming wakes it only when it must.
    enum Sleep {
        /// Not waiting (starting, or looking at the entries): it sees a new entry anyway.
        Awake,
        /// Waiting until this instant.
        Until(Instant),
        /// Waiting for an entry.
        Idle,
    }

    struct State {
        entries: Vec<Entry>,
        sleep: Sleep,
    }

    struct Timer {
        state: Mutex<State>,
        wake: Condvar,
    }

    static TIMER: OnceLock<Timer> = OnceLock::new();

    /// Arms one bound; starts the timer thread the first time.
    pub(super) fn arm(deadline: Instant, after: Duration, phase: Arc<AtomicU8>, action: Box<dyn FnOnce() + Send>) {
        let mut started = false;
        let timer = TIMER.get_or_init(|| {
            started = true;
            Timer {
                state: Mutex::new(State {
                    entries: Vec::new(),
                    sleep: Sleep::Awake,
                }),
                wake: Condvar::new(),
            }
        });
        let entry = Entry {
            deadline,
            at: deadline + after,
            phase,
            action,
        };
        let mut state = timer.state.lock().unwrap_or_else(|e| e.into_inner());
        let wake = match state.sleep {
            Sleep::Awake => false,
            Sleep::Until(t) => entry.look_at(Instant::now()) < t,
            Sleep::Idle => true,
        };
        state.entries.push(entry);
        drop(state);
        if started {
            std::thread::Builder::new()
                .name("keyrotate-timer".into())
                .spawn(move || run(timer))
                .expect("spawning the timer thread");
        } else if wake {
            timer.wake.notify_one();
        }
    }

    fn run(timer: &'static Timer) {
        let mut state = timer.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            state.sleep = Sleep::Awake;
            // Stood down (or, impossibly, fired): nothing left to watch for them.
            state.entries.retain(|e| e.phase.load(Ordering::SeqCst) == PRE_COMMIT);
            let now = Instant::now();
            if let Some(i) = state.entries.iter().position(|e| e.at <= now) {
                let due = state.entries.swap_remove(i);
                if due
                    .phase
                    .compare_exchange(PRE_COMMIT, FIRED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    // Not under the lock: the action ends the process, and a main
                    // thread arming or standing down meanwhile must not block on it.
                    drop(state);
                    (due.action)();
                    state = timer.state.lock().unwrap_or_else(|e| e.into_inner());
                }
                continue;
            }
            state = match state.entries.iter().map(|e| e.look_at(now)).min() {
                Some(next) => {
                    state.sleep = Sleep::Until(next);
                    timer
                        .wake
                        .wait_timeout(state, next - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => {
                    state.sleep = Sleep::Idle;
                    timer.wake.wait(state).unwrap_or_else(|e| e.into_inner())
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn deadline_in(ms: u64) -> Deadline {
        Deadline::parse(&format!("{ms}ms"), Duration::from_secs(60)).unwrap()
    }

    /// The timer fires each bound at its own time, whatever was armed before it: a
    /// later bound does not wait for an earlier one's later instant, an earlier one
    /// wakes a timer asleep until later, and a bound stood down never fires.
    #[test]
    fn one_timer_fires_every_bound_on_time_and_never_a_disarmed_one() {
        let (tx, rx) = mpsc::channel::<(&'static str, Instant)>();
        let send = |name: &'static str| {
            let tx = tx.clone();
            move || tx.send((name, Instant::now())).unwrap()
        };
        let start = Instant::now();
        // Asleep until 3 s from now (its deadline): an earlier bound must wake it.
        let late = Backstop::arm(&deadline_in(3000), Duration::from_secs(5), send("late"));
        let early = deadline_in(100);
        let standing_down = Backstop::arm(&early, Duration::from_secs(1), send("disarmed"));
        standing_down.disarm();
        // Armed after, at the same deadline, with no delay: fires at the deadline, not
        // at the disarmed one's second later.
        let _on_time = Backstop::arm(&early, Duration::ZERO, send("on time"));
        let (name, at) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name, "on time");
        let took = at - start;
        assert!(took >= Duration::from_millis(100), "fired early: {took:?}");
        assert!(took < Duration::from_millis(900), "fired late: {took:?}");
        // Nothing else within the disarmed bound's time.
        assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
        late.disarm();
    }
}
