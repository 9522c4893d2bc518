// Usage-ledger conformance (server/usage_ledger.h) on SQLite and PostgreSQL: costs from the
// price in force at the call's time, idempotency on request_id (replays, conflicting
// content, repeats inside a batch), rollups equal to the sum of the raw records, a gap-free
// stream under concurrent writers and reconnecting readers, retention (partitions dropped on
// PostgreSQL) with expired cursors, and the aggregates answered from the rollups.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "modelvault/v1/usage.pb.h"
#include "server/budget_ledger.h"
#include "server/catalog_cache.h"
#include "server/cursor.h"
#include "server/proto_time.h"
#include "server/usage_ledger.h"
#include "server/usage_sql.h"
#include "server/usage_writer.h"
#include "storage/migrate.h"
#include "storage/status_details.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/status_checks.h"

namespace modelvault::conformance {
namespace {

using ::modelvault::server::BudgetLedger;
using ::modelvault::server::CatalogCache;
using ::modelvault::server::FromProto;
using ::modelvault::server::PreparedRecord;
using ::modelvault::server::RecordOutcome;
using ::modelvault::server::ToProto;
using ::modelvault::server::UsageLedger;
using ::modelvault::server::UsageLedgerOptions;
using ::modelvault::server::UsageWriter;
using ::modelvault::storage::Datastore;
using ::modelvault::storage::DatastoreOptions;
using ::modelvault::testing::FieldsOf;
using ::modelvault::v1::UsageRecord;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kModel[] = "providers/openai/models/gpt-4o";
constexpr char kPrincipal[] = "accessKeys/aaaaaaaaaaaaaaaa";
// 2024-06-01T12:00:00Z.
const absl::Time kNoon = absl::FromUnixSeconds(1717243200);

class FakeClock {
 public:
  explicit FakeClock(absl::Time t) : micros_(absl::ToUnixMicros(t)) {}
  absl::Time Now() const { return absl::FromUnixMicros(micros_.load()); }
  void Advance(absl::Duration d) { micros_.fetch_add(absl::ToInt64Microseconds(d)); }

 private:
  std::atomic<std::int64_t> micros_;
};

v1::ModelPrice Price(absl::Time from, std::int64_t input, std::int64_t output,
                     std::int64_t cache_read = 0, std::int64_t reasoning = 0) {
  v1::ModelPrice price;
  *price.mutable_effective_time() = ToProto(from);
  price.set_input(input);
  price.set_output(output);
  price.set_cache_read(cache_read);
  price.set_reasoning(reasoning);
  return price;
}

UsageRecord Record(const std::string& request_id, absl::Time time, std::int64_t input,
                   std::int64_t output, const std::string& model = kModel) {
  UsageRecord r;
  r.set_request_id(request_id);
  *r.mutable_time() = ToProto(time);
  r.set_provider(model.substr(0, model.find("/models/")));
  r.set_model(model);
  r.mutable_tokens()->set_input(input);
  r.mutable_tokens()->set_output(output);
  *r.mutable_latency() = ToProto(absl::Milliseconds(250));
  return r;
}

class UsageTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    DatastoreOptions options;
    options.pool_size = 12;
    absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated(options);
    ASSERT_TRUE(ds.ok()) << ds.status();
    datastore_ = *std::move(ds);
    // gpt-4o: $2.50 / $10 per million from 2024-01-01, $2 / $8 from noon.
    auto model = std::make_shared<v1::Model>();
    model->set_name(kModel);
    *model->add_prices() = Price(kNoon - absl::Hours(24 * 152), 2'500'000'000, 10'000'000'000);
    *model->add_prices() = Price(kNoon, 2'000'000'000, 8'000'000'000, 1'000'000'000, 0);
    cache_.Put(kModel, 1, model);
    Reopen(absl::Hours(24 * 90));
  }

  void Reopen(absl::Duration retention, std::int64_t compaction_round_parts = 50'000) {
    UsageLedgerOptions options;
    options.retention = retention;
    options.compaction_round_parts = compaction_round_parts;
    options.clock = [this] { return clock_.Now(); };
    options.key_time_zone = absl::UTCTimeZone();
    ledger_ =
        std::make_unique<UsageLedger>(*datastore_, cache_, budgets_, "test-page-key", options);
  }

  PreparedRecord Prepare(const UsageRecord& r) {
    PreparedRecord p;
    std::vector<FieldViolation> violations;
    EXPECT_TRUE(ledger_->Prepare(r, kPrincipal, "record.", p, violations))
        << (violations.empty() ? ""
                               : violations.front().field + " " + violations.front().description);
    return p;
  }

  std::vector<RecordOutcome> Write(const std::vector<UsageRecord>& records) {
    std::vector<PreparedRecord> prepared;
    for (const UsageRecord& r : records) prepared.push_back(Prepare(r));
    absl::StatusOr<std::vector<RecordOutcome>> out = ledger_->Write(prepared, nullptr);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : std::vector<RecordOutcome>();
  }

  std::int64_t Scalar(const std::string& sql) {
    absl::StatusOr<std::int64_t> v = QueryInt(sql);
    EXPECT_TRUE(v.ok()) << v.status() << " " << sql;
    return v.ok() ? *v : -1;
  }

  // Each column of usage_rollups equals the same sum over usage_records.
  void ExpectRollupsEqualRecords() {
    for (const char* column :
         {"input_tokens", "output_tokens", "cache_read_tokens", "cost_nanos", "latency_us"}) {
      const std::string rollup = std::string(column) == "latency_us" ? "latency_sum_us" : column;
      EXPECT_EQ(Scalar(absl::StrCat("SELECT COALESCE(SUM(", rollup, "), 0) FROM usage_rollups")),
                Scalar(absl::StrCat("SELECT COALESCE(SUM(", column, "), 0) FROM usage_records")))
          << column;
    }
    EXPECT_EQ(Scalar("SELECT COALESCE(SUM(requests), 0) FROM usage_rollups"),
              Scalar("SELECT COUNT(*) FROM usage_records"));
    EXPECT_EQ(Scalar(HistogramCountSql()), Scalar("SELECT COUNT(*) FROM usage_records"));
  }

