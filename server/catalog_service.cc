#include "server/catalog_service.h"

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "server/grpc_status.h"
#include "server/proto_time.h"
#include "server/watch_reactor.h"

namespace modelvault::server {
namespace {

using google::protobuf::util::TimeUtil;

// Per-stream buffer before a slow watcher is disconnected.
constexpr size_t kWatchQueue = 1024;
constexpr int kMaxPrices = 64;
constexpr absl::string_view kService = "/modelvault.v1.CatalogService/";

bool ToCatalogChange(const storage::ChangeRecord& change, v1::WatchCatalogResponse& out) {
  v1::CatalogChange* c = out.mutable_change();
  google::protobuf::Message* target = nullptr;
  if (change.resource_type == "modelvault.dev/Provider") {
    target = c->mutable_provider();
  } else if (change.resource_type == "modelvault.dev/ModelFamily") {
    target = c->mutable_model_family();
  } else if (change.resource_type == "modelvault.dev/Model") {
    target = c->mutable_model();
  } else {
    return false;  // not a catalog change
  }
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage(change.resource_json, target, options).ok()) {
    return false;
  }
  c->set_type(change.change_type == "CREATED"   ? v1::CHANGE_TYPE_CREATED
              : change.change_type == "UPDATED" ? v1::CHANGE_TYPE_UPDATED
                                                : v1::CHANGE_TYPE_DELETED);
  c->set_resource_name(change.resource_name);
  *c->mutable_time() = ToProto(change.time);
  return true;
}

}  // namespace

void CheckModel(const google::protobuf::Message& message, absl::string_view prefix,
                std::vector<FieldViolation>& out) {
  const auto& model = static_cast<const v1::Model&>(message);
  if (!model.family().empty()) {
    // providers/{p}/models/{m} and providers/{p}/modelFamilies/{f}
    const std::string provider = model.name().substr(0, model.name().find("/models/"));
    if (!absl::StartsWith(model.family(), provider + "/modelFamilies/")) {
      out.push_back(
          {absl::StrCat(prefix, "family"), absl::StrCat("must be a model family of ", provider)});
    }
  }
  if (model.prices_size() > kMaxPrices) {
    out.push_back(
        {absl::StrCat(prefix, "prices"), absl::StrCat("holds at most ", kMaxPrices, " entries")});
  }
  std::set<std::pair<std::int64_t, std::int32_t>> seen;
  for (int i = 0; i < model.prices_size(); ++i) {
    const auto& t = model.prices(i).effective_time();
    if (!seen.insert({t.seconds(), t.nanos()}).second) {
      out.push_back({absl::StrCat(prefix, "prices[", i, "].effective_time"),
                     "two prices have the same effective_time"});
    }
  }
}

absl::StatusOr<v1::ModelPrice> PriceAt(const v1::Model& model, absl::Time time) {
  const v1::ModelPrice* best = nullptr;
  const auto at = ToProto(time);
  for (const v1::ModelPrice& p : model.prices()) {
    if (p.effective_time() <= at &&
        (best == nullptr || p.effective_time() > best->effective_time())) {
      best = &p;
    }
  }
  if (best == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(model.name(), " has no price in force at ",
                     absl::FormatTime(absl::RFC3339_full, time, absl::UTCTimeZone())));
  }
  return *best;
}

CatalogService::CatalogService(ResourceMethods& methods, ChangeHub& hub, CallGate& gate)
    : methods_(methods), hub_(hub), gate_(gate) {}

CatalogService::Reactor* CatalogService::List(Ctx* c, const char* method, ListCall call,
                                              google::protobuf::Message* o) {
  // A repeated query is answered from memory while nothing changed.
  return gate_.InlineOr(
      c, kService, method,
      [this, call, o](const Caller&) { return methods_.ListFromCache(call, o); },
      [this, call, o](const Caller&) { return methods_.List(call, o); });
}

// --- Providers ---

CatalogService::Reactor* CatalogService::CreateProvider(Ctx* c, const v1::CreateProviderRequest* r,
                                                        v1::Provider* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Create(CreateCall{r, "", false, r->provider_id(), "provider_id", &r->provider(),
                                      "provider", r->request_id(), caller.principal, nullptr},
                           o);
  });
}

CatalogService::Reactor* CatalogService::GetProvider(Ctx* c, const v1::GetProviderRequest* r,
                                                     v1::Provider* o) {
  return gate_.Inline(c, kService, __func__, [=, this](const Caller&) {
    return methods_.Get(v1::Provider::descriptor(), r->name(), o);
  });
}

CatalogService::Reactor* CatalogService::ListProviders(Ctx* c, const v1::ListProvidersRequest* r,
                                                       v1::ListProvidersResponse* o) {
  return List(c, __func__,
              ListCall{v1::Provider::descriptor(), "", false, r->page_size(), r->page_token(),
                       r->filter(), r->order_by()},
              o);
}

CatalogService::Reactor* CatalogService::UpdateProvider(Ctx* c, const v1::UpdateProviderRequest* r,
                                                        v1::Provider* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Update(UpdateCall{r, &r->provider(), "provider", &r->update_mask(),
                                      r->request_id(), caller.principal},
                           o);
  });
}

