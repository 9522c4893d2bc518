#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/log.h"

namespace modelvault::server {

// Flags of a subcommand: `--name value` or `--name=value`, each with an
// environment fallback MODELVAULT_<NAME> (dashes become underscores).
// Positional arguments are kept in order.
class Flags final {
 public:
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args,
                                     const std::vector<std::string>& known,
                                     const std::vector<std::string>& boolean = {});

  // The flag's value, else the environment's, else `fallback`.
  std::string Get(absl::string_view name, absl::string_view fallback = "") const;
  bool Has(absl::string_view name) const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::map<std::string, std::string, std::less<>> values_;
  std::vector<std::string> positional_;
};

inline constexpr absl::string_view kDefaultDatabase = "sqlite3://db=modelvault.db";
inline constexpr absl::string_view kDefaultListen = "127.0.0.1:50051";

struct ServeConfig {
  std::string listen = std::string(kDefaultListen);  // host:port or unix:PATH
  std::string database = std::string(kDefaultDatabase);
  LogLevel log_level = LogLevel::kInfo;
  LogFormat log_format = LogFormat::kText;
  absl::Duration shutdown_timeout = absl::Seconds(10);
  bool migrate = true;    // default: on for SQLite, off for PostgreSQL
  std::string port_file;  // write the bound port here (tests)
  int executor_threads = 8;
  int pool_size = 8;
  absl::Duration feed_poll = absl::Milliseconds(200);
  int max_message_bytes = 4 << 20;
  // Secrets: the master-key file (else MODELVAULT_MASTER_KEY holds the key
  // lines), and where the bootstrap admin key is written.
  std::string master_key_file;
  std::string admin_key_file;
  // Provider keys.
  std::string key_time_zone = "UTC";
  std::string secret_file_dir;  // file: references only under here ("" = off)
  int max_keys_per_provider = 100;
  absl::Duration key_flush = absl::Milliseconds(100);
  // Usage: how often replicas look for each other's records (this
  // replica's own wake the watchers at once), and how long raw records stay.
  absl::Duration usage_poll = absl::Milliseconds(20);
  int usage_retention_days = 90;
  int usage_writers = 2;  // PostgreSQL; SQLite has one writer
  // TLS: certificate chain and key (PEM); with a client CA, clients must
  // present a certificate it signed (mTLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
};

absl::StatusOr<ServeConfig> ParseServeConfig(const std::vector<std::string>& args);

// The usage text of `modelvault serve`.
extern const char kServeUsage[];

}  // namespace modelvault::server
