#include "storage/resource_store.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/api/field_behavior.pb.h"
#include "google/api/resource.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "google/protobuf/util/field_mask_util.h"
#include "google/protobuf/util/json_util.h"
#include "modelvault/v1/options.pb.h"
#include "storage/migrate.h"
#include "storage/page_token.h"
#include "storage/status_details.h"

namespace modelvault::storage {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

void SetString(Message& m, const char* field, std::string value) {
  const FieldDescriptor* f = m.GetDescriptor()->FindFieldByName(field);
  if (f != nullptr) m.GetReflection()->SetString(&m, f, std::move(value));
}

std::string EtagField(const Message& m) {
  const FieldDescriptor* f = m.GetDescriptor()->FindFieldByName("etag");
  return f == nullptr ? "" : m.GetReflection()->GetString(m, f);
}

// Timestamps are stored with microsecond precision; responses match storage.
void SetTime(Message& m, const char* field, absl::Time t) {
  const FieldDescriptor* f = m.GetDescriptor()->FindFieldByName(field);
  if (f == nullptr) return;
  auto* ts = static_cast<google::protobuf::Timestamp*>(m.GetReflection()->MutableMessage(&m, f));
  const std::int64_t micros = absl::ToUnixMicros(t);
  ts->set_seconds(micros / 1000000);
  ts->set_nanos(static_cast<std::int32_t>(micros % 1000000) * 1000);
}

bool IsOutputOnlyOrImmutable(const FieldDescriptor* f) {
  for (int b : f->options().GetRepeatedExtension(google::api::field_behavior)) {
    if (b == google::api::OUTPUT_ONLY || b == google::api::IMMUTABLE) return true;
  }
  return f->name() == "name" || f->name() == "etag";
}

std::unique_ptr<Message> NewOf(const Descriptor* type) {
  return std::unique_ptr<Message>(
      google::protobuf::MessageFactory::generated_factory()->GetPrototype(type)->New());
}

const ResourceSchema* SchemaOf(const Descriptor* type) {
  return SchemaRegistry::Default().ForMessage(type);
}

absl::StatusOr<std::string> ToJson(const Message& m) {
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(m, &json).ok()) {
    return absl::InternalError("cannot encode a change record");
  }
  return json;
}

// The resource type a reference field points to, "" when none.
std::string ReferenceType(const FieldDescriptor* f) {
  return f->options().GetExtension(google::api::resource_reference).type();
}

// Replays a stored result, or says the request_id was used for another call.
absl::StatusOr<std::optional<MutationResult>> Replay(ReadWriteTx& tx, const MutationContext& ctx,
                                                     const Descriptor* response_type) {
  if (ctx.request_id.empty()) return std::optional<MutationResult>();
  absl::StatusOr<std::optional<IdempotencyRecord>> found = tx.FindRequest(ctx.request_id);
  if (!found.ok()) return found.status();
  if (!found->has_value()) return std::optional<MutationResult>();
  const IdempotencyRecord& record = **found;
  if (record.method != ctx.method || record.request_hash != ctx.request_hash) {
    return WithErrorInfo(
        InvalidField("request_id",
                     absl::StrCat("request_id \"", ctx.request_id,
                                  "\" was already used for a different request; use a new id")),
        "REQUEST_ID_REUSED", {{"request_id", ctx.request_id}});
  }
  MutationResult result;
  result.replayed = true;
  if (response_type != nullptr) {
    std::string bytes;
    result.resource = NewOf(response_type);
    if (!absl::Base64Unescape(record.response, &bytes) ||
        !result.resource->ParseFromString(bytes)) {
      return absl::InternalError("stored idempotent response is unreadable");
    }
  }
  return std::optional<MutationResult>(std::move(result));
}

absl::Status Remember(ReadWriteTx& tx, const MutationContext& ctx, const Message* response) {
  if (ctx.request_id.empty()) return absl::OkStatus();
  return tx.SaveRequest(IdempotencyRecord{
      ctx.request_id, ctx.method, ctx.request_hash,
      response == nullptr ? "" : absl::Base64Escape(response->SerializeAsString())});
}

absl::StatusOr<std::int64_t> Record(ReadWriteTx& tx, const MutationContext& ctx,
                                    const ResourceSchema& schema, const Message& resource,
                                    const char* change_type) {
  absl::StatusOr<std::string> json = ToJson(resource);
  if (!json.ok()) return json.status();
  ChangeRecord change;
  change.time = ctx.now;
  change.resource_type = schema.type();
  change.resource_name = ResourceName(resource);
  change.change_type = change_type;
  change.principal = ctx.principal;
  change.request_id = ctx.request_id;
  change.resource_json = *std::move(json);
  if (absl::Status s = tx.AppendChange(change); !s.ok()) return s;
  return change.seq;
}

