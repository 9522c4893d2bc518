#include "server/resource_methods.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "server/validation.h"
#include "storage/migrate.h"

namespace modelvault::server {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

// SHA-256 of the deterministic serialization of the request without its
// request_id: the same logical request always hashes alike.
std::string RequestHash(const Message& request) {
  std::unique_ptr<Message> copy(request.New());
  copy->CopyFrom(request);
  if (const FieldDescriptor* f = copy->GetDescriptor()->FindFieldByName("request_id")) {
    copy->GetReflection()->ClearField(copy.get(), f);
  }
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream stream(&bytes);
    google::protobuf::io::CodedOutputStream out(&stream);
    out.SetSerializationDeterministic(true);
    copy->SerializeToCodedStream(&out);
  }
  return storage::Sha256Hex(bytes);
}

absl::Status ParentViolation(const storage::ResourceSchema& schema, absl::string_view parent,
                             std::vector<FieldViolation>& out) {
  const storage::ResourceSchema* parent_schema =
      storage::SchemaRegistry::Default().ForType(schema.parent_type());
  if (parent_schema == nullptr) return absl::OkStatus();
  if (parent.empty()) {
    out.push_back({"parent", "is required"});
  } else if (auto p = parent_schema->ParentOf(parent); !p.ok()) {
    out.push_back({"parent", std::string(p.status().message())});
  }
  return absl::OkStatus();
}

// The repeated field of `type` in a List response.
const FieldDescriptor* ItemsField(const Message& out, const Descriptor* type) {
  const Descriptor* d = out.GetDescriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    if (d->field(i)->is_repeated() && d->field(i)->message_type() == type) return d->field(i);
  }
  return nullptr;
}

void SetNextPageToken(Message& out, const std::string& token) {
  out.GetReflection()->SetString(&out, out.GetDescriptor()->FindFieldByName("next_page_token"),
                                 token);
}

}  // namespace

ResourceMethods::ResourceMethods(storage::ResourceStore& store, CatalogCache& cache, ChangeHub& hub)
    : store_(store), cache_(cache), hub_(hub) {}

void ResourceMethods::SetHooks(const Descriptor* type, ResourceHooks hooks) {
  hooks_.emplace_back(type, std::move(hooks));
}

const ResourceHooks* ResourceMethods::HooksFor(const Descriptor* type) const {
  for (const auto& [t, h] : hooks_) {
    if (t == type) return &h;
  }
  return nullptr;
}

storage::MutationContext ResourceMethods::Context(const Message& request, std::string request_id,
                                                  std::string principal) const {
  storage::MutationContext ctx;
  ctx.principal = std::move(principal);
  ctx.method = request.GetDescriptor()->full_name();
  ctx.request_id = std::move(request_id);
  if (!ctx.request_id.empty()) ctx.request_hash = RequestHash(request);
  ctx.now = absl::Now();
  return ctx;
}

void ResourceMethods::Publish(absl::string_view name, const storage::MutationResult& result) {
  if (result.replayed) return;
  std::shared_ptr<const Message> resource(nullptr);
  if (result.resource != nullptr) {
    std::shared_ptr<Message> copy(result.resource->New());
    copy->CopyFrom(*result.resource);
    resource = std::move(copy);
  }
  cache_.Put(name, result.change_seq, std::move(resource));
  hub_.Poke();
}

absl::Status ResourceMethods::Create(const CreateCall& call, Message* out) {
  const storage::ResourceSchema* schema =
      storage::SchemaRegistry::Default().ForMessage(out->GetDescriptor());
  std::vector<FieldViolation> violations;
  if (call.has_parent_field) ParentViolation(*schema, call.parent, violations).IgnoreError();
  ValidateId(call.id_field, call.id, violations);
  ValidateRequestId(call.request_id, violations);
  std::unique_ptr<Message> resource(call.resource->New());
  resource->CopyFrom(*call.resource);
  ClearOutputOnly(*resource);
  const ResourceHooks* hooks = HooksFor(out->GetDescriptor());
  if (hooks != nullptr && hooks->defaults) hooks->defaults(*resource, call.id);
  const std::string prefix = call.resource_field + ".";
  ValidateMessage(*resource, prefix, nullptr, violations);
  if (violations.empty()) {
    resource->GetReflection()->SetString(resource.get(),
                                         resource->GetDescriptor()->FindFieldByName("name"),
                                         schema->NameFor(call.parent, call.id));
    if (hooks != nullptr && hooks->check) hooks->check(*resource, prefix, violations);
  }
  if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;

  storage::MutationContext ctx = Context(*call.request, call.request_id, call.principal);
  ctx.field_prefix = prefix;
  absl::StatusOr<storage::MutationResult> result =
      call.store ? call.store(ctx, *resource) : store_.Create(ctx, *resource);
  if (!result.ok()) return result.status();
  Publish(storage::ResourceName(*result->resource), *result);
  out->CopyFrom(*result->resource);
  return absl::OkStatus();
}

absl::Status ResourceMethods::Get(const Descriptor* type, absl::string_view name, Message* out) {
  const storage::ResourceSchema* schema = storage::SchemaRegistry::Default().ForMessage(type);
  if (name.empty()) return InvalidField("name", "is required");
  if (auto p = schema->ParentOf(name); !p.ok()) {
    return InvalidField("name", std::string(p.status().message()));
  }
  std::shared_ptr<const Message> cached = cache_.Get(name);
  if (cached == nullptr || cached->GetDescriptor() != type) {
    return WithResourceInfo(absl::NotFoundError(absl::StrCat(name, " does not exist")),
                            schema->type(), name);
  }
  // Clear + MergeFrom, not CopyFrom: protobuf's CopyFrom first checks through
  // reflection that the source is not inside the target, which cost more than
  // the copy itself on the catalog's read paths.
  out->Clear();
  out->MergeFrom(*cached);
  return absl::OkStatus();
}

