// Datastore conformance (storage/storage.h) on SQLite and PostgreSQL, with the schemas of
// SchemaRegistry::Default(): CRUD round trips, error codes, transactions, List (filters,
// order, keyset pagination), the change feed under concurrent writers, secrets and
// idempotency records.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <latch>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/timestamp.pb.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "storage/schema.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"

namespace modelvault::conformance {
namespace {

using ::modelvault::storage::CellText;
using ::modelvault::storage::ChangeRecord;
using ::modelvault::storage::Datastore;
using ::modelvault::storage::DatastoreOptions;
using ::modelvault::storage::IdempotencyRecord;
using ::modelvault::storage::ListQuery;
using ::modelvault::storage::ListResult;
using ::modelvault::storage::Reader;
using ::modelvault::storage::ReadWriteTx;
using ::modelvault::storage::ResourceSchema;
using ::modelvault::storage::SchemaRegistry;
using ::modelvault::storage::SqlCell;
using ::modelvault::storage::SqlRow;
using ::modelvault::storage::SqlType;
using ::modelvault::storage::StoredResource;
using ::modelvault::v1::Model;
using ::modelvault::v1::ModelFamily;
using ::modelvault::v1::Provider;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr std::int64_t kT0 = 1704067200;  // 2024-01-01T00:00:00Z
constexpr std::int64_t kDay = 86400;

google::protobuf::Timestamp Ts(std::int64_t seconds, std::int32_t nanos = 0) {
  google::protobuf::Timestamp ts;
  ts.set_seconds(seconds);
  ts.set_nanos(nanos);
  return ts;
}

std::int64_t Micros(const google::protobuf::Timestamp& ts) {
  return ts.seconds() * 1000000 + ts.nanos() / 1000;
}

const ResourceSchema& ProviderSchema() {
  return *SchemaRegistry::Default().ForMessage(Provider::descriptor());
}
const ResourceSchema& FamilySchema() {
  return *SchemaRegistry::Default().ForMessage(ModelFamily::descriptor());
}
const ResourceSchema& ModelSchema() {
  return *SchemaRegistry::Default().ForMessage(Model::descriptor());
}

Provider MakeProvider(const std::string& id, const std::string& display = "Provider",
                      Provider::AuthMethod auth = Provider::AUTH_METHOD_BEARER,
                      bool enabled = true) {
  Provider p;
  p.set_name(absl::StrCat("providers/", id));
  p.set_display_name(display);
  p.set_description(absl::StrCat("The ", display, " API"));
  p.set_base_url(absl::StrCat("https://api.", id, ".test/v1"));
  p.set_auth_method(auth);
  p.set_enabled(enabled);
  *p.mutable_create_time() = Ts(kT0, 123456000);
  *p.mutable_update_time() = Ts(kT0 + 60, 999999000);
  return p;
}

ModelFamily MakeFamily(const std::string& provider_id, const std::string& id) {
  ModelFamily f;
  f.set_name(absl::StrCat("providers/", provider_id, "/modelFamilies/", id));
  f.set_display_name(absl::StrCat("Family ", id));
  f.set_description("A family");
  *f.mutable_create_time() = Ts(kT0);
  *f.mutable_update_time() = Ts(kT0 + 1);
  return f;
}

Model MakeModel(const std::string& provider_id, const std::string& id) {
  Model m;
  m.set_name(absl::StrCat("providers/", provider_id, "/models/", id));
  m.set_display_name(absl::StrCat("Model ", id));
  m.set_context_window(8192);
  m.set_max_output_tokens(4096);
  *m.mutable_create_time() = Ts(kT0);
  *m.mutable_update_time() = Ts(kT0);
  return m;
}

// A model with every kind of field set.
Model FullModel() {
  Model m = MakeModel("openai", "gpt-4o");
  m.set_display_name("GPT-4o");
  m.set_upstream_id("gpt-4o-2024-08-06");
  m.set_family("providers/openai/modelFamilies/gpt-4");
  m.set_context_window(128000);
  m.set_max_output_tokens(16384);
  m.set_supports_images(true);
  m.set_supports_tools(true);
  m.set_supports_reasoning(false);
  m.set_supports_streaming(true);
  m.set_enabled(true);
  *m.mutable_deprecate_time() = Ts(kT0 + 200 * kDay, 1000);
  *m.mutable_retire_time() = Ts(kT0 + 400 * kDay);
  auto* p1 = m.add_prices();
  *p1->mutable_effective_time() = Ts(kT0);
  p1->set_input(5000000000);
  p1->set_output(15000000000);
  p1->set_cache_read(2500000000);
  p1->set_cache_write(0);
  p1->set_reasoning(0);
  auto* p2 = m.add_prices();
  *p2->mutable_effective_time() = Ts(kT0 + 30 * kDay);
  p2->set_input(2500000000);
  p2->set_output(10000000000);
  p2->set_cache_read(1250000000);
  p2->set_cache_write(3750000000);
  p2->set_reasoning(100000000000000);
  *m.mutable_create_time() = Ts(kT0 + 5, 42000);
  *m.mutable_update_time() = Ts(kT0 + 6, 43000);
  return m;
}

std::vector<std::string> Names(const std::vector<StoredResource>& items) {
  std::vector<std::string> out;
  for (const StoredResource& item : items) {
    out.push_back(storage::ResourceName(*item.message));
  }
  return out;
}

class DatastoreTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    DatastoreOptions options;
    options.pool_size = 12;  // the concurrency tests run 8 writers and a reader
    absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated(options);
    ASSERT_TRUE(ds.ok()) << ds.status();
    ds_ = *std::move(ds);
  }

  // Runs `fn` in a write transaction and returns its status.
  absl::Status Write(const std::function<absl::Status(ReadWriteTx&)>& fn) {
    return ds_->ReadWriteTx([&](ReadWriteTx& tx) { return fn(tx); });
  }

  absl::Status Insert(const ResourceSchema& schema, const google::protobuf::Message& m) {
    return Write([&](ReadWriteTx& tx) { return tx.Insert(schema, m); });
  }

  void MustInsert(const ResourceSchema& schema, const google::protobuf::Message& m) {
    absl::Status status = Insert(schema, m);
    ASSERT_TRUE(status.ok()) << status << " inserting " << m.ShortDebugString();
  }

