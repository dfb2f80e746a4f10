// decode_block: one new token per sequence through a whole pre-norm attention + SwiGLU block in one call,
// where the unfused block costs some sixty operator calls; and linear, any CPU weight format as one call.
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "decode_steps.h"
#include "ext.h"
#include "linears.h"
#include "vec.h"
#include "work_sharing.h"

namespace llama_offload {

namespace {

constexpr int64_t kAttentionGrain = 1 << 16;  // multiply-adds of q.k and p.v per parallel task, at least

// Writes n floats to storage of `type` (the KV cache's dtype), rounding as a tensor conversion does.
void store_row(at::ScalarType type, const float* src, int64_t n, void* dst) {
  if (type == at::kFloat) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (type == at::kBFloat16) {
    auto* d = static_cast<c10::BFloat16*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(src[i]);
  } else {
    auto* d = static_cast<c10::Half*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i]);
  }
}

template <typename L>
void attend_all(const float* q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t B, int64_t n_heads,
                int64_t lo, int64_t end, float* out) {
  const int64_t n_kv = k_cache.size(1), S = k_cache.size(2), hd = k_cache.size(3), rep = n_heads / n_kv;
  const auto* keys = static_cast<const typename L::T*>(k_cache.data_ptr());
  const auto* values = static_cast<const typename L::T*>(v_cache.data_ptr());
  const float scale = 1.f / std::sqrt(float(hd));
  // Heads per chunk: a short context is a few microseconds of work, less than waking a second thread.
  const int64_t per_chunk = std::max<int64_t>(1, kAttentionGrain / std::max<int64_t>(1, (end - lo) * hd));
  const int64_t n = B * n_heads;
  share_chunks((n + per_chunk - 1) / per_chunk, [&](int64_t c) {
    std::vector<float> scores(end - lo);
    for (int64_t i = c * per_chunk; i < std::min(n, (c + 1) * per_chunk); ++i) {
      const int64_t b = i / n_heads, h = i % n_heads;
      const int64_t kv_row = (b * n_kv + h / rep) * S * hd;  // query heads h*rep.. share kv head h / rep
      attend_one_query<L>(q + b * (n_heads + 2 * n_kv) * hd + h * hd, keys + kv_row, values + kv_row, lo, end, hd,
                          scale, scores.data(), out + (b * n_heads + h) * hd);
    }
  });
}

