#include "storage/filter.h"

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace modelvault::storage {
namespace {

constexpr std::int64_t kJune2024Micros = 1717200000LL * 1000000;  // 2024-06-01T00:00:00Z

FilterSchema TestSchema() {
  FilterSchema schema;
  schema["display_name"] = {"display_name", FieldType::kString, {}};
  schema["name"] = {"name", FieldType::kString, {}};
  schema["context_window"] = {"context_window", FieldType::kInt64, {}};
  schema["supports_tools"] = {"supports_tools", FieldType::kBool, {}};
  // Column names deliberately differ from paths so tests prove the schema column is emitted.
  schema["create_time"] = {"create_time_us", FieldType::kTimestamp, {}};
  schema["labels.team"] = {"label_team", FieldType::kString, {}};
  schema["auth_method"] = {
      "auth_method",
      FieldType::kEnum,
      {"AUTH_METHOD_UNSPECIFIED", "AUTH_METHOD_BEARER", "AUTH_METHOD_API_KEY"}};
  return schema;
}

constexpr std::string_view kFieldList =
    "filterable fields: auth_method, context_window, create_time, display_name, labels.team, "
    "name, supports_tools";

absl::StatusOr<CompiledFilter> Compile(std::string_view filter, int param_offset = 0) {
  return CompileFilter(filter, TestSchema(), param_offset);
}

// Asserts that `filter` compiles to exactly `sql` with exactly `params`.
void ExpectCompiles(std::string_view filter, std::string_view sql,
                    const std::vector<SqlValue>& params, int param_offset = 0) {
  SCOPED_TRACE(std::string("filter: ") + std::string(filter));
  const absl::StatusOr<CompiledFilter> compiled = Compile(filter, param_offset);
  ASSERT_TRUE(compiled.ok()) << compiled.status().ToString();
  EXPECT_EQ(compiled->sql, sql);
  EXPECT_EQ(compiled->params, params);
}

// Asserts that `filter` is rejected as INVALID_ARGUMENT with a message containing `substring`.
void ExpectRejected(std::string_view filter, std::string_view substring) {
  SCOPED_TRACE(std::string("filter: ") + std::string(filter));
  const absl::StatusOr<CompiledFilter> compiled = Compile(filter);
  ASSERT_FALSE(compiled.ok()) << "unexpectedly compiled to: " << compiled->sql;
  EXPECT_EQ(compiled.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(compiled.status().message());
  EXPECT_EQ(message.rfind("filter: ", 0), 0U) << message;
  EXPECT_NE(message.find(substring), std::string::npos)
      << "message \"" << message << "\" lacks \"" << substring << "\"";
}

// Asserts the exact error message.
void ExpectError(std::string_view filter, std::string_view message) {
  SCOPED_TRACE(std::string("filter: ") + std::string(filter));
  const absl::StatusOr<CompiledFilter> compiled = Compile(filter);
  ASSERT_FALSE(compiled.ok()) << "unexpectedly compiled to: " << compiled->sql;
  EXPECT_EQ(compiled.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(compiled.status().message()), message);
}

SqlValue S(std::string s) { return {std::move(s)}; }
SqlValue I(std::int64_t i) { return {i}; }

// ---------------------------------------------------------------------------------------------
// Empty filters
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, EmptyFilterCompilesToEmptySql) {
  ExpectCompiles("", "", {});
  ExpectCompiles("   ", "", {});
  ExpectCompiles(" \t\r\n ", "", {});
}

TEST(CompileFilterTest, EmptyFilterIgnoresParamOffset) { ExpectCompiles("", "", {}, 7); }

// ---------------------------------------------------------------------------------------------
// Comparisons and literal types
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, StringEquality) {
  ExpectCompiles(R"(display_name = "GPT-4o")", "display_name = :f0", {S("GPT-4o")});
  ExpectCompiles(R"(display_name = 'GPT-4o')", "display_name = :f0", {S("GPT-4o")});
  ExpectCompiles(R"(display_name = "")", "display_name = :f0", {S("")});
}

TEST(CompileFilterTest, StringOperators) {
  ExpectCompiles(R"(name != "a")", "name <> :f0", {S("a")});
  ExpectCompiles(R"(name < "a")", "name < :f0", {S("a")});
  ExpectCompiles(R"(name <= "a")", "name <= :f0", {S("a")});
  ExpectCompiles(R"(name > "a")", "name > :f0", {S("a")});
  ExpectCompiles(R"(name >= "a")", "name >= :f0", {S("a")});
}

TEST(CompileFilterTest, StringEscapes) {
  ExpectCompiles(R"(name = "a\"b")", "name = :f0", {S("a\"b")});
  ExpectCompiles(R"(name = 'a\'b')", "name = :f0", {S("a'b")});
  ExpectCompiles(R"(name = "a\'b")", "name = :f0", {S("a'b")});
  ExpectCompiles(R"(name = 'a"b')", "name = :f0", {S("a\"b")});
  ExpectCompiles(R"(name = "a'b")", "name = :f0", {S("a'b")});
  ExpectCompiles(R"(name = "a\\b")", "name = :f0", {S("a\\b")});
  ExpectCompiles(R"(name = "a\nb\tc")", "name = :f0", {S("a\nb\tc")});
  ExpectCompiles(R"(name = "a\*")", "name = :f0", {S("a*")});
  ExpectCompiles(R"(name = "\\")", "name = :f0", {S("\\")});
}

TEST(CompileFilterTest, StringWithUnicode) {
  ExpectCompiles("name = \"caf\xC3\xA9 \xF0\x9F\x98\x80\"", "name = :f0",
                 {S("caf\xC3\xA9 \xF0\x9F\x98\x80")});
}

TEST(CompileFilterTest, DottedFieldPathMapsToSchemaColumn) {
  ExpectCompiles(R"(labels.team = "ml")", "label_team = :f0", {S("ml")});
}

TEST(CompileFilterTest, IntegerOperators) {
  ExpectCompiles("context_window = 8192", "context_window = :f0", {I(8192)});
  ExpectCompiles("context_window != 8192", "context_window <> :f0", {I(8192)});
  ExpectCompiles("context_window < 8192", "context_window < :f0", {I(8192)});
  ExpectCompiles("context_window <= 8192", "context_window <= :f0", {I(8192)});
  ExpectCompiles("context_window > 8192", "context_window > :f0", {I(8192)});
  ExpectCompiles("context_window >= 8192", "context_window >= :f0", {I(8192)});
}

TEST(CompileFilterTest, IntegerLiterals) {
  ExpectCompiles("context_window = 0", "context_window = :f0", {I(0)});
  ExpectCompiles("context_window = -5", "context_window = :f0", {I(-5)});
  ExpectCompiles("context_window = 007", "context_window = :f0", {I(7)});
  ExpectCompiles("context_window>=-1", "context_window >= :f0", {I(-1)});
  ExpectCompiles("context_window = 9223372036854775807", "context_window = :f0",
                 {I(std::numeric_limits<std::int64_t>::max())});
  ExpectCompiles("context_window = -9223372036854775808", "context_window = :f0",
                 {I(std::numeric_limits<std::int64_t>::min())});
}

TEST(CompileFilterTest, IntegerOverflowIsRejected) {
  ExpectError("context_window = 9223372036854775808",
              "filter: integer \"9223372036854775808\" does not fit in 64 bits at position 18");
  ExpectRejected("context_window = -9223372036854775809", "does not fit in 64 bits");
  ExpectRejected("context_window = 100000000000000000000000000000", "does not fit in 64 bits");
}

TEST(CompileFilterTest, MalformedNumbersAreRejected) {
  ExpectRejected("context_window = 1.5", "floating-point numbers are not supported");
  ExpectRejected("context_window = 1e5", "malformed number");
  ExpectRejected("context_window = 0x10", "malformed number");
  ExpectRejected("context_window = 12abc", "malformed number");
  ExpectRejected("context_window = 1.", "malformed number");
  ExpectRejected("context_window = - 5", R"(expected a value after "=" but found "-")");
  ExpectRejected("context_window = --5", R"(expected a value after "=" but found "-")");
  ExpectRejected("context_window = +5", "unexpected character \"+\"");
}

TEST(CompileFilterTest, BoolLiterals) {
  ExpectCompiles("supports_tools = true", "supports_tools = :f0", {I(1)});
  ExpectCompiles("supports_tools = false", "supports_tools = :f0", {I(0)});
  ExpectCompiles("supports_tools != true", "supports_tools <> :f0", {I(1)});
}

TEST(CompileFilterTest, BoolRejectsOtherLiteralsAndOrdering) {
  ExpectError("supports_tools = \"true\"",
              "filter: field \"supports_tools\" expects true or false but found string \"true\" "
              "at position 18");
  ExpectRejected("supports_tools = 1", "expects true or false but found integer 1");
  ExpectRejected("supports_tools = TRUE", "expects true or false but found identifier \"TRUE\"");
  ExpectRejected("supports_tools = yes", "expects true or false");
  ExpectError("supports_tools < true",
              "filter: operator \"<\" is not supported on boolean field \"supports_tools\"; use = "
              "or != at position 16");
  ExpectRejected("supports_tools >= false", "operator \">=\" is not supported on boolean field");
  ExpectRejected("supports_tools > true", "not supported on boolean field");
  ExpectRejected("supports_tools <= true", "not supported on boolean field");
}

TEST(CompileFilterTest, EnumLiterals) {
  ExpectCompiles("auth_method = AUTH_METHOD_BEARER", "auth_method = :f0",
                 {S("AUTH_METHOD_BEARER")});
  ExpectCompiles("auth_method = \"AUTH_METHOD_API_KEY\"", "auth_method = :f0",
                 {S("AUTH_METHOD_API_KEY")});
  ExpectCompiles("auth_method = 'AUTH_METHOD_API_KEY'", "auth_method = :f0",
                 {S("AUTH_METHOD_API_KEY")});
  ExpectCompiles("auth_method != AUTH_METHOD_UNSPECIFIED", "auth_method <> :f0",
                 {S("AUTH_METHOD_UNSPECIFIED")});
}

TEST(CompileFilterTest, EnumRejectsUnknownValuesAndOrdering) {
  ExpectError("auth_method = BEARER",
              "filter: invalid value \"BEARER\" for enum field \"auth_method\" at position 15; "
              "allowed values: AUTH_METHOD_UNSPECIFIED, AUTH_METHOD_BEARER, AUTH_METHOD_API_KEY");
  ExpectRejected("auth_method = auth_method_bearer", "invalid value \"auth_method_bearer\"");
  ExpectRejected("auth_method = \"AUTH_METHOD_BEARER \"", "invalid value");
  ExpectRejected("auth_method = \"AUTH_METHOD_*\"", "invalid value");
  ExpectRejected("auth_method = 1", "expects an enum value name but found integer 1");
  ExpectRejected("auth_method > AUTH_METHOD_BEARER",
                 R"(operator ">" is not supported on enum field "auth_method")");
  ExpectRejected("auth_method <= AUTH_METHOD_BEARER", "not supported on enum field");
}

TEST(CompileFilterTest, EnumWithNoAllowedValues) {
  FilterSchema schema;
  schema["state"] = {"state", FieldType::kEnum, {}};
  const absl::StatusOr<CompiledFilter> compiled = CompileFilter("state = ACTIVE", schema);
  ASSERT_FALSE(compiled.ok());
  EXPECT_EQ(compiled.status().message(),
            "filter: invalid value \"ACTIVE\" for enum field \"state\" at position 9; allowed "
            "values: (none)");
}

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, TimestampUtc) {
  ExpectCompiles(R"(create_time = "2024-06-01T00:00:00Z")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time >= "2024-06-01T00:00:00Z")", "create_time_us >= :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time < '2024-06-01T00:00:00Z')", "create_time_us < :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "1970-01-01T00:00:00Z")", "create_time_us = :f0", {I(0)});
  ExpectCompiles(R"(create_time = "2024-02-29T00:00:00Z")", "create_time_us = :f0",
                 {I(1709164800LL * 1000000)});
}

TEST(CompileFilterTest, TimestampOffsetsConvertToUtc) {
  ExpectCompiles(R"(create_time = "2024-06-01T02:00:00+02:00")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "2024-05-31T19:00:00-05:00")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "2024-06-01T05:30:00+05:30")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "2024-05-31T14:15:00-09:45")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "2024-06-01T00:00:00+00:00")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "2024-06-01T00:00:00-00:00")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
  ExpectCompiles(R"(create_time = "2024-06-01t00:00:00z")", "create_time_us = :f0",
                 {I(kJune2024Micros)});
}

TEST(CompileFilterTest, TimestampFractionalSeconds) {
  ExpectCompiles(R"(create_time = "2024-06-01T00:00:00.5Z")", "create_time_us = :f0",
                 {I(kJune2024Micros + 500000)});
  ExpectCompiles(R"(create_time = "2024-06-01T00:00:00.123456Z")", "create_time_us = :f0",
                 {I(kJune2024Micros + 123456)});
  // Sub-microsecond digits are truncated.
  ExpectCompiles(R"(create_time = "2024-06-01T00:00:00.123456789Z")", "create_time_us = :f0",
                 {I(kJune2024Micros + 123456)});
  ExpectCompiles(R"(create_time = "2024-06-01T02:00:00.000001+02:00")", "create_time_us = :f0",
                 {I(kJune2024Micros + 1)});
  // Before the epoch the fraction still counts forward from the whole second.
  ExpectCompiles(R"(create_time = "1969-12-31T23:59:59.5Z")", "create_time_us = :f0", {I(-500000)});
}

TEST(CompileFilterTest, TimestampExtremeYears) {
  ExpectCompiles(R"(create_time = "0001-01-01T00:00:00Z")", "create_time_us = :f0",
                 {I(-62135596800LL * 1000000)});
  ExpectCompiles(R"(create_time = "9999-12-31T23:59:59.999999Z")", "create_time_us = :f0",
                 {I(253402300799LL * 1000000 + 999999)});
}

TEST(CompileFilterTest, InvalidTimestampsAreRejected) {
  ExpectError(R"(create_time = "2024-02-30T00:00:00Z")",
              "filter: timestamp \"2024-02-30T00:00:00Z\" is not a valid calendar date at "
              "position 15");
  ExpectRejected(R"(create_time = "2023-02-29T00:00:00Z")", "is not a valid calendar date");
  ExpectRejected(R"(create_time = "2024-13-01T00:00:00Z")", "is not a valid calendar date");
  ExpectRejected(R"(create_time = "2024-00-01T00:00:00Z")", "is not a valid calendar date");
  ExpectRejected(R"(create_time = "2024-04-31T00:00:00Z")", "is not a valid calendar date");
  ExpectRejected(R"(create_time = "2024-06-00T00:00:00Z")", "is not a valid calendar date");
  ExpectRejected(R"(create_time = "2024-06-01T24:00:00Z")", "is not a valid time of day");
  ExpectRejected(R"(create_time = "2024-06-01T23:60:00Z")", "is not a valid time of day");
  ExpectRejected(R"(create_time = "2016-12-31T23:59:60Z")", "is not a valid time of day");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00+24:00")", "out-of-range UTC offset");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00+02:60")", "out-of-range UTC offset");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00.1234567891Z")",
                 "more than 9 fractional-second digits");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00Z ")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = " 2024-06-01T00:00:00Z")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01 00:00:00Z")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00.Z")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01T00:00Z")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-6-1T00:00:00Z")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00+0200")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00+02")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "yesterday")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "")", "is not an RFC 3339 timestamp");
  ExpectRejected(R"(create_time = "2024-06-01T00:00:00Z*")", "is not an RFC 3339 timestamp");
}

