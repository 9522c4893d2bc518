// Migrator conformance (storage/migrate.h) on SQLite and PostgreSQL: up, down, status,
// CheckCurrent, refusal of edited and unknown migrations, and concurrent runners.
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "storage/migrate.h"
#include "storage/schema.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"

namespace modelvault::conformance {
namespace {

using ::modelvault::storage::Datastore;
using ::modelvault::storage::Migration;
using ::modelvault::storage::MigrationState;
using ::modelvault::storage::Migrator;
using ::modelvault::storage::ReadWriteTx;
using ::modelvault::storage::SchemaRegistry;
using ::testing::HasSubstr;

// A migration no release has: version 9999, one table.
Migration FutureMigration() {
  Migration m;
  m.version = 9999;
  m.name = "9999_future";
  m.up = "CREATE TABLE future_things (\n  id BIGINT PRIMARY KEY\n);\n";
  m.down = "DROP TABLE future_things;\n";
  return m;
}

class MigrationsTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    absl::StatusOr<std::vector<Migration>> embedded =
        storage::EmbeddedMigrations(is_postgres() ? "postgresql" : "sqlite3");
    ASSERT_TRUE(embedded.ok()) << embedded.status();
    ASSERT_FALSE(embedded->empty());
    embedded_ = *std::move(embedded);
  }

  Migrator Embedded() {
    absl::StatusOr<Migrator> migrator = Migrator::ForUrl(url());
    EXPECT_TRUE(migrator.ok()) << migrator.status();
    return *std::move(migrator);
  }

  Migrator WithMigrations(std::vector<Migration> migrations) {
    absl::StatusOr<Migrator> migrator = Migrator::ForUrl(url(), std::move(migrations));
    EXPECT_TRUE(migrator.ok()) << migrator.status();
    return *std::move(migrator);
  }

  // Asserts that Status() lists exactly the embedded migrations, each applied or not.
  void ExpectAllApplied(Migrator& migrator, bool applied) {
    absl::StatusOr<std::vector<MigrationState>> states = migrator.Status();
    ASSERT_TRUE(states.ok()) << states.status();
    ASSERT_EQ(states->size(), embedded_.size());
    for (size_t i = 0; i < embedded_.size(); ++i) {
      const MigrationState& state = (*states)[i];
      EXPECT_EQ(state.migration.version, embedded_[i].version);
      EXPECT_EQ(state.migration.name, embedded_[i].name);
      EXPECT_EQ(state.applied, applied) << state.migration.name;
      EXPECT_TRUE(state.known) << state.migration.name;
      EXPECT_TRUE(state.checksum_ok) << state.migration.name;
      EXPECT_EQ(state.applied_time.has_value(), applied) << state.migration.name;
    }
  }

  // Inserts a provider with a model and a change record through a datastore.
  void Populate(Datastore& ds) {
    const auto& registry = SchemaRegistry::Default();
    v1::Provider provider;
    provider.set_name("providers/acme");
    provider.set_display_name("Acme");
    provider.set_base_url("https://api.acme.test");
    provider.set_auth_method(v1::Provider::AUTH_METHOD_BEARER);
    provider.mutable_create_time()->set_seconds(1700000000);
    *provider.mutable_update_time() = provider.create_time();
    v1::Model model;
    model.set_name("providers/acme/models/rocket");
    model.set_display_name("Rocket");
    model.set_context_window(8192);
    model.mutable_create_time()->set_seconds(1700000000);
    *model.mutable_update_time() = model.create_time();
    absl::Status status = ds.ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
      if (absl::Status s = tx.Insert(*registry.ForMessage(v1::Provider::descriptor()), provider);
          !s.ok()) {
        return s;
      }
      if (absl::Status s = tx.Insert(*registry.ForMessage(v1::Model::descriptor()), model);
          !s.ok()) {
        return s;
      }
      storage::ChangeRecord change;
      change.time = absl::FromUnixSeconds(1700000000);
      change.resource_type = "modelvault.dev/Model";
      change.resource_name = model.name();
      change.change_type = "CREATED";
      change.resource_json = "{}";
      return tx.AppendChange(change);
    });
    ASSERT_TRUE(status.ok()) << status;
  }

  std::vector<Migration> embedded_;
};

