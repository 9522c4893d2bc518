#include "storage/schema.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "google/api/resource.pb.h"
#include "modelvault/v1/access.pb.h"
#include "modelvault/v1/budgets.pb.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "modelvault/v1/credentials.pb.h"
#include "modelvault/v1/options.pb.h"

namespace modelvault::storage {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;

constexpr absl::string_view kKeyColumn = "name";

absl::StatusOr<ColumnKind> KindOf(const FieldDescriptor* field) {
  if (field->is_repeated() || field->is_map()) return ColumnKind::kJson;
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_STRING:
      return ColumnKind::kString;
    case FieldDescriptor::CPPTYPE_INT32:
    case FieldDescriptor::CPPTYPE_INT64:
      return ColumnKind::kInt64;
    case FieldDescriptor::CPPTYPE_BOOL:
      return ColumnKind::kBool;
    case FieldDescriptor::CPPTYPE_ENUM:
      return ColumnKind::kEnum;
    case FieldDescriptor::CPPTYPE_MESSAGE:
      if (field->message_type()->full_name() == "google.protobuf.Timestamp") {
        return ColumnKind::kTimestamp;
      }
      return ColumnKind::kJson;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("field type of ", field->full_name(), " has no column mapping"));
  }
}

FieldType FilterTypeOf(ColumnKind kind) {
  switch (kind) {
    case ColumnKind::kInt64:
      return FieldType::kInt64;
    case ColumnKind::kBool:
      return FieldType::kBool;
    case ColumnKind::kEnum:
      return FieldType::kEnum;
    case ColumnKind::kTimestamp:
      return FieldType::kTimestamp;
    default:
      return FieldType::kString;
  }
}

bool IsSlugChar(char c) {
  return absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '-' || c == '.' || c == '_';
}

}  // namespace

std::string ResourceName(const google::protobuf::Message& resource) {
  return resource.GetReflection()->GetString(resource,
                                             resource.GetDescriptor()->FindFieldByName("name"));
}

bool IsValidResourceId(absl::string_view id) {
  if (id.empty() || id.size() > 63) return false;
  auto alnum = [](char c) { return absl::ascii_islower(c) || absl::ascii_isdigit(c); };
  if (!alnum(id.front()) || !alnum(id.back())) return false;
  return std::all_of(id.begin(), id.end(), IsSlugChar);
}

absl::StatusOr<std::unique_ptr<ResourceSchema>> ResourceSchema::Build(
    const Descriptor* descriptor) {
  const auto& options = descriptor->options();
  if (!options.HasExtension(google::api::resource) ||
      !options.HasExtension(modelvault::v1::storage)) {
    return absl::InvalidArgumentError(
        absl::StrCat(descriptor->full_name(), " lacks google.api.resource or storage options"));
  }
  const auto& resource = options.GetExtension(google::api::resource);
  std::unique_ptr<ResourceSchema> schema(new ResourceSchema());
  schema->descriptor_ = descriptor;
  schema->type_ = resource.type();
  schema->table_ = options.GetExtension(modelvault::v1::storage).table();
  if (resource.pattern_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(descriptor->full_name(), " needs one pattern"));
  }
  // "providers/{provider}/models/{model}" -> collections {providers, models}.
  std::vector<std::string> segments = absl::StrSplit(resource.pattern(0), '/');
  for (size_t i = 0; i < segments.size(); i += 2) schema->collections_.push_back(segments[i]);

  for (int i = 0; i < descriptor->field_count(); ++i) {
    const FieldDescriptor* field = descriptor->field(i);
    if (field->name() == kKeyColumn || field->name() == "etag") continue;
    if (field->options().GetExtension(modelvault::v1::rules).computed()) continue;
    absl::StatusOr<ColumnKind> kind = KindOf(field);
    if (!kind.ok()) return kind.status();
    const auto& rules = field->options().GetExtension(modelvault::v1::rules);
    Column column;
    column.name = field->name();
    column.field = field;
    column.kind = *kind;
    column.nullable = *kind == ColumnKind::kTimestamp ||
                      rules.format() == modelvault::v1::FieldRules::FORMAT_RESOURCE_NAME;
    column.filterable = rules.filterable();
    column.orderable = rules.orderable();
    schema->columns_.push_back(std::move(column));
  }
  for (const Column& column : schema->columns_) {
    if (!column.filterable) continue;
    FilterField filter_field{column.name, FilterTypeOf(column.kind), {}};
    if (column.kind == ColumnKind::kEnum) {
      const auto* enum_type = column.field->enum_type();
      for (int v = 1; v < enum_type->value_count(); ++v) {
        filter_field.enum_values.push_back(enum_type->value(v)->name());
      }
    }
    schema->filter_schema_[column.name] = std::move(filter_field);
  }
  schema->filter_schema_["name"] = FilterField{"name", FieldType::kString, {}};
  return schema;
}

const Column* ResourceSchema::FindColumn(absl::string_view name) const {
  for (const Column& column : columns_) {
    if (column.name == name) return &column;
  }
  return nullptr;
}

