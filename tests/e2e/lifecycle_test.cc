// Process lifecycle end to end: graceful shutdown (SIGTERM) with open watch streams and
// in-flight calls, several replicas on one database, schema-version safety at start, and
// listening on a Unix socket. Real `modelvault` processes, real gRPC clients.
//
// PostgreSQL cases use a fresh database per test on MODELVAULT_TEST_POSTGRES_URL and fail
// without it (MODELVAULT_TEST_SKIP_POSTGRES=1 skips them instead).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/types.pb.h"
#include "server/grpc_status.h"
#include "storage/status_details.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/status_checks.h"

namespace modelvault {
namespace {

using ::modelvault::conformance::AllEngines;
using ::modelvault::conformance::CreateTestDatabase;
using ::modelvault::conformance::EngineParam;
using ::modelvault::conformance::NameGen;
using ::modelvault::conformance::SkipPostgres;
using ::modelvault::conformance::TestDatabase;
using ::modelvault::testing::CommandResult;
using ::modelvault::testing::ErrorMetadata;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::MakeTempDir;
using ::modelvault::testing::ModelvaultBinary;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::RunModelvault;
using ::modelvault::testing::RunShell;
using ::modelvault::testing::ServerProcess;
using ::testing::HasSubstr;

using Stub = v1::CatalogService::Stub;

constexpr char kSeededModel[] = "providers/openai/models/gpt-5";

// A stub on a fresh channel carrying the server's admin key.
std::unique_ptr<Stub> StubFor(const ServerProcess& server) {
  return v1::CatalogService::NewStub(server.Channel());
}

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout = absl::Seconds(30)) {
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout));
}

absl::StatusOr<v1::Provider> CreateProvider(Stub& stub, const std::string& id) {
  v1::CreateProviderRequest request;
  request.set_provider_id(id);
  request.mutable_provider()->set_display_name(absl::StrCat("Provider ", id));
  request.mutable_provider()->set_base_url(absl::StrCat("https://", id, ".example.com/v1"));
  return Invoke(stub, &Stub::CreateProvider, request);
}

absl::StatusOr<v1::ListProvidersResponse> ListProviders(Stub& stub) {
  v1::ListProvidersRequest request;
  request.set_page_size(1000);
  return Invoke(stub, &Stub::ListProviders, request);
}

absl::StatusOr<v1::ListModelsResponse> ListModels(Stub& stub) {
  v1::ListModelsRequest request;
  request.set_parent("providers/-");
  request.set_page_size(1000);
  return Invoke(stub, &Stub::ListModels, request);
}

absl::StatusOr<v1::Model> GetModel(Stub& stub, const std::string& name) {
  v1::GetModelRequest request;
  request.set_name(name);
  return Invoke(stub, &Stub::GetModel, request);
}

absl::StatusOr<v1::Model> CreateModel(Stub& stub, const std::string& parent,
                                      const std::string& id) {
  v1::CreateModelRequest request;
  request.set_parent(parent);
  request.set_model_id(id);
  request.mutable_model()->set_display_name(absl::StrCat("Model ", id));
  return Invoke(stub, &Stub::CreateModel, request);
}

absl::StatusOr<v1::Model> UpdateDisplayName(Stub& stub, const std::string& name,
                                            const std::string& display_name) {
  v1::UpdateModelRequest request;
  request.mutable_model()->set_name(name);
  request.mutable_model()->set_display_name(display_name);
  request.mutable_update_mask()->add_paths("display_name");
  return Invoke(stub, &Stub::UpdateModel, request);
}

absl::Status DeleteModel(Stub& stub, const std::string& name) {
  v1::DeleteModelRequest request;
  request.set_name(name);
  return Invoke(stub, &Stub::DeleteModel, request).status();
}

std::string Describe(const v1::WatchCatalogResponse& message) { return message.ShortDebugString(); }

// Migrates and seeds `url` with the CLI.
void MigrateAndSeed(const std::string& url) { ASSERT_EQ(PrepareDatabase(url), absl::OkStatus()); }

