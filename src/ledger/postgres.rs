//! The PostgreSQL ledger, for designated pools that span hosts:
//! `[state] ledger = "postgres://user@host/db"` (libpq URL forms, including a Unix
//! socket host such as `postgres://postgres@%2Fvar%2Frun%2Fpostgresql/db`).
//!
//! The tables are those of the SQLite ledger (`migrations/postgres/`, versioned in
//! `keyrotate_schema`). Single execution across hosts comes from a session-level
//! advisory lock per domain, taken by the run's own connection and held for the whole
//! run; PostgreSQL releases it when that session ends, which includes the process
//! dying, so a killed holder never blocks the next run (which then finds its in-flight
//! row and flags it for review). Every statement is bounded by `statement_timeout`
//! and `lock_timeout` derived from the run's deadline.
//!
//! TLS follows libpq's `sslmode` (see `tls.rs`).

use std::time::Duration;

use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, GenericClient};

use super::migrations::{self, MigrateError, MigrationTx};
use super::{Cols, Val};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/postgres/001_init.sql"),
    include_str!("migrations/postgres/002_audit_anchor.sql"),
    include_str!("migrations/postgres/003_revoke_trigger.sql"),
    include_str!("migrations/postgres/004_shared_store.sql"),
];

/// The URL as messages show it: without its password (see `pgurl.rs`).
pub(super) fn redact(url: &str) -> String {
    super::pgurl::redact(url)
}

pub(super) fn err(label: &str, e: postgres::Error) -> String {
    let detail = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                let text = inner.to_string();
                if !s.contains(&text) {
                    s.push_str(&format!(": {text}"));
                }
                source = inner.source();
            }
            s
        }
    };
    format!("ledger {label}: {}", detail.replace('\n', " "))
}

impl ToSql for Val {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(n) => match *ty {
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8 | Type::INT4 | Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
        )
    }

    postgres::types::to_sql_checked!();
}

impl Cols for postgres::Row {
    fn int(&self, i: usize) -> Result<Option<i64>, String> {
        self.try_get(i).map_err(|e| e.to_string())
    }
    fn text(&self, i: usize) -> Result<Option<String>, String> {
        self.try_get(i).map_err(|e| e.to_string())
    }
}

fn refs(params: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

pub(super) fn exec(c: &mut impl GenericClient, sql: &str, params: &[Val]) -> Result<u64, postgres::Error> {
    c.execute(sql, &refs(params))
}

pub(super) fn query<T>(
    c: &mut impl GenericClient,
    label: &str,
    sql: &str,
    params: &[Val],
    map: impl Fn(&dyn Cols) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let rows = c.query(sql, &refs(params)).map_err(|e| err(label, e))?;
    rows.iter()
        .map(|r| map(r).map_err(|e| format!("ledger {label}: {e}")))
        .collect()
}

/// Checks a ledger URL without connecting (used when the config is loaded).
pub fn validate_url(url: &str) -> Result<(), String> {
    super::pgurl::check(url)?;
    let (wire, _) = super::tls::policy(url)?;
    wire.parse::<postgres::Config>().map(|_| ()).map_err(|e| e.to_string())
}

/// The password libpq would use when the URL gives none: `PGPASSWORD`, else the
/// password file's first line matching the first host, port, database and user.
fn default_password(config: &postgres::Config) -> Option<String> {
    if let Some(p) = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()) {
        return Some(p);
    }
    let user = config.get_user()?;
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".to_string(),
    };
    super::pgurl::password_from_file(&super::pgurl::Lookup {
        host: &host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        database: config.get_dbname().unwrap_or(user),
        user,
    })
}

