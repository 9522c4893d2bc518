#!/usr/bin/env bash
# `make bench`: throughput of modelvault's hot paths against their limit, a null gRPC
# server answering the same calls with a fixed response (DESIGN.md §8). Assumes the
# release preset is built (build/release). Runs, one at a time, bench/mv_loadgen against
# bench/mv_null_server and against `modelvault serve` on a freshly migrated and seeded
# SQLite database, for GetModel, ListModels, AcquireProviderKey (5 keys, 64 callers) and
# VerifyAccessKey, and reports throughput, latency, their ratio and each server's own CPU
# time per call (read from /proc/<pid>/stat around each run, divided by every call the
# server answered in that run, warm-up included). Every call to modelvault carries the
# bootstrap admin key. After the rounds it checks key accounting: the acquisitions
# modelvault counted equal those it acknowledged, and with daily limits set, exactly the
# allowed number is granted. Never asserts a time: it prints figures and ratios, also
# written to build/bench/results.txt.
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
#   BENCH_MODELVAULT  the server binary (default build/release/modelvault)
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

build=build/release
loadgen=$build/bench/mv_loadgen
null_server=$build/bench/mv_null_server
modelvault="${BENCH_MODELVAULT:-$build/modelvault}"
out_dir=build/bench
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
    "cmake --build build/release --target mv_null_server mv_loadgen -j2 (make bench does)"
done
have_modelvault=0
[ -x "$modelvault" ] && have_modelvault=1

metadata_args=()
[ -n "$BENCH_METADATA" ] && metadata_args=(--metadata "$BENCH_METADATA")
clk_tck=$(getconf CLK_TCK)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/modelvault-bench.XXXXXX")
server_pids=()
loadgen_pid=""

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

# measure SERVER TARGET PID METHOD [LOADGEN ARGS...]: one load generator run; sets
# the globals line (its output line plus server_cpu_us_per_call) and run_errors.
line=""
run_errors=0
any_errors=0
measure() {
  local server=$1 target=$2 pid=$3 method=$4
  shift 4
  local before after out rc=0
  log "$method against $server ($target): ${BENCH_WARMUP} s warm-up + ${BENCH_SECONDS} s"
  before=$(cpu_ticks "$pid")
  # In the background, so that a signal to this script acts at once (bash runs traps
  # only between foreground commands, but interrupts `wait`).
  "$loadgen" --target "$target" --method "$method" --channels "$BENCH_CHANNELS" \
    --inflight "$BENCH_INFLIGHT" --seconds "$BENCH_SECONDS" --warmup "$BENCH_WARMUP" \
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
methods="GetModel ListModels AcquireProviderKey VerifyAccessKey"
keys="rps p50_us p99_us items_per_call server_cpu_us_per_call"
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

# The median of space-separated numbers (the lower one of the middle two).
median() {
  tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g |
    awk '{ v[NR] = $1 } END { if (NR > 0) print v[int((NR + 1) / 2)] }'
}
for k in "${!fig[@]}"; do fig[$k]=$(median "${fig[$k]}"); done

ratio() {
  awk -v a="${fig[mv.$1.rps]:-}" -v b="${fig[null.$1.rps]:-}" \
    'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "-" }'
}

{
  echo "modelvault hot-path benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
  echo "$(nproc) cores; load generator: $BENCH_CHANNELS channels x $BENCH_INFLIGHT in flight," \
    "${BENCH_WARMUP} s warm-up + ${BENCH_SECONDS} s per run; modelvault on SQLite"
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
  [ -n "$accounting" ] && echo "$accounting"
  [ -n "$limits" ] && echo "$limits"
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
