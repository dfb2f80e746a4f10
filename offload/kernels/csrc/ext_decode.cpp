// decode_block: one new token per sequence through a whole pre-norm attention + SwiGLU block in one call,
// where the unfused block costs some sixty operator calls; and linear, any CPU weight format as one call.
#include <ATen/ops/empty.h>

#include <vector>

#include "block_step.h"
#include "ext.h"
#include "linears.h"

namespace llama_offload {

void check_rope_row(const at::Tensor& cos, const at::Tensor& sin, int64_t hd, const char* what) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == hd / 2 && sin.numel() == hd / 2,
              what, ": cos and sin must be float32 [", hd / 2, "]");
}

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, double eps,
                        at::TensorList wq, at::TensorList wk, at::TensorList wv, at::TensorList wo, at::TensorList w1,
                        at::TensorList w3, at::TensorList w2, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t pos, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, int64_t window) {
  check_activations("decode_block", x);
  const int64_t B = x.size(0), D = x.size(1);
  check_caches(k_cache, v_cache, B, pos, "decode_block");
  const int64_t hd = k_cache.size(3);
  const BlockWeights w = block_weights(attn_norm, ffn_norm, wq, wk, wv, wo, w1, w3, w2, D, n_heads, k_cache.size(1),
                                       hd, "decode_block");
  check_rope_row(cos, sin, hd, "decode_block");
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(B * D);
  load_row(dtype, xc.data_ptr(), B * D, xf.data());
  block_step(w, dtype, xf.data(), sequences_at(B, pos, window, cos.data_ptr<float>(), sin.data_ptr<float>()), D,
             k_cache, v_cache, n_heads, float(eps));
  at::Tensor out = at::empty({B, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  store_row(dtype, xf.data(), B * D, out.data_ptr());
  return out;
}

at::Tensor linear(const at::Tensor& x, at::TensorList weight) {
  check_activations("linear", x);
  const Linear l = linear_from(weight, "linear");
  TORCH_CHECK(x.size(1) == l.K, "linear: x has ", x.size(1), " features but the weight has ", l.K);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), l.N}, xf.options());
  run_linears({&l}, xf.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y.to(x.scalar_type());
}

}  // namespace llama_offload
