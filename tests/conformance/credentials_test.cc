// Provider-key conformance (server/provider_keys.h, server/key_pool.h) on SQLite and
// PostgreSQL: secrets encrypted at rest and bound to their row, master-key rewrap,
// env:/file: references, the key pool's fair selection, daily and per-minute limits under
// concurrency, health with cool-downs shared by replicas, calendar days in a time zone,
// rotation with a grace period, and the per-provider key limit. Every time-dependent case
// runs on a fake clock; nothing sleeps.
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/time_util.h"
#include "google/rpc/error_details.pb.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "modelvault/v1/credentials.pb.h"
#include "modelvault/v1/types.pb.h"
#include "server/crypto/master_keys.h"
#include "server/key_pool.h"
#include "server/provider_keys.h"
#include "storage/resource_store.h"
#include "storage/status_details.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"

namespace modelvault::conformance {
namespace {

using ::google::protobuf::util::TimeUtil;
using ::modelvault::crypto::MasterKeyRing;
using ::modelvault::server::KeyPool;
using ::modelvault::server::KeyPoolOptions;
using ::modelvault::server::ProviderKeyStore;
using ::modelvault::server::SecretInput;
using ::modelvault::storage::Datastore;
using ::modelvault::storage::DatastoreOptions;
using ::modelvault::storage::MutationContext;
using ::modelvault::storage::MutationResult;
using ::modelvault::storage::ReadWriteTx;
using ::modelvault::storage::ResourceStore;
using ::modelvault::storage::SqlCell;
using ::modelvault::storage::SqlRow;
using ::modelvault::storage::SqlType;
using ::modelvault::v1::AcquireProviderKeyRequest;
using ::modelvault::v1::AcquireProviderKeyResponse;
using ::modelvault::v1::KeyHealth;
using ::modelvault::v1::KeyLimits;
using ::modelvault::v1::KeyOutcome;
using ::modelvault::v1::ProviderKey;
using ::modelvault::v1::ReportKeyOutcomeRequest;
using ::modelvault::v1::SecretVersion;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::StartsWith;

constexpr char kPageTokenKey[] = "conformance-page-token-key";
constexpr char kProvider[] = "providers/openai";
// 2024-06-01T12:00:00Z: whole seconds, so RFC 3339 times in errors compare exactly.
const absl::Time kNoon = absl::FromUnixSeconds(1717243200);

// --- helpers -------------------------------------------------------------------------------

// A clock the test moves by hand; read by the pool from any thread.
class FakeClock {
 public:
  explicit FakeClock(absl::Time t) : micros_(absl::ToUnixMicros(t)) {}
  absl::Time Now() const { return absl::FromUnixMicros(micros_.load()); }
  void Set(absl::Time t) { micros_.store(absl::ToUnixMicros(t)); }
  void Advance(absl::Duration d) { micros_.fetch_add(absl::ToInt64Microseconds(d)); }
  KeyPool::Clock AsClock() {
    return [this] { return Now(); };
  }

 private:
  std::atomic<std::int64_t> micros_;
};

std::string KeyName(const std::string& id, const std::string& provider = kProvider) {
  return absl::StrCat(provider, "/keys/", id);
}

KeyLimits Limits(std::int64_t per_day, std::int64_t tokens_per_day = 0,
                 std::int64_t per_minute = 0) {
  KeyLimits limits;
  limits.set_requests_per_day(per_day);
  limits.set_tokens_per_day(tokens_per_day);
  limits.set_requests_per_minute(per_minute);
  return limits;
}

AcquireProviderKeyRequest Request(const std::string& key = "", std::int64_t secret_version = 0,
                                  std::int64_t estimated_tokens = 0,
                                  const std::string& provider = kProvider) {
  AcquireProviderKeyRequest request;
  request.set_provider(provider);
  request.set_key(key);
  request.set_secret_version(secret_version);
  request.set_estimated_tokens(estimated_tokens);
  return request;
}

ReportKeyOutcomeRequest Outcome(const std::string& key, KeyOutcome outcome,
                                absl::Duration retry_after = absl::ZeroDuration()) {
  ReportKeyOutcomeRequest request;
  request.set_key(key);
  request.set_outcome(outcome);
  if (retry_after > absl::ZeroDuration()) {
    *request.mutable_retry_after() =
        TimeUtil::MicrosecondsToDuration(absl::ToInt64Microseconds(retry_after));
  }
  return request;
}

absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixMicros(TimeUtil::TimestampToMicroseconds(t));
}

// The ErrorInfo metadata "available_time" of a NO_KEY_AVAILABLE error.
absl::Time AvailableTime(const absl::Status& status) {
  auto payload = status.GetPayload(kErrorInfoUrl);
  if (!payload.has_value()) return absl::InfinitePast();
  v1::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) return absl::InfinitePast();
  auto it = info.metadata().find("available_time");
  if (it == info.metadata().end()) return absl::InfinitePast();
  absl::Time t;
  std::string error;
  if (!absl::ParseTime(absl::RFC3339_full, it->second, &t, &error)) {
    return absl::InfinitePast();
  }
  return t;
}

// The RetryInfo delay of an error (-1s when absent).
absl::Duration RetryDelay(const absl::Status& status) {
  auto payload = status.GetPayload(kRetryInfoUrl);
  if (!payload.has_value()) return absl::Seconds(-1);
  google::rpc::RetryInfo info;
  if (!info.ParseFromString(std::string(*payload))) return absl::Seconds(-1);
  return absl::Seconds(info.retry_delay().seconds()) +
         absl::Nanoseconds(info.retry_delay().nanos());
}

// Expects RESOURCE_EXHAUSTED / NO_KEY_AVAILABLE, first available at `available` (RetryInfo
// counted from `now`).
void ExpectExhaustedUntil(const absl::StatusOr<AcquireProviderKeyResponse>& result,
                          absl::Time available, absl::Time now) {
  ASSERT_FALSE(result.ok()) << "acquired " << result->key();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted) << result.status();
  EXPECT_EQ(ErrorReason(result.status()), "NO_KEY_AVAILABLE");
  EXPECT_EQ(AvailableTime(result.status()), available) << result.status();
  EXPECT_EQ(RetryDelay(result.status()), available - now);
}

void ExpectStatus(const absl::StatusOr<AcquireProviderKeyResponse>& result, absl::StatusCode code,
                  const std::string& reason) {
  ASSERT_FALSE(result.ok()) << "acquired " << result->key() << " version "
                            << result->secret_version();
  EXPECT_EQ(result.status().code(), code) << result.status();
  EXPECT_EQ(ErrorReason(result.status()), reason) << result.status();
}

class CredentialsTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    DatastoreOptions options;
    options.pool_size = 12;  // the concurrency cases run 8 callers and a flusher
    absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated(options);
    ASSERT_TRUE(ds.ok()) << ds.status();
    ds_ = *std::move(ds);
    store_ = std::make_unique<ResourceStore>(*ds_, kPageTokenKey);
    line1_ = MasterKeyRing::GenerateLine(1);
    absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::Parse(line1_);
    ASSERT_TRUE(ring.ok()) << ring.status();
    ring_ = *std::move(ring);
    keys_ = std::make_unique<ProviderKeyStore>(*store_, ring_, 100);
    pool_ = NewPool();  // tests that need other options replace it before creating keys
    CreateProvider(kProvider);
  }

  MutationContext Ctx() const {
    MutationContext ctx;
    ctx.principal = "user:conformance";
    ctx.now = clock_.Now();
    return ctx;
  }

  void CreateProvider(const std::string& name) {
    v1::Provider provider;
    provider.set_name(name);
    provider.set_display_name("A provider");
    provider.set_base_url("https://api.example.test/v1");
    absl::StatusOr<MutationResult> created = store_->Create(Ctx(), provider);
    ASSERT_TRUE(created.ok()) << created.status();
  }

  // Creates key `id` of `provider` with `secret` (inline unless it starts with env:/file:)
  // and returns the stored key (with its etag).
  ProviderKey CreateKey(const std::string& id, const std::string& secret,
                        const KeyLimits& limits = {}, const std::string& provider = kProvider,
                        ProviderKeyStore* keys = nullptr) {
    ProviderKey key;
    key.set_name(KeyName(id, provider));
    key.set_display_name(id);
    *key.mutable_limits() = limits;
    return CreateKey(key, secret, keys);
  }
  ProviderKey CreateKey(const ProviderKey& key, const std::string& secret,
                        ProviderKeyStore* keys = nullptr) {
    const bool reference = absl::StartsWith(secret, "env:") || absl::StartsWith(secret, "file:");
    const SecretInput input = reference ? SecretInput{"", secret} : SecretInput{secret, ""};
    absl::StatusOr<MutationResult> created =
        (keys != nullptr ? keys : keys_.get())->Create(Ctx(), key, input);
    EXPECT_TRUE(created.ok()) << created.status() << " creating " << key.name();
    if (!created.ok()) return {};
    if (pool_ != nullptr) pool_->Invalidate(key.name());  // as the server does
    return static_cast<const ProviderKey&>(*created->resource);
  }

  std::unique_ptr<KeyPool> NewPool(KeyPoolOptions options = {},
                                   const MasterKeyRing* ring = nullptr) {
    return std::make_unique<KeyPool>(*ds_, ring != nullptr ? *ring : ring_, std::move(options),
                                     clock_.AsClock());
  }
  KeyPool& pool() { return *pool_; }

  // Acquires `n` times without a key; the names acquired, in order.
  std::vector<std::string> AcquireNames(KeyPool& pool, int n) {
    std::vector<std::string> names;
    for (int i = 0; i < n; ++i) {
      absl::StatusOr<AcquireProviderKeyResponse> r = pool.Acquire(Request());
      EXPECT_TRUE(r.ok()) << r.status();
      if (r.ok()) names.push_back(r->key());
    }
    return names;
  }

  absl::StatusOr<std::vector<SqlRow>> Query(const std::string& sql,
                                            const std::vector<SqlCell>& params,
                                            const std::vector<SqlType>& columns) {
    std::vector<SqlRow> rows;
    absl::Status status = ds_->Read([&](storage::Reader& reader) -> absl::Status {
      absl::StatusOr<std::vector<SqlRow>> r = reader.Query(sql, params, columns);
      if (!r.ok()) return r.status();
      rows = *std::move(r);
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    return rows;
  }

  std::string Envelope(const std::string& key_name, std::int64_t version = 1) {
    absl::StatusOr<std::vector<SqlRow>> rows =
        Query("SELECT envelope FROM provider_key_secrets WHERE key_name = :p0 AND version = :p1",
              {key_name, version}, {SqlType::kText});
    EXPECT_TRUE(rows.ok()) << rows.status();
    if (!rows.ok() || rows->size() != 1) return "";
    return storage::CellText(rows->front()[0]);
  }

  void SetEnvelope(const std::string& key_name, const std::string& envelope) {
    absl::Status status = ds_->ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
      absl::StatusOr<std::int64_t> n = tx.Exec(
          "UPDATE provider_key_secrets SET envelope = :p0 WHERE key_name = :p1 AND version = 1",
          {envelope, key_name});
      if (!n.ok()) return n.status();
      return *n == 1 ? absl::OkStatus() : absl::InternalError("no row updated");
    });
    ASSERT_TRUE(status.ok()) << status;
  }

  // provider_key_usage of `key_name` as day -> requests.
  std::map<std::string, std::int64_t> UsageByDay(const std::string& key_name) {
    std::map<std::string, std::int64_t> out;
    absl::StatusOr<std::vector<SqlRow>> rows =
        Query("SELECT day, requests FROM provider_key_usage WHERE key_name = :p0", {key_name},
              {SqlType::kText, SqlType::kInt64});
    EXPECT_TRUE(rows.ok()) << rows.status();
    if (!rows.ok()) return out;
    for (const SqlRow& row : *rows) out[storage::CellText(row[0])] = storage::CellInt(row[1]);
    return out;
  }

  std::int64_t Count(const std::string& sql) { return QueryInt(sql).value_or(-1); }

  FakeClock clock_{kNoon};
  // Ordered so that the pool goes before the ring and the store it uses.
  std::unique_ptr<Datastore> ds_;
  std::unique_ptr<ResourceStore> store_;
  std::string line1_;
  MasterKeyRing ring_;
  std::unique_ptr<ProviderKeyStore> keys_;
  std::unique_ptr<KeyPool> pool_;
};

// --- encryption at rest --------------------------------------------------------------------