  absl::StatusOr<StoredResource> Get(const ResourceSchema& schema, const std::string& name) {
    absl::StatusOr<StoredResource> out = absl::UnknownError("not run");
    absl::Status status = ds_->Read([&](Reader& reader) {
      out = reader.Get(schema, name);
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    return out;
  }

  absl::StatusOr<ListResult> List(const ResourceSchema& schema, const ListQuery& query) {
    absl::StatusOr<ListResult> out = absl::UnknownError("not run");
    absl::Status status = ds_->Read([&](Reader& reader) {
      out = reader.List(schema, query);
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    return out;
  }

  // One page of up to 1000 names matching `filter` in `order_by` order.
  absl::StatusOr<std::vector<std::string>> ListNames(
      const ResourceSchema& schema, const std::string& filter, const std::string& order_by = "",
      std::optional<std::string> parent = std::nullopt) {
    ListQuery query;
    query.filter = filter;
    query.parent = std::move(parent);
    query.limit = 1000;
    absl::StatusOr<std::vector<storage::OrderTerm>> order = schema.ParseOrderBy(order_by);
    if (!order.ok()) return order.status();
    query.order = *std::move(order);
    absl::StatusOr<ListResult> result = List(schema, query);
    if (!result.ok()) return result.status();
    if (result->more) return absl::InternalError("more than 1000 rows");
    return Names(result->items);
  }

  absl::StatusOr<std::vector<ChangeRecord>> ReadChanges(std::int64_t after, int limit = 10000) {
    absl::StatusOr<std::vector<ChangeRecord>> out = absl::UnknownError("not run");
    absl::Status status = ds_->Read([&](Reader& reader) {
      out = reader.ReadChanges(after, limit);
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    return out;
  }

  std::pair<std::int64_t, std::int64_t> FirstAndLastSeq() {
    std::pair<std::int64_t, std::int64_t> out{-1, -1};
    absl::Status status = ds_->Read([&](Reader& reader) {
      absl::StatusOr<std::int64_t> first = reader.FirstChangeSeq();
      absl::StatusOr<std::int64_t> last = reader.LastChangeSeq();
      if (!first.ok()) return first.status();
      if (!last.ok()) return last.status();
      out = {*first, *last};
      return absl::OkStatus();
    });
    EXPECT_TRUE(status.ok()) << status;
    return out;
  }

  static ChangeRecord Change(const std::string& name, const std::string& type = "CREATED") {
    ChangeRecord r;
    r.time = absl::FromUnixMicros(kT0 * 1000000 + 777);
    r.resource_type = "modelvault.dev/Provider";
    r.resource_name = name;
    r.change_type = type;
    r.principal = "user:alice";
    r.request_id = absl::StrCat("req-", name);
    r.resource_json = absl::StrCat("{\"name\":\"", name, "\"}");
    return r;
  }

  std::unique_ptr<Datastore> ds_;
};

// --- basics --------------------------------------------------------------------------------

TEST_P(DatastoreTest, EngineAndFeatures) {
  EXPECT_TRUE(ds_->Ping().ok());
  if (is_postgres()) {
    EXPECT_EQ(ds_->engine(), "postgresql");
    EXPECT_TRUE(ds_->features().concurrent_writers);
    EXPECT_TRUE(ds_->features().advisory_locks);
  } else {
    EXPECT_EQ(ds_->engine(), "sqlite3");
    EXPECT_FALSE(ds_->features().concurrent_writers);
    EXPECT_FALSE(ds_->features().advisory_locks);
  }
}

TEST_P(DatastoreTest, OpenDatastoreOnAMissingDatabaseIsUnavailable) {
  std::string missing = "sqlite3://db=/nonexistent-modelvault-dir/sub/test.db";
  if (is_postgres()) {
    std::vector<std::string> parts = absl::StrSplit(url(), ' ');
    for (std::string& part : parts) {
      if (absl::StartsWith(part, "dbname=")) part = "dbname=mvtest_does_not_exist";
    }
    missing = absl::StrJoin(parts, " ");
  }
  absl::StatusOr<std::unique_ptr<Datastore>> ds = storage::OpenDatastore(missing);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kUnavailable) << ds.status();
}

TEST_P(DatastoreTest, OpenDatastoreRejectsAnUnknownScheme) {
  absl::StatusOr<std::unique_ptr<Datastore>> ds = storage::OpenDatastore("mysql://db=x");
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument) << ds.status();
}

// --- round trips ---------------------------------------------------------------------------

TEST_P(DatastoreTest, ProviderRoundTrip) {
  const Provider p = MakeProvider("acme", "Acme AI", Provider::AUTH_METHOD_API_KEY_HEADER, true);
  MustInsert(ProviderSchema(), p);
  absl::StatusOr<StoredResource> got = Get(ProviderSchema(), "providers/acme");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->revision, 1);
  EXPECT_THAT(*got->message, EqualsProto(p));

  // The same bits on both engines: micros, 0/1, enum names.
  EXPECT_EQ(QueryInt("SELECT create_time FROM providers").value_or(0), Micros(p.create_time()));
  EXPECT_EQ(QueryInt("SELECT enabled FROM providers").value_or(-1), 1);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM providers WHERE auth_method = "
                     "'AUTH_METHOD_API_KEY_HEADER' AND parent = ''")
                .value_or(-1),
            1);

  Provider disabled = MakeProvider("quiet", "Quiet", Provider::AUTH_METHOD_NONE, false);
  disabled.clear_description();
  MustInsert(ProviderSchema(), disabled);
  absl::StatusOr<StoredResource> got2 = Get(ProviderSchema(), "providers/quiet");
  ASSERT_TRUE(got2.ok()) << got2.status();
  EXPECT_THAT(*got2->message, EqualsProto(disabled));
}

TEST_P(DatastoreTest, ModelFamilyRoundTrip) {
  MustInsert(ProviderSchema(), MakeProvider("openai"));
  const ModelFamily f = MakeFamily("openai", "gpt-4");
  MustInsert(FamilySchema(), f);
  absl::StatusOr<StoredResource> got = Get(FamilySchema(), f.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->revision, 1);
  EXPECT_THAT(*got->message, EqualsProto(f));
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM model_families WHERE parent = 'providers/openai'")
                .value_or(-1),
            1);
}

TEST_P(DatastoreTest, ModelRoundTripWithPricesTimestampsBoolsAndFamily) {
  MustInsert(ProviderSchema(), MakeProvider("openai"));
  MustInsert(FamilySchema(), MakeFamily("openai", "gpt-4"));
  const Model full = FullModel();
  MustInsert(ModelSchema(), full);
  absl::StatusOr<StoredResource> got = Get(ModelSchema(), full.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->revision, 1);
  EXPECT_THAT(*got->message, EqualsProto(full));

  // Without a family, and with the other bools and no retire time.
  Model bare = MakeModel("openai", "bare");
  bare.set_supports_reasoning(true);
  bare.set_context_window(0);
  MustInsert(ModelSchema(), bare);
  absl::StatusOr<StoredResource> got_bare = Get(ModelSchema(), bare.name());
  ASSERT_TRUE(got_bare.ok()) << got_bare.status();
  EXPECT_THAT(*got_bare->message, EqualsProto(bare));
  EXPECT_FALSE(static_cast<const Model&>(*got_bare->message).has_deprecate_time());
  // Empty references and unset timestamps are NULL.
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models WHERE family IS NULL").value_or(-1), 1);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models WHERE retire_time IS NULL").value_or(-1), 1);
}

TEST_P(DatastoreTest, TimestampsKeepMicrosecondsIncludingBeforeTheEpoch) {
  MustInsert(ProviderSchema(), MakeProvider("openai"));
  Model m = MakeModel("openai", "old");
  *m.mutable_deprecate_time() = Ts(-1, 500000000);  // 1969-12-31T23:59:59.5Z
  *m.mutable_retire_time() = Ts(kT0, 123456789);    // nanoseconds beyond micros
  MustInsert(ModelSchema(), m);
  absl::StatusOr<StoredResource> got = Get(ModelSchema(), m.name());
  ASSERT_TRUE(got.ok()) << got.status();
  const Model& stored = static_cast<const Model&>(*got->message);
  EXPECT_THAT(stored.deprecate_time(), EqualsProto(Ts(-1, 500000000)));
  EXPECT_THAT(stored.retire_time(), EqualsProto(Ts(kT0, 123456000)));
}

TEST_P(DatastoreTest, GetOfAMissingNameIsNotFound) {
  absl::StatusOr<StoredResource> got = Get(ProviderSchema(), "providers/nobody");
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound) << got.status();
  absl::StatusOr<StoredResource> model = Get(ModelSchema(), "providers/nobody/models/x");
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound) << model.status();
}

