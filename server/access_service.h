#pragma once

#include <functional>
#include <string>

#include "modelvault/v1/access.grpc.pb.h"
#include "server/auth.h"
#include "server/call_gate.h"
#include "server/resource_methods.h"

namespace modelvault::server {

// Inserts an access key (name and token_prefix filled here) and the keyed
// hash of a new token, in the transaction `ctx` describes; `token` receives
// the token (empty when the call was replayed by request_id).
// `with_token`, when given, runs inside the transaction with the new token
// (the bootstrap writes it to disk before the key commits).
absl::StatusOr<storage::MutationResult> InsertAccessKey(
    storage::ResourceStore& store, Authenticator& auth, storage::MutationContext ctx,
    const v1::AccessKey& key, std::string* token,
    const std::function<absl::Status(const std::string& token)>& with_token = nullptr);

// On a database without access keys, creates an admin key and writes its
// token to `path` (mode 0600). Returns whether it did. Safe when several
// replicas start at once: one creates, the others see it.
absl::StatusOr<bool> BootstrapAdminKey(storage::ResourceStore& store, Authenticator& auth,
                                       const std::string& path);

class AccessService final : public v1::AccessService::CallbackService {
 public:
  AccessService(ResourceMethods& methods, Authenticator& auth, CallGate& gate);

  using Ctx = grpc::CallbackServerContext;
  using Reactor = grpc::ServerUnaryReactor;

  Reactor* CreateAccessKey(Ctx* c, const v1::CreateAccessKeyRequest* r,
                           v1::CreateAccessKeyResponse* o) override;
  Reactor* GetAccessKey(Ctx* c, const v1::GetAccessKeyRequest* r, v1::AccessKey* o) override;
  Reactor* ListAccessKeys(Ctx* c, const v1::ListAccessKeysRequest* r,
                          v1::ListAccessKeysResponse* o) override;
  Reactor* UpdateAccessKey(Ctx* c, const v1::UpdateAccessKeyRequest* r, v1::AccessKey* o) override;
  Reactor* RotateAccessKey(Ctx* c, const v1::RotateAccessKeyRequest* r,
                           v1::CreateAccessKeyResponse* o) override;
  Reactor* RevokeAccessKey(Ctx* c, const v1::RevokeAccessKeyRequest* r, v1::AccessKey* o) override;
  Reactor* VerifyAccessKey(Ctx* c, const v1::VerifyAccessKeyRequest* r,
                           v1::VerifyAccessKeyResponse* o) override;

 private:
  ResourceMethods& methods_;
  Authenticator& auth_;
  CallGate& gate_;
};

// Checks of access keys beyond the descriptor rules: known scopes, no
// duplicates, an owner of the form user:<id> or service:<name>.
void CheckAccessKey(const google::protobuf::Message& message, absl::string_view prefix,
                    std::vector<FieldViolation>& out);

}  // namespace modelvault::server
