#include <memory>
#include <string>
#include <variant>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "soci/postgresql/soci-postgresql.h"
#include "storage/sql/dialect.h"

namespace modelvault::storage {
namespace {

// Arbitrary constants naming modelvault's advisory locks.
constexpr long long kChangeFeedLock = 0x6d76'0001;  // "mv" 1
constexpr long long kMigrationLock = 0x6d76'0002;   // "mv" 2

struct ResultDeleter {
  void operator()(PGresult* result) const { PQclear(result); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

[[noreturn]] void ThrowResult(const PGresult* result, PGconn* conn) {
  const char* state = result != nullptr ? PQresultErrorField(result, PG_DIAG_SQLSTATE) : nullptr;
  // No SQLSTATE: the connection failed (class 08 maps to UNAVAILABLE).
  throw soci::postgresql_soci_error(
      result != nullptr ? PQresultErrorMessage(result) : PQerrorMessage(conn),
      state != nullptr ? state : "08006");
}

// One row in COPY's text format: tab-separated, \N for NULL, with
// backslash, tab, newline and carriage return escaped.
void AppendCopyRow(std::string& out, const SqlRow& row) {
  for (size_t i = 0; i < row.size(); ++i) {
    if (i > 0) out.push_back('\t');
    const SqlCell& cell = row[i];
    if (!cell.has_value()) {
      out.append("\\N");
    } else if (const auto* n = std::get_if<std::int64_t>(&*cell)) {
      absl::StrAppend(&out, *n);
    } else {
      for (const char c : std::get<std::string>(*cell)) {
        switch (c) {
          case '\\':
            out.append("\\\\");
            break;
          case '\t':
            out.append("\\t");
            break;
          case '\n':
            out.append("\\n");
            break;
          case '\r':
            out.append("\\r");
            break;
          default:
            out.push_back(c);
        }
      }
    }
  }
  out.push_back('\n');
}

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
  void CopyRows(soci::session& session, absl::string_view table, absl::string_view columns,
                const std::vector<SqlRow>& rows) const override {
    PGconn* conn = static_cast<soci::postgresql_session_backend*>(session.get_backend())->conn_;
    Result start(PQexec(conn, absl::StrCat("COPY ", table, " (", columns, ") FROM STDIN").c_str()));
    if (PQresultStatus(start.get()) != PGRES_COPY_IN) ThrowResult(start.get(), conn);
    constexpr size_t kChunk = size_t{256} * 1024;
    std::string buffer;
    buffer.reserve(kChunk + 4096);
    bool sent = true;
    for (size_t r = 0; r < rows.size() && sent; ++r) {
      AppendCopyRow(buffer, rows[r]);
      if (buffer.size() >= kChunk || r + 1 == rows.size()) {
        sent = PQputCopyData(conn, buffer.data(), static_cast<int>(buffer.size())) == 1;
        buffer.clear();
      }
    }
    // Ending the COPY (or aborting it after a failed send) yields its result;
    // every result is read so that the connection can roll back.
    PQputCopyEnd(conn, sent ? nullptr : "the client failed to send the rows");
    Result end(PQgetResult(conn));
    while (PGresult* extra = PQgetResult(conn)) PQclear(extra);
    if (end == nullptr || PQresultStatus(end.get()) != PGRES_COMMAND_OK) {
      ThrowResult(end.get(), conn);
    }
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
