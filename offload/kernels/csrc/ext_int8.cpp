#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "ext.h"
#include "kernels.h"

namespace llama_offload {

void check_activations(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
}

int64_t row_grain(int64_t bytes_per_row) {
  const int64_t target = 256 * 1024;
  return std::max<int64_t>(8, target / std::max<int64_t>(1, bytes_per_row));
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  check_activations("int8_matmul", x);
  TORCH_CHECK(qweight.device().is_cpu() && scale.device().is_cpu(),
              "int8_matmul: qweight and scale must be CPU tensors");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
              "int8_matmul: qweight must be int8 [out, in], got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), "int8_matmul: qweight must be contiguous");
  const int64_t T = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "int8_matmul: x has ", K, " features but qweight has ", qweight.size(1));
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "int8_matmul: scale must be [", N, "], got ",
              scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), "int8_matmul: scale must be a float tensor");

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({T, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    int8_gemv_rows(xp, T, K, qp, sp, yp, N, n0, n1);
  });
  return y.to(x.scalar_type());
}

}  // namespace llama_offload
