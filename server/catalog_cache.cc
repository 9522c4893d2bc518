#include "server/catalog_cache.h"

#include "google/protobuf/util/json_util.h"
#include "storage/resource_store.h"

namespace modelvault::server {
namespace {}  // namespace

absl::StatusOr<std::int64_t> CatalogCache::Load(storage::Datastore& datastore) {
  std::int64_t head = 0;
  absl::flat_hash_map<std::string, Entry> loaded;
  absl::Status status = datastore.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::int64_t> last = reader.LastChangeSeq();
    if (!last.ok()) return last.status();
    head = *last;
    for (const auto& schema : storage::SchemaRegistry::Default().all()) {
      storage::ListQuery query;
      query.order = {storage::OrderTerm{}};
      query.limit = 1000;
      while (true) {
        absl::StatusOr<storage::ListResult> page = reader.List(*schema, query);
        if (!page.ok()) return page.status();
        for (storage::StoredResource& item : page->items) {
          item.message->GetReflection()->SetString(
              item.message.get(), item.message->GetDescriptor()->FindFieldByName("etag"),
              storage::EtagOf(item.revision));
          const std::string name = storage::ResourceName(*item.message);
          loaded[name] = Entry{head, std::move(item.message)};
        }
        if (!page->more) break;
        query.after = page->last_key;
      }
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  std::unique_lock lock(mu_);
  entries_ = std::move(loaded);
  version_.fetch_add(1, std::memory_order_acq_rel);
  return head;
}

void CatalogCache::Apply(const storage::ChangeRecord& change) {
  const storage::ResourceSchema* schema =
      storage::SchemaRegistry::Default().ForType(change.resource_type);
  if (schema == nullptr) return;  // not a catalog resource
  std::shared_ptr<google::protobuf::Message> resource;
  if (change.change_type != "DELETED") {
    resource.reset(google::protobuf::MessageFactory::generated_factory()
                       ->GetPrototype(schema->descriptor())
                       ->New());
    google::protobuf::util::JsonParseOptions options;
    options.ignore_unknown_fields = true;  // written by a newer replica
    if (!google::protobuf::util::JsonStringToMessage(change.resource_json, resource.get(), options)
             .ok()) {
      return;
    }
  }
  Put(change.resource_name, change.seq, std::move(resource));
}

void CatalogCache::Put(absl::string_view name, std::int64_t seq,
                       std::shared_ptr<const google::protobuf::Message> resource) {
  std::unique_lock lock(mu_);
  Entry& entry = entries_[name];
  // A change this replica already applied (its own write, echoed by the feed)
  // changes nothing: the version stays, and list pages stay valid.
  if (seq <= entry.seq && entry.seq > 0) return;
  entry.seq = seq;
  entry.resource = std::move(resource);
  version_.fetch_add(1, std::memory_order_acq_rel);
}

std::shared_ptr<const google::protobuf::Message> CatalogCache::Get(absl::string_view name) const {
  std::shared_lock lock(mu_);
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : it->second.resource;
}

size_t CatalogCache::size() const {
  std::shared_lock lock(mu_);
  size_t n = 0;
  for (const auto& [name, entry] : entries_) n += entry.resource != nullptr ? 1 : 0;
  return n;
}

}  // namespace modelvault::server
