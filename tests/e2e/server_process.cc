#include "tests/e2e/server_process.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "clients/cpp/channel.h"
#include "storage/migrate.h"

namespace modelvault::testing {

std::string ModelvaultBinary() { return MV_BINARY; }
std::string SourceDir() { return MV_SOURCE_DIR; }

std::string MakeTempDir() {
  std::string pattern = "/tmp/mv-e2e-XXXXXX";
  char* dir = mkdtemp(pattern.data());
  return dir == nullptr ? "/tmp" : std::string(dir);
}

CommandResult RunShell(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) {
    result.output.append(buffer.data(), n);
  }
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

CommandResult RunModelvault(const std::vector<std::string>& args) {
  std::vector<std::string> quoted;
  quoted.reserve(args.size());
  for (const std::string& a : args) quoted.push_back(absl::StrCat("'", a, "'"));
  return RunShell(absl::StrCat("'", ModelvaultBinary(), "' ", absl::StrJoin(quoted, " ")));
}

absl::Status PrepareDatabase(const std::string& database_url, bool seed) {
  std::vector<std::vector<std::string>> commands = {{"migrate", "up", "--database", database_url}};
  if (seed) commands.push_back({"seed", "--database", database_url});
  for (const std::vector<std::string>& args : commands) {
    const CommandResult result = RunModelvault(args);
    if (result.exit_code != 0) {
      return absl::InternalError(absl::StrCat("modelvault ", args.front(), " exited with ",
                                              result.exit_code, ": ", result.output));
    }
  }
  return absl::OkStatus();
}

std::string KeyDirFor(const std::string& database_url) {
  std::string dir =
      absl::StrCat("/tmp/mv-e2e-keys/", storage::Sha256Hex(database_url).substr(0, 16));
  RunShell(absl::StrCat("mkdir -p '", dir, "'"));
  const std::string key = dir + "/master.key";
  struct stat info {};
  if (stat(key.c_str(), &info) != 0) {
    // Generated aside and linked into place: servers starting at once on a new
    // database agree on one key (link() never replaces an existing file).
    const std::string fresh = absl::StrCat(key, ".", getpid(), ".", std::rand());
    RunModelvault({"master-key", "generate", "--out", fresh});
    link(fresh.c_str(), key.c_str());
    unlink(fresh.c_str());
  }
  return dir;
}

namespace {

bool HasFlag(const std::vector<std::string>& args, const std::string& flag) {
  return std::ranges::any_of(
      args, [&flag](const std::string& a) { return a == flag || a.rfind(flag + "=", 0) == 0; });
}

std::string ReadToken(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return std::string(absl::StripAsciiWhitespace(ss.str()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::string& database_url, const std::vector<std::string>& extra_args,
    const std::string& listen) {
  std::unique_ptr<ServerProcess> server(new ServerProcess());
  server->dir_ = MakeTempDir();
  const std::string port_file = server->dir_ + "/port";
  const std::string log_file = server->dir_ + "/server.log";
  const bool unix_socket = listen.rfind("unix:", 0) == 0;
  std::vector<std::string> args = {ModelvaultBinary(), "serve", "--database",  database_url,
                                   "--listen",         listen,  "--port-file", port_file};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  const std::string keys = KeyDirFor(database_url);
  if (!HasFlag(extra_args, "--master-key-file")) {
    args.insert(args.end(), {"--master-key-file", keys + "/master.key"});
  }
  server->token_file_ = keys + "/admin.token";
  if (!HasFlag(extra_args, "--admin-key-file")) {
    args.insert(args.end(), {"--admin-key-file", server->token_file_});
  }
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    const int fd = open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    // Signals blocked in the test process must not stay blocked in the server.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    std::vector<char*> argv;
    argv.reserve(args.size() + 1);
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  server->pid_ = pid;
  for (int i = 0; i < 600; ++i) {  // up to 60 s: a cold start migrates first
    struct stat info {};
    if (unix_socket && stat(listen.substr(5).c_str(), &info) == 0 && S_ISSOCK(info.st_mode)) {
      server->target_ = listen;
      server->token_ = ReadToken(server->token_file_);
      return server;
    }
    std::ifstream in(port_file);
    int port = 0;
    if (!unix_socket && in >> port && port > 0) {
      server->port_ = port;
      server->target_ = absl::StrCat("127.0.0.1:", port);
      server->token_ = ReadToken(server->token_file_);
      return server;
    }
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      server->pid_ = -1;
      return absl::InternalError(absl::StrCat("modelvault serve exited early:\n", server->Log()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("modelvault serve did not start:\n", server->Log()));
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) Stop(SIGKILL, absl::Seconds(10));
}

std::shared_ptr<grpc::Channel> ServerProcess::Channel() const { return ChannelWithToken(token_); }

std::shared_ptr<grpc::Channel> ServerProcess::ChannelWithToken(const std::string& token) const {
  client::ChannelOptions options;
  options.token = token;
  return *client::MakeChannel(target_, options);  // plaintext channels always build
}

std::string ServerProcess::Log() const {
  std::ifstream in(dir_ + "/server.log");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int ServerProcess::Stop(int signal, absl::Duration timeout) {
  if (pid_ <= 0) return -1;
  kill(pid_, signal);
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (absl::Now() < deadline) {
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return -1;
}

}  // namespace modelvault::testing