TEST(CompileFilterTest, TimestampRequiresQuotedString) {
  ExpectError("create_time = 1717200000",
              "filter: field \"create_time\" expects a quoted RFC 3339 timestamp but found "
              "integer 1717200000 at position 15");
  ExpectRejected("create_time = now", "expects a quoted RFC 3339 timestamp");
}

// ---------------------------------------------------------------------------------------------
// Type checking of the remaining combinations
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, StringFieldRequiresQuotedString) {
  ExpectError("name = 5",
              "filter: field \"name\" expects a quoted string but found integer 5 at position 8");
  ExpectRejected("name = gpt", "expects a quoted string but found identifier \"gpt\"");
  ExpectRejected("name = true", "expects a quoted string");
}

TEST(CompileFilterTest, IntFieldRequiresInteger) {
  ExpectError("context_window = \"5\"",
              "filter: field \"context_window\" expects an integer but found string \"5\" at "
              "position 18");
  ExpectRejected("context_window = true", "expects an integer");
  ExpectRejected("context_window = big", "expects an integer");
}

// ---------------------------------------------------------------------------------------------
// Boolean structure, precedence and SQL shape
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, ExplicitAnd) {
  ExpectCompiles(R"(display_name = "GPT" AND context_window >= 8192)",
                 "(display_name = :f0 AND context_window >= :f1)", {S("GPT"), I(8192)});
}

