// The device-independent part of the GaLore steps: argument checks, the two projections (GEMMs
// through ATen, so cuBLAS on GPU) and the order of work. Each device file supplies the elementwise
// kernels (Adam in the low-rank space, fp32 or 8-bit moments) through a function pointer.
//
// One step on an m x n weight with projectors left (m x r) and/or right (r x n):
//   low  = left^T G right^T                (one read of G)
//   norm = m / (sqrt(v) + eps)             (fused kernel, low-rank, moments updated in place)
//   W    = decay * W + alpha * left norm right   (one GEMM whose epilogue is the whole weight
//                                           update: W read once and written once, the back-
//                                           projected update never materialised)
// with alpha = -lr * bias_correction * scale * decay and decay = 1 - lr * weight_decay, which is
// galore-torch's "update, then decoupled weight decay on the updated weight".
// Without projectors the fused kernel updates W itself (plain AdamW, same order of decay).
//
// found_inf (optional, one element on param's device): when non-zero the kernels leave the moments
// and W untouched and write a zero step, so a step with a non-finite gradient is skipped without
// the host reading anything (no synchronisation). With a projector and weight decay the decay
// must be skipped too, and cuBLAS takes beta from the host: W is then scaled by the device-side
// DecayKernel (one more pass over W, fp32 arithmetic) and the GEMM adds with beta 1.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"
#include "galore/galore_math.h"

namespace fastllm::galore {

// Elementwise Adam over `low` (any float dtype) with fp32 moments; writes out (fp32 for a
// low-rank output, or the weight itself when accumulate is set). `skip` (undefined, or one fp32
// element on the device): non-zero leaves the moments and an accumulated out unchanged and
// writes zeros to a non-accumulated out.
using AdamKernel = void (*)(const at::Tensor& low, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                            at::Tensor& out, const AdamCoeffs& coeffs, bool accumulate,
                            const at::Tensor& skip);
// The same with blockwise 8-bit moments (codes + per-block absmax), requantised in place.
using Adam8bitKernel = void (*)(const at::Tensor& low, at::Tensor& m_codes, at::Tensor& m_absmax,
                                at::Tensor& v_codes, at::Tensor& v_absmax, at::Tensor& out,
                                const AdamCoeffs& coeffs, bool accumulate,
                                const at::Tensor& skip);

// param *= decay (fp32 arithmetic) unless skip[0] is non-zero.
using DecayKernel = void (*)(at::Tensor& param, double decay, const at::Tensor& skip);

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay, scale;
  int64_t step;
};

// Calls f(T{}) with T the C++ type of a weight/gradient dtype (float, Half or BFloat16); the
// checks have already rejected every other dtype.
template <typename F>
void dispatch_weight_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: f(float{}); break;
  }
}

// Instantiates a kernel for every (low-rank gradient dtype, output dtype) pair.
template <typename F>
void dispatch_pair(const at::Tensor& low, const at::Tensor& out, F&& f) {
  dispatch_weight_type(low.scalar_type(), [&](auto low_tag) {
    dispatch_weight_type(out.scalar_type(), [&](auto out_tag) { f(low_tag, out_tag); });
  });
}

inline void check_weight_dtype(const char* op, const char* name, const at::Tensor& t) {
  check_dtype_in(op, name, t, {at::kFloat, at::kHalf, at::kBFloat16});
}

inline void check_hyper(const char* op, const Hyper& h) {
  TORCH_CHECK_VALUE(h.step >= 1, op, ": step must be >= 1 (the count including this update), got ",
                    h.step);
  TORCH_CHECK_VALUE(h.beta1 >= 0.0 && h.beta1 < 1.0, op, ": beta1 must be in [0, 1), got ",
                    h.beta1);
  TORCH_CHECK_VALUE(h.beta2 >= 0.0 && h.beta2 < 1.0, op, ": beta2 must be in [0, 1), got ",
                    h.beta2);
  TORCH_CHECK_VALUE(h.eps > 0.0, op, ": eps must be > 0, got ", h.eps);
  TORCH_CHECK_VALUE(h.lr >= 0.0, op, ": lr must be >= 0, got ", h.lr);
  TORCH_CHECK_VALUE(h.weight_decay >= 0.0, op, ": weight_decay must be >= 0, got ",
                    h.weight_decay);
}

