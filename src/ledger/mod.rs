//! The rotation ledger: every attempt's row and step events.
//!
//! One type, [`Ledger`], owns the connection to one of two engines with the same
//! tables: SQLite at `<state.dir>/ledger.sqlite3` (the embedded default, see
//! `sqlite.rs`) or PostgreSQL when `[state] ledger = "postgres://…"` (several hosts,
//! see `postgres.rs`). The rotation code never knows which: it reads through the
//! methods here and writes inside [`Ledger::write`], one transaction per call, through
//! a [`Writer`]. Queries are written once, with `$N` placeholders, for both engines.

#[cfg(test)]
mod contract;
mod migrations;
mod pgurl;
mod postgres;
pub use postgres::validate_url as validate_postgres_url;
mod shared;
pub use shared::{Fenced, SharedCommit, SharedKeyring, SharedVersion, SyncAck, SyncRecord, SyncRow, VersionUpdate};
mod sqlite;
mod tls;

use std::cell::RefCell;
use std::time::Duration;

use serde::Serialize;

use crate::failpoint;
use crate::outcome::Outcome;

/// Why the ledger could not do what was asked. Each message already names the ledger
/// and the cause in an operator's words; the variant says which step failed, so that a
/// caller can tell "no ledger to talk to" from "a read failed".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// It could not be opened, connected to, or migrated.
    #[error("{0}")]
    Open(String),
    /// A read, or a lock request, failed (a lost session included).
    #[error("{0}")]
    Query(String),
}

/// The rest of the code (the writer's closures, `Failure`) speaks `String`.
impl From<LedgerError> for String {
    fn from(e: LedgerError) -> String {
        e.to_string()
    }
}

/// Where the rotation ledger lives.
#[derive(Clone, Debug, PartialEq)]
pub enum LedgerLocation {
    /// The embedded default: `<state.dir>/ledger.sqlite3`.
    Sqlite(std::path::PathBuf),
    /// `[state] ledger = "postgres://…"`: shared by every host of a pool.
    Postgres(String),
}

/// The states of a run's row: the `rotations.state` CHECK list of the schema (a unit
/// test holds the two together). Only this module spells them as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Admitted, before anything was staged.
    Started,
    /// The new key material exists, not yet committed.
    Staged,
    /// Past the commit point, not yet closed.
    Committed,
    Succeeded,
    Aborted,
    TimedOut,
    NeedsReview,
    /// Refused before it started (busy, not due, ...): never blocks anything.
    Refused,
    /// A `needs_review` run a human reviewed.
    Resolved,
}

impl RunState {
    pub const ALL: [RunState; 9] = [
        RunState::Started,
        RunState::Staged,
        RunState::Committed,
        RunState::Succeeded,
        RunState::Aborted,
        RunState::TimedOut,
        RunState::NeedsReview,
        RunState::Refused,
        RunState::Resolved,
    ];

    /// The states of a run that has not ended (a run found in one of them without
    /// its lock died).
    pub const IN_FLIGHT: [RunState; 3] = [RunState::Started, RunState::Staged, RunState::Committed];

