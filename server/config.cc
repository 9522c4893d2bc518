#include "server/config.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"

namespace modelvault::server {

const char kServeUsage[] = R"(usage: modelvault serve [flags]

  --listen ADDR            host:port or unix:PATH (default 127.0.0.1:50051)   env MODELVAULT_LISTEN
  --database URL           sqlite3://db=PATH or postgresql://host=H port=P dbname=D user=U
                           (default sqlite3://db=modelvault.db)               env MODELVAULT_DATABASE
  --migrate true|false     apply pending migrations at start (default: true on SQLite, false on
                           PostgreSQL, where `modelvault migrate up` is a deploy step)
  --log-level LEVEL        debug, info, warn, error (default info)            env MODELVAULT_LOG_LEVEL
  --log-format FORMAT      text or json (default text)                        env MODELVAULT_LOG_FORMAT
  --shutdown-timeout SECS  grace for in-flight calls on SIGTERM (default 10)  env MODELVAULT_SHUTDOWN_TIMEOUT
  --port-file PATH         write the bound TCP port to PATH (useful with port 0)
  --db-pool N              database connections (default 8)
  --workers N              threads for database work (default 8)
  --feed-poll-ms N         change-feed poll interval (default 200)
  --max-message-bytes N    largest request or response (default 4194304)

Secrets and access:
  --master-key-file PATH   master keys, one "<version> <base64 32 bytes>" per line, mode 0600
                           (`modelvault master-key generate`); or the lines themselves in the
                           environment variable MODELVAULT_MASTER_KEY       env MODELVAULT_MASTER_KEY_FILE
  --admin-key-file PATH    where the first admin access key is written on an empty database
                           (default: admin.token next to the SQLite file, else ./admin.token)
  --key-time-zone TZ       calendar days of provider-key limits (default UTC)
  --max-keys-per-provider N  (default 100)
  --key-flush-ms N         how often key counters are written and shared (default 100)
  --usage-retention-days N days raw usage records are kept; rollups stay (default 90)
  --usage-poll-ms N        how often other replicas' usage records are looked for (default 20)
  --usage-writers N        concurrent usage transactions (group commits) on PostgreSQL
                           (default 2; SQLite always has one)
  --secret-file-dir DIR    provider-key secrets may be file: references to files under DIR
                           (off by default; env: references may name any variable except
                           MODELVAULT_*)

Transport:
  --tls-cert PATH --tls-key PATH   serve TLS with this certificate chain and key (PEM)
  --tls-client-ca PATH     require client certificates signed by this CA (mTLS)
  A unix:PATH listener is created with mode 0660 (owner and group).
)";

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args,
                                   const std::vector<std::string>& known,
                                   const std::vector<std::string>& boolean) {
  Flags flags;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (!absl::ConsumePrefix(&arg, "--")) {
      flags.positional_.push_back(args[i]);
      continue;
    }
    std::string name(arg.substr(0, arg.find('=')));
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    std::string value;
    if (arg.find('=') != absl::string_view::npos) {
      value = std::string(arg.substr(arg.find('=') + 1));
    } else if (std::find(boolean.begin(), boolean.end(), name) != boolean.end()) {
      value = "true";
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
    }
    flags.values_[name] = value;
  }
  return flags;
}

std::string Flags::Get(absl::string_view name, absl::string_view fallback) const {
  if (auto it = values_.find(name); it != values_.end()) return it->second;
  const std::string env =
      absl::StrCat("MODELVAULT_", absl::AsciiStrToUpper(absl::StrReplaceAll(name, {{"-", "_"}})));
  if (const char* v = std::getenv(env.c_str()); v != nullptr && *v != '\0') return v;
  return std::string(fallback);
}

bool Flags::Has(absl::string_view name) const { return values_.find(name) != values_.end(); }

