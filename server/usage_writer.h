#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "server/usage_ledger.h"

namespace modelvault::server {

// Group commit for the usage ledger: every RecordUsage call and IngestUsage
// batch of this replica queues here, and one thread stores whatever has
// queued in a single transaction (one commit, one fsync), then completes
// each submitter in order. Acknowledgements therefore follow durability.
class UsageWriter final {
 public:
  using Done = std::function<void(absl::StatusOr<std::vector<RecordOutcome>>)>;

  // `on_commit` runs on the writer thread after each commit with the budget
  // alerts raised (to publish) — and lets watchers know records committed.
  UsageWriter(UsageLedger& ledger,
              std::function<void(std::vector<storage::ChangeRecord>)> on_commit,
              size_t max_queued_records = 100'000, size_t max_group_records = 4'000);
  UsageWriter(const UsageWriter&) = delete;
  UsageWriter& operator=(const UsageWriter&) = delete;
  ~UsageWriter();

  // Queues `records`; `done` runs once they are durable (or failed), on the
  // writer thread, in submission order. False (and `done` not called) when
  // the queue is full or the writer stopped.
  bool Submit(std::vector<PreparedRecord> records, Done done);
  // Stores what is queued, then ends the thread.
  void Stop();

 private:
  struct Item {
    std::vector<PreparedRecord> records;
    Done done;
  };
  void Loop();
  void Commit(std::vector<Item>& group);

  UsageLedger& ledger_;
  std::function<void(std::vector<storage::ChangeRecord>)> on_commit_;
  const size_t max_queued_records_;
  const size_t max_group_records_;
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<Item> queue_;     // guarded by mu_
  size_t queued_records_ = 0;  // guarded by mu_
  bool stopping_ = false;      // guarded by mu_
  std::thread thread_;
};

}  // namespace modelvault::server
