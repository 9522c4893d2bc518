#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace modelvault::storage {

// One numbered migration: migrations/<engine>/NNNN_name.{up,down}.sql.
struct Migration {
  std::int64_t version = 0;
  std::string name;  // "0001_catalog"
  std::string up;
  std::string down;
  std::string checksum;  // SHA-256 of `up`, hex
};

// The migrations compiled into the binary for an engine ("postgresql" or
// "sqlite3"), in version order.
absl::StatusOr<std::vector<Migration>> EmbeddedMigrations(absl::string_view engine);

struct MigrationState {
  Migration migration;  // the binary's copy; only version/name for unknown ones
  bool applied = false;
  bool known = true;        // the binary has this migration
  bool checksum_ok = true;  // the applied checksum matches the binary's
  std::optional<absl::Time> applied_time;
};

// Runs migrations against the database at `url` with its own connection.
// On PostgreSQL a session advisory lock serializes concurrent runners, and
// every migration re-checks inside its transaction that no one applied it.
class Migrator final {
 public:
  // Uses the embedded migrations of the URL's engine.
  static absl::StatusOr<Migrator> ForUrl(absl::string_view url);
  // Uses the given migrations (tests).
  static absl::StatusOr<Migrator> ForUrl(absl::string_view url, std::vector<Migration> migrations);

  // Applies every pending migration (up to `target` when set). Refuses when an
  // applied migration was edited or the database is newer than the binary.
  absl::Status Up(std::optional<std::int64_t> target = std::nullopt);
  // Reverts the last `steps` applied migrations.
  absl::Status Down(int steps = 1);
  absl::StatusOr<std::vector<MigrationState>> Status();
  // OK only when the database has exactly this binary's migrations.
  absl::Status CheckCurrent();
  std::int64_t LatestVersion() const;

 private:
  Migrator(std::string url, std::vector<Migration> migrations)
      : url_(std::move(url)), migrations_(std::move(migrations)) {}

  std::string url_;
  std::vector<Migration> migrations_;
};

// Splits a SQL script into statements on `;` at line ends, outside `$$`
// blocks; comments and blank lines are dropped.
std::vector<std::string> SplitSqlStatements(absl::string_view script);

std::string Sha256Hex(absl::string_view data);

}  // namespace modelvault::storage
