#include "server/interceptors.h"

#include <string>

#include "grpcpp/support/status.h"

namespace modelvault::server {
namespace {

class BadRequestInterceptor final : public grpc::experimental::Interceptor {
 public:
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::INTERNAL && status.error_message().empty()) {
        methods->ModifySendStatus(grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            "the request is not a valid message of this method (for example, a string field "
            "holds invalid UTF-8)"));
      }
    }
    methods->Proceed();
  }
};

}  // namespace

grpc::experimental::Interceptor* BadRequestInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* /*info*/) {
  return new BadRequestInterceptor();
}

}  // namespace modelvault::server
