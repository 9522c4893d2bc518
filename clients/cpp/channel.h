#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

// Channels to modelvault that authenticate every call with an access key
// (`authorization: Bearer <token>`), optionally over TLS or mTLS.
namespace modelvault::client {

struct ChannelOptions {
  std::string token;            // access key; empty: calls carry none
  std::string tls_ca_file;      // PEM roots to verify the server; empty: plaintext
  std::string tls_cert_file;    // client certificate chain for mTLS
  std::string tls_key_file;     // its key
  std::string tls_server_name;  // overrides the name checked in the server certificate
};

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const ChannelOptions& options);

// The token from MODELVAULT_TOKEN, else from the file named by `token_file`
// or MODELVAULT_TOKEN_FILE. NOT_FOUND when neither is set.
absl::StatusOr<std::string> TokenFromEnvironment(const std::string& token_file);

}  // namespace modelvault::client
