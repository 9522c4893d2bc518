// mv_copy_bench: the raw limit of durable usage ingest on PostgreSQL. COPYs
// usage records (every column of usage_records, the rows bench/usage_rows.h
// makes for IngestUsage, with a cost, record time and seq filled in as the
// server would) into usage_records through libpq, over `connections`
// connections at once, each COPY of `batch` rows its own transaction (as the
// server commits each group of batches), and reports rows per second.
//
//   mv_copy_bench --database 'postgresql://host=127.0.0.1 port=5432 dbname=postgres user=postgres'
//                 --rows 100000 [--connections 8] [--batch 500] [--warmup-batches 2]
//                 [--days-ahead 2] [--run-id ID] [--access-key accessKeys/ID]
//
// The rows go to the partition of the UTC day `days-ahead` days from today
// (2 by default: the server creates partitions up to three days ahead; this
// tool creates it the same way, with the same DDL, if it is missing), which
// no server writes to, so the COPY fills a fresh partition of the same table
// with the same indexes. Their seq starts
// at 10^12 (the feed's head never gets there, so no watcher reads them).
// Each connection first COPYs `warmup-batches` batches that are not timed;
// then all connections take batches of the `rows` counted rows until none
// is left.
//
// Prints one line to stdout:
//
//   method=COPY rps=120000 p50_us=3000 p99_us=9000 errors=0 rows=100000 seconds=0.83
//     connections=8 batch=500 fsync=on synchronous_commit=on
//
// rps is the counted rows over the time from the first counted COPY to the
// last commit; p50/p99 the per-batch COPY-and-commit latency. Exits 0 when
// every COPY committed, 1 otherwise, 2 on bad flags.

#include <libpq-fe.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "flags.h"
#include "usage_rows.h"

namespace modelvault::bench {
namespace {

using Clock = std::chrono::steady_clock;

// GCC's 128-bit integer; __extension__ keeps -Wpedantic quiet about it.
__extension__ using Int128 = __int128;

constexpr int64_t kDayMicros = 86'400'000'000;
constexpr int64_t kFirstSeq = 1'000'000'000'000;
// The writer index of usage_rows.h for COPY rows: above any loadgen stream.
constexpr int kCopyWriterBase = 500;

constexpr char kCopySql[] =
    "COPY usage_records (seq, record_time, call_time, request_id, provider, model, "
    "provider_key, access_key, user_id, conversation, message, input_tokens, output_tokens, "
    "cache_read_tokens, cache_write_tokens, reasoning_tokens, latency_us, ttft_us, status, "
    "error_class, cost_nanos, priced, price_effective_time, reported_cost_nanos, reservation) "
    "FROM STDIN";

struct PgConnDeleter {
  void operator()(PGconn* c) const { PQfinish(c); }
};
using Conn = std::unique_ptr<PGconn, PgConnDeleter>;
struct PgResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using PgResult = std::unique_ptr<PGresult, PgResultDeleter>;

struct Options {
  std::string conninfo;
  int64_t rows = 0;
  int connections = 8;
  int batch = 500;
  int warmup_batches = 2;
  int days_ahead = 2;
  std::string run_id;
  std::string access_key = "accessKeys/0123456789abcdef";
};

// libpq key=value pairs, with or without modelvault's `postgresql://` prefix.
std::string ConnInfo(const std::string& database) {
  constexpr absl::string_view kPrefix = "postgresql://";
  if (absl::StartsWith(database, kPrefix)) return database.substr(kPrefix.size());
  return database;
}

Conn Connect(const std::string& conninfo, std::string* error) {
  Conn conn(PQconnectdb(conninfo.c_str()));
  if (PQstatus(conn.get()) != CONNECTION_OK) {
    *error = PQerrorMessage(conn.get());
    return nullptr;
  }
  return conn;
}

// One SQL statement; its single value (or "" for none), or the error.
bool Exec(PGconn* conn, const std::string& sql, std::string* value, std::string* error) {
  const PgResult result(PQexec(conn, sql.c_str()));
  const ExecStatusType status = PQresultStatus(result.get());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    *error = PQresultErrorMessage(result.get());
    return false;
  }
  if (value != nullptr) {
    *value = status == PGRES_TUPLES_OK && PQntuples(result.get()) > 0
                 ? PQgetvalue(result.get(), 0, 0)
                 : "";
  }
  return true;
}

// The text-format COPY lines of batch `b` (rows [b*batch, (b+1)*batch)).
std::string BatchData(const Options& options, int64_t first_row, int count, int64_t day_start) {
  std::string data;
  data.reserve(static_cast<size_t>(count) * 400);
  for (int i = 0; i < count; ++i) {
    const int64_t n = first_row + i;
    const UsageRow row = MakeUsageRow(options.run_id, kCopyWriterBase, n);
    const int64_t now = UnixMicrosNow();
    // Cost as the server computes it: tokens times the price per million,
    // rounded half up once (cache reads at the input price here).
    const auto cost =
        static_cast<int64_t>((static_cast<Int128>(row.input + row.cache_read) * row.input_price +
                              static_cast<Int128>(row.output) * row.output_price + 500000) /
                             1000000);
    absl::StrAppend(&data, kFirstSeq + n, "\t", day_start + (now % kDayMicros), "\t", now, "\t",
                    row.request_id, "\t", row.provider, "\t", row.model, "\t", row.provider_key,
                    "\t", options.access_key, "\t", row.user, "\t", row.conversation, "\t");
    absl::StrAppend(&data, row.message, "\t", row.input, "\t", row.output, "\t", row.cache_read,
                    "\t", row.cache_write, "\t", row.reasoning, "\t", row.latency_us, "\t",
                    row.ttft_us, "\tUSAGE_STATUS_SUCCEEDED\t\t", cost, "\t1\t1727827200000000\t",
                    "\\N\t\n");
  }
  return data;
}

// One COPY of `data` in its own transaction (autocommit); false with the
// error when it did not commit.
bool CopyBatch(PGconn* conn, const std::string& data, std::string* error) {
  {
    const PgResult start(PQexec(conn, kCopySql));
    if (PQresultStatus(start.get()) != PGRES_COPY_IN) {
      *error = PQresultErrorMessage(start.get());
      return false;
    }
  }
  if (PQputCopyData(conn, data.data(), static_cast<int>(data.size())) != 1 ||
      PQputCopyEnd(conn, nullptr) != 1) {
    *error = PQerrorMessage(conn);
    return false;
  }
  bool ok = true;
  while (PGresult* raw = PQgetResult(conn)) {
    const PgResult result(raw);
    if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
      *error = PQresultErrorMessage(result.get());
      ok = false;
    }
  }
  return ok;
}

