#include "server/usage_service.h"

#include <atomic>
#include <deque>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "server/cursor.h"
#include "server/grpc_status.h"
#include "server/proto_time.h"
#include "server/validation.h"
#include "server/watch_reactor.h"

namespace modelvault::server {
namespace {

constexpr absl::string_view kService = "/modelvault.v1.UsageService/";
constexpr int kMaxBatch = 1000;
// Batches of one stream being stored at once: enough to keep the writer's
// groups full, bounded so one stream cannot queue without limit.
constexpr int kMaxInFlight = 4;
// Per-watcher buffer before a slow watcher is disconnected.
constexpr size_t kWatchQueue = 8192;

const v1::UsageRecord* RecordOf(const storage::ChangeRecord& change) {
  return static_cast<const v1::UsageRecord*>(change.message.get());
}

// The stream of batches: validate, queue to the writer, acknowledge in
// order after commit. Deletes itself in OnDone.
class IngestReactor final
    : public grpc::ServerBidiReactor<v1::IngestUsageRequest, v1::IngestUsageResponse> {
 public:
  IngestReactor(UsageLedger& ledger, UsageWriter& writer,
                absl::StatusOr<std::shared_ptr<StreamAuth>> auth)
      : ledger_(ledger), writer_(writer), order_key_(NextOrderKey()) {
    if (!auth.ok()) {
      Finish(ToGrpcStatus(auth.status()));
      return;
    }
    auth_ = *std::move(auth);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard lock(mu_);
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    Submit();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard lock(mu_);
    acks_.pop_front();
    writing_ = false;
    if (!ok) {
      broken_ = true;
      acks_.clear();
    }
    WriteNextLocked();
    MaybeFinishLocked();
  }

  void OnDone() override { delete this; }

 private:
  // A stream's batches commit in the order they were sent.
  static std::uint64_t NextOrderKey() {
    static std::atomic<std::uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
  }

  void Submit() {
    {
      // Checked and counted at once: a failing batch finishing the stream in
      // between would otherwise let this one outlive the reactor.
      std::lock_guard lock(mu_);
      if (failed_ || finished_) return;  // the stream is ending; this batch is not acknowledged
      // A key revoked (expired, narrowed) since the stream opened stores
      // nothing more: the stream ends once the batches in flight are done.
      if (absl::Status allowed = auth_->Check(); !allowed.ok()) {
        failed_ = true;
        final_status_ = ToGrpcStatus(allowed);
        MaybeFinishLocked();
        return;
      }
      ++in_flight_;
    }
    v1::IngestUsageResponse ack;
    ack.set_batch_id(request_.batch_id());
    std::vector<PreparedRecord> prepared;
    std::vector<int> index;        // batch index of each prepared record
    std::vector<std::string> ids;  // and its request_id
    if (request_.records_size() > kMaxBatch) {
      for (int i = 0; i < request_.records_size(); ++i) {
        v1::RejectedRecord* r = ack.add_rejected();
        r->set_index(i);
        r->set_request_id(request_.records(i).request_id());
        r->set_reason("INVALID_ARGUMENT");
        r->set_field("records");
        r->set_description(absl::StrCat("a batch holds at most ", kMaxBatch, " records"));
      }
    } else {
      prepared.reserve(request_.records_size());
      std::string prefix;
      for (int i = 0; i < request_.records_size(); ++i) {
        std::vector<FieldViolation> violations;
        PreparedRecord p;
        prefix.assign("records[");
        absl::StrAppend(&prefix, i, "].");
        // The record is moved out of the request (read into again next).
        if (ledger_.Prepare(std::move(*request_.mutable_records(i)), auth_->caller().principal,
                            prefix, p, violations)) {
          ids.push_back(p.record.request_id());
          prepared.push_back(std::move(p));
          index.push_back(i);
          continue;
        }
        v1::RejectedRecord* r = ack.add_rejected();
        r->set_index(i);
        r->set_request_id(p.record.request_id());
        r->set_reason("INVALID_ARGUMENT");
        r->set_field(violations.front().field);
        r->set_description(violations.front().description);
      }
    }
    const bool queued = writer_.Submit(
        std::move(prepared),
        [this, ack = std::move(ack), index = std::move(index),
         ids = std::move(ids)](absl::StatusOr<std::vector<RecordOutcome>> outcomes) mutable {
          Completed(std::move(ack), index, ids, std::move(outcomes));
        },
        order_key_);
    if (!queued) {
      Completed(v1::IngestUsageResponse(), {}, {},
                absl::ResourceExhaustedError(
                    "the usage writer is overloaded; resend the unacknowledged batches later"));
    }
    std::lock_guard lock(mu_);
    if (in_flight_ < kMaxInFlight && !failed_) {
      StartRead(&request_);
    } else {
      read_paused_ = true;
    }
  }

  // Runs on the writer thread (or inline when the writer refused).
  void Completed(v1::IngestUsageResponse ack, const std::vector<int>& index,
                 const std::vector<std::string>& ids,
                 absl::StatusOr<std::vector<RecordOutcome>> outcomes) {
    std::lock_guard lock(mu_);
    --in_flight_;
    if (!outcomes.ok()) {
      // Not durable: end the stream; the client resends unacknowledged batches.
      if (!failed_) {
        failed_ = true;
        final_status_ = ToGrpcStatus(outcomes.status());
      }
    } else if (!failed_) {
      std::int64_t highest = 0;
      for (size_t k = 0; k < outcomes->size(); ++k) {
        const RecordOutcome& o = (*outcomes)[k];
        switch (o.kind) {
          case RecordOutcome::Kind::kStored:
            ack.set_accepted(ack.accepted() + 1);
            highest = std::max(highest, o.seq);
            break;
          case RecordOutcome::Kind::kDuplicate:
            ack.set_duplicates(ack.duplicates() + 1);
            highest = std::max(highest, o.seq);
            break;
          case RecordOutcome::Kind::kReused: {
            v1::RejectedRecord* r = ack.add_rejected();
            r->set_index(index[k]);
            r->set_request_id(ids[k]);
            r->set_reason("REQUEST_ID_REUSED");
            r->set_field(absl::StrCat("records[", index[k], "].request_id"));
            r->set_description(
                "this request_id was already recorded with different content; nothing was "
                "stored");
            break;
          }
        }
      }
      std::sort(ack.mutable_rejected()->begin(), ack.mutable_rejected()->end(),
                [](const v1::RejectedRecord& a, const v1::RejectedRecord& b) {
                  return a.index() < b.index();
                });
      if (highest > 0) ack.set_cursor(EncodeCursor(highest));
      if (!broken_) acks_.push_back(std::move(ack));
      WriteNextLocked();
    }
    if (read_paused_ && !failed_ && !reads_done_ && in_flight_ < kMaxInFlight) {
      read_paused_ = false;
      StartRead(&request_);
    }
    MaybeFinishLocked();
  }

  void WriteNextLocked() {
    if (writing_ || acks_.empty() || broken_) return;
    writing_ = true;
    StartWrite(&acks_.front());
  }

  void MaybeFinishLocked() {
    if (finished_ || in_flight_ > 0 || writing_) return;
    if (failed_ || broken_ || (reads_done_ && acks_.empty())) {
      finished_ = true;
      Finish(failed_ ? final_status_ : grpc::Status::OK);
    }
  }

  UsageLedger& ledger_;
  UsageWriter& writer_;
  const std::uint64_t order_key_;
  std::shared_ptr<StreamAuth> auth_;  // null when refused at the start
  v1::IngestUsageRequest request_;
  std::mutex mu_;
  std::deque<v1::IngestUsageResponse> acks_;  // front is being written while writing_
  int in_flight_ = 0;
  bool writing_ = false;
  bool reads_done_ = false;
  bool read_paused_ = false;
  bool failed_ = false;
  bool broken_ = false;
  bool finished_ = false;
  grpc::Status final_status_;
};

}  // namespace

FeedSource UsageFeedSource() {
  FeedSource source;
  source.read = [](storage::Reader& reader, std::int64_t after,
                   int limit) -> absl::StatusOr<std::vector<storage::ChangeRecord>> {
    absl::StatusOr<std::vector<v1::UsageRecord>> records =
        UsageLedger::ReadAfter(reader, after, limit, nullptr);
    if (!records.ok()) return records.status();
    std::vector<storage::ChangeRecord> out;
    out.reserve(records->size());
    for (v1::UsageRecord& r : *records) {
      storage::ChangeRecord change;
      absl::StatusOr<std::int64_t> seq = DecodeCursor(r.cursor());
      change.seq = seq.ok() ? *seq : 0;
      change.time = FromProto(r.record_time());
      change.message = std::make_shared<const v1::UsageRecord>(std::move(r));
      out.push_back(std::move(change));
    }
    return out;
  };
  source.bounds = [](storage::Reader& reader, std::int64_t* oldest,
                     std::int64_t* last) -> absl::Status {
    return UsageLedger::FeedBounds(reader, last, oldest);
  };
  return source;
}

UsageService::UsageService(UsageLedger& ledger, UsageWriter& writer, ChangeHub& hub, CallGate& gate,
                           Executor& executor)
    : ledger_(ledger), writer_(writer), hub_(hub), gate_(gate), executor_(executor) {}

UsageService::Reactor* UsageService::RecordUsage(Ctx* c, const v1::RecordUsageRequest* r,
                                                 v1::RecordUsageResponse* o) {
  Reactor* reactor = c->DefaultReactor();
  absl::StatusOr<Caller> caller = gate_.Authorize(c, kService, __func__);
  if (!caller.ok()) {
    reactor->Finish(ToGrpcStatus(caller.status()));
    return reactor;
  }
  std::vector<FieldViolation> violations;
  PreparedRecord prepared;
  if (!r->has_record()) violations.push_back({"record", "is required"});
  if (!violations.empty() ||
      !ledger_.Prepare(r->record(), caller->principal, "record.", prepared, violations)) {
    reactor->Finish(ToGrpcStatus(ToStatus(std::move(violations))));
    return reactor;
  }
  v1::UsageRecord submitted = prepared.record;
  std::vector<PreparedRecord> one;
  one.push_back(std::move(prepared));
  const bool queued = writer_.Submit(
      std::move(one), [this, reactor, o, submitted = std::move(submitted)](
                          absl::StatusOr<std::vector<RecordOutcome>> outcomes) mutable {
        if (!outcomes.ok()) {
          reactor->Finish(ToGrpcStatus(outcomes.status()));
          return;
        }
        const RecordOutcome outcome = outcomes->front();
        if (outcome.kind == RecordOutcome::Kind::kStored) {
          *o->mutable_record() = std::move(submitted);
          o->mutable_record()->set_cursor(EncodeCursor(outcome.seq));
          *o->mutable_record()->mutable_record_time() = ToProto(outcome.record_time);
          reactor->Finish(grpc::Status::OK);
          return;
        }
        if (outcome.kind == RecordOutcome::Kind::kReused) {
          reactor->Finish(ToGrpcStatus(WithErrorInfo(
              WithFieldViolation(
                  absl::AlreadyExistsError("this request_id was already recorded with different "
                                           "content; nothing was stored"),
                  "record.request_id", "was already used with different content"),
              "REQUEST_ID_REUSED", {{"request_id", submitted.request_id()}})));
          return;
        }
        // A replay: answer with the stored record (read off the writer thread).
        if (!executor_.Submit([this, reactor, o, seq = outcome.seq] {
              absl::StatusOr<v1::UsageRecord> stored = ledger_.GetBySeq(seq);
              const absl::Status status = stored.status();
              if (stored.ok()) {
                *o->mutable_record() = *std::move(stored);
                o->set_duplicate(true);
              }
              reactor->Finish(ToGrpcStatus(status));
            })) {
          reactor->Finish(ToGrpcStatus(
              absl::ResourceExhaustedError("the server is overloaded; retry with backoff")));
        }
      });
  if (!queued) {
    reactor->Finish(ToGrpcStatus(
        absl::ResourceExhaustedError("the usage writer is overloaded; retry with backoff")));
  }
  return reactor;
}

grpc::ServerBidiReactor<v1::IngestUsageRequest, v1::IngestUsageResponse>* UsageService::IngestUsage(
    Ctx* c) {
  return new IngestReactor(ledger_, writer_, gate_.AuthorizeStream(c, kService, __func__));
}

grpc::ServerWriteReactor<v1::WatchUsageResponse>* UsageService::WatchUsage(
    Ctx* c, const v1::WatchUsageRequest* r) {
  const v1::WatchUsageRequest filter = *r;
  auto reactor = WatchReactor<v1::WatchUsageResponse>::Create(
      kWatchQueue,
      [filter](const storage::ChangeRecord& change, v1::WatchUsageResponse& out) {
        const v1::UsageRecord* record = RecordOf(change);
        if (record == nullptr) return false;
        if ((!filter.provider().empty() && record->provider() != filter.provider()) ||
            (!filter.model().empty() && record->model() != filter.model()) ||
            (!filter.user().empty() && record->user() != filter.user()) ||
            (!filter.access_key().empty() && record->access_key() != filter.access_key())) {
          return false;
        }
        *out.mutable_record() = *record;
        return true;
      },
      [](absl::Time now, v1::WatchUsageResponse& out) {
        *out.mutable_checkpoint()->mutable_time() = ToProto(now);
      });
  return StartWatch(reactor, gate_.AuthorizeStream(c, kService, __func__), r->cursor(),
                    r->checkpoint_interval_seconds(), hub_);
}

UsageService::Reactor* UsageService::ListUsageRecords(Ctx* c, const v1::ListUsageRecordsRequest* r,
                                                      v1::ListUsageRecordsResponse* o) {
  return gate_.Offload(c, kService, __func__,
                       [this, r, o](const Caller&) { return ledger_.List(*r, o); });
}

UsageService::Reactor* UsageService::QueryUsage(Ctx* c, const v1::QueryUsageRequest* r,
                                                v1::QueryUsageResponse* o) {
  return gate_.Offload(c, kService, __func__,
                       [this, r, o](const Caller&) { return ledger_.Query(*r, o); });
}

UsageService::Reactor* UsageService::GetCostBreakdown(Ctx* c, const v1::GetCostBreakdownRequest* r,
                                                      v1::GetCostBreakdownResponse* o) {
  return gate_.Offload(c, kService, __func__,
                       [this, r, o](const Caller&) { return ledger_.CostBreakdown(*r, o); });
}

}  // namespace modelvault::server
