-- `keyrotate revoke` runs are recorded with trigger = 'revoke' (DESIGN 11).
-- PostgreSQL names the column CHECK of 001 rotations_trigger_check; it is replaced in
-- the migration's transaction (existing rows are validated against the wider list).
ALTER TABLE rotations DROP CONSTRAINT IF EXISTS rotations_trigger_check;
ALTER TABLE rotations ADD CONSTRAINT rotations_trigger_check CHECK (trigger IN ('scheduled','manual','revoke'));