fn connect(url: &str, timeout: Duration) -> Result<Client, String> {
    let label = redact(url);
    let (wire, tls) = super::tls::policy(url).map_err(|e| format!("ledger {label}: {e}"))?;
    let mut config: postgres::Config = wire.parse().map_err(|e| format!("ledger {label}: {e}"))?;
    if config.get_password().is_none_or(<[u8]>::is_empty) {
        if let Some(p) = default_password(&config) {
            config.password(p);
        }
    }
    config
        .connect_timeout(timeout.max(Duration::from_millis(100)))
        .application_name("keyrotate")
        // A dead peer (network cut, vanished server) fails a query within seconds
        // instead of hanging the run past its deadline with the lock unconfirmed.
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(5));
    let mut client = match tls {
        None => config.connect(postgres::NoTls),
        Some(tls) => {
            let connector = super::tls::connector(&tls).map_err(|e| format!("ledger {label}: {e}"))?;
            config.connect(connector)
        }
    }
    .map_err(|e| err(&label, e))?;
    // Bound every statement and lock wait by the time the run may still take.
    let ms = timeout.as_millis().max(100);
    client
        .batch_execute(&format!("SET statement_timeout = {ms}; SET lock_timeout = {ms}"))
        .map_err(|e| err(&label, e))?;
    Ok(client)
}

/// Opens the ledger for writing. The schema is read first and changed only when it is
/// behind this keyrotate, so a role with only SELECT, INSERT and UPDATE runs everything
/// once the owner has migrated.
pub(super) fn open(url: &str, busy: Duration) -> Result<Client, String> {
    let label = redact(url);
    let mut client = connect(url, busy)?;
    let version = recorded_version(&mut client, &label)?;
    if version.is_some_and(|v| v as usize == MIGRATIONS.len()) {
        return Ok(client);
    }
    if let Some(v) = version.filter(|v| *v as usize > MIGRATIONS.len()) {
        return Err(too_new(&label, v));
    }
    migrate(&mut client, &label).map_err(|e| match e {
        MigrateError::Denied(why) => format!(
            "ledger {label}: the schema is at version {} and this keyrotate needs {}, but this role may not \
             change it ({why}): run `keyrotate migrate` as the role that owns the tables",
            version.unwrap_or(0),
            MIGRATIONS.len()
        ),
        MigrateError::Other(e) => e,
    })?;
    Ok(client)
}

/// What `keyrotate migrate` reports: the schema version before and after.
pub(super) fn migrate_now(url: &str, busy: Duration) -> Result<(i64, i64), String> {
    let label = redact(url);
    let mut client = connect(url, busy)?;
    migrate(&mut client, &label).map_err(|e| match e {
        MigrateError::Denied(why) => format!(
            "ledger {label}: this role may not change the schema ({why}): run `keyrotate migrate` as the role \
             that owns the tables (or that may create them)"
        ),
        MigrateError::Other(e) => e,
    })
}

/// Brings the schema to this keyrotate's version through [`migrations::walk`], in one
/// transaction serialised between hosts by a transaction-level advisory lock.
fn migrate(client: &mut Client, label: &str) -> Result<(i64, i64), MigrateError> {
    let mut tx = client.transaction().map_err(|e| denied_or(label, e))?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtextextended('keyrotate:migrate', 0))")
        .map_err(|e| denied_or(label, e))?;
    // Re-read under the lock: another host may have migrated meanwhile. The DDL also
    // makes this session see that host's tables: an advisory lock alone does not refresh
    // the catalog caches that `to_regclass` reads, a lock on the schema does.
    tx.batch_execute("CREATE TABLE IF NOT EXISTS keyrotate_schema (version BIGINT NOT NULL)")
        .map_err(|e| denied_or(label, e))?;
    migrations::walk(PgMigration { tx, label }, MIGRATIONS, label)
}

/// A refused privilege is [`MigrateError::Denied`] (the caller names the role that may
/// migrate); anything else is the error as it reads.
fn denied_or(label: &str, e: postgres::Error) -> MigrateError {
    if e.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        MigrateError::Denied(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        )
    } else {
        MigrateError::Other(err(label, e))
    }
}

/// PostgreSQL's side of [`migrations::walk`]: the version is the highest row of
/// `keyrotate_schema`, inserted in the same transaction as the migration's tables.
struct PgMigration<'a> {
    tx: postgres::Transaction<'a>,
    label: &'a str,
}

