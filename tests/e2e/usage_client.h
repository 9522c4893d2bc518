#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "modelvault/v1/usage.grpc.pb.h"

// Usage-ledger clients shared by the e2e and fault suites: a record builder and an ingest
// client that sends batches over UsageService.IngestUsage and resends every batch that was
// not acknowledged (on a new stream) until each one is, the way a gateway must.
namespace modelvault::testing {

// A valid record: `request_id`, call `time`, `model` (`providers/{p}/models/{m}`; its
// provider is derived from the name), user and tokens.
v1::UsageRecord UsageRecordOf(const std::string& request_id, absl::Time time,
                              const std::string& model, const std::string& user,
                              std::int64_t input_tokens, std::int64_t output_tokens);

struct IngestOptions {
  // Batches a stream sends ahead of their acknowledgements.
  int window = 4;
  // The deadline of each stream (called once per stream). A stream that ends by its
  // deadline is a cancellation like any other: its unacknowledged batches go again.
  std::function<absl::Duration()> stream_deadline = [] { return absl::Seconds(60); };
  // Gives up (the result then lists the batches never acknowledged) after this long.
  absl::Duration give_up_after = absl::Seconds(120);
  // Polled between streams: true to give up at once (the test saw the server die).
  std::function<bool()> give_up;
  // Called (from the ingesting thread) for every acknowledgement received.
  std::function<void(const v1::IngestUsageResponse&)> on_ack;
};

// What one IngestUntilAcknowledged call saw.
struct IngestResult {
  // The first acknowledgement of each batch, parallel to the batches given.
  std::vector<v1::IngestUsageResponse> acks;
  std::vector<bool> acknowledged;
  int streams_opened = 0;
  int streams_failed = 0;  // ended by an error (the server gone, a deadline, ...)
  int batches_resent = 0;  // sends of a batch after its first
  int acks_total = 0;      // acknowledgements received, repeats included
  // Broken promises of the protocol: an acknowledgement out of order or for no batch in
  // flight, or whose counts do not add up to its batch's size.
  std::vector<std::string> violations;
  // Codes of the statuses that ended failed streams, for the test's report.
  std::vector<grpc::StatusCode> failure_codes;
  // How the last failed stream ended (for failure messages).
  std::string last_failure;

  bool AllAcknowledged() const;
};

// Sends `batches` (each with a distinct batch_id) over IngestUsage streams on the channel
// `channel()` returns when each stream opens, at most `window` batches ahead of their
// acknowledgements, checking that acknowledgements come in order with their batch's id.
// When a stream fails, every batch it has not acknowledged is sent again, in order, on a
// new stream (after a short pause while the server is unreachable). Returns when every
// batch has been acknowledged, after `give_up_after` or when `give_up` says so.
IngestResult IngestUntilAcknowledged(const std::function<std::shared_ptr<grpc::Channel>()>& channel,
                                     const std::vector<v1::IngestUsageRequest>& batches,
                                     const IngestOptions& options = {});

}  // namespace modelvault::testing
