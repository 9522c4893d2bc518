#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

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
  // std::mutex rather than absl::Mutex: TSan sees it (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace modelvault::server
