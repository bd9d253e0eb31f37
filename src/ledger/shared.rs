//! The shared key store's tables (DESIGN 9, migration `004_shared_store`), on the
//! PostgreSQL ledger only: reading a domain's newest committed keyring in one snapshot,
//! the rotation's commit (inside the run's [`Ledger::write`] transaction, next to its
//! ledger row), and the hosts' acknowledgements.
//!
//! Rows are returned as they are stored; what they mean (the manifest, the sealed
//! keys, the convergence gate) is decided above, in the `shared` module. Every round trip
//! outside a write passes a failpoint (`ledger.shared_*`), and each statement of the
//! commit one of its own (`shared.*`), for the crash suite.

use postgres::IsolationLevel;

use super::{postgres as pg, Conn, Db, Ledger, LedgerError, Writer};
use crate::failpoint;
use crate::keystore::manifest::VersionState;

/// One row of `shared_key_versions`.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedVersion {
    pub version: u64,
    pub state: VersionState,
    pub algorithm: String,
    pub fingerprint: String,
    /// SubjectPublicKeyInfo PEM; `None` for symmetric keys.
    pub public_pem: Option<String>,
    /// `nonce || ciphertext || tag` under the KEK; `None` once the version keeps no
    /// private half (destroyed, compromised, a retired signature version).
    pub sealed: Option<Vec<u8>>,
    pub created_at: String,
    pub activated_at: Option<String>,
    pub retired_at: Option<String>,
    pub destroyed_at: Option<String>,
    pub compromised_at: Option<String>,
    pub compromise_reason: Option<String>,
    pub created_by_run: String,
    /// The epoch that first contained this version.
    pub epoch: i64,
}

impl std::fmt::Debug for SharedVersion {
    // The sealed bytes are ciphertext, but there is no reason to print them either.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedVersion")
            .field("version", &self.version)
            .field("state", &self.state)
            .field("fingerprint", &self.fingerprint)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A domain's committed keyring as one snapshot: the epoch and every version.
#[derive(Clone, Debug, Default)]
pub struct SharedKeyring {
    /// 0 while nothing was ever committed.
    pub epoch: i64,
    pub committed_run: Option<String>,
    pub committed_at: Option<String>,
    /// Ordered by version.
    pub versions: Vec<SharedVersion>,
}

/// One row of `shared_sync_acks`: the epoch a host's local copy holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncAck {
    pub domain: String,
    pub host: String,
    pub pool: String,
    pub epoch: i64,
    pub synced_at: String,
}

/// One row of `shared_syncs`: what a `sync` of a domain did.
#[derive(Clone, Debug)]
pub struct SyncRecord {
    pub domain: String,
    pub host: String,
    pub pool: Option<String>,
    pub epoch: Option<i64>,
    /// `SYNCED`, `CURRENT`, or the outcome's name.
    pub outcome: String,
    pub exit_code: u8,
    pub detail: String,
}

/// One row of `shared_syncs`, as `history` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncRow {
    pub id: i64,
    pub domain: String,
    pub host: String,
    pub pool: Option<String>,
    pub at: String,
    pub epoch: Option<i64>,
    pub outcome: String,
    pub exit_code: i64,
    pub detail: Option<String>,
}

/// What one rotation commits to a domain's shared keyring.
#[derive(Clone, Debug)]
pub struct SharedCommit {
    pub domain: String,
    /// The epoch the run read when it started: the commit happens only if it is still
    /// the newest (the fencing token).
    pub from_epoch: i64,
    pub run_id: String,
    pub at: String,
    /// New versions (their `epoch` is set to the committed one).
    pub inserts: Vec<SharedVersion>,
    /// Existing versions whose state changed. One that keeps no private half any more
    /// (destroyed, compromised, a retired signature version) loses its sealed material.
    pub updates: Vec<VersionUpdate>,
}

