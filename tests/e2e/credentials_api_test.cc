// CredentialService end to end: the real `modelvault` binary on a fresh SQLite or PostgreSQL
// database per test, driven through the generated stubs.
//
//   - provider keys over RPC: create, acquire, get/list (never the secret), limits, delete,
//     rotation with a grace period, outcomes that cool a key down, bad input;
//   - the canary: planted secrets appear in no response but AcquireProviderKey's, and nowhere
//     at rest (database files, WAL, change feed, request records, server log);
//   - master keys at startup: a wrong or missing master key refuses to start; rotation with
//     RewrapSecrets, then dropping the old version;
//   - TLS and mTLS (SQLite only: the transport does not depend on the engine);
//   - env: and file: secret references.
//
// Waits poll with deadlines; nothing asserts a duration.
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "clients/cpp/channel.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/time_util.h"
#include "google/rpc/error_details.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/credentials.grpc.pb.h"
#include "modelvault/v1/types.pb.h"
#include "server/grpc_status.h"
#include "storage/status_details.h"
#include "tests/conformance/engine.h"
#include "tests/e2e/server_process.h"
#include "tests/e2e/status_checks.h"

namespace modelvault::e2e {
namespace {

using ::google::protobuf::util::TimeUtil;
using ::modelvault::conformance::EngineTest;
using ::modelvault::conformance::RandomHex;
using ::modelvault::testing::CommandResult;
using ::modelvault::testing::Describe;
using ::modelvault::testing::FieldsOf;
using ::modelvault::testing::Invoke;
using ::modelvault::testing::IsError;
using ::modelvault::testing::KeyDirFor;
using ::modelvault::testing::MakeTempDir;
using ::modelvault::testing::ModelvaultBinary;
using ::modelvault::testing::PrepareDatabase;
using ::modelvault::testing::RunModelvault;
using ::modelvault::testing::RunShell;
using ::modelvault::testing::ServerProcess;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using CatalogStub = v1::CatalogService::Stub;
using CredStub = v1::CredentialService::Stub;

// --- Errors -----------------------------------------------------------------------------

// --- Secrets and searching ----------------------------------------------------------------

// A secret no other test (or earlier run) could have written anywhere.
std::string Canary() { return absl::StrCat("sk-canary-", RandomHex(16)); }

// Everything a test received from the server (responses and errors with their details), to
// search for secrets.
class Received {
 public:
  void Add(const std::string& label, const google::protobuf::Message& message) {
    items_.emplace_back(label + " (bytes)", message.SerializeAsString());
    items_.emplace_back(label + " (text)", message.DebugString());
  }
  void Add(const std::string& label, const absl::Status& status) {
    items_.emplace_back(label + " (message)", std::string(status.message()));
    status.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) {
      items_.emplace_back(absl::StrCat(label, " (", url, ")"), std::string(payload));
    });
  }
  // The labels of the items that contain `needle`.
  std::vector<std::string> Containing(const std::string& needle) const {
    std::vector<std::string> labels;
    for (const auto& [label, bytes] : items_) {
      if (bytes.find(needle) != std::string::npos) labels.push_back(label);
    }
    return labels;
  }
  size_t size() const { return items_.size(); }

 private:
  std::vector<std::pair<std::string, std::string>> items_;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text, mode_t mode = 0600) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  ASSERT_EQ(chmod(path.c_str(), mode), 0) << path;
}

// The master-key lines of `path` whose version is `version` ("<version> <base64>").
std::string KeyLine(const std::string& path, int version) {
  for (absl::string_view line : absl::StrSplit(ReadFile(path), '\n')) {
    if (absl::StartsWith(line, absl::StrCat(version, " "))) return absl::StrCat(line, "\n");
  }
  return "";
}

// Runs `modelvault serve` to completion for starts that must fail; `timeout` ends it (exit
// code 124) if it serves instead.
CommandResult ServeExpectingFailure(const std::string& url, const std::vector<std::string>& extra) {
  std::vector<std::string> quoted;
  for (const std::string& a : extra) quoted.push_back(absl::StrCat("'", a, "'"));
  return RunShell(absl::StrCat("timeout 60 '", ModelvaultBinary(), "' serve --database '", url,
                               "' --listen 127.0.0.1:0 ", absl::StrJoin(quoted, " ")));
}

// The secret of an acquisition, or a description of its error (for comparisons).
std::string SecretOf(const absl::StatusOr<v1::AcquireProviderKeyResponse>& acquired) {
  return acquired.ok() ? acquired->secret() : absl::StrCat("error: ", acquired.status().ToString());
}

google::protobuf::Duration Seconds(std::int64_t s) {
  google::protobuf::Duration d;
  d.set_seconds(s);
  return d;
}

// --- Fixture ----------------------------------------------------------------------------

class CredentialsApiTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(PrepareDatabase(url(), /*seed=*/false), absl::OkStatus());
  }

  void TearDown() override {
    if (server_ != nullptr && server_->running()) {
      const std::string log = server_->Log();
      StopServer();
      if (HasFailure()) std::cerr << "--- server log ---\n" << log << "---\n";
    }
  }

  // Starts a server on the test database (its master key in KeyDirFor(url())).
  void Start(const std::vector<std::string>& extra = {}) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(url(), extra);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    UseChannel(server_->Channel());
  }
  // Stubs on `channel` (none when null).
  void UseChannel(std::shared_ptr<grpc::Channel> channel) {
    catalog_.reset();
    creds_.reset();
    channel_ = std::move(channel);
    if (channel_ == nullptr) return;
    catalog_ = v1::CatalogService::NewStub(channel_);
    creds_ = v1::CredentialService::NewStub(channel_);
  }
  // SIGTERM; the clients go first, since a graceful shutdown waits for open connections.
  void StopServer() {
    UseChannel(nullptr);
    EXPECT_EQ(server_->Stop(SIGTERM), 0) << "modelvault serve did not stop cleanly";
  }
  std::string MasterKeyFile() { return KeyDirFor(url()) + "/master.key"; }

  // One call, its answer (response or error) recorded in `received_`.
  template <typename Stub, typename Request, typename Response>
  absl::StatusOr<Response> Call(Stub& stub,
                                grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&,
                                                             Response*),
                                const Request& request) {
    absl::StatusOr<Response> response = Invoke(stub, method, request);
    const std::string label = Request::descriptor()->name();
    if (response.ok()) {
      received_.Add(label, *response);
    } else {
      received_.Add(label, response.status());
    }
    return response;
  }

  absl::Status CreateProvider(const std::string& id) {
    v1::CreateProviderRequest request;
    request.set_provider_id(id);
    request.mutable_provider()->set_display_name(absl::StrCat("Provider ", id));
    request.mutable_provider()->set_base_url(absl::StrCat("https://", id, ".example.com/v1"));
    return Call(*catalog_, &CatalogStub::CreateProvider, request).status();
  }
  absl::StatusOr<v1::ProviderKey> CreateKey(const std::string& provider, const std::string& id,
                                            const std::string& secret,
                                            const std::string& reference = "",
                                            const std::string& request_id = "") {
    v1::CreateProviderKeyRequest request;
    request.set_parent(absl::StrCat("providers/", provider));
    request.set_provider_key_id(id);
    request.mutable_provider_key()->set_display_name(absl::StrCat("Key ", id));
    request.set_secret(secret);
    request.set_secret_reference(reference);
    request.set_request_id(request_id);
    return Call(*creds_, &CredStub::CreateProviderKey, request);
  }
  absl::StatusOr<v1::ProviderKey> GetKey(const std::string& name) {
    v1::GetProviderKeyRequest request;
    request.set_name(name);
    return Call(*creds_, &CredStub::GetProviderKey, request);
  }
  absl::StatusOr<v1::ListProviderKeysResponse> ListKeys(const std::string& parent = "providers/-") {
    v1::ListProviderKeysRequest request;
    request.set_parent(parent);
    request.set_page_size(1000);
    return Call(*creds_, &CredStub::ListProviderKeys, request);
  }
  absl::StatusOr<v1::ProviderKey> RotateKey(const std::string& name, const std::string& secret,
                                            std::int64_t grace_seconds,
                                            const std::string& reference = "") {
    v1::RotateProviderKeyRequest request;
    request.set_name(name);
    request.set_secret(secret);
    request.set_secret_reference(reference);
    *request.mutable_grace_period() = Seconds(grace_seconds);
    return Call(*creds_, &CredStub::RotateProviderKey, request);
  }
  absl::StatusOr<v1::ReportKeyOutcomeResponse> Report(const std::string& key, int outcome,
                                                      std::int64_t retry_after_seconds = 0) {
    v1::ReportKeyOutcomeRequest request;
    request.set_key(key);
    request.set_outcome(static_cast<v1::KeyOutcome>(outcome));
    if (retry_after_seconds > 0) *request.mutable_retry_after() = Seconds(retry_after_seconds);
    return Call(*creds_, &CredStub::ReportKeyOutcome, request);
  }
  // The one call whose responses may hold secrets: only its errors are recorded.
  absl::StatusOr<v1::AcquireProviderKeyResponse> Acquire(const std::string& provider,
                                                         const std::string& key = "",
                                                         std::int64_t version = 0,
                                                         std::int64_t estimated_tokens = 0) {
    v1::AcquireProviderKeyRequest request;
    request.set_provider(provider);
    request.set_key(key);
    request.set_secret_version(version);
    request.set_estimated_tokens(estimated_tokens);
    absl::StatusOr<v1::AcquireProviderKeyResponse> response =
        Invoke(*creds_, &CredStub::AcquireProviderKey, request);
    if (!response.ok()) received_.Add("AcquireProviderKey error", response.status());
    return response;
  }

  // The files of the SQLite test database: the database, and -wal and -shm when present.
  std::vector<std::string> SqliteFiles() {
    const std::string db = std::string(absl::StripPrefix(url(), "sqlite3://db="));
    std::vector<std::string> files;
    for (const std::string suffix : {"", "-wal", "-shm"}) {
      if (std::filesystem::exists(db + suffix)) files.push_back(db + suffix);
    }
    return files;
  }

  // Searches every file under `paths` for each of `needles`, after checking that `control`
  // is found there (so that an unreadable or wrong place cannot pass).
  void ExpectNotAtRest(const std::vector<std::string>& paths, const std::string& control,
                       const std::vector<std::string>& needles) {
    std::string quoted;
    for (const std::string& p : paths) absl::StrAppend(&quoted, " '", p, "'");
    const CommandResult found_control =
        RunShell(absl::StrCat("grep -rlaFs -e '", control, "'", quoted));
    ASSERT_EQ(found_control.exit_code, 0)
        << control << " was not found at rest in" << quoted
        << "; the search cannot be trusted: " << found_control.output;
    for (const std::string& needle : needles) {
      const CommandResult found = RunShell(absl::StrCat("grep -rlaFs -e '", needle, "'", quoted));
      EXPECT_EQ(found.output, "") << needle << " is stored in these files";
      EXPECT_NE(found.exit_code, 0) << needle << " is stored at rest";
    }
  }

  std::int64_t Count(const std::string& sql) {
    absl::StatusOr<std::int64_t> n = QueryInt(sql);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.value_or(-1);
  }

  std::unique_ptr<ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<CatalogStub> catalog_;
  std::unique_ptr<CredStub> creds_;
  Received received_;
};

