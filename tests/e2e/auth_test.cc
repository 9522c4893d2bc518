// Authentication and authorization end to end: the real `modelvault` binary on a fresh SQLite or
// PostgreSQL database per test.
//
//   - every method of every modelvault service the server serves (listed through server
//     reflection, described by the compiled descriptors, never by a list written here) refuses
//     calls without a key, with a malformed key and with a key lacking its declared scope, and
//     accepts a key holding that scope or one that implies it;
//   - access keys: tokens shown once and never stored or returned again, rotation with a grace
//     period, revocation, expiry, VerifyAccessKey, bad input, last-use times;
//   - replicas (PostgreSQL) see revocations and new keys;
//   - the bootstrap admin key: one key, one 0600 file, written once, also with concurrent
//     first starts.
//
// Waits poll with generous deadlines; measured delays are printed, never asserted.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <fstream>
#include <functional>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/unknown_field_set.h"
#include "google/protobuf/util/time_util.h"
#include "google/rpc/error_details.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/access.grpc.pb.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/credentials.grpc.pb.h"
#include "modelvault/v1/options.pb.h"
#include "modelvault/v1/types.pb.h"
#include "server/crypto/access_token.h"
#include "server/grpc_status.h"
#include "server/scopes.h"
#include "storage/status_details.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/status_checks.h"

namespace modelvault::e2e {
namespace {

using ::google::protobuf::util::TimeUtil;
using ::modelvault::conformance::EngineTest;
using ::modelvault::testing::Describe;
using ::modelvault::testing::ErrorMetadata;
using ::modelvault::testing::FieldsOf;
using ::modelvault::testing::IsError;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::ServerProcess;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using AccessStub = v1::AccessService::Stub;
using CatalogStub = v1::CatalogService::Stub;

// Guards every call and wait against a hung server; never part of an assertion.
constexpr absl::Duration kCallTimeout = absl::Seconds(20);
constexpr absl::Duration kPollDeadline = absl::Seconds(15);

// --- Errors -----------------------------------------------------------------------------

// --- Calls ------------------------------------------------------------------------------

void SetDeadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(kCallTimeout));
}

// One unary call whose `authorization` metadata is `Bearer <token>` (none when empty).
template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> InvokeAs(const std::string& token, Stub& stub,
                                  grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&,
                                                               Response*),
                                  const Request& request) {
  grpc::ClientContext context;
  SetDeadline(context);
  if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
  Response response;
  const grpc::Status status = (stub.*method)(&context, request, &response);
  if (!status.ok()) return server::FromGrpcStatus(status);
  return response;
}

std::string BytesOf(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// A raw unary call through grpc::GenericStub with `authorization` metadata as given.
absl::Status RawUnary(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                      const std::string& authorization) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  SetDeadline(context);
  if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  grpc::Slice empty("");  // an empty message: every field at its default
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  return server::FromGrpcStatus(done.get_future().get());
}

// A raw streaming call through grpc::GenericStub: sends one request, reads up to
// `max_messages` messages (then cancels) and reports them with the final status.
class RawStream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  RawStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
            const std::string& request, const std::string& authorization, size_t max_messages)
      : stub_(channel), max_messages_(max_messages) {
    SetDeadline(context_);
    if (!authorization.empty()) context_.AddMetadata("authorization", authorization);
    grpc::Slice slice(request);
    request_ = grpc::ByteBuffer(&slice, 1);
    stub_.PrepareBidiStreamingCall(&context_, method, grpc::StubOptions(), this);
    StartWriteLast(&request_, grpc::WriteOptions());
    StartRead(&response_);
    StartCall();
  }

  // Waits for the end of the call.
  std::pair<std::vector<std::string>, grpc::Status> Wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return done_; });
    return {messages_, status_};
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    bool enough = false;
    {
      std::lock_guard lock(mu_);
      messages_.push_back(BytesOf(response_));
      enough = messages_.size() >= max_messages_;
    }
    if (enough) {
      context_.TryCancel();
    } else {
      StartRead(&response_);
    }
  }
  void OnDone(const grpc::Status& status) override {
    std::lock_guard lock(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }

 private:
  grpc::GenericStub stub_;
  grpc::ClientContext context_;
  const size_t max_messages_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;                  // guarded by mu_
  std::vector<std::string> messages_;  // guarded by mu_
  grpc::Status status_;                // guarded by mu_
};

// A method as the server serves it, with the scope its descriptor declares.
struct Method {
  std::string path;  // "/pkg.Service/Method"
  const google::protobuf::MethodDescriptor* descriptor = nullptr;
  v1::Scope required = v1::SCOPE_UNSPECIFIED;
};

// Calls `method` with an empty request. A streaming call that delivers a first message counts
// as accepted (OK); otherwise its final status is the answer.
absl::Status RawCall(const std::shared_ptr<grpc::Channel>& channel, const Method& method,
                     const std::string& authorization) {
  if (!method.descriptor->client_streaming() && !method.descriptor->server_streaming()) {
    return RawUnary(channel, method.path, authorization);
  }
  RawStream call(channel, method.path, "", authorization, 1);
  auto [messages, status] = call.Wait();
  if (!messages.empty()) return absl::OkStatus();
  return server::FromGrpcStatus(status);
}

