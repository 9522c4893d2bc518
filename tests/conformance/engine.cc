#include "tests/conformance/engine.h"

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "soci/postgresql/soci-postgresql.h"
#include "soci/soci.h"
#include "soci/sqlite3/soci-sqlite3.h"
#include "storage/migrate.h"

namespace modelvault::conformance {
namespace {

constexpr absl::string_view kPostgresScheme = "postgresql://";
constexpr absl::string_view kSqliteScheme = "sqlite3://";

std::string Getenv(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

// Opens a SOCI session for a modelvault database URL. The backend factories are used
// directly rather than registered by name: SOCI refuses to (re-)register a backend while
// any session of it is open, and a test often holds a Datastore while it queries.
void OpenSession(soci::session& session, const std::string& url) {
  if (absl::StartsWith(url, kPostgresScheme)) {
    session.open(*soci::factory_postgresql(), url.substr(kPostgresScheme.size()));
  } else if (absl::StartsWith(url, kSqliteScheme)) {
    session.open(*soci::factory_sqlite3(), url.substr(kSqliteScheme.size()));
  } else {
    throw soci::soci_error("unsupported database URL " + url);
  }
}

// `url` (postgresql://k=v k=v ...) with its dbname replaced by (or set to) `dbname`.
std::string WithDbname(const std::string& url, const std::string& dbname) {
  std::vector<std::string> parts =
      absl::StrSplit(url.substr(kPostgresScheme.size()), ' ', absl::SkipEmpty());
  bool replaced = false;
  for (std::string& part : parts) {
    if (absl::StartsWith(part, "dbname=")) {
      part = absl::StrCat("dbname=", dbname);
      replaced = true;
    }
  }
  if (!replaced) parts.push_back(absl::StrCat("dbname=", dbname));
  return absl::StrCat(kPostgresScheme, absl::StrJoin(parts, " "));
}

class SqliteDatabase final : public TestDatabase {
 public:
  explicit SqliteDatabase(std::filesystem::path dir)
      : dir_(std::move(dir)),
        url_(absl::StrCat(kSqliteScheme, "db=", (dir_ / "test.db").string())) {}
  ~SqliteDatabase() override {
    std::error_code error;
    std::filesystem::remove_all(dir_, error);
    if (error)
      ADD_FAILURE() << "cannot remove the test database folder " << dir_ << ": " << error.message();
  }
  const std::string& url() const override { return url_; }

 private:
  std::filesystem::path dir_;
  std::string url_;
};

class PostgresDatabase final : public TestDatabase {
 public:
  PostgresDatabase(std::string admin_url, std::string dbname)
      : admin_url_(std::move(admin_url)),
        dbname_(std::move(dbname)),
        url_(WithDbname(admin_url_, dbname_)) {}
  ~PostgresDatabase() override {
    // FORCE ends connections a test may have left open (a leaked pool, a killed child).
    try {
      soci::session admin;
      OpenSession(admin, admin_url_);
      admin << "DROP DATABASE IF EXISTS " << dbname_ << " WITH (FORCE)";
    } catch (const soci::soci_error& error) {
      ADD_FAILURE() << "cannot drop the test database " << dbname_ << ": " << error.what();
    }
  }
  const std::string& url() const override { return url_; }

 private:
  std::string admin_url_;
  std::string dbname_;
  std::string url_;
};

absl::StatusOr<std::unique_ptr<TestDatabase>> CreateSqlite() {
  std::string pattern = (std::filesystem::temp_directory_path() / "mvtest-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp(", pattern, ") failed"));
  }
  return std::make_unique<SqliteDatabase>(std::filesystem::path(pattern));
}

absl::StatusOr<std::unique_ptr<TestDatabase>> CreatePostgres() {
  const std::string admin_url = Getenv("MODELVAULT_TEST_POSTGRES_URL");
  if (admin_url.empty()) {
    return absl::FailedPreconditionError(
        "MODELVAULT_TEST_POSTGRES_URL is not set: run the tests with `make test`, or start a "
        "server with `scripts/pg.sh start build/pg && source build/pg/env` (set "
        "MODELVAULT_TEST_SKIP_POSTGRES=1 to skip the PostgreSQL cases instead)");
  }
  if (!absl::StartsWith(admin_url, kPostgresScheme)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MODELVAULT_TEST_POSTGRES_URL must start with postgresql://, got ", admin_url));
  }
  const std::string dbname = absl::StrCat("mvtest_", RandomHex(8));
  try {
    soci::session admin;
    OpenSession(admin, admin_url);
    // C collation: string order is byte order on every server, as on SQLite.
    admin << "CREATE DATABASE " << dbname
          << " TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'";
  } catch (const soci::soci_error& error) {
    return absl::UnavailableError(absl::StrCat("cannot create a test database on ", admin_url,
                                               " (is the server running?): ", error.what()));
  }
  return std::make_unique<PostgresDatabase>(admin_url, dbname);
}

}  // namespace

