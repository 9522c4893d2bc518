// modelvault: one binary for the server, its database tooling and the CLI.
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "clients/cpp/cli.h"
#include "server/config.h"
#include "server/crypto/master_keys.h"
#include "server/seed.h"
#include "server/server.h"
#include "storage/migrate.h"
#include "storage/resource_store.h"

namespace {

using modelvault::server::Flags;

constexpr char kUsage[] = R"(modelvault — the system of record for AI/LLM platforms, over gRPC

usage: modelvault COMMAND [flags]

server and database:
  serve                          run the gRPC server (modelvault serve --help)
  migrate up [VERSION]           apply pending migrations (up to VERSION)
  migrate down [N]               revert the last N migrations (default 1)
  migrate status                 list migrations and whether they are applied
  seed [--file PATH]             load the built-in (or given) catalog; idempotent
      these take --database URL (env MODELVAULT_DATABASE; default sqlite3://db=modelvault.db)
  master-key generate --out PATH [--version N]
                                 write a new random master key (mode 0600); to rotate, append a
                                 higher version to the existing file and run RewrapSecrets

client commands (--target ADDR, env MODELVAULT_TARGET; default 127.0.0.1:50051; the access key
from MODELVAULT_TOKEN, or the file named by --token-file / MODELVAULT_TOKEN_FILE):
  providers list                 list providers
  models list                    list models (--parent, --filter, --order-by, --json)
  models get NAME                show one model as JSON
)";

int Fail(const absl::Status& status) {
  std::cerr << "modelvault: " << status.message() << "\n";
  return 1;
}

int Migrate(const std::vector<std::string>& args) {
  absl::StatusOr<Flags> flags = Flags::Parse(args, {"database"});
  if (!flags.ok()) return Fail(flags.status());
  const auto& pos = flags->positional();
  if (pos.empty() || pos.size() > 2) {
    std::cerr << "usage: modelvault migrate up [VERSION] | down [N] | status [--database URL]\n";
    return 2;
  }
  absl::StatusOr<modelvault::storage::Migrator> migrator = modelvault::storage::Migrator::ForUrl(
      flags->Get("database", modelvault::server::kDefaultDatabase));
  if (!migrator.ok()) return Fail(migrator.status());
  std::int64_t number = 0;
  if (pos.size() == 2 && (!absl::SimpleAtoi(pos[1], &number) || number < 0)) {
    std::cerr << "modelvault: " << pos[1] << " is not a whole number\n";
    return 2;
  }
  absl::Status status;
  if (pos[0] == "up") {
    status = migrator->Up(pos.size() == 2 ? std::optional<std::int64_t>(number) : std::nullopt);
  } else if (pos[0] == "down") {
    status = migrator->Down(pos.size() == 2 ? static_cast<int>(number) : 1);
  } else if (pos[0] != "status") {
    std::cerr << "modelvault: unknown migrate command " << pos[0] << "\n";
    return 2;
  }
  if (!status.ok()) return Fail(status);
  absl::StatusOr<std::vector<modelvault::storage::MigrationState>> states = migrator->Status();
  if (!states.ok()) return Fail(states.status());
  for (const auto& s : *states) {
    std::cout << absl::StrCat(
                     s.migration.name, "  ",
                     !s.known         ? "applied, unknown to this binary"
                     : !s.applied     ? "pending"
                     : !s.checksum_ok ? "applied, EDITED since (checksum differs)"
                                      : "applied",
                     s.applied_time ? absl::StrCat("  ", absl::FormatTime(*s.applied_time)) : "")
              << "\n";
  }
  return 0;
}

int Seed(const std::vector<std::string>& args) {
  absl::StatusOr<Flags> flags = Flags::Parse(args, {"database", "file"});
  if (!flags.ok()) return Fail(flags.status());
  const std::string url = flags->Get("database", modelvault::server::kDefaultDatabase);
  absl::StatusOr<modelvault::storage::Migrator> migrator =
      modelvault::storage::Migrator::ForUrl(url);
  if (!migrator.ok()) return Fail(migrator.status());
  if (absl::Status s = migrator->CheckCurrent(); !s.ok()) return Fail(s);
  absl::StatusOr<std::unique_ptr<modelvault::storage::Datastore>> datastore =
      modelvault::storage::OpenDatastore(url);
  if (!datastore.ok()) return Fail(datastore.status());
  // Seeding lists nothing, so the page-token key is irrelevant here.
  modelvault::storage::ResourceStore store(**datastore, "seed");
  std::string text;
  if (flags->Has("file")) {
    std::ifstream in(flags->Get("file"));
    if (!in) return Fail(absl::NotFoundError("cannot read " + flags->Get("file")));
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  absl::StatusOr<modelvault::server::SeedReport> report =
      modelvault::server::SeedCatalog(store, text);
  if (!report.ok()) return Fail(report.status());
  std::cout << "seeded catalog: " << report->created << " created, " << report->updated
            << " updated, " << report->unchanged << " unchanged\n";
  return 0;
}

// Appends (or creates) a key line to a 0600 file.
int MasterKey(const std::vector<std::string>& args) {
  absl::StatusOr<Flags> flags = Flags::Parse(args, {"out", "version"});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->positional().size() != 1 || flags->positional()[0] != "generate" ||
      !flags->Has("out")) {
    std::cerr << "usage: modelvault master-key generate --out PATH [--version N]\n";
    return 2;
  }
  std::uint32_t version = 1;
  if (flags->Has("version") && (!absl::SimpleAtoi(flags->Get("version"), &version) ||
                                version == 0 || version > 2147483647u)) {
    std::cerr << "modelvault: --version must be a whole number from 1 to 2147483647\n";
    return 2;
  }
  const std::string path = flags->Get("out");
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return Fail(absl::FailedPreconditionError("cannot open " + path));
  const std::string line = modelvault::crypto::MasterKeyRing::GenerateLine(version);
  const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  ::fchmod(fd, 0600);
  ::close(fd);
  if (!ok) return Fail(absl::InternalError("cannot write " + path));
  std::cout << "wrote master key version " << version << " to " << path << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Before any thread starts, so that only the server's sigwait sees them.
  modelvault::server::BlockShutdownSignals();
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (command == "serve") {
    if (!rest.empty() && (rest[0] == "--help" || rest[0] == "-h")) {
      std::cout << modelvault::server::kServeUsage;
      return 0;
    }
    absl::StatusOr<modelvault::server::ServeConfig> config =
        modelvault::server::ParseServeConfig(rest);
    if (!config.ok()) {
      std::cerr << "modelvault serve: " << config.status().message() << "\n"
                << modelvault::server::kServeUsage;
      return 2;
    }
    absl::Status status = modelvault::server::RunServer(*config);
    if (!status.ok()) return Fail(status);
    return 0;
  }
  if (command == "migrate") return Migrate(rest);
  if (command == "seed") return Seed(rest);
  if (command == "master-key") return MasterKey(rest);
  if (command == "providers" || command == "models") {
    // Client commands: the signals keep their default meaning.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    return modelvault::client::RunCatalogCommand(command, rest);
  }
  std::cerr << "modelvault: unknown command " << command << "\n" << kUsage;
  return 2;
}
