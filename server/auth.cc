#include "server/auth.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "server/crypto/access_token.h"
#include "server/proto_time.h"
#include "server/scopes.h"
#include "storage/status_details.h"

namespace modelvault::server {
namespace {

using google::protobuf::util::TimeUtil;

constexpr absl::string_view kAccessKeyType = "modelvault.dev/AccessKey";

// One message for every token that does not verify, so that a caller cannot
// tell an unknown key id from a wrong secret.
absl::Status InvalidToken() {
  return WithErrorInfo(absl::UnauthenticatedError("the access key is not valid"),
                       "INVALID_ACCESS_KEY");
}

}  // namespace

bool Grants(const std::vector<v1::Scope>& scopes, v1::Scope required) {
  return std::ranges::any_of(scopes, [required](v1::Scope s) {
    return s == required || s == v1::SCOPE_ADMIN ||
           (s == v1::SCOPE_CATALOG_WRITE && required == v1::SCOPE_CATALOG_READ) ||
           (s == v1::SCOPE_CREDENTIALS_WRITE && required == v1::SCOPE_CREDENTIALS_READ) ||
           (s == v1::SCOPE_BUDGETS_WRITE && required == v1::SCOPE_BUDGETS_READ);
  });
}

Authenticator::Authenticator(storage::Datastore& datastore, CatalogCache& cache, std::string pepper,
                             std::function<absl::Time()> clock)
    : datastore_(datastore), cache_(cache), pepper_(std::move(pepper)), clock_(std::move(clock)) {
  for (const std::string& method : AllMethods()) {
    absl::StatusOr<v1::Scope> scope = RequiredScope(method);
    // A method without a scope is refused to everyone (and fails scopes_test).
    method_scopes_[method] = scope.ok() ? *scope : v1::SCOPE_UNSPECIFIED;
  }
}

std::string Authenticator::Hash(absl::string_view token) const {
  return crypto::HashAccessToken(pepper_, token);
}

absl::Status Authenticator::Load() {
  absl::flat_hash_map<std::string, Hashes> loaded;
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<storage::SqlRow>> rows =
        reader.Query("SELECT name, token_hash, previous_token_hash FROM access_keys", {},
                     {storage::SqlType::kText, storage::SqlType::kText, storage::SqlType::kText});
    if (!rows.ok()) return rows.status();
    for (const storage::SqlRow& row : *rows) {
      loaded[storage::CellText(row[0])] = {storage::CellText(row[1]), storage::CellText(row[2])};
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  std::lock_guard lock(mu_);
  hashes_ = std::move(loaded);
  hashes_version_.fetch_add(1, std::memory_order_acq_rel);
  return absl::OkStatus();
}

void Authenticator::OnChange(const storage::ChangeRecord& change) {
  if (change.resource_type != kAccessKeyType) return;
  if (change.change_type == "DELETED") {
    std::lock_guard lock(mu_);
    hashes_.erase(change.resource_name);
    hashes_version_.fetch_add(1, std::memory_order_acq_rel);
    return;
  }
  Reload(change.resource_name);
}

void Authenticator::Reload(const std::string& name) {
  Hashes found;
  bool exists = false;
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<storage::SqlRow>> rows =
        reader.Query("SELECT token_hash, previous_token_hash FROM access_keys WHERE name = :p0",
                     {name}, {storage::SqlType::kText, storage::SqlType::kText});
    if (!rows.ok()) return rows.status();
    if (!rows->empty()) {
      exists = true;
      found = {storage::CellText(rows->front()[0]), storage::CellText(rows->front()[1])};
    }
    return absl::OkStatus();
  });
  std::lock_guard lock(mu_);
  if (!status.ok()) {
    // Keep what is known (revocation and expiry still come from the cached
    // resource) and try again on the next RetryReloads: erasing would lock a
    // valid key out over one failed read.
    retry_.insert(name);
    return;
  }
  retry_.erase(name);
  if (exists) {
    hashes_[name] = std::move(found);
  } else {
    hashes_.erase(name);
  }
  hashes_version_.fetch_add(1, std::memory_order_acq_rel);
}

void Authenticator::RetryReloads() {
  std::vector<std::string> names;
  {
    std::lock_guard lock(mu_);
    names.assign(retry_.begin(), retry_.end());
  }
  for (const std::string& name : names) Reload(name);
}

void Authenticator::SetHashes(const std::string& name, std::string current, std::string previous) {
  std::lock_guard lock(mu_);
  hashes_[name] = {std::move(current), std::move(previous)};
  hashes_version_.fetch_add(1, std::memory_order_acq_rel);
}

absl::StatusOr<Caller> Authenticator::Verify(absl::string_view token) {
  // Shape and checksum first: a mistyped token never costs a lookup.
  absl::StatusOr<crypto::ParsedToken> parsed = crypto::ParseAccessToken(token);
  if (!parsed.ok()) return InvalidToken();
  const std::string name = absl::StrCat("accessKeys/", parsed->id);
  absl::StatusOr<Caller> caller = Admit(name, Hash(token), nullptr);
  if (caller.ok()) {
    std::lock_guard lock(mu_);
    last_used_[name] = clock_();
  }
  return caller;
}

