// The one place where fastllm's op schemas are declared. This file is always compiled, so a
// CPU-only build still exposes every op; the per-capability *_cpu.cpp and *_cuda.cu files only add
// implementations for their dispatch key.
#include <torch/library.h>

TORCH_LIBRARY(fastllm, m) {
  // ---- memory: the unified page pool -----------------------------------------------------------
  // pool is a [num_slots, width] view of the pool's storage; rows[i] goes to pool[slots[i]].
  m.def("pool_write(Tensor(a!) pool, Tensor slots, Tensor rows) -> ()");
  // out[i] = pool[slots[i]]; slots may repeat.
  m.def("pool_gather(Tensor pool, Tensor slots) -> Tensor");
}
