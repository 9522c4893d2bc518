// ResourceStore conformance (storage/resource_store.h) on SQLite and PostgreSQL: output
// fields, etags, request_id idempotency, change records written with the mutation, parent,
// reference and dependent checks, and List with page tokens.
#include "storage/resource_store.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <latch>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/timestamp.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "storage/schema.h"
#include "storage/storage.h"
#include "tests/conformance/engine.h"

namespace modelvault::conformance {
namespace {

using ::google::protobuf::Message;
using ::modelvault::storage::ChangeRecord;
using ::modelvault::storage::Datastore;
using ::modelvault::storage::DatastoreOptions;
using ::modelvault::storage::EtagOf;
using ::modelvault::storage::ListPage;
using ::modelvault::storage::ListRequest;
using ::modelvault::storage::MutationContext;
using ::modelvault::storage::MutationResult;
using ::modelvault::storage::Reader;
using ::modelvault::storage::ReadWriteTx;
using ::modelvault::storage::ResourceStore;
using ::modelvault::storage::SchemaRegistry;
using ::modelvault::v1::Model;
using ::modelvault::v1::ModelFamily;
using ::modelvault::v1::Provider;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::SizeIs;

constexpr char kPageTokenKey[] = "conformance-page-token-key";
constexpr std::int64_t kT0 = 1717200000;  // 2024-06-01T00:00:00Z
constexpr char kCreateModel[] = "/modelvault.v1.CatalogService/CreateModel";
constexpr char kCreateProvider[] = "/modelvault.v1.CatalogService/CreateProvider";

google::protobuf::Timestamp Ts(absl::Time t) {
  google::protobuf::Timestamp ts;
  const std::int64_t micros = absl::ToUnixMicros(t);
  ts.set_seconds(micros / 1000000);
  ts.set_nanos(static_cast<std::int32_t>(micros % 1000000) * 1000);
  return ts;
}

Provider MakeProvider(const std::string& id, const std::string& display = "A provider") {
  Provider p;
  p.set_name(absl::StrCat("providers/", id));
  p.set_display_name(display);
  p.set_description("Upstream API");
  p.set_base_url(absl::StrCat("https://api.", id, ".test/v1"));
  p.set_auth_method(Provider::AUTH_METHOD_BEARER);
  p.set_enabled(true);
  return p;
}

ModelFamily MakeFamily(const std::string& provider_id, const std::string& id) {
  ModelFamily f;
  f.set_name(absl::StrCat("providers/", provider_id, "/modelFamilies/", id));
  f.set_display_name(absl::StrCat("Family ", id));
  return f;
}

Model MakeModel(const std::string& provider_id, const std::string& id,
                std::int64_t context_window = 8192) {
  Model m;
  m.set_name(absl::StrCat("providers/", provider_id, "/models/", id));
  m.set_display_name(absl::StrCat("Model ", id));
  m.set_upstream_id(id);
  m.set_context_window(context_window);
  m.set_max_output_tokens(4096);
  m.set_supports_tools(true);
  m.set_enabled(true);
  auto* price = m.add_prices();
  price->mutable_effective_time()->set_seconds(kT0);
  price->set_input(2500000000);
  price->set_output(10000000000);
  return m;
}

std::string NameOf(const Message& m) {
  return m.GetReflection()->GetString(m, m.GetDescriptor()->FindFieldByName("name"));
}

std::vector<std::string> Names(const ListPage& page) {
  std::vector<std::string> out;
  for (const auto& item : page.items) out.push_back(NameOf(*item));
  return out;
}

class ResourceStoreTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    DatastoreOptions options;
    options.pool_size = 12;  // the concurrency tests run 8 callers and a lister
    absl::StatusOr<std::unique_ptr<Datastore>> ds = OpenMigrated(options);
    ASSERT_TRUE(ds.ok()) << ds.status();
    ds_ = *std::move(ds);
    store_ = std::make_unique<ResourceStore>(*ds_, kPageTokenKey);
  }

  static MutationContext Ctx(const std::string& request_id = "",
                             const std::string& request_hash = "",
                             const std::string& method = kCreateModel) {
    MutationContext ctx;
    ctx.principal = "user:conformance";
    ctx.request_id = request_id;
    ctx.method = method;
    ctx.request_hash = request_hash;
    ctx.now = absl::FromUnixMicros(kT0 * 1000000 + 123456);
    return ctx;
  }

  // Creates `m` with a fresh context; fails the test when that fails.
  std::unique_ptr<Message> MustCreate(const Message& m) {
    absl::StatusOr<MutationResult> result = store_->Create(Ctx(), m);
    EXPECT_TRUE(result.ok()) << result.status() << " creating " << m.ShortDebugString();
    if (!result.ok()) return nullptr;
    return std::move(result->resource);
  }

  std::vector<ChangeRecord> Changes() {
    std::vector<ChangeRecord> out;
    absl::Status status = ds_->Read([&](Reader& reader) -> absl::Status {
      absl::StatusOr<std::vector<ChangeRecord>> changes = reader.ReadChanges(0, 100000);
      if (!changes.ok()) return changes.status();
      out = *std::move(changes);
      return absl::OkStatus();
    });
    EXPECT_TRUE(status.ok()) << status;
    return out;
  }