/// An existing version's new state and transition times.
#[derive(Clone, Debug)]
pub struct VersionUpdate {
    pub version: u64,
    pub state: VersionState,
    pub activated_at: Option<String>,
    pub retired_at: Option<String>,
    pub destroyed_at: Option<String>,
    pub compromised_at: Option<String>,
    pub compromise_reason: Option<String>,
}

/// The commit was refused: another run committed since this one read the keyring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fenced {
    pub epoch: i64,
    pub committed_run: Option<String>,
}

fn parse_state(s: &str) -> Result<VersionState, String> {
    Ok(match s {
        "pending" => VersionState::Pending,
        "active" => VersionState::Active,
        "retired" => VersionState::Retired,
        "destroyed" => VersionState::Destroyed,
        "compromised" => VersionState::Compromised,
        other => return Err(format!("unknown version state {other:?}")),
    })
}

const VERSION_COLUMNS: &str = "version, state, algorithm, fingerprint, public_pem, sealed, created_at, activated_at, \
    retired_at, destroyed_at, created_by_run, epoch, compromised_at, compromise_reason";

fn version_row(r: &postgres::Row) -> Result<SharedVersion, String> {
    let get = |e: postgres::Error| e.to_string();
    Ok(SharedVersion {
        version: r.try_get::<_, i64>(0).map_err(get)?.max(0) as u64,
        state: parse_state(&r.try_get::<_, String>(1).map_err(get)?)?,
        algorithm: r.try_get(2).map_err(get)?,
        fingerprint: r.try_get(3).map_err(get)?,
        public_pem: r.try_get(4).map_err(get)?,
        sealed: r.try_get(5).map_err(get)?,
        created_at: r.try_get(6).map_err(get)?,
        activated_at: r.try_get(7).map_err(get)?,
        retired_at: r.try_get(8).map_err(get)?,
        destroyed_at: r.try_get(9).map_err(get)?,
        created_by_run: r.try_get(10).map_err(get)?,
        epoch: r.try_get(11).map_err(get)?,
        compromised_at: r.try_get(12).map_err(get)?,
        compromise_reason: r.try_get(13).map_err(get)?,
    })
}

fn not_shared(label: &str) -> String {
    format!("ledger {label}: the shared key store needs the PostgreSQL ledger ([state] ledger = \"postgres://…\")")
}

impl Ledger {
    /// The newest committed keyring of `domain`, read in one REPEATABLE READ snapshot
    /// (the epoch and the versions from the same commit, whatever commits beside it).
    /// Epoch 0 and no versions while the domain has never been committed.
    pub fn shared_keyring(&self, domain: &str) -> Result<SharedKeyring, LedgerError> {
        self.shared_keyring_raw(domain).map_err(LedgerError::Query)
    }

