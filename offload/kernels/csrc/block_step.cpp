#include "block_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "decode_steps.h"
#include "vec.h"
#include "work_sharing.h"

namespace llama_offload {

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

namespace {

constexpr int64_t kAttentionGrain = 1 << 16;  // multiply-adds of q.k and p.v per parallel task, at least

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

// Every row's query heads against the slots it sees in its sequence's caches; q rows of qkv_width, out rows of
// n_heads * head_dim.
template <typename L>
void attend_all(const float* q, const at::Tensor& k_cache, const at::Tensor& v_cache, const StepRows& rows,
                int64_t n_heads, float* out) {
  const int64_t n_kv = k_cache.size(1), S = k_cache.size(2), hd = k_cache.size(3), rep = n_heads / n_kv;
  const auto* keys = static_cast<const typename L::T*>(k_cache.data_ptr());
  const auto* values = static_cast<const typename L::T*>(v_cache.data_ptr());
  const float scale = 1.f / std::sqrt(float(hd));
  const int64_t most = rows.most_seen();
  // Heads per chunk: a short context is a few microseconds of work, less than waking a second thread.
  const int64_t per_chunk = std::max<int64_t>(1, kAttentionGrain / std::max<int64_t>(1, most * hd));
  const int64_t n = rows.rows() * n_heads;
  share_chunks((n + per_chunk - 1) / per_chunk, [&](int64_t c) {
    std::vector<float> scores(most);
    for (int64_t i = c * per_chunk; i < std::min(n, (c + 1) * per_chunk); ++i) {
      const int64_t r = i / n_heads, h = i % n_heads;
      const int64_t kv_row = (rows.batch[r] * n_kv + h / rep) * S * hd;  // query heads h*rep.. share kv head h / rep
      const int64_t first = rows.seen_at[r];
      attend_one_query<L>(q + r * (n_heads + 2 * n_kv) * hd + h * hd, keys + kv_row, values + kv_row,
                          rows.seen.data() + first, rows.seen_at[r + 1] - first, hd, scale, scores.data(),
                          out + (r * n_heads + h) * hd);
    }
  });
}

void check_cache(const at::Tensor& c, int64_t B, int64_t pos, const std::string& what) {
  TORCH_CHECK(c.device().is_cpu() && c.is_contiguous() && c.dim() == 4, what,
              " must be a contiguous CPU tensor [batch, kv_heads, positions, head_dim], got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kBFloat16 || c.scalar_type() == at::kHalf,
              what, " must be float32, bfloat16 or float16");
  TORCH_CHECK(c.size(0) == B, what, " holds ", c.size(0), " sequences, x ", B);
  TORCH_CHECK(pos >= 0 && pos < c.size(2), what, ": position ", pos, " is outside the cache of ", c.size(2));
}

}  // namespace

void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t B, int64_t pos, const char* what) {
  check_cache(k_cache, B, pos, std::string(what) + ": k_cache");
  check_cache(v_cache, B, pos, std::string(what) + ": v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(), what,
              ": k_cache and v_cache differ");
}

BlockWeights block_weights(const at::Tensor& attn_norm, const at::Tensor& ffn_norm, at::TensorList wq,
                           at::TensorList wk, at::TensorList wv, at::TensorList wo, at::TensorList w1,
                           at::TensorList w3, at::TensorList w2, int64_t D, int64_t n_heads, int64_t n_kv, int64_t hd,
                           const char* what) {
  const std::string w(what);
  BlockWeights b{{}, {}, linear_from(wq, (w + ": wq").c_str()), linear_from(wk, (w + ": wk").c_str()),
                 linear_from(wv, (w + ": wv").c_str()), linear_from(wo, (w + ": wo").c_str()),
                 linear_from(w1, (w + ": w1").c_str()), linear_from(w3, (w + ": w3").c_str()),
                 linear_from(w2, (w + ": w2").c_str())};
  TORCH_CHECK(n_heads > 0 && n_kv > 0 && n_heads % n_kv == 0 && hd % 2 == 0, what, ": ", n_heads, " heads over ",
              n_kv, " kv heads of ", hd);
  TORCH_CHECK(b.q.K == D && b.q.N == n_heads * hd && b.k.N == n_kv * hd && b.v.N == n_kv * hd && b.o.K == b.q.N &&
                  b.o.N == D && b.k.K == D && b.v.K == D,
              what, ": attention weights do not fit dim ", D, ", ", n_heads, "/", n_kv, " heads of ", hd);
  TORCH_CHECK(b.gate.K == D && b.up.K == D && b.up.N == b.gate.N && b.down.K == b.gate.N && b.down.N == D, what,
              ": feed-forward weights do not fit dim ", D);
  TORCH_CHECK(attn_norm.numel() == D && ffn_norm.numel() == D, what, ": norm weights must be [", D, "]");
  TORCH_CHECK(attn_norm.is_contiguous() && ffn_norm.is_contiguous() && at::isFloatingType(attn_norm.scalar_type()) &&
                  at::isFloatingType(ffn_norm.scalar_type()),
              what, ": norm weights must be contiguous float tensors");
  b.attn_norm.resize(D);
  b.ffn_norm.resize(D);
  load_row(attn_norm.scalar_type(), attn_norm.data_ptr(), D, b.attn_norm.data());
  load_row(ffn_norm.scalar_type(), ffn_norm.data_ptr(), D, b.ffn_norm.data());
  return b;
}

