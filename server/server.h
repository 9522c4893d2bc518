#pragma once

#include <csignal>

#include "absl/status/status.h"
#include "server/config.h"

namespace modelvault::server {

// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts
// later; RunServer waits for them with sigwait. Call first thing in main.
void BlockShutdownSignals();

// Opens the database (migrating first when configured), loads the catalog
// cache, serves until SIGTERM/SIGINT, then shuts down gracefully: streams end
// with their cursor, in-flight calls finish within the timeout.
absl::Status RunServer(const ServeConfig& config);

}  // namespace modelvault::server