// Runs `modelvault serve --database URL --listen 127.0.0.1:0 EXTRA...` to completion, for
// starts that must fail; `timeout` ends it (exit code 124) if it serves instead.
CommandResult ServeExpectingFailure(const std::string& url,
                                    const std::vector<std::string>& extra = {}) {
  std::vector<std::string> quoted;
  for (const std::string& a : extra) quoted.push_back(absl::StrCat("'", a, "'"));
  return RunShell(absl::StrCat("timeout 60 '", ModelvaultBinary(), "' serve --database '", url,
                               "' --listen 127.0.0.1:0 ", absl::StrJoin(quoted, " ")));
}

// Fresh database of the parameter's engine; servers get the arguments they need on it.
class EngineLifecycleTest : public ::testing::TestWithParam<EngineParam> {
 protected:
  void SetUp() override {
    if (is_postgres() && SkipPostgres()) {
      GTEST_SKIP() << "PostgreSQL case skipped because MODELVAULT_TEST_SKIP_POSTGRES=1";
    }
    absl::StatusOr<std::unique_ptr<TestDatabase>> database = CreateTestDatabase(GetParam().name);
    ASSERT_TRUE(database.ok()) << database.status();
    database_ = *std::move(database);
  }

  bool is_postgres() const { return GetParam().name == "postgres"; }
  const std::string& url() const { return database_->url(); }

  // PostgreSQL does not migrate at start by default.
  std::vector<std::string> ServeArgs() const {
    std::vector<std::string> args = {"--feed-poll-ms", "100"};
    if (is_postgres()) args.push_back("--migrate");
    return args;
  }

  absl::StatusOr<std::unique_ptr<ServerProcess>> StartServer() {
    return ServerProcess::Start(url(), ServeArgs());
  }

 private:
  std::unique_ptr<TestDatabase> database_;
};

// A fresh PostgreSQL database.
class PostgresLifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (SkipPostgres()) {
      GTEST_SKIP() << "PostgreSQL case skipped because MODELVAULT_TEST_SKIP_POSTGRES=1";
    }
    absl::StatusOr<std::unique_ptr<TestDatabase>> database = CreateTestDatabase("postgres");
    ASSERT_TRUE(database.ok()) << database.status();
    database_ = *std::move(database);
  }

  const std::string& url() const { return database_->url(); }

 private:
  std::unique_ptr<TestDatabase> database_;
};

// --- 1. SIGTERM ends watch streams resumably -------------------------------------------

using SigtermTest = EngineLifecycleTest;

