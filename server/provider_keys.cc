#include "server/provider_keys.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "server/crypto/access_token.h"
#include "server/proto_time.h"
#include "storage/status_details.h"

namespace modelvault::server {
namespace {

using google::protobuf::util::TimeUtil;
using storage::SqlCell;
using storage::SqlType;

constexpr size_t kMaxSecretBytes = 8192;

bool ValidEnvName(absl::string_view name) {
  if (name.empty() || name.size() > 255) return false;
  if (!absl::ascii_isalpha(name[0]) && name[0] != '_') return false;
  return std::ranges::all_of(name, [](char c) { return absl::ascii_isalnum(c) || c == '_'; });
}

const storage::ResourceSchema& KeySchema() {
  return *storage::SchemaRegistry::Default().ForMessage(v1::ProviderKey::descriptor());
}

// Whether `path` names something under `dir`, lexically (no `..` segments).
bool InsideDir(absl::string_view path, absl::string_view dir) {
  if (absl::StrContains(path, "/../") || absl::EndsWith(path, "/..")) return false;
  std::string prefix(dir);
  if (prefix.empty() || prefix.back() != '/') prefix.push_back('/');
  return absl::StartsWith(path, prefix) && path.size() > prefix.size();
}

// The contents of a regular file under `dir` (symbolic links resolved, as in
// Kubernetes secret volumes, must stay inside it), at most kMaxSecretBytes;
// "" when it is not such a file. Never blocks on a FIFO or device.
std::string ReadSecretFile(const std::string& path, absl::string_view dir) {
  char real_path[PATH_MAX];
  char real_dir[PATH_MAX];
  if (::realpath(path.c_str(), real_path) == nullptr ||
      ::realpath(std::string(dir).c_str(), real_dir) == nullptr ||
      !InsideDir(real_path, real_dir)) {
    return "";
  }
  const int fd = ::open(real_path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return "";
  std::string value;
  struct stat info;
  if (::fstat(fd, &info) == 0 && S_ISREG(info.st_mode) &&
      info.st_size <= static_cast<off_t>(kMaxSecretBytes)) {
    value.resize(kMaxSecretBytes + 1);
    const ssize_t n = ::read(fd, value.data(), value.size());
    value.resize(n > 0 && static_cast<size_t>(n) <= kMaxSecretBytes ? static_cast<size_t>(n) : 0);
  }
  ::close(fd);
  return value;
}

}  // namespace

absl::Status ValidateSecretInput(const SecretInput& input, absl::string_view secret_field,
                                 absl::string_view reference_field,
                                 absl::string_view secret_file_dir) {
  if (input.secret.empty() == input.reference.empty()) {
    return InvalidFields(
        {{std::string(secret_field), absl::StrCat("exactly one of ", secret_field, " and ",
                                                  reference_field, " is required")}});
  }
  if (!input.secret.empty()) {
    if (input.secret.size() > kMaxSecretBytes) {
      return InvalidField(std::string(secret_field),
                          absl::StrCat("is longer than ", kMaxSecretBytes, " bytes"));
    }
    return absl::OkStatus();
  }
  const absl::string_view ref = input.reference;
  if (absl::StartsWith(ref, "env:")) {
    if (!ValidEnvName(ref.substr(4))) {
      return InvalidField(std::string(reference_field),
                          "env: must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)");
    }
    // The server's own configuration (master key, database URL) is not a secret to hand out.
    if (absl::StartsWith(ref.substr(4), "MODELVAULT_")) {
      return InvalidField(std::string(reference_field),
                          "MODELVAULT_* variables are the server's own configuration");
    }
    return absl::OkStatus();
  }
  if (absl::StartsWith(ref, "file:")) {
    const absl::string_view path = ref.substr(5);
    if (path.empty() || path[0] != '/' || path.size() > 1024) {
      return InvalidField(std::string(reference_field),
                          "file: must be followed by an absolute path");
    }
    if (secret_file_dir.empty()) {
      return WithFieldViolation(
          absl::FailedPreconditionError(
              "file: references are disabled on this server; start it with --secret-file-dir"),
          std::string(reference_field), "file: references are disabled");
    }
    if (!InsideDir(path, secret_file_dir)) {
      return InvalidField(std::string(reference_field),
                          absl::StrCat("must name a file under ", secret_file_dir,
                                       " (--secret-file-dir), without .. segments"));
    }
    return absl::OkStatus();
  }
  return InvalidField(std::string(reference_field), "must be env:NAME or file:/absolute/path");
}

absl::StatusOr<std::string> ResolveReference(absl::string_view reference,
                                             absl::string_view secret_file_dir) {
  std::string value;
  if (absl::StartsWith(reference, "env:")) {
    const std::string name(reference.substr(4));
    const char* v = absl::StartsWith(name, "MODELVAULT_") ? nullptr : std::getenv(name.c_str());
    if (v != nullptr) value = v;
  } else if (absl::StartsWith(reference, "file:") && !secret_file_dir.empty()) {
    value = ReadSecretFile(std::string(reference.substr(5)), secret_file_dir);
  }
  // Files usually end with a newline that is not part of the secret.
  while (!value.empty() && (value.back() == '\n' || value.back() == '\r')) value.pop_back();
  if (value.empty()) {
    return WithErrorInfo(
        absl::FailedPreconditionError(
            absl::StrCat("secret reference ", reference, " is missing or empty on this server")),
        "SECRET_REFERENCE_UNRESOLVED", {{"reference", std::string(reference)}});
  }
  return value;
}

std::string SecretHint(absl::string_view secret) {
  // ASCII only (a cut inside a UTF-8 sequence would be invalid text), and never
  // more than a small part of the secret.
  for (char c : secret) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) return "...";
  }
  if (secret.size() >= 32) {
    return absl::StrCat(secret.substr(0, 4), "...", secret.substr(secret.size() - 4));
  }
  if (secret.size() >= 16) return absl::StrCat("...", secret.substr(secret.size() - 4));
  return "...";
}

