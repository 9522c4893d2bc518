#include "server/key_pool.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "server/log.h"
#include "server/proto_time.h"
#include "server/provider_keys.h"
#include "storage/status_details.h"

namespace modelvault::server {
namespace {

using google::protobuf::util::TimeUtil;
using storage::SqlCell;
using storage::SqlType;

const storage::ResourceSchema& KeySchema() {
  return *storage::SchemaRegistry::Default().ForMessage(v1::ProviderKey::descriptor());
}

std::string ProviderOf(absl::string_view key_name) {
  const size_t at = key_name.find("/keys/");
  return std::string(key_name.substr(0, at == absl::string_view::npos ? 0 : at));
}

std::string Rfc3339(absl::Time t) {
  return absl::FormatTime(absl::RFC3339_sec, t, absl::UTCTimeZone());
}

SqlCell MicrosOrNull(absl::Time t) {
  if (t == absl::InfinitePast() || t == absl::InfiniteFuture()) return std::nullopt;
  return absl::ToUnixMicros(t);
}

absl::Time TimeOrPast(const SqlCell& cell) {
  return cell.has_value() ? absl::FromUnixMicros(storage::CellInt(cell)) : absl::InfinitePast();
}

// Today's counters of every key of a provider, as every replica flushed them.
absl::StatusOr<std::vector<storage::SqlRow>> ReadUsage(storage::Reader& reader,
                                                       const std::string& provider,
                                                       const std::string& day) {
  return reader.Query(
      "SELECT u.key_name, u.requests, u.tokens FROM provider_key_usage u JOIN provider_keys k "
      "ON k.name = u.key_name WHERE k.parent = :p0 AND u.day = :p1",
      {provider, day}, {SqlType::kText, SqlType::kInt64, SqlType::kInt64});
}

// The shared health of every key of a provider: name, degraded_until,
// consecutive_failures, last_outcome, last_outcome_time.
absl::StatusOr<std::vector<storage::SqlRow>> ReadHealth(storage::Reader& reader,
                                                        const std::string& provider) {
  return reader.Query(
      "SELECT h.key_name, h.degraded_until, h.consecutive_failures, h.last_outcome, "
      "h.last_outcome_time FROM provider_key_health h JOIN provider_keys k ON k.name = "
      "h.key_name WHERE k.parent = :p0",
      {provider},
      {SqlType::kText, SqlType::kInt64, SqlType::kInt64, SqlType::kText, SqlType::kInt64});
}

}  // namespace

KeyPool::KeyPool(storage::Datastore& datastore, const crypto::MasterKeyRing& keys,
                 KeyPoolOptions options, Clock clock)
    : datastore_(datastore),
      master_keys_(keys),
      options_(std::move(options)),
      clock_(std::move(clock)) {}

std::string KeyPool::DayOf(absl::Time time) const {
  return absl::FormatCivilTime(absl::ToCivilDay(time, options_.zone));
}

std::shared_ptr<KeyPool::Provider> KeyPool::ProviderFor(absl::string_view provider) {
  std::lock_guard lock(mu_);
  std::shared_ptr<Provider>& p = providers_[provider];
  if (p == nullptr) p = std::make_shared<Provider>();
  return p;
}

void KeyPool::Invalidate(absl::string_view key_name) {
  std::shared_ptr<Provider> provider;
  {
    std::lock_guard lock(mu_);
    auto it = providers_.find(ProviderOf(key_name));
    if (it == providers_.end()) return;
    provider = it->second;
  }
  std::lock_guard lock(provider->mu);
  provider->stale = true;
  ++provider->generation;
}

void KeyPool::ApplyHealth(Key& key, const storage::SqlRow& row) {
  const absl::Time reported = TimeOrPast(row[4]);
  if (reported < key.last_outcome_time) return;  // this replica's report is newer
  key.degraded_until = TimeOrPast(row[1]);
  key.failures = storage::CellInt(row[2]);
  v1::KeyOutcome_Parse(storage::CellText(row[3]), &key.last_outcome);
  key.last_outcome_time = reported;
}

void KeyPool::Roll(Key& key, const std::string& day) {
  if (key.day == day) return;
  key.day = day;
  key.shared = {};  // the next Flush reads the new day's counts of every replica
}

KeyPool::Counts KeyPool::Effective(const Key& key) {
  Counts c = key.shared;
  for (const auto* m : {&key.pending, &key.flushing}) {
    if (auto it = m->find(key.day); it != m->end()) {
      c.requests += it->second.requests;
      c.tokens += it->second.tokens;
    }
  }
  return c;
}

absl::Status KeyPool::Load(absl::string_view provider_name, Provider& provider) {
  // Loads and flushes take turns (flush_mu_). Otherwise a Load that read the
  // counters before a Flush wrote them, and swapped its keys in after that
  // Flush had dropped its `flushing` counts, would lose those counts (in
  // neither the stale shared counts nor pending/flushing) and let keys run
  // past their limits. Concurrent loads of a provider also become one.
  std::lock_guard flush_lock(flush_mu_);
  std::int64_t generation = 0;
  {
    std::lock_guard lock(provider.mu);
    if (provider.loaded && !provider.stale) return absl::OkStatus();  // loaded meanwhile
    generation = provider.generation;
  }
  const absl::Time now = clock_();
  const std::string day = DayOf(now);
  std::vector<std::unique_ptr<Key>> fresh;
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    fresh.clear();
    storage::ListQuery query;
    query.parent = std::string(provider_name);
    query.order = {storage::OrderTerm{}};
    query.limit = 1000;
    absl::StatusOr<storage::ListResult> keys = reader.List(KeySchema(), query);
    if (!keys.ok()) return keys.status();
    absl::flat_hash_map<std::string, Key*> by_name;
    for (storage::StoredResource& item : keys->items) {
      auto key = std::make_unique<Key>();
      key->config = static_cast<const v1::ProviderKey&>(*item.message);
      key->name = key->config.name();
      key->current_version = key->config.secret_version();
      key->day = day;
      by_name[key->name] = key.get();
      fresh.push_back(std::move(key));
    }
    const std::string parent(provider_name);
    absl::StatusOr<std::vector<storage::SqlRow>> secrets = reader.Query(
        "SELECT s.key_name, s.version, s.envelope, s.reference, s.expire_time FROM "
        "provider_key_secrets s JOIN provider_keys k ON k.name = s.key_name WHERE k.parent = :p0 "
        "AND (s.expire_time IS NULL OR s.expire_time > :p1)",
        {parent, absl::ToUnixMicros(now)},
        {SqlType::kText, SqlType::kInt64, SqlType::kText, SqlType::kText, SqlType::kInt64});
    if (!secrets.ok()) return secrets.status();
    for (const storage::SqlRow& row : *secrets) {
      auto it = by_name.find(storage::CellText(row[0]));
      if (it == by_name.end()) continue;
      Secret secret;
      secret.version = storage::CellInt(row[1]);
      secret.reference = storage::CellText(row[3]);
      if (row[4].has_value()) secret.expire = absl::FromUnixMicros(storage::CellInt(row[4]));
      if (row[2].has_value()) {
        // A secret that does not open (tampered, or its master key missing)
        // leaves the version unusable; the key is skipped, never crashed on.
        absl::StatusOr<std::string> plain = master_keys_.Open(storage::CellText(row[2]), it->first);
        if (plain.ok()) {
          secret.value = *std::move(plain);
        } else {
          Log(LogLevel::kWarn, "a provider-key secret does not open; the version is skipped",
              {{"key", it->first},
               {"version", absl::StrCat(secret.version)},
               {"error", std::string(plain.status().message())}});
        }
      }
      it->second->secrets.push_back(std::move(secret));
    }
    absl::StatusOr<std::vector<storage::SqlRow>> usage = ReadUsage(reader, parent, day);
    if (!usage.ok()) return usage.status();
    for (const storage::SqlRow& row : *usage) {
      auto it = by_name.find(storage::CellText(row[0]));
      if (it == by_name.end()) continue;
      it->second->shared = {storage::CellInt(row[1]), storage::CellInt(row[2])};
    }
    absl::StatusOr<std::vector<storage::SqlRow>> health = ReadHealth(reader, parent);
    if (!health.ok()) return health.status();
    for (const storage::SqlRow& row : *health) {
      auto it = by_name.find(storage::CellText(row[0]));
      if (it != by_name.end()) ApplyHealth(*it->second, row);
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;

  std::lock_guard lock(provider.mu);
  for (auto& key : fresh) {
    for (auto& old : provider.keys) {
      // Only the same key: one deleted and created again under the name starts afresh.
      if (old->name != key->name || old->config.create_time() != key->config.create_time()) {
        continue;
      }
      // What this replica counted stays; the database's view is fresher
      // than the old shared counts.
      key->pending = std::move(old->pending);
      key->flushing = std::move(old->flushing);
      key->minute = old->minute;
      key->minute_count = old->minute_count;
      key->last_used = old->last_used;
      if (old->last_outcome_time > key->last_outcome_time) {
        key->degraded_until = old->degraded_until;
        key->failures = old->failures;
        key->last_outcome = old->last_outcome;
        key->last_outcome_time = old->last_outcome_time;
      }
      // A resolved reference is reused only for the very same reference.
      for (Secret& s : key->secrets) {
        for (const Secret& o : old->secrets) {
          if (o.version == s.version && !s.reference.empty() && o.reference == s.reference) {
            s.value = o.value;
            s.resolved = o.resolved;
          }
        }
      }
    }
  }
  provider.keys = std::move(fresh);
  provider.loaded = true;
  provider.stale = provider.generation != generation;
  return absl::OkStatus();
}

std::optional<absl::StatusOr<v1::AcquireProviderKeyResponse>> KeyPool::TryAcquire(
    const v1::AcquireProviderKeyRequest& request) {
  std::shared_ptr<Provider> provider = ProviderFor(request.provider());
  std::lock_guard lock(provider->mu);
  if (!provider->loaded || provider->stale) return std::nullopt;
  return Pick(request, *provider, /*may_block=*/false);
}

absl::StatusOr<v1::AcquireProviderKeyResponse> KeyPool::Acquire(
    const v1::AcquireProviderKeyRequest& request) {
  std::shared_ptr<Provider> provider = ProviderFor(request.provider());
  for (int attempt = 0; attempt < 3; ++attempt) {
    bool need_load = false;
    {
      std::lock_guard lock(provider->mu);
      need_load = !provider->loaded || provider->stale;
      if (!need_load) return *Pick(request, *provider, /*may_block=*/true);
    }
    if (absl::Status s = Load(request.provider(), *provider); !s.ok()) return s;
  }
  // Invalidated on every attempt: serve what was loaded last.
  std::lock_guard lock(provider->mu);
  return *Pick(request, *provider, /*may_block=*/true);
}

std::optional<absl::StatusOr<v1::AcquireProviderKeyResponse>> KeyPool::Pick(
    const v1::AcquireProviderKeyRequest& request, Provider& provider, bool may_block) {
  const absl::Time now = clock_();
  const std::string day = DayOf(now);
  const std::int64_t minute = absl::ToUnixSeconds(now) / 60;
  const absl::Time next_day =
      absl::FromCivil(absl::ToCivilDay(now, options_.zone) + 1, options_.zone);
  const absl::Time next_minute = absl::FromUnixSeconds((minute + 1) * 60);
  const std::int64_t estimated = std::max<std::int64_t>(0, request.estimated_tokens());

  // Eligible keys in rotation order; the least used wins, the first of equals.
  struct Candidate {
    Key* key;
    Secret* secret;
    size_t index;
    std::int64_t requests;
  };
  std::vector<Candidate> candidates;
  absl::Time earliest = absl::InfiniteFuture();
  bool any = false;
  const size_t n = provider.keys.size();
  for (size_t step = 0; step < n; ++step) {
    const size_t index = (provider.next + step) % n;
    Key& key = *provider.keys[index];
    if (!request.key().empty() && key.name != request.key()) continue;
    any = true;
    Roll(key, day);
    if (key.config.disabled()) continue;
    if (key.config.has_expire_time() && FromProto(key.config.expire_time()) <= now) continue;
    Secret* secret = nullptr;
    const std::int64_t want =
        request.secret_version() > 0 ? request.secret_version() : key.current_version;
    for (Secret& s : key.secrets) {
      if (s.version == want && (s.version == key.current_version || s.expire > now)) secret = &s;
    }
    if (secret == nullptr) {
      if (request.secret_version() > 0) {
        return absl::StatusOr<v1::AcquireProviderKeyResponse>(WithErrorInfo(
            absl::FailedPreconditionError(absl::StrCat("secret version ", want, " of ", key.name,
                                                       " is retired or does not exist")),
            "SECRET_VERSION_RETIRED", {{"key", key.name}}));
      }
      continue;
    }
    if (secret->reference.empty() && secret->value.empty()) continue;  // does not open
    absl::Time available = now;
    if (key.degraded_until > now) available = std::max(available, key.degraded_until);
    const Counts used = Effective(key);
    const v1::KeyLimits& limits = key.config.limits();
    if (limits.requests_per_day() > 0 && used.requests >= limits.requests_per_day()) {
      available = std::max(available, next_day);
    }
    if (limits.tokens_per_day() > 0 && used.tokens + estimated > limits.tokens_per_day()) {
      available = std::max(available, next_day);
    }
    const std::int64_t this_minute = key.minute == minute ? key.minute_count : 0;
    if (limits.requests_per_minute() > 0 && this_minute >= limits.requests_per_minute()) {
      available = std::max(available, next_minute);
    }
    if (available > now) {
      earliest = std::min(earliest, available);
      continue;
    }
    candidates.push_back({&key, secret, index, used.requests});
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& x, const Candidate& y) { return x.requests < y.requests; });
  // A reference that does not resolve passes the turn to the next key; its
  // error is the answer only when no key is left.
  Key* best = nullptr;
  Secret* best_secret = nullptr;
  size_t best_index = 0;
  absl::Status unresolved;
  for (const Candidate& c : candidates) {
    Secret& secret = *c.secret;
    if (!secret.reference.empty() &&
        (secret.value.empty() || now - secret.resolved > options_.reference_ttl)) {
      if (!may_block) return std::nullopt;
      absl::StatusOr<std::string> value =
          ResolveReference(secret.reference, options_.secret_file_dir);
      if (!value.ok()) {
        secret.value.clear();
        if (unresolved.ok()) unresolved = value.status();
        continue;
      }
      secret.value = *std::move(value);
      secret.resolved = now;
    }
    best = c.key;
    best_secret = c.secret;
    best_index = c.index;
    break;
  }
  if (best == nullptr && !unresolved.ok()) {
    return absl::StatusOr<v1::AcquireProviderKeyResponse>(unresolved);
  }
  if (best == nullptr) {
    if (!request.key().empty() && !any) {
      return absl::StatusOr<v1::AcquireProviderKeyResponse>(
          WithResourceInfo(absl::NotFoundError(absl::StrCat(request.key(), " does not exist")),
                           "modelvault.dev/ProviderKey", request.key()));
    }
    if (earliest != absl::InfiniteFuture()) {
      return absl::StatusOr<v1::AcquireProviderKeyResponse>(WithRetryInfo(
          WithErrorInfo(
              absl::ResourceExhaustedError(absl::StrCat(
                  "every key of ", request.provider(),
                  " is at a limit or cooling down; the first is available at ", Rfc3339(earliest))),
              "NO_KEY_AVAILABLE",
              {{"provider", request.provider()}, {"available_time", Rfc3339(earliest)}}),
          earliest - now));
    }
    return absl::StatusOr<v1::AcquireProviderKeyResponse>(WithErrorInfo(
        absl::FailedPreconditionError(absl::StrCat(
            request.provider(), any ? " has no enabled, unexpired key with a usable secret"
                                    : " has no keys; create one with CreateProviderKey")),
        "NO_USABLE_KEY", {{"provider", request.provider()}}));
  }
  Counts& pending = best->pending[day];
  pending.requests += 1;
  pending.tokens += estimated;
  if (best->minute != minute) {
    best->minute = minute;
    best->minute_count = 0;
  }
  ++best->minute_count;
  best->last_used = now;
  provider.next = (best_index + 1) % n;

  v1::AcquireProviderKeyResponse response;
  response.set_key(best->name);
  response.set_secret(best_secret->value);
  response.set_secret_version(best_secret->version);
  const Counts used = Effective(*best);
  const v1::KeyLimits& limits = best->config.limits();
  response.set_requests_remaining(
      limits.requests_per_day() > 0 ? limits.requests_per_day() - used.requests : -1);
  response.set_tokens_remaining(
      limits.tokens_per_day() > 0 ? std::max<std::int64_t>(0, limits.tokens_per_day() - used.tokens)
                                  : -1);
  return absl::StatusOr<v1::AcquireProviderKeyResponse>(std::move(response));
}

absl::StatusOr<v1::KeyHealth> KeyPool::Report(const v1::ReportKeyOutcomeRequest& request) {
  const std::string provider_name = ProviderOf(request.key());
  std::shared_ptr<Provider> provider = ProviderFor(provider_name);
  bool need_load = false;
  {
    std::lock_guard lock(provider->mu);
    need_load = !provider->loaded || provider->stale;
  }
  if (need_load) {
    if (absl::Status s = Load(provider_name, *provider); !s.ok()) return s;
  }
  const absl::Time now = clock_();
  v1::KeyHealth health;
  std::vector<SqlCell> row;
  {
    std::lock_guard lock(provider->mu);
    Key* key = nullptr;
    for (auto& k : provider->keys) {
      if (k->name == request.key()) key = k.get();
    }
    if (key == nullptr) {
      return WithResourceInfo(absl::NotFoundError(absl::StrCat(request.key(), " does not exist")),
                              "modelvault.dev/ProviderKey", request.key());
    }
    const std::string day = DayOf(now);
    Roll(*key, day);
    // Corrects today's token count by what the call really used, never below
    // zero (a report cannot buy back more than was counted).
    std::int64_t correction = request.tokens_used() - request.estimated_tokens();
    correction = std::max(correction, -Effective(*key).tokens);
    if (correction != 0) key->pending[day].tokens += correction;
    switch (request.outcome()) {
      case v1::KEY_OUTCOME_SUCCESS:
        key->failures = 0;
        key->degraded_until = absl::InfinitePast();
        break;
      case v1::KEY_OUTCOME_RATE_LIMITED:
      case v1::KEY_OUTCOME_SERVER_ERROR:
      case v1::KEY_OUTCOME_AUTH_ERROR: {
        ++key->failures;
        absl::Duration cooldown = options_.base_cooldown;
        for (std::int64_t i = 1; i < key->failures && cooldown < options_.max_cooldown; ++i) {
          cooldown *= 2;
        }
        cooldown = std::min(cooldown, options_.max_cooldown);
        if (request.outcome() == v1::KEY_OUTCOME_AUTH_ERROR) cooldown = options_.max_cooldown;
        if (request.has_retry_after()) {
          const absl::Duration retry_after = absl::Seconds(request.retry_after().seconds()) +
                                             absl::Nanoseconds(request.retry_after().nanos());
          // The provider knows best, within reason.
          cooldown = std::clamp(retry_after, absl::ZeroDuration(), absl::Hours(1));
        }
        key->degraded_until = now + cooldown;
        break;
      }
      default:
        break;  // a client error says nothing about the key
    }
    key->last_outcome = request.outcome();
    key->last_outcome_time = now;
    if (key->degraded_until > now) *health.mutable_degraded_until() = ToProto(key->degraded_until);
    health.set_consecutive_failures(key->failures);
    health.set_last_outcome(key->last_outcome);
    *health.mutable_last_outcome_time() = ToProto(now);
    row = {key->name, MicrosOrNull(key->degraded_until), key->failures,
           v1::KeyOutcome_Name(key->last_outcome), absl::ToUnixMicros(now)};
  }
  absl::Status status = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) {
    return tx
        .Exec(
            "INSERT INTO provider_key_health (key_name, degraded_until, consecutive_failures, "
            "last_outcome, last_outcome_time) VALUES (:p0, :p1, :p2, :p3, :p4) ON CONFLICT "
            "(key_name) DO UPDATE SET degraded_until = excluded.degraded_until, "
            "consecutive_failures = excluded.consecutive_failures, last_outcome = "
            "excluded.last_outcome, last_outcome_time = excluded.last_outcome_time",
            row)
        .status();
  });
  if (!status.ok()) return status;
  return health;
}

