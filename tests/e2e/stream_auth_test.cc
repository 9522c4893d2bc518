// Long-lived streams and the access key that opened them, end to end (the real `modelvault`
// binary on SQLite and PostgreSQL): a stream outlives the check made when it opened, so the
// server checks its key again before every message. A key revoked, expired or rotated past
// its grace after the stream opened:
//   - ends WatchUsage, WatchCatalog and WatchAlerts with the error a new call would get, and
//     no record written after the refusal reaches the watcher;
//   - ends IngestUsage at the next batch, which is neither acknowledged nor stored;
// while streams of other keys (the rotated key's new token) go on; a revocation on one
// replica ends the key's streams on another (PostgreSQL).
//
// Waits poll with generous deadlines; measured delays are printed, never asserted.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/access.grpc.pb.h"
#include "modelvault/v1/budgets.grpc.pb.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/usage.grpc.pb.h"
#include "server/grpc_status.h"
#include "server/proto_time.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/status_checks.h"
#include "tests/e2e/usage_client.h"

namespace modelvault::e2e {
namespace {

using ::modelvault::conformance::EngineTest;
using ::modelvault::testing::Describe;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::IsError;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::ServerProcess;
using ::modelvault::testing::UsageRecordOf;

constexpr absl::Duration kStreamDeadline = absl::Seconds(30);
constexpr absl::Duration kPollDeadline = absl::Seconds(20);
constexpr char kModel[] = "providers/openai/models/gpt-4o";

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout) {
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout));
}

// A server stream read synchronously; its messages are kept.
template <typename Response>
class ServerStream {
 public:
  template <typename Stub, typename Request>
  ServerStream(Stub& stub,
               std::unique_ptr<grpc::ClientReader<Response>> (Stub::*method)(grpc::ClientContext*,
                                                                             const Request&),
               const Request& request) {
    SetDeadline(context_, kStreamDeadline);
    // NOLINTNEXTLINE(cppcoreguidelines-prefer-member-initializer): after the deadline is set
    reader_ = (stub.*method)(&context_, request);
  }
  ServerStream(const ServerStream&) = delete;
  ServerStream& operator=(const ServerStream&) = delete;
  ~ServerStream() {
    if (ended_) return;
    context_.TryCancel();
    Response ignored;
    while (reader_->Read(&ignored)) {
    }
    reader_->Finish();
  }

  // Reads the next message (kept in messages()); false when the stream ended.
  bool Next() {
    Response message;
    if (!reader_->Read(&message)) return false;
    messages_.push_back(std::move(message));
    return true;
  }
  // Reads until the stream ends; returns how it ended.
  absl::Status ReadToEnd() {
    while (Next()) {
    }
    ended_ = true;
    return server::FromGrpcStatus(reader_->Finish());
  }
  const std::vector<Response>& messages() const { return messages_; }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<Response>> reader_;
  std::vector<Response> messages_;
  bool ended_ = false;
};

// An IngestUsage stream driven one batch at a time.
class IngestStream {
 public:
  explicit IngestStream(v1::UsageService::Stub& stub) {
    SetDeadline(context_, kStreamDeadline);
    stream_ = stub.IngestUsage(&context_);
  }
  IngestStream(const IngestStream&) = delete;
  IngestStream& operator=(const IngestStream&) = delete;
  ~IngestStream() {
    if (ended_) return;
    context_.TryCancel();
    stream_->Finish();
  }

