#!/usr/bin/env bash
# `make run`: install dependencies, build the release preset, migrate and seed a SQLite
# database, then serve it in the foreground. The data folder also holds the master key
# (created on first run, mode 0600) and the first admin access key (admin.token, written
# by the server when the database has no access keys).
#
#   MODELVAULT_DATA_DIR  folder for the database and keys (default .data, relative to the repo)
#   MODELVAULT_LISTEN    listen address (default 127.0.0.1:50051)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake --preset release
# Only the server: the tests and benchmarks are built by `make test` and `make bench`.
cmake --build --preset release -j2 --target modelvault

bin=build/release/modelvault
[ -x "$bin" ] || { echo "run.sh: error: $bin was not built" >&2; exit 1; }

DATA_DIR="${MODELVAULT_DATA_DIR:-.data}"
LISTEN="${MODELVAULT_LISTEN:-127.0.0.1:50051}"
mkdir -p -- "$DATA_DIR"
database="sqlite3://db=$DATA_DIR/modelvault.db"
master_key="$DATA_DIR/master.key"
token_file="$DATA_DIR/admin.token"
[ -s "$master_key" ] || "$bin" master-key generate --out "$master_key"

"$bin" migrate up --database "$database"
"$bin" seed --database "$database"

# Where a client on this machine reaches the server (a wildcard listen address is
# reached through loopback).
target="$LISTEN"
case "$target" in
  0.0.0.0:*) target="127.0.0.1:${target#0.0.0.0:}" ;;
  "[::]:"*) target="[::1]:${target#\[::\]:}" ;;
esac

cat <<INFO

modelvault: serving $database on $LISTEN (Ctrl-C stops it).
Every call needs an access key: the first admin key is in $token_file. Call it with:

  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge \
    -H "authorization: Bearer \$(cat $token_file)" \
    http://$target/modelvault.v1.CatalogService/ListModels -d '{"parent":"providers/-","page_size":5}'

  grpcurl -plaintext -H "authorization: Bearer \$(cat $token_file)" \
    -d '{"parent":"providers/-"}' $target modelvault.v1.CatalogService/ListModels

  MODELVAULT_TOKEN_FILE=$token_file $bin models list --target $target

INFO

exec "$bin" serve --listen "$LISTEN" --database "$database" --master-key-file "$master_key" \
  --admin-key-file "$token_file"
