#include "storage/sql/dialect.h"

#include "absl/strings/match.h"
#include "soci/postgresql/soci-postgresql.h"
#include "soci/sqlite3/soci-sqlite3.h"

namespace modelvault::storage {

void RegisterSociBackends() {
  static const bool registered = [] {
    soci::register_factory_postgresql();
    soci::register_factory_sqlite3();
    return true;
  }();
  (void)registered;
}

absl::StatusOr<std::unique_ptr<Dialect>> DialectForUrl(absl::string_view url) {
  RegisterSociBackends();
  if (absl::StartsWith(url, "postgresql://")) return MakePostgresDialect();
  if (absl::StartsWith(url, "sqlite3://")) return MakeSqliteDialect();
  return absl::InvalidArgumentError(
      "database URL must start with sqlite3:// (sqlite3://db=PATH) or postgresql:// "
      "(postgresql://host=H port=P dbname=D user=U)");
}

}  // namespace modelvault::storage
