#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <type_traits>

#include "ext.h"
#include "kernels.h"

namespace llama_offload {

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros) {
  check_activations("int4_matmul", x);
  TORCH_CHECK(packed.device().is_cpu() && scales.device().is_cpu() && zeros.device().is_cpu(),
              "int4_matmul: packed, scales and zeros must be CPU tensors");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2,
              "int4_matmul: packed must be uint8 [out, in/2], got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t T = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == K, "int4_matmul: x has ", K, " features but packed holds ",
              packed.size(1) * 2);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0,
              "int4_matmul: scales must be [", N, ", in/group], got ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "int4_matmul: zeros ", zeros.sizes(), " != scales ",
              scales.sizes());
  TORCH_CHECK(zeros.scalar_type() == scales.scalar_type(), "int4_matmul: zeros and scales dtypes differ");
  const int64_t G = K / scales.size(1);
  TORCH_CHECK(G % 2 == 0, "int4_matmul: group size must be even, got ", G);
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(),
              "int4_matmul: packed, scales and zeros must be contiguous");

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({T, N}, xf.options());
  at::Tensor xsum = at::empty({T, K / G}, xf.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const bool vnni = int4_vnni_takes(T, K, G);  // x rounded to int8 per token where the CPU has VNNI
  at::Tensor xperm, xq, x8scale;
  if (vnni) {
    xq = at::empty({T, K}, xf.options().dtype(at::kChar));
    x8scale = at::empty({T, K / 8}, xf.options());
    int4_vnni_activations(xf.data_ptr<float>(), T, K, G, xq.data_ptr<int8_t>(), x8scale.data_ptr<float>(),
                          xsum.data_ptr<float>());
  } else {
    xperm = at::empty_like(xf);
    int4_permute_activations(xf.data_ptr<float>(), T, K, G, xperm.data_ptr<float>(), xsum.data_ptr<float>());
  }
  const float* sp = xsum.data_ptr<float>();
  auto run = [&](auto* sc, auto* ze) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sc)>>;
    at::parallel_for(0, N, row_grain(K / 2), [&](int64_t n0, int64_t n1) {
      if (vnni)
        int4_vnni_gemv_rows<S>(xq.data_ptr<int8_t>(), x8scale.data_ptr<float>(), sp, T, K, G, pp, sc, ze, yp, N, n0,
                               n1);
      else
        int4_gemv_rows<S>(xperm.data_ptr<float>(), sp, T, K, G, pp, sc, ze, yp, N, n0, n1);
    });
  };
  switch (scales.scalar_type()) {
    case at::kFloat: run(scales.data_ptr<float>(), zeros.data_ptr<float>()); break;
    case at::kBFloat16: run(scales.data_ptr<at::BFloat16>(), zeros.data_ptr<at::BFloat16>()); break;
    case at::kHalf: run(scales.data_ptr<at::Half>(), zeros.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "int4_matmul: scales must be float32, bfloat16 or float16, got ",
                         scales.scalar_type());
  }
  return y.to(x.scalar_type());
}

}  // namespace llama_offload
