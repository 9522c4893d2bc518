#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "modelvault/v1/usage.pb.h"
#include "storage/storage.h"

// The SQL of the usage tables, shared by the ledger's writes and reads.
namespace modelvault::server {

inline constexpr char kRecordColumns[] =
    "seq, record_time, call_time, request_id, provider, model, provider_key, access_key, "
    "user_id, conversation, message, input_tokens, output_tokens, cache_read_tokens, "
    "cache_write_tokens, reasoning_tokens, latency_us, ttft_us, status, error_class, cost_nanos, "
    "priced, price_effective_time, reported_cost_nanos, reservation";

inline constexpr char kSelectRecords[] =
    "SELECT seq, record_time, call_time, request_id, provider, model, provider_key, access_key, "
    "user_id, conversation, message, input_tokens, output_tokens, cache_read_tokens, "
    "cache_write_tokens, reasoning_tokens, latency_us, ttft_us, status, error_class, cost_nanos, "
    "priced, price_effective_time, reported_cost_nanos, reservation FROM usage_records";

inline constexpr char kRollupDimensions[] =
    "bucket, provider, model, provider_key, access_key, user_id";

inline constexpr char kRollupColumns[] =
    "bucket, provider, model, provider_key, access_key, user_id, requests, errors, cancelled, "
    "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, "
    "cost_nanos, unpriced, latency_sum_us, ttft_sum_us, ttft_count, lane, latency_histogram, part";

inline constexpr char kInsertKeyRecorded[] =
    "INSERT INTO provider_key_recorded (key_name, day, requests, tokens, cost_nanos, lane)";
inline constexpr char kKeyRecordedConflict[] =
    " ON CONFLICT (key_name, day, lane) DO UPDATE SET "
    "requests = provider_key_recorded.requests + excluded.requests, "
    "tokens = provider_key_recorded.tokens + excluded.tokens, "
    "cost_nanos = provider_key_recorded.cost_nanos + excluded.cost_nanos";

// A latency histogram as stored in usage_rollups.latency_histogram: a JSON
// object of slot (see LatencySlot) to count, e.g. {"63":2,"70":1}.
std::string EncodeHistogram(const std::map<int, std::int64_t>& slots);
// Adds the counts of a stored histogram to `slots`; false if malformed.
bool AddHistogram(absl::string_view text, std::map<int, std::int64_t>& slots);

// Column types of kSelectRecords.
const std::vector<storage::SqlType>& RecordColumns();
// The cells of kRecordColumns for one record, written to `sink`.
void WriteRecordRow(const v1::UsageRecord& record, std::int64_t seq, std::int64_t record_micros,
                    storage::RowSink& sink);
// A row of kSelectRecords as a record (with its cursor).
v1::UsageRecord DecodeRecord(const storage::SqlRow& row);

}  // namespace modelvault::server
