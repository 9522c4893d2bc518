// Fault tests: the database goes away under a running `modelvault serve` and comes back.
//
// Every test starts its own throwaway PostgreSQL cluster (scripts/pg.sh) so that it may stop
// and restart the database server without disturbing other tests; it needs the PostgreSQL
// server binaries, not MODELVAULT_TEST_POSTGRES_URL. The cluster is always stopped and
// removed at the end, also when the test fails. MODELVAULT_TEST_SKIP_POSTGRES=1 skips.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/client_unary_call.h"
#include "grpcpp/impl/rpc_method.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "server/grpc_status.h"
#include "tests/e2e/server_process.h"

namespace modelvault {
namespace {

using ::modelvault::testing::CommandResult;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::MakeTempDir;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::RunShell;
using ::modelvault::testing::ServerProcess;
using ::modelvault::testing::SourceDir;

// A seeded model and the number of models the built-in seed catalog holds.
constexpr char kSeededModel[] = "providers/openai/models/gpt-5";

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

// A PostgreSQL cluster of this test's own, made by scripts/pg.sh. StopServer/StartServer
// take the database server down and bring it back on the same port with the same data;
// the destructor runs `scripts/pg.sh stop`, which stops it and removes its folder.
class PgCluster final {
 public:
  static absl::StatusOr<std::unique_ptr<PgCluster>> Start() {
    std::unique_ptr<PgCluster> cluster(new PgCluster());
    cluster->parent_ = MakeTempDir();
    cluster->dir_ = cluster->parent_ + "/pg";
    const CommandResult started = RunShell(
        absl::StrCat("cd ", Quote(SourceDir()), " && scripts/pg.sh start ", Quote(cluster->dir_)));
    if (started.exit_code != 0) {
      return absl::UnavailableError(
          absl::StrCat("scripts/pg.sh start failed (", started.exit_code, "):\n", started.output));
    }
    // env: export MODELVAULT_TEST_POSTGRES_URL='...' and MODELVAULT_TEST_POSTGRES_PORT=N
    for (absl::string_view line : absl::StrSplit(ReadFile(cluster->dir_ + "/env"), '\n')) {
      if (absl::ConsumePrefix(&line, "export MODELVAULT_TEST_POSTGRES_URL=")) {
        cluster->url_ = std::string(absl::StripSuffix(absl::StripPrefix(line, "'"), "'"));
      } else if (absl::ConsumePrefix(&line, "export MODELVAULT_TEST_POSTGRES_PORT=")) {
        if (!absl::SimpleAtoi(line, &cluster->port_)) cluster->port_ = 0;
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
    if (cluster->url_.empty() || cluster->port_ <= 0 || cluster->home_.empty() ||
        cluster->bindir_.empty() ||
        !absl::StrContains(cluster->options_, absl::StrCat("\"", cluster->port_, "\""))) {
      return absl::InternalError(
          absl::StrCat("cannot read the cluster of ", cluster->dir_, ": url=", cluster->url_,
                       " port=", cluster->port_, " home=", cluster->home_,
                       " bindir=", cluster->bindir_, " postgres options=", cluster->options_));
    }
    return cluster;
  }

  ~PgCluster() {
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

  // pg_ctl stop -m fast: ends every connection, like a database failover or crash.
  absl::Status StopServer() {
    return Run(absl::StrCat(PgCtl(), " -D ", Quote(home_ + "/data"), " -m fast -w -t 60 stop"));
  }

  // Starts the stopped server again with exactly the options pg.sh started it with (same
  // port, socket folder and settings), as recorded in postmaster.opts.
  absl::Status StartServer() {
    return Run(absl::StrCat(PgCtl(), " -D ", Quote(home_ + "/data"), " -l ", Quote(home_ + "/log"),
                            " -w -t 60 start -o ", Quote(options_), " >/dev/null"));
  }

 private:
  PgCluster() = default;

  // initdb, postgres and pg_ctl refuse to run as root: as root they run as `postgres`,
  // from a folder that user can enter.
  std::string PgCtl() const {
    const std::string pg_ctl = Quote(bindir_ + "/pg_ctl");
    return geteuid() == 0 ? absl::StrCat("runuser -u postgres -- ", pg_ctl) : pg_ctl;
  }

  absl::Status Run(const std::string& command) {
    const CommandResult result = RunShell(absl::StrCat("cd / && ", command));
    if (result.exit_code != 0) {
      return absl::InternalError(absl::StrCat(command, " failed (", result.exit_code, "):\n",
                                              result.output, "\nserver log:\n", log()));
    }
    return absl::OkStatus();
  }

  std::string parent_;  // a temporary folder holding dir_
  std::string dir_;     // pg.sh's DIR
  std::string home_;    // where the cluster lives (DIR or a /tmp folder)
  std::string bindir_;
  std::string options_;  // the postgres arguments pg.sh used, shell-quoted
  std::string url_;
  int port_ = 0;
};

// grpc.health.v1.Health/Check. The project compiles the health messages (for reflection)
// but not a stub, so the call goes through gRPC's generic blocking unary call. Returns the
// status name ("SERVING", "NOT_SERVING", ...) or "rpc error: ..." when the call failed.
std::string CheckHealth(const std::shared_ptr<grpc::Channel>& channel) {
  static const grpc::internal::RpcMethod kCheck("/grpc.health.v1.Health/Check",
                                                grpc::internal::RpcMethod::NORMAL_RPC);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest request;  // service "": the whole server
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status =
      grpc::internal::BlockingUnaryCall(channel.get(), kCheck, &context, request, &response);
  if (!status.ok()) {
    return absl::StrCat("rpc error: ", status.error_code(), " ", status.error_message());
  }
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

// Polls the health service until it reports `want`; returns how long that took, or an
// error with the last answer after `timeout` (a failure guard, not a requirement).
absl::StatusOr<absl::Duration> WaitForHealth(const std::shared_ptr<grpc::Channel>& channel,
                                             const std::string& want, absl::Duration timeout) {
  const absl::Time start = absl::Now();
  std::string last;
  while (true) {
    last = CheckHealth(channel);
    if (last == want) return absl::Now() - start;
    if (absl::Now() - start > timeout) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "health is still ", last, " after ", absl::FormatDuration(timeout), ", wanted ", want));
}

absl::StatusOr<v1::Provider> CreateProvider(v1::CatalogService::Stub& stub, const std::string& id,
                                            const std::string& request_id) {
  v1::CreateProviderRequest request;
  request.set_provider_id(id);
  request.set_request_id(request_id);
  request.mutable_provider()->set_display_name(absl::StrCat("Provider ", id));
  request.mutable_provider()->set_base_url(absl::StrCat("https://", id, ".example.com/v1"));
  return Invoke(stub, &v1::CatalogService::Stub::CreateProvider, request);
}

absl::StatusOr<v1::ListModelsResponse> ListModels(v1::CatalogService::Stub& stub,
                                                  const std::string& filter = "") {
  v1::ListModelsRequest request;
  request.set_parent("providers/-");
  request.set_page_size(1000);
  request.set_filter(filter);
  return Invoke(stub, &v1::CatalogService::Stub::ListModels, request);
}

absl::StatusOr<v1::ListProvidersResponse> ListProviders(v1::CatalogService::Stub& stub) {
  v1::ListProvidersRequest request;
  request.set_page_size(1000);
  return Invoke(stub, &v1::CatalogService::Stub::ListProviders, request);
}

absl::StatusOr<v1::Model> GetModel(v1::CatalogService::Stub& stub, const std::string& name) {
  v1::GetModelRequest request;
  request.set_name(name);
  return Invoke(stub, &v1::CatalogService::Stub::GetModel, request);
}

absl::StatusOr<v1::Provider> GetProvider(v1::CatalogService::Stub& stub, const std::string& name) {
  v1::GetProviderRequest request;
  request.set_name(name);
  return Invoke(stub, &v1::CatalogService::Stub::GetProvider, request);
}

std::vector<std::string> ProviderNames(const v1::ListProvidersResponse& response) {
  std::vector<std::string> names;
  for (const v1::Provider& p : response.providers()) names.push_back(p.name());
  return names;
}

// A migrated, seeded cluster and a `modelvault serve` on it.
class DbOutageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const char* skip = std::getenv("MODELVAULT_TEST_SKIP_POSTGRES");
        skip != nullptr && std::string(skip) == "1") {
      GTEST_SKIP() << "PostgreSQL fault test skipped because MODELVAULT_TEST_SKIP_POSTGRES=1";
    }
    absl::StatusOr<std::unique_ptr<PgCluster>> cluster = PgCluster::Start();
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = *std::move(cluster);
    ASSERT_EQ(PrepareDatabase(cluster_->url()), absl::OkStatus());
  }

