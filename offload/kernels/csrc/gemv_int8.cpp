// int8 weight-only GEMV: each block of R rows x TB tokens keeps R*TB vector accumulators, so a weight
// vector is converted once and used TB times, and an activation vector is loaded once for R rows.
#include "gemv_tiles.h"
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

constexpr int64_t kLine = 64;  // bytes per cache line: one prefetch each
constexpr int64_t kAhead = 2048;  // how far ahead in a row stream to prefetch, in bytes

template <int R, int TB>
static void int8_block(const float* x, int64_t ldx, int64_t K, const int8_t* q, int64_t ldq,
                       const float* scale, float* y, int64_t ldy) {
  vfloat acc[R][TB] = {};
  auto step = [&](int64_t k) {
    vfloat xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = load_f(x + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const vfloat w = load_i8_as_f(q + r * ldq + k);
      for (int t = 0; t < TB; ++t) acc[r][t] += w * xv[t];
    }
  };
  const int64_t kv = K - K % kW;
  const int64_t kl = K - K % kLine;
  int64_t k = 0;
  for (; k < kl; k += kLine) {
    // The same line of the next block's rows: one block ahead, and each new row's stream starts warm.
    for (int r = R; r < 2 * R; ++r) __builtin_prefetch(q + r * ldq + k);
    for (int64_t j = 0; j < kLine; j += kW) step(k + j);
  }
  for (; k < kv; k += kW) step(k);
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t kk = kv; kk < K; ++kk) s += float(q[r * ldq + kk]) * x[t * ldx + kk];
      y[t * ldy + r] = s * scale[r];
    }
  }
}

// One token: rows one after another, a single sequential stream for the prefetchers (which follow one
// stream far better than several interleaved ones), prefetching kAhead bytes ahead, four sums in flight.
static void int8_row_stream(const float* x, int64_t K, const int8_t* q, const float* scale, float* y, int64_t n0,
                            int64_t n1) {
  constexpr int64_t step = 4 * kW;
  const int64_t kv = K - K % step;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * K;
    vfloat acc[4] = {};
    int64_t k = 0;
    for (; k < kv; k += step) {
      for (int64_t b = 0; b < step; b += kLine) __builtin_prefetch(qr + k + kAhead + b);
      for (int u = 0; u < 4; ++u) acc[u] += load_i8_as_f(qr + k + u * kW) * load_f(x + k + u * kW);
    }
    for (; k + kW <= K; k += kW) acc[0] += load_i8_as_f(qr + k) * load_f(x + k);
    float s = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; k < K; ++k) s += float(qr[k]) * x[k];
    y[n] = s * scale[n];
  }
}

void int8_gemv_rows(const float* x, int64_t T, int64_t K, const int8_t* q, const float* scale, float* y,
                    int64_t N, int64_t n0, int64_t n1) {
  if (T == 1) {
    int8_row_stream(x, K, q, scale, y, n0, n1);
    return;
  }
  gemv_tiles<4, 2, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
    int8_block<R, TB>(x + t * K, K, K, q + n * K, K, scale + n, y + t * N + n, N);
  });
}

int vector_width() {
  return kW;
}

}  // namespace llama_offload
