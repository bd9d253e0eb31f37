-- `keyrotate revoke` runs are recorded with trigger = 'revoke' (DESIGN 11).
-- PostgreSQL names the column CHECK of 001 rotations_trigger_check; it is replaced in
-- the migration's transaction (existing rows are validated against the wider list).
ALTER TABLE rotations DROP CONSTRAINT IF EXISTS rotations_trigger_check;
ALTER TABLE rotations ADD CONSTRAINT rotations_trigger_check CHECK (trigger IN ('scheduled','manual','revoke'));
-- Every run reads the domain's revocations (a `keyring.json` older than one must not
-- bring the key back): only the few `compromised` events are indexed, so that read
-- does not grow with the ledger.
CREATE INDEX rotation_events_compromised ON rotation_events(run_id) WHERE phase = 'compromised';
