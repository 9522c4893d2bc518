#include "storage/status_details.h"

#include "absl/strings/cord.h"
#include "google/rpc/error_details.pb.h"
#include "modelvault/v1/types.pb.h"

namespace modelvault {

absl::Status InvalidFields(std::vector<FieldViolation> violations) {
  google::rpc::BadRequest detail;
  for (FieldViolation& v : violations) {
    auto* out = detail.add_field_violations();
    out->set_field(v.field);
    out->set_description(v.description);
  }
  const std::string message =
      violations.empty() ? std::string("invalid request")
                         : violations.front().field + ": " + violations.front().description;
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kBadRequestUrl, absl::Cord(detail.SerializeAsString()));
  return status;
}

absl::Status InvalidField(std::string field, std::string description) {
  return InvalidFields({FieldViolation{std::move(field), std::move(description)}});
}

absl::Status WithFieldViolation(absl::Status status, std::string field, std::string description) {
  google::rpc::BadRequest detail;
  if (auto existing = status.GetPayload(kBadRequestUrl); existing.has_value()) {
    detail.ParseFromString(std::string(*existing));
  }
  auto* out = detail.add_field_violations();
  out->set_field(std::move(field));
  out->set_description(std::move(description));
  status.SetPayload(kBadRequestUrl, absl::Cord(detail.SerializeAsString()));
  return status;
}

absl::Status WithErrorInfo(absl::Status status, absl::string_view reason,
                           const std::vector<std::pair<std::string, std::string>>& metadata) {
  modelvault::v1::ErrorInfo info;
  info.set_reason(std::string(reason));
  info.set_domain(std::string(kErrorDomain));
  for (const auto& [k, v] : metadata) (*info.mutable_metadata())[k] = v;
  status.SetPayload(kErrorInfoUrl, absl::Cord(info.SerializeAsString()));
  return status;
}

absl::Status WithResourceInfo(absl::Status status, absl::string_view type, absl::string_view name) {
  google::rpc::ResourceInfo info;
  info.set_resource_type(std::string(type));
  info.set_resource_name(std::string(name));
  status.SetPayload(kResourceInfoUrl, absl::Cord(info.SerializeAsString()));
  return status;
}

absl::Status WithRetryInfo(absl::Status status, absl::Duration delay) {
  google::rpc::RetryInfo info;
  const std::int64_t micros = absl::ToInt64Microseconds(delay);
  info.mutable_retry_delay()->set_seconds(micros / 1000000);
  info.mutable_retry_delay()->set_nanos(static_cast<std::int32_t>((micros % 1000000) * 1000));
  status.SetPayload(kRetryInfoUrl, absl::Cord(info.SerializeAsString()));
  return status;
}

std::string ErrorReason(const absl::Status& status) {
  auto payload = status.GetPayload(kErrorInfoUrl);
  if (!payload.has_value()) return "";
  modelvault::v1::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) return "";
  return info.reason();
}

}  // namespace modelvault
