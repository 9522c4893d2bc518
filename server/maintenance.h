#pragma once

#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/time/time.h"
#include "server/budget_ledger.h"
#include "server/usage_ledger.h"

namespace modelvault::server {

// Background upkeep of the ledger on every replica: partitions ahead and
// retention (every `retention_interval`), expired budget reservations and
// rollup compaction (every `expiry_interval`). Every step is idempotent, so replicas doing it
// at once is harmless.
class Maintenance final {
 public:
  Maintenance(UsageLedger& usage, BudgetLedger& budgets, storage::Datastore& datastore,
              absl::Duration retention_interval = absl::Minutes(10),
              absl::Duration expiry_interval = absl::Seconds(1));
  Maintenance(const Maintenance&) = delete;
  Maintenance& operator=(const Maintenance&) = delete;
  ~Maintenance();

 private:
  void Loop();

  UsageLedger& usage_;
  BudgetLedger& budgets_;
  storage::Datastore& datastore_;
  const absl::Duration retention_interval_;
  const absl::Duration expiry_interval_;
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace modelvault::server
