#pragma once

#include "absl/time/time.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "google/protobuf/util/time_util.h"

// google.protobuf.Timestamp <-> absl::Time and Duration <-> absl::Duration, at the microsecond
// precision the storage keeps.
namespace modelvault::server {

inline absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixMicros(google::protobuf::util::TimeUtil::TimestampToMicroseconds(t));
}

inline google::protobuf::Timestamp ToProto(absl::Time t) {
  return google::protobuf::util::TimeUtil::MicrosecondsToTimestamp(absl::ToUnixMicros(t));
}

inline absl::Duration FromProto(const google::protobuf::Duration& d) {
  return absl::Microseconds(google::protobuf::util::TimeUtil::DurationToMicroseconds(d));
}

inline google::protobuf::Duration ToProto(absl::Duration d) {
  return google::protobuf::util::TimeUtil::MicrosecondsToDuration(absl::ToInt64Microseconds(d));
}

}  // namespace modelvault::server