absl::StatusOr<Caller> Authenticator::Admit(const std::string& name, const std::string& hash,
                                            absl::Time* recheck_by) {
  std::shared_ptr<const google::protobuf::Message> cached = cache_.Get(name);
  if (cached == nullptr || cached->GetDescriptor() != v1::AccessKey::descriptor()) {
    return InvalidToken();
  }
  const auto& key = static_cast<const v1::AccessKey&>(*cached);
  Hashes hashes;
  {
    std::lock_guard lock(mu_);
    auto it = hashes_.find(name);
    if (it == hashes_.end()) return InvalidToken();
    hashes = it->second;
  }
  const absl::Time now = clock_();
  absl::Time until = absl::InfiniteFuture();
  bool match = crypto::ConstantTimeEquals(hash, hashes.current);
  if (!match && !hashes.previous.empty() && key.has_previous_token_expire_time() &&
      now < FromProto(key.previous_token_expire_time())) {
    match = crypto::ConstantTimeEquals(hash, hashes.previous);
    until = FromProto(key.previous_token_expire_time());
  }
  if (!match) return InvalidToken();
  // The holder of a valid token may learn why it stopped working.
  if (key.has_revoke_time()) {
    const absl::Time revoked = FromProto(key.revoke_time());
    if (revoked <= now) {
      return WithErrorInfo(absl::UnauthenticatedError(absl::StrCat(name, " was revoked")),
                           "ACCESS_KEY_REVOKED");
    }
    until = std::min(until, revoked);
  }
  if (key.has_expire_time() && FromProto(key.expire_time()) <= now) {
    return WithErrorInfo(absl::UnauthenticatedError(absl::StrCat(name, " has expired")),
                         "ACCESS_KEY_EXPIRED");
  }
  Caller caller;
  caller.principal = name;
  caller.owner = key.owner();
  caller.token_hash = hash;
  for (int s : key.scopes()) caller.scopes.push_back(static_cast<v1::Scope>(s));
  if (key.has_expire_time()) caller.expire_time = FromProto(key.expire_time());
  if (recheck_by != nullptr) *recheck_by = std::min(until, caller.expire_time);
  return caller;
}

absl::Status Authenticator::CheckScope(const Caller& caller, absl::string_view method) const {
  auto scope = method_scopes_.find(method);
  const v1::Scope required = scope == method_scopes_.end() ? v1::SCOPE_UNSPECIFIED : scope->second;
  if (required == v1::SCOPE_UNSPECIFIED || !Grants(caller.scopes, required)) {
    return WithErrorInfo(
        absl::PermissionDeniedError(absl::StrCat(
            caller.principal, " lacks scope ", v1::Scope_Name(required), " required by ", method)),
        "MISSING_SCOPE", {{"scope", v1::Scope_Name(required)}});
  }
  return absl::OkStatus();
}

absl::Status Authenticator::Recheck(const Caller& caller, absl::string_view method,
                                    absl::Time* recheck_by) {
  absl::StatusOr<Caller> now = Admit(caller.principal, caller.token_hash, recheck_by);
  if (!now.ok()) return now.status();
  return CheckScope(*now, method);
}

std::int64_t Authenticator::version() const {
  return cache_.version() + hashes_version_.load(std::memory_order_acquire);
}

absl::StatusOr<Caller> Authenticator::Authenticate(const grpc::ServerContextBase& context,
                                                   absl::string_view method) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return WithErrorInfo(
        absl::UnauthenticatedError(
            "missing access key: send the metadata `authorization: Bearer <token>`"),
        "MISSING_ACCESS_KEY");
  }
  const absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kBearer = "bearer ";
  if (value.size() <= kBearer.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kBearer.size()), kBearer)) {
    return WithErrorInfo(
        absl::UnauthenticatedError("the authorization metadata must be `Bearer <token>`"),
        "MISSING_ACCESS_KEY");
  }
  absl::StatusOr<Caller> caller = Verify(absl::StripAsciiWhitespace(value.substr(kBearer.size())));
  if (!caller.ok()) return caller.status();
  if (absl::Status s = CheckScope(*caller, method); !s.ok()) return s;
  return caller;
}

std::vector<std::pair<std::string, absl::Time>> Authenticator::TakeLastUsed() {
  std::lock_guard lock(mu_);
  std::vector<std::pair<std::string, absl::Time>> out(last_used_.begin(), last_used_.end());
  last_used_.clear();
  return out;
}

absl::Status Authenticator::FlushLastUsed() {
  std::vector<std::pair<std::string, absl::Time>> used = TakeLastUsed();
  if (used.empty()) return absl::OkStatus();
  absl::Status status = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
    for (const auto& [name, time] : used) {
      const std::int64_t micros = absl::ToUnixMicros(time);
      absl::StatusOr<std::int64_t> n = tx.Exec(
          "UPDATE access_keys SET last_used_time = :p0 WHERE name = :p1 AND (last_used_time IS "
          "NULL OR last_used_time < :p2)",
          {micros, name, micros});
      if (!n.ok()) return n.status();
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    std::lock_guard lock(mu_);
    for (const auto& [name, time] : used) {
      absl::Time& t = last_used_[name];
      t = std::max(t, time);
    }
  }
  return status;
}

}  // namespace modelvault::server