  // `query` answers now exactly what it answered `before`.
  void ExpectSameAnswer(const v1::QueryUsageRequest& query, const v1::QueryUsageResponse& before) {
    v1::QueryUsageResponse after;
    ASSERT_TRUE(ledger_->Query(query, &after).ok());
    ASSERT_EQ(after.groups_size(), before.groups_size());
    for (int g = 0; g < before.groups_size(); ++g) {
      EXPECT_EQ(after.groups(g).ShortDebugString(), before.groups(g).ShortDebugString());
    }
  }

  // The sum of every count in the rollups' latency histograms.
  std::string HistogramCountSql() const {
    return is_postgres() ? "SELECT CAST(COALESCE(SUM(CAST(e.value AS BIGINT)), 0) AS BIGINT) "
                           "FROM usage_rollups, json_each_text(CAST(latency_histogram AS json)) "
                           "AS e"
                         : "SELECT COALESCE(SUM(e.value), 0) FROM usage_rollups, "
                           "json_each(latency_histogram) AS e";
  }

  FakeClock clock_{kNoon + absl::Hours(2)};
  std::unique_ptr<Datastore> datastore_;
  CatalogCache cache_;
  BudgetLedger budgets_{[this] { return clock_.Now(); }};
  std::unique_ptr<UsageLedger> ledger_;
};

TEST_P(UsageTest, CostUsesThePriceInForceAtTheCallsTime) {
  // 1,000 input + 500 output tokens before noon: 1000*2.5e9/1e6 + 500*1e10/1e6 = 7,500,000.
  PreparedRecord before = Prepare(Record("r1", kNoon - absl::Minutes(1), 1000, 500));
  EXPECT_TRUE(before.record.priced());
  EXPECT_EQ(before.record.cost_nanos(), 7'500'000);
  EXPECT_EQ(FromProto(before.record.price_effective_time()), kNoon - absl::Hours(24 * 152));
  // At noon exactly the new price applies: 1000*2e9/1e6 + 500*8e9/1e6 = 6,000,000.
  PreparedRecord after = Prepare(Record("r2", kNoon, 1000, 500));
  EXPECT_EQ(after.record.cost_nanos(), 6'000'000);
  EXPECT_EQ(FromProto(after.record.price_effective_time()), kNoon);
  // Before any price, and for a model the catalog does not know: kept, unpriced.
  PreparedRecord early = Prepare(Record("r3", kNoon - absl::Hours(24 * 400), 1000, 500));
  EXPECT_FALSE(early.record.priced());
  EXPECT_EQ(early.record.cost_nanos(), 0);
  PreparedRecord unknown =
      Prepare(Record("r4", kNoon, 1000, 500, "providers/openai/models/not-in-catalog"));
  EXPECT_FALSE(unknown.record.priced());
  // A caller's own figure stays apart.
  UsageRecord reported = Record("r5", kNoon, 1000, 500);
  reported.set_reported_cost_nanos(123);
  PreparedRecord p = Prepare(reported);
  EXPECT_EQ(p.record.cost_nanos(), 6'000'000);
  EXPECT_EQ(p.record.reported_cost_nanos(), 123);
  // And the stored record keeps all of it.
  std::vector<RecordOutcome> out = Write({reported});
  ASSERT_EQ(out.size(), 1u);
  absl::StatusOr<UsageRecord> stored = ledger_->GetBySeq(out[0].seq);
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stored->cost_nanos(), 6'000'000);
  EXPECT_EQ(stored->reported_cost_nanos(), 123);
  EXPECT_EQ(FromProto(stored->price_effective_time()), kNoon);
  EXPECT_EQ(stored->access_key(), kPrincipal);
}

// Records travel to the database as one JSON document per statement: text with quotes,
// backslashes, control characters and non-ASCII letters, large numbers and NULLs come back
// exactly.
TEST_P(UsageTest, EveryValueSurvivesTheBulkWriteExactly) {
  UsageRecord r = Record("json-\"quoted\"\\id", kNoon, 999'999'999'999, 0);
  r.set_user("Zoë \"the\" \\ user\x01\t\r\n");
  r.set_conversation("{\"not\": [json]}");
  r.set_error_class("ünïcödé");
  r.set_reported_cost_nanos(std::numeric_limits<std::int64_t>::max());
  std::vector<RecordOutcome> out = Write({r});
  ASSERT_EQ(out.size(), 1u);
  absl::StatusOr<UsageRecord> stored = ledger_->GetBySeq(out[0].seq);
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stored->request_id(), r.request_id());
  EXPECT_EQ(stored->user(), r.user());
  EXPECT_EQ(stored->conversation(), r.conversation());
  EXPECT_EQ(stored->error_class(), r.error_class());
  EXPECT_EQ(stored->tokens().input(), 999'999'999'999);
  EXPECT_EQ(stored->reported_cost_nanos(), std::numeric_limits<std::int64_t>::max());
  EXPECT_FALSE(stored->has_time_to_first_token());  // NULL stays NULL
  // The replay is recognized through the same path.
  std::vector<RecordOutcome> again = Write({r});
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].kind, RecordOutcome::Kind::kDuplicate);
  EXPECT_EQ(again[0].seq, out[0].seq);
}