TEST_P(SigtermTest, EndsWatchStreamWithItsCursorAndResumesOnANewServer) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = StartServer();
  ASSERT_TRUE(server.ok()) << server.status();
  std::unique_ptr<Stub> stub = StubFor(**server);

  grpc::ClientContext watch;
  SetDeadline(watch, absl::Seconds(60));
  std::unique_ptr<grpc::ClientReader<v1::WatchCatalogResponse>> reader =
      stub->WatchCatalog(&watch, v1::WatchCatalogRequest());
  v1::WatchCatalogResponse message;
  ASSERT_TRUE(reader->Read(&message)) << server::FromGrpcStatus(reader->Finish());
  ASSERT_TRUE(message.has_checkpoint()) << Describe(message);
  const std::string start_cursor = message.cursor();
  std::string last_cursor = message.cursor();

  absl::StatusOr<v1::Provider> created = CreateProvider(*stub, "sigterm-watch");
  ASSERT_TRUE(created.ok()) << created.status();
  std::string change_cursor;
  while (reader->Read(&message)) {
    last_cursor = message.cursor();
    if (message.has_change() && message.change().resource_name() == "providers/sigterm-watch") {
      change_cursor = message.cursor();
      break;
    }
  }
  ASSERT_FALSE(change_cursor.empty())
      << "the stream ended before the change arrived: " << server::FromGrpcStatus(reader->Finish());
  EXPECT_NE(change_cursor, start_cursor);

  // SIGTERM while the stream is open; drain it meanwhile.
  const absl::Time sigterm = absl::Now();
  std::future<int> exit_code = std::async(std::launch::async, [&server, sigterm] {
    const int code = (*server)->Stop(SIGTERM);
    std::cout << "sigterm_exit_ms=" << absl::ToInt64Milliseconds(absl::Now() - sigterm) << "\n";
    return code;
  });
  while (reader->Read(&message)) {
    last_cursor = message.cursor();
    EXPECT_FALSE(message.has_change()) << "a change nobody made: " << Describe(message);
  }
  const absl::Status ended = server::FromGrpcStatus(reader->Finish());
  EXPECT_EQ(exit_code.get(), 0) << (*server)->Log();
  EXPECT_EQ(ended.code(), absl::StatusCode::kUnavailable) << ended;
  EXPECT_EQ(ErrorReason(ended), "STREAM_ENDED") << ended;
  EXPECT_EQ(ErrorMetadata(ended, "cursor"), last_cursor) << ended;
  EXPECT_EQ(last_cursor, change_cursor);  // nothing happened after the write

  // A new server on the same database, watched from that cursor: nothing old is replayed
  // (only checkpoints, at the same position), then the next write arrives.
  absl::StatusOr<std::unique_ptr<ServerProcess>> next = StartServer();
  ASSERT_TRUE(next.ok()) << next.status();
  std::unique_ptr<Stub> next_stub = StubFor(**next);
  grpc::ClientContext resume;
  SetDeadline(resume, absl::Seconds(60));
  v1::WatchCatalogRequest request;
  request.set_cursor(last_cursor);
  request.set_checkpoint_interval_seconds(1);
  std::unique_ptr<grpc::ClientReader<v1::WatchCatalogResponse>> resumed =
      next_stub->WatchCatalog(&resume, request);
  ASSERT_TRUE(resumed->Read(&message)) << server::FromGrpcStatus(resumed->Finish());
  ASSERT_TRUE(message.has_checkpoint()) << "replayed after the cursor: " << Describe(message);
  EXPECT_EQ(message.cursor(), last_cursor);

  ASSERT_TRUE(CreateProvider(*next_stub, "after-restart").ok());
  int checkpoints = 1;
  bool got_change = false;
  while (resumed->Read(&message)) {
    if (message.has_checkpoint()) {
      ++checkpoints;
      continue;
    }
    ASSERT_TRUE(message.has_change()) << Describe(message);
    EXPECT_EQ(message.change().resource_name(), "providers/after-restart") << Describe(message);
    EXPECT_EQ(message.change().type(), v1::CHANGE_TYPE_CREATED) << Describe(message);
    EXPECT_NE(message.cursor(), last_cursor);
    got_change = true;
    break;
  }
  EXPECT_TRUE(got_change) << server::FromGrpcStatus(resumed->Finish());
  std::cout << "checkpoints before the new write: " << checkpoints << "\n";
  resume.TryCancel();
  resumed->Finish();
  EXPECT_EQ((*next)->Stop(SIGTERM), 0) << (*next)->Log();
}

// --- 2. SIGTERM with unary calls in flight ---------------------------------------------

