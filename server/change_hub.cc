#include "server/change_hub.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/cursor.h"
#include "storage/status_details.h"

namespace modelvault::server {
namespace {

constexpr int kBatch = 500;

}  // namespace

// Pages a catching-up stream may read per tick, so that other streams wait
// for at most a few pages.
constexpr int kCatchUpPages = 4;

FeedSource ChangeFeedSource() {
  FeedSource source;
  source.read = [](storage::Reader& reader, std::int64_t after, int limit) {
    return reader.ReadChanges(after, limit);
  };
  source.bounds = [](storage::Reader& reader, std::int64_t* oldest,
                     std::int64_t* last) -> absl::Status {
    absl::StatusOr<std::int64_t> f = reader.FirstChangeSeq();
    if (!f.ok()) return f.status();
    absl::StatusOr<std::int64_t> l = reader.LastChangeSeq();
    if (!l.ok()) return l.status();
    *oldest = *f > 0 ? *f - 1 : 0;
    *last = *l;
    return absl::OkStatus();
  };
  return source;
}

ChangeHub::ChangeHub(storage::Datastore& datastore, absl::Duration poll_interval, FeedSource source)
    : datastore_(datastore), poll_interval_(poll_interval), source_(std::move(source)) {}

ChangeHub::~ChangeHub() { Stop(); }

void ChangeHub::AddListener(std::function<void(const storage::ChangeRecord&)> listener) {
  listeners_.push_back(std::move(listener));
}

void ChangeHub::Start(std::int64_t head) {
  {
    std::lock_guard lock(mu_);
    head_ = head;
  }
  thread_ = std::thread([this] { Loop(); });
}

void ChangeHub::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ChangeHub::Poke() {
  {
    std::lock_guard lock(mu_);
    poked_ = true;
  }
  wake_.notify_all();
}

std::int64_t ChangeHub::head() const {
  std::lock_guard lock(mu_);
  return head_;
}

void ChangeHub::Subscribe(std::shared_ptr<ChangeSink> sink, std::optional<std::int64_t> after_seq,
                          absl::Duration checkpoint_interval) {
  std::lock_guard lock(mu_);
  if (stopping_) {
    sink->Close(absl::UnavailableError("the server is shutting down; retry on another replica"),
                after_seq.value_or(head_));
    return;
  }
  pending_.push_back(
      Subscription{std::move(sink), after_seq, false, false, checkpoint_interval, absl::Now()});
  poked_ = true;
  wake_.notify_all();
}

bool ChangeHub::CatchUp(Subscription& sub) {
  const std::int64_t head = this->head();
  if (!sub.after.has_value()) {
    sub.after = head;
    sub.live = true;
    sub.last_sent = absl::Now();
    return sub.sink->OfferCheckpoint(head, absl::Now());
  }
  if (!sub.validated) {
    // Validate the cursor against what the database retains.
    std::int64_t oldest = 0;
    std::int64_t last = 0;
    absl::Status status = datastore_.Read(
        [&](storage::Reader& reader) { return source_.bounds(reader, &oldest, &last); });
    if (!status.ok()) {
      sub.sink->Close(status, *sub.after);
      return false;
    }
    if (*sub.after > std::max(last, head)) {
      sub.sink->Close(InvalidField("cursor", "the cursor is ahead of this database's feed"),
                      *sub.after);
      return false;
    }
    if (*sub.after < oldest) {
      sub.sink->Close(
          WithErrorInfo(absl::OutOfRangeError("the cursor is older than the retained feed; "
                                              "re-read the current state and watch from now"),
                        "CURSOR_EXPIRED", {{"first_retained_cursor", EncodeCursor(oldest)}}),
          *sub.after);
      return false;
    }
    sub.validated = true;
  }
  for (int page = 0; page < kCatchUpPages && *sub.after < head; ++page) {
    const int room = static_cast<int>(std::min<size_t>(sub.sink->Room(), kBatch));
    if (room == 0) return true;  // its buffer drains first; try again next tick
    std::vector<storage::ChangeRecord> batch;
    absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
      absl::StatusOr<std::vector<storage::ChangeRecord>> rows =
          source_.read(reader, *sub.after, room);
      if (!rows.ok()) return rows.status();
      batch = *std::move(rows);
      return absl::OkStatus();
    });
    if (!status.ok()) {
      sub.sink->Close(status, *sub.after);
      return false;
    }
    for (const storage::ChangeRecord& change : batch) {
      if (change.seq > head) break;
      if (sub.sink->OfferChange(change) == ChangeSink::Offer::kGone) return false;
      sub.after = change.seq;
    }
    if (batch.empty()) break;
  }
  if (*sub.after < head) return true;  // more next tick; a full buffer is never waited for
  sub.after = std::max(*sub.after, head);
  sub.live = true;
  sub.last_sent = absl::Now();
  return true;
}

