//! The embedded SQLite ledger: `<state.dir>/ledger.sqlite3`.
//!
//! Opening for writing creates the file 0600, sets WAL and `synchronous=FULL` (a
//! committed row survives power loss), and applies the numbered migrations in
//! `migrations/sqlite/`, tracked by `PRAGMA user_version`. Opening read-only never
//! creates or modifies a file: without a -wal file it reads the main file with
//! `immutable=1`; with one it reads the WAL in place through a read-only index
//! (`readonly_shm`), and only a WAL whose index is missing is read from a private copy.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::migrations::{self, MigrateError, MigrationTx};
use super::{Cols, Val};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/001_init.sql"),
    include_str!("migrations/sqlite/002_audit_anchor.sql"),
    include_str!("migrations/sqlite/003_revoke_trigger.sql"),
    include_str!("migrations/sqlite/004_shared_store.sql"),
];

pub(super) struct Sqlite {
    conn: Connection,
    /// The private copy a read-only ledger reads when a -wal file exists.
    _snapshot: Option<tempfile::TempDir>,
}

/// A SQLite error as one line naming the ledger, with the file system's reason where
/// SQLite only says "disk I/O error".
pub(super) fn err(label: &str, e: rusqlite::Error) -> String {
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
            match crate::fsutil::fs_trouble(Path::new(label)) {
                Some(why) => format!("{e} ({why})"),
                None => e.to_string(),
            }
        }
        _ => e.to_string(),
    };
    format!("ledger {label}: {detail}")
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl Cols for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> Result<Option<i64>, String> {
        self.get(i).map_err(|e| e.to_string())
    }
    fn text(&self, i: usize) -> Result<Option<String>, String> {
        self.get(i).map_err(|e| e.to_string())
    }
}

/// `$N` placeholders, as written for both engines, in SQLite's `?N` form.
fn sql(text: &str) -> String {
    text.replace('$', "?")
}

pub(super) fn exec(c: &Connection, text: &str, params: &[Val]) -> rusqlite::Result<u64> {
    // Cached: a run writes the same few statements several times (an event per step),
    // and compiling a statement costs more than running it.
    c.prepare_cached(&sql(text))?
        .execute(rusqlite::params_from_iter(params))
        .map(|n| n as u64)
}

pub(super) fn query<T>(
    c: &Connection,
    label: &str,
    text: &str,
    params: &[Val],
    map: impl Fn(&dyn Cols) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let mut stmt = c.prepare_cached(&sql(text)).map_err(|e| err(label, e))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(params))
        .map_err(|e| err(label, e))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(|e| err(label, e))? {
        out.push(map(r).map_err(|e| format!("ledger {label}: {e}"))?);
    }
    Ok(out)
}

impl Sqlite {
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Runs `f` in one IMMEDIATE transaction (the write lock taken up front) and commits
    /// it, or rolls it back when `f` or the commit fails. With `flush` the commit is
    /// flushed (`synchronous=FULL`, the connection's setting); without, it is written
    /// with `NORMAL` and becomes durable with the next flushed commit. The transaction
    /// and synchronous statements are compiled once per connection (cached), not at
    /// every transaction.
    pub(super) fn transaction<T>(
        &self,
        label: &str,
        flush: bool,
        f: impl FnOnce(&Connection) -> Result<T, String>,
    ) -> Result<T, String> {
        let c = &self.conn;
        let run = |sql: &str| {
            c.prepare_cached(sql)
                .and_then(|mut st| st.execute([]))
                .map(|_| ())
                .map_err(|e| err(label, e))
        };
        if !flush {
            run("PRAGMA synchronous=NORMAL")?;
        }
        let result = run("BEGIN IMMEDIATE").and_then(|()| {
            let out = f(c).and_then(|out| run("COMMIT").map(|()| out));
            if out.is_err() && !c.is_autocommit() {
                // Nothing of a failed transaction stays; its own error is the one to report.
                let _ = c.execute_batch("ROLLBACK");
            }
            out
        });
        if !flush {
            run("PRAGMA synchronous=FULL")?;
        }
        result
    }

