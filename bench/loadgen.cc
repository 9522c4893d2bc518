// mv_loadgen: a load generator for modelvault's hot paths (catalog reads,
// key acquisition, access-key verification, usage recording, ingest and
// watch), on the gRPC callback client API.
//
//   mv_loadgen --target 127.0.0.1:50061
//              --method GetModel|ListModels|AcquireProviderKey|VerifyAccessKey|
//                       RecordUsage|IngestUsage|WatchUsage
//              [--provider providers/openai] [--token TOKEN]
//              [--channels 4] [--inflight 32] [--seconds 5] [--warmup 1]
//              [--name providers/openai/models/gpt-4o] [--parent providers/-]
//              [--page-size 50] [--metadata KEY=VALUE]
//              [--batch 500] [--watchers 100] [--rate 200] [--run-id ID]
//              [--deliveries-out FILE]
//
// Unary methods (all but IngestUsage and WatchUsage) run closed-loop: each
// channel is its own grpc::Channel with its own subchannel (so its own TCP
// connection) and keeps `inflight` calls outstanding: a call's completion
// starts the next one. Calls completing during the warm-up are not counted;
// then every call completing during the next `seconds` is: its latency goes
// to a per-slot sample list and its status, when not OK, to a per-code count.
// RecordUsage sends a new record (a distinct request_id, a seeded model, see
// usage_rows.h) with every call.
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
//
// IngestUsage: `channels` streams, each on its own connection, each keeping
// `inflight` batches of `batch` records sent and not yet acknowledged; an
// acknowledgement sends the next batch. At the end each stream stops
// sending, waits for its last acknowledgements and half-closes. The line
// counts records, not calls: rps is the records acknowledged as accepted
// during the window per second, p50/p99 the batches' send-to-acknowledgement
// latency, calls and errors the records acknowledged during the window and
// those rejected or acknowledged as duplicates (plus one per stream that
// ended with an error and one per acknowledgement out of batch order),
// total_calls every record acknowledged in the whole run (for the server's
// CPU time per record), items_per_call the batch size, batches the batches
// acknowledged during the window.
//
// WatchUsage: opens `watchers` WatchUsage streams spread over `channels`
// connections, waits until each has received its first checkpoint (it is
// subscribed), then writes RecordUsage calls at `rate` per second, open-loop,
// on a connection of their own, for warmup + seconds; every watcher should
// receive every record. Deliveries received during the window are counted
// (rps: deliveries per second across all watchers; written_per_s: writes
// acknowledged per second; lagged=1 when the writer could not keep its rate
// with 2000 calls unanswered) and timed two ways, both on this machine's
// wall clock, the one the server stamps records with:
//   p50_us/p99_us/max_us: receipt minus the record's record_time. The server
//     sets record_time when its writer starts the transaction that stores
//     the record, before the commit, so this is an upper bound on
//     commit-to-delivery (it includes the transaction itself).
//   send_p50_us/send_p99_us/send_max_us: receipt minus the time the writer
//     sent the RecordUsage call (carried in the record's `conversation`):
//     end to end, queueing and commit included.
// With --deliveries-out, every delivery of the window is also written to a
// file (request_id, receipt time), for timing deliveries against commit
// times the database keeps (scripts/bench.sh does on PostgreSQL).
// After the writes the watchers get up to 10 s to receive every
// acknowledged record; missing counts the deliveries that never came (each
// is an error), as do failed writes and streams that ended early.

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
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "flags.h"
#include "modelvault/v1/access.grpc.pb.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/credentials.grpc.pb.h"
#include "modelvault/v1/usage.grpc.pb.h"
#include "usage_rows.h"

namespace modelvault::bench {
namespace {

namespace v1 = ::modelvault::v1;
using Clock = std::chrono::steady_clock;

constexpr auto kCallDeadline = std::chrono::seconds(10);
constexpr int kCodes = 17;  // grpc::StatusCode values 0..16.

enum class Method {
  kGetModel,
  kListModels,
  kAcquireProviderKey,
  kVerifyAccessKey,
  kRecordUsage,
  kIngestUsage,
  kWatchUsage
};

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
  int batch = 500;             // IngestUsage: records per batch
  int watchers = 100;          // WatchUsage: streams
  double rate = 200;           // WatchUsage: records written per second
  std::string run_id;          // Prefix of the request ids of this run
  std::string deliveries_out;  // WatchUsage: file of (request_id, receipt) per delivery
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