uint32_t Percentile(const std::vector<uint32_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

int Run(const Options& options) {
  std::string error;
  const Conn setup = Connect(options.conninfo, &error);
  if (setup == nullptr) {
    std::fprintf(stderr, "mv_copy_bench: cannot connect: %s", error.c_str());
    return 1;
  }
  std::string fsync;
  std::string synchronous_commit;
  if (!Exec(setup.get(), "SHOW fsync", &fsync, &error) ||
      !Exec(setup.get(), "SHOW synchronous_commit", &synchronous_commit, &error)) {
    std::fprintf(stderr, "mv_copy_bench: %s", error.c_str());
    return 1;
  }
  // The partition of the day `days_ahead` days from today (UTC), created as
  // the server does.
  const int64_t day = UnixMicrosNow() / kDayMicros + options.days_ahead;
  const int64_t day_start = day * kDayMicros;
  const std::time_t day_seconds = day_start / 1000000;
  std::tm tm{};
  gmtime_r(&day_seconds, &tm);
  char table[64];
  std::strftime(table, sizeof table, "usage_records_%Y%m%d", &tm);
  std::string existing;
  if (!Exec(setup.get(),
            absl::StrCat("CREATE TABLE IF NOT EXISTS ", table,
                         " PARTITION OF usage_records FOR VALUES FROM (", day_start, ") TO (",
                         day_start + kDayMicros, ")"),
            nullptr, &error) ||
      !Exec(setup.get(), absl::StrCat("SELECT count(*) FROM ", table), &existing, &error)) {
    std::fprintf(stderr, "mv_copy_bench: %s", error.c_str());
    return 1;
  }

  std::vector<Conn> conns;
  for (int c = 0; c < options.connections; ++c) {
    conns.push_back(Connect(options.conninfo, &error));
    if (conns.back() == nullptr) {
      std::fprintf(stderr, "mv_copy_bench: cannot connect: %s", error.c_str());
      return 1;
    }
  }

  const int64_t batches = (options.rows + options.batch - 1) / options.batch;
  std::atomic<int64_t> next_batch{0};
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::mutex mu;
  std::vector<uint32_t> latencies_us;
  int64_t errors = 0;
  std::string first_error;
  Clock::time_point start;
  Clock::time_point end;
  std::vector<std::thread> threads;
  threads.reserve(options.connections);
  for (int c = 0; c < options.connections; ++c) {
    threads.emplace_back([&, c] {
      PGconn* conn = conns[c].get();
      std::string why;
      int64_t local_errors = 0;
      std::vector<uint32_t> local_latencies;
      // Warm-up rows are numbered after the counted ones.
      for (int w = 0; w < options.warmup_batches; ++w) {
        const int64_t first =
            batches * options.batch +
            (static_cast<int64_t>(c) * options.warmup_batches + w) * options.batch;
        if (!CopyBatch(conn, BatchData(options, first, options.batch, day_start), &why)) {
          ++local_errors;
        }
      }
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      for (int64_t b = next_batch.fetch_add(1); b < batches; b = next_batch.fetch_add(1)) {
        const int64_t first = b * options.batch;
        const int count = static_cast<int>(std::min<int64_t>(options.batch, options.rows - first));
        const Clock::time_point t0 = Clock::now();
        if (!CopyBatch(conn, BatchData(options, first, count, day_start), &why)) ++local_errors;
        local_latencies.push_back(static_cast<uint32_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count()));
      }
      std::lock_guard<std::mutex> lock(mu);
      end = std::max(end, Clock::now());
      errors += local_errors;
      if (local_errors > 0 && first_error.empty()) first_error = why;
      latencies_us.insert(latencies_us.end(), local_latencies.begin(), local_latencies.end());
    });
  }
  while (ready.load() < options.connections) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  start = Clock::now();
  go.store(true);
  for (std::thread& t : threads) t.join();

  const double seconds = std::chrono::duration<double>(end - start).count();
  std::sort(latencies_us.begin(), latencies_us.end());
  const double rps = seconds > 0 ? static_cast<double>(options.rows) / seconds : 0;
  std::printf(
      "method=COPY rps=%.0f p50_us=%u p99_us=%u errors=%lld rows=%lld seconds=%.3f "
      "connections=%d batch=%d fsync=%s synchronous_commit=%s partition=%s\n",
      rps, Percentile(latencies_us, 0.5), Percentile(latencies_us, 0.99),
      static_cast<long long>(errors), static_cast<long long>(options.rows), seconds,
      options.connections, options.batch, fsync.c_str(), synchronous_commit.c_str(), table);
  std::fflush(stdout);
  std::fprintf(stderr,
               "COPY into usage_records (%s, %s rows before): %lld rows in %lld transactions of "
               "%d over %d connections in %.3f s: %.0f rows/s; per COPY+commit us p50 %u p99 %u "
               "max %u; fsync=%s synchronous_commit=%s; %lld errors%s%s\n",
               table, existing.c_str(), static_cast<long long>(options.rows),
               static_cast<long long>(batches), options.batch, options.connections, seconds, rps,
               Percentile(latencies_us, 0.5), Percentile(latencies_us, 0.99),
               Percentile(latencies_us, 1.0), fsync.c_str(), synchronous_commit.c_str(),
               static_cast<long long>(errors), first_error.empty() ? "" : ": ",
               first_error.c_str());
  return errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace modelvault::bench

int main(int argc, char** argv) {
  modelvault::bench::Flags flags(
      "mv_copy_bench",
      "--database URL --rows N [--connections N] [--batch N] [--warmup-batches N] "
      "[--days-ahead N] [--run-id ID] [--access-key NAME]",
      {{"database", "", "postgresql://key=value... (modelvault's form) or libpq key=value pairs"},
       {"rows", "0", "rows to COPY and time"},
       {"connections", "8", "connections COPYing at once"},
       {"batch", "500", "rows per COPY, each its own transaction"},
       {"warmup_batches", "2", "untimed COPYs per connection before the timed ones"},
       {"days_ahead", "2", "the rows' record_time: this many UTC days from today (1 to 3000)"},
       {"run_id", "", "prefix of the request ids (default: random)"},
       {"access_key", "accessKeys/0123456789abcdef", "the access_key column of every row"}});
  modelvault::bench::Options options;
  int64_t connections = 0;
  int64_t batch = 0;
  int64_t warmup = 0;
  int64_t days_ahead = 0;
  if (!flags.Parse(argc, argv) || !flags.GetInt("rows", 1, 1'000'000'000, &options.rows) ||
      !flags.GetInt("connections", 1, 256, &connections) ||
      !flags.GetInt("batch", 1, 100000, &batch) ||
      !flags.GetInt("warmup_batches", 0, 1000, &warmup) ||
      !flags.GetInt("days_ahead", 1, 3000, &days_ahead)) {
    return 2;
  }
  options.conninfo = modelvault::bench::ConnInfo(flags.Get("database"));
  if (options.conninfo.empty()) {
    std::fprintf(stderr, "mv_copy_bench: --database is required\n");
    return 2;
  }
  options.connections = static_cast<int>(connections);
  options.batch = static_cast<int>(batch);
  options.warmup_batches = static_cast<int>(warmup);
  options.days_ahead = static_cast<int>(days_ahead);
  options.run_id = flags.Get("run_id");
  if (options.run_id.empty()) options.run_id = modelvault::bench::RandomRunId();
  options.access_key = flags.Get("access_key");
  return modelvault::bench::Run(options);
}