  std::int64_t CountRows(const std::string& table) {
    return QueryInt(absl::StrCat("SELECT COUNT(*) FROM ", table)).value_or(-1);
  }

  // Pages through List(request) with `page_size` and returns every name in order.
  absl::StatusOr<std::vector<std::string>> ListAll(const google::protobuf::Descriptor* type,
                                                   ListRequest request) {
    std::vector<std::string> out;
    for (int pages = 0; pages < 100000; ++pages) {
      absl::StatusOr<ListPage> page = store_->List(type, request);
      if (!page.ok()) return page.status();
      for (std::string& name : Names(*page)) out.push_back(std::move(name));
      if (page->next_page_token.empty()) return out;
      request.page_token = page->next_page_token;
    }
    return absl::InternalError("pagination does not end");
  }

  // Ordered before the members of derived fixtures: destroyed last.
  std::unique_ptr<Datastore> ds_;
  std::unique_ptr<ResourceStore> store_;
};

// --- Create --------------------------------------------------------------------------------

TEST_P(ResourceStoreTest, CreateFillsOutputFieldsAndWritesOneChange) {
  Provider input = MakeProvider("acme", "Acme");
  // Client-supplied output-only values are overwritten.
  input.mutable_create_time()->set_seconds(1);
  input.mutable_update_time()->set_seconds(2);
  input.set_etag("\"99\"");
  const MutationContext ctx = Ctx("", "", kCreateProvider);
  absl::StatusOr<MutationResult> result = store_->Create(ctx, input);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_NE(result->resource, nullptr);
  EXPECT_FALSE(result->replayed);
  const Provider& created = static_cast<const Provider&>(*result->resource);
  EXPECT_EQ(created.name(), "providers/acme");
  EXPECT_EQ(created.display_name(), "Acme");
  EXPECT_EQ(created.base_url(), input.base_url());
  EXPECT_THAT(created.create_time(), EqualsProto(Ts(ctx.now)));
  EXPECT_THAT(created.update_time(), EqualsProto(Ts(ctx.now)));
  EXPECT_FALSE(created.etag().empty());
  EXPECT_EQ(created.etag(), EtagOf(1));

  absl::StatusOr<std::unique_ptr<Message>> got =
      store_->Get(Provider::descriptor(), "providers/acme");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(**got, EqualsProto(created));

  const std::vector<ChangeRecord> changes = Changes();
  ASSERT_THAT(changes, SizeIs(1));
  const ChangeRecord& change = changes[0];
  EXPECT_EQ(change.seq, result->change_seq);
  EXPECT_GT(change.seq, 0);
  EXPECT_EQ(change.change_type, "CREATED");
  EXPECT_EQ(change.resource_type, "modelvault.dev/Provider");
  EXPECT_EQ(change.resource_name, "providers/acme");
  EXPECT_EQ(change.principal, ctx.principal);
  EXPECT_EQ(change.time, ctx.now);
  Provider from_json;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(change.resource_json, &from_json).ok())
      << change.resource_json;
  EXPECT_THAT(from_json, EqualsProto(created));
}

TEST_P(ResourceStoreTest, CreateWithAnInvalidNameIsInvalidArgument) {
  Provider p = MakeProvider("acme");
  p.set_name("providers/Acme Corp");
  EXPECT_EQ(store_->Create(Ctx(), p).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CountRows("providers"), 0);
  EXPECT_THAT(Changes(), IsEmpty());
}

TEST_P(ResourceStoreTest, CreateUnderAMissingParentIsNotFound) {
  absl::StatusOr<MutationResult> result = store_->Create(Ctx(), MakeModel("ghost", "m"));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound) << result.status();
  EXPECT_THAT(result.status().message(), HasSubstr("providers/ghost"));
  EXPECT_EQ(CountRows("models"), 0);
  EXPECT_THAT(Changes(), IsEmpty());
}

TEST_P(ResourceStoreTest, CreateReferencingAMissingFamilyIsFailedPrecondition) {
  MustCreate(MakeProvider("openai"));
  Model m = MakeModel("openai", "gpt-4o");
  m.set_family("providers/openai/modelFamilies/nope");
  absl::StatusOr<MutationResult> result = store_->Create(Ctx(), m);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
  EXPECT_EQ(CountRows("models"), 0);
  EXPECT_THAT(Changes(), SizeIs(1));  // the provider's
}

TEST_P(ResourceStoreTest, CreateDuplicateIsAlreadyExistsAndWritesNothing) {
  std::unique_ptr<Message> original = MustCreate(MakeProvider("acme", "Original"));
  ASSERT_NE(original, nullptr);
  absl::StatusOr<MutationResult> dup = store_->Create(Ctx(), MakeProvider("acme", "Impostor"));
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists) << dup.status();
  absl::StatusOr<std::unique_ptr<Message>> got =
      store_->Get(Provider::descriptor(), "providers/acme");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(**got, EqualsProto(static_cast<const Provider&>(*original)));
  EXPECT_THAT(Changes(), SizeIs(1));
}