// --- 1. Provider keys over RPC ------------------------------------------------------------

TEST_P(CredentialsApiTest, CreateAcquireReadLimitAndDeleteAKey) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(CreateProvider("acme").ok());
  const std::string secret = absl::StrCat("sk-test-", RandomHex(12));

  absl::StatusOr<v1::ProviderKey> created = CreateKey("acme", "k1", secret);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->name(), "providers/acme/keys/k1");
  EXPECT_EQ(created->secret_version(), 1);
  EXPECT_EQ(created->secret_reference(), "");
  EXPECT_EQ(created->secret_hint(),
            absl::StrCat(secret.substr(0, 4), "...", secret.substr(secret.size() - 4)));
  ASSERT_EQ(created->secret_versions_size(), 1) << created->ShortDebugString();
  EXPECT_EQ(created->secret_versions(0).version(), 1);
  EXPECT_EQ(created->secret_versions(0).state(), v1::SecretVersion::STATE_CURRENT);
  EXPECT_EQ(created->secret_versions(0).hint(), created->secret_hint());

  absl::StatusOr<v1::AcquireProviderKeyResponse> acquired = Acquire("providers/acme");
  ASSERT_TRUE(acquired.ok()) << acquired.status();
  EXPECT_EQ(acquired->key(), created->name());
  EXPECT_EQ(acquired->secret(), secret);
  EXPECT_EQ(acquired->secret_version(), 1);
  EXPECT_EQ(acquired->requests_remaining(), -1);

  ASSERT_TRUE(GetKey(created->name()).ok());
  absl::StatusOr<v1::ListProviderKeysResponse> listed = ListKeys("providers/acme");
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->provider_keys_size(), 1);
  EXPECT_EQ(listed->provider_keys(0).name(), created->name());
  EXPECT_THAT(received_.Containing(secret), IsEmpty()) << "the secret left through metadata";

  // A daily limit of 3 (one acquisition made): two more, then RESOURCE_EXHAUSTED.
  v1::UpdateProviderKeyRequest update;
  update.mutable_provider_key()->set_name(created->name());
  update.mutable_provider_key()->mutable_limits()->set_requests_per_day(3);
  update.mutable_update_mask()->add_paths("limits");
  absl::StatusOr<v1::ProviderKey> updated = Call(*creds_, &CredStub::UpdateProviderKey, update);
  ASSERT_TRUE(updated.ok()) << updated.status();
  EXPECT_EQ(updated->limits().requests_per_day(), 3);
  int more = 0;
  absl::StatusOr<v1::AcquireProviderKeyResponse> next;
  for (; more < 10; ++more) {
    next = Acquire("providers/acme");
    if (!next.ok()) break;
    EXPECT_EQ(next->requests_remaining(), 3 - (more + 2));
  }
  EXPECT_EQ(more, 2) << "acquisitions after the limit was set";
  EXPECT_TRUE(IsError(next.status(), absl::StatusCode::kResourceExhausted, "", "NO_KEY_AVAILABLE"));
  absl::StatusOr<v1::ProviderKey> used = GetKey(created->name());
  ASSERT_TRUE(used.ok()) << used.status();
  EXPECT_EQ(used->usage().requests(), 3) << used->ShortDebugString();

  // Delete: gone from Get, List and Acquire.
  v1::DeleteProviderKeyRequest remove;
  remove.set_name(created->name());
  ASSERT_TRUE(Call(*creds_, &CredStub::DeleteProviderKey, remove).ok());
  EXPECT_TRUE(IsError(GetKey(created->name()).status(), absl::StatusCode::kNotFound));
  listed = ListKeys("providers/acme");
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->provider_keys_size(), 0);
  EXPECT_TRUE(IsError(Acquire("providers/acme").status(), absl::StatusCode::kFailedPrecondition, "",
                      "NO_USABLE_KEY"));
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets"), 0);
}

TEST_P(CredentialsApiTest, RotationServesTheNewSecretAndTheOldOneByVersion) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(CreateProvider("acme").ok());
  const std::string s1 = absl::StrCat("sk-one-", RandomHex(16));
  const std::string s2 = absl::StrCat("sk-two-", RandomHex(16));
  const std::string s3 = absl::StrCat("sk-three-", RandomHex(16));
  absl::StatusOr<v1::ProviderKey> created = CreateKey("acme", "k", s1);
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string name = created->name();
  ASSERT_EQ(SecretOf(Acquire("providers/acme")), s1);

  absl::StatusOr<v1::ProviderKey> rotated = RotateKey(name, s2, 600);
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  EXPECT_EQ(rotated->secret_version(), 2);
  EXPECT_EQ(rotated->secret_hint(), absl::StrCat(s2.substr(0, 4), "...", s2.substr(s2.size() - 4)));
  ASSERT_EQ(rotated->secret_versions_size(), 2) << rotated->ShortDebugString();
  EXPECT_EQ(rotated->secret_versions(0).state(), v1::SecretVersion::STATE_GRACE);
  EXPECT_TRUE(rotated->secret_versions(0).has_expire_time());
  EXPECT_EQ(rotated->secret_versions(1).state(), v1::SecretVersion::STATE_CURRENT);

  // The new secret at once; the old one by version during the grace period.
  absl::StatusOr<v1::AcquireProviderKeyResponse> now = Acquire("providers/acme");
  ASSERT_TRUE(now.ok()) << now.status();
  EXPECT_EQ(now->secret(), s2);
  EXPECT_EQ(now->secret_version(), 2);
  absl::StatusOr<v1::AcquireProviderKeyResponse> old = Acquire("providers/acme", name, 1);
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->secret(), s1);
  EXPECT_EQ(old->secret_version(), 1);

  // A 0 s grace retires version 2 at once.
  absl::StatusOr<v1::ProviderKey> again = RotateKey(name, s3, 0);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->secret_version(), 3);
  EXPECT_TRUE(IsError(Acquire("providers/acme", name, 2).status(),
                      absl::StatusCode::kFailedPrecondition, "", "SECRET_VERSION_RETIRED"));
  EXPECT_EQ(SecretOf(Acquire("providers/acme", name)), s3);
  absl::StatusOr<v1::ProviderKey> got = GetKey(name);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->secret_versions_size(), 3) << got->ShortDebugString();
  EXPECT_EQ(got->secret_versions(1).state(), v1::SecretVersion::STATE_RETIRED);
  for (const std::string& s : {s1, s2, s3}) {
    EXPECT_THAT(received_.Containing(s), IsEmpty()) << s;
  }
}

