// int4 GEMV with each token's activations rounded to int8, on AVX512_VNNI: one instruction multiplies 64
// weight nibbles (as unsigned bytes) by 64 signed activation bytes and adds them in fours into 16 int32 sums,
// where the float path widens every nibble to a float first: about half the instructions per weight
// byte (a 3072 x 576 matrix in cache, one thread of the Intel dev box: 48 us against 97 us).
//
// Activations: quantized per block of 32 values (scale max|x| / 127, as llama.cpp's Q8 blocks), then within
// each chunk of 128 weights (a last one of 64) laid out as the even values, then the odd ones, so that they
// meet the high and the low nibbles of the packed bytes (q[2j] is byte j's high nibble). Lane i of a chunk
// then holds the dot product of weights base + 8i .. base + 8i + 7: one activation scale and, for group sizes
// that are multiples of 8, one weight scale per lane. The zero points' term uses the rounded activations'
// group sums, so the result is exactly the float dot product of the weight with the rounded x. Passes of up
// to kRowInvariantTokens tokens take this path where one token does, each (row, token) the same steps: a
// token's row of a token tree's verification is bit for bit its one-token decode step's. Longer passes
// (prefill) keep the float path and x as it is.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "cpu_paths.h"
#include "gemv_tiles.h"
#include "kernels.h"

namespace llama_offload {

constexpr int64_t kBlock = 32;  // activation values per int8 scale
constexpr int64_t kAheadBytes = 2048;  // how far ahead in a row stream to prefetch

bool int4_vnni_takes(int64_t T, int64_t K, int64_t G) {
#if defined(LLAMA_OFFLOAD_X86_PATHS)
  return T <= kRowInvariantTokens && cpu_path_on(CpuPath::kAvx512Vnni) && K % 64 == 0 && G % 8 == 0 &&
         (128 % G == 0 || G % 128 == 0);
#else
  (void)T;
  (void)K;
  (void)G;
  return false;
#endif
}

namespace {

// One token's x [K] -> xq [K], x8scale [K / 8], xsum [K / G], as int4_vnni_activations.
void token_activations(const float* x, int64_t K, int64_t G, int8_t* xq, float* x8scale, float* xsum) {
  std::vector<int8_t> natural(K);
  for (int64_t b = 0; b < K; b += kBlock) {
    float top = 0.f;
    for (int64_t k = b; k < b + kBlock; ++k) top = std::fmax(top, std::fabs(x[k]));
    const float d = top / 127.f;  // x / d, not x * (127 / top): the same rounding as the torch twin's
    for (int64_t k = b; k < b + kBlock; ++k) natural[k] = d > 0.f ? int8_t(std::nearbyint(x[k] / d)) : 0;
    for (int64_t j = b / 8; j < (b + kBlock) / 8; ++j) x8scale[j] = d;
  }
  for (int64_t base = 0; base < K; base += 128) {
    const int64_t half = (K - base >= 128 ? 128 : 64) / 2;
    for (int64_t j = 0; j < half; ++j) {
      xq[base + j] = natural[base + 2 * j];
      xq[base + half + j] = natural[base + 2 * j + 1];
    }
  }
  for (int64_t g = 0; g < K / G; ++g) {
    float s = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) s += float(natural[k]) * x8scale[k / 8];
    xsum[g] = s;
  }
}

}  // namespace

void int4_vnni_activations(const float* x, int64_t T, int64_t K, int64_t G, int8_t* xq, float* x8scale,
                           float* xsum) {
  for (int64_t t = 0; t < T; ++t)
    token_activations(x + t * K, K, G, xq + t * K, x8scale + t * (K / 8), xsum + t * (K / G));
}

#if defined(LLAMA_OFFLOAD_X86_PATHS)

namespace {

// The chunk at byte offset `at` of R rows against TB tokens (xe, xo, xs [TB]): acc[r][t] += its 16 lane
// sums, each times its activation scale (xs) and its weight scale. Bytes past `mask` (a last chunk of 32
// bytes) read as zero, as do their lanes.
template <int R, int TB, bool kSmall>
LLAMA_OFFLOAD_TARGET_VNNI inline void vnni_chunk(const __m512i* xe, const __m512i* xo, const __m512* xs,
                                                 const uint8_t* p, int64_t ldp, int64_t at, __mmask64 mask,
                                                 const float* scale_f, int64_t ng, int64_t group0, __m512i idx,
                                                 __mmask16 m, __m512 (*acc)[TB]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int r = 0; r < R; ++r) {
    const uint8_t* pr = p + r * ldp + at;
    __builtin_prefetch(pr + kAheadBytes);
    const __m512i w = _mm512_maskz_loadu_epi8(mask, pr);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4), lo = _mm512_and_si512(w, low4);
    const float* sr = scale_f + r * ng + group0;
    const __m512 ws = kSmall ? _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(m, sr)) : _mm512_set1_ps(*sr);
    for (int t = 0; t < TB; ++t) {
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xe[t]), lo, xo[t]);
      acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), xs[t]), ws, acc[r][t]);
    }
  }
}

