#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "modelvault/v1/usage.pb.h"
#include "server/budget_ledger.h"
#include "server/catalog_cache.h"
#include "storage/status_details.h"
#include "storage/storage.h"

// The usage ledger in storage: validation and costing of records, the batch
// transaction (idempotency, rollups, key counters, access-key last use,
// budget spend, then the records themselves in commit order), reads of the
// stream, aggregates from the rollups, and retention.
namespace modelvault::server {

struct UsageLedgerOptions {
  // Days of provider_key_recorded rows (the server's key time zone).
  absl::TimeZone key_time_zone = absl::UTCTimeZone();
  // Raw records (and their request_ids) older than this are removed.
  absl::Duration retention = absl::Hours(24 * 90);
  std::function<absl::Time()> clock = [] { return absl::Now(); };
  // Rollup compaction folds the keys of at most this many parts per
  // transaction (a backlog takes several), and at most 20 transactions a call.
  std::int64_t compaction_round_parts = 50'000;
};

// A validated, costed record ready to store.
struct PreparedRecord {
  v1::UsageRecord record;    // output fields set except cursor and record_time
  std::string content_hash;  // of the caller's content (idempotency)
};

// What became of one record of a batch.
struct RecordOutcome {
  enum class Kind { kStored, kDuplicate, kReused };
  Kind kind = Kind::kStored;
  std::int64_t seq = 0;    // stored: its seq; duplicate: the original's
  absl::Time record_time;  // stored: when it was stored
};

// Log-scale latency histogram slots (ratio 1.1 from 1 µs): the slot of a
// latency and the latency a slot stands for (its geometric middle).
int LatencySlot(std::int64_t micros);
std::int64_t SlotMicros(int slot);

// Cost in nano-USD of `tokens` at `price` (nano-USD per million tokens),
// summed in 128 bits and rounded half up once; OUT_OF_RANGE past int64.
absl::StatusOr<std::int64_t> CostNanos(const v1::TokenCounts& tokens, const v1::ModelPrice& price);

class UsageLedger final {
 public:
  // `page_token_key`: the key of List page tokens (shared by replicas).
  UsageLedger(storage::Datastore& datastore, CatalogCache& catalog, BudgetLedger& budgets,
              std::string page_token_key, UsageLedgerOptions options);

  // Validates `in` (violations named `prefix` + field) and computes its
  // cost from the catalog price in force at its time. `principal` is the
  // caller (`accessKeys/<id>`), the default access_key.
  // `in` by value: a caller done with its record moves it in (no copy).
  bool Prepare(v1::UsageRecord in, absl::string_view principal, absl::string_view prefix,
               PreparedRecord& out, std::vector<FieldViolation>& violations) const;

  // Stores a batch in one transaction. Outcomes are parallel to `records`;
  // `alerts` receives budget alerts raised (to publish after commit).
  // Concurrent writers pass distinct `lane`s: the provider-key counter rows
  // they add to are per lane, so they do not wait for each other's commits
  // (rollups are appended as parts, which no other writer touches).
  absl::StatusOr<std::vector<RecordOutcome>> Write(const std::vector<PreparedRecord>& records,
                                                   std::vector<storage::ChangeRecord>* alerts,
                                                   int lane = 0);

  // Records with seq > after (at most `limit`), in seq order; `last_seq`
  // receives the committed head of the stream (same snapshot).
  static absl::StatusOr<std::vector<v1::UsageRecord>> ReadAfter(storage::Reader& reader,
                                                                std::int64_t after, int limit,
                                                                std::int64_t* last_seq);
  // The committed head, and the highest seq removed by retention.
  static absl::Status FeedBounds(storage::Reader& reader, std::int64_t* last_seq,
                                 std::int64_t* pruned_through);
  // One record by seq.
  absl::StatusOr<v1::UsageRecord> GetBySeq(std::int64_t seq);

  absl::Status List(const v1::ListUsageRecordsRequest& request,
                    v1::ListUsageRecordsResponse* response);
  absl::Status Query(const v1::QueryUsageRequest& request, v1::QueryUsageResponse* response);
  absl::Status CostBreakdown(const v1::GetCostBreakdownRequest& request,
                             v1::GetCostBreakdownResponse* response);

  // Creates the partitions for today and the next days (PostgreSQL) and
  // removes records past retention: dropped partitions on PostgreSQL,
  // deleted rows on SQLite. Returns the number of records removed.
  absl::StatusOr<std::int64_t> Maintain();

  // Folds the rollup parts that usage writes append (one row per key and
  // batch) into one row per key, histograms merged. Returns the parts folded
  // (0 when another replica holds the compaction). Rollups are correct
  // before and after: reads sum every row of a key.
  absl::StatusOr<std::int64_t> CompactRollups();

 private:
  absl::Status EnsurePartitions(absl::Time from, absl::Time to);
  // One transaction of CompactRollups: folds the keys of at most `limit`
  // parts (all of those keys' parts). Returns the parts folded.
  absl::StatusOr<std::int64_t> CompactRound(std::int64_t limit);
  // One attempt of Write. Without `probe`, request_ids are not looked up
  // first: their primary key rejects a stored one (ALREADY_EXISTS, nothing
  // written) and Write retries with `probe`. Retries are rare, so the
  // common batch skips a lookup per record.
  absl::StatusOr<std::vector<RecordOutcome>> WriteOnce(const std::vector<PreparedRecord>& records,
                                                       std::vector<storage::ChangeRecord>* alerts,
                                                       int lane, bool probe);
  // Whether `access_key`'s last use should be written for a call at
  // `micros`: its first, then at most one a second (later calls only).
  // `undo` receives what to pass to UndoLastUse if the write rolls back.
  bool AdvanceLastUse(const std::string& access_key, std::int64_t micros,
                      std::vector<std::pair<std::string, std::int64_t>>& undo);
  // Forgets advances of a rolled-back write (those no later write replaced).
  void UndoLastUse(const std::vector<std::pair<std::string, std::int64_t>>& undo,
                   const std::map<std::string, std::int64_t>& advanced);

  storage::Datastore& datastore_;
  CatalogCache& catalog_;
  BudgetLedger& budgets_;
  const std::string page_token_key_;
  const UsageLedgerOptions options_;
  const bool postgres_;
  std::mutex partitions_mu_;
  absl::flat_hash_set<std::int64_t> partitions_;  // days known to exist; guarded
  std::mutex last_use_mu_;
  // Per access key, the newest last use written by this ledger; guarded.
  absl::flat_hash_map<std::string, std::int64_t> last_use_written_;
};

}  // namespace modelvault::server
