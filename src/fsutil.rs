//! Durable, symlink-safe file operations.
//!
//! Every write that must survive a crash goes through here: write a temporary file,
//! fsync it, rename it into place, fsync the folder. Files are opened with
//! `O_NOFOLLOW` so a planted symlink cannot redirect a key write, and created 0600
//! (then `fchmod`ed, so the umask cannot widen or narrow them). Each durable operation
//! first calls [`failpoint::hit`], which is how the crash tests stop the process
//! between any two of them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::failpoint;

/// Whether an operation fsyncs its folder itself, or leaves that to a later
/// [`fsync_dir`] that covers a batch of operations in the same folder (each operation
/// is atomic on its own, so any subset of a batch surviving a power loss is a
/// consistent state; the batch is durable once the folder is synced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirSync {
    Now,
    Deferred,
}

pub const PRIVATE_FILE_MODE: u32 = 0o600;
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// An I/O error as a short lowercase phrase, without Rust's "(os error N)" suffix.
pub fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => s,
    }
}

/// Why writes under `path` may be failing, when the file system itself says so:
/// read-only, or (almost) full. SQLite reports both as a bare "disk I/O error".
pub fn fs_trouble(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let dir = if path.is_dir() { path } else { path.parent()? };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    if st.f_flag & libc::ST_RDONLY != 0 {
        return Some("the file system is read-only");
    }
    if (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) < 256 * 1024 {
        return Some("no space left on the file system");
    }
    None
}

/// Whether this process may create entries in `dir` (effective ids, as open(2) would
/// decide, also for root on a read-only mount).
pub fn can_write_dir(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK | libc::X_OK, libc::AT_EACCESS) == 0 }
}

/// Refuses a folder that is a symlink, not a folder, writable by group or others, or
/// owned by someone other than the effective user.
pub fn check_secure_dir(path: &Path, what: &str) -> Result<(), String> {
    let shown = path.display();
    let meta = fs::symlink_metadata(path).map_err(|e| format!("{what} {shown}: {}", io_reason(&e)))?;
    if meta.file_type().is_symlink() {
        return Err(format!("{what} {shown} is a symlink; refusing to follow it"));
    }
    if !meta.is_dir() {
        return Err(format!("{what} {shown} is not a folder"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{what} {shown} is writable by group or others (mode {:04o}); run chmod go-w on it",
            meta.mode() & 0o7777
        ));
    }
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "{what} {shown} is owned by uid {}, not by this user (uid {euid})",
            meta.uid()
        ));
    }
    Ok(())
}

/// Creates `path` (and missing parents) as 0700 if it does not exist, then checks it.
pub fn ensure_private_dir(path: &Path, what: &str) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(PRIVATE_DIR_MODE)
                .create(path)
                .map_err(|e| format!("cannot create {what} {}: {}", path.display(), io_reason(&e)))?;
            fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                .map_err(|e| format!("cannot chmod {what} {}: {}", path.display(), io_reason(&e)))?;
            if let Some(parent) = path.parent() {
                fsync_dir(parent).map_err(|e| format!("cannot sync {}: {}", parent.display(), io_reason(&e)))?;
            }
        }
        Err(e) => return Err(format!("{what} {}: {}", path.display(), io_reason(&e))),
    }
    check_secure_dir(path, what)
}

fn open_private(path: &Path, create_new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    let f = o.open(path)?;
    f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(f)
}

/// Creates `dir/name`, which must not exist, with `bytes`, durably (file and folder
/// fsynced). Used to stage a key version: O_EXCL means a version file is never
/// overwritten.
pub fn write_new(dir: &Path, name: &str, bytes: &[u8], step: &str, sync: DirSync) -> io::Result<()> {
    failpoint::hit(step, "create")?;
    let mut f = open_private(&dir.join(name), true)?;
    f.write_all(bytes)?;
    failpoint::hit(step, "fsync")?;
    f.sync_all()?;
    sync_dir(dir, step, sync)
}

/// Replaces `dir/name` with `bytes` atomically and durably: readers see the old file
/// or the new one, never a mix, and after return the new one survives power loss.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], step: &str, sync: DirSync) -> io::Result<()> {
    write_atomic_via(dir, name, &tmp_name(name), bytes, step, sync)
}

/// [`write_atomic`] through the temporary `tmp` (another thread that may be writing
/// the same file at the same moment uses another temporary, so neither can rename the
/// other's half-written bytes into place).
pub fn write_atomic_via(dir: &Path, name: &str, tmp: &str, bytes: &[u8], step: &str, sync: DirSync) -> io::Result<()> {
    failpoint::hit(step, "create")?;
    let mut f = open_private(&dir.join(tmp), false)?;
    f.write_all(bytes)?;
    failpoint::hit(step, "fsync")?;
    f.sync_all()?;
    drop(f);
    failpoint::hit(step, "rename")?;
    fs::rename(dir.join(tmp), dir.join(name))?;
    sync_dir(dir, step, sync)
}

/// The temporary name `write_atomic` uses for `name`; leftovers are swept by their owner.
pub fn tmp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Points the symlink `dir/name` at `target` (relative) atomically.
pub fn replace_symlink(dir: &Path, name: &str, target: &str, step: &str, sync: DirSync) -> io::Result<()> {
    let tmp = dir.join(tmp_name(name));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    failpoint::hit(step, "symlink")?;
    std::os::unix::fs::symlink(target, &tmp)?;
    failpoint::hit(step, "rename")?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir, step, sync)
}

