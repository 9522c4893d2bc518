#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "storage/filter.h"

namespace modelvault::storage {

// Opaque, tamper-evident List page tokens: the keyset position plus a digest
// of the query it belongs to, authenticated with a server-held key
// (HMAC-SHA-512/256), base64url. A token altered, made by another key, or
// used with another parent, filter or order_by is rejected.
class PageTokenCodec final {
 public:
  explicit PageTokenCodec(absl::string_view key);

  std::string Encode(absl::string_view query_digest, const std::vector<SqlValue>& position) const;
  // INVALID_ARGUMENT (with a page_token field violation) when the token is
  // malformed, forged, or belongs to another query.
  absl::StatusOr<std::vector<SqlValue>> Decode(absl::string_view token,
                                               absl::string_view query_digest) const;

 private:
  std::string key_;  // crypto_auth key bytes
};

}  // namespace modelvault::storage
