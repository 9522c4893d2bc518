#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

// Checks of the statuses the server answers with (codes and google.rpc details), shared by
// the e2e suites.
namespace modelvault::testing {

// The fields of the BadRequest violations of `status`.
std::vector<std::string> FieldsOf(const absl::Status& status);
// The metadata entry `key` of the ErrorInfo detail of `status`, or "".
std::string ErrorMetadata(const absl::Status& status, const std::string& key);
// Code, message, violated fields and reason, for failure messages.
std::string Describe(const absl::Status& status);
// Whether `status` has `code`, a BadRequest violation of `field` (when not empty) and an
// ErrorInfo `reason` (when not empty).
::testing::AssertionResult IsError(const absl::Status& status, absl::StatusCode code,
                                   const std::string& field = "", const std::string& reason = "");

}  // namespace modelvault::testing
