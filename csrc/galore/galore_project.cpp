// The two GaLore projections as ops of their own (used by GaLoreAdafactor and by anyone building
// another optimizer on the same subspace). They are GEMMs through ATen, so one implementation
// serves every device.
#include <torch/library.h>

#include "galore/galore_step.h"

namespace fastllm::galore {
namespace {

at::Tensor galore_project(const at::Tensor& grad, const std::optional<at::Tensor>& left,
                          const std::optional<at::Tensor>& right) {
  constexpr const char* op = "fastllm.galore_project";
  TORCH_CHECK_VALUE(left || right, op, ": at least one of left and right must be given");
  check_projection(op, grad, grad, left, right, false);
  return project_down(grad, left, right);
}

void galore_project_back_(at::Tensor& param, const at::Tensor& low,
                          const std::optional<at::Tensor>& left,
                          const std::optional<at::Tensor>& right, double alpha, double beta) {
  constexpr const char* op = "fastllm.galore_project_back_";
  TORCH_CHECK_VALUE(left || right, op, ": at least one of left and right must be given");
  TORCH_CHECK_TYPE(low.scalar_type() == at::kFloat, op, ": low must be Float, got ",
                   low.scalar_type());
  check_projection(op, param, low, left, right, true);
  project_back_into(param, low.contiguous(), left, right, beta, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CompositeExplicitAutograd, m) {
  m.impl("galore_project", &galore_project);
  m.impl("galore_project_back_", &galore_project_back_);
}

}  // namespace fastllm::galore
