// mv_loadgen: a closed-loop load generator for modelvault's hot paths
// (catalog reads, key acquisition, access-key verification), on the gRPC
// callback client API.
//
//   mv_loadgen --target 127.0.0.1:50061
//              --method GetModel|ListModels|AcquireProviderKey|VerifyAccessKey
//              [--provider providers/openai] [--token TOKEN]
//              [--channels 4] [--inflight 32] [--seconds 5] [--warmup 1]
//              [--name providers/openai/models/gpt-4o] [--parent providers/-]
//              [--page-size 50] [--metadata KEY=VALUE]
//
// Each channel is its own grpc::Channel with its own subchannel (so its own
// TCP connection) and keeps `inflight` calls outstanding: a call's completion
// starts the next one. Calls completing during the warm-up are not counted;
// then every call completing during the next `seconds` is: its latency goes
// to a per-slot sample list and its status, when not OK, to a per-code count.
//
// Prints one machine-readable line to stdout:
//
//   method=GetModel rps=15000 p50_us=800 p99_us=2900 errors=0 calls=75000
//     total_calls=90000 items_per_call=1.00
//
// rps counts the OK calls of the measured window; p50/p99 are their
// latencies; calls counts every call of the window, errors the non-OK ones;
// total_calls every call the server answered during the whole run (warm-up
// and drain included, for dividing the server's CPU time of the whole run);
// items_per_call the mean number of models per OK response; total_ok the OK
// calls of the whole run (for AcquireProviderKey: every acquisition the
// server counted, to check its counters exactly). A
// human-readable summary goes to stderr. Exits 0 when the window holds at
// least one call and no error, 1 otherwise, 2 on bad flags.

#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "flags.h"
#include "modelvault/v1/access.grpc.pb.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/credentials.grpc.pb.h"

namespace modelvault::bench {
namespace {

namespace v1 = ::modelvault::v1;
using Clock = std::chrono::steady_clock;

constexpr auto kCallDeadline = std::chrono::seconds(10);
constexpr int kCodes = 17;  // grpc::StatusCode values 0..16.

enum class Method { kGetModel, kListModels, kAcquireProviderKey, kVerifyAccessKey };

struct Options {
  std::string target;
  Method method = Method::kGetModel;
  int channels = 4;
  int inflight = 32;
  double seconds = 5;
  double warmup = 1;
  std::string name;
  std::string parent;
  int32_t page_size = 50;
  std::string provider;      // AcquireProviderKey
  std::string verify_token;  // VerifyAccessKey
  std::string metadata_key;  // Sent with every call when not empty.
  std::string metadata_value;
};

struct Result {
  int64_t total_ok = 0;  // OK calls of the whole run, warm-up and drain included
  int64_t ok = 0;
  int64_t calls = 0;
  int64_t total_calls = 0;
  int64_t items = 0;
  std::array<int64_t, kCodes> errors_by_code{};
  std::array<std::string, kCodes> first_error_by_code;
  std::vector<uint32_t> latencies_us;  // OK calls of the window, sorted.
  double window_seconds = 0;
  double client_cpu_seconds = 0;
};

const char* CodeName(int code) {
  static constexpr std::array<const char*, kCodes> kNames = {"OK",
                                                             "CANCELLED",
                                                             "UNKNOWN",
                                                             "INVALID_ARGUMENT",
                                                             "DEADLINE_EXCEEDED",
                                                             "NOT_FOUND",
                                                             "ALREADY_EXISTS",
                                                             "PERMISSION_DENIED",
                                                             "RESOURCE_EXHAUSTED",
                                                             "FAILED_PRECONDITION",
                                                             "ABORTED",
                                                             "OUT_OF_RANGE",
                                                             "UNIMPLEMENTED",
                                                             "INTERNAL",
                                                             "UNAVAILABLE",
                                                             "DATA_LOSS",
                                                             "UNAUTHENTICATED"};
  return code >= 0 && code < kCodes ? kNames[code] : "?";
}

double CpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

class LoadGenerator final {
 public:
  explicit LoadGenerator(const Options& options) : options_(options) {
    get_request_.set_name(options.name);
    list_request_.set_parent(options.parent);
    list_request_.set_page_size(options.page_size);
    acquire_request_.set_provider(options.provider);
    acquire_request_.set_estimated_tokens(100);
    verify_request_.set_token(options.verify_token);
    for (int c = 0; c < options.channels; ++c) {
      grpc::ChannelArguments args;
      // A subchannel of its own, so a connection of its own, for each channel.
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      args.SetInt("modelvault.bench.channel", c);
      auto channel =
          grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args);
      stubs_.push_back(v1::CatalogService::NewStub(channel));
      credential_stubs_.push_back(v1::CredentialService::NewStub(channel));
      access_stubs_.push_back(v1::AccessService::NewStub(channel));
    }
    for (int c = 0; c < options.channels; ++c) {
      for (int i = 0; i < options.inflight; ++i) {
        auto slot = std::make_unique<Slot>();
        slot->stub = stubs_[c].get();
        slot->credential_stub = credential_stubs_[c].get();
        slot->access_stub = access_stubs_[c].get();
        slot->latencies_us.reserve(4096);
        slots_.push_back(std::move(slot));
      }
    }
  }

