-- The latency histogram moves into its rollup row: a JSON object of slot to
-- count (log-scale slots, ratio 1.1), merged by the writer that holds the
-- row's lane. One row per (hour, dimensions, lane) instead of one per slot.

ALTER TABLE usage_rollups ADD COLUMN latency_histogram TEXT NOT NULL DEFAULT '{}';
UPDATE usage_rollups SET latency_histogram = l.histogram
  FROM (SELECT bucket, provider, model, provider_key, access_key, user_id, lane,
          '{' || string_agg('"' || slot || '":' || count, ',' ORDER BY slot) || '}' AS histogram
        FROM usage_latency GROUP BY bucket, provider, model, provider_key, access_key, user_id, lane) AS l
  WHERE l.bucket = usage_rollups.bucket AND l.provider = usage_rollups.provider AND l.model = usage_rollups.model AND l.provider_key = usage_rollups.provider_key AND l.access_key = usage_rollups.access_key AND l.user_id = usage_rollups.user_id AND l.lane = usage_rollups.lane;
DROP TABLE usage_latency;