v1::KeyUsage KeyPool::Unflushed(absl::string_view key_name, absl::string_view day) {
  v1::KeyUsage usage;
  std::shared_ptr<Provider> provider;
  {
    std::lock_guard lock(mu_);
    auto it = providers_.find(ProviderOf(key_name));
    if (it == providers_.end()) return usage;
    provider = it->second;
  }
  std::lock_guard lock(provider->mu);
  for (const auto& key : provider->keys) {
    if (key->name != key_name) continue;
    for (const auto* m : {&key->pending, &key->flushing}) {
      if (auto it = m->find(std::string(day)); it != m->end()) {
        usage.set_requests(usage.requests() + it->second.requests);
        usage.set_tokens(usage.tokens() + it->second.tokens);
      }
    }
    if (key->last_used != absl::InfinitePast()) {
      *usage.mutable_last_used_time() = ToProto(key->last_used);
    }
  }
  return usage;
}

absl::Status KeyPool::Flush() {
  std::lock_guard flush_lock(flush_mu_);
  std::vector<std::pair<std::string, std::shared_ptr<Provider>>> providers;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, p] : providers_) providers.emplace_back(name, p);
  }
  absl::Status first_error;
  for (auto& [name, provider] : providers) {
    absl::Status s = FlushProvider(name, *provider);
    if (!s.ok() && first_error.ok()) first_error = s;
  }
  return first_error;
}