  void StartServer(const std::vector<std::string>& extra_args) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(cluster_->url(), extra_args);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = server_->Channel();
    stub_ = v1::CatalogService::NewStub(channel_);
  }

  void TearDown() override {
    if (HasFailure() && server_ != nullptr) {
      std::cout << "--- modelvault log ---\n" << server_->Log() << "--- end of log ---\n";
    }
  }

  // Declared first: destroyed last, after the server is gone.
  std::unique_ptr<PgCluster> cluster_;
  std::unique_ptr<ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::CatalogService::Stub> stub_;
};

TEST_F(DbOutageTest, ServesCachedReadsDuringOutageAndRecoversWithoutRestart) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--feed-poll-ms", "100"}));
  const pid_t pid = server_->pid();

  // Healthy: SERVING, and a write is acknowledged.
  absl::StatusOr<absl::Duration> serving = WaitForHealth(channel_, "SERVING", absl::Seconds(15));
  ASSERT_TRUE(serving.ok()) << serving.status();
  absl::StatusOr<v1::Provider> before = CreateProvider(*stub_, "before-outage", "req-before");
  ASSERT_TRUE(before.ok()) << before.status();
  absl::StatusOr<v1::Model> model_before = GetModel(*stub_, kSeededModel);
  ASSERT_TRUE(model_before.ok()) << model_before.status();
  absl::StatusOr<v1::ListModelsResponse> models_before = ListModels(*stub_);
  ASSERT_TRUE(models_before.ok()) << models_before.status();
  ASSERT_GT(models_before->models_size(), 0);