// y[t][r] = sum_g s[r][g] * (sum_{k in g} q[r][k] * xr[t][k] - z[r][g] * xsum[t][g]) for R rows and TB
// tokens (xr: the rounded x; token t's activations at xq + t * K, x8 + t * K / 8, xsum + t * K / G). Each
// (row, token) takes the same steps whatever R and TB are, so a token's row is what a one-token call gives.
// scale_f, scale_zero_f: float [R][K / G] (s and s * z). kSmall: G divides 128 (a chunk holds 128 / G
// groups), else G is a multiple of 128. lane_group [16]: each lane's group within its chunk (8 * lane / G),
// made once by the caller: sixteen integer divisions per row cost more than the row's dot products.
template <int R, int TB, bool kSmall>
LLAMA_OFFLOAD_TARGET_VNNI void vnni_rows(const int8_t* xq, const float* x8, const float* xsum, int64_t K, int64_t G,
                                         const uint8_t* p, const float* scale_f, const float* scale_zero_f,
                                         const int32_t* lane_group, float* y, int64_t ldy) {
  const int64_t ldp = K / 2, ng = K / G, full = K / 128;
  const int64_t per_chunk = kSmall ? 128 / G : 0;
  const __m512i idx = _mm512_loadu_si512(lane_group);
  const __mmask16 m = __mmask16((1u << (kSmall ? per_chunk : 1)) - 1);
  __m512 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  __m512i xe[TB], xo[TB];
  __m512 xs[TB];
  for (int64_t c = 0; c < full; ++c) {
    for (int t = 0; t < TB; ++t) {
      xe[t] = _mm512_loadu_si512(xq + t * K + c * 128);
      xo[t] = _mm512_loadu_si512(xq + t * K + c * 128 + 64);
      xs[t] = _mm512_loadu_ps(x8 + t * (K / 8) + c * 16);
    }
    vnni_chunk<R, TB, kSmall>(xe, xo, xs, p, ldp, c * 64, ~__mmask64(0), scale_f, ng,
                              kSmall ? c * per_chunk : c * 128 / G, idx, m, acc);
  }
  if (K % 128 != 0) {  // the last 64 weights, 32 bytes (G divides 64 here, since it divides K): lanes 0-7
    const int64_t k0 = full * 128;
    const __mmask64 half = 0xFFFFFFFFull;
    for (int t = 0; t < TB; ++t) {
      xe[t] = _mm512_maskz_loadu_epi8(half, xq + t * K + k0);
      xo[t] = _mm512_maskz_loadu_epi8(half, xq + t * K + k0 + 32);
      xs[t] = _mm512_maskz_loadu_ps(0xFF, x8 + t * (K / 8) + full * 16);
    }
    vnni_chunk<R, TB, kSmall>(xe, xo, xs, p, ldp, full * 64, half, scale_f, ng, k0 / G, idx,
                              __mmask16((1u << (kSmall ? 64 / G : 1)) - 1), acc);
  }
  for (int64_t g = 0; g < ng; g += 16) {  // the zero points' term, 16 groups at a time
    const __mmask16 mg = ng - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ng - g)) - 1);
    __m512 xsg[TB];
    for (int t = 0; t < TB; ++t) xsg[t] = _mm512_maskz_loadu_ps(mg, xsum + t * ng + g);
    for (int r = 0; r < R; ++r) {
      const __m512 sz = _mm512_maskz_loadu_ps(mg, scale_zero_f + r * ng + g);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fnmadd_ps(sz, xsg[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

}  // namespace

template <typename S>
void int4_vnni_gemv_rows(const int8_t* xq, const float* x8scale, const float* xsum, int64_t T, int64_t K,
                         int64_t G, const uint8_t* packed, const S* scales, const S* zeros, float* y, int64_t N,
                         int64_t n0, int64_t n1) {
  constexpr int64_t kTile = 8;
  const int64_t ng = K / G;
  std::vector<float> scale_f(kTile * ng), scale_zero_f(kTile * ng);
  int32_t lane_group[16];
  for (int i = 0; i < 16; ++i) lane_group[i] = G <= 128 ? int32_t(8 * i / G) : 0;
  for (int64_t nb = n0; nb < n1; nb += kTile) {
    const int64_t nb1 = nb + kTile < n1 ? nb + kTile : n1;
    for (int64_t i = 0; i < (nb1 - nb) * ng; ++i) {
      scale_f[i] = float(scales[nb * ng + i]);
      scale_zero_f[i] = scale_f[i] * float(zeros[nb * ng + i]);
    }
    // Blocks of 4 rows for one token; for more, fewer rows as each token chunk's sums and activations
    // take registers.
    gemv_tiles<4, 4, 2, 2>(T, nb, nb1, [&](auto R, auto TB, int64_t t, int64_t n) {
      const float* sf = scale_f.data() + (n - nb) * ng;
      const float* szf = scale_zero_f.data() + (n - nb) * ng;
      const uint8_t* p = packed + n * (K / 2);
      if (G <= 128)
        vnni_rows<R, TB, true>(xq + t * K, x8scale + t * (K / 8), xsum + t * ng, K, G, p, sf, szf, lane_group,
                               y + t * N + n, N);
      else
        vnni_rows<R, TB, false>(xq + t * K, x8scale + t * (K / 8), xsum + t * ng, K, G, p, sf, szf, lane_group,
                                y + t * N + n, N);
    });
  }
}

#else

template <typename S>
void int4_vnni_gemv_rows(const int8_t*, const float*, const float*, int64_t, int64_t, int64_t, const uint8_t*,
                         const S*, const S*, float*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "int4_vnni_gemv_rows: built without the x86 paths");
}

#endif

template void int4_vnni_gemv_rows<float>(const int8_t*, const float*, const float*, int64_t, int64_t, int64_t,
                                         const uint8_t*, const float*, const float*, float*, int64_t, int64_t,
                                         int64_t);
template void int4_vnni_gemv_rows<c10::BFloat16>(const int8_t*, const float*, const float*, int64_t, int64_t,
                                                 int64_t, const uint8_t*, const c10::BFloat16*,
                                                 const c10::BFloat16*, float*, int64_t, int64_t, int64_t);
template void int4_vnni_gemv_rows<c10::Half>(const int8_t*, const float*, const float*, int64_t, int64_t, int64_t,
                                             const uint8_t*, const c10::Half*, const c10::Half*, float*, int64_t,
                                             int64_t, int64_t);

}  // namespace llama_offload
