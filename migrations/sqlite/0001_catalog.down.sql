DROP TABLE server_secrets;
DROP TABLE request_ids;
DROP TABLE changes;
DROP TABLE models;
DROP TABLE model_families;
DROP TABLE providers;
