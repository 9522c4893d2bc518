// Command-line flags of the benchmark tools: `--name value` or `--name=value`,
// with `-` and `_` alike in names (`--page-size` is `--page_size`).

#ifndef MODELVAULT_BENCH_FLAGS_H_
#define MODELVAULT_BENCH_FLAGS_H_

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace modelvault::bench {

// Flags with string defaults; Parse fills in the values given.
class Flags final {
 public:
  // One flag: its name (with `_`), default value and help.
  struct Flag {
    std::string name;
    std::string value;
    std::string help;
  };
  // `flags` names every flag the program knows.
  Flags(std::string program, std::string usage, std::vector<Flag> flags)
      : program_(std::move(program)), usage_(std::move(usage)), flags_(std::move(flags)) {}

  // Returns false (after printing why and the usage) on an unknown flag, a
  // missing value or a stray argument; exits 0 after printing the usage on
  // --help.
  bool Parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        PrintUsage(stdout);
        std::exit(0);
      }
      if (arg.rfind("--", 0) != 0) return Fail(absl::StrCat("unexpected argument ", arg));
      arg = arg.substr(2);
      std::string value;
      bool has_value = false;
      if (const size_t eq = arg.find('='); eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_value = true;
      }
      std::replace(arg.begin(), arg.end(), '-', '_');
      Flag* flag = Find(arg);
      if (flag == nullptr) return Fail(absl::StrCat("unknown flag --", arg));
      if (!has_value) {
        if (i + 1 >= argc) return Fail(absl::StrCat("--", arg, " needs a value"));
        value = argv[++i];
      }
      flag->value = value;
    }
    return true;
  }

  std::string Get(const std::string& name) const {
    for (const Flag& f : flags_) {
      if (f.name == name) return f.value;
    }
    return "";
  }

  // Parses an integer flag into `out`; prints why and returns false when it is
  // not an integer in [min, max].
  bool GetInt(const std::string& name, int64_t min, int64_t max, int64_t* out) const {
    int64_t v = 0;
    if (!absl::SimpleAtoi(Get(name), &v) || v < min || v > max) {
      std::fprintf(stderr, "%s: --%s must be an integer in [%lld, %lld], got \"%s\"\n",
                   program_.c_str(), name.c_str(), static_cast<long long>(min),
                   static_cast<long long>(max), Get(name).c_str());
      return false;
    }
    *out = v;
    return true;
  }

  // Same for a number of seconds, a non-negative decimal.
  bool GetSeconds(const std::string& name, double* out) const {
    double v = 0;
    if (!absl::SimpleAtod(Get(name), &v) || !(v >= 0) || v > 86400) {
      std::fprintf(stderr, "%s: --%s must be a number of seconds, got \"%s\"\n", program_.c_str(),
                   name.c_str(), Get(name).c_str());
      return false;
    }
    *out = v;
    return true;
  }

 private:
  Flag* Find(const std::string& name) {
    for (Flag& f : flags_) {
      if (f.name == name) return &f;
    }
    return nullptr;
  }

  bool Fail(const std::string& why) const {
    std::fprintf(stderr, "%s: %s\n", program_.c_str(), why.c_str());
    PrintUsage(stderr);
    return false;
  }

  void PrintUsage(FILE* out) const {
    std::fprintf(out, "usage: %s %s\n", program_.c_str(), usage_.c_str());
    for (const Flag& f : flags_) {
      std::string name = f.name;
      std::replace(name.begin(), name.end(), '_', '-');
      std::fprintf(out, "  --%-12s %s (default \"%s\")\n", name.c_str(), f.help.c_str(),
                   f.value.c_str());
    }
  }

  std::string program_;
  std::string usage_;
  std::vector<Flag> flags_;
};

}  // namespace modelvault::bench

#endif  // MODELVAULT_BENCH_FLAGS_H_
