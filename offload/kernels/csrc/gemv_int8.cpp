// int8 weight-only GEMV: for one token rows one after another, a single sequential stream for the prefetchers
// (which follow one stream far better than several interleaved ones); for 2-8 tokens blocks of up to 4 rows
// sharing each activation load; each weight vector converted once and used for up to 4 tokens.
#include <cmath>

#include "gemv_tiles.h"
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

constexpr int64_t kLine = 64;  // bytes per cache line: one prefetch each
constexpr int64_t kAhead = 2048;  // how far ahead in a row stream to prefetch, in bytes

// Passes of more than kRowInvariantTokens tokens (prefill): blocks of R rows x TB tokens, R * TB vector
// sums, so that a weight vector is converted once and used TB times and an activation vector loaded once
// for R rows.
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

// R rows against TB tokens (x [TB][K], y[t * ldy + r]): each activation vector is loaded once for the R rows
// (one row a time reloaded every token's x from L2 for each row: 8 tokens of 4096 floats are 32 times the
// row's bytes). Each (row, token) sum takes the same steps whatever R and TB are: two sums in flight over
// steps of 2 * kW, then whole vectors into the first, then single values (std::fma: fused whether or not the
// compiler vectorizes the loop across tokens); so a token's row is bit for bit what a one-token call gives.
template <int R, int TB>
static void int8_rows(const float* x, int64_t K, const int8_t* q, const float* scale, float* y, int64_t ldy) {
  constexpr int64_t step = 2 * kW;
  const int64_t kv = K - K % step;
  vfloat acc[R][2][TB] = {};
  int64_t k = 0;
  for (; k < kv; k += step) {
    if (k % kLine < step)  // once a line
      for (int r = 0; r < R; ++r)
        for (int64_t b = 0; b < step; b += kLine) __builtin_prefetch(q + r * K + k + kAhead + b);
    for (int u = 0; u < 2; ++u) {
      vfloat xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = load_f(x + t * K + k + u * kW);
      for (int r = 0; r < R; ++r) {
        const vfloat w = load_i8_as_f(q + r * K + k + u * kW);
        for (int t = 0; t < TB; ++t) acc[r][u][t] += w * xv[t];
      }
    }
  }
  for (; k + kW <= K; k += kW) {
    for (int r = 0; r < R; ++r) {
      const vfloat w = load_i8_as_f(q + r * K + k);
      for (int t = 0; t < TB; ++t) acc[r][0][t] += w * load_f(x + t * K + k);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = hsum(acc[r][0][t] + acc[r][1][t]);
      for (int64_t j = k; j < K; ++j) s = std::fma(float(q[r * K + j]), x[t * K + j], s);
      y[t * ldy + r] = s * scale[r];
    }
  }
}

void int8_gemv_rows(const float* x, int64_t T, int64_t K, const int8_t* q, const float* scale, float* y,
                    int64_t N, int64_t n0, int64_t n1) {
  if (T > kRowInvariantTokens) {
    gemv_tiles<4, 2, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
      int8_block<R, TB>(x + t * K, K, K, q + n * K, K, scale + n, y + t * N + n, N);
    });
    return;
  }
  // R x 2 x TB vector sums stay in registers: 1, 4, 2, 2 rows a call for chunks of 1..4 tokens.
  gemv_tiles<1, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
    int8_rows<R, TB>(x + t * K, K, q + n * K, scale + n, y + t * N + n, N);
  });
}

int vector_width() {
  return kW;
}

}  // namespace llama_offload
