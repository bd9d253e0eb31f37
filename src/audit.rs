//! The audit trail: one JSON object per line for every transition of a run.
//!
//! Lines are appended with O_APPEND in one write(2) each, so a line that was written
//! survives the process being killed right after, and every exit path (including the
//! deadline watchdog) has written its lines before the process ends. The line that
//! ends a run (anything with an exit code) and review events are also fdatasync'ed,
//! which makes every earlier line of the file durable with them; the in-between lines
//! (`started`, `committed`) are only lost if the machine loses power mid-run, and then
//! the ledger (which syncs every transition) still has the run and the next run flags
//! it for review. Each event is also logged through `tracing` for the job's stderr.
//! Nothing here ever carries key material: only versions and fingerprints.
//!
//! **Hash chain.** Every line carries `seq` (1, 2, 3, … across the whole trail) and
//! `prev`, the SHA-256 (hex) of the previous line's bytes without its newline; the
//! first line ever has `prev` = 64 zeros. Appending is serialized by an exclusive
//! `flock` on the audit file itself, held from reading the tail to writing the line, so
//! concurrent keyrotate processes (other domains, BUSY refusals) never fork the chain.
//! When the file is empty (logrotate just moved it to `<file>.1` and created a new
//! one), the first line continues from the last line of `<file>.1`. The chain adds no
//! fsync: it only reads the tail of the file it appends to anyway. [`verify`]
//! recomputes the chain over `<file>.N` … `<file>.1`, `<file>` and checks it against
//! the anchors (seq, hash) the ledger recorded in each run's closing transaction.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// `prev` of the very first line of a trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit line.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Event {
    /// Position in the chain, from 1; filled in when the line is appended.
    pub seq: u64,
    /// SHA-256 (hex) of the previous line's bytes; filled in when the line is appended.
    pub prev: String,
    pub ts: String,
    pub event: &'static str,
    pub run_id: String,
    pub domain: String,
    pub host: String,
    pub pool: Option<String>,
    pub operator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    pub reason: Option<String>,
    pub from_version: Option<u64>,
    pub to_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_fingerprint: Option<String>,
}