TEST(CompileFilterTest, ExplicitOr) {
  ExpectCompiles(R"(name = "a" OR name = "b")", "(name = :f0 OR name = :f1)", {S("a"), S("b")});
}

TEST(CompileFilterTest, ChainsOfTheSameOperatorAreFlattened) {
  ExpectCompiles(R"(name = "a" AND name = "b" AND name = "c")",
                 "(name = :f0 AND name = :f1 AND name = :f2)", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(name = "a" OR name = "b" OR name = "c")",
                 "(name = :f0 OR name = :f1 OR name = :f2)", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"((name = "a" OR name = "b") OR name = "c")",
                 "(name = :f0 OR name = :f1 OR name = :f2)", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(name = "a" AND (name = "b" AND name = "c"))",
                 "(name = :f0 AND name = :f1 AND name = :f2)", {S("a"), S("b"), S("c")});
}

TEST(CompileFilterTest, ImplicitAndByJuxtaposition) {
  ExpectCompiles(R"(name = "a" context_window = 1)", "(name = :f0 AND context_window = :f1)",
                 {S("a"), I(1)});
  ExpectCompiles(R"(name="a" context_window=1 supports_tools=true)",
                 "(name = :f0 AND context_window = :f1 AND supports_tools = :f2)",
                 {S("a"), I(1), I(1)});
  // Implicit and explicit AND mean the same thing, so they share one group.
  ExpectCompiles(R"(name = "a" name = "b" AND name = "c")",
                 "(name = :f0 AND name = :f1 AND name = :f2)", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"((name = "a")(name = "b"))", "(name = :f0 AND name = :f1)", {S("a"), S("b")});
}