    pub const fn as_str(self) -> &'static str {
        match self {
            RunState::Started => "started",
            RunState::Staged => "staged",
            RunState::Committed => "committed",
            RunState::Succeeded => "succeeded",
            RunState::Aborted => "aborted",
            RunState::TimedOut => "timed_out",
            RunState::NeedsReview => "needs_review",
            RunState::Refused => "refused",
            RunState::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn in_flight(self) -> bool {
        RunState::IN_FLIGHT.contains(&self)
    }

    /// The terminal state a run with this outcome is closed with.
    pub const fn of(outcome: Outcome) -> RunState {
        match outcome {
            Outcome::Rotated => RunState::Succeeded,
            Outcome::Aborted => RunState::Aborted,
            Outcome::TimedOut => RunState::TimedOut,
            Outcome::NeedsReview => RunState::NeedsReview,
            Outcome::Usage | Outcome::Busy | Outcome::NotDesignated | Outcome::NotDue => RunState::Refused,
        }
    }

    /// A run that ended before its commit point by its own account (`aborted`,
    /// `timed_out`), or died or was reviewed (`needs_review`, `resolved`): it did not
    /// commit unless it recorded so.
    pub fn ended_unsuccessfully(self) -> bool {
        matches!(
            self,
            RunState::Aborted | RunState::TimedOut | RunState::NeedsReview | RunState::Resolved
        )
    }

    /// `(state = 'a' OR state = 'b')` for a statement's WHERE: SQLite builds a
    /// temporary table for a constant IN list of three or more on every run of the
    /// statement, and compares an OR of equalities in place. (The partial index of runs
    /// in flight is written with IN, and a query that uses it keeps [`RunState::sql_in`].)
    fn sql_any(states: &[RunState]) -> String {
        let list: Vec<String> = states.iter().map(|s| format!("state = '{}'", s.as_str())).collect();
        format!("({})", list.join(" OR "))
    }

    /// `state IN ('a','b')` for a query.
    fn sql_in(states: &[RunState]) -> String {
        let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
        format!("state IN ({})", list.join(","))
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `rotations`, every column.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub run_id: String,
    pub domain: String,
    pub state: RunState,
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
    /// The audit chain head recorded when the run closed (DESIGN section 12).
    pub audit_seq: Option<i64>,
    pub audit_hash: Option<String>,
}

impl RunRow {
    pub fn in_flight(&self) -> bool {
        self.state.in_flight()
    }
}

const COLUMNS: &str = "id, run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool, \
    started_at, deadline_at, ended_at, from_version, to_version, forced, resolved_by, resolved_at, resolution, \
    requested_reason, audit_seq, audit_hash";

/// `(from_version, to_version)`: the active version before and after a run.
pub type Versions = (Option<u64>, Option<u64>);

pub use crate::run::NewRun;

/// What the admission decision needs to know about one domain.
#[derive(Clone, Debug, Default)]
pub struct DomainRecord {
    pub in_flight: Option<RunRow>,
    pub blocking: Option<RunRow>,
    pub last_success: Option<RunRow>,
    pub last_run: Option<RunRow>,
}

pub use crate::time::now;

/// A query parameter, for either engine.
#[derive(Clone, Debug)]
enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Text(s.to_string())
    }
}
impl From<&String> for Val {
    fn from(s: &String) -> Val {
        Val::Text(s.clone())
    }
}
impl From<i64> for Val {
    fn from(n: i64) -> Val {
        Val::Int(n)
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(o: Option<T>) -> Val {
        o.map_or(Val::Null, Into::into)
    }
}
impl From<u64> for Val {
    fn from(n: u64) -> Val {
        Val::Int(n as i64)
    }
}

/// A connection (or transaction) of either engine, for running one query.
enum Db<'r, 'c> {
    Sqlite(&'r rusqlite::Connection),
    PgClient(&'r RefCell<::postgres::Client>),
    PgTx(&'r RefCell<::postgres::Transaction<'c>>),
}

/// A row as the generic layer reads it.
trait Cols {
    fn int(&self, i: usize) -> Result<Option<i64>, String>;
    fn text(&self, i: usize) -> Result<Option<String>, String>;
}

fn run_row(r: &dyn Cols) -> Result<RunRow, String> {
    let need = |v: Option<String>| v.ok_or_else(|| "a NOT NULL column is NULL".to_string());
    Ok(RunRow {
        id: r.int(0)?.unwrap_or(0),
        run_id: need(r.text(1)?)?,
        domain: need(r.text(2)?)?,
        state: {
            let state = need(r.text(3)?)?;
            RunState::parse(&state).ok_or_else(|| format!("unknown run state {state:?}"))?
        },
        exit_code: r.int(4)?,
        reason: r.text(5)?,
        trigger: need(r.text(6)?)?,
        operator: r.text(7)?,
        host: need(r.text(8)?)?,
        pid: r.int(9)?.unwrap_or(0),
        pool: r.text(10)?,
        started_at: need(r.text(11)?)?,
        deadline_at: need(r.text(12)?)?,
        ended_at: r.text(13)?,
        from_version: r.int(14)?,
        to_version: r.int(15)?,
        forced: r.int(16)?.unwrap_or(0) != 0,
        resolved_by: r.text(17)?,
        resolved_at: r.text(18)?,
        resolution: r.text(19)?,
        requested_reason: r.text(20)?,
        audit_seq: r.int(21)?,
        audit_hash: r.text(22)?,
    })
}

impl Db<'_, '_> {
    /// Runs a statement and returns how many rows it changed.
    fn exec(&self, label: &str, sql: &str, params: &[Val]) -> Result<u64, String> {
        match self {
            Db::Sqlite(c) => sqlite::exec(c, sql, params).map_err(|e| sqlite::err(label, e)),
            Db::PgClient(c) => postgres::exec(&mut *c.borrow_mut(), sql, params).map_err(|e| postgres::err(label, e)),
            Db::PgTx(t) => postgres::exec(&mut *t.borrow_mut(), sql, params).map_err(|e| postgres::err(label, e)),
        }
    }

    /// Runs a query and maps each row.
    fn query<T>(
        &self,
        label: &str,
        sql: &str,
        params: &[Val],
        map: impl Fn(&dyn Cols) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        match self {
            Db::Sqlite(c) => sqlite::query(c, label, sql, params, map),
            Db::PgClient(c) => postgres::query(&mut *c.borrow_mut(), label, sql, params, map),
            Db::PgTx(t) => postgres::query(&mut *t.borrow_mut(), label, sql, params, map),
        }
    }

    fn runs(&self, label: &str, filter: &str, params: &[Val]) -> Result<Vec<RunRow>, String> {
        self.query(
            label,
            &format!("SELECT {COLUMNS} FROM rotations WHERE {filter}"),
            params,
            run_row,
        )
    }

    /// The rows with these ids, or with this run id: the one statement that reads whole
    /// rows by key, shared by [`Db::get`] and [`Db::domain_record`]. A statement of
    /// every column costs SQLite more to compile (each result column's names and type)
    /// than to run, so a run compiles it once instead of once per question.
    fn rows_by_key(&self, label: &str, ids: [Option<i64>; 4], run_id: Option<&str>) -> Result<Vec<RunRow>, String> {
        let [a, b, c, d] = ids;
        self.query(
            label,
            // Equalities, not `id IN (…)`: SQLite builds a temporary table for an IN
            // list of parameters on every run of the statement.
            &format!("SELECT {COLUMNS} FROM rotations WHERE id = $1 OR id = $2 OR id = $3 OR id = $4 OR run_id = $5"),
            &[a.into(), b.into(), c.into(), d.into(), run_id.into()],
            run_row,
        )
    }

    fn get(&self, label: &str, run_id: &str) -> Result<Option<RunRow>, String> {
        Ok(self.rows_by_key(label, [None; 4], Some(run_id))?.pop())
    }

    /// One statement finds the ids of the four rows (each through the index the
    /// question needs), and [`Db::rows_by_key`] reads them: two statements (and, on
    /// PostgreSQL, two round trips) where one per question took four.
    fn domain_record(&self, label: &str, domain: &str) -> Result<DomainRecord, String> {
        let ids = self
            .query(
                label,
                &format!(
                    // No ORDER BY for the run in flight: the unique partial index
                    // `rotations_one_in_flight` allows one, and ordering it cost a sort.
                    "SELECT (SELECT id FROM rotations WHERE domain = $1 AND {} LIMIT 1), \
                     (SELECT id FROM rotations WHERE domain = $1 AND state = 'needs_review' ORDER BY id LIMIT 1), \
                     (SELECT id FROM rotations WHERE domain = $1 AND {LAST_SUCCESS} ORDER BY id DESC LIMIT 1), \
                     (SELECT id FROM rotations WHERE domain = $1 ORDER BY id DESC LIMIT 1)",
                    RunState::sql_in(&RunState::IN_FLIGHT)
                ),
                &[domain.into()],
                |r| Ok([r.int(0)?, r.int(1)?, r.int(2)?, r.int(3)?]),
            )?
            .pop()
            .unwrap_or_default();
        if ids.iter().all(Option::is_none) {
            return Ok(DomainRecord::default());
        }
        let rows = self.rows_by_key(label, ids, None)?;
        let pick = |id: Option<i64>| id.and_then(|id| rows.iter().find(|r| r.id == id).cloned());
        Ok(DomainRecord {
            in_flight: pick(ids[0]),
            blocking: pick(ids[1]),
            last_success: pick(ids[2]),
            last_run: pick(ids[3]),
        })
    }
}

/// The runs that restart the due clock. It follows the active key: a revocation that
/// left the active version as it was (a retired or pending key revoked) is not a rotation.
const LAST_SUCCESS: &str = "state = 'succeeded' AND NOT (trigger = 'revoke' AND from_version IS NOT NULL \
    AND to_version = from_version)";

enum Conn {
    Sqlite(sqlite::Sqlite),
    Postgres(RefCell<::postgres::Client>),
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // The server would release the run's advisory lock when it notices the session
        // end, a moment after this process exits; a rerun started in that moment would
        // be refused as BUSY. Release it now, in order.
        if let Conn::Postgres(c) = &self.conn {
            let _ = c.borrow_mut().batch_execute("SELECT pg_advisory_unlock_all()");
        }
    }
}

/// The ledger of one installation.
pub struct Ledger {
    conn: Conn,
    /// How messages name it: the file, or the URL without its password.
    label: String,
}

impl Ledger {
    /// Opens the ledger for writing, creating and migrating it as needed. Waiting for
    /// other writers is bounded by `busy`.
    pub fn open(location: &LedgerLocation, busy: Duration) -> Result<Ledger, LedgerError> {
        Self::open_raw(location, busy).map_err(LedgerError::Open)
    }

