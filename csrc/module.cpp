// The Python module object for fastllm._C. The ops themselves register with the torch dispatcher
// when this library is loaded (TORCH_LIBRARY static initialisers); Python reaches them through
// torch.ops.fastllm, so this module only carries facts about the binary.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm compiled kernels (ops live in torch.ops.fastllm)";
  m.attr("with_cuda") = pybind11::bool_(FASTLLM_WITH_CUDA);
}
