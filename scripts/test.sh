#!/usr/bin/env bash
# The full test run (`make test`, CI): dependencies, release build, buf lint and format
# check, the test suite against SQLite and a throwaway PostgreSQL, then the unit and
# conformance tests again under AddressSanitizer + UndefinedBehaviorSanitizer and under
# ThreadSanitizer.
#
# Stops at the first failing phase, always stops PostgreSQL, prints the time of each
# phase, and ends with one line "N passed, M failed" summed over the ctest runs.
#
# MODELVAULT_SKIP_SANITIZERS=1 skips the sanitizer build and run (local use; CI never
# sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

pg_dir="$repo/build/pg"
log_dir="$repo/build/test-logs"
mkdir -p "$log_dir"

phase_names=()
phase_secs=()
phase_results=()
ctest_passed=0
ctest_failed=0
ctest_ran=0
pg_started=0

print_summary() {
  local i
  [ ${#phase_names[@]} -gt 0 ] || return 0
  echo
  echo "== test.sh: phases (seconds) =="
  for i in "${!phase_names[@]}"; do
    printf '  %-28s %6s  %s\n' "${phase_names[$i]}" "${phase_secs[$i]}" "${phase_results[$i]}"
  done
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ "$pg_started" = 1 ]; then
    bash scripts/pg.sh stop "$pg_dir" || echo "test.sh: warning: could not stop PostgreSQL in $pg_dir" >&2
  fi
  print_summary
  if [ "$rc" -ne 0 ]; then
    echo "test.sh: FAILED (exit $rc)"
  else
    echo "test.sh: all phases passed"
  fi
  # The last line, for CI to count tests: totals over every ctest run.
  if [ "$ctest_ran" -gt 0 ]; then
    echo "$ctest_passed passed, $ctest_failed failed"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# phase NAME COMMAND... : runs one phase, timed; the script stops if it fails.
phase() {
  local name="$1" start rc=0
  shift
  echo
  echo "== test.sh: $name =="
  start=$SECONDS
  "$@" || rc=$?
  phase_names+=("$name")
  phase_secs+=("$((SECONDS - start))")
  if [ "$rc" -eq 0 ]; then
    phase_results+=("ok")
  else
    phase_results+=("FAILED (exit $rc)")
    echo "test.sh: phase '$name' failed with exit $rc" >&2
    exit "$rc"
  fi
}

# Adds the counts of ctest's "X% tests passed, Y tests failed out of Z" lines in $1.
count_ctest() {
  local line failed total
  while IFS= read -r line; do
    if [[ "$line" =~ tests\ passed,\ ([0-9]+)\ tests?\ failed\ out\ of\ ([0-9]+) ]]; then
      failed="${BASH_REMATCH[1]}"
      total="${BASH_REMATCH[2]}"
      ctest_failed=$((ctest_failed + failed))
      ctest_passed=$((ctest_passed + total - failed))
      ctest_ran=$((ctest_ran + 1))
    fi
  done <"$1"
}

# run_ctest LOGNAME ARGS... : ctest with its output shown and kept, then counted.
run_ctest() {
  local log="$log_dir/$1.log" rc=0
  shift
  ctest "$@" 2>&1 | tee "$log" || rc=$?
  count_ctest "$log"
  return "$rc"
}

start_pg() {
  pg_started=1 # set first: an interrupted start is cleaned up too (stop is idempotent)
  bash scripts/pg.sh start "$pg_dir" || return $?
  # shellcheck source=/dev/null
  source "$pg_dir/env"
  export MODELVAULT_TEST_POSTGRES_URL MODELVAULT_TEST_POSTGRES_PORT
}

tsan_tests() {
  TSAN_OPTIONS="halt_on_error=1" \
    run_ctest tsan --preset tsan -L 'unit|conformance' --output-on-failure --timeout 600
}

sanitizer_tests() {
  ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:detect_leaks=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    run_ctest asan-ubsan --preset asan-ubsan -L 'unit|conformance' --output-on-failure --timeout 600
}

phase "install deps" bash scripts/install-deps.sh
phase "configure release" cmake --preset release
phase "build release" cmake --build --preset release -j2
# After configure: buf.yaml reads the googleapis protos it unpacks into build/googleapis.
phase "buf lint" node_modules/.bin/buf lint
phase "buf format" node_modules/.bin/buf format proto --diff --exit-code
phase "start postgresql" start_pg
phase "ctest release" run_ctest release --preset release --output-on-failure --timeout 600

if [ "${MODELVAULT_SKIP_SANITIZERS:-0}" = 1 ]; then
  echo
  echo "== test.sh: sanitizer pass skipped (MODELVAULT_SKIP_SANITIZERS=1) =="
else
  phase "configure asan-ubsan" cmake --preset asan-ubsan
  phase "build asan-ubsan" cmake --build --preset asan-ubsan -j2
  phase "ctest asan-ubsan" sanitizer_tests
  phase "configure tsan" cmake --preset tsan
  phase "build tsan" cmake --build --preset tsan -j2
  phase "ctest tsan" tsan_tests
fi
