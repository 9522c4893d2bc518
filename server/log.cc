#include "server/log.h"

#include <cstdio>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace modelvault::server {
namespace {

LogLevel g_level = LogLevel::kInfo;
LogFormat g_format = LogFormat::kText;
std::mutex g_mu;  // not absl::Mutex: TSan sees std::mutex

constexpr const char* kNames[] = {"debug", "info", "warn", "error"};

std::string JsonEscape(absl::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppend(&out, "\\u00", absl::Hex(c, absl::kZeroPad2));
        } else {
          out += c;
        }
    }
  }
  return out;
}

}  // namespace

void ConfigureLogging(LogLevel level, LogFormat format) {
  g_level = level;
  g_format = format;
}

bool ParseLogLevel(absl::string_view text, LogLevel& out) {
  for (int i = 0; i < 4; ++i) {
    if (absl::AsciiStrToLower(text) == kNames[i]) {
      out = static_cast<LogLevel>(i);
      return true;
    }
  }
  return false;
}

bool ParseLogFormat(absl::string_view text, LogFormat& out) {
  if (text == "text") {
    out = LogFormat::kText;
  } else if (text == "json") {
    out = LogFormat::kJson;
  } else {
    return false;
  }
  return true;
}

void Log(LogLevel level, absl::string_view message,
         const std::vector<std::pair<std::string, std::string>>& fields) {
  if (level < g_level) return;
  const std::string time =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone());
  std::string line;
  if (g_format == LogFormat::kJson) {
    line = absl::StrCat("{\"time\":\"", time, "\",\"level\":\"", kNames[static_cast<int>(level)],
                        "\",\"msg\":\"", JsonEscape(message), "\"");
    for (const auto& [k, v] : fields)
      absl::StrAppend(&line, ",\"", k, "\":\"", JsonEscape(v), "\"");
    line += "}\n";
  } else {
    line = absl::StrCat(time, " ", absl::AsciiStrToUpper(kNames[static_cast<int>(level)]), " ",
                        message);
    for (const auto& [k, v] : fields) absl::StrAppend(&line, " ", k, "=", v);
    line += "\n";
  }
  std::lock_guard lock(g_mu);
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace modelvault::server
