#include "server/server.h"

#include <pthread.h>
#include <sodium.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/catalog_cache.h"
#include "server/catalog_service.h"
#include "server/change_hub.h"
#include "server/executor.h"
#include "server/interceptors.h"
#include "server/log.h"
#include "server/resource_methods.h"
#include "storage/migrate.h"
#include "storage/resource_store.h"

namespace modelvault::server {
namespace {

constexpr absl::string_view kPageTokenSecret = "page_token_key";

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}

std::string RandomKey() {
  unsigned char bytes[32];
  randombytes_buf(bytes, sizeof(bytes));
  char hex[65];
  sodium_bin2hex(hex, sizeof(hex), bytes, sizeof(bytes));
  return hex;
}

// Reports the database's reachability through the gRPC health service.
class HealthMonitor final {
 public:
  HealthMonitor(storage::Datastore& datastore, grpc::HealthCheckServiceInterface* health)
      : datastore_(datastore), health_(health), thread_([this] { Loop(); }) {}
  ~HealthMonitor() {
    stop_.Notify();
    thread_.join();
  }

 private:
  void Loop() {
    bool serving = true;
    do {
      const bool ok = datastore_.Ping().ok();
      if (ok != serving) {
        serving = ok;
        Log(ok ? LogLevel::kInfo : LogLevel::kError,
            ok ? "database reachable again; serving" : "database unreachable; not serving");
      }
      health_->SetServingStatus(serving);
    } while (!stop_.WaitForNotificationWithTimeout(absl::Seconds(1)));
  }

  storage::Datastore& datastore_;
  grpc::HealthCheckServiceInterface* health_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace

void BlockShutdownSignals() {
  sigset_t set = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

absl::Status RunServer(const ServeConfig& config) {
  ConfigureLogging(config.log_level, config.log_format);
  if (sodium_init() < 0) return absl::InternalError("libsodium failed to initialize");

  absl::StatusOr<storage::Migrator> migrator = storage::Migrator::ForUrl(config.database);
  if (!migrator.ok()) return migrator.status();
  if (config.migrate) {
    if (absl::Status s = migrator->Up(); !s.ok()) return s;
  }
  if (absl::Status s = migrator->CheckCurrent(); !s.ok()) return s;

  storage::DatastoreOptions options;
  options.pool_size = config.pool_size;
  absl::StatusOr<std::unique_ptr<storage::Datastore>> datastore =
      storage::OpenDatastore(config.database, options);
  if (!datastore.ok()) return datastore.status();
  absl::StatusOr<std::string> token_key =
      (*datastore)->GetOrCreateSecret(kPageTokenSecret, RandomKey);
  if (!token_key.ok()) return token_key.status();
  storage::ResourceStore store(**datastore, *token_key);

  CatalogCache cache;
  absl::StatusOr<std::int64_t> head = cache.Load(**datastore);
  if (!head.ok()) return head.status();
  ChangeHub hub(**datastore, config.feed_poll);
  hub.AddListener([&cache](const storage::ChangeRecord& change) { cache.Apply(change); });
  hub.Start(*head);

  Executor executor(config.executor_threads, 4096);
  // Authentication arrives with access keys; until then calls are anonymous.
  ResourceMethods methods(store, cache, hub, "anonymous");
  methods.SetHooks(
      v1::Model::descriptor(),
      ResourceHooks{CheckModel, [](google::protobuf::Message& m, absl::string_view id) {
                      auto& model = static_cast<v1::Model&>(m);
                      if (model.upstream_id().empty()) {
                        model.set_upstream_id(std::string(id));
                      }
                    }});
  std::atomic<bool> draining{false};
  std::atomic<std::int64_t> calls{0};
  std::atomic<std::int64_t> active{0};
  CatalogService catalog(methods, hub, executor, draining, calls, active);

  // Reflection describes the built-in health service from this descriptor.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen, grpc::InsecureServerCredentials(),
                           absl::StartsWith(config.listen, "unix:") ? nullptr : &port);
  builder.RegisterService(&catalog);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<BadRequestInterceptorFactory>());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.SetMaxReceiveMessageSize(config.max_message_bytes);
  builder.SetMaxSendMessageSize(config.max_message_bytes);
  // Reject clients that ping more often than every 10 s without calls.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    hub.Stop();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config.listen));
  }
  std::string address = config.listen;
  if (port > 0)
    address = absl::StrCat(config.listen.substr(0, config.listen.rfind(':')), ":", port);
  if (!config.port_file.empty()) {
    std::ofstream(config.port_file) << port << "\n";
  }
  Log(LogLevel::kInfo, "modelvault serving",
      {{"address", address},
       {"engine", std::string((*datastore)->engine())},
       {"catalog_resources", absl::StrCat(cache.size())},
       {"cursor_seq", absl::StrCat(*head)}});

  {
    HealthMonitor monitor(**datastore, server->GetHealthCheckService());
    sigset_t set = ShutdownSignals();
    int signal = 0;
    sigwait(&set, &signal);
    Log(LogLevel::kInfo, "shutting down", {{"signal", signal == SIGTERM ? "SIGTERM" : "SIGINT"}});
    server->GetHealthCheckService()->SetServingStatus(false);
  }
  // Drain: new calls get UNAVAILABLE (clients retry elsewhere) while the
  // dispatched ones finish; once arrivals stop, Shutdown has nothing to cut
  // off. gRPC would otherwise end not-yet-dispatched calls as CANCELLED.
  draining.store(true, std::memory_order_release);
  hub.Stop();  // ends streams with their cursors
  const absl::Time drain_until =
      absl::Now() + std::min(absl::Seconds(2), config.shutdown_timeout / 2);
  for (std::int64_t seen = -1; absl::Now() < drain_until;) {
    const std::int64_t now_seen = calls.load(std::memory_order_relaxed);
    if (now_seen == seen) break;  // no call arrived in the last interval
    seen = now_seen;
    absl::SleepFor(absl::Milliseconds(100));
  }
  // Let the dispatched calls finish, then stop at once: Shutdown with a
  // later deadline would also wait for idle client connections to close.
  const absl::Time deadline = absl::Now() + config.shutdown_timeout;
  while (active.load(std::memory_order_acquire) > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  server->Shutdown(std::chrono::system_clock::now());
  executor.Shutdown();
  Log(LogLevel::kInfo, "stopped");
  return absl::OkStatus();
}

}  // namespace modelvault::server
