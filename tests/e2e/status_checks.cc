#include "tests/e2e/status_checks.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/rpc/error_details.pb.h"
#include "modelvault/v1/types.pb.h"
#include "storage/status_details.h"

namespace modelvault::testing {

std::vector<std::string> FieldsOf(const absl::Status& status) {
  std::vector<std::string> fields;
  if (auto payload = status.GetPayload(kBadRequestUrl); payload.has_value()) {
    google::rpc::BadRequest bad_request;
    if (bad_request.ParseFromString(std::string(*payload))) {
      for (const auto& v : bad_request.field_violations()) fields.push_back(v.field());
    }
  }
  return fields;
}

std::string ErrorMetadata(const absl::Status& status, const std::string& key) {
  auto payload = status.GetPayload(kErrorInfoUrl);
  if (!payload.has_value()) return "";
  v1::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) return "";
  auto it = info.metadata().find(key);
  return it == info.metadata().end() ? "" : it->second;
}

std::string Describe(const absl::Status& status) {
  return absl::StrCat(status.ToString(absl::StatusToStringMode::kWithNoExtraData), " fields=[",
                      absl::StrJoin(FieldsOf(status), ","), "] reason=", ErrorReason(status));
}

::testing::AssertionResult IsError(const absl::Status& status, absl::StatusCode code,
                                   const std::string& field, const std::string& reason) {
  const std::vector<std::string> fields = FieldsOf(status);
  if (status.code() != code) {
    return ::testing::AssertionFailure()
           << "expected " << absl::StatusCodeToString(code) << ", got " << Describe(status);
  }
  if (!field.empty() && std::find(fields.begin(), fields.end(), field) == fields.end()) {
    return ::testing::AssertionFailure()
           << "expected a violation of \"" << field << "\", got " << Describe(status);
  }
  if (!reason.empty() && ErrorReason(status) != reason) {
    return ::testing::AssertionFailure()
           << "expected reason " << reason << ", got " << Describe(status);
  }
  return ::testing::AssertionSuccess();
}

}  // namespace modelvault::testing
