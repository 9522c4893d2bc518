#include "server/interceptors.h"

#include <string>

#include "grpcpp/support/status.h"
#include "server/scopes.h"

namespace modelvault::server {
namespace {

class BadRequestInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BadRequestInterceptor(bool known_method) : known_method_(known_method) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      const bool library_parse_error = (status.error_code() == grpc::StatusCode::UNIMPLEMENTED ||
                                        status.error_code() == grpc::StatusCode::INTERNAL) &&
                                       status.error_message().empty();
      if (known_method_ && library_parse_error) {
        methods->ModifySendStatus(grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            "the request is not a valid message of this method (for example, a string field "
            "holds invalid UTF-8)"));
      }
    }
    methods->Proceed();
  }

 private:
  const bool known_method_;
};

}  // namespace

grpc::experimental::Interceptor* BadRequestInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  // A method we serve never answers UNIMPLEMENTED itself; for an unknown
  // method UNIMPLEMENTED is right and stays.
  return new BadRequestInterceptor(info->method() != nullptr && RequiredScope(info->method()).ok());
}

}  // namespace modelvault::server
