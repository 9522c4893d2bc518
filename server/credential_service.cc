#include "server/credential_service.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "server/validation.h"

namespace modelvault::server {
namespace {

constexpr absl::string_view kService = "/modelvault.v1.CredentialService/";
constexpr absl::Duration kDefaultGrace = absl::Minutes(5);
constexpr absl::Duration kMaxGrace = absl::Hours(24 * 7);

const storage::ResourceSchema& Schema(const google::protobuf::Descriptor* d) {
  return *storage::SchemaRegistry::Default().ForMessage(d);
}

// Checks a resource-name field of a request.
void CheckName(const google::protobuf::Descriptor* type, absl::string_view field,
               absl::string_view value, bool required, std::vector<FieldViolation>& out) {
  if (value.empty()) {
    if (required) out.push_back({std::string(field), "is required"});
    return;
  }
  if (auto p = Schema(type).ParentOf(value); !p.ok()) {
    out.push_back({std::string(field), std::string(p.status().message())});
  }
}

absl::Status DurationField(const google::protobuf::Duration& d, bool set, absl::string_view field,
                           absl::Duration fallback, absl::Duration max, absl::Duration& out) {
  if (!set) {
    out = fallback;
    return absl::OkStatus();
  }
  out = absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
  if (out < absl::ZeroDuration() || out > max) {
    return InvalidField(std::string(field),
                        absl::StrCat("must be between 0s and ", absl::FormatDuration(max)));
  }
  return absl::OkStatus();
}

}  // namespace

CredentialService::CredentialService(ResourceMethods& methods, ProviderKeyStore& keys,
                                     KeyPool& pool, CallGate& gate, std::string secret_file_dir)
    : methods_(methods),
      keys_(keys),
      pool_(pool),
      gate_(gate),
      secret_file_dir_(std::move(secret_file_dir)) {}

absl::Status CredentialService::Describe(const std::vector<v1::ProviderKey*>& keys) {
  const absl::Time now = pool_.Now();
  const std::string day = pool_.DayOf(now);
  if (absl::Status s = keys_.Describe(keys, day, now); !s.ok()) return s;
  for (v1::ProviderKey* key : keys) {
    // Counted here but not flushed yet: part of the answer.
    v1::KeyUsage local = pool_.Unflushed(key->name(), day);
    v1::KeyUsage* usage = key->mutable_usage();
    usage->set_requests(usage->requests() + local.requests());
    usage->set_tokens(usage->tokens() + local.tokens());
    if (local.has_last_used_time() &&
        (!usage->has_last_used_time() || usage->last_used_time() < local.last_used_time())) {
      *usage->mutable_last_used_time() = local.last_used_time();
    }
  }
  return absl::OkStatus();
}

CredentialService::Reactor* CredentialService::CreateProviderKey(
    Ctx* c, const v1::CreateProviderKeyRequest* r, v1::ProviderKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    const SecretInput input{r->secret(), r->secret_reference()};
    if (absl::Status s = ValidateSecretInput(input, "secret", "secret_reference", secret_file_dir_);
        !s.ok()) {
      return s;
    }
    CreateCall call{r,
                    r->parent(),
                    true,
                    r->provider_key_id(),
                    "provider_key_id",
                    &r->provider_key(),
                    "provider_key",
                    r->request_id(),
                    caller.principal,
                    [&](storage::MutationContext ctx, const google::protobuf::Message& key) {
                      return keys_.Create(std::move(ctx), static_cast<const v1::ProviderKey&>(key),
                                          input);
                    }};
    if (absl::Status s = methods_.Create(call, o); !s.ok()) return s;
    pool_.Invalidate(o->name());
    return Describe({o});
  });
}

CredentialService::Reactor* CredentialService::GetProviderKey(Ctx* c,
                                                              const v1::GetProviderKeyRequest* r,
                                                              v1::ProviderKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    if (absl::Status s = methods_.Get(v1::ProviderKey::descriptor(), r->name(), o); !s.ok()) {
      return s;
    }
    return Describe({o});
  });
}

CredentialService::Reactor* CredentialService::ListProviderKeys(
    Ctx* c, const v1::ListProviderKeysRequest* r, v1::ListProviderKeysResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    absl::Status s =
        methods_.List(ListCall{v1::ProviderKey::descriptor(), r->parent(), true, r->page_size(),
                               r->page_token(), r->filter(), r->order_by()},
                      o);
    if (!s.ok()) return s;
    std::vector<v1::ProviderKey*> keys;
    for (v1::ProviderKey& key : *o->mutable_provider_keys()) keys.push_back(&key);
    return Describe(keys);
  });
}

CredentialService::Reactor* CredentialService::UpdateProviderKey(
    Ctx* c, const v1::UpdateProviderKeyRequest* r, v1::ProviderKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    absl::Status s =
        methods_.Update(UpdateCall{r, &r->provider_key(), "provider_key", &r->update_mask(),
                                   r->request_id(), caller.principal},
                        o);
    if (!s.ok()) return s;
    pool_.Invalidate(o->name());
    return Describe({o});
  });
}

CredentialService::Reactor* CredentialService::DeleteProviderKey(
    Ctx* c, const v1::DeleteProviderKeyRequest* r, google::protobuf::Empty* /*o*/) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    absl::Status s = methods_.Delete(DeleteCall{r, v1::ProviderKey::descriptor(), r->name(),
                                                r->etag(), r->request_id(), caller.principal});
    if (s.ok()) pool_.Invalidate(r->name());
    return s;
  });
}