void ChangeHub::Loop() {
  bool reported_failure = false;
  while (true) {
    std::vector<Subscription> joined;
    {
      std::unique_lock lock(mu_);
      // Streams still catching up are moved on every few milliseconds.
      const bool catching_up = std::any_of(subscriptions_.begin(), subscriptions_.end(),
                                           [](const Subscription& s) { return !s.live; });
      wake_.wait_for(
          lock,
          absl::ToChronoMicroseconds(catching_up ? std::min(poll_interval_, absl::Milliseconds(2))
                                                 : poll_interval_),
          [this] { return stopping_ || poked_; });
      if (stopping_) break;
      poked_ = false;
      joined.swap(pending_);
    }
    // 1. New changes since head, to the listeners and the live sinks. With
    // neither, only the head moves (the usage stream is not read back just
    // to be dropped).
    std::int64_t head = this->head();
    const bool anyone =
        !listeners_.empty() || std::any_of(subscriptions_.begin(), subscriptions_.end(),
                                           [](const Subscription& s) { return s.sink != nullptr; });
    if (!anyone) {
      std::int64_t oldest = 0;
      std::int64_t last = head;
      absl::Status status = datastore_.Read(
          [&](storage::Reader& reader) { return source_.bounds(reader, &oldest, &last); });
      if (status.ok()) {
        std::lock_guard lock(mu_);
        head_ = std::max(head_, last);
      }
    }
    while (anyone) {
      std::vector<storage::ChangeRecord> batch;
      absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
        absl::StatusOr<std::vector<storage::ChangeRecord>> rows =
            source_.read(reader, head, kBatch);
        if (!rows.ok()) return rows.status();
        batch = *std::move(rows);
        return absl::OkStatus();
      });
      if (!status.ok()) {
        reported_failure = true;  // health reports it; retry on the next tick
        break;
      }
      reported_failure = false;
      for (const storage::ChangeRecord& change : batch) {
        for (auto& listener : listeners_) listener(change);
        for (Subscription& sub : subscriptions_) {
          if (sub.sink != nullptr && sub.live && change.seq > *sub.after) {
            // A filtered-out change moves the position but not the
            // checkpoint clock: an idle filtered stream still gets checkpoints.
            const ChangeSink::Offer offer = sub.sink->OfferChange(change);
            if (offer == ChangeSink::Offer::kGone) {
              sub.sink = nullptr;
              continue;
            }
            sub.after = change.seq;
            if (offer == ChangeSink::Offer::kQueued) sub.last_sent = absl::Now();
          }
        }
        head = change.seq;
      }
      {
        std::lock_guard lock(mu_);
        head_ = head;
      }
      if (static_cast<int>(batch.size()) < kBatch) break;
    }
    (void)reported_failure;
    // 2. Move new and lagging subscriptions forward.
    for (Subscription& sub : joined) subscriptions_.push_back(std::move(sub));
    for (Subscription& sub : subscriptions_) {
      if (sub.sink != nullptr && !sub.live && !CatchUp(sub)) sub.sink = nullptr;
    }
    // 3. Checkpoints on idle streams; drop the gone ones.
    const absl::Time now = absl::Now();
    for (Subscription& sub : subscriptions_) {
      if (sub.sink == nullptr || !sub.live) continue;
      if (now - sub.last_sent >= sub.checkpoint_interval) {
        if (sub.sink->OfferCheckpoint(*sub.after, now)) {
          sub.last_sent = now;
        } else {
          sub.sink = nullptr;
        }
      }
    }
    std::erase_if(subscriptions_, [](const Subscription& s) { return s.sink == nullptr; });
  }
  // Shutting down: end every stream with its cursor so clients resume.
  std::vector<Subscription> pending;
  {
    std::lock_guard lock(mu_);
    pending.swap(pending_);
  }
  for (auto* list : {&subscriptions_, &pending}) {
    for (Subscription& sub : *list) {
      if (sub.sink == nullptr) continue;
      sub.sink->Close(absl::UnavailableError("the server is shutting down; resume from the cursor"),
                      sub.after.value_or(head()));
    }
    list->clear();
  }
}

}  // namespace modelvault::server
