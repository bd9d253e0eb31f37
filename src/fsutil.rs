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

/// Test-only operation journal (`failpoints` builds, `KEYROTATE_OPLOG=FILE`): each
/// durable file operation, once done, appends one tab-separated line to FILE, so the
/// power-loss tests can rebuild the worst state a power cut at any step could leave
/// (what was fsynced survives, the rest may not). Lines:
/// `write PATH INO BASE64` (created or truncated, then written), `fsync INO`,
/// `rename FROM TO INO`, `unlink PATH INO`, `symlink PATH INO TARGET`, `dirsync DIR`,
/// `mkdir PATH`. The journal holds key bytes: it exists only in test builds.
#[cfg(feature = "failpoints")]
fn oplog(line: impl FnOnce() -> Vec<String>) {
    let Some(path) = std::env::var_os("KEYROTATE_OPLOG") else {
        return;
    };
    let mut text = line().join("\t");
    text.push('\n');
    // One write(2) per line on an O_APPEND file: lines never interleave. The journal
    // lives outside the key store, so a failure to write it only weakens a test.
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(text.as_bytes());
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn oplog(_line: impl FnOnce() -> Vec<String>) {}

fn shown(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The inode number of `p` (not following a symlink), 0 if it cannot be read.
fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).map(|m| m.ino()).unwrap_or(0)
}

fn log_write(path: &Path, f: &File, bytes: &[u8]) {
    use base64::Engine;
    oplog(|| {
        vec![
            "write".into(),
            shown(path),
            f.metadata().map(|m| m.ino()).unwrap_or(0).to_string(),
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ]
    });
}

fn log_fsync(f: &File) {
    oplog(|| vec!["fsync".into(), f.metadata().map(|m| m.ino()).unwrap_or(0).to_string()]);
}

/// Renames `from` to `to`, journalled.
fn rename(from: &Path, to: &Path) -> io::Result<()> {
    // Read before the entry moves; a production build skips the extra lstat.
    let inode = if cfg!(feature = "failpoints") { ino(from) } else { 0 };
    fs::rename(from, to)?;
    oplog(|| vec!["rename".into(), shown(from), shown(to), inode.to_string()]);
    Ok(())
}

/// Unlinks `path`, journalled.
fn unlink(path: &Path) -> io::Result<()> {
    let inode = if cfg!(feature = "failpoints") { ino(path) } else { 0 };
    fs::remove_file(path)?;
    oplog(|| vec!["unlink".into(), shown(path), inode.to_string()]);
    Ok(())
}

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

/// The mode and group a file is created with. Set on the open descriptor before any
/// byte is written, so a file is never readable by anyone it should not be, even for an
/// instant, and the umask plays no part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub mode: u32,
    /// `None`: the creating process's group (and a mode that grants it nothing).
    pub gid: Option<u32>,
}

impl Perms {
    pub const PRIVATE: Perms = Perms {
        mode: PRIVATE_FILE_MODE,
        gid: None,
    };
}

/// A configured group (`group = "keyusers"`), resolved when the config is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// Who may read a domain's key folder besides its owner (DESIGN 4.4). The default is
/// nobody: folders 0700, files 0600.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Key files and `keyring.json` 0640 and the folder 0750, owned by this group.
    pub group: Option<Group>,
    /// `jwks.json` 0644 and the folder traversable (`--x`, never listable) by others.
    pub public_jwks: bool,
}

impl Access {
    pub fn gid(&self) -> Option<u32> {
        self.group.as_ref().map(|g| g.gid)
    }

    /// Key files and the manifest.
    pub fn file_perms(&self) -> Perms {
        match self.gid() {
            Some(gid) => Perms {
                mode: 0o640,
                gid: Some(gid),
            },
            None => Perms::PRIVATE,
        }
    }

    /// `jwks.json`: public keys only.
    pub fn jwks_perms(&self) -> Perms {
        Perms {
            mode: if self.public_jwks {
                0o644
            } else {
                self.file_perms().mode
            },
            gid: self.gid(),
        }
    }

