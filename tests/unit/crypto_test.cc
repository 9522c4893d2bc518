#include <sodium.h>
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/crypto/access_token.h"
#include "server/crypto/master_keys.h"

namespace modelvault::crypto {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr absl::string_view kAd = "providers/a/keys/k1";

// Independent codecs, so the tests do not trust the code under test to define the formats.
std::string B64(const std::string& bin, int variant) {
  std::string out(sodium_base64_ENCODED_LEN(bin.size(), variant), '\0');
  sodium_bin2base64(out.data(), out.size(), reinterpret_cast<const unsigned char*>(bin.data()),
                    bin.size(), variant);
  out.resize(out.size() - 1);
  return out;
}

std::string UnB64(absl::string_view text, int variant) {
  std::string out(text.size(), '\0');
  size_t len = 0;
  EXPECT_EQ(sodium_base642bin(reinterpret_cast<unsigned char*>(out.data()), out.size(), text.data(),
                              text.size(), nullptr, &len, nullptr, variant),
            0);
  out.resize(len);
  return out;
}

// Bit by bit, RFC 4648 lower case, no padding.
std::string Base32(const std::string& bin) {
  std::string out;
  for (size_t bit = 0; bit < bin.size() * 8; bit += 5) {
    int value = 0;
    for (size_t b = bit; b < bit + 5; ++b) {
      const int set =
          b < bin.size() * 8 ? (static_cast<unsigned char>(bin[b / 8]) >> (7 - b % 8)) & 1 : 0;
      value = value * 2 + set;
    }
    out.push_back("abcdefghijklmnopqrstuvwxyz234567"[value]);
  }
  return out;
}

// A key line "<version> <base64 of `bytes`>" with a fixed key.
std::string KeyLine(std::uint32_t version, size_t bytes = kMasterKeyBytes, char fill = 'k') {
  return absl::StrCat(version, " ", B64(std::string(bytes, fill), sodium_base64_VARIANT_ORIGINAL));
}

MasterKeyRing Ring(absl::string_view text) {
  absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::Parse(text);
  EXPECT_TRUE(ring.ok()) << ring.status();
  return ring.ok() ? *std::move(ring) : MasterKeyRing();
}

std::string SealOrDie(const MasterKeyRing& ring, absl::string_view plaintext,
                      absl::string_view ad = kAd) {
  absl::StatusOr<std::string> envelope = ring.Seal(plaintext, ad);
  EXPECT_TRUE(envelope.ok()) << envelope.status();
  return envelope.ok() ? *envelope : std::string();
}

// The "v<N>." prefix and the decoded binary of an envelope.
std::pair<std::string, std::string> Split(const std::string& envelope) {
  const size_t dot = envelope.find('.');
  return {envelope.substr(0, dot + 1),
          UnB64(envelope.substr(dot + 1), sodium_base64_VARIANT_URLSAFE_NO_PADDING)};
}

std::string Join(const std::string& prefix, const std::string& bin) {
  return prefix + B64(bin, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
}

// --- MasterKeyRing: Seal / Open --------------------------------------------------------------

TEST(MasterKeyRingTest, SealOpenRoundTrips) {
  const MasterKeyRing ring = Ring(MasterKeyRing::GenerateLine(1));
  std::string big(10 * 1024, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 + 3);
  for (const std::string& plaintext : {std::string(), std::string("sk-live-123"), big}) {
    const std::string envelope = SealOrDie(ring, plaintext);
    EXPECT_TRUE(absl::StartsWith(envelope, "v1.")) << envelope.substr(0, 8);
    for (char c : envelope) {
      EXPECT_TRUE(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ||
                  c == '.')
          << "not printable base64url: " << static_cast<int>(c);
    }
    // Nonce and tag add 40 bytes; the plaintext is not in the text.
    EXPECT_EQ(Split(envelope).second.size(), plaintext.size() + 40);
    if (!plaintext.empty()) {
      EXPECT_THAT(envelope, Not(HasSubstr(plaintext)));
    }
    absl::StatusOr<std::string> opened = ring.Open(envelope, kAd);
    ASSERT_TRUE(opened.ok()) << opened.status();
    EXPECT_EQ(*opened, plaintext);
    EXPECT_EQ(*MasterKeyRing::VersionOf(envelope), 1u);
  }
}

TEST(MasterKeyRingTest, SealUsesARandomNonce) {
  const MasterKeyRing ring = Ring(KeyLine(1));
  const std::string a = SealOrDie(ring, "same secret");
  const std::string b = SealOrDie(ring, "same secret");
  EXPECT_NE(a, b);
  EXPECT_NE(Split(a).second.substr(0, 24), Split(b).second.substr(0, 24));
  EXPECT_EQ(*ring.Open(a, kAd), "same secret");
  EXPECT_EQ(*ring.Open(b, kAd), "same secret");
}

TEST(MasterKeyRingTest, EmptyRingCannotSeal) {
  const MasterKeyRing ring = Ring("");
  EXPECT_TRUE(ring.empty());
  EXPECT_EQ(ring.current_version(), 0u);
  EXPECT_EQ(ring.Seal("x", kAd).status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string envelope = SealOrDie(Ring(KeyLine(1)), "x");
  EXPECT_EQ(ring.Open(envelope, kAd).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(MasterKeyRingTest, EveryFlippedBitIsDataLoss) {
  const MasterKeyRing ring = Ring(KeyLine(1));
  const std::string envelope = SealOrDie(ring, "provider api key");
  const auto [prefix, bin] = Split(envelope);
  ASSERT_EQ(bin.size(), 24u + 16u + 16u);
  for (size_t i = 0; i < bin.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = bin;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      absl::StatusOr<std::string> opened = ring.Open(Join(prefix, bad), kAd);
      EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss)
          << "byte " << i << " bit " << bit;
      if (!opened.ok()) {
        EXPECT_THAT(opened.status().message(), Not(HasSubstr("provider api key")));
      }
    }
  }
}

TEST(MasterKeyRingTest, TruncatedOrGarbageEnvelopesAreDataLoss) {
  const MasterKeyRing ring = Ring(KeyLine(1));
  const std::string envelope = SealOrDie(ring, "secret");
  // Every truncation of the text, and of the binary (re-encoded).
  for (size_t n = 0; n < envelope.size(); ++n) {
    EXPECT_EQ(ring.Open(envelope.substr(0, n), kAd).status().code(), absl::StatusCode::kDataLoss)
        << n;
  }
  const auto [prefix, bin] = Split(envelope);
  for (size_t n = 0; n < bin.size(); ++n) {
    EXPECT_EQ(ring.Open(Join(prefix, bin.substr(0, n)), kAd).status().code(),
              absl::StatusCode::kDataLoss)
        << n;
  }
  // Appended bytes are not ignored either.
  EXPECT_EQ(ring.Open(Join(prefix, bin + '\0'), kAd).status().code(), absl::StatusCode::kDataLoss);

  const std::string body = envelope.substr(prefix.size());
  for (const std::string& garbage : {std::string(""),
                                     std::string("v"),
                                     std::string("v1"),
                                     std::string("v1."),
                                     std::string("secret"),
                                     std::string("v1.!!!!!!!!"),
                                     "x1." + body,
                                     "V1." + body,
                                     "1." + body,
                                     "v." + body,
                                     "v01." + body,
                                     "v+1." + body,
                                     "v-1." + body,
                                     "v0." + body,
                                     "v1x." + body,
                                     "v99999999999." + body,
                                     "v4294967297." + body,
                                     "v1." + body + "=",
                                     "v1." + body + " ",
                                     " v1." + body,
                                     "v1." + body + "\n",
                                     "v1.." + body,
                                     "v1." + B64(bin, sodium_base64_VARIANT_URLSAFE),
                                     "v1." + B64(bin, sodium_base64_VARIANT_ORIGINAL)}) {
    absl::StatusOr<std::string> opened = ring.Open(garbage, kAd);
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss) << garbage;
    EXPECT_EQ(MasterKeyRing::VersionOf(garbage).status().code(), absl::StatusCode::kDataLoss)
        << garbage;
  }
  // The untouched envelope still opens: the loop above did not test a broken ring.
  EXPECT_EQ(*ring.Open(envelope, kAd), "secret");
}

TEST(MasterKeyRingTest, AssociatedDataBindsTheRow) {
  const MasterKeyRing ring = Ring(KeyLine(1));
  const std::string envelope = SealOrDie(ring, "secret", "providers/a/keys/k1");
  EXPECT_EQ(ring.Open(envelope, "providers/a/keys/k2").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ring.Open(envelope, "").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ring.Open(envelope, "providers/a/keys/k1 ").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(*ring.Open(envelope, "providers/a/keys/k1"), "secret");
}

TEST(MasterKeyRingTest, AnotherKeyWithTheSameVersionDoesNotOpen) {
  const std::string envelope = SealOrDie(Ring(KeyLine(1, kMasterKeyBytes, 'a')), "secret");
  EXPECT_EQ(Ring(KeyLine(1, kMasterKeyBytes, 'b')).Open(envelope, kAd).status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(MasterKeyRingTest, Rotation) {
  const std::string line1 = MasterKeyRing::GenerateLine(1);
  const std::string line2 = MasterKeyRing::GenerateLine(2);
  const std::string old_envelope = SealOrDie(Ring(line1), "secret");
  EXPECT_EQ(*MasterKeyRing::VersionOf(old_envelope), 1u);

  // Both keys loaded: old envelopes open, new ones use the new key.
  const MasterKeyRing both = Ring(line2 + line1);  // order in the text does not matter
  EXPECT_EQ(both.current_version(), 2u);
  EXPECT_THAT(both.versions(), ElementsAre(1u, 2u));
  EXPECT_TRUE(both.Has(1));
  EXPECT_TRUE(both.Has(2));
  EXPECT_FALSE(both.Has(3));
  EXPECT_EQ(*both.Open(old_envelope, kAd), "secret");
  const std::string new_envelope = SealOrDie(both, "secret");
  EXPECT_EQ(*MasterKeyRing::VersionOf(new_envelope), 2u);
  EXPECT_TRUE(absl::StartsWith(new_envelope, "v2."));

  // The old key retired: old envelopes name the missing version.
  const MasterKeyRing only2 = Ring(line2);
  absl::StatusOr<std::string> opened = only2.Open(old_envelope, kAd);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(opened.status().message(), "master key version 1 is not loaded");
  EXPECT_EQ(*only2.Open(new_envelope, kAd), "secret");

  // The version is authenticated: relabelling an envelope for another loaded key fails.
  ASSERT_TRUE(absl::StartsWith(old_envelope, "v1."));
  const std::string relabelled = "v2." + old_envelope.substr(3);
  EXPECT_EQ(only2.Open(relabelled, kAd).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(both.Open(relabelled, kAd).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(both.Open("v1." + new_envelope.substr(3), kAd).status().code(),
            absl::StatusCode::kDataLoss);

  // Even when two versions hold the same key bytes, where only the bound version can tell.
  const std::string key1 = line1.substr(2);
  const MasterKeyRing same = Ring("1 " + key1 + "2 " + key1);
  EXPECT_EQ(*same.Open(old_envelope, kAd), "secret");
  EXPECT_EQ(same.Open(relabelled, kAd).status().code(), absl::StatusCode::kDataLoss);
}

TEST(MasterKeyRingTest, MoveKeepsTheKeys) {
  MasterKeyRing a = Ring(KeyLine(3));
  const std::string envelope = SealOrDie(a, "secret");
  MasterKeyRing b = std::move(a);
  EXPECT_EQ(*b.Open(envelope, kAd), "secret");
  MasterKeyRing c = Ring(KeyLine(7, kMasterKeyBytes, 'z'));
  c = std::move(b);
  EXPECT_EQ(c.current_version(), 3u);
  EXPECT_EQ(*c.Open(envelope, kAd), "secret");
}

// --- MasterKeyRing: Parse / LoadFile / GenerateLine ------------------------------------------

TEST(MasterKeyRingTest, ParsesEntriesSeparatedByNewlinesAndSemicolons) {
  absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::Parse(absl::StrCat(
      "# master keys\n\n  ", KeyLine(1, kMasterKeyBytes, 'a'), "  \r\n", "\t# retired soon\n",
      KeyLine(5, kMasterKeyBytes, 'b'), ";;", KeyLine(3, kMasterKeyBytes, 'c'), ";\n"));
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_THAT(ring->versions(), ElementsAre(1u, 3u, 5u));
  EXPECT_EQ(ring->current_version(), 5u);
  EXPECT_FALSE(ring->empty());

  // The environment-variable form: one line.
  ring = MasterKeyRing::Parse(absl::StrCat(KeyLine(1), ";", KeyLine(2147483647)));
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_THAT(ring->versions(), ElementsAre(1u, 2147483647u));

  for (absl::string_view empty : {"", "\n", ";", "  ;\n# nothing\n"}) {
    ring = MasterKeyRing::Parse(empty);
    ASSERT_TRUE(ring.ok()) << ring.status();
    EXPECT_TRUE(ring->empty());
  }
}

TEST(MasterKeyRingTest, ParseErrorsNameTheEntryAndNeverTheKey) {
  const std::string good = KeyLine(1, kMasterKeyBytes, 'g');
  const std::string short_key = B64(std::string(31, 's'), sodium_base64_VARIANT_ORIGINAL);
  const std::string long_key = B64(std::string(33, 'l'), sodium_base64_VARIANT_ORIGINAL);
  const std::string dup_key = B64(std::string(32, 'd'), sodium_base64_VARIANT_ORIGINAL);
  const std::string ff_key = B64(std::string(32, '\xff'), sodium_base64_VARIANT_ORIGINAL);
  ASSERT_THAT(ff_key, HasSubstr("/"));
  const std::string urlsafe_key = absl::StrReplaceAll(ff_key, {{"/", "_"}});
  std::string unpadded_key = dup_key;
  ASSERT_EQ(unpadded_key.back(), '=');
  unpadded_key.pop_back();
  struct Case {
    std::string entry;
    std::string key_text;  // must not appear in the message
    std::string message;   // must appear
  };
  const std::vector<Case> cases = {
      {"2 " + short_key, short_key, "31 bytes"},
      {"2 " + long_key, long_key, "33 bytes"},
      {"2 " + dup_key.substr(0, 20) + "!" + dup_key.substr(21), dup_key.substr(0, 20), "base64"},
      {"2 " + urlsafe_key, urlsafe_key, "base64"},
      {"2 " + unpadded_key, unpadded_key, "base64"},
      {"2 " + dup_key + " extra", dup_key, "expected"},
      {"2", "2", "expected"},
      {dup_key, dup_key, "expected"},
      {"0 " + dup_key, dup_key, "outside"},
      {"2147483648 " + dup_key, dup_key, "outside"},
      {"99999999999999999999 " + dup_key, dup_key, "outside"},
      {"two " + dup_key, dup_key, "not a decimal"},
      {"-2 " + dup_key, dup_key, "not a decimal"},
      {"+2 " + dup_key, dup_key, "not a decimal"},
      {"0x2 " + dup_key, dup_key, "not a decimal"},
      {"1 " + dup_key, dup_key, "more than once"},
  };
  for (const Case& c : cases) {
    for (absl::string_view separator : {"\n", ";"}) {
      absl::StatusOr<MasterKeyRing> ring =
          MasterKeyRing::Parse(absl::StrCat("# keys", separator, good, separator, c.entry));
      ASSERT_FALSE(ring.ok()) << c.entry;
      EXPECT_EQ(ring.status().code(), absl::StatusCode::kInvalidArgument) << c.entry;
      EXPECT_THAT(ring.status().message(), HasSubstr("entry 3")) << c.entry;
      EXPECT_THAT(ring.status().message(), HasSubstr(c.message)) << c.entry;
      if (c.key_text.size() > 1) {
        EXPECT_THAT(ring.status().message(), Not(HasSubstr(c.key_text))) << c.entry;
      }
      EXPECT_THAT(ring.status().message(), Not(HasSubstr(good.substr(2)))) << c.entry;
    }
  }
}

std::string WriteFile(const std::string& name, const std::string& contents, mode_t mode) {
  const std::string path = ::testing::TempDir() + "/crypto_test_" + name;
  std::remove(path.c_str());
  std::ofstream(path, std::ios::binary) << contents;
  EXPECT_EQ(chmod(path.c_str(), mode), 0);
  return path;
}

TEST(MasterKeyRingTest, LoadFileRequiresOwnerOnlyMode) {
  const std::string contents = "# keys\n" + MasterKeyRing::GenerateLine(1) + KeyLine(2);
  for (mode_t mode : {0600, 0400}) {
    const std::string path = WriteFile("ok", contents, mode);
    absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::LoadFile(path);
    ASSERT_TRUE(ring.ok()) << ring.status();
    EXPECT_THAT(ring->versions(), ElementsAre(1u, 2u));
    std::remove(path.c_str());
  }
  for (mode_t mode : {0644, 0640, 0604, 0660, 0602}) {
    const std::string path = WriteFile("open", contents, mode);
    absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::LoadFile(path);
    EXPECT_EQ(ring.status().code(), absl::StatusCode::kFailedPrecondition) << std::oct << mode;
    EXPECT_THAT(ring.status().message(), HasSubstr("chmod 600 " + path));
    EXPECT_THAT(ring.status().message(), Not(HasSubstr(KeyLine(2).substr(2))));
    std::remove(path.c_str());
  }
}

TEST(MasterKeyRingTest, LoadFileErrors) {
  const std::string missing = ::testing::TempDir() + "/crypto_test_does_not_exist";
  std::remove(missing.c_str());
  EXPECT_EQ(MasterKeyRing::LoadFile(missing).status().code(), absl::StatusCode::kNotFound);

  const std::string bad = WriteFile("bad", KeyLine(1) + "\n" + KeyLine(2, 16), 0600);
  absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::LoadFile(bad);
  EXPECT_EQ(ring.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ring.status().message(), HasSubstr("entry 2"));
  EXPECT_THAT(ring.status().message(), HasSubstr(bad));
  std::remove(bad.c_str());

  // A directory is not a key file.
  EXPECT_FALSE(MasterKeyRing::LoadFile(::testing::TempDir()).ok());
}

TEST(MasterKeyRingTest, GenerateLineRoundTripsThroughParse) {
  const std::string line = MasterKeyRing::GenerateLine(42);
  ASSERT_TRUE(absl::StartsWith(line, "42 "));
  ASSERT_TRUE(absl::EndsWith(line, "\n"));
  const std::string key = line.substr(3, line.size() - 4);
  EXPECT_EQ(UnB64(key, sodium_base64_VARIANT_ORIGINAL).size(), kMasterKeyBytes);
  EXPECT_NE(line, MasterKeyRing::GenerateLine(42));

  absl::StatusOr<MasterKeyRing> ring = MasterKeyRing::Parse(line);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_THAT(ring->versions(), ElementsAre(42u));
  // The parsed key is the generated key: a ring built from the same line opens its envelopes.
  const std::string envelope = SealOrDie(*ring, "secret");
  EXPECT_EQ(*Ring(absl::StrCat("42 ", key)).Open(envelope, kAd), "secret");
}

// --- Access tokens ---------------------------------------------------------------------------

constexpr size_t kTokenLength = 3 + 16 + 1 + 52 + 7;

bool IsIdChar(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

TEST(AccessTokenTest, NewAccessKeyIdIsRandomLowerAlphanumeric) {
  std::set<std::string> seen;
  std::set<char> chars;
  for (int i = 0; i < 200; ++i) {
    const std::string id = NewAccessKeyId();
    ASSERT_EQ(id.size(), kAccessKeyIdLength);
    for (char c : id) {
      EXPECT_TRUE(IsIdChar(c)) << id;
      chars.insert(c);
    }
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 200u);
  // 3200 draws from 36 characters reach all of them (each is missed with p ~ 1e-38).
  EXPECT_EQ(chars.size(), 36u);
}

TEST(AccessTokenTest, NewTokenParses) {
  const std::string id = NewAccessKeyId();
  const std::string token = NewAccessToken(id);
  ASSERT_EQ(token.size(), kTokenLength);
  EXPECT_TRUE(absl::StartsWith(token, "mv_" + id + "_"));
  for (char c : token.substr(20)) {
    EXPECT_TRUE((c >= 'a' && c <= 'z') || (c >= '2' && c <= '7')) << c;
  }
  // 256 bits leave 4 zero bits in the 52nd character.
  EXPECT_THAT(std::string("aq"), HasSubstr(std::string(1, token[20 + 51])));

  absl::StatusOr<ParsedToken> parsed = ParseAccessToken(token);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->id, id);
  EXPECT_EQ(parsed->prefix, "mv_" + id + "_" + token.substr(20, 4));
  EXPECT_EQ(parsed->prefix.size(), 3u + 16 + 1 + 4);

  EXPECT_NE(NewAccessToken(id), token);
}

TEST(AccessTokenTest, ChecksumIsTruncatedBlake2bInBase32) {
  // Computed here from the header's definition, independently of the implementation.
  const std::string body = "mv_abcdefghij012345_" + Base32(std::string(32, '\x5a'));
  ASSERT_EQ(body.size(), 72u);
  unsigned char hash[crypto_generichash_BYTES_MIN];
  crypto_generichash(hash, sizeof(hash), reinterpret_cast<const unsigned char*>(body.data()),
                     body.size(), nullptr, 0);
  const std::string checksum = Base32(std::string(reinterpret_cast<char*>(hash), 4));
  ASSERT_EQ(checksum.size(), 7u);
  absl::StatusOr<ParsedToken> parsed = ParseAccessToken(body + checksum);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->id, "abcdefghij012345");
  EXPECT_EQ(parsed->prefix, "mv_abcdefghij012345_ljnf");

  // A 52nd secret character with nonzero padding bits does not come from 32 bytes, even
  // when its checksum is right.
  std::string odd = body;
  ASSERT_EQ(odd.back(), 'a');
  odd.back() = 'b';
  crypto_generichash(hash, sizeof(hash), reinterpret_cast<const unsigned char*>(odd.data()),
                     odd.size(), nullptr, 0);
  odd += Base32(std::string(reinterpret_cast<char*>(hash), 4));
  EXPECT_EQ(ParseAccessToken(odd).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(AccessTokenTest, EveryChangedCharacterIsRejected) {
  const std::string token = NewAccessToken(NewAccessKeyId());
  const std::string base32 = "abcdefghijklmnopqrstuvwxyz234567";
  const std::string id_chars = "abcdefghijklmnopqrstuvwxyz0123456789";
  for (size_t i = 3; i < token.size(); ++i) {
    if (i == 19) continue;  // the '_'
    for (char c : i < 19 ? id_chars : base32) {
      if (c == token[i]) continue;
      std::string bad = token;
      bad[i] = c;
      absl::StatusOr<ParsedToken> parsed = ParseAccessToken(bad);
      ASSERT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << i << " " << c;
      EXPECT_THAT(parsed.status().message(), Not(HasSubstr(bad.substr(20, 12))));
    }
  }
  // Except for the 52nd secret character, whose shape is checked, it is the checksum that
  // catches a typo.
  std::string typo = token;
  typo[25] = typo[25] == 'b' ? 'c' : 'b';
  EXPECT_THAT(ParseAccessToken(typo).status().message(), HasSubstr("checksum"));
}

TEST(AccessTokenTest, MalformedTokensAreRejected) {
  const std::string token = NewAccessToken("0123456789abcdef");
  std::string no_underscore = token;
  no_underscore[19] = 'a';
  std::string upper_id = token;
  upper_id[5] = 'X';
  std::string bad_id_char = token;
  bad_id_char[5] = '-';
  std::string digit_in_secret = token;
  digit_in_secret[30] = '1';
  std::string transposed = token;
  size_t swap_at = 40;
  while (transposed[swap_at] == transposed[swap_at + 1]) ++swap_at;
  std::swap(transposed[swap_at], transposed[swap_at + 1]);
  for (const std::string& bad : {std::string(),
                                 std::string("mv_"),
                                 "mx_" + token.substr(3),
                                 "MV_" + token.substr(3),
                                 "mv-" + token.substr(3),
                                 token.substr(3),
                                 token.substr(0, token.size() - 1),
                                 token.substr(1),
                                 token + "a",
                                 token + " ",
                                 " " + token,
                                 absl::AsciiStrToUpper(token),
                                 no_underscore,
                                 upper_id,
                                 bad_id_char,
                                 digit_in_secret,
                                 transposed,
                                 "mv_0123456789abcde_" + token.substr(19),
                                 token.substr(0, 72) + "=======",
                                 std::string(token.size(), 'a')}) {
    absl::StatusOr<ParsedToken> parsed = ParseAccessToken(bad);
    ASSERT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    if (bad.size() > 8) {
      EXPECT_THAT(parsed.status().message(), Not(HasSubstr(bad)));
    }
    EXPECT_THAT(parsed.status().message(), Not(HasSubstr(token.substr(20, 8))));
  }
  EXPECT_TRUE(ParseAccessToken(token).ok());
}

TEST(AccessTokenTest, HashIsKeyedBlake2bHex) {
  const std::string pepper1 = RandomBytes(32);
  const std::string pepper2 = RandomBytes(32);
  const std::string token1 = NewAccessToken(NewAccessKeyId());
  const std::string token2 = NewAccessToken(NewAccessKeyId());
  const std::string h = HashAccessToken(pepper1, token1);
  ASSERT_EQ(h.size(), 64u);
  for (char c : h) EXPECT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << h;
  EXPECT_EQ(HashAccessToken(pepper1, token1), h);
  EXPECT_NE(HashAccessToken(pepper2, token1), h);
  EXPECT_NE(HashAccessToken(pepper1, token2), h);

  // Keyed BLAKE2b-256 of the whole token, as the header specifies.
  unsigned char expected[32];
  crypto_generichash(expected, sizeof(expected),
                     reinterpret_cast<const unsigned char*>(token1.data()), token1.size(),
                     reinterpret_cast<const unsigned char*>(pepper1.data()), pepper1.size());
  char hex[65];
  sodium_bin2hex(hex, sizeof(hex), expected, sizeof(expected));
  EXPECT_EQ(h, hex);
}

TEST(AccessTokenDeathTest, PreconditionsAbort) {
  EXPECT_DEATH(HashAccessToken("", "mv_x"), "");
  EXPECT_DEATH(HashAccessToken("short", "mv_x"), "");
  EXPECT_DEATH(NewAccessToken("not-an-id"), "");
  EXPECT_DEATH(NewAccessToken("ABCDEFGHIJKLMNOP"), "");
}

TEST(AccessTokenTest, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_TRUE(ConstantTimeEquals(std::string("a\0b", 3), std::string("a\0b", 3)));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0b", 3), std::string("a\0c", 3)));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "bbc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("abcd", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", ""));
  EXPECT_FALSE(ConstantTimeEquals("", "abc"));
  const std::string h = HashAccessToken(std::string(32, 'p'), "t");
  EXPECT_TRUE(ConstantTimeEquals(h, HashAccessToken(std::string(32, 'p'), "t")));
  EXPECT_FALSE(ConstantTimeEquals(h, HashAccessToken(std::string(32, 'p'), "u")));
}

TEST(AccessTokenTest, RandomBytes) {
  EXPECT_EQ(RandomBytes(0), "");
  const std::string a = RandomBytes(32);
  ASSERT_EQ(a.size(), 32u);
  EXPECT_NE(a, RandomBytes(32));
  EXPECT_NE(a, std::string(32, '\0'));
}

}  // namespace
}  // namespace modelvault::crypto