impl Event {
    /// An event about `run`, with the identity fields filled in.
    pub fn of(event: &'static str, run: &crate::run::NewRun) -> Event {
        Event {
            event,
            run_id: run.run_id.clone(),
            domain: run.domain.clone(),
            host: run.host.clone(),
            pool: run.pool.clone(),
            operator: run.operator.clone(),
            ..Event::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct Audit {
    path: PathBuf,
}

impl Audit {
    pub fn new(path: &Path) -> Audit {
        Audit {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the trail's recent lines (its last 4 MiB: a dead run's lines are near
    /// the end) hold an `event` line of `run_id`. For the rare repair of a run that
    /// died between its commit and its audit lines, so that the line is written once.
    pub fn has_recent(&self, run_id: &str, event: &str) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        const TAIL: u64 = 4 << 20;
        let Ok(mut f) = File::open(&self.path) else {
            return false;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut text = Vec::new();
        if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_err() || f.read_to_end(&mut text).is_err() {
            return false;
        }
        text.split(|b| *b == b'\n').any(|line| {
            serde_json::from_slice::<serde_json::Value>(line)
                .is_ok_and(|v| v["run_id"] == run_id && v["event"] == event)
        })
    }

    /// Whether a line could be appended now, without writing one: the audit trail is
    /// part of the run, so a run checks it before touching any key (DESIGN section 5).
    /// With `create` the folder and the file (0600) are created as the first line would
    /// create them; without, nothing is created or changed (dry run, `check`).
    pub fn preflight(&self, create: bool) -> Result<(), String> {
        let shown = self.path.display();
        let fail =
            |e: std::io::Error| format!("audit file {shown} cannot be written: {}", crate::fsutil::io_reason(&e));
        if create {
            // A step of the run like any other: the crash suite stops the run here too.
            crate::failpoint::hit("audit", "preflight").map_err(fail)?;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("audit file {shown} is a symlink; refusing to follow it"))
            }
            Ok(m) if !m.is_file() => return Err(format!("audit file {shown} is not a regular file")),
            Ok(_) => {
                // Opening for append changes nothing, and is the permission check that
                // counts (root passes access(2) for any mode, open tells the truth).
                OpenOptions::new()
                    .append(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                    .open(&self.path)
                    .map_err(fail)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                if let Some(parent) = self.path.parent().filter(|p| !p.exists()) {
                    crate::fsutil::ensure_private_dir(parent, "audit folder")?;
                }
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&self.path)
                    .map_err(fail)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The nearest folder that exists must let us create what is missing.
                let mut dir = self.path.parent();
                while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                    dir = d.parent();
                }
                let dir = dir.unwrap_or(Path::new("/"));
                if !dir.is_dir() {
                    return Err(format!(
                        "audit file {shown} cannot be created: {} is not a folder",
                        dir.display()
                    ));
                }
                if !crate::fsutil::can_write_dir(dir) {
                    return Err(format!(
                        "audit file {shown} cannot be created: folder {} is not writable",
                        dir.display()
                    ));
                }
            }
            Err(e) => return Err(fail(e)),
        }
        if let Some(why) = crate::fsutil::fs_trouble(&self.path) {
            return Err(format!("audit file {shown} cannot be written: {why}"));
        }
        Ok(())
    }

    /// Appends `event` durably. The timestamp and chain fields are filled in here.
    pub fn emit(&self, event: Event) -> Result<(), String> {
        self.emit_anchored(event, |_| ((), None)).1
    }

    /// Appends `event` like [`Audit::emit`], and calls `anchor` with the chain head the
    /// line becomes (its seq and hash) while the file is still locked, just before the
    /// line is written: that is where a run's closing ledger transaction records the
    /// head, so the ledger's anchor covers the run's own last line. When the file
    /// cannot be opened or read, `anchor` is called with `None` and the error returned.
    /// `anchor` may return a replacement event (when its transaction failed, so no
    /// anchor was recorded and the line must say what happened instead): it is written
    /// in the same place of the chain.
    pub fn emit_anchored<R>(
        &self,
        mut event: Event,
        anchor: impl FnOnce(Option<&Head>) -> (R, Option<Event>),
    ) -> (R, Result<(), String>) {
        event.ts = crate::time::now();
        tracing::info!(
            target: "keyrotate::audit",
            event = event.event,
            run_id = %event.run_id,
            domain = %event.domain,
            exit_code = event.exit_code,
            reason = event.reason.as_deref().unwrap_or(""),
            "audit"
        );
        let fail = |e: io::Error| format!("audit file {}: {}", self.path.display(), crate::fsutil::io_reason(&e));
        let ends_something =
            event.exit_code.is_some() || !matches!(event.event, "rotation.started" | "rotation.committed");
        let (mut f, tail) = match self.open_locked().and_then(|f| {
            let tail = self.tail(&f)?;
            Ok((f, tail))
        }) {
            Ok(x) => x,
            Err(e) => return (anchor(None).0, Err(fail(e))),
        };
        event.seq = tail.seq + 1;
        event.prev = tail.hash;
        let mut line = serde_json::to_vec(&event).expect("json");
        let head = Head {
            seq: event.seq,
            hash: line_hash(&line),
        };
        let (r, replacement) = anchor(Some(&head));
        if let Some(mut other) = replacement {
            other.ts = event.ts;
            other.seq = event.seq;
            other.prev = event.prev;
            line = serde_json::to_vec(&other).expect("json");
        }
        if tail.torn {
            // A line cut short (a full disk): end it, so ours stands on its own line.
            line.insert(0, b'\n');
        }
        line.push(b'\n');
        let written = f
            .write_all(&line)
            .and_then(|()| if ends_something { f.sync_data() } else { Ok(()) });
        // The lock goes with the descriptor when `f` is dropped.
        (r, written.map_err(fail))
    }

    /// Opens the audit file for appending and locks it exclusively. If logrotate
    /// renamed it while this process waited for the lock, the new file is opened
    /// instead: a line must never land in a file that is no longer the trail's tail.
    fn open_locked(&self) -> io::Result<File> {
        if let Some(parent) = self.path.parent() {
            if !parent.exists() {
                crate::fsutil::ensure_private_dir(parent, "audit folder").map_err(io::Error::other)?;
            }
        }
        loop {
            let f = OpenOptions::new()
                .append(true)
                .read(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&self.path)?;
            f.lock()?;
            let held = f.metadata()?;
            match std::fs::symlink_metadata(&self.path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(f),
                // Renamed (or removed) under us: open what is there now.
                _ => continue,
            }
        }
    }

    /// The chain head a new line continues from: this file's last line, else (an
    /// empty file, just rotated) the last line of `<file>.1`, else the genesis.
    fn tail(&self, f: &File) -> io::Result<Tail> {
        if let Some((line, complete)) = last_line(f)? {
            return Ok(Tail::after(&line, !complete));
        }
        let rotated = rotated_path(&self.path, 1);
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&rotated)
        {
            Ok(old) => {
                // A writer that locked the old file just before the rename may still be
                // appending its line there: wait for it.
                old.lock_shared()?;
                Ok(match last_line(&old)? {
                    Some((line, _)) => Tail::after(&line, false),
                    None => Tail::genesis(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Tail::genesis()),
            Err(e) => Err(e),
        }
    }
}

/// A chain head: the seq of a line and the hash of its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// What the next line continues from.
struct Tail {
    seq: u64,
    hash: String,
    /// The file ends in the middle of a line.
    torn: bool,
}

impl Tail {
    fn genesis() -> Tail {
        Tail {
            seq: 0,
            hash: GENESIS.to_string(),
            torn: false,
        }
    }

    /// After `line`: its seq (0 when it has none: a line from before the chain, or a
    /// torn one, which `verify` reports) and its hash.
    fn after(line: &[u8], torn: bool) -> Tail {
        // Only `seq` is read: the other fields are skipped, not built into a tree.
        #[derive(serde::Deserialize)]
        struct Seq {
            seq: Option<u64>,
        }
        let seq = serde_json::from_slice::<Seq>(line)
            .ok()
            .and_then(|s| s.seq)
            .unwrap_or(0);
        Tail {
            seq,
            hash: line_hash(line),
            torn,
        }
    }
}

/// SHA-256 (lowercase hex) of a line's bytes, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    use std::fmt::Write as _;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line);
    // One string, written in place (a `format!` per byte allocated 32 strings).
    let mut hex = String::with_capacity(64);
    for b in d.as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// `<file>.N`, the name logrotate gives the N-th older file.
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The last line of a file, without its newline, and whether it was complete (ended
/// with a newline). Reads backwards in blocks, so the cost does not grow with the file.
fn last_line(f: &File) -> io::Result<Option<(Vec<u8>, bool)>> {
    const BLOCK: u64 = 8192;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    // Blocks from the end, the last first. Only each new block is searched and the
    // line is joined once at the end: a long last line (a torn write of megabytes, a
    // hostile append) costs its length. Joining every block onto the bytes read so far
    // and searching them all again cost its length squared: 20 MB without a newline
    // held a run for minutes past its deadline, and the deadline's own audit line
    // read the same tail again.
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut complete = false;
    let mut pos = len;
    loop {
        let start = pos.saturating_sub(BLOCK);
        let mut block = vec![0u8; (pos - start) as usize];
        f.read_exact_at(&mut block, start)?;
        // The file's last byte, in its last block (read first, the one read where a
        // line fits in a block): a final newline ends the last line, not another.
        let mut search = block.len();
        if blocks.is_empty() && block.last() == Some(&b'\n') {
            complete = true;
            search -= 1;
        }
        pos = start;
        let found = block[..search].iter().rposition(|&b| b == b'\n');
        if let Some(i) = found {
            block.drain(..=i);
        }
        blocks.push(block);
        if found.is_some() || pos == 0 {
            break;
        }
    }
    blocks.reverse();
    let mut line = blocks.concat();
    if complete {
        line.pop();
    }
    Ok(Some((line, complete)))
}

/// A chain head the ledger recorded for one run.
#[derive(Clone, Debug)]
pub struct Anchor {
    pub run_id: String,
    pub seq: u64,
    pub hash: String,
}

/// The first line that breaks the chain.
#[derive(Clone, Debug, Serialize)]
pub struct BadLine {
    pub file: String,
    /// 1-based line number within `file`.
    pub line: u64,
    pub seq: Option<u64>,
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    pub intact: bool,
    /// The files read, oldest first.
    pub files: Vec<String>,
    pub lines: u64,
    /// Lines at the very start written before the chain existed (no `seq`/`prev`).
    pub unchained_lines: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_hash: Option<String>,
    pub anchors_checked: u64,
    /// Anchors older than the oldest file still present (logrotate removed it).
    pub anchors_before_trail: u64,
    pub first_bad: Option<BadLine>,
}

/// Takes a shared lock on the audit file, so that no writer is between recording its
/// anchor in the ledger and appending its line while the caller reads both. `None`
/// when there is no audit file.
pub fn lock_for_reading(path: &Path) -> Result<Option<File>, String> {
    let fail = |e: io::Error| format!("audit file {}: {}", path.display(), crate::fsutil::io_reason(&e));
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => {
            f.lock_shared().map_err(fail)?;
            Ok(Some(f))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fail(e)),
    }
}

/// Recomputes the chain over `<path>.N` … `<path>.1`, `<path>` (the numbered files
/// logrotate leaves, oldest first, as far as they are consecutive) and checks every
/// anchor. `Err` means a file could not be read (exit 3); a broken chain is
/// `Ok` with `intact: false` and the first bad line named (exit 4).
pub fn verify(path: &Path, anchors: &[Anchor]) -> Result<Verification, String> {
    let mut files = Vec::new();
    let mut n = 1;
    while std::fs::symlink_metadata(rotated_path(path, n)).is_ok() {
        files.push(rotated_path(path, n));
        n += 1;
    }
    let rotated = !files.is_empty();
    files.reverse();
    if std::fs::symlink_metadata(path).is_ok() {
        files.push(path.to_path_buf());
    }
    let mut by_seq: std::collections::BTreeMap<u64, Vec<&Anchor>> = std::collections::BTreeMap::new();
    for a in anchors {
        by_seq.entry(a.seq).or_default().push(a);
    }
    let mut v = Verification {
        intact: true,
        files: files.iter().map(|f| f.display().to_string()).collect(),
        lines: 0,
        unchained_lines: 0,
        first_seq: None,
        last_seq: None,
        last_hash: None,
        anchors_checked: 0,
        anchors_before_trail: 0,
        first_bad: None,
    };
    // (file, line number) of the line before, to name it when the next line's `prev`
    // shows it was altered.
    let mut before: Option<(String, u64)> = None;
    let mut prev_hash: Option<String> = None;
    let mut last_file_lines = 0;
    let bad = |file: &str, line: u64, seq: Option<u64>, reason: String| BadLine {
        file: file.to_string(),
        line,
        seq,
        reason,
    };
    'files: for file in &files {
        let shown = file.display().to_string();
        let bytes = read_trail_file(file)?;
        let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let torn = lines.last().is_some_and(|l| !l.is_empty());
        if !torn {
            lines.pop();
        }
        last_file_lines = lines.len() as u64;
        for (i, line) in lines.iter().enumerate() {
            let no = i as u64 + 1;
            v.lines += 1;
            if torn && i + 1 == lines.len() {
                v.first_bad = Some(bad(
                    &shown,
                    no,
                    None,
                    "the last line is incomplete (no newline): a write was cut short or the file was cut".into(),
                ));
                break 'files;
            }
            let hash = line_hash(line);
            let value: Option<serde_json::Value> = serde_json::from_slice(line).ok();
            let Some(obj) = value.as_ref().and_then(|v| v.as_object()) else {
                v.first_bad = Some(bad(&shown, no, None, "not a JSON object".into()));
                break 'files;
            };
            let seq = obj.get("seq").and_then(serde_json::Value::as_u64);
            let prev = obj.get("prev").and_then(serde_json::Value::as_str);
            let (seq, prev) = match (seq, prev) {
                (Some(s), Some(p)) => (s, p),
                (None, None) if obj.get("seq").is_none() && obj.get("prev").is_none() && v.first_seq.is_none() => {
                    // Written before the chain existed: covered only by the next line's prev.
                    v.unchained_lines += 1;
                    prev_hash = Some(hash);
                    before = Some((shown.clone(), no));
                    continue;
                }
                _ => {
                    v.first_bad = Some(bad(
                        &shown,
                        no,
                        seq,
                        "no valid seq and prev: a line inserted or altered".into(),
                    ));
                    break 'files;
                }
            };
            match (v.last_seq, &prev_hash) {
                (Some(last), _) if seq != last + 1 => {
                    v.first_bad = Some(bad(
                        &shown,
                        no,
                        Some(seq),
                        format!(
                            "seq {seq} where {} was expected: lines were removed, inserted or reordered here",
                            last + 1
                        ),
                    ));
                    break 'files;
                }
                (_, Some(h)) if prev != h => {
                    let (bf, bl) = before.clone().unwrap_or((shown.clone(), no));
                    v.first_bad = Some(bad(
                        &bf,
                        bl,
                        v.last_seq,
                        format!(
                            "its hash does not match the prev of the line after it ({shown}:{no}): this line was altered"
                        ),
                    ));
                    break 'files;
                }
                (None, None) if seq == 1 && prev != GENESIS => {
                    v.first_bad = Some(bad(
                        &shown,
                        no,
                        Some(seq),
                        "seq 1 must carry the genesis prev (64 zeros)".into(),
                    ));
                    break 'files;
                }
                (None, None) if seq != 1 && !rotated => {
                    v.first_bad = Some(bad(
                        &shown,
                        no,
                        Some(seq),
                        format!("the trail starts at seq {seq} and no rotated file holds the lines before it: lines were removed"),
                    ));
                    break 'files;
                }
                _ => {}
            }
            for a in by_seq.get(&seq).into_iter().flatten() {
                v.anchors_checked += 1;
                if a.hash != hash {
                    v.first_bad = Some(bad(
                        &shown,
                        no,
                        Some(seq),
                        format!(
                            "does not match the hash the ledger recorded for seq {seq} (run {}): this line was altered",
                            a.run_id
                        ),
                    ));
                    break 'files;
                }
            }
            v.first_seq.get_or_insert(seq);
            v.last_seq = Some(seq);
            prev_hash = Some(hash);
            before = Some((shown.clone(), no));
        }
    }
    if v.first_bad.is_none() {
        let first = v.first_seq.unwrap_or(1);
        let last = v.last_seq.unwrap_or(0);
        v.anchors_before_trail = anchors.iter().filter(|a| a.seq < first).count() as u64;
        if let Some(a) = anchors.iter().filter(|a| a.seq > last).min_by_key(|a| a.seq) {
            let file = files
                .last()
                .map_or(path.display().to_string(), |f| f.display().to_string());
            v.first_bad = Some(bad(
                &file,
                last_file_lines + 1,
                Some(a.seq),
                format!(
                    "missing: the ledger recorded seq {} (run {}) but the trail ends at seq {last}: lines were removed from its end",
                    a.seq, a.run_id
                ),
            ));
        }
    }
    v.last_hash = prev_hash.filter(|_| v.first_bad.is_none());
    v.intact = v.first_bad.is_none();
    Ok(v)
}

fn read_trail_file(path: &Path) -> Result<Vec<u8>, String> {
    let fail = |e: io::Error| format!("audit file {}: {}", path.display(), crate::fsutil::io_reason(&e));
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(fail)?;
    if !f.metadata().map_err(fail)?.is_file() {
        return Err(format!("audit file {}: not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut f, &mut bytes).map_err(fail)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::last_line;

    /// The last line of `bytes` as `last_line` finds it in a file holding them.
    fn of(bytes: &[u8]) -> Option<(Vec<u8>, bool)> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        std::fs::write(&p, bytes).unwrap();
        last_line(&std::fs::File::open(&p).unwrap()).unwrap()
    }

    #[test]
    fn the_last_line_at_every_block_boundary() {
        assert_eq!(of(b""), None);
        assert_eq!(of(b"\n"), Some((vec![], true)));
        assert_eq!(of(b"abc"), Some((b"abc".to_vec(), false)));
        assert_eq!(of(b"a\nbc"), Some((b"bc".to_vec(), false)));
        assert_eq!(of(b"a\nbc\n"), Some((b"bc".to_vec(), true)));
        assert_eq!(of(b"a\n\n"), Some((vec![], true)));
        for n in [8190, 8191, 8192, 8193, 16383, 16384, 16385, 30000] {
            let line = vec![b'x'; n];
            for end in [&b""[..], b"\n"] {
                let mut bytes = b"first line\n".to_vec();
                bytes.extend_from_slice(&line);
                bytes.extend_from_slice(end);
                assert_eq!(of(&bytes), Some((line.clone(), !end.is_empty())), "{n} {end:?}");
                assert_eq!(of(&bytes[11..]), Some((line.clone(), !end.is_empty())), "{n} alone");
            }
        }
    }
}
