#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "modelvault/v1/credentials.pb.h"
#include "server/crypto/master_keys.h"
#include "storage/resource_store.h"

// The transactions of provider keys that are more than plain CRUD: a key and
// its first secret version in one transaction, rotation, master-key rewrap,
// and the startup check that every stored secret can be opened. Secrets are
// sealed with the key's resource name as associated data.
namespace modelvault::server {

// A secret as given by a caller: inline text or an env:/file: reference.
struct SecretInput {
  std::string secret;     // inline, stored encrypted
  std::string reference;  // env:NAME or file:PATH
};

// INVALID_ARGUMENT (naming `secret_field` / `reference_field`) unless exactly
// one is set and a reference is well-formed and allowed: env: never names a
// MODELVAULT_* variable (the server's own configuration), and file: must name a
// path under `secret_file_dir` (FAILED_PRECONDITION when that is empty: file
// references are off). Without these, a CREDENTIALS_WRITE caller could read
// the master key or any file of the server through AcquireProviderKey.
absl::Status ValidateSecretInput(const SecretInput& input, absl::string_view secret_field,
                                 absl::string_view reference_field,
                                 absl::string_view secret_file_dir);
// Reads a reference now (a file: only if it is a regular file of at most 8 KiB
// whose real path is under `secret_file_dir`). FAILED_PRECONDITION when it is
// missing, empty or not allowed (the message names the reference, never a
// value).
absl::StatusOr<std::string> ResolveReference(absl::string_view reference,
                                             absl::string_view secret_file_dir);
// "sk-p...wxyz": enough to recognize a secret, never enough to use it.
std::string SecretHint(absl::string_view secret);

class ProviderKeyStore final {
 public:
  ProviderKeyStore(storage::ResourceStore& store, const crypto::MasterKeyRing& keys,
                   int max_keys_per_provider);

  // Inserts `key` (name set) with secret version 1, in one transaction.
  // FAILED_PRECONDITION when the provider already has the maximum number of
  // keys.
  absl::StatusOr<storage::MutationResult> Create(storage::MutationContext ctx,
                                                 const v1::ProviderKey& key,
                                                 const SecretInput& secret);
  // Adds the next secret version; the previous current version's grace ends
  // at ctx.now + grace.
  absl::StatusOr<storage::MutationResult> Rotate(storage::MutationContext ctx,
                                                 absl::string_view name, absl::string_view etag,
                                                 const SecretInput& secret, absl::Duration grace);
  // Fills the computed fields of keys read from storage: secret_versions,
  // today's usage from the database (`day`), health.
  absl::Status Describe(const std::vector<v1::ProviderKey*>& keys, absl::string_view day,
                        absl::Time now);

  struct RewrapResult {
    std::int64_t rewrapped = 0;
    std::int64_t unchanged = 0;
    // "<key>@<version>" of secrets that do not open (tampered, or sealed
    // under a master key that is not loaded); skipped.
    std::vector<std::string> failed;
  };
  // Re-seals every secret not under the current master-key version, `batch`
  // rows per transaction; idempotent, and safe to interrupt and run again.
  // Secrets that do not open are listed in `failed` and left as they are.
  absl::StatusOr<RewrapResult> Rewrap(int batch);

  // The master-key versions that sealed stored secrets but are not loaded,
  // or are loaded with other key material (no sampled envelope opens).
  static absl::StatusOr<std::vector<std::uint32_t>> MissingMasterKeys(
      storage::Datastore& datastore, const crypto::MasterKeyRing& keys);

  const crypto::MasterKeyRing& master_keys() const { return keys_; }

 private:
  // Inserts secret version `version` of key `name`.
  absl::Status InsertSecret(storage::ReadWriteTx& tx, absl::string_view name, std::int64_t version,
                            const SecretInput& secret, absl::Time now);

  storage::ResourceStore& store_;
  const crypto::MasterKeyRing& keys_;
  const int max_keys_per_provider_;
};

// The name the server-wide sealed secrets (the access-key pepper) are
// stored under in server_secrets: "sealed:<name>".
inline constexpr absl::string_view kSealedSecretPrefix = "sealed:";

// Returns a 32-byte server secret sealed under the master key, creating it
// on first use (shared by replicas).
absl::StatusOr<std::string> GetOrCreateSealedSecret(storage::Datastore& datastore,
                                                    const crypto::MasterKeyRing& keys,
                                                    absl::string_view name);

}  // namespace modelvault::server