    fn shared_keyring_raw(&self, domain: &str) -> Result<SharedKeyring, String> {
        let Conn::Postgres(c) = &self.conn else {
            return Err(not_shared(&self.label));
        };
        self.round_trip("shared_read")?;
        let label = &self.label;
        let mut client = c.borrow_mut();
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(|e| pg::err(label, e))?;
        let head = tx
            .query_opt(
                "SELECT epoch, committed_run, committed_at FROM shared_keyrings WHERE domain = $1",
                &[&domain],
            )
            .map_err(|e| pg::err(label, e))?;
        let Some(head) = head else {
            tx.commit().map_err(|e| pg::err(label, e))?;
            return Ok(SharedKeyring::default());
        };
        let rows = tx
            .query(
                &format!("SELECT {VERSION_COLUMNS} FROM shared_key_versions WHERE domain = $1 ORDER BY version"),
                &[&domain],
            )
            .map_err(|e| pg::err(label, e))?;
        let versions = rows
            .iter()
            .map(version_row)
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| format!("ledger {label}: shared_key_versions of {domain}: {e}"))?;
        tx.commit().map_err(|e| pg::err(label, e))?;
        Ok(SharedKeyring {
            epoch: head.get(0),
            committed_run: head.get(1),
            committed_at: head.get(2),
            versions,
        })
    }

    /// Every host's newest acknowledgement for `domain`, by host name.
    pub fn shared_acks(&self, domain: &str) -> Result<Vec<SyncAck>, LedgerError> {
        self.shared_acks_raw(domain).map_err(LedgerError::Query)
    }

    fn shared_acks_raw(&self, domain: &str) -> Result<Vec<SyncAck>, String> {
        let Conn::Postgres(c) = &self.conn else {
            return Err(not_shared(&self.label));
        };
        self.round_trip("shared_acks")?;
        let rows = c
            .borrow_mut()
            .query(
                "SELECT domain, host, pool, epoch, synced_at FROM shared_sync_acks WHERE domain = $1 ORDER BY host",
                &[&domain],
            )
            .map_err(|e| pg::err(&self.label, e))?;
        Ok(rows
            .iter()
            .map(|r| SyncAck {
                domain: r.get(0),
                host: r.get(1),
                pool: r.get(2),
                epoch: r.get(3),
                synced_at: r.get(4),
            })
            .collect())
    }

    /// The recorded syncs, newest first, optionally of one domain and since an instant;
    /// empty on the embedded ledger (which has no shared store).
    pub fn shared_syncs(
        &self,
        domain: Option<&str>,
        since: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SyncRow>, LedgerError> {
        let Conn::Postgres(c) = &self.conn else {
            return Ok(Vec::new());
        };
        self.round_trip("shared_syncs").map_err(LedgerError::Query)?;
        let rows = c
            .borrow_mut()
            .query(
                "SELECT id, domain, host, pool, at, epoch, outcome, exit_code, detail FROM shared_syncs \
                 WHERE ($1::text IS NULL OR domain = $1) AND ($2::text IS NULL OR at >= $2) ORDER BY id DESC LIMIT $3",
                &[&domain, &since, &i64::from(limit)],
            )
            .map_err(|e| LedgerError::Query(pg::err(&self.label, e)))?;
        Ok(rows
            .iter()
            .map(|r| SyncRow {
                id: r.get(0),
                domain: r.get(1),
                host: r.get(2),
                pool: r.get(3),
                at: r.get(4),
                epoch: r.get(5),
                outcome: r.get(6),
                exit_code: r.get(7),
                detail: r.get(8),
            })
            .collect())
    }

    /// Records a sync: its `shared_syncs` row and, when the local copy now holds an
    /// epoch (`ack`), the host's acknowledgement, in one transaction.
    pub fn shared_record_sync(&mut self, record: &SyncRecord, ack: Option<&SyncAck>) -> Result<(), LedgerError> {
        self.write("shared_ack", |w| {
            if let Some(ack) = ack {
                w.shared_ack(ack)?;
            }
            w.shared_sync_record(record)
        })
        .map_err(LedgerError::Query)
    }
}

