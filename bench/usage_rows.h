// The usage records the benchmark writes, shared by the load generator
// (IngestUsage, RecordUsage, WatchUsage) and the raw COPY limit
// (mv_copy_bench), so that both store equivalent rows: the same models,
// users, provider keys, token counts, latencies and text lengths.

#ifndef MODELVAULT_BENCH_USAGE_ROWS_H_
#define MODELVAULT_BENCH_USAGE_ROWS_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace modelvault::bench {

// A gateway's view of one LLM call, before the server costs it.
struct UsageRow {
  std::string request_id;
  std::string provider;
  std::string model;
  std::string provider_key;
  std::string user;
  std::string conversation;
  std::string message;
  int64_t input = 0;
  int64_t output = 0;
  int64_t cache_read = 0;
  int64_t cache_write = 0;
  int64_t reasoning = 0;
  int64_t latency_us = 0;
  int64_t ttft_us = 0;
  // Nano-USD per million tokens of the model's current seeded price (input,
  // output), for rows that are not costed by the server (COPY).
  int64_t input_price = 0;
  int64_t output_price = 0;
};

// Seeded models (migrations/seed/catalog.textproto) with a price, so that the
// server computes a cost for every record.
struct BenchModel {
  const char* provider;
  const char* model;
  int64_t input_price;
  int64_t output_price;
};
inline constexpr std::array<BenchModel, 4> kBenchModels = {{
    {"providers/openai", "providers/openai/models/gpt-4o", 2500000000, 10000000000},
    {"providers/openai", "providers/openai/models/gpt-4o-mini", 150000000, 600000000},
    {"providers/anthropic", "providers/anthropic/models/claude-sonnet-4", 3000000000, 15000000000},
    {"providers/google", "providers/google/models/gemini-2.5-flash", 300000000, 2500000000},
}};
inline constexpr int kBenchUsers = 100;
inline constexpr int kBenchKeysPerProvider = 2;

// A random 8-hex-digit prefix for the request ids of one run, so that runs
// against the same database never collide.
inline std::string RandomRunId() {
  std::random_device device;
  return absl::StrFormat("%08x", device());
}

// Record `n` of writer `writer` in run `run`: request ids are distinct per
// (run, writer, n); everything else cycles through a realistic mix of
// models, users and keys.
inline UsageRow MakeUsageRow(const std::string& run, int writer, int64_t n) {
  UsageRow row;
  const auto mix = static_cast<uint64_t>(n) * 2654435761U + static_cast<uint64_t>(writer) * 97U;
  const BenchModel& m = kBenchModels[mix % kBenchModels.size()];
  row.request_id = absl::StrFormat("bench-%s-%03d-%010d", run, writer, n);
  row.provider = m.provider;
  row.model = m.model;
  row.provider_key = absl::StrCat(m.provider, "/keys/usage-", (mix >> 8) % kBenchKeysPerProvider);
  row.user = absl::StrFormat("user-%04d", (mix >> 4) % kBenchUsers);
  row.conversation = absl::StrFormat("conv-%s-%03d-%08d", run, writer, n / 8);
  row.message = absl::StrFormat("msg-%s-%03d-%010d", run, writer, n);
  row.input = 200 + static_cast<int64_t>(mix % 3000);
  row.output = 50 + static_cast<int64_t>((mix >> 3) % 800);
  row.cache_read = (mix & 1U) != 0 ? 1024 : 0;
  row.latency_us = 300000 + static_cast<int64_t>((mix >> 5) % 4000000);
  row.ttft_us = row.latency_us / 5;
  row.input_price = m.input_price;
  row.output_price = m.output_price;
  return row;
}

// The wall-clock time in microseconds since the Unix epoch (the clock the
// server stamps record_time with).
inline int64_t UnixMicrosNow() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace modelvault::bench

#endif  // MODELVAULT_BENCH_USAGE_ROWS_H_
