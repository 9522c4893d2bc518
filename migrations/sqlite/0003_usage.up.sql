-- The usage ledger (records, idempotency, hourly rollups), budgets with
-- their spend, reservations and alerts.

-- Position of the usage stream. Every ingest transaction bumps last_seq by
-- its record count and holds this row's lock until commit, so seq order is
-- commit order across writers and replicas (WatchUsage reads seq > cursor
-- without gaps). Retention raises pruned_through_seq: older cursors expire.
CREATE TABLE usage_feed (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  last_seq INTEGER NOT NULL,
  pruned_through_seq INTEGER NOT NULL
);
INSERT INTO usage_feed (id, last_seq, pruned_through_seq) VALUES (1, 0, 0);

-- One row per LLM call. On PostgreSQL the table is partitioned by day;
-- here retention deletes rows older than the configured age.
CREATE TABLE usage_records (
  seq INTEGER PRIMARY KEY,
  record_time INTEGER NOT NULL,
  call_time INTEGER NOT NULL,
  request_id TEXT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  conversation TEXT NOT NULL,
  message TEXT NOT NULL,
  input_tokens INTEGER NOT NULL,
  output_tokens INTEGER NOT NULL,
  cache_read_tokens INTEGER NOT NULL,
  cache_write_tokens INTEGER NOT NULL,
  reasoning_tokens INTEGER NOT NULL,
  latency_us INTEGER NOT NULL,
  ttft_us INTEGER,
  status TEXT NOT NULL,
  error_class TEXT NOT NULL,
  cost_nanos INTEGER NOT NULL,
  priced INTEGER NOT NULL,
  price_effective_time INTEGER,
  reported_cost_nanos INTEGER,
  reservation TEXT NOT NULL
);
CREATE INDEX usage_records_record_time ON usage_records (record_time);
CREATE INDEX usage_records_call_time ON usage_records (call_time);

-- request_id -> the stored record: idempotency for as long as the record is
-- retained (a partitioned table cannot have a request_id-only key).
CREATE TABLE usage_request_ids (
  request_id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  record_time INTEGER NOT NULL,
  content_hash TEXT NOT NULL
);
CREATE INDEX usage_request_ids_time ON usage_request_ids (record_time);

-- Hourly totals per (provider, model, provider key, access key, user);
-- kept after the raw records are pruned.
CREATE TABLE usage_rollups (
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
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id)
);

-- Latency histogram of each rollup row: log-scale buckets (ratio 1.1).
CREATE TABLE usage_latency (
  bucket INTEGER NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  provider_key TEXT NOT NULL,
  access_key TEXT NOT NULL,
  user_id TEXT NOT NULL,
  slot INTEGER NOT NULL,
  count INTEGER NOT NULL,
  PRIMARY KEY (bucket, provider, model, provider_key, access_key, user_id, slot)
);

-- Recorded usage per provider key and day (the key time zone), next to the
-- acquisition counters of provider_key_usage.
CREATE TABLE provider_key_recorded (
  key_name TEXT NOT NULL,
  day TEXT NOT NULL,
  requests INTEGER NOT NULL,
  tokens INTEGER NOT NULL,
  cost_nanos INTEGER NOT NULL,
  PRIMARY KEY (key_name, day)
);

CREATE TABLE budgets (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL DEFAULT '',
  revision INTEGER NOT NULL,
  display_name TEXT NOT NULL DEFAULT '',
  scope TEXT NOT NULL,
  scope_value TEXT NOT NULL DEFAULT '',
  period TEXT NOT NULL,
  time_zone TEXT NOT NULL DEFAULT '',
  limit_nanos INTEGER NOT NULL CHECK (limit_nanos > 0),
  alert_thresholds_percent TEXT NOT NULL,
  create_time INTEGER NOT NULL,
  update_time INTEGER NOT NULL
);
CREATE INDEX budgets_scope ON budgets (scope, scope_value);

-- Spend and holds of a budget per period (period_start 0 for no period).
CREATE TABLE budget_spend (
  budget TEXT NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
  period_start INTEGER NOT NULL,
  spent_nanos INTEGER NOT NULL,
  held_nanos INTEGER NOT NULL,
  PRIMARY KEY (budget, period_start)
);

CREATE TABLE reservations (
  name TEXT PRIMARY KEY,
  user_id TEXT NOT NULL,
  access_key TEXT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  estimated_cost_nanos INTEGER NOT NULL,
  expire_time INTEGER NOT NULL,
  state TEXT NOT NULL,
  settled_cost_nanos INTEGER NOT NULL,
  create_time INTEGER NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (state, expire_time);

-- The amount a reservation holds on each budget, in the period it was made.
CREATE TABLE reservation_holds (
  reservation TEXT NOT NULL REFERENCES reservations (name) ON DELETE CASCADE,
  budget TEXT NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
  period_start INTEGER NOT NULL,
  amount_nanos INTEGER NOT NULL,
  PRIMARY KEY (reservation, budget)
);

-- Alerts: the name is derived from (period, threshold), so the primary key
-- raises each threshold once per period.
CREATE TABLE budget_alerts (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
  revision INTEGER NOT NULL,
  threshold_percent INTEGER NOT NULL,
  period_start_time INTEGER,
  spent_nanos INTEGER NOT NULL,
  limit_nanos INTEGER NOT NULL,
  create_time INTEGER
);
CREATE INDEX budget_alerts_parent ON budget_alerts (parent, name);
