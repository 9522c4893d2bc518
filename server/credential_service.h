#pragma once

#include "modelvault/v1/credentials.grpc.pb.h"
#include "server/call_gate.h"
#include "server/key_pool.h"
#include "server/provider_keys.h"
#include "server/resource_methods.h"

namespace modelvault::server {

// CredentialService: provider-key CRUD through the generic resource methods
// (secrets written in the same transaction by ProviderKeyStore), and the
// hot path — AcquireProviderKey — answered from the KeyPool in memory.
class CredentialService final : public v1::CredentialService::CallbackService {
 public:
  // `secret_file_dir`: where file: references may point ("" turns them off).
  CredentialService(ResourceMethods& methods, ProviderKeyStore& keys, KeyPool& pool, CallGate& gate,
                    std::string secret_file_dir);

  using Ctx = grpc::CallbackServerContext;
  using Reactor = grpc::ServerUnaryReactor;

  Reactor* CreateProviderKey(Ctx* c, const v1::CreateProviderKeyRequest* r,
                             v1::ProviderKey* o) override;
  Reactor* GetProviderKey(Ctx* c, const v1::GetProviderKeyRequest* r, v1::ProviderKey* o) override;
  Reactor* ListProviderKeys(Ctx* c, const v1::ListProviderKeysRequest* r,
                            v1::ListProviderKeysResponse* o) override;
  Reactor* UpdateProviderKey(Ctx* c, const v1::UpdateProviderKeyRequest* r,
                             v1::ProviderKey* o) override;
  Reactor* DeleteProviderKey(Ctx* c, const v1::DeleteProviderKeyRequest* r,
                             google::protobuf::Empty* o) override;
  Reactor* AcquireProviderKey(Ctx* c, const v1::AcquireProviderKeyRequest* r,
                              v1::AcquireProviderKeyResponse* o) override;
  Reactor* ReportKeyOutcome(Ctx* c, const v1::ReportKeyOutcomeRequest* r,
                            v1::ReportKeyOutcomeResponse* o) override;
  Reactor* RotateProviderKey(Ctx* c, const v1::RotateProviderKeyRequest* r,
                             v1::ProviderKey* o) override;
  Reactor* RewrapSecrets(Ctx* c, const v1::RewrapSecretsRequest* r,
                         v1::RewrapSecretsResponse* o) override;

 private:
  // Fills the computed fields (versions, counters, health) of read keys.
  absl::Status Describe(const std::vector<v1::ProviderKey*>& keys);

  ResourceMethods& methods_;
  ProviderKeyStore& keys_;
  KeyPool& pool_;
  CallGate& gate_;
  const std::string secret_file_dir_;
};

}  // namespace modelvault::server
