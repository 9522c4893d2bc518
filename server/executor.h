#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace modelvault::server {

// A fixed pool of threads for blocking work (database calls), so that gRPC's
// callback threads never block. The queue is bounded: when it is full,
// Submit refuses and the caller answers RESOURCE_EXHAUSTED.
class Executor final {
 public:
  Executor(int threads, size_t max_queue);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Runs `task` on a pool thread; false when the queue is full or stopping.
  bool Submit(std::function<void()> task);
  // Finishes queued tasks and joins the threads.
  void Shutdown();

 private:
  void Loop();

  const size_t max_queue_;
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace modelvault::server
