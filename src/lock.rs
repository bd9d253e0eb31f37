//! The per-domain OS lock: `<state.dir>/locks/<domain>.lock`, exclusive and
//! non-blocking (flock(2), through std's `File::try_lock`), held for the whole run and released by the
//! kernel when the process dies, however it dies.
//!
//! The holder writes who it is into the file so that a refused run can name it. A dry
//! run must not take the lock, so [`probe`] learns whether it is held from
//! `/proc/locks` instead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Who holds (or last held) a domain lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub run_id: String,
    pub pid: u32,
    pub host: String,
    pub started_at: String,
}

impl Holder {
    pub fn describe(&self) -> String {
        format!(
            "run {} (pid {} on {}, since {})",
            self.run_id, self.pid, self.host, self.started_at
        )
    }
}

/// A held domain lock; released on drop (and by the kernel on exit).
#[derive(Debug)]
pub struct DomainLock {
    file: File,
    path: PathBuf,
}

pub enum Acquire {
    Acquired(DomainLock),
    /// Held by someone else: the holder as the lock file names it, if readable.
    Busy(Option<Holder>),
}

pub fn lock_path(lock_dir: &Path, domain: &str) -> PathBuf {
    lock_dir.join(format!("{domain}.lock"))
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

impl DomainLock {
    /// Tries once to take the lock; never waits.
    pub fn try_acquire(path: &Path) -> Result<Acquire, String> {
        let file = open_lock_file(path).map_err(|e| {
            // O_NOFOLLOW's ELOOP reads as "too many levels of symbolic links": say what it is.
            check_openable(path)
                .err()
                .unwrap_or_else(|| format!("lock file {}: {}", path.display(), crate::fsutil::io_reason(&e)))
        })?;
        match file.try_lock() {
            Ok(()) => Ok(Acquire::Acquired(DomainLock {
                file,
                path: path.to_path_buf(),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(Acquire::Busy(read_holder(path))),
            Err(std::fs::TryLockError::Error(e)) => Err(format!(
                "lock file {}: {}",
                path.display(),
                crate::fsutil::io_reason(&e)
            )),
        }
    }

    /// Records the holder in the lock file for diagnostics (not durable: it only
    /// matters while the lock is held).
    pub fn write_holder(&mut self, holder: &Holder) -> Result<(), String> {
        let mut line = serde_json::to_vec(holder).expect("json");
        line.push(b'\n');
        let res = (|| {
            self.file.set_len(0)?;
            self.file.rewind()?;
            self.file.write_all(&line)
        })();
        res.map_err(|e| format!("lock file {}: {}", self.path.display(), crate::fsutil::io_reason(&e)))
    }
}

/// The holder named in a lock file, if it can be read and parsed.
pub fn read_holder(path: &Path) -> Option<Holder> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let mut s = String::new();
    Read::by_ref(&mut f).take(4096).read_to_string(&mut s).ok()?;
    serde_json::from_str(s.trim()).ok()
}

/// Whether the lock at `path` is held right now, without taking it: `Some(pid)` of a
/// holder listed in `/proc/locks`, `None` if free or if there is no lock file.
/// `Err` when it cannot be known (no `/proc/locks`).
/// What the real run meets when it opens a lock file that exists but is not a regular
/// file (it opens with O_NOFOLLOW): the dry run says so rather than predicting a
/// rotation.
pub fn check_openable(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "lock file {} is a symlink; refusing to follow it (move it away)",
            path.display()
        )),
        Ok(m) if !m.is_file() => Err(format!("lock file {} is not a regular file", path.display())),
        _ => Ok(()),
    }
}

pub fn probe(path: &Path) -> Result<Option<u32>, String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "lock file {}: {}",
                path.display(),
                crate::fsutil::io_reason(&e)
            ))
        }
    };
    let locks =
        fs::read_to_string("/proc/locks").map_err(|e| format!("/proc/locks: {}", crate::fsutil::io_reason(&e)))?;
    let (maj, min) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let want = format!("{maj:02x}:{min:02x}:{}", meta.ino());
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF" ("->" marks waiters)
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 6 && fields[1] == "FLOCK" && !fields.contains(&"->") && fields[5] == want {
            return Ok(fields[4].parse().ok());
        }
    }
    Ok(None)
}
