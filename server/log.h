#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace modelvault::server {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };
enum class LogFormat { kText, kJson };

void ConfigureLogging(LogLevel level, LogFormat format);
bool ParseLogLevel(absl::string_view text, LogLevel& out);
bool ParseLogFormat(absl::string_view text, LogFormat& out);

// One line to stderr: text `TIME LEVEL message key=value ...` or a JSON
// object per line. Never pass secrets.
void Log(LogLevel level, absl::string_view message,
         const std::vector<std::pair<std::string, std::string>>& fields = {});

}  // namespace modelvault::server
