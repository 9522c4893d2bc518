#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

// google.rpc error details carried inside absl::Status payloads, so that every
// layer can attach them and server/grpc_status.cc turns them into the
// grpc-status-details-bin trailer in one place.
namespace modelvault {

inline constexpr absl::string_view kBadRequestUrl = "type.googleapis.com/google.rpc.BadRequest";
inline constexpr absl::string_view kErrorInfoUrl = "type.googleapis.com/modelvault.v1.ErrorInfo";
inline constexpr absl::string_view kRetryInfoUrl = "type.googleapis.com/google.rpc.RetryInfo";
inline constexpr absl::string_view kResourceInfoUrl = "type.googleapis.com/google.rpc.ResourceInfo";
inline constexpr absl::string_view kErrorDomain = "modelvault.dev";

struct FieldViolation {
  std::string field;  // path of the field at fault, e.g. "model.context_window"
  std::string description;
};

// INVALID_ARGUMENT with a BadRequest detail listing every violation; the
// message names the first one.
absl::Status InvalidFields(std::vector<FieldViolation> violations);
absl::Status InvalidField(std::string field, std::string description);

// Adds a field violation to any status (e.g. a FAILED_PRECONDITION caused by
// a field's value).
absl::Status WithFieldViolation(absl::Status status, std::string field, std::string description);

// Adds an ErrorInfo{reason, domain, metadata}.
absl::Status WithErrorInfo(absl::Status status, absl::string_view reason,
                           const std::vector<std::pair<std::string, std::string>>& metadata = {});

// Adds a ResourceInfo{resource_type, resource_name}.
absl::Status WithResourceInfo(absl::Status status, absl::string_view type, absl::string_view name);

// Adds a RetryInfo{retry_delay} (google.rpc.RetryInfo).
absl::Status WithRetryInfo(absl::Status status, absl::Duration delay);

// The reason of an ErrorInfo payload, or "" (tests, clients).
std::string ErrorReason(const absl::Status& status);

}  // namespace modelvault
