//! The rotation ledger: SQLite at `<state.dir>/ledger.sqlite3`.
//!
//! One type owns the connection. Opening creates the file 0600, sets WAL and
//! `synchronous=FULL` (a committed row survives power loss), and applies the numbered
//! migrations in `migrations/` tracked by `PRAGMA user_version`. Every write is one
//! transaction. The read-only opener never creates or modifies a file, for dry runs
//! and `status`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::failpoint;
use crate::outcome::Outcome;

const MIGRATIONS: &[&str] = &[include_str!("migrations/001_init.sql")];
pub const IN_FLIGHT: [&str; 3] = ["started", "staged", "committed"];

/// One row of `rotations`, every column.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub run_id: String,
    pub domain: String,
    pub state: String,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub trigger: String,
    pub operator: Option<String>,
    pub host: String,
    pub pid: i64,
    pub pool: Option<String>,
    pub started_at: String,
    pub deadline_at: String,
    pub ended_at: Option<String>,
    pub from_version: Option<i64>,
    pub to_version: Option<i64>,
    pub forced: bool,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<String>,
    pub resolution: Option<String>,
    pub requested_reason: Option<String>,
}

impl RunRow {
    pub fn in_flight(&self) -> bool {
        IN_FLIGHT.contains(&self.state.as_str())
    }
}

const COLUMNS: &str = "id, run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool, \
    started_at, deadline_at, ended_at, from_version, to_version, forced, resolved_by, resolved_at, resolution, \
    requested_reason";

fn row(r: &Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        run_id: r.get(1)?,
        domain: r.get(2)?,
        state: r.get(3)?,
        exit_code: r.get(4)?,
        reason: r.get(5)?,
        trigger: r.get(6)?,
        operator: r.get(7)?,
        host: r.get(8)?,
        pid: r.get(9)?,
        pool: r.get(10)?,
        started_at: r.get(11)?,
        deadline_at: r.get(12)?,
        ended_at: r.get(13)?,
        from_version: r.get(14)?,
        to_version: r.get(15)?,
        forced: r.get::<_, i64>(16)? != 0,
        resolved_by: r.get(17)?,
        resolved_at: r.get(18)?,
        resolution: r.get(19)?,
        requested_reason: r.get(20)?,
    })
}

/// `(from_version, to_version)`: the active version before and after a run.
pub type Versions = (Option<u64>, Option<u64>);

/// The identity of a new run, as recorded in its row.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub run_id: String,
    pub domain: String,
    pub trigger: &'static str,
    pub operator: Option<String>,
    pub host: String,
    pub pid: u32,
    pub pool: Option<String>,
    pub started_at: String,
    pub deadline_at: String,
    pub forced: bool,
    pub requested_reason: Option<String>,
}

/// What the ledger says about one domain, for the admission decision.
#[derive(Clone, Debug, Default)]
pub struct DomainRecord {
    pub in_flight: Option<RunRow>,
    pub blocking: Option<RunRow>,
    pub last_success: Option<RunRow>,
    pub last_run: Option<RunRow>,
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    /// The private copy a read-only ledger reads when a -wal file exists.
    _snapshot: Option<tempfile::TempDir>,
}

fn db_err(path: &Path, e: rusqlite::Error) -> String {
    use rusqlite::ErrorCode::*;
    let detail = match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == NotADatabase => {
            "not a SQLite database (refusing to touch it)".to_string()
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == DatabaseBusy => {
            "busy: another process held it past the time this run could wait".to_string()
        }
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, SystemIoFailure | DiskFull | ReadOnly | CannotOpen) =>
        {
            match crate::fsutil::fs_trouble(path) {
                Some(why) => format!("{e} ({why})"),
                None => e.to_string(),
            }
        }
        _ => e.to_string(),
    };
    format!("ledger {}: {detail}", path.display())
}

pub fn now() -> String {
    crate::keystore::manifest::now_rfc3339(chrono::Utc::now())
}

