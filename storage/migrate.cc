#include "storage/migrate.h"

#include <sodium.h>

#include <algorithm>
#include <map>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "soci/postgresql/soci-postgresql.h"
#include "soci/soci.h"
#include "soci/sqlite3/soci-sqlite3.h"
#include "storage/embedded_files.h"
#include "storage/sql/dialect.h"

namespace modelvault::storage {
namespace {

constexpr absl::string_view kCreateVersionTable =
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, "
    "applied_time BIGINT NOT NULL)";

struct Applied {
  std::string name;
  std::string checksum;
  std::int64_t applied_micros = 0;
};

// A connection of the migrator's own, with its dialect.
struct Connection {
  std::unique_ptr<Dialect> dialect;
  soci::session session;
};

absl::StatusOr<std::unique_ptr<Connection>> Connect(absl::string_view url) {
  absl::StatusOr<std::unique_ptr<Dialect>> dialect = DialectForUrl(url);
  if (!dialect.ok()) return dialect.status();
  auto conn = std::make_unique<Connection>();
  conn->dialect = *std::move(dialect);
  try {
    conn->session.open(std::string(conn->dialect->engine()), conn->dialect->ConnectString(url));
    conn->dialect->OnConnect(conn->session);
  } catch (const soci::soci_error& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot connect to the database: ", conn->dialect->MapError(e).message()));
  }
  return conn;
}

absl::StatusOr<std::map<std::int64_t, Applied>> ReadApplied(Connection& conn) {
  std::map<std::int64_t, Applied> applied;
  long long exists = 0;  // NOLINT(google-runtime-int)
  std::string table = "schema_version";
  conn.session << conn.dialect->TableExistsQuery(), soci::use(table), soci::into(exists);
  if (exists == 0) return applied;
  long long version = 0;  // NOLINT(google-runtime-int)
  long long micros = 0;   // NOLINT(google-runtime-int)
  Applied row;
  soci::statement st =
      (conn.session.prepare << "SELECT version, name, checksum, applied_time FROM schema_version "
                               "ORDER BY version",
       soci::into(version), soci::into(row.name), soci::into(row.checksum), soci::into(micros));
  st.execute();
  while (st.fetch()) {
    row.applied_micros = micros;
    applied[version] = row;
  }
  return applied;
}

// Checks that what is applied is a prefix of what the binary knows, unedited.
absl::Status Verify(const std::vector<Migration>& known,
                    const std::map<std::int64_t, Applied>& applied) {
  for (const auto& entry : applied) {
    const std::int64_t version = entry.first;
    const Applied& row = entry.second;
    auto it = std::find_if(known.begin(), known.end(),
                           [version](const Migration& m) { return m.version == version; });
    if (it == known.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the database has migration ", row.name,
                       ", which this binary does not know (it knows up to ",
                       known.empty() ? 0 : known.back().version, "): upgrade modelvault"));
    }
    if (it->checksum != row.checksum) {
      return absl::FailedPreconditionError(
          absl::StrCat("migration ", row.name,
                       " was edited after it was applied (checksum differs); restore the original "
                       "file and add a new migration instead"));
    }
  }
  return absl::OkStatus();
}

void RunScript(soci::session& session, absl::string_view script) {
  for (const std::string& statement : SplitSqlStatements(script)) session << statement;
}

template <typename F>
absl::Status Guarded(Connection& conn, F&& body) {
  try {
    return body();
  } catch (const soci::soci_error& e) {
    try {
      conn.session << "ROLLBACK";
    } catch (const soci::soci_error&) {
    }
    absl::Status mapped = conn.dialect->MapError(e);
    return absl::Status(mapped.code(), absl::StrCat("migration failed: ", e.what()));
  }
}

// Runs `body` holding the migration lock.
template <typename F>
absl::Status Locked(Connection& c, F&& body) {
  return Guarded(c, [&]() -> absl::Status {
    c.dialect->LockMigrations(c.session);
    absl::Cleanup unlock = [&c] {
      try {
        c.dialect->UnlockMigrations(c.session);
      } catch (const soci::soci_error&) {
        // The lock dies with the connection anyway.
      }
    };
    return body();
  });
}

}  // namespace

