// The reads of the usage ledger: raw records page by page, and aggregates
// answered from the hourly rollups (never from the raw records).
#include <algorithm>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/proto_time.h"
#include "server/usage_ledger.h"
#include "server/usage_sql.h"
#include "storage/page_token.h"

namespace modelvault::server {
namespace {

using storage::CellInt;
using storage::CellText;
using storage::SqlCell;
using storage::SqlRow;
using storage::SqlType;

constexpr std::int64_t kHourMicros = 3'600'000'000;

// Appends `column = :pN` for each set filter field.
void AddFilter(const v1::UsageFilter& filter, std::vector<std::string>& where,
               std::vector<SqlCell>& params) {
  const std::pair<const char*, const std::string*> fields[] = {
      {"provider", &filter.provider()},
      {"model", &filter.model()},
      {"provider_key", &filter.provider_key()},
      {"access_key", &filter.access_key()},
      {"user_id", &filter.user()}};
  for (const auto& [column, value] : fields) {
    if (value->empty()) continue;
    where.push_back(absl::StrCat(column, " = :p", params.size()));
    params.emplace_back(*value);
  }
}

// Checks a [start, end) range of whole hours.
absl::Status CheckRange(const google::protobuf::Timestamp& start,
                        const google::protobuf::Timestamp& end, bool has_start, bool has_end) {
  std::vector<FieldViolation> out;
  if (!has_start) out.push_back({"start_time", "is required"});
  if (!has_end) out.push_back({"end_time", "is required"});
  if (!out.empty()) return InvalidFields(std::move(out));
  const std::int64_t s = absl::ToUnixMicros(FromProto(start));
  const std::int64_t e = absl::ToUnixMicros(FromProto(end));
  if (s % kHourMicros != 0) out.push_back({"start_time", "must be on a whole hour (UTC)"});
  if (e % kHourMicros != 0) out.push_back({"end_time", "must be on a whole hour (UTC)"});
  if (e <= s) {
    out.push_back({"end_time", "must be after start_time"});
  } else if (e - s > kHourMicros * 24 * 366 * 3) {
    out.push_back({"end_time", "must be at most 3 years after start_time"});
  }
  return out.empty() ? absl::OkStatus() : InvalidFields(std::move(out));
}

// Start of the bucket containing `t`.
absl::Time BucketStart(absl::Time t, v1::TimeBucket bucket, const absl::TimeZone& tz) {
  const absl::CivilHour hour = absl::ToCivilHour(t, tz);
  switch (bucket) {
    case v1::TIME_BUCKET_HOUR:
      return absl::FromCivil(hour, tz);
    case v1::TIME_BUCKET_DAY:
      return absl::FromCivil(absl::CivilDay(hour), tz);
    case v1::TIME_BUCKET_WEEK: {
      absl::CivilDay day(hour);
      while (absl::GetWeekday(day) != absl::Weekday::monday) --day;
      return absl::FromCivil(day, tz);
    }
    case v1::TIME_BUCKET_MONTH:
      return absl::FromCivil(absl::CivilMonth(hour), tz);
    default:
      return absl::InfinitePast();
  }
}

struct Sums {
  std::int64_t requests = 0, errors = 0, cancelled = 0, input = 0, output = 0, cache_read = 0,
               cache_write = 0, reasoning = 0, cost = 0, unpriced = 0, latency_sum = 0,
               ttft_sum = 0, ttft_count = 0;
  std::map<int, std::int64_t> histogram;

  void Add(const Sums& o) {
    requests += o.requests;
    errors += o.errors;
    cancelled += o.cancelled;
    input += o.input;
    output += o.output;
    cache_read += o.cache_read;
    cache_write += o.cache_write;
    reasoning += o.reasoning;
    cost += o.cost;
    unpriced += o.unpriced;
    latency_sum += o.latency_sum;
    ttft_sum += o.ttft_sum;
    ttft_count += o.ttft_count;
    for (const auto& [slot, n] : o.histogram) histogram[slot] += n;
  }

  std::int64_t Percentile(int percent) const {
    std::int64_t total = 0;
    for (const auto& [slot, n] : histogram) total += n;
    if (total == 0) return 0;
    // The smallest slot covering ceil(percent% of the calls).
    const std::int64_t rank = (total * percent + 99) / 100;
    std::int64_t seen = 0;
    for (const auto& [slot, n] : histogram) {
      seen += n;
      if (seen >= rank) return SlotMicros(slot);
    }
    return SlotMicros(histogram.rbegin()->first);
  }