TEST_P(CredentialsApiTest, RateLimitedKeyCoolsDownUntilASuccess) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(CreateProvider("solo").ok());
  absl::StatusOr<v1::ProviderKey> key = CreateKey("solo", "only", "sk-solo-0123456789abcdef");
  ASSERT_TRUE(key.ok()) << key.status();
  ASSERT_TRUE(Acquire("providers/solo").ok());

  absl::StatusOr<v1::ReportKeyOutcomeResponse> limited =
      Report(key->name(), v1::KEY_OUTCOME_RATE_LIMITED, 2);
  ASSERT_TRUE(limited.ok()) << limited.status();
  EXPECT_TRUE(limited->health().has_degraded_until());
  EXPECT_EQ(limited->health().consecutive_failures(), 1);
  EXPECT_EQ(limited->health().last_outcome(), v1::KEY_OUTCOME_RATE_LIMITED);

  const absl::Status exhausted = Acquire("providers/solo").status();
  EXPECT_TRUE(IsError(exhausted, absl::StatusCode::kResourceExhausted, "", "NO_KEY_AVAILABLE"));
  auto retry = exhausted.GetPayload(kRetryInfoUrl);
  EXPECT_EQ(kRetryInfoUrl, "type.googleapis.com/google.rpc.RetryInfo");
  ASSERT_TRUE(retry.has_value()) << "no google.rpc.RetryInfo: " << Describe(exhausted);
  google::rpc::RetryInfo info;
  ASSERT_TRUE(info.ParseFromString(std::string(*retry)));
  const absl::Duration delay =
      absl::Seconds(info.retry_delay().seconds()) + absl::Nanoseconds(info.retry_delay().nanos());
  EXPECT_GT(delay, absl::ZeroDuration());
  EXPECT_LE(delay, absl::Seconds(2));
  absl::StatusOr<v1::ProviderKey> degraded = GetKey(key->name());
  ASSERT_TRUE(degraded.ok()) << degraded.status();
  EXPECT_EQ(degraded->health().last_outcome(), v1::KEY_OUTCOME_RATE_LIMITED);

  absl::StatusOr<v1::ReportKeyOutcomeResponse> success =
      Report(key->name(), v1::KEY_OUTCOME_SUCCESS);
  ASSERT_TRUE(success.ok()) << success.status();
  EXPECT_FALSE(success->health().has_degraded_until());
  EXPECT_EQ(success->health().consecutive_failures(), 0);
  absl::StatusOr<v1::AcquireProviderKeyResponse> restored = Acquire("providers/solo");
  EXPECT_TRUE(restored.ok()) << restored.status();
}