absl::StatusOr<ServeConfig> ParseServeConfig(const std::vector<std::string>& args) {
  absl::StatusOr<Flags> flags = Flags::Parse(args,
                                             {"listen",
                                              "database",
                                              "migrate",
                                              "log-level",
                                              "log-format",
                                              "shutdown-timeout",
                                              "port-file",
                                              "db-pool",
                                              "workers",
                                              "feed-poll-ms",
                                              "max-message-bytes",
                                              "master-key-file",
                                              "admin-key-file",
                                              "key-time-zone",
                                              "max-keys-per-provider",
                                              "key-flush-ms",
                                              "tls-cert",
                                              "tls-key",
                                              "tls-client-ca",
                                              "secret-file-dir",
                                              "usage-poll-ms",
                                              "usage-writers",
                                              "usage-retention-days"},
                                             {"migrate"});
  if (!flags.ok()) return flags.status();
  if (!flags->positional().empty()) {
    return absl::InvalidArgumentError(absl::StrCat("unexpected argument ", flags->positional()[0]));
  }
  ServeConfig config;
  config.listen = flags->Get("listen", kDefaultListen);
  config.database = flags->Get("database", kDefaultDatabase);
  config.port_file = flags->Get("port-file");
  if (!ParseLogLevel(flags->Get("log-level", "info"), config.log_level)) {
    return absl::InvalidArgumentError("--log-level must be debug, info, warn or error");
  }
  if (!ParseLogFormat(flags->Get("log-format", "text"), config.log_format)) {
    return absl::InvalidArgumentError("--log-format must be text or json");
  }
  auto number = [&](absl::string_view name, int fallback, int min, int max,
                    int& out) -> absl::Status {
    const std::string text = flags->Get(name, absl::StrCat(fallback));
    if (!absl::SimpleAtoi(text, &out) || out < min || out > max) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " must be a whole number from ", min, " to ", max));
    }
    return absl::OkStatus();
  };
  int seconds = 0;
  int poll_ms = 0;
  int flush_ms = 0;
  int usage_poll_ms = 0;
  for (absl::Status s :
       {number("shutdown-timeout", 10, 0, 3600, seconds),
        number("db-pool", 8, 1, 256, config.pool_size),
        number("workers", 8, 1, 256, config.executor_threads),
        number("feed-poll-ms", 200, 10, 10000, poll_ms),
        number("max-message-bytes", 4 << 20, 1024, 1 << 30, config.max_message_bytes),
        number("max-keys-per-provider", 100, 1, 1000, config.max_keys_per_provider),
        number("key-flush-ms", 100, 10, 10000, flush_ms),
        number("usage-poll-ms", 20, 1, 10000, usage_poll_ms),
        number("usage-writers", 2, 1, 16, config.usage_writers),
        number("usage-retention-days", 90, 1, 36500, config.usage_retention_days)}) {
    if (!s.ok()) return s;
  }
  config.shutdown_timeout = absl::Seconds(seconds);
  config.feed_poll = absl::Milliseconds(poll_ms);
  config.key_flush = absl::Milliseconds(flush_ms);
  config.usage_poll = absl::Milliseconds(usage_poll_ms);
  config.master_key_file = flags->Get("master-key-file");
  config.key_time_zone = flags->Get("key-time-zone", "UTC");
  config.secret_file_dir = flags->Get("secret-file-dir");
  if (!config.secret_file_dir.empty() && config.secret_file_dir[0] != '/') {
    return absl::InvalidArgumentError("--secret-file-dir must be an absolute path");
  }
  config.tls_cert_file = flags->Get("tls-cert");
  config.tls_key_file = flags->Get("tls-key");
  config.tls_client_ca_file = flags->Get("tls-client-ca");
  if (config.tls_cert_file.empty() != config.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!config.tls_client_ca_file.empty() && config.tls_cert_file.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  std::string data_dir = ".";
  if (absl::StartsWith(config.database, "sqlite3://db=")) {
    const std::string path = config.database.substr(std::strlen("sqlite3://db="));
    const size_t slash = path.rfind('/');
    if (slash != std::string::npos) data_dir = slash == 0 ? "/" : path.substr(0, slash);
  }
  config.admin_key_file = flags->Get("admin-key-file", absl::StrCat(data_dir, "/admin.token"));
  const std::string migrate =
      flags->Get("migrate", absl::StartsWith(config.database, "sqlite3://") ? "true" : "false");
  if (migrate != "true" && migrate != "false") {
    return absl::InvalidArgumentError("--migrate must be true or false");
  }
  config.migrate = migrate == "true";
  return config;
}

}  // namespace modelvault::server
