#include "server/server.h"

#include <pthread.h>
#include <sodium.h>
#include <sys/stat.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/access_service.h"
#include "server/auth.h"
#include "server/budget_ledger.h"
#include "server/budget_service.h"
#include "server/call_gate.h"
#include "server/catalog_cache.h"
#include "server/catalog_service.h"
#include "server/change_hub.h"
#include "server/credential_service.h"
#include "server/crypto/master_keys.h"
#include "server/executor.h"
#include "server/interceptors.h"
#include "server/key_pool.h"
#include "server/log.h"
#include "server/maintenance.h"
#include "server/provider_keys.h"
#include "server/resource_methods.h"
#include "server/usage_ledger.h"
#include "server/usage_service.h"
#include "server/usage_writer.h"
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

// Writes provider-key counters and access-key last-use times in batches, on
// one thread, and once more when stopped.
class Flusher final {
 public:
  Flusher(KeyPool& pool, Authenticator& auth, absl::Duration interval)
      : pool_(pool), auth_(auth), interval_(interval), thread_([this] { Loop(); }) {}
  ~Flusher() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
    FlushAll();
  }

 private:
  void FlushAll() {
    if (absl::Status s = pool_.Flush(); !s.ok()) {
      Log(LogLevel::kWarn, "key counters not written yet", {{"error", std::string(s.message())}});
    }
    if (absl::Status s = auth_.FlushLastUsed(); !s.ok()) {
      Log(LogLevel::kWarn, "access-key last use not written yet",
          {{"error", std::string(s.message())}});
    }
  }
  void Loop() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      wake_.wait_for(lock, absl::ToChronoMilliseconds(interval_));
      if (stop_) break;
      lock.unlock();
      if (absl::Status s = pool_.Flush(); !s.ok()) {
        Log(LogLevel::kDebug, "key counters not written yet",
            {{"error", std::string(s.message())}});
      }
      auth_.RetryReloads();
      if (absl::Now() - last_used_flush_ > absl::Seconds(10)) {
        last_used_flush_ = absl::Now();
        auth_.FlushLastUsed().IgnoreError();  // kept and retried on failure
      }
      lock.lock();
    }
  }

  KeyPool& pool_;
  Authenticator& auth_;
  const absl::Duration interval_;
  absl::Time last_used_flush_ = absl::Now();
  std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;  // guarded by mu_
  std::thread thread_;
};

