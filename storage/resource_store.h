#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "google/protobuf/message.h"
#include "storage/storage.h"

// The one generic CRUD mechanism for every plain resource (AIP-131..135):
// etags, request_id idempotency (AIP-155), parent and reference checks,
// dependent-row checks on delete, the change feed written in the same
// transaction, and keyset pagination with tamper-evident page tokens.
// Input validation of field contents happens before (server/validation).
namespace modelvault::storage {

// Who mutates, and the idempotency key of the call.
struct MutationContext {
  std::string principal;     // audit: the caller
  std::string request_id;    // empty: not idempotent
  std::string method;        // full RPC name, part of the idempotency check
  std::string request_hash;  // hash of the request body
  absl::Time now = absl::Now();
  // Prefix of field paths in errors, e.g. "model." for CreateModelRequest.model.
  std::string field_prefix;
  // Extra work in the mutation's transaction, for resources whose rows carry
  // more than the resource (secret versions, token hashes). `prepare` may set
  // server-owned fields of the row before it is written; `finish` runs after
  // the write (for Delete: before it). An error rolls everything back. With
  // `prepare`, Update accepts an empty mask (the hook is the change).
  std::function<absl::Status(ReadWriteTx& tx, google::protobuf::Message& row)> prepare;
  std::function<absl::Status(ReadWriteTx& tx, const google::protobuf::Message& row)> finish;
};

struct ListRequest {
  // Only children of this parent; "" for top-level resources or for all
  // parents when `all_parents` is set (the AIP-159 `-` wildcard).
  std::string parent;
  bool all_parents = false;
  int page_size = 0;  // 0: the default of 50; at most 1000
  std::string page_token;
  std::string filter;
  std::string order_by;
};

struct ListPage {
  std::vector<std::unique_ptr<google::protobuf::Message>> items;
  std::string next_page_token;
};

// A result replayed from an earlier call with the same request_id, or fresh.
struct MutationResult {
  std::unique_ptr<google::protobuf::Message> resource;  // null for Delete
  bool replayed = false;
  std::int64_t change_seq = 0;  // the change-feed seq written (0 if replayed)
};

inline constexpr int kDefaultPageSize = 50;
inline constexpr int kMaxPageSize = 1000;

class ResourceStore final {
 public:
  // `page_token_key` authenticates page tokens (a secret shared by replicas).
  ResourceStore(Datastore& datastore, std::string page_token_key);

  // Inserts `resource` (its `name` set; output-only fields are filled here:
  // create_time, update_time, etag). NOT_FOUND when the parent is missing,
  // ALREADY_EXISTS when the name is taken, FAILED_PRECONDITION when a
  // referenced resource (google.api.resource_reference) does not exist.
  absl::StatusOr<MutationResult> Create(const MutationContext& ctx,
                                        const google::protobuf::Message& resource);
  absl::StatusOr<std::unique_ptr<google::protobuf::Message>> Get(
      const google::protobuf::Descriptor* type, absl::string_view name);
  // Copies the fields in `paths` (top-level field names; "*" for every
  // mutable field) from `patch` onto the stored resource. When `patch` has a
  // non-empty etag it must match (ABORTED otherwise).
  absl::StatusOr<MutationResult> Update(const MutationContext& ctx,
                                        const google::protobuf::Message& patch,
                                        const std::vector<std::string>& paths);
  // Deletes; FAILED_PRECONDITION while children or references exist; a
  // non-empty `etag` must match.
  absl::StatusOr<MutationResult> Delete(const MutationContext& ctx,
                                        const google::protobuf::Descriptor* type,
                                        absl::string_view name, absl::string_view etag);
  // A cache of resources by name; List uses an entry only when its etag
  // matches the stored revision, and reads the row otherwise.
  using CacheLookup =
      std::function<std::shared_ptr<const google::protobuf::Message>(absl::string_view name)>;

  absl::StatusOr<ListPage> List(const google::protobuf::Descriptor* type,
                                const ListRequest& request, const CacheLookup& cache = nullptr);

  Datastore& datastore() { return datastore_; }

 private:
  Datastore& datastore_;
  std::string page_token_key_;
};

// The etag of a stored revision.
std::string EtagOf(std::int64_t revision);

}  // namespace modelvault::storage
