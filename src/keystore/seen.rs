//! What an inspection read, by identity, so that the same process may reuse it.
//!
//! A run inspects its key store several times under the key store lock (the repair
//! pass, the plan recorded at admission, the rotation itself), and each inspection
//! reads the manifest, every live key file, the folder listing and `jwks.json`. The
//! lock keeps other keyrotate processes out, but not a person or program that writes
//! the folder anyway, so an inspection is reused only on proof that nothing it read
//! has changed since: the stamp (device, inode, size, mode, mtime, ctime) of the folder
//! and of every file it read (or found absent) is taken before the read, and compared
//! again, path by path, before the reuse. Any difference means a fresh inspection.
//!
//! Why the stamps are proof: every change to a file's bytes, mode, owner or name, and
//! every entry created, removed or renamed in the folder, sets the changed inode's
//! ctime to the current time, which no caller can choose. The ctime comes from the
//! kernel's clock, which is never behind the coarse clock read before the stamps
//! were taken (`start`). So a stamp whose ctime is older than `start` cannot be
//! reproduced by a later change; a stamp whose ctime is not older (the file changed
//! in the same clock tick as the inspection began: the "racy" case git's index knows)
//! could, and such an inspection is never remembered. A file system that keeps whole
//! seconds makes that tick a second (two on FAT): see `settled_before`. Replacing a file by another
//! one (rename over it) gives the path another inode. Token objects are not files:
//! an inspection that listed a token is never remembered either.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::Inspection;

/// The identity and last change of one inode, as `lstat` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// `lstat(path)`: `Ok(None)` when nothing is there.
    fn at(path: &Path) -> io::Result<Option<Stamp>> {
        match std::fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(Stamp::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The coarse wall clock: never ahead of the time the kernel stamps a change with.
fn coarse_now() -> (i64, i64) {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call;
    // CLOCK_REALTIME_COARSE needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc != 0 {
        // No clock: nothing can be proven settled.
        return (i64::MIN, 0);
    }
    (ts.tv_sec, ts.tv_nsec)
}

/// Whether a change at `ctime` can no longer be reproduced by a change at `start` or
/// later. A change time with no fraction of a second may come from a file system that
/// keeps whole seconds (ext4 with 128-byte inodes, ext3, an NFS server that does) or
/// two (FAT): there a later change in the same second (or two) gets the very same
/// change time, however much later than `start` it comes, so such a stamp proves
/// nothing until two whole seconds have passed. (On a nanosecond file system a change
/// time falls on a whole second about once in the coarse clock's ticks per second: that
/// run merely inspects again.)
fn settled_before(ctime: (i64, i64), start: (i64, i64)) -> bool {
    if ctime.1 == 0 {
        ctime.0.saturating_add(2) <= start.0
    } else {
        ctime < start
    }
}

/// The stamps of one inspection, gathered while it reads.
pub(super) struct Reads {
    start: (i64, i64),
    stamps: Vec<(PathBuf, Option<Stamp>)>,
    /// Something was read that stamps cannot vouch for (a token, a failed stat).
    unprovable: bool,
}

impl Reads {
    pub(super) fn start() -> Reads {
        Reads {
            start: coarse_now(),
            stamps: Vec::new(),
            unprovable: false,
        }
    }

    /// Stamps `path` now, before it is read (a folder before it is listed).
    pub(super) fn before_reading(&mut self, path: &Path) {
        match Stamp::at(path) {
            Ok(s) => self.stamps.push((path.to_path_buf(), s)),
            Err(_) => self.unprovable = true,
        }
    }

    /// Records the stamp of a file read through a descriptor, taken before its bytes.
    pub(super) fn read(&mut self, path: &Path, meta: &std::fs::Metadata) {
        self.stamps.push((path.to_path_buf(), Some(Stamp::of(meta))));
    }

    /// Records that `path` was found absent: its later creation must be noticed.
    pub(super) fn absent(&mut self, path: &Path) {
        self.stamps.push((path.to_path_buf(), None));
    }

    /// The inspection also read what no stamp covers.
    pub(super) fn unprovable(&mut self) {
        self.unprovable = true;
    }

    /// Every present stamp changed before the inspection began: a later change
    /// cannot reproduce it.
    fn settled(&self) -> bool {
        !self.unprovable
            && self
                .stamps
                .iter()
                .filter_map(|(_, s)| s.as_ref())
                .all(|s| settled_before(s.ctime, self.start))
    }

    /// The stamps, read again now, are unchanged.
    fn unchanged(&self) -> bool {
        self.stamps
            .iter()
            .all(|(path, was)| Stamp::at(path).is_ok_and(|now| now == *was))
    }
}

struct Remembered {
    dir: PathBuf,
    domain: String,
    revoking: Option<u64>,
    reads: Reads,
    inspection: Arc<Inspection>,
    generation: u64,
}

/// The few domains one process inspects again (a run inspects one).
const CAPACITY: usize = 4;

static MEMO: Mutex<(u64, Vec<Remembered>)> = Mutex::new((0, Vec::new()));

/// An earlier inspection of `dir` for the same revocation, if nothing it read has
/// changed since, with its generation (equal generations: the same unchanged reads).
pub(super) fn recall(dir: &Path, domain: &str, revoking: Option<u64>) -> Option<(Arc<Inspection>, u64)> {
    let memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
    let r = memo
        .1
        .iter()
        .find(|r| r.dir == dir && r.domain == domain && r.revoking == revoking)?;
    r.reads.unchanged().then(|| (Arc::clone(&r.inspection), r.generation))
}

/// Remembers an inspection whose reads are settled; returns its generation.
pub(super) fn remember(
    dir: &Path,
    domain: &str,
    revoking: Option<u64>,
    reads: Reads,
    inspection: &Arc<Inspection>,
) -> Option<u64> {
    let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
    memo.1
        .retain(|r| !(r.dir == dir && r.domain == domain && r.revoking == revoking));
    if !reads.settled() {
        return None;
    }
    memo.0 += 1;
    let generation = memo.0;
    if memo.1.len() >= CAPACITY {
        memo.1.remove(0);
    }
    memo.1.push(Remembered {
        dir: dir.to_path_buf(),
        domain: domain.to_string(),
        revoking,
        reads,
        inspection: Arc::clone(inspection),
        generation,
    });
    Some(generation)
}

/// Key folders this process already brought to their access ([`super::Keystore::prepare`]),
/// with the stamps of the key store and domain folders it left.
type Prepared = (
    PathBuf,
    PathBuf,
    Option<crate::fsutil::Access>,
    Option<Stamp>,
    Option<Stamp>,
);

static PREPARED: Mutex<Vec<Prepared>> = Mutex::new(Vec::new());

fn folder_stamps(root: &Path, dir: &Path) -> Option<(Option<Stamp>, Option<Stamp>)> {
    Some((Stamp::at(root).ok()?, Stamp::at(dir).ok()?))
}

/// Whether this process prepared `dir` with `access` and neither folder changed since.
///
/// A second preparation in one run (the admission's, then the rotation's) can be left
/// out. What it checks of the folders (type, mode, owner) is part of their stamps, so
/// an unchanged stamp is that check passing again. What it fixes of the files' modes
/// could only have been undone by a change after the first preparation, which the
/// second one does not guard against any better than against a change right after
/// itself: the run reads and writes the same files either way.
pub(super) fn prepared_before(root: &Path, dir: &Path, access: &Option<crate::fsutil::Access>) -> bool {
    let memo = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_, _, _, r, d)) = memo
        .iter()
        .find(|(mr, md, ma, _, _)| mr == root && md == dir && ma == access)
    else {
        return false;
    };
    folder_stamps(root, dir).is_some_and(|(now_r, now_d)| now_r == *r && now_d == *d)
}

