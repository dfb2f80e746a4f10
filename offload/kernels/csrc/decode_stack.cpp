#include "decode_stack.h"

#include <ATen/ops/empty.h>

#include <string>

#include "ext.h"

namespace llama_offload {

DecodeStack::DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> counts, int64_t dim, int64_t n_heads,
                         int64_t n_kv, int64_t head_dim, int64_t window, double eps)
    : tensors_(std::move(tensors)), dim_(dim), n_heads_(n_heads), n_kv_(n_kv), head_dim_(head_dim),
      window_(window), eps_(float(eps)) {
  TORCH_CHECK(counts.size() % 7 == 0, "DecodeStack: counts must hold seven lengths per block, got ", counts.size());
  const at::TensorList all(tensors_);
  size_t at_tensor = 0;
  for (size_t b = 0; b < counts.size() / 7; ++b) {
    TORCH_CHECK(at_tensor + 2 <= all.size(), "DecodeStack: block ", b, " has no norms");
    const at::Tensor &attn_norm = all[at_tensor], &ffn_norm = all[at_tensor + 1];
    at_tensor += 2;
    at::TensorList lists[7];
    for (int i = 0; i < 7; ++i) {
      const int64_t n = counts[b * 7 + i];
      TORCH_CHECK(n > 0 && at_tensor + n <= all.size(), "DecodeStack: block ", b, " lacks tensors");
      lists[i] = all.slice(at_tensor, n);
      at_tensor += n;
    }
    const std::string what = "DecodeStack block " + std::to_string(b);
    blocks_.push_back(block_weights(attn_norm, ffn_norm, lists[0], lists[1], lists[2], lists[3], lists[4], lists[5],
                                    lists[6], dim, n_heads, n_kv, head_dim, what.c_str()));
  }
  TORCH_CHECK(at_tensor == all.size(), "DecodeStack: ", all.size() - at_tensor, " tensors left over");
}

at::Tensor DecodeStack::step(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                             int64_t pos, at::Tensor cos, at::Tensor sin) {
  check_activations("DecodeStack.step", x);
  const int64_t B = x.size(0);
  TORCH_CHECK(x.size(1) == dim_, "DecodeStack.step: x has ", x.size(1), " features, the blocks ", dim_);
  TORCH_CHECK(k_caches.size() == blocks_.size() && v_caches.size() == blocks_.size(), "DecodeStack.step: ",
              k_caches.size(), " and ", v_caches.size(), " caches for ", blocks_.size(), " blocks");
  for (size_t i = 0; i < blocks_.size(); ++i) {
    check_caches(k_caches[i], v_caches[i], B, pos, "DecodeStack.step");
    TORCH_CHECK(k_caches[i].size(1) == n_kv_ && k_caches[i].size(3) == head_dim_, "DecodeStack.step: cache ", i,
                " is ", k_caches[i].sizes(), ", the blocks have ", n_kv_, " kv heads of ", head_dim_);
  }
  check_rope_row(cos, sin, head_dim_, "DecodeStack.step");
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(B * dim_);
  load_row(dtype, xc.data_ptr(), B * dim_, xf.data());
  const StepRows rows = sequences_at(B, pos, window_, cos.data_ptr<float>(), sin.data_ptr<float>());
  for (size_t i = 0; i < blocks_.size(); ++i)
    block_step(blocks_[i], dtype, xf.data(), rows, dim_, k_caches[i], v_caches[i], n_heads_, eps_);
  at::Tensor out = at::empty({B, dim_}, x.options().memory_format(at::MemoryFormat::Contiguous));
  store_row(dtype, xf.data(), B * dim_, out.data_ptr());
  return out;
}

at::Tensor DecodeStack::tree_step(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                                  int64_t start, at::Tensor cos, at::Tensor sin, at::Tensor visible) {
  check_activations("DecodeStack.tree_step", x);
  const int64_t T = x.size(0), half = head_dim_ / 2;
  TORCH_CHECK(x.size(1) == dim_, "DecodeStack.tree_step: x has ", x.size(1), " features, the blocks ", dim_);
  TORCH_CHECK(k_caches.size() == blocks_.size() && v_caches.size() == blocks_.size(), "DecodeStack.tree_step: ",
              k_caches.size(), " and ", v_caches.size(), " caches for ", blocks_.size(), " blocks");
  for (size_t i = 0; i < blocks_.size(); ++i) {
    check_caches(k_caches[i], v_caches[i], k_caches[i].size(0), start + T - 1, "DecodeStack.tree_step");
    TORCH_CHECK(k_caches[i].size(1) == n_kv_ && k_caches[i].size(3) == head_dim_, "DecodeStack.tree_step: cache ",
                i, " is ", k_caches[i].sizes(), ", the blocks have ", n_kv_, " kv heads of ", head_dim_);
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == half &&
                  sin.sizes() == cos.sizes(),
              "DecodeStack.tree_step: cos and sin must be contiguous float32 [", T, ", ", half, "]");
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.is_contiguous() && visible.dim() == 2 &&
                  visible.size(0) == T && visible.size(1) == start + T,
              "DecodeStack.tree_step: visible must be a contiguous bool [", T, ", ", start + T, "]");
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(T * dim_);
  load_row(dtype, xc.data_ptr(), T * dim_, xf.data());
  const StepRows rows = tree_rows(T, start, half, cos.data_ptr<float>(), sin.data_ptr<float>(),
                                  visible.data_ptr<bool>());
  for (size_t i = 0; i < blocks_.size(); ++i)
    block_step(blocks_[i], dtype, xf.data(), rows, dim_, k_caches[i], v_caches[i], n_heads_, eps_);
  at::Tensor out = at::empty({T, dim_}, x.options().memory_format(at::MemoryFormat::Contiguous));
  store_row(dtype, xf.data(), T * dim_, out.data_ptr());
  return out;
}

}  // namespace llama_offload
