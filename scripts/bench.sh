#!/usr/bin/env bash
# `make bench`: throughput of modelvault's hot paths against their limit, measured in the
# same run (DESIGN.md §8). Assumes the release preset is built (build/release, or
# BENCH_BUILD). Never asserts a time: it prints figures and ratios, also written to
# build/bench/results.txt (or BENCH_OUT).
#
# 1. Against a null gRPC server answering the same calls with a fixed response: runs, one
#    at a time, bench/mv_loadgen against bench/mv_null_server and against `modelvault
#    serve` on a freshly migrated and seeded SQLite database, for GetModel, ListModels,
#    AcquireProviderKey (5 keys, 64 callers), VerifyAccessKey and RecordUsage (a new
#    record of a seeded model with every call), and reports throughput, latency, their
#    ratio and each server's own CPU time per call (read from /proc/<pid>/stat around each
#    run, divided by every call the server answered in that run, warm-up included). Every
#    call to modelvault carries the bootstrap admin key. After the rounds it checks key
#    accounting: the acquisitions modelvault counted equal those it acknowledged, and with
#    daily limits set, exactly the allowed number is granted.
# 2. WatchUsage fan-out on the same SQLite server: BENCH_WATCHERS streams, RecordUsage at
#    BENCH_WATCH_RATE records/s; records delivered per second across the watchers and the
#    latency from each record's record_time (stamped by the server's writer when the
#    storing transaction starts, so an upper bound on commit-to-delivery) to its receipt.
# 3. Durable usage on PostgreSQL: a dedicated cluster (scripts/pg.sh start --durable:
#    fsync=on, synchronous_commit=on, stopped on every exit path), `modelvault migrate up`,
#    `seed` and `serve` on it, then
#      IngestUsage: BENCH_INGEST_STREAMS streams x BENCH_INGEST_INFLIGHT batches of
#        BENCH_INGEST_BATCH records in flight; records acknowledged (so durable) per second;
#      COPY: its limit, bench/mv_copy_bench COPYing as many equivalent rows (every column)
#        into usage_records of the same database, over as many connections, one
#        transaction per batch of the same size, into a fresh partition;
#      RecordUsage on PostgreSQL (ratio to the null server of part 1) and WatchUsage as in
#        part 2, its deliveries also timed from the commit: the cluster runs with
#        track_commit_timestamp=on, and each delivery's receipt (mv_loadgen
#        --deliveries-out) is matched with pg_xact_commit_timestamp of its record's row.
#    BENCH_POSTGRES=0 skips this part.
#
# The null server's ListModels pages hold as many models as modelvault's do (the seeded
# catalog is smaller than a page of 50), so both servers send the same amount of data.
#
#   BENCH_SECONDS   measured seconds per run (default 5)
#   BENCH_WARMUP    warm-up seconds before each run (default 1)
#   BENCH_CHANNELS  load generator channels, one connection each (default 4)
#   BENCH_INFLIGHT  calls kept in flight per channel (default 32)
#   BENCH_ROUNDS    rounds, each measuring every (method, server) once; the table shows
#                   each figure's median over the rounds (default 1; 3 steadies the ratio)
#   BENCH_METADATA  KEY=VALUE header sent with every call (e.g. credentials), optional
#   BENCH_BUILD     the build folder holding modelvault and bench/ (default build/release)
#   BENCH_MODELVAULT  the server binary (default $BENCH_BUILD/modelvault)
#   BENCH_OUT       folder of results.txt (default build/bench)
#   BENCH_WATCHERS  WatchUsage streams (default 100)
#   BENCH_WATCH_CHANNELS  connections the watchers share (default 4)
#   BENCH_WATCH_RATE  RecordUsage calls per second during the WatchUsage runs (default 200:
#                   each record goes to every watcher, and the load generator spends about
#                   15-20 us of CPU per delivery, so 100 watchers x 2000/s would need more
#                   than the 2 cores of the machine for the load generator alone)
#   BENCH_INGEST_STREAMS  IngestUsage streams and COPY connections (default 8)
#   BENCH_INGEST_BATCH    records per IngestUsage batch and per COPY (default 500)
#   BENCH_INGEST_INFLIGHT batches in flight per IngestUsage stream (default 4)
#   BENCH_INGEST_SECONDS, BENCH_INGEST_WARMUP  the IngestUsage run (default 10 and 3): its
#                   acknowledgements come a whole group commit (up to 4000 records) at a
#                   time, so a window of a few commits would count +-1 commit
#   BENCH_POSTGRES  1 (default) runs part 3, 0 skips it
#
# Exits 1 when a server fails to start or a measured run had errors (figures are still
# printed); exits 0 without the modelvault half, loudly, when the binary is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_SECONDS="${BENCH_SECONDS:-5}"
BENCH_WARMUP="${BENCH_WARMUP:-1}"
BENCH_CHANNELS="${BENCH_CHANNELS:-4}"
BENCH_INFLIGHT="${BENCH_INFLIGHT:-32}"
BENCH_ROUNDS="${BENCH_ROUNDS:-1}"
BENCH_METADATA="${BENCH_METADATA:-}"
BENCH_WATCHERS="${BENCH_WATCHERS:-100}"
BENCH_WATCH_RATE="${BENCH_WATCH_RATE:-200}"
BENCH_WATCH_CHANNELS="${BENCH_WATCH_CHANNELS:-4}"
BENCH_INGEST_STREAMS="${BENCH_INGEST_STREAMS:-8}"
BENCH_INGEST_BATCH="${BENCH_INGEST_BATCH:-500}"
BENCH_INGEST_INFLIGHT="${BENCH_INGEST_INFLIGHT:-4}"
BENCH_INGEST_SECONDS="${BENCH_INGEST_SECONDS:-10}"
BENCH_INGEST_WARMUP="${BENCH_INGEST_WARMUP:-3}"
BENCH_POSTGRES="${BENCH_POSTGRES:-1}"