// Checks that every set reference field names an existing resource.
absl::Status CheckReferences(ReadWriteTx& tx, const ResourceSchema& schema, const Message& resource,
                             const std::string& prefix) {
  for (const Column& column : schema.columns()) {
    const std::string type = ReferenceType(column.field);
    if (type.empty() || column.kind != ColumnKind::kString) continue;
    const std::string value = resource.GetReflection()->GetString(resource, column.field);
    if (value.empty()) continue;
    const ResourceSchema* target = SchemaRegistry::Default().ForType(type);
    if (target == nullptr) continue;
    absl::StatusOr<StoredResource> found = tx.Get(*target, value);
    if (absl::IsNotFound(found.status())) {
      return WithFieldViolation(
          absl::FailedPreconditionError(absl::StrCat(column.name, ": ", value, " does not exist")),
          prefix + column.name, "the referenced resource does not exist");
    }
    if (!found.ok()) return found.status();
  }
  return absl::OkStatus();
}

// Describes rows that still depend on `name`, or "" when none do.
absl::StatusOr<std::string> Dependents(ReadWriteTx& tx, const ResourceSchema& schema,
                                       absl::string_view name) {
  std::vector<std::string> found;
  for (const auto& other : SchemaRegistry::Default().all()) {
    if (other->parent_type() == schema.type()) {
      absl::StatusOr<std::int64_t> n = tx.CountWhere(*other, "parent", name);
      if (!n.ok()) return n.status();
      if (*n > 0) found.push_back(absl::StrCat(*n, " ", other->collections().back()));
    }
    for (const Column& column : other->columns()) {
      if (ReferenceType(column.field) != schema.type()) continue;
      absl::StatusOr<std::int64_t> n = tx.CountWhere(*other, column.name, name);
      if (!n.ok()) return n.status();
      if (*n > 0) {
        found.push_back(
            absl::StrCat(*n, " ", other->collections().back(), " (by ", column.name, ")"));
      }
    }
  }
  return absl::StrJoin(found, ", ");
}

// ABORTED unless `etag` is empty or names `revision`.
absl::Status CheckEtag(absl::string_view name, absl::string_view etag, std::int64_t revision) {
  if (etag.empty() || etag == EtagOf(revision)) return absl::OkStatus();
  return WithErrorInfo(absl::AbortedError(absl::StrCat(name, " changed since etag ", etag,
                                                       " was read; get it again and retry")),
                       "ETAG_MISMATCH", {{"resource", std::string(name)}});
}

void FinishStored(StoredResource& stored) {
  SetString(*stored.message, "etag", EtagOf(stored.revision));
}

std::string QueryDigest(const ResourceSchema& schema, const ListRequest& r) {
  const std::string canonical = absl::StrCat(schema.type(), "\n", r.all_parents ? "-" : r.parent,
                                             "\n", r.filter, "\n", r.order_by);
  return absl::HexStringToBytes(Sha256Hex(canonical));
}

}  // namespace

std::string EtagOf(std::int64_t revision) { return absl::StrCat("\"", revision, "\""); }

ResourceStore::ResourceStore(Datastore& datastore, std::string page_token_key)
    : datastore_(datastore), page_token_key_(std::move(page_token_key)) {}

absl::StatusOr<MutationResult> ResourceStore::Create(const MutationContext& ctx,
                                                     const Message& resource) {
  const ResourceSchema* schema = SchemaOf(resource.GetDescriptor());
  if (schema == nullptr) return absl::InternalError("not a stored resource");
  const std::string name = ResourceName(resource);
  absl::StatusOr<std::string> parent = schema->ParentOf(name);
  if (!parent.ok()) return InvalidField("name", std::string(parent.status().message()));

  MutationResult result;
  absl::Status status = datastore_.ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
    absl::StatusOr<std::optional<MutationResult>> replay =
        Replay(tx, ctx, resource.GetDescriptor());
    if (!replay.ok()) return replay.status();
    if (replay->has_value()) {
      result = std::move(**replay);
      return absl::OkStatus();
    }
    if (!schema->parent_type().empty()) {
      const ResourceSchema* parent_schema =
          SchemaRegistry::Default().ForType(schema->parent_type());
      absl::StatusOr<StoredResource> p = tx.Get(*parent_schema, *parent);
      if (absl::IsNotFound(p.status())) {
        return WithResourceInfo(
            absl::NotFoundError(absl::StrCat("parent ", *parent, " does not exist")),
            schema->parent_type(), *parent);
      }
      if (!p.ok()) return p.status();
    }
    if (absl::Status s = CheckReferences(tx, *schema, resource, ctx.field_prefix); !s.ok())
      return s;
    std::unique_ptr<Message> row(resource.New());
    row->CopyFrom(resource);
    SetTime(*row, "create_time", ctx.now);
    SetTime(*row, "update_time", ctx.now);
    SetString(*row, "etag", "");
    if (ctx.prepare) {
      if (absl::Status s = ctx.prepare(tx, *row); !s.ok()) return s;
    }
    if (absl::Status s = tx.Insert(*schema, *row); !s.ok()) {
      if (absl::IsAlreadyExists(s)) {
        return WithResourceInfo(absl::AlreadyExistsError(absl::StrCat(name, " already exists")),
                                schema->type(), name);
      }
      return s;
    }
    if (ctx.finish) {
      if (absl::Status s = ctx.finish(tx, *row); !s.ok()) return s;
    }
    SetString(*row, "etag", EtagOf(1));
    absl::StatusOr<std::int64_t> seq = Record(tx, ctx, *schema, *row, "CREATED");
    if (!seq.ok()) return seq.status();
    if (absl::Status s = Remember(tx, ctx, row.get()); !s.ok()) return s;
    result = MutationResult{std::move(row), false, *seq};
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return result;
}

