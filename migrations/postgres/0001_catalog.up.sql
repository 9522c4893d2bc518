-- The model catalog, the change feed (transactional outbox + audit trail),
-- request_id idempotency and server-wide secrets.
-- Timestamps are BIGINT microseconds since the Unix epoch (UTC); booleans are
-- SMALLINT 0/1; enums are their proto value names. Both engines store alike.

CREATE TABLE providers (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL DEFAULT '',
  revision BIGINT NOT NULL,
  display_name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  base_url TEXT NOT NULL,
  auth_method TEXT NOT NULL,
  enabled SMALLINT NOT NULL CHECK (enabled IN (0, 1)),
  create_time BIGINT NOT NULL,
  update_time BIGINT NOT NULL
);

CREATE TABLE model_families (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES providers (name) ON DELETE RESTRICT,
  revision BIGINT NOT NULL,
  display_name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  create_time BIGINT NOT NULL,
  update_time BIGINT NOT NULL
);
CREATE INDEX model_families_parent ON model_families (parent, name);

CREATE TABLE models (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES providers (name) ON DELETE RESTRICT,
  revision BIGINT NOT NULL,
  display_name TEXT NOT NULL,
  upstream_id TEXT NOT NULL DEFAULT '',
  family TEXT REFERENCES model_families (name) ON DELETE RESTRICT,
  context_window BIGINT NOT NULL CHECK (context_window >= 0),
  max_output_tokens BIGINT NOT NULL CHECK (max_output_tokens >= 0),
  supports_images SMALLINT NOT NULL CHECK (supports_images IN (0, 1)),
  supports_tools SMALLINT NOT NULL CHECK (supports_tools IN (0, 1)),
  supports_reasoning SMALLINT NOT NULL CHECK (supports_reasoning IN (0, 1)),
  supports_streaming SMALLINT NOT NULL CHECK (supports_streaming IN (0, 1)),
  enabled SMALLINT NOT NULL CHECK (enabled IN (0, 1)),
  deprecate_time BIGINT,
  retire_time BIGINT,
  prices TEXT NOT NULL,
  create_time BIGINT NOT NULL,
  update_time BIGINT NOT NULL
);
CREATE INDEX models_parent ON models (parent, name);
CREATE INDEX models_family ON models (family);

-- Every mutation appends here in its own transaction. Appends take an
-- advisory lock until commit, so seq order is commit order.
CREATE TABLE changes (
  seq BIGSERIAL PRIMARY KEY,
  change_time BIGINT NOT NULL,
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
  create_time BIGINT NOT NULL
);

CREATE TABLE server_secrets (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL,
  create_time BIGINT NOT NULL
);