impl Ledger {
    /// Opens (creating if needed) and migrates the ledger for writing.
    pub fn open(path: &Path, busy: Duration) -> Result<Ledger, String> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.is_file() => {
                return Err(format!("ledger {}: not a regular file", path.display()));
            }
            Ok(_) => {}
            Err(_) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| {
                        format!(
                            "ledger {}: cannot create: {}",
                            path.display(),
                            crate::fsutil::io_reason(&e)
                        )
                    })?;
            }
        }
        let flags =
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| db_err(path, e))?;
        let mut ledger = Ledger {
            conn,
            path: path.to_path_buf(),
            _snapshot: None,
        };
        ledger.set_busy(busy)?;
        ledger
            .conn
            .execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .map_err(|e| db_err(path, e))?;
        ledger.migrate()?;
        Ok(ledger)
    }

    /// Opens an existing ledger without creating or changing any file. `Ok(None)` when
    /// there is no ledger yet.
    pub fn open_read_only(path: &Path) -> Result<Option<Ledger>, String> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("ledger {}: {}", path.display(), crate::fsutil::io_reason(&e))),
            Ok(m) if !m.is_file() => return Err(format!("ledger {}: not a regular file", path.display())),
            Ok(_) => {}
        }
        // Without a -wal file every committed row is in the main file, and
        // `immutable=1` reads it without creating -wal/-shm. With one, a writer is
        // running or died: reading through it would rewrite -shm, so read a private
        // copy of the database and its WAL instead.
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let immutable = !Path::new(&wal).exists();
        let mut snapshot = None;
        let mut flags =
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = if immutable {
            flags |= OpenFlags::SQLITE_OPEN_URI;
            let uri = format!("file:{}?immutable=1", uri_escape(path));
            Connection::open_with_flags(uri, flags).map_err(|e| db_err(path, e))?
        } else {
            let copy = private_copy(path, Path::new(&wal))?;
            let conn =
                Connection::open_with_flags(copy.path().join("ledger.sqlite3"), OpenFlags::SQLITE_OPEN_READ_WRITE)
                    .map_err(|e| db_err(path, e))?;
            snapshot = Some(copy);
            conn
        };
        let ledger = Ledger {
            conn,
            path: path.to_path_buf(),
            _snapshot: snapshot,
        };
        let version = ledger.user_version()?;
        if version as usize > MIGRATIONS.len() {
            return Err(ledger.too_new(version));
        }
        if (version as usize) < MIGRATIONS.len() {
            // An empty or older ledger: the next writer migrates it. Reading it now
            // would fail on missing tables, so present it as empty.
            return if version == 0 {
                Ok(None)
            } else {
                Err(format!(
                    "ledger {}: schema version {version} needs migrating; run any rotate or resolve first",
                    path.display()
                ))
            };
        }
        Ok(Some(ledger))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_busy(&mut self, busy: Duration) -> Result<(), String> {
        self.conn.busy_timeout(busy).map_err(|e| db_err(&self.path, e))
    }

    fn user_version(&self) -> Result<i64, String> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| db_err(&self.path, e))
    }

    fn too_new(&self, version: i64) -> String {
        format!(
            "ledger {}: schema version {version} is newer than this keyrotate knows ({}); upgrade keyrotate",
            self.path.display(),
            MIGRATIONS.len()
        )
    }

    fn migrate(&mut self) -> Result<(), String> {
        let version = self.user_version()?;
        if version as usize > MIGRATIONS.len() {
            return Err(self.too_new(version));
        }
        if version as usize == MIGRATIONS.len() {
            return Ok(());
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| db_err(&path, e))?;
        // Re-read inside the write lock: another process may have migrated meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| db_err(&path, e))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(|e| db_err(&path, e))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(|e| db_err(&path, e))?;
        }
        tx.commit().map_err(|e| db_err(&path, e))
    }

    pub fn get(&self, run_id: &str) -> Result<Option<RunRow>, String> {
        get(&self.conn, &self.path, run_id)
    }

    /// What the admission decision needs to know about `domain`.
    pub fn domain_record(&self, domain: &str) -> Result<DomainRecord, String> {
        domain_record(&self.conn, &self.path, domain)
    }

    /// Ledger rows newest first, optionally for one domain and since an instant.
    pub fn history(&self, domain: Option<&str>, since: Option<&str>, limit: u32) -> Result<Vec<RunRow>, String> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM rotations WHERE (?1 IS NULL OR domain = ?1) AND (?2 IS NULL OR started_at >= ?2) \
                 ORDER BY id DESC LIMIT ?3"
            ))
            .map_err(|e| db_err(&self.path, e))?;
        let rows = stmt
            .query_map(params![domain, since, limit], row)
            .map_err(|e| db_err(&self.path, e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err(&self.path, e));
        rows
    }

    /// The step events of one run, oldest first: `(at, phase, detail)`.
    pub fn events(&self, run_id: &str) -> Result<Vec<(String, String, Option<String>)>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT at, phase, detail FROM rotation_events WHERE run_id = ?1 ORDER BY id")
            .map_err(|e| db_err(&self.path, e))?;
        let rows = stmt
            .query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| db_err(&self.path, e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err(&self.path, e));
        rows
    }

    /// Runs `f` inside one IMMEDIATE transaction (the write lock is taken up front, so
    /// what `f` reads cannot change before it writes).
    pub fn write<T>(&mut self, op: &str, f: impl FnOnce(&Writer<'_>) -> Result<T, String>) -> Result<T, String> {
        failpoint::hit("ledger", op).map_err(|e| format!("ledger {}: {e}", self.path.display()))?;
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| db_err(&path, e))?;
        let out = f(&Writer { tx: &tx, path: &path })?;
        tx.commit().map_err(|e| db_err(&path, e))?;
        Ok(out)
    }
}

