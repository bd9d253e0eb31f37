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
-- reused). The lifecycle is the local store's (DESIGN 11): `sealed` is NULL exactly
-- when the version keeps no private or secret half, i.e. destroyed and compromised
-- versions and retired signature versions (an asymmetric version: it has a
-- `public_pem`, which keeps verifying it); present otherwise. `epoch` is the epoch
-- that first contained the version: a host that acknowledged that epoch or a later
-- one holds it (the convergence gate).
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
  compromised_at TEXT,        -- set exactly on compromised versions (keyrotate revoke)
  compromise_reason TEXT,
  created_by_run TEXT NOT NULL,
  epoch BIGINT NOT NULL,
  PRIMARY KEY (domain, version),
  CHECK ((sealed IS NULL) = (state IN ('destroyed','compromised') OR (state = 'retired' AND public_pem IS NOT NULL))),
  CHECK ((state = 'compromised') = (compromised_at IS NOT NULL))
);

-- A compromised version never returns to any other state (DESIGN 11), whatever
-- writes the row: the CHECKs above keep its key material from coming back, this keeps
-- its state, time and reason.
CREATE FUNCTION shared_compromised_is_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.state = 'compromised' AND (NEW.state IS DISTINCT FROM 'compromised'
      OR NEW.compromised_at IS DISTINCT FROM OLD.compromised_at
      OR NEW.compromise_reason IS DISTINCT FROM OLD.compromise_reason) THEN
    RAISE EXCEPTION 'shared_key_versions: v% of % is compromised: it never changes state again', OLD.version, OLD.domain;
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER shared_compromised_is_final BEFORE UPDATE ON shared_key_versions
  FOR EACH ROW EXECUTE FUNCTION shared_compromised_is_final();

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