// The names of the services the server serves, through server reflection (raw protobuf: the
// reflection protos are not part of Debian's gRPC headers).
std::vector<std::string> ServedServices(const std::shared_ptr<grpc::Channel>& channel) {
  using google::protobuf::UnknownField;
  using google::protobuf::UnknownFieldSet;
  // ServerReflectionRequest{list_services (7): "*"}
  RawStream call(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                 std::string("\x3a\x01*", 3), "", 1);
  auto [messages, status] = call.Wait();
  std::vector<std::string> names;
  if (messages.empty()) {
    ADD_FAILURE() << "server reflection answered nothing: " << server::FromGrpcStatus(status);
    return names;
  }
  // ServerReflectionResponse{list_services_response (6): {service (1): {name (1)}}}
  auto fields_of = [](const std::string& bytes, int number) {
    std::vector<std::string> out;
    UnknownFieldSet set;
    if (!set.ParseFromString(bytes)) return out;
    for (int i = 0; i < set.field_count(); ++i) {
      const UnknownField& f = set.field(i);
      if (f.number() == number && f.type() == UnknownField::TYPE_LENGTH_DELIMITED) {
        out.push_back(f.length_delimited());
      }
    }
    return out;
  };
  for (const std::string& list : fields_of(messages.front(), 6)) {
    for (const std::string& service : fields_of(list, 1)) {
      for (const std::string& name : fields_of(service, 1)) names.push_back(name);
    }
  }
  return names;
}

// Every method of every served modelvault.* service, from the compiled descriptors.
std::vector<Method> ServedMethods(const std::shared_ptr<grpc::Channel>& channel) {
  std::vector<Method> methods;
  for (const std::string& service_name : ServedServices(channel)) {
    if (!absl::StartsWith(service_name, "modelvault.")) continue;  // health, reflection
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service_name);
    if (service == nullptr) {
      ADD_FAILURE() << "the server serves " << service_name
                    << ", whose descriptor is not linked into this test";
      continue;
    }
    for (int i = 0; i < service->method_count(); ++i) {
      Method m;
      m.descriptor = service->method(i);
      m.path = absl::StrCat("/", service->full_name(), "/", m.descriptor->name());
      if (m.descriptor->options().HasExtension(v1::required_scope)) {
        m.required = m.descriptor->options().GetExtension(v1::required_scope);
      }
      methods.push_back(m);
    }
  }
  return methods;
}

// The scope implications options.proto documents, restated here independently of the server.
bool ShouldGrant(v1::Scope held, v1::Scope required) {
  if (required == v1::SCOPE_UNSPECIFIED) return false;
  return held == required || held == v1::SCOPE_ADMIN ||
         (held == v1::SCOPE_CATALOG_WRITE && required == v1::SCOPE_CATALOG_READ) ||
         (held == v1::SCOPE_CREDENTIALS_WRITE && required == v1::SCOPE_CREDENTIALS_READ) ||
         (held == v1::SCOPE_BUDGETS_WRITE && required == v1::SCOPE_BUDGETS_READ);
}

// Every scope of the Scope enum but UNSPECIFIED, from its descriptor.
std::vector<v1::Scope> AllScopes() {
  std::vector<v1::Scope> scopes;
  const google::protobuf::EnumDescriptor* e = v1::Scope_descriptor();
  for (int i = 0; i < e->value_count(); ++i) {
    if (e->value(i)->number() != v1::SCOPE_UNSPECIFIED) {
      scopes.push_back(static_cast<v1::Scope>(e->value(i)->number()));
    }
  }
  return scopes;
}

// --- Tokens, times, searching -----------------------------------------------------------

// `token` with its last (checksum) character changed: still well-formed, never valid.
std::string WithBadChecksum(std::string token) {
  token.back() = token.back() == 'a' ? 'b' : 'a';
  return token;
}

std::string IdOf(const std::string& key_name) {
  return std::string(absl::StripPrefix(key_name, "accessKeys/"));
}

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::MicrosecondsToTimestamp(absl::ToUnixMicros(t));
}
absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixMicros(TimeUtil::TimestampToMicroseconds(t));
}

// Polls `done` every `interval` until it returns true; the time that took, or nullopt when
// `deadline` passed first.
std::optional<absl::Duration> PollUntil(const std::function<bool()>& done,
                                        absl::Duration deadline = kPollDeadline,
                                        absl::Duration interval = absl::Milliseconds(20)) {
  const absl::Time start = absl::Now();
  while (true) {
    if (done()) return absl::Now() - start;
    if (absl::Now() - start > deadline) return std::nullopt;
    absl::SleepFor(interval);
  }
}

// Serialized bytes and text of messages a test received, to search for secrets.
class Received {
 public:
  void Add(const std::string& label, const google::protobuf::Message& message) {
    items_.emplace_back(label + " (bytes)", message.SerializeAsString());
    items_.emplace_back(label + " (text)", message.DebugString());
  }
  // The labels of the items that contain `needle`.
  std::vector<std::string> Containing(const std::string& needle) const {
    std::vector<std::string> labels;
    for (const auto& [label, bytes] : items_) {
      if (bytes.find(needle) != std::string::npos) labels.push_back(label);
    }
    return labels;
  }

 private:
  std::vector<std::pair<std::string, std::string>> items_;
};

