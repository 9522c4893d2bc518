#pragma once

#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/field_mask.pb.h"
#include "google/protobuf/message.h"
#include "server/catalog_cache.h"
#include "server/change_hub.h"
#include "storage/resource_store.h"
#include "storage/status_details.h"

// The standard methods (AIP-131..135) once for every resource: request
// validation with field violations, idempotency keys, the cache and the
// change hub kept in step with each write. Services only name their fields.
namespace modelvault::server {

// Resource-specific checks beyond the descriptor rules, and defaults.
struct ResourceHooks {
  // Called on create and update with the full resource after defaults.
  std::function<void(const google::protobuf::Message& resource, absl::string_view field_prefix,
                     std::vector<FieldViolation>& out)>
      check;
  // Fills defaults on create (e.g. upstream_id from the id).
  std::function<void(google::protobuf::Message& resource, absl::string_view id)> defaults;
};

struct CreateCall {
  const google::protobuf::Message* request = nullptr;
  std::string parent;  // "" for top-level resources
  bool has_parent_field = false;
  std::string id;
  std::string id_field;  // e.g. "model_id"
  const google::protobuf::Message* resource = nullptr;
  std::string resource_field;  // e.g. "model"
  std::string request_id;
  std::string principal;  // audit: the caller
  // Stores the validated resource instead of the plain ResourceStore::Create
  // (resources with secrets or hashes set ctx.prepare/finish and call it).
  std::function<absl::StatusOr<storage::MutationResult>(storage::MutationContext ctx,
                                                        const google::protobuf::Message& resource)>
      store;
};

struct UpdateCall {
  const google::protobuf::Message* request = nullptr;
  const google::protobuf::Message* resource = nullptr;
  std::string resource_field;
  const google::protobuf::FieldMask* update_mask = nullptr;
  std::string request_id;
  std::string principal;
};

struct DeleteCall {
  const google::protobuf::Message* request = nullptr;
  const google::protobuf::Descriptor* type = nullptr;
  std::string name;
  std::string etag;
  std::string request_id;
  std::string principal;
};

struct ListCall {
  const google::protobuf::Descriptor* type = nullptr;
  std::string parent;
  bool has_parent_field = false;
  int page_size = 0;
  std::string page_token;
  std::string filter;
  std::string order_by;
  // Bodies from the cache when current; off for resources with columns
  // written outside the change feed (e.g. last-used times).
  bool use_cache = true;
};

class ResourceMethods final {
 public:
  ResourceMethods(storage::ResourceStore& store, CatalogCache& cache, ChangeHub& hub);

  void SetHooks(const google::protobuf::Descriptor* type, ResourceHooks hooks);

  absl::Status Create(const CreateCall& call, google::protobuf::Message* out);
  // Served from the cache (coherent with every committed write of this
  // replica, and with other replicas' within one feed poll).
  absl::Status Get(const google::protobuf::Descriptor* type, absl::string_view name,
                   google::protobuf::Message* out);
  absl::Status Update(const UpdateCall& call, google::protobuf::Message* out);
  // Whether the cache holds `name` as a `type` (no copy; for hot paths).
  bool Exists(const google::protobuf::Descriptor* type, absl::string_view name) const;
  absl::Status Delete(const DeleteCall& call);
  // Fills the repeated resource field and next_page_token of `out`.
  absl::Status List(const ListCall& call, google::protobuf::Message* out);
  // The answer of List from memory when the same call was answered since the
  // last change the cache applied (a dashboard or gateway polling the
  // catalog); nullopt when List must ask the database.
  std::optional<absl::Status> ListFromCache(const ListCall& call, google::protobuf::Message* out);

  // The mutation context of a call (idempotency hash of `request`).
  storage::MutationContext Context(const google::protobuf::Message& request, std::string request_id,
                                   std::string principal) const;
  // Puts a committed write into the cache and wakes the change hub.
  void Publish(absl::string_view name, const storage::MutationResult& result);
  storage::ResourceStore& store() { return store_; }

 private:
  const ResourceHooks* HooksFor(const google::protobuf::Descriptor* type) const;
  static std::string ListKey(const ListCall& call);

  // Pages answered by List, by ListKey, valid while the cache's version is
  // `lists_version_` (a change clears them all).
  struct CachedPage {
    std::vector<std::shared_ptr<const google::protobuf::Message>> items;
    std::string next_page_token;
  };
  static constexpr size_t kMaxCachedPages = 1024;

  storage::ResourceStore& store_;
  CatalogCache& cache_;
  ChangeHub& hub_;
  std::mutex lists_mu_;
  std::int64_t lists_version_ = -1;  // guarded by lists_mu_
  absl::flat_hash_map<std::string, std::shared_ptr<const CachedPage>>
      lists_;  // guarded by lists_mu_
  std::vector<std::pair<const google::protobuf::Descriptor*, ResourceHooks>> hooks_;
};

}  // namespace modelvault::server
