// The Python module object for fastllm._C. The ops themselves register with the torch dispatcher
// when this library is loaded (TORCH_LIBRARY static initialisers); Python reaches them through
// torch.ops.fastllm, so this module only carries facts about the binary.
#include <pybind11/pybind11.h>

#include "common/index_errors.h"
#include "lora/lora_index.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm compiled kernels (ops live in torch.ops.fastllm)";
  m.attr("with_cuda") = pybind11::bool_(FASTLLM_WITH_CUDA);
  // The index-validation mode and the error bits' names (the word itself is the op
  // fastllm::index_error_word, a tensor).
  m.def("set_index_debug_mode", &fastllm::set_index_debug_mode);
  m.def("index_debug_mode", &fastllm::index_debug_mode);
  m.def("describe_index_errors", &fastllm::describe_index_errors);
  // LoRA planning facts the Python layer builds plans with (one source of truth: lora_index.h).
  m.attr("lora_tile") = pybind11::int_(fastllm::lora::kTile);
  m.def("lora_gpu_prefers_sgmv", &fastllm::lora::gpu_prefers_sgmv);
}