TEST_P(CredentialsTest, SecretIsEncryptedAtRestAndAcquiredInPlaintext) {
  const std::string secret = "sk-secret-" + RandomHex(16);
  const std::string name = KeyName("k1");
  ProviderKey created = CreateKey("k1", secret);
  EXPECT_EQ(created.secret_version(), 1);
  EXPECT_EQ(created.secret_hint(), absl::StrCat("sk-s...", secret.substr(secret.size() - 4)));

  // The stored envelope is sealed under master key 1 and does not carry the plaintext; nor
  // does any other column or the change feed.
  const std::string envelope = Envelope(name);
  EXPECT_THAT(envelope, StartsWith("v1."));
  EXPECT_THAT(envelope, Not(HasSubstr(secret)));
  EXPECT_THAT(envelope, Not(HasSubstr(secret.substr(10))));
  EXPECT_EQ(Count("SELECT master_key_version FROM provider_key_secrets"), 1);
  EXPECT_EQ(Count(absl::StrCat("SELECT COUNT(*) FROM provider_key_secrets WHERE envelope LIKE '%",
                               secret.substr(10), "%' OR hint LIKE '%", secret.substr(10), "%'")),
            0);
  EXPECT_EQ(Count(absl::StrCat("SELECT COUNT(*) FROM changes WHERE resource LIKE '%",
                               secret.substr(10), "%'")),
            0);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM changes WHERE resource_name = 'providers/openai/keys/k1'"),
            1);

  absl::StatusOr<AcquireProviderKeyResponse> acquired = pool().Acquire(Request());
  ASSERT_TRUE(acquired.ok()) << acquired.status();
  EXPECT_EQ(acquired->key(), name);
  EXPECT_EQ(acquired->secret(), secret);
  EXPECT_EQ(acquired->secret_version(), 1);
  EXPECT_EQ(acquired->requests_remaining(), -1);  // unlimited
  EXPECT_EQ(acquired->tokens_remaining(), -1);
}

TEST_P(CredentialsTest, TamperedEnvelopeNeverOpens) {
  const std::string name = KeyName("k1");
  CreateKey("k1", "sk-secret-" + RandomHex(16));
  std::string envelope = Envelope(name);
  ASSERT_GT(envelope.size(), 20u);
  // One character in the middle of the base64 body (not the version prefix).
  char& c = envelope[envelope.size() / 2];
  c = c == 'A' ? 'B' : 'A';
  SetEnvelope(name, envelope);
  EXPECT_EQ(ring_.Open(envelope, name).status().code(), absl::StatusCode::kDataLoss);

  // A fresh pool (as after a restart) loads the tampered row: the key's only secret does
  // not open, so there is no usable key; never a garbage secret.
  std::unique_ptr<KeyPool> fresh = NewPool();
  ExpectStatus(fresh->Acquire(Request()), absl::StatusCode::kFailedPrecondition, "NO_USABLE_KEY");
  ExpectStatus(fresh->Acquire(Request(name)), absl::StatusCode::kFailedPrecondition,
               "NO_USABLE_KEY");
}

TEST_P(CredentialsTest, EnvelopeMovedToAnotherKeyDoesNotOpen) {
  const std::string secret1 = "sk-first-" + RandomHex(16);
  CreateKey("k1", secret1);
  CreateKey("k2", "sk-second-" + RandomHex(16));
  // The key's name is the associated data: k1's (valid) envelope on k2's row must fail.
  SetEnvelope(KeyName("k2"), Envelope(KeyName("k1")));

  std::unique_ptr<KeyPool> fresh = NewPool();
  ExpectStatus(fresh->Acquire(Request(KeyName("k2"))), absl::StatusCode::kFailedPrecondition,
               "NO_USABLE_KEY");
  for (int i = 0; i < 10; ++i) {
    absl::StatusOr<AcquireProviderKeyResponse> r = fresh->Acquire(Request());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->key(), KeyName("k1"));
    EXPECT_EQ(r->secret(), secret1);
  }
}

// --- master-key rotation -------------------------------------------------------------------

TEST_P(CredentialsTest, RewrapMovesEverySecretToTheNewMasterKey) {
  std::map<std::string, std::string> secrets;  // key name -> plaintext
  for (int i = 0; i < 5; ++i) {
    const std::string id = absl::StrCat("k", i);
    secrets[KeyName(id)] = absl::StrCat("sk-", id, "-", RandomHex(16));
    CreateKey(id, secrets[KeyName(id)]);
  }
  absl::StatusOr<std::string> pepper =
      server::GetOrCreateSealedSecret(*ds_, ring_, "access_key_pepper");
  ASSERT_TRUE(pepper.ok()) << pepper.status();
  EXPECT_EQ(pepper->size(), 32u);

  const std::string line2 = MasterKeyRing::GenerateLine(2);
  absl::StatusOr<MasterKeyRing> only2 = MasterKeyRing::Parse(line2);
  absl::StatusOr<MasterKeyRing> both = MasterKeyRing::Parse(absl::StrCat(line1_, "\n", line2));
  ASSERT_TRUE(only2.ok() && both.ok());

  // Before the rewrap the server cannot start on key 2 alone: version 1 is missing.
  absl::StatusOr<std::vector<std::uint32_t>> missing =
      ProviderKeyStore::MissingMasterKeys(*ds_, *only2);
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_THAT(*missing, ElementsAre(1u));

  // Keys created once both master keys are loaded are sealed under 2 already.
  ProviderKeyStore rewrapper(*store_, *both, 100);
  for (const char* id : {"new1", "new2"}) {
    secrets[KeyName(id)] = absl::StrCat("sk-", id, "-", RandomHex(16));
    CreateKey(id, secrets[KeyName(id)], {}, kProvider, &rewrapper);
  }

  // Five key secrets and the pepper, two rows per transaction; `unchanged` counts the two
  // key secrets already under version 2 (server secrets are only in `rewrapped`).
  absl::StatusOr<ProviderKeyStore::RewrapResult> first = rewrapper.Rewrap(2);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->rewrapped, 6);
  EXPECT_EQ(first->unchanged, 2);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets WHERE master_key_version = 2 AND "
                  "envelope LIKE 'v2.%'"),
            7);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM server_secrets WHERE name = 'sealed:access_key_pepper' "
                  "AND value LIKE 'v2.%'"),
            1);

  // Idempotent: nothing left to do.
  absl::StatusOr<ProviderKeyStore::RewrapResult> second = rewrapper.Rewrap(2);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->rewrapped, 0);
  EXPECT_EQ(second->unchanged, 7);

  // Key 1 can now be dropped.
  missing = ProviderKeyStore::MissingMasterKeys(*ds_, *only2);
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_THAT(*missing, IsEmpty());
  absl::StatusOr<std::string> pepper2 =
      server::GetOrCreateSealedSecret(*ds_, *only2, "access_key_pepper");
  ASSERT_TRUE(pepper2.ok()) << pepper2.status();
  EXPECT_EQ(*pepper2, *pepper);

  std::unique_ptr<KeyPool> on2 = NewPool({}, &*only2);
  for (const auto& [name, secret] : secrets) {
    absl::StatusOr<AcquireProviderKeyResponse> r = on2->Acquire(Request(name));
    ASSERT_TRUE(r.ok()) << r.status() << " acquiring " << name;
    EXPECT_EQ(r->secret(), secret);
  }
  // And the old key alone no longer opens anything.
  std::unique_ptr<KeyPool> on1 = NewPool();
  ExpectStatus(on1->Acquire(Request()), absl::StatusCode::kFailedPrecondition, "NO_USABLE_KEY");
}