    fn open_raw(location: &LedgerLocation, busy: Duration) -> Result<Ledger, String> {
        match location {
            LedgerLocation::Sqlite(path) => Ok(Ledger {
                label: path.display().to_string(),
                conn: Conn::Sqlite(sqlite::Sqlite::open(path, busy)?),
            }),
            LedgerLocation::Postgres(url) => {
                failpoint::hit("ledger", "connect").map_err(|e| format!("ledger {}: {e}", postgres::redact(url)))?;
                Ok(Ledger {
                    label: postgres::redact(url),
                    conn: Conn::Postgres(RefCell::new(postgres::open(url, busy)?)),
                })
            }
        }
    }

    /// Opens the ledger for reading only: no file is created or changed (dry runs,
    /// `status`, `history`, `check`). `Ok(None)` when there is no ledger yet.
    pub fn open_read_only(location: &LedgerLocation) -> Result<Option<Ledger>, LedgerError> {
        Self::open_read_only_raw(location).map_err(LedgerError::Open)
    }

    fn open_read_only_raw(location: &LedgerLocation) -> Result<Option<Ledger>, String> {
        match location {
            LedgerLocation::Sqlite(path) => Ok(sqlite::Sqlite::open_read_only(path)?.map(|s| Ledger {
                label: path.display().to_string(),
                conn: Conn::Sqlite(s),
            })),
            LedgerLocation::Postgres(url) => Ok(postgres::open_read_only(url)?.map(|c| Ledger {
                label: postgres::redact(url),
                conn: Conn::Postgres(RefCell::new(c)),
            })),
        }
    }