TEST_P(CredentialsApiTest, BadInputIsRejectedAndWritesNothing) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(CreateProvider("acme").ok());
  ASSERT_TRUE(CreateProvider("other").ok());
  absl::StatusOr<v1::ProviderKey> key = CreateKey("acme", "k", "sk-acme-0123456789abcdef");
  ASSERT_TRUE(key.ok()) << key.status();
  ASSERT_TRUE(CreateKey("other", "k", "sk-other-0123456789abcdef").ok());
  const std::string name = key->name();

  const char* kTables[] = {"changes",
                           "request_ids",
                           "provider_keys",
                           "provider_key_secrets",
                           "provider_key_health",
                           "provider_key_usage"};
  auto counts = [&] {
    std::map<std::string, std::int64_t> out;
    for (const char* t : kTables) out[t] = Count(absl::StrCat("SELECT COUNT(*) FROM ", t));
    return out;
  };
  const std::map<std::string, std::int64_t> before = counts();
  absl::StatusOr<v1::ListProviderKeysResponse> listed_before = ListKeys();
  ASSERT_TRUE(listed_before.ok()) << listed_before.status();

  auto create = [&](const std::string& id, const std::string& secret, const std::string& ref,
                    std::int64_t requests_per_day = 0) {
    v1::CreateProviderKeyRequest r;
    r.set_parent("providers/acme");
    r.set_provider_key_id(id);
    r.set_secret(secret);
    r.set_secret_reference(ref);
    r.mutable_provider_key()->mutable_limits()->set_requests_per_day(requests_per_day);
    return Call(*creds_, &CredStub::CreateProviderKey, r).status();
  };
  auto acquire = [&](const std::string& key_name, std::int64_t tokens, std::int64_t version) {
    return Acquire("providers/acme", key_name, version, tokens).status();
  };
  auto report = [&](int outcome, std::int64_t tokens_used) {
    v1::ReportKeyOutcomeRequest r;
    r.set_key(name);
    r.set_outcome(static_cast<v1::KeyOutcome>(outcome));
    r.set_tokens_used(tokens_used);
    return Call(*creds_, &CredStub::ReportKeyOutcome, r).status();
  };
  struct Case {
    std::string label;
    absl::Status status;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"secret and reference", create("n1", "sk-both-0123456789", "env:HOME"), "secret"},
      {"neither secret nor reference", create("n2", "", ""), "secret"},
      {"bad reference", create("n3", "", "env:1BAD"), "secret_reference"},
      {"bad key id", create("Bad_Id", "sk-x-0123456789abcd", ""), "provider_key_id"},
      {"negative limit", create("n4", "sk-x-0123456789abcd", "", -1),
       "provider_key.limits.requests_per_day"},
      {"unknown outcome", report(99, 0), "outcome"},
      {"unspecified outcome", report(v1::KEY_OUTCOME_UNSPECIFIED, 0), "outcome"},
      {"negative tokens_used", report(v1::KEY_OUTCOME_SUCCESS, -5), "tokens_used"},
      {"negative estimated_tokens", acquire("", -1, 0), "estimated_tokens"},
      {"key of another provider", acquire("providers/other/keys/k", 0, 0), "key"},
      {"secret_version without key", acquire("", 0, 1), "secret_version"},
      {"rotate with secret and reference",
       RotateKey(name, "sk-both-0123456789", 60, "env:HOME").status(), "secret"},
  };
  for (const Case& c : cases) {
    EXPECT_TRUE(IsError(c.status, absl::StatusCode::kInvalidArgument, c.field)) << c.label;
  }

  EXPECT_EQ(counts(), before) << "a rejected request wrote to the database";
  absl::StatusOr<v1::ListProviderKeysResponse> listed_after = ListKeys();
  ASSERT_TRUE(listed_after.ok()) << listed_after.status();
  EXPECT_THAT(*listed_after, conformance::EqualsProto(*listed_before));
}

// --- 2. The canary ------------------------------------------------------------------------

TEST_P(CredentialsApiTest, CanarySecretsAppearOnlyInAcquireResponses) {
  ASSERT_NO_FATAL_FAILURE(Start());
  const std::string on_create = Canary();
  const std::string on_rotate = Canary();
  const std::string in_bad_requests = Canary();
  const std::string in_replay = Canary();
  const std::vector<std::string> canaries = {on_create, on_rotate, in_bad_requests, in_replay};
  const std::string key_id = absl::StrCat("canary-", RandomHex(6));  // found at rest on purpose
  ASSERT_TRUE(CreateProvider("acme").ok());

  absl::StatusOr<v1::ProviderKey> key = CreateKey("acme", key_id, on_create);
  ASSERT_TRUE(key.ok()) << key.status();
  ASSERT_TRUE(RotateKey(key->name(), on_rotate, 600).ok());
  // Rejected requests carrying a canary: validation, a missing parent, a reused request_id.
  EXPECT_TRUE(IsError(CreateKey("acme", "bad", in_bad_requests, "env:HOME").status(),
                      absl::StatusCode::kInvalidArgument, "secret"));
  EXPECT_TRUE(IsError(RotateKey(key->name(), in_bad_requests, 60, "env:HOME").status(),
                      absl::StatusCode::kInvalidArgument, "secret"));
  EXPECT_FALSE(CreateKey("nobody", "k", in_bad_requests).ok());
  // A create replayed by request_id, then the request_id reused for another secret.
  const std::string request_id = absl::StrCat("replay-", RandomHex(8));
  absl::StatusOr<v1::ProviderKey> first = CreateKey("acme", "replayed", in_replay, "", request_id);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<v1::ProviderKey> replayed =
      CreateKey("acme", "replayed", in_replay, "", request_id);
  ASSERT_TRUE(replayed.ok()) << replayed.status();
  EXPECT_EQ(replayed->name(), first->name());
  EXPECT_FALSE(CreateKey("acme", "replayed", in_bad_requests, "", request_id).ok());
  ASSERT_TRUE(GetKey(key->name()).ok());
  ASSERT_TRUE(ListKeys().ok());

  // Acquire alone returns them.
  EXPECT_EQ(SecretOf(Acquire("providers/acme", key->name())), on_rotate);
  EXPECT_EQ(SecretOf(Acquire("providers/acme", key->name(), 1)), on_create);
  EXPECT_EQ(SecretOf(Acquire("providers/acme", first->name())), in_replay);

  // The SQLite files as they are while the server runs (copied: the WAL goes away on stop).
  std::vector<std::string> sqlite_files_while_serving;
  if (is_sqlite()) {
    const std::string copy = absl::StrCat(server_->dir(), "/while-serving");
    std::filesystem::create_directory(copy);
    for (const std::string& f : SqliteFiles()) {
      const std::string to = absl::StrCat(copy, "/", std::filesystem::path(f).filename().string());
      std::filesystem::copy_file(f, to);
      sqlite_files_while_serving.push_back(to);
    }
    ASSERT_GE(sqlite_files_while_serving.size(), 2u) << "no -wal file while serving";
  }
  StopServer();
  const std::string log = server_->Log();
  ASSERT_FALSE(log.empty());
  ASSERT_GT(received_.size(), 20u);

  // The feed and request records hold the key (so the searches look in the right place) but
  // no canary.
  EXPECT_GT(
      Count(absl::StrCat("SELECT COUNT(*) FROM changes WHERE resource LIKE '%", key_id, "%'")), 0);
  for (const std::string& canary : canaries) {
    SCOPED_TRACE(canary);
    EXPECT_THAT(received_.Containing(canary), IsEmpty()) << "in responses";
    EXPECT_EQ(log.find(canary), std::string::npos) << "in the server log";
    for (const std::string column :
         {"changes.resource", "changes.request_id", "request_ids.response",
          "request_ids.request_hash", "provider_keys.secret_hint", "provider_key_secrets.envelope",
          "provider_key_secrets.hint", "provider_key_secrets.reference"}) {
      const std::vector<std::string> parts = absl::StrSplit(column, '.');
      EXPECT_EQ(Count(absl::StrCat("SELECT COUNT(*) FROM ", parts[0], " WHERE ", parts[1],
                                   " LIKE '%", canary, "%'")),
                0)
          << "in " << column;
    }
  }

  // Every byte at rest: the SQLite files (database, -wal, -shm: searched while the server
  // runs too, since a clean stop folds the WAL into the database and removes it), or the whole
  // PostgreSQL data directory after a CHECKPOINT (tables, indexes and WAL) and its server log.
  std::vector<std::string> paths;
  if (is_sqlite()) {
    paths = sqlite_files_while_serving;
    for (const std::string& f : SqliteFiles()) paths.push_back(f);
  } else {
    ASSERT_TRUE(conformance::ExecuteSql(url(), "CHECKPOINT").ok());
    const std::string conninfo = std::string(absl::StripPrefix(url(), "postgresql://"));
    const CommandResult dir =
        RunShell(absl::StrCat("psql '", conninfo, "' -Atc 'SHOW data_directory'"));
    ASSERT_EQ(dir.exit_code, 0) << "cannot find the PostgreSQL data directory: " << dir.output;
    const std::string data(absl::StripAsciiWhitespace(dir.output));
    paths.push_back(data);
    const std::string server_log = std::filesystem::path(data).parent_path() / "log";
    if (std::filesystem::exists(server_log)) paths.push_back(server_log);
  }
  ASSERT_NO_FATAL_FAILURE(ExpectNotAtRest(paths, key_id, canaries));
  std::cout << "searched " << received_.size() << " response items, " << log.size()
            << " log bytes and " << absl::StrJoin(paths, " ") << "\n";
}

