// Budget conformance (server/budget_ledger.h, server/budget_service.h) on SQLite and
// PostgreSQL: calendar periods in a time zone (DST and month boundaries), exact
// reservations under concurrency, settlement by usage, release and expiry, period
// resets, threshold alerts raised once per period, and scope matching. Every
// time-dependent case runs on a fake clock; nothing sleeps.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <latch>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "google/rpc/error_details.pb.h"
#include "gtest/gtest.h"
#include "modelvault/v1/budgets.pb.h"
#include "modelvault/v1/types.pb.h"
#include "server/budget_ledger.h"
#include "server/budget_service.h"
#include "storage/resource_store.h"
#include "storage/status_details.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"

namespace modelvault::conformance {
namespace {

using ::google::protobuf::util::TimeUtil;
using ::modelvault::server::BudgetLedger;
using ::modelvault::server::BudgetPeriodBounds;
using ::modelvault::server::Charge;
using ::modelvault::server::PeriodOf;
using ::modelvault::storage::ChangeRecord;
using ::modelvault::storage::Datastore;
using ::modelvault::storage::DatastoreOptions;
using ::modelvault::storage::MutationContext;
using ::modelvault::storage::MutationResult;
using ::modelvault::storage::ReadWriteTx;
using ::modelvault::storage::ResourceStore;
using ::modelvault::storage::SqlCell;
using ::modelvault::storage::SqlRow;
using ::modelvault::storage::SqlType;
using ::modelvault::v1::Budget;
using ::modelvault::v1::BudgetAlert;
using ::modelvault::v1::Reservation;
using ::modelvault::v1::UsageScopes;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kPageTokenKey[] = "conformance-page-token-key";
constexpr char kNewYork[] = "America/New_York";
constexpr char kModel[] = "providers/openai/models/gpt-4o";
constexpr char kProvider[] = "providers/openai";

absl::TimeZone Zone(const char* name) {
  absl::TimeZone zone;
  EXPECT_TRUE(absl::LoadTimeZone(name, &zone)) << name;
  return zone;
}

// A local civil time in New York.
absl::Time NewYork(int y, int m, int d, int hh = 0, int mm = 0) {
  return absl::FromCivil(absl::CivilSecond(y, m, d, hh, mm, 0), Zone(kNewYork));
}

absl::Time Utc(int y, int m, int d, int hh = 0, int mm = 0) {
  return absl::FromCivil(absl::CivilSecond(y, m, d, hh, mm, 0), absl::UTCTimeZone());
}

absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixMicros(TimeUtil::TimestampToMicroseconds(t));
}

// A clock the test moves by hand; read from any thread.
class FakeClock {
 public:
  explicit FakeClock(absl::Time t) : micros_(absl::ToUnixMicros(t)) {}
  absl::Time Now() const { return absl::FromUnixMicros(micros_.load()); }
  void Set(absl::Time t) { micros_.store(absl::ToUnixMicros(t)); }
  void Advance(absl::Duration d) { micros_.fetch_add(absl::ToInt64Microseconds(d)); }

 private:
  std::atomic<std::int64_t> micros_;
};

Budget MakeBudget(const std::string& id, v1::BudgetScope scope, const std::string& value,
                  v1::BudgetPeriod period, std::int64_t limit,
                  const std::vector<int>& thresholds = {}, const std::string& zone = "") {
  Budget b;
  b.set_name(absl::StrCat("budgets/", id));
  b.set_display_name(id);
  b.set_scope(scope);
  b.set_scope_value(value);
  b.set_period(period);
  b.set_limit_nanos(limit);
  b.set_time_zone(zone);
  for (int t : thresholds) b.add_alert_thresholds_percent(t);
  return b;
}

Charge MakeCharge(absl::Time time, std::int64_t cost, const std::string& user = "u1",
                  const std::string& reservation = "") {
  Charge c;
  c.time = time;
  c.user = user;
  c.access_key = "accessKeys/k1";
  c.provider = kProvider;
  c.model = kModel;
  c.reservation = reservation;
  c.cost_nanos = cost;
  return c;
}

UsageScopes Scopes(const std::string& user = "u1") {
  UsageScopes s;
  s.set_user(user);
  s.set_access_key("accessKeys/k1");
  s.set_provider(kProvider);
  s.set_model(kModel);
  return s;
}

// The ErrorInfo metadata of a status.
std::map<std::string, std::string> ErrorMetadata(const absl::Status& status) {
  std::map<std::string, std::string> out;
  auto payload = status.GetPayload(kErrorInfoUrl);
  if (!payload.has_value()) return out;
  v1::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) return out;
  for (const auto& [k, v] : info.metadata()) out[k] = v;
  return out;
}

// The fields named by the BadRequest detail of a status.
std::vector<std::string> ViolatedFields(const absl::Status& status) {
  std::vector<std::string> out;
  auto payload = status.GetPayload(kBadRequestUrl);
  if (!payload.has_value()) return out;
  google::rpc::BadRequest detail;
  if (!detail.ParseFromString(std::string(*payload))) return out;
  for (const auto& v : detail.field_violations()) out.push_back(v.field());
  return out;
}

// --- PeriodOf (no database) ----------------------------------------------------------------

void ExpectPeriod(const Budget& budget, absl::Time t, absl::Time start, absl::Time end) {
  absl::StatusOr<BudgetPeriodBounds> p = PeriodOf(budget, t);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->start, start) << "at " << t;
  EXPECT_EQ(p->end, end) << "at " << t;
  EXPECT_EQ(p->key, absl::ToUnixMicros(start));
}

