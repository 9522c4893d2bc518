#!/usr/bin/env bash
# `make bench`: catalog read throughput of modelvault against its limit, a null gRPC
# server answering the same calls with a fixed response (DESIGN.md §8). Assumes the
# release preset is built (build/release). Runs, one at a time, bench/mv_loadgen against
# bench/mv_null_server and against `modelvault serve` on a freshly migrated and seeded
# SQLite database, for GetModel and ListModels, and reports throughput, latency, their
# ratio and each server's own CPU time per call (read from /proc/<pid>/stat around each
# run, divided by every call the server answered in that run, warm-up included). Never
# asserts a time: it prints figures and ratios, also written to build/bench/results.txt.
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

log() { echo "bench: $*" >&2; }
die() {
  echo "bench: error: $*" >&2
  exit 1
}

for tool in "$loadgen" "$null_server"; do
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
  "$modelvault" serve --listen "$mv_target" --database "$db" >"$tmp/modelvault.log" 2>&1 &
  mv_pid=$!
  server_pids+=("$mv_pid")
  wait_ready modelvault "$mv_target" "$mv_pid" "$tmp/modelvault.log"
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
keys="rps p50_us p99_us items_per_call server_cpu_us_per_call"
for ((round = 1; round <= BENCH_ROUNDS; round++)); do
  ((BENCH_ROUNDS > 1)) && log "round $round of $BENCH_ROUNDS"
  for method in GetModel ListModels; do
    args=()
    [ "$method" = ListModels ] && args=(--page-size "$list_page_size")
    measure null "$null_target" "$null_pid" "$method" "${args[@]}"
    for k in $keys; do fig[null.$method.$k]+="$(field "$line" "$k") "; done
    if ((have_modelvault)); then
      measure modelvault "$mv_target" "$mv_pid" "$method" "${args[@]}"
      for k in $keys; do fig[mv.$method.$k]+="$(field "$line" "$k") "; done
    fi
  done
done
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
  echo "modelvault catalog read benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
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
  fmt="%-16s | %9s | %9s | %5s | %15s | %15s | %16s | %14s\n"
  # shellcheck disable=SC2059
  printf "$fmt" method "null rps" "mv rps" ratio "null p50/p99 us" "mv p50/p99 us" \
    "null cpu us/call" "mv cpu us/call"
  # shellcheck disable=SC2059
  printf "$fmt" "" "" "" "" "" "" "" "" | tr ' |' '-+'
  for method in GetModel ListModels; do
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
