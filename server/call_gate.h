#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/grpc_status.h"
#include "server/stream_auth.h"

// Where every unary call of every service enters: draining check,
// authentication and the method's scope, then the work — inline for
// in-memory work, on the executor for anything that may block. One place, so
// no method can skip authorization (tests/e2e/auth_test checks every method
// of every service from the descriptors).
namespace modelvault::server {

class CallGate final {
 public:
  using Ctx = grpc::CallbackServerContext;
  using Reactor = grpc::ServerUnaryReactor;

  CallGate(Authenticator& auth, Executor& executor, const std::atomic<bool>& draining,
           std::atomic<std::int64_t>& calls, std::atomic<std::int64_t>& active)
      : auth_(auth), executor_(executor), draining_(draining), calls_(calls), active_(active) {}

  // `service` is "/pkg.Service/", `method` the method's name (__func__ in a
  // handler). `work(const Caller&)` returns absl::Status and runs inline.
  template <typename Work>
  Reactor* Inline(Ctx* c, absl::string_view service, absl::string_view method, Work work) {
    Reactor* reactor = c->DefaultReactor();  // constructs it: call once
    absl::StatusOr<Caller> caller = Enter(reactor, c, service, method);
    if (caller.ok()) reactor->Finish(ToGrpcStatus(work(*caller)));
    return reactor;
  }

  // Runs `work(const Caller&)` on the executor.
  template <typename Work>
  Reactor* Offload(Ctx* c, absl::string_view service, absl::string_view method, Work work) {
    Reactor* reactor = c->DefaultReactor();
    absl::StatusOr<Caller> caller = Enter(reactor, c, service, method);
    if (caller.ok()) Submit(reactor, *std::move(caller), std::move(work));
    return reactor;
  }

  // Tries `fast(const Caller&)` inline (returns std::optional<absl::Status>;
  // nullopt when it would block), else runs `slow(const Caller&)` on the
  // executor.
  template <typename Fast, typename Slow>
  Reactor* InlineOr(Ctx* c, absl::string_view service, absl::string_view method, Fast fast,
                    Slow slow) {
    Reactor* reactor = c->DefaultReactor();
    absl::StatusOr<Caller> caller = Enter(reactor, c, service, method);
    if (!caller.ok()) return reactor;
    std::optional<absl::Status> done = fast(*caller);
    if (done.has_value()) {
      reactor->Finish(ToGrpcStatus(*done));
    } else {
      Submit(reactor, *std::move(caller), std::move(slow));
    }
    return reactor;
  }

  // For unary calls answered by a callback: the caller, or the status to
  // end the call with.
  absl::StatusOr<Caller> Authorize(Ctx* c, absl::string_view service, absl::string_view method) {
    calls_.fetch_add(1, std::memory_order_relaxed);
    if (draining_.load(std::memory_order_acquire)) return Draining();
    return auth_.Authenticate(*c, absl::StrCat(service, method));
  }

  // For streams: the caller's authorization, re-checked for as long as the
  // stream lives, or the status to end the stream with.
  absl::StatusOr<std::shared_ptr<StreamAuth>> AuthorizeStream(Ctx* c, absl::string_view service,
                                                              absl::string_view method) {
    absl::StatusOr<Caller> caller = Authorize(c, service, method);
    if (!caller.ok()) return caller.status();
    return std::make_shared<StreamAuth>(auth_, *std::move(caller), absl::StrCat(service, method));
  }

 private:
  static absl::Status Draining() {
    return absl::UnavailableError("the server is shutting down; retry on another replica");
  }

  // Counts the call; finishes it and returns the error when draining or
  // not authorized.
  absl::StatusOr<Caller> Enter(Reactor* reactor, Ctx* c, absl::string_view service,
                               absl::string_view method) {
    absl::StatusOr<Caller> caller = Authorize(c, service, method);
    if (!caller.ok()) reactor->Finish(ToGrpcStatus(caller.status()));
    return caller;
  }

  template <typename Work>
  void Submit(Reactor* reactor, Caller caller, Work work) {
    active_.fetch_add(1, std::memory_order_relaxed);
    if (!executor_.Submit(
            [this, reactor, caller = std::move(caller), work = std::move(work)]() mutable {
              reactor->Finish(ToGrpcStatus(work(caller)));
              active_.fetch_sub(1, std::memory_order_release);
            })) {
      active_.fetch_sub(1, std::memory_order_release);
      reactor->Finish(ToGrpcStatus(
          absl::ResourceExhaustedError("the server is overloaded; retry with backoff")));
    }
  }

  Authenticator& auth_;
  Executor& executor_;
  const std::atomic<bool>& draining_;
  std::atomic<std::int64_t>& calls_;
  std::atomic<std::int64_t>& active_;
};

}  // namespace modelvault::server
