// mv_null_server: a CatalogService that does no work. GetModel returns a fixed
// model and ListModels a fixed page, both built once at start-up, so that the
// throughput it reaches is the limit of the RPC stack on this machine: the
// benchmark compares the real server against it (DESIGN.md §8). The same for
// AcquireProviderKey, VerifyAccessKey and RecordUsage (a fixed stored record,
// as large as the one modelvault returns).
//
//   mv_null_server --listen 127.0.0.1:50061 [--catalog-size N]
//
// Serves until SIGTERM or SIGINT. Same server settings as the real server:
// default thread pools, health service and reflection on, the same message
// size limits and keepalive settings, no tuning.

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <pthread.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "flags.h"
#include "modelvault/v1/access.grpc.pb.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "modelvault/v1/credentials.grpc.pb.h"
#include "modelvault/v1/usage.grpc.pb.h"

namespace modelvault::bench {
namespace {

namespace v1 = ::modelvault::v1;

constexpr int32_t kDefaultPageSize = 50;
constexpr int32_t kMaxPageSize = 1000;

// A model as `modelvault seed` stores it (providers/openai/models/gpt-4o),
// with `slug` in place of the model id.
v1::Model SeededModel(const std::string& slug) {
  v1::Model m;
  m.set_name(absl::StrCat("providers/openai/models/", slug));
  m.set_display_name("GPT-4o");
  m.set_upstream_id(slug);
  m.set_family("providers/openai/modelFamilies/gpt-4o");
  m.set_context_window(128000);
  m.set_max_output_tokens(16384);
  m.set_supports_images(true);
  m.set_supports_tools(true);
  m.set_supports_reasoning(false);
  m.set_supports_streaming(true);
  m.set_enabled(true);
  v1::ModelPrice* launch = m.add_prices();
  launch->mutable_effective_time()->set_seconds(1715558400);  // 2024-05-13
  launch->set_input(5000000000);
  launch->set_output(15000000000);
  v1::ModelPrice* current = m.add_prices();
  current->mutable_effective_time()->set_seconds(1727827200);  // 2024-10-02
  current->set_input(2500000000);
  current->set_output(10000000000);
  current->set_cache_read(1250000000);
  m.mutable_create_time()->set_seconds(1755216000);  // 2025-08-15
  m.mutable_create_time()->set_nanos(123456000);
  m.mutable_update_time()->set_seconds(1755216000);
  m.mutable_update_time()->set_nanos(123456000);
  m.set_etag("\"1\"");
  return m;
}

class NullCatalogService final : public v1::CatalogService::CallbackService {
 public:
  explicit NullCatalogService(int32_t catalog_size) : model_(SeededModel("gpt-4o")) {
    const int32_t n = catalog_size > 0 ? std::min(catalog_size, kMaxPageSize) : kMaxPageSize;
    catalog_.reserve(n);
    for (int32_t i = 0; i < n; ++i) {
      catalog_.push_back(SeededModel(i == 0 ? std::string("gpt-4o") : absl::StrCat("gpt-4o-", i)));
    }
    has_more_ = catalog_size <= 0;
  }

  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* context,
                                     const v1::GetModelRequest* /*request*/,
                                     v1::Model* response) override {
    *response = model_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override {
    int32_t page_size = request->page_size() > 0 ? request->page_size() : kDefaultPageSize;
    page_size = std::min(page_size, kMaxPageSize);
    const auto n = std::min<size_t>(static_cast<size_t>(page_size), catalog_.size());
    response->mutable_models()->Reserve(static_cast<int>(n));
    for (size_t i = 0; i < n; ++i) *response->add_models() = catalog_[i];
    if (has_more_ || n < catalog_.size()) {
      // About the size of a real HMAC-signed keyset page token.
      response->set_next_page_token("bmV4dC1wYWdlLXRva2VuLWZvci1ub3dfX19fX19fX19fX19fX19fX18");
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  const v1::Model model_;
  std::vector<v1::Model> catalog_;
  bool has_more_ = false;
};

// The hot paths of issue 3 with no work: a fixed acquired key, a fixed
// verification answer.
class NullCredentialService final : public v1::CredentialService::CallbackService {
 public:
  NullCredentialService() {
    acquired_.set_key("providers/openai/keys/k1");
    acquired_.set_secret("sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH");
    acquired_.set_secret_version(1);
    acquired_.set_requests_remaining(999999);
    acquired_.set_tokens_remaining(-1);
  }
  grpc::ServerUnaryReactor* AcquireProviderKey(grpc::CallbackServerContext* context,
                                               const v1::AcquireProviderKeyRequest* /*request*/,
                                               v1::AcquireProviderKeyResponse* response) override {
    *response = acquired_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  v1::AcquireProviderKeyResponse acquired_;
};

class NullAccessService final : public v1::AccessService::CallbackService {
 public:
  NullAccessService() {
    verified_.set_valid(true);
    verified_.set_access_key("accessKeys/0123456789abcdef");
    verified_.set_owner("service:bench");
    verified_.add_scopes(v1::SCOPE_ADMIN);
  }
  grpc::ServerUnaryReactor* VerifyAccessKey(grpc::CallbackServerContext* context,
                                            const v1::VerifyAccessKeyRequest* /*request*/,
                                            v1::VerifyAccessKeyResponse* response) override {
    *response = verified_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  v1::VerifyAccessKeyResponse verified_;
};

// RecordUsage with no work: the answer modelvault gives for a record of
// bench/usage_rows.h (costed, with its record time and cursor), built once.
class NullUsageService final : public v1::UsageService::CallbackService {
 public:
  NullUsageService() {
    v1::UsageRecord* r = recorded_.mutable_record();
    r->set_request_id("bench-0123abcd-000-0000000042");
    r->mutable_time()->set_seconds(1755216000);
    r->mutable_time()->set_nanos(123456000);
    r->set_provider("providers/openai");
    r->set_model("providers/openai/models/gpt-4o");
    r->set_provider_key("providers/openai/keys/usage-1");
    r->set_access_key("accessKeys/0123456789abcdef");
    r->set_user("user-0042");
    r->set_conversation("conv-0123abcd-000-00000005");
    r->set_message("msg-0123abcd-000-0000000042");
    r->mutable_tokens()->set_input(1834);
    r->mutable_tokens()->set_output(517);
    r->mutable_tokens()->set_cache_read(1024);
    r->mutable_latency()->set_seconds(2);
    r->mutable_latency()->set_nanos(345678000);
    r->mutable_time_to_first_token()->set_nanos(469135000);
    r->set_status(v1::USAGE_STATUS_SUCCEEDED);
    r->set_cost_nanos(11045000);
    r->mutable_price_effective_time()->set_seconds(1727827200);
    r->set_priced(true);
    r->mutable_record_time()->set_seconds(1755216000);
    r->mutable_record_time()->set_nanos(124567000);
    r->set_cursor("MTIzNDU2Nzg5");
  }
  grpc::ServerUnaryReactor* RecordUsage(grpc::CallbackServerContext* context,
                                        const v1::RecordUsageRequest* /*request*/,
                                        v1::RecordUsageResponse* response) override {
    *response = recorded_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  v1::RecordUsageResponse recorded_;
};

int Run(const std::string& listen, int32_t catalog_size) {
  // Block the stop signals in every thread (gRPC's threads inherit the mask);
  // the main thread takes them with sigwait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  NullCatalogService service(catalog_size);
  NullCredentialService credentials;
  NullAccessService access;
  NullUsageService usage;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  builder.RegisterService(&credentials);
  builder.RegisterService(&access);
  builder.RegisterService(&usage);
  // The transport settings of `modelvault serve` (server/server.cc), so that
  // both servers differ only in what their handlers do.
  builder.SetMaxReceiveMessageSize(4 << 20);
  builder.SetMaxSendMessageSize(4 << 20);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "mv_null_server: cannot listen on %s\n", listen.c_str());
    return 1;
  }
  // With port 0, say which port was picked.
  std::printf("listening on %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "mv_null_server: signal %d, stopping\n", sig);
  server->Shutdown();
  server->Wait();
  return 0;
}

}  // namespace
}  // namespace modelvault::bench

int main(int argc, char** argv) {
  modelvault::bench::Flags flags(
      "mv_null_server", "--listen HOST:PORT [--catalog-size N]",
      {{"listen", "127.0.0.1:50061", "address to listen on, HOST:PORT (port 0: any free port)"},
       {"catalog_size", "0",
        "when > 0, ListModels pages hold at most this many models, as if the catalog had that "
        "many, and the last page has no next_page_token; 0: every page holds page_size models"}});
  int64_t catalog_size = 0;
  if (!flags.Parse(argc, argv) || !flags.GetInt("catalog_size", 0, 1000, &catalog_size)) return 2;
  return modelvault::bench::Run(flags.Get("listen"), static_cast<int32_t>(catalog_size));
}
