#include "work_sharing.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace llama_offload {

void share_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_chunks);
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) fn(c);
  };
  if (threads <= 1) {
    claim(0, 1);
    return;
  }
  at::parallel_for(0, threads, 1, claim);  // one task per thread, each claiming chunks until none are left
}

}  // namespace llama_offload
