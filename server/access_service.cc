#include "server/access_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "server/crypto/access_token.h"
#include "server/proto_time.h"
#include "server/validation.h"

namespace modelvault::server {
namespace {

using google::protobuf::util::TimeUtil;

constexpr absl::string_view kService = "/modelvault.v1.AccessService/";
constexpr absl::Duration kDefaultGrace = absl::Hours(1);
constexpr absl::Duration kMaxGrace = absl::Hours(24 * 30);

absl::Status CheckKeyName(absl::string_view name) {
  if (name.empty()) return InvalidField("name", "is required");
  if (!absl::StartsWith(name, "accessKeys/") ||
      !storage::IsValidResourceId(name.substr(std::strlen("accessKeys/")))) {
    return InvalidField("name", "must be accessKeys/{access_key}");
  }
  // Ids are issued by the server in one shape; any other cannot exist.
  const absl::string_view id = name.substr(std::strlen("accessKeys/"));
  const bool issued =
      id.size() == crypto::kAccessKeyIdLength && std::ranges::all_of(id, [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
      });
  if (!issued) {
    return WithResourceInfo(absl::NotFoundError(absl::StrCat(name, " does not exist")),
                            "modelvault.dev/AccessKey", name);
  }
  return absl::OkStatus();
}

// Writes `text` to a new file of mode 0600 (replacing an older one).
absl::Status WriteSecretFile(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp");
  ::unlink(tmp.c_str());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
  }
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                  ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    return absl::FailedPreconditionError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace

void CheckAccessKey(const google::protobuf::Message& message, absl::string_view prefix,
                    std::vector<FieldViolation>& out) {
  const auto& key = static_cast<const v1::AccessKey&>(message);
  std::set<int> seen;
  for (int i = 0; i < key.scopes_size(); ++i) {
    const int s = key.scopes(i);
    if (s == v1::SCOPE_UNSPECIFIED || !v1::Scope_IsValid(s)) {
      out.push_back({absl::StrCat(prefix, "scopes[", i, "]"), "is not a known scope"});
    } else if (!seen.insert(s).second) {
      out.push_back({absl::StrCat(prefix, "scopes[", i, "]"), "is listed twice"});
    }
  }
  if (!key.owner().empty() && !absl::StartsWith(key.owner(), "user:") &&
      !absl::StartsWith(key.owner(), "service:")) {
    out.push_back({absl::StrCat(prefix, "owner"), "must be user:<id> or service:<name>"});
  }
}

absl::StatusOr<storage::MutationResult> InsertAccessKey(
    storage::ResourceStore& store, Authenticator& auth, storage::MutationContext ctx,
    const v1::AccessKey& key, std::string* token,
    const std::function<absl::Status(const std::string& token)>& with_token) {
  const std::string id = crypto::NewAccessKeyId();
  std::string fresh = crypto::NewAccessToken(id);
  const std::string hash = auth.Hash(fresh);
  absl::StatusOr<crypto::ParsedToken> parsed = crypto::ParseAccessToken(fresh);
  if (!parsed.ok()) return absl::InternalError("generated token does not parse");
  v1::AccessKey row = key;
  row.set_name(absl::StrCat("accessKeys/", id));
  row.set_token_prefix(parsed->prefix);
  auto previous_finish = std::move(ctx.finish);
  ctx.finish = [&](storage::ReadWriteTx& tx, const google::protobuf::Message& written) {
    if (previous_finish) {
      if (absl::Status s = previous_finish(tx, written); !s.ok()) return s;
    }
    if (with_token) {
      if (absl::Status s = with_token(fresh); !s.ok()) return s;
    }
    return tx.Exec("UPDATE access_keys SET token_hash = :p0 WHERE name = :p1", {hash, row.name()})
        .status();
  };
  absl::StatusOr<storage::MutationResult> result = store.Create(ctx, row);
  if (!result.ok()) return result.status();
  if (!result->replayed) {
    auth.SetHashes(row.name(), hash, "");
    *token = std::move(fresh);
  } else {
    token->clear();  // the token existed only in the first response
  }
  return result;
}

absl::StatusOr<bool> BootstrapAdminKey(storage::ResourceStore& store, Authenticator& auth,
                                       const std::string& path) {
  storage::MutationContext ctx;
  ctx.principal = "bootstrap";
  ctx.now = absl::Now();
  bool created = false;
  // A marker row makes concurrent replicas agree on one creator.
  ctx.prepare = [&](storage::ReadWriteTx& tx, google::protobuf::Message&) -> absl::Status {
    created = false;  // the transaction may run again
    absl::StatusOr<std::vector<storage::SqlRow>> count =
        tx.Query("SELECT COUNT(*) FROM access_keys", {}, {storage::SqlType::kInt64});
    if (!count.ok()) return count.status();
    if (storage::CellInt(count->front()[0]) > 0) return absl::AlreadyExistsError("keys exist");
    absl::StatusOr<std::int64_t> n = tx.Exec(
        "INSERT INTO server_secrets (name, value, create_time) VALUES ('bootstrap_admin_key', "
        "'', :p0) ON CONFLICT (name) DO NOTHING",
        {absl::ToUnixMicros(ctx.now)});
    if (!n.ok()) return n.status();
    if (*n == 0) return absl::AlreadyExistsError("bootstrapped by another replica");
    created = true;
    return absl::OkStatus();
  };
  v1::AccessKey key;
  key.set_display_name("bootstrap admin key");
  key.set_owner("service:bootstrap");
  key.add_scopes(v1::SCOPE_ADMIN);
  // The token reaches the disk before the key commits: a key whose token was
  // never written would lock everyone out (bootstrap runs only on an empty table).
  const std::string pending = absl::StrCat(path, ".new");
  std::string token;
  absl::StatusOr<storage::MutationResult> result = InsertAccessKey(
      store, auth, ctx, key, &token,
      [&](const std::string& fresh) { return WriteSecretFile(pending, fresh + "\n"); });
  if (absl::IsAlreadyExists(result.status()) && !created) {
    ::unlink(pending.c_str());
    return false;
  }
  if (!result.ok()) {
    ::unlink(pending.c_str());
    return result.status();
  }
  if (::rename(pending.c_str(), path.c_str()) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the admin key is in ", pending, " but cannot be renamed to ", path));
  }
  return true;
}

AccessService::AccessService(ResourceMethods& methods, Authenticator& auth, CallGate& gate)
    : methods_(methods), auth_(auth), gate_(gate) {}

AccessService::Reactor* AccessService::CreateAccessKey(Ctx* c, const v1::CreateAccessKeyRequest* r,
                                                       v1::CreateAccessKeyResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    std::string token;
    CreateCall call{r,
                    "",
                    false,
                    crypto::NewAccessKeyId(),  // replaced by InsertAccessKey; validated shape
                    "",
                    &r->access_key(),
                    "access_key",
                    r->request_id(),
                    caller.principal,
                    [&](storage::MutationContext ctx, const google::protobuf::Message& key) {
                      return InsertAccessKey(methods_.store(), auth_, std::move(ctx),
                                             static_cast<const v1::AccessKey&>(key), &token);
                    }};
    if (absl::Status s = methods_.Create(call, o->mutable_access_key()); !s.ok()) return s;
    o->set_token(token);
    return absl::OkStatus();
  });
}