  void AddError(grpc::StatusCode code, const std::string& message, int64_t n = 1) {
    const int c = static_cast<int>(code);
    const int index = c > 0 && c < kCodes ? c : static_cast<int>(grpc::UNKNOWN);
    if (errors_by_code[index] == 0) first_error_by_code[index] = message;
    errors_by_code[index] += n;
    calls += n;
  }
};

// Microseconds as a latency sample: clamped to [0, UINT32_MAX].
uint32_t Sample(int64_t us) {
  return static_cast<uint32_t>(std::clamp<int64_t>(us, 0, UINT32_MAX));
}

Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

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

// A channel with a subchannel (so a TCP connection) of its own.
std::shared_ptr<grpc::Channel> NewChannel(const std::string& target, int index) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("modelvault.bench.channel", index);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

void SetMicros(int64_t micros, google::protobuf::Timestamp* out) {
  out->set_seconds(micros / 1000000);
  out->set_nanos(static_cast<int32_t>(micros % 1000000) * 1000);
}

void SetMicros(int64_t micros, google::protobuf::Duration* out) {
  out->set_seconds(micros / 1000000);
  out->set_nanos(static_cast<int32_t>(micros % 1000000) * 1000);
}

// Record `n` of writer `writer` (usage_rows.h), made at `call_micros`.
void FillRecord(const std::string& run, int writer, int64_t n, int64_t call_micros,
                v1::UsageRecord* out) {
  const UsageRow row = MakeUsageRow(run, writer, n);
  out->set_request_id(row.request_id);
  SetMicros(call_micros, out->mutable_time());
  out->set_provider(row.provider);
  out->set_model(row.model);
  out->set_provider_key(row.provider_key);
  out->set_user(row.user);
  out->set_conversation(row.conversation);
  out->set_message(row.message);
  v1::TokenCounts* tokens = out->mutable_tokens();
  tokens->set_input(row.input);
  tokens->set_output(row.output);
  tokens->set_cache_read(row.cache_read);
  tokens->set_cache_write(row.cache_write);
  tokens->set_reasoning(row.reasoning);
  SetMicros(row.latency_us, out->mutable_latency());
  SetMicros(row.ttft_us, out->mutable_time_to_first_token());
}

int64_t ToMicros(const google::protobuf::Timestamp& t) {
  return t.seconds() * 1000000 + t.nanos() / 1000;
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
      auto channel = NewChannel(options.target, c);
      stubs_.push_back(v1::CatalogService::NewStub(channel));
      credential_stubs_.push_back(v1::CredentialService::NewStub(channel));
      access_stubs_.push_back(v1::AccessService::NewStub(channel));
      usage_stubs_.push_back(v1::UsageService::NewStub(channel));
    }
    for (int c = 0; c < options.channels; ++c) {
      for (int i = 0; i < options.inflight; ++i) {
        auto slot = std::make_unique<Slot>();
        slot->index = static_cast<int>(slots_.size());
        slot->stub = stubs_[c].get();
        slot->credential_stub = credential_stubs_[c].get();
        slot->access_stub = access_stubs_[c].get();
        slot->usage_stub = usage_stubs_[c].get();
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
    int index = 0;
    v1::CatalogService::Stub* stub = nullptr;
    v1::CredentialService::Stub* credential_stub = nullptr;
    v1::AccessService::Stub* access_stub = nullptr;
    v1::UsageService::Stub* usage_stub = nullptr;
    std::unique_ptr<grpc::ClientContext> context;
    Clock::time_point sent;
    v1::Model model;
    v1::ListModelsResponse list;
    v1::AcquireProviderKeyResponse acquired;
    v1::VerifyAccessKeyResponse verified;
    v1::RecordUsageRequest record_request;
    v1::RecordUsageResponse recorded;
    int64_t records_sent = 0;
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
    auto done = [this, slot](const grpc::Status& status) { OnDone(slot, status); };
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
      case Method::kRecordUsage:
        FillRecord(options_.run_id, slot->index, slot->records_sent++, UnixMicrosNow(),
                   slot->record_request.mutable_record());
        slot->usage_stub->async()->RecordUsage(slot->context.get(), &slot->record_request,
                                               &slot->recorded, std::move(done));
        break;
      case Method::kIngestUsage:
      case Method::kWatchUsage:
        break;  // Not unary: IngestBench and WatchBench.
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
  std::vector<std::unique_ptr<v1::UsageService::Stub>> usage_stubs_;
  std::vector<std::unique_ptr<Slot>> slots_;
  Clock::time_point window_start_;
  Clock::time_point window_end_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable drained_;
  int64_t outstanding_ = 0;  // Guarded by mu_ once the calls have started.
};

// IngestUsage: `channels` streams of `batch`-record batches, `inflight`
// batches unacknowledged per stream.
class IngestBench final {
 public:
  explicit IngestBench(const Options& options) : options_(options) {
    for (int c = 0; c < options.channels; ++c) {
      stubs_.push_back(v1::UsageService::NewStub(NewChannel(options.target, c)));
      streams_.push_back(std::make_unique<Stream>(*this, stubs_.back().get(), c));
    }
  }

  Result Run() {
    const Clock::time_point start = Clock::now();
    window_start_ = start + Seconds(options_.warmup);
    window_end_ = window_start_ + Seconds(options_.seconds);
    remaining_ = static_cast<int>(streams_.size());
    for (auto& stream : streams_) stream->Start();

    Result result;
    std::this_thread::sleep_until(window_start_);
    const double cpu_start = CpuSeconds();
    std::this_thread::sleep_until(window_end_);
    result.client_cpu_seconds = CpuSeconds() - cpu_start;
    stopping_.store(true);
    // Half-close the streams with nothing in flight; the others do it at
    // their last acknowledgement.
    for (auto& stream : streams_) stream->Pump();
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!done_.wait_for(lock, std::chrono::seconds(30), [this] { return remaining_ == 0; })) {
        std::fprintf(stderr, "mv_loadgen: streams still open 30 s after the window; cancelling\n");
        lock.unlock();
        for (auto& stream : streams_) stream->Cancel();
        lock.lock();
        done_.wait(lock, [this] { return remaining_ == 0; });
      }
    }

    result.window_seconds = std::chrono::duration<double>(window_end_ - window_start_).count();
    for (const auto& stream : streams_) stream->AddTo(result);
    std::sort(result.latencies_us.begin(), result.latencies_us.end());
    return result;
  }

