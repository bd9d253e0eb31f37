//! One migration routine for both engines. Each engine keeps its numbered migrations
//! (`migrations/{sqlite,postgres}/NNN_*.sql`) and says how to open a migration
//! transaction, read and record the version inside it; the walk over the list (too new,
//! unrecorded tables, apply the missing ones in order, commit once) is written here once,
//! so the two engines cannot drift on it.

/// Why a migration did not happen.
pub(super) enum MigrateError {
    /// The role lacks a privilege the migration needs (PostgreSQL): the caller says
    /// which role should run `keyrotate migrate`.
    Denied(String),
    Other(String),
}

impl From<String> for MigrateError {
    fn from(e: String) -> Self {
        MigrateError::Other(e)
    }
}

/// An engine's migration transaction, opened by the engine with whatever serialises it
/// against other writers and hosts (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a
/// transaction-level advisory lock and `CREATE TABLE IF NOT EXISTS keyrotate_schema`,
/// which also refreshes the catalog another host may just have changed).
pub(super) trait MigrationTx {
    /// The schema version recorded, read inside the transaction (0: none yet).
    fn version(&mut self) -> Result<i64, MigrateError>;
    /// At version 0: refuses a database whose tables exist without a recorded version
    /// (an engine that cannot tell them apart accepts).
    fn no_unrecorded_tables(&mut self) -> Result<(), MigrateError> {
        Ok(())
    }
    /// Runs one migration's SQL and records `version` as reached.
    fn apply(&mut self, sql: &str, version: i64) -> Result<(), MigrateError>;
    fn commit(self) -> Result<(), MigrateError>;
}

/// Brings the schema to `migrations.len()` inside `tx`, all or nothing; the version
/// before and after.
pub(super) fn walk<T: MigrationTx>(mut tx: T, migrations: &[&str], label: &str) -> Result<(i64, i64), MigrateError> {
    let latest = migrations.len() as i64;
    let version = tx.version()?;
    if version > latest {
        return Err(MigrateError::Other(too_new(label, version, latest)));
    }
    if version == 0 {
        tx.no_unrecorded_tables()?;
    }
    for (i, sql) in migrations.iter().enumerate().skip(version as usize) {
        tx.apply(sql, i as i64 + 1)?;
    }
    tx.commit()?;
    Ok((version, latest))
}

/// The refusal of a schema newer than this keyrotate, the same on both engines.
pub(super) fn too_new(label: &str, version: i64, latest: i64) -> String {
    format!("ledger {label}: schema version {version} is newer than this keyrotate knows ({latest}); upgrade keyrotate")
}
