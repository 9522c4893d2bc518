// Parser and SQL compiler for the subset of AIP-160 list filters that modelvault supports.
//
// The compiler only ever emits schema-provided column names, operators and placeholders into the
// SQL text; every user-supplied literal travels as a bound parameter.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace modelvault::storage {

// Type of a filterable field, as the storage layer stores it.
enum class FieldType {
  kString,     // TEXT column
  kInt64,      // BIGINT column
  kBool,       // stored as integer 0/1 (bind as int64 0 or 1)
  kTimestamp,  // BIGINT column holding microseconds since the Unix epoch, UTC
  kEnum,       // TEXT column holding the proto enum value name, e.g. "AUTH_METHOD_BEARER"
};

struct FilterField {
  std::string column;  // SQL column name (trusted, from the schema; never from input)
  FieldType type = FieldType::kString;
  std::vector<std::string> enum_values;  // kEnum: the allowed value names
};

// Filter path (e.g. "display_name", "supports_tools", "create_time") -> column.
using FilterSchema = absl::flat_hash_map<std::string, FilterField>;

// A bound parameter value. Strings for kString/kEnum; int64 for kInt64, kBool (0/1), kTimestamp
// (micros).
using SqlValue = std::variant<std::string, std::int64_t>;

struct CompiledFilter {
  std::string sql;  // e.g. "(display_name = :f0 AND context_window >= :f1)"; empty if filter empty
  std::vector<SqlValue> params;  // params[i] is bound to placeholder ":f<i>" (i counts from
                                 // param_offset)
};

// Limits that bound the work (and recursion) a single request can cause.
inline constexpr int kMaxFilterBytes = 2048;
inline constexpr int kMaxFilterDepth = 32;  // nesting of parentheses
inline constexpr int kMaxFilterComparisons = 64;

// Parses `filter` and compiles it to a parameterized SQL boolean expression.
// Placeholders are named ":f<N>" with N starting at `param_offset`, so callers can combine several
// compiled fragments. Never concatenates a literal into the SQL text.
// Errors: absl::InvalidArgumentError with a message that names the problem and the position
// (1-based character offset), e.g.
// `filter: unknown field "foo" at position 5; filterable fields: a, b, c`.
//
// Supported grammar (AIP-160 subset):
//   filter      := [expression]
//   expression  := sequence { "AND" sequence }
//   sequence    := factor { factor }                 (implicit AND)
//   factor      := term { "OR" term }
//   term        := [ "NOT" | "-" ] simple            ("-" must touch what it negates)
//   simple      := comparison | "(" expression ")"
//   comparison  := field ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) value
//   field       := ident { "." ident }
//   value       := string | integer | ident          (ident: true, false, enum value names)
// As in AIP-160, OR binds tighter than AND; the emitted SQL is parenthesized accordingly.
// Strings are single- or double-quoted with the escapes \" \' \\ \n \t and \* (a literal '*').
// On string fields, an unescaped trailing '*' with "=" is a prefix match (SQL LIKE).
absl::StatusOr<CompiledFilter> CompileFilter(std::string_view filter, const FilterSchema& schema,
                                             int param_offset = 0);

}  // namespace modelvault::storage
