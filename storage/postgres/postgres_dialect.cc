#include <memory>
#include <string>
#include <variant>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "soci/postgresql/soci-postgresql.h"
#include "storage/sql/dialect.h"

namespace modelvault::storage {
namespace {

// Arbitrary constants naming modelvault's advisory locks ("mv" 1, "mv" 2);
// long long, the type SOCI binds.
constexpr long long kChangeFeedLock = 0x6d76'0001;  // NOLINT(google-runtime-int)
constexpr long long kMigrationLock = 0x6d76'0002;   // NOLINT(google-runtime-int)

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

// Rows in COPY's text format: tab-separated, \N for NULL, with backslash,
// tab, newline and carriage return escaped.
class CopyTextSink final : public RowSink {
 public:
  explicit CopyTextSink(std::string& out) : out_(out) {}

  void Int(std::int64_t value) override {
    Separate();
    absl::StrAppend(&out_, value);
  }
  void Text(absl::string_view value) override {
    Separate();
    size_t plain = 0;  // start of the run not yet appended
    for (size_t i = 0; i < value.size(); ++i) {
      char escaped = 0;
      switch (value[i]) {
        case '\\':
          escaped = '\\';
          break;
        case '\t':
          escaped = 't';
          break;
        case '\n':
          escaped = 'n';
          break;
        case '\r':
          escaped = 'r';
          break;
        default:
          continue;
      }
      out_.append(value.data() + plain, i - plain);
      out_.push_back('\\');
      out_.push_back(escaped);
      plain = i + 1;
    }
    out_.append(value.data() + plain, value.size() - plain);
  }
  void Null() override {
    Separate();
    out_.append("\\N");
  }
  void EndRow() {
    out_.push_back('\n');
    first_ = true;
  }

 private:
  void Separate() {
    if (!first_) out_.push_back('\t');
    first_ = false;
  }

  std::string& out_;
  bool first_ = true;
};

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
                size_t count, absl::FunctionRef<void(size_t, RowSink&)> fill) const override {
    PGconn* conn = static_cast<soci::postgresql_session_backend*>(session.get_backend())->conn_;
    Result start(PQexec(conn, absl::StrCat("COPY ", table, " (", columns, ") FROM STDIN").c_str()));
    if (PQresultStatus(start.get()) != PGRES_COPY_IN) ThrowResult(start.get(), conn);
    constexpr size_t kChunk = size_t{256} * 1024;
    // Kept per thread: a fresh quarter-megabyte buffer per COPY costs more in
    // malloc (and its consolidation of freed chunks) than the rows' text.
    thread_local std::string buffer;
    buffer.clear();
    CopyTextSink sink(buffer);
    bool sent = true;
    for (size_t r = 0; r < count && sent; ++r) {
      fill(r, sink);
      sink.EndRow();
      if (buffer.size() >= kChunk || r + 1 == count) {
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
