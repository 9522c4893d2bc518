#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "soci/soci.h"
#include "storage/sql/dialect.h"

namespace modelvault::storage {

// A fixed set of SOCI sessions, each connected lazily and reconnected after a
// failure, so the service recovers by itself when the database comes back.
class SessionPool final {
 public:
  class Lease final {
   public:
    Lease(Lease&& other) noexcept : pool_(other.pool_), slot_(other.slot_) {
      other.pool_ = nullptr;
    }
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    ~Lease();

    soci::session& session() { return *pool_->sessions_[slot_]; }
    // Drops the connection: the next lease of this slot reconnects.
    void Discard();

   private:
    friend class SessionPool;
    Lease(SessionPool* pool, size_t slot) : pool_(pool), slot_(slot) {}
    SessionPool* pool_;
    size_t slot_;
  };

  SessionPool(const Dialect& dialect, std::string connect_string, int size,
              absl::Duration acquire_timeout);

  // Waits for a free session (UNAVAILABLE after the timeout) and connects it
  // if needed (UNAVAILABLE when the database cannot be reached).
  absl::StatusOr<Lease> Acquire();

 private:
  void Release(size_t slot);

  const Dialect& dialect_;
  const std::string connect_string_;
  const absl::Duration acquire_timeout_;
  std::vector<std::unique_ptr<soci::session>> sessions_;  // slot -> session or null
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::condition_variable freed_;
  std::vector<size_t> free_;  // guarded by mu_
};

}  // namespace modelvault::storage
