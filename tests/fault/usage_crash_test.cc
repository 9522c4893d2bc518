// Fault tests of the usage ledger: crashes during a multi-stream IngestUsage.
//
//   - `modelvault serve` killed with SIGKILL at random moments (at least three times) while
//     8 streams ingest 200,000 records, and restarted on the same database; the clients
//     resend every batch not acknowledged on a new stream. On SQLite and PostgreSQL (a fresh
//     database on MODELVAULT_TEST_POSTGRES_URL).
//   - PostgreSQL itself crashed (`pg_ctl stop -m immediate`: no shutdown checkpoint, recovery
//     from the WAL on restart) during the ingest and restarted, on a cluster of the test's
//     own started with fsync on (scripts/pg.sh start --durable).
//
// Afterwards every acknowledged record is stored exactly once (all were acknowledged in the
// end), and the hourly rollups count exactly the stored records. Counts are read with SQL on
// the database itself, and QueryUsage is asked too.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/civil_time.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/usage.grpc.pb.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/usage_client.h"

namespace modelvault {
namespace {

using ::modelvault::conformance::CreateTestDatabase;
using ::modelvault::conformance::EngineParam;
using ::modelvault::conformance::QueryInt;
using ::modelvault::conformance::SkipPostgres;
using ::modelvault::conformance::TestDatabase;
using ::modelvault::testing::CommandResult;
using ::modelvault::testing::IngestOptions;
using ::modelvault::testing::IngestResult;
using ::modelvault::testing::IngestUntilAcknowledged;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::MakeTempDir;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::RunShell;
using ::modelvault::testing::ServerProcess;
using ::modelvault::testing::SourceDir;
using ::modelvault::testing::UsageRecordOf;

const char* const kModels[] = {"providers/openai/models/gpt-5",
                               "providers/anthropic/models/claude-sonnet-4",
                               "providers/google/models/gemini-2.5-flash"};

std::string Quote(const std::string& s) { return absl::StrCat("'", s, "'"); }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The bin folder of the highest installed PostgreSQL major version (what pg.sh uses).
std::string PostgresBinDir() {
  std::string best;
  int best_version = -1;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/usr/lib/postgresql", error)) {
    int version = 0;
    const std::filesystem::path bin = entry.path() / "bin";
    if (absl::SimpleAtoi(entry.path().filename().string(), &version) && version > best_version &&
        std::filesystem::exists(bin / "pg_ctl")) {
      best_version = version;
      best = bin.string();
    }
  }
  return best;
}

// A durable PostgreSQL cluster of this test's own (scripts/pg.sh start --durable: fsync,
// synchronous_commit and full_page_writes on), which the test crashes and restarts. The
// destructor runs `scripts/pg.sh stop`, which stops it and removes its folder.
class DurableCluster final {
 public:
  static absl::StatusOr<std::unique_ptr<DurableCluster>> Start() {
    std::unique_ptr<DurableCluster> cluster(new DurableCluster());
    cluster->parent_ = MakeTempDir();
    cluster->dir_ = cluster->parent_ + "/pg";
    const CommandResult started = RunShell(absl::StrCat(
        "cd ", Quote(SourceDir()), " && scripts/pg.sh start --durable ", Quote(cluster->dir_)));
    if (started.exit_code != 0) {
      return absl::UnavailableError(
          absl::StrCat("scripts/pg.sh start failed (", started.exit_code, "):\n", started.output));
    }
    for (absl::string_view line : absl::StrSplit(ReadFile(cluster->dir_ + "/env"), '\n')) {
      if (absl::ConsumePrefix(&line, "export MODELVAULT_TEST_POSTGRES_URL=")) {
        cluster->url_ = std::string(absl::StripSuffix(absl::StripPrefix(line, "'"), "'"));
      }
    }
    cluster->home_ =
        std::string(absl::StripTrailingAsciiWhitespace(ReadFile(cluster->dir_ + "/home")));
    cluster->bindir_ = PostgresBinDir();
    // postmaster.opts: /usr/lib/postgresql/15/bin/postgres "-D" "..." "-p" "PORT" ...
    const std::string opts = std::string(
        absl::StripTrailingAsciiWhitespace(ReadFile(cluster->home_ + "/data/postmaster.opts")));
    if (const size_t space = opts.find(' '); space != std::string::npos) {
      cluster->options_ = opts.substr(space + 1);
    }
    if (cluster->url_.empty() || cluster->home_.empty() || cluster->bindir_.empty() ||
        cluster->options_.empty()) {
      return absl::InternalError(absl::StrCat("cannot read the cluster of ", cluster->dir_,
                                              ": url=", cluster->url_, " home=", cluster->home_,
                                              " postgres options=", cluster->options_));
    }
    return cluster;
  }

