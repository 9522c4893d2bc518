#pragma once

#include "grpcpp/support/server_interceptor.h"

namespace modelvault::server {

// gRPC 1.51's callback API answers a request it cannot parse (for example a
// string field holding invalid UTF-8) with UNIMPLEMENTED (INTERNAL on the sync
// API) and an empty message before any handler runs. That is the client's
// fault: for methods this server implements, this interceptor turns exactly
// that status into INVALID_ARGUMENT. The server's own errors always carry a
// message, and unknown methods keep UNIMPLEMENTED.
class BadRequestInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;
};

}  // namespace modelvault::server