// --- 3. Master keys at startup --------------------------------------------------------------

TEST_P(CredentialsApiTest, ServerWithAnotherMasterKeyRefusesToStart) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(CreateProvider("acme").ok());
  const std::string secret = absl::StrCat("sk-", RandomHex(12));
  ASSERT_TRUE(CreateKey("acme", "k", secret).ok());
  StopServer();

  // Another key file: a different key, also version 1.
  const std::string dir = MakeTempDir();
  const std::string other = dir + "/other.key";
  const CommandResult generated = RunModelvault({"master-key", "generate", "--out", other});
  ASSERT_EQ(generated.exit_code, 0) << generated.output;
  const CommandResult refused = ServeExpectingFailure(
      url(), {"--master-key-file", other, "--admin-key-file", dir + "/admin.token"});
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_NE(refused.exit_code, 124) << "served with the wrong master key:\n" << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("master key version(s) 1")) << refused.output;
  std::cout << "wrong master key: " << absl::StripAsciiWhitespace(refused.output) << "\n";

  // The right key still opens everything.
  ASSERT_NO_FATAL_FAILURE(Start());
  EXPECT_EQ(SecretOf(Acquire("providers/acme")), secret);
  RunShell(absl::StrCat("rm -rf '", dir, "'"));
}

TEST_P(CredentialsApiTest, MasterKeyRotationWithRewrapThenDroppingTheOldVersion) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ASSERT_TRUE(CreateProvider("acme").ok());
  std::map<std::string, std::string> secrets;  // key name -> current secret
  for (const std::string id : {"k1", "k2", "k3"}) {
    const std::string secret = absl::StrCat("sk-", id, "-", RandomHex(12));
    absl::StatusOr<v1::ProviderKey> key = CreateKey("acme", id, secret);
    ASSERT_TRUE(key.ok()) << key.status();
    secrets[key->name()] = secret;
  }
  const std::string k3_old = secrets["providers/acme/keys/k3"];
  secrets["providers/acme/keys/k3"] = absl::StrCat("sk-k3-new-", RandomHex(12));
  ASSERT_TRUE(RotateKey("providers/acme/keys/k3", secrets["providers/acme/keys/k3"], 3600).ok());
  StopServer();
  const std::int64_t sealed = Count(
      "SELECT COUNT(*) FROM provider_key_secrets WHERE envelope IS "
      "NOT NULL");
  EXPECT_EQ(sealed, 4);

  // Version 2 appended; a file with version 2 alone cannot start yet.
  const std::string file = MasterKeyFile();
  const CommandResult appended =
      RunModelvault({"master-key", "generate", "--out", file, "--version", "2"});
  ASSERT_EQ(appended.exit_code, 0) << appended.output;
  const std::string v1_line = KeyLine(file, 1);
  const std::string v2_line = KeyLine(file, 2);
  ASSERT_FALSE(v1_line.empty()) << "no version 1 in " << file;
  ASSERT_FALSE(v2_line.empty()) << "no version 2 in " << file;
  const std::string dir = MakeTempDir();
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir + "/only2.key", v2_line));
  const CommandResult refused = ServeExpectingFailure(
      url(), {"--master-key-file", dir + "/only2.key", "--admin-key-file", dir + "/admin.token"});
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_NE(refused.exit_code, 124) << "served without master key 1:\n" << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("master key version(s) 1"));

  // Online rewrap under version 2.
  ASSERT_NO_FATAL_FAILURE(Start());
  absl::StatusOr<v1::RewrapSecretsResponse> rewrapped =
      Call(*creds_, &CredStub::RewrapSecrets, v1::RewrapSecretsRequest());
  ASSERT_TRUE(rewrapped.ok()) << rewrapped.status();
  EXPECT_EQ(rewrapped->master_key_version(), 2);
  EXPECT_GE(rewrapped->rewrapped(), sealed);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets WHERE envelope IS NOT NULL AND "
                  "master_key_version <> 2"),
            0);
  absl::StatusOr<v1::RewrapSecretsResponse> again =
      Call(*creds_, &CredStub::RewrapSecrets, v1::RewrapSecretsRequest());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->rewrapped(), 0) << "a second rewrap found work";
  EXPECT_EQ(again->unchanged(), sealed);
  StopServer();

  // Version 2 alone: starts, and every secret opens.
  ASSERT_NO_FATAL_FAILURE(WriteFile(file, v2_line));
  ASSERT_NO_FATAL_FAILURE(Start());
  for (const auto& [name, secret] : secrets) {
    absl::StatusOr<v1::AcquireProviderKeyResponse> got = Acquire("providers/acme", name);
    ASSERT_TRUE(got.ok()) << name << ": " << got.status();
    EXPECT_EQ(got->secret(), secret) << name;
  }
  absl::StatusOr<v1::AcquireProviderKeyResponse> grace =
      Acquire("providers/acme", "providers/acme/keys/k3", 1);
  ASSERT_TRUE(grace.ok()) << grace.status();
  EXPECT_EQ(grace->secret(), k3_old);
  RunShell(absl::StrCat("rm -rf '", dir, "'"));
}