ProviderKeyStore::ProviderKeyStore(storage::ResourceStore& store, const crypto::MasterKeyRing& keys,
                                   int max_keys_per_provider)
    : store_(store), keys_(keys), max_keys_per_provider_(max_keys_per_provider) {}

absl::Status ProviderKeyStore::InsertSecret(storage::ReadWriteTx& tx, absl::string_view name,
                                            std::int64_t version, const SecretInput& secret,
                                            absl::Time now) {
  SqlCell envelope;
  SqlCell master_version;
  std::string hint;
  if (!secret.secret.empty()) {
    absl::StatusOr<std::string> sealed = keys_.Seal(secret.secret, name);
    if (!sealed.ok()) return sealed.status();
    envelope = *std::move(sealed);
    master_version = static_cast<std::int64_t>(keys_.current_version());
    hint = SecretHint(secret.secret);
  }
  absl::StatusOr<std::int64_t> n = tx.Exec(
      "INSERT INTO provider_key_secrets (key_name, version, envelope, reference, hint, "
      "master_key_version, create_time, expire_time) VALUES (:p0, :p1, :p2, :p3, :p4, :p5, :p6, "
      ":p7)",
      {std::string(name), version, envelope, secret.reference, hint, master_version,
       absl::ToUnixMicros(now), std::nullopt});
  return n.status();
}

