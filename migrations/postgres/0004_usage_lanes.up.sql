-- Several usage writers per replica (group commits on concurrent connections)
-- add to aggregate rows sharded by the writer's lane, so that concurrent
-- transactions never wait on each other's rows; every read sums over lanes.
-- The latency histogram moves into its rollup row (a JSON object of slot to
-- count, merged by the writer holding the lane's advisory lock): one row per
-- (hour, dimensions, lane) instead of one per slot.

ALTER TABLE usage_rollups ADD COLUMN lane SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups ALTER COLUMN lane DROP DEFAULT;
ALTER TABLE usage_rollups ADD COLUMN latency_histogram TEXT NOT NULL DEFAULT '{}';
UPDATE usage_rollups SET latency_histogram =
  COALESCE((SELECT '{' || string_agg('"' || l.slot || '":' || l.count, ',' ORDER BY l.slot) || '}'
            FROM usage_latency AS l WHERE l.bucket = usage_rollups.bucket
              AND l.provider = usage_rollups.provider
              AND l.model = usage_rollups.model
              AND l.provider_key = usage_rollups.provider_key
              AND l.access_key = usage_rollups.access_key
              AND l.user_id = usage_rollups.user_id), '{}');
ALTER TABLE usage_rollups DROP CONSTRAINT usage_rollups_pkey;
ALTER TABLE usage_rollups ADD PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, lane);
DROP TABLE usage_latency;

ALTER TABLE provider_key_recorded ADD COLUMN lane SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE provider_key_recorded ALTER COLUMN lane DROP DEFAULT;
ALTER TABLE provider_key_recorded DROP CONSTRAINT provider_key_recorded_pkey;
ALTER TABLE provider_key_recorded ADD PRIMARY KEY (key_name, day, lane);

-- Request ids are read by id; their time only serves retention's range delete, and it
-- grows with every insert: a BRIN index costs almost nothing to maintain.
DROP INDEX usage_request_ids_time;
CREATE INDEX usage_request_ids_time ON usage_request_ids USING brin (record_time);
