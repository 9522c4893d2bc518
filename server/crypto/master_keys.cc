#include "server/crypto/master_keys.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace modelvault::crypto {
namespace {

constexpr size_t kNonceBytes = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES;  // 24
constexpr size_t kTagBytes = crypto_aead_xchacha20poly1305_ietf_ABYTES;       // 16
constexpr std::uint32_t kMaxVersion = 2147483647;
// A key file holds a handful of short lines; anything larger is not one.
constexpr off_t kMaxKeyFileBytes = 1 << 20;

static_assert(kMasterKeyBytes == crypto_aead_xchacha20poly1305_ietf_KEYBYTES);

void EnsureSodium() {
  // sodium_init() is idempotent and thread-safe; it fails only when the system
  // cannot provide randomness, and nothing here is safe without it.
  static const bool ok = sodium_init() >= 0;
  if (!ok) std::abort();
}

const unsigned char* Bytes(absl::string_view s) {
  // An empty string_view may carry a null pointer; libsodium wants a valid one.
  static const unsigned char kEmpty = 0;
  return s.empty() ? &kEmpty : reinterpret_cast<const unsigned char*>(s.data());
}

void Wipe(std::string& s) {
  if (!s.empty()) sodium_memzero(s.data(), s.size());
}

void WipeKeys(std::map<std::uint32_t, std::string>& keys) {
  for (auto& [version, key] : keys) Wipe(key);
  keys.clear();
}

std::string Base64Encode(const unsigned char* bin, size_t len, int variant) {
  std::string out(sodium_base64_ENCODED_LEN(len, variant), '\0');  // includes the NUL
  sodium_bin2base64(out.data(), out.size(), bin, len, variant);
  out.resize(out.size() - 1);
  return out;
}

// Decodes strictly (no ignored characters, canonical trailing bits); false on
// any defect. `out` may hold partial key material afterwards: callers wipe it.
bool Base64Decode(absl::string_view text, int variant, std::string& out) {
  out.assign(text.size() * 3 / 4 + 3, '\0');
  size_t len = 0;
  if (sodium_base642bin(reinterpret_cast<unsigned char*>(out.data()), out.size(), text.data(),
                        text.size(), nullptr, &len, nullptr, variant) != 0) {
    return false;
  }
  out.resize(len);  // shrinking keeps the buffer, so no copy of the bytes is left behind
  return true;
}

// The version is authenticated along with the caller's associated data, so an
// envelope whose "v<N>." prefix was edited fails to open instead of being
// tried under another key. Digits never contain '|', so the split is unambiguous.
std::string AdditionalData(std::uint32_t version, absl::string_view associated_data) {
  return absl::StrCat(version, "|", associated_data);
}

struct Envelope {
  std::uint32_t version = 0;
  std::string bytes;  // nonce || ciphertext || tag
};

absl::Status Malformed() { return absl::DataLossError("sealed secret is malformed"); }

absl::StatusOr<Envelope> ParseEnvelope(absl::string_view text) {
  if (text.size() < 2 || text[0] != 'v') return Malformed();
  const size_t dot = text.find('.');
  if (dot == absl::string_view::npos) return Malformed();
  const absl::string_view digits = text.substr(1, dot - 1);
  // Canonical decimal only ("v01." is not "v1."), so one envelope has one spelling.
  if (digits.empty() || digits.size() > 10 || digits[0] == '0') return Malformed();
  for (char c : digits) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return Malformed();
  }
  std::uint64_t version = 0;
  if (!absl::SimpleAtoi(digits, &version) || version > kMaxVersion) return Malformed();
  Envelope envelope;
  envelope.version = static_cast<std::uint32_t>(version);
  if (!Base64Decode(text.substr(dot + 1), sodium_base64_VARIANT_URLSAFE_NO_PADDING,
                    envelope.bytes) ||
      envelope.bytes.size() < kNonceBytes + kTagBytes) {
    return Malformed();
  }
  return envelope;
}