TEST_P(SigtermTest, InFlightCallsSucceedOrFailUnavailable) {
  ASSERT_NO_FATAL_FAILURE(MigrateAndSeed(url()));
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = StartServer();
  ASSERT_TRUE(server.ok()) << server.status();
  std::shared_ptr<grpc::Channel> channel = (*server)->Channel();
  std::unique_ptr<Stub> stub = v1::CatalogService::NewStub(channel);
  absl::StatusOr<v1::ListModelsResponse> baseline = ListModels(*stub);
  ASSERT_TRUE(baseline.ok()) << baseline.status();
  ASSERT_GT(baseline->models_size(), 0);

  // Every client calls ListModels back to back until a call fails (the server is gone).
  constexpr int kClients = 50;
  const absl::Time guard = absl::Now() + absl::Seconds(120);
  std::atomic<int> warmed_up{0};
  struct Outcome {
    int ok = 0;
    int incomplete = 0;  // OK but not the whole catalog
    std::map<absl::StatusCode, int> failures;
    std::string first_unexpected;
    absl::Time first_unexpected_start;  // when that call was made
    absl::Time first_unexpected_time;   // and when it failed
  };
  std::vector<Outcome> outcomes(kClients);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      Outcome& out = outcomes[i];
      while (absl::Now() < guard) {
        const absl::Time call_start = absl::Now();
        absl::StatusOr<v1::ListModelsResponse> list = ListModels(*stub);
        if (!list.ok()) {
          ++out.failures[list.status().code()];
          if (!absl::IsUnavailable(list.status()) && out.first_unexpected.empty()) {
            out.first_unexpected = list.status().ToString();
            out.first_unexpected_start = call_start;
            out.first_unexpected_time = absl::Now();
          }
          break;
        }
        if (list->models_size() != baseline->models_size()) ++out.incomplete;
        if (out.ok++ == 0) ++warmed_up;
      }
    });
  }
  // SIGTERM once every client has completed a call, i.e. while all of them are calling.
  while (warmed_up.load() < kClients && absl::Now() < guard) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(warmed_up.load(), kClients);
  const absl::Time sigterm = absl::Now();
  const int exit_code = (*server)->Stop(SIGTERM);
  const absl::Time exited = absl::Now();
  for (std::thread& t : clients) t.join();

  EXPECT_EQ(exit_code, 0) << (*server)->Log();
  int ok = 0, incomplete = 0, never_failed = 0;
  std::map<absl::StatusCode, int> failures;
  std::string example;  // of a failure other than UNAVAILABLE
  for (const Outcome& out : outcomes) {
    ok += out.ok;
    incomplete += out.incomplete;
    if (out.failures.empty()) ++never_failed;  // the guard ended it, not the server
    for (const auto& [code, count] : out.failures) failures[code] += count;
    if (example.empty() && !out.first_unexpected.empty()) {
      example = absl::StrCat(out.first_unexpected, " (made ",
                             absl::ToInt64Milliseconds(out.first_unexpected_start - sigterm),
                             " ms and failed ",
                             absl::ToInt64Milliseconds(out.first_unexpected_time - sigterm),
                             " ms after SIGTERM; the process exited after ",
                             absl::ToInt64Milliseconds(exited - sigterm), " ms)");
    }
  }
  std::cout << "calls_ok=" << ok;
  for (const auto& [code, count] : failures) {
    std::cout << " calls_" << absl::StatusCodeToString(code) << "=" << count;
  }
  std::cout << " sigterm_exit_ms=" << absl::ToInt64Milliseconds(exited - sigterm) << "\n";
  EXPECT_EQ(incomplete, 0) << "OK responses without the whole catalog";
  EXPECT_EQ(never_failed, 0) << "clients still served after the server should have exited";
  for (const auto& [code, count] : failures) {
    EXPECT_EQ(code, absl::StatusCode::kUnavailable)
        << count << " call(s) failed with " << absl::StatusCodeToString(code) << ", e.g. "
        << example;
  }
}

INSTANTIATE_TEST_SUITE_P(Engines, SigtermTest, AllEngines(), NameGen());

// --- 3. Replicas on one database -------------------------------------------------------

