#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "grpcpp/grpcpp.h"
#include "server/change_hub.h"
#include "server/cursor.h"
#include "server/grpc_status.h"
#include "server/stream_auth.h"
#include "storage/status_details.h"

namespace modelvault::server {

// A server-streaming reactor fed by the ChangeHub: a bounded queue per
// stream, one write in flight, never blocking the hub. When the queue is
// full the stream ends with RESOURCE_EXHAUSTED and the last cursor it
// delivered, so the client resumes without loss. Owned by a shared_ptr held
// by itself (until OnDone) and by the hub.
template <typename Response>
class WatchReactor final : public grpc::ServerWriteReactor<Response>, public ChangeSink {
 public:
  using Convert = std::function<bool(const storage::ChangeRecord&, Response&)>;
  using MakeCheckpoint = std::function<void(absl::Time, Response&)>;

  static std::shared_ptr<WatchReactor> Create(size_t max_queue, Convert convert,
                                              MakeCheckpoint checkpoint) {
    std::shared_ptr<WatchReactor> reactor(
        new WatchReactor(max_queue, std::move(convert), std::move(checkpoint)));
    reactor->self_ = reactor;
    return reactor;
  }

  // Re-checks the caller before every message (set before subscribing).
  void Guard(std::shared_ptr<StreamAuth> auth) { auth_ = std::move(auth); }

  Offer OfferChange(const storage::ChangeRecord& change) override {
    if (!Authorized()) return Offer::kGone;
    Response response;
    if (!convert_(change, response)) return Gone() ? Offer::kGone : Offer::kSkipped;
    response.set_cursor(EncodeCursor(change.seq));
    return Enqueue(std::move(response), change.seq) ? Offer::kQueued : Offer::kGone;
  }

  size_t Room() override {
    std::lock_guard lock(mu_);
    // A finished stream reports room, so the hub offers, learns and drops it.
    if (done_ || finish_requested_) return 1;
    return queue_.size() >= max_queue_ ? 0 : max_queue_ - queue_.size();
  }

  bool OfferCheckpoint(std::int64_t seq, absl::Time now) override {
    if (!Authorized()) return false;
    Response response;
    checkpoint_(now, response);
    response.set_cursor(EncodeCursor(seq));
    return Enqueue(std::move(response), seq);
  }

  void Close(const absl::Status& status, std::int64_t seq) override {
    {
      std::lock_guard lock(mu_);
      if (finish_requested_) return;
      finish_requested_ = true;
      // Messages queued behind the one in flight are dropped: the client
      // resumes after the last message it will receive.
      const std::int64_t cursor = writing_ ? seqs_.front() : seq;
      absl::Status final_status = status;
      if (absl::IsUnavailable(status) && ErrorReason(status).empty()) {
        final_status = WithErrorInfo(status, "STREAM_ENDED", {{"cursor", EncodeCursor(cursor)}});
      }
      final_status_ = ToGrpcStatus(final_status);
      if (writing_) return;  // OnWriteDone finishes
    }
    this->Finish(final_status_);
  }

  void OnWriteDone(bool ok) override {
    Response* next = nullptr;
    bool finish = false;
    {
      std::lock_guard lock(mu_);
      queue_.pop_front();
      seqs_.pop_front();
      if (!ok) {
        finish_requested_ = true;
        final_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream broken");
        queue_.clear();
        seqs_.clear();
      }
      if (!queue_.empty() && !finish_requested_) {
        next = &queue_.front();
      } else {
        writing_ = false;
        finish = finish_requested_;
      }
    }
    if (next != nullptr) {
      this->StartWrite(next);
    } else if (finish) {
      this->Finish(final_status_);
    }
  }

  void OnCancel() override {
    std::int64_t seq = 0;
    {
      std::lock_guard lock(mu_);
      seq = last_seq_;
    }
    Close(absl::CancelledError("the client cancelled the stream"), seq);
  }

  void OnDone() override {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    self_.reset();  // the hub may still hold a reference; it drops it on the next offer
  }

 private:
  WatchReactor(size_t max_queue, Convert convert, MakeCheckpoint checkpoint)
      : max_queue_(max_queue), convert_(std::move(convert)), checkpoint_(std::move(checkpoint)) {}

  // False, with the stream ended by the refusal, once the caller's key no
  // longer admits it: nothing more is sent.
  bool Authorized() {
    if (auth_ == nullptr) return true;
    absl::Status status = auth_->Check();
    if (status.ok()) return true;
    std::int64_t seq = 0;
    {
      std::lock_guard lock(mu_);
      seq = last_seq_;
    }
    Close(status, seq);
    return false;
  }

  bool Gone() {
    std::lock_guard lock(mu_);
    return done_ || finish_requested_;
  }

  bool Enqueue(Response response, std::int64_t seq) {
    Response* start = nullptr;
    {
      std::lock_guard lock(mu_);
      if (done_ || finish_requested_) return false;
      if (queue_.size() >= max_queue_) {
        finish_requested_ = true;
        final_status_ = ToGrpcStatus(WithErrorInfo(
            absl::ResourceExhaustedError(
                "the stream fell too far behind; resume from the last cursor received"),
            "SLOW_CONSUMER", {{"cursor", EncodeCursor(seqs_.front())}}));
        return false;  // the write in flight finishes the stream
      }
      queue_.push_back(std::move(response));
      seqs_.push_back(seq);
      last_seq_ = seq;
      if (!writing_) {
        writing_ = true;
        start = &queue_.front();
      }
    }
    // A deque keeps element addresses stable while others are pushed at the back.
    if (start != nullptr) this->StartWrite(start);
    return true;
  }

  const size_t max_queue_;
  Convert convert_;
  MakeCheckpoint checkpoint_;
  std::shared_ptr<StreamAuth> auth_;  // set before the hub sees the stream
  std::shared_ptr<WatchReactor> self_;
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::deque<Response> queue_;     // front is in flight while writing_
  std::deque<std::int64_t> seqs_;  // the feed position of each queued message
  bool writing_ = false;
  bool finish_requested_ = false;
  bool done_ = false;
  std::int64_t last_seq_ = 0;
  grpc::Status final_status_;
};

// Starts a watch stream: with the caller authorized (`authorized` OK), the
// request's cursor decoded and its checkpoint interval (seconds; 0 is the
// default of 10, else 1 to 300) checked, `reactor` is subscribed to `hub`;
// otherwise it ends with the error, naming the field at fault. Returns the
// reactor for the gRPC handler.
template <typename Response>
grpc::ServerWriteReactor<Response>* StartWatch(
    std::shared_ptr<WatchReactor<Response>> reactor,
    absl::StatusOr<std::shared_ptr<StreamAuth>> authorized, const std::string& cursor,
    int checkpoint_interval_seconds, ChangeHub& hub) {
  std::optional<std::int64_t> after;
  absl::Status status = authorized.status();
  if (status.ok() && !cursor.empty()) {
    absl::StatusOr<std::int64_t> seq = DecodeCursor(cursor);
    if (seq.ok()) {
      after = *seq;
    } else {
      status = seq.status();
    }
  }
  const int interval = checkpoint_interval_seconds == 0 ? 10 : checkpoint_interval_seconds;
  if (status.ok() && (interval < 1 || interval > 300)) {
    status = InvalidField("checkpoint_interval_seconds", "must be between 1 and 300");
  }
  if (!status.ok()) {
    reactor->Close(status, after.value_or(0));
    return reactor.get();
  }
  reactor->Guard(*std::move(authorized));
  hub.Subscribe(reactor, after, absl::Seconds(interval));
  return reactor.get();
}

}  // namespace modelvault::server