 private:
  class Stream final
      : public grpc::ClientBidiReactor<v1::IngestUsageRequest, v1::IngestUsageResponse> {
   public:
    Stream(IngestBench& bench, v1::UsageService::Stub* stub, int index)
        : bench_(bench), stub_(stub), index_(index) {}

    void Start() {
      if (!bench_.options_.metadata_key.empty()) {
        context_.AddMetadata(bench_.options_.metadata_key, bench_.options_.metadata_value);
      }
      stub_->async()->IngestUsage(&context_, this);
      StartRead(&ack_);
      Pump();
      StartCall();
    }

    void Cancel() { context_.TryCancel(); }

    // Sends the next batch when the stream may, or half-closes once the
    // run is stopping and every batch is acknowledged.
    void Pump() {
      bool write = false;
      bool writes_done = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (writing_ || half_closed_ || broken_) return;
        if (bench_.stopping_.load()) {
          writes_done = half_closed_ = in_flight_ == 0;
        } else if (in_flight_ < bench_.options_.inflight) {
          writing_ = write = true;
          ++in_flight_;
          request_.Clear();
          request_.set_batch_id(next_batch_id_);
          const int64_t now_us = UnixMicrosNow();
          for (int i = 0; i < bench_.options_.batch; ++i) {
            FillRecord(bench_.options_.run_id, index_, records_sent_++, now_us,
                       request_.add_records());
          }
          sent_.emplace_back(next_batch_id_++, Clock::now());
        }
      }
      if (write) StartWrite(&request_);
      if (writes_done) StartWritesDone();
    }

    void OnWriteDone(bool ok) override {
      {
        std::lock_guard<std::mutex> lock(mu_);
        writing_ = false;
        if (!ok) broken_ = true;
      }
      if (ok) Pump();
    }

    void OnReadDone(bool ok) override {
      if (!ok) {
        // The server ended the stream; OnDone follows with its status.
        std::lock_guard<std::mutex> lock(mu_);
        broken_ = true;
        return;
      }
      const Clock::time_point now = Clock::now();
      {
        std::lock_guard<std::mutex> lock(mu_);
        // Acknowledgements come in the order of the batches.
        const std::pair<int64_t, Clock::time_point> sent =
            sent_.empty() ? std::make_pair(int64_t{-1}, now) : sent_.front();
        if (!sent_.empty()) sent_.pop_front();
        if (ack_.batch_id() != sent.first && out_of_order_++ == 0) {
          first_out_of_order_ =
              absl::StrCat("stream ", index_, ": acknowledgement of batch ", ack_.batch_id(),
                           " when batch ", sent.first, " was the oldest unacknowledged");
        }
        --in_flight_;
        const int64_t acked = ack_.accepted() + ack_.duplicates() + ack_.rejected_size();
        total_acked_ += acked;
        total_accepted_ += ack_.accepted();
        if (now >= bench_.window_start_ && now < bench_.window_end_) {
          ++batches_;
          accepted_ += ack_.accepted();
          latencies_us_.push_back(Sample(
              std::chrono::duration_cast<std::chrono::microseconds>(now - sent.second).count()));
          if (ack_.duplicates() > 0) {
            if (duplicates_ == 0) {
              first_duplicate_ = absl::StrCat("batch ", ack_.batch_id(), ": ", ack_.duplicates(),
                                              " records acknowledged as duplicates");
            }
            duplicates_ += ack_.duplicates();
          }
          if (ack_.rejected_size() > 0 && rejected_ == 0) {
            first_rejected_ = absl::StrCat(ack_.rejected(0).reason(), " ", ack_.rejected(0).field(),
                                           ": ", ack_.rejected(0).description());
          }
          rejected_ += ack_.rejected_size();
        }
      }
      StartRead(&ack_);
      Pump();
    }

    void OnDone(const grpc::Status& status) override {
      {
        std::lock_guard<std::mutex> lock(mu_);
        status_ = status;
      }
      std::lock_guard<std::mutex> lock(bench_.mu_);
      if (--bench_.remaining_ == 0) bench_.done_.notify_all();
    }

