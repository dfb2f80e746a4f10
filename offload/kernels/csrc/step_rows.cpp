#include "step_rows.h"

#include <algorithm>

namespace llama_offload {

int64_t StepRows::most_seen() const {
  int64_t most = 0;
  for (int64_t r = 0; r < rows(); ++r) most = std::max(most, seen_at[r + 1] - seen_at[r]);
  return most;
}

StepRows sequences_at(int64_t B, int64_t pos, int64_t window, const float* cos, const float* sin) {
  StepRows s;
  const int64_t end = pos + 1, lo = window > 0 && end > window ? end - window : 0;
  s.seen_at.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    s.batch.push_back(b);
    s.slot.push_back(pos);
    s.cos.push_back(cos);
    s.sin.push_back(sin);
    for (int64_t j = lo; j < end; ++j) s.seen.push_back(j);
    s.seen_at.push_back(int64_t(s.seen.size()));
  }
  return s;
}

StepRows tree_rows(int64_t T, int64_t start, int64_t half, const float* cos, const float* sin, const bool* visible) {
  StepRows s;
  const int64_t width = start + T;
  s.seen_at.push_back(0);
  for (int64_t t = 0; t < T; ++t) {
    s.batch.push_back(0);
    s.slot.push_back(start + t);
    s.cos.push_back(cos + t * half);
    s.sin.push_back(sin + t * half);
    for (int64_t j = 0; j < width; ++j)
      if (visible[t * width + j]) s.seen.push_back(j);
    s.seen_at.push_back(int64_t(s.seen.size()));
  }
  return s;
}

}  // namespace llama_offload
