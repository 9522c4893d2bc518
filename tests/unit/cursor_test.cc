#include "server/cursor.h"

#include "gtest/gtest.h"
#include "storage/page_token.h"

namespace modelvault {
namespace {

TEST(CursorTest, RoundTrips) {
  for (std::int64_t seq : {0LL, 1LL, 61LL, 9007199254740993LL}) {
    absl::StatusOr<std::int64_t> back = server::DecodeCursor(server::EncodeCursor(seq));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, seq);
  }
}

TEST(CursorTest, RejectsGarbage) {
  for (const char* bad : {"", "garbage", "bXZjMTotMQ" /* mvc1:-1 */, "bXZjMjox" /* mvc2:1 */}) {
    EXPECT_EQ(server::DecodeCursor(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(PageTokenTest, RoundTripsAndRejectsTampering) {
  storage::PageTokenCodec codec("key-1");
  const std::string digest(32, 'd');
  const std::vector<storage::SqlValue> position = {std::int64_t{128000},
                                                   std::string("providers/a/models/b")};
  const std::string token = codec.Encode(digest, position);
  absl::StatusOr<std::vector<storage::SqlValue>> back = codec.Decode(token, digest);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, position);

  // Every single flipped character is detected.
  for (size_t i = 0; i < token.size(); ++i) {
    std::string bad = token;
    bad[i] = bad[i] == 'A' ? 'B' : 'A';
    EXPECT_FALSE(codec.Decode(bad, digest).ok()) << i;
  }
  // Another query, another key.
  EXPECT_FALSE(codec.Decode(token, std::string(32, 'e')).ok());
  EXPECT_FALSE(storage::PageTokenCodec("key-2").Decode(token, digest).ok());
}

}  // namespace
}  // namespace modelvault