bool ResourceMethods::Exists(const Descriptor* type, absl::string_view name) const {
  std::shared_ptr<const Message> cached = cache_.Get(name);
  return cached != nullptr && cached->GetDescriptor() == type;
}

absl::Status ResourceMethods::Update(const UpdateCall& call, Message* out) {
  std::vector<FieldViolation> violations;
  ValidateRequestId(call.request_id, violations);
  std::vector<std::string> paths;
  if (call.update_mask == nullptr || call.update_mask->paths_size() == 0) {
    violations.push_back({"update_mask", "is required: name the fields to change, or \"*\""});
  } else {
    paths.assign(call.update_mask->paths().begin(), call.update_mask->paths().end());
  }
  const std::string name = storage::ResourceName(*call.resource);
  const storage::ResourceSchema* schema =
      storage::SchemaRegistry::Default().ForMessage(call.resource->GetDescriptor());
  if (name.empty()) {
    violations.push_back({call.resource_field + ".name", "is required"});
  } else if (auto parent = schema->ParentOf(name); !parent.ok()) {
    violations.push_back({call.resource_field + ".name", std::string(parent.status().message())});
  }
  const bool all = std::find(paths.begin(), paths.end(), "*") != paths.end();
  const std::string prefix = call.resource_field + ".";
  ValidateMessage(*call.resource, prefix, all ? nullptr : &paths, violations);
  // Hooks see only the fields in the mask (others are empty in the patch).
  if (const ResourceHooks* hooks = HooksFor(out->GetDescriptor());
      violations.empty() && hooks != nullptr && hooks->check) {
    hooks->check(*call.resource, prefix, violations);
  }
  if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;

  storage::MutationContext ctx = Context(*call.request, call.request_id, call.principal);
  ctx.field_prefix = prefix;
  absl::StatusOr<storage::MutationResult> result = store_.Update(ctx, *call.resource, paths);
  if (!result.ok()) return result.status();
  Publish(name, *result);
  out->CopyFrom(*result->resource);
  return absl::OkStatus();
}

absl::Status ResourceMethods::Delete(const DeleteCall& call) {
  std::vector<FieldViolation> violations;
  ValidateRequestId(call.request_id, violations);
  if (call.name.empty()) violations.push_back({"name", "is required"});
  if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
  absl::StatusOr<storage::MutationResult> result = store_.Delete(
      Context(*call.request, call.request_id, call.principal), call.type, call.name, call.etag);
  if (!result.ok()) return result.status();
  Publish(call.name, *result);
  return absl::OkStatus();
}

absl::Status ResourceMethods::List(const ListCall& call, Message* out) {
  const storage::ResourceSchema* schema = storage::SchemaRegistry::Default().ForMessage(call.type);
  std::vector<FieldViolation> violations;
  storage::ListRequest request;
  if (call.has_parent_field) {
    const storage::ResourceSchema* parent_schema =
        storage::SchemaRegistry::Default().ForType(schema->parent_type());
    const std::string wildcard = parent_schema->collections().back() + "/-";
    if (call.parent == wildcard) {
      request.all_parents = true;
    } else {
      ParentViolation(*schema, call.parent, violations).IgnoreError();
      request.parent = call.parent;
    }
  }
  if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
  request.page_size = call.page_size;
  request.page_token = call.page_token;
  request.filter = call.filter;
  request.order_by = call.order_by;
  storage::ResourceStore::CacheLookup lookup = nullptr;
  if (call.use_cache) lookup = [this](absl::string_view name) { return cache_.Get(name); };
  // Read before the query: the page is at least as new as this version.
  const std::int64_t version = cache_.version();
  absl::StatusOr<storage::ListPage> page = store_.List(call.type, request, lookup);
  if (!page.ok()) return page.status();
  auto cached = std::make_shared<CachedPage>();
  cached->next_page_token = page->next_page_token;
  const FieldDescriptor* items = ItemsField(*out, call.type);
  for (auto& item : page->items) {
    out->GetReflection()->AddMessage(out, items)->MergeFrom(*item);  // new: MergeFrom copies
    cached->items.push_back(std::move(item));
  }
  SetNextPageToken(*out, page->next_page_token);
  if (call.use_cache) {
    std::lock_guard lock(lists_mu_);
    if (lists_version_ != version) {
      lists_.clear();
      lists_version_ = version;
    }
    if (lists_.size() < kMaxCachedPages) lists_[ListKey(call)] = std::move(cached);
  }
  return absl::OkStatus();
}

std::string ResourceMethods::ListKey(const ListCall& call) {
  return absl::StrCat(call.type->full_name(), "\n", call.parent, "\n", call.page_size, "\n",
                      call.page_token, "\n", call.filter, "\n", call.order_by);
}

std::optional<absl::Status> ResourceMethods::ListFromCache(const ListCall& call, Message* out) {
  if (!call.use_cache) return std::nullopt;
  const std::int64_t version = cache_.version();
  const std::string key = ListKey(call);
  std::shared_ptr<const CachedPage> page;
  {
    std::lock_guard lock(lists_mu_);
    if (lists_version_ != version) return std::nullopt;
    auto it = lists_.find(key);
    if (it == lists_.end()) return std::nullopt;
    page = it->second;
  }
  // The page is an immutable snapshot of that version: copied outside the lock.
  const FieldDescriptor* items = ItemsField(*out, call.type);
  for (const auto& body : page->items)
    out->GetReflection()->AddMessage(out, items)->MergeFrom(*body);  // new: MergeFrom copies
  SetNextPageToken(*out, page->next_page_token);
  return absl::OkStatus();
}

}  // namespace modelvault::server