    // Called once the stream is done.
    void AddTo(Result& result) {
      std::lock_guard<std::mutex> lock(mu_);
      result.ok += accepted_;
      result.total_ok += total_accepted_;
      result.calls += accepted_;
      result.total_calls += total_acked_;
      result.items += batches_;
      if (rejected_ > 0) result.AddError(grpc::INVALID_ARGUMENT, first_rejected_, rejected_);
      if (duplicates_ > 0) result.AddError(grpc::ALREADY_EXISTS, first_duplicate_, duplicates_);
      if (out_of_order_ > 0) result.AddError(grpc::INTERNAL, first_out_of_order_, out_of_order_);
      if (!status_.ok()) {
        result.AddError(status_.error_code(),
                        absl::StrCat("stream ", index_, " ended: ", status_.error_message()));
      }
      result.latencies_us.insert(result.latencies_us.end(), latencies_us_.begin(),
                                 latencies_us_.end());
    }

   private:
    IngestBench& bench_;
    v1::UsageService::Stub* const stub_;
    const int index_;
    grpc::ClientContext context_;
    v1::IngestUsageResponse ack_;  // Only touched by the read in flight and OnReadDone.
    std::mutex mu_;
    v1::IngestUsageRequest request_;  // Guarded by mu_ while !writing_.
    // Id and send time of the unacknowledged batches, in order.
    std::deque<std::pair<int64_t, Clock::time_point>> sent_;
    int in_flight_ = 0;
    bool writing_ = false;
    bool half_closed_ = false;
    bool broken_ = false;
    int64_t next_batch_id_ = 1;
    int64_t records_sent_ = 0;
    int64_t total_acked_ = 0;
    int64_t total_accepted_ = 0;
    int64_t batches_ = 0;  // Of the window, as every figure below.
    int64_t accepted_ = 0;
    int64_t rejected_ = 0;
    int64_t duplicates_ = 0;
    std::string first_rejected_;
    std::string first_duplicate_;
    int64_t out_of_order_ = 0;  // Whole run.
    std::string first_out_of_order_;
    std::vector<uint32_t> latencies_us_;
    grpc::Status status_;
  };

  const Options options_;
  std::vector<std::unique_ptr<v1::UsageService::Stub>> stubs_;
  std::vector<std::unique_ptr<Stream>> streams_;
  Clock::time_point window_start_;
  Clock::time_point window_end_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::condition_variable done_;
  int remaining_ = 0;  // Streams not done yet; guarded by mu_.
};

// What WatchBench measured, beyond the figures of Result (whose latencies
// are the receipt minus record_time).
struct WatchResult {
  Result result;
  std::vector<uint32_t> send_latencies_us;   // Receipt minus send time, sorted.
  std::vector<uint32_t> write_latencies_us;  // RecordUsage calls of the window, sorted.
  int64_t written_in_window = 0;             // RecordUsage acknowledged in the window
  int64_t acknowledged = 0;                  // RecordUsage acknowledged in the whole run
  int64_t delivered = 0;                     // Records received by all watchers, whole run
  int64_t missing = 0;                       // Acknowledged records some watcher never got
  int64_t extra = 0;                         // Deliveries beyond the acknowledged records
  bool lagged = false;                       // The writer could not keep its rate
  double subscribe_seconds = 0;              // Until every watcher was subscribed
};

// WatchUsage: `watchers` streams, a RecordUsage writer at `rate` per second.
class WatchBench final {
 public:
  explicit WatchBench(const Options& options) : options_(options) {
    for (int c = 0; c < options.channels; ++c) {
      stubs_.push_back(v1::UsageService::NewStub(NewChannel(options.target, c)));
    }
    writer_stub_ = v1::UsageService::NewStub(NewChannel(options.target, options.channels));
    for (int w = 0; w < options.watchers; ++w) {
      watchers_.push_back(std::make_unique<Watcher>(*this, stubs_[w % stubs_.size()].get()));
    }
  }

