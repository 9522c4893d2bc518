#include "server/budget_ledger.h"

#include <sodium.h>

#include <algorithm>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/civil_time.h"
#include "google/protobuf/util/json_util.h"
#include "server/proto_time.h"
#include "storage/resource_store.h"
#include "storage/schema.h"
#include "storage/status_details.h"

// SQL of the ledger. Money is int64 nano-USD in the database and 128-bit in
// every sum and comparison here; no floating point anywhere. Lock order, the
// same in every transaction that touches budgets: reservations rows (sorted by
// name), then budget_spend rows sorted by (budget, period_start).
namespace modelvault::server {
namespace {

using storage::SqlCell;
using storage::SqlRow;
using storage::SqlType;

__extension__ using Int128 = __int128;  // GCC/Clang builtin; __extension__ keeps -Wpedantic quiet

constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
constexpr char kHeld[] = "STATE_HELD";
constexpr char kSettled[] = "STATE_SETTLED";
constexpr char kReleased[] = "STATE_RELEASED";
constexpr char kExpired[] = "STATE_EXPIRED";
constexpr char kAlertType[] = "modelvault.dev/BudgetAlert";
constexpr char kSavepoint[] = "mv_budget_apply";
// Expired reservations released per transaction by ExpireReservations.
constexpr int kExpireBatch = 500;
// Attempts when a budget is deleted while a transaction writes its rows.
constexpr int kDeletedBudgetAttempts = 3;

// Spend rows are keyed by (budget, period_start); std::map keeps them in lock order.
using SpendKey = std::pair<std::string, std::int64_t>;

std::int64_t Clamp(Int128 v) {
  if (v > kInt64Max) return kInt64Max;
  if (v < std::numeric_limits<std::int64_t>::min()) return std::numeric_limits<std::int64_t>::min();
  return static_cast<std::int64_t>(v);
}

std::string ToDecimal(Int128 v) {
  if (v == 0) return "0";
  const bool negative = v < 0;
  std::string digits;
  while (v != 0) {
    const int d = static_cast<int>(v % 10);
    digits.push_back(static_cast<char>('0' + (negative ? -d : d)));
    v /= 10;
  }
  if (negative) digits.push_back('-');
  std::reverse(digits.begin(), digits.end());
  return digits;
}

// Truncated to the microseconds the database keeps.
absl::Time Micros(absl::Time t) { return absl::FromUnixMicros(absl::ToUnixMicros(t)); }

std::string RandomId() {
  unsigned char bytes[16];
  randombytes_buf(bytes, sizeof(bytes));
  char hex[2 * sizeof(bytes) + 1];
  sodium_bin2hex(hex, sizeof(hex), bytes, sizeof(bytes));
  return hex;
}

// "(:p3, :p4, :p5)": one placeholder per value, numbered after `params`, which gains the values.
std::string Marks(const std::vector<std::string>& values, std::vector<SqlCell>& params) {
  std::vector<std::string> marks;
  marks.reserve(values.size());
  for (const std::string& v : values) {
    marks.push_back(absl::StrCat(":p", params.size()));
    params.emplace_back(v);
  }
  return absl::StrCat("(", absl::StrJoin(marks, ", "), ")");
}

absl::StatusOr<absl::TimeZone> ZoneOf(const v1::Budget& budget) {
  if (budget.time_zone().empty()) return absl::UTCTimeZone();
  absl::TimeZone zone;
  if (!absl::LoadTimeZone(budget.time_zone(), &zone)) {
    return absl::InvalidArgumentError(
        absl::StrCat(budget.name(), ": unknown time zone \"", budget.time_zone(), "\""));
  }
  return zone;
}

absl::StatusOr<BudgetPeriodBounds> PeriodIn(v1::BudgetPeriod period, absl::TimeZone zone,
                                            absl::Time t) {
  BudgetPeriodBounds out;
  absl::CivilDay first;
  absl::CivilDay next;
  const absl::CivilDay day = absl::ToCivilDay(t, zone);
  switch (period) {
    case v1::BUDGET_PERIOD_NONE:
      out.start = absl::InfinitePast();
      out.end = absl::InfiniteFuture();
      out.key = 0;
      return out;
    case v1::BUDGET_PERIOD_DAILY:
      first = day;
      next = day + 1;
      break;
    case v1::BUDGET_PERIOD_WEEKLY:
      first = absl::PrevWeekday(day + 1, absl::Weekday::monday);  // `day` itself on a Monday
      next = first + 7;
      break;
    case v1::BUDGET_PERIOD_MONTHLY: {
      const absl::CivilMonth month(day);
      first = absl::CivilDay(month);
      next = absl::CivilDay(month + 1);
      break;
    }
    default:
      return absl::InvalidArgumentError("the budget has no period");
  }
  // FromCivil resolves a skipped midnight (a DST gap) to the transition and a
  // repeated one to its first occurrence: periods tile time without gaps.
  out.start = absl::FromCivil(first, zone);
  out.end = absl::FromCivil(next, zone);
  out.key = absl::ToUnixMicros(out.start);
  return out;
}

// A budget as the ledger reads it (no CRUD fields).
struct LedgerBudget {
  v1::Budget budget;
  absl::TimeZone zone;
  std::vector<int> thresholds;  // sorted, distinct
};

// The scope values of the calls whose budgets a query looks for.
struct ScopeValues {
  std::set<std::string> users;
  std::set<std::string> access_keys;
  std::set<std::string> providers;
  std::set<std::string> models;