// --- 4. TLS and mTLS ----------------------------------------------------------------------

// A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a second
// CA with its own client certificate, made with the openssl CLI.
struct Pki {
  std::string dir;
  std::string ca, server_cert, server_key, client_cert, client_key;
  std::string other_ca, other_client_cert, other_client_key;
};

void MakePki(Pki& pki) {
  const CommandResult version = RunShell("openssl version");
  ASSERT_EQ(version.exit_code, 0)
      << "the openssl CLI is needed to make test certificates (apt-get install openssl): "
      << version.output;
  pki.dir = MakeTempDir();
  const std::string d = pki.dir;
  auto p = [&](const std::string& f) { return absl::StrCat(d, "/", f); };
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string script = absl::StrCat(
      "exec 2>&1; set -e; cd '", d, "'\n",
      // Two CAs.
      "openssl req -x509 ", ec, " -keyout ca.key -out ca.crt -days 2 -subj /CN=mv-e2e-ca\n",
      "openssl req -x509 ", ec, " -keyout other.key -out other.crt -days 2 -subj /CN=mv-other\n",
      // Server certificate.
      "openssl req ", ec, " -keyout server.key -out server.csr -subj /CN=localhost\n",
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' "
      "> server.ext\n",
      "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
      "-extfile server.ext -out server.crt\n",
      // Client certificates from each CA.
      "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n", "openssl req ", ec,
      " -keyout client.key -out client.csr -subj /CN=mv-client\n",
      "openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
      "-extfile client.ext -out client.crt\n",
      "openssl req ", ec, " -keyout oclient.key -out oclient.csr -subj /CN=mv-other-client\n",
      "openssl x509 -req -in oclient.csr -CA other.crt -CAkey other.key -CAcreateserial -days 2 "
      "-extfile client.ext -out oclient.crt\n");
  const CommandResult made = RunShell(script);
  ASSERT_EQ(made.exit_code, 0) << made.output;
  pki.ca = p("ca.crt");
  pki.server_cert = p("server.crt");
  pki.server_key = p("server.key");
  pki.client_cert = p("client.crt");
  pki.client_key = p("client.key");
  pki.other_ca = p("other.crt");
  pki.other_client_cert = p("oclient.crt");
  pki.other_client_key = p("oclient.key");
}

// The transport does not depend on the engine: this suite runs on SQLite alone.
class TransportTest : public CredentialsApiTest {};

