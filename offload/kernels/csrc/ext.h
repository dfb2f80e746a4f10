// Tensor-level entry points: check dtype, shape and device, then run the kernels over output rows.
#pragma once

#include <ATen/core/Tensor.h>

namespace llama_offload {

// x [T, K] (float32, bfloat16 or float16) @ int8 qweight [N, K]^T * scale [N] -> [T, N] in x's dtype.
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale);

// x [T, K] @ int4 weight (packed uint8 [N, K/2], scales and zeros [N, K/G] of one float dtype) -> [T, N].
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros);

// Activation checks shared by both entry points: a 2-D CPU tensor of a supported float dtype.
void check_activations(const char* op, const at::Tensor& x);

// Rows per parallel task, so each task reads at least a few hundred KB of weights.
int64_t row_grain(int64_t bytes_per_row);

}  // namespace llama_offload
