// The small steps of one decode step of a pre-norm attention + SwiGLU block, on float32 rows; each is one
// pass over a few KB, fused so that none costs an operator call of its own.
#pragma once

#include <cstdint>

namespace llama_offload {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], for D values.
void rms_norm_row(const float* x, const float* w, int64_t D, float eps, float* out);

// Rotates interleaved pairs (v[2i], v[2i+1]) of each of n_heads heads of head_dim values by cos[i], sin[i].
void rope_interleaved(float* v, int64_t n_heads, int64_t head_dim, const float* cos, const float* sin);

// out[i] = silu(gate[i]) * up[i].
void silu_mul_row(const float* gate, const float* up, int64_t n, float* out);

// One query head q [head_dim] against keys and values [positions][head_dim] of storage type L::T
// (LoadF32 / LoadBF16 / LoadF16) at the n slots given, in their order: out = softmax(q.k * scale) @ v.
// scores: n floats.
template <typename L>
void attend_one_query(const float* q, const typename L::T* keys, const typename L::T* values, const int64_t* slots,
                      int64_t n, int64_t head_dim, float scale, float* scores, float* out);

}  // namespace llama_offload
