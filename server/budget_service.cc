#include "server/budget_service.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "google/protobuf/util/json_util.h"
#include "modelvault/v1/access.pb.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "server/proto_time.h"
#include "server/validation.h"
#include "server/watch_reactor.h"
#include "storage/resource_store.h"
#include "storage/schema.h"

namespace modelvault::server {
namespace {

constexpr absl::string_view kService = "/modelvault.v1.BudgetService/";
constexpr absl::string_view kAlertType = "modelvault.dev/BudgetAlert";
// Per-stream buffer before a slow watcher is disconnected.
constexpr size_t kWatchQueue = 1024;
constexpr absl::Duration kDefaultTtl = absl::Minutes(5);
constexpr absl::Duration kMaxTtl = absl::Hours(24);
constexpr int kMaxThresholdPercent = 1000;

const storage::ResourceSchema& Schema(const google::protobuf::Descriptor* d) {
  return *storage::SchemaRegistry::Default().ForMessage(d);
}

// Checks an optional resource-name field against the pattern of `type`.
void CheckName(const google::protobuf::Descriptor* type, const std::string& field,
               absl::string_view value, std::vector<FieldViolation>& out) {
  if (value.empty()) return;
  if (auto p = Schema(type).ParentOf(value); !p.ok()) {
    out.push_back({field, std::string(p.status().message())});
  }
}

// An IANA zone name such as `America/New_York` or `UTC`: no paths, no
// `file:` sources and not the machine's `localtime`, which absl would load.
bool IsZoneName(absl::string_view name) {
  if (name.empty() || name.size() > 64 || name.front() == '/' || name == "localtime" ||
      absl::StrContains(name, "..") || absl::StrContains(name, "//")) {
    return false;
  }
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '/' ||
           c == '_' || c == '-' || c == '+';
  });
}

bool ToAlert(const storage::ChangeRecord& change, v1::WatchAlertsResponse& out) {
  if (change.resource_type != kAlertType || change.change_type != "CREATED") return false;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  return google::protobuf::util::JsonStringToMessage(change.resource_json, out.mutable_alert(),
                                                     options)
      .ok();
}

absl::StatusOr<std::string> ToJson(const google::protobuf::Message& m) {
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(m, &json).ok()) {
    return absl::InternalError("cannot encode a change record");
  }
  return json;
}

}  // namespace

void CheckBudget(const google::protobuf::Message& message, absl::string_view prefix,
                 std::vector<FieldViolation>& out) {
  const auto& budget = static_cast<const v1::Budget&>(message);
  const std::string scope_value = absl::StrCat(prefix, "scope_value");
  switch (budget.scope()) {
    case v1::BUDGET_SCOPE_UNSPECIFIED:  // required on create; immutable, so absent from patches
      break;
    case v1::BUDGET_SCOPE_GLOBAL:
      if (!budget.scope_value().empty()) {
        out.push_back({scope_value, "must be empty for BUDGET_SCOPE_GLOBAL"});
      }
      break;
    default:
      if (budget.scope_value().empty()) {
        out.push_back(
            {scope_value, absl::StrCat("is required for ", v1::BudgetScope_Name(budget.scope()))});
      } else if (budget.scope() == v1::BUDGET_SCOPE_ACCESS_KEY) {
        CheckName(v1::AccessKey::descriptor(), scope_value, budget.scope_value(), out);
      } else if (budget.scope() == v1::BUDGET_SCOPE_PROVIDER) {
        CheckName(v1::Provider::descriptor(), scope_value, budget.scope_value(), out);
      } else if (budget.scope() == v1::BUDGET_SCOPE_MODEL) {
        CheckName(v1::Model::descriptor(), scope_value, budget.scope_value(), out);
      }
      break;
  }
  if (!budget.time_zone().empty()) {
    absl::TimeZone zone;
    if (!IsZoneName(budget.time_zone()) || !absl::LoadTimeZone(budget.time_zone(), &zone)) {
      out.push_back({absl::StrCat(prefix, "time_zone"),
                     "is not a known IANA time zone (for example Europe/Berlin or UTC)"});
    }
  }
  std::set<int> seen;
  for (int i = 0; i < budget.alert_thresholds_percent_size(); ++i) {
    const int t = budget.alert_thresholds_percent(i);
    const std::string field = absl::StrCat(prefix, "alert_thresholds_percent[", i, "]");
    if (t < 1 || t > kMaxThresholdPercent) {
      out.push_back({field, absl::StrCat("must be between 1 and ", kMaxThresholdPercent,
                                         " percent (got ", t, ")")});
    } else if (!seen.insert(t).second) {
      out.push_back({field, absl::StrCat("repeats the threshold ", t)});
    }
  }
}