  Result Run() {
    const Clock::time_point start = Clock::now();
    window_start_ = start + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(options_.warmup));
    window_end_ = window_start_ + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(options_.seconds));
    outstanding_ = static_cast<int64_t>(slots_.size());
    for (auto& slot : slots_) Issue(slot.get());

    Result result;
    std::this_thread::sleep_until(window_start_);
    const double cpu_start = CpuSeconds();
    std::this_thread::sleep_until(window_end_);
    result.client_cpu_seconds = CpuSeconds() - cpu_start;
    stop_.store(true, std::memory_order_relaxed);
    {
      std::unique_lock<std::mutex> lock(mu_);
      drained_.wait(lock, [this] { return outstanding_ == 0; });
    }

    result.window_seconds = std::chrono::duration<double>(window_end_ - window_start_).count();
    for (const auto& slot : slots_) {
      result.ok += slot->ok;
      result.total_ok += slot->total_ok;
      result.calls += slot->ok;
      result.total_calls += slot->total;
      result.items += slot->items;
      for (int code = 1; code < kCodes; ++code) {
        result.errors_by_code[code] += slot->errors_by_code[code];
        result.calls += slot->errors_by_code[code];
        if (result.first_error_by_code[code].empty()) {
          result.first_error_by_code[code] = slot->first_error_by_code[code];
        }
      }
      result.latencies_us.insert(result.latencies_us.end(), slot->latencies_us.begin(),
                                 slot->latencies_us.end());
    }
    std::sort(result.latencies_us.begin(), result.latencies_us.end());
    return result;
  }

 private:
  // One chain of calls: at most one outstanding call at a time, so its fields
  // are only touched by that call's completion (and by Run once drained).
  struct Slot {
    v1::CatalogService::Stub* stub = nullptr;
    v1::CredentialService::Stub* credential_stub = nullptr;
    v1::AccessService::Stub* access_stub = nullptr;
    std::unique_ptr<grpc::ClientContext> context;
    Clock::time_point sent;
    v1::Model model;
    v1::ListModelsResponse list;
    v1::AcquireProviderKeyResponse acquired;
    v1::VerifyAccessKeyResponse verified;
    std::vector<uint32_t> latencies_us;
    int64_t total_ok = 0;
    int64_t ok = 0;
    int64_t total = 0;
    int64_t items = 0;
    std::array<int64_t, kCodes> errors_by_code{};
    std::array<std::string, kCodes> first_error_by_code;
  };

  void Issue(Slot* slot) {
    // Replacing the context of the call that just completed, from its own
    // completion, is what gRPC's own callback benchmark client does.
    slot->context = std::make_unique<grpc::ClientContext>();
    slot->sent = Clock::now();
    slot->context->set_deadline(std::chrono::system_clock::now() + kCallDeadline);
    if (!options_.metadata_key.empty()) {
      slot->context->AddMetadata(options_.metadata_key, options_.metadata_value);
    }
    auto done = [this, slot](grpc::Status status) { OnDone(slot, status); };
    switch (options_.method) {
      case Method::kGetModel:
        slot->stub->async()->GetModel(slot->context.get(), &get_request_, &slot->model,
                                      std::move(done));
        break;
      case Method::kListModels:
        slot->stub->async()->ListModels(slot->context.get(), &list_request_, &slot->list,
                                        std::move(done));
        break;
      case Method::kAcquireProviderKey:
        slot->credential_stub->async()->AcquireProviderKey(slot->context.get(), &acquire_request_,
                                                           &slot->acquired, std::move(done));
        break;
      case Method::kVerifyAccessKey:
        slot->access_stub->async()->VerifyAccessKey(slot->context.get(), &verify_request_,
                                                    &slot->verified, std::move(done));
        break;
    }
  }

  void OnDone(Slot* slot, const grpc::Status& status) {
    const Clock::time_point now = Clock::now();
    ++slot->total;
    if (status.ok()) ++slot->total_ok;
    if (now >= window_start_ && now < window_end_) {
      if (status.ok()) {
        ++slot->ok;
        const auto us =
            std::chrono::duration_cast<std::chrono::microseconds>(now - slot->sent).count();
        slot->latencies_us.push_back(static_cast<uint32_t>(std::min<int64_t>(us, UINT32_MAX)));
        slot->items += options_.method == Method::kListModels ? slot->list.models_size() : 1;
      } else {
        const int code = static_cast<int>(status.error_code());
        const int index = code > 0 && code < kCodes ? code : static_cast<int>(grpc::UNKNOWN);
        if (slot->errors_by_code[index]++ == 0) {
          slot->first_error_by_code[index] = status.error_message();
        }
      }
    }
    if (!stop_.load(std::memory_order_relaxed)) {
      Issue(slot);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (--outstanding_ == 0) drained_.notify_all();
  }

  const Options options_;
  v1::GetModelRequest get_request_;
  v1::ListModelsRequest list_request_;
  v1::AcquireProviderKeyRequest acquire_request_;
  v1::VerifyAccessKeyRequest verify_request_;
  std::vector<std::unique_ptr<v1::CatalogService::Stub>> stubs_;
  std::vector<std::unique_ptr<v1::CredentialService::Stub>> credential_stubs_;
  std::vector<std::unique_ptr<v1::AccessService::Stub>> access_stubs_;
  std::vector<std::unique_ptr<Slot>> slots_;
  Clock::time_point window_start_;
  Clock::time_point window_end_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable drained_;
  int64_t outstanding_ = 0;  // Guarded by mu_ once the calls have started.
};