  DurableCluster(const DurableCluster&) = delete;
  DurableCluster& operator=(const DurableCluster&) = delete;
  DurableCluster(DurableCluster&&) = delete;
  DurableCluster& operator=(DurableCluster&&) = delete;
  ~DurableCluster() {
    const CommandResult stopped =
        RunShell(absl::StrCat("cd ", Quote(SourceDir()), " && scripts/pg.sh stop ", Quote(dir_)));
    if (stopped.exit_code != 0) {
      ADD_FAILURE() << "scripts/pg.sh stop " << dir_ << " failed:\n" << stopped.output;
    }
    std::error_code error;
    std::filesystem::remove(parent_, error);
  }

  const std::string& url() const { return url_; }
  std::string log() const { return ReadFile(home_ + "/log"); }

  // A crash: every PostgreSQL process quits at once, without a shutdown checkpoint; the
  // next start recovers from the WAL.
  absl::Status Crash() {
    return Run(
        absl::StrCat(PgCtl(), " -D ", Quote(home_ + "/data"), " -m immediate -w -t 60 stop"));
  }

  // Starts it again with exactly the options pg.sh used (postmaster.opts).
  absl::Status Restart() {
    return Run(absl::StrCat(PgCtl(), " -D ", Quote(home_ + "/data"), " -l ", Quote(home_ + "/log"),
                            " -w -t 60 start -o ", Quote(options_), " >/dev/null"));
  }

 private:
  DurableCluster() = default;

  std::string PgCtl() const {
    const std::string pg_ctl = Quote(bindir_ + "/pg_ctl");
    return geteuid() == 0 ? absl::StrCat("runuser -u postgres -- ", pg_ctl) : pg_ctl;
  }

  absl::Status Run(const std::string& command) const {
    const CommandResult result = RunShell(absl::StrCat("cd / && ", command));
    if (result.exit_code != 0) {
      return absl::InternalError(absl::StrCat(command, " failed (", result.exit_code, "):\n",
                                              result.output, "\nserver log:\n", log()));
    }
    return absl::OkStatus();
  }

  std::string parent_;
  std::string dir_;
  std::string home_;
  std::string bindir_;
  std::string options_;
  std::string url_;
};

// The channel the ingest clients use; replaced when the server restarts on a new port.
class ChannelHolder final {
 public:
  void Set(std::shared_ptr<grpc::Channel> channel) {
    std::lock_guard lock(mu_);
    channel_ = std::move(channel);
  }
  std::shared_ptr<grpc::Channel> Get() {
    std::lock_guard lock(mu_);
    return channel_;
  }

