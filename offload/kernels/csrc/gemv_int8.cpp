// int8 weight-only GEMV: for one token rows one after another, a single sequential stream for the prefetchers
// (which follow one stream far better than several interleaved ones); for 2-8 tokens blocks of up to 4 rows
// sharing each activation load; each weight vector converted once and used for up to 4 tokens.
#include <cmath>

#include "dense_rows.h"
#include "gemv_tiles.h"
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

void int8_gemv_rows(const float* x, int64_t T, int64_t K, const int8_t* q, const float* scale, float* y,
                    int64_t N, int64_t n0, int64_t n1) {
  if (T > kRowInvariantTokens) {
    gemv_tiles<4, 2, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
      dense_block<LoadI8, R, TB>(x + t * K, K, q + n * K, scale + n, y + t * N + n, N);
    });
    return;
  }
  // R x 2 x TB vector sums stay in registers: 1, 4, 2, 2 rows a call for chunks of 1..4 tokens.
  gemv_tiles<1, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
    dense_rows<LoadI8, R, TB>(x + t * K, K, q + n * K, scale + n, y + t * N + n, N);
  });
}

int vector_width() {
  return kW;
}

}  // namespace llama_offload
