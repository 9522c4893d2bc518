#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace modelvault::server {

// The one mapping from absl::Status to grpc::Status: same code and message,
// and the google.rpc error details carried in the status payloads
// (storage/status_details.h) as a google.rpc.Status in
// grpc-status-details-bin. INTERNAL and UNKNOWN messages are replaced by a
// generic text so that no SQL or secret leaves the server.
grpc::Status ToGrpcStatus(const absl::Status& status);

// The reverse, for clients: keeps code, message and details payloads.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace modelvault::server
