#include "storage/sql/row_codec.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/timestamp.pb.h"
#include "google/protobuf/util/json_util.h"

namespace modelvault::storage {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// JSON columns hold the proto JSON of a message with only that field set,
// e.g. {"prices":[...]}: one mechanism for singular and repeated fields.
absl::StatusOr<std::string> FieldToJson(const Message& resource, const FieldDescriptor* field) {
  std::unique_ptr<Message> only(resource.New());
  only->CopyFrom(resource);
  std::vector<const FieldDescriptor*> present;
  only->GetReflection()->ListFields(*only, &present);
  for (const FieldDescriptor* f : present) {
    if (f != field) only->GetReflection()->ClearField(only.get(), f);
  }
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(*only, &json).ok()) {
    return absl::InternalError("cannot encode a JSON column");
  }
  return json;
}

}  // namespace

void Params::AddString(std::string name, std::string value, bool null) {
  entries_.push_back(
      Entry{std::move(name), true, std::move(value), 0, null ? soci::i_null : soci::i_ok});
}

void Params::AddInt(std::string name, std::int64_t value, bool null) {
  entries_.push_back(Entry{std::move(name), false, {}, value, null ? soci::i_null : soci::i_ok});
}

void Params::Add(std::string name, const SqlValue& value) {
  if (const auto* s = std::get_if<std::string>(&value)) {
    AddString(std::move(name), *s);
  } else {
    AddInt(std::move(name), std::get<std::int64_t>(value));
  }
}

void Params::BindTo(soci::statement& statement) {
  for (Entry& e : entries_) {
    if (e.is_string) {
      statement.exchange(soci::use(e.text, e.indicator, e.name));
    } else {
      statement.exchange(soci::use(e.number, e.indicator, e.name));
    }
  }
}

RowBuffer::RowBuffer(const ResourceSchema& schema) : schema_(schema) {
  cells_.resize(schema.columns().size());
}

void RowBuffer::BindTo(soci::statement& statement) {
  statement.exchange(soci::into(name_));
  statement.exchange(soci::into(revision_));
  for (size_t i = 0; i < cells_.size(); ++i) {
    const ColumnKind kind = schema_.columns()[i].kind;
    Cell& cell = cells_[i];
    if (kind == ColumnKind::kInt64 || kind == ColumnKind::kBool || kind == ColumnKind::kTimestamp) {
      statement.exchange(soci::into(cell.number, cell.indicator));
    } else {
      statement.exchange(soci::into(cell.text, cell.indicator));
    }
  }
}

absl::Status RowBuffer::Decode(Message& out, std::int64_t& revision) const {
  out.Clear();
  const Reflection* reflection = out.GetReflection();
  reflection->SetString(&out, out.GetDescriptor()->FindFieldByName("name"), name_);
  revision = revision_;
  for (size_t i = 0; i < cells_.size(); ++i) {
    const Column& column = schema_.columns()[i];
    const Cell& cell = cells_[i];
    if (cell.indicator == soci::i_null) continue;
    const FieldDescriptor* field = column.field;
    switch (column.kind) {
      case ColumnKind::kString:
        reflection->SetString(&out, field, cell.text);
        break;
      case ColumnKind::kInt64:
        if (field->cpp_type() == FieldDescriptor::CPPTYPE_INT32) {
          reflection->SetInt32(&out, field, static_cast<std::int32_t>(cell.number));
        } else {
          reflection->SetInt64(&out, field, cell.number);
        }
        break;
      case ColumnKind::kBool:
        reflection->SetBool(&out, field, cell.number != 0);
        break;
      case ColumnKind::kEnum: {
        const auto* value = field->enum_type()->FindValueByName(cell.text);
        if (value == nullptr) return absl::InternalError("unknown enum value in the database");
        reflection->SetEnum(&out, field, value);
        break;
      }
      case ColumnKind::kTimestamp: {
        auto* ts =
            static_cast<google::protobuf::Timestamp*>(reflection->MutableMessage(&out, field));
        ts->set_seconds(cell.number >= 0 ? cell.number / 1000000
                                         : -((-cell.number + 999999) / 1000000));
        ts->set_nanos(static_cast<std::int32_t>((cell.number - ts->seconds() * 1000000) * 1000));
        break;
      }
      case ColumnKind::kJson: {
        std::unique_ptr<Message> only(out.New());
        if (!google::protobuf::util::JsonStringToMessage(cell.text, only.get()).ok()) {
          return absl::InternalError("cannot decode a JSON column");
        }
        out.MergeFrom(*only);
        break;
      }
    }
  }
  return absl::OkStatus();
}

