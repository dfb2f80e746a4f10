// A linear layer in any CPU weight format, read from the tensors Python passes, and the one routine that
// runs several of them (sharing their input) as a single parallel pass over all their output rows.
//   dense: [weight float32 | bfloat16 | float16 [N, K]]
//   int8:  [qweight int8 [N, K], scale float [N]]
//   int4:  [packed uint8 [N, K/2], scales [N, K/G], zeros [N, K/G]]  (the formats of int8_format.py and
//          int4_format.py); any of them may be followed by a bias [N].
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels.h"

namespace llama_offload {

enum class LinearKind { kDense, kInt8, kInt4 };

struct Linear {
  LinearKind kind;
  DenseType dense;  // kDense only
  int64_t N, K, G;  // G: the int4 group size
  const void* weight;  // the dense weight, the int8 qweight or the int4 packed bytes
  at::Tensor scale;  // int8: float32 [N]; int4: scales [N, K/G]
  at::Tensor zeros;  // int4: [N, K/G], scale's dtype
  at::Tensor bias;  // float32 [N], or undefined
};

// Checks the tensors (shapes, dtypes, CPU, contiguity) and names `what` in every error.
Linear linear_from(at::TensorList tensors, const char* what);

// y [T][sum of their N] = x [T][K] (float32) through each linear, their outputs side by side.
void run_linears(const std::vector<const Linear*>& linears, const float* x, int64_t T, float* y);

}  // namespace llama_offload