std::string Sha256Hex(absl::string_view data) {
  static const bool initialized = sodium_init() >= 0;
  (void)initialized;
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256(digest, reinterpret_cast<const unsigned char*>(data.data()), data.size());
  char hex[crypto_hash_sha256_BYTES * 2 + 1];
  sodium_bin2hex(hex, sizeof(hex), digest, sizeof(digest));
  return std::string(hex);
}

std::vector<std::string> SplitSqlStatements(absl::string_view script) {
  std::vector<std::string> out;
  std::string current;
  bool in_dollar = false;
  for (absl::string_view line : absl::StrSplit(script, '\n')) {
    absl::string_view trimmed = absl::StripAsciiWhitespace(line);
    if (!in_dollar && (trimmed.empty() || absl::StartsWith(trimmed, "--"))) continue;
    for (size_t pos = line.find("$$"); pos != absl::string_view::npos;
         pos = line.find("$$", pos + 2)) {
      in_dollar = !in_dollar;
    }
    absl::StrAppend(&current, line, "\n");
    if (!in_dollar && absl::EndsWith(trimmed, ";")) {
      absl::string_view body = absl::StripAsciiWhitespace(current);
      body.remove_suffix(1);
      out.emplace_back(body);
      current.clear();
    }
  }
  if (!absl::StripAsciiWhitespace(current).empty()) {
    out.emplace_back(absl::StripAsciiWhitespace(current));
  }
  return out;
}

absl::StatusOr<std::vector<Migration>> EmbeddedMigrations(absl::string_view engine) {
  const std::string prefix =
      absl::StrCat("migrations/", engine == "postgresql" ? "postgres" : "sqlite", "/");
  std::map<std::int64_t, Migration> by_version;
  for (const auto& [path, content] : EmbeddedFiles()) {
    if (!absl::StartsWith(path, prefix)) continue;
    absl::string_view file = path.substr(prefix.size());
    const bool up = absl::EndsWith(file, ".up.sql");
    if (!up && !absl::EndsWith(file, ".down.sql")) continue;
    absl::string_view name = file.substr(0, file.size() - (up ? 7 : 9));
    std::int64_t version = 0;
    if (!absl::SimpleAtoi(name.substr(0, name.find('_')), &version)) {
      return absl::InternalError(absl::StrCat("bad migration file name ", path));
    }
    Migration& m = by_version[version];
    m.version = version;
    m.name = std::string(name);
    (up ? m.up : m.down) = std::string(content);
  }
  std::vector<Migration> out;
  for (auto& [version, m] : by_version) {
    if (m.up.empty() || m.down.empty()) {
      return absl::InternalError(absl::StrCat("migration ", m.name, " lacks its up or down file"));
    }
    m.checksum = Sha256Hex(m.up);
    out.push_back(std::move(m));
  }
  return out;
}

absl::StatusOr<Migrator> Migrator::ForUrl(absl::string_view url) {
  absl::StatusOr<std::unique_ptr<Dialect>> dialect = DialectForUrl(url);
  if (!dialect.ok()) return dialect.status();
  absl::StatusOr<std::vector<Migration>> migrations = EmbeddedMigrations((*dialect)->engine());
  if (!migrations.ok()) return migrations.status();
  return Migrator(std::string(url), *std::move(migrations));
}

absl::StatusOr<Migrator> Migrator::ForUrl(absl::string_view url,
                                          std::vector<Migration> migrations) {
  for (Migration& m : migrations) m.checksum = Sha256Hex(m.up);
  std::sort(migrations.begin(), migrations.end(),
            [](const Migration& a, const Migration& b) { return a.version < b.version; });
  return Migrator(std::string(url), std::move(migrations));
}

std::int64_t Migrator::LatestVersion() const {
  return migrations_.empty() ? 0 : migrations_.back().version;
}