    pub(super) fn begin(&mut self) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        self.conn.transaction_with_behavior(TransactionBehavior::Immediate)
    }

    pub(super) fn open(path: &Path, busy: Duration) -> Result<Sqlite, String> {
        let mut s = Sqlite::open_unmigrated(path, busy)?;
        s.migrate(&path.display().to_string())?;
        Ok(s)
    }

    /// `keyrotate migrate`: creates or migrates the ledger; the version before and after.
    pub(super) fn migrate_now(path: &Path, busy: Duration) -> Result<(i64, i64), String> {
        let label = path.display().to_string();
        let mut s = Sqlite::open_unmigrated(path, busy)?;
        let before = s.user_version(&label)?;
        s.migrate(&label)?;
        Ok((before.min(MIGRATIONS.len() as i64), s.user_version(&label)?))
    }

    fn open_unmigrated(path: &Path, busy: Duration) -> Result<Sqlite, String> {
        let label = path.display().to_string();
        check_sidecars(path, &label)?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.is_file() => return Err(format!("ledger {label}: not a regular file")),
            Ok(_) => {}
            Err(_) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| format!("ledger {label}: cannot create: {}", crate::fsutil::io_reason(&e)))?;
            }
        }
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let new_wal = !Path::new(&wal).exists();
        let flags =
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(real_parents(path), flags).map_err(|e| err(&label, e))?;
        conn.busy_timeout(busy).map_err(|e| err(&label, e))?;
        // Room for every statement a run uses (about twenty), so that none is compiled
        // twice (rusqlite's default keeps 16).
        conn.set_prepared_statement_cache_capacity(64);
        // The WAL outlives the process (no checkpoint on close): a process that found
        // the WAL in place neither rewrites and flushes its header nor flushes the
        // folder for a new file, and does not copy the WAL into the database on the way
        // out. A checkpoint runs at a commit that leaves the WAL past ~100 pages, so
        // the WAL stays small (cheap for a reader to index) and its flushes are
        // amortised over many runs. `journal_size_limit` trims a WAL that one large
        // transaction (a migration) grew. Every commit is still flushed (FULL).
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(|e| err(&label, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
             PRAGMA wal_autocheckpoint=100; PRAGMA journal_size_limit=1048576;",
        )
        .map_err(|e| err(&label, e))?;
        if new_wal {
            // The bundled SQLite is built without its own folder sync
            // (`SQLITE_DISABLE_DIRSYNC`, .cargo/config.toml), which it would do in every
            // process whether or not the WAL was new. Only a new WAL (and, with it, a new
            // ledger file) needs its name made durable, before the first commit in it.
            let dir = real_parents(path);
            let dir = dir.parent().unwrap_or(Path::new("."));
            crate::failpoint::hit("ledger", "dirsync")
                .and_then(|()| crate::fsutil::fsync_dir(dir))
                .map_err(|e| {
                    format!(
                        "ledger {label}: cannot sync its folder: {}",
                        crate::fsutil::io_reason(&e)
                    )
                })?;
        }
        Ok(Sqlite { conn, _snapshot: None })
    }

    pub(super) fn open_read_only(path: &Path) -> Result<Option<Sqlite>, String> {
        let label = path.display().to_string();
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("ledger {label}: {}", crate::fsutil::io_reason(&e))),
            Ok(m) if !m.is_file() => return Err(format!("ledger {label}: not a regular file")),
            Ok(_) => {}
        }
        check_sidecars(path, &label)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let flags =
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        let s = if !Path::new(&wal).exists() {
            let uri = format!("file:{}?immutable=1", uri_escape(&real_parents(path)));
            let conn =
                Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI).map_err(|e| err(&label, e))?;
            Sqlite { conn, _snapshot: None }
        } else if Path::new(&shm).exists() {
            // The WAL in place, its index (-shm) opened read-only: this reader writes no
            // read mark and never rebuilds the index in the shared file. When no other
            // connection vouches for the index, SQLite indexes the WAL in private memory
            // (cheap: the writers keep the WAL near 100 pages). Nothing is copied.
            // A state SQLite will not read that way (an index being rebuilt by a writer
            // that died mid-way) falls back to the private copy below.
            let uri = format!("file:{}?mode=ro&readonly_shm=1", uri_escape(&real_parents(path)));
            let in_place = Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
                .and_then(|conn| conn.query_row("PRAGMA user_version", [], |_| Ok(())).map(|()| conn));
            match in_place {
                Ok(conn) => Sqlite { conn, _snapshot: None },
                Err(e) => {
                    tracing::debug!("reading the ledger's WAL in place failed ({e}); reading a copy");
                    let copy = private_copy(path, Path::new(&wal))?;
                    let conn = Connection::open_with_flags(
                        copy.path().join("ledger.sqlite3"),
                        OpenFlags::SQLITE_OPEN_READ_WRITE,
                    )
                    .map_err(|e| err(&label, e))?;
                    Sqlite {
                        conn,
                        _snapshot: Some(copy),
                    }
                }
            }
        } else {
            // A WAL without its index (removed by hand): SQLite would have to create the
            // index file, which a reader must not do. Read a private copy instead.
            let copy = private_copy(path, Path::new(&wal))?;
            let conn =
                Connection::open_with_flags(copy.path().join("ledger.sqlite3"), OpenFlags::SQLITE_OPEN_READ_WRITE)
                    .map_err(|e| err(&label, e))?;
            Sqlite {
                conn,
                _snapshot: Some(copy),
            }
        };
        let version = s.user_version(&label)?;
        if version as usize > MIGRATIONS.len() {
            return Err(too_new(&label, version));
        }
        if version == 0 {
            // Created but never migrated: as good as empty.
            return Ok(None);
        }
        if (version as usize) < MIGRATIONS.len() {
            return Err(format!(
                "ledger {label}: schema version {version} needs migrating; run `keyrotate migrate` (or any rotate) first"
            ));
        }
        Ok(Some(s))
    }

    fn user_version(&self, label: &str) -> Result<i64, String> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| err(label, e))
    }

    fn migrate(&mut self, label: &str) -> Result<(), String> {
        let version = self.user_version(label)?;
        if version as usize > MIGRATIONS.len() {
            return Err(too_new(label, version));
        }
        if version as usize == MIGRATIONS.len() {
            return Ok(());
        }
        // Re-read inside the write lock: another process may have migrated meanwhile.
        let tx = self.begin().map_err(|e| err(label, e))?;
        migrations::walk(SqliteMigration { tx, label }, MIGRATIONS, label)
            .map(|_| ())
            .map_err(|e| match e {
                MigrateError::Denied(e) | MigrateError::Other(e) => e,
            })
    }
}