TEST_P(DatastoreTest, InsertDuplicateIsAlreadyExistsAndKeepsTheOriginal) {
  const Provider original = MakeProvider("acme", "Original");
  MustInsert(ProviderSchema(), original);
  absl::Status dup = Insert(ProviderSchema(), MakeProvider("acme", "Impostor"));
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists) << dup;
  absl::StatusOr<StoredResource> got = Get(ProviderSchema(), "providers/acme");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->revision, 1);
  EXPECT_THAT(*got->message, EqualsProto(original));
}

// The bulk path: text that needs escaping in COPY's format, NULLs and large numbers come
// back exactly; a duplicate key anywhere in the rows is ALREADY_EXISTS and the
// transaction writes nothing.
TEST_P(DatastoreTest, CopyRowsStoresEveryValueAndADuplicateWritesNothing) {
  const std::string text = "tab\t newline\n return\r backslash\\ \\N quote\" ünï";
  std::vector<SqlRow> rows;
  for (int i = 0; i < 2500; ++i) {
    rows.push_back({SqlCell(absl::StrCat("copy-", i)), SqlCell(std::int64_t{i}),
                    SqlCell(std::int64_t{9'000'000'000'000'000'000LL - i}),
                    i % 2 == 0 ? SqlCell(text) : SqlCell(absl::StrCat("h", i))});
  }
  ASSERT_TRUE(Write([&](ReadWriteTx& tx) {
                return tx.CopyRows("usage_request_ids",
                                   "request_id, seq, record_time, content_hash", rows);
              }).ok());
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM usage_request_ids").value_or(-1), 2500);
  EXPECT_EQ(QueryInt("SELECT record_time FROM usage_request_ids WHERE request_id = 'copy-7'")
                .value_or(-1),
            9'000'000'000'000'000'000LL - 7);
  absl::StatusOr<std::vector<SqlRow>> stored;
  ASSERT_TRUE(ds_->Read([&](Reader& reader) {
                   stored = reader.Query(
                       "SELECT content_hash FROM usage_request_ids WHERE request_id = 'copy-42'",
                       {}, {SqlType::kText});
                   return stored.status();
                 })
                  .ok());
  ASSERT_EQ(stored->size(), 1u);
  EXPECT_EQ(CellText(stored->front()[0]), text);

  std::vector<SqlRow> again = {{SqlCell(std::string("copy-new")), SqlCell(std::int64_t{1}),
                                SqlCell(std::int64_t{1}), SqlCell(std::string("h"))},
                               {SqlCell(std::string("copy-99")), SqlCell(std::int64_t{1}),
                                SqlCell(std::int64_t{1}), SqlCell(std::string("h"))}};
  absl::Status duplicate = Write([&](ReadWriteTx& tx) {
    return tx.CopyRows("usage_request_ids", "request_id, seq, record_time, content_hash", again);
  });
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kAlreadyExists) << duplicate;
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM usage_request_ids").value_or(-1), 2500);
  // The session is usable afterwards.
  EXPECT_TRUE(Write([&](ReadWriteTx& tx) {
                return tx.CopyRows("usage_request_ids",
                                   "request_id, seq, record_time, content_hash", {again[0]});
              }).ok());
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM usage_request_ids").value_or(-1), 2501);
}

TEST_P(DatastoreTest, InsertWithAnInvalidNameIsInvalidArgument) {
  Provider p = MakeProvider("acme");
  p.set_name("providers/Not_A_Slug!");
  EXPECT_EQ(Insert(ProviderSchema(), p).code(), absl::StatusCode::kInvalidArgument);
  p.set_name("models/acme");
  EXPECT_EQ(Insert(ProviderSchema(), p).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM providers").value_or(-1), 0);
}

TEST_P(DatastoreTest, InsertUnderAMissingParentIsFailedPrecondition) {
  absl::Status status = Insert(ModelSchema(), MakeModel("ghost", "m"));
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1), 0);
}

TEST_P(DatastoreTest, ConstraintViolationIsInvalidArgumentWithoutSql) {
  MustInsert(ProviderSchema(), MakeProvider("openai"));
  Model m = MakeModel("openai", "negative");
  m.set_context_window(-1);  // CHECK (context_window >= 0)
  absl::Status status = Insert(ModelSchema(), m);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), Not(HasSubstr("INSERT")));
  EXPECT_THAT(status.message(), Not(HasSubstr("context_window >= 0")));
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1), 0);
}

TEST_P(DatastoreTest, UpdateBumpsTheRevisionAndStaleRevisionIsAborted) {
  MustInsert(ProviderSchema(), MakeProvider("openai"));
  MustInsert(FamilySchema(), MakeFamily("openai", "gpt-4"));
  Model m = FullModel();
  MustInsert(ModelSchema(), m);

  Model v2 = m;
  v2.set_display_name("GPT-4o (2024-08)");
  v2.clear_family();
  v2.set_supports_images(false);
  v2.clear_deprecate_time();
  v2.mutable_prices()->RemoveLast();
  *v2.mutable_update_time() = Ts(kT0 + 100);
  ASSERT_TRUE(Write([&](ReadWriteTx& tx) { return tx.Update(ModelSchema(), v2, 1); }).ok());
  absl::StatusOr<StoredResource> got = Get(ModelSchema(), m.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->revision, 2);
  EXPECT_THAT(*got->message, EqualsProto(v2));
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models WHERE family IS NULL").value_or(-1), 1);

  Model v3 = v2;
  v3.set_display_name("lost update");
  absl::Status tx_status = absl::UnknownError("not run");
  absl::Status stale = Write([&](ReadWriteTx& tx) {
    tx_status = tx.Update(ModelSchema(), v3, 1);
    return tx_status;
  });
  EXPECT_EQ(tx_status.code(), absl::StatusCode::kAborted) << tx_status;
  EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
  got = Get(ModelSchema(), m.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->revision, 2);
  EXPECT_THAT(*got->message, EqualsProto(v2));
}

TEST_P(DatastoreTest, UpdateOfAMissingNameIsNotFound) {
  absl::Status status =
      Write([&](ReadWriteTx& tx) { return tx.Update(ProviderSchema(), MakeProvider("nope"), 1); });
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM providers").value_or(-1), 0);
}

TEST_P(DatastoreTest, DeleteChecksTheRevision) {
  MustInsert(ProviderSchema(), MakeProvider("acme"));
  absl::Status stale =
      Write([&](ReadWriteTx& tx) { return tx.Delete(ProviderSchema(), "providers/acme", 7); });
  EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
  EXPECT_TRUE(Get(ProviderSchema(), "providers/acme").ok());

  ASSERT_TRUE(Write([&](ReadWriteTx& tx) {
                return tx.Delete(ProviderSchema(), "providers/acme", 1);
              }).ok());
  EXPECT_EQ(Get(ProviderSchema(), "providers/acme").status().code(), absl::StatusCode::kNotFound);

  absl::Status missing =
      Write([&](ReadWriteTx& tx) { return tx.Delete(ProviderSchema(), "providers/acme", 1); });
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
}

