// Registers the CPU kernels as torch operators (torch.ops.llama_offload.*). torch/library.h rather than
// pybind11's torch/extension.h: the bindings then compile in a third of the time.
#include <torch/library.h>

#include "cpu_paths.h"
#include "decode_stack.h"
#include "ext.h"
#include "kernels.h"

static int64_t vector_width_op() {
  return llama_offload::vector_width();
}

static bool int4_rounds_activations_op(int64_t in_features, int64_t group_size, int64_t tokens) {
  return llama_offload::int4_vnni_takes(tokens, in_features, group_size);
}

TORCH_LIBRARY(llama_offload, m) {
  m.def("int8_matmul(Tensor x, Tensor qweight, Tensor scale) -> Tensor", &llama_offload::int8_matmul);
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor scales, Tensor zeros) -> Tensor", &llama_offload::int4_matmul);
  m.def("linear(Tensor x, Tensor[] weight) -> Tensor", &llama_offload::linear);
  m.def("decode_block(Tensor x, Tensor attn_norm, Tensor ffn_norm, float eps, Tensor[] wq, Tensor[] wk, Tensor[] wv, "
        "Tensor[] wo, Tensor[] w1, Tensor[] w3, Tensor[] w2, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, "
        "Tensor cos, Tensor sin, int n_heads, int window) -> Tensor", &llama_offload::decode_block);
  m.class_<llama_offload::DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t, int64_t, int64_t,
                       double>())
      .def("step", &llama_offload::DecodeStack::step)
      .def("tree_step", &llama_offload::DecodeStack::tree_step)
      .def("blocks", &llama_offload::DecodeStack::blocks);
  m.def("vector_width() -> int", &vector_width_op);
  m.def("int4_rounds_activations(int in_features, int group_size, int tokens=1) -> bool", &int4_rounds_activations_op);
  m.def("cpu_paths() -> str[]", &llama_offload::cpu_paths);
  m.def("set_cpu_paths(str[] names) -> str[]", &llama_offload::set_cpu_paths);
  m.def("gguf_q8_0_to_int8(Tensor raw, Tensor(a!) qweight, Tensor(b!) scale) -> ()", &llama_offload::gguf_q8_0_to_int8);
  m.def("gguf_q4_0_to_int4(Tensor raw, Tensor(a!) packed, Tensor(b!) scales, Tensor(c!) zeros) -> ()",
        &llama_offload::gguf_q4_0_to_int4);
  m.def("gguf_q4_1_to_int4(Tensor raw, Tensor(a!) packed, Tensor(b!) scales, Tensor(c!) zeros) -> ()",
        &llama_offload::gguf_q4_1_to_int4);
}
