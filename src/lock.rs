//! The per-domain OS lock: `<state.dir>/locks/<domain>.lock`, exclusive and
//! non-blocking (flock(2), through std's `File::try_lock`), held for the whole run and released by the
//! kernel when the process dies, however it dies.
//!
//! The holder writes who it is into the file so that a refused run can name it. A dry
//! run must not take the lock, so [`probe`] learns whether it is held from
//! `/proc/locks` instead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
    /// The file's length when the lock was taken: the holder record is written over it
    /// in place.
    len: u64,
}

pub enum Acquire {
    Acquired(DomainLock),
    /// Held by someone else: the holder as the lock file names it, if readable.
    Busy(Option<Holder>),
}

pub fn lock_path(lock_dir: &Path, domain: &str) -> PathBuf {
    lock_dir.join(format!("{domain}.lock"))
}

/// The lock file, opened (created if absent).
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
            Ok(()) => {
                // The length once the lock is ours, not when the file was opened: the
                // last holder may have written a longer record in between (it held the
                // flock then), and `write_holder` must cut that record's tail. Unknown
                // length: cut whatever is there.
                let len = file.metadata().map_or(u64::MAX, |m| m.len());
                Ok(Acquire::Acquired(DomainLock {
                    file,
                    path: path.to_path_buf(),
                    len,
                }))
            }
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
    ///
    /// Written over the last holder's record in place, then cut to its own length only
    /// if the file was longer: emptying the file first (as `O_TRUNC` or `set_len(0)`
    /// would) makes the file system free the file's block and allocate it again on
    /// every run, which costs a journal update, and records are nearly always the same
    /// length. A reader never sees a stale tail: the length is exact once this returns.
    pub fn write_holder(&mut self, holder: &Holder) -> Result<(), String> {
        let mut line = serde_json::to_vec(holder).expect("json");
        line.push(b'\n');
        let res = (|| {
            self.file.write_all_at(&line, 0)?;
            let len = line.len() as u64;
            if self.len > len {
                self.file.set_len(len)?;
            }
            self.len = len;
            Ok::<(), io::Error>(())
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

/// Which of a domain's locks a run met held.
#[derive(Clone, Debug, PartialEq)]
pub enum Which {
    /// The state flock, `<state.dir>/locks/<domain>.lock`.
    State,
    /// The shared ledger's lock on the domain (PostgreSQL's session advisory lock).
    Shared,
    /// The key store's flock, `<keystore>/<domain>/.lock`.
    KeyStore(PathBuf),
}

/// A lock held by someone else: which one, and who holds it as far as it says.
#[derive(Clone, Debug)]
pub struct Busy {
    pub which: Which,
    pub holder: Option<Holder>,
}

/// The lock a shared ledger's session takes on a domain, so that hosts with their own
/// state folders still exclude each other. An embedded ledger grants it at once.
pub trait SharedLock {
    /// Takes it for this session, without waiting: `false` when another session has it.
    fn try_lock_domain(&self, domain: &str) -> Result<bool, String>;
    /// Whether another session holds it, without taking it (the dry run's probe).
    fn locked_elsewhere(&self, domain: &str) -> Result<bool, String>;
    /// Who holds it, as the ledger names the domain's run in flight.
    fn holder(&self, domain: &str) -> Option<Holder>;
}

/// A domain's locks as one value, in the one order every caller takes them: the state
/// flock, then the shared ledger's lock, then the key store's flock. Callers never pair
/// them by hand: a step either adds its lock to the set or answers [`Busy`]; whatever
/// was taken is released together when the set is dropped (and by the kernel, or the
/// server when the session ends, if the process dies).
#[derive(Debug, Default)]
pub struct DomainLocks {
    state: Option<DomainLock>,
    keystore: Option<DomainLock>,
    shared: bool,
}

impl DomainLocks {
    /// Takes the state flock, naming `me` (a run) in it for whoever is refused next.
    pub fn take_state(
        &mut self,
        lock_dir: &Path,
        domain: &str,
        me: Option<&Holder>,
    ) -> Result<Result<(), Busy>, String> {
        let path = lock_path(lock_dir, domain);
        Ok(take_file(&path, me, Which::State)?.map(|l| self.state = Some(l)))
    }

    /// Takes the shared ledger's lock on `domain`, through the ledger's session.
    pub fn take_shared<S: SharedLock + ?Sized>(
        &mut self,
        ledger: &S,
        domain: &str,
    ) -> Result<Result<(), Busy>, String> {
        if ledger.try_lock_domain(domain)? {
            self.shared = true;
            return Ok(Ok(()));
        }
        Ok(Err(Busy {
            which: Which::Shared,
            holder: ledger.holder(domain),
        }))
    }

    /// Takes the key store's flock at `path` (`Keystore::lock_path`).
    pub fn take_keystore(&mut self, path: &Path, me: Option<&Holder>) -> Result<Result<(), Busy>, String> {
        Ok(take_file(path, me, Which::KeyStore(path.to_path_buf()))?.map(|l| self.keystore = Some(l)))
    }

    /// All of them, in order, for a caller with nothing to do between the steps: the held
    /// set, or which lock was busy and who holds it. `Err` names the lock that failed.
    pub fn acquire<S: SharedLock + ?Sized>(
        lock_dir: &Path,
        domain: &str,
        ledger: &S,
        keystore_lock: Option<&Path>,
        me: Option<&Holder>,
    ) -> Result<Result<DomainLocks, Busy>, String> {
        let mut locks = DomainLocks::default();
        if let Err(b) = locks.take_state(lock_dir, domain, me)? {
            return Ok(Err(b));
        }
        if let Err(b) = locks.take_shared(ledger, domain)? {
            return Ok(Err(b));
        }
        if let Some(path) = keystore_lock {
            if let Err(b) = locks.take_keystore(path, me)? {
                return Ok(Err(b));
            }
        }
        Ok(Ok(locks))
    }
}

/// One flock taken, with its holder line written; or who has it.
fn take_file(path: &Path, me: Option<&Holder>, which: Which) -> Result<Result<DomainLock, Busy>, String> {
    match DomainLock::try_acquire(path)? {
        Acquire::Busy(holder) => Ok(Err(Busy { which, holder })),
        Acquire::Acquired(mut l) => {
            // The holder line only helps the next refused run name us: not fatal.
            if let Some(Err(e)) = me.map(|me| l.write_holder(me)) {
                tracing::warn!("{e}");
            }
            Ok(Ok(l))
        }
    }
}

/// The dry run's view of one flock, in the words of [`DomainLocks`]: `Ok(None)` when
/// free, `Ok(Some(busy))` naming the holder as the real run would (by the lock file, or
/// not at all), `Err` when it cannot be known.
pub fn probe_file(path: &Path, which: Which) -> Result<Option<Busy>, String> {
    Ok(probe(path)?.map(|_pid| Busy {
        which,
        holder: read_holder(path),
    }))
}

/// The dry run's view of the shared ledger's lock.
pub fn probe_shared<S: SharedLock + ?Sized>(ledger: &S, domain: &str) -> Result<Option<Busy>, String> {
    Ok(ledger.locked_elsewhere(domain)?.then(|| Busy {
        which: Which::Shared,
        holder: ledger.holder(domain),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared ledger's lock as a test sets it: free, or held by `by`.
    struct Shared(Option<Holder>);

    impl SharedLock for Shared {
        fn try_lock_domain(&self, _: &str) -> Result<bool, String> {
            Ok(self.0.is_none())
        }
        fn locked_elsewhere(&self, _: &str) -> Result<bool, String> {
            Ok(self.0.is_some())
        }
        fn holder(&self, _: &str) -> Option<Holder> {
            self.0.clone()
        }
    }

    fn me(run_id: &str) -> Holder {
        Holder {
            run_id: run_id.into(),
            pid: 1,
            host: "h".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn the_domain_locks_answer_which_lock_is_busy_and_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let ks = dir.path().join("ks.lock");
        let free = Shared(None);
        let first = DomainLocks::acquire(dir.path(), "web", &free, Some(&ks), Some(&me("one")))
            .unwrap()
            .expect("all free");

        // Held by `first`: the state lock is met first, named by its holder line.
        let busy = DomainLocks::acquire(dir.path(), "web", &free, Some(&ks), Some(&me("two")))
            .unwrap()
            .unwrap_err();
        assert_eq!(busy.which, Which::State);
        assert_eq!(busy.holder, Some(me("one")));
        // The dry run's probe finds the same lock and the same holder.
        let probed = probe_file(&lock_path(dir.path(), "web"), Which::State)
            .unwrap()
            .expect("held");
        assert_eq!(probed.holder, Some(me("one")));

        // Another domain's state lock is free, the shared key store lock is not.
        let busy = DomainLocks::acquire(dir.path(), "api", &free, Some(&ks), None)
            .unwrap()
            .unwrap_err();
        assert_eq!(busy.which, Which::KeyStore(ks.clone()));
        drop(first);

        // The shared ledger's lock held by another host: named as the ledger names it,
        // and what was taken before it is released with the refused set.
        let elsewhere = Shared(Some(me("remote")));
        let busy = DomainLocks::acquire(dir.path(), "web", &elsewhere, Some(&ks), None)
            .unwrap()
            .unwrap_err();
        assert_eq!((busy.which, busy.holder), (Which::Shared, Some(me("remote"))));
        assert_eq!(
            probe_shared(&elsewhere, "web").unwrap().map(|b| b.which),
            Some(Which::Shared)
        );
        assert!(probe_file(&lock_path(dir.path(), "web"), Which::State)
            .unwrap()
            .is_none());
        assert!(DomainLocks::acquire(dir.path(), "web", &free, Some(&ks), None)
            .unwrap()
            .is_ok());
    }
}