build="${BENCH_BUILD:-build/release}"
loadgen=$build/bench/mv_loadgen
null_server=$build/bench/mv_null_server
copy_bench=$build/bench/mv_copy_bench
modelvault="${BENCH_MODELVAULT:-$build/modelvault}"
out_dir="${BENCH_OUT:-build/bench}"
results=$out_dir/results.txt
readonly ready_timeout_s=20
readonly list_page_size=50
readonly limited_per_key=2000
buf=node_modules/.bin/buf
token=""

log() { echo "bench: $*" >&2; }
die() {
  echo "bench: error: $*" >&2
  exit 1
}

for tool in "$loadgen" "$null_server" "$buf"; do
  [ -x "$tool" ] || die "$tool is missing: build it with" \
    "cmake --build $build --target mv_null_server mv_loadgen -j2 (make bench does)"
done
have_modelvault=0
[ -x "$modelvault" ] && have_modelvault=1

metadata_args=()
[ -n "$BENCH_METADATA" ] && metadata_args=(--metadata "$BENCH_METADATA")
clk_tck=$(getconf CLK_TCK)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/modelvault-bench.XXXXXX")
server_pids=()
loadgen_pid=""
pg_dir=""

# Stops every server this script started: SIGTERM, then SIGKILL after 5 s.
stop_servers() {
  local pid
  for pid in "${server_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${server_pids[@]}"; do
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "server $pid ignored SIGTERM for 5 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  server_pids=()
}
# shellcheck disable=SC2317  # Invoked by the EXIT trap.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$loadgen_pid" ]; then
    kill -TERM "$loadgen_pid" 2>/dev/null || true
    wait "$loadgen_pid" 2>/dev/null || true
  fi
  stop_servers
  # The durable PostgreSQL of part 3, after the server that uses it.
  if [ -n "$pg_dir" ]; then
    bash scripts/pg.sh stop "$pg_dir" || log "WARNING: could not stop the PostgreSQL in $pg_dir"
  fi
  rm -rf -- "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A TCP port on 127.0.0.1 that nothing listens on and that this run has not handed out.
used_ports=" "
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((20000 + RANDOM % 40000))
    [[ "$used_ports" == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      used_ports+="$port "
      echo "$port"
      return 0
    fi
  done
  die "found no free TCP port"
}

# mvcall SERVICE/METHOD JSON: one call to modelvault through buf curl, with the admin key.
mvcall() {
  "$buf" curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $token" \
    "http://$mv_target/modelvault.v1.$1" -d "$2" 2>>"$tmp/mvcall.err" ||
    die "modelvault $1 failed: $(tail -n 5 "$tmp/mvcall.err")"
}

# The value of KEY in a `key=value key=value` line.
field() { awk -v k="$2" '{ for (i = 1; i <= NF; i++) { n = index($i, "="); if (substr($i, 1, n - 1) == k) print substr($i, n + 1) } }' <<<"$1"; }

# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat,
# counted after the parenthesised command name, which may hold spaces).
cpu_ticks() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }
  local -a f
  read -r -a f <<<"$stat"
  echo $((f[11] + f[12]))
}

