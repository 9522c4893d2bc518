#pragma once

#include <atomic>

#include "modelvault/v1/catalog.grpc.pb.h"
#include "server/call_gate.h"
#include "server/change_hub.h"
#include "server/resource_methods.h"

namespace modelvault::server {

// CatalogService over the callback API. Every call enters through the
// CallGate (authentication, scope). Reads (Get, ResolveModelPrice) are
// answered inline from the in-memory cache; everything that touches the
// database runs on the executor, never on gRPC's threads.
class CatalogService final : public modelvault::v1::CatalogService::CallbackService {
 public:
  CatalogService(ResourceMethods& methods, ChangeHub& hub, CallGate& gate);

  using Ctx = grpc::CallbackServerContext;
  using Reactor = grpc::ServerUnaryReactor;

  Reactor* CreateProvider(Ctx* c, const v1::CreateProviderRequest* r, v1::Provider* o) override;
  Reactor* GetProvider(Ctx* c, const v1::GetProviderRequest* r, v1::Provider* o) override;
  Reactor* ListProviders(Ctx* c, const v1::ListProvidersRequest* r,
                         v1::ListProvidersResponse* o) override;
  Reactor* UpdateProvider(Ctx* c, const v1::UpdateProviderRequest* r, v1::Provider* o) override;
  Reactor* DeleteProvider(Ctx* c, const v1::DeleteProviderRequest* r,
                          google::protobuf::Empty* o) override;

  Reactor* CreateModelFamily(Ctx* c, const v1::CreateModelFamilyRequest* r,
                             v1::ModelFamily* o) override;
  Reactor* GetModelFamily(Ctx* c, const v1::GetModelFamilyRequest* r, v1::ModelFamily* o) override;
  Reactor* ListModelFamilies(Ctx* c, const v1::ListModelFamiliesRequest* r,
                             v1::ListModelFamiliesResponse* o) override;
  Reactor* UpdateModelFamily(Ctx* c, const v1::UpdateModelFamilyRequest* r,
                             v1::ModelFamily* o) override;
  Reactor* DeleteModelFamily(Ctx* c, const v1::DeleteModelFamilyRequest* r,
                             google::protobuf::Empty* o) override;

  Reactor* CreateModel(Ctx* c, const v1::CreateModelRequest* r, v1::Model* o) override;
  Reactor* GetModel(Ctx* c, const v1::GetModelRequest* r, v1::Model* o) override;
  Reactor* ListModels(Ctx* c, const v1::ListModelsRequest* r, v1::ListModelsResponse* o) override;
  Reactor* UpdateModel(Ctx* c, const v1::UpdateModelRequest* r, v1::Model* o) override;
  Reactor* DeleteModel(Ctx* c, const v1::DeleteModelRequest* r,
                       google::protobuf::Empty* o) override;

  Reactor* ResolveModelPrice(Ctx* c, const v1::ResolveModelPriceRequest* r,
                             v1::ResolveModelPriceResponse* o) override;

  grpc::ServerWriteReactor<v1::WatchCatalogResponse>* WatchCatalog(
      Ctx* c, const v1::WatchCatalogRequest* r) override;

 private:
  // List through the page cache, else the database.
  Reactor* List(Ctx* c, const char* method, ListCall call, google::protobuf::Message* o);

  ResourceMethods& methods_;
  ChangeHub& hub_;
  CallGate& gate_;
};

// Checks of models beyond the descriptor rules: the family belongs to the
// same provider; at most 64 prices with distinct effective times.
void CheckModel(const google::protobuf::Message& message, absl::string_view prefix,
                std::vector<FieldViolation>& out);

// The price in force at `time`: the entry with the latest effective_time at
// or before it. NOT_FOUND when none.
absl::StatusOr<v1::ModelPrice> PriceAt(const v1::Model& model, absl::Time time);

}  // namespace modelvault::server
