#include "server/cursor.h"

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "storage/status_details.h"

namespace modelvault::server {

constexpr absl::string_view kPrefix = "mvc1:";

std::string EncodeCursor(std::int64_t seq) {
  return absl::WebSafeBase64Escape(absl::StrCat(kPrefix, seq));
}

absl::StatusOr<std::int64_t> DecodeCursor(absl::string_view cursor) {
  std::string raw;
  std::int64_t seq = 0;
  if (cursor.size() > 64 || !absl::WebSafeBase64Unescape(cursor, &raw) ||
      !absl::StartsWith(raw, kPrefix) ||
      !absl::SimpleAtoi(absl::string_view(raw).substr(kPrefix.size()), &seq) || seq < 0) {
    return InvalidField("cursor", "not a cursor of this service");
  }
  return seq;
}

}  // namespace modelvault::server