TEST_P(MigrationsTest, FreshDatabaseHasNothingApplied) {
  Migrator migrator = Embedded();
  ExpectAllApplied(migrator, /*applied=*/false);
  EXPECT_EQ(migrator.LatestVersion(), embedded_.back().version);
}

TEST_P(MigrationsTest, UpStatusDownStatusUpOnEmptyDatabase) {
  Migrator migrator = Embedded();
  ASSERT_TRUE(migrator.Up().ok());
  ExpectAllApplied(migrator, /*applied=*/true);
  for (const char* table :
       {"providers", "model_families", "models", "changes", "request_ids", "server_secrets"}) {
    EXPECT_EQ(TableExists(table).value_or(false), true) << table;
  }

  ASSERT_TRUE(migrator.Down(static_cast<int>(embedded_.size())).ok());
  ExpectAllApplied(migrator, /*applied=*/false);
  for (const char* table :
       {"providers", "model_families", "models", "changes", "request_ids", "server_secrets"}) {
    EXPECT_EQ(TableExists(table).value_or(true), false) << table;
  }
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM schema_version").value_or(-1), 0);

  ASSERT_TRUE(migrator.Up().ok());
  ExpectAllApplied(migrator, /*applied=*/true);
  EXPECT_TRUE(migrator.CheckCurrent().ok());
  absl::StatusOr<std::unique_ptr<Datastore>> ds = Open();
  ASSERT_TRUE(ds.ok()) << ds.status();
  Populate(**ds);
}

TEST_P(MigrationsTest, DownOnPopulatedDatabaseSucceedsAndUpGivesAWorkingEmptySchema) {
  {
    absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated();
    ASSERT_TRUE(ds.ok()) << ds.status();
    Populate(**ds);
  }
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1), 1);

  Migrator migrator = Embedded();
  absl::Status down = migrator.Down(static_cast<int>(embedded_.size()));
  ASSERT_TRUE(down.ok()) << down;
  ExpectAllApplied(migrator, /*applied=*/false);
  EXPECT_EQ(TableExists("models").value_or(true), false);

  ASSERT_TRUE(migrator.Up().ok());
  ExpectAllApplied(migrator, /*applied=*/true);
  absl::StatusOr<std::unique_ptr<Datastore>> ds = Open();
  ASSERT_TRUE(ds.ok()) << ds.status();
  // The data went with the tables.
  absl::Status read = (*ds)->Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<storage::StoredResource> provider = reader.Get(
        *SchemaRegistry::Default().ForMessage(v1::Provider::descriptor()), "providers/acme");
    EXPECT_EQ(provider.status().code(), absl::StatusCode::kNotFound) << provider.status();
    absl::StatusOr<std::int64_t> last = reader.LastChangeSeq();
    EXPECT_TRUE(last.ok()) << last.status();
    EXPECT_EQ(last.value_or(-1), 0);
    return absl::OkStatus();
  });
  EXPECT_TRUE(read.ok()) << read;
  // And the schema works again.
  Populate(**ds);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1), 1);
}

TEST_P(MigrationsTest, CheckCurrentFailsOnEmptyDatabaseAndPassesAfterUp) {
  Migrator migrator = Embedded();
  absl::Status before = migrator.CheckCurrent();
  EXPECT_EQ(before.code(), absl::StatusCode::kFailedPrecondition) << before;
  EXPECT_THAT(before.message(), HasSubstr("migrate up"));

  ASSERT_TRUE(migrator.Up().ok());
  absl::Status after = migrator.CheckCurrent();
  EXPECT_TRUE(after.ok()) << after;
}

TEST_P(MigrationsTest, CheckCurrentFailsWhenAMigrationIsPending) {
  std::vector<Migration> newer = embedded_;
  Migration next = FutureMigration();
  newer.push_back(next);
  ASSERT_TRUE(Embedded().Up().ok());
  // This database lacks 9999, which the "newer binary" knows.
  absl::Status status = WithMigrations(newer).CheckCurrent();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_THAT(status.message(), HasSubstr("migrate up"));
}

