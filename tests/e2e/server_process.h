#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc_status.h"

// Real `modelvault` processes for end-to-end tests: spawned on a free
// loopback port (the server binds port 0 and writes the port to a file),
// logs captured to a file, stopped with a signal.
namespace modelvault::testing {

// Paths baked in by CMake.
std::string ModelvaultBinary();
std::string SourceDir();

// Runs `modelvault ARGS...` to completion; returns exit code and output.
struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
CommandResult RunModelvault(const std::vector<std::string>& args);
// `modelvault migrate up` on `database_url`, then `modelvault seed` unless `seed` is false;
// the failing command's output in the error.
absl::Status PrepareDatabase(const std::string& database_url, bool seed = true);
// Runs a shell command line; returns exit code and output.
CommandResult RunShell(const std::string& command);

// One unary call with a deadline; the status keeps its google.rpc details as
// payloads (server::FromGrpcStatus). The one call helper of every e2e test.
template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> Invoke(
    Stub& stub, grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*),
    const Request& request, absl::Duration timeout = absl::Seconds(30)) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout));
  Response response;
  const grpc::Status status = (stub.*method)(&context, request, &response);
  if (!status.ok()) return server::FromGrpcStatus(status);
  return response;
}

// The master-key file and admin-token file the harness uses for a database
// (shared by every server process on that database, as replicas share them).
std::string KeyDirFor(const std::string& database_url);

class ServerProcess final {
 public:
  // Starts `modelvault serve --database URL --listen LISTEN EXTRA...` and waits
  // until it listens (or fails with its log in the status). With the default
  // 127.0.0.1:0 the server picks a free port and reports it through a port
  // file; with `unix:PATH` the harness waits for the socket. Unless EXTRA
  // names them, --master-key-file and --admin-key-file point into
  // KeyDirFor(URL) (a master key is generated there on first use).
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::string& database_url, const std::vector<std::string>& extra_args = {},
      const std::string& listen = "127.0.0.1:0");
  ~ServerProcess();

  const std::string& target() const { return target_; }  // 127.0.0.1:PORT or unix:PATH
  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  // A channel whose calls carry the bootstrap admin key.
  std::shared_ptr<grpc::Channel> Channel() const;
  // A channel whose calls carry `token` (none when empty).
  std::shared_ptr<grpc::Channel> ChannelWithToken(const std::string& token) const;
  // The bootstrap admin key of the database, and the file it is in.
  const std::string& token() const { return token_; }
  std::string token_file() const { return token_file_; }
  const std::string& dir() const { return dir_; }
  std::string Log() const;

  // Sends `signal` and waits up to `timeout`; returns the exit code, or -1
  // after killing it when it did not exit in time.
  int Stop(int signal, absl::Duration timeout = absl::Seconds(30));
  bool running() const { return pid_ > 0; }

 private:
  ServerProcess() = default;
  pid_t pid_ = -1;
  int port_ = 0;
  std::string target_;
  std::string dir_;
  std::string token_;
  std::string token_file_;
};

// A fresh temporary directory (removed by the caller or left for debugging).
std::string MakeTempDir();

}  // namespace modelvault::testing
