// decode_block: one new token per sequence through a whole pre-norm attention + SwiGLU block in one call,
// where the unfused block costs some sixty operator calls; and linear, any CPU weight format as one call.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "decode_steps.h"
#include "ext.h"
#include "linears.h"
#include "vec.h"
#include "work_sharing.h"

namespace llama_offload {

namespace {

constexpr int64_t kAttentionGrain = 1 << 16;  // multiply-adds of q.k and p.v per parallel task, at least

// Writes n floats to storage of `type` (the KV cache's or x's dtype), rounding as a tensor conversion does.
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

// n values of `type` (float32, bfloat16 or float16) as floats.
void load_row(at::ScalarType type, const void* src, int64_t n, float* dst) {
  if (type == at::kFloat) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (type == at::kBFloat16) {
    const auto* s = static_cast<const c10::BFloat16*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = float(s[i]);
  } else {
    const auto* s = static_cast<const c10::Half*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = float(s[i]);
  }
}

// out = x + delta in the residual stream's dtype, as torch adds two tensors of it: delta rounded to the
// dtype, the sum rounded again. x and out are that dtype's values held as floats.
void residual_add(at::ScalarType type, const float* x, const float* delta, int64_t n, float* out) {
  if (type == at::kFloat) {
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] + delta[i];
  } else if (type == at::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) out[i] = float(c10::BFloat16(x[i] + float(c10::BFloat16(delta[i]))));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = float(c10::Half(x[i] + float(c10::Half(delta[i]))));
  }
}

// The calling thread's float32 scratch of at least n values, kept between calls: a decode step needs a
// dozen small rows, which as tensors cost an allocation each.
float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (int64_t(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
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

  TORCH_CHECK(attn_norm.is_contiguous() && ffn_norm.is_contiguous() && at::isFloatingType(attn_norm.scalar_type()) &&
                  at::isFloatingType(ffn_norm.scalar_type()),
              "decode_block: norm weights must be contiguous float tensors");
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor xc = x.contiguous();
  const int64_t qkv_width = (n_heads + 2 * n_kv) * hd, F = gate.N;
  // The step's rows, all float32 (per sequence: q heads, then k heads, then v heads in qkv).
  float* const xf = scratch(2 * D + B * (5 * D + qkv_width + n_heads * hd + 3 * F));
  float *const norm1 = xf + B * D, *const norm2 = norm1 + D, *const normed = norm2 + D, *const qkv = normed + B * D;
  float *const att = qkv + B * qkv_width, *const attended = att + B * n_heads * hd, *const h = attended + B * D;
  float *const gate_up = h + B * D, *const act = gate_up + B * 2 * F, *const down_out = act + B * F;
  load_row(dtype, xc.data_ptr(), B * D, xf);
  load_row(attn_norm.scalar_type(), attn_norm.data_ptr(), D, norm1);
  load_row(ffn_norm.scalar_type(), ffn_norm.data_ptr(), D, norm2);

  for (int64_t b = 0; b < B; ++b) rms_norm_row(xf + b * D, norm1, D, float(eps), normed + b * D);
  run_linears({&q, &k, &v}, normed, B, qkv);
  const int64_t S = k_cache.size(2);
  const size_t elem = k_cache.element_size();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv + b * qkv_width;
    rope_interleaved(row, n_heads + n_kv, hd, cos.data_ptr<float>(), sin.data_ptr<float>());
    for (int64_t i = 0; i < n_kv; ++i) {
      const int64_t at_pos = ((b * n_kv + i) * S + pos) * hd;
      store_row(k_cache.scalar_type(), row + (n_heads + i) * hd, hd,
                static_cast<char*>(k_cache.data_ptr()) + at_pos * elem);
      store_row(v_cache.scalar_type(), row + (n_heads + n_kv + i) * hd, hd,
                static_cast<char*>(v_cache.data_ptr()) + at_pos * elem);
    }
  }
  const int64_t end = pos + 1, lo = window > 0 && end > window ? end - window : 0;
  switch (k_cache.scalar_type()) {
    case at::kFloat: attend_all<LoadF32>(qkv, k_cache, v_cache, B, n_heads, lo, end, att); break;
    case at::kBFloat16: attend_all<LoadBF16>(qkv, k_cache, v_cache, B, n_heads, lo, end, att); break;
    default: attend_all<LoadF16>(qkv, k_cache, v_cache, B, n_heads, lo, end, att);
  }
  run_linears({&o}, att, B, attended);
  residual_add(dtype, xf, attended, B * D, h);  // the residual stream stays in x's dtype

  for (int64_t b = 0; b < B; ++b) rms_norm_row(h + b * D, norm2, D, float(eps), normed + b * D);
  run_linears({&gate, &up}, normed, B, gate_up);
  for (int64_t b = 0; b < B; ++b) silu_mul_row(gate_up + b * 2 * F, gate_up + b * 2 * F + F, F, act + b * F);
  run_linears({&down}, act, B, down_out);
  residual_add(dtype, h, down_out, B * D, xf);
  at::Tensor out = at::empty({B, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  store_row(dtype, xf, B * D, out.data_ptr());
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