absl::Status Migrator::Up(std::optional<std::int64_t> target) {
  absl::StatusOr<std::unique_ptr<Connection>> conn = Connect(url_);
  if (!conn.ok()) return conn.status();
  Connection& c = **conn;
  return Locked(c, [&]() -> absl::Status {
    c.session << std::string(kCreateVersionTable);
    absl::StatusOr<std::map<std::int64_t, Applied>> applied = ReadApplied(c);
    if (!applied.ok()) return applied.status();
    if (absl::Status s = Verify(migrations_, *applied); !s.ok()) return s;
    for (const Migration& m : migrations_) {
      if (target.has_value() && m.version > *target) break;
      if (applied->count(m.version) > 0) continue;
      c.session << std::string(c.dialect->BeginWrite());
      long long done = 0;             // NOLINT(google-runtime-int)
      long long version = m.version;  // NOLINT(google-runtime-int)
      c.session << "SELECT COUNT(*) FROM schema_version WHERE version = :v", soci::use(version),
          soci::into(done);
      if (done > 0) {  // another runner applied it meanwhile
        c.session << "ROLLBACK";
        continue;
      }
      RunScript(c.session, m.up);
      long long now = absl::ToUnixMicros(absl::Now());  // NOLINT(google-runtime-int)
      c.session << "INSERT INTO schema_version (version, name, checksum, applied_time) "
                   "VALUES (:v, :n, :c, :t)",
          soci::use(version), soci::use(m.name), soci::use(m.checksum), soci::use(now);
      c.session << "COMMIT";
    }
    return absl::OkStatus();
  });
}

absl::Status Migrator::Down(int steps) {
  absl::StatusOr<std::unique_ptr<Connection>> conn = Connect(url_);
  if (!conn.ok()) return conn.status();
  Connection& c = **conn;
  return Locked(c, [&]() -> absl::Status {
    absl::StatusOr<std::map<std::int64_t, Applied>> applied = ReadApplied(c);
    if (!applied.ok()) return applied.status();
    if (absl::Status s = Verify(migrations_, *applied); !s.ok()) return s;
    for (auto it = applied->rbegin(); it != applied->rend() && steps > 0; ++it, --steps) {
      const auto m = std::find_if(migrations_.begin(), migrations_.end(),
                                  [&](const Migration& x) { return x.version == it->first; });
      c.session << std::string(c.dialect->BeginWrite());
      RunScript(c.session, m->down);
      long long version = m->version;  // NOLINT(google-runtime-int)
      c.session << "DELETE FROM schema_version WHERE version = :v", soci::use(version);
      c.session << "COMMIT";
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<MigrationState>> Migrator::Status() {
  absl::StatusOr<std::unique_ptr<Connection>> conn = Connect(url_);
  if (!conn.ok()) return conn.status();
  Connection& c = **conn;
  std::vector<MigrationState> out;
  absl::Status status = Guarded(c, [&]() -> absl::Status {
    absl::StatusOr<std::map<std::int64_t, Applied>> applied = ReadApplied(c);
    if (!applied.ok()) return applied.status();
    for (const Migration& m : migrations_) {
      MigrationState state;
      state.migration = m;
      auto it = applied->find(m.version);
      if (it != applied->end()) {
        state.applied = true;
        state.checksum_ok = it->second.checksum == m.checksum;
        state.applied_time = absl::FromUnixMicros(it->second.applied_micros);
      }
      out.push_back(std::move(state));
    }
    for (const auto& entry : *applied) {
      const std::int64_t version = entry.first;
      const Applied& row = entry.second;
      if (std::any_of(migrations_.begin(), migrations_.end(),
                      [version](const Migration& m) { return m.version == version; })) {
        continue;
      }
      MigrationState state;
      state.migration.version = version;
      state.migration.name = row.name;
      state.applied = true;
      state.known = false;
      state.applied_time = absl::FromUnixMicros(row.applied_micros);
      out.push_back(std::move(state));
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return out;
}

absl::Status Migrator::CheckCurrent() {
  absl::StatusOr<std::vector<MigrationState>> states = Status();
  if (!states.ok()) return states.status();
  std::int64_t db_version = 0;
  for (const MigrationState& s : *states) {
    if (!s.applied) continue;
    db_version = std::max(db_version, s.migration.version);
    if (!s.known) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the database schema is at version ", s.migration.version,
          ", newer than this binary knows (", LatestVersion(), "): upgrade modelvault"));
    }
    if (!s.checksum_ok) {
      return absl::FailedPreconditionError(absl::StrCat(
          "migration ", s.migration.name, " was edited after it was applied (checksum differs)"));
    }
  }
  for (const MigrationState& s : *states) {
    if (!s.applied) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the database schema is at version ", db_version, " but this binary needs version ",
          LatestVersion(), ": run `modelvault migrate up` or start with --migrate"));
    }
  }
  return absl::OkStatus();
}

}  // namespace modelvault::storage
