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

use super::{Cols, Val};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/postgres/001_init.sql"),
    include_str!("migrations/postgres/002_audit_anchor.sql"),
];

/// The URL as messages show it: without its password.
pub(super) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => url.to_string(),
    }
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
    let (wire, _) = super::tls::policy(url)?;
    wire.parse::<postgres::Config>().map(|_| ()).map_err(|e| e.to_string())
}

fn connect(url: &str, timeout: Duration) -> Result<Client, String> {
    let label = redact(url);
    let (wire, tls) = super::tls::policy(url).map_err(|e| format!("ledger {label}: {e}"))?;
    let mut config: postgres::Config = wire.parse().map_err(|e| format!("ledger {label}: {e}"))?;
    config
        .connect_timeout(timeout.max(Duration::from_millis(100)))
        .application_name("keyrotate");
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

pub(super) fn open(url: &str, busy: Duration) -> Result<Client, String> {
    let label = redact(url);
    let mut client = connect(url, busy)?;
    let mut tx = client.transaction().map_err(|e| err(&label, e))?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('keyrotate:migrate', 0)); \
         CREATE TABLE IF NOT EXISTS keyrotate_schema (version BIGINT NOT NULL)",
    )
    .map_err(|e| err(&label, e))?;
    let version = schema_version(&mut tx, &label)?;
    if version as usize > MIGRATIONS.len() {
        return Err(too_new(&label, version));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).map_err(|e| err(&label, e))?;
        tx.execute(
            "INSERT INTO keyrotate_schema (version) VALUES ($1)",
            &[&((i + 1) as i64)],
        )
        .map_err(|e| err(&label, e))?;
    }
    tx.commit().map_err(|e| err(&label, e))?;
    Ok(client)
}

pub(super) fn open_read_only(url: &str) -> Result<Option<Client>, String> {
    let label = redact(url);
    let mut client = connect(url, Duration::from_secs(10))?;
    let exists: Option<String> = client
        .query_one("SELECT to_regclass('keyrotate_schema')::text", &[])
        .map_err(|e| err(&label, e))?
        .get(0);
    if exists.is_none() {
        return Ok(None);
    }
    let version = schema_version(&mut client, &label)?;
    if version as usize > MIGRATIONS.len() {
        return Err(too_new(&label, version));
    }
    if (version as usize) < MIGRATIONS.len() {
        return if version == 0 {
            Ok(None)
        } else {
            Err(format!("ledger {label}: schema version {version} needs migrating"))
        };
    }
    client
        .batch_execute("SET default_transaction_read_only = on")
        .map_err(|e| err(&label, e))?;
    Ok(Some(client))
}

fn schema_version(c: &mut impl GenericClient, label: &str) -> Result<i64, String> {
    let v: Option<i64> = c
        .query_one("SELECT max(version) FROM keyrotate_schema", &[])
        .map_err(|e| err(label, e))?
        .get(0);
    Ok(v.unwrap_or(0))
}

fn too_new(label: &str, version: i64) -> String {
    format!(
        "ledger {label}: schema version {version} is newer than this keyrotate knows ({}); upgrade keyrotate",
        MIGRATIONS.len()
    )
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

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            redact("postgres://kr:s3cret@db.example:5432/ledger"),
            "postgres://kr:***@db.example:5432/ledger"
        );
        assert_eq!(redact("postgres://kr@db/ledger"), "postgres://kr@db/ledger");
        assert_eq!(
            redact("postgres://postgres@%2Fvar%2Frun%2Fpostgresql/db"),
            "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/db"
        );
        assert_eq!(redact("postgresql://a:b:c@h/d"), "postgresql://a:***@h/d");
    }
}