# wait_ready NAME TARGET PID LOG: retries a short single-call GetModel run until it
# succeeds without an error, for at most ready_timeout_s.
wait_ready() {
  local name=$1 target=$2 pid=$3 server_log=$4
  local deadline=$((SECONDS + ready_timeout_s))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "--- $server_log" >&2
      tail -n 30 "$server_log" >&2 || true
      die "$name exited before answering"
    fi
    if "$loadgen" --target "$target" --method GetModel --channels 1 --inflight 1 --warmup 0 \
      --seconds 0.5 "${metadata_args[@]}" >/dev/null 2>"$tmp/ready.err"; then
      log "$name answers on $target"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      echo "--- last probe:" >&2
      cat "$tmp/ready.err" >&2
      echo "--- $server_log" >&2
      tail -n 30 "$server_log" >&2 || true
      die "$name did not answer GetModel without error within ${ready_timeout_s} s"
    fi
    sleep 0.2
  done
}

# measure SERVER TARGET PID METHOD [LOADGEN ARGS...]: one load generator run of
# run_warmup + run_seconds (BENCH_WARMUP + BENCH_SECONDS unless set); sets the globals
# line (its output line plus server_cpu_us_per_call) and run_errors.
line=""
run_errors=0
any_errors=0
run_seconds=""
run_warmup=""
measure() {
  local server=$1 target=$2 pid=$3 method=$4
  shift 4
  local before after out rc=0
  local seconds=${run_seconds:-$BENCH_SECONDS} warmup=${run_warmup:-$BENCH_WARMUP}
  log "$method against $server ($target): ${warmup} s warm-up + ${seconds} s"
  before=$(cpu_ticks "$pid")
  # In the background, so that a signal to this script acts at once (bash runs traps
  # only between foreground commands, but interrupts `wait`).
  "$loadgen" --target "$target" --method "$method" --channels "$BENCH_CHANNELS" \
    --inflight "$BENCH_INFLIGHT" --seconds "$seconds" --warmup "$warmup" \
    "${metadata_args[@]}" "$@" >"$tmp/loadgen.out" 2>"$tmp/loadgen.err" &
  loadgen_pid=$!
  wait "$loadgen_pid" || rc=$?
  loadgen_pid=""
  after=$(cpu_ticks "$pid")
  out=$(<"$tmp/loadgen.out")
  sed 's/^/  /' "$tmp/loadgen.err" >&2
  ((rc == 2)) && die "mv_loadgen rejected its flags"
  [ -n "$out" ] || die "mv_loadgen printed no result"
  local total_calls cpu
  total_calls=$(field "$out" total_calls)
  cpu=$(awk -v d=$((after - before)) -v t="$clk_tck" -v n="$total_calls" \
    'BEGIN { if (n > 0) printf "%.1f", d / t * 1e6 / n; else print "-" }')
  line="server=$server $out server_cpu_us_per_call=$cpu"
  echo "$line" >>"$tmp/raw.txt"
  run_errors=$(field "$out" errors)
  if ((run_errors > 0)); then
    any_errors=1
    log "WARNING: $run_errors errors against $server; its figures are not valid"
  fi
}

: >"$tmp/raw.txt"
mkdir -p -- "$out_dir"
# Other work on the machine skews every figure (the load generator needs most of the CPU).
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
busy=$(awk -v l="${load_before%% *}" 'BEGIN { print (l >= 0.5) ? 1 : 0 }')
((busy)) && log "WARNING: load average $load_before before the run: other processes are" \
  "using the CPU, the figures will be low and noisy"