// The first column of every row of `sql`, read as text, with a connection of its own.
absl::StatusOr<std::vector<std::string>> QueryTexts(const std::string& url,
                                                    const std::string& sql) {
  storage::DatastoreOptions options;
  options.pool_size = 1;
  absl::StatusOr<std::unique_ptr<storage::Datastore>> datastore =
      storage::OpenDatastore(url, options);
  if (!datastore.ok()) return datastore.status();
  std::vector<std::string> out;
  absl::Status status = (*datastore)->Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<storage::SqlRow>> rows =
        reader.Query(sql, {}, {storage::SqlType::kText});
    if (!rows.ok()) return rows.status();
    for (const storage::SqlRow& row : *rows) out.push_back(storage::CellText(row[0]));
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// --- Fixture ----------------------------------------------------------------------------

// Stubs on a channel without a token: every call names its key in its own metadata.
struct Client {
  explicit Client(const ServerProcess& server)
      : channel(server.ChannelWithToken("")),
        catalog(v1::CatalogService::NewStub(channel)),
        access(v1::AccessService::NewStub(channel)) {}
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<CatalogStub> catalog;
  std::unique_ptr<AccessStub> access;
};

class AuthTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(PrepareDatabase(url(), /*seed=*/false), absl::OkStatus());
    ASSERT_NO_FATAL_FAILURE(StartServer());
  }

  void TearDown() override {
    // Clients first: a server's graceful shutdown waits for open connections.
    clients_.clear();
    for (auto& server : servers_) {
      if (!server->running()) continue;
      EXPECT_EQ(server->Stop(SIGTERM), 0) << "modelvault serve did not stop cleanly";
      if (HasFailure()) std::cerr << "--- server log ---\n" << server->Log() << "---\n";
    }
  }

  // Starts one more server on the test database (replicas share it and its key files).
  void StartServer() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(url(), {"--feed-poll-ms", "100"});
    ASSERT_TRUE(server.ok()) << server.status();
    servers_.push_back(*std::move(server));
    clients_.push_back(std::make_unique<Client>(*servers_.back()));
  }

  ServerProcess& server(size_t i = 0) { return *servers_.at(i); }
  Client& client(size_t i = 0) { return *clients_.at(i); }
  const std::string& admin() { return server().token(); }

  absl::StatusOr<v1::CreateAccessKeyResponse> CreateKey(
      const std::vector<v1::Scope>& scopes, const std::string& owner = "service:e2e",
      std::optional<absl::Time> expire = std::nullopt, const std::string& request_id = "") {
    v1::CreateAccessKeyRequest request;
    request.mutable_access_key()->set_display_name("e2e key");
    request.mutable_access_key()->set_owner(owner);
    for (v1::Scope s : scopes) request.mutable_access_key()->add_scopes(s);
    if (expire.has_value()) *request.mutable_access_key()->mutable_expire_time() = ToProto(*expire);
    request.set_request_id(request_id);
    return InvokeAs(admin(), *client().access, &AccessStub::CreateAccessKey, request);
  }
  absl::StatusOr<v1::AccessKey> GetKey(const std::string& name) {
    v1::GetAccessKeyRequest request;
    request.set_name(name);
    return InvokeAs(admin(), *client().access, &AccessStub::GetAccessKey, request);
  }
  absl::StatusOr<v1::ListAccessKeysResponse> ListKeys(size_t on = 0) {
    v1::ListAccessKeysRequest request;
    request.set_page_size(1000);
    return InvokeAs(admin(), *client(on).access, &AccessStub::ListAccessKeys, request);
  }
  absl::StatusOr<v1::AccessKey> Revoke(const std::string& name) {
    v1::RevokeAccessKeyRequest request;
    request.set_name(name);
    return InvokeAs(admin(), *client().access, &AccessStub::RevokeAccessKey, request);
  }
  absl::StatusOr<v1::CreateAccessKeyResponse> Rotate(const std::string& name,
                                                     absl::Duration grace) {
    v1::RotateAccessKeyRequest request;
    request.set_name(name);
    request.mutable_grace_period()->set_seconds(absl::ToInt64Seconds(grace));
    return InvokeAs(admin(), *client().access, &AccessStub::RotateAccessKey, request);
  }
  absl::StatusOr<v1::VerifyAccessKeyResponse> Verify(const std::string& caller,
                                                     const std::string& token) {
    v1::VerifyAccessKeyRequest request;
    request.set_token(token);
    return InvokeAs(caller, *client().access, &AccessStub::VerifyAccessKey, request);
  }
  // A call that needs SCOPE_CATALOG_READ, made with `token` on server `on`.
  absl::Status Probe(const std::string& token, size_t on = 0) {
    v1::ListProvidersRequest request;
    return InvokeAs(token, *client(on).catalog, &CatalogStub::ListProviders, request).status();
  }
  // Access keys in the database, counted with SQL.
  std::int64_t KeyRows() {
    absl::StatusOr<std::int64_t> n = QueryInt("SELECT COUNT(*) FROM access_keys");
    EXPECT_TRUE(n.ok()) << n.status();
    return n.value_or(-1);
  }

  std::vector<std::unique_ptr<ServerProcess>> servers_;
  std::vector<std::unique_ptr<Client>> clients_;
};

// --- 1. Every served method enforces its declared scope ----------------------------------

