// One helper thread of the process's own, shared by the C++ kernels (compiled together, see
// patchbay_kernels/cpp.py): while torch runs a small step on one thread, a kernel may hand out
// chunks of its work to it. The helper only ever takes part opportunistically: the caller hands
// out chunks from a shared counter and never waits for a helper that has not started, so a busy
// core costs nothing but its own share. A chunk is never split, so results do not depend on who
// ran it. ``Helper::get().enabled`` is set by ``patchbay::set_gemv_helper`` (gemv.cpp).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include <unistd.h>

namespace patchbay {

class Helper {
 public:
  using Fn = void (*)(const void* ctx, int64_t chunk);

  static Helper& get() {
    static Helper* h = new Helper();  // one per process (an inline function's static); never destroyed: its thread may outlive static destructors
    return *h;
  }

  std::atomic<bool> enabled{false};

  // fn(ctx, c) for every c in [0, n), on this thread and, if it joins in time, the helper's.
  void run(Fn fn, const void* ctx, int64_t n) {
    bool free = false;
    if (n < 2 || !busy_.compare_exchange_strong(free, true)) {  // another caller: serial
      for (int64_t c = 0; c < n; ++c) fn(ctx, c);
      return;
    }
    start_thread();
    fn_ = fn, ctx_ = ctx, n_ = n;
    next_.store(0);
    state_.store(kPosted);
    gen_.fetch_add(1);
    if (sleeping_.load() && mu_.try_lock()) {  // (a failed try_lock: it is about to re-check gen)
      cv_.notify_one();
      mu_.unlock();
    }
    work();
    int posted = kPosted;
    if (!state_.compare_exchange_strong(posted, kIdle)) {  // the helper took part: wait for its chunk
      while (state_.load() != kDone) __builtin_ia32_pause();
      state_.store(kIdle);
    }
    busy_.store(false);
  }

 private:
  enum { kIdle, kPosted, kTaken, kDone };
  static constexpr int kSpin = 20000;  // ~50-100 us of polling before sleeping

  void work() {
    for (int64_t c; (c = next_.fetch_add(1)) < n_;) fn_(ctx_, c);
  }

  void start_thread() {
    if (pid_ == getpid()) return;  // (a forked child has no helper: start one of its own)
    pid_ = getpid();
    std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = gen_.load();
    for (;;) {
      for (int spins = 0; gen_.load() == seen;) {
        if (++spins < kSpin) {
          __builtin_ia32_pause();
          continue;
        }
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.store(true);
        cv_.wait_for(lk, std::chrono::milliseconds(100), [&] { return gen_.load() != seen; });
        sleeping_.store(false);
        spins = 0;
      }
      seen = gen_.load();
      int posted = kPosted;
      if (state_.compare_exchange_strong(posted, kTaken)) {
        work();
        state_.store(kDone);
      }
    }
  }

  std::atomic<bool> busy_{false}, sleeping_{false};
  std::atomic<int> state_{kIdle};
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0};
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t n_ = 0;
  pid_t pid_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
};

// fn(c) for every chunk c in [0, n), on this thread and, if it joins in time, the helper's
// (callers ask helper_available first: the helper is for steps torch runs on one thread).
template <typename F>
void with_helper(int64_t n, const F& fn) {
  Helper& helper = Helper::get();
  helper.run([](const void* p, int64_t c) { (*static_cast<const F*>(p))(c); }, &fn, n);
}

inline bool helper_available(int64_t torch_threads) {
  return torch_threads == 1 && Helper::get().enabled.load(std::memory_order_relaxed);
}

}  // namespace patchbay