  // The database goes away.
  const absl::Status stopped = cluster_->StopServer();
  ASSERT_TRUE(stopped.ok()) << stopped;
  const absl::Time outage = absl::Now();

  // Writes and database reads fail with UNAVAILABLE (retryable), never INTERNAL. Several
  // calls: the first meets a pooled connection the database closed, later ones try to
  // reconnect.
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<v1::Provider> during = CreateProvider(*stub_, "during-outage", "req-during");
    EXPECT_EQ(during.status().code(), absl::StatusCode::kUnavailable)
        << "CreateProvider #" << i << " during the outage: " << during.status();
    std::cout << "CreateProvider during outage #" << i << ": " << during.status() << "\n";
  }
  // A list query not answered since the last change needs the database...
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<v1::ListModelsResponse> list = ListModels(*stub_, "supports_tools = true");
    EXPECT_EQ(list.status().code(), absl::StatusCode::kUnavailable)
        << "ListModels #" << i << " during the outage: " << list.status();
    std::cout << "ListModels (new query) during outage #" << i << ": " << list.status() << "\n";
  }
  // ...while one answered before, with nothing changed since, comes from memory, as before.
  absl::StatusOr<v1::ListModelsResponse> repeated = ListModels(*stub_);
  ASSERT_TRUE(repeated.ok()) << "repeated ListModels during the outage: " << repeated.status();
  EXPECT_EQ(repeated->SerializeAsString(), models_before->SerializeAsString());

  // Reads by name come from the cache and keep working.
  absl::StatusOr<v1::Model> cached = GetModel(*stub_, kSeededModel);
  ASSERT_TRUE(cached.ok()) << "GetModel during the outage: " << cached.status();
  EXPECT_EQ(cached->etag(), model_before->etag());
  EXPECT_EQ(cached->display_name(), model_before->display_name());
  absl::StatusOr<v1::Provider> cached_provider = GetProvider(*stub_, "providers/before-outage");
  ASSERT_TRUE(cached_provider.ok()) << cached_provider.status();
  EXPECT_EQ(cached_provider->etag(), before->etag());

  // Health follows the database.
  absl::StatusOr<absl::Duration> not_serving =
      WaitForHealth(channel_, "NOT_SERVING", absl::Seconds(15));
  ASSERT_TRUE(not_serving.ok()) << not_serving.status();
  std::cout << "health_not_serving_ms=" << absl::ToInt64Milliseconds(absl::Now() - outage) << "\n";

  // The database comes back; modelvault recovers by itself.
  const absl::Status started = cluster_->StartServer();
  ASSERT_TRUE(started.ok()) << started;
  const absl::Time back = absl::Now();
  absl::StatusOr<absl::Duration> recovered = WaitForHealth(channel_, "SERVING", absl::Seconds(15));
  ASSERT_TRUE(recovered.ok()) << recovered.status();
  std::cout << "health_serving_again_ms=" << absl::ToInt64Milliseconds(absl::Now() - back) << "\n";

  // The same CreateProvider (same request_id) now succeeds: the failed attempt left nothing.
  absl::StatusOr<v1::Provider> retried = CreateProvider(*stub_, "during-outage", "req-during");
  ASSERT_TRUE(retried.ok()) << "CreateProvider after recovery: " << retried.status();
  EXPECT_EQ(retried->name(), "providers/during-outage");
  // Database reads work again (EXPECT, not ASSERT: a failure here must not hide the rest).
  absl::StatusOr<v1::ListModelsResponse> models_after = ListModels(*stub_);
  EXPECT_TRUE(models_after.ok()) << "ListModels after recovery: " << models_after.status();
  if (models_after.ok()) {
    EXPECT_EQ(models_after->models_size(), models_before->models_size());
  }

  // Nothing acknowledged is lost.
  absl::StatusOr<v1::ListProvidersResponse> providers = ListProviders(*stub_);
  EXPECT_TRUE(providers.ok()) << "ListProviders after recovery: " << providers.status();
  if (providers.ok()) {
    EXPECT_THAT(ProviderNames(*providers),
                ::testing::IsSupersetOf({"providers/before-outage", "providers/during-outage"}));
  }
  absl::StatusOr<v1::Provider> kept = GetProvider(*stub_, "providers/before-outage");
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->etag(), before->etag());

  // Still the same process all along.
  EXPECT_EQ(server_->pid(), pid);
  EXPECT_EQ(kill(pid, 0), 0);
  EXPECT_EQ(server_->Stop(SIGTERM), 0) << server_->Log();
}

