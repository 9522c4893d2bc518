-- The model catalog, the change feed (transactional outbox + audit trail),
-- request_id idempotency and server-wide secrets.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC); booleans are
-- INTEGER 0/1; enums are their proto value names. Both engines store alike.

CREATE TABLE providers (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL DEFAULT '',
  revision INTEGER NOT NULL,
  display_name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  base_url TEXT NOT NULL,
  auth_method TEXT NOT NULL,
  enabled INTEGER NOT NULL CHECK (enabled IN (0, 1)),
  create_time INTEGER NOT NULL,
  update_time INTEGER NOT NULL
);

CREATE TABLE model_families (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES providers (name) ON DELETE RESTRICT,
  revision INTEGER NOT NULL,
  display_name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  create_time INTEGER NOT NULL,
  update_time INTEGER NOT NULL
);
CREATE INDEX model_families_parent ON model_families (parent, name);

CREATE TABLE models (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES providers (name) ON DELETE RESTRICT,
  revision INTEGER NOT NULL,
  display_name TEXT NOT NULL,
  upstream_id TEXT NOT NULL DEFAULT '',
  family TEXT REFERENCES model_families (name) ON DELETE RESTRICT,
  context_window INTEGER NOT NULL CHECK (context_window >= 0),
  max_output_tokens INTEGER NOT NULL CHECK (max_output_tokens >= 0),
  supports_images INTEGER NOT NULL CHECK (supports_images IN (0, 1)),
  supports_tools INTEGER NOT NULL CHECK (supports_tools IN (0, 1)),
  supports_reasoning INTEGER NOT NULL CHECK (supports_reasoning IN (0, 1)),
  supports_streaming INTEGER NOT NULL CHECK (supports_streaming IN (0, 1)),
  enabled INTEGER NOT NULL CHECK (enabled IN (0, 1)),
  deprecate_time INTEGER,
  retire_time INTEGER,
  prices TEXT NOT NULL,
  create_time INTEGER NOT NULL,
  update_time INTEGER NOT NULL
);
CREATE INDEX models_parent ON models (parent, name);
CREATE INDEX models_family ON models (family);

-- Every mutation appends here in its own transaction. SQLite has one writer at a time and
-- AUTOINCREMENT never reuses a seq, so seq order is commit order.
CREATE TABLE changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  change_time INTEGER NOT NULL,
  resource_type TEXT NOT NULL,
  resource_name TEXT NOT NULL,
  change_type TEXT NOT NULL,
  principal TEXT NOT NULL DEFAULT '',
  request_id TEXT NOT NULL DEFAULT '',
  resource TEXT NOT NULL
);
CREATE INDEX changes_resource ON changes (resource_name, seq);

CREATE TABLE request_ids (
  request_id TEXT PRIMARY KEY,
  method TEXT NOT NULL,
  request_hash TEXT NOT NULL,
  response TEXT NOT NULL,
  create_time INTEGER NOT NULL
);

CREATE TABLE server_secrets (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL,
  create_time INTEGER NOT NULL
);
