#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "modelvault/v1/credentials.pb.h"
#include "server/crypto/master_keys.h"
#include "storage/storage.h"

// The in-memory authority over provider keys on one replica. Acquisition
// picks and counts in memory (a mutex per provider, no database round trip),
// and Flush() adds the counts to per-day rows in batches and reads back what
// every replica counted, so the database never sees one UPDATE per call on a
// hot row. Health changes (ReportKeyOutcome) are written at once and read by
// the other replicas at their next Flush().
namespace modelvault::server {

struct KeyPoolOptions {
  // Days (and the daily limits) follow calendar days in this zone.
  absl::TimeZone zone = absl::UTCTimeZone();
  // First cool-down after a rate limit or server error; doubles per
  // consecutive failure up to `max_cooldown`.
  absl::Duration base_cooldown = absl::Seconds(1);
  absl::Duration max_cooldown = absl::Minutes(10);
  // How long a resolved env:/file: reference is reused.
  absl::Duration reference_ttl = absl::Seconds(1);
  // file: references resolve only under this folder ("" turns them off).
  std::string secret_file_dir;
};

class KeyPool final {
 public:
  using Clock = std::function<absl::Time()>;

  KeyPool(storage::Datastore& datastore, const crypto::MasterKeyRing& keys, KeyPoolOptions options,
          Clock clock = absl::Now);

  // Acquires from memory; nullopt when the provider (or a reference) must
  // first be loaded from the database or the file system: call Acquire then.
  std::optional<absl::StatusOr<v1::AcquireProviderKeyResponse>> TryAcquire(
      const v1::AcquireProviderKeyRequest& request);
  // Loads what is missing (blocking: call it off gRPC's threads) and acquires.
  absl::StatusOr<v1::AcquireProviderKeyResponse> Acquire(
      const v1::AcquireProviderKeyRequest& request);

  // Applies an outcome and writes the key's health (blocking).
  absl::StatusOr<v1::KeyHealth> Report(const v1::ReportKeyOutcomeRequest& request);

  // Writes pending counters and reads back every replica's counters and
  // health for the loaded keys (blocking; run it periodically).
  absl::Status Flush();

  // A key's settings or secrets changed: its provider reloads on next use.
  void Invalidate(absl::string_view key_name);

  // The calendar day of `time`, "YYYY-MM-DD" in the configured zone.
  std::string DayOf(absl::Time time) const;
  absl::Time Now() const { return clock_(); }

  // What this replica counted for `key_name` on `day` but has not written
  // yet (added to the database's counts by Get/List).
  v1::KeyUsage Unflushed(absl::string_view key_name, absl::string_view day);

 private:
  struct Secret {
    std::int64_t version = 0;
    std::string value;      // plaintext; empty for an unresolved reference
    std::string reference;  // env:/file: or ""
    absl::Time expire = absl::InfiniteFuture();
    absl::Time resolved = absl::InfinitePast();
  };
  struct Counts {
    std::int64_t requests = 0;
    std::int64_t tokens = 0;
  };
  struct Key {
    std::string name;
    v1::ProviderKey config;
    std::int64_t current_version = 0;
    std::vector<Secret> secrets;
    std::string day;                         // the day `shared` belongs to
    Counts shared;                           // every replica's flushed counts for `day`
    std::map<std::string, Counts> pending;   // day -> counted here, not yet written
    std::map<std::string, Counts> flushing;  // day -> being written now
    std::int64_t minute = -1;                // the calendar minute of `minute_count`
    std::int64_t minute_count = 0;
    absl::Time degraded_until = absl::InfinitePast();
    std::int64_t failures = 0;
    v1::KeyOutcome last_outcome = v1::KEY_OUTCOME_UNSPECIFIED;
    absl::Time last_outcome_time = absl::InfinitePast();
    absl::Time last_used = absl::InfinitePast();
  };
  struct Provider {
    std::mutex mu;
    bool loaded = false;                     // guarded by mu
    bool stale = true;                       // guarded by mu
    std::int64_t generation = 0;             // bumped by Invalidate; guarded by mu
    std::vector<std::unique_ptr<Key>> keys;  // guarded by mu
    size_t next = 0;                         // round-robin start for ties; guarded by mu
  };

  std::shared_ptr<Provider> ProviderFor(absl::string_view provider);
  // Reads keys, secrets, counters and health of `provider` (blocking) and
  // swaps them in, keeping what this replica counted.
  absl::Status Load(absl::string_view provider_name, Provider& provider);
  absl::Status FlushProvider(const std::string& provider_name, Provider& provider);
  // Picks and counts under provider.mu; nullopt when a reference needs
  // resolving first.
  std::optional<absl::StatusOr<v1::AcquireProviderKeyResponse>> Pick(
      const v1::AcquireProviderKeyRequest& request, Provider& provider, bool may_block);
  // Rolls `key` over to `day` (new day: its shared counts start at zero).
  static void Roll(Key& key, const std::string& day);
  static Counts Effective(const Key& key);
  // Takes a provider_key_health row (ReadHealth) unless this replica's own
  // report is newer.
  static void ApplyHealth(Key& key, const storage::SqlRow& row);

  storage::Datastore& datastore_;
  const crypto::MasterKeyRing& master_keys_;
  const KeyPoolOptions options_;
  const Clock clock_;

  // Flushes and Loads take turns: a Load swapping in counters read before a
  // Flush wrote them would drop that Flush's counts.
  std::mutex flush_mu_;
  std::mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Provider>> providers_;  // guarded by mu_
};

}  // namespace modelvault::server