/// SQLite's side of [`migrations::walk`]: the version is `PRAGMA user_version`, set in
/// the same transaction as the migration's tables.
struct SqliteMigration<'a> {
    tx: rusqlite::Transaction<'a>,
    label: &'a str,
}

impl MigrationTx for SqliteMigration<'_> {
    fn version(&mut self) -> Result<i64, MigrateError> {
        Ok(self
            .tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| err(self.label, e))?)
    }

    fn apply(&mut self, sql: &str, version: i64) -> Result<(), MigrateError> {
        self.tx.execute_batch(sql).map_err(|e| err(self.label, e))?;
        Ok(self
            .tx
            .pragma_update(None, "user_version", version)
            .map_err(|e| err(self.label, e))?)
    }

    fn commit(self) -> Result<(), MigrateError> {
        Ok(self.tx.commit().map_err(|e| err(self.label, e))?)
    }
}

fn too_new(label: &str, version: i64) -> String {
    migrations::too_new(label, version, MIGRATIONS.len() as i64)
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

/// `path` with the symlinks above the state folder resolved. SQLite's NOFOLLOW refuses a
/// symlink anywhere in the path, but one above the configured folder (`/var/lib` ->
/// `/data`) is normal and must work (DESIGN section 4.4); the state folder's own name
/// and the file's are kept, so a symlink there is still refused.
fn real_parents(path: &Path) -> std::path::PathBuf {
    let resolved = (|| {
        let dir = path.parent()?;
        let above = std::fs::canonicalize(dir.parent()?).ok()?;
        Some(above.join(dir.file_name()?).join(path.file_name()?))
    })();
    resolved.unwrap_or_else(|| path.to_path_buf())
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

/// Refuses a `-wal` or `-shm` beside the ledger that is not a regular file (a planted
/// symlink, a folder). SQLite (NOFOLLOW) refuses a symlinked one with a bare "unable to
/// open database file", and a dry run's private copy would read through it: name it,
/// the same way for the real and the dry run.
fn check_sidecars(path: &Path, label: &str) -> Result<(), String> {
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        if let Ok(m) = std::fs::symlink_metadata(&side) {
            if !m.is_file() {
                let what = if m.file_type().is_symlink() {
                    "a symlink"
                } else {
                    "not a regular file"
                };
                return Err(format!(
                    "ledger {label}: its {suffix} file is {what}; refusing to follow it (move it away)"
                ));
            }
        }
    }
    Ok(())
}
