#include "server/validation.h"

#include <algorithm>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "absl/container/node_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "google/api/field_behavior.pb.h"
#include "google/api/resource.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "modelvault/v1/options.pb.h"
#include "storage/schema.h"

namespace modelvault::server {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the google.protobuf.Timestamp range.
constexpr std::int64_t kMinSeconds = -62135596800;
constexpr std::int64_t kMaxSeconds = 253402300799;

bool HasBehavior(const FieldDescriptor* f, google::api::FieldBehavior behavior) {
  const auto& behaviors = f->options().GetRepeatedExtension(google::api::field_behavior);
  return std::find(behaviors.begin(), behaviors.end(), behavior) != behaviors.end();
}

size_t CodePoints(absl::string_view text) {
  return static_cast<size_t>(std::count_if(text.begin(), text.end(), [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

bool IsUrl(absl::string_view url) {
  absl::string_view rest = url;
  if (absl::ConsumePrefix(&rest, "https://") || absl::ConsumePrefix(&rest, "http://")) {
    const size_t host_end = std::min(rest.find('/'), rest.size());
    return host_end > 0 && std::none_of(url.begin(), url.end(), [](char c) {
             return absl::ascii_isspace(c) || absl::ascii_iscntrl(c);
           });
  }
  return false;
}

void CheckString(const FieldDescriptor* f, const std::string& path, absl::string_view value,
                 const modelvault::v1::FieldRules& rules, std::vector<FieldViolation>& out) {
  if (!IsValidUtf8(value)) {
    out.push_back({path, "is not valid UTF-8"});
    return;
  }
  if (value.find('\0') != absl::string_view::npos) {
    out.push_back({path, "must not contain NUL characters"});
    return;
  }
  const size_t max = rules.max_length() > 0 ? static_cast<size_t>(rules.max_length())
                                            : static_cast<size_t>(kDefaultMaxStringLength);
  if (CodePoints(value) > max) {
    out.push_back({path, absl::StrCat("is longer than ", max, " characters")});
    return;
  }
  if (value.empty()) return;
  switch (rules.format()) {
    case modelvault::v1::FieldRules::FORMAT_URL:
      if (!IsUrl(value)) out.push_back({path, "must be an absolute http:// or https:// URL"});
      break;
    case modelvault::v1::FieldRules::FORMAT_RESOURCE_NAME: {
      const std::string type = f->options().GetExtension(google::api::resource_reference).type();
      const storage::ResourceSchema* schema = storage::SchemaRegistry::Default().ForType(type);
      if (schema != nullptr) {
        if (auto parent = schema->ParentOf(value); !parent.ok()) {
          out.push_back({path, std::string(parent.status().message())});
        }
      }
      break;
    }
    default:
      break;
  }
}

void CheckField(const Message& message, const FieldDescriptor* f, const std::string& path,
                int index, std::vector<FieldViolation>& out) {
  const Reflection* r = message.GetReflection();
  const auto& rules = f->options().GetExtension(modelvault::v1::rules);
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_STRING: {
      std::string scratch;
      const std::string& value = index < 0
                                     ? r->GetStringReference(message, f, &scratch)
                                     : r->GetRepeatedStringReference(message, f, index, &scratch);
      CheckString(f, path, value, rules, out);
      break;
    }
    case FieldDescriptor::CPPTYPE_INT32:
    case FieldDescriptor::CPPTYPE_INT64: {
      const std::int64_t value =
          f->cpp_type() == FieldDescriptor::CPPTYPE_INT32
              ? (index < 0 ? r->GetInt32(message, f) : r->GetRepeatedInt32(message, f, index))
              : (index < 0 ? r->GetInt64(message, f) : r->GetRepeatedInt64(message, f, index));
      if (rules.has_min() && value < rules.min()) {
        out.push_back({path, absl::StrCat("must be at least ", rules.min(), " (got ", value, ")")});
      } else if (rules.has_max() && value > rules.max()) {
        out.push_back({path, absl::StrCat("must be at most ", rules.max(), " (got ", value, ")",
                                          rules.max_hint().empty() ? "" : "; ", rules.max_hint())});
      }
      break;
    }
    case FieldDescriptor::CPPTYPE_ENUM: {
      const int value =
          index < 0 ? r->GetEnumValue(message, f) : r->GetRepeatedEnumValue(message, f, index);
      if (f->enum_type()->FindValueByNumber(value) == nullptr) {
        out.push_back({path, absl::StrCat("unknown enum value ", value)});
      }
      break;
    }
    case FieldDescriptor::CPPTYPE_MESSAGE: {
      const Message& sub =
          index < 0 ? r->GetMessage(message, f) : r->GetRepeatedMessage(message, f, index);
      if (f->message_type()->full_name() == "google.protobuf.Timestamp") {
        const auto& ts = static_cast<const google::protobuf::Timestamp&>(sub);
        if (ts.seconds() < kMinSeconds || ts.seconds() > kMaxSeconds || ts.nanos() < 0 ||
            ts.nanos() > 999999999) {
          out.push_back({path, "is not a valid timestamp (years 1 to 9999)"});
        }
        break;
      }
      ValidateMessage(sub, path + ".", nullptr, out);
      break;
    }
    default:
      break;
  }
}

}  // namespace

bool IsValidUtf8(absl::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if ((c >> 5) == 0x6) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c >> 4) == 0xE) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c >> 3) == 0x1E) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > text.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(text[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

void ValidateMessage(const Message& message, absl::string_view prefix,
                     const std::vector<std::string>* paths, std::vector<FieldViolation>& out) {
  const auto* descriptor = message.GetDescriptor();
  const Reflection* r = message.GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const FieldDescriptor* f = descriptor->field(i);
    if (HasBehavior(f, google::api::OUTPUT_ONLY)) continue;
    if (paths != nullptr && std::find(paths->begin(), paths->end(), f->name()) == paths->end()) {
      continue;
    }
    const std::string path = absl::StrCat(prefix, f->name());
    if (f->is_repeated()) {
      const int n = r->FieldSize(message, f);
      // A required list needs at least one element (AccessKey.scopes).
      if (n == 0 && HasBehavior(f, google::api::REQUIRED)) out.push_back({path, "is required"});
      for (int k = 0; k < n; ++k) CheckField(message, f, absl::StrCat(path, "[", k, "]"), k, out);
      continue;
    }
    const bool present = f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE
                             ? r->HasField(message, f)
                             : (f->cpp_type() != FieldDescriptor::CPPTYPE_STRING ||
                                !r->GetString(message, f).empty());
    if (!present) {
      if (HasBehavior(f, google::api::REQUIRED)) out.push_back({path, "is required"});
      continue;
    }
    CheckField(message, f, path, -1, out);
  }
}

void ValidateId(absl::string_view field, absl::string_view id, std::vector<FieldViolation>& out) {
  if (id.empty()) {
    out.push_back({std::string(field), "is required"});
  } else if (!storage::IsValidResourceId(id)) {
    out.push_back({std::string(field),
                   "must be 1 to 63 characters of a-z, 0-9, '-', '.', '_', starting and ending "
                   "with a letter or digit"});
  }
}

void ValidateRequestId(absl::string_view request_id, std::vector<FieldViolation>& out) {
  if (request_id.size() > 128 || !std::all_of(request_id.begin(), request_id.end(),
                                              [](char c) { return c > 0x20 && c < 0x7f; })) {
    out.push_back({"request_id", "must be at most 128 printable ASCII characters"});
  }
}

absl::Status ToStatus(std::vector<FieldViolation> violations) {
  if (violations.empty()) return absl::OkStatus();
  return InvalidFields(std::move(violations));
}

void ClearOutputOnly(Message& message) {
  // The fields of each type are found once: reading every field's options
  // on each call was a visible share of preparing a usage record.
  static std::shared_mutex mu;
  static auto* output_only =
      new absl::node_hash_map<const Descriptor*, std::vector<const FieldDescriptor*>>();
  const Descriptor* descriptor = message.GetDescriptor();
  const std::vector<const FieldDescriptor*>* fields = nullptr;
  {
    std::shared_lock lock(mu);
    if (auto it = output_only->find(descriptor); it != output_only->end()) fields = &it->second;
  }
  if (fields == nullptr) {
    std::unique_lock lock(mu);
    auto [it, inserted] = output_only->try_emplace(descriptor);
    if (inserted) {
      for (int i = 0; i < descriptor->field_count(); ++i) {
        if (HasBehavior(descriptor->field(i), google::api::OUTPUT_ONLY)) {
          it->second.push_back(descriptor->field(i));
        }
      }
    }
    fields = &it->second;  // node_hash_map: stable, and never changed once filled
  }
  for (const FieldDescriptor* field : *fields) message.GetReflection()->ClearField(&message, field);
}

}  // namespace modelvault::server
