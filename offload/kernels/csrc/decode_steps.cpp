#include "decode_steps.h"

#include <cmath>

#include "vec.h"

namespace llama_offload {

void rms_norm_row(const float* x, const float* w, int64_t D, float eps, float* out) {
  const float inv = 1.f / std::sqrt(dot(x, x, D) / float(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * inv * w[i];
}

void rope_interleaved(float* v, int64_t n_heads, int64_t head_dim, const float* cos, const float* sin) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* p = v + h * head_dim;
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float x0 = p[2 * i], x1 = p[2 * i + 1];
      p[2 * i] = x0 * cos[i] - x1 * sin[i];
      p[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
    }
  }
}

void silu_mul_row(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

template <typename L>
static float dot_row(const float* q, const typename L::T* k, int64_t n) {
  vfloat acc = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += load_f(q + i) * L::load(k + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += q[i] * L::one(k + i);
  return s;
}

template <typename L>
void attend_one_query(const float* q, const typename L::T* keys, const typename L::T* values, const int64_t* slots,
                      int64_t n, int64_t head_dim, float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = scale * dot_row<L>(q, keys + slots[j] * head_dim, head_dim);
    top = scores[j] > top ? scores[j] : top;
  }
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) total += scores[j] = std::exp(scores[j] - top);
  for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = scores[j] / total;
    const typename L::T* v = values + slots[j] * head_dim;
    int64_t d = 0;
    for (; d + kW <= head_dim; d += kW) {
      vfloat o = load_f(out + d) + splat(p) * L::load(v + d);
      std::memcpy(out + d, &o, sizeof(o));
    }
    for (; d < head_dim; ++d) out[d] += p * L::one(v + d);
  }
}

template void attend_one_query<LoadF32>(const float*, const float*, const float*, const int64_t*, int64_t, int64_t,
                                        float, float*, float*);
template void attend_one_query<LoadBF16>(const float*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                                         int64_t, float, float*, float*);
template void attend_one_query<LoadF16>(const float*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                                        int64_t, float, float*, float*);

}  // namespace llama_offload
