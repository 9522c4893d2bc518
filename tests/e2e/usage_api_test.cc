// UsageService end to end: the real `modelvault` binary on a fresh, migrated and seeded
// SQLite or PostgreSQL database per test, driven through the generated stubs.
//
//   1. RecordUsage: cost from the catalog price in force at the call's time (computed here
//      from GetModel's prices in 128-bit math), replays, request_id reuse, bad input;
//   2. idempotency under cancellation: every record sent three times, RecordUsage and
//      IngestUsage mixed, with client-side cancellations and tiny deadlines; exactly one
//      stored record per request_id and totals that match the test's own sums;
//   3. IngestUsage: concurrent streams acknowledged in order; per-record rejections;
//   4. a gap-free WatchUsage under concurrent writers with watchers that reconnect at random
//      moments (on PostgreSQL also across two replicas on one database);
//   5. WatchUsage filters, checkpoints, resuming from a checkpoint, bad cursors;
//   6. QueryUsage by day in a time zone, and invalid queries.
//
// Waits poll with deadlines; nothing asserts a duration.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <functional>
#include <future>
#include <iostream>
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
#include "absl/strings/str_join.h"
#include "absl/time/civil_time.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/usage.grpc.pb.h"
#include "server/cursor.h"
#include "server/grpc_status.h"
#include "storage/status_details.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/status_checks.h"
#include "tests/e2e/usage_client.h"

namespace modelvault::e2e {
namespace {

using ::google::protobuf::util::MessageDifferencer;
using ::modelvault::conformance::EngineParam;
using ::modelvault::conformance::EngineTest;
using ::modelvault::testing::Describe;
using ::modelvault::testing::ErrorMetadata;
using ::modelvault::testing::IngestOptions;
using ::modelvault::testing::IngestResult;
using ::modelvault::testing::IngestUntilAcknowledged;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::IsError;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::ServerProcess;
using ::modelvault::testing::UsageRecordOf;
using ::testing::ElementsAreArray;
using UsageStub = v1::UsageService::Stub;
using CatalogStub = v1::CatalogService::Stub;

// GCC's 128-bit integer, as the server uses it; __extension__ keeps -Wpedantic quiet.
__extension__ using Int128 = __int128;

constexpr char kGpt5[] = "providers/openai/models/gpt-5";
constexpr char kGpt4o[] = "providers/openai/models/gpt-4o";
constexpr char kSonnet[] = "providers/anthropic/models/claude-sonnet-4";
constexpr char kFlash[] = "providers/google/models/gemini-2.5-flash";
constexpr char kDeepseek[] = "providers/deepseek/models/deepseek-chat";

google::protobuf::Timestamp ToTimestamp(absl::Time t) {
  google::protobuf::Timestamp ts;
  const std::int64_t micros = absl::ToUnixMicros(t);
  ts.set_seconds(micros / 1'000'000);
  ts.set_nanos(static_cast<std::int32_t>(micros % 1'000'000) * 1000);
  return ts;
}

absl::Time FromTimestamp(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

absl::Time Utc(int year, int month, int day, int hour, int minute = 0) {
  return absl::FromCivil(absl::CivilMinute(year, month, day, hour, minute), absl::UTCTimeZone());
}

// The start of the UTC hour holding `t`.
absl::Time HourFloor(absl::Time t) {
  return absl::FromCivil(absl::ToCivilHour(t, absl::UTCTimeZone()), absl::UTCTimeZone());
}

// Whether two messages are equal (MessageDifferencer), with both in the failure message.
// (gtest's own printing of messages trips GCC 12's -Wrestrict at -O3.)
::testing::AssertionResult SameProto(const google::protobuf::Message& got,
                                     const google::protobuf::Message& want) {
  if (MessageDifferencer::Equals(got, want)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got  " << got.ShortDebugString() << "\nwant " << want.ShortDebugString();
}

// The stream position a cursor stands for (-1 when it is not one).
std::int64_t SeqOf(const std::string& cursor) {
  absl::StatusOr<std::int64_t> seq = server::DecodeCursor(cursor);
  return seq.ok() ? *seq : -1;
}

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout) {
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout));
}

// What the server must charge for `record`: the tokens of each class times the price of
// `model` in force at the record's time (the latest effective_time at or before it), summed
// in 128 bits, divided by a million once, rounded half up.
struct Cost {
  std::int64_t nanos = 0;
  bool priced = false;
  google::protobuf::Timestamp effective_time;
};
Cost ExpectedCost(const v1::Model& model, const v1::UsageRecord& record) {
  const v1::ModelPrice* in_force = nullptr;
  for (const v1::ModelPrice& price : model.prices()) {
    if (FromTimestamp(price.effective_time()) > FromTimestamp(record.time())) continue;
    if (in_force == nullptr ||
        FromTimestamp(price.effective_time()) > FromTimestamp(in_force->effective_time())) {
      in_force = &price;
    }
  }
  Cost cost;
  if (in_force == nullptr) return cost;
  const v1::TokenCounts& t = record.tokens();
  const Int128 sum = static_cast<Int128>(t.input()) * in_force->input() +
                     static_cast<Int128>(t.output()) * in_force->output() +
                     static_cast<Int128>(t.cache_read()) * in_force->cache_read() +
                     static_cast<Int128>(t.cache_write()) * in_force->cache_write() +
                     static_cast<Int128>(t.reasoning()) * in_force->reasoning();
  cost.nanos = static_cast<std::int64_t>((sum + 500'000) / 1'000'000);
  cost.priced = true;
  cost.effective_time = in_force->effective_time();
  return cost;
}

// Every record of a ListUsageRecords query, paged through.
absl::StatusOr<std::vector<v1::UsageRecord>> ListAll(UsageStub& stub,
                                                     const v1::UsageFilter& filter = {}) {
  std::vector<v1::UsageRecord> all;
  v1::ListUsageRecordsRequest request;
  request.set_page_size(1000);
  *request.mutable_filter() = filter;
  for (int page = 0; page < 100'000; ++page) {
    absl::StatusOr<v1::ListUsageRecordsResponse> response =
        Invoke(stub, &UsageStub::ListUsageRecords, request);
    if (!response.ok()) return response.status();
    for (v1::UsageRecord& r : *response->mutable_records()) all.push_back(std::move(r));
    if (response->next_page_token().empty()) return all;
    request.set_page_token(response->next_page_token());
  }
  return absl::InternalError("ListUsageRecords never ended");
}

absl::StatusOr<v1::RecordUsageResponse> Record(UsageStub& stub, const v1::UsageRecord& record) {
  v1::RecordUsageRequest request;
  *request.mutable_record() = record;
  return Invoke(stub, &UsageStub::RecordUsage, request);
}

std::map<std::string, v1::UsageRecord> ById(const std::vector<v1::UsageRecord>& records) {
  std::map<std::string, v1::UsageRecord> out;
  for (const v1::UsageRecord& r : records) out[r.request_id()] = r;
  return out;
}

// A WatchUsage stream read synchronously.
class WatchStream {
 public:
  WatchStream(const std::shared_ptr<grpc::Channel>& channel, const v1::WatchUsageRequest& request,
              absl::Duration timeout = absl::Seconds(60))
      : stub_(UsageStub(channel)) {
    SetDeadline(context_, timeout);
    reader_ = stub_.WatchUsage(&context_, request);
  }
  WatchStream(const WatchStream&) = delete;
  WatchStream& operator=(const WatchStream&) = delete;
  WatchStream(WatchStream&&) = delete;
  WatchStream& operator=(WatchStream&&) = delete;
  ~WatchStream() {
    if (!finished_) {
      context_.TryCancel();
      v1::WatchUsageResponse ignored;
      while (reader_->Read(&ignored)) {
      }
      reader_->Finish();
    }
  }

  bool Read(v1::WatchUsageResponse* message) { return reader_->Read(message); }
  // The status the stream ended with (after Read returned false).
  absl::Status Finish() {
    finished_ = true;
    return server::FromGrpcStatus(reader_->Finish());
  }
  // Reads until a checkpoint at or after `seq`; the records read on the way. An error when
  // the stream ends first or a message has no cursor.
  absl::StatusOr<std::vector<v1::UsageRecord>> ReadThrough(std::int64_t seq,
                                                           std::string* checkpoint_cursor) {
    std::vector<v1::UsageRecord> records;
    v1::WatchUsageResponse message;
    while (Read(&message)) {
      if (message.cursor().empty()) {
        return absl::InternalError(
            absl::StrCat("a message without a cursor: ", message.ShortDebugString()));
      }
      if (message.has_record()) {
        records.push_back(message.record());
        continue;
      }
      if (message.has_checkpoint() && SeqOf(message.cursor()) >= seq) {
        if (checkpoint_cursor != nullptr) *checkpoint_cursor = message.cursor();
        return records;
      }
    }
    const absl::Status status = Finish();
    return absl::InternalError(
        absl::StrCat("the stream ended after ", records.size(), " records: ", Describe(status)));
  }

 private:
  UsageStub stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<v1::WatchUsageResponse>> reader_;
  bool finished_ = false;
};

std::vector<std::string> RequestIds(const std::vector<v1::UsageRecord>& records) {
  std::vector<std::string> ids;
  ids.reserve(records.size());
  for (const v1::UsageRecord& r : records) ids.push_back(r.request_id());
  return ids;
}

// --- Fixture ----------------------------------------------------------------------------

class UsageApiTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(PrepareDatabase(url()), absl::OkStatus());
  }

  void TearDown() override {
    usage_.reset();
    catalog_.reset();
    for (std::unique_ptr<ServerProcess>& server : servers_) {
      if (server == nullptr || !server->running()) continue;
      const std::string log = server->Log();
      server->Stop(SIGTERM, absl::Seconds(15));
      if (HasFailure()) std::cerr << "--- server log (" << server->target() << ") ---\n" << log;
    }
  }

  // Starts a server on the test database; the first one's stubs are usage_ and catalog_.
  ServerProcess* StartServer() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(url(), {"--shutdown-timeout", "5"});
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return nullptr;
    servers_.push_back(*std::move(server));
    if (usage_ == nullptr) {
      usage_ = v1::UsageService::NewStub(servers_.front()->Channel());
      catalog_ = v1::CatalogService::NewStub(servers_.front()->Channel());
    }
    return servers_.back().get();
  }