TEST_P(MigrationsTest, UpToTargetThenDownOneStep) {
  std::vector<Migration> migrations = embedded_;
  migrations.push_back(FutureMigration());
  Migrator migrator = WithMigrations(migrations);

  ASSERT_TRUE(migrator.Up(embedded_.back().version).ok());
  EXPECT_EQ(TableExists("future_things").value_or(true), false);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM schema_version").value_or(-1),
            static_cast<std::int64_t>(embedded_.size()));

  ASSERT_TRUE(migrator.Up().ok());
  EXPECT_EQ(TableExists("future_things").value_or(false), true);
  EXPECT_TRUE(migrator.CheckCurrent().ok());

  ASSERT_TRUE(migrator.Down(1).ok());
  EXPECT_EQ(TableExists("future_things").value_or(true), false);
  EXPECT_EQ(TableExists("models").value_or(false), true);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM schema_version WHERE version = 9999").value_or(-1), 0);
  EXPECT_TRUE(Embedded().CheckCurrent().ok());
}

TEST_P(MigrationsTest, EditedAppliedMigrationIsRefused) {
  ASSERT_TRUE(Embedded().Up().ok());
  absl::StatusOr<std::unique_ptr<Datastore>> ds = Open();
  ASSERT_TRUE(ds.ok()) << ds.status();
  Populate(**ds);
  ds->reset();

  std::vector<Migration> edited = embedded_;
  edited.front().up += "\n-- an innocent-looking edit\n";
  Migrator migrator = WithMigrations(edited);

  absl::Status check = migrator.CheckCurrent();
  EXPECT_EQ(check.code(), absl::StatusCode::kFailedPrecondition) << check;
  EXPECT_THAT(check.message(), HasSubstr("edited"));

  absl::Status up = migrator.Up();
  EXPECT_EQ(up.code(), absl::StatusCode::kFailedPrecondition) << up;
  EXPECT_THAT(up.message(), HasSubstr("edited"));

  // Down with the edited set is refused too, and leaves the data alone.
  absl::Status down = migrator.Down(static_cast<int>(edited.size()));
  EXPECT_EQ(down.code(), absl::StatusCode::kFailedPrecondition) << down;
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1), 1);

  absl::StatusOr<std::vector<MigrationState>> states = migrator.Status();
  ASSERT_TRUE(states.ok()) << states.status();
  ASSERT_FALSE(states->empty());
  EXPECT_TRUE(states->front().applied);
  EXPECT_FALSE(states->front().checksum_ok);

  // The original set is still happy.
  EXPECT_TRUE(Embedded().CheckCurrent().ok());
}

TEST_P(MigrationsTest, DatabaseNewerThanTheBinaryIsRefused) {
  std::vector<Migration> newer = embedded_;
  newer.push_back(FutureMigration());
  ASSERT_TRUE(WithMigrations(newer).Up().ok());
  ASSERT_EQ(TableExists("future_things").value_or(false), true);

  Migrator migrator = Embedded();
  absl::Status check = migrator.CheckCurrent();
  EXPECT_EQ(check.code(), absl::StatusCode::kFailedPrecondition) << check;
  EXPECT_THAT(check.message(), HasSubstr("newer"));
  EXPECT_THAT(check.message(), HasSubstr("upgrade"));

  absl::Status up = migrator.Up();
  EXPECT_EQ(up.code(), absl::StatusCode::kFailedPrecondition) << up;
  EXPECT_THAT(up.message(), HasSubstr("upgrade"));

  absl::StatusOr<std::vector<MigrationState>> states = migrator.Status();
  ASSERT_TRUE(states.ok()) << states.status();
  ASSERT_EQ(states->size(), embedded_.size() + 1);
  const MigrationState& unknown = states->back();
  EXPECT_EQ(unknown.migration.version, 9999);
  EXPECT_EQ(unknown.migration.name, "9999_future");
  EXPECT_TRUE(unknown.applied);
  EXPECT_FALSE(unknown.known);
}