CatalogService::Reactor* CatalogService::DeleteProvider(Ctx* c, const v1::DeleteProviderRequest* r,
                                                        google::protobuf::Empty* /*response*/) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Delete(DeleteCall{r, v1::Provider::descriptor(), r->name(), r->etag(),
                                      r->request_id(), caller.principal});
  });
}

// --- Model families ---

CatalogService::Reactor* CatalogService::CreateModelFamily(Ctx* c,
                                                           const v1::CreateModelFamilyRequest* r,
                                                           v1::ModelFamily* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Create(
        CreateCall{r, r->parent(), true, r->model_family_id(), "model_family_id",
                   &r->model_family(), "model_family", r->request_id(), caller.principal, nullptr},
        o);
  });
}

CatalogService::Reactor* CatalogService::GetModelFamily(Ctx* c, const v1::GetModelFamilyRequest* r,
                                                        v1::ModelFamily* o) {
  return gate_.Inline(c, kService, __func__, [=, this](const Caller&) {
    return methods_.Get(v1::ModelFamily::descriptor(), r->name(), o);
  });
}

CatalogService::Reactor* CatalogService::ListModelFamilies(Ctx* c,
                                                           const v1::ListModelFamiliesRequest* r,
                                                           v1::ListModelFamiliesResponse* o) {
  return List(c, __func__,
              ListCall{v1::ModelFamily::descriptor(), r->parent(), true, r->page_size(),
                       r->page_token(), r->filter(), r->order_by()},
              o);
}

CatalogService::Reactor* CatalogService::UpdateModelFamily(Ctx* c,
                                                           const v1::UpdateModelFamilyRequest* r,
                                                           v1::ModelFamily* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Update(UpdateCall{r, &r->model_family(), "model_family", &r->update_mask(),
                                      r->request_id(), caller.principal},
                           o);
  });
}

CatalogService::Reactor* CatalogService::DeleteModelFamily(Ctx* c,
                                                           const v1::DeleteModelFamilyRequest* r,
                                                           google::protobuf::Empty* /*response*/) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Delete(DeleteCall{r, v1::ModelFamily::descriptor(), r->name(), r->etag(),
                                      r->request_id(), caller.principal});
  });
}

// --- Models ---

CatalogService::Reactor* CatalogService::CreateModel(Ctx* c, const v1::CreateModelRequest* r,
                                                     v1::Model* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Create(CreateCall{r, r->parent(), true, r->model_id(), "model_id", &r->model(),
                                      "model", r->request_id(), caller.principal, nullptr},
                           o);
  });
}

CatalogService::Reactor* CatalogService::GetModel(Ctx* c, const v1::GetModelRequest* r,
                                                  v1::Model* o) {
  return gate_.Inline(c, kService, __func__, [=, this](const Caller&) {
    return methods_.Get(v1::Model::descriptor(), r->name(), o);
  });
}

CatalogService::Reactor* CatalogService::ListModels(Ctx* c, const v1::ListModelsRequest* r,
                                                    v1::ListModelsResponse* o) {
  return List(c, __func__,
              ListCall{v1::Model::descriptor(), r->parent(), true, r->page_size(), r->page_token(),
                       r->filter(), r->order_by()},
              o);
}

CatalogService::Reactor* CatalogService::UpdateModel(Ctx* c, const v1::UpdateModelRequest* r,
                                                     v1::Model* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Update(
        UpdateCall{r, &r->model(), "model", &r->update_mask(), r->request_id(), caller.principal},
        o);
  });
}

CatalogService::Reactor* CatalogService::DeleteModel(Ctx* c, const v1::DeleteModelRequest* r,
                                                     google::protobuf::Empty* /*response*/) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Delete(DeleteCall{r, v1::Model::descriptor(), r->name(), r->etag(),
                                      r->request_id(), caller.principal});
  });
}

CatalogService::Reactor* CatalogService::ResolveModelPrice(Ctx* c,
                                                           const v1::ResolveModelPriceRequest* r,
                                                           v1::ResolveModelPriceResponse* o) {
  return gate_.Inline(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    v1::Model model;
    if (absl::Status s = methods_.Get(v1::Model::descriptor(), r->model(), &model); !s.ok()) {
      if (absl::IsInvalidArgument(s)) s = InvalidField("model", std::string(s.message()));
      return s;
    }
    const absl::Time at = r->has_time()
                              ? absl::FromUnixMicros(TimeUtil::TimestampToMicroseconds(r->time()))
                              : absl::Now();
    absl::StatusOr<v1::ModelPrice> price = PriceAt(model, at);
    if (!price.ok()) return price.status();
    o->set_model(model.name());
    *o->mutable_price() = *std::move(price);
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<v1::WatchCatalogResponse>* CatalogService::WatchCatalog(
    Ctx* c, const v1::WatchCatalogRequest* r) {
  auto reactor = WatchReactor<v1::WatchCatalogResponse>::Create(
      kWatchQueue, ToCatalogChange, [](absl::Time now, v1::WatchCatalogResponse& out) {
        *out.mutable_checkpoint()->mutable_time() = ToProto(now);
      });
  return StartWatch(reactor, gate_.AuthorizeStream(c, kService, __func__), r->cursor(),
                    r->checkpoint_interval_seconds(), hub_);
}

}  // namespace modelvault::server