TEST_P(DatastoreTest, DeleteOfAReferencedRowIsFailedPreconditionAndDeletesNothing) {
  MustInsert(ProviderSchema(), MakeProvider("openai"));
  MustInsert(FamilySchema(), MakeFamily("openai", "gpt-4"));
  Model m = MakeModel("openai", "gpt-4o");
  m.set_family("providers/openai/modelFamilies/gpt-4");
  MustInsert(ModelSchema(), m);

  absl::Status provider =
      Write([&](ReadWriteTx& tx) { return tx.Delete(ProviderSchema(), "providers/openai", 1); });
  EXPECT_EQ(provider.code(), absl::StatusCode::kFailedPrecondition) << provider;
  absl::Status family = Write([&](ReadWriteTx& tx) {
    return tx.Delete(FamilySchema(), "providers/openai/modelFamilies/gpt-4", 1);
  });
  EXPECT_EQ(family.code(), absl::StatusCode::kFailedPrecondition) << family;

  EXPECT_TRUE(Get(ProviderSchema(), "providers/openai").ok());
  EXPECT_TRUE(Get(FamilySchema(), "providers/openai/modelFamilies/gpt-4").ok());
  EXPECT_TRUE(Get(ModelSchema(), m.name()).ok());
}

TEST_P(DatastoreTest, CountWhereAndGetForUpdate) {
  MustInsert(ProviderSchema(), MakeProvider("a"));
  MustInsert(ProviderSchema(), MakeProvider("b"));
  for (const char* id : {"m1", "m2", "m3"}) MustInsert(ModelSchema(), MakeModel("a", id));
  MustInsert(ModelSchema(), MakeModel("b", "m1"));
  absl::Status status = Write([&](ReadWriteTx& tx) -> absl::Status {
    absl::StatusOr<std::int64_t> a = tx.CountWhere(ModelSchema(), "parent", "providers/a");
    absl::StatusOr<std::int64_t> c = tx.CountWhere(ModelSchema(), "parent", "providers/c");
    EXPECT_EQ(a.value_or(-1), 3);
    EXPECT_EQ(c.value_or(-1), 0);
    absl::StatusOr<StoredResource> locked = tx.GetForUpdate(ModelSchema(), "providers/b/models/m1");
    EXPECT_TRUE(locked.ok()) << locked.status();
    if (locked.ok()) {
      EXPECT_THAT(*locked->message, EqualsProto(MakeModel("b", "m1")));
    }
    EXPECT_EQ(tx.GetForUpdate(ModelSchema(), "providers/b/models/zz").status().code(),
              absl::StatusCode::kNotFound);
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

// --- transactions --------------------------------------------------------------------------

TEST_P(DatastoreTest, FailedTransactionRollsBackEverythingItWrote) {
  MustInsert(ProviderSchema(), MakeProvider("keep", "Before"));
  int calls = 0;
  absl::Status status = Write([&](ReadWriteTx& tx) -> absl::Status {
    ++calls;
    if (absl::Status s = tx.Insert(ProviderSchema(), MakeProvider("openai")); !s.ok()) return s;
    if (absl::Status s = tx.Insert(ModelSchema(), MakeModel("openai", "m")); !s.ok()) return s;
    Provider changed = MakeProvider("keep", "After");
    if (absl::Status s = tx.Update(ProviderSchema(), changed, 1); !s.ok()) return s;
    ChangeRecord change = Change("providers/openai");
    if (absl::Status s = tx.AppendChange(change); !s.ok()) return s;
    if (absl::Status s = tx.SaveRequest({"req-1", "M", "h", "r"}); !s.ok()) return s;
    return absl::InvalidArgumentError("changed my mind");
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_EQ(status.message(), "changed my mind");
  EXPECT_EQ(calls, 1) << "a transaction failing with its own error must not be retried";

  EXPECT_EQ(Get(ProviderSchema(), "providers/openai").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Get(ModelSchema(), "providers/openai/models/m").status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<StoredResource> keep = Get(ProviderSchema(), "providers/keep");
  ASSERT_TRUE(keep.ok()) << keep.status();
  EXPECT_EQ(keep->revision, 1);
  EXPECT_EQ(static_cast<const Provider&>(*keep->message).display_name(), "Before");
  EXPECT_EQ(FirstAndLastSeq(), std::make_pair(std::int64_t{0}, std::int64_t{0}));
  absl::Status read = ds_->Read([&](Reader& reader) -> absl::Status {
    absl::StatusOr<std::optional<IdempotencyRecord>> found = reader.FindRequest("req-1");
    EXPECT_TRUE(found.ok()) << found.status();
    if (found.ok()) {
      EXPECT_FALSE(found->has_value());
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(read.ok()) << read;
}

TEST_P(DatastoreTest, StatementFailureInsideATransactionRollsBackEarlierWrites) {
  MustInsert(ProviderSchema(), MakeProvider("taken"));
  absl::Status status = Write([&](ReadWriteTx& tx) -> absl::Status {
    if (absl::Status s = tx.Insert(ProviderSchema(), MakeProvider("fresh")); !s.ok()) return s;
    ChangeRecord change = Change("providers/fresh");
    if (absl::Status s = tx.AppendChange(change); !s.ok()) return s;
    return tx.Insert(ProviderSchema(), MakeProvider("taken"));
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists) << status;
  EXPECT_EQ(Get(ProviderSchema(), "providers/fresh").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(FirstAndLastSeq().second, 0);
  // The pooled connection is usable afterwards.
  MustInsert(ProviderSchema(), MakeProvider("fresh"));
}

// --- List ----------------------------------------------------------------------------------

// The list fixture: two providers, one family, eleven models.
struct ModelRow {
  std::string provider;
  std::string id;
  std::string display;
  std::int64_t context_window;
  std::int64_t max_output;
  bool tools;
  bool enabled;
  std::int64_t create;                    // seconds
  std::optional<std::int64_t> deprecate;  // seconds
  bool in_family;

  std::string name() const { return absl::StrCat("providers/", provider, "/models/", id); }
};

const std::vector<ModelRow>& Rows() {
  static const auto* rows = new std::vector<ModelRow>{
      {"openai", "gpt-4o", "GPT-4o", 128000, 16384, true, true, kT0 + kDay, std::nullopt, true},
      {"openai", "gpt-4o-mini", "GPT-4o mini", 128000, 16384, true, true, kT0 + 2 * kDay,
       std::nullopt, true},
      {"openai", "gpt-3.5-turbo", "GPT-3.5 Turbo", 16385, 4096, true, false, kT0, kT0 + 3 * kDay,
       false},
      {"openai", "o1", "o1", 200000, 100000, false, true, kT0 + 3 * kDay, std::nullopt, false},
      {"openai", "gpt-4", "GPT-4", 8192, 8192, true, true, kT0, kT0 + 4 * kDay, true},
      {"anthropic", "claude-3-opus", "Claude 3 Opus", 200000, 4096, true, true, kT0 + kDay,
       kT0 + 5 * kDay, false},
      {"anthropic", "claude-3-haiku", "Claude 3 Haiku", 200000, 4096, true, false, kT0 + 2 * kDay,
       std::nullopt, false},
      {"anthropic", "claude-instant", "Claude Instant", 100000, 4096, false, false, kT0, kT0 + kDay,
       false},
      {"anthropic", "gptish", "gpt lowercase", 4096, 1024, false, true, kT0 + 4 * kDay,
       std::nullopt, false},
      {"anthropic", "promo", "50%_promo", 1000, 1000, false, true, kT0 + 5 * kDay, std::nullopt,
       false},
      {"anthropic", "promo-2", "50AB promo", 1000, 1000, false, true, kT0 + 5 * kDay,
       kT0 + 2 * kDay, false},
  };
  return *rows;
}

constexpr char kFamily[] = "providers/openai/modelFamilies/gpt-4";

class DatastoreListTest : public DatastoreTest {
 protected:
  void SetUp() override {
    DatastoreTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    absl::Status status = Write([&](ReadWriteTx& tx) -> absl::Status {
      Provider openai = MakeProvider("openai", "OpenAI", Provider::AUTH_METHOD_BEARER, true);
      Provider anthropic =
          MakeProvider("anthropic", "Anthropic", Provider::AUTH_METHOD_API_KEY_HEADER, true);
      Provider local = MakeProvider("local", "Local", Provider::AUTH_METHOD_NONE, false);
      *local.mutable_create_time() = Ts(kT0 + 10 * kDay);
      for (const Provider* p : {&openai, &anthropic, &local}) {
        if (absl::Status s = tx.Insert(ProviderSchema(), *p); !s.ok()) return s;
      }
      if (absl::Status s = tx.Insert(FamilySchema(), MakeFamily("openai", "gpt-4")); !s.ok()) {
        return s;
      }
      for (const ModelRow& row : Rows()) {
        Model m = MakeModel(row.provider, row.id);
        m.set_display_name(row.display);
        m.set_context_window(row.context_window);
        m.set_max_output_tokens(row.max_output);
        m.set_supports_tools(row.tools);
        m.set_enabled(row.enabled);
        *m.mutable_create_time() = Ts(row.create);
        if (row.deprecate.has_value()) *m.mutable_deprecate_time() = Ts(*row.deprecate);
        if (row.in_family) m.set_family(kFamily);
        if (absl::Status s = tx.Insert(ModelSchema(), m); !s.ok()) return s;
      }
      return absl::OkStatus();
    });
    ASSERT_TRUE(status.ok()) << status;
  }

  // Names of the rows satisfying `pred`, in name order.
  static std::vector<std::string> Expected(const std::function<bool(const ModelRow&)>& pred) {
    std::vector<std::string> out;
    for (const ModelRow& row : Rows()) {
      if (pred(row)) out.push_back(row.name());
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  // Names of all rows sorted by `less`, ties broken by name.
  static std::vector<std::string> Sorted(
      const std::function<bool(const ModelRow&, const ModelRow&)>& less,
      const std::function<bool(const ModelRow&, const ModelRow&)>& equal) {
    std::vector<ModelRow> rows = Rows();
    std::sort(rows.begin(), rows.end(), [&](const ModelRow& a, const ModelRow& b) {
      if (!equal(a, b)) return less(a, b);
      return a.name() < b.name();
    });
    std::vector<std::string> out;
    for (const ModelRow& row : rows) out.push_back(row.name());
    return out;
  }
};

struct FilterCase {
  std::string filter;
  std::function<bool(const ModelRow&)> matches;
};

TEST_P(DatastoreListTest, FiltersMatchExactlyTheRightModels) {
  const std::int64_t jan2 = kT0 + kDay;
  const std::vector<FilterCase> cases = {
      {"", [](const ModelRow&) { return true; }},
      {"context_window = 128000", [](const ModelRow& r) { return r.context_window == 128000; }},
      {"context_window != 128000", [](const ModelRow& r) { return r.context_window != 128000; }},
      {"context_window < 16385", [](const ModelRow& r) { return r.context_window < 16385; }},
      {"context_window <= 16385", [](const ModelRow& r) { return r.context_window <= 16385; }},
      {"context_window > 128000", [](const ModelRow& r) { return r.context_window > 128000; }},
      {"context_window >= 128000", [](const ModelRow& r) { return r.context_window >= 128000; }},
      {R"(display_name = "GPT-4")", [](const ModelRow& r) { return r.display == "GPT-4"; }},
      {R"(display_name != "GPT-4")", [](const ModelRow& r) { return r.display != "GPT-4"; }},
      {R"(display_name < "Claude 3 P")",
       [](const ModelRow& r) { return r.display < "Claude 3 P"; }},
      {R"(display_name >= "a")", [](const ModelRow& r) { return r.display >= "a"; }},
      {"supports_tools = true", [](const ModelRow& r) { return r.tools; }},
      {"supports_tools = false", [](const ModelRow& r) { return !r.tools; }},
      {"enabled != true", [](const ModelRow& r) { return !r.enabled; }},
      {R"(create_time > "2024-01-02T00:00:00Z")",
       [&](const ModelRow& r) { return r.create > jan2; }},
      {R"(create_time <= "2024-01-02T00:00:00Z")",
       [&](const ModelRow& r) { return r.create <= jan2; }},
      {R"(create_time = "2024-01-02T02:00:00+02:00")",
       [&](const ModelRow& r) { return r.create == jan2; }},
      {R"(create_time != "2024-01-01T00:00:00.000Z")",
       [](const ModelRow& r) { return r.create != kT0; }},
      {R"(deprecate_time < "2024-01-04T00:00:00Z")",
       [](const ModelRow& r) { return r.deprecate.has_value() && *r.deprecate < kT0 + 3 * kDay; }},
      {"supports_tools = true AND enabled = true",
       [](const ModelRow& r) { return r.tools && r.enabled; }},
      {"supports_tools = true enabled = true",  // implicit AND
       [](const ModelRow& r) { return r.tools && r.enabled; }},
      {"context_window = 8192 OR context_window = 4096",
       [](const ModelRow& r) { return r.context_window == 8192 || r.context_window == 4096; }},
      {"NOT supports_tools = true", [](const ModelRow& r) { return !r.tools; }},
      {"-enabled = true", [](const ModelRow& r) { return !r.enabled; }},
      {"NOT (enabled = true AND supports_tools = true)",
       [](const ModelRow& r) { return !(r.enabled && r.tools); }},
      // OR binds tighter than AND.
      {"enabled = true AND context_window = 8192 OR context_window = 200000",
       [](const ModelRow& r) {
         return r.enabled && (r.context_window == 8192 || r.context_window == 200000);
       }},
      {"(enabled = true AND context_window = 8192) OR context_window = 200000",
       [](const ModelRow& r) {
         return (r.enabled && r.context_window == 8192) || r.context_window == 200000;
       }},
      {absl::StrCat("family = \"", kFamily, "\""), [](const ModelRow& r) { return r.in_family; }},
      {R"(name = "providers/openai/models/gpt*")",
       [](const ModelRow& r) { return r.provider == "openai" && absl::StartsWith(r.id, "gpt"); }},
      {R"(display_name = "GPT*")",
       [](const ModelRow& r) { return absl::StartsWith(r.display, "GPT"); }},
      {R"(display_name = "gpt*")",  // prefix matches are case-sensitive on both engines
       [](const ModelRow& r) { return absl::StartsWith(r.display, "gpt"); }},
      {R"(display_name = "50%*")",  // LIKE metacharacters in the prefix are literal
       [](const ModelRow& r) { return absl::StartsWith(r.display, "50%"); }},
      {R"(display_name = "50%_p*")", [](const ModelRow& r) { return r.display == "50%_promo"; }},
      {R"(display_name = "GPT\*")", [](const ModelRow&) { return false; }},  // a literal '*'
  };
  for (const FilterCase& c : cases) {
    absl::StatusOr<std::vector<std::string>> names = ListNames(ModelSchema(), c.filter);
    ASSERT_TRUE(names.ok()) << c.filter << ": " << names.status();
    EXPECT_THAT(*names, ElementsAreArray(Expected(c.matches))) << "filter: " << c.filter;
  }
}

TEST_P(DatastoreListTest, FiltersOnProviderEnumsAndBools) {
  struct Case {
    std::string filter;
    std::vector<std::string> expected;
  };
  const std::vector<Case> cases = {
      {"auth_method = AUTH_METHOD_NONE", {"providers/local"}},
      {R"(auth_method = "AUTH_METHOD_API_KEY_HEADER")", {"providers/anthropic"}},
      {"auth_method != AUTH_METHOD_BEARER", {"providers/anthropic", "providers/local"}},
      {"enabled = false", {"providers/local"}},
      {"enabled = true", {"providers/anthropic", "providers/openai"}},
      {R"(base_url = "https://api.openai*")", {"providers/openai"}},
      {R"(create_time >= "2024-01-05T00:00:00Z")", {"providers/local"}},
      {"auth_method = AUTH_METHOD_NONE OR enabled = true",
       {"providers/anthropic", "providers/local", "providers/openai"}},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<std::string>> names = ListNames(ProviderSchema(), c.filter);
    ASSERT_TRUE(names.ok()) << c.filter << ": " << names.status();
    EXPECT_THAT(*names, ElementsAreArray(c.expected)) << "filter: " << c.filter;
  }
}

TEST_P(DatastoreListTest, ParentRestrictsToChildren) {
  absl::StatusOr<std::vector<std::string>> names =
      ListNames(ModelSchema(), "supports_tools = true", "", "providers/anthropic");
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, ElementsAreArray(Expected(
                          [](const ModelRow& r) { return r.provider == "anthropic" && r.tools; })));
  absl::StatusOr<std::vector<std::string>> none =
      ListNames(ModelSchema(), "", "", "providers/local");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_THAT(*none, IsEmpty());
  absl::StatusOr<std::vector<std::string>> families =
      ListNames(FamilySchema(), "", "", "providers/openai");
  ASSERT_TRUE(families.ok()) << families.status();
  EXPECT_THAT(*families, ElementsAreArray({std::string(kFamily)}));
}

TEST_P(DatastoreListTest, InvalidFilterIsInvalidArgument) {
  for (const char* filter :
       {"no_such_field = 1", "context_window = \"x\"", "supports_tools > true",
        "display_name; DROP TABLE models", "(enabled = true", "auth_method = AUTH_METHOD_NONE"}) {
    absl::StatusOr<std::vector<std::string>> names = ListNames(ModelSchema(), filter);
    EXPECT_EQ(names.status().code(), absl::StatusCode::kInvalidArgument) << filter;
  }
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM models").value_or(-1),
            static_cast<std::int64_t>(Rows().size()));
}

struct OrderCase {
  std::string order_by;
  std::vector<std::string> expected;
};

std::int64_t DeprecateKey(const ModelRow& r) { return r.deprecate.value_or(-1); }

TEST_P(DatastoreListTest, OrderByWithTiesBrokenByName) {
  using Row = ModelRow;
  const std::vector<OrderCase> cases = {
      {"", Sorted([](const Row&, const Row&) { return false; },
                  [](const Row&, const Row&) { return true; })},
      {"name desc", Sorted([](const Row& a, const Row& b) { return a.name() > b.name(); },
                           [](const Row& a, const Row& b) { return a.name() == b.name(); })},
      {"context_window",
       Sorted([](const Row& a, const Row& b) { return a.context_window < b.context_window; },
              [](const Row& a, const Row& b) { return a.context_window == b.context_window; })},
      {"context_window desc",
       Sorted([](const Row& a, const Row& b) { return a.context_window > b.context_window; },
              [](const Row& a, const Row& b) { return a.context_window == b.context_window; })},
      {"context_window desc, display_name", Sorted(
                                                [](const Row& a, const Row& b) {
                                                  if (a.context_window != b.context_window)
                                                    return a.context_window > b.context_window;
                                                  return a.display < b.display;
                                                },
                                                [](const Row& a, const Row& b) {
                                                  return a.context_window == b.context_window &&
                                                         a.display == b.display;
                                                })},
      {"max_output_tokens, context_window desc", Sorted(
                                                     [](const Row& a, const Row& b) {
                                                       if (a.max_output != b.max_output)
                                                         return a.max_output < b.max_output;
                                                       return a.context_window > b.context_window;
                                                     },
                                                     [](const Row& a, const Row& b) {
                                                       return a.max_output == b.max_output &&
                                                              a.context_window == b.context_window;
                                                     })},
      {"create_time desc, display_name desc", Sorted(
                                                  [](const Row& a, const Row& b) {
                                                    if (a.create != b.create)
                                                      return a.create > b.create;
                                                    return a.display > b.display;
                                                  },
                                                  [](const Row& a, const Row& b) {
                                                    return a.create == b.create &&
                                                           a.display == b.display;
                                                  })},
      {"display_name desc",
       Sorted([](const Row& a, const Row& b) { return a.display > b.display; },
              [](const Row& a, const Row& b) { return a.display == b.display; })},
      // Unset timestamps sort as the earliest value.
      {"deprecate_time",
       Sorted([](const Row& a, const Row& b) { return DeprecateKey(a) < DeprecateKey(b); },
              [](const Row& a, const Row& b) { return DeprecateKey(a) == DeprecateKey(b); })},
      {"deprecate_time desc",
       Sorted([](const Row& a, const Row& b) { return DeprecateKey(a) > DeprecateKey(b); },
              [](const Row& a, const Row& b) { return DeprecateKey(a) == DeprecateKey(b); })},
  };
  for (const OrderCase& c : cases) {
    absl::StatusOr<std::vector<std::string>> names = ListNames(ModelSchema(), "", c.order_by);
    ASSERT_TRUE(names.ok()) << c.order_by << ": " << names.status();
    EXPECT_THAT(*names, ElementsAreArray(c.expected)) << "order_by: " << c.order_by;
  }
}

TEST_P(DatastoreListTest, ParseOrderByRejectsBadFields) {
  for (const char* order_by :
       {"supports_tools", "no_such_field", "context_window desc desc",
        "context_window, context_window", "name; DROP TABLE models", "context_window sideways"}) {
    EXPECT_EQ(ModelSchema().ParseOrderBy(order_by).status().code(),
              absl::StatusCode::kInvalidArgument)
        << order_by;
  }
  absl::StatusOr<std::vector<storage::OrderTerm>> terms =
      ModelSchema().ParseOrderBy(" context_window desc ,display_name ");
  ASSERT_TRUE(terms.ok()) << terms.status();
  ASSERT_EQ(terms->size(), 3u);
  EXPECT_EQ((*terms)[0].column->name, "context_window");
  EXPECT_TRUE((*terms)[0].descending);
  EXPECT_EQ((*terms)[1].column->name, "display_name");
  EXPECT_FALSE((*terms)[1].descending);
  EXPECT_EQ((*terms)[2].column, nullptr);  // name, the tie-breaker
}

TEST_P(DatastoreListTest, KeysetPaginationVisitsEveryRowExactlyOnce) {
  const std::size_t total = Rows().size();
  for (const std::string order_by :
       {"", "name desc", "context_window desc", "deprecate_time", "create_time desc, display_name",
        "max_output_tokens, context_window desc"}) {
    absl::StatusOr<std::vector<std::string>> all = ListNames(ModelSchema(), "", order_by);
    ASSERT_TRUE(all.ok()) << all.status();
    ASSERT_EQ(all->size(), total);
    for (const int limit : {1, 2, 3, 4, static_cast<int>(total), static_cast<int>(total) + 1}) {
      ListQuery query;
      query.limit = limit;
      absl::StatusOr<std::vector<storage::OrderTerm>> order = ModelSchema().ParseOrderBy(order_by);
      ASSERT_TRUE(order.ok()) << order.status();
      query.order = *order;
      std::vector<std::string> seen;
      int pages = 0;
      while (true) {
        absl::StatusOr<ListResult> page = List(ModelSchema(), query);
        ASSERT_TRUE(page.ok()) << order_by << " limit " << limit << ": " << page.status();
        ++pages;
        ASSERT_LE(page->items.size(), static_cast<std::size_t>(limit));
        for (const std::string& name : Names(page->items)) seen.push_back(name);
        if (!page->more) break;
        ASSERT_EQ(page->items.size(), static_cast<std::size_t>(limit))
            << "only the last page may be short";
        ASSERT_EQ(page->last_key.size(), query.order.size());
        query.after = page->last_key;
        ASSERT_LE(pages, static_cast<int>(total) + 1) << "pagination does not end";
      }
      EXPECT_THAT(seen, ElementsAreArray(*all)) << order_by << " limit " << limit;
      EXPECT_EQ(pages, static_cast<int>((total + limit - 1) / limit))
          << order_by << " limit " << limit << ": wrong page count (an empty last page?)";
    }
  }
}

TEST_P(DatastoreListTest, PaginationWithFilterAndParent) {
  ListQuery query;
  query.parent = "providers/anthropic";
  query.filter = "enabled = true";
  query.limit = 2;
  query.order = *ModelSchema().ParseOrderBy("context_window desc");
  std::vector<std::string> seen;
  for (int pages = 0; pages < 10; ++pages) {
    absl::StatusOr<ListResult> page = List(ModelSchema(), query);
    ASSERT_TRUE(page.ok()) << page.status();
    for (const std::string& name : Names(page->items)) seen.push_back(name);
    if (!page->more) break;
    query.after = page->last_key;
  }
  absl::StatusOr<std::vector<std::string>> all =
      ListNames(ModelSchema(), "enabled = true", "context_window desc", "providers/anthropic");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_THAT(*all, Not(IsEmpty()));
  EXPECT_THAT(seen, ElementsAreArray(*all));
}

// --- change feed ---------------------------------------------------------------------------

TEST_P(DatastoreTest, ChangeFeedAssignsIncreasingSeqsAndReadsAfter) {
  EXPECT_EQ(FirstAndLastSeq(), std::make_pair(std::int64_t{0}, std::int64_t{0}));
  absl::StatusOr<std::vector<ChangeRecord>> empty = ReadChanges(0);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_THAT(*empty, IsEmpty());

  std::vector<ChangeRecord> appended;
  for (int i = 0; i < 5; ++i) {
    ChangeRecord r = Change(absl::StrCat("providers/p", i), i % 2 == 0 ? "CREATED" : "UPDATED");
    ASSERT_TRUE(Write([&](ReadWriteTx& tx) { return tx.AppendChange(r); }).ok());
    ASSERT_GT(r.seq, 0);
    if (!appended.empty()) {
      EXPECT_GT(r.seq, appended.back().seq);
    }
    appended.push_back(r);
  }
  // Two in one transaction.
  ChangeRecord a = Change("providers/a");
  ChangeRecord b = Change("providers/b", "DELETED");
  ASSERT_TRUE(Write([&](ReadWriteTx& tx) -> absl::Status {
                if (absl::Status s = tx.AppendChange(a); !s.ok()) return s;
                return tx.AppendChange(b);
              }).ok());
  EXPECT_GT(a.seq, appended.back().seq);
  EXPECT_GT(b.seq, a.seq);
  appended.push_back(a);
  appended.push_back(b);

  EXPECT_EQ(FirstAndLastSeq(), std::make_pair(appended.front().seq, appended.back().seq));

  absl::StatusOr<std::vector<ChangeRecord>> all = ReadChanges(0);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), appended.size());
  for (size_t i = 0; i < appended.size(); ++i) {
    const ChangeRecord& want = appended[i];
    const ChangeRecord& got = (*all)[i];
    EXPECT_EQ(got.seq, want.seq);
    EXPECT_EQ(got.time, want.time);
    EXPECT_EQ(got.resource_type, want.resource_type);
    EXPECT_EQ(got.resource_name, want.resource_name);
    EXPECT_EQ(got.change_type, want.change_type);
    EXPECT_EQ(got.principal, want.principal);
    EXPECT_EQ(got.request_id, want.request_id);
    EXPECT_EQ(got.resource_json, want.resource_json);
  }

  absl::StatusOr<std::vector<ChangeRecord>> later = ReadChanges(appended[2].seq);
  ASSERT_TRUE(later.ok()) << later.status();
  ASSERT_EQ(later->size(), appended.size() - 3);
  for (size_t i = 0; i < later->size(); ++i) EXPECT_EQ((*later)[i].seq, appended[i + 3].seq);

  absl::StatusOr<std::vector<ChangeRecord>> limited = ReadChanges(appended[0].seq, 2);
  ASSERT_TRUE(limited.ok()) << limited.status();
  ASSERT_EQ(limited->size(), 2u);
  EXPECT_EQ((*limited)[0].seq, appended[1].seq);
  EXPECT_EQ((*limited)[1].seq, appended[2].seq);

  absl::StatusOr<std::vector<ChangeRecord>> none = ReadChanges(appended.back().seq);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_THAT(*none, IsEmpty());
}

TEST_P(DatastoreTest, ChangesOfRolledBackTransactionsNeverAppear) {
  ChangeRecord first = Change("providers/first");
  ASSERT_TRUE(Write([&](ReadWriteTx& tx) { return tx.AppendChange(first); }).ok());
  ChangeRecord ghost = Change("providers/ghost");
  absl::Status failed = Write([&](ReadWriteTx& tx) -> absl::Status {
    if (absl::Status s = tx.AppendChange(ghost); !s.ok()) return s;
    return absl::CancelledError("rolled back");
  });
  EXPECT_EQ(failed.code(), absl::StatusCode::kCancelled);
  ChangeRecord second = Change("providers/second");
  ASSERT_TRUE(Write([&](ReadWriteTx& tx) { return tx.AppendChange(second); }).ok());
  EXPECT_GT(second.seq, first.seq);

  absl::StatusOr<std::vector<ChangeRecord>> all = ReadChanges(0);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].resource_name, "providers/first");
  EXPECT_EQ((*all)[1].resource_name, "providers/second");
  EXPECT_EQ(FirstAndLastSeq(), std::make_pair(first.seq, second.seq));
}

// The "BIGSERIAL trap": with truly concurrent writers, a seq can be assigned before an
// earlier-numbered transaction commits. A reader that polls ReadChanges(last_seen) must
// still never skip a record, so seq order has to be commit order.
TEST_P(DatastoreTest, ConcurrentWritersAndAPollingReaderSeeEveryChangeExactlyOnce) {
  constexpr int kWriters = 8;
  constexpr int kTxPerWriter = 50;
  constexpr int kTotal = kWriters * kTxPerWriter;

  std::atomic<bool> writers_done{false};
  std::latch start(kWriters + 1);
  absl::Mutex mu;
  std::vector<std::string> writer_errors;  // guarded by mu

  std::vector<ChangeRecord> seen;  // the reader's
  std::vector<std::string> reader_errors;
  std::thread reader([&] {
    start.arrive_and_wait();
    std::int64_t last_seen = 0;
    auto poll = [&]() -> std::size_t {
      absl::StatusOr<std::vector<ChangeRecord>> batch = absl::UnknownError("not run");
      absl::Status status = ds_->Read([&](Reader& r) {
        batch = r.ReadChanges(last_seen, 1000);
        return absl::OkStatus();
      });
      if (!status.ok() || !batch.ok()) {
        reader_errors.push_back(status.ok() ? batch.status().ToString() : status.ToString());
        return 0;
      }
      for (const ChangeRecord& r : *batch) {
        if (r.seq <= last_seen) {
          reader_errors.push_back(absl::StrCat("seq ", r.seq, " after ", last_seen));
        }
        last_seen = r.seq;
        seen.push_back(r);
      }
      return batch->size();
    };
    while (!writers_done.load()) {
      poll();
      std::this_thread::yield();
    }
    // Every writer has committed: drain.
    while (poll() > 0 && reader_errors.size() < 10) {
    }
  });

  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      start.arrive_and_wait();
      for (int i = 0; i < kTxPerWriter; ++i) {
        const std::string id = absl::StrFormat("w%d-%02d", w, i);
        absl::Status status = ds_->ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
          // Appending first widens the window between taking a seq and committing.
          ChangeRecord change = Change(absl::StrCat("providers/", id));
          if (absl::Status s = tx.AppendChange(change); !s.ok()) return s;
          return tx.Insert(ProviderSchema(), MakeProvider(id));
        });
        if (!status.ok()) {
          absl::MutexLock lock(&mu);
          writer_errors.push_back(absl::StrCat(id, ": ", status.ToString()));
        }
      }
    });
  }
  for (std::thread& t : writers) t.join();
  writers_done.store(true);
  reader.join();

  EXPECT_THAT(writer_errors, IsEmpty());
  EXPECT_THAT(reader_errors, IsEmpty());

  absl::StatusOr<std::vector<ChangeRecord>> feed = ReadChanges(0);
  ASSERT_TRUE(feed.ok()) << feed.status();
  EXPECT_EQ(feed->size(), static_cast<std::size_t>(kTotal));
  std::map<std::string, int> count;
  for (size_t i = 0; i < feed->size(); ++i) {
    if (i > 0) {
      EXPECT_GT((*feed)[i].seq, (*feed)[i - 1].seq);
    }
    ++count[(*feed)[i].resource_name];
  }
  EXPECT_EQ(count.size(), static_cast<std::size_t>(kTotal));
  for (int w = 0; w < kWriters; ++w) {
    for (int i = 0; i < kTxPerWriter; ++i) {
      const std::string name = absl::StrFormat("providers/w%d-%02d", w, i);
      EXPECT_EQ(count[name], 1) << name;
    }
  }
  EXPECT_EQ(QueryInt("SELECT COUNT(*) FROM providers").value_or(-1), kTotal);

  // The reader saw exactly the final feed: nothing skipped, nothing twice.
  std::vector<std::int64_t> seen_seqs, feed_seqs;
  for (const ChangeRecord& r : seen) seen_seqs.push_back(r.seq);
  for (const ChangeRecord& r : *feed) feed_seqs.push_back(r.seq);
  EXPECT_EQ(seen_seqs.size(), feed_seqs.size());
  EXPECT_TRUE(seen_seqs == feed_seqs) << "the polling reader missed or repeated records";
  if (seen_seqs != feed_seqs) {
    std::vector<std::int64_t> missed;
    std::set_difference(feed_seqs.begin(), feed_seqs.end(), seen_seqs.begin(), seen_seqs.end(),
                        std::back_inserter(missed));
    ADD_FAILURE() << missed.size() << " records skipped by the reader, first seq "
                  << (missed.empty() ? 0 : missed.front());
  }
}

// --- secrets and idempotency records -------------------------------------------------------

TEST_P(DatastoreTest, GetOrCreateSecretIsStableAcrossCallsAndDatastores) {
  int generated = 0;
  auto make = [&](std::string value) {
    return [&generated, value]() {
      ++generated;
      return value;
    };
  };
  absl::StatusOr<std::string> first = ds_->GetOrCreateSecret("page-token-key", make("alpha"));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, "alpha");
  absl::StatusOr<std::string> again = ds_->GetOrCreateSecret("page-token-key", make("beta"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, "alpha");

  absl::StatusOr<std::unique_ptr<Datastore>> other = Open();
  ASSERT_TRUE(other.ok()) << other.status();
  absl::StatusOr<std::string> from_other =
      (*other)->GetOrCreateSecret("page-token-key", make("gamma"));
  ASSERT_TRUE(from_other.ok()) << from_other.status();
  EXPECT_EQ(*from_other, "alpha");

  absl::StatusOr<std::string> different = ds_->GetOrCreateSecret("other-key", make("delta"));
  ASSERT_TRUE(different.ok()) << different.status();
  EXPECT_EQ(*different, "delta");
  EXPECT_GE(generated, 1);
}

TEST_P(DatastoreTest, SaveAndFindRequestAndSecondSaveIsAborted) {
  auto find = [&](const std::string& id) {
    absl::StatusOr<std::optional<IdempotencyRecord>> out = absl::UnknownError("not run");
    absl::Status status = ds_->Read([&](Reader& reader) {
      out = reader.FindRequest(id);
      return absl::OkStatus();
    });
    EXPECT_TRUE(status.ok()) << status;
    return out;
  };
  absl::StatusOr<std::optional<IdempotencyRecord>> missing = find("req-1");
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_FALSE(missing->has_value());

  const IdempotencyRecord record{"req-1", "/modelvault.v1.CatalogService/CreateModel", "hash-1",
                                 "CgVoZWxsbxIDd29ybGQ="};
  ASSERT_TRUE(Write([&](ReadWriteTx& tx) { return tx.SaveRequest(record); }).ok());
  absl::StatusOr<std::optional<IdempotencyRecord>> found = find("req-1");
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->request_id, record.request_id);
  EXPECT_EQ((*found)->method, record.method);
  EXPECT_EQ((*found)->request_hash, record.request_hash);
  EXPECT_EQ((*found)->response, record.response);

  // Inside a write transaction too.
  absl::Status in_tx = Write([&](ReadWriteTx& tx) -> absl::Status {
    absl::StatusOr<std::optional<IdempotencyRecord>> f = tx.FindRequest("req-1");
    if (!f.ok()) return f.status();
    EXPECT_TRUE(f->has_value());
    return absl::OkStatus();
  });
  EXPECT_TRUE(in_tx.ok()) << in_tx;

  const IdempotencyRecord other{"req-1", "/modelvault.v1.CatalogService/DeleteModel", "hash-2",
                                "other"};
  absl::Status second = Write([&](ReadWriteTx& tx) { return tx.SaveRequest(other); });
  EXPECT_EQ(second.code(), absl::StatusCode::kAborted) << second;
  found = find("req-1");
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->method, record.method);
  EXPECT_EQ((*found)->request_hash, record.request_hash);
  EXPECT_EQ((*found)->response, record.response);
}

INSTANTIATE_TEST_SUITE_P(Engines, DatastoreTest,
                         ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"}),
                         NameGen());
INSTANTIATE_TEST_SUITE_P(Engines, DatastoreListTest,
                         ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"}),
                         NameGen());

}  // namespace
}  // namespace modelvault::conformance