// Checks param, grad and projectors; returns the shape of the low-rank gradient.
inline std::vector<int64_t> check_projection(const char* op, const at::Tensor& param,
                                             const at::Tensor& grad,
                                             const std::optional<at::Tensor>& left,
                                             const std::optional<at::Tensor>& right,
                                             bool grad_is_projected) {
  check_weight_dtype(op, "param", param);
  check_contiguous(op, "param", param);
  check_weight_dtype(op, "grad", grad);
  check_same_device(op, "param", param, "grad", grad);
  if (!left && !right) {
    TORCH_CHECK_VALUE(grad.sizes() == param.sizes(), op, ": grad must have param's shape ",
                      param.sizes(), ", got ", grad.sizes());
    return param.sizes().vec();
  }
  check_dim(op, "param", param, 2);
  const int64_t m = param.size(0), n = param.size(1);
  int64_t rank = -1;
  if (left) {
    check_weight_dtype(op, "left", *left);
    check_dim(op, "left", *left, 2);
    check_same_device(op, "param", param, "left", *left);
    TORCH_CHECK_VALUE(left->size(0) == m, op, ": left must be [", m, ", rank] for param of shape ",
                      param.sizes(), ", got ", left->sizes());
    rank = left->size(1);
  }
  if (right) {
    check_weight_dtype(op, "right", *right);
    check_dim(op, "right", *right, 2);
    check_same_device(op, "param", param, "right", *right);
    TORCH_CHECK_VALUE(right->size(1) == n, op, ": right must be [rank, ", n,
                      "] for param of shape ", param.sizes(), ", got ", right->sizes());
    TORCH_CHECK_VALUE(rank < 0 || right->size(0) == rank, op,
                      ": left and right must have the same rank, got ", rank, " and ",
                      right->size(0));
    rank = right->size(0);
  }
  std::vector<int64_t> low{left ? rank : m, right ? rank : n};
  const auto expected = grad_is_projected ? at::IntArrayRef(low) : param.sizes();
  TORCH_CHECK_VALUE(grad.sizes() == expected, op, ": grad must have shape ", expected,
                    grad_is_projected ? " (the projected gradient)" : " (param's shape)", ", got ",
                    grad.sizes());
  return low;
}

inline void check_moment(const char* op, const char* name, const at::Tensor& t,
                         at::ScalarType dtype, int64_t numel, const at::Tensor& param) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  check_contiguous(op, name, t);
  check_same_device(op, "param", param, name, t);
  TORCH_CHECK_VALUE(t.numel() == numel, op, ": ", name, " must have ", numel,
                    " elements, got shape ", t.sizes());
}

inline int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

inline int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

inline at::Tensor project_down(const at::Tensor& grad, const std::optional<at::Tensor>& left,
                               const std::optional<at::Tensor>& right) {
  // The GEMMs run in the gradient's dtype (fp32 accumulation inside); the small result is fp32.
  const auto dtype = grad.scalar_type();
  at::Tensor out = grad;
  if (left) out = at::mm(left->to(dtype).t(), out);
  if (right) out = at::mm(out, right->to(dtype).t());
  return out.to(at::kFloat).contiguous();
}

// param = beta * param + alpha * (left norm right), as one GEMM with its epilogue.
inline void project_back_into(at::Tensor& param, const at::Tensor& norm,
                              const std::optional<at::Tensor>& left,
                              const std::optional<at::Tensor>& right, double beta, double alpha) {
  const auto dtype = param.scalar_type();
  at::Tensor a, b;
  if (left && right) {
    a = left->to(dtype);
    b = at::mm(norm, right->to(at::kFloat)).to(dtype);
  } else if (left) {
    a = left->to(dtype);
    b = norm.to(dtype);
  } else {
    a = norm.to(dtype);
    b = right->to(dtype);
  }
  param.addmm_(a, b, beta, alpha);
}

