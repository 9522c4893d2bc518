#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "storage/filter.h"

namespace modelvault::storage {

// How one proto field is stored.
enum class ColumnKind {
  kString,     // TEXT; empty resource references are stored as NULL
  kInt64,      // BIGINT (int32/int64 fields)
  kBool,       // SMALLINT 0/1
  kEnum,       // TEXT holding the enum value name
  kTimestamp,  // BIGINT microseconds since the Unix epoch; NULL when unset
  kJson,       // TEXT holding the proto JSON of a message or repeated field
};

struct Column {
  std::string name;  // SQL column name == proto field name
  const google::protobuf::FieldDescriptor* field = nullptr;
  ColumnKind kind = ColumnKind::kString;
  bool nullable = false;
  bool filterable = false;
  bool orderable = false;
};

// One term of an order_by: a column and a direction.
struct OrderTerm {
  const Column* column = nullptr;  // nullptr means the `name` key column
  bool descending = false;
};

// The storage mapping of a resource message, derived once from its descriptor
// (google.api.resource pattern, modelvault.v1.storage, modelvault.v1.rules).
// Table layout: name TEXT PRIMARY KEY, parent TEXT, revision BIGINT, then one
// column per field except name and etag (etag is derived from revision).
class ResourceSchema final {
 public:
  static absl::StatusOr<std::unique_ptr<ResourceSchema>> Build(
      const google::protobuf::Descriptor* descriptor);

  const google::protobuf::Descriptor* descriptor() const { return descriptor_; }
  const std::string& type() const { return type_; }  // e.g. "modelvault.dev/Model"
  const std::string& table() const { return table_; }
  // The pattern's collection ids, e.g. {"providers", "models"}.
  const std::vector<std::string>& collections() const { return collections_; }
  // The type of the parent resource, empty for top-level resources.
  const std::string& parent_type() const { return parent_type_; }
  const std::vector<Column>& columns() const { return columns_; }
  const FilterSchema& filter_schema() const { return filter_schema_; }
  const Column* FindColumn(absl::string_view name) const;

  // Checks a resource name against the pattern; returns the parent name
  // ("" for top-level resources). The id segments must be slugs.
  absl::StatusOr<std::string> ParentOf(absl::string_view name) const;
  // Builds "<parent>/<collection>/<id>".
  std::string NameFor(absl::string_view parent, absl::string_view id) const;

  // Parses an AIP-132 order_by ("a, b desc") into terms; `name` is always
  // appended as the final tie-breaker so that keyset pagination is total.
  absl::StatusOr<std::vector<OrderTerm>> ParseOrderBy(absl::string_view order_by) const;

 private:
  friend class SchemaRegistry;
  ResourceSchema() = default;

  const google::protobuf::Descriptor* descriptor_ = nullptr;
  std::string type_;
  std::string table_;
  std::vector<std::string> collections_;
  std::string parent_type_;
  std::vector<Column> columns_;
  FilterSchema filter_schema_;
};

// The `name` field of a resource message.
std::string ResourceName(const google::protobuf::Message& resource);

// Resource ids: lowercase letters, digits, '-', '.', '_'; 1 to 63 characters;
// starting and ending with a letter or digit.
bool IsValidResourceId(absl::string_view id);

// All resource schemas of the API, keyed by message full name and by type.
class SchemaRegistry final {
 public:
  // The registry of every stored resource of modelvault.v1.
  static const SchemaRegistry& Default();

  const ResourceSchema* ForMessage(const google::protobuf::Descriptor* descriptor) const;
  const ResourceSchema* ForType(absl::string_view type) const;
  // The schema whose name pattern matches `name`, if any.
  const ResourceSchema* ForName(absl::string_view name) const;
  const std::vector<std::unique_ptr<ResourceSchema>>& all() const { return schemas_; }

 private:
  std::vector<std::unique_ptr<ResourceSchema>> schemas_;
};

}  // namespace modelvault::storage