TEST_P(ResourceStoreTest, GetOfAMissingNameIsNotFoundAndABadNameInvalid) {
  EXPECT_EQ(store_->Get(Provider::descriptor(), "providers/nobody").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Get(Model::descriptor(), "providers/nobody").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- idempotency ---------------------------------------------------------------------------

TEST_P(ResourceStoreTest, SameRequestIdAndHashReplaysTheFirstResult) {
  MustCreate(MakeProvider("openai"));
  const Model m = MakeModel("openai", "gpt-4o");
  MutationContext ctx = Ctx("req-create-1", "hash-A");
  absl::StatusOr<MutationResult> first = store_->Create(ctx, m);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->replayed);

  ctx.now += absl::Minutes(5);  // a retry, later
  absl::StatusOr<MutationResult> second = store_->Create(ctx, m);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->replayed);
  ASSERT_NE(second->resource, nullptr);
  EXPECT_THAT(*second->resource, EqualsProto(static_cast<const Model&>(*first->resource)));

  EXPECT_EQ(CountRows("models"), 1);
  std::vector<ChangeRecord> changes = Changes();
  ASSERT_THAT(changes, SizeIs(2));  // the provider's and the model's
  EXPECT_EQ(changes[1].resource_name, m.name());
  EXPECT_EQ(changes[1].request_id, "req-create-1");
}

TEST_P(ResourceStoreTest, SameRequestIdWithAnotherHashOrMethodIsInvalidAndWritesNothing) {
  MustCreate(MakeProvider("openai"));
  ASSERT_TRUE(store_->Create(Ctx("req-1", "hash-A"), MakeModel("openai", "first")).ok());

  absl::StatusOr<MutationResult> other_hash =
      store_->Create(Ctx("req-1", "hash-B"), MakeModel("openai", "second"));
  EXPECT_EQ(other_hash.status().code(), absl::StatusCode::kInvalidArgument) << other_hash.status();
  EXPECT_THAT(other_hash.status().message(), HasSubstr("req-1"));

  absl::StatusOr<MutationResult> other_method =
      store_->Create(Ctx("req-1", "hash-A", "/modelvault.v1.CatalogService/CreateModelFamily"),
                     MakeFamily("openai", "fam"));
  EXPECT_EQ(other_method.status().code(), absl::StatusCode::kInvalidArgument)
      << other_method.status();

  EXPECT_EQ(store_->Get(Model::descriptor(), "providers/openai/models/second").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(CountRows("models"), 1);
  EXPECT_EQ(CountRows("model_families"), 0);
  EXPECT_THAT(Changes(), SizeIs(2));
}

TEST_P(ResourceStoreTest, ConcurrentCallsWithTheSameRequestIdCreateOnce) {
  MustCreate(MakeProvider("openai"));
  constexpr int kCallers = 8;
  const Model m = MakeModel("openai", "contended");
  std::latch start(kCallers);
  std::vector<absl::StatusOr<MutationResult>> results;
  for (int i = 0; i < kCallers; ++i) results.emplace_back(absl::UnknownError("not run"));
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      start.arrive_and_wait();
      results[i] = store_->Create(Ctx("req-contended", "hash-contended"), m);
    });
  }
  for (std::thread& t : callers) t.join();

  int fresh = 0;
  const Message* reference = nullptr;
  for (int i = 0; i < kCallers; ++i) {
    ASSERT_TRUE(results[i].ok()) << "caller " << i << ": " << results[i].status();
    ASSERT_NE(results[i]->resource, nullptr);
    if (!results[i]->replayed) ++fresh;
    if (reference == nullptr) reference = results[i]->resource.get();
    EXPECT_THAT(*results[i]->resource, EqualsProto(static_cast<const Model&>(*reference)))
        << "caller " << i;
  }
  EXPECT_EQ(fresh, 1);
  EXPECT_EQ(CountRows("models"), 1);
  EXPECT_EQ(CountRows("request_ids"), 1);
  int model_changes = 0;
  for (const ChangeRecord& c : Changes()) model_changes += c.resource_name == m.name() ? 1 : 0;
  EXPECT_EQ(model_changes, 1);
}

TEST_P(ResourceStoreTest, IdempotentUpdateAndDeleteReplay) {
  MustCreate(MakeProvider("openai"));
  MustCreate(MakeModel("openai", "m"));
  Model patch;
  patch.set_name("providers/openai/models/m");
  patch.set_display_name("Renamed");
  const MutationContext update_ctx =
      Ctx("req-update", "hash-update", "/modelvault.v1.CatalogService/UpdateModel");
  absl::StatusOr<MutationResult> u1 = store_->Update(update_ctx, patch, {"display_name"});
  ASSERT_TRUE(u1.ok()) << u1.status();
  absl::StatusOr<MutationResult> u2 = store_->Update(update_ctx, patch, {"display_name"});
  ASSERT_TRUE(u2.ok()) << u2.status();
  EXPECT_TRUE(u2->replayed);
  ASSERT_NE(u2->resource, nullptr);
  EXPECT_THAT(*u2->resource, EqualsProto(static_cast<const Model&>(*u1->resource)));
  EXPECT_EQ(static_cast<const Model&>(*u2->resource).etag(), EtagOf(2));

  const MutationContext delete_ctx =
      Ctx("req-delete", "hash-delete", "/modelvault.v1.CatalogService/DeleteModel");
  absl::StatusOr<MutationResult> d1 =
      store_->Delete(delete_ctx, Model::descriptor(), "providers/openai/models/m", "");
  ASSERT_TRUE(d1.ok()) << d1.status();
  EXPECT_FALSE(d1->replayed);
  absl::StatusOr<MutationResult> d2 =
      store_->Delete(delete_ctx, Model::descriptor(), "providers/openai/models/m", "");
  ASSERT_TRUE(d2.ok()) << d2.status();
  EXPECT_TRUE(d2->replayed);

  std::map<std::string, int> by_type;
  for (const ChangeRecord& c : Changes()) {
    if (c.resource_name == "providers/openai/models/m") ++by_type[c.change_type];
  }
  EXPECT_EQ(by_type["CREATED"], 1);
  EXPECT_EQ(by_type["UPDATED"], 1);
  EXPECT_EQ(by_type["DELETED"], 1);
}

