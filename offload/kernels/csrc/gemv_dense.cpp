// Dense GEMV for float32, bfloat16 and float16 weights, accumulating in float32. Decode reads every weight
// once per token, so the loop is built to stream: R rows at a time share each activation vector, each
// weight vector is widened to float32 once and used for TB tokens, and the next block's rows are
// prefetched one cache line ahead. bfloat16 weights take AVX512_BF16 dot products where the CPU has them
// (activations rounded to bfloat16, as a bfloat16 model's are anyway).
#include "cpu_paths.h"
#include "gemv_tiles.h"
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

namespace {

constexpr int64_t kLineBytes = 64;
constexpr int64_t kAheadBytes = 2048;  // how far ahead in a row stream to prefetch

template <typename L, int R, int TB>
void dense_block(const float* x, int64_t K, const typename L::T* w, float* y, int64_t ldy) {
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
      y[t * ldy + r] = s;
    }
  }
}

// One token: rows one after another, a single sequential stream for the prefetchers (which follow one
// stream far better than eight interleaved ones), prefetching kAheadBytes ahead, four sums in flight.
template <typename L>
void dense_row_stream(const float* x, int64_t K, const typename L::T* w, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t ahead = kAheadBytes / sizeof(typename L::T), step = 4 * kW;
  constexpr int64_t per_line = kLineBytes / sizeof(typename L::T);
  const int64_t kv = K - K % step;
  for (int64_t n = n0; n < n1; ++n) {
    const typename L::T* wr = w + n * K;
    vfloat acc[4] = {};
    int64_t k = 0;
    for (; k < kv; k += step) {
      for (int64_t b = 0; b < step; b += per_line) __builtin_prefetch(wr + k + ahead + b);
      for (int u = 0; u < 4; ++u) acc[u] += L::load(wr + k + u * kW) * load_f(x + k + u * kW);
    }
    for (; k + kW <= K; k += kW) acc[0] += L::load(wr + k) * load_f(x + k);
    float s = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; k < K; ++k) s += L::one(wr + k) * x[k];
    y[n] = s;
  }
}

template <typename L>
void dense_gemv(const float* x, int64_t T, int64_t K, const typename L::T* w, float* y, int64_t N, int64_t n0,
                int64_t n1) {
  if (T == 1) {
    dense_row_stream<L>(x, K, w, y, n0, n1);
    return;
  }
  gemv_tiles<8, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
    dense_block<L, R, TB>(x + t * K, K, w + n * K, y + t * N + n, N);
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

// One token: rows one after another, a single sequential stream for the prefetchers, with four sums in
// flight to cover the instruction's latency.
LLAMA_OFFLOAD_TARGET_BF16 void bf16_dot_row_stream(const uint16_t* xb, int64_t K, const uint16_t* w, float* y,
                                                   int64_t n0, int64_t n1) {
  const int64_t kv = K - K % 128;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k < kv; k += 128) {
      __builtin_prefetch(wr + k + (kAheadBytes / 2));
      __builtin_prefetch(wr + k + (kAheadBytes / 2) + 32);
      __builtin_prefetch(wr + k + (kAheadBytes / 2) + 64);
      __builtin_prefetch(wr + k + (kAheadBytes / 2) + 96);
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(wr + k + 32 * u),
                                  (__m512bh)_mm512_loadu_si512(xb + k + 32 * u));
    }
    for (; k + 32 <= K; k += 32) {  // a line at a time, still prefetching: rows of 576 end here
      __builtin_prefetch(wr + k + (kAheadBytes / 2));
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(xb + k));
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for (; k < K; ++k) s += LoadBF16::one(wr + k) * LoadBF16::one(xb + k);
    y[n] = s;
  }
}

void bf16_dot_gemv(const uint16_t* xb, int64_t T, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0,
                   int64_t n1) {
  if (T == 1) {
    bf16_dot_row_stream(xb, K, w, y, n0, n1);
    return;
  }
  gemv_tiles<8, 4, 2, 2>(T, n0, n1, [&](auto R, auto TB, int64_t t, int64_t n) {
    bf16_dot_block<R, TB>(xb + t * K, K, w + n * K, y + t * N + n, N);
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
