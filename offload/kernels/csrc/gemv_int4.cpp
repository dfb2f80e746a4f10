// int4 weight-only GEMV, asymmetric with one scale and zero per group of G weights:
//   y = sum_g scale_g * (sum_{k in g} q_k x_k - zero_g * sum_{k in g} x_k)
// so the inner loop is nibble -> float -> FMA, and scale and zero are applied once per group.
// Activations arrive permuted (int4_permute_activations) so high and low nibbles need no shuffle, and
// pre-combined: with byte = 16 * hi + lo, hi * xe + lo * xo = hi * (xe - 16 * xo) + byte * xo, which
// spares masking out the low nibble.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "gemv_tiles.h"
#include "kernels.h"
#include "vec.h"

namespace llama_offload {

constexpr int64_t kChunk = 2 * kW;  // weights per vector step: kW bytes, two nibbles each
constexpr int64_t kAhead = 2048;  // bytes to prefetch ahead

void int4_permute_activations(const float* x, int64_t T, int64_t K, int64_t G, float* xperm, float* xsum) {
  const int64_t ng = K / G;
  const int64_t full = G - G % kChunk;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* src = x + t * K + g * G;
      float* dst = xperm + t * K + g * G;
      float s = 0.f;
      for (int64_t c = 0; c < full; c += kChunk) {
        for (int i = 0; i < kW; ++i) {
          dst[c + i] = src[c + 2 * i] - 16.f * src[c + 2 * i + 1];
          dst[c + kW + i] = src[c + 2 * i + 1];
        }
      }
      for (int64_t k = full; k < G; ++k) dst[k] = src[k];
      for (int64_t k = 0; k < G; ++k) s += src[k];
      xsum[t * ng + g] = s;
    }
  }
}

// Dot products of the last G % kChunk weights of group g (kept in natural order) with TB tokens.
template <int TB>
static void int4_group_tail(const float* xp, int64_t K, const uint8_t* p, int64_t kb, int64_t full, int64_t G,
                            float* dots) {
  for (int t = 0; t < TB; ++t) {
    float d = 0.f;
    for (int64_t k = kb + full; k < kb + G; k += 2) {
      const uint8_t b = p[k / 2];
      d += float(b >> 4) * xp[t * K + k] + float(b & 15) * xp[t * K + k + 1];
    }
    dots[t] = d;
  }
}

// y[t][r] = sum_g scale[r][g] * dot_g(q, x) for R rows; the zero-point term is added by the caller.
// scales are float [R][ng] here: converted once per tile of rows, so a group costs one broadcast and FMA.
template <int R, int TB>
static void int4_block(const float* xp, int64_t K, int64_t G, const uint8_t* p, const float* scales, float* y,
                       int64_t ldy) {
  const int64_t ng = K / G;
  const int64_t full = G - G % kChunk;
  const int64_t ldp = K / 2;
  vfloat total[R][TB] = {};
  float tail_total[R][TB] = {};
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t kb = g * G;
    const uint8_t* pg = p + kb / 2;
    const float* xg = xp + kb;
    vfloat acc[R][TB] = {};
    // kAhead bytes ahead of each row's group: rows are contiguous, so this runs ahead of the whole stream
    // (the block's next groups, then the next blocks' rows) far enough for memory's latency.
    for (int r = 0; r < R; ++r) __builtin_prefetch(pg + r * ldp + kAhead);
    for (int64_t c = 0; c < full; c += kChunk) {
      vfloat xh[TB], xb[TB];  // paired with the high nibbles and with the whole bytes
      for (int t = 0; t < TB; ++t) {
        xh[t] = load_f(xg + t * K + c);
        xb[t] = load_f(xg + t * K + c + kW);
      }
      for (int r = 0; r < R; ++r) {
        vfloat hi, byte;
        load_hi_and_byte_as_f(pg + r * ldp + c / 2, hi, byte);
        for (int t = 0; t < TB; ++t) {
          acc[r][t] += hi * xh[t];  // two statements: two FMAs, not a mul, an FMA and an add
          acc[r][t] += byte * xb[t];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const vfloat s = splat(scales[r * ng + g]);
      for (int t = 0; t < TB; ++t) total[r][t] += s * acc[r][t];
    }
    if (full < G) {
      for (int r = 0; r < R; ++r) {
        float dots[TB];
        int4_group_tail<TB>(xp, K, p + r * ldp, kb, full, G, dots);
        for (int t = 0; t < TB; ++t) tail_total[r][t] += scales[r * ng + g] * dots[t];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) y[t * ldy + r] = hsum(total[r][t]) + tail_total[r][t];
}

template <typename S>
void int4_gemv_rows(const float* xperm, const float* xsum, int64_t T, int64_t K, int64_t G,
                    const uint8_t* packed, const S* scales, const S* zeros, float* y, int64_t N, int64_t n0,
                    int64_t n1) {
  constexpr int64_t kTile = 8;
  const int64_t ng = K / G;
  std::vector<float> scale_f(kTile * ng), scale_zero_f(kTile * ng);
  for (int64_t nb = n0; nb < n1; nb += kTile) {
    const int64_t nb1 = nb + kTile < n1 ? nb + kTile : n1;
    for (int64_t i = 0; i < (nb1 - nb) * ng; ++i) {
      scale_f[i] = float(scales[nb * ng + i]);
      scale_zero_f[i] = scale_f[i] * float(zeros[nb * ng + i]);
    }
    gemv_tiles<4, 2, 1, 1>(T, nb, nb1, [&](auto R, auto TB, int64_t t, int64_t n) {
      int4_block<R, TB>(xperm + t * K, K, G, packed + n * (K / 2), scale_f.data() + (n - nb) * ng, y + t * N + n, N);
    });
    // The zero points' term: - sum_g scale_g * zero_g * xsum_g.
    for (int64_t n = nb; n < nb1; ++n)
      for (int64_t t = 0; t < T; ++t) y[t * N + n] -= dot(scale_zero_f.data() + (n - nb) * ng, xsum + t * ng, ng);
  }
}

template void int4_gemv_rows<float>(const float*, const float*, int64_t, int64_t, int64_t, const uint8_t*,
                                    const float*, const float*, float*, int64_t, int64_t, int64_t);
template void int4_gemv_rows<c10::BFloat16>(const float*, const float*, int64_t, int64_t, int64_t,
                                            const uint8_t*, const c10::BFloat16*, const c10::BFloat16*,
                                            float*, int64_t, int64_t, int64_t);
template void int4_gemv_rows<c10::Half>(const float*, const float*, int64_t, int64_t, int64_t, const uint8_t*,
                                        const c10::Half*, const c10::Half*, float*, int64_t, int64_t, int64_t);

}  // namespace llama_offload