TEST(CompileFilterTest, OrBindsTighterThanAnd) {
  // AIP-160: "a AND b OR c" is "a AND (b OR c)".
  ExpectCompiles(R"(name = "a" AND name = "b" OR name = "c")",
                 "(name = :f0 AND (name = :f1 OR name = :f2))", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(name = "a" OR name = "b" AND name = "c")",
                 "((name = :f0 OR name = :f1) AND name = :f2)", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(name = "a" OR name = "b" AND name = "c" OR name = "d")",
                 "((name = :f0 OR name = :f1) AND (name = :f2 OR name = :f3))",
                 {S("a"), S("b"), S("c"), S("d")});
}

TEST(CompileFilterTest, OrBindsTighterThanImplicitAnd) {
  ExpectCompiles(R"(name = "a" name = "b" OR name = "c")",
                 "(name = :f0 AND (name = :f1 OR name = :f2))", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(name = "a" OR name = "b" name = "c")",
                 "((name = :f0 OR name = :f1) AND name = :f2)", {S("a"), S("b"), S("c")});
}

TEST(CompileFilterTest, ParenthesesOverridePrecedence) {
  ExpectCompiles(R"((name = "a" AND name = "b") OR name = "c")",
                 "((name = :f0 AND name = :f1) OR name = :f2)", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(name = "a" OR (name = "b" name = "c"))",
                 "(name = :f0 OR (name = :f1 AND name = :f2))", {S("a"), S("b"), S("c")});
  ExpectCompiles(R"(((name = "a")))", "name = :f0", {S("a")});
}

TEST(CompileFilterTest, Not) {
  ExpectCompiles(R"(NOT name = "a")", "NOT (name = :f0)", {S("a")});
  ExpectCompiles(R"(NOT (name = "a"))", "NOT (name = :f0)", {S("a")});
  ExpectCompiles(R"(NOT(name = "a"))", "NOT (name = :f0)", {S("a")});
  ExpectCompiles(R"(NOT (name = "a" OR name = "b"))", "NOT (name = :f0 OR name = :f1)",
                 {S("a"), S("b")});
  ExpectCompiles(R"(NOT (name = "a" name = "b"))", "NOT (name = :f0 AND name = :f1)",
                 {S("a"), S("b")});
  ExpectCompiles(R"(NOT (NOT name = "a"))", "NOT (NOT (name = :f0))", {S("a")});
}

TEST(CompileFilterTest, NotBindsTighterThanOrAndAnd) {
  ExpectCompiles(R"(NOT name = "a" OR name = "b")", "(NOT (name = :f0) OR name = :f1)",
                 {S("a"), S("b")});
  ExpectCompiles(R"(name = "a" AND NOT supports_tools = true)",
                 "(name = :f0 AND NOT (supports_tools = :f1))", {S("a"), I(1)});
  ExpectCompiles(R"(NOT name = "a" NOT name = "b")", "(NOT (name = :f0) AND NOT (name = :f1))",
                 {S("a"), S("b")});
}

