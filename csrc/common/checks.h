// Input validation shared by every op. Each message names the op and the argument, and says what
// was expected and what arrived, so a user can fix the call without reading our source.
#pragma once

#include <ATen/ATen.h>

#include "common/index_errors.h"

#include <algorithm>
#include <initializer_list>
#include <string>

namespace fastllm {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string out;
  for (auto dtype : dtypes) {
    if (!out.empty()) out += ", ";
    out += c10::toString(dtype);
  }
  return out;
}

inline void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> allowed) {
  for (auto dtype : allowed) {
    if (t.scalar_type() == dtype) return;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must have dtype in {", dtype_list(allowed), "}, got ",
                   t.scalar_type());
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  check_dtype_in(op, name, t, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
}

inline void check_index_dtype(const char* op, const char* name, const at::Tensor& t) {
  check_dtype_in(op, name, t, {at::kInt, at::kLong});
}

inline void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a,
                             const char* name_b, const at::Tensor& b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", name_b, " must have the dtype of ",
                   name_a, " (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (strides ",
                    t.strides(), " for shape ", t.sizes(), ")");
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a,
                              const char* name_b, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_b, " must be on ", name_a,
                    "'s device (", a.device(), "), got ", b.device());
}

// Every index must lie in [0, limit). Checked on the host for CPU tensors, and for CUDA tensors
// only in the debug mode (one synchronisation): otherwise the kernels guard each index themselves
// and report a bad one through the device error word (common/index_errors.h).
inline void check_index_range(const char* op, const char* name, const at::Tensor& index,
                              int64_t limit) {
  // BEGIN host value checks
  if (index.numel() == 0 || !host_checks_index_values(index)) return;
  int64_t min_index = 0, max_index = 0;
  if (index.is_cpu() && index.is_contiguous() &&
      (index.scalar_type() == at::kInt || index.scalar_type() == at::kLong)) {
    // A plain scan: the small index tensors of a decode step are checked every layer, and four
    // ATen ops (aminmax, stack, to, cpu) cost more than the kernel's bookkeeping.
    auto scan = [&](const auto* data) {
      min_index = max_index = data[0];
      for (int64_t i = 1, n = index.numel(); i < n; ++i) {
        min_index = std::min<int64_t>(min_index, data[i]);
        max_index = std::max<int64_t>(max_index, data[i]);
      }
    };
    if (index.scalar_type() == at::kInt) {
      scan(index.const_data_ptr<int32_t>());
    } else {
      scan(index.const_data_ptr<int64_t>());
    }
  } else {
    auto [lo, hi] = at::aminmax(index);
    const at::Tensor bounds = at::stack({lo, hi}).to(at::kLong).cpu();
    min_index = bounds.data_ptr<int64_t>()[0];
    max_index = bounds.data_ptr<int64_t>()[1];
  }
  // END host value checks
  TORCH_CHECK_INDEX(min_index >= 0 && max_index < limit, op, ": ", name,
                    " must lie in [0, ", limit, "), got values in [", min_index, ", ", max_index,
                    "]");
}

}  // namespace fastllm
