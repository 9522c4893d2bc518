#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "storage/storage.h"

namespace modelvault::server {

// A consumer of the change feed (a watch stream). Called on the hub thread;
// must not block.
class ChangeSink {
 public:
  // What became of an offered change: queued for the client, not for this
  // stream (filtered out), or the sink is gone or its bounded buffer is full
  // (the hub then drops it, and the sink ends its stream resumably).
  enum class Offer { kQueued, kSkipped, kGone };

  virtual ~ChangeSink() = default;
  virtual Offer OfferChange(const storage::ChangeRecord& change) = 0;
  // Responses that can still be queued before the buffer is full.
  virtual size_t Room() = 0;
  // Queues a checkpoint at feed position `seq`.
  virtual bool OfferCheckpoint(std::int64_t seq, absl::Time now) = 0;
  // Ends the stream with `status`; the client resumes from `seq`.
  virtual void Close(const absl::Status& status, std::int64_t seq) = 0;
};

// Where a hub reads its feed: the change feed (`changes`), or the usage
// stream (`usage_records`), each with seq = commit order.
struct FeedSource {
  // Events with seq > after, at most `limit`, in seq order.
  std::function<absl::StatusOr<std::vector<storage::ChangeRecord>>(storage::Reader&, std::int64_t,
                                                                   int)>
      read;
  // The lowest cursor still resumable (older ones were pruned) and the
  // highest committed seq.
  std::function<absl::Status(storage::Reader&, std::int64_t*, std::int64_t*)> bounds;
};

// The change feed: every mutation of every resource.
FeedSource ChangeFeedSource();

// Tails a feed on one thread and delivers every change in seq
// (= commit) order to listeners (the cache) and to subscribed sinks. A sink
// that joins with a cursor is first caught up from the database. Slow sinks
// are dropped, never waited for.
class ChangeHub final {
 public:
  ChangeHub(storage::Datastore& datastore, absl::Duration poll_interval,
            FeedSource source = ChangeFeedSource());
  ChangeHub(const ChangeHub&) = delete;
  ChangeHub& operator=(const ChangeHub&) = delete;
  ~ChangeHub();

  void AddListener(std::function<void(const storage::ChangeRecord&)> listener);
  // Starts tailing after `head` (the position the listeners already reflect).
  void Start(std::int64_t head);
  // Ends every sink with UNAVAILABLE and its cursor, and stops the thread.
  void Stop();
  // Polls now (a local write committed).
  void Poke();

  // Subscribes `sink` after `after_seq` (nullopt: from the current head).
  void Subscribe(std::shared_ptr<ChangeSink> sink, std::optional<std::int64_t> after_seq,
                 absl::Duration checkpoint_interval);

  std::int64_t head() const;

 private:
  struct Subscription {
    std::shared_ptr<ChangeSink> sink;
    std::optional<std::int64_t> after;  // nullopt until placed
    bool validated = false;             // the cursor was checked against the feed
    bool live = false;
    absl::Duration checkpoint_interval;
    absl::Time last_sent;
  };

  void Loop();
  // Moves a new subscription forward from the database, as far as its
  // buffer allows (it goes live on reaching the head); false to drop it.
  bool CatchUp(Subscription& sub);

  storage::Datastore& datastore_;
  const absl::Duration poll_interval_;
  const FeedSource source_;
  std::vector<std::function<void(const storage::ChangeRecord&)>> listeners_;

  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;              // guarded by mu_
  bool poked_ = false;                 // guarded by mu_
  std::int64_t head_ = 0;              // guarded by mu_
  std::vector<Subscription> pending_;  // guarded by mu_

  std::vector<Subscription> subscriptions_;  // hub thread only
  std::thread thread_;
};

}  // namespace modelvault::server