TEST(CompileFilterTest, MinusPrefixIsNot) {
  ExpectCompiles(R"(-name = "a")", "NOT (name = :f0)", {S("a")});
  ExpectCompiles(R"(-(name = "a" OR name = "b"))", "NOT (name = :f0 OR name = :f1)",
                 {S("a"), S("b")});
  ExpectCompiles(R"(name = "a" -name = "b")", "(name = :f0 AND NOT (name = :f1))",
                 {S("a"), S("b")});
  ExpectError(R"(- name = "a")",
              R"(filter: "-" must be immediately followed by a field or "(" at position 1)");
}

TEST(CompileFilterTest, WhitespaceIsFlexible) {
  ExpectCompiles("name=\"a\"", "name = :f0", {S("a")});
  ExpectCompiles("  \t\n name\t=\r\n\"a\"  \n", "name = :f0", {S("a")});
  ExpectCompiles("(name=\"a\"AND context_window>=1)OR(supports_tools=true)",
                 "((name = :f0 AND context_window >= :f1) OR supports_tools = :f2)",
                 {S("a"), I(1), I(1)});
  ExpectCompiles("name = \"a\"\nAND\ncontext_window != 2", "(name = :f0 AND context_window <> :f1)",
                 {S("a"), I(2)});
}

TEST(CompileFilterTest, ParamsAreNumberedInTextOrder) {
  ExpectCompiles(R"(NOT (name = "a" OR context_window < 3) create_time > "2024-06-01T00:00:00Z")",
                 "(NOT (name = :f0 OR context_window < :f1) AND create_time_us > :f2)",
                 {S("a"), I(3), I(kJune2024Micros)});
}

TEST(CompileFilterTest, ParamOffsetShiftsPlaceholderNames) {
  ExpectCompiles(R"(name = "a" AND context_window = 3)", "(name = :f5 AND context_window = :f6)",
                 {S("a"), I(3)}, 5);
  ExpectCompiles(R"(name = "a*")", "name LIKE :f12 ESCAPE '\\'", {S("a%")}, 12);
}

TEST(CompileFilterTest, NegativeParamOffsetIsRejected) {
  const absl::StatusOr<CompiledFilter> compiled = Compile(R"(name = "a")", -1);
  ASSERT_FALSE(compiled.ok());
  EXPECT_EQ(compiled.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(compiled.status().message().find("param_offset"), absl::string_view::npos);
}

// ---------------------------------------------------------------------------------------------
// Prefix wildcard (LIKE)
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, TrailingWildcardIsPrefixMatch) {
  ExpectCompiles(R"(name = "gpt-4*")", "name LIKE :f0 ESCAPE '\\'", {S("gpt-4%")});
  ExpectCompiles(R"(name = "*")", "name LIKE :f0 ESCAPE '\\'", {S("%")});
  ExpectCompiles(R"(labels.team = 'ml*')", "label_team LIKE :f0 ESCAPE '\\'", {S("ml%")});
  ExpectCompiles(R"(NOT name = "a*")", "NOT (name LIKE :f0 ESCAPE '\\')", {S("a%")});
}

TEST(CompileFilterTest, LikeMetacharactersAreEscaped) {
  // Filter text: name = "50%_off\\*"  ->  prefix 50%_off\ .
  ExpectCompiles(R"(name = "50%_off\\*")", "name LIKE :f0 ESCAPE '\\'", {S(R"(50\%\_off\\%)")});
  // Without a wildcard, % and _ are ordinary characters of an equality match.
  ExpectCompiles(R"(name = "50%_off")", "name = :f0", {S("50%_off")});
}

TEST(CompileFilterTest, EscapedStarIsLiteral) {
  ExpectCompiles(R"(name = "a\*")", "name = :f0", {S("a*")});
  ExpectCompiles(R"(name = "a\**")", "name LIKE :f0 ESCAPE '\\'", {S("a*%")});
  ExpectCompiles(R"(name = "\*a\*b")", "name = :f0", {S("*a*b")});
  ExpectCompiles(R"(name != "a\*")", "name <> :f0", {S("a*")});
}

TEST(CompileFilterTest, MisplacedWildcardsAreRejected) {
  ExpectError(R"(name = "a*b")",
              "filter: \"*\" wildcard is only supported at the end of a string (escape a literal "
              "\"*\" as \\*) at position 10");
  ExpectRejected(R"(name = "*a")", "only supported at the end of a string");
  ExpectRejected(R"(name = "**")", "only supported at the end of a string");
  ExpectError(R"(name != "a*")",
              "filter: \"*\" wildcard is only supported with \"=\" (escape a literal \"*\" as "
              "\\*) at position 11");
  ExpectRejected(R"(name >= "a*")", "only supported with \"=\"");
  ExpectRejected(R"(name = a*)", "\"*\" is only allowed at the end of a quoted string");
}

// ---------------------------------------------------------------------------------------------
// SQL injection attempts
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, InjectionInsideStringIsBoundAsParameter) {
  ExpectCompiles(R"(name = "x'; DROP TABLE models; --")", "name = :f0",
                 {S("x'; DROP TABLE models; --")});
  ExpectCompiles(R"(name = 'x" OR "1"="1')", "name = :f0", {S(R"(x" OR "1"="1)")});
  ExpectCompiles(R"(name = "\" OR 1=1 --")", "name = :f0", {S("\" OR 1=1 --")});
  ExpectCompiles(R"(name = "a') OR ('1'='1")", "name = :f0", {S("a') OR ('1'='1")});
  ExpectCompiles(R"(name = "%' OR 1=1*")", "name LIKE :f0 ESCAPE '\\'", {S("\\%' OR 1=1%")});
  ExpectCompiles(R"(auth_method = "AUTH_METHOD_BEARER")", "auth_method = :f0",
                 {S("AUTH_METHOD_BEARER")});
}