# modelvault first, so that the null server can be told its catalog size.
mv_target=""
mv_pid=""
catalog_size=0
if ((have_modelvault)); then
  db="sqlite3://db=$tmp/bench.db"
  log "migrating and seeding $db"
  "$modelvault" migrate up --database "$db" >"$tmp/migrate.log" 2>&1 ||
    { cat "$tmp/migrate.log" >&2; die "modelvault migrate up failed"; }
  "$modelvault" seed --database "$db" >"$tmp/seed.log" 2>&1 ||
    { cat "$tmp/seed.log" >&2; die "modelvault seed failed"; }
  mv_target="127.0.0.1:$(free_port)"
  "$modelvault" master-key generate --out "$tmp/master.key" >/dev/null
  "$modelvault" serve --listen "$mv_target" --database "$db" --master-key-file "$tmp/master.key" \
    --admin-key-file "$tmp/admin.token" >"$tmp/modelvault.log" 2>&1 &
  mv_pid=$!
  server_pids+=("$mv_pid")
  for _ in $(seq 100); do [ -s "$tmp/admin.token" ] && break; sleep 0.1; done
  [ -s "$tmp/admin.token" ] || die "modelvault wrote no admin key ($tmp/modelvault.log)"
  token=$(<"$tmp/admin.token")
  # Both servers get the same header, so both parse the same bytes.
  metadata_args=(--metadata "authorization=Bearer $token")
  wait_ready modelvault "$mv_target" "$mv_pid" "$tmp/modelvault.log"
  # Five equal keys of one provider for AcquireProviderKey (limits far above the run),
  # and five keys of another with 2000 requests a day each for the limits check.
  for i in 1 2 3 4 5; do
    mvcall CredentialService/CreateProviderKey "{\"parent\":\"providers/openai\",
      \"provider_key_id\":\"bench-$i\",\"provider_key\":{\"limits\":{\"requests_per_day\":1000000000}},
      \"secret\":\"sk-bench-$i-0123456789abcdefghijklmnopqrstuvwxyz\"}" >/dev/null
    mvcall CredentialService/CreateProviderKey "{\"parent\":\"providers/anthropic\",
      \"provider_key_id\":\"limited-$i\",\"provider_key\":{\"limits\":{\"requests_per_day\":$limited_per_key}},
      \"secret\":\"sk-ant-limited-$i-0123456789abcdefghijklmnop\"}" >/dev/null
  done
  probe=$("$loadgen" --target "$mv_target" --method ListModels --page-size "$list_page_size" \
    --channels 1 --inflight 1 --warmup 0 --seconds 0.5 "${metadata_args[@]}" 2>/dev/null) ||
    die "modelvault ListModels fails: $probe"
  catalog_size=$(field "$probe" items_per_call)
  catalog_size=${catalog_size%.*}
  log "modelvault lists $catalog_size models per page of $list_page_size"
  # A full page: the catalog may be larger, let the null server send full pages.
  ((catalog_size < list_page_size)) || catalog_size=0
else
  log "WARNING: $modelvault not found: measuring the null server only (no ratio)."
fi

null_target="127.0.0.1:$(free_port)"
"$null_server" --listen "$null_target" --catalog-size "$catalog_size" >"$tmp/null.log" 2>&1 &
null_pid=$!
server_pids+=("$null_pid")
wait_ready mv_null_server "$null_target" "$null_pid" "$tmp/null.log"

# fig[SERVER.METHOD.KEY]: the figure of every round, space-separated, then its median.
declare -A fig
acknowledged=0
methods="GetModel ListModels AcquireProviderKey VerifyAccessKey RecordUsage"
keys="rps p50_us p99_us items_per_call server_cpu_us_per_call"
watch_keys="rps p50_us p99_us max_us send_p50_us send_p99_us send_max_us written_per_s missing
  server_cpu_us_per_call"
# watch_run LABEL SERVER TARGET PID [LOADGEN ARGS...]: one WatchUsage run (BENCH_WATCHERS
# streams on BENCH_WATCH_CHANNELS connections, RecordUsage at BENCH_WATCH_RATE/s on one
# more); figures under LABEL.
watch_run() {
  local label=$1
  shift
  measure "$1" "$2" "$3" WatchUsage --watchers "$BENCH_WATCHERS" --rate "$BENCH_WATCH_RATE" \
    --channels "$BENCH_WATCH_CHANNELS" "${@:4}"
  for k in $watch_keys; do fig[$label.WatchUsage.$k]+="$(field "$line" "$k") "; done
}
for ((round = 1; round <= BENCH_ROUNDS; round++)); do
  ((BENCH_ROUNDS > 1)) && log "round $round of $BENCH_ROUNDS"
  for method in $methods; do
    args=()
    case $method in
      ListModels) args=(--page-size "$list_page_size") ;;
      # 4 channels x 16 = 64 concurrent callers on 5 keys.
      AcquireProviderKey) args=(--provider providers/openai --inflight 16) ;;
      VerifyAccessKey) args=(--token "${token:-mv_0123456789abcdef_x}") ;;
    esac
    measure null "$null_target" "$null_pid" "$method" "${args[@]}"
    for k in $keys; do fig[null.$method.$k]+="$(field "$line" "$k") "; done
    if ((have_modelvault)); then
      measure modelvault "$mv_target" "$mv_pid" "$method" "${args[@]}"
      for k in $keys; do fig[mv.$method.$k]+="$(field "$line" "$k") "; done
      [ "$method" = AcquireProviderKey ] && acknowledged=$((acknowledged + $(field "$line" total_ok)))
    fi
  done
  ((have_modelvault)) && watch_run sqlite modelvault "$mv_target" "$mv_pid"
done