  // The seeded model `name` as GetModel answers it.
  v1::Model Model(const std::string& name) {
    v1::GetModelRequest request;
    request.set_name(name);
    absl::StatusOr<v1::Model> model = Invoke(*catalog_, &CatalogStub::GetModel, request);
    EXPECT_TRUE(model.ok()) << name << ": " << model.status();
    EXPECT_GT(model.ok() ? model->prices_size() : 0, 0) << name << " has no seeded price";
    return model.value_or(v1::Model());
  }

  std::map<std::string, v1::Model> Models(const std::vector<std::string>& names) {
    std::map<std::string, v1::Model> models;
    for (const std::string& name : names) models[name] = Model(name);
    return models;
  }

  // Runs the gap-free watch scenario on the servers started (writers and watchers spread
  // over them).
  void ExpectGapFreeWatch();

  std::vector<std::unique_ptr<ServerProcess>> servers_;
  std::unique_ptr<UsageStub> usage_;
  std::unique_ptr<CatalogStub> catalog_;
};

// --- 1. RecordUsage -----------------------------------------------------------------------

TEST_P(UsageApiTest, RecordUsageCostsAtThePriceInForceAndIsIdempotent) {
  ASSERT_NE(StartServer(), nullptr);
  const v1::Model sonnet = Model(kSonnet);
  const v1::Model gpt4o = Model(kGpt4o);
  ASSERT_GE(gpt4o.prices_size(), 2) << "the seed's gpt-4o should have a dated price change";

  // Every token class, and counts whose products overflow 64 bits (1e12 tokens at up to
  // $15 per million tokens): the cost must come from 128-bit math.
  std::vector<v1::UsageRecord> records;
  v1::UsageRecord all_classes = UsageRecordOf("rec-all-classes", absl::Now() - absl::Hours(2),
                                              kSonnet, "alice", 123'457, 9'876);
  all_classes.mutable_tokens()->set_cache_read(55'555);
  all_classes.mutable_tokens()->set_cache_write(4'321);
  all_classes.mutable_tokens()->set_reasoning(777);
  all_classes.set_conversation("conv-1");
  all_classes.set_message("msg-1");
  all_classes.mutable_time_to_first_token()->set_nanos(500'000);
  records.push_back(all_classes);
  v1::UsageRecord huge = UsageRecordOf("rec-huge", absl::Now() - absl::Hours(1), kSonnet, "bob",
                                       1'000'000'000'000, 1'000'000'000'000);
  huge.mutable_tokens()->set_cache_read(1'000'000'000'000);
  huge.mutable_tokens()->set_cache_write(1'000'000'000'000);
  records.push_back(huge);
  v1::UsageRecord one_token =  // 1 token at $3/M: 3000 nano-USD
      UsageRecordOf("rec-one-token", absl::Now() - absl::Minutes(5), kSonnet, "bob", 1, 0);
  records.push_back(one_token);
  // The price in force at the call's time: before and after gpt-4o's price change, and
  // before its first price (unpriced).
  records.push_back(
      UsageRecordOf("rec-4o-launch", Utc(2024, 9, 1, 12), kGpt4o, "carol", 1'000'001, 333'333));
  records.push_back(
      UsageRecordOf("rec-4o-later", Utc(2025, 1, 1, 12), kGpt4o, "carol", 1'000'001, 333'333));
  records.push_back(
      UsageRecordOf("rec-4o-before", Utc(2024, 1, 1, 12), kGpt4o, "carol", 1'000'001, 333'333));

  std::map<std::string, v1::RecordUsageResponse> first;
  for (const v1::UsageRecord& record : records) {
    SCOPED_TRACE(record.request_id());
    absl::StatusOr<v1::RecordUsageResponse> response = Record(*usage_, record);
    ASSERT_TRUE(response.ok()) << Describe(response.status());
    const Cost expected = ExpectedCost(record.model() == kSonnet ? sonnet : gpt4o, record);
    EXPECT_FALSE(response->duplicate());
    EXPECT_EQ(response->record().cost_nanos(), expected.nanos);
    EXPECT_EQ(response->record().priced(), expected.priced);
    EXPECT_TRUE(SameProto(response->record().price_effective_time(), expected.effective_time));
    EXPECT_NE(SeqOf(response->record().cursor()), -1)
        << "cursor: \"" << response->record().cursor() << "\"";
    EXPECT_TRUE(response->record().has_record_time()) << response->record().ShortDebugString();
    EXPECT_EQ(response->record().request_id(), record.request_id());
    EXPECT_TRUE(SameProto(response->record().tokens(), record.tokens()));
    EXPECT_EQ(response->record().status(), v1::USAGE_STATUS_SUCCEEDED);
    EXPECT_EQ(response->record().access_key().rfind("accessKeys/", 0), 0U)
        << "the caller's access key by default: " << response->record().access_key();
    first[record.request_id()] = *response;
  }
  // Sanity of the expectations themselves: 1 token at $3 per million is 3000 nano-USD, and
  // the two gpt-4o prices give different costs.
  EXPECT_EQ(first["rec-one-token"].record().cost_nanos(), 3000);
  EXPECT_GT(first["rec-huge"].record().cost_nanos(), std::int64_t{1} << 53);
  EXPECT_NE(first["rec-4o-launch"].record().cost_nanos(),
            first["rec-4o-later"].record().cost_nanos());
  EXPECT_FALSE(first["rec-4o-before"].record().priced());
  EXPECT_EQ(first["rec-4o-before"].record().cost_nanos(), 0);

  // Cursors of successive records increase.
  EXPECT_LT(SeqOf(first["rec-all-classes"].record().cursor()),
            SeqOf(first["rec-huge"].record().cursor()));

  // A replay: duplicate, and the same record as the first answer.
  for (const v1::UsageRecord& record : records) {
    SCOPED_TRACE(record.request_id());
    absl::StatusOr<v1::RecordUsageResponse> replay = Record(*usage_, record);
    ASSERT_TRUE(replay.ok()) << Describe(replay.status());
    EXPECT_TRUE(replay->duplicate());
    EXPECT_TRUE(SameProto(replay->record(), first[record.request_id()].record()));
  }

  // The same request_id with other content: ALREADY_EXISTS, REQUEST_ID_REUSED, not stored.
  v1::UsageRecord reused = all_classes;
  reused.mutable_tokens()->set_input(all_classes.tokens().input() + 1);
  absl::StatusOr<v1::RecordUsageResponse> conflict = Record(*usage_, reused);
  EXPECT_TRUE(IsError(conflict.status(), absl::StatusCode::kAlreadyExists, "", "REQUEST_ID_REUSED"))
      << Describe(conflict.status());
  v1::UsageRecord other_user = all_classes;
  other_user.set_user("mallory");
  EXPECT_TRUE(IsError(Record(*usage_, other_user).status(), absl::StatusCode::kAlreadyExists, "",
                      "REQUEST_ID_REUSED"));

  absl::StatusOr<std::vector<v1::UsageRecord>> listed = ListAll(*usage_);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), records.size());
  std::map<std::string, v1::UsageRecord> stored = ById(*listed);
  for (const v1::UsageRecord& record : records) {
    EXPECT_TRUE(SameProto(stored[record.request_id()], first[record.request_id()].record()))
        << "ListUsageRecords differs from RecordUsage's answer";
  }
  EXPECT_EQ(stored["rec-all-classes"].tokens().input(), all_classes.tokens().input());
  EXPECT_EQ(stored["rec-all-classes"].user(), "alice");
}

TEST_P(UsageApiTest, RecordUsageRejectsBadInputNamingTheField) {
  ASSERT_NE(StartServer(), nullptr);
  const absl::Time now = absl::Now();
  ASSERT_TRUE(
      Record(*usage_, UsageRecordOf("good", now - absl::Hours(1), kGpt5, "u", 10, 10)).ok());

  struct Case {
    std::string field;
    std::function<void(v1::UsageRecord&)> spoil;
  };
  const std::vector<Case> cases = {
      {"record.tokens.input", [](v1::UsageRecord& r) { r.mutable_tokens()->set_input(-1); }},
      {"record.tokens.output",
       [](v1::UsageRecord& r) { r.mutable_tokens()->set_output(1'000'000'000'001); }},
      {"record.tokens.cache_read",
       [](v1::UsageRecord& r) { r.mutable_tokens()->set_cache_read(-5); }},
      {"record.model", [](v1::UsageRecord& r) { r.set_model(kSonnet); }},  // not openai's
      {"record.model", [](v1::UsageRecord& r) { r.set_model(""); }},
      {"record.model", [](v1::UsageRecord& r) { r.set_model("gpt-5"); }},
      {"record.provider", [](v1::UsageRecord& r) { r.set_provider("openai"); }},
      {"record.request_id", [](v1::UsageRecord& r) { r.set_request_id(""); }},
      {"record.request_id", [](v1::UsageRecord& r) { r.set_request_id("has space"); }},
      {"record.request_id", [](v1::UsageRecord& r) { r.set_request_id(std::string(129, 'x')); }},
      {"record.time", [](v1::UsageRecord& r) { r.clear_time(); }},
      {"record.time",
       [&](v1::UsageRecord& r) { *r.mutable_time() = ToTimestamp(now + absl::Hours(3)); }},
      {"record.latency", [](v1::UsageRecord& r) { r.mutable_latency()->set_seconds(-1); }},
      {"record.status", [](v1::UsageRecord& r) { r.set_status(static_cast<v1::UsageStatus>(42)); }},
      {"record.user", [](v1::UsageRecord& r) { r.set_user(std::string(129, 'u')); }},
      {"record.reported_cost_nanos", [](v1::UsageRecord& r) { r.set_reported_cost_nanos(-1); }},
      {"record.provider_key",
       [](v1::UsageRecord& r) { r.set_provider_key("providers/anthropic/keys/k1"); }},
  };
  int n = 0;
  for (const Case& c : cases) {
    v1::UsageRecord record =
        UsageRecordOf(absl::StrCat("bad-", n++), now - absl::Hours(1), kGpt5, "u", 10, 10);
    c.spoil(record);
    SCOPED_TRACE(absl::StrCat(c.field, ": ", record.ShortDebugString()));
    absl::StatusOr<v1::RecordUsageResponse> response = Record(*usage_, record);
    EXPECT_TRUE(IsError(response.status(), absl::StatusCode::kInvalidArgument, c.field));
  }
  // No record at all.
  absl::StatusOr<v1::RecordUsageResponse> empty =
      Invoke(*usage_, &UsageStub::RecordUsage, v1::RecordUsageRequest());
  EXPECT_TRUE(IsError(empty.status(), absl::StatusCode::kInvalidArgument, "record"));

  // Nothing of it was stored, counted or rolled up.
  absl::StatusOr<std::vector<v1::UsageRecord>> listed = ListAll(*usage_);
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_THAT(RequestIds(*listed), ElementsAreArray({"good"}));
  v1::QueryUsageRequest query;
  *query.mutable_start_time() = ToTimestamp(HourFloor(now) - absl::Hours(24));
  *query.mutable_end_time() = ToTimestamp(HourFloor(now) + absl::Hours(2));
  absl::StatusOr<v1::QueryUsageResponse> totals = Invoke(*usage_, &UsageStub::QueryUsage, query);
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->totals().requests(), 1);
}

// --- 2. Idempotency under cancellation --------------------------------------------------

TEST_P(UsageApiTest, EveryRecordStoredOnceDespiteCancelledAndRepeatedSends) {
  ASSERT_NE(StartServer(), nullptr);
  const std::vector<std::string> model_names = {kGpt5, kSonnet, kFlash, kDeepseek};
  const std::map<std::string, v1::Model> models = Models(model_names);
  ASSERT_FALSE(HasFailure());

  constexpr int kRecords = 10'000;
  constexpr int kCopies = 3;
  const absl::Time now = absl::Now();
  std::mt19937_64 rng(std::random_device{}());
  std::vector<v1::UsageRecord> records;
  std::vector<std::int64_t> cost(kRecords);
  Int128 want_cost = 0;
  std::int64_t want_input = 0;
  std::int64_t want_output = 0;
  std::int64_t want_cache_read = 0;
  for (int i = 0; i < kRecords; ++i) {
    const std::string& model = model_names[rng() % model_names.size()];
    // Calls 1 h to 47 h ago.
    const absl::Time time = now - absl::Minutes(60 + static_cast<std::int64_t>(rng() % 2760U));
    v1::UsageRecord r = UsageRecordOf(
        absl::StrCat("idem-", i), time, model, absl::StrCat("user-", rng() % 20),
        static_cast<std::int64_t>(rng() % 100'000), static_cast<std::int64_t>(rng() % 20'000));
    r.mutable_tokens()->set_cache_read(static_cast<std::int64_t>(rng() % 3) * 1000);
    const Cost c = ExpectedCost(models.at(model), r);
    ASSERT_TRUE(c.priced) << model;
    cost[i] = c.nanos;
    want_cost += c.nanos;
    want_input += r.tokens().input();
    want_output += r.tokens().output();
    want_cache_read += r.tokens().cache_read();
    records.push_back(std::move(r));
  }

  // Every record three times, in random order.
  std::vector<int> sends;
  for (int copy = 0; copy < kCopies; ++copy) {
    for (int i = 0; i < kRecords; ++i) sends.push_back(i);
  }
  std::shuffle(sends.begin(), sends.end(), rng);

  std::vector<std::atomic<int>> acknowledged(kRecords);
  std::mutex mu;
  std::vector<std::string> cursor_of(kRecords);  // guarded by mu
  std::vector<std::string> problems;             // guarded by mu
  std::map<grpc::StatusCode, int> failures;      // guarded by mu
  auto problem = [&](std::string text) {
    std::lock_guard lock(mu);
    problems.push_back(std::move(text));
  };
  // A successful RecordUsage answer: the stored record, always the same one.
  auto check_answer = [&](int i, const v1::RecordUsageResponse& response) {
    const v1::UsageRecord& got = response.record();
    if (got.request_id() != records[i].request_id() || got.cost_nanos() != cost[i] ||
        !got.priced() || got.tokens().input() != records[i].tokens().input()) {
      problem(absl::StrCat("RecordUsage answered ", got.ShortDebugString(), " for ",
                           records[i].ShortDebugString(), " (expected cost ", cost[i], ")"));
    }
    std::lock_guard lock(mu);
    if (cursor_of[i].empty()) {
      cursor_of[i] = got.cursor();
    } else if (cursor_of[i] != got.cursor()) {
      problems.push_back(absl::StrCat(records[i].request_id(), " answered with cursor ",
                                      got.cursor(), " after ", cursor_of[i]));
    }
  };
  auto failed = [&](const grpc::Status& status) {
    std::lock_guard lock(mu);
    ++failures[status.error_code()];
    if (status.error_code() != grpc::StatusCode::CANCELLED &&
        status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      problems.push_back(absl::StrCat("a send failed with code ", status.error_code(), ": ",
                                      status.error_message()));
    }
  };

  std::shared_ptr<grpc::Channel> channel = servers_.front()->Channel();
  std::atomic<size_t> next{0};
  std::atomic<int> cancelled_sends{0};
  auto worker = [&](std::uint64_t seed) {
    std::mt19937_64 r(seed);
    UsageStub stub(channel);
    while (true) {
      const bool ingest = r() % 1000 < 40;  // about 3/4 of the sends
      const size_t count = ingest ? 1 + r() % 150 : 1;
      const size_t begin = next.fetch_add(count);
      if (begin >= sends.size()) return;
      const size_t end = std::min(sends.size(), begin + count);
      const int mode = static_cast<int>(r() % 6);  // 0: tiny deadline, 1: TryCancel, else none
      if (mode <= 1) cancelled_sends.fetch_add(1);
      if (!ingest) {
        const int i = sends[begin];
        v1::RecordUsageRequest request;
        *request.mutable_record() = records[i];
        v1::RecordUsageResponse response;
        grpc::ClientContext context;
        grpc::Status status;
        if (mode == 0) {
          SetDeadline(context, absl::Microseconds(static_cast<std::int64_t>(r() % 4000)));
          status = stub.RecordUsage(&context, request, &response);
        } else if (mode == 1) {
          SetDeadline(context, absl::Seconds(30));
          std::promise<grpc::Status> done;
          stub.async()->RecordUsage(&context, &request, &response,
                                    [&done](grpc::Status s) { done.set_value(std::move(s)); });
          std::this_thread::sleep_for(std::chrono::microseconds(r() % 3000));
          context.TryCancel();
          status = done.get_future().get();
        } else {
          SetDeadline(context, absl::Seconds(30));
          status = stub.RecordUsage(&context, request, &response);
        }
        if (status.ok()) {
          check_answer(i, response);
          acknowledged[i].fetch_add(1);
        } else {
          failed(status);
        }
        continue;
      }
      // IngestUsage: batches of up to 50 sends on one stream, which may be cut short.
      std::vector<v1::IngestUsageRequest> batches;
      std::vector<std::vector<int>> members;
      for (size_t k = begin; k < end; ++k) {
        if (batches.empty() || batches.back().records_size() == 50) {
          batches.emplace_back();
          batches.back().set_batch_id(static_cast<std::int64_t>(k));
          members.emplace_back();
        }
        *batches.back().add_records() = records[sends[k]];
        members.back().push_back(sends[k]);
      }
      grpc::ClientContext context;
      SetDeadline(context, mode == 0 ? absl::Microseconds(static_cast<std::int64_t>(r() % 20'000))
                                     : absl::Seconds(30));
      auto stream = stub.IngestUsage(&context);
      size_t written = 0;
      for (; written < batches.size(); ++written) {
        if (!stream->Write(batches[written])) break;
      }
      if (written == batches.size()) stream->WritesDone();
      if (mode == 1) {
        std::this_thread::sleep_for(std::chrono::microseconds(r() % 5000));
        context.TryCancel();
      }
      v1::IngestUsageResponse ack;
      size_t acked = 0;
      while (stream->Read(&ack)) {
        if (acked >= written || ack.batch_id() != batches[acked].batch_id()) {
          problem(absl::StrCat("acknowledgement out of order: ", ack.ShortDebugString()));
          break;
        }
        if (ack.accepted() + ack.duplicates() != batches[acked].records_size() ||
            ack.rejected_size() != 0) {
          problem(absl::StrCat("acknowledgement of a valid batch of ",
                               batches[acked].records_size(), ": ", ack.ShortDebugString()));
        }
        for (int i : members[acked]) acknowledged[i].fetch_add(1);
        ++acked;
      }
      const grpc::Status status = stream->Finish();
      if (!status.ok()) {
        failed(status);
      } else if (acked != batches.size()) {
        problem(absl::StrCat("a stream ended OK with ", batches.size() - acked,
                             " batches unacknowledged"));
      }
    }
  };
  const absl::Time started = absl::Now();
  std::vector<std::thread> threads;
  threads.reserve(16);
  for (int t = 0; t < 16; ++t) threads.emplace_back(worker, rng());
  for (std::thread& t : threads) t.join();
  const absl::Duration sending = absl::Now() - started;

  // Retry, without cancelling, every record never acknowledged.
  int retried = 0;
  for (int i = 0; i < kRecords; ++i) {
    if (acknowledged[i].load() > 0) continue;
    ++retried;
    absl::StatusOr<v1::RecordUsageResponse> response = Record(*usage_, records[i]);
    ASSERT_TRUE(response.ok()) << records[i].request_id() << ": " << Describe(response.status());
    check_answer(i, *response);
  }
  std::cout << "sends=" << sends.size() << " cancelled_or_short_deadline=" << cancelled_sends
            << " retried_unacknowledged=" << retried
            << " sending_ms=" << absl::ToInt64Milliseconds(sending) << " failures:";
  for (const auto& [code, count] : failures) std::cout << " code" << code << "=" << count;
  std::cout << "\n";
  {
    std::lock_guard lock(mu);
    EXPECT_THAT(problems, ::testing::IsEmpty());
    // The cancellations must have cut some calls short, or this proved nothing.
    EXPECT_GT(failures[grpc::StatusCode::CANCELLED] + failures[grpc::StatusCode::DEADLINE_EXCEEDED],
              0);
  }

  // Exactly one stored record per request_id, each the one the answers named.
  absl::StatusOr<std::vector<v1::UsageRecord>> listed = ListAll(*usage_);
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), static_cast<size_t>(kRecords));
  std::map<std::string, int> index;
  for (int i = 0; i < kRecords; ++i) index[records[i].request_id()] = i;
  std::set<std::string> seen;
  int mismatched = 0;
  for (const v1::UsageRecord& r : *listed) {
    EXPECT_TRUE(seen.insert(r.request_id()).second) << "stored twice: " << r.request_id();
    auto it = index.find(r.request_id());
    if (it == index.end()) {
      ADD_FAILURE() << "a record nobody sent: " << r.ShortDebugString();
      continue;
    }
    const int i = it->second;
    if (r.cost_nanos() != cost[i] || r.tokens().input() != records[i].tokens().input() ||
        r.model() != records[i].model() || (!cursor_of[i].empty() && cursor_of[i] != r.cursor())) {
      if (++mismatched <= 5) {
        ADD_FAILURE() << "stored " << r.ShortDebugString() << " for "
                      << records[i].ShortDebugString() << " (cost " << cost[i] << ", cursor "
                      << cursor_of[i] << ")";
      }
    }
  }
  EXPECT_EQ(mismatched, 0);
  EXPECT_EQ(seen.size(), static_cast<size_t>(kRecords));

  // The totals, from the rollups, are the test's own sums.
  v1::QueryUsageRequest query;
  *query.mutable_start_time() = ToTimestamp(HourFloor(now) - absl::Hours(48));
  *query.mutable_end_time() = ToTimestamp(HourFloor(now) + absl::Hours(1));
  absl::StatusOr<v1::QueryUsageResponse> totals = Invoke(*usage_, &UsageStub::QueryUsage, query);
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->totals().requests(), kRecords);
  EXPECT_EQ(totals->totals().tokens().input(), want_input);
  EXPECT_EQ(totals->totals().tokens().output(), want_output);
  EXPECT_EQ(totals->totals().tokens().cache_read(), want_cache_read);
  ASSERT_LE(want_cost, std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(totals->totals().cost_nanos(), static_cast<std::int64_t>(want_cost));
  EXPECT_EQ(totals->totals().unpriced_requests(), 0);

  v1::GetCostBreakdownRequest breakdown;
  *breakdown.mutable_start_time() = query.start_time();
  *breakdown.mutable_end_time() = query.end_time();
  absl::StatusOr<v1::GetCostBreakdownResponse> costs =
      Invoke(*usage_, &UsageStub::GetCostBreakdown, breakdown);
  ASSERT_TRUE(costs.ok()) << costs.status();
  EXPECT_EQ(costs->total_cost_nanos(), totals->totals().cost_nanos());
  EXPECT_EQ(costs->requests(), kRecords);
  std::int64_t by_provider = 0;
  for (const v1::ProviderCost& p : costs->providers()) by_provider += p.cost_nanos();
  EXPECT_EQ(by_provider, costs->total_cost_nanos());
  EXPECT_EQ(costs->providers_size(), 4);
}

// --- 3. IngestUsage -----------------------------------------------------------------------

TEST_P(UsageApiTest, ConcurrentIngestStreamsAreAcknowledgedInOrder) {
  ASSERT_NE(StartServer(), nullptr);
  constexpr int kStreams = 4;
  constexpr int kBatches = 25;
  constexpr int kBatchSize = 200;
  const absl::Time now = absl::Now();
  std::vector<std::vector<v1::IngestUsageRequest>> streams(kStreams);
  for (int s = 0; s < kStreams; ++s) {
    for (int b = 0; b < kBatches; ++b) {
      v1::IngestUsageRequest batch;
      batch.set_batch_id(1000 * s + b + 7);
      for (int k = 0; k < kBatchSize; ++k) {
        *batch.add_records() =
            UsageRecordOf(absl::StrCat("ingest-", s, "-", b, "-", k), now - absl::Minutes(30),
                          k % 2 == 0 ? kGpt5 : kFlash, absl::StrCat("u", k % 7), 100 + k, 10);
      }
      streams[s].push_back(std::move(batch));
    }
  }
  std::shared_ptr<grpc::Channel> channel = servers_.front()->Channel();
  std::vector<IngestResult> results(kStreams);
  std::vector<std::thread> threads;
  threads.reserve(kStreams);
  IngestOptions options;
  options.window = 6;
  for (int s = 0; s < kStreams; ++s) {
    threads.emplace_back([&, s] {
      results[s] = IngestUntilAcknowledged([&] { return channel; }, streams[s], options);
    });
  }
  for (std::thread& t : threads) t.join();

  std::int64_t accepted = 0;
  for (int s = 0; s < kStreams; ++s) {
    SCOPED_TRACE(absl::StrCat("stream ", s));
    const IngestResult& result = results[s];
    EXPECT_TRUE(result.AllAcknowledged()) << result.last_failure;
    EXPECT_THAT(result.violations, ::testing::IsEmpty());
    EXPECT_EQ(result.streams_opened, 1) << result.last_failure;
    EXPECT_EQ(result.streams_failed, 0) << result.last_failure;
    std::int64_t previous = 0;
    for (int b = 0; b < kBatches; ++b) {
      const v1::IngestUsageResponse& ack = result.acks[b];
      EXPECT_EQ(ack.batch_id(), streams[s][b].batch_id());
      EXPECT_EQ(ack.accepted(), kBatchSize) << ack.ShortDebugString();
      EXPECT_EQ(ack.duplicates(), 0);
      EXPECT_EQ(ack.rejected_size(), 0);
      // The batch's highest cursor: later batches of a stream commit later.
      EXPECT_GT(SeqOf(ack.cursor()), previous) << ack.ShortDebugString();
      previous = SeqOf(ack.cursor());
      accepted += ack.accepted();
    }
  }
  EXPECT_EQ(accepted, kStreams * kBatches * kBatchSize);
  absl::StatusOr<std::vector<v1::UsageRecord>> listed = ListAll(*usage_);
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), static_cast<size_t>(kStreams * kBatches * kBatchSize));
  EXPECT_EQ(ById(*listed).size(), listed->size());
}

TEST_P(UsageApiTest, IngestReportsBadRecordsAndStoresTheRest) {
  ASSERT_NE(StartServer(), nullptr);
  const absl::Time now = absl::Now();
  const v1::UsageRecord original = UsageRecordOf("taken", now - absl::Hours(1), kGpt5, "u", 10, 1);
  ASSERT_TRUE(Record(*usage_, original).ok());

  v1::IngestUsageRequest batch;
  batch.set_batch_id(42);
  for (int i = 0; i < 10; ++i) {
    *batch.add_records() =
        UsageRecordOf(absl::StrCat("batch-", i), now - absl::Hours(1), kGpt5, "u", 100 + i, 5);
  }
  batch.mutable_records(2)->mutable_tokens()->set_input(-3);            // invalid
  *batch.mutable_records(5) = original;                                 // reused request_id...
  batch.mutable_records(5)->mutable_tokens()->set_input(11);            // ...with other content
  batch.mutable_records(7)->set_model("providers/anthropic/models/x");  // not openai's model
  std::shared_ptr<grpc::Channel> channel = servers_.front()->Channel();

  for (int attempt = 0; attempt < 2; ++attempt) {
    SCOPED_TRACE(attempt == 0 ? "first send" : "sent again");
    IngestResult result = IngestUntilAcknowledged([&] { return channel; }, {batch});
    ASSERT_TRUE(result.AllAcknowledged()) << result.last_failure;
    EXPECT_THAT(result.violations, ::testing::IsEmpty());
    const v1::IngestUsageResponse& ack = result.acks[0];
    EXPECT_EQ(ack.batch_id(), 42);
    EXPECT_EQ(ack.accepted(), attempt == 0 ? 7 : 0) << ack.ShortDebugString();
    EXPECT_EQ(ack.duplicates(), attempt == 0 ? 0 : 7) << ack.ShortDebugString();
    EXPECT_NE(SeqOf(ack.cursor()), -1) << ack.ShortDebugString();
    ASSERT_EQ(ack.rejected_size(), 3) << ack.ShortDebugString();
    EXPECT_EQ(ack.rejected(0).index(), 2);
    EXPECT_EQ(ack.rejected(0).request_id(), "batch-2");
    EXPECT_EQ(ack.rejected(0).reason(), "INVALID_ARGUMENT");
    EXPECT_EQ(ack.rejected(0).field(), "records[2].tokens.input");
    EXPECT_EQ(ack.rejected(1).index(), 5);
    EXPECT_EQ(ack.rejected(1).request_id(), "taken");
    EXPECT_EQ(ack.rejected(1).reason(), "REQUEST_ID_REUSED");
    EXPECT_EQ(ack.rejected(1).field(), "records[5].request_id");
    EXPECT_EQ(ack.rejected(2).index(), 7);
    EXPECT_EQ(ack.rejected(2).reason(), "INVALID_ARGUMENT");
    EXPECT_EQ(ack.rejected(2).field(), "records[7].model");
    for (const v1::RejectedRecord& r : ack.rejected()) EXPECT_NE(r.description(), "");
  }

  absl::StatusOr<std::vector<v1::UsageRecord>> listed = ListAll(*usage_);
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_THAT(RequestIds(*listed),
              ::testing::UnorderedElementsAre("taken", "batch-0", "batch-1", "batch-3", "batch-4",
                                              "batch-6", "batch-8", "batch-9"));
  EXPECT_EQ(ById(*listed)["taken"].tokens().input(), 10) << "the reused request_id overwrote";
}

// --- 4. Gap-free WatchUsage -----------------------------------------------------------------

// A watcher that reconnects at random moments (random stream deadlines) from the last
// cursor it processed, to a random server, and checks what it receives.
class Watcher {
 public:
  Watcher(std::vector<std::shared_ptr<grpc::Channel>> channels, std::uint64_t seed)
      : channels_(std::move(channels)), rng_(seed) {}
  Watcher(const Watcher&) = delete;
  Watcher& operator=(const Watcher&) = delete;
  Watcher(Watcher&&) = delete;
  Watcher& operator=(Watcher&&) = delete;
  ~Watcher() {
    if (thread_.joinable()) thread_.join();
  }

  // Opens the first stream from now and reads its first message (a checkpoint).
  absl::Status Begin() {
    Open();
    v1::WatchUsageResponse first;
    if (!reader_->Read(&first)) return server::FromGrpcStatus(reader_->Finish());
    if (!first.has_checkpoint() || first.cursor().empty()) {
      return absl::InternalError(absl::StrCat("the first message from now is not a checkpoint: ",
                                              first.ShortDebugString()));
    }
    Process(first);
    thread_ = std::thread([this] { Run(); });
    return absl::OkStatus();
  }
  // Ends once an event at or after `seq` was processed (or at `deadline`).
  void StopAt(std::int64_t seq, absl::Time deadline) {
    deadline_ = deadline;
    target_.store(seq);
  }
  void Join() { thread_.join(); }

  const std::vector<v1::UsageRecord>& records() const { return records_; }
  const std::vector<std::string>& problems() const { return problems_; }
  int connections() const { return connections_; }

 private:
  void Open() {
    stub_ = v1::UsageService::NewStub(channels_[rng_() % channels_.size()]);
    context_ = std::make_unique<grpc::ClientContext>();
    SetDeadline(*context_, absl::Milliseconds(30 + static_cast<std::int64_t>(rng_() % 400)));
    v1::WatchUsageRequest request;
    request.set_cursor(cursor_);
    request.set_checkpoint_interval_seconds(1);
    reader_ = stub_->WatchUsage(context_.get(), request);
    ++connections_;
  }

  void Process(const v1::WatchUsageResponse& message) {
    const std::int64_t seq = SeqOf(message.cursor());
    if (seq < 0) {
      problems_.push_back(
          absl::StrCat("a message without a valid cursor: ", message.ShortDebugString()));
      return;
    }
    if (message.has_record()) {
      if (seq <= last_seq_) {
        problems_.push_back(absl::StrCat("record cursor ", seq, " after ", last_seq_, ": ",
                                         message.record().request_id()));
      }
      if (!message.record().cursor().empty() && message.record().cursor() != message.cursor()) {
        problems_.push_back(absl::StrCat("record cursor ", message.record().cursor(),
                                         " in a message with cursor ", message.cursor()));
      }
      if (!seen_.insert(message.record().request_id()).second) {
        problems_.push_back(absl::StrCat("delivered twice: ", message.record().request_id()));
      }
      records_.push_back(message.record());
    } else if (seq < last_seq_) {
      problems_.push_back(absl::StrCat("checkpoint cursor ", seq, " after ", last_seq_));
    }
    last_seq_ = std::max(last_seq_, seq);
    cursor_ = message.cursor();
  }

  void Run() {
    while (true) {
      v1::WatchUsageResponse message;
      bool done = last_seq_ >= target_.load();
      while (!done && reader_->Read(&message)) {
        Process(message);
        done = last_seq_ >= target_.load();
      }
      if (done) context_->TryCancel();
      while (reader_->Read(&message)) {  // after a cancel: drain (the cursor is not advanced)
      }
      const absl::Status status = server::FromGrpcStatus(reader_->Finish());
      if (done) return;
      if (!status.ok() && !absl::IsDeadlineExceeded(status) &&
          !(absl::IsResourceExhausted(status) && ErrorReason(status) == "SLOW_CONSUMER")) {
        problems_.push_back(absl::StrCat("the stream ended with ", Describe(status)));
        if (problems_.size() > 20) return;
      }
      if (target_.load() != kNoTarget && absl::Now() > deadline_) {
        problems_.push_back(absl::StrCat("gave up at cursor ", last_seq_, " of ", target_.load()));
        return;
      }
      Open();
    }
  }

  static constexpr std::int64_t kNoTarget = std::numeric_limits<std::int64_t>::max();
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::mt19937_64 rng_;
  std::unique_ptr<UsageStub> stub_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReader<v1::WatchUsageResponse>> reader_;
  std::string cursor_;
  std::int64_t last_seq_ = -1;
  std::set<std::string> seen_;
  std::vector<v1::UsageRecord> records_;
  std::vector<std::string> problems_;
  int connections_ = 0;
  std::atomic<std::int64_t> target_{kNoTarget};
  absl::Time deadline_ = absl::InfiniteFuture();  // written before target_
  std::thread thread_;
};

void UsageApiTest::ExpectGapFreeWatch() {
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (const auto& server : servers_) channels.push_back(server->Channel());
  std::mt19937_64 rng(std::random_device{}());

  std::vector<std::unique_ptr<Watcher>> watchers;
  for (int w = 0; w < 3; ++w) {
    watchers.push_back(std::make_unique<Watcher>(channels, rng()));
    const absl::Status begun = watchers.back()->Begin();
    ASSERT_TRUE(begun.ok()) << Describe(begun);
  }

  // 4 writers: two call RecordUsage, two ingest batches; spread over the servers.
  // Unary writers send fewer records: each waits for its commit.
  constexpr int kPerUnaryWriter = 300;
  constexpr int kPerIngestWriter = 900;
  constexpr int kTotal = 2 * kPerUnaryWriter + 2 * kPerIngestWriter;
  const absl::Time now = absl::Now();
  std::vector<std::string> writer_errors(4);
  std::vector<std::thread> writers;
  writers.reserve(4);
  for (int w = 0; w < 4; ++w) {
    writers.emplace_back([&, w] {
      std::shared_ptr<grpc::Channel> channel = channels[w % channels.size()];
      std::vector<v1::UsageRecord> mine;
      const int count = w % 2 == 0 ? kPerUnaryWriter : kPerIngestWriter;
      mine.reserve(count);
      for (int i = 0; i < count; ++i) {
        mine.push_back(UsageRecordOf(absl::StrCat("gap-", w, "-", i), now - absl::Minutes(i % 90),
                                     i % 3 == 0 ? kSonnet : kGpt5, absl::StrCat("u", i % 5), 10 + i,
                                     3));
      }
      if (w % 2 == 0) {
        UsageStub stub(channel);
        for (const v1::UsageRecord& r : mine) {
          absl::StatusOr<v1::RecordUsageResponse> response;
          for (int attempt = 0; attempt < 5; ++attempt) {
            response = Record(stub, r);
            if (response.ok()) break;
          }
          if (!response.ok()) {
            writer_errors[w] = Describe(response.status());
            return;
          }
        }
        return;
      }
      std::vector<v1::IngestUsageRequest> batches;
      for (int i = 0; i < count; ++i) {
        if (i % 40 == 0) {
          batches.emplace_back();
          batches.back().set_batch_id(i);
        }
        *batches.back().add_records() = mine[i];
      }
      IngestOptions options;
      options.window = 2;
      IngestResult result = IngestUntilAcknowledged([&] { return channel; }, batches, options);
      if (!result.AllAcknowledged() || !result.violations.empty()) {
        writer_errors[w] =
            absl::StrCat(result.last_failure, " ", absl::StrJoin(result.violations, "; "));
      }
    });
  }
  for (std::thread& t : writers) t.join();
  std::cout << "writers took " << absl::ToInt64Milliseconds(absl::Now() - now) << " ms\n";
  for (int w = 0; w < 4; ++w) EXPECT_EQ(writer_errors[w], "") << "writer " << w;

  absl::StatusOr<std::vector<v1::UsageRecord>> listed = ListAll(*usage_);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), static_cast<size_t>(kTotal));
  std::int64_t head = 0;
  for (const v1::UsageRecord& r : *listed) head = std::max(head, SeqOf(r.cursor()));
  const std::map<std::string, v1::UsageRecord> stored = ById(*listed);

  for (auto& watcher : watchers) watcher->StopAt(head, absl::Now() + absl::Seconds(60));
  for (auto& watcher : watchers) watcher->Join();
  std::cout << "watchers done " << absl::ToInt64Milliseconds(absl::Now() - now) << " ms\n";
  for (size_t w = 0; w < watchers.size(); ++w) {
    SCOPED_TRACE(absl::StrCat("watcher ", w));
    const Watcher& watcher = *watchers[w];
    std::cout << "watcher " << w << ": connections=" << watcher.connections()
              << " records=" << watcher.records().size() << "\n";
    EXPECT_THAT(watcher.problems(), ::testing::IsEmpty());
    EXPECT_GT(watcher.connections(), 2) << "it never reconnected; the test proved little";
    EXPECT_EQ(watcher.records().size(), stored.size());
    std::set<std::string> missing;
    for (const auto& [id, record] : stored) missing.insert(id);
    for (const v1::UsageRecord& r : watcher.records()) {
      auto it = stored.find(r.request_id());
      if (it == stored.end()) {
        ADD_FAILURE() << "watched a record that is not stored: " << r.ShortDebugString();
        continue;
      }
      missing.erase(r.request_id());
      EXPECT_EQ(r.cursor(), it->second.cursor()) << r.request_id();
      EXPECT_EQ(r.cost_nanos(), it->second.cost_nanos()) << r.request_id();
    }
    EXPECT_THAT(missing, ::testing::IsEmpty()) << missing.size() << " stored records never seen";
  }
}

TEST_P(UsageApiTest, WatchersThatReconnectSeeEveryRecordExactlyOnce) {
  ASSERT_NE(StartServer(), nullptr);
  ExpectGapFreeWatch();
}

// Two replicas on one PostgreSQL database: writers on both, watchers on both.
class UsageReplicaTest : public UsageApiTest {};

TEST_P(UsageReplicaTest, WatchersSeeEveryRecordOfBothReplicasExactlyOnce) {
  ASSERT_NE(StartServer(), nullptr);
  ASSERT_NE(StartServer(), nullptr);
  ExpectGapFreeWatch();
}

// --- 5. WatchUsage filters, checkpoints, cursors ------------------------------------------

TEST_P(UsageApiTest, WatchFiltersCheckpointsAndResumesFromACheckpoint) {
  ASSERT_NE(StartServer(), nullptr);
  std::shared_ptr<grpc::Channel> channel = servers_.front()->Channel();
  v1::WatchUsageRequest all_request;
  all_request.set_checkpoint_interval_seconds(1);
  v1::WatchUsageRequest model_request = all_request;
  model_request.set_model(kGpt5);
  v1::WatchUsageRequest user_request = all_request;
  user_request.set_user("alice");
  WatchStream all(channel, all_request);
  WatchStream by_model(channel, model_request);
  WatchStream by_user(channel, user_request);
  for (WatchStream* stream : {&all, &by_model, &by_user}) {
    v1::WatchUsageResponse first;
    ASSERT_TRUE(stream->Read(&first)) << Describe(stream->Finish());
    EXPECT_TRUE(first.has_checkpoint()) << first.ShortDebugString();
    EXPECT_NE(SeqOf(first.cursor()), -1) << first.ShortDebugString();
  }

  // Idle: another checkpoint comes (every second), with a cursor; nothing was written.
  v1::WatchUsageResponse idle;
  ASSERT_TRUE(all.Read(&idle)) << Describe(all.Finish());
  EXPECT_TRUE(idle.has_checkpoint()) << idle.ShortDebugString();
  EXPECT_TRUE(idle.checkpoint().has_time()) << idle.ShortDebugString();
  EXPECT_EQ(SeqOf(idle.cursor()), 0) << idle.ShortDebugString();

  // 12 records: models alternate, users rotate.
  const absl::Time now = absl::Now();
  const std::vector<std::string> users = {"alice", "bob", "carol"};
  std::vector<std::string> model_ids;
  std::vector<std::string> user_ids;
  std::vector<std::string> all_ids;
  std::int64_t head = 0;
  for (int i = 0; i < 12; ++i) {
    const std::string model = i % 2 == 0 ? kGpt5 : kSonnet;
    const std::string& user = users[i % 3];
    absl::StatusOr<v1::RecordUsageResponse> response = Record(
        *usage_, UsageRecordOf(absl::StrCat("w-", i), now - absl::Minutes(i), model, user, 5, 5));
    ASSERT_TRUE(response.ok()) << Describe(response.status());
    head = std::max(head, SeqOf(response->record().cursor()));
    all_ids.push_back(absl::StrCat("w-", i));
    if (model == kGpt5) model_ids.push_back(absl::StrCat("w-", i));
    if (user == "alice") user_ids.push_back(absl::StrCat("w-", i));
  }

  // Each stream delivers exactly its matching records, in order, then a checkpoint at or
  // after the last write (nothing else matching comes later).
  std::string checkpoint;
  absl::StatusOr<std::vector<v1::UsageRecord>> got = all.ReadThrough(head, &checkpoint);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(RequestIds(*got), ElementsAreArray(all_ids));
  got = by_model.ReadThrough(head, nullptr);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(RequestIds(*got), ElementsAreArray(model_ids));
  for (const v1::UsageRecord& r : *got) EXPECT_EQ(r.model(), kGpt5);
  got = by_user.ReadThrough(head, nullptr);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(RequestIds(*got), ElementsAreArray(user_ids));
  for (const v1::UsageRecord& r : *got) EXPECT_EQ(r.user(), "alice");

  // Resuming from that checkpoint's cursor delivers only later records.
  std::int64_t later_head = 0;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<v1::RecordUsageResponse> response =
        Record(*usage_, UsageRecordOf(absl::StrCat("later-", i), now, kFlash, "dave", 1, 1));
    ASSERT_TRUE(response.ok()) << Describe(response.status());
    later_head = std::max(later_head, SeqOf(response->record().cursor()));
  }
  v1::WatchUsageRequest resume = all_request;
  resume.set_cursor(checkpoint);
  WatchStream resumed(channel, resume);
  got = resumed.ReadThrough(later_head, nullptr);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(RequestIds(*got), ElementsAreArray({"later-0", "later-1", "later-2"}));

  // Bad cursors and intervals.
  for (const std::string& bad : {std::string("not a cursor"), std::string("bXZjMTpYWVo"),
                                 server::EncodeCursor(later_head + 1000)}) {
    SCOPED_TRACE(bad);
    v1::WatchUsageRequest request;
    request.set_cursor(bad);
    WatchStream stream(channel, request, absl::Seconds(10));
    v1::WatchUsageResponse message;
    EXPECT_FALSE(stream.Read(&message)) << message.ShortDebugString();
    EXPECT_TRUE(IsError(stream.Finish(), absl::StatusCode::kInvalidArgument, "cursor"));
  }
  for (int interval : {-1, 301}) {
    v1::WatchUsageRequest request;
    request.set_checkpoint_interval_seconds(interval);
    WatchStream stream(channel, request, absl::Seconds(10));
    v1::WatchUsageResponse message;
    EXPECT_FALSE(stream.Read(&message)) << message.ShortDebugString();
    EXPECT_TRUE(IsError(stream.Finish(), absl::StatusCode::kInvalidArgument,
                        "checkpoint_interval_seconds"));
  }
}

// A watcher that stops reading falls behind and is ended with RESOURCE_EXHAUSTED
// (SLOW_CONSUMER); the cursor in the error is where to resume without losing or repeating
// anything: the cursor of the last message the watcher received.
TEST_P(UsageApiTest, SlowWatcherIsEndedWithTheCursorToResumeFrom) {
  ASSERT_NE(StartServer(), nullptr);
  std::shared_ptr<grpc::Channel> channel = servers_.front()->Channel();
  v1::WatchUsageRequest request;
  request.set_checkpoint_interval_seconds(300);
  WatchStream slow(channel, request, absl::Seconds(120));
  v1::WatchUsageResponse message;
  ASSERT_TRUE(slow.Read(&message)) << Describe(slow.Finish());
  ASSERT_TRUE(message.has_checkpoint()) << message.ShortDebugString();

  // Far more records than a stream buffers (8,192 messages, plus what the transport's
  // flow-control windows hold on both sides, several MB), written while the watcher does
  // not read: about 48,000 messages of 0.5 KB.
  constexpr int kRecords = 48'000;
  const absl::Time now = absl::Now();
  std::vector<v1::IngestUsageRequest> batches;
  for (int i = 0; i < kRecords; ++i) {
    if (i % 1000 == 0) {
      batches.emplace_back();
      batches.back().set_batch_id(i);
    }
    // Long ids: big messages fill the transport's buffers sooner (they count bytes, the
    // server's queue counts messages).
    v1::UsageRecord* r = batches.back().add_records();
    *r = UsageRecordOf(absl::StrCat(std::string(100, 's'), i), now - absl::Minutes(i % 100), kGpt5,
                       std::string(120, 'u'), i, 1);
    r->set_conversation(absl::StrCat(std::string(120, 'c'), i));
    r->set_message(absl::StrCat(std::string(120, 'm'), i));
  }
  IngestResult ingested = IngestUntilAcknowledged([&] { return channel; }, batches);
  ASSERT_TRUE(ingested.AllAcknowledged()) << ingested.last_failure;
  const std::int64_t head = SeqOf(ingested.acks.back().cursor());

  std::set<std::string> seen;
  std::string last_cursor = message.cursor();
  int repeated = 0;
  while (static_cast<int>(seen.size()) < kRecords && slow.Read(&message)) {
    if (message.has_record() && !seen.insert(message.record().request_id()).second) ++repeated;
    last_cursor = message.cursor();
  }
  ASSERT_LT(static_cast<int>(seen.size()), kRecords)
      << "the watcher received everything without reading for a while: not a slow consumer";
  const absl::Status ended = slow.Finish();
  ASSERT_TRUE(IsError(ended, absl::StatusCode::kResourceExhausted, "", "SLOW_CONSUMER"));
  const std::string resume = ErrorMetadata(ended, "cursor");
  std::cout << "slow watcher received " << seen.size() << " of " << kRecords
            << " records; last cursor " << SeqOf(last_cursor) << ", resume cursor " << SeqOf(resume)
            << "\n";
  EXPECT_EQ(SeqOf(resume), SeqOf(last_cursor))
      << "the cursor to resume from is not the last one delivered: resuming from it "
      << (SeqOf(resume) > SeqOf(last_cursor) ? "loses" : "repeats") << " records";

  // Resuming from the error's cursor completes the stream, each record once.
  v1::WatchUsageRequest again;
  again.set_cursor(resume);
  again.set_checkpoint_interval_seconds(1);
  WatchStream resumed(channel, again);
  absl::StatusOr<std::vector<v1::UsageRecord>> rest = resumed.ReadThrough(head, nullptr);
  ASSERT_TRUE(rest.ok()) << rest.status();
  for (const v1::UsageRecord& r : *rest) {
    if (!seen.insert(r.request_id()).second) ++repeated;
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kRecords)) << "records lost across the resume";
  EXPECT_EQ(repeated, 0) << "records delivered twice across the resume";
}