TEST(CompileFilterTest, SqlTextNeverContainsLiterals) {
  const std::vector<std::string> filters = {
      R"(name = "x'; DROP TABLE models; --")",
      R"(display_name = "Robert'); DROP TABLE models;--" OR name = "1' OR '1'='1")",
      R"(labels.team = "); DELETE FROM models WHERE (1=1" context_window = 42)",
  };
  for (const std::string& filter : filters) {
    SCOPED_TRACE(filter);
    const absl::StatusOr<CompiledFilter> compiled = Compile(filter);
    ASSERT_TRUE(compiled.ok()) << compiled.status().ToString();
    EXPECT_EQ(compiled->sql.find('\''), std::string::npos) << compiled->sql;
    EXPECT_EQ(compiled->sql.find(';'), std::string::npos) << compiled->sql;
    EXPECT_EQ(compiled->sql.find("DROP"), std::string::npos) << compiled->sql;
    EXPECT_EQ(compiled->sql.find("DELETE"), std::string::npos) << compiled->sql;
    for (const SqlValue& param : compiled->params) {
      if (const auto* text = std::get_if<std::string>(&param)) {
        EXPECT_EQ(compiled->sql.find(*text), std::string::npos) << compiled->sql;
      }
    }
  }
}

TEST(CompileFilterTest, InjectionOutsideStringsIsRejected) {
  ExpectError("name = x; DROP", "filter: unexpected character \";\" at position 9");
  ExpectRejected(R"(name = "x"; DROP TABLE models)", "unexpected character \";\"");
  ExpectRejected(R"(name = "x" -- comment)", R"(expected a field name or "(" but found "-")");
  ExpectRejected(R"(name = "x" /* comment */)", "unexpected character \"/\"");
  ExpectRejected(R"(`name` = "x")", "unexpected character \"`\"");
  ExpectRejected(R"(name = "x" OR 1 = 1)", "expected a field name or \"(\" but found integer 1");
  ExpectRejected(R"(name = "x" OR "1" = "1")", "expected a field name or \"(\" but found string");
  ExpectRejected(R"(name = 'a'' OR ''1''=''1')", "expected a field name or \"(\" but found string");
  ExpectRejected(R"(name) OR (1 = 1)", "expected a comparison operator");
  ExpectRejected(R"(name; DROP TABLE models = "x")", "unexpected character \";\"");
  ExpectRejected(R"(name = "x" UNION SELECT name FROM models)", "unknown field \"UNION\"");
  ExpectRejected(R"(name = "x" UNION SELECT * FROM models)", "\"*\" is only allowed");
  ExpectRejected("name = \xE2\x80\x9Cx\xE2\x80\x9D", "unexpected character at position 8");
  ExpectRejected(R"(name = "x" || 1)", "unexpected character \"|\"");
  ExpectRejected(R"(name = "x" & 1)", "unexpected character \"&\"");
  ExpectRejected(R"(name = @x)", "unexpected character \"@\"");
  ExpectRejected(R"(name = $1)", "unexpected character \"$\"");
  ExpectRejected(R"(name = ?)", "unexpected character \"?\"");
}

// ---------------------------------------------------------------------------------------------
// Syntax errors
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, UnknownFieldListsFilterableFields) {
  ExpectError("foo = 1",
              std::string("filter: unknown field \"foo\" at position 1; ").append(kFieldList));
  ExpectError(R"(name = "a" AND foo.bar = 1)",
              std::string("filter: unknown field \"foo.bar\" at position 16; ").append(kFieldList));
  // Paths match exactly: neither a prefix nor a different case is accepted.
  ExpectRejected("labels = 1", "unknown field \"labels\"");
  ExpectRejected("Name = \"a\"", "unknown field \"Name\"");
  ExpectRejected("labels.team.x = \"a\"", "unknown field \"labels.team.x\"");
}

TEST(CompileFilterTest, UnknownFieldWithEmptySchema) {
  const absl::StatusOr<CompiledFilter> compiled = CompileFilter("a = 1", FilterSchema());
  ASSERT_FALSE(compiled.ok());
  EXPECT_EQ(compiled.status().message(),
            "filter: unknown field \"a\" at position 1; filterable fields: (none)");
}

TEST(CompileFilterTest, LowercaseKeywordsGetAHint) {
  ExpectRejected(R"(name = "a" and name = "b")",
                 "unknown field \"and\" at position 12 (logical operators must be uppercase: AND)");
  ExpectRejected(R"(name = "a" or name = "b")", "must be uppercase: OR");
  ExpectRejected(R"(not name = "a")", "must be uppercase: NOT");
}

TEST(CompileFilterTest, LongUserTextIsTruncatedInErrors) {
  const std::string field(300, 'x');
  const absl::StatusOr<CompiledFilter> compiled = Compile(field + " = 1");
  ASSERT_FALSE(compiled.ok());
  const std::string message(compiled.status().message());
  EXPECT_NE(message.find("unknown field \"" + std::string(40, 'x') + "...\""), std::string::npos)
      << message;
  EXPECT_EQ(message.find(std::string(41, 'x')), std::string::npos) << message;
}