std::string SelectList(const ResourceSchema& schema) {
  std::string list = "name, revision";
  for (const Column& c : schema.columns()) absl::StrAppend(&list, ", ", c.name);
  return list;
}

std::int64_t TimestampMicros(const Message& timestamp) {
  const auto& ts = static_cast<const google::protobuf::Timestamp&>(timestamp);
  return ts.seconds() * 1000000 + ts.nanos() / 1000;
}

absl::Status EncodeColumns(const ResourceSchema& schema, const Message& resource, Params& params) {
  const Reflection* reflection = resource.GetReflection();
  for (const Column& column : schema.columns()) {
    const FieldDescriptor* field = column.field;
    std::string name = "c_" + column.name;
    switch (column.kind) {
      case ColumnKind::kString: {
        std::string value = reflection->GetString(resource, field);
        const bool null = column.nullable && value.empty();
        params.AddString(std::move(name), std::move(value), null);
        break;
      }
      case ColumnKind::kInt64:
        params.AddInt(std::move(name), field->cpp_type() == FieldDescriptor::CPPTYPE_INT32
                                           ? reflection->GetInt32(resource, field)
                                           : reflection->GetInt64(resource, field));
        break;
      case ColumnKind::kBool:
        params.AddInt(std::move(name), reflection->GetBool(resource, field) ? 1 : 0);
        break;
      case ColumnKind::kEnum:
        params.AddString(std::move(name), reflection->GetEnum(resource, field)->name());
        break;
      case ColumnKind::kTimestamp: {
        const bool set = reflection->HasField(resource, field);
        params.AddInt(std::move(name),
                      set ? TimestampMicros(reflection->GetMessage(resource, field)) : 0, !set);
        break;
      }
      case ColumnKind::kJson: {
        absl::StatusOr<std::string> json = FieldToJson(resource, field);
        if (!json.ok()) return json.status();
        params.AddString(std::move(name), *std::move(json));
        break;
      }
    }
  }
  return absl::OkStatus();
}

std::string SortExpression(const Column* column) {
  if (column == nullptr) return "name";
  if (column->nullable && column->kind == ColumnKind::kTimestamp) {
    return absl::StrCat("COALESCE(", column->name, ", -1)");
  }
  return column->name;
}

std::vector<SqlValue> SortKeyOf(const Message& resource, const std::vector<OrderTerm>& order) {
  const Reflection* reflection = resource.GetReflection();
  std::vector<SqlValue> key;
  for (const OrderTerm& term : order) {
    if (term.column == nullptr) {
      key.emplace_back(
          reflection->GetString(resource, resource.GetDescriptor()->FindFieldByName("name")));
      continue;
    }
    const FieldDescriptor* field = term.column->field;
    switch (term.column->kind) {
      case ColumnKind::kInt64:
        key.emplace_back(field->cpp_type() == FieldDescriptor::CPPTYPE_INT32
                             ? std::int64_t{reflection->GetInt32(resource, field)}
                             : reflection->GetInt64(resource, field));
        break;
      case ColumnKind::kBool:
        key.emplace_back(std::int64_t{reflection->GetBool(resource, field) ? 1 : 0});
        break;
      case ColumnKind::kTimestamp:
        key.emplace_back(reflection->HasField(resource, field)
                             ? TimestampMicros(reflection->GetMessage(resource, field))
                             : std::int64_t{-1});
        break;
      case ColumnKind::kEnum:
        key.emplace_back(reflection->GetEnum(resource, field)->name());
        break;
      default:
        key.emplace_back(reflection->GetString(resource, field));
        break;
    }
  }
  return key;
}

}  // namespace modelvault::storage
