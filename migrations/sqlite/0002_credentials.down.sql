DROP TABLE access_keys;
DROP TABLE provider_key_health;
DROP TABLE provider_key_usage;
DROP TABLE provider_key_secrets;
DROP TABLE provider_keys;
