// Tensor-level entry points: check dtype, shape and device, then run the kernels over output rows.
#pragma once

#include <ATen/core/Tensor.h>

namespace llama_offload {

// x [T, K] (float32, bfloat16 or float16) @ int8 qweight [N, K]^T * scale [N] -> [T, N] in x's dtype.
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale);

// x [T, K] @ int4 weight (packed uint8 [N, K/2], scales and zeros [N, K/G] of one float dtype) -> [T, N].
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros);

// One decode step of a pre-norm attention + SwiGLU block for x [B, D] (one new token per sequence, at
// position pos): RMSNorm, q/k/v, interleaved RoPE (cos, sin: float32 [head_dim / 2]), k and v written to
// the caches [B, kv_heads, positions, head_dim] at pos, attention over positions (pos - window, pos]
// (window 0: all), wo and the residual, RMSNorm, silu(w1) * w3, w2 and the residual. Each weight is a
// tensor list as linears.h describes. Returns the block's output [B, D] in x's dtype.
at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, double eps,
                        at::TensorList wq, at::TensorList wk, at::TensorList wv, at::TensorList wo, at::TensorList w1,
                        at::TensorList w3, at::TensorList w2, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t pos, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, int64_t window);

// x [T, K] through one linear in any CPU format (linears.h) -> [T, N] in x's dtype.
at::Tensor linear(const at::Tensor& x, at::TensorList weight);

// GGUF blocks (raw: uint8 [rows, bytes per row]) written into our formats' tensors, given contiguous and of
// the right shapes: Q8_0 -> qweight int8 [rows, in], scale fp16 [rows, in/32]; Q4_0 -> packed uint8
// [rows, in/2], scales and zeros fp16 [rows, in/32]; Q4_1 -> the same with float32 scales and zeros.
void gguf_q8_0_to_int8(const at::Tensor& raw, const at::Tensor& qweight, const at::Tensor& scale);
void gguf_q4_0_to_int4(const at::Tensor& raw, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros);
void gguf_q4_1_to_int4(const at::Tensor& raw, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros);

// cos and sin of one position: float32 [hd / 2], contiguous.
void check_rope_row(const at::Tensor& cos, const at::Tensor& sin, int64_t hd, const char* what);

// Activation checks shared by both entry points: a 2-D CPU tensor of a supported float dtype.
void check_activations(const char* op, const at::Tensor& x);

// Rows per parallel task, so each task reads at least a few hundred KB of weights.
int64_t row_grain(int64_t bytes_per_row);

}  // namespace llama_offload
