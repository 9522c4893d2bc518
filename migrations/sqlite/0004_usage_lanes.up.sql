-- Several usage writers per replica (group commits on concurrent connections)
-- add to aggregate rows sharded by the writer's lane, so that concurrent
-- transactions never wait on each other's rows; every read sums over lanes.
-- The latency histogram moves into its rollup row (a JSON object of slot to
-- count, merged by the writer holding the lane's advisory lock): one row per
-- (hour, dimensions, lane) instead of one per slot.

CREATE TABLE usage_rollups_lanes (
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
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, lane)
);
INSERT INTO usage_rollups_lanes (bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count, lane, latency_histogram)
  SELECT bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count, 0,
         COALESCE((SELECT '{' || group_concat('"' || l.slot || '":' || l.count, ',') || '}'
            FROM usage_latency AS l WHERE l.bucket = usage_rollups.bucket
              AND l.provider = usage_rollups.provider
              AND l.model = usage_rollups.model
              AND l.provider_key = usage_rollups.provider_key
              AND l.access_key = usage_rollups.access_key
              AND l.user_id = usage_rollups.user_id), '{}')
  FROM usage_rollups;
DROP TABLE usage_rollups;
ALTER TABLE usage_rollups_lanes RENAME TO usage_rollups;
DROP TABLE usage_latency;

CREATE TABLE provider_key_recorded_lanes (
  key_name TEXT NOT NULL,
  day TEXT NOT NULL,
  requests INTEGER NOT NULL,
  tokens INTEGER NOT NULL,
  cost_nanos INTEGER NOT NULL,
  lane INTEGER NOT NULL,
  PRIMARY KEY (key_name, day, lane)
);
INSERT INTO provider_key_recorded_lanes (key_name, day, requests, tokens, cost_nanos, lane)
  SELECT key_name, day, requests, tokens, cost_nanos, 0 FROM provider_key_recorded;
DROP TABLE provider_key_recorded;
ALTER TABLE provider_key_recorded_lanes RENAME TO provider_key_recorded;
