// The CPU kernels: plain pointers in, float32 out, one call per contiguous range of output rows.
#pragma once

#include <cstdint>

namespace llama_offload {

// Passes of up to this many tokens (a token tree's verification) give each token's row bit for bit what a
// one-token call gives: every kernel then sums each (row, token) in the one-token order. Longer passes
// (prefill) take blocks of rows that share activation loads (dense, int8: faster there) and int4's float
// path (x as it is, not rounded to int8).
constexpr int64_t kRowInvariantTokens = 8;

// y[t][n] = scale[n] * sum_k q[n][k] * x[t][k], for n in [n0, n1); x is [T][K], q is [N][K], y is [T][N].
void int8_gemv_rows(const float* x, int64_t T, int64_t K, const int8_t* q, const float* scale, float* y,
                    int64_t N, int64_t n0, int64_t n1);

// Activations in the layout the int4 kernel reads: per group, each full chunk of 2*kW values x becomes
// (x_even - 16 * x_odd, x_odd), matching (high nibbles, whole bytes); the group's remainder stays as is.
// xsum[t][g] = sum of group g.
// x is [T][K]; xperm is [T][K]; xsum is [T][K / G].
void int4_permute_activations(const float* x, int64_t T, int64_t K, int64_t G, float* xperm, float* xsum);

// y[t][n] = sum_g scale[n][g] * sum_{k in g} (q[n][k] - zero[n][g]) * x[t][k], for n in [n0, n1).
// packed is [N][K / 2] with q[2j] in the high nibble of byte j and q[2j + 1] in its low nibble;
// scales and zeros are [N][K / G] of type S (float, c10::BFloat16 or c10::Half).
template <typename S>
void int4_gemv_rows(const float* xperm, const float* xsum, int64_t T, int64_t K, int64_t G,
                    const uint8_t* packed, const S* scales, const S* zeros, float* y, int64_t N, int64_t n0,
                    int64_t n1);

// int4 weights against x rounded to int8 per token (gemv_int4_vnni.cpp says how). int4_vnni_takes: at most
// kRowInvariantTokens tokens, the avx512_vnni path is on, and K (a multiple of 64) and G (a multiple of 8
// that divides 128, or a multiple of 128) fit it. int4_vnni_activations: x [T][K] -> xq int8 [T][K] (the
// kernel's order), x8scale [T][K / 8] (each 8 values' scale), xsum [T][K / G] (each group's sum of the
// rounded values). int4_vnni_gemv_rows: y[t][n] for n in [n0, n1) (y is [T][N]), scales and zeros as
// int4_gemv_rows takes them.
bool int4_vnni_takes(int64_t T, int64_t K, int64_t G);
void int4_vnni_activations(const float* x, int64_t T, int64_t K, int64_t G, int8_t* xq, float* x8scale,
                           float* xsum);
template <typename S>
void int4_vnni_gemv_rows(const int8_t* xq, const float* x8scale, const float* xsum, int64_t T, int64_t K,
                         int64_t G, const uint8_t* packed, const S* scales, const S* zeros, float* y, int64_t N,
                         int64_t n0, int64_t n1);

// y[t][n] = sum_k w[n][k] * x[t][k] for n in [n0, n1), accumulated in float32; w is [N][K] of `type`.
// x_bf16: x rounded to bfloat16 (raw bits, [T][K]) or null; bfloat16 weights then take the AVX512_BF16
// dot products, reading it instead of x (made only where bf16_dot_products(): the CPU has them, and the
// avx512_bf16 path is on).
enum class DenseType { kF32, kBF16, kF16 };
bool bf16_dot_products();
void dense_gemv_rows(DenseType type, const float* x, const uint16_t* x_bf16, int64_t T, int64_t K, const void* w,
                     float* y, int64_t N, int64_t n0, int64_t n1);

int vector_width();

}  // namespace llama_offload
