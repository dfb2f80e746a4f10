// One decode step of a pre-norm attention + SwiGLU block on float32 rows: the body that decode_block (one
// block a call) and DecodeStack (all of a model's blocks in one call) both run.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "linears.h"
#include "step_rows.h"

namespace llama_offload {

// A block's weights, checked once: the norms as float32 rows, the seven linears (linears.h).
struct BlockWeights {
  std::vector<float> attn_norm, ffn_norm;
  Linear q, k, v, o, gate, up, down;
};

// Checks the tensors against dim D and the heads, naming `what` in every error, and gathers them.
BlockWeights block_weights(const at::Tensor& attn_norm, const at::Tensor& ffn_norm, at::TensorList wq,
                           at::TensorList wk, at::TensorList wv, at::TensorList wo, at::TensorList w1,
                           at::TensorList w3, at::TensorList w2, int64_t D, int64_t n_heads, int64_t n_kv, int64_t hd,
                           const char* what);

// Checks a layer's caches [B, kv_heads, positions, head_dim] for a step at pos.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t B, int64_t pos, const char* what);

// x [rows][D]: the residual stream (values of `dtype`, held as floats), replaced by the block's output. Each
// row's k and v go to the caches where `rows` says, and it attends the slots `rows` gives it (step_rows.h).
void block_step(const BlockWeights& w, at::ScalarType dtype, float* x, const StepRows& rows, int64_t D,
                const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t n_heads, float eps);

// n values of `type` (float32, bfloat16 or float16) as floats, and back (rounding as a tensor conversion does).
void load_row(at::ScalarType type, const void* src, int64_t n, float* dst);
void store_row(at::ScalarType type, const float* src, int64_t n, void* dst);

}  // namespace llama_offload