  // When the watchers cannot all subscribe, nothing is written and `out`
  // holds one error per watcher left out.
  void Run(WatchResult& out) {
    Result& result = out.result;
    remaining_ = static_cast<int>(watchers_.size());
    const Clock::time_point opened = Clock::now();
    for (auto& watcher : watchers_) watcher->Start();
    {
      std::unique_lock<std::mutex> lock(mu_);
      const int all = static_cast<int>(watchers_.size());
      const auto settled = [this, all] { return subscribed_ == all || remaining_ == 0; };
      if (!done_.wait_for(lock, std::chrono::seconds(20), settled) || subscribed_ < all) {
        result.AddError(
            grpc::DEADLINE_EXCEEDED,
            absl::StrCat("only ", subscribed_, " of ", all, " watchers subscribed within 20 s"),
            all - subscribed_);
        result.window_seconds = options_.seconds;
        lock.unlock();
        StopWatchers();
        return;
      }
    }
    const Clock::time_point writes_start = Clock::now();
    out.subscribe_seconds = std::chrono::duration<double>(writes_start - opened).count();
    const Clock::time_point window_start = writes_start + Seconds(options_.warmup);
    const Clock::time_point window_end = window_start + Seconds(options_.seconds);
    window_end_.store(window_end.time_since_epoch().count());
    window_start_.store(window_start.time_since_epoch().count());

    // Open loop: the writes due by now, at most kMaxOutstanding unanswered.
    constexpr int64_t kMaxOutstanding = 2000;
    int64_t issued = 0;
    double cpu_start = -1;
    for (Clock::time_point now = Clock::now(); now < window_end; now = Clock::now()) {
      if (cpu_start < 0 && now >= window_start) cpu_start = CpuSeconds();
      const auto due = static_cast<int64_t>(
          options_.rate * std::chrono::duration<double>(now - writes_start).count());
      while (issued < due) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (outstanding_ >= kMaxOutstanding) {
            out.lagged = true;
            break;
          }
          ++outstanding_;
        }
        Write(issued++);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    result.client_cpu_seconds = CpuSeconds() - std::max(cpu_start, 0.0);
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!done_.wait_for(lock, std::chrono::seconds(15), [this] { return outstanding_ == 0; })) {
        std::fprintf(stderr, "mv_loadgen: %lld RecordUsage calls unanswered after 15 s\n",
                     static_cast<long long>(outstanding_));
      }
      out.acknowledged = acknowledged_;
    }
    // Every watcher should get every acknowledged record: up to 10 s more.
    const Clock::time_point give_up = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < give_up) {
      bool all = true;
      for (const auto& watcher : watchers_) {
        all = all && watcher->delivered() >= out.acknowledged;
      }
      if (all) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    for (const auto& watcher : watchers_) {
      const int64_t got = watcher->delivered();
      out.delivered += got;
      out.missing += std::max<int64_t>(0, out.acknowledged - got);
      out.extra += std::max<int64_t>(0, got - out.acknowledged);
    }
    StopWatchers();

    result.window_seconds = options_.seconds;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& watcher : watchers_) watcher->AddTo(result, out.send_latencies_us);
    if (!options_.deliveries_out.empty()) WriteDeliveries(result);
    result.total_calls = out.delivered;
    result.total_ok = out.acknowledged;
    if (out.missing > 0) {
      result.AddError(grpc::DATA_LOSS,
                      absl::StrCat(out.missing, " acknowledged records never reached a watcher"),
                      out.missing);
    }
    if (write_errors_ > 0) {
      result.AddError(first_write_code_, absl::StrCat("RecordUsage: ", first_write_error_),
                      write_errors_);
    }
    out.written_in_window = written_in_window_;
    out.write_latencies_us = write_latencies_us_;
    std::sort(result.latencies_us.begin(), result.latencies_us.end());
    std::sort(out.send_latencies_us.begin(), out.send_latencies_us.end());
    std::sort(out.write_latencies_us.begin(), out.write_latencies_us.end());
  }

 private:
  class Watcher final : public grpc::ClientReadReactor<v1::WatchUsageResponse> {
   public:
    Watcher(WatchBench& bench, v1::UsageService::Stub* stub) : bench_(bench), stub_(stub) {
      request_.set_checkpoint_interval_seconds(10);
    }

    void Start() {
      if (!bench_.options_.metadata_key.empty()) {
        context_.AddMetadata(bench_.options_.metadata_key, bench_.options_.metadata_value);
      }
      stub_->async()->WatchUsage(&context_, &request_, this);
      StartRead(&response_);
      StartCall();
    }

    void Cancel() {
      cancelled_.store(true);
      context_.TryCancel();
    }

    int64_t delivered() const { return delivered_.load(std::memory_order_relaxed); }

    void OnReadDone(bool ok) override {
      if (!ok) return;  // OnDone follows.
      if (response_.has_record()) {
        const int64_t now_us = UnixMicrosNow();
        const Clock::time_point now = Clock::now();
        delivered_.fetch_add(1, std::memory_order_relaxed);
        if (bench_.InWindow(now)) {
          ++window_delivered_;
          latencies_us_.push_back(Sample(now_us - ToMicros(response_.record().record_time())));
          int64_t sent_us = 0;
          if (absl::SimpleAtoi(absl::StripPrefix(response_.record().conversation(), "sent-"),
                               &sent_us)) {
            send_latencies_us_.push_back(Sample(now_us - sent_us));
          }
          if (bench_.keep_deliveries_) {
            deliveries_.emplace_back(response_.record().request_id(), now_us);
          }
        }
      } else if (!subscribed_) {
        subscribed_ = true;  // The first message: a checkpoint at the feed's head.
        std::lock_guard<std::mutex> lock(bench_.mu_);
        ++bench_.subscribed_;
        bench_.done_.notify_all();
      }
      StartRead(&response_);
    }

    void OnDone(const grpc::Status& status) override {
      std::lock_guard<std::mutex> lock(bench_.mu_);
      status_ = status;
      if (--bench_.remaining_ == 0) bench_.done_.notify_all();
    }

    // Called once done, under bench_.mu_.
    void AddTo(Result& result, std::vector<uint32_t>& send_latencies) const {
      result.ok += window_delivered_;
      result.calls += window_delivered_;
      result.items += window_delivered_;
      // Ended by the server (SLOW_CONSUMER, shutdown) rather than cancelled.
      if (!status_.ok() && !(cancelled_.load() && status_.error_code() == grpc::CANCELLED)) {
        result.AddError(status_.error_code(),
                        absl::StrCat("a watcher ended early: ", status_.error_message()));
      }
      result.latencies_us.insert(result.latencies_us.end(), latencies_us_.begin(),
                                 latencies_us_.end());
      send_latencies.insert(send_latencies.end(), send_latencies_us_.begin(),
                            send_latencies_us_.end());
    }

    // Request id and receipt time (Unix us) of the deliveries of the window,
    // with --deliveries-out; read once done.
    const std::vector<std::pair<std::string, int64_t>>& deliveries() const { return deliveries_; }

   private:
    WatchBench& bench_;
    v1::UsageService::Stub* const stub_;
    grpc::ClientContext context_;
    v1::WatchUsageRequest request_;
    // Touched only by the read in flight and its OnReadDone (one at a time).
    v1::WatchUsageResponse response_;
    bool subscribed_ = false;
    int64_t window_delivered_ = 0;
    std::vector<uint32_t> latencies_us_;
    std::vector<uint32_t> send_latencies_us_;
    std::vector<std::pair<std::string, int64_t>> deliveries_;
    std::atomic<int64_t> delivered_{0};
    std::atomic<bool> cancelled_{false};
    grpc::Status status_;  // Guarded by bench_.mu_.
  };

  struct WriteCall {
    grpc::ClientContext context;
    v1::RecordUsageRequest request;
    v1::RecordUsageResponse response;
    Clock::time_point sent;
  };

  void Write(int64_t n) {
    auto* call = new WriteCall();
    if (!options_.metadata_key.empty()) {
      call->context.AddMetadata(options_.metadata_key, options_.metadata_value);
    }
    call->context.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
    const int64_t now_us = UnixMicrosNow();
    v1::UsageRecord* record = call->request.mutable_record();
    FillRecord(options_.run_id, 0, n, now_us, record);
    record->set_conversation(absl::StrCat("sent-", now_us));
    call->sent = Clock::now();
    writer_stub_->async()->RecordUsage(
        &call->context, &call->request, &call->response, [this, call](const grpc::Status& status) {
          const std::unique_ptr<WriteCall> owned(call);
          const Clock::time_point now = Clock::now();
          std::lock_guard<std::mutex> lock(mu_);
          if (status.ok()) {
            ++acknowledged_;
            if (InWindow(now)) {
              ++written_in_window_;
              write_latencies_us_.push_back(
                  Sample(std::chrono::duration_cast<std::chrono::microseconds>(now - owned->sent)
                             .count()));
            }
          } else if (write_errors_++ == 0) {
            first_write_code_ = status.error_code();
            first_write_error_ = status.error_message();
          }
          if (--outstanding_ == 0) done_.notify_all();
        });
  }

  // One line per delivery of the window: request_id, a tab, the receipt
  // time in Unix microseconds. A write error counts as an error of the run.
  void WriteDeliveries(Result& result) const {
    FILE* out = std::fopen(options_.deliveries_out.c_str(), "w");
    bool ok = out != nullptr;
    for (const auto& watcher : watchers_) {
      for (const auto& [request_id, receipt_us] : watcher->deliveries()) {
        ok = ok && std::fprintf(out, "%s\t%lld\n", request_id.c_str(),
                                static_cast<long long>(receipt_us)) > 0;
      }
    }
    if (out != nullptr) ok = std::fclose(out) == 0 && ok;
    if (!ok) {
      result.AddError(grpc::INTERNAL,
                      absl::StrCat("cannot write the deliveries to ", options_.deliveries_out));
    }
  }

  bool InWindow(Clock::time_point t) const {
    const Clock::rep ticks = t.time_since_epoch().count();
    return ticks >= window_start_.load() && ticks < window_end_.load();
  }

  void StopWatchers() {
    for (auto& watcher : watchers_) watcher->Cancel();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return remaining_ == 0; });
  }

  const Options options_;
  std::vector<std::unique_ptr<v1::UsageService::Stub>> stubs_;
  std::unique_ptr<v1::UsageService::Stub> writer_stub_;
  std::vector<std::unique_ptr<Watcher>> watchers_;
  const bool keep_deliveries_ = !options_.deliveries_out.empty();
  // The measured window (steady clock ticks), set before the first write:
  // nothing received before it counts.
  std::atomic<Clock::rep> window_start_{std::numeric_limits<Clock::rep>::max()};
  std::atomic<Clock::rep> window_end_{std::numeric_limits<Clock::rep>::max()};
  std::mutex mu_;
  std::condition_variable done_;
  int remaining_ = 0;   // Watchers not done; guarded by mu_, as everything below.
  int subscribed_ = 0;  // Watchers that received their first message.
  int64_t outstanding_ = 0;
  int64_t acknowledged_ = 0;
  int64_t written_in_window_ = 0;
  int64_t write_errors_ = 0;
  grpc::StatusCode first_write_code_ = grpc::OK;
  std::string first_write_error_;
  std::vector<uint32_t> write_latencies_us_;
};

