#include "clients/cpp/catalog_client.h"

#include "clients/cpp/channel.h"
#include "google/protobuf/util/time_util.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc_status.h"

namespace modelvault::client {

using server::FromGrpcStatus;

absl::StatusOr<std::unique_ptr<CatalogClient>> CatalogClient::Connect(const std::string& target,
                                                                      const ChannelOptions& options,
                                                                      absl::Duration deadline) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(target, options);
  if (!channel.ok()) return channel.status();
  return std::make_unique<CatalogClient>(*std::move(channel), deadline);
}

CatalogClient::CatalogClient(std::shared_ptr<grpc::Channel> channel, absl::Duration deadline)
    : stub_(v1::CatalogService::NewStub(std::move(channel))), deadline_(deadline) {}

void CatalogClient::Prepare(grpc::ClientContext& context) const {
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(deadline_));
}

absl::StatusOr<v1::Model> CatalogClient::GetModel(absl::string_view name) {
  grpc::ClientContext context;
  Prepare(context);
  v1::GetModelRequest request;
  request.set_name(std::string(name));
  v1::Model model;
  if (grpc::Status s = stub_->GetModel(&context, request, &model); !s.ok()) {
    return FromGrpcStatus(s);
  }
  return model;
}

absl::StatusOr<v1::Provider> CatalogClient::GetProvider(absl::string_view name) {
  grpc::ClientContext context;
  Prepare(context);
  v1::GetProviderRequest request;
  request.set_name(std::string(name));
  v1::Provider provider;
  if (grpc::Status s = stub_->GetProvider(&context, request, &provider); !s.ok()) {
    return FromGrpcStatus(s);
  }
  return provider;
}

absl::StatusOr<std::vector<v1::Provider>> CatalogClient::ListAllProviders(
    absl::string_view filter) {
  std::vector<v1::Provider> out;
  v1::ListProvidersRequest request;
  request.set_filter(std::string(filter));
  request.set_page_size(1000);
  do {
    grpc::ClientContext context;
    Prepare(context);
    v1::ListProvidersResponse response;
    if (grpc::Status s = stub_->ListProviders(&context, request, &response); !s.ok()) {
      return FromGrpcStatus(s);
    }
    out.insert(out.end(), response.providers().begin(), response.providers().end());
    request.set_page_token(response.next_page_token());
  } while (!request.page_token().empty());
  return out;
}

absl::StatusOr<std::vector<v1::Model>> CatalogClient::ListAllModels(absl::string_view parent,
                                                                    absl::string_view filter,
                                                                    absl::string_view order_by) {
  std::vector<v1::Model> out;
  v1::ListModelsRequest request;
  request.set_parent(std::string(parent));
  request.set_filter(std::string(filter));
  request.set_order_by(std::string(order_by));
  request.set_page_size(1000);
  do {
    grpc::ClientContext context;
    Prepare(context);
    v1::ListModelsResponse response;
    if (grpc::Status s = stub_->ListModels(&context, request, &response); !s.ok()) {
      return FromGrpcStatus(s);
    }
    out.insert(out.end(), response.models().begin(), response.models().end());
    request.set_page_token(response.next_page_token());
  } while (!request.page_token().empty());
  return out;
}

absl::StatusOr<v1::ResolveModelPriceResponse> CatalogClient::ResolveModelPrice(
    absl::string_view model, absl::Time at) {
  grpc::ClientContext context;
  Prepare(context);
  v1::ResolveModelPriceRequest request;
  request.set_model(std::string(model));
  *request.mutable_time() =
      google::protobuf::util::TimeUtil::MicrosecondsToTimestamp(absl::ToUnixMicros(at));
  v1::ResolveModelPriceResponse response;
  if (grpc::Status s = stub_->ResolveModelPrice(&context, request, &response); !s.ok()) {
    return FromGrpcStatus(s);
  }
  return response;
}

}  // namespace modelvault::client