// --- references ----------------------------------------------------------------------------

TEST_P(CredentialsTest, EnvReferenceIsResolvedAtAcquisition) {
  const std::string var = "MV_TEST_SECRET_" + RandomHex(8);
  const std::string value = "sk-from-env-" + RandomHex(16);
  ASSERT_EQ(setenv(var.c_str(), value.c_str(), 1), 0);
  ProviderKey key = CreateKey("k1", "env:" + var);
  EXPECT_EQ(key.secret_reference(), "env:" + var);
  EXPECT_EQ(key.secret_hint(), "");
  // Nothing is sealed for a reference.
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets WHERE envelope IS NULL AND "
                  "master_key_version IS NULL"),
            1);

  absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), value);

  // Gone from the environment: once the resolved value's TTL (1 s) is over, acquisition
  // fails and the error does not repeat the last value.
  ASSERT_EQ(unsetenv(var.c_str()), 0);
  clock_.Advance(absl::Seconds(2));
  r = pool().Acquire(Request());
  ExpectStatus(r, absl::StatusCode::kFailedPrecondition, "SECRET_REFERENCE_UNRESOLVED");
  EXPECT_THAT(r.status().message(), HasSubstr(var));
  EXPECT_THAT(r.status().ToString(), Not(HasSubstr(value)));

  // Unset from the start (a fresh pool never saw a value).
  ExpectStatus(NewPool()->Acquire(Request()), absl::StatusCode::kFailedPrecondition,
               "SECRET_REFERENCE_UNRESOLVED");
}

// A key whose reference does not resolve passes the turn: acquisition goes on with the
// other keys instead of failing while one of them works.
TEST_P(CredentialsTest, UnresolvedReferencePassesTheTurnToAnotherKey) {
  const std::string missing = "MV_TEST_MISSING_" + RandomHex(8);
  ASSERT_EQ(unsetenv(missing.c_str()), 0);
  CreateKey("a-broken", "env:" + missing);  // first in name order: picked first on ties
  const std::string secret = "sk-working-" + RandomHex(16);
  CreateKey("b-working", secret);
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->key(), KeyName("b-working"));
    EXPECT_EQ(r->secret(), secret);
  }
  // Asked for by name, the broken key answers with its own error.
  ExpectStatus(pool().Acquire(Request(KeyName("a-broken"))), absl::StatusCode::kFailedPrecondition,
               "SECRET_REFERENCE_UNRESOLVED");
}

TEST_P(CredentialsTest, FileReferenceIsResolvedWithoutTrailingNewline) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / ("mv_credentials_" + RandomHex(8));
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  const std::string path = (dir / "secret").string();
  const auto write = [&](const std::string& text) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  };
  write("sk-from-file-1\n");
  KeyPoolOptions options;
  options.secret_file_dir = dir.string();
  pool_ = NewPool(options);
  CreateKey("k1", "file:" + path);
  CreateKey("k2", "file:" + (dir / "missing").string());

  absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request(KeyName("k1")));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), "sk-from-file-1");

  // A changed file is read again once the TTL is over (CRLF endings dropped too).
  write("sk-from-file-2\r\n");
  clock_.Advance(absl::Seconds(2));
  r = pool().Acquire(Request(KeyName("k1")));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), "sk-from-file-2");

  ExpectStatus(pool().Acquire(Request(KeyName("k2"))), absl::StatusCode::kFailedPrecondition,
               "SECRET_REFERENCE_UNRESOLVED");

  // Only regular files whose real path is inside the folder, never blocking: a link out
  // of it, a FIFO (whose open would wait for a writer) and a file too large to be a key
  // all stay unresolved.
  const std::filesystem::path outside =
      std::filesystem::path(::testing::TempDir()) / ("mv_outside_" + RandomHex(8));
  std::ofstream(outside) << "sk-outside-the-folder\n";
  std::filesystem::create_symlink(outside, dir / "link-out");
  ASSERT_EQ(mkfifo((dir / "fifo").c_str(), 0600), 0);
  std::ofstream(dir / "large") << std::string(9000, 'x');
  CreateKey("k3", "file:" + (dir / "link-out").string());
  CreateKey("k4", "file:" + (dir / "fifo").string());
  CreateKey("k5", "file:" + (dir / "large").string());
  for (const std::string id : {"k3", "k4", "k5"}) {
    ExpectStatus(pool().Acquire(Request(KeyName(id))), absl::StatusCode::kFailedPrecondition,
                 "SECRET_REFERENCE_UNRESOLVED");
  }
  // A link that stays inside (as in Kubernetes secret volumes) is fine.
  std::filesystem::create_symlink(dir / "secret", dir / "link-in");
  CreateKey("k6", "file:" + (dir / "link-in").string());
  r = pool().Acquire(Request(KeyName("k6")));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), "sk-from-file-2");
  std::filesystem::remove_all(dir);
  std::filesystem::remove(outside);
}

TEST_P(CredentialsTest, ValidateSecretInputRejectsMalformedInput) {
  const auto validate = [](const std::string& secret, const std::string& reference) {
    return server::ValidateSecretInput({secret, reference}, "secret", "secret_reference",
                                       "/run/secrets");
  };
  EXPECT_TRUE(validate("sk-abc", "").ok());
  EXPECT_TRUE(validate("", "env:GOOD_NAME_1").ok());
  EXPECT_TRUE(validate("", "file:/run/secrets/openai").ok());
  // File references are off unless the server names a folder for them.
  EXPECT_EQ(server::ValidateSecretInput({"", "file:/run/secrets/openai"}, "secret",
                                        "secret_reference", "")
                .code(),
            absl::StatusCode::kFailedPrecondition);

  for (const auto& [secret, reference] :
       std::vector<std::pair<std::string, std::string>>{{"sk-both-set-12345", "env:GOOD"},
                                                        {"", ""},
                                                        {"", "env:1BAD"},
                                                        {"", "env:"},
                                                        {"", "file:relative/path"},
                                                        {"", "file:"},
                                                        {"", "ftp:x"},
                                                        // the server's own configuration
                                                        {"", "env:MODELVAULT_MASTER_KEY"},
                                                        {"", "env:MODELVAULT_DATABASE"},
                                                        // outside the allowed folder
                                                        {"", "file:/etc/passwd"},
                                                        {"", "file:/run/secrets/../../etc/passwd"},
                                                        {"", "file:/run/secretsX/openai"},
                                                        {"", "file:/run/secrets/"}}) {
    absl::Status s = validate(secret, reference);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << secret << " / " << reference;
    if (!secret.empty()) {
      EXPECT_THAT(s.ToString(), Not(HasSubstr(secret)));
    }
  }
}

