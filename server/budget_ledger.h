#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "modelvault/v1/budgets.pb.h"
#include "storage/storage.h"

namespace modelvault::storage {
struct MutationContext;
}  // namespace modelvault::storage

// Budget spend, reservations and alerts: the behaviour of BudgetService that
// is not plain CRUD (budgets themselves go through the generic resource
// store). Lock order, to stay free of deadlocks with the usage ingest:
// reservations rows first, then budget_spend rows in budget-name order.
namespace modelvault::server {

// Bounds of the period of `budget` that contains `t` (in the budget's time
// zone); for BUDGET_PERIOD_NONE, [InfinitePast, InfiniteFuture) with a
// stored period_start of 0.
struct BudgetPeriodBounds {
  absl::Time start;
  absl::Time end;
  std::int64_t key = 0;  // budget_spend.period_start (micros; 0 for NONE)
};
absl::StatusOr<BudgetPeriodBounds> PeriodOf(const v1::Budget& budget, absl::Time t);

// The cost of one recorded call, as the usage ingest hands it over.
struct Charge {
  absl::Time time;  // the call's time: the spend goes to the period containing it
  std::string user;
  std::string access_key;
  std::string provider;
  std::string model;
  std::string reservation;  // "" or `reservations/{id}` to settle
  std::int64_t cost_nanos = 0;
};

class BudgetLedger final {
 public:
  explicit BudgetLedger(std::function<absl::Time()> clock = [] { return absl::Now(); });

  // In the caller's transaction (one usage batch): adds each charge's cost to
  // every budget whose scope matches it (GLOBAL matches all), in the period
  // containing charge.time; settles each named HELD reservation (its holds
  // are released, state SETTLED, settled_cost_nanos = the cost; unknown or
  // no longer held reservations are ignored); raises each threshold crossed
  // once per period (a budget_alerts row plus a CREATED change-feed record,
  // appended to `raised` so the caller can publish them after commit).
  absl::Status Apply(storage::ReadWriteTx& tx, const std::vector<Charge>& charges,
                     std::vector<storage::ChangeRecord>* raised);

  // Holds `estimated_cost_nanos` on every budget matching the scopes in its
  // current period, or RESOURCE_EXHAUSTED (ErrorInfo BUDGET_EXCEEDED with
  // metadata budget, limit_nanos, spent_nanos, held_nanos) naming the first
  // budget that would go past its limit. Expired holds on those budgets are
  // released first. Exact under concurrency: spent + held <= limit always.
  // With `idempotency` carrying a request_id (AIP-155), the reservation is
  // remembered in the same transaction and a retry returns it unchanged.
  absl::StatusOr<v1::Reservation> Reserve(storage::Datastore& datastore,
                                          const v1::UsageScopes& scopes,
                                          std::int64_t estimated_cost_nanos, absl::Duration ttl,
                                          const storage::MutationContext* idempotency = nullptr);
  // Frees a HELD reservation (FAILED_PRECONDITION when settled, released or
  // expired; NOT_FOUND when unknown).
  absl::StatusOr<v1::Reservation> Release(storage::Datastore& datastore, const std::string& name);
  // Expires HELD reservations past their expire_time; returns how many.
  absl::StatusOr<int> ExpireReservations(storage::Datastore& datastore);
  // Fills budget.current_period (bounds, spent, held) for "now".
  absl::Status FillCurrentPeriod(storage::Reader& reader, v1::Budget& budget);

  absl::Time Now() const { return clock_(); }

 private:
  std::function<absl::Time()> clock_;
};

}  // namespace modelvault::server