TEST_P(AuthTest, EveryServedMethodEnforcesItsDeclaredScope) {
  const std::vector<Method> methods = ServedMethods(client().channel);
  ASSERT_FALSE(HasFailure());
  ASSERT_FALSE(methods.empty()) << "reflection listed no modelvault service";
  // What is served is exactly what the server's scope table (server::AllMethods) knows.
  std::set<std::string> served;
  for (const Method& m : methods) served.insert(m.path);
  const std::vector<std::string> all = server::AllMethods();
  EXPECT_EQ(served, std::set<std::string>(all.begin(), all.end()));

  // One key per scope of the enum.
  std::map<v1::Scope, std::string> tokens;
  for (v1::Scope scope : AllScopes()) {
    absl::StatusOr<v1::CreateAccessKeyResponse> key = CreateKey({scope});
    ASSERT_TRUE(key.ok()) << v1::Scope_Name(scope) << ": " << key.status();
    tokens[scope] = key->token();
  }
  const std::string bad_checksum = WithBadChecksum(tokens.begin()->second);

  int granted = 0;
  int denied = 0;
  for (const Method& m : methods) {
    SCOPED_TRACE(m.path);
    EXPECT_NE(m.required, v1::SCOPE_UNSPECIFIED) << m.path << " declares no required_scope";
    EXPECT_TRUE(IsError(RawCall(client().channel, m, ""), absl::StatusCode::kUnauthenticated, "",
                        "MISSING_ACCESS_KEY"))
        << "without authorization metadata";
    EXPECT_TRUE(IsError(RawCall(client().channel, m, "Bearer " + bad_checksum),
                        absl::StatusCode::kUnauthenticated, "", "INVALID_ACCESS_KEY"))
        << "with a bad checksum";
    for (const auto& [scope, token] : tokens) {
      SCOPED_TRACE(absl::StrCat("key with ", v1::Scope_Name(scope), ", method needs ",
                                v1::Scope_Name(m.required)));
      const absl::Status status = RawCall(client().channel, m, "Bearer " + token);
      if (ShouldGrant(scope, m.required)) {
        ++granted;
        EXPECT_NE(status.code(), absl::StatusCode::kUnauthenticated) << Describe(status);
        EXPECT_NE(status.code(), absl::StatusCode::kPermissionDenied) << Describe(status);
        EXPECT_NE(status.code(), absl::StatusCode::kUnimplemented) << Describe(status);
      } else {
        ++denied;
        EXPECT_TRUE(IsError(status, absl::StatusCode::kPermissionDenied, "", "MISSING_SCOPE"));
        EXPECT_EQ(ErrorMetadata(status, "scope"), v1::Scope_Name(m.required)) << Describe(status);
      }
    }
  }
  // Every method was both granted and refused by some key.
  EXPECT_GE(granted, static_cast<int>(methods.size()));
  EXPECT_GE(denied, static_cast<int>(methods.size()));
  std::cout << "methods=" << methods.size() << " keys=" << tokens.size() << " granted=" << granted
            << " denied=" << denied << "\n";
}

// --- 2. Invalid tokens all look alike -----------------------------------------------------