// --- selection and limits ------------------------------------------------------------------

TEST_P(CredentialsTest, AcquisitionIsFairAcrossKeys) {
  for (int i = 0; i < 5; ++i) CreateKey(absl::StrCat("k", i), "sk-fair-" + RandomHex(16));
  constexpr int kThreads = 8;
  constexpr int kTotal = 10000;
  std::mutex mu;
  std::map<std::string, std::int64_t> counts;
  std::atomic<int> failures{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::map<std::string, std::int64_t> mine;
      start.arrive_and_wait();
      for (int i = t; i < kTotal; i += kThreads) {
        absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request());
        if (r.ok()) {
          ++mine[r->key()];
        } else {
          ++failures;
        }
      }
      std::lock_guard lock(mu);
      for (const auto& [k, n] : mine) counts[k] += n;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_EQ(counts.size(), 5u);
  std::int64_t sum = 0, lo = kTotal, hi = 0;
  for (const auto& [k, n] : counts) {
    sum += n;
    lo = std::min(lo, n);
    hi = std::max(hi, n);
  }
  EXPECT_EQ(sum, kTotal);
  EXPECT_LE(hi - lo, kTotal / 5 / 100) << "per-key counts differ by more than 1% of the mean";

  ASSERT_TRUE(pool().Flush().ok());
  EXPECT_EQ(Count("SELECT SUM(requests) FROM provider_key_usage WHERE day = '2024-06-01'"), kTotal);
  for (const auto& [k, n] : counts) EXPECT_EQ(UsageByDay(k)["2024-06-01"], n) << k;
}

TEST_P(CredentialsTest, RequestsPerDayHoldUnderConcurrencyAndFlushes) {
  CreateKey("k1", "sk-a-" + RandomHex(16), Limits(500));
  CreateKey("k2", "sk-b-" + RandomHex(16), Limits(500));
  constexpr int kThreads = 8;
  constexpr int kAttempts = 200;
  std::atomic<int> ok{0}, exhausted{0}, other{0}, wrong_time{0};
  std::atomic<bool> done{false};
  const absl::Time midnight = absl::FromUnixSeconds(1717286400);  // 2024-06-02T00:00:00Z
  std::latch start(kThreads + 1);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      start.arrive_and_wait();
      for (int i = 0; i < kAttempts; ++i) {
        absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request());
        if (r.ok()) {
          ++ok;
        } else if (r.status().code() == absl::StatusCode::kResourceExhausted &&
                   ErrorReason(r.status()) == "NO_KEY_AVAILABLE") {
          ++exhausted;
          if (AvailableTime(r.status()) != midnight) ++wrong_time;
        } else {
          ++other;
        }
      }
    });
  }
  // Flushes run meanwhile: counts move from pending to the database and back as shared
  // counts, and must never be lost or counted twice on the way.
  std::thread flusher([&] {
    start.arrive_and_wait();
    while (!done.load()) EXPECT_TRUE(pool().Flush().ok());
  });
  for (std::thread& t : threads) t.join();
  done = true;
  flusher.join();

  EXPECT_EQ(ok.load(), 1000);
  EXPECT_EQ(exhausted.load(), kThreads * kAttempts - 1000);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(wrong_time.load(), 0) << "available_time is not the next midnight (UTC)";
  ExpectExhaustedUntil(pool().Acquire(Request()), midnight, clock_.Now());

  ASSERT_TRUE(pool().Flush().ok());
  EXPECT_EQ(UsageByDay(KeyName("k1"))["2024-06-01"], 500);
  EXPECT_EQ(UsageByDay(KeyName("k2"))["2024-06-01"], 500);
}

TEST_P(CredentialsTest, TokensPerDayCountEstimatedTokens) {
  CreateKey("k1", "sk-t-" + RandomHex(16), Limits(0, 100));
  for (std::int64_t remaining : {70, 40, 10}) {
    absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request("", 0, 30));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens_remaining(), remaining);
  }
  // 90 + 30 > 100; the next midnight (UTC) is when it frees up.
  ExpectExhaustedUntil(pool().Acquire(Request("", 0, 30)), absl::FromUnixSeconds(1717286400),
                       clock_.Now());
  // Exactly up to the limit still fits.
  absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request("", 0, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens_remaining(), 0);

  ASSERT_TRUE(pool().Flush().ok());
  EXPECT_EQ(Count("SELECT tokens FROM provider_key_usage WHERE key_name = "
                  "'providers/openai/keys/k1'"),
            100);
}

TEST_P(CredentialsTest, RequestsPerMinuteResetNextMinute) {
  CreateKey("k1", "sk-m-" + RandomHex(16), Limits(0, 0, 2));
  clock_.Set(kNoon + absl::Seconds(10));
  EXPECT_TRUE(pool().Acquire(Request()).ok());
  EXPECT_TRUE(pool().Acquire(Request()).ok());
  ExpectExhaustedUntil(pool().Acquire(Request()), kNoon + absl::Minutes(1), clock_.Now());
  clock_.Set(kNoon + absl::Seconds(59));
  ExpectExhaustedUntil(pool().Acquire(Request()), kNoon + absl::Minutes(1), clock_.Now());
  clock_.Set(kNoon + absl::Minutes(1));
  EXPECT_TRUE(pool().Acquire(Request()).ok());
  EXPECT_TRUE(pool().Acquire(Request()).ok());
  EXPECT_FALSE(pool().Acquire(Request()).ok());
}

// --- health --------------------------------------------------------------------------------

class CredentialsHealthTest : public CredentialsTest {
 protected:
  static KeyPoolOptions Options() {
    KeyPoolOptions options;
    options.base_cooldown = absl::Seconds(1);
    options.max_cooldown = absl::Seconds(8);
    return options;
  }
  // Reports and returns the health (failing the test when Report fails).
  KeyHealth Report(KeyPool& pool, const ReportKeyOutcomeRequest& request) {
    absl::StatusOr<KeyHealth> health = pool.Report(request);
    EXPECT_TRUE(health.ok()) << health.status();
    return health.ok() ? *health : KeyHealth{};
  }
};

