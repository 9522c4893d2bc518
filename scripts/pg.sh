#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests (and, with --durable, benchmarks).
#
#   scripts/pg.sh start [--durable] DIR   create and start a cluster in DIR, write DIR/env
#   scripts/pg.sh stop DIR                stop it (if running) and remove DIR; idempotent
#
# DIR is taken relative to the caller's working directory. As root, initdb and the server
# run as the `postgres` OS user (they refuse to run as root), so DIR and all its parents are
# made traversable by that user; where that cannot work the cluster lives in a 0755 folder
# under /tmp instead and DIR only holds the bookkeeping files. Not as root, everything runs
# as the calling user.
#
# MODELVAULT_PG_SERVER_OPTS, when set at `start`, adds server settings to the ones pg.sh
# passes, as `-c name=value` words (e.g. "-c track_commit_timestamp=on"; scripts/bench.sh
# uses it); unset, nothing changes.
#
# After `start`, `source DIR/env` exports MODELVAULT_TEST_POSTGRES_URL and
# MODELVAULT_TEST_POSTGRES_PORT. The server listens on 127.0.0.1 only, on a random free
# port, with trust authentication and its Unix socket in the cluster folder. Unless
# --durable is given, fsync, synchronous_commit and full_page_writes are off: fast, and
# fine for tests, never for measuring durable ingest.
#
# Files in DIR: .modelvault-pg (marker: only such folders are ever deleted), home (where
# the cluster lives: DIR itself or a /tmp folder), env, and in the cluster home: data/
# (PGDATA), log (server log), initdb.log, the socket.
set -euo pipefail

prog="pg.sh"
marker=".modelvault-pg"

die() {
  echo "$prog: error: $*" >&2
  exit 1
}
note() { echo "$prog: $*" >&2; }

usage() {
  cat >&2 <<'EOF'
usage: scripts/pg.sh start [--durable] DIR
       scripts/pg.sh stop DIR
EOF
  exit 2
}

# The highest installed major version, e.g. /usr/lib/postgresql/15/bin.
find_bindir() {
  local best d
  # The glob sorts lexically (10 < 9): sort on the version field numerically.
  best="$(for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; fi
  done | sort -t/ -k5,5n | tail -n 1)"
  [ -n "$best" ] || die "no PostgreSQL server found under /usr/lib/postgresql/*/bin (run scripts/install-deps.sh)"
  echo "$best"
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the cluster owner, from a folder that owner can enter (initdb and
# pg_ctl fail when the working directory is unreadable, e.g. /root).
as_owner() {
  local cwd="$1"
  shift
  if is_root; then
    (cd "$cwd" && runuser -u postgres -- "$@")
  else
    (cd "$cwd" && "$@")
  fi
}

# Makes every ancestor of $1 (and $1) searchable by the postgres user, top-down so that
# each test sees the fixed parents. Returns non-zero if that does not work.
make_traversable() {
  local target="$1" path="" part
  local -a parts
  IFS=/ read -r -a parts <<<"${target#/}"
  for part in / "${parts[@]}"; do
    if [ "$part" = / ]; then path=/; else path="${path%/}/$part"; fi
    if ! runuser -u postgres -- test -x "$path" 2>/dev/null; then
      chmod o+x "$path" 2>/dev/null || return 1
      runuser -u postgres -- test -x "$path" 2>/dev/null || return 1
    fi
  done
}

# Exit status 0 if TCP port $1 on 127.0.0.1 can be bound right now.
port_is_free() {
  local port="$1"
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$port" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
  else
    # Without python3: a port nobody accepts connections on is taken as free; a
    # collision is still caught when the server fails to bind, and retried.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 1; fi
    return 0
  fi
}

# A random free port below the Linux ephemeral range (32768-60999), so that it does not
# collide with the outgoing connections of the tests themselves.
pick_port() {
  local _ port
  for _ in $(seq 1 200); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    if port_is_free "$port"; then
      echo "$port"
      return 0
    fi
  done
  die "found no free TCP port on 127.0.0.1 after 200 tries"
}

# Where the cluster of DIR lives (DIR itself or a /tmp folder), from DIR/home.
cluster_home() {
  local dir="$1" home
  if [ -f "$dir/home" ]; then
    home="$(cat "$dir/home")"
    [ -n "$home" ] && [ "$home" != / ] && echo "$home" && return 0
  fi
  echo "$dir"
}

# Stops the cluster of DIR if one is running and removes DIR (and a /tmp home).
# Refuses to delete a non-empty folder that pg.sh did not create.
stop_cluster() {
  local dir="$1" bindir home status pid i
  [ -e "$dir" ] || return 0
  [ -d "$dir" ] || die "$dir exists and is not a folder"
  if [ ! -e "$dir/$marker" ] && [ -n "$(ls -A "$dir")" ]; then
    die "$dir is not a cluster made by $prog (no $marker file); refusing to touch it"
  fi
  home="$(cluster_home "$dir")"
  if [ -f "$home/data/postmaster.pid" ]; then
    bindir="$(find_bindir)"
    status=0
    as_owner / "$bindir/pg_ctl" status -D "$home/data" >/dev/null 2>&1 || status=$?
    if [ "$status" -eq 0 ]; then
      note "stopping the cluster in $home/data"
      pid="$(head -n 1 "$home/data/postmaster.pid" 2>/dev/null || true)"
      if ! as_owner / "$bindir/pg_ctl" stop -D "$home/data" -m fast -w -t 60 >/dev/null; then
        note "fast shutdown failed; trying an immediate one"
        as_owner / "$bindir/pg_ctl" stop -D "$home/data" -m immediate -w -t 60 >/dev/null ||
          die "could not stop the cluster in $home/data; see $home/log"
      fi
      # pg_ctl returns once postmaster.pid is gone; wait for the process itself to end
      # too. A zombie holds nothing: give its parent (init) 3 s to reap it, no more.
      if [[ "$pid" =~ ^[0-9]+$ ]]; then
        for i in $(seq 1 50); do
          [ -e "/proc/$pid" ] || break
          if [ "$i" -gt 30 ] && grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
            break
          fi
          sleep 0.1
        done
      fi
    fi
  fi
  if [ "$home" != "$dir" ]; then
    case "$home" in
      /tmp/modelvault-pg.*) rm -rf -- "$home" ;;
      *) note "not removing unexpected cluster home $home" ;;
    esac
  fi
  rm -rf -- "$dir"
}