// Parses one "<version> <base64>" entry into `ring_keys`. `position` is the
// 1-based index of the entry, the only way errors identify it.
absl::Status ParseEntry(absl::string_view entry, size_t position,
                        std::map<std::uint32_t, std::string>& ring_keys) {
  const auto error = [position](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("master key entry ", position, ": ", what));
  };
  std::vector<absl::string_view> fields =
      absl::StrSplit(entry, absl::ByAnyChar(" \t"), absl::SkipEmpty());
  if (fields.size() != 2) return error("expected \"<version> <base64 of 32 bytes>\"");
  // Messages never quote the version field either: with the version left out,
  // that field holds key text. Only a validated number is echoed (duplicates).
  for (char c : fields[0]) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) {
      return error("the version is not a decimal number");
    }
  }
  std::uint64_t version = 0;
  if (fields[0].size() > 10 || !absl::SimpleAtoi(fields[0], &version) || version < 1 ||
      version > kMaxVersion) {
    return error(absl::StrCat("the version is outside 1..", kMaxVersion));
  }
  std::string key;
  if (!Base64Decode(fields[1], sodium_base64_VARIANT_ORIGINAL, key)) {
    Wipe(key);
    return error("the key is not valid base64");
  }
  if (key.size() != kMasterKeyBytes) {
    const size_t got = key.size();
    Wipe(key);
    return error(absl::StrCat("the key is ", got, " bytes, not ", kMasterKeyBytes));
  }
  const auto [it, inserted] = ring_keys.emplace(static_cast<std::uint32_t>(version), std::string());
  if (!inserted) {
    Wipe(key);
    return error(absl::StrCat("version ", version, " appears more than once"));
  }
  it->second = std::move(key);  // moves the heap buffer: no copy of the key is left behind
  return absl::OkStatus();
}

}  // namespace

MasterKeyRing::~MasterKeyRing() { WipeKeys(keys_); }

MasterKeyRing& MasterKeyRing::operator=(MasterKeyRing&& other) noexcept {
  if (this != &other) {
    WipeKeys(keys_);  // a defaulted move would free these without wiping them
    keys_ = std::move(other.keys_);
  }
  return *this;
}

absl::StatusOr<MasterKeyRing> MasterKeyRing::Parse(absl::string_view text) {
  EnsureSodium();
  MasterKeyRing ring;  // its destructor wipes whatever was parsed if an entry fails
  size_t position = 0;
  for (absl::string_view entry : absl::StrSplit(text, absl::ByAnyChar("\n;"))) {
    ++position;
    entry = absl::StripAsciiWhitespace(entry);  // also drops the '\r' of CRLF files
    if (entry.empty() || entry[0] == '#') continue;
    if (absl::Status s = ParseEntry(entry, position, ring.keys_); !s.ok()) return s;
  }
  return ring;
}

absl::StatusOr<MasterKeyRing> MasterKeyRing::LoadFile(const std::string& path) {
  // Open first and check the opened file (fstat), so the mode checked is the
  // mode of the file read. O_NONBLOCK keeps a FIFO at `path` from hanging
  // startup; it is rejected below as not a regular file.
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat("master key file ", path, " does not exist"));
    }
    return absl::FailedPreconditionError(absl::StrCat("cannot open master key file ", path, ": ",
                                                      std::generic_category().message(err)));
  }
  struct Closer {
    explicit Closer(int f) : fd(f) {}
    int fd;
    Closer(const Closer&) = delete;
    Closer& operator=(const Closer&) = delete;
    ~Closer() { close(fd); }
  } closer(fd);

  struct stat st {};
  if (fstat(fd, &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot stat master key file ", path, ": ",
                                                      std::generic_category().message(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("master key file ", path, " is not a regular file"));
  }
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return absl::FailedPreconditionError(absl::StrCat("master key file ", path,
                                                      " is accessible by group or others (mode ",
                                                      mode, "); chmod 600 ", path));
  }
  if (st.st_size > kMaxKeyFileBytes) {
    return absl::FailedPreconditionError(
        absl::StrCat("master key file ", path, " is larger than ", kMaxKeyFileBytes, " bytes"));
  }

  // Sized once up front: growing the string would leave copies of the keys in
  // freed memory. One spare byte detects a file that grew after fstat.
  std::string text(static_cast<size_t>(st.st_size) + 1, '\0');
  size_t filled = 0;
  while (filled < text.size()) {
    const ssize_t n = read(fd, text.data() + filled, text.size() - filled);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      Wipe(text);
      return absl::FailedPreconditionError(absl::StrCat("cannot read master key file ", path, ": ",
                                                        std::generic_category().message(err)));
    }
    if (n == 0) break;
    filled += static_cast<size_t>(n);
  }
  if (filled == text.size()) {
    Wipe(text);
    return absl::FailedPreconditionError(
        absl::StrCat("master key file ", path, " changed while being read"));
  }
  absl::StatusOr<MasterKeyRing> ring = Parse(absl::string_view(text.data(), filled));
  Wipe(text);
  if (!ring.ok()) {
    return absl::Status(ring.status().code(),
                        absl::StrCat("master key file ", path, ": ", ring.status().message()));
  }
  return ring;
}