/// Write operations, available only inside [`Ledger::write`].
pub struct Writer<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl Writer<'_> {
    fn err(&self, e: rusqlite::Error) -> String {
        db_err(self.path, e)
    }

    pub fn get(&self, run_id: &str) -> Result<Option<RunRow>, String> {
        get(self.tx, self.path, run_id)
    }

    pub fn domain_record(&self, domain: &str) -> Result<DomainRecord, String> {
        domain_record(self.tx, self.path, domain)
    }

    /// Inserts the run's row: in flight (`started`) when `end` is `None`, else closed
    /// with `(state, outcome, reason)`.
    pub fn insert(
        &self,
        run: &NewRun,
        end: Option<(&str, Outcome, &str)>,
        from_version: Option<u64>,
    ) -> Result<(), String> {
        let (state, code, reason, ended) = match end {
            None => ("started", None, None, None),
            Some((state, o, reason)) => (state, Some(o.code()), Some(reason), Some(now())),
        };
        self.tx
            .execute(
                "INSERT INTO rotations (run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool, \
                 started_at, deadline_at, ended_at, from_version, forced, requested_reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    run.run_id,
                    run.domain,
                    state,
                    code,
                    reason,
                    run.trigger,
                    run.operator,
                    run.host,
                    run.pid,
                    run.pool,
                    run.started_at,
                    run.deadline_at,
                    ended,
                    from_version,
                    run.forced,
                    run.requested_reason
                ],
            )
            .map_err(|e| self.err(e))?;
        self.event(&run.run_id, state, reason)
    }

    /// Moves an in-flight run to `state` (`staged`, `committed`), recording its
    /// `(from_version, to_version)` where known.
    pub fn advance(&self, run_id: &str, state: &str, versions: Versions, detail: &str) -> Result<(), String> {
        self.tx
            .execute(
                "UPDATE rotations SET state = ?2, from_version = COALESCE(?3, from_version), \
                 to_version = COALESCE(?4, to_version) WHERE run_id = ?1",
                params![run_id, state, versions.0, versions.1],
            )
            .map_err(|e| self.err(e))?;
        self.event(run_id, state, Some(detail))
    }

    /// Closes a run with its outcome.
    pub fn close(&self, run_id: &str, outcome: Outcome, reason: &str, versions: Versions) -> Result<(), String> {
        self.tx
            .execute(
                "UPDATE rotations SET state = ?2, exit_code = ?3, reason = ?4, ended_at = ?5, \
                 from_version = COALESCE(?6, from_version), to_version = COALESCE(?7, to_version) WHERE run_id = ?1",
                params![
                    run_id,
                    outcome.ledger_state(),
                    outcome.code(),
                    reason,
                    now(),
                    versions.0,
                    versions.1
                ],
            )
            .map_err(|e| self.err(e))?;
        self.event(run_id, outcome.ledger_state(), Some(reason))
    }

    /// Marks a dead run as needing review, with what the key store shows.
    pub fn mark_stale(&self, run_id: &str, reason: &str) -> Result<(), String> {
        self.tx
            .execute(
                "UPDATE rotations SET state = 'needs_review', reason = ?2 WHERE run_id = ?1",
                params![run_id, reason],
            )
            .map_err(|e| self.err(e))?;
        self.event(run_id, "needs_review", Some(reason))
    }

    /// Records a review on a blocking run, which unblocks its domain.
    pub fn resolve(&self, run_id: &str, by: &str, note: &str) -> Result<(), String> {
        let at = now();
        self.tx
            .execute(
                "UPDATE rotations SET state = 'resolved', resolved_by = ?2, resolved_at = ?3, resolution = ?4 \
                 WHERE run_id = ?1 AND state = 'needs_review'",
                params![run_id, by, at, note],
            )
            .map_err(|e| self.err(e))?;
        self.event(run_id, "resolved", Some(note))
    }

    pub fn event(&self, run_id: &str, phase: &str, detail: Option<&str>) -> Result<(), String> {
        self.tx
            .execute(
                "INSERT INTO rotation_events (run_id, at, phase, detail) VALUES (?1, ?2, ?3, ?4)",
                params![run_id, now(), phase, detail],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

fn get(conn: &Connection, path: &Path, run_id: &str) -> Result<Option<RunRow>, String> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM rotations WHERE run_id = ?1"),
        [run_id],
        row,
    )
    .optional()
    .map_err(|e| db_err(path, e))
}

