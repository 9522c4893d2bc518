#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "storage/status_details.h"

// Descriptor-driven input validation: google.api.field_behavior (REQUIRED)
// and modelvault.v1.rules (max_length, min, max, format) on every field,
// recursively. One mechanism for every resource and request.
namespace modelvault::server {

// Longest string accepted when a field declares no max_length.
inline constexpr int kDefaultMaxStringLength = 4096;

// Appends the violations of `message` to `out`, naming fields with `prefix`
// ("model." → "model.prices[1].input"). When `paths` is non-null only those
// top-level fields are checked (Update with a field mask).
void ValidateMessage(const google::protobuf::Message& message, absl::string_view prefix,
                     const std::vector<std::string>* paths, std::vector<FieldViolation>& out);

// Checks a resource id (`provider_id`, `model_id`, ...).
void ValidateId(absl::string_view field, absl::string_view id, std::vector<FieldViolation>& out);

// Checks an AIP-155 request_id: optional, at most 128 printable ASCII characters.
void ValidateRequestId(absl::string_view request_id, std::vector<FieldViolation>& out);

// OK when `out` is empty, else INVALID_ARGUMENT with every violation.
absl::Status ToStatus(std::vector<FieldViolation> violations);

// Clears OUTPUT_ONLY fields (AIP-203: they are ignored on input).
void ClearOutputOnly(google::protobuf::Message& message);

// Whether `text` is well-formed UTF-8.
bool IsValidUtf8(absl::string_view text);

}  // namespace modelvault::server