TEST_F(PostgresLifecycleTest, ReplicasSeeEachOthersWrites) {
  ASSERT_NO_FATAL_FAILURE(MigrateAndSeed(url()));
  absl::StatusOr<std::unique_ptr<ServerProcess>> a =
      ServerProcess::Start(url(), {"--feed-poll-ms", "100"});
  ASSERT_TRUE(a.ok()) << a.status();
  absl::StatusOr<std::unique_ptr<ServerProcess>> b =
      ServerProcess::Start(url(), {"--feed-poll-ms", "100"});
  ASSERT_TRUE(b.ok()) << b.status();
  std::unique_ptr<Stub> stub_a = StubFor(**a);
  std::unique_ptr<Stub> stub_b = StubFor(**b);

  // A watch on B, live before the write.
  grpc::ClientContext watch;
  SetDeadline(watch, absl::Seconds(60));
  std::unique_ptr<grpc::ClientReader<v1::WatchCatalogResponse>> reader =
      stub_b->WatchCatalog(&watch, v1::WatchCatalogRequest());
  v1::WatchCatalogResponse message;
  ASSERT_TRUE(reader->Read(&message)) << server::FromGrpcStatus(reader->Finish());
  ASSERT_TRUE(message.has_checkpoint()) << Describe(message);

  // Update through A: A's next read has it, B's reads have it within a poll or so.
  const std::string new_name =
      absl::StrCat("GPT-5 (replica test ", absl::ToUnixMicros(absl::Now()), ")");
  absl::StatusOr<v1::Model> updated = UpdateDisplayName(*stub_a, kSeededModel, new_name);
  ASSERT_TRUE(updated.ok()) << updated.status();
  const absl::Time written = absl::Now();
  absl::StatusOr<v1::Model> on_a = GetModel(*stub_a, kSeededModel);
  ASSERT_TRUE(on_a.ok()) << on_a.status();
  EXPECT_EQ(on_a->display_name(), new_name);
  EXPECT_EQ(on_a->etag(), updated->etag());

  absl::StatusOr<v1::Model> on_b;
  while (true) {
    on_b = GetModel(*stub_b, kSeededModel);
    if ((on_b.ok() && on_b->display_name() == new_name) ||
        absl::Now() - written > absl::Seconds(10)) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(on_b.ok()) << on_b.status();
  ASSERT_EQ(on_b->display_name(), new_name) << "B never saw A's update";
  std::cout << "replica_visibility_ms=" << absl::ToInt64Milliseconds(absl::Now() - written) << "\n";
  EXPECT_EQ(on_b->etag(), updated->etag());

  // The watch on B delivers A's write.
  bool seen = false;
  while (reader->Read(&message)) {
    if (message.has_change() && message.change().resource_name() == kSeededModel) {
      EXPECT_EQ(message.change().type(), v1::CHANGE_TYPE_UPDATED) << Describe(message);
      EXPECT_EQ(message.change().model().display_name(), new_name) << Describe(message);
      seen = true;
      break;
    }
  }
  EXPECT_TRUE(seen) << "B's watch ended without A's write: "
                    << server::FromGrpcStatus(reader->Finish());
  watch.TryCancel();
  reader->Finish();

  // A delete through B disappears from A's reads.
  absl::StatusOr<v1::Model> created = CreateModel(*stub_a, "providers/openai", "replica-delete");
  ASSERT_TRUE(created.ok()) << created.status();
  const absl::Time create_time = absl::Now();
  absl::StatusOr<v1::Model> got;
  do {
    got = GetModel(*stub_b, created->name());
  } while (!got.ok() && absl::Now() - create_time < absl::Seconds(10));
  ASSERT_TRUE(got.ok()) << "B never saw A's create: " << got.status();
  absl::Status deleted = DeleteModel(*stub_b, created->name());
  ASSERT_TRUE(deleted.ok()) << deleted;
  const absl::Time delete_time = absl::Now();
  EXPECT_EQ(GetModel(*stub_b, created->name()).status().code(), absl::StatusCode::kNotFound);
  do {
    got = GetModel(*stub_a, created->name());
  } while (got.ok() && absl::Now() - delete_time < absl::Seconds(10));
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound)
      << "A still serves a model deleted through B: " << got.status();
  std::cout << "replica_delete_visibility_ms="
            << absl::ToInt64Milliseconds(absl::Now() - delete_time) << "\n";

  // List answers repeated from memory on B still follow A's writes: list twice on B
  // (the second from B's page cache), create on A, and B's list shows it.
  absl::StatusOr<v1::ListProvidersResponse> before = ListProviders(*stub_b);
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_TRUE(ListProviders(*stub_b).ok());
  ASSERT_TRUE(CreateProvider(*stub_a, "replica-list").ok());
  const absl::Time list_write = absl::Now();
  absl::StatusOr<v1::ListProvidersResponse> after;
  do {
    after = ListProviders(*stub_b);
  } while (after.ok() && after->providers_size() == before->providers_size() &&
           absl::Now() - list_write < absl::Seconds(10));
  ASSERT_TRUE(after.ok()) << after.status();
  ASSERT_EQ(after->providers_size(), before->providers_size() + 1)
      << "B's list never showed A's new provider";
  std::cout << "replica_list_visibility_ms=" << absl::ToInt64Milliseconds(absl::Now() - list_write)
            << "\n";

  EXPECT_EQ((*a)->Stop(SIGTERM), 0) << (*a)->Log();
  EXPECT_EQ((*b)->Stop(SIGTERM), 0) << (*b)->Log();
}

// --- 4. Schema version safety at start --------------------------------------------------