    /// The domain folder.
    pub fn dir_mode(&self) -> u32 {
        let group = if self.group.is_some() { 0o050 } else { 0 };
        let others = if self.public_jwks { 0o001 } else { 0 };
        PRIVATE_DIR_MODE | group | others
    }

    /// What the key store folder above the domain folders must grant: only traversal
    /// (`--x`), never listing, and only when someone besides the owner needs to reach a
    /// domain folder. Domains of one key store may name different groups, so this is
    /// granted to group and others alike; each domain folder decides who gets in.
    pub fn root_traverse_bits(&self) -> u32 {
        if self.group.is_some() || self.public_jwks {
            0o011
        } else {
            0
        }
    }

    /// Whether an existing key file (or `keyring.json`) grants no more than this access
    /// allows: nothing to others, and to its group only when that is the configured
    /// group (what `check` should hold a key file to).
    pub fn allows_key_file(&self, meta: &fs::Metadata) -> bool {
        let mode = meta.mode() & 0o777;
        let extra = mode & !self.file_perms().mode;
        let group_ok = mode & 0o070 == 0 || self.gid() == Some(meta.gid());
        extra == 0 && group_ok
    }

    /// The access a domain folder grants today, read back from its mode and group: how
    /// a writer that was not given the configuration (a repair, a diagnosis) keeps the
    /// files it writes as readable as their neighbours.
    pub fn of_folder(meta: &fs::Metadata) -> Access {
        let mode = meta.mode();
        Access {
            group: (mode & 0o050 == 0o050).then(|| Group {
                name: String::new(),
                gid: meta.gid(),
            }),
            public_jwks: mode & 0o001 != 0,
        }
    }
}

/// The effective group of this process: the group of every file it creates.
pub fn own_gid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}