absl::StatusOr<std::string> ResourceSchema::ParentOf(absl::string_view name) const {
  std::vector<absl::string_view> parts = absl::StrSplit(name, '/');
  const std::string expected = absl::StrJoin(collections_, "/{id}/") + "/{id}";
  if (parts.size() != collections_.size() * 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", name, "\" is not a resource name of the form ", expected));
  }
  for (size_t i = 0; i < parts.size(); i += 2) {
    if (parts[i] != collections_[i / 2] || !IsValidResourceId(parts[i + 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "\"", name, "\" is not a resource name of the form ", expected,
          " (ids: 1-63 of a-z 0-9 - . _, starting and ending with a letter or digit)"));
    }
  }
  const size_t cut =
      name.size() - parts[parts.size() - 1].size() - parts[parts.size() - 2].size() - 2;
  return parts.size() == 2 ? std::string() : std::string(name.substr(0, cut));
}

std::string ResourceSchema::NameFor(absl::string_view parent, absl::string_view id) const {
  if (parent.empty()) return absl::StrCat(collections_.back(), "/", id);
  return absl::StrCat(parent, "/", collections_.back(), "/", id);
}

absl::StatusOr<std::vector<OrderTerm>> ResourceSchema::ParseOrderBy(
    absl::string_view order_by) const {
  std::vector<OrderTerm> terms;
  bool has_name = false;
  if (!absl::StripAsciiWhitespace(order_by).empty()) {
    for (absl::string_view part : absl::StrSplit(order_by, ',')) {
      std::vector<absl::string_view> words =
          absl::StrSplit(absl::StripAsciiWhitespace(part), ' ', absl::SkipEmpty());
      if (words.empty() || words.size() > 2 || (words.size() == 2 && words[1] != "desc")) {
        return absl::InvalidArgumentError(
            absl::StrCat("order_by: \"", part, "\" is not `field` or `field desc`"));
      }
      OrderTerm term;
      term.descending = words.size() == 2;
      if (words[0] == kKeyColumn) {
        has_name = true;
      } else {
        term.column = FindColumn(words[0]);
        if (term.column == nullptr || !term.column->orderable) {
          std::vector<std::string> allowed = {std::string(kKeyColumn)};
          for (const Column& c : columns_) {
            if (c.orderable) allowed.push_back(c.name);
          }
          return absl::InvalidArgumentError(
              absl::StrCat("order_by: cannot order by \"", words[0],
                           "\"; allowed fields: ", absl::StrJoin(allowed, ", ")));
        }
      }
      for (const OrderTerm& seen : terms) {
        if (seen.column == term.column) {
          return absl::InvalidArgumentError(
              absl::StrCat("order_by: field \"", words[0], "\" appears twice"));
        }
      }
      terms.push_back(term);
      if (has_name) break;  // name is unique: later terms could never matter
    }
  }
  if (!has_name) terms.push_back(OrderTerm{nullptr, false});
  return terms;
}

const SchemaRegistry& SchemaRegistry::Default() {
  static const SchemaRegistry* registry = [] {
    auto* r = new SchemaRegistry();
    for (const Descriptor* d :
         {modelvault::v1::Provider::descriptor(), modelvault::v1::ModelFamily::descriptor(),
          modelvault::v1::Model::descriptor(), modelvault::v1::ProviderKey::descriptor(),
          modelvault::v1::AccessKey::descriptor(), modelvault::v1::Budget::descriptor(),
          modelvault::v1::BudgetAlert::descriptor()}) {
      absl::StatusOr<std::unique_ptr<ResourceSchema>> schema = ResourceSchema::Build(d);
      if (!schema.ok()) std::abort();  // a broken proto annotation is a build defect
      r->schemas_.push_back(*std::move(schema));
    }
    // Parent types follow from the patterns: the schema whose collections are
    // this one's minus the last.
    for (auto& child : r->schemas_) {
      for (auto& parent : r->schemas_) {
        if (parent->collections_.size() + 1 == child->collections_.size() &&
            std::equal(parent->collections_.begin(), parent->collections_.end(),
                       child->collections_.begin())) {
          child->parent_type_ = parent->type_;
        }
      }
    }
    return r;
  }();
  return *registry;
}

const ResourceSchema* SchemaRegistry::ForMessage(const Descriptor* descriptor) const {
  for (const auto& s : schemas_) {
    if (s->descriptor() == descriptor) return s.get();
  }
  return nullptr;
}

const ResourceSchema* SchemaRegistry::ForType(absl::string_view type) const {
  for (const auto& s : schemas_) {
    if (s->type() == type) return s.get();
  }
  return nullptr;
}

const ResourceSchema* SchemaRegistry::ForName(absl::string_view name) const {
  for (const auto& s : schemas_) {
    if (s->ParentOf(name).ok()) return s.get();
  }
  return nullptr;
}

}  // namespace modelvault::storage
