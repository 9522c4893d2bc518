#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "soci/soci.h"
#include "storage/storage.h"

// The few things that differ between PostgreSQL and SQLite, behind one
// interface; everything else in storage/sql is shared.
namespace modelvault::storage {

class Dialect {
 public:
  virtual ~Dialect() = default;

  virtual absl::string_view engine() const = 0;
  virtual Features features() const = 0;
  // The SOCI connect string for a modelvault database URL.
  virtual std::string ConnectString(absl::string_view url) const = 0;
  // Session settings applied after every (re)connect.
  virtual void OnConnect(soci::session& session) const = 0;
  // Statements that open a write and a read-only transaction.
  virtual absl::string_view BeginWrite() const = 0;
  virtual absl::string_view BeginRead() const = 0;
  // Suffix of a SELECT that locks the rows read until commit.
  virtual absl::string_view ForUpdate() const = 0;
  // Serializes change-feed appends until commit, so that seq order equals
  // commit order and readers never see seq N+1 before seq N.
  virtual void LockChangeFeed(soci::session& session) const = 0;
  // Serializes transactions that carry the same request_id until commit.
  virtual void LockRequestId(soci::session& session, const std::string& request_id) const = 0;
  // Session-wide lock held while migrating (many replicas may start at once).
  virtual void LockMigrations(soci::session& session) const = 0;
  virtual void UnlockMigrations(soci::session& session) const = 0;
  // Bulk insert behind ReadWriteTx::CopyRows, through the driver's native
  // connection (SOCI has no COPY); throws soci errors like SOCI does.
  virtual void CopyRows(soci::session& session, absl::string_view table, absl::string_view columns,
                        size_t count, absl::FunctionRef<void(size_t, RowSink&)> fill) const = 0;
  // Table existence check, for the migration runner.
  virtual std::string TableExistsQuery() const = 0;
  // Maps a driver error to a status: constraint kinds, conflicts (ABORTED),
  // lost connections (UNAVAILABLE); never echoes SQL.
  virtual absl::Status MapError(const soci::soci_error& error) const = 0;
};

// Links SOCI's PostgreSQL and SQLite backends into SOCI's registry (instead
// of dlopen at run time). Idempotent and thread-safe: registering again while
// a backend is in use would throw.
void RegisterSociBackends();

// Picks the dialect from the URL scheme.
absl::StatusOr<std::unique_ptr<Dialect>> DialectForUrl(absl::string_view url);

std::unique_ptr<Dialect> MakePostgresDialect();
std::unique_ptr<Dialect> MakeSqliteDialect();

}  // namespace modelvault::storage