  void To(v1::UsageTotals& out) const {
    out.set_requests(requests);
    out.set_errors(errors);
    out.set_cancelled(cancelled);
    out.mutable_tokens()->set_input(input);
    out.mutable_tokens()->set_output(output);
    out.mutable_tokens()->set_cache_read(cache_read);
    out.mutable_tokens()->set_cache_write(cache_write);
    out.mutable_tokens()->set_reasoning(reasoning);
    out.set_cost_nanos(cost);
    out.set_unpriced_requests(unpriced);
    if (requests > 0) {
      *out.mutable_latency_mean() = ToProto(absl::Microseconds(latency_sum / requests));
      *out.mutable_latency_p50() = ToProto(absl::Microseconds(Percentile(50)));
      *out.mutable_latency_p90() = ToProto(absl::Microseconds(Percentile(90)));
      *out.mutable_latency_p99() = ToProto(absl::Microseconds(Percentile(99)));
    }
    if (ttft_count > 0) {
      *out.mutable_time_to_first_token_mean() = ToProto(absl::Microseconds(ttft_sum / ttft_count));
    }
  }
};

const char* const kDimensionColumns[] = {"",           "provider", "model", "provider_key",
                                         "access_key", "user_id"};

}  // namespace

absl::Status UsageLedger::List(const v1::ListUsageRecordsRequest& request,
                               v1::ListUsageRecordsResponse* response) {
  if (request.page_size() < 0) return InvalidField("page_size", "must not be negative");
  const int size = request.page_size() == 0 ? 100 : std::min(request.page_size(), 1000);
  std::vector<std::string> where;
  std::vector<SqlCell> params;
  if (request.has_start_time()) {
    where.push_back(absl::StrCat("call_time >= :p", params.size()));
    params.emplace_back(absl::ToUnixMicros(FromProto(request.start_time())));
  }
  if (request.has_end_time()) {
    where.push_back(absl::StrCat("call_time < :p", params.size()));
    params.emplace_back(absl::ToUnixMicros(FromProto(request.end_time())));
  }
  AddFilter(request.filter(), where, params);
  // The page token binds the position to this exact query.
  std::string digest = request.filter().SerializeAsString();
  absl::StrAppend(&digest, "|", request.start_time().SerializeAsString(), "|",
                  request.end_time().SerializeAsString());
  storage::PageTokenCodec codec(page_token_key_);
  std::int64_t after = 0;
  if (!request.page_token().empty()) {
    absl::StatusOr<std::vector<storage::SqlValue>> position =
        codec.Decode(request.page_token(), digest);
    if (!position.ok()) return position.status();
    if (position->size() != 1 || !std::holds_alternative<std::int64_t>(position->front())) {
      return InvalidField("page_token", "malformed page token");
    }
    after = std::get<std::int64_t>(position->front());
  }
  where.push_back(absl::StrCat("seq > :p", params.size()));
  params.emplace_back(after);
  const std::string sql = absl::StrCat(kSelectRecords, " WHERE ", absl::StrJoin(where, " AND "),
                                       " ORDER BY seq LIMIT ", size + 1);
  return datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<SqlRow>> rows = reader.Query(sql, params, RecordColumns());
    if (!rows.ok()) return rows.status();
    const bool more = static_cast<int>(rows->size()) > size;
    for (int i = 0; i < static_cast<int>(rows->size()) && i < size; ++i) {
      *response->add_records() = DecodeRecord((*rows)[i]);
    }
    if (more) {
      response->set_next_page_token(
          codec.Encode(digest, {storage::SqlValue(CellInt((*rows)[size - 1][0]))}));
    }
    return absl::OkStatus();
  });
}

