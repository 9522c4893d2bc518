#include "server/usage_ledger.h"

#include <sodium.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <tuple>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/civil_time.h"
#include "modelvault/v1/catalog_resources.pb.h"
#include "server/catalog_service.h"
#include "server/cursor.h"
#include "server/proto_time.h"
#include "server/usage_sql.h"
#include "server/validation.h"
#include "storage/schema.h"

namespace modelvault::server {
namespace {

using storage::SqlCell;
using storage::SqlRow;

constexpr std::int64_t kMaxTokens = 1'000'000'000'000;  // per class and call
constexpr absl::Duration kMaxLatency = absl::Hours(24);
constexpr absl::Duration kMaxFuture = absl::Hours(1);
constexpr double kSlotRatio = 1.1;
// Advisory lock of rollup compaction: arbitrary, "mv" 0x11.
constexpr std::int64_t kCompactionLock = 0x6d76'1100;
// usage_rollups.part: a batch's totals, or a key's folded row.
constexpr std::int64_t kPartRow = 1;
constexpr std::int64_t kFoldedRow = 0;
// GCC's 128-bit integer; __extension__ keeps -Wpedantic quiet about it.
__extension__ using Int128 = __int128;

bool ValidText(absl::string_view text, size_t max) {
  return text.size() <= max && IsValidUtf8(text);
}

// "providers/{id}" → id, or "" when malformed.
absl::string_view IdAfter(absl::string_view name, absl::string_view prefix) {
  if (!absl::StartsWith(name, prefix)) return "";
  absl::string_view id = name.substr(prefix.size());
  return storage::IsValidResourceId(id) ? id : "";
}

void CheckDuration(const google::protobuf::Duration& d, const std::string& field,
                   std::vector<FieldViolation>& out) {
  if (d.seconds() < 0 || d.nanos() < 0 || d.nanos() > 999'999'999) {
    out.push_back({field, "must not be negative"});
  } else if (FromProto(d) > kMaxLatency) {
    out.push_back({field, "must be at most 24 hours"});
  }
}

std::string ContentHash(const v1::UsageRecord& record) {
  // One serialization buffer per thread, reused: no allocation per record.
  thread_local std::string bytes;
  bytes.clear();
  google::protobuf::io::StringOutputStream stream(&bytes);
  {
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    record.SerializeToCodedStream(&coded);
  }
  unsigned char digest[16];
  crypto_generichash(digest, sizeof digest, reinterpret_cast<const unsigned char*>(bytes.data()),
                     bytes.size(), nullptr, 0);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof digest));
}

