#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "storage/storage.h"

namespace modelvault::server {

// Every catalog resource in memory, for reads at RPC speed. Coherent through
// the change feed: loaded with the feed position in one snapshot, then fed
// every change in order by the ChangeHub (other replicas' writes within one
// poll interval) and this replica's own writes as soon as they commit.
class CatalogCache final {
 public:
  // Loads every resource; returns the change-feed position of the snapshot.
  absl::StatusOr<std::int64_t> Load(storage::Datastore& datastore);

  // Applies a committed change; older than what is cached for that name is
  // ignored, so a replayed or late change never rolls a resource back.
  void Apply(const storage::ChangeRecord& change);
  // Applies a resource this replica just wrote (or deleted, when null).
  void Put(absl::string_view name, std::int64_t seq,
           std::shared_ptr<const google::protobuf::Message> resource);

  // The cached resource, or null when absent.
  std::shared_ptr<const google::protobuf::Message> Get(absl::string_view name) const;
  // Grows with every change applied: equal versions mean nothing changed in between.
  std::int64_t version() const { return version_.load(std::memory_order_acquire); }
  size_t size() const;

 private:
  struct Entry {
    std::int64_t seq = 0;
    std::shared_ptr<const google::protobuf::Message> resource;  // null: deleted
  };
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  mutable std::shared_mutex mu_;
  std::atomic<std::int64_t> version_{0};
  absl::flat_hash_map<std::string, Entry> entries_;  // guarded by mu_
};

}  // namespace modelvault::server
