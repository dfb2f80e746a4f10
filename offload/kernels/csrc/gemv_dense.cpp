// Dense GEMV for float32, bfloat16 and float16 weights, accumulating in float32. Decode reads every weight
// once per token, so the loop is built to stream: R rows at a time share each activation vector, each
// weight vector is widened to float32 once and used for TB tokens, and the next block's rows are
// prefetched one cache line ahead.
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

namespace {

constexpr int64_t kLineBytes = 64;

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

template <typename L, int R, int TB>
void dense_rows(const float* x, int64_t K, const typename L::T* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) dense_block<L, R, TB>(x, K, w + n * K, y + n, N);
  for (; n < n1; ++n) dense_block<L, 1, TB>(x, K, w + n * K, y + n, N);
}

template <typename L>
void dense_gemv(const float* x, int64_t T, int64_t K, const typename L::T* w, float* y, int64_t N, int64_t n0,
                int64_t n1) {
  // Tiles of 8 rows; within a tile, tokens in chunks of at most 4 while the tile's rows stay in cache.
  for (int64_t nb = n0; nb < n1; nb += 8) {
    const int64_t nb1 = nb + 8 < n1 ? nb + 8 : n1;
    for (int64_t t = 0; t < T; t += 4) {
      const float* xt = x + t * K;
      float* yt = y + t * N;
      switch (T - t) {
        case 1: dense_rows<L, 8, 1>(xt, K, w, yt, N, nb, nb1); break;
        case 2: dense_rows<L, 4, 2>(xt, K, w, yt, N, nb, nb1); break;
        case 3: dense_rows<L, 2, 3>(xt, K, w, yt, N, nb, nb1); break;
        default: dense_rows<L, 2, 4>(xt, K, w, yt, N, nb, nb1); break;
      }
    }
  }
}

}  // namespace

void dense_gemv_rows(DenseType type, const float* x, int64_t T, int64_t K, const void* w, float* y, int64_t N,
                     int64_t n0, int64_t n1) {
  switch (type) {
    case DenseType::kF32: dense_gemv<LoadF32>(x, T, K, static_cast<const float*>(w), y, N, n0, n1); break;
    case DenseType::kBF16: dense_gemv<LoadBF16>(x, T, K, static_cast<const uint16_t*>(w), y, N, n0, n1); break;
    case DenseType::kF16: dense_gemv<LoadF16>(x, T, K, static_cast<const uint16_t*>(w), y, N, n0, n1); break;
  }
}

}  // namespace llama_offload
