#pragma once

#include <string>
#include <vector>

namespace modelvault::client {

// `modelvault providers list`, `modelvault models list|get`: client commands
// against a running server (--target or MODELVAULT_TARGET). Returns the exit code.
int RunCatalogCommand(const std::string& noun, const std::vector<std::string>& args);

}  // namespace modelvault::client
