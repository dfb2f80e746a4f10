// Python bindings of the CPU kernels (the only file that includes the pybind11 headers).
#include <torch/extension.h>

#include "ext.h"
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_matmul", &llama_offload::int8_matmul, "x [T, K] @ int8 weight [N, K]^T * scale [N] -> [T, N]",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scale"));
  m.def("int4_matmul", &llama_offload::int4_matmul,
        "x [T, K] @ int4 weight (packed [N, K/2], scales, zeros [N, K/G]) -> [T, N]", pybind11::arg("x"),
        pybind11::arg("packed"), pybind11::arg("scales"), pybind11::arg("zeros"));
  m.def("vector_width", &llama_offload::vector_width, "floats per SIMD vector the kernels were built for");
}
