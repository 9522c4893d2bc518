#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "soci/soci.h"
#include "storage/filter.h"
#include "storage/schema.h"

namespace modelvault::storage {

// Named parameters with stable storage, bound to a SOCI statement by name.
// SOCI keeps pointers to bound values, so they live in deques.
class Params final {
 public:
  void AddString(std::string name, std::string value, bool null = false);
  void AddInt(std::string name, std::int64_t value, bool null = false);
  void Add(std::string name, const SqlValue& value);
  void BindTo(soci::statement& statement);

 private:
  struct Entry {
    std::string name;
    bool is_string = false;
    std::string text;
    long long number = 0;  // NOLINT(google-runtime-int): SOCI's 64-bit type
    soci::indicator indicator = soci::i_ok;
  };
  std::deque<Entry> entries_;
};

// Receives one row's columns from a SOCI statement (into() targets).
class RowBuffer final {
 public:
  explicit RowBuffer(const ResourceSchema& schema);
  // Binds `name`, `revision` and every schema column, in SelectList order.
  void BindTo(soci::statement& statement);
  // Builds the resource from the last fetched row.
  absl::Status Decode(google::protobuf::Message& out, std::int64_t& revision) const;

 private:
  struct Cell {
    std::string text;
    long long number = 0;  // NOLINT(google-runtime-int)
    soci::indicator indicator = soci::i_ok;
  };
  const ResourceSchema& schema_;
  std::string name_;
  long long revision_ = 0;  // NOLINT(google-runtime-int)
  std::deque<Cell> cells_;
};

// "name, revision, col1, col2, ..." for SELECTs decoded by RowBuffer.
std::string SelectList(const ResourceSchema& schema);

// Adds ":c_<column>" parameters for every schema column of `resource`.
absl::Status EncodeColumns(const ResourceSchema& schema, const google::protobuf::Message& resource,
                           Params& params);

// The SQL expression a column sorts by (NULLs as -1 so keysets stay total).
std::string SortExpression(const Column* column);
// The sort key of `resource` for `order`, as SortExpression evaluates it.
std::vector<SqlValue> SortKeyOf(const google::protobuf::Message& resource,
                                const std::vector<OrderTerm>& order);

// Microseconds since the epoch of a google.protobuf.Timestamp message.
std::int64_t TimestampMicros(const google::protobuf::Message& timestamp);

}  // namespace modelvault::storage
