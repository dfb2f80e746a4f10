// Dense-row GEMV building blocks shared by every weight type that widens to float32 vectors (float32,
// bfloat16, float16, int8 with one scale per row): L is an element loader (vec.h); scale, where given, multiplies
// each row's sum once at the end (int8's per-row scale), so a weight type's bits are what its own loop gave.
#pragma once

#include <cmath>

#include "vec.h"

namespace llama_offload {

constexpr int64_t kLineBytes = 64;
constexpr int64_t kAheadBytes = 2048;  // how far ahead in a row stream to prefetch

// Passes of more than kRowInvariantTokens tokens (prefill): blocks of R rows x TB tokens, each activation
// vector loaded once for R rows, the next block's rows prefetched a line ahead.
template <typename L, int R, int TB>
inline void dense_block(const float* x, int64_t K, const typename L::T* w, const float* scale, float* y,
                        int64_t ldy) {
  constexpr int64_t per_line = kLineBytes / sizeof(typename L::T);
  vfloat acc[R][TB] = {};
  const int64_t kv = K - K % kW;
  for (int64_t k = 0; k < kv; k += kW) {
    if (k % per_line == 0)
      for (int r = R; r < 2 * R; ++r) __builtin_prefetch(w + r * K + k);
    vfloat xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = load_f(x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const vfloat wv = L::load(w + r * K + k);
      for (int t = 0; t < TB; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t k = kv; k < K; ++k) s += L::one(w + r * K + k) * x[t * K + k];
      y[t * ldy + r] = scale ? s * scale[r] : s;
    }
  }
}

// R rows against TB tokens (x [TB][K], w [R][K], y[t * ldy + r]), each row prefetched kAheadBytes ahead.
// Each activation vector is loaded once for the R rows: with 4 tokens and one row at a time, reloading x
// from L2 for every row, not the weights, bounded the pass. Each (row, token) sum takes the same steps
// whatever R and TB are: two sums in flight over steps of 2 * kW, then whole vectors into the first, then
// single values (std::fma: fused whether or not the compiler vectorizes the loop across tokens); so a token's
// row is bit for bit what a one-token call gives.
template <typename L, int R, int TB>
inline void dense_rows(const float* x, int64_t K, const typename L::T* w, const float* scale, float* y, int64_t ldy) {
  constexpr int64_t ahead = kAheadBytes / sizeof(typename L::T), step = 2 * kW;
  constexpr int64_t per_line = kLineBytes / sizeof(typename L::T);
  const int64_t kv = K - K % step;
  vfloat acc[R][2][TB] = {};
  int64_t k = 0;
  for (; k < kv; k += step) {
    if (k % per_line < step)  // once a line (int8's lines hold two steps)
      for (int r = 0; r < R; ++r)
        for (int64_t b = 0; b < step; b += per_line) __builtin_prefetch(w + r * K + k + ahead + b);
    for (int u = 0; u < 2; ++u) {
      vfloat xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = load_f(x + t * K + k + u * kW);
      for (int r = 0; r < R; ++r) {
        const vfloat wv = L::load(w + r * K + k + u * kW);
        for (int t = 0; t < TB; ++t) acc[r][u][t] += wv * xv[t];
      }
    }
  }
  for (; k + kW <= K; k += kW) {
    for (int r = 0; r < R; ++r) {
      const vfloat wv = L::load(w + r * K + k);
      for (int t = 0; t < TB; ++t) acc[r][0][t] += wv * load_f(x + t * K + k);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = hsum(acc[r][0][t] + acc[r][1][t]);
      for (int64_t j = k; j < K; ++j) s = std::fma(L::one(w + r * K + j), x[t * K + j], s);
      y[t * ldy + r] = scale ? s * scale[r] : s;
    }
  }
}

}  // namespace llama_offload
