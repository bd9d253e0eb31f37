-- `keyrotate revoke` runs are recorded with trigger = 'revoke' (DESIGN 11).
-- SQLite cannot alter a CHECK constraint, so the table is rebuilt the way SQLite
-- documents for schema changes ALTER TABLE cannot make ("Making Other Kinds Of Table
-- Schema Changes"): create the new table, copy every row (ids kept), drop the old one,
-- rename the new one, and recreate every index of the old table, the partial unique
-- one included. It runs inside the migration's transaction: all of it, or nothing.
-- The table has no triggers, views or foreign keys that would need more.
CREATE TABLE rotations_new (
  id INTEGER PRIMARY KEY,
  run_id TEXT NOT NULL UNIQUE,
  domain TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('started','staged','committed','succeeded','aborted','timed_out','needs_review','refused','resolved')),
  exit_code INTEGER,
  reason TEXT,
  trigger TEXT NOT NULL CHECK (trigger IN ('scheduled','manual','revoke')),
  operator TEXT,
  host TEXT NOT NULL,
  pid INTEGER NOT NULL,
  pool TEXT,
  started_at TEXT NOT NULL,
  deadline_at TEXT NOT NULL,
  ended_at TEXT,
  from_version INTEGER,
  to_version INTEGER,
  forced INTEGER NOT NULL DEFAULT 0,
  resolved_by TEXT,
  resolved_at TEXT,
  resolution TEXT,
  requested_reason TEXT,    -- the operator's --reason, if any
  audit_seq INTEGER,
  audit_hash TEXT
);

INSERT INTO rotations_new (id, run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool,
    started_at, deadline_at, ended_at, from_version, to_version, forced, resolved_by, resolved_at, resolution,
    requested_reason, audit_seq, audit_hash)
  SELECT id, run_id, domain, state, exit_code, reason, trigger, operator, host, pid, pool,
    started_at, deadline_at, ended_at, from_version, to_version, forced, resolved_by, resolved_at, resolution,
    requested_reason, audit_seq, audit_hash
  FROM rotations;

DROP TABLE rotations;
ALTER TABLE rotations_new RENAME TO rotations;

-- Every index of the old table (DROP TABLE took them with it).
CREATE UNIQUE INDEX rotations_one_in_flight ON rotations(domain)
  WHERE state IN ('started','staged','committed');
CREATE INDEX rotations_domain ON rotations(domain, id);
CREATE INDEX rotations_blocking ON rotations(domain) WHERE state = 'needs_review';
CREATE INDEX rotations_domain_success ON rotations(domain, id) WHERE state = 'succeeded';
CREATE INDEX rotations_audit_anchor ON rotations(host, audit_seq) WHERE audit_seq IS NOT NULL;
-- Every run reads the domain's revocations (a `keyring.json` older than one must not
-- bring the key back): only the few `compromised` events are indexed, so that read
-- does not grow with the ledger.
CREATE INDEX rotation_events_compromised ON rotation_events(run_id) WHERE phase = 'compromised';