TEST_P(UsageTest, BadRecordsNameTheFieldAtFault) {
  struct Case {
    std::function<void(UsageRecord&)> mutate;
    std::string field;
  };
  const std::vector<Case> cases = {
      {[](UsageRecord& r) { r.clear_request_id(); }, "records[0].request_id"},
      {[](UsageRecord& r) { r.clear_time(); }, "records[0].time"},
      {[&](UsageRecord& r) { *r.mutable_time() = ToProto(clock_.Now() + absl::Hours(2)); },
       "records[0].time"},
      {[](UsageRecord& r) { r.set_provider("openai"); }, "records[0].provider"},
      {[](UsageRecord& r) { r.set_model("providers/anthropic/models/x"); }, "records[0].model"},
      {[](UsageRecord& r) { r.set_provider_key("providers/anthropic/keys/k"); },
       "records[0].provider_key"},
      {[](UsageRecord& r) { r.mutable_tokens()->set_output(-1); }, "records[0].tokens.output"},
      {[](UsageRecord& r) { r.mutable_tokens()->set_reasoning(2'000'000'000'000); },
       "records[0].tokens.reasoning"},
      {[](UsageRecord& r) { *r.mutable_latency() = ToProto(absl::Seconds(-1)); },
       "records[0].latency"},
      {[](UsageRecord& r) { *r.mutable_time_to_first_token() = ToProto(absl::Seconds(5)); },
       "records[0].time_to_first_token"},
      {[](UsageRecord& r) { r.set_user(std::string(129, 'u')); }, "records[0].user"},
      {[](UsageRecord& r) { r.set_status(static_cast<v1::UsageStatus>(42)); }, "records[0].status"},
      {[](UsageRecord& r) { r.set_reported_cost_nanos(-5); }, "records[0].reported_cost_nanos"},
      {[](UsageRecord& r) { r.set_reservation("budgets/x"); }, "records[0].reservation"},
      {[](UsageRecord& r) { r.set_access_key("nope"); }, "records[0].access_key"},
  };
  for (const Case& c : cases) {
    UsageRecord r = Record("bad", kNoon, 1, 1);
    c.mutate(r);
    PreparedRecord p;
    std::vector<FieldViolation> violations;
    EXPECT_FALSE(ledger_->Prepare(r, kPrincipal, "records[0].", p, violations)) << c.field;
    ASSERT_FALSE(violations.empty()) << c.field;
    EXPECT_EQ(violations.front().field, c.field) << violations.front().description;
  }
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_records"), 0);
}

TEST_P(UsageTest, RequestIdsAreIdempotent) {
  std::vector<UsageRecord> batch;
  for (int i = 0; i < 100; ++i) {
    batch.push_back(Record(absl::StrCat("call-", i), kNoon + absl::Minutes(i), 100 + i, 10));
  }
  std::vector<RecordOutcome> first = Write(batch);
  ASSERT_EQ(first.size(), 100u);
  std::set<std::int64_t> seqs;
  for (const RecordOutcome& o : first) {
    EXPECT_EQ(o.kind, RecordOutcome::Kind::kStored);
    seqs.insert(o.seq);
  }
  EXPECT_EQ(seqs.size(), 100u);
  EXPECT_EQ(*seqs.rbegin() - *seqs.begin(), 99);  // contiguous

  // The same batch again: every record a duplicate pointing at its original.
  std::vector<RecordOutcome> again = Write(batch);
  for (size_t i = 0; i < again.size(); ++i) {
    EXPECT_EQ(again[i].kind, RecordOutcome::Kind::kDuplicate);
    EXPECT_EQ(again[i].seq, first[i].seq);
  }
  // Other content under a used id, and a repeat inside one batch.
  UsageRecord changed = batch[7];
  changed.mutable_tokens()->set_output(11);
  UsageRecord fresh = Record("call-new", kNoon, 1, 1);
  UsageRecord fresh_changed = fresh;
  fresh_changed.set_user("someone-else");
  std::vector<RecordOutcome> mixed = Write({changed, fresh, fresh, fresh_changed});
  ASSERT_EQ(mixed.size(), 4u);
  EXPECT_EQ(mixed[0].kind, RecordOutcome::Kind::kReused);
  EXPECT_EQ(mixed[1].kind, RecordOutcome::Kind::kStored);
  EXPECT_EQ(mixed[2].kind, RecordOutcome::Kind::kDuplicate);
  EXPECT_EQ(mixed[2].seq, mixed[1].seq);
  EXPECT_EQ(mixed[3].kind, RecordOutcome::Kind::kReused);

  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_records"), 101);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_request_ids"), 101);
  EXPECT_EQ(Scalar("SELECT last_seq FROM usage_feed"), 101);
  ExpectRollupsEqualRecords();
}

TEST_P(UsageTest, RollupsEqualTheSumOfRecordsAcrossHoursAndDimensions) {
  std::mt19937 random(7);
  std::vector<UsageRecord> batch;
  for (int i = 0; i < 1500; ++i) {
    UsageRecord r = Record(absl::StrCat("r", i), kNoon - absl::Minutes(random() % 3000),
                           random() % 5000, random() % 2000);
    r.set_user(absl::StrCat("user-", random() % 7));
    if (random() % 2 == 0)
      r.set_provider_key(absl::StrCat("providers/openai/keys/k", random() % 3));
    r.mutable_tokens()->set_cache_read(random() % 100);
    *r.mutable_latency() = ToProto(absl::Milliseconds(1 + random() % 5000));
    if (random() % 5 == 0) r.set_status(v1::USAGE_STATUS_FAILED);
    batch.push_back(r);
    if (batch.size() == 300) {
      Write(batch);
      batch.clear();
    }
  }
  ExpectRollupsEqualRecords();
  // Per provider key and day, too.
  EXPECT_EQ(Scalar("SELECT COALESCE(SUM(requests), 0) FROM provider_key_recorded"),
            Scalar("SELECT COUNT(*) FROM usage_records WHERE provider_key <> ''"));
  EXPECT_EQ(Scalar("SELECT COALESCE(SUM(cost_nanos), 0) FROM provider_key_recorded"),
            Scalar("SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_records "
                   "WHERE provider_key <> ''"));
}