impl MigrationTx for PgMigration<'_> {
    fn version(&mut self) -> Result<i64, MigrateError> {
        Ok(recorded_version(&mut self.tx, self.label)?.unwrap_or(0))
    }

    fn no_unrecorded_tables(&mut self) -> Result<(), MigrateError> {
        Ok(unrecorded_tables(&mut self.tx, self.label)?)
    }

    fn apply(&mut self, sql: &str, version: i64) -> Result<(), MigrateError> {
        self.tx.batch_execute(sql).map_err(|e| denied_or(self.label, e))?;
        self.tx
            .execute("INSERT INTO keyrotate_schema (version) VALUES ($1)", &[&version])
            .map_err(|e| denied_or(self.label, e))?;
        Ok(())
    }

    fn commit(self) -> Result<(), MigrateError> {
        self.tx.commit().map_err(|e| denied_or(self.label, e))
    }
}

/// Refuses a database whose keyrotate tables exist while no schema version is recorded
/// (the version row deleted, or the tables restored without it): migrating would fail
/// on "relation already exists", and guessing their version could apply a migration
/// twice.
fn unrecorded_tables(c: &mut impl GenericClient, label: &str) -> Result<(), String> {
    let found: Option<String> = c
        .query_one("SELECT to_regclass('rotations')::text", &[])
        .map_err(|e| err(label, e))?
        .get(0);
    match found {
        None => Ok(()),
        Some(_) => Err(format!(
            "ledger {label}: table rotations exists but keyrotate_schema records no schema version (its row was \
             deleted, or the tables were restored without it); keyrotate will not guess: as the tables' owner, \
             record the version they are at with INSERT INTO keyrotate_schema (version) VALUES (N) \
             (this keyrotate's schema is version {})",
            MIGRATIONS.len()
        )),
    }
}

pub(super) fn open_read_only(url: &str) -> Result<Option<Client>, String> {
    let label = redact(url);
    let mut client = connect(url, Duration::from_secs(10))?;
    let version = match recorded_version(&mut client, &label)? {
        None | Some(0) => {
            unrecorded_tables(&mut client, &label)?;
            return Ok(None);
        }
        Some(v) => v,
    };
    if version as usize > MIGRATIONS.len() {
        return Err(too_new(&label, version));
    }
    if (version as usize) < MIGRATIONS.len() {
        return Err(format!(
            "ledger {label}: schema version {version} needs migrating to {}: run `keyrotate migrate` as the role \
             that owns the tables",
            MIGRATIONS.len()
        ));
    }
    client
        .batch_execute("SET default_transaction_read_only = on")
        .map_err(|e| err(&label, e))?;
    Ok(Some(client))
}

/// The schema version recorded in `keyrotate_schema`: `None` when that table does not
/// exist, `Some(0)` when it is empty. Reads only.
fn recorded_version(c: &mut impl GenericClient, label: &str) -> Result<Option<i64>, String> {
    let exists: Option<String> = c
        .query_one("SELECT to_regclass('keyrotate_schema')::text", &[])
        .map_err(|e| err(label, e))?
        .get(0);
    if exists.is_none() {
        return Ok(None);
    }
    let v: Option<i64> = c
        .query_one("SELECT max(version) FROM keyrotate_schema", &[])
        .map_err(|e| err(label, e))?
        .get(0);
    Ok(Some(v.unwrap_or(0)))
}

fn too_new(label: &str, version: i64) -> String {
    migrations::too_new(label, version, MIGRATIONS.len() as i64)
}

fn lock_key(domain: &str) -> String {
    format!("keyrotate:{domain}")
}

pub(super) fn try_advisory_lock(c: &mut Client, domain: &str) -> Result<bool, postgres::Error> {
    Ok(c.query_one(
        "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
        &[&lock_key(domain)],
    )?
    .get(0))
}

/// Whether this session still holds `domain`'s advisory lock. The query is also the
/// keep-alive of a long step: a session that runs it every second is never idle for
/// `idle_session_timeout` or an idle-killing proxy.
pub(super) fn own_advisory_lock_held(c: &mut Client, domain: &str) -> Result<bool, postgres::Error> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0) AND pid = pg_backend_pid())",
        &[&lock_key(domain)],
    )?
    .get(0))
}

pub(super) fn advisory_lock_held(c: &mut Client, domain: &str) -> Result<bool, postgres::Error> {
    // Advisory locks belong to one database; a bigint key is stored as classid (high
    // 32 bits) and objid (low).
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0) AND pid <> pg_backend_pid())",
        &[&lock_key(domain)],
    )?
    .get(0))
}