impl Writer<'_, '_> {
    fn pg_exec(&self, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<u64, String> {
        match &self.db {
            Db::PgTx(t) => t.borrow_mut().execute(sql, params).map_err(|e| pg::err(self.label, e)),
            _ => Err(not_shared(self.label)),
        }
    }

    fn pg_query(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, String> {
        match &self.db {
            Db::PgTx(t) => t.borrow_mut().query(sql, params).map_err(|e| pg::err(self.label, e)),
            _ => Err(not_shared(self.label)),
        }
    }

    /// A rotation's commit of the shared keyring, inside the run's transaction (which
    /// also moves its ledger row to committed). The epoch is bumped first, conditional
    /// on `from_epoch`: a concurrent committer waits on that row, then finds the epoch
    /// moved and gets `Ok(Err(Fenced))`. The caller must then fail the transaction, so
    /// nothing of it is written. `Ok(Ok(epoch))`: the new epoch.
    pub fn shared_commit(&self, c: &SharedCommit) -> Result<Result<i64, Fenced>, String> {
        let step = |op: &str| failpoint::hit("shared", op).map_err(|e| format!("ledger {}: {e}", self.label));
        step("keyring")?;
        self.pg_exec(
            "INSERT INTO shared_keyrings (domain, epoch) VALUES ($1, 0) ON CONFLICT (domain) DO NOTHING",
            &[&c.domain],
        )?;
        step("epoch")?;
        let moved = self.pg_exec(
            "UPDATE shared_keyrings SET epoch = epoch + 1, committed_run = $3, committed_at = $4 \
             WHERE domain = $1 AND epoch = $2",
            &[&c.domain, &c.from_epoch, &c.run_id, &c.at],
        )?;
        if moved != 1 {
            let now = self.pg_query(
                "SELECT epoch, committed_run FROM shared_keyrings WHERE domain = $1",
                &[&c.domain],
            )?;
            return Ok(Err(Fenced {
                epoch: now.first().map_or(0, |r| r.get(0)),
                committed_run: now.first().and_then(|r| r.get(1)),
            }));
        }
        let epoch = c.from_epoch + 1;
        for v in &c.inserts {
            step("insert")?;
            let version = v.version as i64;
            self.pg_exec(
                "INSERT INTO shared_key_versions (domain, version, state, algorithm, fingerprint, public_pem, sealed, \
                 created_at, activated_at, retired_at, destroyed_at, created_by_run, epoch, compromised_at, \
                 compromise_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                &[
                    &c.domain,
                    &version,
                    &v.state.as_str(),
                    &v.algorithm,
                    &v.fingerprint,
                    &v.public_pem,
                    &v.sealed,
                    &v.created_at,
                    &v.activated_at,
                    &v.retired_at,
                    &v.destroyed_at,
                    &v.created_by_run,
                    &epoch,
                    &v.compromised_at,
                    &v.compromise_reason,
                ],
            )?;
        }
        for u in &c.updates {
            step("update")?;
            let version = u.version as i64;
            // The sealed material goes in the same statement as the state that no longer
            // allows it (the table's CHECK holds the two together): the same rule as
            // `keystore::private_half_allowed`, a retired asymmetric (signature) version
            // keeping only its public half.
            let changed = self.pg_exec(
                "UPDATE shared_key_versions SET state = $3, activated_at = $4, retired_at = $5, destroyed_at = $6, \
                 compromised_at = $7, compromise_reason = $8, \
                 sealed = CASE WHEN $3 IN ('destroyed', 'compromised') OR ($3 = 'retired' AND public_pem IS NOT NULL) \
                 THEN NULL ELSE sealed END WHERE domain = $1 AND version = $2",
                &[
                    &c.domain,
                    &version,
                    &u.state.as_str(),
                    &u.activated_at,
                    &u.retired_at,
                    &u.destroyed_at,
                    &u.compromised_at,
                    &u.compromise_reason,
                ],
            )?;
            if changed != 1 {
                return Err(format!(
                    "ledger {}: shared keyring of {}: v{version} is not in the database",
                    self.label, c.domain
                ));
            }
        }
        Ok(Ok(epoch))
    }

    /// Upserts a host's acknowledgement.
    pub fn shared_ack(&self, ack: &SyncAck) -> Result<(), String> {
        self.pg_exec(
            "INSERT INTO shared_sync_acks (domain, host, pool, epoch, synced_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (domain, host) DO UPDATE SET pool = EXCLUDED.pool, epoch = EXCLUDED.epoch, \
             synced_at = EXCLUDED.synced_at",
            &[&ack.domain, &ack.host, &ack.pool, &ack.epoch, &ack.synced_at],
        )
        .map(|_| ())
    }

    fn shared_sync_record(&self, r: &SyncRecord) -> Result<(), String> {
        self.pg_exec(
            "INSERT INTO shared_syncs (domain, host, pool, at, epoch, outcome, exit_code, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &r.domain,
                &r.host,
                &r.pool,
                &super::now(),
                &r.epoch,
                &r.outcome,
                &i64::from(r.exit_code),
                &r.detail,
            ],
        )
        .map(|_| ())
    }
}