CredentialService::Reactor* CredentialService::AcquireProviderKey(
    Ctx* c, const v1::AcquireProviderKeyRequest* r, v1::AcquireProviderKeyResponse* o) {
  std::vector<FieldViolation> violations;
  CheckName(v1::Provider::descriptor(), "provider", r->provider(), true, violations);
  CheckName(v1::ProviderKey::descriptor(), "key", r->key(), false, violations);
  if (!r->key().empty() && !absl::StartsWith(r->key(), absl::StrCat(r->provider(), "/keys/"))) {
    violations.push_back({"key", absl::StrCat("must be a key of ", r->provider())});
  }
  if (r->estimated_tokens() < 0) violations.push_back({"estimated_tokens", "must not be negative"});
  if (r->secret_version() < 0) violations.push_back({"secret_version", "must not be negative"});
  if (r->secret_version() > 0 && r->key().empty()) {
    violations.push_back({"secret_version", "needs `key`"});
  }
  absl::Status invalid = ToStatus(std::move(violations));
  return gate_.InlineOr(
      c, kService, __func__,
      [=, this](const Caller&) -> std::optional<absl::Status> {
        if (!invalid.ok()) return invalid;
        // Unknown providers never reach the pool (which keeps an entry per provider).
        if (!methods_.Exists(v1::Provider::descriptor(), r->provider())) {
          return WithResourceInfo(
              absl::NotFoundError(absl::StrCat(r->provider(), " does not exist")),
              "modelvault.dev/Provider", r->provider());
        }
        auto acquired = pool_.TryAcquire(*r);
        if (!acquired.has_value()) return std::nullopt;
        if (!acquired->ok()) return acquired->status();
        *o = **std::move(acquired);
        return absl::OkStatus();
      },
      [=, this](const Caller&) -> absl::Status {
        absl::StatusOr<v1::AcquireProviderKeyResponse> acquired = pool_.Acquire(*r);
        if (!acquired.ok()) return acquired.status();
        *o = *std::move(acquired);
        return absl::OkStatus();
      });
}

CredentialService::Reactor* CredentialService::ReportKeyOutcome(
    Ctx* c, const v1::ReportKeyOutcomeRequest* r, v1::ReportKeyOutcomeResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    std::vector<FieldViolation> violations;
    CheckName(v1::ProviderKey::descriptor(), "key", r->key(), true, violations);
    if (r->outcome() == v1::KEY_OUTCOME_UNSPECIFIED || !v1::KeyOutcome_IsValid(r->outcome())) {
      violations.push_back({"outcome", "is required"});
    }
    if (r->tokens_used() < 0) violations.push_back({"tokens_used", "must not be negative"});
    if (r->estimated_tokens() < 0) {
      violations.push_back({"estimated_tokens", "must not be negative"});
    }
    if (r->retry_after().seconds() < 0 || r->retry_after().nanos() < 0) {
      violations.push_back({"retry_after", "must not be negative"});
    }
    if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
    absl::StatusOr<v1::KeyHealth> health = pool_.Report(*r);
    if (!health.ok()) return health.status();
    *o->mutable_health() = *std::move(health);
    return absl::OkStatus();
  });
}

CredentialService::Reactor* CredentialService::RotateProviderKey(
    Ctx* c, const v1::RotateProviderKeyRequest* r, v1::ProviderKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    std::vector<FieldViolation> violations;
    CheckName(v1::ProviderKey::descriptor(), "name", r->name(), true, violations);
    ValidateRequestId(r->request_id(), violations);
    if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
    const SecretInput input{r->secret(), r->secret_reference()};
    if (absl::Status s = ValidateSecretInput(input, "secret", "secret_reference", secret_file_dir_);
        !s.ok()) {
      return s;
    }
    absl::Duration grace;
    if (absl::Status s = DurationField(r->grace_period(), r->has_grace_period(), "grace_period",
                                       kDefaultGrace, kMaxGrace, grace);
        !s.ok()) {
      return s;
    }
    storage::MutationContext ctx = methods_.Context(*r, r->request_id(), caller.principal);
    absl::StatusOr<storage::MutationResult> result =
        keys_.Rotate(std::move(ctx), r->name(), r->etag(), input, grace);
    if (!result.ok()) return result.status();
    methods_.Publish(r->name(), *result);
    pool_.Invalidate(r->name());
    o->CopyFrom(*result->resource);
    return Describe({o});
  });
}

CredentialService::Reactor* CredentialService::RewrapSecrets(Ctx* c,
                                                             const v1::RewrapSecretsRequest* r,
                                                             v1::RewrapSecretsResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    if (r->batch_size() < 0 || r->batch_size() > 1000) {
      return InvalidField("batch_size", "must be between 0 and 1000");
    }
    absl::StatusOr<ProviderKeyStore::RewrapResult> result =
        keys_.Rewrap(r->batch_size() == 0 ? 100 : r->batch_size());
    if (!result.ok()) return result.status();
    o->set_master_key_version(keys_.master_keys().current_version());
    o->set_rewrapped(result->rewrapped);
    o->set_unchanged(result->unchanged);
    for (const std::string& f : result->failed) o->add_failed(f);
    // The audit trail records who rewrapped, and to which version (no secrets).
    return methods_.store().datastore().ReadWriteTx([&](storage::ReadWriteTx& tx) {
      storage::ChangeRecord record;
      record.time = absl::Now();
      record.resource_type = "modelvault.dev/SecretStore";
      record.resource_name = "secrets";
      record.change_type = "UPDATED";
      record.principal = caller.principal;
      record.resource_json = absl::StrCat("{\"masterKeyVersion\":", o->master_key_version(),
                                          ",\"rewrapped\":", o->rewrapped(), "}");
      return tx.AppendChange(record);
    });
  });
}

}  // namespace modelvault::server
