#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "soci/postgresql/soci-postgresql.h"
#include "storage/sql/dialect.h"

namespace modelvault::storage {
namespace {

// Arbitrary constants naming modelvault's advisory locks.
constexpr long long kChangeFeedLock = 0x6d76'0001;  // "mv" 1
constexpr long long kMigrationLock = 0x6d76'0002;   // "mv" 2

class PostgresDialect final : public Dialect {
 public:
  absl::string_view engine() const override { return "postgresql"; }
  Features features() const override {
    return Features{.concurrent_writers = true, .advisory_locks = true};
  }
  std::string ConnectString(absl::string_view url) const override {
    std::string rest(url.substr(absl::string_view("postgresql://").size()));
    // Fail fast instead of hanging when the server is unreachable.
    if (!absl::StrContains(rest, "connect_timeout")) absl::StrAppend(&rest, " connect_timeout=5");
    return rest;
  }
  void OnConnect(soci::session& session) const override { session << "SET TIME ZONE 'UTC'"; }
  absl::string_view BeginWrite() const override { return "BEGIN"; }
  absl::string_view BeginRead() const override {
    return "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
  }
  absl::string_view ForUpdate() const override { return " FOR UPDATE"; }
  void LockChangeFeed(soci::session& session) const override {
    session << "SELECT pg_advisory_xact_lock(" << kChangeFeedLock << ")";
  }
  void LockRequestId(soci::session& session, const std::string& request_id) const override {
    session << "SELECT pg_advisory_xact_lock(hashtextextended(:id, 0))", soci::use(request_id);
  }
  void LockMigrations(soci::session& session) const override {
    session << "SELECT pg_advisory_lock(" << kMigrationLock << ")";
  }
  void UnlockMigrations(soci::session& session) const override {
    session << "SELECT pg_advisory_unlock(" << kMigrationLock << ")";
  }
  std::string TableExistsQuery() const override {
    return "SELECT COUNT(*) FROM information_schema.tables "
           "WHERE table_schema = current_schema() AND table_name = :t";
  }
  absl::Status MapError(const soci::soci_error& error) const override {
    const auto* pg = dynamic_cast<const soci::postgresql_soci_error*>(&error);
    const std::string state = pg != nullptr ? pg->sqlstate() : "";
    if (state == "23505") return absl::AlreadyExistsError("the resource already exists");
    if (state == "23503") {
      return absl::FailedPreconditionError("other resources still refer to this one");
    }
    if (absl::StartsWith(state, "23")) {
      return absl::InvalidArgumentError("the value breaks a database constraint");
    }
    if (state == "40001" || state == "40P01") {
      return absl::AbortedError("the transaction conflicted with another; retry it");
    }
    if (absl::StartsWith(state, "08") || state == "57P01" || state == "57P02" || state == "57P03" ||
        state == "53300" || error.get_error_category() == soci::soci_error::connection_error ||
        (pg == nullptr && absl::StrContains(error.what(), "connect"))) {
      return absl::UnavailableError("the database is unreachable");
    }
    return absl::InternalError(
        absl::StrCat("database error (SQLSTATE ", state.empty() ? "none" : state, ")"));
  }
};

}  // namespace

std::unique_ptr<Dialect> MakePostgresDialect() { return std::make_unique<PostgresDialect>(); }

}  // namespace modelvault::storage
