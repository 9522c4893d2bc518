#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// Envelope encryption of stored secrets (provider keys, the access-key
// pepper) under versioned master keys: libsodium XChaCha20-Poly1305 (IETF),
// a random 24-byte nonce per Seal, the master-key version stored with every
// ciphertext, and the owning row's name bound as associated data so that a
// ciphertext copied onto another row does not open.
namespace modelvault::crypto {

inline constexpr size_t kMasterKeyBytes = 32;

class MasterKeyRing final {
 public:
  MasterKeyRing() = default;
  MasterKeyRing(MasterKeyRing&& other) noexcept = default;
  MasterKeyRing& operator=(MasterKeyRing&& other) noexcept;  // wipes the keys it replaces
  MasterKeyRing(const MasterKeyRing&) = delete;
  MasterKeyRing& operator=(const MasterKeyRing&) = delete;
  ~MasterKeyRing();  // wipes the keys (sodium_memzero)

  // Parses key lines "<version> <base64 of 32 bytes>" (version 1..2147483647),
  // separated by newlines or ';' (the environment-variable form). Blank lines
  // and lines starting with '#' are ignored. INVALID_ARGUMENT names the entry
  // by its position and never echoes key material; duplicate versions and
  // keys of the wrong length are errors. An empty text gives an empty ring.
  static absl::StatusOr<MasterKeyRing> Parse(absl::string_view text);
  // Parse() of a file's contents. FAILED_PRECONDITION when the file is
  // readable or writable by group or others (it must be 0600 or 0400), NOT_FOUND
  // when it does not exist.
  static absl::StatusOr<MasterKeyRing> LoadFile(const std::string& path);
  // A fresh random key as one line "<version> <base64>\n".
  static std::string GenerateLine(std::uint32_t version);

  bool empty() const { return keys_.empty(); }
  // The highest version: the one Seal uses. 0 when empty.
  std::uint32_t current_version() const;
  bool Has(std::uint32_t version) const { return keys_.contains(version); }
  std::vector<std::uint32_t> versions() const;

  // Encrypts under the current version. The result is printable text
  // ("v<version>.<base64url(nonce || ciphertext || tag)>") for a TEXT column.
  // FAILED_PRECONDITION when the ring is empty.
  absl::StatusOr<std::string> Seal(absl::string_view plaintext,
                                   absl::string_view associated_data) const;
  // Decrypts. FAILED_PRECONDITION naming the version when that master key is
  // not loaded; DATA_LOSS when the envelope is malformed or fails
  // authentication (tampered bytes, another row's associated data). Error
  // messages never contain plaintext or key material.
  absl::StatusOr<std::string> Open(absl::string_view envelope,
                                   absl::string_view associated_data) const;
  // The master-key version an envelope was sealed with (DATA_LOSS if malformed).
  static absl::StatusOr<std::uint32_t> VersionOf(absl::string_view envelope);

 private:
  std::map<std::uint32_t, std::string> keys_;  // version -> 32 raw bytes
};

}  // namespace modelvault::crypto