    /// Brings the schema to this keyrotate's version (`keyrotate migrate`, run as the
    /// role that owns the tables): `(label, version before, version after)`.
    pub fn migrate(location: &LedgerLocation, busy: Duration) -> Result<(String, i64, i64), LedgerError> {
        Self::migrate_raw(location, busy).map_err(LedgerError::Open)
    }

    fn migrate_raw(location: &LedgerLocation, busy: Duration) -> Result<(String, i64, i64), String> {
        match location {
            LedgerLocation::Sqlite(path) => {
                let (from, to) = sqlite::Sqlite::migrate_now(path, busy)?;
                Ok((path.display().to_string(), from, to))
            }
            LedgerLocation::Postgres(url) => {
                let (from, to) = postgres::migrate_now(url, busy)?;
                Ok((postgres::redact(url), from, to))
            }
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    fn db(&self) -> Db<'_, '_> {
        match &self.conn {
            Conn::Sqlite(s) => Db::Sqlite(s.conn()),
            Conn::Postgres(c) => Db::PgClient(c),
        }
    }

    pub fn get(&self, run_id: &str) -> Result<Option<RunRow>, LedgerError> {
        self.get_raw(run_id).map_err(LedgerError::Query)
    }

    fn get_raw(&self, run_id: &str) -> Result<Option<RunRow>, String> {
        self.round_trip("get")?;
        self.db().get(&self.label, run_id)
    }

    pub fn domain_record(&self, domain: &str) -> Result<DomainRecord, LedgerError> {
        self.domain_record_raw(domain).map_err(LedgerError::Query)
    }

    fn domain_record_raw(&self, domain: &str) -> Result<DomainRecord, String> {
        self.round_trip("domain_record")?;
        self.db().domain_record(&self.label, domain)
    }

    /// Ledger rows newest first, optionally for one domain and since an instant.
    pub fn history(&self, domain: Option<&str>, since: Option<&str>, limit: u32) -> Result<Vec<RunRow>, LedgerError> {
        self.history_raw(domain, since, limit).map_err(LedgerError::Query)
    }

    fn history_raw(&self, domain: Option<&str>, since: Option<&str>, limit: u32) -> Result<Vec<RunRow>, String> {
        let mut filter = String::from("TRUE");
        let mut params = Vec::new();
        if let Some(d) = domain {
            params.push(Val::from(d));
            filter.push_str(&format!(" AND domain = ${}", params.len()));
        }
        if let Some(s) = since {
            params.push(Val::from(s));
            filter.push_str(&format!(" AND started_at >= ${}", params.len()));
        }
        params.push(Val::Int(i64::from(limit)));
        filter.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
        self.db().runs(&self.label, &filter, &params)
    }

    /// The step events of one run, oldest first: `(at, phase, detail)`.
    pub fn events(&self, run_id: &str) -> Result<Vec<(String, String, Option<String>)>, LedgerError> {
        self.events_raw(run_id).map_err(LedgerError::Query)
    }

    fn events_raw(&self, run_id: &str) -> Result<Vec<(String, String, Option<String>)>, String> {
        self.round_trip("events")?;
        self.db().query(
            &self.label,
            "SELECT at, phase, detail FROM rotation_events WHERE run_id = $1 ORDER BY id",
            &[run_id.into()],
            |r| {
                Ok((
                    r.text(0)?.unwrap_or_default(),
                    r.text(1)?.unwrap_or_default(),
                    r.text(2)?,
                ))
            },
        )
    }

    /// The audit chain heads recorded by runs of `host`, whose audit file is this
    /// host's (a shared ledger holds every host's anchors).
    pub fn audit_anchors(&self, host: &str) -> Result<Vec<crate::audit::Anchor>, LedgerError> {
        self.audit_anchors_raw(host).map_err(LedgerError::Query)
    }

    fn audit_anchors_raw(&self, host: &str) -> Result<Vec<crate::audit::Anchor>, String> {
        self.db().query(
            &self.label,
            "SELECT run_id, audit_seq, audit_hash FROM rotations \
             WHERE host = $1 AND audit_seq IS NOT NULL AND audit_hash IS NOT NULL ORDER BY audit_seq",
            &[host.into()],
            |r| {
                Ok(crate::audit::Anchor {
                    run_id: r.text(0)?.unwrap_or_default(),
                    seq: r.int(1)?.unwrap_or(0).max(0) as u64,
                    hash: r.text(2)?.unwrap_or_default(),
                })
            },
        )
    }

    /// What the ledger knows about the runs that may have left files in `domain`'s key
    /// store (DESIGN 4.4): whether it knows `manifest_run`, and the staging records,
    /// commits and reported files of the domain's recent runs. Refused runs never
    /// touch keys and are skipped; a leftover is removed by the first rotation after
    /// the run that left it, so the last few dozen runs are the whole story.
    pub fn provenance(
        &self,
        domain: &str,
        manifest_run: Option<&str>,
    ) -> Result<crate::keystore::Provenance, LedgerError> {
        self.provenance_raw(domain, manifest_run).map_err(LedgerError::Query)
    }

    fn provenance_raw(&self, domain: &str, manifest_run: Option<&str>) -> Result<crate::keystore::Provenance, String> {
        let db = self.db();
        // Whether the ledger knows the manifest's run (a row, or none) and, if so, the
        // latest later run of the domain that committed, in one statement. Only a row of
        // the same host counts: a key store is local to its host, and a shared ledger
        // also records other hosts' commits of their own stores.
        let (manifest_run_known, later_commit) = match manifest_run {
            None => (None, None),
            Some(run) => {
                let known = db.query(
                    &self.label,
                    "SELECT (SELECT r.run_id FROM rotations r JOIN rotation_events e ON e.run_id = r.run_id \
                     WHERE r.domain = m.domain AND e.phase = 'committed' AND r.host = m.host AND r.id > m.id \
                     ORDER BY r.id DESC LIMIT 1) FROM rotations m WHERE m.run_id = $1 AND m.domain = $2",
                    &[run.into(), domain.into()],
                    |r| r.text(0),
                )?;
                (Some(!known.is_empty()), known.into_iter().next().flatten())
            }
        };
        // In event order, sorted here: a few dozen rows, where an ORDER BY made SQLite
        // build a temporary b-tree on every run (and an IN list of phases another).
        let mut rows = db.query(
            &self.label,
            "SELECT e.id, r.run_id, r.state, e.phase, e.detail FROM rotations r \
             JOIN rotation_events e ON e.run_id = r.run_id \
             WHERE r.id IN (SELECT id FROM rotations WHERE domain = $1 AND state <> 'refused' ORDER BY id DESC LIMIT 32) \
             AND (e.phase = 'staging' OR e.phase = 'committed' OR e.phase = 'unlisted')",
            &[domain.into()],
            |r| {
                Ok((
                    r.int(0)?.unwrap_or_default(),
                    r.text(1)?.unwrap_or_default(),
                    r.text(2)?.unwrap_or_default(),
                    r.text(3)?.unwrap_or_default(),
                    r.text(4)?.unwrap_or_default(),
                ))
            },
        )?;
        rows.sort_by_key(|row| row.0);
        let mut runs: Vec<crate::keystore::RunRecord> = Vec::new();
        for (_, run_id, state, phase, detail) in rows {
            let i = match runs.iter().position(|r| r.run_id == run_id) {
                Some(i) => i,
                None => {
                    runs.push(crate::keystore::RunRecord {
                        run_id,
                        ended_uncommitted: RunState::parse(&state).is_some_and(RunState::ended_unsuccessfully),
                        ..Default::default()
                    });
                    runs.len() - 1
                }
            };
            let files = detail.split_whitespace().map(str::to_string);
            match phase.as_str() {
                "staging" => runs[i].staged.extend(files),
                "unlisted" => runs[i].noted.extend(files),
                _ => runs[i].committed = true,
            }
        }
        // Every revocation of the domain's history (a backup may be years old), except
        // those whose run says it stopped before its commit.
        let mut compromised: Vec<(i64, String, String)> = db.query(
            &self.label,
            // Driven by the partial index of `compromised` events (migration 003), each
            // checked against its run: a handful of rows however long the domain's
            // history. No ORDER BY: it would make SQLite scan every event by id.
            "SELECT e.id, e.run_id, e.detail FROM rotation_events e WHERE e.phase = 'compromised' \
             AND (SELECT r.domain = $1 AND r.state <> 'aborted' AND r.state <> 'timed_out' AND r.state <> 'refused' \
             FROM rotations r WHERE r.run_id = e.run_id)",
            &[domain.into()],
            |r| {
                Ok((
                    r.int(0)?.unwrap_or_default(),
                    r.text(1)?.unwrap_or_default(),
                    r.text(2)?.unwrap_or_default(),
                ))
            },
        )?;
        compromised.sort_by_key(|(id, _, _)| *id);
        let compromised = compromised
            .into_iter()
            .filter_map(|(_, run, detail)| crate::keystore::CompromiseRecord::parse(&run, &detail))
            .collect();
        Ok(crate::keystore::Provenance {
            manifest_run_known,
            later_commit,
            runs,
            compromised,
        })
    }

    /// Takes the cross-host lock of `domain` for as long as this ledger stays open
    /// (PostgreSQL: a session advisory lock, released by the server if the process
    /// dies). `Ok(false)` when another session holds it. The embedded ledger serves one
    /// host, where the file lock is the whole story: always `Ok(true)`.
    pub fn lock_domain(&self, domain: &str) -> Result<bool, LedgerError> {
        self.lock_domain_raw(domain).map_err(LedgerError::Query)
    }

    fn lock_domain_raw(&self, domain: &str) -> Result<bool, String> {
        match &self.conn {
            Conn::Sqlite(_) => Ok(true),
            Conn::Postgres(c) => {
                self.round_trip("lock")?;
                postgres::try_advisory_lock(&mut c.borrow_mut(), domain).map_err(|e| postgres::err(&self.label, e))
            }
        }
    }

    /// Whether the ledger is shared between hosts (PostgreSQL), where the run's lock
    /// is a database session's and can be lost while the run goes on.
    pub fn is_shared(&self) -> bool {
        matches!(self.conn, Conn::Postgres(_))
    }

    /// Confirms that this run still holds `domain`'s cross-host lock: the same session,
    /// alive, the lock granted to it (DESIGN 8, "Fencing"). Called before every step that
    /// changes anything outside the database, and every second during long steps (which
    /// keeps the session from ever being idle). The embedded ledger's lock is the
    /// process's own file lock, which cannot be lost: always `Ok`.
    pub fn confirm_lock(&self, domain: &str) -> Result<(), LedgerError> {
        self.confirm_lock_raw(domain).map_err(LedgerError::Query)
    }

    fn confirm_lock_raw(&self, domain: &str) -> Result<(), String> {
        match &self.conn {
            Conn::Sqlite(_) => Ok(()),
            Conn::Postgres(c) => match postgres::own_advisory_lock_held(&mut c.borrow_mut(), domain) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!(
                    "ledger {}: this run's lock on {domain} is no longer held by its session",
                    self.label
                )),
                Err(e) => Err(format!(
                    "{}; the session holding this run's lock on {domain} is gone",
                    postgres::err(&self.label, e)
                )),
            },
        }
    }