// Four writers commit batches concurrently while three readers follow the stream, each
// "reconnecting" at random from the last cursor it holds: every reader sees every seq once,
// in order, with no gap — the records are numbered 1..N without holes.
TEST_P(UsageTest, StreamIsGapFreeUnderConcurrentWriters) {
  constexpr int kWriters = 4;
  constexpr int kBatches = 40;
  constexpr int kPerBatch = 25;
  constexpr std::int64_t kTotal = kWriters * kBatches * kPerBatch;
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 random(w);
      for (int b = 0; b < kBatches && !failed; ++b) {
        std::vector<PreparedRecord> prepared;
        for (int i = 0; i < kPerBatch; ++i) {
          prepared.push_back(
              Prepare(Record(absl::StrCat("w", w, "-", b, "-", i), kNoon, 1 + random() % 100, 1)));
        }
        // Two writers per lane: lanes add to their own aggregate rows.
        absl::StatusOr<std::vector<RecordOutcome>> out = ledger_->Write(prepared, nullptr, w % 2);
        if (!out.ok()) {
          ADD_FAILURE() << out.status();
          failed = true;
        }
      }
    });
  }
  std::vector<std::vector<std::int64_t>> seen(3);
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      std::mt19937 random(100 + r);
      std::int64_t cursor = 0;
      while (cursor < kTotal && !failed) {
        // A "connection": a few reads, then start over from the cursor held.
        const int reads = 1 + static_cast<int>(random() % 5);
        for (int i = 0; i < reads; ++i) {
          std::vector<v1::UsageRecord> page;
          absl::Status status = datastore_->Read([&](storage::Reader& reader) -> absl::Status {
            absl::StatusOr<std::vector<v1::UsageRecord>> rows = UsageLedger::ReadAfter(
                reader, cursor, 1 + static_cast<int>(random() % 200), nullptr);
            if (!rows.ok()) return rows.status();
            page = *std::move(rows);
            return absl::OkStatus();
          });
          if (!status.ok()) {
            ADD_FAILURE() << status;
            failed = true;
            return;
          }
          for (const v1::UsageRecord& record : page) {
            absl::StatusOr<std::int64_t> seq = server::DecodeCursor(record.cursor());
            ASSERT_TRUE(seq.ok());
            seen[r].push_back(*seq);
            cursor = *seq;
          }
        }
        std::this_thread::sleep_for(std::chrono::microseconds(random() % 2000));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_FALSE(failed);
  for (int r = 0; r < 3; ++r) {
    ASSERT_EQ(static_cast<std::int64_t>(seen[r].size()), kTotal) << "reader " << r;
    for (std::int64_t i = 0; i < kTotal; ++i) {
      ASSERT_EQ(seen[r][static_cast<size_t>(i)], i + 1) << "reader " << r << " position " << i;
    }
  }
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_records"), kTotal);
  ExpectRollupsEqualRecords();
}

