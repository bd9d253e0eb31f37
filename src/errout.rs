//! Passing a hook's output to our own stderr without ever waiting on it.
//!
//! A scheduler (or a shell pipe) may read our stderr slowly or not at all. If passing
//! hook output through could block, the hook would block writing its own pipe and run
//! into its deadline, and our own last log lines would block behind it. So hook output
//! is written only when stderr can take it now (the caller buffers the rest), and on a
//! pipe only while a reserve is left free for keyrotate's own log lines; what a reader
//! never takes is dropped and counted (its tail is still kept in the ledger).

use std::time::{Duration, Instant};

/// Room left in a stderr pipe for keyrotate's own log lines.
const RESERVE: usize = 16 * 1024;
/// At most this much per write: a pipe that polls writable takes it without blocking.
const CHUNK: usize = 4096;

/// Writes as much of `buf` (hook output) to stderr as it takes within `wait`, leaving
/// the reserve free; returns how many bytes were written (the rest is the caller's to
/// keep or drop).
pub fn write_some(buf: &[u8], wait: Duration) -> usize {
    write(buf, wait, true)
}

/// Like [`write_some`], for keyrotate's own short notes, which may use the reserve.
pub fn write_own(buf: &[u8], wait: Duration) -> usize {
    write(buf, wait, false)
}

fn write(buf: &[u8], wait: Duration, keep_reserve: bool) -> usize {
    let until = Instant::now() + wait;
    let mut done = 0;
    while done < buf.len() {
        let left = until.saturating_duration_since(Instant::now());
        if !writable(left) || (keep_reserve && !pipe_has_room()) {
            break;
        }
        let end = (done + CHUNK).min(buf.len());
        // SAFETY: writing initialised bytes from a live slice to fd 2.
        let n = unsafe { libc::write(2, buf[done..end].as_ptr().cast(), end - done) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        done += n as usize;
    }
    done
}

fn writable(wait: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: 2,
        events: libc::POLLOUT,
        revents: 0,
    }];
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, its length passed with it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    n == 1 && fds[0].revents & libc::POLLOUT != 0 && fds[0].revents & (libc::POLLERR | libc::POLLHUP) == 0
}

/// On a pipe: whether more than the reserve is free. Anything else: true.
fn pipe_has_room() -> bool {
    // SAFETY: fstat into a zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, a valid stat we own; a bad fd is an error return.
    if unsafe { libc::fstat(2, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return true;
    }
    // SAFETY: F_GETPIPE_SZ and FIONREAD only read the pipe's sizes.
    let size = unsafe { libc::fcntl(2, libc::F_GETPIPE_SZ) };
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `queued`, which we own.
    let rc = unsafe { libc::ioctl(2, libc::FIONREAD, &mut queued) };
    if size <= 0 || rc != 0 {
        return true;
    }
    (size as usize).saturating_sub(queued.max(0) as usize) > RESERVE + CHUNK
}