// found_inf as the kernels read it: one fp32 element (undefined when not given).
inline at::Tensor skip_flag(const char* op, const std::optional<at::Tensor>& found_inf,
                            const at::Tensor& param) {
  if (!found_inf.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(found_inf->numel() == 1, op, ": found_inf must have one element, got shape ",
                    found_inf->sizes());
  check_dtype_in(op, "found_inf", *found_inf, {at::kFloat, at::kBool});
  check_same_device(op, "param", param, "found_inf", *found_inf);
  return found_inf->to(at::kFloat).reshape({1}).contiguous();
}

// param = beta * param + alpha * (left norm right) where the step may have been skipped on the
// device (skip defined): the decay must then be skipped too, so it becomes a device factor.
inline void project_back_step(DecayKernel decay_kernel, at::Tensor& param, const at::Tensor& norm,
                              const std::optional<at::Tensor>& left,
                              const std::optional<at::Tensor>& right, double decay, double alpha,
                              const at::Tensor& skip) {
  if (skip.defined() && decay != 1.0) {
    decay_kernel(param, decay, skip);
    decay = 1.0;
  }
  project_back_into(param, norm, left, right, decay, alpha);
}

inline AdamCoeffs coeffs_of(const Hyper& h, float out_alpha, float out_beta) {
  return AdamCoeffs{static_cast<float>(h.beta1), static_cast<float>(h.beta2),
                    static_cast<float>(h.eps), out_alpha, out_beta};
}

struct StepPlan {
  double decay;  // multiplies the old weight
  double alpha;  // multiplies the back-projected normalised step
};

inline StepPlan plan_of(const Hyper& h) {
  const double t = static_cast<double>(h.step);
  const double step_size =
      h.lr * std::sqrt(1.0 - std::pow(h.beta2, t)) / (1.0 - std::pow(h.beta1, t));
  const double decay = 1.0 - h.lr * h.weight_decay;
  return {decay, -step_size * h.scale * decay};
}

inline void galore_adam_step_impl(AdamKernel kernel, DecayKernel decay_kernel, at::Tensor& param,
                                  const at::Tensor& grad, const std::optional<at::Tensor>& left,
                                  const std::optional<at::Tensor>& right, at::Tensor& exp_avg,
                                  at::Tensor& exp_avg_sq, bool grad_is_projected,
                                  const Hyper& h, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fastllm.galore_adam_step";
  const auto low_shape = check_projection(op, param, grad, left, right, grad_is_projected);
  const int64_t low_numel = numel_of(low_shape);
  check_moment(op, "exp_avg", exp_avg, at::kFloat, low_numel, param);
  check_moment(op, "exp_avg_sq", exp_avg_sq, at::kFloat, low_numel, param);
  check_hyper(op, h);
  const at::Tensor skip = skip_flag(op, found_inf, param);
  const StepPlan plan = plan_of(h);
  if (!left && !right) {
    at::Tensor g = grad.contiguous();
    kernel(g, exp_avg, exp_avg_sq, param,
           coeffs_of(h, static_cast<float>(plan.alpha), static_cast<float>(plan.decay)), true,
           skip);
    return;
  }
  at::Tensor low = grad_is_projected ? grad.contiguous() : project_down(grad, left, right);
  at::Tensor norm = at::empty(low_shape, param.options().dtype(at::kFloat));
  kernel(low, exp_avg, exp_avg_sq, norm, coeffs_of(h, 1.0f, 0.0f), false, skip);
  project_back_step(decay_kernel, param, norm, left, right, plan.decay, plan.alpha, skip);
}

inline void galore_adam8bit_step_impl(Adam8bitKernel kernel, DecayKernel decay_kernel,
                                      at::Tensor& param, const at::Tensor& grad,
                                      const std::optional<at::Tensor>& left,
                                      const std::optional<at::Tensor>& right, at::Tensor& m_codes,
                                      at::Tensor& m_absmax, at::Tensor& v_codes,
                                      at::Tensor& v_absmax, bool grad_is_projected,
                                      const Hyper& h,
                                      const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fastllm.galore_adam8bit_step";
  const auto low_shape = check_projection(op, param, grad, left, right, grad_is_projected);
  const int64_t low_numel = numel_of(low_shape);
  check_moment(op, "exp_avg_codes", m_codes, at::kChar, low_numel, param);
  check_moment(op, "exp_avg_absmax", m_absmax, at::kFloat, quant_blocks(low_numel), param);
  check_moment(op, "exp_avg_sq_codes", v_codes, at::kByte, low_numel, param);
  check_moment(op, "exp_avg_sq_absmax", v_absmax, at::kFloat, quant_blocks(low_numel), param);
  check_hyper(op, h);
  const at::Tensor skip = skip_flag(op, found_inf, param);
  const StepPlan plan = plan_of(h);
  if (!left && !right) {
    at::Tensor g = grad.contiguous();
    kernel(g, m_codes, m_absmax, v_codes, v_absmax, param,
           coeffs_of(h, static_cast<float>(plan.alpha), static_cast<float>(plan.decay)), true,
           skip);
    return;
  }
  at::Tensor low = grad_is_projected ? grad.contiguous() : project_down(grad, left, right);
  at::Tensor norm = at::empty(low_shape, param.options().dtype(at::kFloat));
  kernel(low, m_codes, m_absmax, v_codes, v_absmax, norm, coeffs_of(h, 1.0f, 0.0f), false, skip);
  project_back_step(decay_kernel, param, norm, left, right, plan.decay, plan.alpha, skip);
}

}  // namespace fastllm::galore
