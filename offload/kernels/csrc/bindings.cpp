// Registers the CPU kernels as torch operators (torch.ops.llama_offload.*). torch/library.h rather than
// pybind11's torch/extension.h: the bindings then compile in a third of the time.
#include <torch/library.h>

#include "ext.h"
#include "kernels.h"

static int64_t vector_width_op() {
  return llama_offload::vector_width();
}

TORCH_LIBRARY(llama_offload, m) {
  m.def("int8_matmul(Tensor x, Tensor qweight, Tensor scale) -> Tensor", &llama_offload::int8_matmul);
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor scales, Tensor zeros) -> Tensor", &llama_offload::int4_matmul);
  m.def("vector_width() -> int", &vector_width_op);
}