// Nearest-rank percentile of sorted samples; 0 when there are none.
uint32_t Percentile(const std::vector<uint32_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

int Main(int argc, char** argv) {
  Flags flags(
      "mv_loadgen",
      "--target HOST:PORT --method GetModel|ListModels|AcquireProviderKey|VerifyAccessKey "
      "[--channels N] [--inflight N] [--seconds S] [--warmup S] [--name NAME] "
      "[--parent PARENT] [--page-size N] [--provider P] [--token T] "
      "[--metadata KEY=VALUE]",
      {{"target", "127.0.0.1:50051", "server address, HOST:PORT"},
       {"method", "GetModel", "GetModel, ListModels, AcquireProviderKey or VerifyAccessKey"},
       {"channels", "4", "channels, each with its own connection"},
       {"inflight", "32", "calls kept outstanding per channel"},
       {"seconds", "5", "length of the measured window"},
       {"warmup", "1", "seconds of load before the window"},
       {"name", "providers/openai/models/gpt-4o", "GetModel: the model's name"},
       {"parent", "providers/-", "ListModels: the parent"},
       {"page_size", "50", "ListModels: the page size"},
       {"provider", "providers/openai", "AcquireProviderKey: the provider"},
       {"token", "", "VerifyAccessKey: the token to verify"},
       {"metadata", "", "KEY=VALUE header sent with every call, e.g. credentials"}});
  if (!flags.Parse(argc, argv)) return 2;
  Options options;
  int64_t channels = 0;
  int64_t inflight = 0;
  int64_t page_size = 0;
  if (!flags.GetInt("channels", 1, 256, &channels) ||
      !flags.GetInt("inflight", 1, 10000, &inflight) ||
      !flags.GetInt("page_size", 0, 1000000, &page_size) ||
      !flags.GetSeconds("seconds", &options.seconds) ||
      !flags.GetSeconds("warmup", &options.warmup)) {
    return 2;
  }
  if (options.seconds <= 0) {
    std::fprintf(stderr, "mv_loadgen: --seconds must be > 0\n");
    return 2;
  }
  const std::string method = flags.Get("method");
  if (method == "GetModel") {
    options.method = Method::kGetModel;
  } else if (method == "ListModels") {
    options.method = Method::kListModels;
  } else if (method == "AcquireProviderKey") {
    options.method = Method::kAcquireProviderKey;
  } else if (method == "VerifyAccessKey") {
    options.method = Method::kVerifyAccessKey;
  } else {
    std::fprintf(stderr,
                 "mv_loadgen: --method must be GetModel, ListModels, AcquireProviderKey or "
                 "VerifyAccessKey, got \"%s\"\n",
                 method.c_str());
    return 2;
  }
  options.provider = flags.Get("provider");
  options.verify_token = flags.Get("token");
  options.target = flags.Get("target");
  options.channels = static_cast<int>(channels);
  options.inflight = static_cast<int>(inflight);
  options.page_size = static_cast<int32_t>(page_size);
  options.name = flags.Get("name");
  options.parent = flags.Get("parent");
  if (const std::string metadata = flags.Get("metadata"); !metadata.empty()) {
    const size_t eq = metadata.find('=');
    if (eq == 0 || eq == std::string::npos) {
      std::fprintf(stderr, "mv_loadgen: --metadata must be KEY=VALUE\n");
      return 2;
    }
    options.metadata_key = absl::AsciiStrToLower(metadata.substr(0, eq));
    options.metadata_value = metadata.substr(eq + 1);
  }

  Result r;
  {
    LoadGenerator generator(options);
    r = generator.Run();
  }
  const int64_t errors = r.calls - r.ok;
  const double rps = static_cast<double>(r.ok) / r.window_seconds;
  const double items_per_call =
      r.ok > 0 ? static_cast<double>(r.items) / static_cast<double>(r.ok) : 0.0;
  std::printf(
      "method=%s rps=%.0f p50_us=%u p99_us=%u errors=%lld calls=%lld total_calls=%lld "
      "items_per_call=%.2f total_ok=%lld\n",
      method.c_str(), rps, Percentile(r.latencies_us, 0.50), Percentile(r.latencies_us, 0.99),
      static_cast<long long>(errors), static_cast<long long>(r.calls),
      static_cast<long long>(r.total_calls), items_per_call, static_cast<long long>(r.total_ok));
  std::fflush(stdout);

  std::string human = absl::StrFormat(
      "%s -> %s: %d channels x %d in flight, %.1f s: %.0f calls/s, latency us p50 %u p90 %u "
      "p99 %u p99.9 %u max %u; %lld calls, %lld errors; %.2f models/response; "
      "load generator CPU %.1f us/call",
      method, options.target, options.channels, options.inflight, r.window_seconds, rps,
      Percentile(r.latencies_us, 0.50), Percentile(r.latencies_us, 0.90),
      Percentile(r.latencies_us, 0.99), Percentile(r.latencies_us, 0.999),
      Percentile(r.latencies_us, 1.0), static_cast<long long>(r.calls),
      static_cast<long long>(errors), items_per_call,
      r.calls > 0 ? r.client_cpu_seconds * 1e6 / static_cast<double>(r.calls) : 0.0);
  for (int code = 1; code < kCodes; ++code) {
    if (r.errors_by_code[code] == 0) continue;
    absl::StrAppend(&human, "\n  ", CodeName(code), ": ", r.errors_by_code[code], " (first: \"",
                    r.first_error_by_code[code], "\")");
  }
  std::fprintf(stderr, "%s\n", human.c_str());
  return r.calls > 0 && errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace modelvault::bench

int main(int argc, char** argv) { return modelvault::bench::Main(argc, argv); }
