#include "linears.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "ext.h"
#include "work_sharing.h"

namespace llama_offload {

namespace {

constexpr int64_t kChunkBytes = 64 * 1024;
constexpr int64_t kChunksPerThread = 4;

void check_plain(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, ": weight tensors must be contiguous CPU tensors");
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

DenseType dense_type(at::ScalarType t) {
  return t == at::kFloat ? DenseType::kF32 : t == at::kBFloat16 ? DenseType::kBF16 : DenseType::kF16;
}

int64_t row_bytes(const Linear& l) {
  return l.kind == LinearKind::kInt4 ? l.K / 2 : l.kind == LinearKind::kInt8 ? l.K : l.K * (l.dense == DenseType::kF32 ? 4 : 2);
}

// How int4 reads its activations, made once per group size (a layer's linears share one): permuted floats
// (int4_permute_activations), or on the avx512_vnni path (passes of up to kRowInvariantTokens) each token's
// x rounded to int8.
struct Int4Activations {
  int64_t G;
  bool vnni;
  std::vector<float> xperm, xsum;  // xperm: the float path's [T][K]; xsum [T][K / G]
  std::vector<int8_t> xq;  // vnni: [T][K]
  std::vector<float> x8scale;  // vnni: [T][K / 8]
};

Int4Activations int4_activations(const float* x, int64_t T, int64_t K, int64_t G) {
  Int4Activations a{G, int4_vnni_takes(T, K, G), {}, std::vector<float>(T * (K / G)), {}, {}};
  if (a.vnni) {
    a.xq.resize(T * K);
    a.x8scale.resize(T * (K / 8));
    int4_vnni_activations(x, T, K, G, a.xq.data(), a.x8scale.data(), a.xsum.data());
  } else {
    a.xperm.resize(T * K);
    int4_permute_activations(x, T, K, G, a.xperm.data(), a.xsum.data());
  }
  return a;
}

template <typename S>
void int4_rows(const Linear& l, const Int4Activations& a, int64_t T, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const auto* p = static_cast<const uint8_t*>(l.weight);
  const S* scales = l.scale.data_ptr<S>();
  const S* zeros = l.zeros.data_ptr<S>();
  if (a.vnni)
    int4_vnni_gemv_rows<S>(a.xq.data(), a.x8scale.data(), a.xsum.data(), T, l.K, l.G, p, scales, zeros, y, ldy, n0,
                           n1);
  else
    int4_gemv_rows<S>(a.xperm.data(), a.xsum.data(), T, l.K, l.G, p, scales, zeros, y, ldy, n0, n1);
}

// Rows [n0, n1) of one linear into y (row stride ldy); x_bf16, int4: x as bfloat16 dense weights and int4 read it.
void linear_rows(const Linear& l, const float* x, const uint16_t* x_bf16, const Int4Activations* int4, int64_t T,
                 float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (l.kind) {
    case LinearKind::kDense: dense_gemv_rows(l.dense, x, x_bf16, T, l.K, l.weight, y, ldy, n0, n1); break;
    case LinearKind::kInt8:
      int8_gemv_rows(x, T, l.K, static_cast<const int8_t*>(l.weight), l.scale.data_ptr<float>(), y, ldy, n0, n1);
      break;
    case LinearKind::kInt4:
      switch (l.scale.scalar_type()) {
        case at::kFloat: int4_rows<float>(l, *int4, T, y, ldy, n0, n1); break;
        case at::kBFloat16: int4_rows<c10::BFloat16>(l, *int4, T, y, ldy, n0, n1); break;
        default: int4_rows<c10::Half>(l, *int4, T, y, ldy, n0, n1);
      }
      break;
  }
}

}  // namespace

Linear linear_from(at::TensorList ts, const char* what) {
  TORCH_CHECK(!ts.empty(), what, ": no weight tensors");
  const at::Tensor& w = ts[0];
  TORCH_CHECK(w.dim() == 2, what, ": the weight must be 2-D, got ", w.sizes());
  check_plain(w, what);
  Linear l{};
  l.N = w.size(0);
  size_t used = 1;
  if (is_float(w.scalar_type())) {
    l.kind = LinearKind::kDense;
    l.dense = dense_type(w.scalar_type());
    l.K = w.size(1);
  } else if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(ts.size() >= 2 && ts[1].dim() == 1 && ts[1].size(0) == l.N && is_float(ts[1].scalar_type()),
                what, ": int8 needs a float scale [", l.N, "] after qweight");
    l.kind = LinearKind::kInt8;
    l.K = w.size(1);
    l.scale = ts[1].to(at::kFloat).contiguous();
    used = 2;
  } else if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(ts.size() >= 3, what, ": int4 needs packed, scales and zeros");
    const at::Tensor &s = ts[1], &z = ts[2];
    l.kind = LinearKind::kInt4;
    l.K = 2 * w.size(1);
    TORCH_CHECK(s.dim() == 2 && s.size(0) == l.N && s.size(1) > 0 && l.K % s.size(1) == 0 && is_float(s.scalar_type()),
                what, ": int4 scales must be float [", l.N, ", in/group], got ", s.sizes());
    TORCH_CHECK(z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type(), what,
                ": int4 zeros must match scales");
    check_plain(s, what);
    check_plain(z, what);
    l.G = l.K / s.size(1);
    TORCH_CHECK(l.G % 2 == 0, what, ": int4 group size must be even, got ", l.G);
    l.scale = s;
    l.zeros = z;
    used = 3;
  } else {
    TORCH_CHECK(false, what, ": unsupported weight dtype ", w.scalar_type());
  }
  l.weight = w.data_ptr();
  TORCH_CHECK(ts.size() <= used + 1, what, ": ", ts.size(), " tensors, expected the format's ", used,
              " and at most a bias");
  if (ts.size() == used + 1) {
    TORCH_CHECK(ts[used].dim() == 1 && ts[used].size(0) == l.N, what, ": bias must be [", l.N, "], got ",
                ts[used].sizes());
    l.bias = ts[used].to(at::kFloat).contiguous();
  }
  return l;
}

