#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace modelvault::server {

// Stream cursors are opaque to clients: base64url of a versioned position.
std::string EncodeCursor(std::int64_t seq);
// INVALID_ARGUMENT (field `cursor`) when malformed.
absl::StatusOr<std::int64_t> DecodeCursor(absl::string_view cursor);

}  // namespace modelvault::server