    /// A crash-test point at each PostgreSQL round trip outside [`Ledger::write`].
    fn round_trip(&self, op: &str) -> Result<(), String> {
        if self.is_shared() {
            failpoint::hit("ledger", op).map_err(|e| format!("ledger {}: {e}", self.label))?;
        }
        Ok(())
    }

    /// Whether another session (on any host) holds `domain`'s cross-host lock now.
    pub fn domain_locked_elsewhere(&self, domain: &str) -> Result<bool, LedgerError> {
        self.domain_locked_elsewhere_raw(domain).map_err(LedgerError::Query)
    }

    fn domain_locked_elsewhere_raw(&self, domain: &str) -> Result<bool, String> {
        match &self.conn {
            Conn::Sqlite(_) => Ok(false),
            Conn::Postgres(c) => {
                postgres::advisory_lock_held(&mut c.borrow_mut(), domain).map_err(|e| postgres::err(&self.label, e))
            }
        }
    }

    /// Runs `f` inside one transaction, durable when this returns. On SQLite it is
    /// IMMEDIATE (the write lock is taken up front, so what `f` reads cannot change
    /// before it writes); on PostgreSQL the domain's advisory lock and the
    /// one-in-flight index play that part.
    pub fn write<T>(&mut self, op: &str, f: impl FnOnce(&Writer<'_, '_>) -> Result<T, String>) -> Result<T, String> {
        self.transaction(op, true, f)
    }