BudgetService::BudgetService(ResourceMethods& methods, BudgetLedger& ledger, ChangeHub& hub,
                             CallGate& gate, storage::Datastore& datastore)
    : methods_(methods), ledger_(ledger), hub_(hub), gate_(gate), datastore_(datastore) {
  methods_.SetHooks(v1::Budget::descriptor(), ResourceHooks{CheckBudget, nullptr});
}

absl::Status BudgetService::Describe(const std::vector<v1::Budget*>& budgets) {
  if (budgets.empty()) return absl::OkStatus();
  return datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    for (v1::Budget* budget : budgets) {
      if (absl::Status s = ledger_.FillCurrentPeriod(reader, *budget); !s.ok()) return s;
    }
    return absl::OkStatus();
  });
}

BudgetService::Reactor* BudgetService::CreateBudget(Ctx* c, const v1::CreateBudgetRequest* r,
                                                    v1::Budget* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    // Enums are always "present" to the descriptor rules: UNSPECIFIED is checked here,
    // with everything else so that one answer lists every violation.
    if (r->budget().scope() == v1::BUDGET_SCOPE_UNSPECIFIED ||
        r->budget().period() == v1::BUDGET_PERIOD_UNSPECIFIED) {
      std::vector<FieldViolation> violations;
      ValidateId("budget_id", r->budget_id(), violations);
      ValidateRequestId(r->request_id(), violations);
      if (r->budget().scope() == v1::BUDGET_SCOPE_UNSPECIFIED) {
        violations.push_back({"budget.scope", "is required"});
      }
      if (r->budget().period() == v1::BUDGET_PERIOD_UNSPECIFIED) {
        violations.push_back({"budget.period", "is required"});
      }
      ValidateMessage(r->budget(), "budget.", nullptr, violations);
      CheckBudget(r->budget(), "budget.", violations);
      return ToStatus(std::move(violations));
    }
    absl::Status s =
        methods_.Create(CreateCall{r, "", false, r->budget_id(), "budget_id", &r->budget(),
                                   "budget", r->request_id(), caller.principal, nullptr},
                        o);
    if (!s.ok()) return s;
    return Describe({o});
  });
}

BudgetService::Reactor* BudgetService::GetBudget(Ctx* c, const v1::GetBudgetRequest* r,
                                                 v1::Budget* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    if (absl::Status s = methods_.Get(v1::Budget::descriptor(), r->name(), o); !s.ok()) return s;
    return Describe({o});
  });
}

BudgetService::Reactor* BudgetService::ListBudgets(Ctx* c, const v1::ListBudgetsRequest* r,
                                                   v1::ListBudgetsResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    // current_period is computed per call: no cached pages.
    ListCall call{v1::Budget::descriptor(), "",          false,        r->page_size(),
                  r->page_token(),          r->filter(), r->order_by()};
    call.use_cache = false;
    if (absl::Status s = methods_.List(call, o); !s.ok()) return s;
    std::vector<v1::Budget*> budgets;
    for (v1::Budget& budget : *o->mutable_budgets()) budgets.push_back(&budget);
    return Describe(budgets);
  });
}

BudgetService::Reactor* BudgetService::UpdateBudget(Ctx* c, const v1::UpdateBudgetRequest* r,
                                                    v1::Budget* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    bool period_in_mask = false;
    for (const std::string& path : r->update_mask().paths()) {
      period_in_mask = period_in_mask || path == "*" || path == "period";
    }
    if (period_in_mask && r->budget().period() == v1::BUDGET_PERIOD_UNSPECIFIED) {
      return InvalidField("budget.period", "is required");
    }
    absl::Status s = methods_.Update(
        UpdateCall{r, &r->budget(), "budget", &r->update_mask(), r->request_id(), caller.principal},
        o);
    if (!s.ok()) return s;
    return Describe({o});
  });
}