TEST_P(TransportTest, TlsAndMutualTls) {
  Pki pki;
  ASSERT_NO_FATAL_FAILURE(MakePki(pki));

  // A call on a fresh channel to the running server.
  auto call = [&](client::ChannelOptions options) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
        client::MakeChannel(server_->target(), options);
    if (!channel.ok()) return channel.status();
    std::unique_ptr<CatalogStub> stub = v1::CatalogService::NewStub(*channel);
    return Invoke(*stub, &CatalogStub::ListProviders, v1::ListProvidersRequest(), absl::Seconds(10))
        .status();
  };
  auto tls = [&](const std::string& ca, const std::string& server_name = "") {
    client::ChannelOptions options;
    options.token = server_->token();
    options.tls_ca_file = ca;
    options.tls_server_name = server_name;
    return options;
  };

  ASSERT_NO_FATAL_FAILURE(Start({"--tls-cert", pki.server_cert, "--tls-key", pki.server_key}));
  UseChannel(nullptr);
  EXPECT_TRUE(call(tls(pki.ca)).ok()) << call(tls(pki.ca));
  EXPECT_TRUE(call(tls(pki.ca, "localhost")).ok()) << call(tls(pki.ca, "localhost"));
  client::ChannelOptions plaintext;
  plaintext.token = server_->token();
  EXPECT_TRUE(IsError(call(plaintext), absl::StatusCode::kUnavailable)) << "plaintext client";
  EXPECT_TRUE(IsError(call(tls(pki.other_ca)), absl::StatusCode::kUnavailable))
      << "a server certificate from an unknown CA";
  EXPECT_TRUE(IsError(call(tls(pki.ca, "wrong.example")), absl::StatusCode::kUnavailable))
      << "a certificate for another name";
  client::ChannelOptions no_token = tls(pki.ca);
  no_token.token = "";
  EXPECT_TRUE(
      IsError(call(no_token), absl::StatusCode::kUnauthenticated, "", "MISSING_ACCESS_KEY"));
  StopServer();

  // mTLS: a client certificate from the configured CA is required (and the token still is).
  ASSERT_NO_FATAL_FAILURE(Start(
      {"--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca}));
  UseChannel(nullptr);
  client::ChannelOptions with_cert = tls(pki.ca);
  with_cert.tls_cert_file = pki.client_cert;
  with_cert.tls_key_file = pki.client_key;
  EXPECT_TRUE(call(with_cert).ok()) << call(with_cert);
  EXPECT_TRUE(IsError(call(tls(pki.ca)), absl::StatusCode::kUnavailable)) << "no client cert";
  client::ChannelOptions foreign_cert = tls(pki.ca);
  foreign_cert.tls_cert_file = pki.other_client_cert;
  foreign_cert.tls_key_file = pki.other_client_key;
  EXPECT_TRUE(IsError(call(foreign_cert), absl::StatusCode::kUnavailable))
      << "a client cert from another CA";
  client::ChannelOptions cert_without_token = with_cert;
  cert_without_token.token = "";
  EXPECT_TRUE(IsError(call(cert_without_token), absl::StatusCode::kUnauthenticated));
  StopServer();
  RunShell(absl::StrCat("rm -rf '", pki.dir, "'"));
}

// --- 5. Secret references -------------------------------------------------------------------

TEST_P(CredentialsApiTest, EnvAndFileReferencesAreResolvedAtAcquisition) {
  // The server is forked from this process and inherits its environment.
  const std::string var = absl::StrCat("MV_E2E_", absl::AsciiStrToUpper(RandomHex(8)));
  const std::string missing = absl::StrCat("MV_E2E_MISSING_", absl::AsciiStrToUpper(RandomHex(8)));
  const std::string env_value = absl::StrCat("sk-env-", RandomHex(12));
  const std::string file_value = absl::StrCat("sk-file-", RandomHex(12));
  ASSERT_EQ(setenv(var.c_str(), env_value.c_str(), 1), 0);
  const std::string dir = MakeTempDir();
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir + "/secret", file_value + "\n"));
  ASSERT_NO_FATAL_FAILURE(Start({"--secret-file-dir", dir}));
  unsetenv(var.c_str());  // the server has its copy
  ASSERT_TRUE(CreateProvider("acme").ok());

  absl::StatusOr<v1::ProviderKey> env_key = CreateKey("acme", "env", "", "env:" + var);
  ASSERT_TRUE(env_key.ok()) << env_key.status();
  EXPECT_EQ(env_key->secret_reference(), "env:" + var);
  EXPECT_EQ(env_key->secret_hint(), "");
  ASSERT_EQ(env_key->secret_versions_size(), 1);
  EXPECT_EQ(env_key->secret_versions(0).reference(), "env:" + var);
  absl::StatusOr<v1::AcquireProviderKeyResponse> from_env =
      Acquire("providers/acme", env_key->name());
  ASSERT_TRUE(from_env.ok()) << from_env.status();
  EXPECT_EQ(from_env->secret(), env_value);

  absl::StatusOr<v1::ProviderKey> file_key =
      CreateKey("acme", "file", "", "file:" + dir + "/secret");
  ASSERT_TRUE(file_key.ok()) << file_key.status();
  absl::StatusOr<v1::AcquireProviderKeyResponse> from_file =
      Acquire("providers/acme", file_key->name());
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ(from_file->secret(), file_value) << "the trailing newline is not part of the secret";

  // Outside --secret-file-dir, and the server's own configuration: refused at once.
  EXPECT_TRUE(IsError(CreateKey("acme", "outside", "", "file:/etc/passwd").status(),
                      absl::StatusCode::kInvalidArgument, "secret_reference"));
  EXPECT_TRUE(IsError(CreateKey("acme", "own", "", "env:MODELVAULT_MASTER_KEY").status(),
                      absl::StatusCode::kInvalidArgument, "secret_reference"));

  absl::StatusOr<v1::ProviderKey> unresolved = CreateKey("acme", "missing", "", "env:" + missing);
  ASSERT_TRUE(unresolved.ok()) << unresolved.status();
  EXPECT_TRUE(IsError(Acquire("providers/acme", unresolved->name()).status(),
                      absl::StatusCode::kFailedPrecondition, "", "SECRET_REFERENCE_UNRESOLVED"));
  EXPECT_THAT(received_.Containing(env_value), IsEmpty());
  EXPECT_THAT(received_.Containing(file_value), IsEmpty());
  RunShell(absl::StrCat("rm -rf '", dir, "'"));
}

INSTANTIATE_TEST_SUITE_P(Engines, CredentialsApiTest, conformance::AllEngines(),
                         conformance::NameGen());
INSTANTIATE_TEST_SUITE_P(Sqlite, TransportTest,
                         ::testing::Values(conformance::EngineParam{"sqlite"}),
                         conformance::NameGen());

}  // namespace
}  // namespace modelvault::e2e