absl::StatusOr<storage::MutationResult> ProviderKeyStore::Create(storage::MutationContext ctx,
                                                                 const v1::ProviderKey& key,
                                                                 const SecretInput& secret) {
  if (keys_.empty() && !secret.secret.empty()) {
    return absl::FailedPreconditionError(
        "no master key is loaded; start the server with --master-key-file to store secrets");
  }
  const std::string& name = key.name();
  const absl::Time now = ctx.now;
  ctx.prepare = [&](storage::ReadWriteTx& tx, google::protobuf::Message& row) -> absl::Status {
    auto& k = static_cast<v1::ProviderKey&>(row);
    absl::StatusOr<std::string> parent = KeySchema().ParentOf(name);
    if (!parent.ok()) return parent.status();
    // Lock the provider row first, so concurrent creates under it count one
    // after another (under PostgreSQL's READ COMMITTED both would otherwise
    // count the same keys and both insert, exceeding the maximum).
    const storage::ResourceSchema* provider_schema =
        storage::SchemaRegistry::Default().ForType(KeySchema().parent_type());
    if (provider_schema == nullptr) return absl::InternalError("no schema for the key's parent");
    absl::StatusOr<storage::StoredResource> locked = tx.GetForUpdate(*provider_schema, *parent);
    if (!locked.ok()) return locked.status();
    absl::StatusOr<std::int64_t> count = tx.CountWhere(KeySchema(), "parent", *parent);
    if (!count.ok()) return count.status();
    if (*count >= max_keys_per_provider_) {
      return WithErrorInfo(absl::FailedPreconditionError(absl::StrCat(
                               *parent, " already has ", *count,
                               " keys, the most this server allows (--max-keys-per-provider)")),
                           "TOO_MANY_KEYS", {{"provider", *parent}});
    }
    k.set_secret_version(1);
    k.set_secret_reference(secret.reference);
    k.set_secret_hint(secret.secret.empty() ? "" : SecretHint(secret.secret));
    return absl::OkStatus();
  };
  ctx.finish = [&](storage::ReadWriteTx& tx, const google::protobuf::Message&) {
    return InsertSecret(tx, name, 1, secret, now);
  };
  return store_.Create(ctx, key);
}

absl::StatusOr<storage::MutationResult> ProviderKeyStore::Rotate(storage::MutationContext ctx,
                                                                 absl::string_view name,
                                                                 absl::string_view etag,
                                                                 const SecretInput& secret,
                                                                 absl::Duration grace) {
  if (keys_.empty() && !secret.secret.empty()) {
    return absl::FailedPreconditionError(
        "no master key is loaded; start the server with --master-key-file to store secrets");
  }
  v1::ProviderKey patch;
  patch.set_name(std::string(name));
  patch.set_etag(std::string(etag));
  const absl::Time now = ctx.now;
  std::int64_t version = 0;
  ctx.prepare = [&](storage::ReadWriteTx&, google::protobuf::Message& row) {
    auto& k = static_cast<v1::ProviderKey&>(row);
    version = k.secret_version() + 1;
    k.set_secret_version(version);
    k.set_secret_reference(secret.reference);
    k.set_secret_hint(secret.secret.empty() ? "" : SecretHint(secret.secret));
    return absl::OkStatus();
  };
  ctx.finish = [&](storage::ReadWriteTx& tx, const google::protobuf::Message&) -> absl::Status {
    absl::StatusOr<std::int64_t> n = tx.Exec(
        "UPDATE provider_key_secrets SET expire_time = :p0 WHERE key_name = :p1 AND "
        "version < :p2 AND expire_time IS NULL",
        {absl::ToUnixMicros(now + grace), std::string(name), version});
    if (!n.ok()) return n.status();
    return InsertSecret(tx, name, version, secret, now);
  };
  return store_.Update(ctx, patch, {});
}