std::string RandomHex(int bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::random_device device;
  std::string out;
  for (int i = 0; i < bytes; ++i) {
    const unsigned value = device() & 0xff;
    out.push_back(kDigits[value >> 4]);
    out.push_back(kDigits[value & 0xf]);
  }
  return out;
}

bool SkipPostgres() { return Getenv("MODELVAULT_TEST_SKIP_POSTGRES") == "1"; }

absl::StatusOr<std::unique_ptr<TestDatabase>> CreateTestDatabase(const std::string& engine) {
  if (engine == "sqlite") return CreateSqlite();
  if (engine == "postgres") return CreatePostgres();
  return absl::InvalidArgumentError(absl::StrCat("unknown engine \"", engine, "\""));
}

absl::StatusOr<std::int64_t> QueryInt(const std::string& url, const std::string& sql) {
  try {
    soci::session session;
    OpenSession(session, url);
    long long value = 0;  // NOLINT(google-runtime-int): SOCI's 64-bit type
    session << sql, soci::into(value);
    if (!session.got_data()) return absl::NotFoundError(absl::StrCat("no row from: ", sql));
    return static_cast<std::int64_t>(value);
  } catch (const soci::soci_error& error) {
    return absl::InternalError(absl::StrCat(sql, ": ", error.what()));
  }
}

absl::Status ExecuteSql(const std::string& url, const std::string& sql) {
  try {
    soci::session session;
    OpenSession(session, url);
    session << sql;
    return absl::OkStatus();
  } catch (const soci::soci_error& error) {
    return absl::InternalError(absl::StrCat(sql, ": ", error.what()));
  }
}

void EngineTest::SetUp() {
  if (is_postgres() && SkipPostgres()) {
    GTEST_SKIP() << "PostgreSQL case skipped because MODELVAULT_TEST_SKIP_POSTGRES=1";
  }
  absl::StatusOr<std::unique_ptr<TestDatabase>> database = CreateTestDatabase(GetParam().name);
  if (!database.ok()) GTEST_FAIL() << database.status();
  database_ = *std::move(database);
}

const std::string& EngineTest::url() const {
  static const std::string kNone;
  return database_ == nullptr ? kNone : database_->url();
}

absl::StatusOr<std::unique_ptr<storage::Datastore>> EngineTest::OpenMigrated(
    const storage::DatastoreOptions& options) {
  absl::StatusOr<storage::Migrator> migrator = storage::Migrator::ForUrl(url());
  if (!migrator.ok()) return migrator.status();
  if (absl::Status status = migrator->Up(); !status.ok()) return status;
  return storage::OpenDatastore(url(), options);
}

absl::StatusOr<std::unique_ptr<storage::Datastore>> EngineTest::Open(
    const storage::DatastoreOptions& options) {
  return storage::OpenDatastore(url(), options);
}

absl::StatusOr<bool> EngineTest::TableExists(const std::string& table) const {
  const std::string sql =
      is_postgres()
          ? absl::StrCat(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = "
                "current_schema() AND table_name = '",
                table, "'")
          : absl::StrCat("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '",
                         table, "'");
  absl::StatusOr<std::int64_t> count = QueryInt(sql);
  if (!count.ok()) return count.status();
  return *count > 0;
}

}  // namespace modelvault::conformance
