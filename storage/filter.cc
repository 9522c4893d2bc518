#include "storage/filter.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"

namespace modelvault::storage {
namespace {

// Longest slice of user input echoed back in an error message.
constexpr std::size_t kMaxEchoBytes = 40;

absl::Status FilterError(absl::string_view problem, int position, absl::string_view suffix = "") {
  return absl::InvalidArgumentError(
      absl::StrCat("filter: ", problem, " at position ", position, suffix));
}

// Quotes user-provided text for an error message, escaped and truncated so that hostile input
// cannot forge or flood the message.
std::string Quote(absl::string_view text) {
  if (text.size() > kMaxEchoBytes) {
    std::size_t cut = kMaxEchoBytes;
    // Back off to a UTF-8 character boundary.
    while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) {
      --cut;
    }
    return absl::StrCat("\"", absl::Utf8SafeCHexEscape(text.substr(0, cut)), "...\"");
  }
  return absl::StrCat("\"", absl::Utf8SafeCHexEscape(text), "\"");
}

// Returns the byte offset of the first malformed UTF-8 sequence, or npos. Overlong encodings,
// surrogates and code points above U+10FFFF are malformed.
std::size_t FindInvalidUtf8(absl::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<unsigned char>(s[i]);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t min_cp = 0;
    if ((lead & 0xE0) == 0xC0) {
      len = 2;
      min_cp = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      len = 3;
      min_cp = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      len = 4;
      min_cp = 0x10000;
    } else {
      return i;
    }
    // Payload bits of the lead byte: 5, 4 or 3 for 2-, 3- or 4-byte sequences.
    std::uint32_t cp = lead & (0x7F >> len);
    if (s.size() - i < len) {
      return i;
    }
    for (std::size_t k = 1; k < len; ++k) {
      const auto cont = static_cast<unsigned char>(s[i + k]);
      if ((cont & 0xC0) != 0x80) {
        return i;
      }
      cp = (cp << 6) | (cont & 0x3F);
    }
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return i;
    }
    i += len;
  }
  return absl::string_view::npos;
}

// 1-based character (code point) position of every byte offset, so errors point at characters
// rather than bytes. Bytes that continue a UTF-8 sequence share their lead byte's position.
std::vector<int> CharPositions(absl::string_view s) {
  std::vector<int> pos(s.size() + 1);
  int chars = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) {
      ++chars;
    }
    pos[i] = chars;
  }
  pos[s.size()] = chars + 1;
  return pos;
}

std::string ToString(absl::string_view s) { return {s.data(), s.size()}; }

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsIdentStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsIdentChar(char c) { return IsIdentStart(c) || IsDigit(c); }
bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

// Reads exactly `count` ASCII digits at s[*i].
bool ReadDigits(absl::string_view s, std::size_t* i, int count, int* value) {
  if (s.size() < *i + count) {
    return false;
  }
  int v = 0;
  for (int k = 0; k < count; ++k) {
    const char c = s[*i + k];
    if (!IsDigit(c)) {
      return false;
    }
    v = v * 10 + (c - '0');
  }
  *i += count;
  *value = v;
  return true;
}

bool ReadChar(absl::string_view s, std::size_t* i, char a, char b = '\0') {
  if (*i >= s.size() || (s[*i] != a && (b == '\0' || s[*i] != b))) {
    return false;
  }
  ++*i;
  return true;
}