absl::Status KeyPool::FlushProvider(const std::string& provider_name, Provider& provider) {
  struct Delta {
    std::string key;
    std::string day;
    Counts counts;
    absl::Time last_used;
  };
  std::vector<Delta> deltas;
  {
    std::lock_guard lock(provider.mu);
    if (!provider.loaded || provider.keys.empty()) return absl::OkStatus();
    for (auto& key : provider.keys) {
      for (auto& [day, counts] : key->pending) {
        if (counts.requests == 0 && counts.tokens == 0) continue;
        deltas.push_back({key->name, day, counts, key->last_used});
        Counts& f = key->flushing[day];
        f.requests += counts.requests;
        f.tokens += counts.tokens;
      }
      key->pending.clear();
    }
  }
  absl::Status written = absl::OkStatus();
  if (!deltas.empty()) {
    written = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
      for (const Delta& d : deltas) {
        // Keys deleted meanwhile are skipped rather than failing the batch.
        absl::StatusOr<std::int64_t> n = tx.Exec(
            "INSERT INTO provider_key_usage (key_name, day, requests, tokens, last_used_time) "
            "SELECT :p0, :p1, :p2, :p3, :p4 WHERE EXISTS (SELECT 1 FROM provider_keys WHERE "
            "name = :p5) ON CONFLICT (key_name, day) DO UPDATE SET requests = "
            "provider_key_usage.requests + excluded.requests, tokens = provider_key_usage.tokens "
            "+ excluded.tokens, last_used_time = CASE WHEN provider_key_usage.last_used_time IS "
            "NULL OR excluded.last_used_time > provider_key_usage.last_used_time THEN "
            "excluded.last_used_time ELSE provider_key_usage.last_used_time END",
            {d.key, d.day, d.counts.requests, d.counts.tokens, MicrosOrNull(d.last_used), d.key});
        if (!n.ok()) return n.status();
      }
      return absl::OkStatus();
    });
  }
  if (!written.ok()) {
    // Nothing was written: the counts go back to pending for the next Flush.
    std::lock_guard lock(provider.mu);
    for (auto& key : provider.keys) {
      for (auto& [day, counts] : key->flushing) {
        Counts& p = key->pending[day];
        p.requests += counts.requests;
        p.tokens += counts.tokens;
      }
      key->flushing.clear();
    }
    return written;
  }
  // Read back every replica's counts for today and the shared health.
  const absl::Time now = clock_();
  const std::string day = DayOf(now);
  std::vector<storage::SqlRow> usage;
  std::vector<storage::SqlRow> health;
  absl::Status read = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<storage::SqlRow>> u = ReadUsage(reader, provider_name, day);
    if (!u.ok()) return u.status();
    usage = *std::move(u);
    absl::StatusOr<std::vector<storage::SqlRow>> h = ReadHealth(reader, provider_name);
    if (!h.ok()) return h.status();
    health = *std::move(h);
    return absl::OkStatus();
  });
  std::lock_guard lock(provider.mu);
  for (auto& key : provider.keys) key->flushing.clear();  // written: now in the shared counts
  if (!read.ok()) {
    // Until the next successful read the written counts must still count.
    for (const Delta& d : deltas) {
      for (auto& key : provider.keys) {
        if (key->name == d.key && key->day == d.day) {
          key->shared.requests += d.counts.requests;
          key->shared.tokens += d.counts.tokens;
        }
      }
    }
    return read;
  }
  for (auto& key : provider.keys) {
    Roll(*key, day);
    key->shared = {};
    for (const storage::SqlRow& row : usage) {
      if (storage::CellText(row[0]) == key->name) {
        key->shared = {storage::CellInt(row[1]), storage::CellInt(row[2])};
      }
    }
    for (const storage::SqlRow& row : health) {
      if (storage::CellText(row[0]) == key->name) ApplyHealth(*key, row);
    }
  }
  return absl::OkStatus();
}

}  // namespace modelvault::server