TEST(BudgetPeriodTest, DailyInNewYorkAcrossDst) {
  const Budget daily =
      MakeBudget("d", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1, {}, kNewYork);
  // An ordinary day: midnight EST is 05:00Z.
  ExpectPeriod(daily, NewYork(2024, 11, 20, 12), Utc(2024, 11, 20, 5), Utc(2024, 11, 21, 5));
  // 2024-03-10, clocks jump 02:00 → 03:00: a 23-hour day from 05:00Z (EST) to 04:00Z (EDT).
  ExpectPeriod(daily, NewYork(2024, 3, 10, 12), Utc(2024, 3, 10, 5), Utc(2024, 3, 11, 4));
  EXPECT_EQ(Utc(2024, 3, 11, 4) - Utc(2024, 3, 10, 5), absl::Hours(23));
  // 2024-11-03, clocks fall back 02:00 → 01:00: a 25-hour day; 01:30 happens twice and
  // both belong to it.
  ExpectPeriod(daily, Utc(2024, 11, 3, 5, 30), Utc(2024, 11, 3, 4), Utc(2024, 11, 4, 5));
  ExpectPeriod(daily, Utc(2024, 11, 3, 6, 30), Utc(2024, 11, 3, 4), Utc(2024, 11, 4, 5));
  // Boundaries: the start belongs to the period, the end to the next.
  ExpectPeriod(daily, Utc(2024, 11, 20, 5), Utc(2024, 11, 20, 5), Utc(2024, 11, 21, 5));
  ExpectPeriod(daily, Utc(2024, 11, 20, 5) - absl::Microseconds(1), Utc(2024, 11, 19, 5),
               Utc(2024, 11, 20, 5));
  // The same instant in UTC is another day.
  const Budget utc = MakeBudget("u", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1);
  ExpectPeriod(utc, Utc(2024, 11, 20, 3), Utc(2024, 11, 20), Utc(2024, 11, 21));
  ExpectPeriod(daily, Utc(2024, 11, 20, 3), Utc(2024, 11, 19, 5), Utc(2024, 11, 20, 5));
}

TEST(BudgetPeriodTest, WeeklyStartsMondayInNewYork) {
  const Budget weekly =
      MakeBudget("w", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_WEEKLY, 1, {}, kNewYork);
  // Sunday 2024-03-10 (the DST day) is in the week of Monday 2024-03-04 (EST), which ends
  // Monday 2024-03-11 00:00 EDT: one hour short of 7 days.
  ExpectPeriod(weekly, NewYork(2024, 3, 10, 23, 59), Utc(2024, 3, 4, 5), Utc(2024, 3, 11, 4));
  EXPECT_EQ(Utc(2024, 3, 11, 4) - Utc(2024, 3, 4, 5), absl::Hours(7 * 24 - 1));
  // Monday at midnight starts a week.
  ExpectPeriod(weekly, NewYork(2024, 3, 11), Utc(2024, 3, 11, 4), Utc(2024, 3, 18, 4));
  // Wednesday 2024-11-20 → Monday 2024-11-18.
  ExpectPeriod(weekly, NewYork(2024, 11, 20, 12), Utc(2024, 11, 18, 5), Utc(2024, 11, 25, 5));
  // A week across a year boundary: Wednesday 2025-01-01 → Monday 2024-12-30.
  ExpectPeriod(weekly, NewYork(2025, 1, 1, 9), Utc(2024, 12, 30, 5), Utc(2025, 1, 6, 5));
}

TEST(BudgetPeriodTest, MonthlyInNewYorkAcrossMonthAndDst) {
  const Budget monthly =
      MakeBudget("m", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_MONTHLY, 1, {}, kNewYork);
  // 2024-03-31 23:30 EDT is already April in UTC, still March in New York; March starts
  // in EST and ends in EDT.
  const absl::Time late_march = NewYork(2024, 3, 31, 23, 30);
  EXPECT_EQ(late_march, Utc(2024, 4, 1, 3, 30));
  ExpectPeriod(monthly, late_march, Utc(2024, 3, 1, 5), Utc(2024, 4, 1, 4));
  // April 1st at local midnight starts April.
  ExpectPeriod(monthly, NewYork(2024, 4, 1), Utc(2024, 4, 1, 4), Utc(2024, 5, 1, 4));
  // February of a leap year, and December into January.
  ExpectPeriod(monthly, NewYork(2024, 2, 29, 12), Utc(2024, 2, 1, 5), Utc(2024, 3, 1, 5));
  ExpectPeriod(monthly, NewYork(2024, 12, 31, 23), Utc(2024, 12, 1, 5), Utc(2025, 1, 1, 5));
}