absl::Status ProviderKeyStore::Describe(const std::vector<v1::ProviderKey*>& keys,
                                        absl::string_view day, absl::Time now) {
  if (keys.empty()) return absl::OkStatus();
  return store_.datastore().Read([&](storage::Reader& reader) -> absl::Status {
    for (v1::ProviderKey* key : keys) {
      key->clear_secret_versions();
      key->clear_usage();
      key->clear_health();
      absl::StatusOr<std::vector<storage::SqlRow>> secrets = reader.Query(
          "SELECT version, reference, hint, create_time, expire_time FROM provider_key_secrets "
          "WHERE key_name = :p0 ORDER BY version",
          {key->name()},
          {SqlType::kInt64, SqlType::kText, SqlType::kText, SqlType::kInt64, SqlType::kInt64});
      if (!secrets.ok()) return secrets.status();
      for (const storage::SqlRow& row : *secrets) {
        v1::SecretVersion* v = key->add_secret_versions();
        v->set_version(storage::CellInt(row[0]));
        v->set_reference(storage::CellText(row[1]));
        v->set_hint(storage::CellText(row[2]));
        *v->mutable_create_time() = ToProto(absl::FromUnixMicros(storage::CellInt(row[3])));
        if (row[4].has_value())
          *v->mutable_expire_time() = ToProto(absl::FromUnixMicros(storage::CellInt(row[4])));
        if (v->version() == key->secret_version()) {
          v->set_state(v1::SecretVersion::STATE_CURRENT);
        } else if (row[4].has_value() && storage::CellInt(row[4]) > absl::ToUnixMicros(now)) {
          v->set_state(v1::SecretVersion::STATE_GRACE);
        } else {
          v->set_state(v1::SecretVersion::STATE_RETIRED);
        }
      }
      absl::StatusOr<std::vector<storage::SqlRow>> usage = reader.Query(
          "SELECT requests, tokens, last_used_time FROM provider_key_usage WHERE key_name = :p0 "
          "AND day = :p1",
          {key->name(), std::string(day)}, {SqlType::kInt64, SqlType::kInt64, SqlType::kInt64});
      if (!usage.ok()) return usage.status();
      key->mutable_usage()->set_day(std::string(day));
      if (!usage->empty()) {
        const storage::SqlRow& row = usage->front();
        key->mutable_usage()->set_requests(storage::CellInt(row[0]));
        key->mutable_usage()->set_tokens(storage::CellInt(row[1]));
        if (row[2].has_value()) {
          *key->mutable_usage()->mutable_last_used_time() =
              ToProto(absl::FromUnixMicros(storage::CellInt(row[2])));
        }
      }
      absl::StatusOr<std::vector<storage::SqlRow>> health = reader.Query(
          "SELECT degraded_until, consecutive_failures, last_outcome, last_outcome_time FROM "
          "provider_key_health WHERE key_name = :p0",
          {key->name()}, {SqlType::kInt64, SqlType::kInt64, SqlType::kText, SqlType::kInt64});
      if (!health.ok()) return health.status();
      if (!health->empty()) {
        const storage::SqlRow& row = health->front();
        if (row[0].has_value() && storage::CellInt(row[0]) > absl::ToUnixMicros(now)) {
          *key->mutable_health()->mutable_degraded_until() =
              ToProto(absl::FromUnixMicros(storage::CellInt(row[0])));
        }
        key->mutable_health()->set_consecutive_failures(storage::CellInt(row[1]));
        v1::KeyOutcome outcome = v1::KEY_OUTCOME_UNSPECIFIED;
        v1::KeyOutcome_Parse(storage::CellText(row[2]), &outcome);
        key->mutable_health()->set_last_outcome(outcome);
        if (row[3].has_value()) {
          *key->mutable_health()->mutable_last_outcome_time() =
              ToProto(absl::FromUnixMicros(storage::CellInt(row[3])));
        }
      }
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<ProviderKeyStore::RewrapResult> ProviderKeyStore::Rewrap(int batch) {
  if (keys_.empty()) return absl::FailedPreconditionError("no master key is loaded");
  const std::int64_t current = keys_.current_version();
  RewrapResult result;
  std::int64_t key_secrets_rewrapped = 0;
  // Provider-key secrets in (key, version) order, a batch per transaction;
  // each row is re-checked in its UPDATE, so concurrent rewraps and rotations
  // never lose a write. A row that does not open (tampered, or sealed under a
  // key that is not loaded) is reported and skipped, not allowed to block
  // the others.
  std::string after_name;
  std::int64_t after_version = -1;
  while (true) {
    std::int64_t done = 0;
    std::vector<std::string> failed;
    std::string last_name = after_name;
    std::int64_t last_version = after_version;
    bool more = false;
    absl::Status status = store_.datastore().ReadWriteTx([&](storage::ReadWriteTx& tx) {
      done = 0;
      failed.clear();
      last_name = after_name;
      last_version = after_version;
      absl::StatusOr<std::vector<storage::SqlRow>> rows = tx.Query(
          "SELECT key_name, version, envelope, master_key_version FROM provider_key_secrets "
          "WHERE envelope IS NOT NULL AND master_key_version <> :p0 AND (key_name > :p1 OR "
          "(key_name = :p2 AND version > :p3)) ORDER BY key_name, version LIMIT :p4",
          {current, after_name, after_name, after_version, static_cast<std::int64_t>(batch)},
          {SqlType::kText, SqlType::kInt64, SqlType::kText, SqlType::kInt64});
      if (!rows.ok()) return rows.status();
      more = static_cast<int>(rows->size()) == batch;
      for (const storage::SqlRow& row : *rows) {
        const std::string name = storage::CellText(row[0]);
        last_name = name;
        last_version = storage::CellInt(row[1]);
        absl::StatusOr<std::string> plain = keys_.Open(storage::CellText(row[2]), name);
        if (!plain.ok()) {
          failed.push_back(absl::StrCat(name, "@", last_version));
          continue;
        }
        absl::StatusOr<std::string> sealed = keys_.Seal(*plain, name);
        if (!sealed.ok()) return sealed.status();
        absl::StatusOr<std::int64_t> n = tx.Exec(
            "UPDATE provider_key_secrets SET envelope = :p0, master_key_version = :p1 WHERE "
            "key_name = :p2 AND version = :p3 AND master_key_version = :p4",
            {*sealed, current, name, last_version, storage::CellInt(row[3])});
        if (!n.ok()) return n.status();
        done += *n;
      }
      return absl::OkStatus();
    });
    if (!status.ok()) return status;
    key_secrets_rewrapped += done;
    result.failed.insert(result.failed.end(), failed.begin(), failed.end());
    after_name = last_name;
    after_version = last_version;
    if (!more) break;
  }
  result.rewrapped = key_secrets_rewrapped;
  // Server-wide sealed secrets (few rows). Counted in locals: the function
  // may run again after a conflict.
  std::int64_t server_secrets_rewrapped = 0;
  absl::Status status = store_.datastore().ReadWriteTx([&](storage::ReadWriteTx& tx) {
    server_secrets_rewrapped = 0;
    absl::StatusOr<std::vector<storage::SqlRow>> rows =
        tx.Query("SELECT name, value FROM server_secrets WHERE name LIKE 'sealed:%'", {},
                 {SqlType::kText, SqlType::kText});
    if (!rows.ok()) return rows.status();
    for (const storage::SqlRow& row : *rows) {
      const std::string name = storage::CellText(row[0]);
      const std::string value = storage::CellText(row[1]);
      absl::StatusOr<std::uint32_t> version = crypto::MasterKeyRing::VersionOf(value);
      if (version.ok() && *version == current) continue;
      absl::StatusOr<std::string> plain = keys_.Open(value, name);
      if (!plain.ok()) return plain.status();
      absl::StatusOr<std::string> sealed = keys_.Seal(*plain, name);
      if (!sealed.ok()) return sealed.status();
      absl::StatusOr<std::int64_t> n =
          tx.Exec("UPDATE server_secrets SET value = :p0 WHERE name = :p1 AND value = :p2",
                  {*sealed, name, value});
      if (!n.ok()) return n.status();
      server_secrets_rewrapped += *n;
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  result.rewrapped += server_secrets_rewrapped;
  absl::Status counted = store_.datastore().Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<storage::SqlRow>> rows =
        reader.Query("SELECT COUNT(*) FROM provider_key_secrets WHERE envelope IS NOT NULL", {},
                     {SqlType::kInt64});
    if (!rows.ok()) return rows.status();
    // Key secrets this call did not rewrap. (`rewrapped` also counts server
    // secrets, so it must not be subtracted from the key-secret count.)
    result.unchanged =
        std::max<std::int64_t>(0, storage::CellInt(rows->front()[0]) - key_secrets_rewrapped);
    return absl::OkStatus();
  });
  if (!counted.ok()) return counted;
  return result;
}

absl::StatusOr<std::vector<std::uint32_t>> ProviderKeyStore::MissingMasterKeys(
    storage::Datastore& datastore, const crypto::MasterKeyRing& keys) {
  std::set<std::uint32_t> missing;
  // A different key loaded under a version's number opens none of that
  // version's envelopes: per loaded version, whether a sampled one opened.
  std::map<std::uint32_t, bool> opens;
  auto sample = [&](std::uint32_t v, const std::string& envelope, const std::string& name) {
    bool& opened = opens[v];
    if (!opened) opened = keys.Open(envelope, name).ok();
  };
  absl::Status status = datastore.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<storage::SqlRow>> rows = reader.Query(
        "SELECT DISTINCT master_key_version FROM provider_key_secrets WHERE envelope IS NOT NULL",
        {}, {SqlType::kInt64});
    if (!rows.ok()) return rows.status();
    for (const storage::SqlRow& row : *rows) {
      const auto v = static_cast<std::uint32_t>(storage::CellInt(row[0]));
      if (!keys.Has(v)) {
        missing.insert(v);
        continue;
      }
      absl::StatusOr<std::vector<storage::SqlRow>> sealed = reader.Query(
          "SELECT key_name, envelope FROM provider_key_secrets WHERE envelope IS NOT NULL AND "
          "master_key_version = :p0 LIMIT 3",
          {static_cast<std::int64_t>(v)}, {SqlType::kText, SqlType::kText});
      if (!sealed.ok()) return sealed.status();
      for (const storage::SqlRow& s : *sealed) {
        sample(v, storage::CellText(s[1]), storage::CellText(s[0]));
      }
    }
    rows = reader.Query("SELECT name, value FROM server_secrets WHERE name LIKE 'sealed:%'", {},
                        {SqlType::kText, SqlType::kText});
    if (!rows.ok()) return rows.status();
    for (const storage::SqlRow& row : *rows) {
      const std::string value = storage::CellText(row[1]);
      absl::StatusOr<std::uint32_t> v = crypto::MasterKeyRing::VersionOf(value);
      if (!v.ok()) return v.status();
      if (!keys.Has(*v)) {
        missing.insert(*v);
      } else {
        sample(*v, value, storage::CellText(row[0]));
      }
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  for (const auto& [v, opened] : opens) {
    if (!opened) missing.insert(v);
  }
  return std::vector<std::uint32_t>(missing.begin(), missing.end());
}

absl::StatusOr<std::string> GetOrCreateSealedSecret(storage::Datastore& datastore,
                                                    const crypto::MasterKeyRing& keys,
                                                    absl::string_view name) {
  if (keys.empty()) return absl::FailedPreconditionError("no master key is loaded");
  const std::string row = absl::StrCat(kSealedSecretPrefix, name);
  absl::Status seal_error;
  absl::StatusOr<std::string> stored = datastore.GetOrCreateSecret(row, [&]() -> std::string {
    absl::StatusOr<std::string> sealed = keys.Seal(crypto::RandomBytes(32), row);
    if (!sealed.ok()) {
      seal_error = sealed.status();
      return "";
    }
    return *std::move(sealed);
  });
  if (!seal_error.ok()) return seal_error;
  if (!stored.ok()) return stored.status();
  return keys.Open(*stored, row);
}

}  // namespace modelvault::server