AccessService::Reactor* AccessService::GetAccessKey(Ctx* c, const v1::GetAccessKeyRequest* r,
                                                    v1::AccessKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    if (absl::Status s = CheckKeyName(r->name()); !s.ok()) return s;
    // From the database: last_used_time is written outside the change feed.
    auto key = methods_.store().Get(v1::AccessKey::descriptor(), r->name());
    if (!key.ok()) return key.status();
    o->CopyFrom(**key);
    return absl::OkStatus();
  });
}

AccessService::Reactor* AccessService::ListAccessKeys(Ctx* c, const v1::ListAccessKeysRequest* r,
                                                      v1::ListAccessKeysResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller&) {
    ListCall call{v1::AccessKey::descriptor(),
                  "",
                  false,
                  r->page_size(),
                  r->page_token(),
                  r->filter(),
                  r->order_by()};
    call.use_cache = false;
    return methods_.List(call, o);
  });
}

AccessService::Reactor* AccessService::UpdateAccessKey(Ctx* c, const v1::UpdateAccessKeyRequest* r,
                                                       v1::AccessKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) {
    return methods_.Update(UpdateCall{r, &r->access_key(), "access_key", &r->update_mask(),
                                      r->request_id(), caller.principal},
                           o);
  });
}

AccessService::Reactor* AccessService::RotateAccessKey(Ctx* c, const v1::RotateAccessKeyRequest* r,
                                                       v1::CreateAccessKeyResponse* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    if (absl::Status s = CheckKeyName(r->name()); !s.ok()) return s;
    absl::Duration grace = kDefaultGrace;
    if (r->has_grace_period()) {
      grace =
          absl::Seconds(r->grace_period().seconds()) + absl::Nanoseconds(r->grace_period().nanos());
      if (grace < absl::ZeroDuration() || grace > kMaxGrace) {
        return InvalidField("grace_period", "must be between 0s and 720h");
      }
    }
    const std::string id(r->name().substr(std::strlen("accessKeys/")));
    std::string token = crypto::NewAccessToken(id);
    const std::string hash = auth_.Hash(token);
    absl::StatusOr<crypto::ParsedToken> parsed = crypto::ParseAccessToken(token);
    if (!parsed.ok()) return absl::InternalError("generated token does not parse");
    storage::MutationContext ctx = methods_.Context(*r, "", caller.principal);
    std::string previous;
    ctx.prepare = [&](storage::ReadWriteTx&, google::protobuf::Message& row) -> absl::Status {
      auto& key = static_cast<v1::AccessKey&>(row);
      if (key.has_revoke_time()) {
        return absl::FailedPreconditionError(absl::StrCat(r->name(), " is revoked"));
      }
      key.set_token_prefix(parsed->prefix);
      *key.mutable_previous_token_expire_time() = ToProto(ctx.now + grace);
      return absl::OkStatus();
    };
    ctx.finish = [&](storage::ReadWriteTx& tx, const google::protobuf::Message&) -> absl::Status {
      absl::StatusOr<std::vector<storage::SqlRow>> rows =
          tx.Query("SELECT token_hash FROM access_keys WHERE name = :p0", {r->name()},
                   {storage::SqlType::kText});
      if (!rows.ok()) return rows.status();
      previous = rows->empty() ? "" : storage::CellText(rows->front()[0]);
      return tx
          .Exec(
              "UPDATE access_keys SET previous_token_hash = token_hash, token_hash = :p0 WHERE "
              "name = :p1",
              {hash, r->name()})
          .status();
    };
    v1::AccessKey patch;
    patch.set_name(r->name());
    patch.set_etag(r->etag());
    absl::StatusOr<storage::MutationResult> result = methods_.store().Update(ctx, patch, {});
    if (!result.ok()) return result.status();
    auth_.SetHashes(r->name(), hash, previous);
    methods_.Publish(r->name(), *result);
    o->mutable_access_key()->CopyFrom(*result->resource);
    o->set_token(std::move(token));
    return absl::OkStatus();
  });
}

