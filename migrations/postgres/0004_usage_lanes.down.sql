-- Lanes folded into one row each; histograms back into rows per slot.

CREATE TABLE usage_latency (
  bucket BIGINT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  slot INTEGER NOT NULL,
  count BIGINT NOT NULL,
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, slot)
);
INSERT INTO usage_latency (bucket, provider, model, provider_key, access_key, user_id, slot, count)
  SELECT r.bucket, r.provider, r.model, r.provider_key, r.access_key, r.user_id, CAST(e.key AS INTEGER),
         CAST(SUM(CAST(e.value AS BIGINT)) AS BIGINT)
  FROM usage_rollups AS r, json_each_text(CAST(r.latency_histogram AS json)) AS e
  GROUP BY r.bucket, r.provider, r.model, r.provider_key, r.access_key, r.user_id, e.key;

CREATE TABLE usage_rollups_folded (
  bucket BIGINT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  requests BIGINT NOT NULL,
  errors BIGINT NOT NULL,
  cancelled BIGINT NOT NULL,
  input_tokens BIGINT NOT NULL,
  output_tokens BIGINT NOT NULL,
  cache_read_tokens BIGINT NOT NULL,
  cache_write_tokens BIGINT NOT NULL,
  reasoning_tokens BIGINT NOT NULL,
  cost_nanos BIGINT NOT NULL,
  unpriced BIGINT NOT NULL,
  latency_sum_us BIGINT NOT NULL,
  ttft_sum_us BIGINT NOT NULL,
  ttft_count BIGINT NOT NULL,
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id)
);
INSERT INTO usage_rollups_folded (bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count)
  SELECT bucket, provider, model, provider_key, access_key, user_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(errors) AS BIGINT), CAST(SUM(cancelled) AS BIGINT), CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(cache_read_tokens) AS BIGINT), CAST(SUM(cache_write_tokens) AS BIGINT), CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT), CAST(SUM(unpriced) AS BIGINT), CAST(SUM(latency_sum_us) AS BIGINT), CAST(SUM(ttft_sum_us) AS BIGINT), CAST(SUM(ttft_count) AS BIGINT)
  FROM usage_rollups GROUP BY bucket, provider, model, provider_key, access_key, user_id;
DROP TABLE usage_rollups;
ALTER TABLE usage_rollups_folded RENAME TO usage_rollups;
ALTER INDEX usage_rollups_folded_pkey RENAME TO usage_rollups_pkey;

CREATE TABLE provider_key_recorded_folded (
  key_name TEXT NOT NULL,
  day TEXT NOT NULL,
  requests BIGINT NOT NULL,
  tokens BIGINT NOT NULL,
  cost_nanos BIGINT NOT NULL,
  PRIMARY KEY (key_name, day)
);
INSERT INTO provider_key_recorded_folded (key_name, day, requests, tokens, cost_nanos)
  SELECT key_name, day, CAST(SUM(requests) AS BIGINT), CAST(SUM(tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT)
  FROM provider_key_recorded GROUP BY key_name, day;
DROP TABLE provider_key_recorded;
ALTER TABLE provider_key_recorded_folded RENAME TO provider_key_recorded;
ALTER INDEX provider_key_recorded_folded_pkey RENAME TO provider_key_recorded_pkey;

DROP INDEX usage_request_ids_time;
CREATE INDEX usage_request_ids_time ON usage_request_ids (record_time);