void check_cache(const at::Tensor& c, int64_t B, int64_t pos, const char* what) {
  TORCH_CHECK(c.device().is_cpu() && c.is_contiguous() && c.dim() == 4, what,
              " must be a contiguous CPU tensor [batch, kv_heads, positions, head_dim], got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kBFloat16 || c.scalar_type() == at::kHalf,
              what, " must be float32, bfloat16 or float16");
  TORCH_CHECK(c.size(0) == B, what, " holds ", c.size(0), " sequences, x ", B);
  TORCH_CHECK(pos >= 0 && pos < c.size(2), "decode_block: position ", pos, " is outside the cache of ", c.size(2));
}

}  // namespace

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, double eps,
                        at::TensorList wq, at::TensorList wk, at::TensorList wv, at::TensorList wo, at::TensorList w1,
                        at::TensorList w3, at::TensorList w2, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t pos, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, int64_t window) {
  check_activations("decode_block", x);
  const int64_t B = x.size(0), D = x.size(1);
  check_cache(k_cache, B, pos, "decode_block: k_cache");
  check_cache(v_cache, B, pos, "decode_block: v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "decode_block: k_cache and v_cache differ");
  const int64_t n_kv = k_cache.size(1), hd = k_cache.size(3);
  const Linear q = linear_from(wq, "decode_block: wq"), k = linear_from(wk, "decode_block: wk"),
               v = linear_from(wv, "decode_block: wv"), o = linear_from(wo, "decode_block: wo"),
               gate = linear_from(w1, "decode_block: w1"), up = linear_from(w3, "decode_block: w3"),
               down = linear_from(w2, "decode_block: w2");
  TORCH_CHECK(n_heads > 0 && n_heads % n_kv == 0 && hd % 2 == 0, "decode_block: ", n_heads, " heads over ", n_kv,
              " kv heads of ", hd);
  TORCH_CHECK(q.K == D && q.N == n_heads * hd && k.N == n_kv * hd && v.N == n_kv * hd && o.K == q.N && o.N == D,
              "decode_block: attention weights do not fit dim ", D, ", ", n_heads, "/", n_kv, " heads of ", hd);
  TORCH_CHECK(gate.K == D && up.N == gate.N && down.K == gate.N && down.N == D,
              "decode_block: feed-forward weights do not fit dim ", D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == hd / 2 && sin.numel() == hd / 2,
              "decode_block: cos and sin must be float32 [", hd / 2, "]");
  TORCH_CHECK(attn_norm.numel() == D && ffn_norm.numel() == D, "decode_block: norm weights must be [", D, "]");

  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor norm1 = attn_norm.to(at::kFloat).contiguous(), norm2 = ffn_norm.to(at::kFloat).contiguous();
  at::Tensor normed = at::empty({B, D}, f32);
  for (int64_t b = 0; b < B; ++b)
    rms_norm_row(xf.data_ptr<float>() + b * D, norm1.data_ptr<float>(), D, float(eps), normed.data_ptr<float>() + b * D);

  const int64_t qkv_width = (n_heads + 2 * n_kv) * hd;
  at::Tensor qkv = at::empty({B, qkv_width}, f32);  // per sequence: q heads, then k heads, then v heads
  run_linears({&q, &k, &v}, normed.data_ptr<float>(), B, qkv.data_ptr<float>());
  const int64_t S = k_cache.size(2);
  const size_t elem = k_cache.element_size();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv.data_ptr<float>() + b * qkv_width;
    rope_interleaved(row, n_heads + n_kv, hd, cos.data_ptr<float>(), sin.data_ptr<float>());
    for (int64_t h = 0; h < n_kv; ++h) {
      const int64_t at_pos = ((b * n_kv + h) * S + pos) * hd;
      store_row(k_cache.scalar_type(), row + (n_heads + h) * hd, hd, static_cast<char*>(k_cache.data_ptr()) + at_pos * elem);
      store_row(v_cache.scalar_type(), row + (n_heads + n_kv + h) * hd, hd,
                static_cast<char*>(v_cache.data_ptr()) + at_pos * elem);
    }
  }
  const int64_t end = pos + 1, lo = window > 0 && end > window ? end - window : 0;
  at::Tensor att = at::empty({B, n_heads * hd}, f32);
  switch (k_cache.scalar_type()) {
    case at::kFloat: attend_all<LoadF32>(qkv.data_ptr<float>(), k_cache, v_cache, B, n_heads, lo, end, att.data_ptr<float>()); break;
    case at::kBFloat16: attend_all<LoadBF16>(qkv.data_ptr<float>(), k_cache, v_cache, B, n_heads, lo, end, att.data_ptr<float>()); break;
    default: attend_all<LoadF16>(qkv.data_ptr<float>(), k_cache, v_cache, B, n_heads, lo, end, att.data_ptr<float>());
  }
  at::Tensor attended = at::empty({B, D}, f32);
  run_linears({&o}, att.data_ptr<float>(), B, attended.data_ptr<float>());
  const at::Tensor h = at::add(x, attended.to(x.scalar_type()));  // the residual stream stays in x's dtype
  const at::Tensor hf = h.to(at::kFloat).contiguous();

  for (int64_t b = 0; b < B; ++b)
    rms_norm_row(hf.data_ptr<float>() + b * D, norm2.data_ptr<float>(), D, float(eps), normed.data_ptr<float>() + b * D);
  const int64_t F = gate.N;
  at::Tensor gate_up = at::empty({B, 2 * F}, f32);
  run_linears({&gate, &up}, normed.data_ptr<float>(), B, gate_up.data_ptr<float>());
  at::Tensor act = at::empty({B, F}, f32);
  for (int64_t b = 0; b < B; ++b) {
    const float* gu = gate_up.data_ptr<float>() + b * 2 * F;
    silu_mul_row(gu, gu + F, F, act.data_ptr<float>() + b * F);
  }
  at::Tensor down_out = at::empty({B, D}, f32);
  run_linears({&down}, act.data_ptr<float>(), B, down_out.data_ptr<float>());
  return at::add(h, down_out.to(x.scalar_type()));
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