start_cluster() {
  local dir="$1" durable="$2" bindir home port attempt sockdir
  bindir="$(find_bindir)"
  if is_root; then
    id postgres >/dev/null 2>&1 || die "there is no 'postgres' OS user (install the postgresql package)"
  fi

  # A cluster already there (running or left over) is stopped and replaced.
  stop_cluster "$dir"
  mkdir -p -- "$dir"
  touch "$dir/$marker"

  home="$dir"
  if is_root; then
    if make_traversable "$dir" && chown postgres: "$dir" &&
      runuser -u postgres -- test -w "$dir" 2>/dev/null; then
      chmod 0755 "$dir"
    else
      home="$(mktemp -d /tmp/modelvault-pg.XXXXXX)"
      chmod 0755 "$home"
      chown postgres: "$home"
      note "$dir cannot be made usable by the postgres user; using $home instead"
    fi
  fi
  echo "$home" >"$dir/home"

  local -a initdb_args=(-D "$home/data" --auth=trust -U postgres --encoding=UTF8 --locale=C)
  [ "$durable" = 1 ] || initdb_args+=(--no-sync)
  if ! as_owner "$home" "$bindir/initdb" "${initdb_args[@]}" >"$home/initdb.log" 2>&1; then
    cat "$home/initdb.log" >&2
    die "initdb failed in $home/data (output above)"
  fi

  # The Unix socket path must fit in sun_path (107 bytes); the tests use TCP anyway.
  sockdir="$home"
  if [ $((${#home} + 20)) -gt 100 ]; then sockdir=""; fi

  local -a opts=(-c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=128MB)
  if [ "$durable" != 1 ]; then
    opts+=(-c fsync=off -c synchronous_commit=off -c full_page_writes=off)
  fi
  if [ -n "${MODELVAULT_PG_SERVER_OPTS:-}" ]; then
    local -a extra
    read -r -a extra <<<"$MODELVAULT_PG_SERVER_OPTS"
    local word
    for word in "${extra[@]}"; do
      [[ "$word" =~ ^(-c|[A-Za-z_.]+=[A-Za-z0-9_.:/-]*)$ ]] ||
        die "MODELVAULT_PG_SERVER_OPTS takes -c name=value words, got '$word'"
    done
    opts+=("${extra[@]}")
  fi

  for attempt in 1 2 3 4 5; do
    port="$(pick_port)"
    : >"$home/log"
    is_root && chown postgres: "$home/log"
    if as_owner "$home" "$bindir/pg_ctl" -D "$home/data" -l "$home/log" -w -t 60 start \
      -o "-p $port -k '$sockdir' ${opts[*]}" >/dev/null; then
      break
    fi
    if grep -q "Address already in use" "$home/log" && [ "$attempt" -lt 5 ]; then
      note "port $port was taken meanwhile; trying another"
      # A failed start may leave the postmaster winding down; make sure it is gone.
      as_owner / "$bindir/pg_ctl" stop -D "$home/data" -m immediate -w >/dev/null 2>&1 || true
      continue
    fi
    tail -n 30 "$home/log" >&2 || true
    die "the server did not start (log above, full log in $home/log)"
  done

  cat >"$dir/env" <<EOF
# Written by scripts/pg.sh; cluster in $home/data, log in $home/log.
export MODELVAULT_TEST_POSTGRES_URL='postgresql://host=127.0.0.1 port=$port dbname=postgres user=postgres'
export MODELVAULT_TEST_POSTGRES_PORT=$port
EOF
  note "PostgreSQL $(basename "$(dirname "$bindir")") running on 127.0.0.1:$port" \
    "($([ "$durable" = 1 ] && echo durable || echo "fsync off")); stop it with: scripts/pg.sh stop $dir"
  echo "postgresql://host=127.0.0.1 port=$port dbname=postgres user=postgres"
}

# Makes DIR absolute (relative to the caller's cwd) and normalised, without requiring it
# to exist.
absolute() {
  realpath -m -- "$1"
}

main() {
  [ $# -ge 1 ] || usage
  local cmd="$1" durable=0 dir=""
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --durable) durable=1 ;;
      -h | --help) usage ;;
      -*) die "unknown option $1" ;;
      *)
        [ -z "$dir" ] || die "only one DIR may be given"
        dir="$1"
        ;;
    esac
    shift
  done
  [ -n "$dir" ] || usage
  dir="$(absolute "$dir")"
  if [ -z "$dir" ] || [ "$dir" = / ]; then die "refusing to use / as the cluster folder"; fi

  case "$cmd" in
    start) start_cluster "$dir" "$durable" ;;
    stop)
      [ "$durable" = 0 ] || die "--durable applies to start only"
      stop_cluster "$dir"
      ;;
    *) usage ;;
  esac
}

main "$@"