// Nearest-rank percentile of sorted samples; 0 when there are none.
uint32_t Percentile(const std::vector<uint32_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

// The human-readable error lines of `r`, one per status code.
std::string ErrorLines(const Result& r) {
  std::string out;
  for (int code = 1; code < kCodes; ++code) {
    if (r.errors_by_code[code] == 0) continue;
    absl::StrAppend(&out, "\n  ", CodeName(code), ": ", r.errors_by_code[code], " (first: \"",
                    r.first_error_by_code[code], "\")");
  }
  return out;
}

int RunIngest(const Options& options) {
  Result r;
  {
    IngestBench bench(options);
    r = bench.Run();
  }
  const int64_t errors = r.calls - r.ok;
  const double rps = static_cast<double>(r.ok) / r.window_seconds;
  std::printf(
      "method=IngestUsage rps=%.0f p50_us=%u p99_us=%u errors=%lld calls=%lld total_calls=%lld "
      "items_per_call=%d total_ok=%lld batches=%lld streams=%d batch=%d inflight=%d\n",
      rps, Percentile(r.latencies_us, 0.50), Percentile(r.latencies_us, 0.99),
      static_cast<long long>(errors), static_cast<long long>(r.calls),
      static_cast<long long>(r.total_calls), options.batch, static_cast<long long>(r.total_ok),
      static_cast<long long>(r.items), options.channels, options.batch, options.inflight);
  std::fflush(stdout);
  std::fprintf(stderr,
               "IngestUsage -> %s: %d streams x %d batches of %d in flight, %.1f s: %.0f records/s "
               "acknowledged, batch latency us p50 %u p90 %u p99 %u max %u; %lld batches, %lld "
               "records, %lld errors; load generator CPU %.2f us/record%s\n",
               options.target.c_str(), options.channels, options.inflight, options.batch,
               r.window_seconds, rps, Percentile(r.latencies_us, 0.50),
               Percentile(r.latencies_us, 0.90), Percentile(r.latencies_us, 0.99),
               Percentile(r.latencies_us, 1.0), static_cast<long long>(r.items),
               static_cast<long long>(r.calls), static_cast<long long>(errors),
               r.calls > 0 ? r.client_cpu_seconds * 1e6 / static_cast<double>(r.calls) : 0.0,
               ErrorLines(r).c_str());
  return r.calls > 0 && errors == 0 ? 0 : 1;
}

int RunWatch(const Options& options) {
  WatchResult w;
  {
    WatchBench bench(options);
    bench.Run(w);
  }
  const Result& r = w.result;
  const int64_t errors = r.calls - r.ok;
  const double delivered_per_s = static_cast<double>(r.ok) / r.window_seconds;
  const double written_per_s = static_cast<double>(w.written_in_window) / r.window_seconds;
  std::printf(
      "method=WatchUsage rps=%.0f p50_us=%u p99_us=%u max_us=%u send_p50_us=%u send_p99_us=%u "
      "send_max_us=%u errors=%lld calls=%lld total_calls=%lld items_per_call=1 total_ok=%lld "
      "watchers=%d rate=%.0f written_per_s=%.0f write_p99_us=%u delivered=%lld missing=%lld "
      "extra=%lld lagged=%d\n",
      delivered_per_s, Percentile(r.latencies_us, 0.50), Percentile(r.latencies_us, 0.99),
      Percentile(r.latencies_us, 1.0), Percentile(w.send_latencies_us, 0.50),
      Percentile(w.send_latencies_us, 0.99), Percentile(w.send_latencies_us, 1.0),
      static_cast<long long>(errors), static_cast<long long>(r.calls),
      static_cast<long long>(r.total_calls), static_cast<long long>(r.total_ok), options.watchers,
      options.rate, written_per_s, Percentile(w.write_latencies_us, 0.99),
      static_cast<long long>(w.delivered), static_cast<long long>(w.missing),
      static_cast<long long>(w.extra), w.lagged ? 1 : 0);
  std::fflush(stdout);
  std::fprintf(
      stderr,
      "WatchUsage -> %s: %d watchers on %d channels (subscribed in %.2f s), RecordUsage at "
      "%.0f/s: %.0f written/s, %.0f delivered/s across the watchers in %.1f s; record_time to "
      "receipt us p50 %u p90 %u p99 %u max %u; send to receipt us p50 %u p99 %u max %u; "
      "RecordUsage p99 %u us; %lld acknowledged, %lld delivered (%lld expected), %lld missing, "
      "%lld extra%s; load generator CPU %.2f us/delivery%s\n",
      options.target.c_str(), options.watchers, options.channels, w.subscribe_seconds, options.rate,
      written_per_s, delivered_per_s, r.window_seconds, Percentile(r.latencies_us, 0.50),
      Percentile(r.latencies_us, 0.90), Percentile(r.latencies_us, 0.99),
      Percentile(r.latencies_us, 1.0), Percentile(w.send_latencies_us, 0.50),
      Percentile(w.send_latencies_us, 0.99), Percentile(w.send_latencies_us, 1.0),
      Percentile(w.write_latencies_us, 0.99), static_cast<long long>(w.acknowledged),
      static_cast<long long>(w.delivered),
      static_cast<long long>(w.acknowledged) * options.watchers, static_cast<long long>(w.missing),
      static_cast<long long>(w.extra), w.lagged ? "; the writer fell behind its rate" : "",
      r.calls > 0 ? r.client_cpu_seconds * 1e6 / static_cast<double>(r.calls) : 0.0,
      ErrorLines(r).c_str());
  return r.calls > 0 && errors == 0 ? 0 : 1;
}

int Main(int argc, char** argv) {
  Flags flags(
      "mv_loadgen",
      "--target HOST:PORT --method GetModel|ListModels|AcquireProviderKey|VerifyAccessKey|"
      "RecordUsage|IngestUsage|WatchUsage [--channels N] [--inflight N] [--seconds S] "
      "[--warmup S] [--name NAME] [--parent PARENT] [--page-size N] [--provider P] [--token T] "
      "[--metadata KEY=VALUE] [--batch N] [--watchers N] [--rate R] [--run-id ID] "
      "[--deliveries-out FILE]",
      {{"target", "127.0.0.1:50051", "server address, HOST:PORT"},
       {"method", "GetModel",
        "GetModel, ListModels, AcquireProviderKey, VerifyAccessKey, RecordUsage, IngestUsage or "
        "WatchUsage"},
       {"channels", "4",
        "channels, each with its own connection (IngestUsage: one stream each; WatchUsage: the "
        "watchers' connections)"},
       {"inflight", "32", "calls kept outstanding per channel (IngestUsage: batches per stream)"},
       {"seconds", "5", "length of the measured window"},
       {"warmup", "1", "seconds of load before the window"},
       {"name", "providers/openai/models/gpt-4o", "GetModel: the model's name"},
       {"parent", "providers/-", "ListModels: the parent"},
       {"page_size", "50", "ListModels: the page size"},
       {"provider", "providers/openai", "AcquireProviderKey: the provider"},
       {"token", "", "VerifyAccessKey: the token to verify"},
       {"metadata", "", "KEY=VALUE header sent with every call, e.g. credentials"},
       {"batch", "500", "IngestUsage: records per batch (the server takes at most 1000)"},
       {"watchers", "100", "WatchUsage: WatchUsage streams"},
       {"rate", "200", "WatchUsage: RecordUsage calls per second"},
       {"run_id", "", "prefix of the request ids of this run (default: random)"},
       {"deliveries_out", "",
        "WatchUsage: write `request_id<TAB>receipt Unix us` for every delivery of the window to "
        "this file"}});
  if (!flags.Parse(argc, argv)) return 2;
  Options options;
  int64_t channels = 0;
  int64_t inflight = 0;
  int64_t page_size = 0;
  int64_t batch = 0;
  int64_t watchers = 0;
  if (!flags.GetInt("channels", 1, 256, &channels) ||
      !flags.GetInt("inflight", 1, 10000, &inflight) ||
      !flags.GetInt("page_size", 0, 1000000, &page_size) ||
      !flags.GetInt("batch", 1, 100000, &batch) || !flags.GetInt("watchers", 1, 10000, &watchers) ||
      !flags.GetSeconds("seconds", &options.seconds) ||
      !flags.GetSeconds("warmup", &options.warmup)) {
    return 2;
  }
  if (options.seconds <= 0) {
    std::fprintf(stderr, "mv_loadgen: --seconds must be > 0\n");
    return 2;
  }
  if (!absl::SimpleAtod(flags.Get("rate"), &options.rate) || !(options.rate > 0) ||
      options.rate > 1e6) {
    std::fprintf(stderr, "mv_loadgen: --rate must be a number of calls per second in (0, 1e6]\n");
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
  } else if (method == "RecordUsage") {
    options.method = Method::kRecordUsage;
  } else if (method == "IngestUsage") {
    options.method = Method::kIngestUsage;
  } else if (method == "WatchUsage") {
    options.method = Method::kWatchUsage;
  } else {
    std::fprintf(stderr,
                 "mv_loadgen: --method must be GetModel, ListModels, AcquireProviderKey, "
                 "VerifyAccessKey, RecordUsage, IngestUsage or WatchUsage, got \"%s\"\n",
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
  options.batch = static_cast<int>(batch);
  options.watchers = static_cast<int>(watchers);
  options.run_id = flags.Get("run_id");
  if (options.run_id.empty()) options.run_id = RandomRunId();
  options.deliveries_out = flags.Get("deliveries_out");
  if (const std::string metadata = flags.Get("metadata"); !metadata.empty()) {
    const size_t eq = metadata.find('=');
    if (eq == 0 || eq == std::string::npos) {
      std::fprintf(stderr, "mv_loadgen: --metadata must be KEY=VALUE\n");
      return 2;
    }
    options.metadata_key = absl::AsciiStrToLower(metadata.substr(0, eq));
    options.metadata_value = metadata.substr(eq + 1);
  }
  if (options.method == Method::kIngestUsage) return RunIngest(options);
  if (options.method == Method::kWatchUsage) return RunWatch(options);

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
      Percentile(r.latencies_us, 1.0), r.calls, errors, items_per_call,
      r.calls > 0 ? r.client_cpu_seconds * 1e6 / static_cast<double>(r.calls) : 0.0);
  absl::StrAppend(&human, ErrorLines(r));
  std::fprintf(stderr, "%s\n", human.c_str());
  return r.calls > 0 && errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace modelvault::bench

int main(int argc, char** argv) { return modelvault::bench::Main(argc, argv); }