// --- Update --------------------------------------------------------------------------------

TEST_P(ResourceStoreTest, UpdateChangesOnlyTheMaskedFieldsAndBumpsTheEtag) {
  MustCreate(MakeProvider("openai"));
  std::unique_ptr<Message> created = MustCreate(MakeModel("openai", "gpt-4o", 128000));
  ASSERT_NE(created, nullptr);
  const Model& before = static_cast<const Model&>(*created);

  Model patch = MakeModel("openai", "gpt-4o", 1);  // context_window differs but is not masked
  patch.set_display_name("GPT-4o");
  patch.set_enabled(false);
  patch.clear_prices();
  MutationContext ctx = Ctx();
  ctx.now += absl::Hours(1);
  absl::StatusOr<MutationResult> result = store_->Update(ctx, patch, {"display_name"});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->replayed);
  ASSERT_NE(result->resource, nullptr);

  Model expected = before;
  expected.set_display_name("GPT-4o");
  *expected.mutable_update_time() = Ts(ctx.now);
  expected.set_etag(EtagOf(2));
  EXPECT_NE(expected.etag(), before.etag());
  EXPECT_THAT(*result->resource, EqualsProto(expected));
  absl::StatusOr<std::unique_ptr<Message>> got = store_->Get(Model::descriptor(), patch.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(**got, EqualsProto(expected));

  const std::vector<ChangeRecord> changes = Changes();
  ASSERT_THAT(changes, SizeIs(3));
  EXPECT_EQ(changes[2].change_type, "UPDATED");
  EXPECT_EQ(changes[2].resource_name, patch.name());
  EXPECT_EQ(changes[2].seq, result->change_seq);
  Model from_json;
  ASSERT_TRUE(
      google::protobuf::util::JsonStringToMessage(changes[2].resource_json, &from_json).ok());
  EXPECT_THAT(from_json, EqualsProto(expected));
}

TEST_P(ResourceStoreTest, UpdateWithTheCurrentEtagSucceedsAndWithAStaleOneIsAborted) {
  MustCreate(MakeProvider("openai"));
  std::unique_ptr<Message> created = MustCreate(MakeModel("openai", "m"));
  ASSERT_NE(created, nullptr);
  const std::string etag1 = static_cast<const Model&>(*created).etag();

  Model patch;
  patch.set_name("providers/openai/models/m");
  patch.set_display_name("Second");
  patch.set_etag(etag1);
  absl::StatusOr<MutationResult> ok = store_->Update(Ctx(), patch, {"display_name"});
  ASSERT_TRUE(ok.ok()) << ok.status();
  const Model after = static_cast<const Model&>(*ok->resource);
  EXPECT_NE(after.etag(), etag1);

  patch.set_display_name("Lost update");  // still carries etag1
  absl::StatusOr<MutationResult> stale = store_->Update(Ctx(), patch, {"display_name"});
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted) << stale.status();

  absl::StatusOr<std::unique_ptr<Message>> got = store_->Get(Model::descriptor(), patch.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(**got, EqualsProto(after));
  EXPECT_THAT(Changes(), SizeIs(3));  // provider, model created, one update
}

TEST_P(ResourceStoreTest, UpdateOfAMissingNameIsNotFound) {
  MustCreate(MakeProvider("openai"));
  Model patch;
  patch.set_name("providers/openai/models/nope");
  patch.set_display_name("x");
  absl::StatusOr<MutationResult> result = store_->Update(Ctx(), patch, {"display_name"});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound) << result.status();
  EXPECT_EQ(CountRows("models"), 0);
  EXPECT_THAT(Changes(), SizeIs(1));
}

TEST_P(ResourceStoreTest, UpdateOfOutputOnlyOrUnknownPathsIsInvalidArgument) {
  MustCreate(MakeProvider("openai"));
  MustCreate(MakeModel("openai", "m"));
  Model patch;
  patch.set_name("providers/openai/models/m");
  for (const std::vector<std::string>& paths :
       std::vector<std::vector<std::string>>{{"create_time"}, {"name"}, {"no_such_field"}}) {
    absl::StatusOr<MutationResult> result = store_->Update(Ctx(), patch, paths);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << paths[0];
  }
  EXPECT_THAT(Changes(), SizeIs(2));
}