TEST_P(CredentialsHealthTest, RateLimitedKeyIsSkippedWhileCoolingDown) {
  pool_ = NewPool(Options());
  const std::string k1 = KeyName("k1"), k2 = KeyName("k2");
  CreateKey("k1", "sk-1-" + RandomHex(16));
  CreateKey("k2", "sk-2-" + RandomHex(16));
  KeyHealth health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_RATE_LIMITED));
  EXPECT_EQ(FromProto(health.degraded_until()), kNoon + absl::Seconds(1));
  EXPECT_EQ(health.consecutive_failures(), 1);
  EXPECT_EQ(health.last_outcome(), v1::KEY_OUTCOME_RATE_LIMITED);
  // While k1 cools down every acquisition goes to k2 (least-used would otherwise alternate).
  for (const std::string& name : AcquireNames(pool(), 10)) EXPECT_EQ(name, k2);
  // After the cool-down k1 is back, and least-used picks it until it catches up.
  clock_.Advance(absl::Seconds(1));
  for (const std::string& name : AcquireNames(pool(), 10)) EXPECT_EQ(name, k1);
}

TEST_P(CredentialsHealthTest, CooldownDoublesUpToTheMaximumAndSuccessRestores) {
  pool_ = NewPool(Options());
  const std::string k1 = KeyName("k1");
  CreateKey("k1", "sk-1-" + RandomHex(16));
  std::int64_t failures = 0;
  for (int seconds : {1, 2, 4, 8, 8}) {
    const absl::Time now = clock_.Now();
    KeyHealth health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_RATE_LIMITED));
    EXPECT_EQ(health.consecutive_failures(), ++failures);
    const absl::Time until = now + absl::Seconds(seconds);
    EXPECT_EQ(FromProto(health.degraded_until()), until) << "failure " << failures;
    // The only key is cooling down: exhausted until degraded_until exactly.
    ExpectExhaustedUntil(pool().Acquire(Request()), until, now);
    clock_.Set(until - absl::Microseconds(1));
    EXPECT_FALSE(pool().Acquire(Request()).ok());
    clock_.Set(until);
    EXPECT_TRUE(pool().Acquire(Request()).ok());  // an acquisition does not reset failures
  }
  KeyHealth health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_SUCCESS));
  EXPECT_EQ(health.consecutive_failures(), 0);
  EXPECT_FALSE(health.has_degraded_until());
  EXPECT_TRUE(pool().Acquire(Request()).ok());
  // Back to the base cool-down after a success.
  health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_SERVER_ERROR));
  EXPECT_EQ(FromProto(health.degraded_until()), clock_.Now() + absl::Seconds(1));
  EXPECT_EQ(health.consecutive_failures(), 1);
}

TEST_P(CredentialsHealthTest, RetryAfterAuthErrorAndClientError) {
  pool_ = NewPool(Options());
  const std::string k1 = KeyName("k1");
  CreateKey("k1", "sk-1-" + RandomHex(16));
  const absl::Time now = clock_.Now();

  // The provider's Retry-After is used as given, not the doubling schedule.
  KeyHealth health =
      Report(pool(), Outcome(k1, v1::KEY_OUTCOME_RATE_LIMITED, absl::Milliseconds(30500)));
  EXPECT_EQ(FromProto(health.degraded_until()), now + absl::Milliseconds(30500));

  // A client error says nothing about the key: health unchanged.
  health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_CLIENT_ERROR));
  EXPECT_EQ(FromProto(health.degraded_until()), now + absl::Milliseconds(30500));
  EXPECT_EQ(health.consecutive_failures(), 1);
  EXPECT_FALSE(pool().Acquire(Request()).ok());

  // A refused key waits the longest cool-down at once.
  Report(pool(), Outcome(k1, v1::KEY_OUTCOME_SUCCESS));
  health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_AUTH_ERROR));
  EXPECT_EQ(FromProto(health.degraded_until()), now + absl::Seconds(8));
  EXPECT_EQ(health.consecutive_failures(), 1);
  ExpectExhaustedUntil(pool().Acquire(Request()), now + absl::Seconds(8), now);

  // Client errors on a healthy key leave it acquirable.
  Report(pool(), Outcome(k1, v1::KEY_OUTCOME_SUCCESS));
  health = Report(pool(), Outcome(k1, v1::KEY_OUTCOME_CLIENT_ERROR));
  EXPECT_FALSE(health.has_degraded_until());
  EXPECT_EQ(health.consecutive_failures(), 0);
  EXPECT_TRUE(pool().Acquire(Request()).ok());
}

// --- replicas ------------------------------------------------------------------------------

TEST_P(CredentialsHealthTest, HealthIsSharedAcrossReplicasAtFlush) {
  const std::string k1 = KeyName("k1"), k2 = KeyName("k2");
  CreateKey("k1", "sk-1-" + RandomHex(16));
  CreateKey("k2", "sk-2-" + RandomHex(16));
  std::unique_ptr<KeyPool> a = NewPool(Options());
  std::unique_ptr<KeyPool> b = NewPool(Options());
  ASSERT_TRUE(b->Acquire(Request()).ok());  // B has the provider loaded before A reports

  Report(*a, Outcome(k1, v1::KEY_OUTCOME_RATE_LIMITED, absl::Minutes(1)));
  ASSERT_TRUE(b->Flush().ok());
  for (const std::string& name : AcquireNames(*b, 20)) EXPECT_EQ(name, k2);
  ExpectExhaustedUntil(b->Acquire(Request(k1)), clock_.Now() + absl::Minutes(1), clock_.Now());

  // The recovery travels the same way.
  Report(*a, Outcome(k1, v1::KEY_OUTCOME_SUCCESS));
  ASSERT_TRUE(b->Flush().ok());
  EXPECT_TRUE(b->Acquire(Request(k1)).ok());
}

TEST_P(CredentialsTest, DailyCountsAreSharedAcrossReplicasAtFlush) {
  const std::string k1 = KeyName("k1"), k2 = KeyName("k2");
  CreateKey("k1", "sk-1-" + RandomHex(16), Limits(50));
  CreateKey("k2", "sk-2-" + RandomHex(16));
  std::unique_ptr<KeyPool> a = NewPool();
  std::unique_ptr<KeyPool> b = NewPool();
  ASSERT_TRUE(b->Acquire(Request(k2)).ok());  // loaded before A counts anything

  for (int i = 0; i < 30; ++i) ASSERT_TRUE(a->Acquire(Request(k1)).ok()) << i;
  ASSERT_TRUE(a->Flush().ok());
  ASSERT_TRUE(b->Flush().ok());
  int acquired = 0;
  for (int i = 0; i < 30; ++i) {
    absl::StatusOr<AcquireProviderKeyResponse> r = b->Acquire(Request(k1));
    if (!r.ok()) break;
    ++acquired;
  }
  EXPECT_EQ(acquired, 20);
  ASSERT_TRUE(b->Flush().ok());
  ASSERT_TRUE(a->Flush().ok());
  EXPECT_EQ(UsageByDay(k1)["2024-06-01"], 50);
  EXPECT_EQ(UsageByDay(k2)["2024-06-01"], 1);
  // A sees B's counts after its next Flush.
  ExpectStatus(a->Acquire(Request(k1)), absl::StatusCode::kResourceExhausted, "NO_KEY_AVAILABLE");
}

