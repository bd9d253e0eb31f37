-- The shared key store (DESIGN section 9) lives only on the PostgreSQL ledger: a
-- domain with store = "shared" is refused on the embedded ledger. This migration is
-- a no-op here so that both engines keep one numbering.
SELECT 1;