TEST(CompileFilterTest, IncompleteComparisonsAreRejected) {
  ExpectError("name",
              "filter: expected a comparison operator (=, !=, <, <=, >, >=) after field \"name\" "
              "but found end of filter at position 5");
  ExpectRejected(R"(name "a")", "expected a comparison operator");
  ExpectRejected(R"(name AND name = "a")", "expected a comparison operator");
  ExpectError("name =",
              "filter: expected a value after \"=\" but found end of filter at position 7");
  ExpectRejected(R"(name == "a")", R"(expected a value after "=" but found "=")");
  ExpectRejected(R"(name <> "a")", R"(expected a value after "<" but found ">")");
  ExpectRejected(R"(name = ("a"))", R"(expected a value after "=" but found "(")");
  ExpectRejected(R"(name = NOT)", R"(expected a value after "=" but found "NOT")");
  ExpectRejected(R"(= "a")", R"(expected a field name or "(" but found "=")");
  ExpectRejected(R"("a" = name)", R"(expected a field name or "(" but found string "a")");
  ExpectRejected("5 = context_window", "expected a field name or \"(\" but found integer 5");
}

TEST(CompileFilterTest, DanglingOperatorsAreRejected) {
  ExpectError(R"(name = "a" AND)",
              "filter: expected a field name or \"(\" but found end of filter at position 15");
  ExpectRejected(R"(AND name = "a")", R"(expected a field name or "(" but found "AND")");
  ExpectRejected(R"(OR name = "a")", "but found \"OR\"");
  ExpectRejected(R"(name = "a" OR)", "but found end of filter");
  ExpectRejected(R"(name = "a" OR OR name = "b")", "but found \"OR\"");
  ExpectRejected(R"(name = "a" AND AND name = "b")", "but found \"AND\"");
  ExpectRejected(R"(name = "a" AND OR name = "b")", "but found \"OR\"");
  ExpectRejected("NOT", "but found end of filter");
  ExpectRejected("-", "but found end of filter");
  ExpectRejected(R"(NOT NOT name = "a")", "but found \"NOT\"");
  ExpectRejected(R"(NOT -name = "a")", "but found \"-\"");
  ExpectRejected(R"(--name = "a")", "but found \"-\"");
}

TEST(CompileFilterTest, TrailingGarbageIsRejected) {
  ExpectRejected(R"(name = "a" "b")", R"(expected a field name or "(" but found string "b")");
  ExpectRejected("context_window = 1 2", "but found integer 2");
  ExpectRejected("context_window = 1 = 2", "but found \"=\"");
  ExpectRejected(R"(name = "a" name)", "expected a comparison operator");
}

TEST(CompileFilterTest, UnbalancedParenthesesAreRejected) {
  ExpectError(R"((name = "a")",
              "filter: expected \")\" to close the \"(\" at position 1 but found end of filter at "
              "position 12");
  ExpectRejected(R"(((name = "a"))", "to close the \"(\" at position 1");
  ExpectError(R"(name = "a"))", "filter: unexpected \")\" at position 11");
  ExpectRejected(R"((name = "a")))", "unexpected \")\" at position 13");
  ExpectRejected(R"()name = "a"()", "expected a field name or \"(\" but found \")\"");
  ExpectError("()", "filter: empty parentheses at position 1");
  ExpectRejected(R"(name = "a" AND ())", "empty parentheses at position 16");
  ExpectRejected("(", "but found end of filter");
  ExpectRejected(")", "but found \")\"");
}

TEST(CompileFilterTest, BadStringLiteralsAreRejected) {
  ExpectError(R"(name = "abc)", "filter: unterminated string literal starting at position 8");
  ExpectRejected(R"(name = 'abc")", "unterminated string literal starting at position 8");
  ExpectRejected(R"(name = "abc\")", "unterminated string literal");
  ExpectRejected(R"(name = "abc\)", "unterminated string literal");
  ExpectError(R"(name = "a\qb")",
              "filter: invalid escape sequence \"\\q\" (supported: \\\" \\' \\\\ \\n \\t \\*) at "
              "position 10");
  ExpectRejected(R"(name = "a\x41")", R"(invalid escape sequence "\x")");
  ExpectRejected(R"(name = "a\u0041")", R"(invalid escape sequence "\u")");
  ExpectRejected(R"(name = "a\0")", R"(invalid escape sequence "\0")");
  ExpectRejected("name = \"a\\\xC3\xA9\"", "invalid escape sequence (supported");
  ExpectRejected("name = \"a\nb\"", "control character in string literal");
  ExpectRejected("name = \"a\tb\"", "control character in string literal");
  ExpectRejected("name = \"a\x7F\"", "control character in string literal");
  ExpectRejected(std::string("name = \"a\0b\"", 12), "control character in string literal");
}

TEST(CompileFilterTest, UnsupportedOperatorsAndCharactersAreRejected) {
  ExpectError(R"(name : "a")", "filter: the \":\" (has) operator is not supported at position 6");
  ExpectRejected(R"(name ~ "a")", "unexpected character \"~\"");
  ExpectRejected(R"(name = "a" ! name = "b")", R"(unexpected "!" (use "!=" or NOT))");
  ExpectRejected(R"(name = "a" , name = "b")", "unexpected character \",\"");
  ExpectRejected(R"(name = "a" [0])", "unexpected character \"[\"");
  ExpectRejected(R"(name = "a" {})", "unexpected character \"{\"");
  ExpectRejected(R"(name.size() = 1)", "unknown field \"name.size\"");
  ExpectRejected(R"(name() = 1)", "expected a comparison operator");
  ExpectRejected(std::string("name = \"a\"\0", 11), "unexpected character at position 11");
  ExpectRejected("name\v= \"a\"", "unexpected character at position 5");
}

TEST(CompileFilterTest, MalformedFieldPathsAreRejected) {
  ExpectError(R"(name. = "a")", "filter: expected a name after \".\" in field path at position 6");
  ExpectRejected(R"(labels..team = "a")", "expected a name after \".\" in field path");
  ExpectRejected(R"(labels.1team = "a")", "expected a name after \".\" in field path");
  ExpectRejected(R"(.name = "a")", "unexpected character \".\"");
}

// ---------------------------------------------------------------------------------------------
// Positions
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, PositionsCountCharactersNotBytes) {
  // "é" is two bytes but one character; "foo" starts at character 12 (byte 13).
  ExpectRejected("name = \"\xC3\xA9\" foo = 1", "unknown field \"foo\" at position 12");
  // A four-byte character counts once too.
  ExpectRejected("name = \"\xF0\x9F\x98\x80\" ;", "unexpected character \";\" at position 12");
}

TEST(CompileFilterTest, PositionsSpanLines) {
  ExpectRejected("name = \"a\"\nAND\nfoo = 1", "unknown field \"foo\" at position 16");
}

// ---------------------------------------------------------------------------------------------
// UTF-8 validation
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, InvalidUtf8IsRejected) {
  ExpectError("name = \"\xFF\"", "filter: invalid UTF-8 at position 9");
  ExpectRejected("name = \"\x80\"", "invalid UTF-8 at position 9");          // lone continuation
  ExpectRejected("name = \"\xC0\xAF\"", "invalid UTF-8 at position 9");      // overlong '/'
  ExpectRejected("name = \"\xE0\x80\xAF\"", "invalid UTF-8 at position 9");  // overlong '/'
  ExpectRejected("name = \"\xED\xA0\x80\"", "invalid UTF-8 at position 9");  // surrogate
  ExpectRejected("name = \"\xF4\x90\x80\x80\"", "invalid UTF-8 at position 9");  // > U+10FFFF
  ExpectRejected("name = \"\xE2\x82\"", "invalid UTF-8 at position 9");          // truncated
  ExpectRejected("name = \"\xC3\xA9\" \xC3", "invalid UTF-8 at position 12");    // truncated at end
  ExpectRejected("\xFE", "invalid UTF-8 at position 1");
}

TEST(CompileFilterTest, ValidMultibyteUtf8IsAccepted) {
  ExpectCompiles("name = \"\xF4\x8F\xBF\xBF \xEF\xBF\xBD \xDF\xBF\"", "name = :f0",
                 {S("\xF4\x8F\xBF\xBF \xEF\xBF\xBD \xDF\xBF")});
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, LengthLimit) {
  const std::string prefix = "name = \"";
  std::string at_limit = prefix + std::string(kMaxFilterBytes - prefix.size() - 1, 'x') + "\"";
  ASSERT_EQ(at_limit.size(), static_cast<std::size_t>(kMaxFilterBytes));
  const absl::StatusOr<CompiledFilter> ok = Compile(at_limit);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->sql, "name = :f0");

  const std::string over_limit = prefix + std::string(kMaxFilterBytes - prefix.size(), 'x') + "\"";
  ExpectError(over_limit, "filter: filter is 2049 bytes; the limit is 2048");
  // Whitespace counts too: the limit is on the raw request.
  ExpectRejected(std::string(kMaxFilterBytes + 1, ' '), "the limit is 2048");
}

std::string Nested(int depth) {
  return std::string(depth, '(') + "name = \"a\"" + std::string(depth, ')');
}

TEST(CompileFilterTest, DepthLimit) {
  ExpectCompiles(Nested(kMaxFilterDepth), "name = :f0", {S("a")});
  ExpectError(Nested(kMaxFilterDepth + 1),
              "filter: parentheses are nested more than 32 levels deep at position 33");
  // Sequential (not nested) groups do not accumulate depth.
  std::string siblings;
  for (int i = 0; i < 40; ++i) {
    siblings += "(context_window = 1) ";
  }
  const absl::StatusOr<CompiledFilter> compiled = Compile(siblings);
  EXPECT_TRUE(compiled.ok()) << compiled.status().ToString();
  // Deeply nested input far past the limit fails cleanly rather than exhausting the stack.
  ExpectRejected(std::string(kMaxFilterBytes, '('), "nested more than 32 levels deep");
}

std::string Comparisons(int count, std::string_view joiner) {
  std::string filter;
  for (int i = 0; i < count; ++i) {
    if (i > 0) {
      filter += joiner;
    }
    filter += "context_window = " + std::to_string(i);
  }
  return filter;
}

TEST(CompileFilterTest, ComparisonLimit) {
  const absl::StatusOr<CompiledFilter> at_limit = Compile(Comparisons(kMaxFilterComparisons, " "));
  ASSERT_TRUE(at_limit.ok()) << at_limit.status().ToString();
  ASSERT_EQ(at_limit->params.size(), static_cast<std::size_t>(kMaxFilterComparisons));
  EXPECT_EQ(at_limit->params.back(), I(kMaxFilterComparisons - 1));
  EXPECT_NE(at_limit->sql.find("context_window = :f63)"), std::string::npos);

  ExpectRejected(Comparisons(kMaxFilterComparisons + 1, " "), "more than 64 comparisons");
  ExpectRejected(Comparisons(kMaxFilterComparisons + 1, " OR "), "more than 64 comparisons");
  ExpectRejected(Comparisons(kMaxFilterComparisons + 1, " AND "), "more than 64 comparisons");
}

// ---------------------------------------------------------------------------------------------
// Every rejection is INVALID_ARGUMENT with the "filter: " prefix.
// ---------------------------------------------------------------------------------------------

TEST(CompileFilterTest, AllErrorsAreInvalidArgument) {
  const std::vector<std::string> bad = {
      "foo = 1",
      "name",
      "name = 5",
      "(",
      ")",
      "name = \"a",
      "name = x; DROP",
      "context_window = 99999999999999999999",
      "supports_tools < true",
      "\xFF",
      "NOT",
      "name = \"a*b\"",
  };
  for (const std::string& filter : bad) {
    SCOPED_TRACE(filter);
    const absl::StatusOr<CompiledFilter> compiled = Compile(filter);
    ASSERT_FALSE(compiled.ok());
    EXPECT_EQ(compiled.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(compiled.status().message().substr(0, 8), "filter: ");
  }
}

}  // namespace
}  // namespace modelvault::storage