/// Unlinks each of `names` in `dir` that exists, then fsyncs the folder once.
pub fn remove_files(dir: &Path, names: &[String], step: &str, sync: DirSync) -> io::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    for name in names {
        failpoint::hit(step, "unlink")?;
        match fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    sync_dir(dir, step, sync)
}

fn sync_dir(dir: &Path, step: &str, sync: DirSync) -> io::Result<()> {
    if sync == DirSync::Deferred {
        return Ok(());
    }
    failpoint::hit(step, "dirsync")?;
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a regular file without following a symlink at its last component, refusing
/// anything larger than `limit` bytes. The buffer is zeroized when dropped.
pub fn read_nofollow(path: &Path, limit: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, larger than the {limit}-byte limit", meta.len()),
        ));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    f.take(limit + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Refuses a file that someone other than this user (or root) could change, because
/// whoever can write it runs code as this user (the config, a hook program): the file
/// must not be writable by group or others nor owned by another user, and no folder
/// above it may be owned by another user or writable by others without the sticky bit.
/// Symlinks on the way are followed and both sides checked: a symlinked parent folder
/// (`/etc/keyrotate` -> `/srv/config`) is normal, what it points at is held to the same
/// rule.
pub fn check_trusted(path: &Path, what: &str) -> Result<(), String> {
    let shown = path.display();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let trusted_owner = |uid: u32| uid == 0 || uid == euid;
    // A symlink belongs to whoever made it, and its owner can repoint it even in a
    // sticky folder such as /tmp.
    let foreign_link = |p: &Path| {
        fs::symlink_metadata(p)
            .ok()
            .filter(|l| l.file_type().is_symlink() && !trusted_owner(l.uid()))
            .map(|l| {
                format!(
                    "symlink {} on the way to {what} {shown} is owned by uid {}, not by root or this user (uid {euid})",
                    p.display(),
                    l.uid()
                )
            })
    };
    let absolute = std::path::absolute(path).map_err(|e| format!("{what} {shown}: {}", io_reason(&e)))?;
    if let Some(e) = foreign_link(&absolute) {
        return Err(e);
    }
    let meta = fs::metadata(path).map_err(|e| format!("{what} {shown}: {}", io_reason(&e)))?;
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{what} {shown} is writable by group or others (mode {:04o}): whoever can write it runs code as this user; run chmod go-w on it",
            meta.mode() & 0o7777
        ));
    }
    if !trusted_owner(meta.uid()) {
        return Err(format!(
            "{what} {shown} is owned by uid {}, not by root or this user (uid {euid}): that user could run code as this one",
            meta.uid()
        ));
    }
    let real = fs::canonicalize(path).map_err(|e| format!("{what} {shown}: {}", io_reason(&e)))?;
    let mut seen = std::collections::BTreeSet::new();
    for dir in absolute.ancestors().skip(1).chain(real.ancestors().skip(1)) {
        if dir.as_os_str().is_empty() || !seen.insert(dir.to_path_buf()) {
            continue;
        }
        if let Some(e) = foreign_link(dir) {
            return Err(e);
        }
        let m = fs::metadata(dir)
            .map_err(|e| format!("folder {} above {what} {shown}: {}", dir.display(), io_reason(&e)))?;
        if m.mode() & 0o002 != 0 && m.mode() & 0o1000 == 0 {
            return Err(format!(
                "folder {} above {what} {shown} is writable by others without the sticky bit (mode {:04o}): anyone could replace it",
                dir.display(),
                m.mode() & 0o7777
            ));
        }
        if !trusted_owner(m.uid()) {
            return Err(format!(
                "folder {} above {what} {shown} is owned by uid {}, not by root or this user (uid {euid}): that user could replace it",
                dir.display(),
                m.uid()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_is_private_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let old = unsafe { libc::umask(0) };
        write_atomic(d.path(), "f", b"one", "t", DirSync::Now).unwrap();
        write_atomic(d.path(), "f", b"two", "t", DirSync::Now).unwrap();
        unsafe { libc::umask(old) };
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"two");
        assert_eq!(fs::metadata(d.path().join("f")).unwrap().mode() & 0o777, 0o600);
        assert!(!d.path().join(".f.tmp").exists());
    }

    #[test]
    fn write_new_never_overwrites_and_reads_refuse_symlinks() {
        let d = tempfile::tempdir().unwrap();
        write_new(d.path(), "k", b"secret", "t", DirSync::Now).unwrap();
        assert!(write_new(d.path(), "k", b"other", "t", DirSync::Now).is_err());
        std::os::unix::fs::symlink("k", d.path().join("link")).unwrap();
        assert!(read_nofollow(&d.path().join("link"), 100).is_err());
        assert_eq!(&*read_nofollow(&d.path().join("k"), 100).unwrap(), b"secret");
        assert!(read_nofollow(&d.path().join("k"), 3).is_err());
    }

    #[test]
    fn secure_dir_checks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        ensure_private_dir(&p, "state folder").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(check_secure_dir(&p, "x").unwrap_err().contains("writable by group"));
        std::os::unix::fs::symlink(&p, d.path().join("l")).unwrap();
        assert!(check_secure_dir(&d.path().join("l"), "x")
            .unwrap_err()
            .contains("symlink"));
    }
}