absl::Status BudgetService::Delete(const v1::DeleteBudgetRequest& r, const std::string& principal) {
  const storage::ResourceSchema& budgets = Schema(v1::Budget::descriptor());
  std::vector<FieldViolation> violations;
  ValidateRequestId(r.request_id(), violations);
  if (r.name().empty()) {
    violations.push_back({"name", "is required"});
  } else if (auto p = budgets.ParentOf(r.name()); !p.ok()) {
    violations.push_back({"name", std::string(p.status().message())});
  }
  if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;

  const storage::MutationContext ctx = methods_.Context(r, r.request_id(), principal);
  std::vector<std::pair<std::string, std::int64_t>> deleted;  // name, change seq
  absl::Status status = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
    deleted.clear();
    if (!ctx.request_id.empty()) {
      absl::StatusOr<std::optional<storage::IdempotencyRecord>> found =
          tx.FindRequest(ctx.request_id);
      if (!found.ok()) return found.status();
      if (found->has_value()) {
        if ((*found)->method == ctx.method && (*found)->request_hash == ctx.request_hash) {
          return absl::OkStatus();  // done before: nothing to write or publish
        }
        return WithErrorInfo(
            InvalidField("request_id", absl::StrCat("request_id \"", ctx.request_id,
                                                    "\" was already used for a different "
                                                    "request; use a new id")),
            "REQUEST_ID_REUSED", {{"request_id", ctx.request_id}});
      }
    }
    absl::StatusOr<storage::StoredResource> stored = tx.GetForUpdate(budgets, r.name());
    if (absl::IsNotFound(stored.status())) {
      return WithResourceInfo(stored.status(), budgets.type(), r.name());
    }
    if (!stored.ok()) return stored.status();
    if (!r.etag().empty() && r.etag() != storage::EtagOf(stored->revision)) {
      return WithErrorInfo(
          absl::AbortedError(absl::StrCat(r.name(), " changed since etag ", r.etag(),
                                          " was read; get it again and retry")),
          "ETAG_MISMATCH", {{"resource", r.name()}});
    }
    // The alerts go with the budget (the generic Delete would refuse while
    // children exist); each gets its change record, so caches drop it.
    absl::StatusOr<std::vector<storage::SqlRow>> alerts = tx.Query(
        "SELECT name, revision, threshold_percent, period_start_time, spent_nanos, limit_nanos, "
        "create_time FROM budget_alerts WHERE parent = :p0 ORDER BY name",
        {storage::SqlCell(r.name())},
        {storage::SqlType::kText, storage::SqlType::kInt64, storage::SqlType::kInt64,
         storage::SqlType::kInt64, storage::SqlType::kInt64, storage::SqlType::kInt64,
         storage::SqlType::kInt64});
    if (!alerts.ok()) return alerts.status();
    if (!alerts->empty()) {
      absl::StatusOr<std::int64_t> n =
          tx.Exec("DELETE FROM budget_alerts WHERE parent = :p0", {storage::SqlCell(r.name())});
      if (!n.ok()) return n.status();
    }
    const absl::Time now = ctx.now;
    const auto record = [&](const google::protobuf::Message& resource, const std::string& type,
                            const std::string& name) -> absl::Status {
      absl::StatusOr<std::string> json = ToJson(resource);
      if (!json.ok()) return json.status();
      storage::ChangeRecord change;
      change.time = now;
      change.resource_type = type;
      change.resource_name = name;
      change.change_type = "DELETED";
      change.principal = ctx.principal;
      change.request_id = ctx.request_id;
      change.resource_json = *std::move(json);
      if (absl::Status s = tx.AppendChange(change); !s.ok()) return s;
      deleted.emplace_back(name, change.seq);
      return absl::OkStatus();
    };
    for (const storage::SqlRow& row : *alerts) {
      v1::BudgetAlert alert;
      alert.set_name(storage::CellText(row[0]));
      alert.set_threshold_percent(static_cast<std::int32_t>(storage::CellInt(row[2])));
      if (row[3].has_value()) {
        *alert.mutable_period_start_time() =
            ToProto(absl::FromUnixMicros(storage::CellInt(row[3])));
      }
      alert.set_spent_nanos(storage::CellInt(row[4]));
      alert.set_limit_nanos(storage::CellInt(row[5]));
      if (row[6].has_value()) {
        *alert.mutable_create_time() = ToProto(absl::FromUnixMicros(storage::CellInt(row[6])));
      }
      alert.set_etag(storage::EtagOf(storage::CellInt(row[1])));
      if (absl::Status s = record(alert, std::string(kAlertType), alert.name()); !s.ok()) return s;
    }
    // Spend rows and holds follow by ON DELETE CASCADE.
    if (absl::Status s = tx.Delete(budgets, r.name(), stored->revision); !s.ok()) return s;
    auto& budget = static_cast<v1::Budget&>(*stored->message);
    budget.set_etag(storage::EtagOf(stored->revision));
    if (absl::Status s = record(budget, budgets.type(), r.name()); !s.ok()) return s;
    if (ctx.request_id.empty()) return absl::OkStatus();
    return tx.SaveRequest(
        storage::IdempotencyRecord{ctx.request_id, ctx.method, ctx.request_hash, ""});
  });
  if (!status.ok()) return status;
  for (const auto& [name, seq] : deleted) {
    storage::MutationResult result;
    result.change_seq = seq;
    methods_.Publish(name, result);
  }
  return absl::OkStatus();
}

