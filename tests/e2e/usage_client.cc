#include "tests/e2e/usage_client.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace modelvault::testing {

v1::UsageRecord UsageRecordOf(const std::string& request_id, absl::Time time,
                              const std::string& model, const std::string& user,
                              std::int64_t input_tokens, std::int64_t output_tokens) {
  v1::UsageRecord record;
  record.set_request_id(request_id);
  const std::int64_t micros = absl::ToUnixMicros(time);
  record.mutable_time()->set_seconds(micros / 1'000'000);
  record.mutable_time()->set_nanos(static_cast<std::int32_t>(micros % 1'000'000) * 1000);
  const size_t models = model.find("/models/");
  record.set_provider(models == std::string::npos ? model : model.substr(0, models));
  record.set_model(model);
  record.set_user(user);
  record.mutable_tokens()->set_input(input_tokens);
  record.mutable_tokens()->set_output(output_tokens);
  // Whole microseconds, as the server keeps them.
  record.mutable_latency()->set_nanos(static_cast<std::int32_t>(1000 + input_tokens % 997) * 1000);
  return record;
}

bool IngestResult::AllAcknowledged() const {
  return std::all_of(acknowledged.begin(), acknowledged.end(), [](bool a) { return a; });
}

IngestResult IngestUntilAcknowledged(const std::function<std::shared_ptr<grpc::Channel>()>& channel,
                                     const std::vector<v1::IngestUsageRequest>& batches,
                                     const IngestOptions& options) {
  IngestResult result;
  result.acks.resize(batches.size());
  result.acknowledged.assign(batches.size(), false);
  std::deque<size_t> pending;  // batches to send, in order
  for (size_t b = 0; b < batches.size(); ++b) pending.push_back(b);
  std::vector<int> sends(batches.size(), 0);
  const size_t window = static_cast<size_t>(std::max(1, options.window));
  const absl::Time give_up = absl::Now() + options.give_up_after;
  int fruitless = 0;  // streams in a row that acknowledged nothing

  while (!pending.empty() && absl::Now() < give_up && !(options.give_up && options.give_up())) {
    std::unique_ptr<v1::UsageService::Stub> stub = v1::UsageService::NewStub(channel());
    grpc::ClientContext context;
    // After a few fruitless streams, a long deadline: a short random one must not keep a
    // batch from ever getting through.
    absl::Duration deadline = options.stream_deadline();
    if (fruitless >= 3) deadline = std::max(deadline, absl::Seconds(10));
    deadline = std::min(deadline, std::max(give_up - absl::Now(), absl::Milliseconds(1)));
    context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(deadline));
    ++result.streams_opened;
    std::unique_ptr<grpc::ClientReaderWriter<v1::IngestUsageRequest, v1::IngestUsageResponse>>
        stream = stub->IngestUsage(&context);

    std::deque<size_t> in_flight;  // sent, not yet acknowledged, in order
    bool write_failed = false;
    bool progress = false;
    auto take_ack = [&](const v1::IngestUsageResponse& ack) {
      ++result.acks_total;
      if (options.on_ack) options.on_ack(ack);
      auto it = std::find_if(in_flight.begin(), in_flight.end(),
                             [&](size_t b) { return batches[b].batch_id() == ack.batch_id(); });
      if (it == in_flight.end()) {
        result.violations.push_back(absl::StrCat("an acknowledgement of batch ", ack.batch_id(),
                                                 ", which is not in flight on its stream"));
        return;
      }
      if (it != in_flight.begin()) {
        result.violations.push_back(absl::StrCat(
            "batch ", ack.batch_id(), " was acknowledged before batch ",
            batches[in_flight.front()].batch_id(), ", which was sent before it on the stream"));
      }
      const size_t b = *it;
      in_flight.erase(it);
      const int size = batches[b].records_size();
      if (ack.accepted() + ack.duplicates() + ack.rejected_size() != size) {
        result.violations.push_back(
            absl::StrCat("the acknowledgement of batch ", ack.batch_id(), " of ", size,
                         " records counts accepted=", ack.accepted(),
                         " duplicates=", ack.duplicates(), " rejected=", ack.rejected_size()));
      }
      if (!result.acknowledged[b]) {
        result.acknowledged[b] = true;
        result.acks[b] = ack;
      }
      progress = true;
    };

    while (true) {
      while (!write_failed && in_flight.size() < window && !pending.empty()) {
        const size_t b = pending.front();
        if (!stream->Write(batches[b])) {
          write_failed = true;  // the stream is ending: read what it still says
          break;
        }
        if (sends[b]++ > 0) ++result.batches_resent;
        pending.pop_front();
        in_flight.push_back(b);
      }
      if (in_flight.empty()) break;
      v1::IngestUsageResponse ack;
      if (!stream->Read(&ack)) break;
      take_ack(ack);
    }
    if (in_flight.empty() && !write_failed) {
      stream->WritesDone();
      v1::IngestUsageResponse extra;
      while (stream->Read(&extra)) take_ack(extra);
    } else if (write_failed) {
      v1::IngestUsageResponse ack;
      while (stream->Read(&ack)) take_ack(ack);
    }
    const grpc::Status status = stream->Finish();
    if (status.ok() && !in_flight.empty()) {
      result.violations.push_back(
          absl::StrCat("a stream ended OK with ", in_flight.size(), " batches unacknowledged"));
    }
    // What was not acknowledged goes again, first and in order.
    pending.insert(pending.begin(), in_flight.begin(), in_flight.end());
    if (status.ok() && !write_failed) {
      fruitless = 0;
      continue;
    }
    ++result.streams_failed;
    result.failure_codes.push_back(status.error_code());
    result.last_failure = absl::StrCat("code ", status.error_code(), ": ", status.error_message());
    fruitless = progress ? 0 : fruitless + 1;
    if (!progress) {
      // The server is away (restarting, its database down): try again shortly.
      std::this_thread::sleep_for(std::chrono::milliseconds(20 * std::min(fruitless, 10)));
    }
  }
  return result;
}

}  // namespace modelvault::testing
