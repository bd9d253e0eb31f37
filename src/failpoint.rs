//! Test-only fault injection at every durable step.
//!
//! Each fsync, rename, unlink, symlink and ledger write calls [`hit`] with the step's
//! name and operation (`jwks.rename`). In a normal build `hit` is an empty inline function. Built with the
//! `failpoints` feature, it counts the steps and reads `KEYROTATE_FAILPOINTS`, a
//! comma-separated list of `TARGET=ACTION`:
//!
//! - TARGET is `N` (the N-th step this process reaches, from 1) or a step name;
//! - ACTION is `kill` (SIGKILL to itself: the process dies at that instruction, as
//!   under Control-M's Kill), `term` (SIGTERM to itself, then carry on, as a polite
//!   stop request arriving at that moment), `panic`, `error` (the step fails with an
//!   I/O error) or `sleep(MS)`.
//!
//! With `KEYROTATE_FAILPOINT_LOG=FILE` every step reached is appended to FILE as
//! `N NAME`, which is how the crash tests learn how many steps a rotation has.

use std::io;

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_step: &str, _op: &str) -> io::Result<()> {
    Ok(())
}

#[cfg(feature = "failpoints")]
pub fn hit(step: &str, op: &str) -> io::Result<()> {
    use std::io::Write;
    let step = &format!("{step}.{op}");
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(log) = std::env::var_os("KEYROTATE_FAILPOINT_LOG") {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        writeln!(f, "{n} {step}")?;
    }
    let Ok(spec) = std::env::var("KEYROTATE_FAILPOINTS") else {
        return Ok(());
    };
    for rule in spec.split(',').filter(|r| !r.is_empty()) {
        let Some((target, action)) = rule.split_once('=') else {
            continue;
        };
        let matches = match target.parse::<usize>() {
            Ok(k) => k == n,
            Err(_) => target == step,
        };
        if !matches {
            continue;
        }
        match action {
            // SAFETY: raise(3) only sends a signal to this process; it has no memory
            // preconditions. (Test-only: the crash suite's simulated crash.)
            "kill" => unsafe {
                libc::raise(libc::SIGKILL);
            },
            // SAFETY: as above; SIGTERM goes to keyrotate's own handler.
            "term" => unsafe {
                libc::raise(libc::SIGTERM);
            },
            "panic" => panic!("failpoint {step}"),
            "error" => return Err(io::Error::other(format!("injected failure at {step}"))),
            a if a.starts_with("sleep(") && a.ends_with(')') => {
                let ms: u64 = a[6..a.len() - 1].parse().unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            _ => {}
        }
    }
    Ok(())
}