// Appends `text` as a JSON string.
void AppendJsonString(std::string& out, absl::string_view text) {
  out.push_back('"');
  for (const char c : text) {
    switch (c) {
      case '"':
        out.append("\\\"");
        break;
      case '\\':
        out.append("\\\\");
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppend(&out, "\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

// Rows [begin, end) as one JSON array of arrays.
std::string RowsJson(const std::vector<SqlRow>& rows, size_t begin, size_t end) {
  std::string out = "[";
  for (size_t r = begin; r < end; ++r) {
    out.append(r == begin ? "[" : ",[");
    for (size_t c = 0; c < rows[r].size(); ++c) {
      if (c > 0) out.push_back(',');
      const SqlCell& cell = rows[r][c];
      if (!cell.has_value()) {
        out.append("null");
      } else if (const auto* n = std::get_if<std::int64_t>(&*cell)) {
        absl::StrAppend(&out, *n);
      } else {
        AppendJsonString(out, storage::CellText(cell));
      }
    }
    out.push_back(']');
  }
  out.push_back(']');
  return out;
}

// "SELECT <columns> FROM <rows>" over rows sent as one JSON array of arrays
// in parameter :p0 (see RowsJson), unpacked by the database
// (jsonb_array_elements on PostgreSQL, json_each on SQLite). `types` has one
// letter per column: 'i' for BIGINT, 't' for TEXT.
std::string SelectJsonRows(bool postgres, absl::string_view types) {
  std::vector<std::string> columns;
  for (size_t i = 0; i < types.size(); ++i) {
    if (postgres) {
      columns.push_back(types[i] == 'i' ? absl::StrCat("(t.j->>", i, ")::BIGINT")
                                        : absl::StrCat("t.j->>", i));
    } else {
      columns.push_back(absl::StrCat("t.value->>", i));
    }
  }
  return absl::StrCat(
      "SELECT ", absl::StrJoin(columns, ", "), " FROM ",
      postgres ? "jsonb_array_elements(CAST(:p0 AS jsonb)) AS t(j)" : "json_each(:p0) AS t");
}

// Writes many rows with one statement per few thousand, their values in one
// JSON parameter instead of hundreds of bound parameters (the upserts; plain
// inserts use ReadWriteTx::CopyRows).
absl::Status InsertRows(storage::ReadWriteTx& tx, bool postgres, absl::string_view head,
                        absl::string_view types, const std::vector<SqlRow>& rows,
                        absl::string_view tail) {
  if (rows.empty()) return absl::OkStatus();
  // "WHERE true" keeps SQLite from reading ON CONFLICT as part of the FROM.
  const std::string sql =
      absl::StrCat(head, " ", SelectJsonRows(postgres, types), " WHERE true", tail);
  constexpr size_t kRowsPerStatement = 5000;
  for (size_t begin = 0; begin < rows.size(); begin += kRowsPerStatement) {
    const size_t end = std::min(rows.size(), begin + kRowsPerStatement);
    absl::StatusOr<std::int64_t> n = tx.Exec(sql, {SqlCell(RowsJson(rows, begin, end))});
    if (!n.ok()) return n.status();
  }
  return absl::OkStatus();
}

// Hour (UTC) containing t, in micros.
std::int64_t HourOf(absl::Time t) {
  const std::int64_t micros = absl::ToUnixMicros(t);
  constexpr std::int64_t kHour = 3'600'000'000;
  return micros - (((micros % kHour) + kHour) % kHour);
}

// Rollup totals of one (hour, dimensions) key.
struct Totals {
  std::int64_t requests = 0, errors = 0, cancelled = 0;
  std::int64_t input = 0, output = 0, cache_read = 0, cache_write = 0, reasoning = 0;
  std::int64_t cost = 0, unpriced = 0, latency_sum = 0, ttft_sum = 0, ttft_count = 0;
  std::map<int, std::int64_t> slots;  // latency histogram
};
// Hour, provider, model, provider key, access key, user: views into the
// batch's records (no copies per record).
using RollupKey = std::tuple<std::int64_t, absl::string_view, absl::string_view, absl::string_view,
                             absl::string_view, absl::string_view>;
// Hashed, not ordered: parts are appended, so no row order is needed to
// lock rows in one order, and a tree's string compares cost more per record.
using Rollups = absl::flat_hash_map<RollupKey, Totals>;

// Types of a usage_rollups row as CompactRollups reads it.
const std::vector<storage::SqlType>& RollupRowTypes() {
  static const auto* types = [] {
    auto* t = new std::vector<storage::SqlType>{storage::SqlType::kInt64};
    t->insert(t->end(), 5, storage::SqlType::kText);
    t->insert(t->end(), 13, storage::SqlType::kInt64);
    t->push_back(storage::SqlType::kText);
    t->push_back(storage::SqlType::kInt64);
    return t;
  }();
  return *types;
}

// Appends one usage_rollups row per key (`part` kPartRow or kFoldedRow).
absl::Status WriteRollups(storage::ReadWriteTx& tx, const Rollups& rollups, std::int64_t lane,
                          std::int64_t part) {
  std::vector<Rollups::const_iterator> rows;
  rows.reserve(rollups.size());
  for (auto it = rollups.begin(); it != rollups.end(); ++it) rows.push_back(it);
  return tx.CopyRows(
      "usage_rollups", kRollupColumns, rows.size(), [&](size_t i, storage::RowSink& sink) {
        const auto& [k, t] = *rows[i];
        sink.Int(std::get<0>(k));
        sink.Text(std::get<1>(k));
        sink.Text(std::get<2>(k));
        sink.Text(std::get<3>(k));
        sink.Text(std::get<4>(k));
        sink.Text(std::get<5>(k));
        for (const std::int64_t v :
             {t.requests, t.errors, t.cancelled, t.input, t.output, t.cache_read, t.cache_write,
              t.reasoning, t.cost, t.unpriced, t.latency_sum, t.ttft_sum, t.ttft_count, lane}) {
          sink.Int(v);
        }
        sink.Text(EncodeHistogram(t.slots));
        sink.Int(part);
      });
}

}  // namespace

int LatencySlot(std::int64_t micros) {
  if (micros <= 1) return 0;
  return static_cast<int>(std::floor(std::log(static_cast<double>(micros)) / std::log(kSlotRatio)));
}

std::int64_t SlotMicros(int slot) {
  // Geometric middle of [r^slot, r^(slot+1)): at most ~5% from any value in it.
  return std::llround(std::pow(kSlotRatio, slot + 0.5));
}

absl::StatusOr<std::int64_t> CostNanos(const v1::TokenCounts& tokens, const v1::ModelPrice& price) {
  const Int128 sum = static_cast<Int128>(tokens.input()) * price.input() +
                     static_cast<Int128>(tokens.output()) * price.output() +
                     static_cast<Int128>(tokens.cache_read()) * price.cache_read() +
                     static_cast<Int128>(tokens.cache_write()) * price.cache_write() +
                     static_cast<Int128>(tokens.reasoning()) * price.reasoning();
  // Prices are per million tokens: divide once, rounding half up.
  const Int128 cost = (sum + 500'000) / 1'000'000;
  if (cost > std::numeric_limits<std::int64_t>::max()) {
    return absl::OutOfRangeError("the cost exceeds the largest amount a record can hold");
  }
  return static_cast<std::int64_t>(cost);
}

UsageLedger::UsageLedger(storage::Datastore& datastore, CatalogCache& catalog,
                         BudgetLedger& budgets, std::string page_token_key,
                         UsageLedgerOptions options)
    : datastore_(datastore),
      catalog_(catalog),
      budgets_(budgets),
      page_token_key_(std::move(page_token_key)),
      options_(std::move(options)),
      postgres_(datastore.engine() == "postgresql") {
  // Reading the field options once here builds protobuf's lazily created
  // defaults before writers run Prepare on many threads (a first use from
  // two threads at once is a race TSan reports inside libprotobuf).
  v1::UsageRecord warm_up;
  ClearOutputOnly(warm_up);
}

bool UsageLedger::Prepare(v1::UsageRecord in, absl::string_view principal, absl::string_view prefix,
                          PreparedRecord& out, std::vector<FieldViolation>& violations) const {
  const size_t before = violations.size();
  auto bad = [&](absl::string_view field, std::string description) {
    violations.push_back({absl::StrCat(prefix, field), std::move(description)});
  };
  v1::UsageRecord& r = out.record;
  r = std::move(in);
  ClearOutputOnly(r);
  r.clear_cursor();

  if (r.request_id().empty()) {
    bad("request_id", "is required");
  } else if (r.request_id().size() > 128 ||
             !std::all_of(r.request_id().begin(), r.request_id().end(),
                          [](char c) { return c > 0x20 && c < 0x7f; })) {
    bad("request_id", "must be at most 128 printable ASCII characters");
  }
  if (!r.has_time()) {
    bad("time", "is required");
  } else if (r.time().seconds() < 0 || r.time().nanos() < 0 || r.time().nanos() > 999'999'999 ||
             r.time().seconds() > 253402300799) {
    bad("time", "must be a valid timestamp after 1970");
  } else if (FromProto(r.time()) > options_.clock() + kMaxFuture) {
    bad("time", "is more than 1 hour in the future");
  }
  const absl::string_view provider_id = IdAfter(r.provider(), "providers/");
  if (r.provider().empty()) {
    bad("provider", "is required");
  } else if (provider_id.empty()) {
    bad("provider", "must be providers/{provider}");
  }
  if (r.model().empty()) {
    bad("model", "is required");
  } else if (IdAfter(r.model(), absl::StrCat(r.provider(), "/models/")).empty()) {
    bad("model",
        absl::StrCat("must be ", r.provider().empty() ? "providers/{provider}" : r.provider(),
                     "/models/{model}, a model of the record's provider"));
  }
  if (!r.provider_key().empty() &&
      IdAfter(r.provider_key(), absl::StrCat(r.provider(), "/keys/")).empty()) {
    bad("provider_key", "must be a key of the record's provider: providers/{provider}/keys/{key}");
  }
  if (r.access_key().empty()) {
    r.set_access_key(std::string(principal));
  } else if (!absl::StartsWith(r.access_key(), "accessKeys/") || r.access_key().size() > 64 ||
             r.access_key().size() == 11) {
    bad("access_key", "must be accessKeys/{id}");
  }
  if (!ValidText(r.user(), 128)) bad("user", "must be at most 128 characters of UTF-8");
  if (!ValidText(r.conversation(), 128)) {
    bad("conversation", "must be at most 128 characters of UTF-8");
  }
  if (!ValidText(r.message(), 128)) bad("message", "must be at most 128 characters of UTF-8");
  const std::pair<const char*, std::int64_t> tokens[] = {
      {"tokens.input", r.tokens().input()},
      {"tokens.output", r.tokens().output()},
      {"tokens.cache_read", r.tokens().cache_read()},
      {"tokens.cache_write", r.tokens().cache_write()},
      {"tokens.reasoning", r.tokens().reasoning()}};
  for (const auto& [field, value] : tokens) {
    if (value < 0 || value > kMaxTokens) bad(field, "must be between 0 and 1000000000000");
  }
  std::vector<FieldViolation> durations;
  CheckDuration(r.latency(), absl::StrCat(prefix, "latency"), durations);
  CheckDuration(r.time_to_first_token(), absl::StrCat(prefix, "time_to_first_token"), durations);
  if (durations.empty() && r.has_latency() && r.has_time_to_first_token() &&
      FromProto(r.time_to_first_token()) > FromProto(r.latency())) {
    bad("time_to_first_token", "must not exceed latency");
  }
  violations.insert(violations.end(), durations.begin(), durations.end());
  if (!v1::UsageStatus_IsValid(r.status())) {
    bad("status", "is not a known UsageStatus");
  } else if (r.status() == v1::USAGE_STATUS_UNSPECIFIED) {
    r.set_status(v1::USAGE_STATUS_SUCCEEDED);
  }
  if (!ValidText(r.error_class(), 64)) {
    bad("error_class", "must be at most 64 characters of UTF-8");
  }
  if (r.has_reported_cost_nanos() && r.reported_cost_nanos() < 0) {
    bad("reported_cost_nanos", "must not be negative");
  }
  if (!r.reservation().empty() && IdAfter(r.reservation(), "reservations/").empty()) {
    bad("reservation", "must be reservations/{reservation}");
  }
  if (violations.size() != before) return false;

  // Times are kept to the microsecond: answer and hash what is stored.
  *r.mutable_time() = ToProto(FromProto(r.time()));
  if (r.has_latency()) *r.mutable_latency() = ToProto(FromProto(r.latency()));
  if (r.has_time_to_first_token()) {
    *r.mutable_time_to_first_token() = ToProto(FromProto(r.time_to_first_token()));
  }
  out.content_hash = ContentHash(r);
  // Cost at the price in force at the call's time; unpriced when the
  // catalog has no such model or price (the record is still kept).
  std::shared_ptr<const google::protobuf::Message> cached = catalog_.Get(r.model());
  const auto* model = dynamic_cast<const v1::Model*>(cached.get());
  if (model != nullptr) {
    absl::StatusOr<v1::ModelPrice> price = PriceAt(*model, FromProto(r.time()));
    if (price.ok()) {
      absl::StatusOr<std::int64_t> cost = CostNanos(r.tokens(), *price);
      if (!cost.ok()) {
        bad("tokens", std::string(cost.status().message()));
        return false;
      }
      r.set_cost_nanos(*cost);
      r.set_priced(true);
      *r.mutable_price_effective_time() = price->effective_time();
    }
  }
  return true;
}

absl::StatusOr<std::vector<RecordOutcome>> UsageLedger::Write(
    const std::vector<PreparedRecord>& records, std::vector<storage::ChangeRecord>* alerts,
    int lane) {
  absl::StatusOr<std::vector<RecordOutcome>> outcomes = WriteOnce(records, alerts, lane, false);
  // A stored request_id (a retry), or two writers racing on one: every
  // further attempt looks the batch's ids up, and each ALREADY_EXISTS means
  // another writer committed one of them meanwhile. Bounded, so that a
  // conflict that lookups cannot explain fails the batch instead of looping.
  constexpr int kLookupAttempts = 8;
  for (int attempt = 0; attempt < kLookupAttempts && absl::IsAlreadyExists(outcomes.status());
       ++attempt) {
    outcomes = WriteOnce(records, alerts, lane, true);
  }
  return outcomes;
}

absl::StatusOr<std::vector<RecordOutcome>> UsageLedger::WriteOnce(
    const std::vector<PreparedRecord>& records, std::vector<storage::ChangeRecord>* alerts,
    int lane, bool probe) {
  const absl::Time now = options_.clock();
  if (postgres_) {
    if (absl::Status s = EnsurePartitions(now, now + absl::Hours(24)); !s.ok()) return s;
  }
  std::vector<RecordOutcome> outcomes;
  std::vector<storage::ChangeRecord> raised;
  std::map<std::string, std::int64_t> access_last_used;
  std::vector<std::pair<std::string, std::int64_t>> last_use_undo;
  absl::Status status = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
    outcomes.assign(records.size(), RecordOutcome{});
    raised.clear();
    // A retried transaction body starts over (its earlier attempt rolled back).
    UndoLastUse(last_use_undo, access_last_used);
    last_use_undo.clear();
    access_last_used.clear();
    // 1. Idempotency: earlier records with these request_ids, and repeats
    // inside the batch (the first occurrence wins).
    absl::flat_hash_map<std::string, std::pair<std::int64_t, std::string>> known;  // seq, hash
    if (probe) {
      std::vector<SqlRow> ids;
      ids.reserve(records.size());
      for (const PreparedRecord& r : records) ids.push_back({SqlCell(r.record.request_id())});
      std::string json = RowsJson(ids, 0, ids.size());
      absl::StatusOr<std::vector<SqlRow>> rows =
          tx.Query(absl::StrCat("SELECT request_id, seq, content_hash FROM usage_request_ids WHERE "
                                "request_id IN (",
                                SelectJsonRows(postgres_, "t"), ")"),
                   {SqlCell(std::move(json))},
                   {storage::SqlType::kText, storage::SqlType::kInt64, storage::SqlType::kText});
      if (!rows.ok()) return rows.status();
      for (const SqlRow& row : *rows) {
        known[storage::CellText(row[0])] = {storage::CellInt(row[1]), storage::CellText(row[2])};
      }
    }
    std::vector<size_t> fresh;
    absl::flat_hash_map<std::string, size_t> in_batch;
    for (size_t i = 0; i < records.size(); ++i) {
      const std::string& id = records[i].record.request_id();
      const std::string& hash = records[i].content_hash;
      if (auto it = known.find(id); it != known.end()) {
        outcomes[i].kind = it->second.second == hash ? RecordOutcome::Kind::kDuplicate
                                                     : RecordOutcome::Kind::kReused;
        outcomes[i].seq = it->second.first;
        continue;
      }
      if (auto it = in_batch.find(id); it != in_batch.end()) {
        outcomes[i].kind = records[it->second].content_hash == hash
                               ? RecordOutcome::Kind::kDuplicate
                               : RecordOutcome::Kind::kReused;
        outcomes[i].seq = -static_cast<std::int64_t>(it->second) - 1;  // fixed up below
        continue;
      }
      in_batch[id] = i;
      fresh.push_back(i);
    }
    if (fresh.empty()) return absl::OkStatus();

    // 2. Rollups, latency histograms, provider-key counters, access keys'
    // last use and budgets, gathered in memory first. The rows that are
    // updated (all but the rollup parts, which are appended) are written in
    // sorted key order, so concurrent writers lock them in one order.
    const std::int64_t record_micros = absl::ToUnixMicros(now);
    const std::int64_t lane64 = lane;
    Rollups rollups;
    std::map<std::pair<absl::string_view, absl::CivilDay>, Totals> key_days;
    std::vector<Charge> charges;
    for (size_t i : fresh) {
      const v1::UsageRecord& r = records[i].record;
      const std::int64_t call_micros = absl::ToUnixMicros(FromProto(r.time()));
      const std::int64_t latency_us = absl::ToInt64Microseconds(FromProto(r.latency()));
      RollupKey key{HourOf(FromProto(r.time())),
                    r.provider(),
                    r.model(),
                    r.provider_key(),
                    r.access_key(),
                    r.user()};
      Totals& t = rollups[key];
      t.requests += 1;
      t.errors += r.status() == v1::USAGE_STATUS_FAILED ? 1 : 0;
      t.cancelled += r.status() == v1::USAGE_STATUS_CANCELLED ? 1 : 0;
      t.input += r.tokens().input();
      t.output += r.tokens().output();
      t.cache_read += r.tokens().cache_read();
      t.cache_write += r.tokens().cache_write();
      t.reasoning += r.tokens().reasoning();
      t.cost += r.cost_nanos();
      t.unpriced += r.priced() ? 0 : 1;
      t.latency_sum += latency_us;
      if (r.has_time_to_first_token()) {
        t.ttft_sum += absl::ToInt64Microseconds(FromProto(r.time_to_first_token()));
        t.ttft_count += 1;
      }
      t.slots[LatencySlot(latency_us)] += 1;
      if (!r.provider_key().empty()) {
        Totals& k = key_days[{r.provider_key(),
                              absl::ToCivilDay(FromProto(r.time()), options_.key_time_zone)}];
        k.requests += 1;
        k.input += r.tokens().input() + r.tokens().output() + r.tokens().cache_read() +
                   r.tokens().cache_write() + r.tokens().reasoning();
        k.cost += r.cost_nanos();
      }
      std::int64_t& last = access_last_used[r.access_key()];
      last = std::max(last, call_micros);
      charges.push_back(Charge{FromProto(r.time()), r.user(), r.access_key(), r.provider(),
                               r.model(), r.reservation(), r.cost_nanos()});
    }
    // The batch's totals per rollup key, appended as parts (no row of an
    // earlier batch is read or updated); CompactRollups folds them later.
    if (absl::Status s = WriteRollups(tx, rollups, lane64, kPartRow); !s.ok()) return s;
    std::vector<SqlRow> key_rows;
    key_rows.reserve(key_days.size());
    for (const auto& [k, t] : key_days) {
      key_rows.push_back({SqlCell(std::string(k.first)), SqlCell(absl::FormatCivilTime(k.second)),
                          SqlCell(t.requests), SqlCell(t.input), SqlCell(t.cost), SqlCell(lane64)});
    }
    if (absl::Status s =
            InsertRows(tx, postgres_, kInsertKeyRecorded, "ttiiii", key_rows, kKeyRecordedConflict);
        !s.ok()) {
      return s;
    }
    for (const auto& [name, micros] : access_last_used) {
      // Stored to the second: a key's row is written (and locked) at most
      // once a second, not by every batch of every writer.
      if (!AdvanceLastUse(name, micros, last_use_undo)) continue;
      absl::StatusOr<std::int64_t> n = tx.Exec(
          "UPDATE access_keys SET last_used_time = :p0 WHERE name = :p1 AND "
          "(last_used_time IS NULL OR last_used_time < :p0)",
          {SqlCell(micros), SqlCell(name)});
      if (!n.ok()) return n.status();
    }
    if (absl::Status s = budgets_.Apply(tx, charges, &raised); !s.ok()) return s;

    // 3. Sequence numbers, last: the usage_feed row stays locked until
    // commit, so batches commit in seq order on every engine and replica,
    // and concurrent writers wait for each other only for the records' COPY
    // and the commit.
    absl::StatusOr<std::int64_t> bumped =
        tx.Exec("UPDATE usage_feed SET last_seq = last_seq + :p0 WHERE id = 1",
                {SqlCell(static_cast<std::int64_t>(fresh.size()))});
    if (!bumped.ok()) return bumped.status();
    absl::StatusOr<std::vector<SqlRow>> head =
        tx.Query("SELECT last_seq FROM usage_feed WHERE id = 1", {}, {storage::SqlType::kInt64});
    if (!head.ok()) return head.status();
    if (head->empty()) return absl::InternalError("the usage feed row is missing");
    std::int64_t seq = storage::CellInt(head->front()[0]) - static_cast<std::int64_t>(fresh.size());

    // 4. The records and their request_ids, written straight from the records.
    for (size_t i : fresh) {
      outcomes[i].seq = ++seq;
      outcomes[i].record_time = absl::FromUnixMicros(record_micros);
    }
    if (absl::Status s = tx.CopyRows("usage_request_ids",
                                     "request_id, seq, record_time, content_hash", fresh.size(),
                                     [&](size_t k, storage::RowSink& sink) {
                                       const size_t i = fresh[k];
                                       sink.Text(records[i].record.request_id());
                                       sink.Int(outcomes[i].seq);
                                       sink.Int(record_micros);
                                       sink.Text(records[i].content_hash);
                                     });
        !s.ok()) {
      return s;
    }
    if (absl::Status s = tx.CopyRows("usage_records", kRecordColumns, fresh.size(),
                                     [&](size_t k, storage::RowSink& sink) {
                                       const size_t i = fresh[k];
                                       WriteRecordRow(records[i].record, outcomes[i].seq,
                                                      record_micros, sink);
                                     });
        !s.ok()) {
      return s;
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    UndoLastUse(last_use_undo, access_last_used);
    return status;
  }
  // Repeats inside the batch point at their first occurrence's seq.
  for (RecordOutcome& o : outcomes) {
    if (o.seq < 0) o.seq = outcomes[static_cast<size_t>(-o.seq - 1)].seq;
  }
  if (alerts != nullptr) {
    for (auto& change : raised) alerts->push_back(std::move(change));
  }
  return outcomes;
}

bool UsageLedger::AdvanceLastUse(const std::string& access_key, std::int64_t micros,
                                 std::vector<std::pair<std::string, std::int64_t>>& undo) {
  constexpr std::int64_t kSecond = 1'000'000;
  std::lock_guard lock(last_use_mu_);
  std::int64_t& written = last_use_written_[access_key];
  if (written != 0 && micros < written + kSecond) return false;
  undo.emplace_back(access_key, written);
  written = std::max(written, micros);
  return true;
}

void UsageLedger::UndoLastUse(const std::vector<std::pair<std::string, std::int64_t>>& undo,
                              const std::map<std::string, std::int64_t>& advanced) {
  std::lock_guard lock(last_use_mu_);
  for (const auto& [key, before] : undo) {
    auto it = advanced.find(key);
    std::int64_t& written = last_use_written_[key];
    if (it != advanced.end() && written == std::max(before, it->second)) written = before;
  }
}

absl::Status UsageLedger::EnsurePartitions(absl::Time from, absl::Time to) {
  constexpr std::int64_t kDay = 86'400'000'000;
  const std::int64_t first = absl::ToUnixMicros(from) / kDay;
  const std::int64_t last = absl::ToUnixMicros(to) / kDay;
  for (std::int64_t day = first; day <= last; ++day) {
    {
      std::lock_guard lock(partitions_mu_);
      if (partitions_.contains(day)) continue;
    }
    const std::string table = absl::StrCat(
        "usage_records_",
        absl::FormatTime("%Y%m%d", absl::FromUnixMicros(day * kDay), absl::UTCTimeZone()));
    const std::string sql = absl::StrCat("CREATE TABLE IF NOT EXISTS ", table,
                                         " PARTITION OF usage_records FOR VALUES FROM (",
                                         day * kDay, ") TO (", (day + 1) * kDay, ")");
    absl::Status status;
    for (int attempt = 0; attempt < 3; ++attempt) {
      // Replicas may create the same partition at once; the loser retries.
      status = datastore_.ReadWriteTx(
          [&](storage::ReadWriteTx& tx) -> absl::Status { return tx.Exec(sql, {}).status(); });
      if (status.ok()) break;
    }
    if (!status.ok()) return status;
    std::lock_guard lock(partitions_mu_);
    partitions_.insert(day);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::int64_t> UsageLedger::CompactRollups() {
  // A round takes the keys of a bounded number of parts, so that a backlog
  // (compaction failing for a while) is folded in bounded transactions.
  const std::int64_t round_parts = std::max<std::int64_t>(options_.compaction_round_parts, 1);
  constexpr int kMaxRounds = 20;
  std::int64_t total = 0;
  for (int round = 0; round < kMaxRounds; ++round) {
    absl::StatusOr<std::int64_t> folded = CompactRound(round_parts);
    if (!folded.ok()) return folded.status();
    total += *folded;
    if (*folded < round_parts) break;  // the backlog is gone (or another replica has it)
  }
  return total;
}

absl::StatusOr<std::int64_t> UsageLedger::CompactRound(std::int64_t limit) {
  std::int64_t folded = 0;
  absl::Status status = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
    folded = 0;
    if (postgres_) {
      // One compaction at a time across replicas; the others skip this round.
      absl::StatusOr<std::vector<SqlRow>> locked =
          tx.Query("SELECT CASE WHEN pg_try_advisory_xact_lock(:p0) THEN 1 ELSE 0 END",
                   {SqlCell(kCompactionLock)}, {storage::SqlType::kInt64});
      if (!locked.ok()) return locked.status();
      if (locked->empty() || storage::CellInt(locked->front()[0]) != 1) return absl::OkStatus();
    }
    // Every row of each key that has parts (its folded row too), taken out
    // at once: parts committed meanwhile stay for the next round.
    absl::StatusOr<std::vector<SqlRow>> taken = tx.Query(
        absl::StrCat("DELETE FROM usage_rollups WHERE (", kRollupDimensions, ") IN (SELECT ",
                     kRollupDimensions, " FROM usage_rollups WHERE part <> 0 LIMIT ", limit,
                     ") RETURNING ", kRollupDimensions,
                     ", requests, errors, cancelled, input_tokens, output_tokens, "
                     "cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, "
                     "unpriced, latency_sum_us, ttft_sum_us, ttft_count, latency_histogram, part"),
        {}, RollupRowTypes());
    if (!taken.ok()) return taken.status();
    std::deque<std::string> names;  // the keys' text, owned (the map holds views)
    auto own = [&](const SqlCell& cell) -> absl::string_view {
      return names.emplace_back(storage::CellText(cell));
    };
    Rollups keys;
    for (const SqlRow& row : *taken) {
      Totals& t = keys[RollupKey{storage::CellInt(row[0]), own(row[1]), own(row[2]), own(row[3]),
                                 own(row[4]), own(row[5])}];
      std::int64_t* sums[] = {&t.requests,    &t.errors,      &t.cancelled, &t.input, &t.output,
                              &t.cache_read,  &t.cache_write, &t.reasoning, &t.cost,  &t.unpriced,
                              &t.latency_sum, &t.ttft_sum,    &t.ttft_count};
      for (size_t i = 0; i < std::size(sums); ++i) *sums[i] += storage::CellInt(row[6 + i]);
      if (!AddHistogram(storage::CellText(row[19]), t.slots)) {
        return absl::DataLossError("a stored latency histogram is malformed");
      }
      if (storage::CellInt(row[20]) != kFoldedRow) ++folded;
    }
    return WriteRollups(tx, keys, 0, kFoldedRow);
  });
  if (!status.ok()) return status;
  return folded;
}

absl::StatusOr<std::int64_t> UsageLedger::Maintain() {
  const absl::Time now = options_.clock();
  if (postgres_) {
    if (absl::Status s = EnsurePartitions(now, now + absl::Hours(72)); !s.ok()) return s;
  }
  const std::int64_t cutoff = absl::ToUnixMicros(now - options_.retention);
  std::int64_t removed = 0;
  absl::Status status = datastore_.ReadWriteTx([&](storage::ReadWriteTx& tx) -> absl::Status {
    removed = 0;
    std::int64_t pruned_seq = 0;
    if (postgres_) {
      // Whole partitions whose upper bound is at or before the cutoff.
      absl::StatusOr<std::vector<SqlRow>> parts = tx.Query(
          "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
          "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
          "WHERE p.relname = 'usage_records'",
          {}, {storage::SqlType::kText, storage::SqlType::kText});
      if (!parts.ok()) return parts.status();
      for (const SqlRow& part : *parts) {
        const std::string name = storage::CellText(part[0]);
        const std::string bound = storage::CellText(part[1]);
        // "FOR VALUES FROM ('a') TO ('b')"
        const size_t to = bound.rfind("TO ('");
        if (to == std::string::npos) continue;
        std::int64_t upper = 0;
        if (!absl::SimpleAtoi(bound.substr(to + 5, bound.find("')", to) - to - 5), &upper)) {
          continue;
        }
        if (upper > cutoff) continue;
        absl::StatusOr<std::vector<SqlRow>> stats =
            tx.Query(absl::StrCat("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM ", name), {},
                     {storage::SqlType::kInt64, storage::SqlType::kInt64});
        if (!stats.ok()) return stats.status();
        removed += storage::CellInt(stats->front()[0]);
        pruned_seq = std::max(pruned_seq, storage::CellInt(stats->front()[1]));
        if (absl::Status s = tx.Exec(absl::StrCat("DROP TABLE ", name), {}).status(); !s.ok()) {
          return s;
        }
        std::lock_guard lock(partitions_mu_);
        partitions_.erase(upper / 86'400'000'000 - 1);
      }
    } else {
      absl::StatusOr<std::vector<SqlRow>> stats = tx.Query(
          "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM usage_records "
          "WHERE record_time < :p0",
          {SqlCell(cutoff)}, {storage::SqlType::kInt64, storage::SqlType::kInt64});
      if (!stats.ok()) return stats.status();
      removed = storage::CellInt(stats->front()[0]);
      pruned_seq = storage::CellInt(stats->front()[1]);
      if (removed > 0) {
        absl::Status s =
            tx.Exec("DELETE FROM usage_records WHERE record_time < :p0", {SqlCell(cutoff)})
                .status();
        if (!s.ok()) return s;
      }
    }
    if (absl::Status s =
            tx.Exec("DELETE FROM usage_request_ids WHERE record_time < :p0", {SqlCell(cutoff)})
                .status();
        !s.ok()) {
      return s;
    }
    if (pruned_seq > 0) {
      return tx
          .Exec(
              "UPDATE usage_feed SET pruned_through_seq = :p0 WHERE id = 1 AND "
              "pruned_through_seq < :p0",
              {SqlCell(pruned_seq)})
          .status();
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return removed;
}

absl::Status UsageLedger::FeedBounds(storage::Reader& reader, std::int64_t* last_seq,
                                     std::int64_t* pruned_through) {
  absl::StatusOr<std::vector<SqlRow>> rows =
      reader.Query("SELECT last_seq, pruned_through_seq FROM usage_feed WHERE id = 1", {},
                   {storage::SqlType::kInt64, storage::SqlType::kInt64});
  if (!rows.ok()) return rows.status();
  if (rows->empty()) return absl::InternalError("the usage feed row is missing");
  *last_seq = storage::CellInt(rows->front()[0]);
  *pruned_through = storage::CellInt(rows->front()[1]);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::UsageRecord>> UsageLedger::ReadAfter(storage::Reader& reader,
                                                                    std::int64_t after, int limit,
                                                                    std::int64_t* last_seq) {
  std::int64_t head = 0;
  std::int64_t pruned = 0;
  if (absl::Status s = FeedBounds(reader, &head, &pruned); !s.ok()) return s;
  if (last_seq != nullptr) *last_seq = head;
  std::vector<v1::UsageRecord> out;
  if (head <= after) return out;
  absl::StatusOr<std::vector<SqlRow>> rows = reader.Query(
      absl::StrCat(kSelectRecords, " WHERE seq > :p0 AND seq <= :p1 ORDER BY seq LIMIT :p2"),
      {SqlCell(after), SqlCell(head), SqlCell(std::int64_t{limit})}, RecordColumns());
  if (!rows.ok()) return rows.status();
  out.reserve(rows->size());
  for (const SqlRow& row : *rows) out.push_back(DecodeRecord(row));
  return out;
}

absl::StatusOr<v1::UsageRecord> UsageLedger::GetBySeq(std::int64_t seq) {
  v1::UsageRecord out;
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<SqlRow>> rows = reader.Query(
        absl::StrCat(kSelectRecords, " WHERE seq = :p0"), {SqlCell(seq)}, RecordColumns());
    if (!rows.ok()) return rows.status();
    if (rows->empty()) return absl::NotFoundError("the usage record is no longer retained");
    out = DecodeRecord(rows->front());
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return out;
}

}  // namespace modelvault::server