// Parses an RFC 3339 date-time ("2024-06-01T00:00:00Z", "2024-06-01T02:00:00.5+02:00") into
// microseconds since the Unix epoch. The shape is checked by hand because absl::ParseTime is more
// lenient (surrounding whitespace, unbounded fractions). Digits past microseconds are truncated.
std::optional<std::int64_t> ParseRfc3339Micros(absl::string_view s, std::string* why) {
  constexpr absl::string_view kShape =
      "is not an RFC 3339 timestamp (expected e.g. \"2024-06-01T00:00:00Z\" or "
      "\"2024-06-01T02:00:00.5+02:00\")";
  std::size_t i = 0;
  int year = 0;
  int month = 0;
  int day = 0;
  int hour = 0;
  int minute = 0;
  int second = 0;
  if (!ReadDigits(s, &i, 4, &year) || !ReadChar(s, &i, '-') || !ReadDigits(s, &i, 2, &month) ||
      !ReadChar(s, &i, '-') || !ReadDigits(s, &i, 2, &day) || !ReadChar(s, &i, 'T', 't') ||
      !ReadDigits(s, &i, 2, &hour) || !ReadChar(s, &i, ':') || !ReadDigits(s, &i, 2, &minute) ||
      !ReadChar(s, &i, ':') || !ReadDigits(s, &i, 2, &second)) {
    *why = ToString(kShape);
    return std::nullopt;
  }
  std::int64_t nanos = 0;
  if (ReadChar(s, &i, '.')) {
    int digits = 0;
    while (i < s.size() && IsDigit(s[i])) {
      if (++digits > 9) {
        *why = "has more than 9 fractional-second digits";
        return std::nullopt;
      }
      nanos = nanos * 10 + (s[i] - '0');
      ++i;
    }
    if (digits == 0) {
      *why = ToString(kShape);
      return std::nullopt;
    }
    for (; digits < 9; ++digits) {
      nanos *= 10;
    }
  }
  int offset_seconds = 0;
  if (!ReadChar(s, &i, 'Z', 'z')) {
    if (i >= s.size() || (s[i] != '+' && s[i] != '-')) {
      *why = ToString(kShape);
      return std::nullopt;
    }
    const int sign = s[i] == '-' ? -1 : 1;
    ++i;
    int off_hour = 0;
    int off_minute = 0;
    if (!ReadDigits(s, &i, 2, &off_hour) || !ReadChar(s, &i, ':') ||
        !ReadDigits(s, &i, 2, &off_minute)) {
      *why = ToString(kShape);
      return std::nullopt;
    }
    if (off_hour > 23 || off_minute > 59) {
      *why = "has an out-of-range UTC offset";
      return std::nullopt;
    }
    offset_seconds = sign * (off_hour * 3600 + off_minute * 60);
  }
  if (i != s.size()) {
    *why = ToString(kShape);
    return std::nullopt;
  }
  // CivilDay normalizes out-of-range fields, so a round trip detects e.g. February 30.
  const absl::CivilDay civil_day(year, month, day);
  if (month < 1 || month > 12 || civil_day.month() != month || civil_day.day() != day) {
    *why = "is not a valid calendar date";
    return std::nullopt;
  }
  // Leap seconds are rejected, as google.protobuf.Timestamp cannot represent them either.
  if (hour > 23 || minute > 59 || second > 59) {
    *why = "is not a valid time of day";
    return std::nullopt;
  }
  const absl::Time local = absl::FromCivil(
      absl::CivilSecond(year, month, day, hour, minute, second), absl::UTCTimeZone());
  const std::int64_t utc_seconds = absl::ToUnixSeconds(local) - offset_seconds;
  // Years 0000-9999 are far from int64 overflow in microseconds.
  return utc_seconds * 1'000'000 + nanos / 1000;
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

enum class TokenKind {
  kIdent,
  kString,
  kInt,
  kAnd,
  kOr,
  kNot,
  kMinus,
  kLParen,
  kRParen,
  kEq,
  kNe,
  kLt,
  kLe,
  kGt,
  kGe,
  kEnd,
};

struct Token {
  TokenKind kind = TokenKind::kEnd;
  int pos = 0;       // 1-based character position of the token's first character.
  std::string text;  // Identifier, decoded string value, or operator/number source text.
  std::int64_t int_value = 0;
  int trailing_wildcard_pos = 0;  // kString: position of an unescaped final '*', else 0.
  int inner_wildcard_pos = 0;     // kString: position of the first other unescaped '*', else 0.
};

bool IsComparator(TokenKind kind) {
  switch (kind) {
    case TokenKind::kEq:
    case TokenKind::kNe:
    case TokenKind::kLt:
    case TokenKind::kLe:
    case TokenKind::kGt:
    case TokenKind::kGe:
      return true;
    default:
      return false;
  }
}

std::string Describe(const Token& token) {
  switch (token.kind) {
    case TokenKind::kIdent:
      return absl::StrCat("identifier ", Quote(token.text));
    case TokenKind::kString:
      return absl::StrCat("string ", Quote(token.text));
    case TokenKind::kInt:
      return absl::StrCat("integer ", token.text);
    case TokenKind::kEnd:
      return "end of filter";
    default:
      return absl::StrCat("\"", token.text, "\"");
  }
}

class Lexer final {
 public:
  explicit Lexer(absl::string_view input) : in_(input), char_pos_(CharPositions(input)) {}

  absl::StatusOr<std::vector<Token>> Tokenize() {
    std::vector<Token> tokens;
    while (true) {
      while (i_ < in_.size() && IsSpace(in_[i_])) {
        ++i_;
      }
      if (i_ == in_.size()) {
        break;
      }
      absl::StatusOr<Token> token = Next();
      if (!token.ok()) {
        return token.status();
      }
      tokens.push_back(*std::move(token));
    }
    Token end;
    end.kind = TokenKind::kEnd;
    end.pos = char_pos_[in_.size()];
    tokens.push_back(std::move(end));
    return tokens;
  }

 private:
  int Pos(std::size_t byte) const { return char_pos_[byte]; }
  char PeekAt(std::size_t byte) const { return byte < in_.size() ? in_[byte] : '\0'; }

  Token Simple(TokenKind kind, std::size_t len) {
    Token token;
    token.kind = kind;
    token.pos = Pos(i_);
    token.text = ToString(in_.substr(i_, len));
    i_ += len;
    return token;
  }

  absl::StatusOr<Token> Next() {
    const char c = in_[i_];
    const char next = PeekAt(i_ + 1);
    switch (c) {
      case '(':
        return Simple(TokenKind::kLParen, 1);
      case ')':
        return Simple(TokenKind::kRParen, 1);
      case '=':
        return Simple(TokenKind::kEq, 1);
      case '!':
        if (next == '=') {
          return Simple(TokenKind::kNe, 2);
        }
        return FilterError(R"(unexpected "!" (use "!=" or NOT))", Pos(i_));
      case '<':
        return next == '=' ? Simple(TokenKind::kLe, 2) : Simple(TokenKind::kLt, 1);
      case '>':
        return next == '=' ? Simple(TokenKind::kGe, 2) : Simple(TokenKind::kGt, 1);
      case '"':
      case '\'':
        return LexString();
      case '-':
        if (IsDigit(next)) {
          return LexInteger();
        }
        return Simple(TokenKind::kMinus, 1);
      case ':':
        return FilterError("the \":\" (has) operator is not supported", Pos(i_));
      case '*':
        return FilterError("\"*\" is only allowed at the end of a quoted string", Pos(i_));
      default:
        break;
    }
    if (IsDigit(c)) {
      return LexInteger();
    }
    if (IsIdentStart(c)) {
      return LexIdent();
    }
    const auto byte = static_cast<unsigned char>(c);
    if (byte >= 0x21 && byte <= 0x7E) {
      return FilterError(absl::StrCat("unexpected character \"", absl::string_view(&c, 1), "\""),
                         Pos(i_));
    }
    return FilterError("unexpected character", Pos(i_));
  }

  absl::StatusOr<Token> LexIdent() {
    const std::size_t start = i_;
    while (true) {
      if (!IsIdentStart(PeekAt(i_))) {
        return FilterError("expected a name after \".\" in field path", Pos(i_));
      }
      while (IsIdentChar(PeekAt(i_))) {
        ++i_;
      }
      if (PeekAt(i_) != '.') {
        break;
      }
      ++i_;
    }
    Token token;
    token.pos = Pos(start);
    token.text = ToString(in_.substr(start, i_ - start));
    // Keywords are case-sensitive in AIP-160; "and" is an ordinary identifier.
    if (token.text == "AND") {
      token.kind = TokenKind::kAnd;
    } else if (token.text == "OR") {
      token.kind = TokenKind::kOr;
    } else if (token.text == "NOT") {
      token.kind = TokenKind::kNot;
    } else {
      token.kind = TokenKind::kIdent;
    }
    return token;
  }

  absl::StatusOr<Token> LexInteger() {
    const std::size_t start = i_;
    if (in_[i_] == '-') {
      ++i_;
    }
    while (IsDigit(PeekAt(i_))) {
      ++i_;
    }
    if (PeekAt(i_) == '.' && IsDigit(PeekAt(i_ + 1))) {
      return FilterError("floating-point numbers are not supported", Pos(start));
    }
    if (PeekAt(i_) == '.' || IsIdentChar(PeekAt(i_))) {
      return FilterError("malformed number", Pos(start));
    }
    Token token;
    token.kind = TokenKind::kInt;
    token.pos = Pos(start);
    token.text = ToString(in_.substr(start, i_ - start));
    if (!absl::SimpleAtoi(token.text, &token.int_value)) {
      return FilterError(absl::StrCat("integer ", Quote(token.text), " does not fit in 64 bits"),
                         token.pos);
    }
    return token;
  }

  absl::StatusOr<Token> LexString() {
    const std::size_t start = i_;
    const char quote = in_[i_++];
    Token token;
    token.kind = TokenKind::kString;
    token.pos = Pos(start);
    // (index in decoded value, filter position) of each unescaped '*'.
    std::vector<std::pair<std::size_t, int>> stars;
    while (true) {
      if (i_ >= in_.size()) {
        return FilterError("unterminated string literal starting", token.pos);
      }
      const char c = in_[i_];
      if (c == quote) {
        ++i_;
        break;
      }
      const auto byte = static_cast<unsigned char>(c);
      if (byte < 0x20 || byte == 0x7F) {
        // Raw control characters are almost always a mistake (or an attack); escapes exist.
        return FilterError("control character in string literal (use \\n or \\t)", Pos(i_));
      }
      if (c == '\\') {
        const char escaped = PeekAt(i_ + 1);
        if (i_ + 1 >= in_.size()) {
          return FilterError("unterminated string literal starting", token.pos);
        }
        switch (escaped) {
          case '"':
          case '\'':
          case '\\':
          case '*':
            token.text.push_back(escaped);
            break;
          case 'n':
            token.text.push_back('\n');
            break;
          case 't':
            token.text.push_back('\t');
            break;
          default: {
            const auto e = static_cast<unsigned char>(escaped);
            return FilterError(
                e >= 0x21 && e <= 0x7E
                    ? absl::StrCat("invalid escape sequence \"\\", absl::string_view(&escaped, 1),
                                   R"(" (supported: \" \' \\ \n \t \*))")
                    : R"(invalid escape sequence (supported: \" \' \\ \n \t \*))",
                Pos(i_));
          }
        }
        i_ += 2;
        continue;
      }
      if (c == '*') {
        stars.emplace_back(token.text.size(), Pos(i_));
      }
      token.text.push_back(c);
      ++i_;
    }
    for (const auto& [index, pos] : stars) {
      if (index + 1 == token.text.size()) {
        token.trailing_wildcard_pos = pos;
      } else if (token.inner_wildcard_pos == 0) {
        token.inner_wildcard_pos = pos;
      }
    }
    return token;
  }

  absl::string_view in_;
  std::vector<int> char_pos_;
  std::size_t i_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Parser / compiler
// ---------------------------------------------------------------------------------------------

// A compiled sub-expression. AND/OR groups keep their operands so that chains of the same operator
// flatten into one parenthesized list instead of nesting.
struct Fragment {
  enum class Kind { kComparison, kNot, kAnd, kOr };
  Kind kind = Kind::kComparison;
  std::string sql;
  std::vector<std::string> operands;  // kAnd/kOr only.
};

Fragment Combine(Fragment::Kind kind, std::vector<Fragment> children) {
  if (children.size() == 1) {
    return std::move(children.front());
  }
  Fragment group;
  group.kind = kind;
  for (Fragment& child : children) {
    if (child.kind == kind) {
      for (std::string& operand : child.operands) {
        group.operands.push_back(std::move(operand));
      }
    } else {
      group.operands.push_back(std::move(child.sql));
    }
  }
  group.sql = absl::StrCat(
      "(", absl::StrJoin(group.operands, kind == Fragment::Kind::kAnd ? " AND " : " OR "), ")");
  return group;
}

absl::string_view SqlOperator(TokenKind kind) {
  switch (kind) {
    case TokenKind::kNe:
      return "<>";
    case TokenKind::kLt:
      return "<";
    case TokenKind::kLe:
      return "<=";
    case TokenKind::kGt:
      return ">";
    case TokenKind::kGe:
      return ">=";
    default:
      return "=";
  }
}

// Escapes LIKE metacharacters so only the wildcard we append is special.
std::string LikePrefixPattern(absl::string_view prefix) {
  std::string pattern;
  pattern.reserve(prefix.size() + 2);
  for (const char c : prefix) {
    if (c == '\\' || c == '%' || c == '_') {
      pattern.push_back('\\');
    }
    pattern.push_back(c);
  }
  pattern.push_back('%');
  return pattern;
}

class Parser final {
 public:
  Parser(const std::vector<Token>& tokens, const FilterSchema& schema, int param_offset)
      : tokens_(tokens), schema_(schema), param_offset_(param_offset) {}

  absl::StatusOr<CompiledFilter> Run() {
    CompiledFilter result;
    if (Peek().kind == TokenKind::kEnd) {
      return result;
    }
    absl::StatusOr<Fragment> expression = ParseExpression();
    if (!expression.ok()) {
      return expression.status();
    }
    if (Peek().kind != TokenKind::kEnd) {
      // ParseExpression only stops early at a ')' with no matching '('.
      return FilterError(absl::StrCat("unexpected ", Describe(Peek())), Peek().pos);
    }
    result.sql = std::move(expression->sql);
    result.params = std::move(params_);
    return result;
  }

 private:
  const Token& Peek() const { return tokens_[next_]; }
  const Token& Advance() {
    const Token& token = tokens_[next_];
    if (token.kind != TokenKind::kEnd) {
      ++next_;
    }
    return token;
  }

  absl::StatusOr<Fragment> ParseExpression() {
    std::vector<Fragment> sequences;
    while (true) {
      absl::StatusOr<Fragment> sequence = ParseSequence();
      if (!sequence.ok()) {
        return sequence.status();
      }
      sequences.push_back(*std::move(sequence));
      if (Peek().kind != TokenKind::kAnd) {
        break;
      }
      Advance();
    }
    return Combine(Fragment::Kind::kAnd, std::move(sequences));
  }

  // Juxtaposed factors are an implicit AND.
  absl::StatusOr<Fragment> ParseSequence() {
    std::vector<Fragment> factors;
    do {
      absl::StatusOr<Fragment> factor = ParseFactor();
      if (!factor.ok()) {
        return factor.status();
      }
      factors.push_back(*std::move(factor));
    } while (Peek().kind != TokenKind::kEnd && Peek().kind != TokenKind::kRParen &&
             Peek().kind != TokenKind::kAnd);
    return Combine(Fragment::Kind::kAnd, std::move(factors));
  }

  absl::StatusOr<Fragment> ParseFactor() {
    std::vector<Fragment> terms;
    while (true) {
      absl::StatusOr<Fragment> term = ParseTerm();
      if (!term.ok()) {
        return term.status();
      }
      terms.push_back(*std::move(term));
      if (Peek().kind != TokenKind::kOr) {
        break;
      }
      Advance();
    }
    return Combine(Fragment::Kind::kOr, std::move(terms));
  }

  absl::StatusOr<Fragment> ParseTerm() {
    const Token& head = Peek();
    if (head.kind != TokenKind::kNot && head.kind != TokenKind::kMinus) {
      return ParseSimple();
    }
    Advance();
    // In AIP-160 "-" is a prefix glued to its operand; "a = 1 - b = 2" is more likely a typo.
    if (head.kind == TokenKind::kMinus && Peek().pos != head.pos + 1) {
      return FilterError(R"("-" must be immediately followed by a field or "(")", head.pos);
    }
    absl::StatusOr<Fragment> operand = ParseSimple();
    if (!operand.ok()) {
      return operand.status();
    }
    Fragment negation;
    negation.kind = Fragment::Kind::kNot;
    // AND/OR groups already carry their own parentheses.
    const bool grouped =
        operand->kind == Fragment::Kind::kAnd || operand->kind == Fragment::Kind::kOr;
    negation.sql =
        grouped ? absl::StrCat("NOT ", operand->sql) : absl::StrCat("NOT (", operand->sql, ")");
    return negation;
  }

  absl::StatusOr<Fragment> ParseSimple() {
    const Token& head = Peek();
    if (head.kind == TokenKind::kIdent) {
      return ParseComparison();
    }
    if (head.kind != TokenKind::kLParen) {
      return FilterError(absl::StrCat("expected a field name or \"(\" but found ", Describe(head)),
                         head.pos);
    }
    Advance();
    if (++depth_ > kMaxFilterDepth) {
      return FilterError(
          absl::StrCat("parentheses are nested more than ", kMaxFilterDepth, " levels deep"),
          head.pos);
    }
    if (Peek().kind == TokenKind::kRParen) {
      return FilterError("empty parentheses", head.pos);
    }
    absl::StatusOr<Fragment> inner = ParseExpression();
    if (!inner.ok()) {
      return inner.status();
    }
    if (Peek().kind != TokenKind::kRParen) {
      return FilterError(absl::StrCat("expected \")\" to close the \"(\" at position ", head.pos,
                                      " but found ", Describe(Peek())),
                         Peek().pos);
    }
    Advance();
    --depth_;
    return inner;
  }

  std::string FieldList() const {
    std::vector<absl::string_view> names;
    names.reserve(schema_.size());
    for (const auto& [name, field] : schema_) {
      names.emplace_back(name);
    }
    std::sort(names.begin(), names.end());
    return names.empty() ? "(none)" : absl::StrJoin(names, ", ");
  }

  absl::StatusOr<Fragment> ParseComparison() {
    const Token& name = Advance();
    if (++comparisons_ > kMaxFilterComparisons) {
      return FilterError(
          absl::StrCat("more than ", kMaxFilterComparisons, " comparisons in one filter"),
          name.pos);
    }
    const auto it = schema_.find(name.text);
    if (it == schema_.end()) {
      std::string hint;
      const std::string upper = absl::AsciiStrToUpper(name.text);
      if (upper == "AND" || upper == "OR" || upper == "NOT") {
        hint = absl::StrCat(" (logical operators must be uppercase: ", upper, ")");
      }
      return FilterError(absl::StrCat("unknown field ", Quote(name.text)), name.pos,
                         absl::StrCat(hint, "; filterable fields: ", FieldList()));
    }
    const Token& op = Advance();
    if (!IsComparator(op.kind)) {
      return FilterError(absl::StrCat("expected a comparison operator (=, !=, <, <=, >, >=) after "
                                      "field ",
                                      Quote(name.text), " but found ", Describe(op)),
                         op.pos);
    }
    const Token& value = Advance();
    if (value.kind != TokenKind::kString && value.kind != TokenKind::kInt &&
        value.kind != TokenKind::kIdent) {
      return FilterError(
          absl::StrCat("expected a value after \"", op.text, "\" but found ", Describe(value)),
          value.pos);
    }
    return CompileComparison(name, it->second, op, value);
  }

  Fragment Bind(const FilterField& field, absl::string_view sql_op, SqlValue value,
                absl::string_view suffix = "") {
    Fragment fragment;
    fragment.sql = absl::StrCat(
        field.column, " ", sql_op, " :f",
        static_cast<std::int64_t>(param_offset_) + static_cast<std::int64_t>(params_.size()),
        suffix);
    params_.push_back(std::move(value));
    return fragment;
  }

  absl::StatusOr<Fragment> CompileComparison(const Token& name, const FilterField& field,
                                             const Token& op, const Token& value) {
    const bool ordering = op.kind != TokenKind::kEq && op.kind != TokenKind::kNe;
    const auto type_error = [&](absl::string_view expected) {
      return FilterError(absl::StrCat("field ", Quote(name.text), " expects ", expected,
                                      " but found ", Describe(value)),
                         value.pos);
    };
    switch (field.type) {
      case FieldType::kString: {
        if (value.kind != TokenKind::kString) {
          return type_error("a quoted string");
        }
        if (value.inner_wildcard_pos != 0) {
          return FilterError(
              "\"*\" wildcard is only supported at the end of a string (escape a literal \"*\" "
              "as \\*)",
              value.inner_wildcard_pos);
        }
        if (value.trailing_wildcard_pos == 0) {
          return Bind(field, SqlOperator(op.kind), value.text);
        }
        if (op.kind != TokenKind::kEq) {
          return FilterError(
              R"("*" wildcard is only supported with "=" (escape a literal "*" as \*))",
              value.trailing_wildcard_pos);
        }
        absl::string_view prefix = value.text;
        prefix.remove_suffix(1);
        return Bind(field, "LIKE", LikePrefixPattern(prefix), " ESCAPE '\\'");
      }
      case FieldType::kInt64:
        if (value.kind != TokenKind::kInt) {
          return type_error("an integer");
        }
        return Bind(field, SqlOperator(op.kind), value.int_value);
      case FieldType::kBool:
        if (ordering) {
          return FilterError(absl::StrCat("operator \"", op.text,
                                          "\" is not supported on boolean "
                                          "field ",
                                          Quote(name.text), "; use = or !="),
                             op.pos);
        }
        if (value.kind != TokenKind::kIdent || (value.text != "true" && value.text != "false")) {
          return type_error("true or false");
        }
        return Bind(field, SqlOperator(op.kind), std::int64_t{value.text == "true" ? 1 : 0});
      case FieldType::kTimestamp: {
        if (value.kind != TokenKind::kString) {
          return type_error("a quoted RFC 3339 timestamp");
        }
        std::string why;
        const std::optional<std::int64_t> micros = ParseRfc3339Micros(value.text, &why);
        if (!micros.has_value()) {
          return FilterError(absl::StrCat("timestamp ", Quote(value.text), " ", why), value.pos);
        }
        return Bind(field, SqlOperator(op.kind), *micros);
      }
      case FieldType::kEnum: {
        if (ordering) {
          return FilterError(
              absl::StrCat("operator \"", op.text, "\" is not supported on enum field ",
                           Quote(name.text), "; use = or !="),
              op.pos);
        }
        if (value.kind != TokenKind::kIdent && value.kind != TokenKind::kString) {
          return type_error("an enum value name");
        }
        if (std::find(field.enum_values.begin(), field.enum_values.end(), value.text) ==
            field.enum_values.end()) {
          return FilterError(
              absl::StrCat("invalid value ", Quote(value.text), " for enum field ",
                           Quote(name.text)),
              value.pos,
              absl::StrCat("; allowed values: ", field.enum_values.empty()
                                                     ? "(none)"
                                                     : absl::StrJoin(field.enum_values, ", ")));
        }
        return Bind(field, SqlOperator(op.kind), value.text);
      }
    }
    return absl::InternalError("filter: unhandled field type");
  }

  const std::vector<Token>& tokens_;
  const FilterSchema& schema_;
  const int param_offset_;
  std::size_t next_ = 0;
  int depth_ = 0;
  int comparisons_ = 0;
  std::vector<SqlValue> params_;
};

}  // namespace

absl::StatusOr<CompiledFilter> CompileFilter(std::string_view filter_text,
                                             const FilterSchema& schema, int param_offset) {
  // This Abseil build has its own string_view type, distinct from std::string_view.
  const absl::string_view filter(filter_text.data(), filter_text.size());
  if (param_offset < 0) {
    return absl::InvalidArgumentError("filter: param_offset must be non-negative");
  }
  if (filter.size() > static_cast<std::size_t>(kMaxFilterBytes)) {
    return absl::InvalidArgumentError(absl::StrCat("filter: filter is ", filter.size(),
                                                   " bytes; the limit is ", kMaxFilterBytes));
  }
  const std::size_t bad_utf8 = FindInvalidUtf8(filter);
  if (bad_utf8 != absl::string_view::npos) {
    return FilterError("invalid UTF-8", CharPositions(filter.substr(0, bad_utf8)).back());
  }
  // Lex everything first so that stray characters (";", "`", ...) are reported as such even when a
  // parse or type error precedes them.
  absl::StatusOr<std::vector<Token>> tokens = Lexer(filter).Tokenize();
  if (!tokens.ok()) {
    return tokens.status();
  }
  return Parser(*tokens, schema, param_offset).Run();
}

}  // namespace modelvault::storage