fn domain_record(conn: &Connection, path: &Path, domain: &str) -> Result<DomainRecord, String> {
    let one = |sql: &str| -> Result<Option<RunRow>, String> {
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM rotations WHERE domain = ?1 AND {sql}"),
            [domain],
            row,
        )
        .optional()
        .map_err(|e| db_err(path, e))
    };
    Ok(DomainRecord {
        in_flight: one("state IN ('started','staged','committed') ORDER BY id LIMIT 1")?,
        blocking: one("state = 'needs_review' ORDER BY id LIMIT 1")?,
        last_success: one("state = 'succeeded' ORDER BY id DESC LIMIT 1")?,
        last_run: one("1 ORDER BY id DESC LIMIT 1")?,
    })
}

/// Copies the database and its WAL into a private temporary folder.
fn private_copy(db: &Path, wal: &Path) -> Result<tempfile::TempDir, String> {
    let fail = |e: std::io::Error| {
        format!(
            "ledger {}: cannot take a read snapshot: {}",
            db.display(),
            crate::fsutil::io_reason(&e)
        )
    };
    let dir = tempfile::Builder::new()
        .prefix("keyrotate-ledger")
        .tempdir()
        .map_err(fail)?;
    std::fs::copy(db, dir.path().join("ledger.sqlite3")).map_err(fail)?;
    std::fs::copy(wal, dir.path().join("ledger.sqlite3-wal")).map_err(fail)?;
    Ok(dir)
}

fn uri_escape(path: &Path) -> String {
    let s = path.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str) -> NewRun {
        NewRun {
            run_id: id.into(),
            domain: "d".into(),
            trigger: "scheduled",
            operator: None,
            host: "h".into(),
            pid: 1,
            pool: Some("p".into()),
            started_at: now(),
            deadline_at: now(),
            forced: false,
            requested_reason: None,
        }
    }

    #[test]
    fn one_in_flight_row_per_domain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let mut l = Ledger::open(&path, Duration::from_secs(1)).unwrap();
        l.write("t", |w| w.insert(&run("a"), None, None)).unwrap();
        assert!(l.write("t", |w| w.insert(&run("b"), None, None)).is_err());
        l.write("t", |w| w.close("a", Outcome::Rotated, "ok", (None, Some(1))))
            .unwrap();
        l.write("t", |w| w.insert(&run("b"), None, None)).unwrap();
        let rec = l.domain_record("d").unwrap();
        assert_eq!(rec.in_flight.unwrap().run_id, "b");
        assert_eq!(rec.last_success.unwrap().to_version, Some(1));
        drop(l);
        let ro = Ledger::open_read_only(&path).unwrap().unwrap();
        assert_eq!(ro.history(None, None, 10).unwrap().len(), 2);
    }

    #[test]
    fn refuses_a_file_that_is_not_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let e = Ledger::open(&path, Duration::from_secs(1)).err().unwrap();
        assert!(e.contains("not a SQLite database"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'x'; 4096]);
    }
}