// --- calendar days -------------------------------------------------------------------------

TEST_P(CredentialsTest, DailyLimitResetsAtMidnightOfTheZone) {
  absl::TimeZone new_york;
  ASSERT_TRUE(absl::LoadTimeZone("America/New_York", &new_york));
  KeyPoolOptions options;
  options.zone = new_york;
  pool_ = NewPool(options);
  const std::string k1 = KeyName("k1");
  CreateKey("k1", "sk-1-" + RandomHex(16), Limits(3));

  // 23:59:59 EDT on 2024-06-01 is already 2024-06-02 in UTC: days follow the zone.
  const absl::Time before = absl::FromCivil(absl::CivilSecond(2024, 6, 1, 23, 59, 59), new_york);
  const absl::Time midnight = absl::FromCivil(absl::CivilDay(2024, 6, 2), new_york);
  clock_.Set(before);
  EXPECT_EQ(pool().DayOf(before), "2024-06-01");
  ASSERT_TRUE(pool().Acquire(Request()).ok());
  ASSERT_TRUE(pool().Acquire(Request()).ok());
  ASSERT_TRUE(pool().Flush().ok());  // two written before midnight
  ASSERT_TRUE(pool().Acquire(Request()).ok());
  ExpectExhaustedUntil(pool().Acquire(Request()), midnight, before);
  EXPECT_EQ(pool().Unflushed(k1, "2024-06-01").requests(), 1);

  clock_.Set(midnight);
  absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->requests_remaining(), 2);
  // The acquisition counted at 23:59:59 but flushed after midnight lands on its own day.
  ASSERT_TRUE(pool().Flush().ok());
  EXPECT_EQ(UsageByDay(k1),
            (std::map<std::string, std::int64_t>{{"2024-06-01", 3}, {"2024-06-02", 1}}));
  ASSERT_TRUE(pool().Acquire(Request()).ok());
  ASSERT_TRUE(pool().Acquire(Request()).ok());
  ExpectExhaustedUntil(pool().Acquire(Request()),
                       absl::FromCivil(absl::CivilDay(2024, 6, 3), new_york), midnight);
}

// --- rotation ------------------------------------------------------------------------------

TEST_P(CredentialsTest, RotationServesTheOldSecretByVersionDuringGrace) {
  const std::string name = KeyName("k1");
  const std::string old_secret = "sk-old-" + RandomHex(16);
  const std::string new_secret = "sk-new-" + RandomHex(16);
  ProviderKey created = CreateKey("k1", old_secret);
  ASSERT_TRUE(pool().Acquire(Request()).ok());  // loaded with version 1 only

  const absl::Time rotated = clock_.Now();
  absl::StatusOr<MutationResult> rotation =
      keys_->Rotate(Ctx(), name, created.etag(), {new_secret, ""}, absl::Seconds(60));
  ASSERT_TRUE(rotation.ok()) << rotation.status();
  EXPECT_EQ(static_cast<const ProviderKey&>(*rotation->resource).secret_version(), 2);
  pool().Invalidate(name);

  absl::StatusOr<AcquireProviderKeyResponse> r = pool().Acquire(Request());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), new_secret);
  EXPECT_EQ(r->secret_version(), 2);
  // In-flight work holding version 1 still gets it during the grace period.
  clock_.Set(rotated + absl::Seconds(59));
  r = pool().Acquire(Request(name, 1));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), old_secret);
  EXPECT_EQ(r->secret_version(), 1);

  clock_.Set(rotated + absl::Seconds(61));
  ExpectStatus(pool().Acquire(Request(name, 1)), absl::StatusCode::kFailedPrecondition,
               "SECRET_VERSION_RETIRED");
  ExpectStatus(NewPool()->Acquire(Request(name, 1)), absl::StatusCode::kFailedPrecondition,
               "SECRET_VERSION_RETIRED");
  r = pool().Acquire(Request(name, 2));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->secret(), new_secret);

  // History is kept: version 1 retired (after its grace end), version 2 current.
  absl::StatusOr<std::unique_ptr<google::protobuf::Message>> stored =
      store_->Get(ProviderKey::descriptor(), name);
  ASSERT_TRUE(stored.ok()) << stored.status();
  ProviderKey key = static_cast<const ProviderKey&>(**stored);
  ASSERT_TRUE(keys_->Describe({&key}, "2024-06-01", clock_.Now()).ok());
  ASSERT_EQ(key.secret_versions_size(), 2);
  EXPECT_EQ(key.secret_versions(0).version(), 1);
  EXPECT_EQ(key.secret_versions(0).state(), SecretVersion::STATE_RETIRED);
  EXPECT_EQ(FromProto(key.secret_versions(0).expire_time()), rotated + absl::Seconds(60));
  EXPECT_EQ(key.secret_versions(1).version(), 2);
  EXPECT_EQ(key.secret_versions(1).state(), SecretVersion::STATE_CURRENT);
  EXPECT_FALSE(key.secret_versions(1).has_expire_time());
  ASSERT_TRUE(keys_->Describe({&key}, "2024-06-01", rotated + absl::Seconds(30)).ok());
  EXPECT_EQ(key.secret_versions(0).state(), SecretVersion::STATE_GRACE);
}

TEST_P(CredentialsTest, RotateWithAStaleEtagIsAborted) {
  const std::string name = KeyName("k1");
  ProviderKey created = CreateKey("k1", "sk-old-" + RandomHex(16));
  absl::StatusOr<MutationResult> rotation =
      keys_->Rotate(Ctx(), name, created.etag(), {"sk-new-" + RandomHex(16), ""}, absl::Minutes(5));
  ASSERT_TRUE(rotation.ok()) << rotation.status();

  // created.etag() is now one revision old.
  rotation = keys_->Rotate(Ctx(), name, created.etag(), {"sk-newer-" + RandomHex(16), ""},
                           absl::Minutes(5));
  ASSERT_FALSE(rotation.ok());
  EXPECT_EQ(rotation.status().code(), absl::StatusCode::kAborted) << rotation.status();
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets"), 2);
  EXPECT_EQ(Count("SELECT secret_version FROM provider_keys"), 2);
}

// --- key count and state -------------------------------------------------------------------