TEST_P(AuthTest, UnknownKeyIdAndWrongSecretAreIndistinguishable) {
  absl::StatusOr<v1::CreateAccessKeyResponse> key = CreateKey({v1::SCOPE_CATALOG_READ});
  ASSERT_TRUE(key.ok()) << key.status();
  const std::string id = IdOf(key->access_key().name());
  const std::string unknown_id = crypto::NewAccessToken(crypto::NewAccessKeyId());
  const std::string wrong_secret = crypto::NewAccessToken(id);
  ASSERT_NE(wrong_secret, key->token());
  ASSERT_TRUE(crypto::ParseAccessToken(unknown_id).ok());
  ASSERT_TRUE(crypto::ParseAccessToken(wrong_secret).ok());

  const absl::Status by_unknown_id = Probe(unknown_id);
  const absl::Status by_wrong_secret = Probe(wrong_secret);
  const absl::Status by_bad_checksum = Probe(WithBadChecksum(key->token()));
  for (const absl::Status& s : {by_unknown_id, by_wrong_secret, by_bad_checksum}) {
    EXPECT_TRUE(IsError(s, absl::StatusCode::kUnauthenticated, "", "INVALID_ACCESS_KEY"));
    EXPECT_THAT(std::string(s.message()), ::testing::Not(HasSubstr(id)));
  }
  EXPECT_EQ(by_unknown_id.message(), by_wrong_secret.message());
  EXPECT_EQ(by_unknown_id.message(), by_bad_checksum.message());
  EXPECT_EQ(by_unknown_id.GetPayload(kErrorInfoUrl), by_wrong_secret.GetPayload(kErrorInfoUrl));

  // Revocation is told only to the holder of the right secret.
  ASSERT_TRUE(Revoke(key->access_key().name()).ok());
  const absl::Status revoked_wrong_secret = Probe(wrong_secret);
  EXPECT_TRUE(
      IsError(revoked_wrong_secret, absl::StatusCode::kUnauthenticated, "", "INVALID_ACCESS_KEY"));
  EXPECT_EQ(revoked_wrong_secret.message(), by_unknown_id.message());
  EXPECT_TRUE(
      IsError(Probe(key->token()), absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"));

  // Metadata that is not a bearer token.
  v1::ListProvidersRequest request;
  for (const std::string& header : {std::string("Basic dXNlcjpwdw=="), std::string("Bearer "),
                                    absl::StrCat("Token ", admin())}) {
    grpc::ClientContext context;
    SetDeadline(context);
    context.AddMetadata("authorization", header);
    v1::ListProvidersResponse response;
    const absl::Status status =
        server::FromGrpcStatus(client().catalog->ListProviders(&context, request, &response));
    EXPECT_TRUE(IsError(status, absl::StatusCode::kUnauthenticated, "", "MISSING_ACCESS_KEY"))
        << header;
  }
}

// --- 3. Access keys -----------------------------------------------------------------------

TEST_P(AuthTest, TokenIsShownOnlyOnCreateAndNeverStored) {
  Received received;
  absl::StatusOr<v1::CreateAccessKeyResponse> created =
      CreateKey({v1::SCOPE_CATALOG_READ, v1::SCOPE_ACCESS_VERIFY}, "user:alice");
  ASSERT_TRUE(created.ok()) << created.status();
  const v1::AccessKey& key = created->access_key();
  const std::string token = created->token();
  ASSERT_TRUE(absl::StartsWith(key.name(), "accessKeys/")) << key.name();
  const std::string id = IdOf(key.name());
  EXPECT_EQ(id.size(), crypto::kAccessKeyIdLength);

  // mv_<id>_<52 base32 secret><7 base32 checksum>; the prefix shows 4 secret characters.
  const std::string head = absl::StrCat("mv_", id, "_");
  ASSERT_TRUE(absl::StartsWith(token, head)) << token;
  const std::string secret = token.substr(head.size());
  EXPECT_EQ(secret.size(), 59u) << token;
  EXPECT_EQ(secret.find_first_not_of("abcdefghijklmnopqrstuvwxyz234567"), std::string::npos)
      << token;
  EXPECT_EQ(key.token_prefix(), token.substr(0, head.size() + 4));
  const std::string hidden = token.substr(key.token_prefix().size());  // never shown again
  EXPECT_EQ(key.owner(), "user:alice");
  EXPECT_THAT(key.scopes(), ElementsAre(v1::SCOPE_CATALOG_READ, v1::SCOPE_ACCESS_VERIFY));
  EXPECT_TRUE(key.has_create_time());
  EXPECT_FALSE(key.has_revoke_time());
  EXPECT_FALSE(key.has_last_used_time());
  received.Add("CreateAccessKey access_key", key);

  // The token works.
  EXPECT_TRUE(Probe(token).ok()) << Probe(token);

  // Get and List show the prefix only.
  absl::StatusOr<v1::AccessKey> got = GetKey(key.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->token_prefix(), key.token_prefix());
  EXPECT_EQ(got->owner(), "user:alice");
  received.Add("GetAccessKey", *got);
  absl::StatusOr<v1::ListAccessKeysResponse> list = ListKeys();
  ASSERT_TRUE(list.ok()) << list.status();
  bool listed = false;
  for (const v1::AccessKey& k : list->access_keys()) listed |= k.name() == key.name();
  EXPECT_TRUE(listed) << list->ShortDebugString();
  received.Add("ListAccessKeys", *list);
  // A retried create (same request_id) returns the key but not a token.
  absl::StatusOr<v1::CreateAccessKeyResponse> first =
      CreateKey({v1::SCOPE_CATALOG_READ}, "user:alice", std::nullopt, "retry-1");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->token().empty());
  absl::StatusOr<v1::CreateAccessKeyResponse> retried =
      CreateKey({v1::SCOPE_CATALOG_READ}, "user:alice", std::nullopt, "retry-1");
  ASSERT_TRUE(retried.ok()) << retried.status();
  EXPECT_EQ(retried->access_key().name(), first->access_key().name());
  EXPECT_EQ(retried->token(), "") << "a replayed create repeated the token";
  received.Add("replayed CreateAccessKey", *retried);
  const std::string first_hidden = first->token().substr(first->access_key().token_prefix().size());

  // Neither the token, its secret part, nor a stored hash (hex or raw) is in any response.
  absl::StatusOr<std::vector<std::string>> hashes =
      QueryTexts(url(), "SELECT token_hash FROM access_keys");
  ASSERT_TRUE(hashes.ok()) << hashes.status();
  std::vector<std::string> needles = {token, secret, hidden, first->token(), first_hidden};
  for (const std::string& hash : *hashes) {
    ASSERT_EQ(hash.size(), 64u) << "token_hash is not a 64-digit hex hash";
    needles.push_back(hash);
    needles.push_back(absl::HexStringToBytes(hash));
  }
  for (const std::string& needle : needles) {
    EXPECT_THAT(received.Containing(needle), ::testing::IsEmpty()) << "found " << needle;
  }
  // The database keeps no token: not in the key rows, the change feed, or request records.
  for (const std::string& table_column :
       {std::string("access_keys.token_hash"), std::string("access_keys.token_prefix"),
        std::string("changes.resource"), std::string("request_ids.response")}) {
    const std::string table = table_column.substr(0, table_column.find('.'));
    const std::string column = table_column.substr(table_column.find('.') + 1);
    for (const std::string& needle : {hidden, first_hidden}) {
      absl::StatusOr<std::int64_t> n = QueryInt(absl::StrCat(
          "SELECT COUNT(*) FROM ", table, " WHERE ", column, " LIKE '%", needle, "%'"));
      ASSERT_TRUE(n.ok()) << n.status();
      EXPECT_EQ(*n, 0) << "a token is stored in " << table_column;
    }
  }
}

TEST_P(AuthTest, RotationKeepsTheOldTokenForItsGracePeriod) {
  absl::StatusOr<v1::CreateAccessKeyResponse> created = CreateKey({v1::SCOPE_CATALOG_READ});
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string name = created->access_key().name();
  const std::string old_token = created->token();

  absl::StatusOr<v1::CreateAccessKeyResponse> rotated = Rotate(name, absl::Seconds(2));
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  const absl::Time rotate_time = absl::Now();
  const std::string new_token = rotated->token();
  EXPECT_NE(new_token, old_token);
  EXPECT_TRUE(absl::StartsWith(new_token, absl::StrCat("mv_", IdOf(name), "_"))) << new_token;
  EXPECT_EQ(rotated->access_key().token_prefix(), new_token.substr(0, 3 + 16 + 1 + 4));
  EXPECT_TRUE(rotated->access_key().has_previous_token_expire_time());

  // Both work during the grace period (checked at once: the grace is 2 s).
  EXPECT_TRUE(Probe(new_token).ok()) << Probe(new_token);
  const absl::Status old_during_grace = Probe(old_token);
  if (absl::Now() < FromProto(rotated->access_key().previous_token_expire_time())) {
    EXPECT_TRUE(old_during_grace.ok()) << Describe(old_during_grace);
  }

  // After it, only the new one.
  absl::Status old_after;
  std::optional<absl::Duration> ended = PollUntil([&] {
    old_after = Probe(old_token);
    return !old_after.ok();
  });
  ASSERT_TRUE(ended.has_value()) << "the previous token still works long after its grace period";
  std::cout << "previous_token_refused_ms_after_rotation="
            << absl::ToInt64Milliseconds(absl::Now() - rotate_time) << " (grace 2000)\n";
  EXPECT_GE(absl::Now(), FromProto(rotated->access_key().previous_token_expire_time()))
      << "refused before the end of its grace period, " << (absl::Now() - rotate_time);
  EXPECT_TRUE(IsError(old_after, absl::StatusCode::kUnauthenticated, "", "INVALID_ACCESS_KEY"));
  EXPECT_TRUE(Probe(new_token).ok()) << Probe(new_token);

  // A grace period of 0 s ends the previous token at once.
  absl::StatusOr<v1::CreateAccessKeyResponse> again = Rotate(name, absl::ZeroDuration());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(
      IsError(Probe(new_token), absl::StatusCode::kUnauthenticated, "", "INVALID_ACCESS_KEY"));
  EXPECT_TRUE(Probe(again->token()).ok()) << Probe(again->token());
}

TEST_P(AuthTest, RevokedKeyIsRefusedByTheVeryNextCall) {
  absl::StatusOr<v1::CreateAccessKeyResponse> created = CreateKey({v1::SCOPE_CATALOG_READ});
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string name = created->access_key().name();
  ASSERT_TRUE(Probe(created->token()).ok());

  absl::StatusOr<v1::AccessKey> revoked = Revoke(name);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_TRUE(revoked->has_revoke_time());
  const absl::Status next = Probe(created->token());
  EXPECT_TRUE(IsError(next, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"));
  EXPECT_THAT(std::string(next.message()), HasSubstr(name));

  // Revoking again keeps the first revoke_time; a revoked key cannot be rotated back to life.
  absl::StatusOr<v1::AccessKey> again = Revoke(name);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(FromProto(again->revoke_time()), FromProto(revoked->revoke_time()));
  EXPECT_TRUE(
      IsError(Rotate(name, absl::Seconds(60)).status(), absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(IsError(Probe(created->token()), absl::StatusCode::kUnauthenticated, "",
                      "ACCESS_KEY_REVOKED"));
  absl::StatusOr<v1::AccessKey> got = GetKey(name);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->has_revoke_time());
}

TEST_P(AuthTest, KeyIsRefusedAfterItsExpireTime) {
  const absl::Time expire = absl::Now() + absl::Seconds(2);
  absl::StatusOr<v1::CreateAccessKeyResponse> created =
      CreateKey({v1::SCOPE_CATALOG_READ}, "service:e2e", expire);
  ASSERT_TRUE(created.ok()) << created.status();
  const absl::Status before = Probe(created->token());
  if (absl::Now() < expire) {
    EXPECT_TRUE(before.ok()) << Describe(before);
  }

  absl::Status after;
  std::optional<absl::Duration> refused = PollUntil([&] {
    after = Probe(created->token());
    return !after.ok();
  });
  ASSERT_TRUE(refused.has_value()) << "the key still works long after its expire_time";
  const absl::Time refused_at = absl::Now();
  EXPECT_GE(refused_at, expire) << "refused before its expire_time";
  std::cout << "expired_key_refused_ms_after_expire_time="
            << absl::ToInt64Milliseconds(refused_at - expire) << "\n";
  EXPECT_TRUE(IsError(after, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_EXPIRED"));
}

TEST_P(AuthTest, VerifyAccessKeyAnswersValidOrInvalid) {
  absl::StatusOr<v1::CreateAccessKeyResponse> verifier =
      CreateKey({v1::SCOPE_ACCESS_VERIFY}, "service:gateway");
  ASSERT_TRUE(verifier.ok()) << verifier.status();
  const absl::Time expire = absl::Now() + absl::Hours(1);
  absl::StatusOr<v1::CreateAccessKeyResponse> subject =
      CreateKey({v1::SCOPE_CATALOG_READ, v1::SCOPE_CREDENTIALS_USE}, "user:bob", expire);
  ASSERT_TRUE(subject.ok()) << subject.status();
  const std::string caller = verifier->token();

  absl::StatusOr<v1::VerifyAccessKeyResponse> valid = Verify(caller, subject->token());
  ASSERT_TRUE(valid.ok()) << valid.status();
  EXPECT_TRUE(valid->valid());
  EXPECT_EQ(valid->access_key(), subject->access_key().name());
  EXPECT_EQ(valid->owner(), "user:bob");
  EXPECT_THAT(valid->scopes(), ElementsAre(v1::SCOPE_CATALOG_READ, v1::SCOPE_CREDENTIALS_USE));
  ASSERT_TRUE(valid->has_expire_time());
  EXPECT_LE(absl::AbsDuration(FromProto(valid->expire_time()) - expire), absl::Milliseconds(1));
  EXPECT_EQ(valid->SerializeAsString().find(subject->token()), std::string::npos);

  absl::StatusOr<v1::VerifyAccessKeyResponse> admin_key = Verify(caller, admin());
  ASSERT_TRUE(admin_key.ok()) << admin_key.status();
  EXPECT_TRUE(admin_key->valid());
  EXPECT_THAT(admin_key->scopes(), ElementsAre(v1::SCOPE_ADMIN));
  EXPECT_FALSE(admin_key->has_expire_time());

  // Not valid is an answer, and it says nothing else.
  auto expect_invalid = [&](const std::string& label, const std::string& token) {
    absl::StatusOr<v1::VerifyAccessKeyResponse> r = Verify(caller, token);
    ASSERT_TRUE(r.ok()) << label << ": " << r.status();
    EXPECT_FALSE(r->valid()) << label;
    EXPECT_EQ(r->ShortDebugString(), "") << label;
  };
  expect_invalid("garbage", "not-a-token");
  expect_invalid("bad checksum", WithBadChecksum(subject->token()));
  expect_invalid("unknown id", crypto::NewAccessToken(crypto::NewAccessKeyId()));
  expect_invalid("wrong secret", crypto::NewAccessToken(IdOf(subject->access_key().name())));
  ASSERT_TRUE(Revoke(subject->access_key().name()).ok());
  expect_invalid("revoked", subject->token());
  EXPECT_TRUE(IsError(Verify(caller, "").status(), absl::StatusCode::kInvalidArgument, "token"));
}

TEST_P(AuthTest, BadCreateRequestsAreRejectedAndCreateNothing) {
  absl::StatusOr<v1::ListAccessKeysResponse> before = ListKeys();
  ASSERT_TRUE(before.ok()) << before.status();
  const std::int64_t rows_before = KeyRows();
  absl::StatusOr<std::int64_t> changes_before = QueryInt("SELECT COUNT(*) FROM changes");
  ASSERT_TRUE(changes_before.ok()) << changes_before.status();

  struct Case {
    std::string label;
    std::string owner;
    std::vector<int> scopes;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"no owner", "", {v1::SCOPE_CATALOG_READ}, "access_key.owner"},
      {"no scopes", "user:alice", {}, "access_key.scopes"},
      {"owner without kind", "bob", {v1::SCOPE_CATALOG_READ}, "access_key.owner"},
      {"unspecified scope", "user:alice", {v1::SCOPE_UNSPECIFIED}, "access_key.scopes[0]"},
      {"unknown scope", "user:alice", {99}, "access_key.scopes[0]"},
      {"scope twice", "user:alice", {v1::SCOPE_ADMIN, v1::SCOPE_ADMIN}, "access_key.scopes[1]"},
  };
  for (const Case& c : cases) {
    v1::CreateAccessKeyRequest request;
    request.mutable_access_key()->set_owner(c.owner);
    for (int s : c.scopes) request.mutable_access_key()->add_scopes(static_cast<v1::Scope>(s));
    absl::StatusOr<v1::CreateAccessKeyResponse> response =
        InvokeAs(admin(), *client().access, &AccessStub::CreateAccessKey, request);
    EXPECT_TRUE(IsError(response.status(), absl::StatusCode::kInvalidArgument, c.field)) << c.label;
    if (response.ok()) {
      EXPECT_EQ(response->token(), "") << c.label;
    }
  }

  absl::StatusOr<v1::ListAccessKeysResponse> after = ListKeys();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->access_keys_size(), before->access_keys_size()) << after->ShortDebugString();
  EXPECT_EQ(KeyRows(), rows_before);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM changes").value_or(-1), *changes_before);
}

TEST_P(AuthTest, LastUsedTimeIsRecorded) {
  absl::StatusOr<v1::CreateAccessKeyResponse> created = CreateKey({v1::SCOPE_CATALOG_READ});
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string name = created->access_key().name();
  absl::StatusOr<v1::AccessKey> unused = GetKey(name);
  ASSERT_TRUE(unused.ok()) << unused.status();
  EXPECT_FALSE(unused->has_last_used_time()) << "set before any use";

  const absl::Time used = absl::Now();
  ASSERT_TRUE(Probe(created->token()).ok());
  // Written at most every 10 s.
  absl::StatusOr<v1::AccessKey> got;
  std::optional<absl::Duration> recorded = PollUntil(
      [&] {
        got = GetKey(name);
        return got.ok() && got->has_last_used_time();
      },
      absl::Seconds(20), absl::Milliseconds(200));
  ASSERT_TRUE(recorded.has_value())
      << "last_used_time was never written: "
      << (got.ok() ? got->ShortDebugString() : got.status().ToString());
  std::cout << "last_used_time_written_after_ms=" << absl::ToInt64Milliseconds(*recorded) << "\n";
  const absl::Time last_used = FromProto(got->last_used_time());
  EXPECT_GE(last_used, FromProto(created->access_key().create_time()));
  EXPECT_GE(last_used + absl::Milliseconds(1), used);
  EXPECT_LE(last_used, absl::Now());
}

// --- 4. Replicas ------------------------------------------------------------------------

// Replicas share a database only on PostgreSQL: this suite runs there alone.
class AuthReplicaTest : public AuthTest {};

TEST_P(AuthReplicaTest, ReplicasSeeNewAndRevokedKeys) {
  ASSERT_NO_FATAL_FAILURE(StartServer());  // B, on the same database and key files

  // A key created on A works on B.
  absl::StatusOr<v1::CreateAccessKeyResponse> created = CreateKey({v1::SCOPE_CATALOG_READ});
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string token = created->token();
  std::optional<absl::Duration> seen = PollUntil([&] { return Probe(token, 1).ok(); });
  ASSERT_TRUE(seen.has_value()) << "B never accepted a key created on A: " << Probe(token, 1);
  std::cout << "create_propagation_ms=" << absl::ToInt64Milliseconds(*seen) << "\n";

  // Revoked on A: refused by A at once, by B within about a second (asserted: within 10 s).
  ASSERT_TRUE(Revoke(created->access_key().name()).ok());
  const absl::Time revoked_at = absl::Now();
  EXPECT_TRUE(
      IsError(Probe(token, 0), absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"));
  absl::Status on_b;
  std::optional<absl::Duration> refused = PollUntil(
      [&] {
        on_b = Probe(token, 1);
        return !on_b.ok();
      },
      absl::Seconds(10), absl::Milliseconds(5));
  const absl::Duration delay = absl::Now() - revoked_at;
  ASSERT_TRUE(refused.has_value())
      << "B still accepts a key revoked on A after " << absl::FormatDuration(delay);
  std::cout << "revoke_propagation_ms=" << absl::ToInt64Milliseconds(delay) << "\n";
  EXPECT_TRUE(IsError(on_b, absl::StatusCode::kUnauthenticated, "", "ACCESS_KEY_REVOKED"));

  // A rotation on A: the new token works on B, and B ends the old one with a 0 s grace.
  absl::StatusOr<v1::CreateAccessKeyResponse> other = CreateKey({v1::SCOPE_CATALOG_READ});
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE(PollUntil([&] { return Probe(other->token(), 1).ok(); }).has_value());
  absl::StatusOr<v1::CreateAccessKeyResponse> rotated =
      Rotate(other->access_key().name(), absl::ZeroDuration());
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  std::optional<absl::Duration> switched =
      PollUntil([&] { return Probe(rotated->token(), 1).ok() && !Probe(other->token(), 1).ok(); });
  ASSERT_TRUE(switched.has_value()) << "B did not switch to the rotated token";
  std::cout << "rotate_propagation_ms=" << absl::ToInt64Milliseconds(*switched) << "\n";
}

// --- 5. Bootstrap -------------------------------------------------------------------------

TEST_P(AuthTest, BootstrapWritesOneAdminKeyOnce) {
  const std::string path = server().token_file();
  struct stat before;
  ASSERT_EQ(stat(path.c_str(), &before), 0) << path;
  EXPECT_EQ(before.st_mode & 0777, 0600) << "the admin token file is not 0600";
  const std::string content = ReadFile(path);
  EXPECT_EQ(content, admin() + "\n");
  ASSERT_TRUE(crypto::ParseAccessToken(admin()).ok());

  auto expect_one_admin_key = [&](const std::string& when) {
    absl::StatusOr<v1::ListAccessKeysResponse> keys = ListKeys();
    ASSERT_TRUE(keys.ok()) << when << ": " << keys.status();
    ASSERT_EQ(keys->access_keys_size(), 1) << when << ": " << keys->ShortDebugString();
    const v1::AccessKey& key = keys->access_keys(0);
    EXPECT_EQ(key.name(), absl::StrCat("accessKeys/", crypto::ParseAccessToken(admin())->id));
    EXPECT_THAT(key.scopes(), ElementsAre(v1::SCOPE_ADMIN));
    EXPECT_EQ(key.owner(), "service:bootstrap");
    EXPECT_EQ(KeyRows(), 1) << when;
  };
  ASSERT_NO_FATAL_FAILURE(expect_one_admin_key("first start"));

  // A restart neither creates a key nor rewrites the file.
  clients_.clear();
  ASSERT_EQ(server().Stop(SIGTERM), 0) << server().Log();
  servers_.clear();
  ASSERT_NO_FATAL_FAILURE(StartServer());
  ASSERT_NO_FATAL_FAILURE(expect_one_admin_key("after a restart"));
  struct stat after;
  ASSERT_EQ(stat(path.c_str(), &after), 0) << path;
  EXPECT_EQ(after.st_ino, before.st_ino) << "the admin token file was replaced";
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_EQ(ReadFile(path), content);
  EXPECT_TRUE(Probe(admin()).ok());
}

TEST_P(AuthReplicaTest, ConcurrentFirstStartsCreateOneAdminKey) {
  // A database of its own: the fixture's server has bootstrapped the test database already.
  absl::StatusOr<std::unique_ptr<conformance::TestDatabase>> fresh =
      conformance::CreateTestDatabase("postgres");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  const std::string fresh_url = (*fresh)->url();
  ASSERT_EQ(PrepareDatabase(fresh_url, /*seed=*/false), absl::OkStatus());

  // The master key first: the harness makes it on first use, which must not race.
  testing::KeyDirFor(fresh_url);
  auto start = [&] { return ServerProcess::Start(fresh_url, {"--feed-poll-ms", "100"}); };
  std::future<absl::StatusOr<std::unique_ptr<ServerProcess>>> start_a =
      std::async(std::launch::async, start);
  std::future<absl::StatusOr<std::unique_ptr<ServerProcess>>> start_b =
      std::async(std::launch::async, start);
  absl::StatusOr<std::unique_ptr<ServerProcess>> a = start_a.get();
  absl::StatusOr<std::unique_ptr<ServerProcess>> b = start_b.get();
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();

  absl::StatusOr<std::int64_t> keys =
      conformance::QueryInt(fresh_url, "SELECT COUNT(*) FROM access_keys");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(*keys, 1) << "concurrent first starts created " << *keys << " admin keys";

  // The one token in the file works on both (B may learn of A's key through the feed).
  const std::string path = (*a)->token_file();
  struct stat info;
  ASSERT_EQ(stat(path.c_str(), &info), 0) << path;
  EXPECT_EQ(info.st_mode & 0777, 0600);
  const std::string token(absl::StripAsciiWhitespace(ReadFile(path)));
  ASSERT_TRUE(crypto::ParseAccessToken(token).ok()) << "no token in " << path;
  for (ServerProcess* s : {a->get(), b->get()}) {
    std::shared_ptr<grpc::Channel> channel = s->ChannelWithToken("");
    std::unique_ptr<CatalogStub> stub = v1::CatalogService::NewStub(channel);
    absl::Status status;
    std::optional<absl::Duration> works = PollUntil([&] {
      status =
          InvokeAs(token, *stub, &CatalogStub::ListProviders, v1::ListProvidersRequest()).status();
      return status.ok();
    });
    EXPECT_TRUE(works.has_value())
        << "the admin token does not work on one server: " << Describe(status);
  }
  EXPECT_EQ((*a)->Stop(SIGTERM), 0) << (*a)->Log();
  EXPECT_EQ((*b)->Stop(SIGTERM), 0) << (*b)->Log();
}

INSTANTIATE_TEST_SUITE_P(Engines, AuthTest, conformance::AllEngines(), conformance::NameGen());
INSTANTIATE_TEST_SUITE_P(Postgres, AuthReplicaTest,
                         ::testing::Values(conformance::EngineParam{"postgres"}),
                         conformance::NameGen());

}  // namespace
}  // namespace modelvault::e2e
