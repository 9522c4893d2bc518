-- Provider keys (upstream secrets, encrypted), their counters and health,
-- and access keys (stored as keyed hashes only).

CREATE TABLE provider_keys (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL REFERENCES providers (name) ON DELETE RESTRICT,
  revision BIGINT NOT NULL,
  display_name TEXT NOT NULL DEFAULT '',
  disabled SMALLINT NOT NULL CHECK (disabled IN (0, 1)),
  expire_time BIGINT,
  limits TEXT NOT NULL,
  secret_reference TEXT NOT NULL DEFAULT '',
  secret_hint TEXT NOT NULL DEFAULT '',
  secret_version BIGINT NOT NULL,
  create_time BIGINT NOT NULL,
  update_time BIGINT NOT NULL
);
CREATE INDEX provider_keys_parent ON provider_keys (parent, name);

-- Every secret version of a key. `envelope` is the secret sealed under
-- master key `master_key_version` with the key's name as associated data;
-- NULL when the version is a reference (env:NAME / file:PATH).
CREATE TABLE provider_key_secrets (
  key_name TEXT NOT NULL REFERENCES provider_keys (name) ON DELETE CASCADE,
  version BIGINT NOT NULL,
  envelope TEXT,
  reference TEXT NOT NULL DEFAULT '',
  hint TEXT NOT NULL DEFAULT '',
  master_key_version BIGINT,
  create_time BIGINT NOT NULL,
  expire_time BIGINT,
  PRIMARY KEY (key_name, version)
);
CREATE INDEX provider_key_secrets_master ON provider_key_secrets (master_key_version);

-- Counters per key and calendar day, added to in batches by every replica.
CREATE TABLE provider_key_usage (
  key_name TEXT NOT NULL REFERENCES provider_keys (name) ON DELETE CASCADE,
  day TEXT NOT NULL,
  requests BIGINT NOT NULL,
  tokens BIGINT NOT NULL,
  last_used_time BIGINT,
  PRIMARY KEY (key_name, day)
);

-- Health reported through ReportKeyOutcome, shared by every replica.
CREATE TABLE provider_key_health (
  key_name TEXT PRIMARY KEY REFERENCES provider_keys (name) ON DELETE CASCADE,
  degraded_until BIGINT,
  consecutive_failures BIGINT NOT NULL,
  last_outcome TEXT NOT NULL,
  last_outcome_time BIGINT
);

-- token_hash and previous_token_hash are keyed BLAKE2b hashes of tokens;
-- they are not part of the AccessKey resource and never leave the server.
CREATE TABLE access_keys (
  name TEXT PRIMARY KEY,
  parent TEXT NOT NULL DEFAULT '',
  revision BIGINT NOT NULL,
  display_name TEXT NOT NULL DEFAULT '',
  owner TEXT NOT NULL,
  scopes TEXT NOT NULL,
  token_prefix TEXT NOT NULL DEFAULT '',
  expire_time BIGINT,
  revoke_time BIGINT,
  previous_token_expire_time BIGINT,
  last_used_time BIGINT,
  create_time BIGINT NOT NULL,
  update_time BIGINT NOT NULL,
  token_hash TEXT NOT NULL DEFAULT '',
  previous_token_hash TEXT NOT NULL DEFAULT ''
);
