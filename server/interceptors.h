#pragma once

#include "grpcpp/support/server_interceptor.h"

namespace modelvault::server {

// gRPC answers a request it cannot parse (for example a string field holding
// invalid UTF-8) with INTERNAL and an empty message before any handler runs.
// That is the client's fault: this interceptor turns exactly that status into
// INVALID_ARGUMENT with a clear message. The server's own INTERNAL errors
// always carry a message, so they pass unchanged.
class BadRequestInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;
};

}  // namespace modelvault::server
