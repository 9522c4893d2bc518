-- The histograms back into a table of one row per slot.
CREATE TABLE usage_latency (
  bucket INTEGER NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  slot INTEGER NOT NULL,
  count INTEGER NOT NULL,
  lane INTEGER NOT NULL,
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, slot, lane)
);
INSERT INTO usage_latency (bucket, provider, model, provider_key, access_key, user_id, slot, count, lane)
  SELECT r.bucket, r.provider, r.model, r.provider_key, r.access_key, r.user_id, CAST(e.key AS INTEGER),
         CAST(e.value AS INTEGER), r.lane
  FROM usage_rollups AS r, json_each(r.latency_histogram) AS e;
ALTER TABLE usage_rollups DROP COLUMN latency_histogram;
