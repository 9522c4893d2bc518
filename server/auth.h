#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"
#include "modelvault/v1/access.pb.h"
#include "modelvault/v1/options.pb.h"
#include "server/catalog_cache.h"
#include "storage/storage.h"

// Authentication and authorization of every modelvault RPC: the bearer token
// is checked in memory (format and checksum first, then the keyed hash
// against the key's stored hashes, then revocation and expiry), and the
// caller's scopes against the scope the method declares in the proto.
// Access keys are resources in the cache, kept coherent by the change feed,
// so no call waits on the database and a revocation reaches every replica
// within one feed poll.
namespace modelvault::server {

struct Caller {
  std::string principal;  // "accessKeys/<id>": who the audit trail names
  std::string owner;      // the key's owner, e.g. "service:gateway"
  std::vector<v1::Scope> scopes;
  absl::Time expire_time = absl::InfiniteFuture();
  std::string token_hash;  // keyed hash of the token presented, for Recheck
};

// Whether `scopes` grant `required` (ADMIN grants all; a WRITE scope grants
// the READ scope of its area).
bool Grants(const std::vector<v1::Scope>& scopes, v1::Scope required);

class Authenticator final {
 public:
  Authenticator(storage::Datastore& datastore, CatalogCache& cache, std::string pepper,
                std::function<absl::Time()> clock = absl::Now);

  // Loads every access key's token hashes (blocking; at startup).
  absl::Status Load();
  // Change-feed listener: reloads the hashes of a changed access key
  // (blocking; called on the change hub's thread).
  void OnChange(const storage::ChangeRecord& change);
  // Reloads the hashes whose reload failed (blocking; run it periodically).
  void RetryReloads();
  // Records hashes written by this replica.
  void SetHashes(const std::string& name, std::string current, std::string previous);

  // The caller of an RPC to `method` ("/modelvault.v1.Svc/Method"):
  // UNAUTHENTICATED without a valid token, PERMISSION_DENIED without the
  // method's scope. Never touches the database.
  absl::StatusOr<Caller> Authenticate(const grpc::ServerContextBase& context,
                                      absl::string_view method);
  // The principal of a token, for VerifyAccessKey (UNAUTHENTICATED when not valid).
  absl::StatusOr<Caller> Verify(absl::string_view token);

  // Re-checks a caller that Authenticate admitted to `method` earlier (a
  // long-lived stream): the answer Authenticate would give its token now,
  // scopes included. `recheck_by` receives when the answer changes with no
  // change to the key (its expiry, the end of a rotation's grace).
  absl::Status Recheck(const Caller& caller, absl::string_view method, absl::Time* recheck_by);
  // Grows with every change to a cached resource or to the token hashes:
  // equal values mean Recheck answers as before (until its recheck_by).
  std::int64_t version() const;
  absl::Time Now() const { return clock_(); }

  // The keyed hash stored for `token`.
  std::string Hash(absl::string_view token) const;

  // Keys used since the last call, with their latest use (to be written).
  std::vector<std::pair<std::string, absl::Time>> TakeLastUsed();
  // Writes TakeLastUsed() to the access_keys rows (blocking).
  absl::Status FlushLastUsed();

 private:
  void Reload(const std::string& name);
  // The caller holding key `name` with a token of keyed hash `hash`.
  absl::StatusOr<Caller> Admit(const std::string& name, const std::string& hash,
                               absl::Time* recheck_by);
  absl::Status CheckScope(const Caller& caller, absl::string_view method) const;

  struct Hashes {
    std::string current;
    std::string previous;
  };

  storage::Datastore& datastore_;
  CatalogCache& cache_;
  const std::string pepper_;
  const std::function<absl::Time()> clock_;
  absl::flat_hash_map<std::string, v1::Scope> method_scopes_;  // immutable after construction

  std::mutex mu_;
  absl::flat_hash_map<std::string, Hashes> hashes_;         // by key name; guarded by mu_
  absl::flat_hash_map<std::string, absl::Time> last_used_;  // guarded by mu_
  absl::flat_hash_set<std::string> retry_;                  // guarded by mu_
  std::atomic<std::int64_t> hashes_version_{0};             // bumped after hashes_ changes
};

}  // namespace modelvault::server
