// BudgetService end to end: the real `modelvault` binary on a fresh, migrated and seeded
// SQLite or PostgreSQL database per test, driven through the generated stubs.
//
//   1. budgets over RPC: create, get and list with the current period, update with a mask
//      and etags, idempotent create, delete (with its alerts);
//   2. bad input: every error names the field at fault;
//   3. ReserveBudget / ReleaseReservation: holds, refusals naming the budget, the caller's
//      access key as the default scope, request_id retries;
//   4. 8 concurrent RPC reservers against one budget: exactly as many granted as fit;
//   5. usage recorded through UsageService spends on the budget, settles a reservation and
//      raises a threshold alert that ListAlerts lists and WatchAlerts delivers (also when
//      resuming from a cursor taken before it).
//
// Waits poll with deadlines; nothing asserts a duration.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <iostream>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "google/protobuf/util/time_util.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/budgets.grpc.pb.h"
#include "modelvault/v1/usage.grpc.pb.h"
#include "server/grpc_status.h"
#include "storage/status_details.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/status_checks.h"
#include "tests/e2e/usage_client.h"

namespace modelvault::e2e {
namespace {

using ::google::protobuf::util::TimeUtil;
using ::modelvault::conformance::EngineTest;
using ::modelvault::testing::Describe;
using ::modelvault::testing::ErrorMetadata;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::IsError;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::ServerProcess;
using ::modelvault::testing::UsageRecordOf;
using ::testing::ElementsAre;
using BudgetStub = v1::BudgetService::Stub;
using UsageStub = v1::UsageService::Stub;

constexpr char kGpt4o[] = "providers/openai/models/gpt-4o";

v1::Budget MakeBudget(v1::BudgetScope scope, const std::string& value, v1::BudgetPeriod period,
                      std::int64_t limit, const std::vector<int>& thresholds = {},
                      const std::string& zone = "") {
  v1::Budget b;
  b.set_display_name("A budget");
  b.set_scope(scope);
  b.set_scope_value(value);
  b.set_period(period);
  b.set_limit_nanos(limit);
  b.set_time_zone(zone);
  for (int t : thresholds) b.add_alert_thresholds_percent(t);
  return b;
}

absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixMicros(TimeUtil::TimestampToMicroseconds(t));
}

// Whether two messages are equal (printed when not; gtest's own printer of protos trips a
// GCC 12 -Wrestrict false positive here).
::testing::AssertionResult SameProto(const google::protobuf::Message& a,
                                     const google::protobuf::Message& b) {
  if (google::protobuf::util::MessageDifferencer::Equals(a, b)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << a.ShortDebugString() << "\n  differs from\n"
                                       << b.ShortDebugString();
}

// A WatchAlerts stream read synchronously.
class AlertStream {
 public:
  AlertStream(const std::shared_ptr<grpc::Channel>& channel, const v1::WatchAlertsRequest& request,
              absl::Duration timeout = absl::Seconds(60))
      : stub_(channel) {
    context_.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout));
    reader_ = stub_.WatchAlerts(&context_, request);
  }
  AlertStream(const AlertStream&) = delete;
  AlertStream& operator=(const AlertStream&) = delete;
  AlertStream(AlertStream&&) = delete;
  AlertStream& operator=(AlertStream&&) = delete;
  ~AlertStream() {
    context_.TryCancel();
    v1::WatchAlertsResponse ignored;
    while (reader_->Read(&ignored)) {
    }
    reader_->Finish();
  }
  bool Read(v1::WatchAlertsResponse* message) { return reader_->Read(message); }

  // The cursor of the first checkpoint (the stream's position before anything new).
  absl::StatusOr<std::string> FirstCheckpoint() {
    v1::WatchAlertsResponse message;
    while (Read(&message)) {
      if (message.has_checkpoint()) return message.cursor();
    }
    return absl::UnavailableError("the stream ended before a checkpoint");
  }
  // Reads until an alert arrives.
  absl::StatusOr<v1::WatchAlertsResponse> NextAlert() {
    v1::WatchAlertsResponse message;
    while (Read(&message)) {
      if (message.cursor().empty()) return absl::InternalError("a message without a cursor");
      if (message.has_alert()) return message;
    }
    return absl::UnavailableError("the stream ended before an alert");
  }

 private:
  BudgetStub stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<v1::WatchAlertsResponse>> reader_;
};

class BudgetsApiTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(PrepareDatabase(url()), absl::OkStatus());
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(url(), {"--shutdown-timeout", "5"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    budgets_ = v1::BudgetService::NewStub(server_->Channel());
    usage_ = v1::UsageService::NewStub(server_->Channel());
  }

  void TearDown() override {
    budgets_.reset();
    usage_.reset();
    if (server_ != nullptr && server_->running()) {
      const std::string log = server_->Log();
      server_->Stop(SIGTERM, absl::Seconds(15));
      if (HasFailure()) std::cerr << "--- server log ---\n" << log << "---\n";
    }
  }

  absl::StatusOr<v1::Budget> Create(const std::string& id, const v1::Budget& budget,
                                    const std::string& request_id = "") {
    v1::CreateBudgetRequest request;
    request.set_budget_id(id);
    *request.mutable_budget() = budget;
    request.set_request_id(request_id);
    return Invoke(*budgets_, &BudgetStub::CreateBudget, request);
  }
  absl::StatusOr<v1::Budget> Get(const std::string& name) {
    v1::GetBudgetRequest request;
    request.set_name(name);
    return Invoke(*budgets_, &BudgetStub::GetBudget, request);
  }
  absl::StatusOr<v1::Budget> Update(const v1::Budget& budget,
                                    const std::vector<std::string>& paths) {
    v1::UpdateBudgetRequest request;
    *request.mutable_budget() = budget;
    for (const std::string& p : paths) request.mutable_update_mask()->add_paths(p);
    return Invoke(*budgets_, &BudgetStub::UpdateBudget, request);
  }
  absl::Status Delete(const std::string& name, const std::string& etag = "") {
    v1::DeleteBudgetRequest request;
    request.set_name(name);
    request.set_etag(etag);
    return Invoke(*budgets_, &BudgetStub::DeleteBudget, request).status();
  }
  absl::StatusOr<v1::Reservation> Reserve(std::int64_t estimate, const v1::UsageScopes& scopes = {},
                                          const std::string& request_id = "",
                                          BudgetStub* stub = nullptr) {
    v1::ReserveBudgetRequest request;
    *request.mutable_scopes() = scopes;
    request.set_estimated_cost_nanos(estimate);
    request.set_request_id(request_id);
    return Invoke(stub != nullptr ? *stub : *budgets_, &BudgetStub::ReserveBudget, request);
  }
  absl::StatusOr<v1::Reservation> Release(const std::string& name) {
    v1::ReleaseReservationRequest request;
    request.set_name(name);
    return Invoke(*budgets_, &BudgetStub::ReleaseReservation, request);
  }
  absl::StatusOr<v1::ListAlertsResponse> ListAlerts(const std::string& parent) {
    v1::ListAlertsRequest request;
    request.set_parent(parent);
    return Invoke(*budgets_, &BudgetStub::ListAlerts, request);
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<BudgetStub> budgets_;
  std::unique_ptr<UsageStub> usage_;
};

// --- 1. CRUD ------------------------------------------------------------------------------

TEST_P(BudgetsApiTest, CreateGetListUpdateAndDelete) {
  const v1::Budget wanted = MakeBudget(v1::BUDGET_SCOPE_USER, "alice", v1::BUDGET_PERIOD_DAILY,
                                       1'000'000'000, {50, 80, 100}, "America/New_York");
  absl::StatusOr<v1::Budget> created = Create("alice-daily", wanted, "create-1");
  ASSERT_TRUE(created.ok()) << Describe(created.status());
  EXPECT_EQ(created->name(), "budgets/alice-daily");
  EXPECT_EQ(created->etag(), "\"1\"");
  EXPECT_THAT(created->alert_thresholds_percent(), ElementsAre(50, 80, 100));
  // The current period: today in New York, nothing spent or held.
  const absl::TimeZone ny = [] {
    absl::TimeZone z;
    absl::LoadTimeZone("America/New_York", &z);
    return z;
  }();
  const absl::Time now = absl::Now();
  const absl::Time start = FromProto(created->current_period().start_time());
  const absl::Time end = FromProto(created->current_period().end_time());
  EXPECT_LE(start, now);
  EXPECT_GT(end, now);
  EXPECT_EQ(absl::ToCivilSecond(start, ny), absl::CivilSecond(absl::ToCivilDay(start, ny)));
  EXPECT_EQ(created->current_period().spent_nanos(), 0);
  EXPECT_EQ(created->current_period().held_nanos(), 0);
  // The same request_id replays; the same id again is taken.
  absl::StatusOr<v1::Budget> replay = Create("alice-daily", wanted, "create-1");
  ASSERT_TRUE(replay.ok()) << Describe(replay.status());
  EXPECT_EQ(replay->etag(), created->etag());
  EXPECT_TRUE(IsError(Create("alice-daily", wanted).status(), absl::StatusCode::kAlreadyExists));

  absl::StatusOr<v1::Budget> got = Get(created->name());
  ASSERT_TRUE(got.ok()) << Describe(got.status());
  EXPECT_TRUE(SameProto(*got, *created));

  ASSERT_TRUE(
      Create("everything", MakeBudget(v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_NONE, 5'000))
          .ok());
  v1::ListBudgetsRequest list;
  list.set_filter("scope = BUDGET_SCOPE_USER");
  absl::StatusOr<v1::ListBudgetsResponse> listed =
      Invoke(*budgets_, &BudgetStub::ListBudgets, list);
  ASSERT_TRUE(listed.ok()) << Describe(listed.status());
  ASSERT_EQ(listed->budgets_size(), 1);
  EXPECT_EQ(listed->budgets(0).name(), "budgets/alice-daily");
  EXPECT_TRUE(listed->budgets(0).has_current_period());
  list.set_filter("");
  listed = Invoke(*budgets_, &BudgetStub::ListBudgets, list);
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->budgets_size(), 2);
  // A budget without periods has no bounds.
  EXPECT_EQ(listed->budgets(1).name(), "budgets/everything");
  EXPECT_FALSE(listed->budgets(1).current_period().has_start_time());

  v1::Budget patch;
  patch.set_name(created->name());
  patch.set_limit_nanos(2'000'000'000);
  patch.set_etag(created->etag());
  absl::StatusOr<v1::Budget> updated = Update(patch, {"limit_nanos"});
  ASSERT_TRUE(updated.ok()) << Describe(updated.status());
  EXPECT_EQ(updated->limit_nanos(), 2'000'000'000);
  EXPECT_EQ(updated->scope_value(), "alice");
  EXPECT_EQ(updated->etag(), "\"2\"");
  EXPECT_TRUE(updated->has_current_period());
  EXPECT_TRUE(IsError(Update(patch, {"limit_nanos"}).status(), absl::StatusCode::kAborted, "",
                      "ETAG_MISMATCH"));

  EXPECT_TRUE(IsError(Delete(created->name(), created->etag()), absl::StatusCode::kAborted, "",
                      "ETAG_MISMATCH"));
  ASSERT_TRUE(Delete(created->name(), updated->etag()).ok());
  EXPECT_TRUE(IsError(Get(created->name()).status(), absl::StatusCode::kNotFound));
  EXPECT_TRUE(IsError(Delete(created->name()), absl::StatusCode::kNotFound));
}

// --- 2. Bad input -------------------------------------------------------------------------

TEST_P(BudgetsApiTest, BadInputNamesTheField) {
  const v1::Budget ok = MakeBudget(v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_DAILY, 1'000);
  v1::Budget no_scope = ok;
  no_scope.set_scope(v1::BUDGET_SCOPE_UNSPECIFIED);
  no_scope.set_period(v1::BUDGET_PERIOD_UNSPECIFIED);
  absl::Status s = Create("b", no_scope).status();
  EXPECT_TRUE(IsError(s, absl::StatusCode::kInvalidArgument, "budget.scope"));
  EXPECT_TRUE(IsError(s, absl::StatusCode::kInvalidArgument, "budget.period"));

  v1::Budget global_value = ok;
  global_value.set_scope_value("someone");
  EXPECT_TRUE(IsError(Create("b", global_value).status(), absl::StatusCode::kInvalidArgument,
                      "budget.scope_value"));
  EXPECT_TRUE(IsError(
      Create("b", MakeBudget(v1::BUDGET_SCOPE_USER, "", v1::BUDGET_PERIOD_DAILY, 1)).status(),
      absl::StatusCode::kInvalidArgument, "budget.scope_value"));
  EXPECT_TRUE(
      IsError(Create("b", MakeBudget(v1::BUDGET_SCOPE_MODEL, "gpt-4o", v1::BUDGET_PERIOD_DAILY, 1))
                  .status(),
              absl::StatusCode::kInvalidArgument, "budget.scope_value"));
  v1::Budget thresholds = ok;
  thresholds.add_alert_thresholds_percent(50);
  thresholds.add_alert_thresholds_percent(2000);
  thresholds.add_alert_thresholds_percent(50);
  s = Create("b", thresholds).status();
  EXPECT_TRUE(IsError(s, absl::StatusCode::kInvalidArgument, "budget.alert_thresholds_percent[1]"));
  EXPECT_TRUE(IsError(s, absl::StatusCode::kInvalidArgument, "budget.alert_thresholds_percent[2]"));
  v1::Budget zone = ok;
  zone.set_time_zone("Atlantis/Capital");
  EXPECT_TRUE(
      IsError(Create("b", zone).status(), absl::StatusCode::kInvalidArgument, "budget.time_zone"));
  v1::Budget no_limit = ok;
  no_limit.set_limit_nanos(0);
  EXPECT_TRUE(IsError(Create("b", no_limit).status(), absl::StatusCode::kInvalidArgument,
                      "budget.limit_nanos"));
  EXPECT_TRUE(
      IsError(Create("Not An Id", ok).status(), absl::StatusCode::kInvalidArgument, "budget_id"));
  EXPECT_TRUE(IsError(Get("budgets").status(), absl::StatusCode::kInvalidArgument, "name"));

  absl::StatusOr<v1::Budget> created = Create("b", ok);
  ASSERT_TRUE(created.ok()) << Describe(created.status());
  v1::Budget patch;
  patch.set_name(created->name());
  EXPECT_TRUE(IsError(Update(patch, {"period"}).status(), absl::StatusCode::kInvalidArgument,
                      "budget.period"));
  patch.add_alert_thresholds_percent(0);
  EXPECT_TRUE(IsError(Update(patch, {"alert_thresholds_percent"}).status(),
                      absl::StatusCode::kInvalidArgument, "budget.alert_thresholds_percent[0]"));

  EXPECT_TRUE(
      IsError(Reserve(-1).status(), absl::StatusCode::kInvalidArgument, "estimated_cost_nanos"));
  v1::ReserveBudgetRequest long_ttl;
  long_ttl.mutable_scopes();
  long_ttl.mutable_ttl()->set_seconds(std::int64_t{25} * 3600);
  EXPECT_TRUE(IsError(Invoke(*budgets_, &BudgetStub::ReserveBudget, long_ttl).status(),
                      absl::StatusCode::kInvalidArgument, "ttl"));
  EXPECT_TRUE(
      IsError(Invoke(*budgets_, &BudgetStub::ReserveBudget, v1::ReserveBudgetRequest()).status(),
              absl::StatusCode::kInvalidArgument, "scopes"));
  v1::UsageScopes bad_scopes;
  bad_scopes.set_model("gpt-4o");
  bad_scopes.set_access_key("k1");
  s = Reserve(1, bad_scopes).status();
  EXPECT_TRUE(IsError(s, absl::StatusCode::kInvalidArgument, "scopes.model"));
  EXPECT_TRUE(IsError(s, absl::StatusCode::kInvalidArgument, "scopes.access_key"));
  EXPECT_TRUE(IsError(Release("budgets/b").status(), absl::StatusCode::kInvalidArgument, "name"));
  EXPECT_TRUE(IsError(ListAlerts("alerts").status(), absl::StatusCode::kInvalidArgument, "parent"));
  v1::WatchAlertsRequest bad_cursor;
  bad_cursor.set_cursor("not-a-cursor");
  AlertStream stream(server_->Channel(), bad_cursor);
  v1::WatchAlertsResponse ignored;
  EXPECT_FALSE(stream.Read(&ignored));
}

// --- 3. Reservations ----------------------------------------------------------------------

TEST_P(BudgetsApiTest, ReserveAndReleaseOverRpc) {
  ASSERT_TRUE(
      Create("global", MakeBudget(v1::BUDGET_SCOPE_GLOBAL, "", v1::BUDGET_PERIOD_MONTHLY, 1'000))
          .ok());
  v1::UsageScopes scopes;
  scopes.set_user("alice");
  scopes.set_model(kGpt4o);
  absl::StatusOr<v1::Reservation> held = Reserve(600, scopes, "reserve-1");
  ASSERT_TRUE(held.ok()) << Describe(held.status());
  EXPECT_TRUE(absl::StartsWith(held->name(), "reservations/")) << held->name();
  EXPECT_EQ(held->state(), v1::Reservation::STATE_HELD);
  EXPECT_THAT(held->budgets(), ElementsAre("budgets/global"));
  // An empty access key is the caller's.
  const std::string caller_key = held->scopes().access_key();
  EXPECT_TRUE(absl::StartsWith(caller_key, "accessKeys/")) << caller_key;
  EXPECT_EQ(FromProto(held->expire_time()) - FromProto(held->create_time()), absl::Minutes(5));
  // A retry returns the same reservation and holds nothing more.
  absl::StatusOr<v1::Reservation> retried = Reserve(600, scopes, "reserve-1");
  ASSERT_TRUE(retried.ok()) << Describe(retried.status());
  EXPECT_TRUE(SameProto(*retried, *held));
  EXPECT_TRUE(IsError(Reserve(601, scopes, "reserve-1").status(),
                      absl::StatusCode::kInvalidArgument, "request_id", "REQUEST_ID_REUSED"));
  absl::StatusOr<v1::Budget> budget = Get("budgets/global");
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->current_period().held_nanos(), 600);

  absl::Status refused = Reserve(401, scopes).status();
  EXPECT_TRUE(IsError(refused, absl::StatusCode::kResourceExhausted, "", "BUDGET_EXCEEDED"));
  EXPECT_EQ(ErrorMetadata(refused, "budget"), "budgets/global");
  EXPECT_EQ(ErrorMetadata(refused, "held_nanos"), "600");
  EXPECT_EQ(ErrorMetadata(refused, "limit_nanos"), "1000");

  // A budget on the caller's key applies to reservations that leave access_key empty.
  ASSERT_TRUE(Create("my-key", MakeBudget(v1::BUDGET_SCOPE_ACCESS_KEY, caller_key,
                                          v1::BUDGET_PERIOD_DAILY, 100))
                  .ok());
  absl::StatusOr<v1::Reservation> both = Reserve(100, scopes);
  ASSERT_TRUE(both.ok()) << Describe(both.status());
  EXPECT_THAT(both->budgets(), ElementsAre("budgets/global", "budgets/my-key"));
  EXPECT_TRUE(IsError(Reserve(1, scopes).status(), absl::StatusCode::kResourceExhausted, "",
                      "BUDGET_EXCEEDED"));

  absl::StatusOr<v1::Reservation> released = Release(held->name());
  ASSERT_TRUE(released.ok()) << Describe(released.status());
  EXPECT_EQ(released->state(), v1::Reservation::STATE_RELEASED);
  budget = Get("budgets/global");
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->current_period().held_nanos(), 100);
  EXPECT_TRUE(IsError(Release(held->name()).status(), absl::StatusCode::kFailedPrecondition, "",
                      "RESERVATION_NOT_HELD"));
  EXPECT_TRUE(IsError(Release("reservations/unknown").status(), absl::StatusCode::kNotFound));
}

TEST_P(BudgetsApiTest, ConcurrentReserversGetExactlyWhatFits) {
  constexpr std::int64_t kEstimate = 10'000'000;  // 1 cent
  constexpr int kThreads = 8;
  constexpr int kPerThread = 16;  // 128 attempts, 100 fit
  ASSERT_TRUE(Create("team", MakeBudget(v1::BUDGET_SCOPE_USER, "team", v1::BUDGET_PERIOD_DAILY,
                                        100 * kEstimate))
                  .ok());
  v1::UsageScopes scopes;
  scopes.set_user("team");
  std::atomic<int> granted{0};
  std::atomic<int> refused{0};
  std::atomic<int> other{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      // A channel per thread: concurrent connections, as separate gateways would be.
      BudgetStub stub(server_->Channel());
      start.arrive_and_wait();
      for (int i = 0; i < kPerThread; ++i) {
        absl::StatusOr<v1::Reservation> r = Reserve(kEstimate, scopes, "", &stub);
        if (r.ok()) {
          granted.fetch_add(1);
        } else if (IsError(r.status(), absl::StatusCode::kResourceExhausted, "",
                           "BUDGET_EXCEEDED")) {
          refused.fetch_add(1);
        } else {
          other.fetch_add(1);
          ADD_FAILURE() << Describe(r.status());
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(granted.load(), 100);
  EXPECT_EQ(refused.load(), kThreads * kPerThread - 100);
  absl::StatusOr<v1::Budget> budget = Get("budgets/team");
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->current_period().held_nanos(), 100 * kEstimate);
}

// --- 5. Usage, settlement and alerts ------------------------------------------------------

TEST_P(BudgetsApiTest, RecordedUsageSpendsSettlesAndRaisesAWatchedAlert) {
  constexpr std::int64_t kLimit = 10'000'000;  // 1 cent
  absl::StatusOr<v1::Budget> budget = Create(
      "gpt4o", MakeBudget(v1::BUDGET_SCOPE_MODEL, kGpt4o, v1::BUDGET_PERIOD_DAILY, kLimit, {50}));
  ASSERT_TRUE(budget.ok()) << Describe(budget.status());

  // The watch is in place, and its position known, before anything happens.
  v1::WatchAlertsRequest watch;
  watch.set_checkpoint_interval_seconds(1);
  AlertStream stream(server_->Channel(), watch);
  absl::StatusOr<std::string> before = stream.FirstCheckpoint();
  ASSERT_TRUE(before.ok()) << before.status();

  v1::UsageScopes scopes;
  scopes.set_user("alice");
  scopes.set_model(kGpt4o);
  absl::StatusOr<v1::Reservation> reservation = Reserve(kLimit / 2, scopes);
  ASSERT_TRUE(reservation.ok()) << Describe(reservation.status());

  // 3000 input tokens of gpt-4o cost far more than half a cent at any seeded price.
  v1::RecordUsageRequest record;
  *record.mutable_record() = UsageRecordOf("call-1", absl::Now(), kGpt4o, "alice", 3'000, 100);
  record.mutable_record()->set_reservation(reservation->name());
  absl::StatusOr<v1::RecordUsageResponse> recorded =
      Invoke(*usage_, &UsageStub::RecordUsage, record);
  ASSERT_TRUE(recorded.ok()) << Describe(recorded.status());
  const std::int64_t cost = recorded->record().cost_nanos();
  ASSERT_GE(cost * 2, kLimit) << "the seeded gpt-4o price is lower than this test assumes";

  // Spent, and the reservation's hold gone.
  absl::StatusOr<v1::Budget> after = Get(budget->name());
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->current_period().spent_nanos(), cost);
  EXPECT_EQ(after->current_period().held_nanos(), 0);
  EXPECT_TRUE(IsError(Release(reservation->name()).status(), absl::StatusCode::kFailedPrecondition,
                      "", "RESERVATION_NOT_HELD"));

  absl::StatusOr<v1::WatchAlertsResponse> alert = stream.NextAlert();
  ASSERT_TRUE(alert.ok()) << alert.status();
  EXPECT_EQ(alert->alert().threshold_percent(), 50);
  EXPECT_EQ(alert->alert().spent_nanos(), cost);
  EXPECT_EQ(alert->alert().limit_nanos(), kLimit);
  EXPECT_TRUE(absl::StartsWith(alert->alert().name(), "budgets/gpt4o/alerts/"))
      << alert->alert().name();
  EXPECT_EQ(alert->alert().period_start_time(), after->current_period().start_time());

  // ListAlerts shows it, for the budget and across budgets.
  for (const std::string parent : {"budgets/gpt4o", "budgets/-"}) {
    absl::StatusOr<v1::ListAlertsResponse> listed = ListAlerts(parent);
    ASSERT_TRUE(listed.ok()) << Describe(listed.status());
    ASSERT_EQ(listed->alerts_size(), 1) << parent;
    EXPECT_TRUE(SameProto(listed->alerts(0), alert->alert()));
  }
  // More usage in the same period raises nothing new.
  *record.mutable_record() = UsageRecordOf("call-2", absl::Now(), kGpt4o, "alice", 3'000, 100);
  ASSERT_TRUE(Invoke(*usage_, &UsageStub::RecordUsage, record).ok());
  absl::StatusOr<v1::ListAlertsResponse> listed = ListAlerts("budgets/-");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->alerts_size(), 1);

  // Resuming from the cursor taken before delivers the same alert.
  watch.set_cursor(*before);
  AlertStream resumed(server_->Channel(), watch);
  absl::StatusOr<v1::WatchAlertsResponse> again = resumed.NextAlert();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(SameProto(again->alert(), alert->alert()));
  EXPECT_EQ(again->cursor(), alert->cursor());

  // Deleting the budget takes its alerts along.
  ASSERT_TRUE(Delete(budget->name()).ok());
  listed = ListAlerts("budgets/-");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->alerts_size(), 0);
}

INSTANTIATE_TEST_SUITE_P(Engines, BudgetsApiTest, conformance::AllEngines(),
                         conformance::NameGen());

}  // namespace
}  // namespace modelvault::e2e
