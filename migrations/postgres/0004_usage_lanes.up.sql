-- Several usage writers per replica (group commits on concurrent
-- connections): the aggregate rows they add to are sharded by the writer's
-- lane, so that concurrent transactions never wait on each other's rollup,
-- latency or key-counter rows. Every read sums over lanes.

ALTER TABLE usage_rollups ADD COLUMN lane SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups ALTER COLUMN lane DROP DEFAULT;
ALTER TABLE usage_rollups DROP CONSTRAINT usage_rollups_pkey;
ALTER TABLE usage_rollups ADD PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, lane);

ALTER TABLE usage_latency ADD COLUMN lane SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE usage_latency ALTER COLUMN lane DROP DEFAULT;
ALTER TABLE usage_latency DROP CONSTRAINT usage_latency_pkey;
ALTER TABLE usage_latency ADD PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, slot, lane);

ALTER TABLE provider_key_recorded ADD COLUMN lane SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE provider_key_recorded ALTER COLUMN lane DROP DEFAULT;
ALTER TABLE provider_key_recorded DROP CONSTRAINT provider_key_recorded_pkey;
ALTER TABLE provider_key_recorded ADD PRIMARY KEY (key_name, day, lane);

-- Request ids are read by id; their time only serves retention's range delete, and it
-- grows with every insert: a BRIN index costs almost nothing to maintain.
DROP INDEX usage_request_ids_time;
CREATE INDEX usage_request_ids_time ON usage_request_ids USING brin (record_time);