TEST_P(CredentialsTest, MaxKeysPerProvider) {
  ProviderKeyStore three(*store_, ring_, 3);
  for (int i = 0; i < 3; ++i)
    CreateKey(absl::StrCat("k", i), "sk-" + RandomHex(16), {}, kProvider, &three);
  const std::int64_t changes = Count("SELECT COUNT(*) FROM changes");

  ProviderKey fourth;
  fourth.set_name(KeyName("k3"));
  absl::StatusOr<MutationResult> r = three.Create(Ctx(), fourth, {"sk-" + RandomHex(16), ""});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_EQ(ErrorReason(r.status()), "TOO_MANY_KEYS");
  // Nothing written: no key, no secret, no change record.
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_keys"), 3);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets"), 3);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM changes"), changes);

  // The limit is per provider.
  CreateProvider("providers/anthropic");
  CreateKey("k0", "sk-" + RandomHex(16), {}, "providers/anthropic", &three);
}

TEST_P(CredentialsTest, MaxKeysPerProviderHoldsUnderConcurrentCreates) {
  ProviderKeyStore three(*store_, ring_, 3);
  constexpr int kThreads = 8;
  std::atomic<int> ok{0}, too_many{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ProviderKey key;
      key.set_name(KeyName(absl::StrCat("k", t)));
      start.arrive_and_wait();
      absl::StatusOr<MutationResult> r = three.Create(Ctx(), key, {"sk-" + RandomHex(16), ""});
      if (r.ok()) {
        ++ok;
      } else if (ErrorReason(r.status()) == "TOO_MANY_KEYS") {
        ++too_many;
      } else {
        ADD_FAILURE() << r.status();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(ok.load(), 3);
  EXPECT_EQ(too_many.load(), kThreads - 3);
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_keys"), 3);
}

TEST_P(CredentialsTest, DisabledAndExpiredKeysAreNeverAcquired) {
  ProviderKey disabled;
  disabled.set_name(KeyName("disabled"));
  disabled.set_disabled(true);
  CreateKey(disabled, "sk-disabled-" + RandomHex(16));
  ProviderKey expired;
  expired.set_name(KeyName("expired"));
  *expired.mutable_expire_time() =
      TimeUtil::MicrosecondsToTimestamp(absl::ToUnixMicros(clock_.Now() - absl::Seconds(1)));
  CreateKey(expired, "sk-expired-" + RandomHex(16));
  ProviderKey later;
  later.set_name(KeyName("later"));
  *later.mutable_expire_time() =
      TimeUtil::MicrosecondsToTimestamp(absl::ToUnixMicros(clock_.Now() + absl::Seconds(10)));
  CreateKey(later, "sk-later-" + RandomHex(16));
  CreateKey("ok", "sk-ok-" + RandomHex(16));

  std::map<std::string, int> seen;
  for (const std::string& name : AcquireNames(pool(), 20)) ++seen[name];
  EXPECT_EQ(seen, (std::map<std::string, int>{{KeyName("later"), 10}, {KeyName("ok"), 10}}));
  // At its expire_time the key stops being acquired.
  clock_.Advance(absl::Seconds(10));
  for (const std::string& name : AcquireNames(pool(), 10)) EXPECT_EQ(name, KeyName("ok"));

  // Asked for by name they are not usable either; an unknown key is NOT_FOUND.
  for (const char* id : {"disabled", "expired", "later"}) {
    ExpectStatus(pool().Acquire(Request(KeyName(id))), absl::StatusCode::kFailedPrecondition,
                 "NO_USABLE_KEY");
  }
  EXPECT_EQ(pool().Acquire(Request(KeyName("nope"))).status().code(), absl::StatusCode::kNotFound);
}

TEST_P(CredentialsTest, ProviderWithoutUsableKeysHasNoUsableKey) {
  // No keys at all.
  ExpectStatus(pool().Acquire(Request()), absl::StatusCode::kFailedPrecondition, "NO_USABLE_KEY");
  // Only a disabled key.
  ProviderKey disabled;
  disabled.set_name(KeyName("disabled"));
  disabled.set_disabled(true);
  CreateKey(disabled, "sk-disabled-" + RandomHex(16));
  ExpectStatus(pool().Acquire(Request()), absl::StatusCode::kFailedPrecondition, "NO_USABLE_KEY");
  // A provider that does not exist has no keys either.
  ExpectStatus(pool().Acquire(Request("", 0, 0, "providers/unknown")),
               absl::StatusCode::kFailedPrecondition, "NO_USABLE_KEY");
}

// One secret that does not open must not stop a rewrap: it is reported and left as it
// is, and every other secret moves to the new master key.
TEST_P(CredentialsTest, RewrapSkipsAndReportsSecretsThatDoNotOpen) {
  for (const std::string id : {"k1", "k2", "k3", "k4"}) CreateKey(id, "sk-" + id + RandomHex(8));
  std::string envelope = Envelope(KeyName("k2"));
  char& c = envelope[envelope.size() / 2];
  c = c == 'A' ? 'B' : 'A';
  SetEnvelope(KeyName("k2"), envelope);

  absl::StatusOr<MasterKeyRing> both =
      MasterKeyRing::Parse(line1_ + "\n" + MasterKeyRing::GenerateLine(2));
  ASSERT_TRUE(both.ok()) << both.status();
  ProviderKeyStore keys(*store_, *both, 100);
  absl::StatusOr<ProviderKeyStore::RewrapResult> result = keys.Rewrap(/*batch=*/1);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->rewrapped, 3);
  EXPECT_THAT(result->failed, ::testing::ElementsAre(KeyName("k2") + "@1"));
  EXPECT_EQ(Count("SELECT COUNT(*) FROM provider_key_secrets WHERE master_key_version = 2"), 3);
  // Again: nothing left to do but the same report.
  result = keys.Rewrap(/*batch=*/2);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->rewrapped, 0);
  EXPECT_THAT(result->failed, ::testing::ElementsAre(KeyName("k2") + "@1"));
}

// The hint shows 8 characters only of a long secret, 4 of a medium one, none of a short
// or non-ASCII one (a cut inside UTF-8 would not be text).
TEST(SecretHintTest, ShowsLittleOfTheSecret) {
  EXPECT_EQ(server::SecretHint("sk-proj-0123456789abcdefghijklmnopqrstuv"), "sk-p...stuv");
  EXPECT_EQ(server::SecretHint("sk-0123456789abcdef"), "...cdef");
  EXPECT_EQ(server::SecretHint("short-secret"), "...");
  EXPECT_EQ(server::SecretHint("sk-\xc3\xa9\xc3\xa9"
                               "0123456789abcdefghijklmnopqrstuvwxyz"),
            "...");
}

INSTANTIATE_TEST_SUITE_P(Engines, CredentialsTest, AllEngines(), NameGen());
INSTANTIATE_TEST_SUITE_P(Engines, CredentialsHealthTest, AllEngines(), NameGen());

}  // namespace
}  // namespace modelvault::conformance