 private:
  std::mutex mu_;
  std::shared_ptr<grpc::Channel> channel_;
};

// `streams` clients of `batches` batches of `batch_size` records each; records are spread
// over three priced models, ten users and the last day's hours.
std::vector<std::vector<v1::IngestUsageRequest>> MakeStreams(int streams, int batches,
                                                             int batch_size) {
  const absl::Time now = absl::Now();
  std::vector<std::vector<v1::IngestUsageRequest>> out(streams);
  for (int s = 0; s < streams; ++s) {
    for (int b = 0; b < batches; ++b) {
      v1::IngestUsageRequest batch;
      batch.set_batch_id(b + 1);
      for (int k = 0; k < batch_size; ++k) {
        const int i = b * batch_size + k;
        *batch.add_records() = UsageRecordOf(
            absl::StrCat("crash-", s, "-", i), now - absl::Minutes(5 + (i * 7 + s) % 1400),
            kModels[(i + s) % 3], absl::StrCat("user-", i % 10), 100 + i % 5000, 10 + i % 300);
      }
      out[s].push_back(std::move(batch));
    }
  }
  return out;
}

struct CrashRun {
  std::vector<IngestResult> results;
  int crashes = 0;
  bool server_died = false;  // `alive` said no between crashes: the clients gave up
  absl::Duration elapsed;
};

// Whether process `pid` (a child) has ended: gone, or a zombie not yet reaped.
bool Exited(pid_t pid) {
  const std::string stat = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return true;
  const char state = stat[paren + 2];
  return state == 'Z' || state == 'X';
}

// Ingests `streams` (one client thread each, resending what was not acknowledged) and calls
// `crash` once the acknowledged records pass each of `fractions` of the total (after a
// random pause of up to 30 ms, so the crash meets batches at any stage). Between crashes,
// `alive` is polled: when it says the server died by itself, the clients give up.
CrashRun IngestWithCrashes(ChannelHolder& channel,
                           const std::vector<std::vector<v1::IngestUsageRequest>>& streams,
                           std::vector<double> fractions,
                           const std::function<absl::Status(int)>& crash,
                           const std::function<bool()>& alive) {
  std::int64_t total = 0;
  for (const auto& stream : streams) {
    for (const auto& batch : stream) total += batch.records_size();
  }
  CrashRun run;
  run.results.resize(streams.size());
  std::atomic<std::int64_t> acknowledged{0};
  std::atomic<int> running{static_cast<int>(streams.size())};
  IngestOptions options;
  options.window = 4;
  options.give_up_after = absl::Seconds(240);
  std::atomic<bool> died{false};
  options.give_up = [&] { return died.load(); };
  options.on_ack = [&](const v1::IngestUsageResponse& ack) {
    acknowledged.fetch_add(ack.accepted() + ack.duplicates());
  };
  const absl::Time start = absl::Now();
  std::vector<std::thread> clients;
  for (size_t s = 0; s < streams.size(); ++s) {
    clients.emplace_back([&, s] {
      run.results[s] = IngestUntilAcknowledged([&] { return channel.Get(); }, streams[s], options);
      running.fetch_sub(1);
    });
  }
  // Waits until `done` or the clients end; false when the server died meanwhile.
  auto wait_for = [&](const std::function<bool()>& done) {
    while (running.load() > 0 && !done()) {
      if (!alive()) {
        died.store(true);
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  };
  std::mt19937_64 rng(std::random_device{}());
  std::sort(fractions.begin(), fractions.end());
  for (double fraction : fractions) {
    const auto threshold = static_cast<std::int64_t>(fraction * static_cast<double>(total));
    if (!wait_for([&] { return acknowledged.load() >= threshold; })) break;
    if (running.load() == 0) break;
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 30'000));
    const absl::Status crashed = crash(run.crashes);
    if (!crashed.ok()) {
      ADD_FAILURE() << "crash " << run.crashes << ": " << crashed;
      break;
    }
    ++run.crashes;
    std::cout << "crash " << run.crashes << " at " << acknowledged.load() << "/" << total
              << " acknowledged, " << absl::FormatDuration(absl::Now() - start) << "\n";
  }
  if (!died.load()) wait_for([] { return false; });
  for (std::thread& t : clients) t.join();
  run.server_died = died.load();
  run.elapsed = absl::Now() - start;
  return run;
}

// Random points of the ingest for `n` crashes: one in each of n equal slices of [0.1, 0.9].
std::vector<double> RandomFractions(int n) {
  std::mt19937_64 rng(std::random_device{}());
  std::vector<double> out;
  out.reserve(n);
  const double slice = 0.8 / n;
  for (int i = 0; i < n; ++i) {
    out.push_back(0.1 + slice * i +
                  slice * 0.8 * std::uniform_real_distribution<double>(0, 1)(rng));
  }
  return out;
}

// Every batch acknowledged, every acknowledgement in order and adding up; and the database
// holds `total` records, once each, and rollups that count exactly them.
void ExpectEveryRecordOnce(const CrashRun& run,
                           const std::vector<std::vector<v1::IngestUsageRequest>>& streams,
                           const std::string& url, std::int64_t total,
                           const std::unique_ptr<ServerProcess>& server) {
  std::int64_t acknowledged = 0;
  std::int64_t accepted = 0;
  int resent = 0;
  int failed_streams = 0;
  for (size_t s = 0; s < run.results.size(); ++s) {
    SCOPED_TRACE(absl::StrCat("client ", s));
    const IngestResult& result = run.results[s];
    EXPECT_TRUE(result.AllAcknowledged()) << "last failure: " << result.last_failure;
    EXPECT_THAT(result.violations, ::testing::IsEmpty());
    for (size_t b = 0; b < result.acks.size(); ++b) {
      if (!result.acknowledged[b]) continue;
      const v1::IngestUsageResponse& ack = result.acks[b];
      EXPECT_EQ(ack.rejected_size(), 0) << ack.ShortDebugString();
      EXPECT_EQ(ack.accepted() + ack.duplicates(), streams[s][b].records_size());
      acknowledged += ack.accepted() + ack.duplicates();
      accepted += ack.accepted();
    }
    resent += result.batches_resent;
    failed_streams += result.streams_failed;
  }
  std::cout << "records=" << total << " acknowledged=" << acknowledged
            << " accepted_in_first_acks=" << accepted << " batches_resent=" << resent
            << " failed_streams=" << failed_streams << " crashes=" << run.crashes
            << " ingest_seconds=" << absl::ToDoubleSeconds(run.elapsed) << "\n";
  EXPECT_EQ(acknowledged, total);
  EXPECT_LE(accepted, total);
  EXPECT_GT(resent, 0) << "no batch was ever resent: the crashes met nothing in flight";

  struct Check {
    const char* what;
    std::string sql;
  };
  const std::vector<Check> checks = {
      {"stored records", "SELECT COUNT(*) FROM usage_records"},
      {"distinct request_ids", "SELECT COUNT(DISTINCT request_id) FROM usage_records"},
      {"idempotency keys", "SELECT COUNT(*) FROM usage_request_ids"},
      {"requests in the rollups",
       "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM usage_rollups"},
      {"latency histogram counts",
       absl::StartsWith(url, "postgresql://")
           ? "SELECT CAST(COALESCE(SUM(CAST(e.value AS BIGINT)), 0) AS BIGINT) FROM "
             "usage_rollups, json_each_text(CAST(latency_histogram AS json)) AS e"
           : "SELECT COALESCE(SUM(e.value), 0) FROM usage_rollups, "
             "json_each(latency_histogram) AS e"},
  };
  for (const Check& check : checks) {
    absl::StatusOr<std::int64_t> n = QueryInt(url, check.sql);
    ASSERT_TRUE(n.ok()) << n.status();
    EXPECT_EQ(*n, total) << check.what << ": " << check.sql;
  }
  absl::StatusOr<std::int64_t> records_input =
      QueryInt(url, "SELECT CAST(SUM(input_tokens) AS BIGINT) FROM usage_records");
  absl::StatusOr<std::int64_t> rollup_input =
      QueryInt(url, "SELECT CAST(SUM(input_tokens) AS BIGINT) FROM usage_rollups");
  ASSERT_TRUE(records_input.ok()) << records_input.status();
  ASSERT_TRUE(rollup_input.ok()) << rollup_input.status();
  std::int64_t want_input = 0;
  for (const auto& stream : streams) {
    for (const auto& batch : stream) {
      for (const v1::UsageRecord& r : batch.records()) want_input += r.tokens().input();
    }
  }
  EXPECT_EQ(*records_input, want_input);
  EXPECT_EQ(*rollup_input, want_input);

  // And the server answers the same totals.
  ASSERT_NE(server, nullptr);
  std::unique_ptr<v1::UsageService::Stub> stub = v1::UsageService::NewStub(server->Channel());
  v1::QueryUsageRequest query;
  const absl::Time hour =
      absl::FromCivil(absl::ToCivilHour(absl::Now(), absl::UTCTimeZone()), absl::UTCTimeZone());
  query.mutable_start_time()->set_seconds(absl::ToUnixSeconds(hour - absl::Hours(48)));
  query.mutable_end_time()->set_seconds(absl::ToUnixSeconds(hour + absl::Hours(1)));
  absl::StatusOr<v1::QueryUsageResponse> totals =
      Invoke(*stub, &v1::UsageService::Stub::QueryUsage, query);
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->totals().requests(), total);
  EXPECT_EQ(totals->totals().tokens().input(), want_input);
}

// --- 7. The server killed during ingest ---------------------------------------------------

class ServerCrashTest : public ::testing::TestWithParam<EngineParam> {
 protected:
  void SetUp() override {
    if (GetParam().name == "postgres" && SkipPostgres()) {
      GTEST_SKIP() << "PostgreSQL case skipped because MODELVAULT_TEST_SKIP_POSTGRES=1";
    }
    absl::StatusOr<std::unique_ptr<TestDatabase>> database = CreateTestDatabase(GetParam().name);
    ASSERT_TRUE(database.ok()) << database.status();
    database_ = *std::move(database);
    ASSERT_EQ(PrepareDatabase(url()), absl::OkStatus());
  }

  void TearDown() override {
    if (server_ != nullptr && server_->running()) {
      const std::string log = server_->Log();
      server_->Stop(SIGTERM, absl::Seconds(15));
      if (HasFailure()) std::cout << "--- modelvault log ---\n" << log << "--- end of log ---\n";
    }
  }

  const std::string& url() const { return database_->url(); }

  absl::Status StartServer() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(url(), {"--shutdown-timeout", "5"});
    if (!server.ok()) return server.status();
    server_ = *std::move(server);
    channel_.Set(server_->Channel());
    return absl::OkStatus();
  }

  // Declared first: the database outlives the server.
  std::unique_ptr<TestDatabase> database_;
  std::unique_ptr<ServerProcess> server_;
  ChannelHolder channel_;
};

TEST_P(ServerCrashTest, EveryAcknowledgedBatchSurvivesSigkillOnce) {
  ASSERT_TRUE(StartServer().ok());
  constexpr int kStreams = 8;
  constexpr int kBatches = 50;
  constexpr int kBatchSize = 500;
  const std::vector<std::vector<v1::IngestUsageRequest>> streams =
      MakeStreams(kStreams, kBatches, kBatchSize);
  std::vector<std::string> logs;
  const CrashRun run = IngestWithCrashes(
      channel_, streams, RandomFractions(4),
      [&](int) {
        logs.push_back(server_->Log());
        const int code = server_->Stop(SIGKILL);
        if (code != 128 + SIGKILL) {
          return absl::InternalError(absl::StrCat("the server ended with ", code, " on SIGKILL"));
        }
        return StartServer();
      },
      [&] { return !Exited(server_->pid()); });
  ASSERT_FALSE(run.server_died)
      << "modelvault exited by itself during the ingest (its log follows)";
  EXPECT_GE(run.crashes, 3) << "the ingest ended before the third kill";
  ExpectEveryRecordOnce(run, streams, url(), std::int64_t{kStreams} * kBatches * kBatchSize,
                        server_);
  if (HasFailure()) {
    for (size_t i = 0; i < logs.size(); ++i) {
      std::cout << "--- modelvault log before kill " << i + 1 << " ---\n" << logs[i];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Engines, ServerCrashTest, conformance::AllEngines(),
                         conformance::NameGen());

// --- 8. PostgreSQL crashed during ingest --------------------------------------------------

class DatabaseCrashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (SkipPostgres()) {
      GTEST_SKIP() << "PostgreSQL fault test skipped because MODELVAULT_TEST_SKIP_POSTGRES=1";
    }
    absl::StatusOr<std::unique_ptr<DurableCluster>> cluster = DurableCluster::Start();
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = *std::move(cluster);
    ASSERT_EQ(PrepareDatabase(cluster_->url()), absl::OkStatus());
  }

  void TearDown() override {
    if (server_ != nullptr && server_->running()) {
      const std::string log = server_->Log();
      server_->Stop(SIGTERM, absl::Seconds(15));
      if (HasFailure()) {
        std::cout << "--- modelvault log ---\n" << log << "--- end of log ---\n";
        if (cluster_ != nullptr) std::cout << "--- postgres log ---\n" << cluster_->log();
      }
    }
  }

  // Declared first: destroyed last, after the server is gone.
  std::unique_ptr<DurableCluster> cluster_;
  std::unique_ptr<ServerProcess> server_;
  ChannelHolder channel_;
};

TEST_F(DatabaseCrashTest, EveryAcknowledgedBatchSurvivesAPostgresCrashOnce) {
  // The cluster must really be durable, or a crash proves nothing.
  for (const char* setting : {"fsync", "synchronous_commit", "full_page_writes"}) {
    absl::StatusOr<std::int64_t> on = QueryInt(
        cluster_->url(),
        absl::StrCat("SELECT CASE WHEN current_setting('", setting, "') = 'on' THEN 1 ELSE 0 END"));
    ASSERT_TRUE(on.ok()) << on.status();
    ASSERT_EQ(*on, 1) << setting << " is not on in the test's cluster";
  }
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start(cluster_->url(), {"--shutdown-timeout", "5"});
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  channel_.Set(server_->Channel());

  constexpr int kStreams = 8;
  constexpr int kBatches = 25;
  constexpr int kBatchSize = 500;
  const std::vector<std::vector<v1::IngestUsageRequest>> streams =
      MakeStreams(kStreams, kBatches, kBatchSize);
  std::mt19937_64 rng(std::random_device{}());
  const CrashRun run = IngestWithCrashes(
      channel_, streams, RandomFractions(2),
      [&](int) {
        if (absl::Status s = cluster_->Crash(); !s.ok()) return s;
        // Down for a moment: the clients' streams fail and retry meanwhile.
        std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 600));
        return cluster_->Restart();
      },
      [&] { return !Exited(server_->pid()); });
  ASSERT_FALSE(run.server_died) << "modelvault exited by itself during the ingest; it must "
                                   "ride out a database crash (its log follows)";
  EXPECT_EQ(run.crashes, 2) << "the ingest ended before the second crash";
  ExpectEveryRecordOnce(run, streams, cluster_->url(),
                        std::int64_t{kStreams} * kBatches * kBatchSize, server_);
  EXPECT_TRUE(absl::StrContains(cluster_->log(), "database system was not properly shut down"))
      << "PostgreSQL did not recover from a crash; was it stopped cleanly?";
}

}  // namespace
}  // namespace modelvault
