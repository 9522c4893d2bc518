-- Every key's rows (parts, and the rows of all lanes) folded into one row on
-- lane 0, its histograms merged; the key is the primary key again.

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
  lane SMALLINT NOT NULL,
  latency_histogram TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, lane)
);
INSERT INTO usage_rollups_folded (bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count, lane, latency_histogram)
  SELECT r.bucket, r.provider, r.model, r.provider_key, r.access_key, r.user_id, CAST(SUM(r.requests) AS BIGINT), CAST(SUM(r.errors) AS BIGINT), CAST(SUM(r.cancelled) AS BIGINT), CAST(SUM(r.input_tokens) AS BIGINT), CAST(SUM(r.output_tokens) AS BIGINT), CAST(SUM(r.cache_read_tokens) AS BIGINT), CAST(SUM(r.cache_write_tokens) AS BIGINT), CAST(SUM(r.reasoning_tokens) AS BIGINT), CAST(SUM(r.cost_nanos) AS BIGINT), CAST(SUM(r.unpriced) AS BIGINT), CAST(SUM(r.latency_sum_us) AS BIGINT), CAST(SUM(r.ttft_sum_us) AS BIGINT), CAST(SUM(r.ttft_count) AS BIGINT), 0,
         COALESCE((SELECT '{' || string_agg('"' || h.slot || '":' || h.count, ',' ORDER BY h.slot) || '}'
                   FROM (SELECT CAST(e.key AS INTEGER) AS slot, SUM(CAST(e.value AS BIGINT)) AS count
                         FROM usage_rollups AS o, json_each_text(CAST(o.latency_histogram AS json)) AS e
                         WHERE o.bucket = r.bucket AND o.provider = r.provider AND o.model = r.model
                           AND o.provider_key = r.provider_key AND o.access_key = r.access_key
                           AND o.user_id = r.user_id
                         GROUP BY e.key) AS h), '{}')
  FROM usage_rollups AS r
  GROUP BY r.bucket, r.provider, r.model, r.provider_key, r.access_key, r.user_id;
DROP TABLE usage_rollups;
ALTER TABLE usage_rollups_folded RENAME TO usage_rollups;
ALTER INDEX usage_rollups_folded_pkey RENAME TO usage_rollups_pkey;