// A writer with three lanes and small groups: submissions complete in submission order,
// the batches of one order key commit in that order (rising cursors), and rollups
// summed over lanes equal the records.
TEST_P(UsageTest, WriterLanesCompleteInOrderAndKeepEachKeysCommitOrder) {
  std::atomic<int> commits{0};
  UsageWriter writer(
      *ledger_, [&](std::vector<storage::ChangeRecord>) { ++commits; },
      /*lanes=*/3, /*max_queued_records=*/100'000, /*max_group_records=*/20);
  constexpr int kKeys = 4;
  constexpr int kPerKey = 30;
  constexpr int kRecords = 10;
  std::mutex mu;
  std::vector<int> completed;
  std::map<int, std::vector<std::int64_t>> last_seq_by_key;
  for (int i = 0; i < kKeys * kPerKey; ++i) {
    const int key = i % kKeys;
    std::vector<PreparedRecord> prepared;
    for (int k = 0; k < kRecords; ++k) {
      UsageRecord r = Record(absl::StrCat("lane-", i, "-", k), kNoon, 10 + k, 1);
      r.set_user(absl::StrCat("user-", k % 3));
      prepared.push_back(Prepare(r));
    }
    ASSERT_TRUE(writer.Submit(
        std::move(prepared),
        [&, i, key](absl::StatusOr<std::vector<RecordOutcome>> out) {
          ASSERT_TRUE(out.ok()) << out.status();
          std::lock_guard lock(mu);
          completed.push_back(i);
          last_seq_by_key[key].push_back(out->back().seq);
        },
        /*order_key=*/static_cast<std::uint64_t>(key) + 1));
  }
  writer.Stop();
  ASSERT_EQ(completed.size(), static_cast<size_t>(kKeys * kPerKey));
  for (int i = 0; i < kKeys * kPerKey; ++i) EXPECT_EQ(completed[static_cast<size_t>(i)], i);
  for (const auto& [key, seqs] : last_seq_by_key) {
    for (size_t b = 1; b < seqs.size(); ++b) {
      EXPECT_GT(seqs[b], seqs[b - 1]) << "key " << key << " batch " << b;
    }
  }
  EXPECT_GT(commits.load(), 1);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_records"), kKeys * kPerKey * kRecords);
  ExpectRollupsEqualRecords();
}

// Migrations 0004 (lanes, histograms in the rollup rows) and 0005 (rollup parts) carry
// stored aggregates both ways: 0005's down folds every key's parts and lanes into one
// row, 0004's down explodes the histograms into rows per slot, up rebuilds them; totals
// and percentiles are unchanged throughout.
TEST_P(UsageTest, LaneAndHistogramMigrationsKeepTheAggregates) {
  std::vector<UsageRecord> batch;
  for (int i = 0; i < 60; ++i) {
    UsageRecord r = Record(absl::StrCat("m", i), kNoon, 100 + i, 1);
    r.set_user(absl::StrCat("user-", i % 3));
    *r.mutable_latency() = ToProto(absl::Milliseconds(10 * (1 + i % 7)));
    batch.push_back(r);
  }
  for (int lane = 0; lane < 2; ++lane) {
    std::vector<PreparedRecord> prepared;
    for (int i = lane * 30; i < lane * 30 + 30; ++i) {
      prepared.push_back(Prepare(batch[static_cast<size_t>(i)]));
    }
    ASSERT_TRUE(ledger_->Write(prepared, nullptr, lane).ok());
  }
  v1::QueryUsageRequest query;
  *query.mutable_start_time() = ToProto(kNoon - absl::Hours(1));
  *query.mutable_end_time() = ToProto(kNoon + absl::Hours(1));
  query.add_group_by(v1::USAGE_DIMENSION_USER);
  v1::QueryUsageResponse before;
  ASSERT_TRUE(ledger_->Query(query, &before).ok());
  ASSERT_EQ(before.groups_size(), 3);

  absl::StatusOr<storage::Migrator> migrator = storage::Migrator::ForUrl(url());
  ASSERT_TRUE(migrator.ok()) << migrator.status();
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups WHERE part <> 0"), 6);  // 2 batches x 3
  ASSERT_TRUE(migrator->Down(1).ok());
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups"), 3);  // parts and lanes folded
  EXPECT_EQ(Scalar(HistogramCountSql()), 60);
  ASSERT_TRUE(migrator->Down(1).ok());
  EXPECT_EQ(Scalar("SELECT COALESCE(SUM(count), 0) FROM usage_latency"), 60);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups"), 3);  // lanes folded
  EXPECT_EQ(Scalar("SELECT COALESCE(SUM(requests), 0) FROM usage_rollups"), 60);
  ASSERT_TRUE(migrator->Up().ok());
  ExpectRollupsEqualRecords();
  ExpectSameAnswer(query, before);
}

// A usage write appends one rollup part per key; compaction folds a key's rows into
// one, and no total, count or percentile moves.
TEST_P(UsageTest, CompactionFoldsRollupPartsWithoutChangingAnyAggregate) {
  auto write_batch = [&](int b) {
    std::vector<UsageRecord> batch;
    for (int i = 0; i < 40; ++i) {
      // Four keys: user i % 4, the first two users in one hour, the others in the next.
      UsageRecord r = Record(absl::StrCat("c", b, "-", i),
                             kNoon + absl::Minutes(i % 4 < 2 ? 10 : 70), 100 + i, 1);
      r.set_user(absl::StrCat("user-", i % 4));
      *r.mutable_latency() = ToProto(absl::Milliseconds(5 * (1 + (i + b) % 9)));
      batch.push_back(r);
    }
    Write(batch);
  };
  for (int b = 0; b < 3; ++b) write_batch(b);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups WHERE part <> 0"), 12);
  v1::QueryUsageRequest query;
  *query.mutable_start_time() = ToProto(kNoon - absl::Hours(1));
  *query.mutable_end_time() = ToProto(kNoon + absl::Hours(3));
  query.add_group_by(v1::USAGE_DIMENSION_USER);
  v1::QueryUsageResponse before;
  ASSERT_TRUE(ledger_->Query(query, &before).ok());
  ASSERT_EQ(before.groups_size(), 4);

  absl::StatusOr<std::int64_t> folded = ledger_->CompactRollups();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(*folded, 12);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups"), 4);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups WHERE part <> 0"), 0);
  ExpectRollupsEqualRecords();
  ExpectSameAnswer(query, before);

  // New parts fold into the folded rows; nothing left to fold is a no-op. With rounds of
  // one part (one key's parts per transaction) one call still folds all four keys.
  Reopen(absl::Hours(24 * 90), 1);
  write_batch(3);
  folded = ledger_->CompactRollups();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(*folded, 4);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups"), 4);
  folded = ledger_->CompactRollups();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(*folded, 0);
  ExpectRollupsEqualRecords();
}

