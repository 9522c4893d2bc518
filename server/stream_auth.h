#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/auth.h"

// The authorization of a long-lived stream (WatchUsage, WatchAlerts, the
// catalog's Watch, IngestUsage). A stream is authorized when it opens, but it
// may outlive its access key: Check() runs before every message the server
// sends or stores for it, so that nothing goes out or in for a key that was
// revoked, expired, narrowed or rotated past its grace since. A check costs
// two atomic loads and a clock read while nothing about the keys changed.
namespace modelvault::server {

class StreamAuth final {
 public:
  StreamAuth(Authenticator& auth, Caller caller, std::string method)
      : auth_(auth), caller_(std::move(caller)), method_(std::move(method)) {}

  const Caller& caller() const { return caller_; }

  // OK while the caller may still use the stream; else the error that ends
  // it (the answer Authenticate would give the caller's token now). Once
  // refused, always refused. Thread-safe.
  absl::Status Check() {
    std::lock_guard lock(mu_);
    if (!refused_.ok()) return refused_;
    const std::int64_t version = auth_.version();
    if (version == checked_version_ && auth_.Now() < recheck_by_) return absl::OkStatus();
    absl::Time recheck_by = absl::InfinitePast();
    absl::Status status = auth_.Recheck(caller_, method_, &recheck_by);
    if (!status.ok()) {
      refused_ = status;
      return status;
    }
    checked_version_ = version;  // read before the check: a change during it checks again
    recheck_by_ = recheck_by;
    return absl::OkStatus();
  }

 private:
  Authenticator& auth_;
  const Caller caller_;
  const std::string method_;
  std::mutex mu_;
  std::int64_t checked_version_ = -1;             // guarded by mu_
  absl::Time recheck_by_ = absl::InfinitePast();  // guarded by mu_
  absl::Status refused_;                          // guarded by mu_
};

}  // namespace modelvault::server
