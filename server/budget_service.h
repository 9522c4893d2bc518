#pragma once

#include <vector>

#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "modelvault/v1/budgets.grpc.pb.h"
#include "server/budget_ledger.h"
#include "server/call_gate.h"
#include "server/change_hub.h"
#include "server/resource_methods.h"
#include "storage/status_details.h"
#include "storage/storage.h"

namespace modelvault::server {

// BudgetService: budgets through the generic resource methods (with their
// current period's spend filled in by the BudgetLedger), reservations and
// threshold alerts. Every call enters through the CallGate; everything that
// touches the database runs on the executor.
class BudgetService final : public v1::BudgetService::CallbackService {
 public:
  // Registers the budget checks (CheckBudget) with `methods`.
  BudgetService(ResourceMethods& methods, BudgetLedger& ledger, ChangeHub& hub, CallGate& gate,
                storage::Datastore& datastore);

  using Ctx = grpc::CallbackServerContext;
  using Reactor = grpc::ServerUnaryReactor;

  Reactor* CreateBudget(Ctx* c, const v1::CreateBudgetRequest* r, v1::Budget* o) override;
  Reactor* GetBudget(Ctx* c, const v1::GetBudgetRequest* r, v1::Budget* o) override;
  Reactor* ListBudgets(Ctx* c, const v1::ListBudgetsRequest* r,
                       v1::ListBudgetsResponse* o) override;
  Reactor* UpdateBudget(Ctx* c, const v1::UpdateBudgetRequest* r, v1::Budget* o) override;
  Reactor* DeleteBudget(Ctx* c, const v1::DeleteBudgetRequest* r,
                        google::protobuf::Empty* o) override;
  Reactor* ReserveBudget(Ctx* c, const v1::ReserveBudgetRequest* r, v1::Reservation* o) override;
  Reactor* ReleaseReservation(Ctx* c, const v1::ReleaseReservationRequest* r,
                              v1::Reservation* o) override;
  Reactor* ListAlerts(Ctx* c, const v1::ListAlertsRequest* r, v1::ListAlertsResponse* o) override;
  grpc::ServerWriteReactor<v1::WatchAlertsResponse>* WatchAlerts(
      Ctx* c, const v1::WatchAlertsRequest* r) override;

 private:
  // Fills the computed current_period of read budgets.
  absl::Status Describe(const std::vector<v1::Budget*>& budgets);
  // Deletes a budget with its alerts (their change records too), spend and
  // holds in one transaction; the generic Delete refuses parents with children.
  absl::Status Delete(const v1::DeleteBudgetRequest& r, const std::string& principal);

  ResourceMethods& methods_;
  BudgetLedger& ledger_;
  ChangeHub& hub_;
  CallGate& gate_;
  storage::Datastore& datastore_;
};

// Checks of budgets beyond the descriptor rules (create, and the fields of an
// update's patch): scope_value against the scope, an IANA time zone,
// thresholds 1..1000 without repeats.
void CheckBudget(const google::protobuf::Message& message, absl::string_view prefix,
                 std::vector<FieldViolation>& out);

}  // namespace modelvault::server
