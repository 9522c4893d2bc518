#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "storage/resource_store.h"

namespace modelvault::server {

struct SeedReport {
  int created = 0;
  int updated = 0;
  int unchanged = 0;
};

// Loads a CatalogSnapshot (protobuf text format) into the catalog: creates
// what is missing and updates what differs, so running it twice changes
// nothing. `text` empty: the built-in migrations/seed/catalog.textproto.
absl::StatusOr<SeedReport> SeedCatalog(storage::ResourceStore& store, absl::string_view text);

}  // namespace modelvault::server
