#include "server/usage_sql.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "server/cursor.h"
#include "server/proto_time.h"

namespace modelvault::server {

using storage::CellInt;
using storage::CellText;
using storage::SqlCell;
using storage::SqlType;

const std::vector<SqlType>& RecordColumns() {
  static const std::vector<SqlType> columns = {
      SqlType::kInt64, SqlType::kInt64, SqlType::kInt64, SqlType::kText,  SqlType::kText,
      SqlType::kText,  SqlType::kText,  SqlType::kText,  SqlType::kText,  SqlType::kText,
      SqlType::kText,  SqlType::kInt64, SqlType::kInt64, SqlType::kInt64, SqlType::kInt64,
      SqlType::kInt64, SqlType::kInt64, SqlType::kInt64, SqlType::kText,  SqlType::kText,
      SqlType::kInt64, SqlType::kInt64, SqlType::kInt64, SqlType::kInt64, SqlType::kText};
  return columns;
}

void WriteRecordRow(const v1::UsageRecord& r, std::int64_t seq, std::int64_t record_micros,
                    storage::RowSink& sink) {
  auto micros = [](const google::protobuf::Duration& d) {
    return absl::ToInt64Microseconds(FromProto(d));
  };
  sink.Int(seq);
  sink.Int(record_micros);
  sink.Int(absl::ToUnixMicros(FromProto(r.time())));
  sink.Text(r.request_id());
  sink.Text(r.provider());
  sink.Text(r.model());
  sink.Text(r.provider_key());
  sink.Text(r.access_key());
  sink.Text(r.user());
  sink.Text(r.conversation());
  sink.Text(r.message());
  sink.Int(r.tokens().input());
  sink.Int(r.tokens().output());
  sink.Int(r.tokens().cache_read());
  sink.Int(r.tokens().cache_write());
  sink.Int(r.tokens().reasoning());
  sink.Int(micros(r.latency()));
  if (r.has_time_to_first_token()) {
    sink.Int(micros(r.time_to_first_token()));
  } else {
    sink.Null();
  }
  sink.Text(v1::UsageStatus_Name(r.status()));
  sink.Text(r.error_class());
  sink.Int(r.cost_nanos());
  sink.Int(r.priced() ? 1 : 0);
  if (r.has_price_effective_time()) {
    sink.Int(absl::ToUnixMicros(FromProto(r.price_effective_time())));
  } else {
    sink.Null();
  }
  if (r.has_reported_cost_nanos()) {
    sink.Int(r.reported_cost_nanos());
  } else {
    sink.Null();
  }
  sink.Text(r.reservation());
}

std::string EncodeHistogram(const std::map<int, std::int64_t>& slots) {
  std::string out = "{";
  for (const auto& [slot, count] : slots) {
    if (out.size() > 1) out.push_back(',');
    absl::StrAppend(&out, "\"", slot, "\":", count);
  }
  out.push_back('}');
  return out;
}

bool AddHistogram(absl::string_view text, std::map<int, std::int64_t>& slots) {
  // Exactly the shape EncodeHistogram writes (and the migrations build).
  if (!absl::ConsumePrefix(&text, "{") || !absl::ConsumeSuffix(&text, "}")) return false;
  if (text.empty()) return true;
  for (absl::string_view entry : absl::StrSplit(text, ',')) {
    const size_t colon = entry.find(':');
    int slot = 0;
    std::int64_t count = 0;
    if (colon == absl::string_view::npos || entry.size() < 4 || entry.front() != '"' ||
        entry[colon - 1] != '"' || !absl::SimpleAtoi(entry.substr(1, colon - 2), &slot) ||
        !absl::SimpleAtoi(entry.substr(colon + 1), &count)) {
      return false;
    }
    slots[slot] += count;
  }
  return true;
}

v1::UsageRecord DecodeRecord(const storage::SqlRow& row) {
  v1::UsageRecord r;
  const std::int64_t seq = CellInt(row[0]);
  *r.mutable_record_time() = ToProto(absl::FromUnixMicros(CellInt(row[1])));
  *r.mutable_time() = ToProto(absl::FromUnixMicros(CellInt(row[2])));
  r.set_request_id(CellText(row[3]));
  r.set_provider(CellText(row[4]));
  r.set_model(CellText(row[5]));
  r.set_provider_key(CellText(row[6]));
  r.set_access_key(CellText(row[7]));
  r.set_user(CellText(row[8]));
  r.set_conversation(CellText(row[9]));
  r.set_message(CellText(row[10]));
  r.mutable_tokens()->set_input(CellInt(row[11]));
  r.mutable_tokens()->set_output(CellInt(row[12]));
  r.mutable_tokens()->set_cache_read(CellInt(row[13]));
  r.mutable_tokens()->set_cache_write(CellInt(row[14]));
  r.mutable_tokens()->set_reasoning(CellInt(row[15]));
  *r.mutable_latency() = ToProto(absl::Microseconds(CellInt(row[16])));
  if (row[17].has_value()) {
    *r.mutable_time_to_first_token() = ToProto(absl::Microseconds(CellInt(row[17])));
  }
  v1::UsageStatus status = v1::USAGE_STATUS_UNSPECIFIED;
  v1::UsageStatus_Parse(CellText(row[18]), &status);
  r.set_status(status);
  r.set_error_class(CellText(row[19]));
  r.set_cost_nanos(CellInt(row[20]));
  r.set_priced(CellInt(row[21]) != 0);
  if (row[22].has_value()) {
    *r.mutable_price_effective_time() = ToProto(absl::FromUnixMicros(CellInt(row[22])));
  }
  if (row[23].has_value()) r.set_reported_cost_nanos(CellInt(row[23]));
  r.set_reservation(CellText(row[24]));
  r.set_cursor(EncodeCursor(seq));
  return r;
}

}  // namespace modelvault::server