void block_step(const BlockWeights& w, at::ScalarType dtype, float* x, const StepRows& rows, int64_t D,
                const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t n_heads, float eps) {
  const Linear &q = w.q, &k = w.k, &v = w.v, &o = w.o, &gate = w.gate, &up = w.up, &down = w.down;
  const float *const norm1 = w.attn_norm.data(), *const norm2 = w.ffn_norm.data();
  const int64_t B = rows.rows(), n_kv = k_cache.size(1), hd = k_cache.size(3);
  const int64_t qkv_width = (n_heads + 2 * n_kv) * hd, F = gate.N;
  // The step's rows, all float32 (per row: q heads, then k heads, then v heads in qkv).
  float* const normed = scratch(B * (4 * D + qkv_width + n_heads * hd + 3 * F));
  float *const qkv = normed + B * D, *const att = qkv + B * qkv_width, *const attended = att + B * n_heads * hd;
  float *const h = attended + B * D, *const gate_up = h + B * D, *const act = gate_up + B * 2 * F;
  float *const down_out = act + B * F;

  for (int64_t b = 0; b < B; ++b) rms_norm_row(x + b * D, norm1, D, eps, normed + b * D);
  run_linears({&q, &k, &v}, normed, B, qkv);
  const int64_t S = k_cache.size(2);
  const size_t elem = k_cache.element_size();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv + b * qkv_width;
    rope_interleaved(row, n_heads + n_kv, hd, rows.cos[b], rows.sin[b]);
    for (int64_t i = 0; i < n_kv; ++i) {
      const int64_t at_slot = ((rows.batch[b] * n_kv + i) * S + rows.slot[b]) * hd;
      store_row(k_cache.scalar_type(), row + (n_heads + i) * hd, hd,
                static_cast<char*>(k_cache.data_ptr()) + at_slot * elem);
      store_row(v_cache.scalar_type(), row + (n_heads + n_kv + i) * hd, hd,
                static_cast<char*>(v_cache.data_ptr()) + at_slot * elem);
    }
  }
  switch (k_cache.scalar_type()) {
    case at::kFloat: attend_all<LoadF32>(qkv, k_cache, v_cache, rows, n_heads, att); break;
    case at::kBFloat16: attend_all<LoadBF16>(qkv, k_cache, v_cache, rows, n_heads, att); break;
    default: attend_all<LoadF16>(qkv, k_cache, v_cache, rows, n_heads, att);
  }
  run_linears({&o}, att, B, attended);
  residual_add(dtype, x, attended, B * D, h);  // the residual stream stays in x's dtype

  for (int64_t b = 0; b < B; ++b) rms_norm_row(h + b * D, norm2, D, eps, normed + b * D);
  run_linears({&gate, &up}, normed, B, gate_up);
  for (int64_t b = 0; b < B; ++b) silu_mul_row(gate_up + b * 2 * F, gate_up + b * 2 * F + F, F, act + b * F);
  run_linears({&down}, act, B, down_out);
  residual_add(dtype, h, down_out, B * D, x);
}

}  // namespace llama_offload