// --- 6. QueryUsage ----------------------------------------------------------------------

TEST_P(UsageApiTest, QueryUsageGroupsByDayInATimeZone) {
  ASSERT_NE(StartServer(), nullptr);
  const std::map<std::string, v1::Model> models = Models({kGpt5, kSonnet});
  // New York is UTC-4 in September: 03:30Z is the evening of the 9th there.
  const std::vector<v1::UsageRecord> records = {
      UsageRecordOf("q-1", Utc(2025, 9, 10, 3, 30), kGpt5, "alice", 1000, 100),
      UsageRecordOf("q-2", Utc(2025, 9, 10, 4, 30), kGpt5, "bob", 2000, 200),
      UsageRecordOf("q-3", Utc(2025, 9, 10, 5, 10), kSonnet, "alice", 3000, 300),
      UsageRecordOf("q-4", Utc(2025, 9, 11, 12, 0), kSonnet, "bob", 4000, 400),
      // Outside the range queried.
      UsageRecordOf("q-5", Utc(2025, 9, 12, 0, 0), kSonnet, "bob", 5000, 500),
  };
  std::map<std::string, std::int64_t> cost;
  for (const v1::UsageRecord& r : records) {
    ASSERT_TRUE(Record(*usage_, r).ok());
    cost[r.request_id()] = ExpectedCost(models.at(r.model()), r).nanos;
  }

  v1::QueryUsageRequest query;
  *query.mutable_start_time() = ToTimestamp(Utc(2025, 9, 9, 0));
  *query.mutable_end_time() = ToTimestamp(Utc(2025, 9, 12, 0));
  query.add_group_by(v1::USAGE_DIMENSION_MODEL);
  query.set_bucket(v1::TIME_BUCKET_DAY);
  query.set_time_zone("America/New_York");
  absl::StatusOr<v1::QueryUsageResponse> response = Invoke(*usage_, &UsageStub::QueryUsage, query);
  ASSERT_TRUE(response.ok()) << Describe(response.status());
  struct Group {
    absl::Time bucket;
    std::string model;
    std::vector<std::string> ids;
  };
  const std::vector<Group> want = {
      {Utc(2025, 9, 9, 4), kGpt5, {"q-1"}},
      {Utc(2025, 9, 10, 4), kSonnet, {"q-3"}},
      {Utc(2025, 9, 10, 4), kGpt5, {"q-2"}},
      {Utc(2025, 9, 11, 4), kSonnet, {"q-4"}},
  };
  auto expect_groups = [&](const v1::QueryUsageResponse& got, const std::vector<Group>& groups) {
    ASSERT_EQ(got.groups_size(), static_cast<int>(groups.size())) << got.ShortDebugString();
    std::int64_t total_cost = 0;
    std::int64_t total_requests = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      SCOPED_TRACE(absl::StrCat("group ", g));
      const v1::UsageGroup& group = got.groups(static_cast<int>(g));
      EXPECT_EQ(FromTimestamp(group.bucket_start()), groups[g].bucket) << group.ShortDebugString();
      EXPECT_EQ(group.model(), groups[g].model);
      EXPECT_EQ(group.user(), "");
      EXPECT_EQ(group.provider(), "");
      std::int64_t c = 0;
      std::int64_t input = 0;
      for (const std::string& id : groups[g].ids) {
        c += cost[id];
        for (const v1::UsageRecord& r : records) {
          if (r.request_id() == id) input += r.tokens().input();
        }
      }
      EXPECT_EQ(group.totals().requests(), static_cast<std::int64_t>(groups[g].ids.size()));
      EXPECT_EQ(group.totals().cost_nanos(), c);
      EXPECT_EQ(group.totals().tokens().input(), input);
      total_cost += c;
      total_requests += static_cast<std::int64_t>(groups[g].ids.size());
    }
    EXPECT_EQ(got.totals().requests(), total_requests);
    EXPECT_EQ(got.totals().cost_nanos(), total_cost);
  };
  expect_groups(*response, want);

  // In UTC, q-1 and q-2 fall on the same day.
  query.clear_time_zone();
  response = Invoke(*usage_, &UsageStub::QueryUsage, query);
  ASSERT_TRUE(response.ok()) << Describe(response.status());
  expect_groups(*response, {{Utc(2025, 9, 10, 0), kSonnet, {"q-3"}},
                            {Utc(2025, 9, 10, 0), kGpt5, {"q-1", "q-2"}},
                            {Utc(2025, 9, 11, 0), kSonnet, {"q-4"}}});

  // Invalid queries name their field.
  struct Bad {
    std::string field;
    std::function<void(v1::QueryUsageRequest&)> spoil;
  };
  const std::vector<Bad> bad = {
      {"time_zone", [](v1::QueryUsageRequest& q) { q.set_time_zone("Asia/Kolkata"); }},
      {"time_zone", [](v1::QueryUsageRequest& q) { q.set_time_zone("Mars/Olympus_Mons"); }},
      {"start_time",
       [](v1::QueryUsageRequest& q) {
         *q.mutable_start_time() = ToTimestamp(Utc(2025, 9, 9, 0, 30));
       }},
      {"start_time", [](v1::QueryUsageRequest& q) { q.clear_start_time(); }},
      {"end_time",
       [](v1::QueryUsageRequest& q) { *q.mutable_end_time() = ToTimestamp(Utc(2025, 9, 8, 0)); }},
      {"end_time",
       [](v1::QueryUsageRequest& q) { *q.mutable_end_time() = ToTimestamp(Utc(2029, 9, 9, 0)); }},
      {"group_by[1]", [](v1::QueryUsageRequest& q) { q.add_group_by(v1::USAGE_DIMENSION_MODEL); }},
      {"group_by[1]",
       [](v1::QueryUsageRequest& q) { q.add_group_by(static_cast<v1::UsageDimension>(17)); }},
      {"bucket", [](v1::QueryUsageRequest& q) { q.set_bucket(static_cast<v1::TimeBucket>(9)); }},
  };
  for (const Bad& b : bad) {
    v1::QueryUsageRequest request = query;
    request.set_time_zone("Europe/Paris");
    b.spoil(request);
    SCOPED_TRACE(request.ShortDebugString());
    EXPECT_TRUE(IsError(Invoke(*usage_, &UsageStub::QueryUsage, request).status(),
                        absl::StatusCode::kInvalidArgument, b.field));
  }
  v1::GetCostBreakdownRequest breakdown;
  *breakdown.mutable_start_time() = ToTimestamp(Utc(2025, 9, 9, 0, 15));
  *breakdown.mutable_end_time() = query.end_time();
  EXPECT_TRUE(IsError(Invoke(*usage_, &UsageStub::GetCostBreakdown, breakdown).status(),
                      absl::StatusCode::kInvalidArgument, "start_time"));
}

INSTANTIATE_TEST_SUITE_P(Engines, UsageApiTest, conformance::AllEngines(), conformance::NameGen());
INSTANTIATE_TEST_SUITE_P(Postgres, UsageReplicaTest,
                         ::testing::Values(conformance::EngineParam{"postgres"}),
                         conformance::NameGen());

}  // namespace
}  // namespace modelvault::e2e
