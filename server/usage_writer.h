#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "server/usage_ledger.h"

namespace modelvault::server {

// Group commit for the usage ledger: every RecordUsage call and IngestUsage
// batch of this replica queues here, and each of `lanes` threads stores
// whatever has queued in a single transaction (one commit, one fsync). With
// several lanes one group is prepared and written while another commits
// (the ledger serializes only their last step). Submissions that share an
// order key (an IngestUsage stream's batches) stay in one lane while any is
// unstored, so they commit, and take cursors, in submission order.
// Submitters are completed in submission order whichever lane stored them,
// and only after the commit: acknowledgements follow durability.
class UsageWriter final {
 public:
  using Done = std::function<void(absl::StatusOr<std::vector<RecordOutcome>>)>;

  // `on_commit` runs on a writer thread after each commit with the budget
  // alerts raised (to publish) — and lets watchers know records committed.
  UsageWriter(UsageLedger& ledger,
              std::function<void(std::vector<storage::ChangeRecord>)> on_commit, int lanes = 1,
              size_t max_queued_records = 100'000, size_t max_group_records = 4'000);
  UsageWriter(const UsageWriter&) = delete;
  UsageWriter& operator=(const UsageWriter&) = delete;
  ~UsageWriter();

  // Queues `records`; `done` runs once they are durable (or failed), on a
  // writer thread, in submission order. False (and `done` not called) when
  // the queue is full or the writer stopped.
  // `order_key` (non-zero) keeps the submission behind earlier ones with
  // the same key.
  bool Submit(std::vector<PreparedRecord> records, Done done, std::uint64_t order_key = 0);
  // Stores what is queued, then ends the thread.
  void Stop();

 private:
  struct Item {
    std::vector<PreparedRecord> records;
    Done done;
    std::uint64_t ticket = 0;  // submission order
    std::uint64_t order_key = 0;
  };
  struct Finished {
    Done done;
    absl::StatusOr<std::vector<RecordOutcome>> result;
  };
  void Loop(int lane);
  // Moves the queued items `lane` may take (up to a group) into `group`.
  // Called with mu_ held.
  void TakeGroup(int lane, std::vector<Item>& group);
  void Commit(std::vector<Item>& group, int lane);
  // Hands `done` its result once every earlier submission has had its own.
  void Complete(std::uint64_t ticket, Done done, absl::StatusOr<std::vector<RecordOutcome>> result);

  UsageLedger& ledger_;
  std::function<void(std::vector<storage::ChangeRecord>)> on_commit_;
  const size_t max_queued_records_;
  const size_t max_group_records_;
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<Item> queue_;         // guarded by mu_
  size_t queued_records_ = 0;      // guarded by mu_
  bool stopping_ = false;          // guarded by mu_
  std::uint64_t next_ticket_ = 0;  // guarded by mu_
  // Order key -> (lane, items of the key taken and not yet stored).
  absl::flat_hash_map<std::uint64_t, std::pair<int, int>> bound_;  // guarded by mu_
  std::uint64_t next_release_ = 0;                                 // guarded by mu_
  bool releasing_ = false;                                         // guarded by mu_
  absl::flat_hash_map<std::uint64_t, Finished> finished_;          // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace modelvault::server
