// The database engine parameter of the storage conformance suites, and a fixture that gives
// every test a fresh, empty, isolated database of that engine:
//
//   sqlite    a new file in a fresh temporary directory, removed after the test
//   postgres  a new database `mvtest_<random hex>` on the server named by
//             MODELVAULT_TEST_POSTGRES_URL (exported by `make test` and scripts/pg.sh),
//             dropped after the test
//
// Without MODELVAULT_TEST_POSTGRES_URL the PostgreSQL cases fail (telling how to start a
// server). MODELVAULT_TEST_SKIP_POSTGRES=1 skips them instead.
//
// Usage:
//   class MyTest : public EngineTest {};
//   TEST_P(MyTest, Works) { auto ds = OpenMigrated(); ASSERT_TRUE(ds.ok()); ... }
//   INSTANTIATE_TEST_SUITE_P(Engines, MyTest,
//                            ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"}),
//                            NameGen());
// (or ::testing::Values(...) → AllEngines()). PostgreSQL databases use C collation, so
// string order is byte order on both engines.
#pragma once

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "google/protobuf/message.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "storage/storage.h"

namespace modelvault::conformance {

struct EngineParam {
  std::string name;  // "sqlite" or "postgres"
};

inline void PrintTo(const EngineParam& param, std::ostream* os) { *os << param.name; }

// Test-name suffix of a parameter: "sqlite" or "postgres".
struct NameGen {
  std::string operator()(const ::testing::TestParamInfo<EngineParam>& info) const {
    return info.param.name;
  }
};

// Both engines, for INSTANTIATE_TEST_SUITE_P.
inline auto AllEngines() {
  return ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"});
}

// One throwaway database; removed (dropped) on destruction.
class TestDatabase {
 public:
  virtual ~TestDatabase() = default;
  // The modelvault database URL (sqlite3://... or postgresql://...).
  virtual const std::string& url() const = 0;
};

// Creates a fresh database of `engine`. On PostgreSQL without a server URL in the
// environment, returns FAILED_PRECONDITION telling how to get one.
absl::StatusOr<std::unique_ptr<TestDatabase>> CreateTestDatabase(const std::string& engine);

// `bytes` random bytes as lower-case hex (unique names, canaries).
std::string RandomHex(int bytes);

// Whether MODELVAULT_TEST_SKIP_POSTGRES=1 is set.
bool SkipPostgres();

// Runs a query returning one integer (e.g. "SELECT COUNT(*) FROM t") on `url` with a
// connection of its own.
absl::StatusOr<std::int64_t> QueryInt(const std::string& url, const std::string& sql);
// Runs a statement on `url` with a connection of its own.
absl::Status ExecuteSql(const std::string& url, const std::string& sql);

// Matches a protobuf message equal (MessageDifferencer::Equals) to `expected`.
MATCHER_P(EqualsProto, expected, "equals " + expected.ShortDebugString()) {
  if (google::protobuf::util::MessageDifferencer::Equals(arg, expected)) return true;
  *result_listener << "which is " << arg.ShortDebugString();
  return false;
}

// The fixture base: SetUp creates the database (or fails / skips the PostgreSQL case);
// the database is dropped when the fixture is destroyed, after every member of a derived
// fixture (such as an open Datastore) is gone.
//
// A derived SetUp must start with:
//   EngineTest::SetUp();
//   if (IsSkipped() || HasFatalFailure()) return;
class EngineTest : public ::testing::TestWithParam<EngineParam> {
 protected:
  void SetUp() override;

  bool is_postgres() const { return GetParam().name == "postgres"; }
  bool is_sqlite() const { return GetParam().name == "sqlite"; }
  const std::string& url() const;

  // Migrates the test database up (Migrator::ForUrl(url())->Up()) and opens it.
  absl::StatusOr<std::unique_ptr<storage::Datastore>> OpenMigrated(
      const storage::DatastoreOptions& options = {});
  // Opens the test database without migrating it.
  absl::StatusOr<std::unique_ptr<storage::Datastore>> Open(
      const storage::DatastoreOptions& options = {});

  absl::StatusOr<std::int64_t> QueryInt(const std::string& sql) const {
    return conformance::QueryInt(url(), sql);
  }
  // Whether `table` exists in the test database.
  absl::StatusOr<bool> TableExists(const std::string& table) const;

 private:
  std::unique_ptr<TestDatabase> database_;
};

}  // namespace modelvault::conformance