// Compaction running while two writers (lanes) commit batches: every part is folded
// once or left for the next round, never lost or counted twice.
TEST_P(UsageTest, CompactionAlongsideWritersKeepsRollupsEqualToRecords) {
  std::atomic<bool> done{false};
  std::atomic<std::int64_t> folded{0};
  std::thread compactor([&] {
    while (!done.load()) {
      absl::StatusOr<std::int64_t> n = ledger_->CompactRollups();
      EXPECT_TRUE(n.ok()) << n.status();
      if (n.ok()) folded += *n;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  std::vector<std::thread> writers;
  writers.reserve(2);
  for (int lane = 0; lane < 2; ++lane) {
    writers.emplace_back([&, lane] {
      for (int b = 0; b < 20; ++b) {
        std::vector<PreparedRecord> prepared;
        for (int i = 0; i < 25; ++i) {
          UsageRecord r = Record(absl::StrCat("w", lane, "-", b, "-", i),
                                 kNoon + absl::Minutes(i % 3 * 40), 10 + i, 2);
          r.set_user(absl::StrCat("user-", i % 5));
          prepared.push_back(Prepare(r));
        }
        absl::StatusOr<std::vector<RecordOutcome>> out = ledger_->Write(prepared, nullptr, lane);
        EXPECT_TRUE(out.ok()) << out.status();
      }
    });
  }
  for (std::thread& w : writers) w.join();
  done.store(true);
  compactor.join();
  absl::StatusOr<std::int64_t> last = ledger_->CompactRollups();
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_GT(folded.load(), 0);  // compaction did run alongside the writes
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups WHERE part <> 0"), 0);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_records"), 2 * 20 * 25);
  ExpectRollupsEqualRecords();
  // Per key too: one row each, holding exactly its user's records.
  EXPECT_EQ(
      Scalar("SELECT COUNT(*) FROM usage_rollups"),
      Scalar("SELECT COUNT(*) FROM (SELECT DISTINCT bucket, user_id FROM usage_rollups) AS k"));
  for (int u = 0; u < 5; ++u) {
    const std::string user = absl::StrCat("'user-", u, "'");
    EXPECT_EQ(Scalar(absl::StrCat(
                  "SELECT COALESCE(SUM(requests), 0) FROM usage_rollups WHERE user_id = ", user)),
              Scalar(absl::StrCat("SELECT COUNT(*) FROM usage_records WHERE user_id = ", user)))
        << user;
    EXPECT_EQ(
        Scalar(absl::StrCat(
            "SELECT COALESCE(SUM(input_tokens), 0) FROM usage_rollups WHERE user_id = ", user)),
        Scalar(absl::StrCat(
            "SELECT COALESCE(SUM(input_tokens), 0) FROM usage_records WHERE user_id = ", user)))
        << user;
  }
}

TEST_P(UsageTest, RetentionRemovesOldRecordsAndExpiresTheirCursors) {
  std::vector<UsageRecord> old_batch;
  for (int i = 0; i < 50; ++i) old_batch.push_back(Record(absl::StrCat("old-", i), kNoon, 10, 1));
  Write(old_batch);
  const std::int64_t rollup_requests = Scalar("SELECT SUM(requests) FROM usage_rollups");
  // Three days later, with one day of retention: the first day's records go.
  clock_.Advance(absl::Hours(72));
  Reopen(absl::Hours(24));
  std::vector<UsageRecord> new_batch;
  for (int i = 0; i < 10; ++i) {
    new_batch.push_back(Record(absl::StrCat("new-", i), clock_.Now() - absl::Minutes(1), 10, 1));
  }
  Write(new_batch);
  absl::StatusOr<std::int64_t> removed = ledger_->Maintain();
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, 50);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_records"), 10);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_request_ids"), 10);
  EXPECT_EQ(Scalar("SELECT pruned_through_seq FROM usage_feed"), 50);
  // Rollups are kept.
  EXPECT_EQ(Scalar("SELECT SUM(requests) FROM usage_rollups"), rollup_requests + 10);
  std::int64_t last = 0;
  std::int64_t pruned = 0;
  ASSERT_TRUE(datastore_
                  ->Read([&](storage::Reader& reader) {
                    return UsageLedger::FeedBounds(reader, &last, &pruned);
                  })
                  .ok());
  EXPECT_EQ(last, 60);
  EXPECT_EQ(pruned, 50);
  if (GetParam().name == "postgres") {
    // Whole partitions went: the first day's table no longer exists.
    const std::string day =
        absl::FormatTime("%Y%m%d", clock_.Now() - absl::Hours(72), absl::UTCTimeZone());
    absl::StatusOr<bool> exists = TableExists(absl::StrCat("usage_records_", day));
    ASSERT_TRUE(exists.ok());
    EXPECT_FALSE(*exists);
  }
  // Running it again removes nothing more.
  absl::StatusOr<std::int64_t> again = ledger_->Maintain();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0);
}

TEST_P(UsageTest, QueryGroupsByDimensionAndCalendarBucketInATimeZone) {
  // New York is UTC-4 in June: local midnight of June 2 is 04:00 UTC.
  const absl::Time june2_local =
      absl::FromCivil(absl::CivilDay(2024, 6, 2), absl::FixedTimeZone(-4 * 3600));
  std::vector<UsageRecord> batch;
  // 3 calls on June 1 (local), 2 on June 2, two models.
  batch.push_back(Record("a", june2_local - absl::Hours(5), 1000, 0));
  batch.push_back(Record("b", june2_local - absl::Hours(1), 1000, 0));
  batch.push_back(
      Record("c", june2_local - absl::Minutes(1), 1000, 0, "providers/openai/models/gpt-4o-mini"));
  batch.push_back(Record("d", june2_local, 1000, 0));
  batch.push_back(
      Record("e", june2_local + absl::Hours(3), 1000, 0, "providers/openai/models/gpt-4o-mini"));
  clock_.Advance(absl::Hours(24));
  Write(batch);

  v1::QueryUsageRequest request;
  *request.mutable_start_time() = ToProto(june2_local - absl::Hours(24));
  *request.mutable_end_time() = ToProto(june2_local + absl::Hours(24));
  request.set_bucket(v1::TIME_BUCKET_DAY);
  request.set_time_zone("America/New_York");
  request.add_group_by(v1::USAGE_DIMENSION_MODEL);
  v1::QueryUsageResponse response;
  ASSERT_TRUE(ledger_->Query(request, &response).ok());
  std::vector<std::string> got;
  for (const v1::UsageGroup& g : response.groups()) {
    got.push_back(absl::StrCat(
        absl::FormatTime("%Y-%m-%d", FromProto(g.bucket_start()), absl::FixedTimeZone(-4 * 3600)),
        " ", g.model().substr(g.model().rfind('/') + 1), " ", g.totals().requests(), " ",
        g.totals().cost_nanos()));
  }
  // gpt-4o at $2 per million input tokens (every call is after noon UTC June 1); mini has
  // no price (cost 0).
  EXPECT_THAT(got, ElementsAre("2024-06-01 gpt-4o 2 4000000", "2024-06-01 gpt-4o-mini 1 0",
                               "2024-06-02 gpt-4o 1 2000000", "2024-06-02 gpt-4o-mini 1 0"));
  EXPECT_EQ(response.totals().requests(), 5);
  EXPECT_EQ(response.totals().unpriced_requests(), 2);
  EXPECT_EQ(response.totals().cost_nanos(), 6'000'000);

  // Not on a whole hour, and a zone with a half-hour offset: refused with the field.
  v1::QueryUsageRequest bad = request;
  *bad.mutable_start_time() = ToProto(june2_local - absl::Minutes(30));
  v1::QueryUsageResponse ignored;
  absl::Status status = ledger_->Query(bad, &ignored);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(FieldsOf(status), ElementsAre("start_time"));
  bad = request;
  bad.set_time_zone("Asia/Kolkata");
  status = ledger_->Query(bad, &ignored);
  EXPECT_THAT(FieldsOf(status), ElementsAre("time_zone"));
  bad = request;
  bad.add_group_by(v1::USAGE_DIMENSION_MODEL);
  status = ledger_->Query(bad, &ignored);
  EXPECT_THAT(FieldsOf(status), ElementsAre("group_by[1]"));

  v1::GetCostBreakdownRequest breakdown_request;
  *breakdown_request.mutable_start_time() = request.start_time();
  *breakdown_request.mutable_end_time() = request.end_time();
  v1::GetCostBreakdownResponse breakdown;
  ASSERT_TRUE(ledger_->CostBreakdown(breakdown_request, &breakdown).ok());
  EXPECT_EQ(breakdown.total_cost_nanos(), 6'000'000);
  EXPECT_EQ(breakdown.requests(), 5);
  ASSERT_EQ(breakdown.providers_size(), 1);
  ASSERT_EQ(breakdown.providers(0).models_size(), 2);
  EXPECT_EQ(breakdown.providers(0).models(0).model(), kModel);  // most expensive first
  EXPECT_EQ(breakdown.providers(0).models(0).cost_nanos(), 6'000'000);
}

