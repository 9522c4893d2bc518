#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// Access-key tokens: "mv_<id>_<secret><checksum>".
//   id        16 characters of [a-z0-9], random; the public key id
//   secret    52 characters of base32 (RFC 4648 alphabet, lower case, no
//             padding) encoding 32 random bytes (256 bits)
//   checksum  7 base32 characters: the first 4 bytes of an unkeyed BLAKE2b
//             hash of "mv_<id>_<secret>", so a mistyped or truncated token is
//             rejected offline, before any database query.
// The server stores only HashToken(pepper, token) and compares in constant
// time.
namespace modelvault::crypto {

inline constexpr size_t kAccessKeyIdLength = 16;

struct ParsedToken {
  std::string id;      // the <id> part
  std::string prefix;  // "mv_<id>_" plus the first 4 secret characters, safe to display
};

// A new random key id.
std::string NewAccessKeyId();
// A new token for `id` (which must match [a-z0-9]{16}).
std::string NewAccessToken(absl::string_view id);
// Checks shape and checksum. INVALID_ARGUMENT with a message that does not
// repeat the token when either is wrong.
absl::StatusOr<ParsedToken> ParseAccessToken(absl::string_view token);
// Keyed BLAKE2b-256 of the whole token under `pepper` (32 bytes), as 64
// lower-case hex characters.
std::string HashAccessToken(absl::string_view pepper, absl::string_view token);
// Constant-time equality of two strings of equal length (false otherwise).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);
// 32 random bytes (for peppers).
std::string RandomBytes(size_t n);

}  // namespace modelvault::crypto