absl::StatusOr<std::unique_ptr<Message>> ResourceStore::Get(const Descriptor* type,
                                                            absl::string_view name) {
  const ResourceSchema* schema = SchemaOf(type);
  if (schema == nullptr) return absl::InternalError("not a stored resource");
  if (absl::StatusOr<std::string> p = schema->ParentOf(name); !p.ok()) {
    return InvalidField("name", std::string(p.status().message()));
  }
  std::unique_ptr<Message> out;
  absl::Status status = datastore_.Read([&](Reader& reader) -> absl::Status {
    absl::StatusOr<StoredResource> stored = reader.Get(*schema, name);
    if (!stored.ok()) return stored.status();
    FinishStored(*stored);
    out = std::move(stored->message);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return out;
}

absl::StatusOr<MutationResult> ResourceStore::Update(const MutationContext& ctx,
                                                     const Message& patch,
                                                     const std::vector<std::string>& paths) {
  const ResourceSchema* schema = SchemaOf(patch.GetDescriptor());
  if (schema == nullptr) return absl::InternalError("not a stored resource");
  const std::string name = ResourceName(patch);
  if (absl::StatusOr<std::string> p = schema->ParentOf(name); !p.ok()) {
    return InvalidField("name", std::string(p.status().message()));
  }
  google::protobuf::FieldMask mask;
  for (const std::string& path : paths) {
    if (path == "*") {
      for (int i = 0; i < patch.GetDescriptor()->field_count(); ++i) {
        const FieldDescriptor* f = patch.GetDescriptor()->field(i);
        if (!IsOutputOnlyOrImmutable(f)) mask.add_paths(f->name());
      }
      continue;
    }
    const FieldDescriptor* f = patch.GetDescriptor()->FindFieldByName(path);
    if (f == nullptr || IsOutputOnlyOrImmutable(f)) {
      return InvalidField("update_mask", absl::StrCat("\"", path, "\" is not a mutable field"));
    }
    mask.add_paths(path);
  }
  if (mask.paths_size() == 0 && !ctx.prepare) {
    return InvalidField("update_mask", "names no field to update");
  }

  MutationResult result;
  absl::Status status = datastore_.ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
    absl::StatusOr<std::optional<MutationResult>> replay = Replay(tx, ctx, patch.GetDescriptor());
    if (!replay.ok()) return replay.status();
    if (replay->has_value()) {
      result = std::move(**replay);
      return absl::OkStatus();
    }
    absl::StatusOr<StoredResource> stored = tx.GetForUpdate(*schema, name);
    if (!stored.ok()) return stored.status();
    if (absl::Status s = CheckEtag(name, EtagField(patch), stored->revision); !s.ok()) return s;
    Message& row = *stored->message;
    google::protobuf::util::FieldMaskUtil::MergeOptions options;
    options.set_replace_message_fields(true);
    options.set_replace_repeated_fields(true);
    google::protobuf::util::FieldMaskUtil::MergeMessageTo(patch, mask, options, &row);
    SetTime(row, "update_time", ctx.now);
    if (ctx.prepare) {
      if (absl::Status s = ctx.prepare(tx, row); !s.ok()) return s;
    }
    if (absl::Status s = CheckReferences(tx, *schema, row, ctx.field_prefix); !s.ok()) return s;
    if (absl::Status s = tx.Update(*schema, row, stored->revision); !s.ok()) return s;
    if (ctx.finish) {
      if (absl::Status s = ctx.finish(tx, row); !s.ok()) return s;
    }
    SetString(row, "etag", EtagOf(stored->revision + 1));
    absl::StatusOr<std::int64_t> seq = Record(tx, ctx, *schema, row, "UPDATED");
    if (!seq.ok()) return seq.status();
    if (absl::Status s = Remember(tx, ctx, &row); !s.ok()) return s;
    result = MutationResult{std::move(stored->message), false, *seq};
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return result;
}

absl::StatusOr<MutationResult> ResourceStore::Delete(const MutationContext& ctx,
                                                     const Descriptor* type, absl::string_view name,
                                                     absl::string_view etag) {
  const ResourceSchema* schema = SchemaOf(type);
  if (schema == nullptr) return absl::InternalError("not a stored resource");
  if (absl::StatusOr<std::string> p = schema->ParentOf(name); !p.ok()) {
    return InvalidField("name", std::string(p.status().message()));
  }
  MutationResult result;
  absl::Status status = datastore_.ReadWriteTx([&](ReadWriteTx& tx) -> absl::Status {
    absl::StatusOr<std::optional<MutationResult>> replay = Replay(tx, ctx, nullptr);
    if (!replay.ok()) return replay.status();
    if (replay->has_value()) {
      result = std::move(**replay);
      return absl::OkStatus();
    }
    absl::StatusOr<StoredResource> stored = tx.GetForUpdate(*schema, name);
    if (!stored.ok()) return stored.status();
    if (absl::Status s = CheckEtag(name, etag, stored->revision); !s.ok()) return s;
    absl::StatusOr<std::string> dependents = Dependents(tx, *schema, name);
    if (!dependents.ok()) return dependents.status();
    if (!dependents->empty()) {
      return WithErrorInfo(absl::FailedPreconditionError(absl::StrCat(
                               name, " is still in use by ", *dependents, "; delete those first")),
                           "RESOURCE_IN_USE", {{"resource", std::string(name)}});
    }
    if (absl::Status s = tx.Delete(*schema, name, stored->revision); !s.ok()) return s;
    FinishStored(*stored);
    absl::StatusOr<std::int64_t> seq = Record(tx, ctx, *schema, *stored->message, "DELETED");
    if (!seq.ok()) return seq.status();
    if (absl::Status s = Remember(tx, ctx, nullptr); !s.ok()) return s;
    result.change_seq = *seq;
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return result;
}

absl::StatusOr<ListPage> ResourceStore::List(const Descriptor* type, const ListRequest& request,
                                             const CacheLookup& cache) {
  const ResourceSchema* schema = SchemaOf(type);
  if (schema == nullptr) return absl::InternalError("not a stored resource");
  if (request.page_size < 0) return InvalidField("page_size", "must not be negative");
  ListQuery query;
  query.limit =
      request.page_size == 0 ? kDefaultPageSize : std::min(request.page_size, kMaxPageSize);
  if (!request.all_parents) query.parent = request.parent;
  query.filter = request.filter;
  absl::StatusOr<std::vector<OrderTerm>> order = schema->ParseOrderBy(request.order_by);
  if (!order.ok()) return InvalidField("order_by", std::string(order.status().message()));
  query.order = *std::move(order);
  if (absl::StatusOr<CompiledFilter> f = CompileFilter(request.filter, schema->filter_schema());
      !f.ok()) {
    return InvalidField("filter", std::string(f.status().message()));
  }
  PageTokenCodec codec(page_token_key_);
  const std::string digest = QueryDigest(*schema, request);
  if (!request.page_token.empty()) {
    absl::StatusOr<std::vector<SqlValue>> after = codec.Decode(request.page_token, digest);
    if (!after.ok()) return after.status();
    if (after->size() != query.order.size()) {
      return InvalidField("page_token", "malformed page token");
    }
    query.after = *std::move(after);
  }
  // SQL decides which rows and in what order; with a cache, bodies whose
  // cached etag matches the row's revision need no decoding.
  query.keys_only = cache != nullptr;
  ListPage page;
  absl::Status status = datastore_.Read([&](Reader& reader) -> absl::Status {
    page.items.clear();
    absl::StatusOr<ListResult> rows = reader.List(*schema, query);
    if (!rows.ok()) return rows.status();
    for (StoredResource& item : rows->items) {
      if (item.message == nullptr) {
        std::shared_ptr<const Message> cached = cache(item.name);
        if (cached != nullptr && cached->GetDescriptor() == type &&
            EtagField(*cached) == EtagOf(item.revision)) {
          std::unique_ptr<Message> copy(cached->New());
          copy->MergeFrom(*cached);  // into a new message: a copy, without CopyFrom's check
          page.items.push_back(std::move(copy));
          continue;
        }
        absl::StatusOr<StoredResource> row = reader.Get(*schema, item.name);
        if (!row.ok()) return row.status();
        item = *std::move(row);
      }
      FinishStored(item);
      page.items.push_back(std::move(item.message));
    }
    if (rows->more) page.next_page_token = codec.Encode(digest, rows->last_key);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return page;
}

}  // namespace modelvault::storage