TEST_P(UsageTest, LatencyPercentilesComeFromTheRollupHistogram) {
  std::vector<UsageRecord> batch;
  for (int i = 1; i <= 1000; ++i) {
    UsageRecord r = Record(absl::StrCat("lat-", i), kNoon, 1, 1);
    *r.mutable_latency() = ToProto(absl::Milliseconds(i));
    if (i % 2 == 0) *r.mutable_time_to_first_token() = ToProto(absl::Milliseconds(i / 2));
    batch.push_back(r);
  }
  Write(batch);
  v1::QueryUsageRequest request;
  *request.mutable_start_time() = ToProto(kNoon);
  *request.mutable_end_time() = ToProto(kNoon + absl::Hours(1));
  v1::QueryUsageResponse response;
  ASSERT_TRUE(ledger_->Query(request, &response).ok());
  ASSERT_EQ(response.groups_size(), 1);
  const v1::UsageTotals& t = response.groups(0).totals();
  auto ms = [](const google::protobuf::Duration& d) {
    return absl::ToDoubleMilliseconds(FromProto(d));
  };
  EXPECT_NEAR(ms(t.latency_p50()), 500, 25);
  EXPECT_NEAR(ms(t.latency_p90()), 900, 45);
  EXPECT_NEAR(ms(t.latency_p99()), 990, 50);
  EXPECT_NEAR(ms(t.latency_mean()), 500.5, 0.01);
  EXPECT_NEAR(ms(t.time_to_first_token_mean()), 250.5, 0.01);
}

TEST_P(UsageTest, ListPagesThroughFilteredRecordsInCursorOrder) {
  std::vector<UsageRecord> batch;
  for (int i = 0; i < 120; ++i) {
    UsageRecord r = Record(absl::StrCat("l", i), kNoon + absl::Seconds(i), 1, 1);
    r.set_user(i % 3 == 0 ? "alice" : "bob");
    batch.push_back(r);
  }
  Write(batch);
  v1::ListUsageRecordsRequest request;
  request.set_page_size(7);
  request.mutable_filter()->set_user("alice");
  std::vector<std::string> ids;
  std::string token;
  std::string first_token;
  do {
    request.set_page_token(token);
    v1::ListUsageRecordsResponse page;
    absl::Status status = ledger_->List(request, &page);
    ASSERT_TRUE(status.ok()) << status;
    for (const UsageRecord& r : page.records()) {
      EXPECT_EQ(r.user(), "alice");
      ids.push_back(r.request_id());
    }
    token = page.next_page_token();
    if (first_token.empty()) first_token = token;
  } while (!token.empty());
  ASSERT_EQ(ids.size(), 40u);
  for (int i = 0; i < 40; ++i) EXPECT_EQ(ids[static_cast<size_t>(i)], absl::StrCat("l", i * 3));
  // A token is bound to its query.
  request.mutable_filter()->set_user("bob");
  request.set_page_token(first_token);
  v1::ListUsageRecordsResponse page;
  absl::Status status = ledger_->List(request, &page);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(FieldsOf(status), ElementsAre("page_token"));
}

TEST_P(UsageTest, RecordingUpdatesAccessKeysLastUse) {
  ASSERT_TRUE(ExecuteSql(url(),
                         "INSERT INTO access_keys (name, parent, revision, owner, scopes, "
                         "create_time, update_time) VALUES ('accessKeys/aaaaaaaaaaaaaaaa', '', 1, "
                         "'test', '[]', 0, 0)")
                  .ok());
  Write({Record("u1", kNoon + absl::Minutes(5), 1, 1)});
  EXPECT_EQ(Scalar("SELECT last_used_time FROM access_keys"),
            absl::ToUnixMicros(kNoon + absl::Minutes(5)));
  Write({Record("u2", kNoon, 1, 1)});  // an older call never moves it back
  EXPECT_EQ(Scalar("SELECT last_used_time FROM access_keys"),
            absl::ToUnixMicros(kNoon + absl::Minutes(5)));
  // A batch with a stored request_id is first rolled back (its id's primary
  // key rejects it) and then written again: the rolled-back attempt must not
  // count as having written the new last use.
  Write(
      {Record("u1", kNoon + absl::Minutes(5), 1, 1), Record("u3", kNoon + absl::Minutes(9), 1, 1)});
  EXPECT_EQ(Scalar("SELECT last_used_time FROM access_keys"),
            absl::ToUnixMicros(kNoon + absl::Minutes(9)));
}

