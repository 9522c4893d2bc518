-- Usage writers append their transaction's totals per rollup key as a part
-- (part = 1) instead of reading the key's histogram and updating its row;
-- the ledger's compaction folds a key's rows into one (part = 0). Reads sum
-- every row of a key, as they already did across lanes. (SQLite cannot drop
-- a primary key: the table is rebuilt.)

CREATE TABLE usage_rollups_parts (
  bucket INTEGER NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  requests INTEGER NOT NULL,
  errors INTEGER NOT NULL,
  cancelled INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL,
  output_tokens INTEGER NOT NULL,
  cache_read_tokens INTEGER NOT NULL,
  cache_write_tokens INTEGER NOT NULL,
  reasoning_tokens INTEGER NOT NULL,
  cost_nanos INTEGER NOT NULL,
  unpriced INTEGER NOT NULL,
  latency_sum_us INTEGER NOT NULL,
  ttft_sum_us INTEGER NOT NULL,
  ttft_count INTEGER NOT NULL,
  lane INTEGER NOT NULL,
  latency_histogram TEXT NOT NULL,
  part INTEGER NOT NULL DEFAULT 0
);
INSERT INTO usage_rollups_parts (bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count, lane, latency_histogram, part)
  SELECT bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count, lane, latency_histogram, 0
  FROM usage_rollups;
DROP TABLE usage_rollups;
ALTER TABLE usage_rollups_parts RENAME TO usage_rollups;
CREATE INDEX usage_rollups_key ON usage_rollups (bucket, provider, model, provider_key, access_key, user_id);
CREATE INDEX usage_rollups_parts ON usage_rollups (part) WHERE part <> 0;
