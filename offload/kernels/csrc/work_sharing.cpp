#include "work_sharing.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LLAMA_OFFLOAD_PAUSE() _mm_pause()
#else
#define LLAMA_OFFLOAD_PAUSE() std::this_thread::yield()
#endif

namespace llama_offload {

namespace {

constexpr auto kSpin = std::chrono::microseconds(300);  // a helper's wait for the next call before it sleeps

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t n;
  std::atomic<int64_t> next{0};

  void work() {
    for (int64_t c = next.fetch_add(1); c < n; c = next.fetch_add(1)) (*fn)(c);
  }
};

class Helpers {
 public:
  static Helpers& instance() {
    static Helpers* helpers = new Helpers();  // never destroyed: its threads outlive static destruction
    return *helpers;
  }

  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    const int wanted = std::min<int64_t>(at::get_num_threads(), n) - 1;
    if (wanted <= 0 || at::in_parallel_region()) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    std::lock_guard<std::mutex> one_caller(run_mutex_);  // one job at a time (server threads may race)
    grow(wanted);
    enabled_.store(wanted);
    Job job{&fn, n};
    job_.store(&job);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    job.work();
    job_.store(nullptr);  // helpers that have not joined yet stay out
    while (inside_.load() != 0) LLAMA_OFFLOAD_PAUSE();  // chunks a helper claimed are being finished
  }

 private:
  void grow(int wanted) {
    while (int(threads_.size()) < wanted) {
      const int index = int(threads_.size());
      threads_.emplace_back([this, index] { serve(index); });
      threads_.back().detach();
    }
  }

  void serve(int index) {
    uint64_t seen = epoch_.load();
    for (;;) {
      wait_for_epoch_after(seen);
      seen = epoch_.load();
      if (index >= enabled_.load()) continue;  // fewer threads wanted than exist
      Job* job = job_.load();
      if (job == nullptr) continue;
      inside_.fetch_add(1);
      if (job_.load() == job) job->work();  // still the running job: it cannot end before inside_ drops
      inside_.fetch_sub(1);
    }
  }

  void wait_for_epoch_after(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0; epoch_.load() == seen; ++i) {
      LLAMA_OFFLOAD_PAUSE();
      if (i % 64 == 0 && std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return epoch_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
    }
  }

  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  std::atomic<Job*> job_{nullptr};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> enabled_{0}, inside_{0}, sleepers_{0};
};

}  // namespace

void share_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
  Helpers::instance().run(n_chunks, fn);
}

}  // namespace llama_offload