BudgetService::Reactor* BudgetService::DeleteBudget(Ctx* c, const v1::DeleteBudgetRequest* r,
                                                    google::protobuf::Empty* /*o*/) {
  return gate_.Offload(c, kService, __func__,
                       [=, this](const Caller& caller) { return Delete(*r, caller.principal); });
}

BudgetService::Reactor* BudgetService::ReserveBudget(Ctx* c, const v1::ReserveBudgetRequest* r,
                                                     v1::Reservation* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    std::vector<FieldViolation> violations;
    if (!r->has_scopes()) violations.push_back({"scopes", "is required"});
    const v1::UsageScopes& in = r->scopes();
    if (!IsValidUtf8(in.user()) || in.user().size() > 256) {
      violations.push_back({"scopes.user", "must be at most 256 bytes of UTF-8"});
    }
    CheckName(v1::AccessKey::descriptor(), "scopes.access_key", in.access_key(), violations);
    CheckName(v1::Provider::descriptor(), "scopes.provider", in.provider(), violations);
    CheckName(v1::Model::descriptor(), "scopes.model", in.model(), violations);
    if (r->estimated_cost_nanos() < 0) {
      violations.push_back({"estimated_cost_nanos", "must not be negative"});
    }
    absl::Duration ttl = kDefaultTtl;
    if (r->has_ttl()) {
      ttl = absl::Seconds(r->ttl().seconds()) + absl::Nanoseconds(r->ttl().nanos());
      if (ttl <= absl::ZeroDuration() || ttl > kMaxTtl) {
        violations.push_back({"ttl", absl::StrCat("must be more than 0s and at most ",
                                                  absl::FormatDuration(kMaxTtl))});
      }
    }
    ValidateRequestId(r->request_id(), violations);
    if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
    v1::UsageScopes scopes = in;
    // The usage record of the planned call will carry the caller's key.
    if (scopes.access_key().empty()) scopes.set_access_key(caller.principal);
    const storage::MutationContext ctx = methods_.Context(*r, r->request_id(), caller.principal);
    absl::StatusOr<v1::Reservation> reservation =
        ledger_.Reserve(datastore_, scopes, r->estimated_cost_nanos(), ttl, &ctx);
    if (!reservation.ok()) return reservation.status();
    *o = *std::move(reservation);
    return absl::OkStatus();
  });
}

BudgetService::Reactor* BudgetService::ReleaseReservation(Ctx* c,
                                                          const v1::ReleaseReservationRequest* r,
                                                          v1::Reservation* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    absl::string_view id = r->name();
    if (r->name().empty()) return InvalidField("name", "is required");
    if (!absl::ConsumePrefix(&id, "reservations/") || !storage::IsValidResourceId(id)) {
      return InvalidField("name", "must be reservations/{reservation}");
    }
    absl::StatusOr<v1::Reservation> released = ledger_.Release(datastore_, r->name());
    if (!released.ok()) return released.status();
    *o = *std::move(released);
    return absl::OkStatus();
  });
}

BudgetService::Reactor* BudgetService::ListAlerts(Ctx* c, const v1::ListAlertsRequest* r,
                                                  v1::ListAlertsResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    return methods_.List(ListCall{v1::BudgetAlert::descriptor(), r->parent(), true, r->page_size(),
                                  r->page_token(), r->filter(), "create_time desc"},
                         o);
  });
}

grpc::ServerWriteReactor<v1::WatchAlertsResponse>* BudgetService::WatchAlerts(
    Ctx* c, const v1::WatchAlertsRequest* r) {
  auto reactor = WatchReactor<v1::WatchAlertsResponse>::Create(
      kWatchQueue, ToAlert, [](absl::Time now, v1::WatchAlertsResponse& out) {
        *out.mutable_checkpoint()->mutable_time() = ToProto(now);
      });
  return StartWatch(reactor, gate_.AuthorizeStream(c, kService, __func__), r->cursor(),
                    r->checkpoint_interval_seconds(), hub_);
}

}  // namespace modelvault::server