TEST_P(MigrationsTest, UpTwiceIsANoOp) {
  Migrator migrator = Embedded();
  ASSERT_TRUE(migrator.Up().ok());
  absl::StatusOr<std::vector<MigrationState>> first = migrator.Status();
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<std::unique_ptr<Datastore>> ds = Open();
  ASSERT_TRUE(ds.ok()) << ds.status();
  Populate(**ds);
  ds->reset();

  absl::Status again = migrator.Up();
  ASSERT_TRUE(again.ok()) << again;
  absl::StatusOr<std::vector<MigrationState>> second = migrator.Status();
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(first->size(), second->size());
  for (size_t i = 0; i < first->size(); ++i) {
    EXPECT_EQ((*first)[i].applied_time, (*second)[i].applied_time)
        << (*first)[i].migration.name << " was applied again";
  }
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM schema_version").value_or(-1),
            static_cast<std::int64_t>(embedded_.size()));
  // Nothing was recreated: the rows are still there.
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1), 1);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM changes").value_or(-1), 1);
}

// A process that holds a Datastore (a server, a test harness) can still inspect and run
// migrations with the Migrator's own connection.
TEST_P(MigrationsTest, MigratorWorksWhileADatastoreIsOpen) {
  absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated();
  ASSERT_TRUE(ds.ok()) << ds.status();
  ASSERT_TRUE((*ds)->Ping().ok());
  try {
    Migrator migrator = Embedded();
    absl::Status check = migrator.CheckCurrent();
    EXPECT_TRUE(check.ok()) << check;
    absl::StatusOr<std::vector<MigrationState>> states = migrator.Status();
    EXPECT_TRUE(states.ok()) << states.status();
    absl::Status up = migrator.Up();
    EXPECT_TRUE(up.ok()) << up;
  } catch (const std::exception& error) {
    ADD_FAILURE() << "the Migrator threw instead of returning a status: " << error.what();
  }
  EXPECT_TRUE((*ds)->Ping().ok());
}

TEST_P(MigrationsTest, ConcurrentUpFromEightProcessesAppliesEachMigrationOnce) {
  if (!is_postgres()) {
    GTEST_SKIP() << "concurrent migration uses PostgreSQL advisory locks";
  }
  const std::string target = url();
  constexpr int kProcesses = 8;
  std::fflush(nullptr);  // children must not flush a copy of our buffers
  std::vector<pid_t> children;
  for (int i = 0; i < kProcesses; ++i) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) {
      absl::StatusOr<Migrator> migrator = Migrator::ForUrl(target);
      absl::Status status = migrator.ok() ? migrator->Up() : migrator.status();
      if (!status.ok()) std::fprintf(stderr, "child %d: %s\n", i, status.ToString().c_str());
      std::fflush(stderr);
      _exit(status.ok() ? 0 : 1);
    }
    children.push_back(pid);
  }
  for (const pid_t pid : children) {
    int wstatus = 0;
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    EXPECT_TRUE(WIFEXITED(wstatus)) << "child " << pid << " did not exit normally";
    EXPECT_EQ(WEXITSTATUS(wstatus), 0) << "child " << pid << " failed to migrate";
  }

  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM schema_version").value_or(-1),
            static_cast<std::int64_t>(embedded_.size()));
  for (const Migration& m : embedded_) {
    EXPECT_EQ(
        QueryInt(absl::StrCat("SELECT COUNT(*) FROM schema_version WHERE version = ", m.version))
            .value_or(-1),
        1)
        << m.name;
  }
  Migrator migrator = Embedded();
  ExpectAllApplied(migrator, /*applied=*/true);
  EXPECT_TRUE(migrator.CheckCurrent().ok());
  absl::StatusOr<std::unique_ptr<Datastore>> ds = Open();
  ASSERT_TRUE(ds.ok()) << ds.status();
  Populate(**ds);
}

INSTANTIATE_TEST_SUITE_P(Engines, MigrationsTest,
                         ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"}),
                         NameGen());

}  // namespace
}  // namespace modelvault::conformance