# Key accounting: what modelvault counted (flushed every 100 ms) against what it
# acknowledged; then, with 2000 requests a day on each of 5 keys, exactly 10000 grants.
accounting=""
limits=""
if ((have_modelvault)); then
  sleep 0.5
  counted=0
  per_key=""
  for i in 1 2 3 4 5; do
    n=$(mvcall CredentialService/GetProviderKey "{\"name\":\"providers/openai/keys/bench-$i\"}" |
      grep -o '"requests": "[0-9]*"' | grep -o '[0-9]*' || echo 0)
    counted=$((counted + n))
    per_key+="$n "
  done
  exact=no
  ((counted == acknowledged)) && exact=yes
  accounting="AcquireProviderKey accounting: $acknowledged acknowledged, $counted counted by the keys (exact: $exact); per key: $per_key"
  log "$accounting"
  log "limits check: 64 callers against 5 keys x $limited_per_key requests a day"
  "$loadgen" --target "$mv_target" --method AcquireProviderKey --provider providers/anthropic \
    --channels 4 --inflight 16 --warmup 0 --seconds 3 "${metadata_args[@]}" \
    >"$tmp/limits.out" 2>"$tmp/limits.err" || true
  granted=$(field "$(<"$tmp/limits.out")" total_ok)
  allowed=$((5 * limited_per_key))
  respected=no
  ((granted <= allowed)) && respected=yes
  limits="limits check: $granted of $allowed allowed acquisitions granted (never exceeded: $respected)"
  log "$limits"
  ((granted <= allowed)) || any_errors=1
  [ "$exact" = yes ] || any_errors=1
fi
stop_servers

# commit_latency RUN_ID DELIVERIES: the latency from each delivered record's PostgreSQL
# commit timestamp (track_commit_timestamp: taken as the commit record is written, before
# it is flushed) to its receipt by a watcher (DELIVERIES: request_id, receipt Unix us);
# adds p50/p99/max to fig[pg.WatchUsage.commit_*_us].
commit_latency() {
  local run_id=$1 deliveries=$2 out
  if ! command -v psql >/dev/null; then
    log "no psql: WatchUsage deliveries not timed against commit timestamps"
    return 0
  fi
  psql -X -q -A -t -v ON_ERROR_STOP=1 "${pg_url#postgresql://}" -c \
    "COPY (SELECT request_id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint
      FROM usage_records WHERE request_id LIKE 'bench-$run_id-%') TO STDOUT" \
    >"$tmp/commits.txt" 2>"$tmp/psql.err" || {
    cat "$tmp/psql.err" >&2
    log "WARNING: could not read the commit timestamps; deliveries not timed against them"
    any_errors=1
    return 0
  }
  # A row without a commit timestamp (\N) is left out.
  out=$(awk -F '\t' 'NR == FNR { commit[$1] = $2; next }
      ($1 in commit) && commit[$1] ~ /^[0-9]+$/ { print $2 - commit[$1] }' \
    "$tmp/commits.txt" "$deliveries" |
    sort -n | awk '{ v[NR] = $1 } END {
      if (NR == 0) { print "- - -"; exit }
      p50 = int(NR * 0.5); if (p50 < NR * 0.5) p50++
      p99 = int(NR * 0.99); if (p99 < NR * 0.99) p99++
      print v[p50], v[p99], v[NR], NR }')
  local p50 p99 max n
  read -r p50 p99 max n <<<"$out"
  log "commit timestamp to receipt: $n deliveries, us p50 $p50 p99 $p99 max $max"
  echo "server=modelvault-pg method=WatchUsage-commit-timing deliveries=${n:-0}" \
    "commit_p50_us=$p50 commit_p99_us=$p99 commit_max_us=$max" >>"$tmp/raw.txt"
  fig[pg.WatchUsage.commit_p50_us]+="$p50 "
  fig[pg.WatchUsage.commit_p99_us]+="$p99 "
  fig[pg.WatchUsage.commit_max_us]+="$max "
}