/// Records that `dir` was just prepared with `access`.
pub(super) fn prepared(root: &Path, dir: &Path, access: &Option<crate::fsutil::Access>) {
    let Some((r, d)) = folder_stamps(root, dir) else {
        return;
    };
    let mut memo = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    memo.retain(|(mr, md, _, _, _)| !(mr == root && md == dir));
    if memo.len() >= CAPACITY {
        memo.remove(0);
    }
    memo.push((root.to_path_buf(), dir.to_path_buf(), access.clone(), r, d));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changed_in_the_tick_an_inspection_began_is_never_vouched_for() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        let reads = {
            let mut reads = Reads::start();
            // Written after the clock was read: its ctime is not older than `start`.
            std::fs::write(&path, b"one").unwrap();
            reads.before_reading(&path);
            reads
        };
        assert!(!reads.settled());
        assert!(reads.unchanged());
    }

    #[test]
    fn a_whole_second_change_time_is_settled_only_two_seconds_later() {
        assert!(!settled_before((100, 0), (100, 900_000_000)));
        assert!(!settled_before((100, 0), (101, 999_999_999)));
        assert!(settled_before((100, 0), (102, 0)));
        assert!(settled_before((100, 1), (100, 2)));
        assert!(!settled_before((100, 2), (100, 2)));
    }

    #[test]
    fn any_change_to_a_stamped_file_or_folder_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        std::fs::write(&path, b"one").unwrap();
        // Past the coarse clock's tick (a few milliseconds at most).
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut reads = Reads::start();
        reads.before_reading(d.path());
        reads.before_reading(&path);
        reads.absent(&d.path().join("g"));
        assert!(reads.settled());
        assert!(reads.unchanged());
        // Same size, same inode, other bytes.
        std::fs::write(&path, b"two").unwrap();
        assert!(!reads.unchanged());

        let mut reads = Reads::start();
        reads.before_reading(d.path());
        reads.absent(&d.path().join("g"));
        std::fs::write(d.path().join("g"), b"").unwrap();
        assert!(!reads.unchanged());
    }
}