// Replicas compacting while others write: PostgreSQL only (SQLite has one writer at a
// time, so neither race below can happen there).
class UsagePostgresTest : public UsageTest {
 protected:
  // Adds a part of `requests` calls (one latency-slot count each) to user-0's first
  // folded rollup row's key, in `tx`.
  static absl::Status InsertPart(storage::ReadWriteTx& tx, int requests) {
    return tx
        .Exec(absl::StrCat("INSERT INTO usage_rollups (", server::kRollupColumns,
                           ") SELECT bucket, provider, model, provider_key, access_key, user_id, ",
                           requests, ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '{\"10\":", requests,
                           "}', 1 FROM usage_rollups WHERE user_id = 'user-0' AND part = 0 "
                           "ORDER BY bucket LIMIT 1"),
              {})
        .status();
  }

  // Writes a batch for users 0-2 and folds it: one folded row per user.
  void WriteAndFold() {
    std::vector<UsageRecord> batch;
    for (int i = 0; i < 30; ++i) {
      UsageRecord r = Record(absl::StrCat("pg-", i), kNoon, 10, 1);
      r.set_user(absl::StrCat("user-", i % 3));
      batch.push_back(r);
    }
    Write(batch);
    absl::StatusOr<std::int64_t> folded = ledger_->CompactRollups();
    ASSERT_TRUE(folded.ok()) << folded.status();
    ASSERT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups"), 3);
  }

  // A write transaction that ran `body` on another thread and is held open
  // (uncommitted, its locks kept) until Commit(): what another replica's
  // transaction in flight looks like.
  class HeldTransaction final {
   public:
    HeldTransaction(Datastore& datastore, std::function<absl::Status(storage::ReadWriteTx&)> body)
        : thread_([this, &datastore, body = std::move(body)] {
            absl::Status s = datastore.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
              absl::Status ran = body(tx);
              started_.set_value(ran);
              if (ran.ok()) commit_.wait();
              return ran;
            });
            EXPECT_TRUE(s.ok()) << s;
          }) {
      ran_ = started_future_.get();
    }
    ~HeldTransaction() { Commit(); }
    HeldTransaction(const HeldTransaction&) = delete;
    HeldTransaction& operator=(const HeldTransaction&) = delete;

    const absl::Status& ran() const { return ran_; }
    void Commit() {
      if (!thread_.joinable()) return;
      release_.set_value();
      thread_.join();
    }

   private:
    std::promise<absl::Status> started_;
    std::future<absl::Status> started_future_ = started_.get_future();
    std::promise<void> release_;
    std::shared_future<void> commit_ = release_.get_future().share();
    absl::Status ran_;
    std::thread thread_;  // last: starts once the members above exist
  };

  std::int64_t User0Requests() {
    return Scalar("SELECT COALESCE(SUM(requests), 0) FROM usage_rollups WHERE user_id = 'user-0'");
  }
};

// A part committed after a compaction's snapshot is neither taken nor lost, even when that
// compaction rewrites the folded row of the same key: the next round folds it.
TEST_P(UsagePostgresTest, APartCommittedDuringACompactionIsFoldedByTheNext) {
  WriteAndFold();
  const std::int64_t base = User0Requests();
  ASSERT_TRUE(
      datastore_->ReadWriteTx([](storage::ReadWriteTx& tx) { return InsertPart(tx, 3); }).ok());
  HeldTransaction writer(*datastore_, [](storage::ReadWriteTx& tx) { return InsertPart(tx, 7); });
  ASSERT_TRUE(writer.ran().ok()) << writer.ran();
  absl::StatusOr<std::int64_t> folded = ledger_->CompactRollups();  // the key's row is rewritten
  writer.Commit();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(*folded, 1);  // the committed part only
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups WHERE part <> 0"), 1);
  EXPECT_EQ(User0Requests(), base + 10);
  folded = ledger_->CompactRollups();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(*folded, 1);
  EXPECT_EQ(User0Requests(), base + 10);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups"), 3);
}

// While another replica holds the compaction lock, a compaction skips its round and
// touches nothing.
TEST_P(UsagePostgresTest, CompactionSkipsWhileAnotherReplicaCompacts) {
  WriteAndFold();
  ASSERT_TRUE(
      datastore_->ReadWriteTx([](storage::ReadWriteTx& tx) { return InsertPart(tx, 5); }).ok());
  HeldTransaction other(*datastore_, [](storage::ReadWriteTx& tx) {
    // The ledger's compaction lock (kCompactionLock in usage_ledger.cc).
    return tx
        .Query("SELECT 1 FROM (SELECT pg_advisory_xact_lock(1836454144)) AS l", {},
               {storage::SqlType::kInt64})
        .status();
  });
  ASSERT_TRUE(other.ran().ok()) << other.ran();
  absl::StatusOr<std::int64_t> skipped = ledger_->CompactRollups();
  other.Commit();
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  EXPECT_EQ(*skipped, 0);
  EXPECT_EQ(Scalar("SELECT COUNT(*) FROM usage_rollups WHERE part <> 0"), 1);
  absl::StatusOr<std::int64_t> folded = ledger_->CompactRollups();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(*folded, 1);
}

INSTANTIATE_TEST_SUITE_P(Engines, UsageTest, AllEngines(), NameGen());
INSTANTIATE_TEST_SUITE_P(Postgres, UsagePostgresTest, ::testing::Values(EngineParam{"postgres"}),
                         NameGen());

}  // namespace
}  // namespace modelvault::conformance