# Part 3: durable usage on a PostgreSQL of its own (fsync and synchronous_commit on).
pg_ran=0
pg_settings=""
if ((have_modelvault)) && [ "$BENCH_POSTGRES" = 1 ]; then
  [ -x "$copy_bench" ] || die "$copy_bench is missing: build it with" \
    "cmake --build $build --target mv_copy_bench -j2 (make bench does), or set BENCH_POSTGRES=0"
  pg_dir="$tmp/pg"
  log "starting a durable PostgreSQL (fsync=on, synchronous_commit=on) for the usage rows"
  # Commit timestamps time WatchUsage deliveries from the commit itself.
  pg_url=$(MODELVAULT_PG_SERVER_OPTS="-c track_commit_timestamp=on" \
    bash scripts/pg.sh start --durable "$pg_dir" 2>"$tmp/pg.err" | tail -n 1) ||
    { cat "$tmp/pg.err" >&2; die "PostgreSQL did not start"; }
  "$modelvault" migrate up --database "$pg_url" >"$tmp/pg-migrate.log" 2>&1 ||
    { cat "$tmp/pg-migrate.log" >&2; die "modelvault migrate up failed on PostgreSQL"; }
  "$modelvault" seed --database "$pg_url" >"$tmp/pg-seed.log" 2>&1 ||
    { cat "$tmp/pg-seed.log" >&2; die "modelvault seed failed on PostgreSQL"; }
  pg_target="127.0.0.1:$(free_port)"
  "$modelvault" serve --listen "$pg_target" --database "$pg_url" \
    --master-key-file "$tmp/master.key" --admin-key-file "$tmp/pg-admin.token" \
    >"$tmp/modelvault-pg.log" 2>&1 &
  pg_pid=$!
  server_pids+=("$pg_pid")
  for _ in $(seq 100); do [ -s "$tmp/pg-admin.token" ] && break; sleep 0.1; done
  [ -s "$tmp/pg-admin.token" ] || die "modelvault wrote no admin key ($tmp/modelvault-pg.log)"
  pg_token=$(<"$tmp/pg-admin.token")
  metadata_args=(--metadata "authorization=Bearer $pg_token")
  wait_ready modelvault-pg "$pg_target" "$pg_pid" "$tmp/modelvault-pg.log"
  pg_ran=1
  for ((round = 1; round <= BENCH_ROUNDS; round++)); do
    ((BENCH_ROUNDS > 1)) && log "PostgreSQL round $round of $BENCH_ROUNDS"
    run_seconds=$BENCH_INGEST_SECONDS run_warmup=$BENCH_INGEST_WARMUP \
      measure modelvault-pg "$pg_target" "$pg_pid" IngestUsage \
      --channels "$BENCH_INGEST_STREAMS" --inflight "$BENCH_INGEST_INFLIGHT" \
      --batch "$BENCH_INGEST_BATCH"
    for k in $keys; do fig[pg.IngestUsage.$k]+="$(field "$line" "$k") "; done
    # The limit: as many rows as were acknowledged in the measured window.
    rows=$(($(field "$line" calls) - $(field "$line" errors)))
    if ((rows > 0)); then
      log "COPY of $rows rows into usage_records: $BENCH_INGEST_STREAMS connections," \
        "$BENCH_INGEST_BATCH rows per transaction"
      rc=0
      "$copy_bench" --database "$pg_url" --rows "$rows" --connections "$BENCH_INGEST_STREAMS" \
        --batch "$BENCH_INGEST_BATCH" --days-ahead $((6 + round)) \
        --access-key "accessKeys/${pg_token:3:16}" >"$tmp/copy.out" 2>"$tmp/copy.err" &
      loadgen_pid=$!
      wait "$loadgen_pid" || rc=$?
      loadgen_pid=""
      sed 's/^/  /' "$tmp/copy.err" >&2
      out=$(<"$tmp/copy.out")
      [ -n "$out" ] || die "mv_copy_bench printed no result"
      echo "server=postgres $out" >>"$tmp/raw.txt"
      for k in rps p50_us p99_us; do fig[copy.COPY.$k]+="$(field "$out" "$k") "; done
      pg_settings="fsync=$(field "$out" fsync) synchronous_commit=$(field "$out" synchronous_commit)"
      if ((rc != 0)); then
        any_errors=1
        log "WARNING: COPY had errors; its figures are not valid"
      fi
    else
      log "WARNING: IngestUsage acknowledged no record; no COPY run"
      any_errors=1
    fi
    measure modelvault-pg "$pg_target" "$pg_pid" RecordUsage
    for k in $keys; do fig[pg.RecordUsage.$k]+="$(field "$line" "$k") "; done
    watch_run_id=$(printf 'w%07x' $((RANDOM * 32768 + RANDOM)))
    watch_run pg modelvault-pg "$pg_target" "$pg_pid" --run-id "$watch_run_id" \
      --deliveries-out "$tmp/deliveries.txt"
    commit_latency "$watch_run_id" "$tmp/deliveries.txt"
  done
  stop_servers
  bash scripts/pg.sh stop "$pg_dir" || log "WARNING: could not stop the PostgreSQL in $pg_dir"
  pg_dir=""
fi

# The median of space-separated numbers (the lower one of the middle two).
median() {
  tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g |
    awk '{ v[NR] = $1 } END { if (NR > 0) print v[int((NR + 1) / 2)] }'
}
for k in "${!fig[@]}"; do fig[$k]=$(median "${fig[$k]}"); done