/// Resolves a group name to its gid, `None` if the system does not know it.
pub fn lookup_group(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: all-zero is a valid `group` (null pointers, zero gid) and is only
        // read after getgrnam_r filled it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `c` is NUL-terminated, `grp` and `buf` outlive the call and `buf.len()`
        // is its real size; getgrnam_r writes only inside them.
        let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !out.is_null()).then_some(grp.gr_gid);
    }
}

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
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` a valid,
    // writable statvfs the call fills in.
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
/// owned by someone other than the effective user. Readable by its group is fine (a
/// domain with `group = "…"` is 0750 on purpose); writable never is.
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
    // SAFETY: geteuid has no preconditions and cannot fail.
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
            oplog(|| vec!["mkdir".into(), shown(path)]);
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

/// Creates `path` like [`ensure_private_dir`], then gives it exactly `mode` and (if
/// given) group `gid`, tightening or widening what an earlier config left. The change
/// is made through a descriptor opened without following symlinks, after the safety
/// check, so it cannot be redirected.
pub fn ensure_dir_with(path: &Path, what: &str, mode: u32, gid: Option<u32>) -> Result<(), String> {
    ensure_private_dir(path, what)?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| format!("{what} {}: {}", path.display(), io_reason(&e)))?;
    set_perms(&f, Perms { mode, gid })
        .map_err(|e| format!("cannot set the mode of {what} {}: {}", path.display(), io_reason(&e)))?;
    check_secure_dir(path, what)
}

/// Adds `bits` to the mode of the existing folder `path` (never removes any).
pub fn widen_dir(path: &Path, what: &str, bits: u32) -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| format!("{what} {}: {}", path.display(), io_reason(&e)))?;
    let mode = f
        .metadata()
        .map_err(|e| format!("{what} {}: {}", path.display(), io_reason(&e)))?
        .mode()
        & 0o7777;
    if mode & bits != bits {
        f.set_permissions(fs::Permissions::from_mode(mode | bits))
            .map_err(|e| format!("cannot chmod {what} {}: {}", path.display(), io_reason(&e)))?;
    }
    Ok(())
}

/// Gives an open file or folder group `perms.gid` (if any) and exactly `perms.mode`,
/// skipping what already matches. The group first: a mode granting the group read is
/// only set once the group is the intended one.
fn set_perms(f: &File, perms: Perms) -> io::Result<()> {
    let meta = f.metadata()?;
    if let Some(gid) = perms.gid {
        if meta.gid() != gid {
            std::os::unix::fs::fchown(f, None, Some(gid))?;
        }
    }
    if meta.mode() & 0o7777 != perms.mode {
        f.set_permissions(fs::Permissions::from_mode(perms.mode))?;
    }
    Ok(())
}

/// Brings the existing regular file `dir/name` to `perms` (a config that gained or
/// lost its `group`). A missing file is not an error; a symlink is never followed.
pub fn set_file_perms(dir: &Path, name: &str, perms: Perms) -> io::Result<()> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(dir.join(name))
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // A symlink where a key file should be: not ours to chmod; the inspection that
        // follows diagnoses it.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Ok(());
    }
    set_perms(&f, perms)
}

fn open_private(path: &Path, create_new: bool, perms: Perms) -> io::Result<File> {
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
    // A leftover temporary reused here may carry any mode: set it exactly.
    if let Some(gid) = perms.gid {
        std::os::unix::fs::fchown(&f, None, Some(gid))?;
    }
    f.set_permissions(fs::Permissions::from_mode(perms.mode))?;
    Ok(f)
}

/// Creates `dir/name`, which must not exist, with `bytes`, durably (file and folder
/// fsynced). Used to stage a key version: O_EXCL means a version file is never
/// overwritten.
pub fn write_new(dir: &Path, name: &str, bytes: &[u8], step: &str, sync: DirSync) -> io::Result<()> {
    write_new_with(dir, name, bytes, step, sync, Perms::PRIVATE)
}

/// [`write_new`] with the given mode and group.
pub fn write_new_with(dir: &Path, name: &str, bytes: &[u8], step: &str, sync: DirSync, perms: Perms) -> io::Result<()> {
    failpoint::hit(step, "create")?;
    let mut f = open_private(&dir.join(name), true, perms)?;
    f.write_all(bytes)?;
    log_write(&dir.join(name), &f, bytes);
    failpoint::hit(step, "fsync")?;
    f.sync_all()?;
    log_fsync(&f);
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
    write_atomic_via_with(dir, name, tmp, bytes, step, sync, Perms::PRIVATE)
}

/// [`write_atomic`] with the given mode and group (the temporary file has them from
/// its creation, so the renamed file never had any other).
pub fn write_atomic_with(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    step: &str,
    sync: DirSync,
    perms: Perms,
) -> io::Result<()> {
    write_atomic_via_with(dir, name, &tmp_name(name), bytes, step, sync, perms)
}

/// [`write_atomic_with`] that asks `gate` between the temporary's fsync and the rename
/// whether to go on: a commit whose temporary took past the deadline to write must not
/// happen (the gate's error is returned and the temporary left for the sweep).
pub fn write_atomic_gated(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    step: &str,
    sync: DirSync,
    perms: Perms,
    gate: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let tmp = tmp_name(name);
    failpoint::hit(step, "create")?;
    let mut f = open_private(&dir.join(&tmp), false, perms)?;
    f.write_all(bytes)?;
    log_write(&dir.join(&tmp), &f, bytes);
    failpoint::hit(step, "fsync")?;
    f.sync_all()?;
    log_fsync(&f);
    drop(f);
    gate()?;
    failpoint::hit(step, "rename")?;
    rename(&dir.join(&tmp), &dir.join(name))?;
    sync_dir(dir, step, sync)
}

/// [`write_atomic_via`] with the given mode and group.
pub fn write_atomic_via_with(
    dir: &Path,
    name: &str,
    tmp: &str,
    bytes: &[u8],
    step: &str,
    sync: DirSync,
    perms: Perms,
) -> io::Result<()> {
    failpoint::hit(step, "create")?;
    let mut f = open_private(&dir.join(tmp), false, perms)?;
    f.write_all(bytes)?;
    log_write(&dir.join(tmp), &f, bytes);
    failpoint::hit(step, "fsync")?;
    f.sync_all()?;
    log_fsync(&f);
    drop(f);
    failpoint::hit(step, "rename")?;
    rename(&dir.join(tmp), &dir.join(name))?;
    sync_dir(dir, step, sync)
}

/// The temporary name `write_atomic` uses for `name`; leftovers are swept by their owner.
pub fn tmp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Points the symlink `dir/name` at `target` (relative) atomically.
pub fn replace_symlink(dir: &Path, name: &str, target: &str, step: &str, sync: DirSync) -> io::Result<()> {
    let tmp = dir.join(tmp_name(name));
    match unlink(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    failpoint::hit(step, "symlink")?;
    std::os::unix::fs::symlink(target, &tmp)?;
    oplog(|| vec!["symlink".into(), shown(&tmp), ino(&tmp).to_string(), target.to_string()]);
    failpoint::hit(step, "rename")?;
    rename(&tmp, &dir.join(name))?;
    sync_dir(dir, step, sync)
}

/// Unlinks each of `names` in `dir` that exists, then fsyncs the folder once.
pub fn remove_files(dir: &Path, names: &[String], step: &str, sync: DirSync) -> io::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    for name in names {
        failpoint::hit(step, "unlink")?;
        match unlink(&dir.join(name)) {
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
    File::open(dir)?.sync_all()?;
    oplog(|| vec!["dirsync".into(), shown(dir)]);
    Ok(())
}

/// Reads a regular file without following a symlink at its last component, refusing
/// anything larger than `limit` bytes. The buffer is zeroized when dropped.
pub fn read_nofollow(path: &Path, limit: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    read_nofollow_meta(path, limit).map(|(bytes, _)| bytes)
}

/// [`read_nofollow`], with the metadata of the file read, taken from its descriptor
/// before its bytes were read (so a later change to the file changes its ctime).
pub fn read_nofollow_meta(path: &Path, limit: u64) -> io::Result<(Zeroizing<Vec<u8>>, fs::Metadata)> {
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
    Ok((buf, meta))
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
        // SAFETY: umask only swaps this process's file mode mask; it cannot fail. (The
        // test sets it to 0 to show the mode does not depend on it, then restores it.)
        let old = unsafe { libc::umask(0) };
        write_atomic(d.path(), "f", b"one", "t", DirSync::Now).unwrap();
        write_atomic(d.path(), "f", b"two", "t", DirSync::Now).unwrap();
        // SAFETY: as above, restoring the mask.
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
    fn key_file_modes_a_group_allows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        fs::write(&p, "x").unwrap();
        let private = Access::default();
        let grouped = Access {
            group: Some(Group {
                name: "g".into(),
                gid: own_gid(),
            }),
            public_jwks: false,
        };
        let other_group = Access {
            group: Some(Group {
                name: "h".into(),
                gid: own_gid().wrapping_add(1),
            }),
            public_jwks: true,
        };
        for (mode, private_ok, grouped_ok, other_ok) in [
            (0o600, true, true, true),
            (0o400, true, true, true),
            (0o640, false, true, false),
            (0o660, false, false, false),
            (0o644, false, false, false),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let m = fs::metadata(&p).unwrap();
            assert_eq!(private.allows_key_file(&m), private_ok, "{mode:o}");
            assert_eq!(grouped.allows_key_file(&m), grouped_ok, "{mode:o}");
            assert_eq!(other_group.allows_key_file(&m), other_ok, "{mode:o}");
        }
    }

    #[test]
    fn secure_dir_checks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        ensure_private_dir(&p, "state folder").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(check_secure_dir(&p, "x").unwrap_err().contains("writable by group"));
        // Readable by the group (a domain with `group = …`) is fine; writable never is.
        ensure_dir_with(&p, "x", 0o750, None).unwrap_err();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o750)).unwrap();
        check_secure_dir(&p, "x").unwrap();
        ensure_dir_with(&p, "x", 0o751, Some(own_gid())).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o751);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o752)).unwrap();
        assert!(check_secure_dir(&p, "x")
            .unwrap_err()
            .contains("writable by group or others"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&p, d.path().join("l")).unwrap();
        assert!(check_secure_dir(&d.path().join("l"), "x")
            .unwrap_err()
            .contains("symlink"));
    }
}
