#include "server/usage_writer.h"

#include <utility>

namespace modelvault::server {

UsageWriter::UsageWriter(UsageLedger& ledger,
                         std::function<void(std::vector<storage::ChangeRecord>)> on_commit,
                         size_t max_queued_records, size_t max_group_records)
    : ledger_(ledger),
      on_commit_(std::move(on_commit)),
      max_queued_records_(max_queued_records),
      max_group_records_(max_group_records),
      thread_([this] { Loop(); }) {}

UsageWriter::~UsageWriter() { Stop(); }

bool UsageWriter::Submit(std::vector<PreparedRecord> records, Done done) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return false;
    // An empty submission still queues, so completions keep their order.
    if (queued_records_ > 0 && queued_records_ + records.size() > max_queued_records_) {
      return false;
    }
    queued_records_ += records.size();
    queue_.push_back(Item{std::move(records), std::move(done)});
  }
  wake_.notify_one();
  return true;
}

void UsageWriter::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void UsageWriter::Loop() {
  while (true) {
    std::vector<Item> group;
    {
      std::unique_lock lock(mu_);
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping with nothing left
      // Whatever queued while the previous commit ran goes in this one.
      size_t records = 0;
      while (!queue_.empty() &&
             (group.empty() || records + queue_.front().records.size() <= max_group_records_)) {
        records += queue_.front().records.size();
        group.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      queued_records_ -= records;
    }
    Commit(group);
  }
}

void UsageWriter::Commit(std::vector<Item>& group) {
  std::vector<PreparedRecord> all;
  for (Item& item : group) {
    for (PreparedRecord& r : item.records) all.push_back(std::move(r));
  }
  std::vector<storage::ChangeRecord> alerts;
  absl::StatusOr<std::vector<RecordOutcome>> outcomes =
      all.empty() ? std::vector<RecordOutcome>() : ledger_.Write(all, &alerts);
  if (!outcomes.ok() && group.size() > 1 && !absl::IsUnavailable(outcomes.status())) {
    // Keep one submitter's failure from failing the others: store each alone.
    size_t offset = 0;
    for (Item& item : group) {
      std::vector<PreparedRecord> mine(
          all.begin() + static_cast<std::ptrdiff_t>(offset),
          all.begin() + static_cast<std::ptrdiff_t>(offset + item.records.size()));
      offset += item.records.size();
      std::vector<storage::ChangeRecord> raised;
      absl::StatusOr<std::vector<RecordOutcome>> result =
          mine.empty() ? std::vector<RecordOutcome>() : ledger_.Write(mine, &raised);
      if (result.ok()) on_commit_(std::move(raised));
      item.done(std::move(result));
    }
    return;
  }
  if (outcomes.ok()) on_commit_(std::move(alerts));
  size_t offset = 0;
  for (Item& item : group) {
    if (!outcomes.ok()) {
      item.done(outcomes.status());
      continue;
    }
    std::vector<RecordOutcome> mine(
        outcomes->begin() + static_cast<std::ptrdiff_t>(offset),
        outcomes->begin() + static_cast<std::ptrdiff_t>(offset + item.records.size()));
    offset += item.records.size();
    item.done(std::move(mine));
  }
}

}  // namespace modelvault::server
