-- The audit chain head (DESIGN section 12) recorded by each run's closing
-- transaction: the seq of the run's last audit line and the SHA-256 of its bytes.
-- `keyrotate audit verify` checks the audit file against every anchor, which is how
-- lines cut from the end of the file are noticed. NULL for runs closed before this
-- migration, or whose audit file could not be written.
ALTER TABLE rotations ADD COLUMN audit_seq INTEGER;
ALTER TABLE rotations ADD COLUMN audit_hash TEXT;
CREATE INDEX rotations_audit_anchor ON rotations(host, audit_seq) WHERE audit_seq IS NOT NULL;
