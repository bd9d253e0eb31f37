-- The rotation ledger: one row per rotate invocation, and its step events.
-- Auditors query these tables directly; columns may be added, never renamed.
CREATE TABLE rotations (
  id INTEGER PRIMARY KEY,
  run_id TEXT NOT NULL UNIQUE,
  domain TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('started','staged','committed','succeeded','aborted','timed_out','needs_review','refused','resolved')),
  exit_code INTEGER,
  reason TEXT,
  trigger TEXT NOT NULL CHECK (trigger IN ('scheduled','manual')),
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
  requested_reason TEXT     -- the operator's --reason, if any
);

CREATE TABLE rotation_events (
  id INTEGER PRIMARY KEY,
  run_id TEXT NOT NULL,
  at TEXT NOT NULL,
  phase TEXT NOT NULL,
  detail TEXT
);

-- At most one run in flight per domain, whatever the lock says.
CREATE UNIQUE INDEX rotations_one_in_flight ON rotations(domain)
  WHERE state IN ('started','staged','committed');
CREATE INDEX rotations_domain ON rotations(domain, id);
CREATE INDEX rotations_blocking ON rotations(domain) WHERE state = 'needs_review';
CREATE INDEX rotations_domain_success ON rotations(domain, id) WHERE state = 'succeeded';
CREATE INDEX rotation_events_run ON rotation_events(run_id, id);
