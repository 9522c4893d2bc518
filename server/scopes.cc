#include "server/scopes.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"
#include "modelvault/v1/access.grpc.pb.h"
#include "modelvault/v1/budgets.grpc.pb.h"
#include "modelvault/v1/catalog.grpc.pb.h"
#include "modelvault/v1/credentials.grpc.pb.h"
#include "modelvault/v1/usage.grpc.pb.h"

namespace modelvault::server {
namespace {

// Services compiled into the binary; linking their descriptors here keeps
// the pool populated.
const google::protobuf::FileDescriptor* const kFiles[] = {
    v1::GetModelRequest::descriptor()->file(),     v1::GetProviderKeyRequest::descriptor()->file(),
    v1::GetAccessKeyRequest::descriptor()->file(), v1::RecordUsageRequest::descriptor()->file(),
    v1::GetBudgetRequest::descriptor()->file(),
};

}  // namespace

absl::StatusOr<v1::Scope> RequiredScope(absl::string_view method) {
  std::string name(absl::StripPrefix(method, "/"));
  name = absl::StrReplaceAll(name, {{"/", "."}});
  const google::protobuf::MethodDescriptor* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(name);
  if (descriptor == nullptr) return absl::NotFoundError(absl::StrCat("unknown method ", method));
  const auto& options = descriptor->options();
  if (!options.HasExtension(v1::required_scope) ||
      options.GetExtension(v1::required_scope) == v1::SCOPE_UNSPECIFIED) {
    return absl::FailedPreconditionError(absl::StrCat(method, " declares no required_scope"));
  }
  return options.GetExtension(v1::required_scope);
}

std::vector<std::string> AllMethods() {
  std::vector<std::string> out;
  for (const auto* file : kFiles) {
    for (int s = 0; s < file->service_count(); ++s) {
      const auto* service = file->service(s);
      for (int m = 0; m < service->method_count(); ++m) {
        out.push_back(absl::StrCat("/", service->full_name(), "/", service->method(m)->name()));
      }
    }
  }
  return out;
}

}  // namespace modelvault::server