  // Sends a batch of one record; its acknowledgement, or nullopt when the stream ended.
  std::optional<v1::IngestUsageResponse> Send(std::int64_t batch_id,
                                              const v1::UsageRecord& record) {
    v1::IngestUsageRequest request;
    request.set_batch_id(batch_id);
    *request.add_records() = record;
    if (!stream_->Write(request)) return std::nullopt;
    v1::IngestUsageResponse ack;
    if (!stream_->Read(&ack)) return std::nullopt;
    return ack;
  }
  absl::Status End() {
    ended_ = true;
    stream_->WritesDone();
    v1::IngestUsageResponse extra;
    while (stream_->Read(&extra)) {
    }
    return server::FromGrpcStatus(stream_->Finish());
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::IngestUsageRequest, v1::IngestUsageResponse>>
      stream_;
  bool ended_ = false;
};

class StreamAuthTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(PrepareDatabase(url()), absl::OkStatus());
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(url(), {"--feed-poll-ms", "100", "--shutdown-timeout", "5"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    admin_access_ = v1::AccessService::NewStub(server_->Channel());
    admin_usage_ = v1::UsageService::NewStub(server_->Channel());
  }

  void TearDown() override {
    admin_access_.reset();
    admin_usage_.reset();
    if (server_ == nullptr || !server_->running()) return;
    const std::string log = server_->Log();
    server_->Stop(SIGTERM, absl::Seconds(15));
    if (HasFailure()) std::cerr << "--- server log ---\n" << log;
  }

  // A key with every scope the streams need; `expire` unset: never expires.
  v1::CreateAccessKeyResponse CreateKey(std::optional<absl::Time> expire = std::nullopt) {
    v1::CreateAccessKeyRequest request;
    request.mutable_access_key()->set_owner("service:dashboard");
    for (v1::Scope s : {v1::SCOPE_USAGE_READ, v1::SCOPE_USAGE_WRITE, v1::SCOPE_CATALOG_READ,
                        v1::SCOPE_BUDGETS_READ}) {
      request.mutable_access_key()->add_scopes(s);
    }
    if (expire.has_value()) {
      *request.mutable_access_key()->mutable_expire_time() = server::ToProto(*expire);
    }
    absl::StatusOr<v1::CreateAccessKeyResponse> created =
        Invoke(*admin_access_, &v1::AccessService::Stub::CreateAccessKey, request);
    EXPECT_TRUE(created.ok()) << Describe(created.status());
    return created.value_or(v1::CreateAccessKeyResponse());
  }

  // A valid call that needs SCOPE_USAGE_READ, made with `token` on `server`.
  static absl::Status Probe(const ServerProcess& server, const std::string& token) {
    auto stub = v1::UsageService::NewStub(server.ChannelWithToken(token));
    v1::ListUsageRecordsRequest request;
    request.set_page_size(1);
    return Invoke(*stub, &v1::UsageService::Stub::ListUsageRecords, request).status();
  }

  // Polls until a call with `token` on `server` is accepted (`accepted`) or refused as
  // unauthenticated; false when that never happens.
  static bool WaitFor(const ServerProcess& server, const std::string& token, bool accepted) {
    const absl::Time start = absl::Now();
    while (absl::Now() - start < kPollDeadline) {
      const absl::Status status = Probe(server, token);
      if (accepted ? status.ok() : absl::IsUnauthenticated(status)) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }

  absl::StatusOr<v1::RecordUsageResponse> RecordAsAdmin(const v1::UsageRecord& record) {
    v1::RecordUsageRequest request;
    *request.mutable_record() = record;
    return Invoke(*admin_usage_, &v1::UsageService::Stub::RecordUsage, request);
  }

  // A second server on the same database and key files (a replica).
  std::unique_ptr<ServerProcess> StartReplica() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> replica =
        ServerProcess::Start(url(), {"--feed-poll-ms", "100", "--shutdown-timeout", "5"});
    EXPECT_TRUE(replica.ok()) << replica.status();
    return replica.ok() ? *std::move(replica) : nullptr;
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<v1::AccessService::Stub> admin_access_;
  std::unique_ptr<v1::UsageService::Stub> admin_usage_;
};

bool HasRecord(const std::vector<v1::WatchUsageResponse>& messages, const std::string& id) {
  return std::ranges::any_of(messages, [&id](const v1::WatchUsageResponse& m) {
    return m.has_record() && m.record().request_id() == id;
  });
}

TEST_P(StreamAuthTest, RevocationEndsEveryStreamOfTheKey) {
  const v1::CreateAccessKeyResponse key = CreateKey();
  ASSERT_FALSE(key.token().empty());
  std::shared_ptr<grpc::Channel> channel = server_->ChannelWithToken(key.token());
  auto usage = v1::UsageService::NewStub(channel);
  auto catalog = v1::CatalogService::NewStub(channel);
  auto budgets = v1::BudgetService::NewStub(channel);

  v1::WatchUsageRequest usage_request;
  usage_request.set_checkpoint_interval_seconds(1);
  v1::WatchCatalogRequest catalog_request;
  catalog_request.set_checkpoint_interval_seconds(1);
  v1::WatchAlertsRequest alerts_request;
  alerts_request.set_checkpoint_interval_seconds(1);
  ServerStream<v1::WatchUsageResponse> usage_watch(*usage, &v1::UsageService::Stub::WatchUsage,
                                                   usage_request);
  ServerStream<v1::WatchCatalogResponse> catalog_watch(
      *catalog, &v1::CatalogService::Stub::WatchCatalog, catalog_request);
  ServerStream<v1::WatchAlertsResponse> alerts_watch(
      *budgets, &v1::BudgetService::Stub::WatchAlerts, alerts_request);
  // Each stream is open and served: its first checkpoint came.
  ASSERT_TRUE(usage_watch.Next());
  ASSERT_TRUE(catalog_watch.Next());
  ASSERT_TRUE(alerts_watch.Next());

  // Before the revocation the key works, and so do its streams: a record reaches the
  // watcher, a batch is acknowledged.
  ASSERT_TRUE(Probe(*server_, key.token()).ok()) << Describe(Probe(*server_, key.token()));
  const absl::Time now = absl::Now();
  ASSERT_TRUE(RecordAsAdmin(UsageRecordOf("before", now, kModel, "alice", 10, 5)).ok());
  IngestStream ingest(*usage);
  std::optional<v1::IngestUsageResponse> first =
      ingest.Send(1, UsageRecordOf("ingest-1", now, kModel, "alice", 1, 1));
  ASSERT_TRUE(first.has_value()) << Describe(ingest.End());
  EXPECT_EQ(first->accepted(), 1);
  while (!HasRecord(usage_watch.messages(), "before")) {
    ASSERT_TRUE(usage_watch.Next()) << "the watch ended before its record came";
  }

  v1::RevokeAccessKeyRequest revoke;
  revoke.set_name(key.access_key().name());
  ASSERT_TRUE(Invoke(*admin_access_, &v1::AccessService::Stub::RevokeAccessKey, revoke).ok());
  const absl::Time revoked_at = absl::Now();
  ASSERT_TRUE(WaitFor(*server_, key.token(), false));
  // Written once the server refuses the key: no stream of that key may deliver it.
  ASSERT_TRUE(RecordAsAdmin(UsageRecordOf("after", now, kModel, "alice", 10, 5)).ok());

  const absl::Status usage_end = usage_watch.ReadToEnd();
  std::cout << "watch_ended_ms_after_revoke=" << absl::ToInt64Milliseconds(absl::Now() - revoked_at)
            << "\n";
  EXPECT_TRUE(IsError(usage_end, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"))
      << Describe(usage_end);
  EXPECT_FALSE(HasRecord(usage_watch.messages(), "after"));
  const absl::Status catalog_end = catalog_watch.ReadToEnd();
  EXPECT_TRUE(IsError(catalog_end, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"))
      << Describe(catalog_end);
  const absl::Status alerts_end = alerts_watch.ReadToEnd();
  EXPECT_TRUE(IsError(alerts_end, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"))
      << Describe(alerts_end);

  // The ingest stream refuses its next batch: no acknowledgement, nothing stored (the same
  // record sent by the admin afterwards is stored as new, not answered as a duplicate).
  const v1::UsageRecord refused = UsageRecordOf("ingest-2", now, kModel, "alice", 1, 1);
  EXPECT_FALSE(ingest.Send(2, refused).has_value());
  const absl::Status ingest_end = ingest.End();
  EXPECT_TRUE(IsError(ingest_end, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"))
      << Describe(ingest_end);
  absl::StatusOr<v1::RecordUsageResponse> stored = RecordAsAdmin(refused);
  ASSERT_TRUE(stored.ok()) << Describe(stored.status());
  EXPECT_FALSE(stored->duplicate()) << "the refused batch was stored";
}

TEST_P(StreamAuthTest, ExpiryEndsAnIdleWatch) {
  const absl::Time expire = absl::Now() + absl::Seconds(3);
  const v1::CreateAccessKeyResponse key = CreateKey(expire);
  ASSERT_FALSE(key.token().empty());
  auto usage = v1::UsageService::NewStub(server_->ChannelWithToken(key.token()));
  v1::WatchUsageRequest request;
  request.set_checkpoint_interval_seconds(1);
  ServerStream<v1::WatchUsageResponse> watch(*usage, &v1::UsageService::Stub::WatchUsage, request);
  ASSERT_TRUE(watch.Next()) << "the watch did not start";

  // Nothing is written: only checkpoints come, until the key expires.
  const absl::Status end = watch.ReadToEnd();
  const absl::Time ended = absl::Now();
  std::cout << "watch_ended_ms_after_expire_time=" << absl::ToInt64Milliseconds(ended - expire)
            << "\n";
  EXPECT_GE(ended, expire) << "ended before the key expired: " << Describe(end);
  EXPECT_TRUE(IsError(end, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_EXPIRED"))
      << Describe(end);
  EXPECT_GE(watch.messages().size(), 2U) << "no checkpoint came while the key was valid";
}

TEST_P(StreamAuthTest, RotationEndsTheOldTokensStreamsAfterTheGrace) {
  const v1::CreateAccessKeyResponse key = CreateKey();
  ASSERT_FALSE(key.token().empty());
  auto old_usage = v1::UsageService::NewStub(server_->ChannelWithToken(key.token()));
  v1::WatchUsageRequest request;
  request.set_checkpoint_interval_seconds(1);
  ServerStream<v1::WatchUsageResponse> old_watch(*old_usage, &v1::UsageService::Stub::WatchUsage,
                                                 request);
  ASSERT_TRUE(old_watch.Next());

  v1::RotateAccessKeyRequest rotate;
  rotate.set_name(key.access_key().name());
  rotate.mutable_grace_period()->set_seconds(2);
  absl::StatusOr<v1::CreateAccessKeyResponse> rotated =
      Invoke(*admin_access_, &v1::AccessService::Stub::RotateAccessKey, rotate);
  ASSERT_TRUE(rotated.ok()) << Describe(rotated.status());
  const absl::Time grace_end =
      server::FromProto(rotated->access_key().previous_token_expire_time());
  auto new_usage = v1::UsageService::NewStub(server_->ChannelWithToken(rotated->token()));
  ServerStream<v1::WatchUsageResponse> new_watch(*new_usage, &v1::UsageService::Stub::WatchUsage,
                                                 request);
  ASSERT_TRUE(new_watch.Next());

  const absl::Status old_end = old_watch.ReadToEnd();
  const absl::Time ended = absl::Now();
  std::cout << "old_token_watch_ended_ms_after_grace="
            << absl::ToInt64Milliseconds(ended - grace_end) << "\n";
  EXPECT_GE(ended, grace_end) << "ended within the grace: " << Describe(old_end);
  EXPECT_TRUE(IsError(old_end, absl::StatusCode::kUnauthenticated, "", "INVALID_ACCESS_KEY"))
      << Describe(old_end);
  // The new token's stream goes on: two more checkpoints after the old one ended.
  const size_t seen = new_watch.messages().size();
  ASSERT_TRUE(new_watch.Next());
  ASSERT_TRUE(new_watch.Next());
  EXPECT_EQ(new_watch.messages().size(), seen + 2);
}

class StreamAuthReplicaTest : public StreamAuthTest {};

// Revoked on replica A: a stream of that key on replica B ends once B has the change from
// the feed (at its next message; checkpoints come every second).
TEST_P(StreamAuthReplicaTest, RevocationOnOneReplicaEndsTheStreamsOnAnother) {
  std::unique_ptr<ServerProcess> replica = StartReplica();
  ASSERT_NE(replica, nullptr);
  const v1::CreateAccessKeyResponse key = CreateKey();
  ASSERT_FALSE(key.token().empty());
  ASSERT_TRUE(WaitFor(*replica, key.token(), true)) << "B never accepted a key created on A";
  auto on_b = v1::UsageService::NewStub(replica->ChannelWithToken(key.token()));
  v1::WatchUsageRequest request;
  request.set_checkpoint_interval_seconds(1);
  ServerStream<v1::WatchUsageResponse> watch(*on_b, &v1::UsageService::Stub::WatchUsage, request);
  ASSERT_TRUE(watch.Next());

  v1::RevokeAccessKeyRequest revoke;
  revoke.set_name(key.access_key().name());
  ASSERT_TRUE(Invoke(*admin_access_, &v1::AccessService::Stub::RevokeAccessKey, revoke).ok());
  const absl::Time revoked_at = absl::Now();
  const absl::Status end = watch.ReadToEnd();
  std::cout << "replica_watch_ended_ms_after_revoke="
            << absl::ToInt64Milliseconds(absl::Now() - revoked_at) << "\n";
  EXPECT_TRUE(IsError(end, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"))
      << Describe(end);
  replica->Stop(SIGTERM, absl::Seconds(15));
}

INSTANTIATE_TEST_SUITE_P(Engines, StreamAuthTest, conformance::AllEngines(),
                         conformance::NameGen());
INSTANTIATE_TEST_SUITE_P(Postgres, StreamAuthReplicaTest,
                         ::testing::Values(conformance::EngineParam{"postgres"}),
                         conformance::NameGen());

}  // namespace
}  // namespace modelvault::e2e