void run_linears(const std::vector<const Linear*>& linears, const float* x, int64_t T, float* y) {
  const int64_t K = linears.at(0)->K;
  std::vector<int64_t> offsets;
  int64_t total = 0, widest = 0;
  std::vector<Int4Activations> int4;
  for (const Linear* l : linears) {
    TORCH_CHECK(l->K == K, "linears sharing an input must have the same in_features: ", l->K, " != ", K);
    offsets.push_back(total);
    total += l->N;
    widest = std::max(widest, row_bytes(*l));
    if (l->kind == LinearKind::kInt4 &&
        std::none_of(int4.begin(), int4.end(), [&](const Int4Activations& a) { return a.G == l->G; }))
      int4.push_back(int4_activations(x, T, K, l->G));
  }
  std::vector<uint16_t> x_bf16;
  const bool any_bf16 = std::any_of(linears.begin(), linears.end(), [](const Linear* l) {
    return l->kind == LinearKind::kDense && l->dense == DenseType::kBF16;
  });
  if (any_bf16 && bf16_dot_products()) {
    x_bf16.resize(T * K);
    for (int64_t i = 0; i < T * K; ++i) x_bf16[i] = c10::BFloat16(x[i]).x;
  }
  auto int4_of = [&](const Linear& l) -> const Int4Activations* {
    for (const Int4Activations& a : int4)
      if (a.G == l.G) return &a;
    return nullptr;
  };
  // Chunks of whole 8-row tiles: a few per thread, so that a thread held up by another process leaves its
  // chunks to the others, and each at least kChunkBytes of weights, long streams for the prefetchers.
  const int64_t per_thread = (total + kChunksPerThread * at::get_num_threads() - 1) /
                             (kChunksPerThread * at::get_num_threads());
  const int64_t chunk_rows = (std::max(per_thread, kChunkBytes / std::max<int64_t>(1, widest)) + 7) / 8 * 8;
  share_chunks((total + chunk_rows - 1) / chunk_rows, [&](int64_t c) {
    const int64_t r0 = c * chunk_rows, r1 = std::min(total, r0 + chunk_rows);
    for (size_t i = 0; i < linears.size(); ++i) {
      const Linear& l = *linears[i];
      const int64_t lo = std::max(r0, offsets[i]) - offsets[i], hi = std::min(r1, offsets[i] + l.N) - offsets[i];
      if (lo >= hi) continue;
      linear_rows(l, x, x_bf16.empty() ? nullptr : x_bf16.data(), int4_of(l), T, y + offsets[i], total, lo, hi);
    }
  });
  for (size_t i = 0; i < linears.size(); ++i) {
    if (!linears[i]->bias.defined()) continue;
    const float* b = linears[i]->bias.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < linears[i]->N; ++n) y[t * total + offsets[i] + n] += b[n];
  }
}

}  // namespace llama_offload
