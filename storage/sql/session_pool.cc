#include "storage/sql/session_pool.h"

#include <utility>

namespace modelvault::storage {

SessionPool::Lease::~Lease() {
  if (pool_ != nullptr) pool_->Release(slot_);
}

void SessionPool::Lease::Discard() { pool_->sessions_[slot_].reset(); }

SessionPool::SessionPool(const Dialect& dialect, std::string connect_string, int size,
                         absl::Duration acquire_timeout)
    : dialect_(dialect),
      connect_string_(std::move(connect_string)),
      acquire_timeout_(acquire_timeout),
      sessions_(static_cast<size_t>(size)) {
  for (size_t i = sessions_.size(); i > 0; --i) free_.push_back(i - 1);
}

absl::StatusOr<SessionPool::Lease> SessionPool::Acquire() {
  size_t slot = 0;
  {
    std::unique_lock lock(mu_);
    if (!freed_.wait_for(lock, absl::ToChronoMicroseconds(acquire_timeout_),
                         [this] { return !free_.empty(); })) {
      return absl::UnavailableError("all database connections are busy; retry the call");
    }
    slot = free_.back();
    free_.pop_back();
  }
  Lease lease(this, slot);
  if (sessions_[slot] == nullptr) {
    try {
      auto session = std::make_unique<soci::session>();
      session->open(std::string(dialect_.engine()), connect_string_);
      dialect_.OnConnect(*session);
      sessions_[slot] = std::move(session);
    } catch (const soci::soci_error& error) {
      absl::Status status = dialect_.MapError(error);
      if (status.code() == absl::StatusCode::kInternal) {
        status = absl::UnavailableError("cannot connect to the database");
      }
      return status;
    }
  }
  return lease;
}

void SessionPool::Release(size_t slot) {
  {
    std::lock_guard lock(mu_);
    free_.push_back(slot);
  }
  freed_.notify_one();
}

}  // namespace modelvault::storage