ratio() { ratio_of "mv.$1.rps" "null.$1.rps"; }
# ratio_of KEY_A KEY_B: fig[KEY_A] / fig[KEY_B], or - when either is missing.
ratio_of() {
  awk -v a="${fig[$1]:-}" -v b="${fig[$2]:-}" \
    'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "-" }'
}
# ms KEY: fig[KEY] (microseconds) in milliseconds, or -.
ms() {
  awk -v u="${fig[$1]:-}" 'BEGIN { if (u ~ /^-?[0-9.]+$/) printf "%.1f", u / 1000; else print "-" }'
}
# pair PREFIX: "p50/p99" of fig[PREFIX.p50_us] and fig[PREFIX.p99_us], or -.
pair() {
  if [ -n "${fig[$1.rps]:-}" ]; then echo "${fig[$1.p50_us]}/${fig[$1.p99_us]}"; else echo "-"; fi
}

{
  echo "modelvault hot-path benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
  echo "$(nproc) cores; load generator: $BENCH_CHANNELS channels x $BENCH_INFLIGHT in flight," \
    "${BENCH_WARMUP} s warm-up + ${BENCH_SECONDS} s per run; modelvault on SQLite" \
    "(durable usage rows: PostgreSQL)"
  echo "load average before the run: $load_before"
  if ((busy)); then
    echo "WARNING: the machine was busy before the run; figures are low and noisy"
  fi
  if ((BENCH_ROUNDS > 1)); then
    echo "median of $BENCH_ROUNDS rounds (every run is under raw:)"
  fi
  echo
  fmt="%-18s | %9s | %9s | %5s | %15s | %15s | %16s | %14s\n"
  # shellcheck disable=SC2059
  printf "$fmt" method "null rps" "mv rps" ratio "null p50/p99 us" "mv p50/p99 us" \
    "null cpu us/call" "mv cpu us/call"
  # shellcheck disable=SC2059
  printf "$fmt" "" "" "" "" "" "" "" "" | tr ' |' '-+'
  for method in $methods; do
    label=$method
    [ "$method" = ListModels ] && label="ListModels($list_page_size)"
    mv_lat="-"
    [ -n "${fig[mv.$method.rps]:-}" ] && mv_lat="${fig[mv.$method.p50_us]}/${fig[mv.$method.p99_us]}"
    # shellcheck disable=SC2059
    printf "$fmt" "$label" "${fig[null.$method.rps]}" "${fig[mv.$method.rps]:--}" \
      "$(ratio "$method")" "${fig[null.$method.p50_us]}/${fig[null.$method.p99_us]}" "$mv_lat" \
      "${fig[null.$method.server_cpu_us_per_call]}" "${fig[mv.$method.server_cpu_us_per_call]:--}"
  done
  echo
  if ((have_modelvault)); then
    echo "models per ListModels response: modelvault ${fig[mv.ListModels.items_per_call]}," \
      "null ${fig[null.ListModels.items_per_call]}"
  fi
  echo "GetModel target: ratio >= 0.8 (measured $(ratio GetModel))"
  echo "ListModels target: ratio >= 0.8 (measured $(ratio ListModels))"
  echo "AcquireProviderKey target: ratio >= 0.6 (measured $(ratio AcquireProviderKey))"
  echo "VerifyAccessKey: ratio $(ratio VerifyAccessKey) (no target)"
  echo "RecordUsage: ratio $(ratio RecordUsage) on SQLite (no target; every call stores a record" \
    "through the group-commit writer, the null server answers a fixed record)"
  [ -n "$accounting" ] && echo "$accounting"
  [ -n "$limits" ] && echo "$limits"
  if ((pg_ran)); then
    echo
    echo "durable usage on PostgreSQL, a dedicated cluster ($pg_settings;" \
      "track_commit_timestamp=on for WatchUsage), the same database for both:"
    fmt2="%-34s | %9s | %9s | %5s | %15s | %16s | %14s\n"
    # shellcheck disable=SC2059
    printf "$fmt2" "row (per second)" modelvault limit ratio "mv p50/p99 us" "limit p50/p99 us" \
      "mv cpu us/item"
    # shellcheck disable=SC2059
    printf "$fmt2" "" "" "" "" "" "" "" | tr ' |' '-+'
    # shellcheck disable=SC2059
    printf "$fmt2" "IngestUsage records vs COPY rows" "${fig[pg.IngestUsage.rps]:--}" \
      "${fig[copy.COPY.rps]:--}" "$(ratio_of pg.IngestUsage.rps copy.COPY.rps)" \
      "$(pair pg.IngestUsage)" "$(pair copy.COPY)" \
      "${fig[pg.IngestUsage.server_cpu_us_per_call]:--}"
    # shellcheck disable=SC2059
    printf "$fmt2" "RecordUsage calls vs null server" "${fig[pg.RecordUsage.rps]:--}" \
      "${fig[null.RecordUsage.rps]:--}" "$(ratio_of pg.RecordUsage.rps null.RecordUsage.rps)" \
      "$(pair pg.RecordUsage)" "$(pair null.RecordUsage)" \
      "${fig[pg.RecordUsage.server_cpu_us_per_call]:--}"
    echo "IngestUsage: $BENCH_INGEST_STREAMS streams x $BENCH_INGEST_INFLIGHT batches of" \
      "$BENCH_INGEST_BATCH records in flight, ${BENCH_INGEST_WARMUP} s warm-up +" \
      "${BENCH_INGEST_SECONDS} s, counted when acknowledged (after commit); latency" \
      "per batch, send to acknowledgement; cpu per record. COPY: the same number of rows (every" \
      "column of usage_records, the same values) into usage_records, a fresh partition," \
      "$BENCH_INGEST_STREAMS connections, one transaction per $BENCH_INGEST_BATCH rows; latency" \
      "per COPY + commit. modelvault also writes usage_request_ids, rollups, latency histograms," \
      "key counters and the feed position in the same transactions."
    echo "IngestUsage target: >= 0.5 x COPY, durable on acknowledgement (measured" \
      "$(ratio_of pg.IngestUsage.rps copy.COPY.rps))"
  fi
  if [ -n "${fig[sqlite.WatchUsage.rps]:-}${fig[pg.WatchUsage.rps]:-}" ]; then
    echo
    echo "WatchUsage: $BENCH_WATCHERS watchers on $BENCH_WATCH_CHANNELS connections, RecordUsage at" \
      "$BENCH_WATCH_RATE records/s on another; every watcher receives every record"
    fmt3="%-10s | %9s | %11s | %10s | %18s | %18s | %18s | %7s | %12s\n"
    # shellcheck disable=SC2059
    printf "$fmt3" database written/s delivered/s expected/s "commit p50/p99/max" \
      "rec.time p50/99/max" "send p50/p99/max" missing "cpu us/deliv"
    # shellcheck disable=SC2059
    printf "$fmt3" "" "" "" "" "" "" "" "" "" | tr ' |' '-+'
    for db in sqlite pg; do
      [ -n "${fig[$db.WatchUsage.rps]:-}" ] || continue
      label=SQLite
      [ "$db" = pg ] && label=PostgreSQL
      expected=$(awk -v w="${fig[$db.WatchUsage.written_per_s]}" -v n="$BENCH_WATCHERS" \
        'BEGIN { printf "%.0f", w * n }')
      commit="-"
      if [ -n "${fig[$db.WatchUsage.commit_p99_us]:-}" ]; then
        commit="$(ms "$db.WatchUsage.commit_p50_us")/$(ms "$db.WatchUsage.commit_p99_us")"
        commit+="/$(ms "$db.WatchUsage.commit_max_us")"
      fi
      # shellcheck disable=SC2059
      printf "$fmt3" "$label" "${fig[$db.WatchUsage.written_per_s]}" "${fig[$db.WatchUsage.rps]}" \
        "$expected" "$commit" \
        "$(ms "$db.WatchUsage.p50_us")/$(ms "$db.WatchUsage.p99_us")/$(ms "$db.WatchUsage.max_us")" \
        "$(ms "$db.WatchUsage.send_p50_us")/$(ms "$db.WatchUsage.send_p99_us")/$(ms "$db.WatchUsage.send_max_us")" \
        "${fig[$db.WatchUsage.missing]}" "${fig[$db.WatchUsage.server_cpu_us_per_call]}"
    done
    echo "latency in ms, from three points to the receipt by a watcher (same host, same wall" \
      "clock): commit: PostgreSQL's commit timestamp of the record's transaction" \
      "(track_commit_timestamp, taken as the commit record is written, just before its" \
      "flush; SQLite keeps none); rec.time: the record's record_time, which the server stamps" \
      "when its writer starts the transaction that stores the record, so an upper bound on" \
      "commit-to-delivery that includes the whole transaction; send: when the RecordUsage call" \
      "was sent (carried in the record). cpu: the server's, per record delivered to a watcher" \
      "(the writes' cost included)."
    echo "WatchUsage target: p99 commit-to-delivery <= 50 ms (measured: PostgreSQL" \
      "$(ms pg.WatchUsage.commit_p99_us) ms from the commit timestamp," \
      "$(ms pg.WatchUsage.p99_us) ms from record_time; SQLite $(ms sqlite.WatchUsage.p99_us) ms" \
      "from record_time)"
  fi
  if ! ((have_modelvault)); then
    echo "modelvault NOT measured: $modelvault does not exist (null server only)"
  fi
  if ((any_errors)); then
    echo "WARNING: some runs had errors (see errors= below); their figures are not valid"
  fi
  echo
  echo "raw:"
  cat "$tmp/raw.txt"
} >"$results"
cat "$results"
log "figures written to $results"
exit "$any_errors"