std::string MasterKeyRing::GenerateLine(std::uint32_t version) {
  EnsureSodium();
  unsigned char key[kMasterKeyBytes];
  randombytes_buf(key, sizeof(key));
  std::string line = absl::StrCat(
      version, " ", Base64Encode(key, sizeof(key), sodium_base64_VARIANT_ORIGINAL), "\n");
  sodium_memzero(key, sizeof(key));
  return line;
}

std::uint32_t MasterKeyRing::current_version() const {
  return keys_.empty() ? 0 : keys_.rbegin()->first;
}

std::vector<std::uint32_t> MasterKeyRing::versions() const {
  std::vector<std::uint32_t> out;
  out.reserve(keys_.size());
  for (const auto& [version, key] : keys_) out.push_back(version);
  return out;
}

absl::StatusOr<std::string> MasterKeyRing::Seal(absl::string_view plaintext,
                                                absl::string_view associated_data) const {
  EnsureSodium();
  if (keys_.empty()) return absl::FailedPreconditionError("no master key is loaded");
  const auto& [version, key] = *keys_.rbegin();
  const std::string ad = AdditionalData(version, associated_data);

  std::string bytes(kNonceBytes + plaintext.size() + kTagBytes, '\0');
  auto* nonce = reinterpret_cast<unsigned char*>(bytes.data());
  randombytes_buf(nonce, kNonceBytes);    // 192-bit random nonces do not collide in practice
  unsigned long long ciphertext_len = 0;  // NOLINT(google-runtime-int): libsodium's type
  crypto_aead_xchacha20poly1305_ietf_encrypt(nonce + kNonceBytes, &ciphertext_len, Bytes(plaintext),
                                             plaintext.size(), Bytes(ad), ad.size(), nullptr, nonce,
                                             Bytes(key));
  return absl::StrCat(
      "v", version, ".",
      Base64Encode(nonce, kNonceBytes + ciphertext_len, sodium_base64_VARIANT_URLSAFE_NO_PADDING));
}

absl::StatusOr<std::string> MasterKeyRing::Open(absl::string_view envelope,
                                                absl::string_view associated_data) const {
  EnsureSodium();
  absl::StatusOr<Envelope> parsed = ParseEnvelope(envelope);
  if (!parsed.ok()) return parsed.status();
  const auto key = keys_.find(parsed->version);
  if (key == keys_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("master key version ", parsed->version, " is not loaded"));
  }
  const std::string ad = AdditionalData(parsed->version, associated_data);
  const auto* nonce = reinterpret_cast<const unsigned char*>(parsed->bytes.data());
  std::string plaintext(parsed->bytes.size() - kNonceBytes - kTagBytes, '\0');
  unsigned long long plaintext_len = 0;  // NOLINT(google-runtime-int): libsodium's type
  if (crypto_aead_xchacha20poly1305_ietf_decrypt(reinterpret_cast<unsigned char*>(plaintext.data()),
                                                 &plaintext_len, nullptr, nonce + kNonceBytes,
                                                 parsed->bytes.size() - kNonceBytes, Bytes(ad),
                                                 ad.size(), nonce, Bytes(key->second)) != 0) {
    Wipe(plaintext);
    return absl::DataLossError(
        "sealed secret failed authentication (tampered, or sealed for another record)");
  }
  return plaintext;
}

absl::StatusOr<std::uint32_t> MasterKeyRing::VersionOf(absl::string_view envelope) {
  absl::StatusOr<Envelope> parsed = ParseEnvelope(envelope);
  if (!parsed.ok()) return parsed.status();
  return parsed->version;
}

}  // namespace modelvault::crypto
