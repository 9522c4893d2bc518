#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "clients/cpp/channel.h"
#include "modelvault/v1/catalog.grpc.pb.h"

namespace modelvault::client {

// A small C++ client of CatalogService: statuses instead of grpc::Status
// (with the google.rpc details as payloads), deadlines on every call, and
// List helpers that follow page tokens.
class CatalogClient final {
 public:
  // `target`: host:port or unix:PATH; every call carries options.token, over
  // TLS when options name a CA.
  static absl::StatusOr<std::unique_ptr<CatalogClient>> Connect(
      const std::string& target, const ChannelOptions& options,
      absl::Duration deadline = absl::Seconds(10));
  explicit CatalogClient(std::shared_ptr<grpc::Channel> channel,
                         absl::Duration deadline = absl::Seconds(10));

  absl::StatusOr<v1::Model> GetModel(absl::string_view name);
  absl::StatusOr<v1::Provider> GetProvider(absl::string_view name);
  // Every provider matching `filter`, following page tokens.
  absl::StatusOr<std::vector<v1::Provider>> ListAllProviders(absl::string_view filter = "");
  // Every model under `parent` ("providers/-" for all) matching `filter`.
  absl::StatusOr<std::vector<v1::Model>> ListAllModels(absl::string_view parent,
                                                       absl::string_view filter = "",
                                                       absl::string_view order_by = "");
  absl::StatusOr<v1::ResolveModelPriceResponse> ResolveModelPrice(absl::string_view model,
                                                                  absl::Time at);

  v1::CatalogService::Stub& stub() { return *stub_; }

 private:
  void Prepare(grpc::ClientContext& context) const;

  std::unique_ptr<v1::CatalogService::Stub> stub_;
  absl::Duration deadline_;
};

}  // namespace modelvault::client