TEST(BudgetPeriodTest, NoneSkippedMidnightAndErrors) {
  const Budget none = MakeBudget("n", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_NONE, 1);
  absl::StatusOr<BudgetPeriodBounds> p = PeriodOf(none, Utc(2024, 11, 20));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->key, 0);
  EXPECT_EQ(p->start, absl::InfinitePast());
  EXPECT_EQ(p->end, absl::InfiniteFuture());
  // São Paulo skipped 2018-11-04 00:00 (→ 01:00 -02): that day starts at the transition.
  const Budget sao = MakeBudget("s", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1, {},
                                "America/Sao_Paulo");
  ExpectPeriod(sao, Utc(2018, 11, 4, 12), Utc(2018, 11, 4, 3), Utc(2018, 11, 5, 2));
  ExpectPeriod(sao, Utc(2018, 11, 4, 2, 59), Utc(2018, 11, 3, 3), Utc(2018, 11, 4, 3));

  Budget bad_zone = none;
  bad_zone.set_time_zone("Mars/Olympus_Mons");
  EXPECT_EQ(PeriodOf(bad_zone, Utc(2024, 1, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  Budget no_period = none;
  no_period.set_period(v1::BUDGET_PERIOD_UNSPECIFIED);
  EXPECT_EQ(PeriodOf(no_period, Utc(2024, 1, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- CheckBudget (no database) -------------------------------------------------------------

std::vector<std::string> FieldsOf(const std::vector<FieldViolation>& violations) {
  std::vector<std::string> fields;
  fields.reserve(violations.size());
  for (const FieldViolation& v : violations) fields.push_back(v.field);
  return fields;
}

TEST(CheckBudgetTest, NamesEachFieldAtFault) {
  std::vector<FieldViolation> out;
  Budget ok = MakeBudget("ok", v1::BUDGET_SCOPE_MODEL, kModel, v1::BUDGET_PERIOD_MONTHLY, 1,
                         {50, 80, 100}, kNewYork);
  server::CheckBudget(ok, "budget.", out);
  EXPECT_THAT(out, IsEmpty());

  Budget bad = MakeBudget("bad", v1::BUDGET_SCOPE_GLOBAL, "someone", v1::BUDGET_PERIOD_DAILY, 1,
                          {50, 0, 50, 1001, 1000}, "Nowhere/City");
  server::CheckBudget(bad, "budget.", out);
  std::vector<std::string> fields = FieldsOf(out);
  EXPECT_THAT(
      fields,
      ElementsAre("budget.scope_value", "budget.time_zone", "budget.alert_thresholds_percent[1]",
                  "budget.alert_thresholds_percent[2]", "budget.alert_thresholds_percent[3]"));

  out.clear();
  server::CheckBudget(MakeBudget("u", v1::BUDGET_SCOPE_USER, "", v1::BUDGET_PERIOD_DAILY, 1),
                      "budget.", out);
  ASSERT_EQ(out.size(), 1U);
  EXPECT_EQ(out[0].field, "budget.scope_value");
  EXPECT_THAT(out[0].description, HasSubstr("BUDGET_SCOPE_USER"));

  out.clear();
  server::CheckBudget(
      MakeBudget("p", v1::BUDGET_SCOPE_PROVIDER, "openai", v1::BUDGET_PERIOD_DAILY, 1), "budget.",
      out);
  server::CheckBudget(MakeBudget("k", v1::BUDGET_SCOPE_ACCESS_KEY, "accessKeys/k1",
                                 v1::BUDGET_PERIOD_DAILY, 1, {}, "localtime"),
                      "budget.", out);
  server::CheckBudget(MakeBudget("z", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1, {},
                                 "/usr/share/zoneinfo/UTC"),
                      "budget.", out);
  fields = FieldsOf(out);
  EXPECT_THAT(fields, ElementsAre("budget.scope_value", "budget.time_zone", "budget.time_zone"));
}

// --- the ledger on both engines ------------------------------------------------------------

class BudgetsTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    DatastoreOptions options;
    options.pool_size = 12;  // the concurrency cases run 8 callers
    options.max_retries = 20;
    absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated(options);
    ASSERT_TRUE(ds.ok()) << ds.status();
    ds_ = *std::move(ds);
    store_ = std::make_unique<ResourceStore>(*ds_, kPageTokenKey);
    ledger_ = std::make_unique<BudgetLedger>([this] { return clock_.Now(); });
  }

  MutationContext Ctx() const {
    MutationContext ctx;
    ctx.principal = "user:conformance";
    ctx.now = clock_.Now();
    return ctx;
  }

  void Create(const Budget& budget) {
    absl::StatusOr<MutationResult> created = store_->Create(Ctx(), budget);
    ASSERT_TRUE(created.ok()) << created.status() << " creating " << budget.name();
  }

  // Applies charges in one transaction (as the usage ingest does); the alerts raised.
  std::vector<ChangeRecord> Apply(const std::vector<Charge>& charges,
                                  BudgetLedger* ledger = nullptr) {
    std::vector<ChangeRecord> raised;
    absl::Status s = ds_->ReadWriteTx([&](ReadWriteTx& tx) {
      raised.clear();
      return (ledger != nullptr ? ledger : ledger_.get())->Apply(tx, charges, &raised);
    });
    EXPECT_TRUE(s.ok()) << s;
    return raised;
  }

  absl::StatusOr<Reservation> Reserve(std::int64_t estimate, absl::Duration ttl = absl::Minutes(5),
                                      const UsageScopes& scopes = Scopes(),
                                      const MutationContext* idem = nullptr) {
    return ledger_->Reserve(*ds_, scopes, estimate, ttl, idem);
  }

  // The current period of `name` as GetBudget shows it.
  v1::BudgetPeriodState Period(const std::string& name) {
    absl::StatusOr<std::unique_ptr<google::protobuf::Message>> got =
        store_->Get(Budget::descriptor(), name);
    EXPECT_TRUE(got.ok()) << got.status();
    if (!got.ok()) return {};
    Budget budget = static_cast<const Budget&>(**got);
    absl::Status s = ds_->Read(
        [&](storage::Reader& reader) { return ledger_->FillCurrentPeriod(reader, budget); });
    EXPECT_TRUE(s.ok()) << s;
    return budget.current_period();
  }

  std::vector<SqlRow> Rows(const std::string& sql, const std::vector<SqlCell>& params,
                           const std::vector<SqlType>& types) {
    std::vector<SqlRow> rows;
    absl::Status s = ds_->Read([&](storage::Reader& reader) -> absl::Status {
      absl::StatusOr<std::vector<SqlRow>> r = reader.Query(sql, params, types);
      if (!r.ok()) return r.status();
      rows = *std::move(r);
      return absl::OkStatus();
    });
    EXPECT_TRUE(s.ok()) << s << " in " << sql;
    return rows;
  }

  std::string State(const std::string& reservation) {
    std::vector<SqlRow> rows = Rows("SELECT state FROM reservations WHERE name = :p0",
                                    {SqlCell(reservation)}, {SqlType::kText});
    return rows.empty() ? "" : storage::CellText(rows[0][0]);
  }

  std::int64_t SettledCost(const std::string& reservation) {
    std::vector<SqlRow> rows = Rows("SELECT settled_cost_nanos FROM reservations WHERE name = :p0",
                                    {SqlCell(reservation)}, {SqlType::kInt64});
    return rows.empty() ? -1 : storage::CellInt(rows[0][0]);
  }

  // Thresholds of the stored alerts of `budget`, in name order.
  std::vector<std::string> AlertNames(const std::string& budget) {
    std::vector<std::string> out;
    for (const SqlRow& row : Rows("SELECT name FROM budget_alerts WHERE parent = :p0 ORDER BY name",
                                  {SqlCell(budget)}, {SqlType::kText})) {
      out.push_back(storage::CellText(row[0]));
    }
    return out;
  }

  static std::vector<int> Thresholds(const std::vector<ChangeRecord>& raised) {
    std::vector<int> out;
    for (const ChangeRecord& change : raised) {
      BudgetAlert alert;
      EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(change.resource_json, &alert).ok())
          << change.resource_json;
      out.push_back(alert.threshold_percent());
    }
    return out;
  }

  // 2024-11-20 12:00 in New York (a Wednesday, EST).
  FakeClock clock_{NewYork(2024, 11, 20, 12)};
  std::unique_ptr<Datastore> ds_;
  std::unique_ptr<ResourceStore> store_;
  std::unique_ptr<BudgetLedger> ledger_;
};

// 8 threads reserve against one budget at once, 90% of it already spent: exactly the 10
// holds of L/100 that fit are granted, and the holds add up to L/10; nothing is lost or
// double-counted.
TEST_P(BudgetsTest, ConcurrentReservationsAreExact) {
  constexpr std::int64_t kLimit = 1'000'000'000;  // $1
  constexpr int kThreads = 8;
  constexpr int kPerThread = 20;
  Create(MakeBudget("team", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, kLimit));
  // 90% is already spent: 10 holds of L/100 fit, the other 150 attempts are refused.
  Apply({MakeCharge(clock_.Now(), kLimit / 10 * 9)});

  std::atomic<int> granted{0};
  std::atomic<int> refused{0};
  std::atomic<int> failed{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      start.arrive_and_wait();
      for (int i = 0; i < kPerThread; ++i) {
        absl::StatusOr<Reservation> r = Reserve(kLimit / 100);
        if (r.ok()) {
          granted.fetch_add(1);
        } else if (r.status().code() == absl::StatusCode::kResourceExhausted &&
                   ErrorReason(r.status()) == "BUDGET_EXCEEDED") {
          refused.fetch_add(1);
        } else {
          failed.fetch_add(1);
          ADD_FAILURE() << r.status();
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(granted.load(), 10);
  EXPECT_EQ(refused.load(), kThreads * kPerThread - 10);
  const v1::BudgetPeriodState period = Period("budgets/team");
  EXPECT_EQ(period.spent_nanos(), kLimit / 10 * 9);
  EXPECT_EQ(period.held_nanos(), kLimit / 10);
  auto holds = QueryInt("SELECT COALESCE(SUM(amount_nanos), 0) FROM reservation_holds");
  ASSERT_TRUE(holds.ok()) << holds.status();
  EXPECT_EQ(*holds, kLimit / 10);
  auto count = QueryInt("SELECT COUNT(*) FROM reservations WHERE state = 'STATE_HELD'");
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 10);
}

TEST_P(BudgetsTest, ConcurrentEqualReservationsGrantExactlyOneHundred) {
  constexpr std::int64_t kLimit = 1'000'000'000;
  constexpr int kThreads = 8;
  constexpr int kPerThread = 16;  // 128 attempts for 100 places
  Create(MakeBudget("team", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_MONTHLY, kLimit, {},
                    kNewYork));
  std::atomic<int> granted{0};
  std::atomic<int> refused{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      start.arrive_and_wait();
      for (int i = 0; i < kPerThread; ++i) {
        absl::StatusOr<Reservation> r = Reserve(kLimit / 100);
        if (r.ok()) {
          granted.fetch_add(1);
        } else {
          EXPECT_EQ(ErrorReason(r.status()), "BUDGET_EXCEEDED") << r.status();
          refused.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(granted.load(), 100);
  EXPECT_EQ(refused.load(), kThreads * kPerThread - 100);
  const v1::BudgetPeriodState period = Period("budgets/team");
  EXPECT_EQ(period.held_nanos(), kLimit);
  EXPECT_EQ(period.spent_nanos(), 0);
}

// Random estimates: the holds equal the sum of what was granted, never pass the limit, and
// every refusal was right (holds only grow here, so a refused estimate cannot fit even
// now).
TEST_P(BudgetsTest, ConcurrentRandomReservationsNeverPassTheLimit) {
  constexpr std::int64_t kLimit = 5'000'000;
  constexpr int kThreads = 8;
  constexpr int kPerThread = 25;
  Create(MakeBudget("team", v1::BUDGET_SCOPE_USER, "u1", v1::BUDGET_PERIOD_WEEKLY, kLimit, {},
                    kNewYork));
  std::mutex mu;
  std::vector<std::int64_t> granted;
  std::vector<std::int64_t> refused;
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(t) * 7919 + 1);
      std::uniform_int_distribution<std::int64_t> estimate(0, kLimit / 40);
      start.arrive_and_wait();
      for (int i = 0; i < kPerThread; ++i) {
        const std::int64_t e = estimate(rng);
        absl::StatusOr<Reservation> r = Reserve(e);
        std::lock_guard lock(mu);
        if (r.ok()) {
          granted.push_back(e);
        } else {
          EXPECT_EQ(ErrorReason(r.status()), "BUDGET_EXCEEDED") << r.status();
          refused.push_back(e);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::int64_t sum = 0;
  for (std::int64_t e : granted) sum += e;
  const v1::BudgetPeriodState period = Period("budgets/team");
  EXPECT_EQ(period.held_nanos(), sum);
  EXPECT_LE(period.held_nanos() + period.spent_nanos(), kLimit);
  EXPECT_FALSE(refused.empty());  // 200 draws averaging L/80 cannot all fit
  for (std::int64_t e : refused) EXPECT_GT(sum + e, kLimit) << "refused " << e;
}

TEST_P(BudgetsTest, RefusalNamesTheBudgetAndWritesNothing) {
  Create(MakeBudget("a-global", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_NONE, 10'000));
  Create(MakeBudget("b-user", v1::BUDGET_SCOPE_USER, "u1", v1::BUDGET_PERIOD_DAILY, 1'000));
  Apply({MakeCharge(clock_.Now(), 700)});
  absl::StatusOr<Reservation> held = Reserve(200);
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_THAT(held->budgets(), ElementsAre("budgets/a-global", "budgets/b-user"));
  absl::StatusOr<Reservation> refused = Reserve(101);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrorReason(refused.status()), "BUDGET_EXCEEDED");
  EXPECT_EQ(ErrorMetadata(refused.status()),
            (std::map<std::string, std::string>{{"budget", "budgets/b-user"},
                                                {"held_nanos", "200"},
                                                {"limit_nanos", "1000"},
                                                {"spent_nanos", "700"}}));
  // Nothing written: the global budget does not hold the refused estimate.
  EXPECT_EQ(Period("budgets/a-global").held_nanos(), 200);
  auto count = QueryInt("SELECT COUNT(*) FROM reservations");
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 1);
  // Exactly up to the limit is allowed; a zero estimate is too.
  EXPECT_TRUE(Reserve(100).ok());
  EXPECT_TRUE(Reserve(0).ok());
  EXPECT_EQ(Reserve(1).status().code(), absl::StatusCode::kResourceExhausted);
  // Another user only meets the global budget.
  EXPECT_TRUE(Reserve(5'000, absl::Minutes(5), Scopes("u2")).ok());
  EXPECT_EQ(Period("budgets/a-global").held_nanos(), 5'300);
}

TEST_P(BudgetsTest, UsageSettlesAReservationOnce) {
  Create(MakeBudget("team", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1'000));
  absl::StatusOr<Reservation> r = Reserve(300);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->state(), Reservation::STATE_HELD);
  EXPECT_EQ(r->expire_time(), google::protobuf::util::TimeUtil::MicrosecondsToTimestamp(
                                  absl::ToUnixMicros(clock_.Now() + absl::Minutes(5))));
  EXPECT_EQ(Period("budgets/team").held_nanos(), 300);

  Apply({MakeCharge(clock_.Now(), 120, "u1", r->name())});
  v1::BudgetPeriodState period = Period("budgets/team");
  EXPECT_EQ(period.held_nanos(), 0);
  EXPECT_EQ(period.spent_nanos(), 120);
  EXPECT_EQ(State(r->name()), "STATE_SETTLED");
  EXPECT_EQ(SettledCost(r->name()), 120);

  // A second record naming it spends its own cost but settles nothing again.
  Apply({MakeCharge(clock_.Now(), 50, "u1", r->name())});
  period = Period("budgets/team");
  EXPECT_EQ(period.held_nanos(), 0);
  EXPECT_EQ(period.spent_nanos(), 170);
  EXPECT_EQ(SettledCost(r->name()), 120);

  // Neither can it be released now.
  absl::StatusOr<Reservation> released = ledger_->Release(*ds_, r->name());
  EXPECT_EQ(released.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorReason(released.status()), "RESERVATION_NOT_HELD");

  // Settling one reservation among others in one batch releases only its holds; unknown
  // reservations are ignored.
  absl::StatusOr<Reservation> a = Reserve(100);
  absl::StatusOr<Reservation> b = Reserve(200);
  ASSERT_TRUE(a.ok() && b.ok());
  Apply({MakeCharge(clock_.Now(), 10, "u1", b->name()),
         MakeCharge(clock_.Now(), 5, "u1", "reservations/unknown")});
  period = Period("budgets/team");
  EXPECT_EQ(period.held_nanos(), 100);
  EXPECT_EQ(period.spent_nanos(), 185);
  EXPECT_EQ(State(a->name()), "STATE_HELD");
  EXPECT_EQ(State(b->name()), "STATE_SETTLED");
}

TEST_P(BudgetsTest, ReleaseAndExpiryFreeHolds) {
  Create(MakeBudget("team", v1::BUDGET_SCOPE_MODEL, kModel, v1::BUDGET_PERIOD_NONE, 1'000));
  absl::StatusOr<Reservation> a = Reserve(400, absl::Minutes(1));
  absl::StatusOr<Reservation> b = Reserve(300, absl::Minutes(10));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(Period("budgets/team").held_nanos(), 700);

  absl::StatusOr<Reservation> released = ledger_->Release(*ds_, a->name());
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_EQ(released->state(), Reservation::STATE_RELEASED);
  EXPECT_EQ(released->estimated_cost_nanos(), 400);
  EXPECT_THAT(released->budgets(), ElementsAre("budgets/team"));
  EXPECT_EQ(released->scopes().model(), kModel);
  EXPECT_EQ(Period("budgets/team").held_nanos(), 300);
  EXPECT_EQ(ledger_->Release(*ds_, a->name()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ledger_->Release(*ds_, "reservations/nope").status().code(),
            absl::StatusCode::kNotFound);

  // b expires: reads stop counting it at once, and the next reservation on the budget
  // releases it for good.
  clock_.Advance(absl::Minutes(10));
  EXPECT_EQ(Period("budgets/team").held_nanos(), 0);
  EXPECT_EQ(State(b->name()), "STATE_HELD");
  absl::StatusOr<Reservation> all = Reserve(1'000);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(State(b->name()), "STATE_EXPIRED");
  EXPECT_EQ(Period("budgets/team").held_nanos(), 1'000);
  auto held = QueryInt("SELECT held_nanos FROM budget_spend");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(*held, 1'000);

  // The sweeper expires the rest; usage naming an expired reservation only spends.
  clock_.Advance(absl::Minutes(5));
  absl::StatusOr<int> expired = ledger_->ExpireReservations(*ds_);
  ASSERT_TRUE(expired.ok()) << expired.status();
  EXPECT_EQ(*expired, 1);
  EXPECT_EQ(State(all->name()), "STATE_EXPIRED");
  held = QueryInt("SELECT held_nanos FROM budget_spend");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(*held, 0);
  expired = ledger_->ExpireReservations(*ds_);
  ASSERT_TRUE(expired.ok());
  EXPECT_EQ(*expired, 0);
  Apply({MakeCharge(clock_.Now(), 30, "u1", all->name())});
  EXPECT_EQ(State(all->name()), "STATE_EXPIRED");
  EXPECT_EQ(Period("budgets/team").spent_nanos(), 30);
  EXPECT_EQ(Period("budgets/team").held_nanos(), 0);
}

TEST_P(BudgetsTest, DailyPeriodStartsAgainAtLocalMidnight) {
  Create(MakeBudget("daily", v1::BUDGET_SCOPE_USER, "u1", v1::BUDGET_PERIOD_DAILY, 1'000, {},
                    kNewYork));
  Apply({MakeCharge(NewYork(2024, 11, 20, 9), 900)});
  EXPECT_EQ(Reserve(200).status().code(), absl::StatusCode::kResourceExhausted);
  v1::BudgetPeriodState period = Period("budgets/daily");
  EXPECT_EQ(FromProto(period.start_time()), NewYork(2024, 11, 20));
  EXPECT_EQ(FromProto(period.end_time()), NewYork(2024, 11, 21));
  EXPECT_EQ(period.spent_nanos(), 900);

  // 23:59 local is still the same day (04:59Z the next day in UTC).
  clock_.Set(NewYork(2024, 11, 20, 23, 59));
  EXPECT_EQ(Reserve(200).status().code(), absl::StatusCode::kResourceExhausted);

  // Local midnight: a new period; yesterday's spend does not count.
  clock_.Set(NewYork(2024, 11, 21));
  absl::StatusOr<Reservation> r = Reserve(200);
  ASSERT_TRUE(r.ok()) << r.status();
  period = Period("budgets/daily");
  EXPECT_EQ(FromProto(period.start_time()), NewYork(2024, 11, 21));
  EXPECT_EQ(period.spent_nanos(), 0);
  EXPECT_EQ(period.held_nanos(), 200);

  // Late usage of yesterday goes to yesterday; its settlement releases today's hold.
  Apply({MakeCharge(NewYork(2024, 11, 20, 22), 50, "u1", r->name())});
  period = Period("budgets/daily");
  EXPECT_EQ(period.spent_nanos(), 0);
  EXPECT_EQ(period.held_nanos(), 0);
  auto yesterday =
      QueryInt(absl::StrCat("SELECT spent_nanos FROM budget_spend WHERE "
                            "period_start = ",
                            absl::ToUnixMicros(NewYork(2024, 11, 20))));
  ASSERT_TRUE(yesterday.ok()) << yesterday.status();
  EXPECT_EQ(*yesterday, 950);
}

TEST_P(BudgetsTest, AlertsOncePerThresholdPerPeriod) {
  Create(MakeBudget("alerting", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1'000,
                    {100, 50, 80}, kNewYork));
  const absl::Time day1 = NewYork(2024, 11, 20, 12);
  // Exactly half: 50 is reached.
  std::vector<ChangeRecord> raised = Apply({MakeCharge(day1, 500)});
  EXPECT_THAT(Thresholds(raised), ElementsAre(50));
  ASSERT_EQ(raised.size(), 1U);
  EXPECT_EQ(raised[0].resource_type, "modelvault.dev/BudgetAlert");
  EXPECT_EQ(raised[0].change_type, "CREATED");
  EXPECT_GT(raised[0].seq, 0);
  BudgetAlert alert;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(raised[0].resource_json, &alert).ok());
  EXPECT_EQ(alert.name(), raised[0].resource_name);
  EXPECT_EQ(alert.name(), "budgets/alerting/alerts/p20241120t050000z-50");
  EXPECT_EQ(alert.spent_nanos(), 500);
  EXPECT_EQ(alert.limit_nanos(), 1'000);
  EXPECT_EQ(FromProto(alert.period_start_time()), NewYork(2024, 11, 20));
  EXPECT_EQ(FromProto(alert.create_time()), clock_.Now());
  EXPECT_EQ(alert.etag(), storage::EtagOf(1));
  // The stored row reads back as the same resource (as ListAlerts serves it).
  absl::StatusOr<std::unique_ptr<google::protobuf::Message>> stored =
      store_->Get(BudgetAlert::descriptor(), alert.name());
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_THAT(static_cast<const BudgetAlert&>(**stored), EqualsProto(alert));

  EXPECT_THAT(Thresholds(Apply({MakeCharge(day1, 100)})), IsEmpty());         // 600
  EXPECT_THAT(Thresholds(Apply({MakeCharge(day1, 250)})), ElementsAre(80));   // 850
  EXPECT_THAT(Thresholds(Apply({MakeCharge(day1, 100)})), IsEmpty());         // 950
  EXPECT_THAT(Thresholds(Apply({MakeCharge(day1, 100)})), ElementsAre(100));  // 1050
  EXPECT_THAT(Thresholds(Apply({MakeCharge(day1, 5'000)})), IsEmpty());       // 6050
  EXPECT_EQ(AlertNames("budgets/alerting").size(), 3U);

  // A transaction that rolls back raises nothing for good: the retry raises it.
  const absl::Time day2 = NewYork(2024, 11, 21, 8);
  absl::Status rolled_back = ds_->ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
    std::vector<ChangeRecord> ignored;
    if (absl::Status s = ledger_->Apply(tx, {MakeCharge(day2, 600)}, &ignored); !s.ok()) return s;
    EXPECT_THAT(Thresholds(ignored), ElementsAre(50));
    return absl::CancelledError("the batch failed after the ledger");
  });
  EXPECT_EQ(rolled_back.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(AlertNames("budgets/alerting").size(), 3U);
  // A new period raises again; one batch crossing two thresholds raises both.
  EXPECT_THAT(Thresholds(Apply({MakeCharge(day2, 600), MakeCharge(day2, 250)})),
              ElementsAre(50, 80));
  EXPECT_THAT(AlertNames("budgets/alerting"),
              ElementsAre("budgets/alerting/alerts/p20241120t050000z-100",
                          "budgets/alerting/alerts/p20241120t050000z-50",
                          "budgets/alerting/alerts/p20241120t050000z-80",
                          "budgets/alerting/alerts/p20241121t050000z-50",
                          "budgets/alerting/alerts/p20241121t050000z-80"));
  // Every raised alert is in the change feed, once.
  auto feed = QueryInt(
      "SELECT COUNT(*) FROM changes WHERE resource_type = 'modelvault.dev/BudgetAlert' AND "
      "change_type = 'CREATED'");
  ASSERT_TRUE(feed.ok()) << feed.status();
  EXPECT_EQ(*feed, 5);

  // A lower limit makes 100% crossed again in the same period: not raised twice.
  Budget lower = MakeBudget("alerting", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 900,
                            {100, 50, 80}, kNewYork);
  absl::StatusOr<MutationResult> updated = store_->Update(Ctx(), lower, {"limit_nanos"});
  ASSERT_TRUE(updated.ok()) << updated.status();
  EXPECT_THAT(Thresholds(Apply({MakeCharge(day1, 1)})), IsEmpty());
}

// Two replicas (ledgers) apply concurrently: each threshold is raised exactly once.
TEST_P(BudgetsTest, ConcurrentAppliesRaiseEachThresholdOnce) {
  Create(MakeBudget("shared", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_MONTHLY, 4'000,
                    {25, 50, 75, 100}));
  BudgetLedger other([this] { return clock_.Now(); });
  constexpr int kThreads = 8;
  constexpr int kPerThread = 10;
  std::mutex mu;
  std::vector<int> all;
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int i = 0; i < kPerThread; ++i) {
        std::vector<int> got =
            Thresholds(Apply({MakeCharge(clock_.Now(), 50)}, t % 2 == 0 ? nullptr : &other));
        std::lock_guard lock(mu);
        all.insert(all.end(), got.begin(), got.end());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::sort(all.begin(), all.end());
  EXPECT_THAT(all, ElementsAre(25, 50, 75, 100));
  EXPECT_EQ(Period("budgets/shared").spent_nanos(), 4'000);
  EXPECT_EQ(AlertNames("budgets/shared").size(), 4U);
}

TEST_P(BudgetsTest, ChargeSpendsOnEveryMatchingBudget) {
  Create(MakeBudget("global", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_NONE, 1'000'000));
  Create(MakeBudget("user-u1", v1::BUDGET_SCOPE_USER, "u1", v1::BUDGET_PERIOD_DAILY, 1'000'000));
  Create(MakeBudget("model", v1::BUDGET_SCOPE_MODEL, kModel, v1::BUDGET_PERIOD_MONTHLY, 1'000'000,
                    {}, kNewYork));
  Create(MakeBudget("key", v1::BUDGET_SCOPE_ACCESS_KEY, "accessKeys/k1", v1::BUDGET_PERIOD_WEEKLY,
                    1'000'000));
  Create(MakeBudget("provider", v1::BUDGET_SCOPE_PROVIDER, kProvider, v1::BUDGET_PERIOD_DAILY,
                    1'000'000));
  Create(MakeBudget("user-u2", v1::BUDGET_SCOPE_USER, "u2", v1::BUDGET_PERIOD_DAILY, 1'000'000));
  Create(MakeBudget("other-model", v1::BUDGET_SCOPE_MODEL, "providers/openai/models/o3",
                    v1::BUDGET_PERIOD_DAILY, 1'000'000));
  Create(MakeBudget("other-provider", v1::BUDGET_SCOPE_PROVIDER, "providers/anthropic",
                    v1::BUDGET_PERIOD_DAILY, 1'000'000));

  Apply({MakeCharge(clock_.Now(), 77)});
  const std::map<std::string, std::int64_t> expected = {
      {"global", 77},   {"user-u1", 77}, {"model", 77},      {"key", 77},
      {"provider", 77}, {"user-u2", 0},  {"other-model", 0}, {"other-provider", 0}};
  for (const auto& [id, spent] : expected) {
    EXPECT_EQ(Period(absl::StrCat("budgets/", id)).spent_nanos(), spent) << id;
  }
  // A record without a user meets no USER budget.
  Charge anonymous = MakeCharge(clock_.Now(), 3, "");
  Apply({anonymous});
  EXPECT_EQ(Period("budgets/user-u1").spent_nanos(), 77);
  EXPECT_EQ(Period("budgets/global").spent_nanos(), 80);

  absl::StatusOr<Reservation> r = Reserve(10);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->budgets(), ElementsAre("budgets/global", "budgets/key", "budgets/model",
                                        "budgets/provider", "budgets/user-u1"));
  EXPECT_EQ(Period("budgets/other-model").held_nanos(), 0);
  EXPECT_EQ(Period("budgets/model").held_nanos(), 10);
}

TEST_P(BudgetsTest, RetriedReservationReturnsTheSameOne) {
  Create(MakeBudget("team", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1'000));
  MutationContext idem;
  idem.request_id = "reserve-1";
  idem.method = "modelvault.v1.ReserveBudgetRequest";
  idem.request_hash = "hash-a";
  absl::StatusOr<Reservation> first = Reserve(600, absl::Minutes(5), Scopes(), &idem);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<Reservation> again = Reserve(600, absl::Minutes(5), Scopes(), &idem);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_THAT(*again, EqualsProto(*first));
  EXPECT_EQ(Period("budgets/team").held_nanos(), 600);
  idem.request_hash = "hash-b";
  absl::StatusOr<Reservation> reused = Reserve(600, absl::Minutes(5), Scopes(), &idem);
  EXPECT_EQ(reused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorReason(reused.status()), "REQUEST_ID_REUSED");
  EXPECT_THAT(ViolatedFields(reused.status()), ElementsAre("request_id"));
  // A refused reservation is not remembered: after a release the same id succeeds.
  idem.request_id = "reserve-2";
  EXPECT_EQ(Reserve(600, absl::Minutes(5), Scopes(), &idem).status().code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(ledger_->Release(*ds_, first->name()).ok());
  EXPECT_TRUE(Reserve(600, absl::Minutes(5), Scopes(), &idem).ok());
}

TEST_P(BudgetsTest, SpendSaturatesInsteadOfOverflowing) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  Create(MakeBudget("huge", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_NONE,
                    1'000'000'000'000'000'000, {100}));
  std::vector<ChangeRecord> raised =
      Apply({MakeCharge(clock_.Now(), kMax - 10), MakeCharge(clock_.Now(), kMax - 10)});
  EXPECT_THAT(Thresholds(raised), ElementsAre(100));
  EXPECT_EQ(Period("budgets/huge").spent_nanos(), kMax);
  Apply({MakeCharge(clock_.Now(), kMax)});
  EXPECT_EQ(Period("budgets/huge").spent_nanos(), kMax);
  absl::StatusOr<Reservation> r = Reserve(kMax);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("18446744073709551614"));
  // Alerts of a budget without periods carry no period start.
  ASSERT_EQ(raised.size(), 1U);
  EXPECT_EQ(raised[0].resource_name, "budgets/huge/alerts/all-100");
  BudgetAlert alert;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(raised[0].resource_json, &alert).ok());
  EXPECT_FALSE(alert.has_period_start_time());
  // Negative costs are refused.
  absl::Status negative = ds_->ReadWriteTx([&](ReadWriteTx& tx) {
    std::vector<ChangeRecord> ignored;
    return ledger_->Apply(tx, {MakeCharge(clock_.Now(), -1)}, &ignored);
  });
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
}

// Deleting a budget takes its spend rows and holds with it (ON DELETE CASCADE); a
// reservation that held on it stays and can still be released.
TEST_P(BudgetsTest, DeletedBudgetTakesItsRowsAlong) {
  Create(MakeBudget("gone", v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1'000, {10}));
  Create(MakeBudget("kept", v1::BUDGET_SCOPE_USER, "u1", v1::BUDGET_PERIOD_DAILY, 1'000));
  absl::StatusOr<Reservation> r = Reserve(300);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(Thresholds(Apply({MakeCharge(clock_.Now(), 200)})), ElementsAre(10));
  // Through the datastore's own connections (SQLite enforces foreign keys per connection).
  ASSERT_TRUE(ds_->ReadWriteTx([](ReadWriteTx& tx) {
                   return tx.Exec("DELETE FROM budgets WHERE name = 'budgets/gone'", {}).status();
                 })
                  .ok());
  for (const char* table : {"budget_spend WHERE budget", "reservation_holds WHERE budget",
                            "budget_alerts WHERE parent"}) {
    auto rows = QueryInt(absl::StrCat("SELECT COUNT(*) FROM ", table, " = 'budgets/gone'"));
    ASSERT_TRUE(rows.ok()) << rows.status();
    EXPECT_EQ(*rows, 0) << table;
  }
  absl::StatusOr<Reservation> released = ledger_->Release(*ds_, r->name());
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_THAT(released->budgets(), ElementsAre("budgets/kept"));
  EXPECT_EQ(Period("budgets/kept").held_nanos(), 0);
  EXPECT_EQ(Period("budgets/kept").spent_nanos(), 200);
  // Usage keeps flowing to the remaining budget.
  Apply({MakeCharge(clock_.Now(), 5)});
  EXPECT_EQ(Period("budgets/kept").spent_nanos(), 205);
}

INSTANTIATE_TEST_SUITE_P(Engines, BudgetsTest, AllEngines(), NameGen());

}  // namespace
}  // namespace modelvault::conformance
