// Dense GEMV for float32, bfloat16 and float16 weights, accumulating in float32. Decode reads every weight
// once per token, so the loop is built to stream: rows one after another, each weight vector widened to
// float32 once and used for up to 4 tokens, the row prefetched ahead. bfloat16 weights take AVX512_BF16 dot
// products where the CPU has them (activations rounded to bfloat16, as a bfloat16 model's are anyway).
#include <cmath>

#include "cpu_paths.h"
#include "dense_rows.h"
#include "gemv_tiles.h"
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

namespace {

template <typename L>
void dense_gemv(const float* x, int64_t T, int64_t K, const typename L::T* w, float* y, int64_t N, int64_t n0,
                int64_t n1) {
  if (T > kRowInvariantTokens) {
    gemv_tiles<8, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
      dense_block<L, R, TB>(x + t * K, K, w + n * K, nullptr, y + t * N + n, N);
    });
    return;
  }
  // R x 2 x TB vector sums stay in registers: 1, 4, 2, 2 rows a call for chunks of 1..4 tokens.
  gemv_tiles<1, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
    dense_rows<L, R, TB>(x + t * K, K, w + n * K, nullptr, y + t * N + n, N);
  });
}

#if defined(LLAMA_OFFLOAD_X86_PATHS)

// bfloat16 weights against activations rounded to bfloat16: one AVX512_BF16 instruction multiplies 32
// pairs and adds them into 16 float32 sums, where widening each weight first costs three instructions.
template <int R, int TB>
LLAMA_OFFLOAD_TARGET_BF16 void bf16_dot_block(const uint16_t* xb, int64_t K, const uint16_t* w, float* y,
                                              int64_t ldy) {
  __m512 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t kv = K - K % 32;
  for (int64_t k = 0; k < kv; k += 32) {
    for (int r = R; r < 2 * R; ++r) __builtin_prefetch(w + r * K + k);
    __m512bh xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(xb + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = _mm512_reduce_add_ps(acc[r][t]);
      for (int64_t k = kv; k < K; ++k) s += LoadBF16::one(w + r * K + k) * LoadBF16::one(xb + t * K + k);
      y[t * ldy + r] = s;
    }
  }
}

// One row against TB tokens: four sums in flight per token (covering the instruction's
// latency), then a line at a time into the first, then single values, the same steps for every TB.
template <int TB>
LLAMA_OFFLOAD_TARGET_BF16 void bf16_dot_row(const uint16_t* xb, int64_t K, const uint16_t* wr, float* y,
                                            int64_t ldy, bool prefetch) {
  const int64_t kv = K - K % 128;
  __m512 acc[4][TB];
  for (int u = 0; u < 4; ++u)
    for (int t = 0; t < TB; ++t) acc[u][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < kv; k += 128) {
    if (prefetch)
      for (int b = 0; b < 128; b += 32) __builtin_prefetch(wr + k + (kAheadBytes / 2) + b);
    for (int u = 0; u < 4; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k + 32 * u);
      for (int t = 0; t < TB; ++t)
        acc[u][t] = _mm512_dpbf16_ps(acc[u][t], wv, (__m512bh)_mm512_loadu_si512(xb + t * K + k + 32 * u));
    }
  }
  for (; k + 32 <= K; k += 32) {  // a line at a time, still prefetching: rows of 576 end here
    if (prefetch) __builtin_prefetch(wr + k + (kAheadBytes / 2));
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
    for (int t = 0; t < TB; ++t)
      acc[0][t] = _mm512_dpbf16_ps(acc[0][t], wv, (__m512bh)_mm512_loadu_si512(xb + t * K + k));
  }
  for (int t = 0; t < TB; ++t) {
    float s = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]), _mm512_add_ps(acc[2][t], acc[3][t])));
    for (int64_t j = k; j < K; ++j) s = std::fma(LoadBF16::one(wr + j), LoadBF16::one(xb + t * K + j), s);
    y[t * ldy] = s;
  }
}

void bf16_dot_gemv(const uint16_t* xb, int64_t T, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0,
                   int64_t n1) {
  if (T > kRowInvariantTokens) {
    gemv_tiles<8, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
      bf16_dot_block<R, TB>(xb + t * K, K, w + n * K, y + t * N + n, N);
    });
    return;
  }
  const bool prefetch = cpu_path_on(CpuPath::kBf16RowPrefetch);
  for (int64_t n = n0; n < n1; ++n)
    token_chunks(T, [&](auto TB, int64_t t) {
      bf16_dot_row<TB>(xb + t * K, K, w + n * K, y + t * N + n, N, prefetch);
    });
}
#endif

}  // namespace

bool bf16_dot_products() {
#if defined(LLAMA_OFFLOAD_X86_PATHS)
  return cpu_path_on(CpuPath::kAvx512Bf16);
#else
  return false;
#endif
}

void dense_gemv_rows(DenseType type, const float* x, const uint16_t* x_bf16, int64_t T, int64_t K, const void* w,
                     float* y, int64_t N, int64_t n0, int64_t n1) {
  switch (type) {
    case DenseType::kF32: dense_gemv<LoadF32>(x, T, K, static_cast<const float*>(w), y, N, n0, n1); break;
    case DenseType::kBF16:
#if defined(LLAMA_OFFLOAD_X86_PATHS)
      if (x_bf16 != nullptr) {
        bf16_dot_gemv(x_bf16, T, K, static_cast<const uint16_t*>(w), y, N, n0, n1);
        break;
      }
#endif
      dense_gemv<LoadBF16>(x, T, K, static_cast<const uint16_t*>(w), y, N, n0, n1);
      break;
    case DenseType::kF16: dense_gemv<LoadF16>(x, T, K, static_cast<const uint16_t*>(w), y, N, n0, n1); break;
  }
}

}  // namespace llama_offload
