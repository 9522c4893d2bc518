#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <variant>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "soci/sqlite3/soci-sqlite3.h"
#include "storage/sql/dialect.h"

namespace modelvault::storage {
namespace {

// SQLite result codes (sqlite3.h); SOCI reports the primary code.
constexpr int kSqliteBusy = 5;
constexpr int kSqliteLocked = 6;
constexpr int kSqliteConstraint = 19;
constexpr int kSqliteCantOpen = 14;

struct StatementDeleter {
  void operator()(sqlite_api::sqlite3_stmt* statement) const {
    sqlite_api::sqlite3_finalize(statement);
  }
};

[[noreturn]] void ThrowSqlite(sqlite_api::sqlite3* db, int code) {
  throw soci::sqlite3_soci_error(sqlite_api::sqlite3_errmsg(db), code);
}

// Binds a row's cells to the parameters of an INSERT, in order. Text is
// copied by SQLite (SQLITE_TRANSIENT): the caller's values may be temporaries.
class BindSink final : public RowSink {
 public:
  BindSink(sqlite_api::sqlite3* db, sqlite_api::sqlite3_stmt* statement)
      : db_(db), statement_(statement) {}

  void StartRow() { index_ = 0; }
  void Int(std::int64_t value) override {
    Check(sqlite_api::sqlite3_bind_int64(statement_, ++index_, value));
  }
  void Text(absl::string_view value) override {
    Check(sqlite_api::sqlite3_bind_text(statement_, ++index_, value.data(),
                                        static_cast<int>(value.size()), Transient()));
  }
  void Null() override { Check(sqlite_api::sqlite3_bind_null(statement_, ++index_)); }

 private:
  // SQLITE_TRANSIENT, spelled with the namespace SOCI puts sqlite3.h in.
  static sqlite_api::sqlite3_destructor_type Transient() {
    // NOLINTNEXTLINE(performance-no-int-to-ptr): SQLite's documented sentinel
    return reinterpret_cast<sqlite_api::sqlite3_destructor_type>(static_cast<std::intptr_t>(-1));
  }
  void Check(int code) const {
    if (code != SQLITE_OK) ThrowSqlite(db_, code);
  }

  sqlite_api::sqlite3* db_;
  sqlite_api::sqlite3_stmt* statement_;
  int index_ = 0;
};

class SqliteDialect final : public Dialect {
 public:
  absl::string_view engine() const override { return "sqlite3"; }
  Features features() const override { return Features{}; }
  std::string ConnectString(absl::string_view url) const override {
    std::string rest(url.substr(absl::string_view("sqlite3://").size()));
    if (!absl::StrContains(rest, "timeout=")) absl::StrAppend(&rest, " timeout=10");
    return rest;
  }
  void OnConnect(soci::session& session) const override {
    session << "PRAGMA journal_mode=WAL";
    // FULL: a commit is on disk (the WAL synced) before it is acknowledged,
    // also across power loss; NORMAL would defer that to the next checkpoint.
    session << "PRAGMA synchronous=FULL";
    session << "PRAGMA foreign_keys=ON";
    session << "PRAGMA busy_timeout=10000";
    // Filters compile `field = "abc*"` to LIKE: make it match case as PostgreSQL does.
    session << "PRAGMA case_sensitive_like=ON";
  }
  // IMMEDIATE takes the write lock up front: no deadlock on lock upgrade.
  absl::string_view BeginWrite() const override { return "BEGIN IMMEDIATE"; }
  absl::string_view BeginRead() const override { return "BEGIN"; }
  absl::string_view ForUpdate() const override { return ""; }
  // SQLite has one writer at a time: appends are already serialized.
  void LockChangeFeed(soci::session& /*session*/) const override {}
  void LockRequestId(soci::session& /*session*/, const std::string& /*request_id*/) const override {
  }
  void LockMigrations(soci::session& session) const override {
    session << "BEGIN IMMEDIATE";
    session << "COMMIT";
  }
  void UnlockMigrations(soci::session& /*session*/) const override {}
  void CopyRows(soci::session& session, absl::string_view table, absl::string_view columns,
                size_t count, absl::FunctionRef<void(size_t, RowSink&)> fill) const override {
    sqlite_api::sqlite3* db =
        static_cast<soci::sqlite3_session_backend*>(session.get_backend())->conn_;
    const size_t width = static_cast<size_t>(std::count(columns.begin(), columns.end(), ',')) + 1;
    std::string sql = absl::StrCat("INSERT INTO ", table, " (", columns, ") VALUES (");
    for (size_t i = 0; i < width; ++i) sql.append(i == 0 ? "?" : ", ?");
    sql.push_back(')');
    sqlite_api::sqlite3_stmt* raw = nullptr;
    int code = sqlite_api::sqlite3_prepare_v2(db, sql.c_str(), static_cast<int>(sql.size()), &raw,
                                              nullptr);
    std::unique_ptr<sqlite_api::sqlite3_stmt, StatementDeleter> statement(raw);
    if (code != SQLITE_OK) ThrowSqlite(db, code);
    BindSink sink(db, raw);
    for (size_t r = 0; r < count; ++r) {
      sink.StartRow();
      fill(r, sink);
      code = sqlite_api::sqlite3_step(raw);
      if (code != SQLITE_DONE) ThrowSqlite(db, sqlite_api::sqlite3_extended_errcode(db));
      sqlite_api::sqlite3_reset(raw);
    }
  }
  std::string TableExistsQuery() const override {
    return "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = :t";
  }
  absl::Status MapError(const soci::soci_error& error) const override {
    const auto* lite = dynamic_cast<const soci::sqlite3_soci_error*>(&error);
    const int code = lite != nullptr ? (lite->result() & 0xff) : -1;
    const absl::string_view what = error.what();
    if (code == kSqliteConstraint || absl::StrContains(what, "constraint failed")) {
      if (absl::StrContains(what, "UNIQUE") || absl::StrContains(what, "PRIMARY KEY")) {
        return absl::AlreadyExistsError("the resource already exists");
      }
      if (absl::StrContains(what, "FOREIGN KEY")) {
        return absl::FailedPreconditionError("other resources still refer to this one");
      }
      return absl::InvalidArgumentError("the value breaks a database constraint");
    }
    if (code == kSqliteBusy || code == kSqliteLocked || absl::StrContains(what, "locked")) {
      return absl::AbortedError("the database is busy; retry the transaction");
    }
    if (code == kSqliteCantOpen) return absl::UnavailableError("cannot open the database file");
    return absl::InternalError(absl::StrCat("database error (SQLite code ", code, ")"));
  }
};

}  // namespace

std::unique_ptr<Dialect> MakeSqliteDialect() { return std::make_unique<SqliteDialect>(); }

}  // namespace modelvault::storage