// The one line of output of a failed command, checked to be one line.
std::string OneLine(const CommandResult& result) {
  const std::string text(absl::StripAsciiWhitespace(result.output));
  EXPECT_EQ(text.find('\n'), std::string::npos) << "more than one line:\n" << result.output;
  return text;
}

TEST_F(PostgresLifecycleTest, ServeRefusesAnUnmigratedDatabaseUnlessToldToMigrate) {
  const CommandResult refused = ServeExpectingFailure(url());
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_NE(refused.exit_code, 124) << "serve ran on an empty database:\n" << refused.output;
  const std::string line = OneLine(refused);
  std::cout << "serve on an empty database: " << line << "\n";
  EXPECT_THAT(line, HasSubstr("migrate up"));

  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start(url(), {"--migrate"});
  ASSERT_TRUE(server.ok()) << server.status();
  std::unique_ptr<Stub> stub = StubFor(**server);
  absl::StatusOr<v1::ListProvidersResponse> providers = ListProviders(*stub);
  EXPECT_TRUE(providers.ok()) << providers.status();
  EXPECT_EQ((*server)->Stop(SIGTERM), 0) << (*server)->Log();
}

TEST_F(PostgresLifecycleTest, ServeRefusesADatabaseNewerThanTheBinary) {
  ASSERT_EQ(PrepareDatabase(url(), /*seed=*/false), absl::OkStatus());
  ASSERT_TRUE(conformance::ExecuteSql(
                  url(), "INSERT INTO schema_version VALUES (9999, '9999_future', 'x', 0)")
                  .ok());

  const CommandResult refused = ServeExpectingFailure(url());
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_NE(refused.exit_code, 124) << "serve ran on a newer schema:\n" << refused.output;
  const std::string line = OneLine(refused);
  std::cout << "serve on a newer schema: " << line << "\n";
  EXPECT_THAT(line, HasSubstr("newer"));
  EXPECT_THAT(line, HasSubstr("upgrade"));

  // --migrate cannot migrate a newer schema down either.
  const CommandResult with_migrate = ServeExpectingFailure(url(), {"--migrate"});
  EXPECT_NE(with_migrate.exit_code, 0) << with_migrate.output;
  EXPECT_NE(with_migrate.exit_code, 124) << "serve --migrate ran on a newer schema:\n"
                                         << with_migrate.output;
  EXPECT_THAT(with_migrate.output, HasSubstr("upgrade"));
}

// The state `modelvault migrate status` prints for `migration`, or "" when not listed.
std::string MigrationState(const CommandResult& status, absl::string_view migration) {
  for (absl::string_view line : absl::StrSplit(status.output, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (absl::ConsumePrefix(&line, migration)) {
      // "applied  2024-..." or "pending"
      line = absl::StripLeadingAsciiWhitespace(line);
      return std::string(line.substr(0, line.find("  ")));
    }
  }
  return "";
}

TEST_F(PostgresLifecycleTest, MigrateStatusAndDown) {
  // Runs `migrate VERB` and then `migrate status`; the status output.
  const auto migrate = [&](const std::string& verb) {
    if (verb != "status") {
      const CommandResult run = RunModelvault({"migrate", verb, "--database", url()});
      EXPECT_EQ(run.exit_code, 0) << run.output;
    }
    const CommandResult status = RunModelvault({"migrate", "status", "--database", url()});
    EXPECT_EQ(status.exit_code, 0) << status.output;
    return status;
  };
  const CommandResult before = migrate("status");
  EXPECT_EQ(MigrationState(before, "0001_catalog"), "pending") << before.output;

  const CommandResult applied = migrate("up");
  EXPECT_EQ(MigrationState(applied, "0001_catalog"), "applied") << applied.output;
  EXPECT_EQ(MigrationState(applied, "0002_credentials"), "applied") << applied.output;
  EXPECT_EQ(MigrationState(applied, "0003_usage"), "applied") << applied.output;
  EXPECT_EQ(MigrationState(applied, "0004_usage_lanes"), "applied") << applied.output;
  EXPECT_EQ(MigrationState(applied, "0005_usage_rollup_parts"), "applied") << applied.output;

  // Down reverts the newest migration only.
  const CommandResult parts_reverted = migrate("down");
  EXPECT_EQ(MigrationState(parts_reverted, "0005_usage_rollup_parts"), "pending")
      << parts_reverted.output;
  EXPECT_EQ(MigrationState(parts_reverted, "0004_usage_lanes"), "applied") << parts_reverted.output;
  const CommandResult lanes_reverted = migrate("down");
  EXPECT_EQ(MigrationState(lanes_reverted, "0004_usage_lanes"), "pending") << lanes_reverted.output;
  EXPECT_EQ(MigrationState(lanes_reverted, "0003_usage"), "applied") << lanes_reverted.output;
  const CommandResult reverted = migrate("down");
  EXPECT_EQ(MigrationState(reverted, "0003_usage"), "pending") << reverted.output;
  EXPECT_EQ(MigrationState(reverted, "0002_credentials"), "applied") << reverted.output;
  const CommandResult reverted_again = migrate("down");
  EXPECT_EQ(MigrationState(reverted_again, "0002_credentials"), "pending") << reverted_again.output;
  EXPECT_EQ(MigrationState(reverted_again, "0001_catalog"), "applied") << reverted_again.output;
  const CommandResult empty = migrate("down");
  EXPECT_EQ(MigrationState(empty, "0001_catalog"), "pending") << empty.output;

  // Reverted means serving needs a migration again.
  const CommandResult refused = ServeExpectingFailure(url());
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_NE(refused.exit_code, 124) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("migrate up"));
}

