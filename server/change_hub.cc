#include "server/change_hub.h"

#include "absl/strings/str_cat.h"
#include "server/cursor.h"
#include "storage/status_details.h"

namespace modelvault::server {
namespace {

constexpr int kBatch = 500;

}  // namespace

ChangeHub::ChangeHub(storage::Datastore& datastore, absl::Duration poll_interval)
    : datastore_(datastore), poll_interval_(poll_interval) {}

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
      Subscription{std::move(sink), after_seq, false, checkpoint_interval, absl::Now()});
  poked_ = true;
  wake_.notify_all();
}

bool ChangeHub::CatchUp(Subscription& sub) {
  std::int64_t head = this->head();
  if (!sub.after.has_value()) {
    sub.after = head;
    sub.live = true;
    return sub.sink->OfferCheckpoint(head, absl::Now());
  }
  // Validate the cursor against what the database retains.
  std::int64_t first = 0;
  std::int64_t last = 0;
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::int64_t> f = reader.FirstChangeSeq();
    if (!f.ok()) return f.status();
    absl::StatusOr<std::int64_t> l = reader.LastChangeSeq();
    if (!l.ok()) return l.status();
    first = *f;
    last = *l;
    return absl::OkStatus();
  });
  if (!status.ok()) {
    sub.sink->Close(status, *sub.after);
    return false;
  }
  if (*sub.after > last) {
    sub.sink->Close(InvalidField("cursor", "the cursor is ahead of this database's change feed"),
                    *sub.after);
    return false;
  }
  if (first > 0 && *sub.after < first - 1) {
    sub.sink->Close(
        WithErrorInfo(absl::OutOfRangeError("the cursor is older than the retained change feed; "
                                            "re-read the catalog and watch from now"),
                      "CURSOR_EXPIRED", {{"first_retained_cursor", EncodeCursor(first - 1)}}),
        *sub.after);
    return false;
  }
  while (*sub.after < head) {
    std::vector<storage::ChangeRecord> batch;
    status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
      absl::StatusOr<std::vector<storage::ChangeRecord>> rows =
          reader.ReadChanges(*sub.after, kBatch);
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
      if (!sub.sink->OfferChange(change)) return false;
      sub.after = change.seq;
    }
    if (batch.empty()) break;
  }
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
      wake_.wait_for(lock, absl::ToChronoMicroseconds(poll_interval_),
                     [this] { return stopping_ || poked_; });
      if (stopping_) break;
      poked_ = false;
      joined.swap(pending_);
    }
    // 1. New changes since head, to the listeners and the live sinks.
    std::int64_t head = this->head();
    while (true) {
      std::vector<storage::ChangeRecord> batch;
      absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
        absl::StatusOr<std::vector<storage::ChangeRecord>> rows = reader.ReadChanges(head, kBatch);
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
            if (sub.sink->OfferChange(change)) {
              sub.after = change.seq;
              sub.last_sent = absl::Now();
            } else {
              sub.sink = nullptr;
            }
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
    // 2. Place new subscriptions.
    for (Subscription& sub : joined) {
      if (CatchUp(sub)) subscriptions_.push_back(std::move(sub));
    }
    // 3. Checkpoints on idle streams; drop the gone ones.
    const absl::Time now = absl::Now();
    for (Subscription& sub : subscriptions_) {
      if (sub.sink == nullptr) continue;
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