absl::Status UsageLedger::Query(const v1::QueryUsageRequest& request,
                                v1::QueryUsageResponse* response) {
  if (absl::Status s = CheckRange(request.start_time(), request.end_time(),
                                  request.has_start_time(), request.has_end_time());
      !s.ok()) {
    return s;
  }
  std::vector<int> dims;
  for (int i = 0; i < request.group_by_size(); ++i) {
    const int d = request.group_by(i);
    if (d <= 0 || d > 5) {
      return InvalidField(absl::StrCat("group_by[", i, "]"), "is not a known UsageDimension");
    }
    if (std::find(dims.begin(), dims.end(), d) != dims.end()) {
      return InvalidField(absl::StrCat("group_by[", i, "]"), "appears more than once");
    }
    dims.push_back(d);
  }
  std::sort(dims.begin(), dims.end());
  v1::TimeBucket bucket = request.bucket();
  if (!v1::TimeBucket_IsValid(bucket)) return InvalidField("bucket", "is not a known TimeBucket");
  if (bucket == v1::TIME_BUCKET_UNSPECIFIED) bucket = v1::TIME_BUCKET_NONE;
  absl::TimeZone tz = absl::UTCTimeZone();
  if (!request.time_zone().empty() && !absl::LoadTimeZone(request.time_zone(), &tz)) {
    return InvalidField("time_zone", "is not a known IANA time zone");
  }
  const absl::Time start = FromProto(request.start_time());
  const absl::Time end = FromProto(request.end_time());
  // Hourly rollups answer exactly only where the zone's offset is whole hours.
  for (absl::Time t = start;;) {
    if (tz.At(t).offset % 3600 != 0) {
      return InvalidField("time_zone",
                          "has an offset that is not a whole number of hours in the range; "
                          "usage is rolled up by the hour");
    }
    absl::TimeZone::CivilTransition transition;
    if (!tz.NextTransition(t, &transition)) break;
    t = absl::FromCivil(transition.to, tz);
    if (t >= end) break;
  }

  std::vector<std::string> select_dims;
  select_dims.reserve(dims.size());
  for (int d : dims) select_dims.emplace_back(kDimensionColumns[d]);
  std::vector<std::string> where = {"bucket >= :p0", "bucket < :p1"};
  std::vector<SqlCell> params = {SqlCell(absl::ToUnixMicros(start)),
                                 SqlCell(absl::ToUnixMicros(end))};
  AddFilter(request.filter(), where, params);
  const std::string group = absl::StrJoin(
      [&] {
        std::vector<std::string> g = {"bucket"};
        g.insert(g.end(), select_dims.begin(), select_dims.end());
        return g;
      }(),
      ", ");
  const std::string where_sql = absl::StrJoin(where, " AND ");
  const std::string totals_sql = absl::StrCat(
      "SELECT ", group,
      ", SUM(requests), SUM(errors), SUM(cancelled), SUM(input_tokens), SUM(output_tokens), "
      "SUM(cache_read_tokens), SUM(cache_write_tokens), SUM(reasoning_tokens), SUM(cost_nanos), "
      "SUM(unpriced), SUM(latency_sum_us), SUM(ttft_sum_us), SUM(ttft_count) FROM usage_rollups "
      "WHERE ",
      where_sql, " GROUP BY ", group);
  const std::string latency_sql =
      absl::StrCat("SELECT ", group, ", latency_histogram FROM usage_rollups WHERE ", where_sql,
                   " AND latency_histogram <> '{}'");
  std::vector<SqlType> totals_columns(1 + dims.size(), SqlType::kText);
  totals_columns[0] = SqlType::kInt64;
  std::vector<SqlType> latency_columns = totals_columns;
  totals_columns.insert(totals_columns.end(), 13, SqlType::kInt64);
  latency_columns.push_back(SqlType::kText);

  // Group key: bucket start, then the chosen dimensions' values.
  using Key = std::pair<std::int64_t, std::vector<std::string>>;
  std::map<Key, Sums> groups;
  auto key_of = [&](const SqlRow& row) {
    Key key;
    const absl::Time hour = absl::FromUnixMicros(CellInt(row[0]));
    key.first =
        bucket == v1::TIME_BUCKET_NONE ? 0 : absl::ToUnixMicros(BucketStart(hour, bucket, tz));
    for (size_t i = 0; i < dims.size(); ++i) key.second.push_back(CellText(row[1 + i]));
    return key;
  };
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<SqlRow>> rows = reader.Query(totals_sql, params, totals_columns);
    if (!rows.ok()) return rows.status();
    for (const SqlRow& row : *rows) {
      Sums s;
      size_t c = 1 + dims.size();
      for (std::int64_t* field : {&s.requests, &s.errors, &s.cancelled, &s.input, &s.output,
                                  &s.cache_read, &s.cache_write, &s.reasoning, &s.cost, &s.unpriced,
                                  &s.latency_sum, &s.ttft_sum, &s.ttft_count}) {
        *field = CellInt(row[c++]);
      }
      groups[key_of(row)].Add(s);
    }
    absl::StatusOr<std::vector<SqlRow>> slots = reader.Query(latency_sql, params, latency_columns);
    if (!slots.ok()) return slots.status();
    for (const SqlRow& row : *slots) {
      if (!AddHistogram(CellText(row[1 + dims.size()]), groups[key_of(row)].histogram)) {
        return absl::DataLossError("a stored latency histogram is malformed");
      }
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  Sums all;
  for (const auto& [key, sums] : groups) {
    v1::UsageGroup* g = response->add_groups();
    if (bucket != v1::TIME_BUCKET_NONE) {
      *g->mutable_bucket_start() = ToProto(absl::FromUnixMicros(key.first));
    }
    for (size_t i = 0; i < dims.size(); ++i) {
      const std::string& v = key.second[i];
      switch (dims[i]) {
        case v1::USAGE_DIMENSION_PROVIDER:
          g->set_provider(v);
          break;
        case v1::USAGE_DIMENSION_MODEL:
          g->set_model(v);
          break;
        case v1::USAGE_DIMENSION_PROVIDER_KEY:
          g->set_provider_key(v);
          break;
        case v1::USAGE_DIMENSION_ACCESS_KEY:
          g->set_access_key(v);
          break;
        case v1::USAGE_DIMENSION_USER:
          g->set_user(v);
          break;
        default:
          break;
      }
    }
    sums.To(*g->mutable_totals());
    all.Add(sums);
  }
  all.To(*response->mutable_totals());
  return absl::OkStatus();
}

absl::Status UsageLedger::CostBreakdown(const v1::GetCostBreakdownRequest& request,
                                        v1::GetCostBreakdownResponse* response) {
  if (absl::Status s = CheckRange(request.start_time(), request.end_time(),
                                  request.has_start_time(), request.has_end_time());
      !s.ok()) {
    return s;
  }
  std::vector<std::string> where = {"bucket >= :p0", "bucket < :p1"};
  std::vector<SqlCell> params = {SqlCell(absl::ToUnixMicros(FromProto(request.start_time()))),
                                 SqlCell(absl::ToUnixMicros(FromProto(request.end_time())))};
  AddFilter(request.filter(), where, params);
  const std::string sql = absl::StrCat(
      "SELECT provider, model, SUM(cost_nanos), SUM(requests), SUM(input_tokens), "
      "SUM(output_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens), "
      "SUM(reasoning_tokens) FROM usage_rollups WHERE ",
      absl::StrJoin(where, " AND "), " GROUP BY provider, model");
  std::vector<SqlRow> rows;
  absl::Status status = datastore_.Read([&](storage::Reader& reader) -> absl::Status {
    absl::StatusOr<std::vector<SqlRow>> result = reader.Query(
        sql, params,
        {SqlType::kText, SqlType::kText, SqlType::kInt64, SqlType::kInt64, SqlType::kInt64,
         SqlType::kInt64, SqlType::kInt64, SqlType::kInt64, SqlType::kInt64});
    if (!result.ok()) return result.status();
    rows = *std::move(result);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  std::map<std::string, v1::ProviderCost> providers;
  for (const SqlRow& row : rows) {
    v1::ProviderCost& p = providers[CellText(row[0])];
    p.set_provider(CellText(row[0]));
    v1::ModelCost* m = p.add_models();
    m->set_model(CellText(row[1]));
    m->set_cost_nanos(CellInt(row[2]));
    m->set_requests(CellInt(row[3]));
    m->mutable_tokens()->set_input(CellInt(row[4]));
    m->mutable_tokens()->set_output(CellInt(row[5]));
    m->mutable_tokens()->set_cache_read(CellInt(row[6]));
    m->mutable_tokens()->set_cache_write(CellInt(row[7]));
    m->mutable_tokens()->set_reasoning(CellInt(row[8]));
    p.set_cost_nanos(p.cost_nanos() + m->cost_nanos());
    p.set_requests(p.requests() + m->requests());
    response->set_total_cost_nanos(response->total_cost_nanos() + m->cost_nanos());
    response->set_requests(response->requests() + m->requests());
  }
  for (auto& [name, p] : providers) {
    std::sort(p.mutable_models()->begin(), p.mutable_models()->end(),
              [](const v1::ModelCost& a, const v1::ModelCost& b) {
                return a.cost_nanos() != b.cost_nanos() ? a.cost_nanos() > b.cost_nanos()
                                                        : a.model() < b.model();
              });
    *response->add_providers() = std::move(p);
  }
  std::sort(response->mutable_providers()->begin(), response->mutable_providers()->end(),
            [](const v1::ProviderCost& a, const v1::ProviderCost& b) {
              return a.cost_nanos() != b.cost_nanos() ? a.cost_nanos() > b.cost_nanos()
                                                      : a.provider() < b.provider();
            });
  return absl::OkStatus();
}

}  // namespace modelvault::server
