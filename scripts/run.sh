#!/usr/bin/env bash
# `make run`: install dependencies, build the release preset, migrate and seed a SQLite
# database, then serve it in the foreground.
#
#   MODELVAULT_DATA_DIR  folder for the database (default .data, relative to the repo)
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

modelvault: serving $database on $LISTEN (Ctrl-C stops it). Call it with:

  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge http://$target/modelvault.v1.CatalogService/ListModels -d '{"parent":"providers/-","page_size":5}'

  grpcurl -plaintext -d '{"parent":"providers/-"}' $target modelvault.v1.CatalogService/ListModels

  $bin models list --target $target

INFO

exec "$bin" serve --listen "$LISTEN" --database "$database"