    /// Like [`Ledger::write`], for progress marks (`staged`, `committed`) whose loss in
    /// a power failure is harmless: the commit is waited for without its own flush, so
    /// it becomes durable with the next [`Ledger::write`] (the log is sequential: a
    /// power loss can drop it only together with everything after it). The key store,
    /// not this mark, is what a diagnosis reads to tell whether a run committed.
    pub fn write_progress<T>(
        &mut self,
        op: &str,
        f: impl FnOnce(&Writer<'_, '_>) -> Result<T, String>,
    ) -> Result<T, String> {
        self.transaction(op, false, f)
    }

    fn transaction<T>(
        &mut self,
        op: &str,
        flush: bool,
        f: impl FnOnce(&Writer<'_, '_>) -> Result<T, String>,
    ) -> Result<T, String> {
        failpoint::hit("ledger", op).map_err(|e| format!("ledger {}: {e}", self.label))?;
        let label = self.label.clone();
        match &mut self.conn {
            Conn::Sqlite(s) => s.transaction(&label, flush, |conn| {
                f(&Writer {
                    db: Db::Sqlite(conn),
                    label: &label,
                })
            }),
            Conn::Postgres(c) => {
                let mut client = c.borrow_mut();
                let mut tx = client.transaction().map_err(|e| postgres::err(&label, e))?;
                if !flush {
                    tx.batch_execute("SET LOCAL synchronous_commit TO off")
                        .map_err(|e| postgres::err(&label, e))?;
                }
                let tx = RefCell::new(tx);
                let out = f(&Writer {
                    db: Db::PgTx(&tx),
                    label: &label,
                })?;
                tx.into_inner().commit().map_err(|e| postgres::err(&label, e))?;
                Ok(out)
            }
        }
    }
}

/// Write operations, available only inside [`Ledger::write`].
pub struct Writer<'r, 'c> {
    db: Db<'r, 'c>,
    label: &'r str,
}

impl Writer<'_, '_> {
    fn exec(&self, sql: &str, params: &[Val]) -> Result<u64, String> {
        self.db.exec(self.label, sql, params)
    }