absl::StatusOr<crypto::MasterKeyRing> LoadMasterKeys(const ServeConfig& config) {
  if (!config.master_key_file.empty())
    return crypto::MasterKeyRing::LoadFile(config.master_key_file);
  const char* env = std::getenv("MODELVAULT_MASTER_KEY");
  absl::StatusOr<crypto::MasterKeyRing> ring =
      crypto::MasterKeyRing::Parse(env == nullptr ? "" : env);
  // Read once; nothing later in this process (or a child) needs to see it.
  ::unsetenv("MODELVAULT_MASTER_KEY");
  if (!ring.ok()) return ring.status();
  if (ring->empty()) {
    return absl::FailedPreconditionError(
        "no master key: pass --master-key-file PATH (create one with `modelvault master-key "
        "generate --out PATH`) or set MODELVAULT_MASTER_KEY");
  }
  return ring;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const ServeConfig& config) {
  if (config.tls_cert_file.empty()) return grpc::InsecureServerCredentials();
  auto read = [](const std::string& path, std::string& out) -> absl::Status {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::FailedPreconditionError(absl::StrCat("cannot read ", path));
    out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return absl::OkStatus();
  };
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  if (absl::Status s = read(config.tls_key_file, pair.private_key); !s.ok()) return s;
  if (absl::Status s = read(config.tls_cert_file, pair.cert_chain); !s.ok()) return s;
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!config.tls_client_ca_file.empty()) {
    if (absl::Status s = read(config.tls_client_ca_file, options.pem_root_certs); !s.ok()) return s;
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

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
  absl::StatusOr<crypto::MasterKeyRing> master_keys = LoadMasterKeys(config);
  if (!master_keys.ok()) return master_keys.status();
  absl::TimeZone key_zone;
  if (!absl::LoadTimeZone(config.key_time_zone, &key_zone)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--key-time-zone: unknown time zone ", config.key_time_zone));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = ServerCredentials(config);
  if (!credentials.ok()) return credentials.status();

  storage::DatastoreOptions options;
  options.pool_size = config.pool_size;
  absl::StatusOr<std::unique_ptr<storage::Datastore>> datastore =
      storage::OpenDatastore(config.database, options);
  if (!datastore.ok()) return datastore.status();
  absl::StatusOr<std::string> token_key =
      (*datastore)->GetOrCreateSecret(kPageTokenSecret, RandomKey);
  if (!token_key.ok()) return token_key.status();
  storage::ResourceStore store(**datastore, *token_key);
  // Every stored secret must open with the loaded master keys.
  absl::StatusOr<std::vector<std::uint32_t>> missing =
      ProviderKeyStore::MissingMasterKeys(**datastore, *master_keys);
  if (!missing.ok()) return missing.status();
  if (!missing->empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the database holds secrets sealed with master key version(s) ",
        absl::StrJoin(*missing, ", "),
        " that are not loaded; add them to the master-key file (run RewrapSecrets before "
        "removing an old version)"));
  }
  absl::StatusOr<std::string> pepper =
      GetOrCreateSealedSecret(**datastore, *master_keys, "access_key_pepper");
  if (!pepper.ok()) return pepper.status();

  CatalogCache cache;
  Authenticator auth(**datastore, cache, *std::move(pepper));
  // Before the cache loads, so that the new key is in it when the port opens.
  absl::StatusOr<bool> bootstrapped = BootstrapAdminKey(store, auth, config.admin_key_file);
  if (!bootstrapped.ok()) return bootstrapped.status();
  if (*bootstrapped) {
    Log(LogLevel::kInfo,
        "created the first admin access key; send it as `authorization: Bearer <token>` and "
        "create narrower keys with AccessService",
        {{"token_file", config.admin_key_file}});
  }
  absl::StatusOr<std::int64_t> head = cache.Load(**datastore);
  if (!head.ok()) return head.status();
  if (absl::Status s = auth.Load(); !s.ok()) return s;
  KeyPoolOptions pool_options;
  pool_options.zone = key_zone;
  pool_options.secret_file_dir = config.secret_file_dir;
  KeyPool pool(**datastore, *master_keys, pool_options);
  ChangeHub hub(**datastore, config.feed_poll);
  hub.AddListener([&](const storage::ChangeRecord& change) {
    cache.Apply(change);
    auth.OnChange(change);
    if (change.resource_type == "modelvault.dev/ProviderKey") pool.Invalidate(change.resource_name);
  });
  hub.Start(*head);

  Executor executor(config.executor_threads, 4096);
  ResourceMethods methods(store, cache, hub);
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
  methods.SetHooks(v1::AccessKey::descriptor(), ResourceHooks{CheckAccessKey, nullptr});
  CallGate gate(auth, executor, draining, calls, active);
  CatalogService catalog(methods, hub, gate);
  ProviderKeyStore provider_keys(store, *master_keys, config.max_keys_per_provider);
  CredentialService credentials_service(methods, provider_keys, pool, gate, config.secret_file_dir);
  AccessService access(methods, auth, gate);
  Flusher flusher(pool, auth, config.key_flush);

  // The usage ledger: partitions and retention before the port opens, then
  // the stream hub, the group-commit writer and the upkeep thread.
  BudgetLedger budget_ledger;
  UsageLedgerOptions usage_options;
  usage_options.key_time_zone = key_zone;
  usage_options.retention = absl::Hours(24) * config.usage_retention_days;
  UsageLedger usage_ledger(**datastore, cache, budget_ledger, *token_key, usage_options);
  if (absl::StatusOr<std::int64_t> pruned = usage_ledger.Maintain(); !pruned.ok()) {
    hub.Stop();
    return pruned.status();
  }
  std::int64_t usage_head = 0;
  if (absl::Status s = (*datastore)->Read([&](storage::Reader& reader) {
        std::int64_t pruned = 0;
        return UsageLedger::FeedBounds(reader, &usage_head, &pruned);
      });
      !s.ok()) {
    hub.Stop();
    return s;
  }
  ChangeHub usage_hub(**datastore, config.usage_poll, UsageFeedSource());
  usage_hub.Start(usage_head);
  UsageWriter usage_writer(
      usage_ledger,
      [&](std::vector<storage::ChangeRecord> alerts) {
        usage_hub.Poke();
        if (!alerts.empty()) hub.Poke();  // alerts reach the cache and WatchAlerts via the feed
      },
      (*datastore)->features().concurrent_writers ? config.usage_writers : 1);
  UsageService usage(usage_ledger, usage_writer, usage_hub, gate, executor);
  BudgetService budgets(methods, budget_ledger, hub, gate, **datastore);
  Maintenance maintenance(usage_ledger, budget_ledger, **datastore);

  // Reflection describes the built-in health service from this descriptor.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const bool unix_socket = absl::StartsWith(config.listen, "unix:");
  builder.AddListeningPort(config.listen, *credentials, unix_socket ? nullptr : &port);
  builder.RegisterService(&catalog);
  builder.RegisterService(&credentials_service);
  builder.RegisterService(&access);
  builder.RegisterService(&usage);
  builder.RegisterService(&budgets);
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
    usage_hub.Stop();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config.listen));
  }
  if (unix_socket) {
    // Owner and group only: the sidecar's application shares the group.
    const std::string path = config.listen.substr(config.listen.find(':') + 1);
    if (::chmod(path.c_str(), 0660) != 0) {
      Log(LogLevel::kWarn, "cannot set the socket's mode to 0660", {{"path", path}});
    }
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
       {"cached_resources", absl::StrCat(cache.size())},
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
  usage_hub.Stop();
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
  // Store what is queued: those calls are acknowledged as they commit.
  usage_writer.Stop();
  server->Shutdown(std::chrono::system_clock::now());
  executor.Shutdown();
  Log(LogLevel::kInfo, "stopped");
  return absl::OkStatus();
}

}  // namespace modelvault::server
