#include "storage/page_token.h"

#include <sodium.h>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "storage/status_details.h"

namespace modelvault::storage {
namespace {

constexpr char kVersion = '1';

absl::Status BadToken(absl::string_view why) {
  return InvalidField("page_token", std::string(why));
}

}  // namespace

PageTokenCodec::PageTokenCodec(absl::string_view key) {
  static const bool initialized = sodium_init() >= 0;
  (void)initialized;
  unsigned char derived[crypto_auth_KEYBYTES];
  crypto_hash_sha256(derived, reinterpret_cast<const unsigned char*>(key.data()), key.size());
  key_.assign(reinterpret_cast<const char*>(derived), sizeof(derived));
}

// Layout: version, 32-byte query digest, then per value 's' len ':' bytes or
// 'i' decimal ';', then the MAC over everything before it.
std::string PageTokenCodec::Encode(absl::string_view query_digest,
                                   const std::vector<SqlValue>& position) const {
  std::string body(1, kVersion);
  body.append(query_digest.data(), query_digest.size());
  for (const SqlValue& v : position) {
    if (const auto* s = std::get_if<std::string>(&v)) {
      absl::StrAppend(&body, "s", s->size(), ":", *s);
    } else {
      absl::StrAppend(&body, "i", std::get<std::int64_t>(v), ";");
    }
  }
  unsigned char mac[crypto_auth_BYTES];
  crypto_auth(mac, reinterpret_cast<const unsigned char*>(body.data()), body.size(),
              reinterpret_cast<const unsigned char*>(key_.data()));
  body.append(reinterpret_cast<const char*>(mac), sizeof(mac));
  return absl::WebSafeBase64Escape(body);
}

absl::StatusOr<std::vector<SqlValue>> PageTokenCodec::Decode(absl::string_view token,
                                                             absl::string_view query_digest) const {
  std::string raw;
  if (token.size() > 8192 || !absl::WebSafeBase64Unescape(token, &raw) ||
      raw.size() < 1 + query_digest.size() + crypto_auth_BYTES) {
    return BadToken("not a page token of this service");
  }
  const size_t body_size = raw.size() - crypto_auth_BYTES;
  if (crypto_auth_verify(reinterpret_cast<const unsigned char*>(raw.data() + body_size),
                         reinterpret_cast<const unsigned char*>(raw.data()), body_size,
                         reinterpret_cast<const unsigned char*>(key_.data())) != 0) {
    return BadToken("the page token was altered or was not issued by this service");
  }
  absl::string_view body(raw.data(), body_size);
  if (body[0] != kVersion) return BadToken("unsupported page token version");
  if (body.substr(1, query_digest.size()) != query_digest) {
    return BadToken(
        "the page token belongs to another query: keep parent, filter and order_by unchanged "
        "while paging");
  }
  body.remove_prefix(1 + query_digest.size());
  std::vector<SqlValue> out;
  while (!body.empty()) {
    const char tag = body[0];
    body.remove_prefix(1);
    const size_t end = body.find(tag == 's' ? ':' : ';');
    std::int64_t number = 0;
    if (end == absl::string_view::npos || !absl::SimpleAtoi(body.substr(0, end), &number)) {
      return BadToken("malformed page token");
    }
    body.remove_prefix(end + 1);
    if (tag == 'i') {
      out.emplace_back(number);
    } else if (tag == 's' && number >= 0 && static_cast<size_t>(number) <= body.size()) {
      out.emplace_back(std::string(body.substr(0, number)));
      body.remove_prefix(number);
    } else {
      return BadToken("malformed page token");
    }
  }
  return out;
}

}  // namespace modelvault::storage