TEST(SqliteLifecycleTest, ServeMigratesByDefault) {
  absl::StatusOr<std::unique_ptr<TestDatabase>> database = CreateTestDatabase("sqlite");
  ASSERT_TRUE(database.ok()) << database.status();
  const std::string url = (*database)->url();
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(url);
  ASSERT_TRUE(server.ok()) << server.status();
  std::unique_ptr<Stub> stub = StubFor(**server);
  absl::StatusOr<v1::ListProvidersResponse> providers = ListProviders(*stub);
  EXPECT_TRUE(providers.ok()) << providers.status();
  EXPECT_TRUE(CreateProvider(*stub, "sqlite-default").ok());
  EXPECT_EQ((*server)->Stop(SIGTERM), 0) << (*server)->Log();

  const CommandResult status = RunModelvault({"migrate", "status", "--database", url});
  ASSERT_EQ(status.exit_code, 0) << status.output;
  EXPECT_EQ(MigrationState(status, "0001_catalog"), "applied") << status.output;
}

// --- 5. Listening on a Unix socket ------------------------------------------------------

TEST(UnixSocketTest, ServesOnAUnixSocket) {
  absl::StatusOr<std::unique_ptr<TestDatabase>> database = CreateTestDatabase("sqlite");
  ASSERT_TRUE(database.ok()) << database.status();
  const std::string dir = MakeTempDir();
  const std::string socket = dir + "/mv.sock";
  const std::string target = absl::StrCat("unix:", socket);
  absl::StatusOr<std::unique_ptr<ServerProcess>> started =
      ServerProcess::Start((*database)->url(), {}, target);
  ASSERT_TRUE(started.ok()) << started.status();
  ServerProcess& server = **started;
  EXPECT_EQ(server.target(), target);
  absl::StatusOr<v1::ListProvidersResponse> providers = ListProviders(*StubFor(server));
  ASSERT_TRUE(providers.ok()) << providers.status() << "\n" << server.Log();

  // A write and a read over the socket, from a fresh channel.
  std::unique_ptr<Stub> second = StubFor(server);
  EXPECT_TRUE(CreateProvider(*second, "over-unix").ok());
  providers = ListProviders(*second);
  ASSERT_TRUE(providers.ok()) << providers.status();
  ASSERT_EQ(providers->providers_size(), 1);
  EXPECT_EQ(providers->providers(0).name(), "providers/over-unix");
  EXPECT_THAT(server.Log(), HasSubstr(socket));
  // Owner and group may connect, others may not (the sidecar's contract).
  struct stat info;
  ASSERT_EQ(stat(socket.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0660);

  EXPECT_EQ(server.Stop(SIGTERM), 0) << server.Log();
  std::error_code error;
  std::filesystem::remove_all(dir, error);
}

}  // namespace
}  // namespace modelvault
