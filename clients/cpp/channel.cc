#include "clients/cpp/channel.h"

#include <cstdlib>
#include <fstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/support/client_interceptor.h"

namespace modelvault::client {
namespace {

class TokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit TokenInterceptor(const std::string& header) : header_(header) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", header_});
    }
    methods->Proceed();
  }

 private:
  const std::string& header_;
};

class TokenInterceptorFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit TokenInterceptorFactory(std::string token) : header_("Bearer " + std::move(token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new TokenInterceptor(header_);
  }

 private:
  const std::string header_;  // lives as long as the channel
};

absl::Status ReadFile(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const ChannelOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  grpc::ChannelArguments args;
  if (options.tls_ca_file.empty() &&
      (!options.tls_cert_file.empty() || !options.tls_key_file.empty() ||
       !options.tls_server_name.empty())) {
    // Never fall back to plaintext (and send the token in clear) when TLS was meant.
    return absl::InvalidArgumentError("TLS options need --tls-ca (the server's CA certificate)");
  }
  if (!options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (absl::Status s = ReadFile(options.tls_ca_file, ssl.pem_root_certs); !s.ok()) return s;
    if (!options.tls_cert_file.empty()) {
      if (absl::Status s = ReadFile(options.tls_cert_file, ssl.pem_cert_chain); !s.ok()) return s;
      if (absl::Status s = ReadFile(options.tls_key_file, ssl.pem_private_key); !s.ok()) return s;
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  }
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (!options.token.empty()) {
    interceptors.push_back(std::make_unique<TokenInterceptorFactory>(options.token));
  }
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                                 std::move(interceptors));
}

absl::StatusOr<std::string> TokenFromEnvironment(const std::string& token_file) {
  if (const char* t = std::getenv("MODELVAULT_TOKEN"); t != nullptr && *t != '\0') {
    return std::string(absl::StripAsciiWhitespace(t));
  }
  std::string path = token_file;
  if (path.empty()) {
    if (const char* f = std::getenv("MODELVAULT_TOKEN_FILE"); f != nullptr) path = f;
  }
  if (path.empty()) {
    return absl::NotFoundError(
        "no access key: set MODELVAULT_TOKEN, or MODELVAULT_TOKEN_FILE / --token-file (the "
        "server writes its first admin key to admin.token next to its SQLite file)");
  }
  std::string text;
  if (absl::Status s = ReadFile(path, text); !s.ok()) return s;
  return std::string(absl::StripAsciiWhitespace(text));
}

}  // namespace modelvault::client