    pub fn get(&self, run_id: &str) -> Result<Option<RunRow>, String> {
        self.db.get(self.label, run_id)
    }

    pub fn domain_record(&self, domain: &str) -> Result<DomainRecord, String> {
        self.db.domain_record(self.label, domain)
    }

    /// Reads a run's row and keeps it from changing until this transaction ends: on
    /// PostgreSQL `FOR UPDATE` (a concurrent writer of the row waits, then reads what
    /// this one wrote); SQLite's IMMEDIATE transaction already excludes other writers.
    pub fn get_for_update(&self, run_id: &str) -> Result<Option<RunRow>, String> {
        match self.db {
            Db::Sqlite(_) => self.db.get(self.label, run_id),
            _ => Ok(self
                .db
                .runs(self.label, "run_id = $1 FOR UPDATE", &[run_id.into()])?
                .pop()),
        }
    }

    /// Inserts the run's row: in flight (`started`) when `end` is `None`, else closed
    /// with `(state, outcome, reason)`.
    pub fn insert(
        &self,
        run: &NewRun,
        end: Option<(RunState, Outcome, &str)>,
        from_version: Option<u64>,
    ) -> Result<(), String> {
        let (state, code, reason, ended) = match end {
            None => (RunState::Started, None, None, None),
            Some((state, o, reason)) => (state, Some(i64::from(o.code())), Some(reason), Some(now())),
        };
        self.exec(
            "INSERT INTO rotations (run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool, \
             started_at, deadline_at, ended_at, from_version, forced, requested_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            &[
                (&run.run_id).into(),
                (&run.domain).into(),
                state.as_str().into(),
                code.into(),
                reason.into(),
                run.trigger.into(),
                run.operator.as_ref().into(),
                (&run.host).into(),
                i64::from(run.pid).into(),
                run.pool.as_ref().into(),
                (&run.started_at).into(),
                (&run.deadline_at).into(),
                ended.as_ref().into(),
                from_version.into(),
                i64::from(run.forced).into(),
                run.requested_reason.as_ref().into(),
            ],
        )?;
        self.event(&run.run_id, state.as_str(), reason)
    }

    /// Moves an in-flight run to `state` (`staged`, `committed`), recording its
    /// `(from_version, to_version)` where known.
    pub fn advance(&self, run_id: &str, state: RunState, versions: Versions, detail: &str) -> Result<(), String> {
        self.exec(
            "UPDATE rotations SET state = $2, from_version = COALESCE($3, from_version), \
             to_version = COALESCE($4, to_version) WHERE run_id = $1",
            &[
                run_id.into(),
                state.as_str().into(),
                versions.0.into(),
                versions.1.into(),
            ],
        )?;
        self.event(run_id, state.as_str(), Some(detail))
    }

    /// Closes a run with its outcome. A row that is no longer in flight keeps what it
    /// says: a run that lost its lock may close late, after another host's run judged
    /// its row (`needs_review`) and an operator resolved it; that judgement and the
    /// review stand, and the late outcome is kept as an event.
    pub fn close(&self, run_id: &str, outcome: Outcome, reason: &str, versions: Versions) -> Result<(), String> {
        self.exec(
            &format!(
                "UPDATE rotations SET state = $2, exit_code = $3, reason = $4, ended_at = $5, \
                 from_version = COALESCE($6, from_version), to_version = COALESCE($7, to_version) \
                 WHERE run_id = $1 AND {}",
                RunState::sql_any(&RunState::IN_FLIGHT)
            ),
            &[
                run_id.into(),
                RunState::of(outcome).as_str().into(),
                i64::from(outcome.code()).into(),
                reason.into(),
                (&now()).into(),
                versions.0.into(),
                versions.1.into(),
            ],
        )?;
        self.event(run_id, RunState::of(outcome).as_str(), Some(reason))
    }

    /// Records the audit chain head of a run's last line, in its closing transaction.
    pub fn anchor(&self, run_id: &str, head: &crate::audit::Head) -> Result<(), String> {
        self.exec(
            "UPDATE rotations SET audit_seq = $2, audit_hash = $3 WHERE run_id = $1",
            &[run_id.into(), head.seq.into(), (&head.hash).into()],
        )
        .map(|_| ())
    }

