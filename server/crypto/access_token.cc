#include "server/crypto/access_token.h"

#include <sodium.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace modelvault::crypto {
namespace {

constexpr absl::string_view kTokenPrefix = "mv_";
constexpr absl::string_view kBase32Alphabet = "abcdefghijklmnopqrstuvwxyz234567";
constexpr absl::string_view kIdAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
constexpr size_t kSecretBytes = 32;
constexpr size_t kSecretChars = 52;  // ceil(256 / 5)
constexpr size_t kChecksumBytes = 4;
constexpr size_t kChecksumChars = 7;  // ceil(32 / 5)
// "mv_" + id + "_"; the secret starts here.
constexpr size_t kSecretOffset = kTokenPrefix.size() + kAccessKeyIdLength + 1;
constexpr size_t kTokenLength = kSecretOffset + kSecretChars + kChecksumChars;  // 79
constexpr size_t kDisplayedSecretChars = 4;

void EnsureSodium() {
  // sodium_init() is idempotent and thread-safe; it fails only when the system
  // cannot provide randomness, and nothing here is safe without it.
  static const bool ok = sodium_init() >= 0;
  if (!ok) std::abort();
}

// RFC 4648 base32, lower case, no padding; the final partial group is filled
// with zero bits.
std::string Base32Encode(const unsigned char* bytes, size_t len) {
  std::string out;
  out.reserve((len * 8 + 4) / 5);
  std::uint32_t buffer = 0;
  int bits = 0;
  for (size_t i = 0; i < len; ++i) {
    buffer = (buffer << 8) | bytes[i];
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      out.push_back(kBase32Alphabet[(buffer >> bits) & 31]);
    }
  }
  if (bits > 0) out.push_back(kBase32Alphabet[(buffer << (5 - bits)) & 31]);
  return out;
}

bool IsIdChar(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool IsBase32Char(char c) { return (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7'); }

bool IsValidId(absl::string_view id) {
  if (id.size() != kAccessKeyIdLength) return false;
  return std::ranges::all_of(id, IsIdChar);
}

// The checksum of "mv_<id>_<secret>": the first 4 bytes of unkeyed BLAKE2b
// with a 16-byte output (crypto_generichash_BYTES_MIN; BLAKE2b's output length
// is a parameter of the hash, so this fixes the format), in base32.
std::string Checksum(absl::string_view body) {
  unsigned char hash[crypto_generichash_BYTES_MIN];
  crypto_generichash(hash, sizeof(hash), reinterpret_cast<const unsigned char*>(body.data()),
                     body.size(), nullptr, 0);
  return Base32Encode(hash, kChecksumBytes);
}

absl::Status Malformed() {
  return absl::InvalidArgumentError(absl::StrCat(
      "access token is malformed: expected mv_<", kAccessKeyIdLength, " characters of [a-z0-9]>_<",
      kSecretChars + kChecksumChars, " characters of [a-z2-7]>"));
}

}  // namespace

std::string NewAccessKeyId() {
  EnsureSodium();
  std::string id(kAccessKeyIdLength, '\0');
  for (char& c : id) c = kIdAlphabet[randombytes_uniform(kIdAlphabet.size())];
  return id;
}

std::string NewAccessToken(absl::string_view id) {
  EnsureSodium();
  // A bad id is a caller defect; a token that ParseAccessToken would reject
  // must never be handed out.
  if (!IsValidId(id)) std::abort();
  unsigned char secret[kSecretBytes];
  randombytes_buf(secret, sizeof(secret));
  std::string token = absl::StrCat(kTokenPrefix, id, "_", Base32Encode(secret, sizeof(secret)));
  sodium_memzero(secret, sizeof(secret));
  token += Checksum(token);
  return token;
}

absl::StatusOr<ParsedToken> ParseAccessToken(absl::string_view token) {
  EnsureSodium();
  // Messages describe the expected shape and never quote the input.
  if (token.size() != kTokenLength || token.substr(0, kTokenPrefix.size()) != kTokenPrefix ||
      token[kSecretOffset - 1] != '_') {
    return Malformed();
  }
  const absl::string_view id = token.substr(kTokenPrefix.size(), kAccessKeyIdLength);
  if (!IsValidId(id)) return Malformed();
  for (char c : token.substr(kSecretOffset)) {
    if (!IsBase32Char(c)) return Malformed();
  }
  // 256 bits fill 51 characters and 1 bit of the 52nd: its other 4 bits are
  // zero in every token this code issues.
  const size_t last = kBase32Alphabet.find(token[kSecretOffset + kSecretChars - 1]);
  if ((last & 15) != 0) return Malformed();

  const absl::string_view body = token.substr(0, kSecretOffset + kSecretChars);
  if (Checksum(body) != token.substr(body.size())) {
    return absl::InvalidArgumentError(
        "access token checksum does not match: the token is mistyped or truncated");
  }
  ParsedToken parsed;
  parsed.id = std::string(id);
  parsed.prefix = std::string(token.substr(0, kSecretOffset + kDisplayedSecretChars));
  return parsed;
}

std::string HashAccessToken(absl::string_view pepper, absl::string_view token) {
  EnsureSodium();
  // An empty or short pepper would silently weaken every stored hash; it is a
  // configuration defect to stop at, not a value to hash with.
  if (pepper.size() < crypto_generichash_KEYBYTES_MIN ||
      pepper.size() > crypto_generichash_KEYBYTES_MAX) {
    std::abort();
  }
  unsigned char hash[32];
  crypto_generichash(hash, sizeof(hash), reinterpret_cast<const unsigned char*>(token.data()),
                     token.size(), reinterpret_cast<const unsigned char*>(pepper.data()),
                     pepper.size());
  char hex[sizeof(hash) * 2 + 1];
  sodium_bin2hex(hex, sizeof(hex), hash, sizeof(hash));
  return std::string(hex, sizeof(hash) * 2);
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  EnsureSodium();
  // Lengths are public (every hash is 64 characters); only contents are compared in
  // constant time.
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string RandomBytes(size_t n) {
  EnsureSodium();
  std::string out(n, '\0');
  if (n > 0) randombytes_buf(out.data(), n);
  return out;
}

}  // namespace modelvault::crypto
