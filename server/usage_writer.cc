#include "server/usage_writer.h"

#include <algorithm>
#include <utility>

namespace modelvault::server {

UsageWriter::UsageWriter(UsageLedger& ledger,
                         std::function<void(std::vector<storage::ChangeRecord>)> on_commit,
                         int lanes, size_t max_queued_records, size_t max_group_records)
    : ledger_(ledger),
      on_commit_(std::move(on_commit)),
      max_queued_records_(max_queued_records),
      max_group_records_(max_group_records) {
  for (int lane = 0; lane < std::max(lanes, 1); ++lane) {
    threads_.emplace_back([this, lane] { Loop(lane); });
  }
}

UsageWriter::~UsageWriter() { Stop(); }

bool UsageWriter::Submit(std::vector<PreparedRecord> records, Done done, std::uint64_t order_key) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return false;
    // An empty submission still queues, so completions keep their order.
    if (queued_records_ > 0 && queued_records_ + records.size() > max_queued_records_) {
      return false;
    }
    queued_records_ += records.size();
    queue_.push_back(Item{std::move(records), std::move(done), next_ticket_++, order_key});
  }
  wake_.notify_all();
  return true;
}

void UsageWriter::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& thread : threads_) {
    if (thread.joinable()) thread.join();
  }
}

void UsageWriter::TakeGroup(int lane, std::vector<Item>& group) {
  // Whatever queued while the previous commit ran goes in this one, but for
  // items whose order key is bound to another lane.
  size_t records = 0;
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->order_key != 0) {
      auto bound = bound_.find(it->order_key);
      if (bound != bound_.end() && bound->second.first != lane) {
        ++it;
        continue;
      }
    }
    if (!group.empty() && records + it->records.size() > max_group_records_) break;
    if (it->order_key != 0) {
      auto& [bound_lane, count] = bound_[it->order_key];
      bound_lane = lane;
      ++count;
    }
    records += it->records.size();
    group.push_back(std::move(*it));
    it = queue_.erase(it);
  }
  queued_records_ -= records;
}

void UsageWriter::Loop(int lane) {
  while (true) {
    std::vector<Item> group;
    {
      std::unique_lock lock(mu_);
      while (true) {
        TakeGroup(lane, group);
        if (!group.empty()) break;
        if (stopping_ && queue_.empty()) return;  // stopping with nothing left
        wake_.wait(lock);
      }
    }
    Commit(group, lane);
    {
      std::lock_guard lock(mu_);
      for (const Item& item : group) {
        if (item.order_key == 0) continue;
        auto bound = bound_.find(item.order_key);
        if (--bound->second.second == 0) bound_.erase(bound);
      }
    }
    // Items of the keys just unbound may go to any lane now.
    wake_.notify_all();
  }
}

void UsageWriter::Commit(std::vector<Item>& group, int lane) {
  std::vector<PreparedRecord> all;
  size_t total = 0;
  for (const Item& item : group) total += item.records.size();
  all.reserve(total);
  for (Item& item : group) {
    for (PreparedRecord& r : item.records) all.push_back(std::move(r));
  }
  std::vector<storage::ChangeRecord> alerts;
  absl::StatusOr<std::vector<RecordOutcome>> outcomes =
      all.empty() ? std::vector<RecordOutcome>() : ledger_.Write(all, &alerts, lane);
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
          mine.empty() ? std::vector<RecordOutcome>() : ledger_.Write(mine, &raised, lane);
      if (result.ok()) on_commit_(std::move(raised));
      Complete(item.ticket, std::move(item.done), std::move(result));
    }
    return;
  }
  if (outcomes.ok()) on_commit_(std::move(alerts));
  size_t offset = 0;
  for (Item& item : group) {
    if (!outcomes.ok()) {
      Complete(item.ticket, std::move(item.done), outcomes.status());
      continue;
    }
    std::vector<RecordOutcome> mine(
        outcomes->begin() + static_cast<std::ptrdiff_t>(offset),
        outcomes->begin() + static_cast<std::ptrdiff_t>(offset + item.records.size()));
    offset += item.records.size();
    Complete(item.ticket, std::move(item.done), std::move(mine));
  }
}

void UsageWriter::Complete(std::uint64_t ticket, Done done,
                           absl::StatusOr<std::vector<RecordOutcome>> result) {
  std::unique_lock lock(mu_);
  finished_.emplace(ticket, Finished{std::move(done), std::move(result)});
  // One thread at a time releases, in ticket order; a lane that finds
  // another releasing leaves its results to it.
  if (releasing_) return;
  releasing_ = true;
  while (true) {
    auto it = finished_.find(next_release_);
    if (it == finished_.end()) break;
    Finished next = std::move(it->second);
    finished_.erase(it);
    ++next_release_;
    lock.unlock();
    next.done(std::move(next.result));
    lock.lock();
  }
  releasing_ = false;
}

}  // namespace modelvault::server
