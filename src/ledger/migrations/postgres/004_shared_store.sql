-- The shared key store (DESIGN section 9): a domain with store = "shared" keeps its
-- keyring here, next to the ledger, so that a rotation commits the keys and its
-- ledger row in one transaction. Public keys are stored in the clear; private and
-- symmetric key material only sealed under the KEK (AES-256-GCM, nonce || ciphertext
-- || tag, bound to domain, version and fingerprint). The KEK never enters the database.

-- One row per shared domain. `epoch` counts the committed keyrings: every rotation
-- commits with `UPDATE … SET epoch = epoch + 1 WHERE epoch = <the epoch it started
-- from>`, the fencing token that refuses a run whose advisory lock was lost.
CREATE TABLE shared_keyrings (
  domain TEXT PRIMARY KEY,
  epoch BIGINT NOT NULL DEFAULT 0,
  committed_run TEXT,         -- the run that committed this epoch
  committed_at TEXT           -- RFC 3339 UTC
);

-- Every version of every shared domain, destroyed ones included (numbers are never
-- reused). `sealed` is NULL exactly when the version is destroyed. `epoch` is the
-- epoch that first contained the version: a host that acknowledged that epoch or a
-- later one holds it (the convergence gate).
CREATE TABLE shared_key_versions (
  domain TEXT NOT NULL REFERENCES shared_keyrings(domain),
  version BIGINT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('pending','active','retired','destroyed','compromised')),
  algorithm TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  public_pem TEXT,            -- SubjectPublicKeyInfo PEM; NULL for symmetric keys
  sealed BYTEA,
  created_at TEXT NOT NULL,
  activated_at TEXT,
  retired_at TEXT,
  destroyed_at TEXT,
  created_by_run TEXT NOT NULL,
  epoch BIGINT NOT NULL,
  PRIMARY KEY (domain, version),
  CHECK ((state = 'destroyed') = (sealed IS NULL))
);

-- The newest acknowledgement of each host: the epoch its local copy holds.
CREATE TABLE shared_sync_acks (
  domain TEXT NOT NULL,
  host TEXT NOT NULL,
  pool TEXT NOT NULL,
  epoch BIGINT NOT NULL,
  synced_at TEXT NOT NULL,
  PRIMARY KEY (domain, host)
);

-- Every `keyrotate sync` of a domain, successful or not (a sync is not a rotation: it
-- has no row in `rotations`, whose one-in-flight rule it must never trip).
CREATE TABLE shared_syncs (
  id BIGSERIAL PRIMARY KEY,
  domain TEXT NOT NULL,
  host TEXT NOT NULL,
  pool TEXT,
  at TEXT NOT NULL,
  epoch BIGINT,               -- the epoch the local copy holds afterwards, if known
  outcome TEXT NOT NULL,      -- SYNCED | CURRENT | ABORTED | BUSY | TIMED_OUT
  exit_code BIGINT NOT NULL,
  detail TEXT
);
CREATE INDEX shared_syncs_domain ON shared_syncs(domain, id);