TEST_P(ResourceStoreTest, UpdateReferencingAMissingFamilyIsFailedPrecondition) {
  MustCreate(MakeProvider("openai"));
  MustCreate(MakeModel("openai", "m"));
  Model patch;
  patch.set_name("providers/openai/models/m");
  patch.set_family("providers/openai/modelFamilies/ghost");
  absl::StatusOr<MutationResult> result = store_->Update(Ctx(), patch, {"family"});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
  absl::StatusOr<std::unique_ptr<Message>> got = store_->Get(Model::descriptor(), patch.name());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(static_cast<const Model&>(**got).family(), "");
  EXPECT_EQ(static_cast<const Model&>(**got).etag(), EtagOf(1));
}

// --- Delete --------------------------------------------------------------------------------

TEST_P(ResourceStoreTest, DeleteChecksTheEtagAndWritesADeletedChange) {
  MustCreate(MakeProvider("openai"));
  std::unique_ptr<Message> created = MustCreate(MakeModel("openai", "m"));
  ASSERT_NE(created, nullptr);
  const Model& model = static_cast<const Model&>(*created);

  absl::StatusOr<MutationResult> stale =
      store_->Delete(Ctx(), Model::descriptor(), model.name(), EtagOf(7));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted) << stale.status();
  EXPECT_TRUE(store_->Get(Model::descriptor(), model.name()).ok());
  EXPECT_THAT(Changes(), SizeIs(2));

  absl::StatusOr<MutationResult> deleted =
      store_->Delete(Ctx(), Model::descriptor(), model.name(), model.etag());
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(store_->Get(Model::descriptor(), model.name()).status().code(),
            absl::StatusCode::kNotFound);
  const std::vector<ChangeRecord> changes = Changes();
  ASSERT_THAT(changes, SizeIs(3));
  EXPECT_EQ(changes[2].change_type, "DELETED");
  EXPECT_EQ(changes[2].resource_name, model.name());
  EXPECT_EQ(changes[2].seq, deleted->change_seq);
  Model from_json;  // the resource as it was
  ASSERT_TRUE(
      google::protobuf::util::JsonStringToMessage(changes[2].resource_json, &from_json).ok());
  EXPECT_THAT(from_json, EqualsProto(model));

  absl::StatusOr<MutationResult> again =
      store_->Delete(Ctx(), Model::descriptor(), model.name(), "");
  EXPECT_EQ(again.status().code(), absl::StatusCode::kNotFound) << again.status();
}

TEST_P(ResourceStoreTest, DeleteOfAProviderWithChildrenIsFailedPreconditionNamingThem) {
  MustCreate(MakeProvider("openai"));
  MustCreate(MakeFamily("openai", "gpt-4"));
  MustCreate(MakeModel("openai", "a"));
  MustCreate(MakeModel("openai", "b"));
  const std::size_t changes_before = Changes().size();

  absl::StatusOr<MutationResult> result =
      store_->Delete(Ctx(), Provider::descriptor(), "providers/openai", "");
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
  EXPECT_THAT(result.status().message(), HasSubstr("models"));
  EXPECT_THAT(result.status().message(), HasSubstr("modelFamilies"));

  EXPECT_TRUE(store_->Get(Provider::descriptor(), "providers/openai").ok());
  EXPECT_EQ(CountRows("models"), 2);
  EXPECT_EQ(CountRows("model_families"), 1);
  EXPECT_EQ(Changes().size(), changes_before);
}

TEST_P(ResourceStoreTest, DeleteOfAReferencedFamilyIsFailedPreconditionUntilUnreferenced) {
  MustCreate(MakeProvider("openai"));
  MustCreate(MakeFamily("openai", "gpt-4"));
  Model m = MakeModel("openai", "gpt-4o");
  m.set_family("providers/openai/modelFamilies/gpt-4");
  MustCreate(m);

  absl::StatusOr<MutationResult> refused =
      store_->Delete(Ctx(), ModelFamily::descriptor(), "providers/openai/modelFamilies/gpt-4", "");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_THAT(refused.status().message(), HasSubstr("models"));
  EXPECT_EQ(CountRows("model_families"), 1);

  Model patch;
  patch.set_name(m.name());
  ASSERT_TRUE(store_->Update(Ctx(), patch, {"family"}).ok());  // clears the reference
  absl::StatusOr<MutationResult> deleted =
      store_->Delete(Ctx(), ModelFamily::descriptor(), "providers/openai/modelFamilies/gpt-4", "");
  EXPECT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(CountRows("model_families"), 0);
}

// --- List ----------------------------------------------------------------------------------

class ResourceStoreListTest : public ResourceStoreTest {
 protected:
  // Inserts `count` providers p-0000... in one transaction (fast setup).
  void InsertProviders(int count) {
    absl::Status status = ds_->ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
      const auto& schema = *SchemaRegistry::Default().ForMessage(Provider::descriptor());
      for (int i = 0; i < count; ++i) {
        Provider p = MakeProvider(absl::StrFormat("p-%04d", i));
        p.mutable_create_time()->set_seconds(kT0);
        p.mutable_update_time()->set_seconds(kT0);
        if (absl::Status s = tx.Insert(schema, p); !s.ok()) return s;
      }
      return absl::OkStatus();
    });
    ASSERT_TRUE(status.ok()) << status;
  }

  // Creates provider `provider_id` and models m-000 .. with context windows cycling
  // through 5 values.
  void CreateModels(const std::string& provider_id, int count) {
    MustCreate(MakeProvider(provider_id));
    for (int i = 0; i < count; ++i) {
      Model m = MakeModel(provider_id, absl::StrFormat("m-%03d", i), 1000 * (i % 5));
      m.set_supports_tools(i % 2 == 0);
      ASSERT_NE(MustCreate(m), nullptr);
    }
  }
};

