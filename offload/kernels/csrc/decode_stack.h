// DecodeStack: every block of a model as one decode step, one call per token (torch.classes.llama_offload).
// Per block the Python-level step cost ~10 us beside the kernel's 80-100 us on the SmolLM2-135M shape at
// int4, a third of a millisecond a token over 30 blocks; the stack gathers the blocks' weights once and runs
// them one after another in C++.
#pragma once

#include <torch/custom_class.h>

#include <vector>

#include "block_step.h"

namespace llama_offload {

class DecodeStack : public torch::CustomClassHolder {
 public:
  // tensors: per block its attention and ffn norm weights, then wq, wk, wv, wo, w1, w3, w2 as tensor lists
  // (linears.h), flattened; counts: per block the seven lists' lengths. Every block shares dim, the heads,
  // the window (0: none) and eps.
  DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> counts, int64_t dim, int64_t n_heads,
              int64_t n_kv, int64_t head_dim, int64_t window, double eps);

  // x [B, dim] (one new token per sequence at pos) through every block, block i's keys and values written to
  // k_caches[i], v_caches[i] at pos; cos, sin float32 [head_dim / 2] at pos. Returns [B, dim] in x's dtype.
  at::Tensor step(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, int64_t pos,
                  at::Tensor cos, at::Tensor sin);

  // One sequence's token tree x [T, dim] (cache row 0) through every block: token t's key and value go to
  // slot start + t, it attends the slots visible[t] (bool [T, start + T]) marks, RoPE'd at cos, sin float32
  // [T, head_dim / 2]. Each row is bit for bit the one-token step() of that token after its ancestors.
  at::Tensor tree_step(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                       int64_t start, at::Tensor cos, at::Tensor sin, at::Tensor visible);

  int64_t blocks() const { return int64_t(blocks_.size()); }

 private:
  std::vector<at::Tensor> tensors_;  // held: the gathered linears point into them
  std::vector<BlockWeights> blocks_;
  int64_t dim_, n_heads_, n_kv_, head_dim_, window_;
  float eps_;
};

}  // namespace llama_offload
