-- The usage ledger (records, idempotency, hourly rollups), budgets with
-- their spend, reservations and alerts.

-- Position of the usage stream. Every ingest transaction bumps last_seq by
-- its record count and holds this row's lock until commit, so seq order is
-- commit order across writers and replicas (WatchUsage reads seq > cursor
-- without gaps). Retention raises pruned_through_seq: older cursors expire.
CREATE TABLE usage_feed (
  id SMALLINT PRIMARY KEY CHECK (id = 1),
  last_seq BIGINT NOT NULL,
  pruned_through_seq BIGINT NOT NULL
);
INSERT INTO usage_feed (id, last_seq, pruned_through_seq) VALUES (1, 0, 0);

-- One row per LLM call, range-partitioned by the time it was stored (one
-- partition per UTC day, created ahead by the server); retention drops whole
-- partitions. Times are microseconds, money nano-USD.
CREATE TABLE usage_records (
  seq BIGINT NOT NULL,
  record_time BIGINT NOT NULL,
  call_time BIGINT NOT NULL,
  request_id TEXT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  conversation TEXT NOT NULL,
  message TEXT NOT NULL,
  input_tokens BIGINT NOT NULL,
  output_tokens BIGINT NOT NULL,
  cache_read_tokens BIGINT NOT NULL,
  cache_write_tokens BIGINT NOT NULL,
  reasoning_tokens BIGINT NOT NULL,
  latency_us BIGINT NOT NULL,
  ttft_us BIGINT,
  status TEXT NOT NULL,
  error_class TEXT NOT NULL,
  cost_nanos BIGINT NOT NULL,
  priced SMALLINT NOT NULL,
  price_effective_time BIGINT,
  reported_cost_nanos BIGINT,
  reservation TEXT NOT NULL
) PARTITION BY RANGE (record_time);
CREATE INDEX usage_records_seq ON usage_records (seq);
CREATE INDEX usage_records_call_time ON usage_records (call_time);

-- request_id -> the stored record: idempotency for as long as the record is
-- retained (a partitioned table cannot have a request_id-only key).
CREATE TABLE usage_request_ids (
  request_id TEXT PRIMARY KEY,
  seq BIGINT NOT NULL,
  record_time BIGINT NOT NULL,
  content_hash TEXT NOT NULL
);
CREATE INDEX usage_request_ids_time ON usage_request_ids (record_time);

-- Hourly totals per (provider, model, provider key, access key, user);
-- kept after the raw records are pruned.
CREATE TABLE usage_rollups (
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

-- Latency histogram of each rollup row: log-scale buckets (ratio 1.1).
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

-- Recorded usage per provider key and day (the key time zone), next to the
-- acquisition counters of provider_key_usage.
CREATE TABLE provider_key_recorded (
  key_name TEXT NOT NULL,
  day TEXT NOT NULL,
  requests BIGINT NOT NULL,
  tokens BIGINT NOT NULL,
  cost_nanos BIGINT NOT NULL,
  PRIMARY KEY (key_name, day)
);

CREATE TABLE budgets (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL DEFAULT '',
  revision BIGINT NOT NULL,
  display_name TEXT NOT NULL DEFAULT '',
  scope TEXT NOT NULL,
  scope_value TEXT NOT NULL DEFAULT '',
  period TEXT NOT NULL,
  time_zone TEXT NOT NULL DEFAULT '',
  limit_nanos BIGINT NOT NULL CHECK (limit_nanos > 0),
  alert_thresholds_percent TEXT NOT NULL,
  create_time BIGINT NOT NULL,
  update_time BIGINT NOT NULL
);
CREATE INDEX budgets_scope ON budgets (scope, scope_value);

-- Spend and holds of a budget per period (period_start 0 for no period).
CREATE TABLE budget_spend (
  budget TEXT NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
  period_start BIGINT NOT NULL,
  spent_nanos BIGINT NOT NULL,
  held_nanos BIGINT NOT NULL,
  PRIMARY KEY (budget, period_start)
);

CREATE TABLE reservations (
  name TEXT PRIMARY KEY,
  user_id TEXT NOT NULL,
  access_key TEXT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  estimated_cost_nanos BIGINT NOT NULL,
  expire_time BIGINT NOT NULL,
  state TEXT NOT NULL,
  settled_cost_nanos BIGINT NOT NULL,
  create_time BIGINT NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (state, expire_time);

-- The amount a reservation holds on each budget, in the period it was made.
CREATE TABLE reservation_holds (
  reservation TEXT NOT NULL REFERENCES reservations (name) ON DELETE CASCADE,
  budget TEXT NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
  period_start BIGINT NOT NULL,
  amount_nanos BIGINT NOT NULL,
  PRIMARY KEY (reservation, budget)
);

-- Alerts: the name is derived from (period, threshold), so the primary key
-- raises each threshold once per period.
CREATE TABLE budget_alerts (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
  revision BIGINT NOT NULL,
  threshold_percent BIGINT NOT NULL,
  period_start_time BIGINT,
  spent_nanos BIGINT NOT NULL,
  limit_nanos BIGINT NOT NULL,
  create_time BIGINT
);
CREATE INDEX budget_alerts_parent ON budget_alerts (parent, name);
