-- Usage writers append their transaction's totals per rollup key as a part
-- (part = 1) instead of reading the key's histogram and updating its row;
-- the ledger's compaction (every second, on any replica) folds a key's rows
-- into one (part = 0). Reads sum every row of a key, as they already did
-- across lanes, so a part is counted from the commit that wrote it.
ALTER TABLE usage_rollups ADD COLUMN part SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups DROP CONSTRAINT usage_rollups_pkey;
CREATE INDEX usage_rollups_key ON usage_rollups (bucket, provider, model, provider_key, access_key, user_id);
CREATE INDEX usage_rollups_parts ON usage_rollups (part) WHERE part <> 0;