AccessService::Reactor* AccessService::RevokeAccessKey(Ctx* c, const v1::RevokeAccessKeyRequest* r,
                                                       v1::AccessKey* o) {
  return gate_.Offload(c, kService, __func__, [=, this](const Caller& caller) -> absl::Status {
    if (absl::Status s = CheckKeyName(r->name()); !s.ok()) return s;
    std::vector<FieldViolation> violations;
    ValidateRequestId(r->request_id(), violations);
    if (absl::Status s = ToStatus(std::move(violations)); !s.ok()) return s;
    storage::MutationContext ctx = methods_.Context(*r, r->request_id(), caller.principal);
    ctx.prepare = [&](storage::ReadWriteTx&, google::protobuf::Message& row) {
      auto& key = static_cast<v1::AccessKey&>(row);
      if (!key.has_revoke_time()) *key.mutable_revoke_time() = ToProto(ctx.now);
      return absl::OkStatus();
    };
    v1::AccessKey patch;
    patch.set_name(r->name());
    patch.set_etag(r->etag());
    absl::StatusOr<storage::MutationResult> result = methods_.store().Update(ctx, patch, {});
    if (!result.ok()) return result.status();
    methods_.Publish(r->name(), *result);  // refused here from now on
    o->CopyFrom(*result->resource);
    return absl::OkStatus();
  });
}

AccessService::Reactor* AccessService::VerifyAccessKey(Ctx* c, const v1::VerifyAccessKeyRequest* r,
                                                       v1::VerifyAccessKeyResponse* o) {
  return gate_.Inline(c, kService, __func__, [=, this](const Caller&) -> absl::Status {
    if (r->token().empty()) return InvalidField("token", "is required");
    absl::StatusOr<Caller> verified = auth_.Verify(r->token());
    if (!verified.ok()) {
      o->set_valid(false);
      return absl::OkStatus();
    }
    o->set_valid(true);
    o->set_access_key(verified->principal);
    o->set_owner(verified->owner);
    for (v1::Scope s : verified->scopes) o->add_scopes(s);
    if (verified->expire_time != absl::InfiniteFuture()) {
      *o->mutable_expire_time() = ToProto(verified->expire_time);
    }
    return absl::OkStatus();
  });
}

}  // namespace modelvault::server