TEST_P(ResourceStoreListTest, PageSizeDefaultsClampsAndRejectsNegatives) {
  InsertProviders(storage::kMaxPageSize + 1);

  ListRequest request;
  absl::StatusOr<ListPage> page = store_->List(Provider::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_THAT(page->items, SizeIs(storage::kDefaultPageSize));
  EXPECT_FALSE(page->next_page_token.empty());

  request.page_size = storage::kMaxPageSize + 500;
  page = store_->List(Provider::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_THAT(page->items, SizeIs(storage::kMaxPageSize));
  ASSERT_FALSE(page->next_page_token.empty());
  request.page_token = page->next_page_token;
  page = store_->List(Provider::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_THAT(Names(*page),
              ElementsAreArray({absl::StrFormat("providers/p-%04d", storage::kMaxPageSize)}));
  EXPECT_TRUE(page->next_page_token.empty());

  request.page_token.clear();
  request.page_size = 3;
  page = store_->List(Provider::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_THAT(Names(*page),
              ElementsAreArray({std::string("providers/p-0000"), std::string("providers/p-0001"),
                                std::string("providers/p-0002")}));

  request.page_size = -1;
  EXPECT_EQ(store_->List(Provider::descriptor(), request).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(ResourceStoreListTest, ItemsCarryTheirEtags) {
  CreateModels("openai", 2);
  ListRequest request;
  request.parent = "providers/openai";
  absl::StatusOr<ListPage> page = store_->List(Model::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_THAT(page->items, SizeIs(2));
  for (const auto& item : page->items) {
    EXPECT_EQ(static_cast<const Model&>(*item).etag(), EtagOf(1));
    absl::StatusOr<std::unique_ptr<Message>> got = store_->Get(Model::descriptor(), NameOf(*item));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_THAT(*item, EqualsProto(static_cast<const Model&>(**got)));
  }
}

TEST_P(ResourceStoreListTest, FilterAndOrderBy) {
  CreateModels("openai", 10);
  ListRequest request;
  request.parent = "providers/openai";
  request.filter = "supports_tools = true AND context_window >= 2000";
  request.order_by = "context_window desc";
  absl::StatusOr<ListPage> page = store_->List(Model::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  // Even i with 1000 * (i % 5) >= 2000: i = 2 (2000), 4 (4000), 6 (1000: no), 8 (3000).
  EXPECT_THAT(Names(*page), ElementsAreArray({std::string("providers/openai/models/m-004"),
                                              std::string("providers/openai/models/m-008"),
                                              std::string("providers/openai/models/m-002")}));
  EXPECT_TRUE(page->next_page_token.empty());
}

TEST_P(ResourceStoreListTest, ParentAndAllParents) {
  CreateModels("a", 3);
  CreateModels("b", 2);
  ListRequest request;
  request.parent = "providers/b";
  absl::StatusOr<std::vector<std::string>> b = ListAll(Model::descriptor(), request);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_THAT(*b, ElementsAreArray({std::string("providers/b/models/m-000"),
                                    std::string("providers/b/models/m-001")}));
  request.parent = "";
  request.all_parents = true;
  request.page_size = 2;
  absl::StatusOr<std::vector<std::string>> all = ListAll(Model::descriptor(), request);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_THAT(*all, SizeIs(5));
  EXPECT_TRUE(std::is_sorted(all->begin(), all->end()));
}

TEST_P(ResourceStoreListTest, PaginationVisitsEveryItemExactlyOnce) {
  CreateModels("openai", 23);
  for (const char* order_by : {"", "context_window", "context_window desc, display_name desc"}) {
    ListRequest request;
    request.parent = "providers/openai";
    request.order_by = order_by;
    request.page_size = 1000;
    absl::StatusOr<std::vector<std::string>> one_page = ListAll(Model::descriptor(), request);
    ASSERT_TRUE(one_page.ok()) << one_page.status();
    ASSERT_THAT(*one_page, SizeIs(23));
    for (const int page_size : {1, 5, 23}) {
      request.page_size = page_size;
      int pages = 0;
      std::vector<std::string> seen;
      request.page_token.clear();
      while (true) {
        absl::StatusOr<ListPage> page = store_->List(Model::descriptor(), request);
        ASSERT_TRUE(page.ok()) << page.status();
        ++pages;
        EXPECT_LE(page->items.size(), static_cast<std::size_t>(page_size));
        for (std::string& name : Names(*page)) seen.push_back(std::move(name));
        if (page->next_page_token.empty()) break;
        request.page_token = page->next_page_token;
        ASSERT_LT(pages, 100);
      }
      EXPECT_THAT(seen, ElementsAreArray(*one_page)) << order_by << " / " << page_size;
      EXPECT_EQ(pages, (23 + page_size - 1) / page_size) << order_by << " / " << page_size;
    }
  }
}

TEST_P(ResourceStoreListTest, PaginationWhileInsertingSeesEveryOriginalExactlyOnce) {
  CreateModels("openai", 200);
  std::set<std::string> originals;
  for (int i = 0; i < 200; ++i) {
    originals.insert(absl::StrFormat("providers/openai/models/m-%03d", i));
  }

  std::latch first_page_read(1);
  std::vector<std::string> inserter_errors;
  std::thread inserter([&] {
    std::mt19937_64 rng(std::random_device{}());
    std::uniform_int_distribution<int> letter(0, 25);
    first_page_read.wait();
    for (int i = 0; i < 100; ++i) {
      std::string id;
      for (int k = 0; k < 10; ++k) id.push_back(static_cast<char>('a' + letter(rng)));
      absl::StatusOr<MutationResult> r =
          store_->Create(Ctx(), MakeModel("openai", id, 1000 * (i % 5)));
      if (!r.ok() && !absl::IsAlreadyExists(r.status())) {
        inserter_errors.push_back(r.status().ToString());
      }
    }
  });

  std::map<std::string, int> seen;
  ListRequest request;
  request.parent = "providers/openai";
  request.page_size = 7;
  std::string failure;
  for (int pages = 0; pages < 1000; ++pages) {
    absl::StatusOr<ListPage> page = store_->List(Model::descriptor(), request);
    if (pages == 0) first_page_read.count_down();
    if (!page.ok()) {
      failure = page.status().ToString();
      break;
    }
    for (const std::string& name : Names(*page)) ++seen[name];
    if (page->next_page_token.empty()) break;
    request.page_token = page->next_page_token;
  }
  inserter.join();

  EXPECT_EQ(failure, "");
  EXPECT_THAT(inserter_errors, IsEmpty());
  for (const std::string& name : originals) EXPECT_EQ(seen[name], 1) << name;
  for (const auto& [name, count] : seen) EXPECT_EQ(count, 1) << name << " seen twice";
  EXPECT_EQ(CountRows("models"), 300);
}

TEST_P(ResourceStoreListTest, TamperedPageTokenIsInvalidArgument) {
  CreateModels("openai", 5);
  ListRequest request;
  request.parent = "providers/openai";
  request.page_size = 2;
  absl::StatusOr<ListPage> page = store_->List(Model::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  const std::string token = page->next_page_token;
  ASSERT_FALSE(token.empty());

  std::vector<std::string> bad;
  for (const std::size_t pos : {std::size_t{0}, token.size() / 2, token.size() - 2}) {
    std::string flipped = token;
    flipped[pos] = flipped[pos] == 'A' ? 'B' : 'A';
    bad.push_back(flipped);
  }
  bad.push_back(token.substr(0, token.size() / 2));
  bad.push_back(token + "AAAA");
  bad.push_back("not a page token");
  bad.push_back("!!!");
  for (const std::string& b : bad) {
    request.page_token = b;
    absl::StatusOr<ListPage> result = store_->List(Model::descriptor(), request);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument)
        << "token " << b << " was accepted";
  }
  request.page_token = token;
  EXPECT_TRUE(store_->List(Model::descriptor(), request).ok());
}

TEST_P(ResourceStoreListTest, PageTokenOfAnotherQueryIsInvalidArgument) {
  CreateModels("openai", 6);
  CreateModels("other", 6);
  ListRequest request;
  request.parent = "providers/openai";
  request.filter = "enabled = true";
  request.order_by = "context_window";
  request.page_size = 2;
  absl::StatusOr<ListPage> page = store_->List(Model::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_FALSE(page->next_page_token.empty());

  ListRequest other_filter = request;
  other_filter.filter = "enabled = false";
  ListRequest other_order = request;
  other_order.order_by = "context_window desc";
  ListRequest other_parent = request;
  other_parent.parent = "providers/other";
  ListRequest all_parents = request;
  all_parents.parent = "";
  all_parents.all_parents = true;
  for (ListRequest* r : {&other_filter, &other_order, &other_parent, &all_parents}) {
    r->page_token = page->next_page_token;
    absl::StatusOr<ListPage> result = store_->List(Model::descriptor(), *r);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument)
        << "parent=" << r->parent << " filter=" << r->filter << " order_by=" << r->order_by;
  }
  // Another resource type.
  ListRequest families = request;
  families.filter = "";
  families.order_by = "";
  families.page_token = page->next_page_token;
  EXPECT_EQ(store_->List(ModelFamily::descriptor(), families).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A different page size is the same query.
  request.page_size = 3;
  request.page_token = page->next_page_token;
  EXPECT_TRUE(store_->List(Model::descriptor(), request).ok());
}

TEST_P(ResourceStoreListTest, PageTokenMadeWithAnotherKeyIsInvalidArgument) {
  CreateModels("openai", 5);
  ResourceStore other(*ds_, "a-different-page-token-key");
  ListRequest request;
  request.parent = "providers/openai";
  request.page_size = 2;
  absl::StatusOr<ListPage> page = other.List(Model::descriptor(), request);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_FALSE(page->next_page_token.empty());
  request.page_token = page->next_page_token;
  EXPECT_EQ(store_->List(Model::descriptor(), request).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A second store with the same key accepts it.
  ResourceStore same(*ds_, "a-different-page-token-key");
  EXPECT_TRUE(same.List(Model::descriptor(), request).ok());
}

TEST_P(ResourceStoreListTest, SqlInFilterAndOrderByIsInert) {
  CreateModels("openai", 3);
  ListRequest request;
  request.parent = "providers/openai";

  request.filter = R"(display_name = "x'; DROP TABLE models; --")";
  absl::StatusOr<ListPage> literal = store_->List(Model::descriptor(), request);
  ASSERT_TRUE(literal.ok()) << literal.status();
  EXPECT_THAT(literal->items, IsEmpty());

  request.filter = R"(display_name = "Model m-000' OR '1'='1")";
  absl::StatusOr<ListPage> tautology = store_->List(Model::descriptor(), request);
  ASSERT_TRUE(tautology.ok()) << tautology.status();
  EXPECT_THAT(tautology->items, IsEmpty());

  request.filter = "display_name; DROP TABLE models";
  EXPECT_EQ(store_->List(Model::descriptor(), request).status().code(),
            absl::StatusCode::kInvalidArgument);

  request.filter = "";
  request.order_by = "name; DROP TABLE models";
  EXPECT_EQ(store_->List(Model::descriptor(), request).status().code(),
            absl::StatusCode::kInvalidArgument);
  request.order_by = "display_name desc; DROP TABLE models";
  EXPECT_EQ(store_->List(Model::descriptor(), request).status().code(),
            absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(TableExists("models").value_or(false), true);
  EXPECT_EQ(CountRows("models"), 3);
  request.order_by = "";
  absl::StatusOr<std::vector<std::string>> all = ListAll(Model::descriptor(), request);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_THAT(*all, SizeIs(3));
}

TEST_P(ResourceStoreListTest, UnknownFilterOrOrderFieldIsInvalidArgument) {
  CreateModels("openai", 1);
  ListRequest request;
  request.parent = "providers/openai";
  request.filter = "price_per_token < 5";
  absl::StatusOr<ListPage> result = store_->List(Model::descriptor(), request);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  EXPECT_THAT(result.status().message(), HasSubstr("price_per_token"));

  request.filter = "";
  request.order_by = "supports_tools";  // filterable, not orderable
  EXPECT_EQ(store_->List(Model::descriptor(), request).status().code(),
            absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Engines, ResourceStoreTest,
                         ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"}),
                         NameGen());
// With a cache, List takes bodies from it only when the cached etag matches
// the stored revision; anything stale or missing is read from the database.
TEST_P(ResourceStoreTest, ListUsesCachedBodiesOnlyAtTheStoredRevision) {
  std::unique_ptr<Message> a = MustCreate(MakeProvider("a", "Stored A"));
  std::unique_ptr<Message> b = MustCreate(MakeProvider("b", "Stored B"));
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  // "a" cached at its current etag (with a marker a database read would not
  // give), "b" cached at a stale etag, "c" not cached at all.
  auto cached_a = std::make_shared<Provider>(static_cast<const Provider&>(*a));
  cached_a->set_description("from the cache");
  auto stale_b = std::make_shared<Provider>(static_cast<const Provider&>(*b));
  stale_b->set_display_name("Stale B");
  stale_b->set_etag("\"0\"");
  MustCreate(MakeProvider("c", "Stored C"));
  int lookups = 0;
  ResourceStore::CacheLookup cache = [&](absl::string_view name) -> std::shared_ptr<const Message> {
    ++lookups;
    if (name == "providers/a") return cached_a;
    if (name == "providers/b") return stale_b;
    return nullptr;
  };
  absl::StatusOr<ListPage> page = store_->List(Provider::descriptor(), ListRequest{}, cache);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->items.size(), 3u);
  EXPECT_EQ(lookups, 3);
  const auto& pa = static_cast<const Provider&>(*page->items[0]);
  const auto& pb = static_cast<const Provider&>(*page->items[1]);
  const auto& pc = static_cast<const Provider&>(*page->items[2]);
  EXPECT_EQ(pa.description(), "from the cache");
  EXPECT_EQ(pb.display_name(), "Stored B");
  EXPECT_EQ(pc.display_name(), "Stored C");
  EXPECT_EQ(pb.etag(), static_cast<const Provider&>(*b).etag());

  // Pages and order behave as without a cache.
  ListRequest paged;
  paged.page_size = 2;
  paged.order_by = "display_name desc";
  absl::StatusOr<ListPage> first = store_->List(Provider::descriptor(), paged, cache);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->items.size(), 2u);
  EXPECT_EQ(storage::ResourceName(*first->items[0]), "providers/c");
  ASSERT_FALSE(first->next_page_token.empty());
  paged.page_token = first->next_page_token;
  absl::StatusOr<ListPage> second = store_->List(Provider::descriptor(), paged, cache);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->items.size(), 1u);
  EXPECT_EQ(storage::ResourceName(*second->items[0]), "providers/a");
  EXPECT_TRUE(second->next_page_token.empty());
}

INSTANTIATE_TEST_SUITE_P(Engines, ResourceStoreListTest,
                         ::testing::Values(EngineParam{"sqlite"}, EngineParam{"postgres"}),
                         NameGen());

}  // namespace
}  // namespace modelvault::conformance