// After the database restarts, every pooled connection is dead. Once the server reports
// SERVING, concurrent reads (which use many pooled connections at once) must succeed: a
// stale connection has to be replaced, not handed to a client call.
TEST_F(DbOutageTest, EveryPooledConnectionRecoversAfterDatabaseRestart) {
  constexpr int kPool = 4;
  constexpr int kCalls = 4 * kPool;
  ASSERT_NO_FATAL_FAILURE(StartServer({"--feed-poll-ms", "100", "--db-pool", absl::StrCat(kPool)}));
  absl::StatusOr<v1::ListModelsResponse> baseline = ListModels(*stub_);
  ASSERT_TRUE(baseline.ok()) << baseline.status();

  // Every call a query of its own, so that none is answered from the list page cache.
  int query = 0;
  auto burst = [&](const char* phase) {
    std::vector<absl::Status> statuses(kCalls);
    std::vector<std::thread> threads;
    for (int i = 0; i < kCalls; ++i) {
      const std::string filter = absl::StrCat("context_window >= ", query++);
      threads.emplace_back([&, i, filter] { statuses[i] = ListModels(*stub_, filter).status(); });
    }
    for (std::thread& t : threads) t.join();
    int ok = 0;
    for (const absl::Status& s : statuses) {
      if (s.ok()) {
        ++ok;
      } else {
        std::cout << phase << ": " << s << "\n";
      }
    }
    std::cout << phase << ": " << ok << "/" << kCalls << " concurrent ListModels OK\n";
    return statuses;
  };
  // Connects every pooled connection.
  for (const absl::Status& s : burst("before the outage")) ASSERT_TRUE(s.ok()) << s;

  const absl::Status stopped = cluster_->StopServer();
  ASSERT_TRUE(stopped.ok()) << stopped;
  absl::StatusOr<absl::Duration> down = WaitForHealth(channel_, "NOT_SERVING", absl::Seconds(15));
  ASSERT_TRUE(down.ok()) << down.status();
  const absl::Status started = cluster_->StartServer();
  ASSERT_TRUE(started.ok()) << started;
  absl::StatusOr<absl::Duration> recovered = WaitForHealth(channel_, "SERVING", absl::Seconds(15));
  ASSERT_TRUE(recovered.ok()) << recovered.status();

  for (const absl::Status& s : burst("after recovery")) {
    EXPECT_TRUE(s.ok()) << "ListModels after the server reported SERVING again: " << s;
  }
  EXPECT_EQ(server_->Stop(SIGTERM), 0) << server_->Log();
}

}  // namespace
}  // namespace modelvault