  void Add(const std::string& user, const std::string& access_key, const std::string& provider,
           const std::string& model) {
    if (!user.empty()) users.insert(user);
    if (!access_key.empty()) access_keys.insert(access_key);
    if (!provider.empty()) providers.insert(provider);
    if (!model.empty()) models.insert(model);
  }
};

bool Matches(const v1::Budget& b, const std::string& user, const std::string& access_key,
             const std::string& provider, const std::string& model) {
  const auto equal = [&b](const std::string& value) {
    return !value.empty() && b.scope_value() == value;
  };
  switch (b.scope()) {
    case v1::BUDGET_SCOPE_GLOBAL:
      return true;
    case v1::BUDGET_SCOPE_USER:
      return equal(user);
    case v1::BUDGET_SCOPE_ACCESS_KEY:
      return equal(access_key);
    case v1::BUDGET_SCOPE_PROVIDER:
      return equal(provider);
    case v1::BUDGET_SCOPE_MODEL:
      return equal(model);
    default:
      return false;
  }
}

// Every budget that can match the values, in name order: one query.
absl::StatusOr<std::vector<LedgerBudget>> MatchingBudgets(storage::Reader& reader,
                                                          const ScopeValues& values) {
  std::vector<SqlCell> params;
  std::string where = "scope = 'BUDGET_SCOPE_GLOBAL'";
  const std::pair<const char*, const std::set<std::string>*> scoped[] = {
      {"BUDGET_SCOPE_USER", &values.users},
      {"BUDGET_SCOPE_ACCESS_KEY", &values.access_keys},
      {"BUDGET_SCOPE_PROVIDER", &values.providers},
      {"BUDGET_SCOPE_MODEL", &values.models},
  };
  for (const auto& [scope, set] : scoped) {
    if (set->empty()) continue;
    absl::StrAppend(&where, " OR (scope = '", scope, "' AND scope_value IN ",
                    Marks(std::vector<std::string>(set->begin(), set->end()), params), ")");
  }
  absl::StatusOr<std::vector<SqlRow>> rows =
      reader.Query(absl::StrCat("SELECT name, scope, scope_value, period, time_zone, limit_nanos, "
                                "alert_thresholds_percent FROM budgets WHERE ",
                                where, " ORDER BY name"),
                   params,
                   {SqlType::kText, SqlType::kText, SqlType::kText, SqlType::kText, SqlType::kText,
                    SqlType::kInt64, SqlType::kText});
  if (!rows.ok()) return rows.status();
  std::vector<LedgerBudget> out;
  out.reserve(rows->size());
  for (const SqlRow& row : *rows) {
    LedgerBudget b;
    v1::BudgetScope scope = v1::BUDGET_SCOPE_UNSPECIFIED;
    v1::BudgetPeriod period = v1::BUDGET_PERIOD_UNSPECIFIED;
    if (!v1::BudgetScope_Parse(storage::CellText(row[1]), &scope) ||
        !v1::BudgetPeriod_Parse(storage::CellText(row[3]), &period)) {
      return absl::InternalError("a budget row holds an unknown scope or period");
    }
    // The thresholds column holds the proto JSON of a Budget with only that field.
    if (const std::string json = storage::CellText(row[6]); !json.empty()) {
      google::protobuf::util::JsonParseOptions options;
      options.ignore_unknown_fields = true;
      if (!google::protobuf::util::JsonStringToMessage(json, &b.budget, options).ok()) {
        return absl::InternalError("a budget row holds unreadable alert thresholds");
      }
    }
    b.budget.set_name(storage::CellText(row[0]));
    b.budget.set_scope(scope);
    b.budget.set_scope_value(storage::CellText(row[2]));
    b.budget.set_period(period);
    b.budget.set_time_zone(storage::CellText(row[4]));
    b.budget.set_limit_nanos(storage::CellInt(row[5]));
    absl::StatusOr<absl::TimeZone> zone = ZoneOf(b.budget);
    if (!zone.ok()) return absl::InternalError(zone.status().message());
    b.zone = *zone;
    b.thresholds.assign(b.budget.alert_thresholds_percent().begin(),
                        b.budget.alert_thresholds_percent().end());
    std::sort(b.thresholds.begin(), b.thresholds.end());
    b.thresholds.erase(std::unique(b.thresholds.begin(), b.thresholds.end()), b.thresholds.end());
    out.push_back(std::move(b));
  }
  return out;
}

// Holds of reservations: amounts to take off budget_spend.held_nanos, by row.
absl::Status CollectHolds(storage::Reader& reader, const std::vector<std::string>& reservations,
                          std::map<SpendKey, Int128>& release) {
  for (size_t begin = 0; begin < reservations.size(); begin += kExpireBatch) {
    const size_t end = std::min(reservations.size(), begin + kExpireBatch);
    std::vector<SqlCell> params;
    const std::string marks =
        Marks(std::vector<std::string>(reservations.begin() + static_cast<std::ptrdiff_t>(begin),
                                       reservations.begin() + static_cast<std::ptrdiff_t>(end)),
              params);
    absl::StatusOr<std::vector<SqlRow>> rows =
        reader.Query(absl::StrCat("SELECT budget, period_start, amount_nanos FROM "
                                  "reservation_holds WHERE reservation IN ",
                                  marks),
                     params, {SqlType::kText, SqlType::kInt64, SqlType::kInt64});
    if (!rows.ok()) return rows.status();
    for (const SqlRow& row : *rows) {
      release[{storage::CellText(row[0]), storage::CellInt(row[1])}] += storage::CellInt(row[2]);
    }
  }
  return absl::OkStatus();
}

// Marks the named HELD reservations (sorted) as `state` when still held (and,
// for expiry, past `expire_before`); adds their holds to `release`. Returns
// how many changed.
absl::StatusOr<int> EndReservations(storage::ReadWriteTx& tx, const std::vector<std::string>& names,
                                    const char* state, std::optional<absl::Time> expire_before,
                                    std::map<SpendKey, Int128>& release) {
  std::vector<std::string> ended;
  for (const std::string& name : names) {
    absl::StatusOr<std::int64_t> n =
        expire_before.has_value()
            ? tx.Exec(
                  "UPDATE reservations SET state = :p0 WHERE name = :p1 AND state = :p2 "
                  "AND expire_time <= :p3",
                  {SqlCell(state), SqlCell(name), SqlCell(kHeld),
                   SqlCell(absl::ToUnixMicros(*expire_before))})
            : tx.Exec("UPDATE reservations SET state = :p0 WHERE name = :p1 AND state = :p2",
                      {SqlCell(state), SqlCell(name), SqlCell(kHeld)});
    if (!n.ok()) return n.status();
    if (*n == 1) ended.push_back(name);
  }
  if (absl::Status s = CollectHolds(tx, ended, release); !s.ok()) return s;
  return static_cast<int>(ended.size());
}

// Takes released holds off budget_spend rows (never below zero). Callers
// merge these into their sorted pass over spend rows.
absl::Status ReleaseHeld(storage::ReadWriteTx& tx, const SpendKey& key, Int128 amount) {
  if (amount <= 0) return absl::OkStatus();
  const std::int64_t a = Clamp(amount);
  return tx
      .Exec(
          "UPDATE budget_spend SET held_nanos = CASE WHEN held_nanos > :p0 THEN held_nanos - :p1 "
          "ELSE 0 END WHERE budget = :p2 AND period_start = :p3",
          {SqlCell(a), SqlCell(a), SqlCell(key.first), SqlCell(key.second)})
      .status();
}

absl::Status ReleaseAll(storage::ReadWriteTx& tx, const std::map<SpendKey, Int128>& release) {
  for (const auto& [key, amount] : release) {
    if (absl::Status s = ReleaseHeld(tx, key, amount); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Reservation> ReadReservation(storage::Reader& reader, const std::string& name) {
  absl::StatusOr<std::vector<SqlRow>> rows = reader.Query(
      "SELECT user_id, access_key, provider, model, estimated_cost_nanos, expire_time, state, "
      "settled_cost_nanos, create_time FROM reservations WHERE name = :p0",
      {SqlCell(name)},
      {SqlType::kText, SqlType::kText, SqlType::kText, SqlType::kText, SqlType::kInt64,
       SqlType::kInt64, SqlType::kText, SqlType::kInt64, SqlType::kInt64});
  if (!rows.ok()) return rows.status();
  if (rows->empty()) {
    return WithResourceInfo(absl::NotFoundError(absl::StrCat(name, " does not exist")),
                            "modelvault.dev/Reservation", name);
  }
  const SqlRow& row = rows->front();
  v1::Reservation out;
  out.set_name(name);
  out.mutable_scopes()->set_user(storage::CellText(row[0]));
  out.mutable_scopes()->set_access_key(storage::CellText(row[1]));
  out.mutable_scopes()->set_provider(storage::CellText(row[2]));
  out.mutable_scopes()->set_model(storage::CellText(row[3]));
  out.set_estimated_cost_nanos(storage::CellInt(row[4]));
  *out.mutable_expire_time() = ToProto(absl::FromUnixMicros(storage::CellInt(row[5])));
  v1::Reservation::State state = v1::Reservation::STATE_UNSPECIFIED;
  v1::Reservation::State_Parse(storage::CellText(row[6]), &state);
  out.set_state(state);
  out.set_settled_cost_nanos(storage::CellInt(row[7]));
  *out.mutable_create_time() = ToProto(absl::FromUnixMicros(storage::CellInt(row[8])));
  absl::StatusOr<std::vector<SqlRow>> holds =
      reader.Query("SELECT budget FROM reservation_holds WHERE reservation = :p0 ORDER BY budget",
                   {SqlCell(name)}, {SqlType::kText});
  if (!holds.ok()) return holds.status();
  for (const SqlRow& h : *holds) out.add_budgets(storage::CellText(h[0]));
  return out;
}

// The id of the alert of threshold `t` in the period starting at `bounds`:
// deterministic, so the primary key raises it once per period everywhere.
std::string AlertName(const v1::Budget& budget, const BudgetPeriodBounds& bounds, int t) {
  std::string period = "all";
  if (budget.period() != v1::BUDGET_PERIOD_NONE) {
    period =
        absl::StrCat("p", absl::FormatTime("%Y%m%dt%H%M%Sz", bounds.start, absl::UTCTimeZone()));
    if (!storage::IsValidResourceId(period)) {  // years outside 1000..9999
      period =
          bounds.key < 0 ? absl::StrCat("n", -(bounds.key + 1)) : absl::StrCat("k", bounds.key);
    }
  }
  return absl::StrCat(budget.name(), "/alerts/", period, "-", t);
}

// One spend row an Apply touches: the spend to add and the holds to release.
struct SpendChange {
  Int128 spent = 0;
  Int128 release = 0;
  const LedgerBudget* budget = nullptr;  // set when spend is added
  BudgetPeriodBounds bounds;
};

absl::Status RaiseAlerts(storage::ReadWriteTx& tx, const LedgerBudget& b,
                         const BudgetPeriodBounds& bounds, Int128 old_spent, std::int64_t new_spent,
                         absl::Time now, std::vector<storage::ChangeRecord>* raised) {
  const Int128 limit = b.budget.limit_nanos();
  for (int t : b.thresholds) {
    const Int128 line = limit * t;  // t% of the limit, times 100
    if (!(old_spent * 100 < line && line <= Int128{new_spent} * 100)) continue;
    v1::BudgetAlert alert;
    alert.set_name(AlertName(b.budget, bounds, t));
    alert.set_threshold_percent(t);
    if (b.budget.period() != v1::BUDGET_PERIOD_NONE) {
      *alert.mutable_period_start_time() = ToProto(bounds.start);
    }
    alert.set_spent_nanos(new_spent);
    alert.set_limit_nanos(b.budget.limit_nanos());
    *alert.mutable_create_time() = ToProto(now);
    // No period start (NULL) for a budget without periods.
    const bool periodic = b.budget.period() != v1::BUDGET_PERIOD_NONE;
    absl::StatusOr<std::int64_t> n = tx.Exec(
        absl::StrCat("INSERT INTO budget_alerts (name, parent, revision, threshold_percent, "
                     "period_start_time, spent_nanos, limit_nanos, create_time) VALUES (:p0, "
                     ":p1, 1, :p2, ",
                     periodic ? ":p6" : "NULL", ", :p3, :p4, :p5) ON CONFLICT (name) DO NOTHING"),
        periodic ? std::vector<SqlCell>{SqlCell(alert.name()), SqlCell(b.budget.name()),
                                        SqlCell(std::int64_t{t}), SqlCell(new_spent),
                                        SqlCell(b.budget.limit_nanos()),
                                        SqlCell(absl::ToUnixMicros(now)),
                                        SqlCell(absl::ToUnixMicros(bounds.start))}
                 : std::vector<SqlCell>{SqlCell(alert.name()), SqlCell(b.budget.name()),
                                        SqlCell(std::int64_t{t}), SqlCell(new_spent),
                                        SqlCell(b.budget.limit_nanos()),
                                        SqlCell(absl::ToUnixMicros(now))});
    if (!n.ok()) return n.status();
    if (*n == 0) continue;  // raised before in this period (another replica, a retry)
    alert.set_etag(storage::EtagOf(1));
    storage::ChangeRecord change;
    change.time = now;
    change.resource_type = kAlertType;
    change.resource_name = alert.name();
    change.change_type = "CREATED";
    if (!google::protobuf::util::MessageToJsonString(alert, &change.resource_json).ok()) {
      return absl::InternalError("cannot encode a change record");
    }
    if (absl::Status s = tx.AppendChange(change); !s.ok()) return s;
    if (raised != nullptr) raised->push_back(std::move(change));
  }
  return absl::OkStatus();
}

absl::Status ApplyOnce(storage::ReadWriteTx& tx, const std::vector<Charge>& charges, absl::Time now,
                       std::vector<storage::ChangeRecord>* raised) {
  std::map<SpendKey, SpendChange> changes;
  // 1. Settlements: reservations rows first, in name order. The first charge
  // naming a reservation settles it.
  std::map<std::string, std::int64_t> settle;
  for (const Charge& c : charges) {
    if (!c.reservation.empty()) settle.emplace(c.reservation, c.cost_nanos);
  }
  std::vector<std::string> settled;
  for (const auto& [name, cost] : settle) {
    absl::StatusOr<std::int64_t> n = tx.Exec(
        "UPDATE reservations SET state = :p0, settled_cost_nanos = :p1 WHERE name = :p2 AND "
        "state = :p3",
        {SqlCell(kSettled), SqlCell(cost), SqlCell(name), SqlCell(kHeld)});
    if (!n.ok()) return n.status();
    if (*n == 1) settled.push_back(name);
  }
  std::map<SpendKey, Int128> release;
  if (absl::Status s = CollectHolds(tx, settled, release); !s.ok()) return s;
  for (const auto& [key, amount] : release) changes[key].release += amount;

  // 2. Spend on every matching budget, in the period of the call's time.
  ScopeValues values;
  for (const Charge& c : charges) values.Add(c.user, c.access_key, c.provider, c.model);
  absl::StatusOr<std::vector<LedgerBudget>> budgets = MatchingBudgets(tx, values);
  if (!budgets.ok()) return budgets.status();
  for (const Charge& c : charges) {
    for (const LedgerBudget& b : *budgets) {
      if (!Matches(b.budget, c.user, c.access_key, c.provider, c.model)) continue;
      absl::StatusOr<BudgetPeriodBounds> bounds = PeriodIn(b.budget.period(), b.zone, c.time);
      if (!bounds.ok()) return absl::InternalError(bounds.status().message());
      SpendChange& change = changes[{b.budget.name(), bounds->key}];
      change.spent += c.cost_nanos;
      change.budget = &b;
      change.bounds = *bounds;
    }
  }

  // 3. The spend rows, in (budget, period) order; then each threshold crossed.
  for (const auto& [key, change] : changes) {
    if (change.budget == nullptr) {
      if (absl::Status s = ReleaseHeld(tx, key, change.release); !s.ok()) return s;
      continue;
    }
    const std::int64_t add = Clamp(change.spent);
    const std::int64_t release_amount = Clamp(change.release);
    // Saturates at the int64 maximum instead of overflowing (add >= 0).
    absl::StatusOr<std::vector<SqlRow>> rows = tx.Query(
        "INSERT INTO budget_spend (budget, period_start, spent_nanos, held_nanos) VALUES (:p0, "
        ":p1, :p2, 0) ON CONFLICT (budget, period_start) DO UPDATE SET spent_nanos = CASE WHEN "
        "budget_spend.spent_nanos > 9223372036854775807 - excluded.spent_nanos THEN "
        "9223372036854775807 ELSE budget_spend.spent_nanos + excluded.spent_nanos END, "
        "held_nanos = CASE WHEN budget_spend.held_nanos > :p3 THEN budget_spend.held_nanos - "
        ":p4 ELSE 0 END RETURNING spent_nanos",
        {SqlCell(key.first), SqlCell(key.second), SqlCell(add), SqlCell(release_amount),
         SqlCell(release_amount)},
        {SqlType::kInt64});
    if (!rows.ok()) return rows.status();
    if (rows->empty()) return absl::InternalError("the budget spend upsert returned no row");
    const std::int64_t new_spent = storage::CellInt(rows->front()[0]);
    const Int128 old_spent = Int128{new_spent} - add;
    if (add == 0) continue;
    if (absl::Status s =
            RaiseAlerts(tx, *change.budget, change.bounds, old_spent, new_spent, now, raised);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BudgetPeriodBounds> PeriodOf(const v1::Budget& budget, absl::Time t) {
  absl::StatusOr<absl::TimeZone> zone = ZoneOf(budget);
  if (!zone.ok()) return zone.status();
  return PeriodIn(budget.period(), *zone, t);
}

BudgetLedger::BudgetLedger(std::function<absl::Time()> clock) : clock_(std::move(clock)) {}

absl::Status BudgetLedger::Apply(storage::ReadWriteTx& tx, const std::vector<Charge>& charges,
                                 std::vector<storage::ChangeRecord>* raised) {
  if (charges.empty()) return absl::OkStatus();
  for (const Charge& c : charges) {
    if (c.cost_nanos < 0) return absl::InvalidArgumentError("a charge's cost is negative");
  }
  const absl::Time now = Micros(clock_());
  const size_t mark = raised == nullptr ? 0 : raised->size();
  // A budget deleted while this batch runs makes its spend or alert insert
  // fail its foreign key (FAILED_PRECONDITION); the batch itself must not
  // fail for that: roll back to here and match again (it is gone then).
  if (absl::Status s = tx.Exec(absl::StrCat("SAVEPOINT ", kSavepoint), {}).status(); !s.ok()) {
    return s;
  }
  for (int attempt = 1;; ++attempt) {
    absl::Status status = ApplyOnce(tx, charges, now, raised);
    if (status.ok()) {
      return tx.Exec(absl::StrCat("RELEASE SAVEPOINT ", kSavepoint), {}).status();
    }
    if (!absl::IsFailedPrecondition(status) || attempt == kDeletedBudgetAttempts) return status;
    if (absl::Status s = tx.Exec(absl::StrCat("ROLLBACK TO SAVEPOINT ", kSavepoint), {}).status();
        !s.ok()) {
      return s;
    }
    if (raised != nullptr) raised->resize(mark);
  }
}

absl::StatusOr<v1::Reservation> BudgetLedger::Reserve(storage::Datastore& datastore,
                                                      const v1::UsageScopes& scopes,
                                                      std::int64_t estimated_cost_nanos,
                                                      absl::Duration ttl,
                                                      const storage::MutationContext* idempotency) {
  if (estimated_cost_nanos < 0) {
    return InvalidField("estimated_cost_nanos", "must not be negative");
  }
  if (ttl <= absl::ZeroDuration()) return InvalidField("ttl", "must be positive");
  const bool postgres = datastore.engine() == "postgresql";
  const bool idempotent = idempotency != nullptr && !idempotency->request_id.empty();
  v1::Reservation out;
  const auto reserve = [&](storage::ReadWriteTx& tx) -> absl::Status {
    const absl::Time now = Micros(clock_());
    if (idempotent) {
      absl::StatusOr<std::optional<storage::IdempotencyRecord>> found =
          tx.FindRequest(idempotency->request_id);
      if (!found.ok()) return found.status();
      if (found->has_value()) {
        const storage::IdempotencyRecord& record = **found;
        if (record.method != idempotency->method ||
            record.request_hash != idempotency->request_hash) {
          return WithErrorInfo(
              InvalidField("request_id", absl::StrCat("request_id \"", idempotency->request_id,
                                                      "\" was already used for a different "
                                                      "request; use a new id")),
              "REQUEST_ID_REUSED", {{"request_id", idempotency->request_id}});
        }
        std::string bytes;
        if (!absl::Base64Unescape(record.response, &bytes) || !out.ParseFromString(bytes)) {
          return absl::InternalError("stored idempotent response is unreadable");
        }
        return absl::OkStatus();
      }
    }
    ScopeValues values;
    values.Add(scopes.user(), scopes.access_key(), scopes.provider(), scopes.model());
    absl::StatusOr<std::vector<LedgerBudget>> budgets = MatchingBudgets(tx, values);
    if (!budgets.ok()) return budgets.status();
    std::vector<const LedgerBudget*> targets;
    std::vector<std::string> names;
    for (const LedgerBudget& b : *budgets) {
      if (!Matches(b.budget, scopes.user(), scopes.access_key(), scopes.provider(),
                   scopes.model())) {
        continue;
      }
      targets.push_back(&b);
      names.push_back(b.budget.name());
    }

    // 1. Reservations: expired holds on these budgets end first (name order).
    std::map<SpendKey, Int128> release;
    if (!names.empty()) {
      std::vector<SqlCell> params = {SqlCell(kHeld), SqlCell(absl::ToUnixMicros(now))};
      const std::string marks = Marks(names, params);
      absl::StatusOr<std::vector<SqlRow>> expired = tx.Query(
          absl::StrCat("SELECT DISTINCT r.name FROM reservations r JOIN reservation_holds h ON "
                       "h.reservation = r.name WHERE r.state = :p0 AND r.expire_time <= :p1 AND "
                       "h.budget IN ",
                       marks, " ORDER BY r.name"),
          params, {SqlType::kText});
      if (!expired.ok()) return expired.status();
      std::vector<std::string> expired_names;
      for (const SqlRow& row : *expired) expired_names.push_back(storage::CellText(row[0]));
      absl::StatusOr<int> ended = EndReservations(tx, expired_names, kExpired, now, release);
      if (!ended.ok()) return ended.status();
    }

    // 2. Spend rows in (budget, period) order: released holds taken off, the
    // current period's row of each target created if missing and locked.
    struct Target {
      const LedgerBudget* budget = nullptr;
      BudgetPeriodBounds bounds;
      std::int64_t spent = 0;
      std::int64_t held = 0;
    };
    std::vector<Target> locked(targets.size());
    struct Step {
      Int128 release = 0;
      int target = -1;  // index in `locked`, or -1 when only holds are released
    };
    std::map<SpendKey, Step> steps;
    for (const auto& [key, amount] : release) steps[key].release = amount;
    for (size_t i = 0; i < targets.size(); ++i) {
      absl::StatusOr<BudgetPeriodBounds> bounds =
          PeriodIn(targets[i]->budget.period(), targets[i]->zone, now);
      if (!bounds.ok()) return absl::InternalError(bounds.status().message());
      locked[i].budget = targets[i];
      locked[i].bounds = *bounds;
      steps[{targets[i]->budget.name(), bounds->key}].target = static_cast<int>(i);
    }
    for (const auto& [key, step] : steps) {
      if (step.target >= 0) {
        absl::StatusOr<std::int64_t> n = tx.Exec(
            "INSERT INTO budget_spend (budget, period_start, spent_nanos, held_nanos) VALUES "
            "(:p0, :p1, 0, 0) ON CONFLICT (budget, period_start) DO NOTHING",
            {SqlCell(key.first), SqlCell(key.second)});
        if (!n.ok()) return n.status();
      }
      if (absl::Status s = ReleaseHeld(tx, key, step.release); !s.ok()) return s;
      if (step.target < 0) continue;
      absl::StatusOr<std::vector<SqlRow>> row = tx.Query(
          absl::StrCat("SELECT spent_nanos, held_nanos FROM budget_spend WHERE budget = :p0 AND "
                       "period_start = :p1",
                       postgres ? " FOR UPDATE" : ""),
          {SqlCell(key.first), SqlCell(key.second)}, {SqlType::kInt64, SqlType::kInt64});
      if (!row.ok()) return row.status();
      if (row->empty()) return absl::InternalError("a budget spend row vanished");
      Target& t = locked[static_cast<size_t>(step.target)];
      t.spent = storage::CellInt(row->front()[0]);
      t.held = storage::CellInt(row->front()[1]);
    }

    // 3. The check, in budget-name order; nothing is written when it fails.
    for (const Target& t : locked) {
      const Int128 total = Int128{t.spent} + t.held + estimated_cost_nanos;
      if (total <= t.budget->budget.limit_nanos()) continue;
      const std::string& name = t.budget->budget.name();
      return WithErrorInfo(
          absl::ResourceExhaustedError(absl::StrCat(
              name, " would go past its limit: spent ", t.spent, " + held ", t.held, " + estimate ",
              estimated_cost_nanos, " = ", ToDecimal(total), " > limit ",
              t.budget->budget.limit_nanos(), " nano-USD in the current period")),
          "BUDGET_EXCEEDED",
          {{"budget", name},
           {"limit_nanos", absl::StrCat(t.budget->budget.limit_nanos())},
           {"spent_nanos", absl::StrCat(t.spent)},
           {"held_nanos", absl::StrCat(t.held)}});
    }

    // 4. The holds and the reservation.
    for (const Target& t : locked) {
      if (estimated_cost_nanos == 0) break;
      absl::StatusOr<std::int64_t> n = tx.Exec(
          "UPDATE budget_spend SET held_nanos = held_nanos + :p0 WHERE budget = :p1 AND "
          "period_start = :p2",
          {SqlCell(estimated_cost_nanos), SqlCell(t.budget->budget.name()), SqlCell(t.bounds.key)});
      if (!n.ok()) return n.status();
    }
    out.Clear();
    out.set_name(absl::StrCat("reservations/", RandomId()));
    *out.mutable_scopes() = scopes;
    out.set_estimated_cost_nanos(estimated_cost_nanos);
    const absl::Time expire = Micros(now + ttl);
    *out.mutable_expire_time() = ToProto(expire);
    out.set_state(v1::Reservation::STATE_HELD);
    *out.mutable_create_time() = ToProto(now);
    absl::StatusOr<std::int64_t> inserted = tx.Exec(
        "INSERT INTO reservations (name, user_id, access_key, provider, model, "
        "estimated_cost_nanos, expire_time, state, settled_cost_nanos, create_time) VALUES "
        "(:p0, :p1, :p2, :p3, :p4, :p5, :p6, :p7, 0, :p8)",
        {SqlCell(out.name()), SqlCell(scopes.user()), SqlCell(scopes.access_key()),
         SqlCell(scopes.provider()), SqlCell(scopes.model()), SqlCell(estimated_cost_nanos),
         SqlCell(absl::ToUnixMicros(expire)), SqlCell(kHeld), SqlCell(absl::ToUnixMicros(now))});
    if (!inserted.ok()) return inserted.status();
    if (!locked.empty()) {
      std::vector<SqlCell> params;
      std::vector<std::string> rows;
      for (const Target& t : locked) {
        rows.push_back(absl::StrCat("(:p", params.size(), ", :p", params.size() + 1, ", :p",
                                    params.size() + 2, ", :p", params.size() + 3, ")"));
        params.emplace_back(out.name());
        params.emplace_back(t.budget->budget.name());
        params.emplace_back(t.bounds.key);
        params.emplace_back(estimated_cost_nanos);
        out.add_budgets(t.budget->budget.name());
      }
      absl::StatusOr<std::int64_t> holds =
          tx.Exec(absl::StrCat("INSERT INTO reservation_holds (reservation, budget, "
                               "period_start, amount_nanos) VALUES ",
                               absl::StrJoin(rows, ", ")),
                  params);
      if (!holds.ok()) return holds.status();
    }
    if (idempotent) {
      return tx.SaveRequest(storage::IdempotencyRecord{
          idempotency->request_id, idempotency->method, idempotency->request_hash,
          absl::Base64Escape(out.SerializeAsString())});
    }
    return absl::OkStatus();
  };
  absl::Status status;
  for (int attempt = 1; attempt <= kDeletedBudgetAttempts; ++attempt) {
    status = datastore.ReadWriteTx(reserve);
    // FAILED_PRECONDITION only comes from a foreign key: a matching budget
    // was deleted meanwhile; the next attempt no longer sees it.
    if (!absl::IsFailedPrecondition(status)) break;
  }
  if (!status.ok()) return status;
  return out;
}

absl::StatusOr<v1::Reservation> BudgetLedger::Release(storage::Datastore& datastore,
                                                      const std::string& name) {
  v1::Reservation out;
  absl::Status status = datastore.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
    std::map<SpendKey, Int128> release;
    absl::StatusOr<int> ended = EndReservations(tx, {name}, kReleased, std::nullopt, release);
    if (!ended.ok()) return ended.status();
    if (*ended == 0) {
      absl::StatusOr<v1::Reservation> current = ReadReservation(tx, name);
      if (!current.ok()) return current.status();
      const std::string state = v1::Reservation::State_Name(current->state());
      return WithErrorInfo(
          absl::FailedPreconditionError(absl::StrCat(name, " is no longer held (", state, ")")),
          "RESERVATION_NOT_HELD", {{"reservation", name}, {"state", state}});
    }
    if (absl::Status s = ReleaseAll(tx, release); !s.ok()) return s;
    absl::StatusOr<v1::Reservation> released = ReadReservation(tx, name);
    if (!released.ok()) return released.status();
    out = *std::move(released);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return out;
}

absl::StatusOr<int> BudgetLedger::ExpireReservations(storage::Datastore& datastore) {
  int total = 0;
  for (;;) {
    const absl::Time now = Micros(clock_());
    size_t scanned = 0;
    int expired = 0;
    absl::Status status = datastore.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
      absl::StatusOr<std::vector<SqlRow>> rows = tx.Query(
          absl::StrCat("SELECT name FROM reservations WHERE state = :p0 AND expire_time <= :p1 "
                       "ORDER BY name LIMIT ",
                       kExpireBatch),
          {SqlCell(kHeld), SqlCell(absl::ToUnixMicros(now))}, {SqlType::kText});
      if (!rows.ok()) return rows.status();
      scanned = rows->size();
      std::vector<std::string> names;
      names.reserve(rows->size());
      for (const SqlRow& row : *rows) names.push_back(storage::CellText(row[0]));
      std::map<SpendKey, Int128> release;
      absl::StatusOr<int> ended = EndReservations(tx, names, kExpired, now, release);
      if (!ended.ok()) return ended.status();
      expired = *ended;
      return ReleaseAll(tx, release);
    });
    if (!status.ok()) return status;
    total += expired;
    if (scanned < static_cast<size_t>(kExpireBatch)) return total;
  }
}

absl::Status BudgetLedger::FillCurrentPeriod(storage::Reader& reader, v1::Budget& budget) {
  const absl::Time now = Micros(clock_());
  absl::StatusOr<BudgetPeriodBounds> bounds = PeriodOf(budget, now);
  if (!bounds.ok()) return bounds.status();
  absl::StatusOr<std::vector<SqlRow>> spend = reader.Query(
      "SELECT spent_nanos, held_nanos FROM budget_spend WHERE budget = :p0 AND period_start = :p1",
      {SqlCell(budget.name()), SqlCell(bounds->key)}, {SqlType::kInt64, SqlType::kInt64});
  if (!spend.ok()) return spend.status();
  // Holds past their expiry count no more, whether or not swept yet.
  absl::StatusOr<std::vector<SqlRow>> expired = reader.Query(
      "SELECT h.amount_nanos FROM reservation_holds h JOIN reservations r ON r.name = "
      "h.reservation WHERE h.budget = :p0 AND h.period_start = :p1 AND r.state = :p2 AND "
      "r.expire_time <= :p3",
      {SqlCell(budget.name()), SqlCell(bounds->key), SqlCell(kHeld),
       SqlCell(absl::ToUnixMicros(now))},
      {SqlType::kInt64});
  if (!expired.ok()) return expired.status();
  Int128 held = spend->empty() ? 0 : storage::CellInt(spend->front()[1]);
  for (const SqlRow& row : *expired) held -= storage::CellInt(row[0]);
  v1::BudgetPeriodState* state = budget.mutable_current_period();
  state->Clear();
  if (budget.period() != v1::BUDGET_PERIOD_NONE) {
    *state->mutable_start_time() = ToProto(bounds->start);
    *state->mutable_end_time() = ToProto(bounds->end);
  }
  state->set_spent_nanos(spend->empty() ? 0 : storage::CellInt(spend->front()[0]));
  state->set_held_nanos(Clamp(std::max<Int128>(held, 0)));
  return absl::OkStatus();
}

}  // namespace modelvault::server
