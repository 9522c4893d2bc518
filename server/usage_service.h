#pragma once

#include "modelvault/v1/usage.grpc.pb.h"
#include "server/call_gate.h"
#include "server/change_hub.h"
#include "server/executor.h"
#include "server/usage_ledger.h"
#include "server/usage_writer.h"

namespace modelvault::server {

// The usage stream as a hub feed: records (decoded once, shared by every
// watcher) in seq order; cursors below the pruned seq are expired.
FeedSource UsageFeedSource();

// UsageService: records validated and costed on the calling thread, stored
// through the group-commit writer (acknowledged after commit), read from the
// ledger on the executor, watched through the usage hub.
class UsageService final : public v1::UsageService::CallbackService {
 public:
  UsageService(UsageLedger& ledger, UsageWriter& writer, ChangeHub& hub, CallGate& gate,
               Executor& executor);

  using Ctx = grpc::CallbackServerContext;
  using Reactor = grpc::ServerUnaryReactor;

  Reactor* RecordUsage(Ctx* c, const v1::RecordUsageRequest* r,
                       v1::RecordUsageResponse* o) override;
  grpc::ServerBidiReactor<v1::IngestUsageRequest, v1::IngestUsageResponse>* IngestUsage(
      Ctx* c) override;
  grpc::ServerWriteReactor<v1::WatchUsageResponse>* WatchUsage(
      Ctx* c, const v1::WatchUsageRequest* r) override;
  Reactor* ListUsageRecords(Ctx* c, const v1::ListUsageRecordsRequest* r,
                            v1::ListUsageRecordsResponse* o) override;
  Reactor* QueryUsage(Ctx* c, const v1::QueryUsageRequest* r, v1::QueryUsageResponse* o) override;
  Reactor* GetCostBreakdown(Ctx* c, const v1::GetCostBreakdownRequest* r,
                            v1::GetCostBreakdownResponse* o) override;

 private:
  UsageLedger& ledger_;
  UsageWriter& writer_;
  ChangeHub& hub_;
  CallGate& gate_;
  Executor& executor_;
};

}  // namespace modelvault::server
