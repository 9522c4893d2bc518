#include "server/maintenance.h"

#include "absl/strings/str_cat.h"
#include "server/log.h"

namespace modelvault::server {

Maintenance::Maintenance(UsageLedger& usage, BudgetLedger& budgets, storage::Datastore& datastore,
                         absl::Duration retention_interval, absl::Duration expiry_interval)
    : usage_(usage),
      budgets_(budgets),
      datastore_(datastore),
      retention_interval_(retention_interval),
      expiry_interval_(expiry_interval),
      thread_([this] { Loop(); }) {}

Maintenance::~Maintenance() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Maintenance::Loop() {
  absl::Time next_retention = absl::Now() + retention_interval_;
  while (true) {
    {
      std::unique_lock lock(mu_);
      wake_.wait_for(lock, absl::ToChronoMicroseconds(expiry_interval_),
                     [this] { return stopping_; });
      if (stopping_) return;
    }
    // Failures are retried on the next tick (the database may be away).
    absl::StatusOr<int> expired = budgets_.ExpireReservations(datastore_);
    if (expired.ok() && *expired > 0) {
      Log(LogLevel::kDebug, "expired budget reservations", {{"count", absl::StrCat(*expired)}});
    }
    // Rollup parts written since the last tick, folded: reads of a key stay
    // at about one row, and the parts never pile up.
    absl::StatusOr<std::int64_t> folded = usage_.CompactRollups();
    if (!folded.ok()) {
      Log(LogLevel::kWarn, "rollup compaction failed; retrying later",
          {{"error", std::string(folded.status().message())}});
    }
    if (absl::Now() >= next_retention) {
      next_retention = absl::Now() + retention_interval_;
      absl::StatusOr<std::int64_t> removed = usage_.Maintain();
      if (!removed.ok()) {
        Log(LogLevel::kWarn, "usage retention failed; retrying later",
            {{"error", std::string(removed.status().message())}});
      } else if (*removed > 0) {
        Log(LogLevel::kInfo, "removed usage records past retention",
            {{"count", absl::StrCat(*removed)}});
      }
    }
  }
}

}  // namespace modelvault::server