    /// Marks a dead run as needing review, with what the key store shows.
    pub fn mark_stale(&self, run_id: &str, reason: &str) -> Result<(), String> {
        self.exec(
            "UPDATE rotations SET state = 'needs_review', reason = $2 WHERE run_id = $1",
            &[run_id.into(), reason.into()],
        )?;
        self.event(run_id, "needs_review", Some(reason))
    }

    /// Records a review on a blocking run, which unblocks its domain.
    /// `Ok(false)` when the run was no longer `needs_review` (another `resolve` got
    /// there first): nothing is written then.
    pub fn resolve(&self, run_id: &str, by: &str, note: &str) -> Result<bool, String> {
        let changed = self.exec(
            "UPDATE rotations SET state = 'resolved', resolved_by = $2, resolved_at = $3, resolution = $4 \
             WHERE run_id = $1 AND state = 'needs_review'",
            &[run_id.into(), by.into(), (&now()).into(), note.into()],
        )?;
        if changed == 0 {
            return Ok(false);
        }
        self.event(run_id, "resolved", Some(note))?;
        Ok(true)
    }

    pub fn event(&self, run_id: &str, phase: &str, detail: Option<&str>) -> Result<(), String> {
        self.exec(
            "INSERT INTO rotation_events (run_id, at, phase, detail) VALUES ($1, $2, $3, $4)",
            &[run_id.into(), (&now()).into(), phase.into(), detail.into()],
        )
        .map(|_| ())
    }
}

/// The shared ledger's lock as one of the domain's locks ([`crate::lock::DomainLocks`]).
impl crate::lock::SharedLock for Ledger {
    fn try_lock_domain(&self, domain: &str) -> Result<bool, String> {
        Ok(self.lock_domain(domain)?)
    }

    fn locked_elsewhere(&self, domain: &str) -> Result<bool, String> {
        Ok(self.domain_locked_elsewhere(domain)?)
    }

    /// The holder of a shared lock is the domain's run in flight, as its row names it.
    fn holder(&self, domain: &str) -> Option<crate::lock::Holder> {
        self.domain_record(domain)
            .ok()
            .and_then(|r| r.in_flight)
            .map(|r| crate::lock::Holder {
                run_id: r.run_id,
                pid: r.pid as u32,
                host: r.host,
                started_at: r.started_at,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The states a migration's CHECK constraint on `rotations.state` allows.
    fn check_list(sql: &str) -> Vec<String> {
        let start = sql.find("CHECK (state IN (").expect("a CHECK on state") + "CHECK (state IN (".len();
        let end = start + sql[start..].find(')').unwrap();
        sql[start..end]
            .split(',')
            .map(|s| s.trim().trim_matches('\'').to_string())
            .collect()
    }

    #[test]
    fn run_states_are_the_schemas_check_list() {
        let mine: Vec<String> = RunState::ALL.iter().map(|s| s.to_string()).collect();
        for (engine, sql) in [
            ("sqlite", include_str!("migrations/sqlite/001_init.sql")),
            ("postgres", include_str!("migrations/postgres/001_init.sql")),
        ] {
            let mut theirs = check_list(sql);
            let mut ours = mine.clone();
            theirs.sort();
            ours.sort();
            assert_eq!(ours, theirs, "{engine}: RunState and the schema's CHECK list differ");
        }
        for st in RunState::ALL {
            assert_eq!(RunState::parse(st.as_str()), Some(st));
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
    }

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
        let at = LedgerLocation::Sqlite(dir.path().join("l.sqlite3"));
        let mut l = Ledger::open(&at, Duration::from_secs(1)).unwrap();
        l.write("t", |w| w.insert(&run("a"), None, None)).unwrap();
        assert!(l.write("t", |w| w.insert(&run("b"), None, None)).is_err());
        l.write("t", |w| w.close("a", Outcome::Rotated, "ok", (None, Some(1))))
            .unwrap();
        l.write("t", |w| w.insert(&run("b"), None, None)).unwrap();
        let rec = l.domain_record("d").unwrap();
        assert_eq!(rec.in_flight.unwrap().run_id, "b");
        assert_eq!(rec.last_success.unwrap().to_version, Some(1));
        assert_eq!(l.history(Some("d"), None, 1).unwrap().len(), 1);
        drop(l);
        let ro = Ledger::open_read_only(&at).unwrap().unwrap();
        assert_eq!(ro.history(None, None, 10).unwrap().len(), 2);
        assert_eq!(ro.events("a").unwrap().len(), 2);
    }

    #[test]
    fn refuses_a_file_that_is_not_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let e = Ledger::open(&LedgerLocation::Sqlite(path.clone()), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(
            matches!(&e, LedgerError::Open(m) if m.contains("not a SQLite database")),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'x'; 4096]);
    }
}
