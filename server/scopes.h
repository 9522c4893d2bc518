#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "modelvault/v1/options.pb.h"

namespace modelvault::server {

// The scope a method declares with the modelvault.v1.required_scope option,
// by full method name ("/modelvault.v1.CatalogService/GetModel" or
// "modelvault.v1.CatalogService.GetModel"). NOT_FOUND for unknown methods;
// FAILED_PRECONDITION for a method without a scope. Health and reflection
// need none and are not looked up. The auth interceptor enforces these.
absl::StatusOr<v1::Scope> RequiredScope(absl::string_view method);

// Every method of every modelvault.v1 service, as "/pkg.Service/Method".
std::vector<std::string> AllMethods();

}  // namespace modelvault::server
