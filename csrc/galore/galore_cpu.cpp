// CPU kernels for the GaLore steps: the elementwise Adam math in the low-rank space (or on the
// whole weight when nothing is projected), split across threads in contiguous chunks.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "galore/galore_math.h"
#include "galore/galore_step.h"

namespace fastllm::galore {
namespace {

// Elements per parallel task and per stack buffer: large enough to amortise thread start-up.
constexpr int64_t kGrain = 32768;
constexpr int64_t kChunk = 1024;

template <typename G, typename O>
void adam_kernel_typed(const at::Tensor& low, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                       at::Tensor& out, const AdamCoeffs& c, bool accumulate) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t numel = low.numel();
  const G* g = low.const_data_ptr<G>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  O* o = out.data_ptr<O>();
  const Vec b1(c.beta1), b2(c.beta2), one_b1(1.0f - c.beta1), one_b2(1.0f - c.beta2), eps(c.eps);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    float gbuf[kChunk];
    float nbuf[kChunk];
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t len = std::min(kChunk, end - start);
      for (int64_t j = 0; j < len; ++j) gbuf[j] = static_cast<float>(g[start + j]);
      // Vector body and tail share the same arithmetic as adam_moments (galore_math.h).
      for (int64_t j = 0; j < len; j += Vec::size()) {
        const int count = static_cast<int>(std::min<int64_t>(Vec::size(), len - j));
        const Vec gv = Vec::loadu(gbuf + j, count);
        Vec mv = Vec::loadu(m + start + j, count);
        Vec vv = Vec::loadu(v + start + j, count);
        mv = b1 * mv + one_b1 * gv;
        vv = b2 * vv + one_b2 * gv * gv;
        const Vec nv = mv / (vv.sqrt() + eps);
        mv.store(m + start + j, count);
        vv.store(v + start + j, count);
        nv.store(nbuf + j, count);
      }
      if (accumulate) {
        for (int64_t j = 0; j < len; ++j) {
          o[start + j] = static_cast<O>(c.out_beta * static_cast<float>(o[start + j]) +
                                        c.out_alpha * nbuf[j]);
        }
      } else {
        for (int64_t j = 0; j < len; ++j) o[start + j] = static_cast<O>(c.out_alpha * nbuf[j]);
      }
    }
  });
}

template <typename G, typename O>
void adam8bit_kernel_typed(const at::Tensor& low, at::Tensor& m_codes, at::Tensor& m_absmax,
                           at::Tensor& v_codes, at::Tensor& v_absmax, at::Tensor& out,
                           const AdamCoeffs& c, bool accumulate) {
  const int64_t numel = low.numel();
  const int64_t blocks = quant_blocks(numel);
  const G* g = low.const_data_ptr<G>();
  int8_t* mq = m_codes.data_ptr<int8_t>();
  uint8_t* vq = v_codes.data_ptr<uint8_t>();
  float* ma = m_absmax.data_ptr<float>();
  float* va = v_absmax.data_ptr<float>();
  O* o = out.data_ptr<O>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kQuantBlock), [&](int64_t b0,
                                                                              int64_t b1) {
    float mbuf[kQuantBlock];
    float vbuf[kQuantBlock];
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t start = block * kQuantBlock;
      const int64_t len = std::min<int64_t>(kQuantBlock, numel - start);
      const float old_ma = ma[block], old_va = va[block];
      float new_ma = 0.0f, new_va = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = start + j;
        float mj = dequant_signed(mq[i], old_ma);
        float vj = dequant_unsigned(vq[i], old_va);
        const float n = adam_moments(static_cast<float>(g[i]), mj, vj, c);
        o[i] = static_cast<O>(accumulate ? c.out_beta * static_cast<float>(o[i]) + c.out_alpha * n
                                         : c.out_alpha * n);
        mbuf[j] = mj;
        vbuf[j] = vj;
        new_ma = std::max(new_ma, std::fabs(mj));
        new_va = std::max(new_va, vj);
      }
      for (int64_t j = 0; j < len; ++j) {
        mq[start + j] = quant_signed(mbuf[j], new_ma);
        vq[start + j] = quant_unsigned(vbuf[j], new_va);
      }
      ma[block] = new_ma;
      va[block] = new_va;
    }
  });
}

// A step skipped by found_inf: moments untouched, a zero step (an accumulated out untouched).
bool skipped(const at::Tensor& skip, at::Tensor& out, bool accumulate) {
  if (!skip.defined() || skip.const_data_ptr<float>()[0] == 0.f) return false;
  if (!accumulate) out.zero_();
  return true;
}

void adam_kernel_cpu(const at::Tensor& low, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     at::Tensor& out, const AdamCoeffs& c, bool accumulate,
                     const at::Tensor& skip) {
  if (low.numel() == 0 || skipped(skip, out, accumulate)) return;
  dispatch_pair(low, out, [&](auto low_tag, auto out_tag) {
    adam_kernel_typed<decltype(low_tag), decltype(out_tag)>(low, exp_avg, exp_avg_sq, out, c,
                                                            accumulate);
  });
}

void adam8bit_kernel_cpu(const at::Tensor& low, at::Tensor& m_codes, at::Tensor& m_absmax,
                         at::Tensor& v_codes, at::Tensor& v_absmax, at::Tensor& out,
                         const AdamCoeffs& c, bool accumulate, const at::Tensor& skip) {
  if (low.numel() == 0 || skipped(skip, out, accumulate)) return;
  dispatch_pair(low, out, [&](auto low_tag, auto out_tag) {
    adam8bit_kernel_typed<decltype(low_tag), decltype(out_tag)>(low, m_codes, m_absmax, v_codes,
                                                                v_absmax, out, c, accumulate);
  });
}

void decay_kernel_cpu(at::Tensor& param, double decay, const at::Tensor& skip) {
  if (skip.const_data_ptr<float>()[0] == 0.f) param.mul_(decay);
}

void galore_adam_step_cpu(at::Tensor& param, const at::Tensor& grad,
                          const std::optional<at::Tensor>& left,
                          const std::optional<at::Tensor>& right, at::Tensor& exp_avg,
                          at::Tensor& exp_avg_sq, bool grad_is_projected, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double scale,
                          int64_t step, const std::optional<at::Tensor>& found_inf) {
  galore_adam_step_impl(&adam_kernel_cpu, &decay_kernel_cpu, param, grad, left, right, exp_avg,
                        exp_avg_sq, grad_is_projected,
                        Hyper{lr, beta1, beta2, eps, weight_decay, scale, step}, found_inf);
}

void galore_adam8bit_step_cpu(at::Tensor& param, const at::Tensor& grad,
                              const std::optional<at::Tensor>& left,
                              const std::optional<at::Tensor>& right, at::Tensor& m_codes,
                              at::Tensor& m_absmax, at::Tensor& v_codes, at::Tensor& v_absmax,
                              bool grad_is_projected, double lr, double beta1, double beta2,
                              double eps, double weight_decay, double scale, int64_t step,
                              const std::optional<at::Tensor>& found_inf) {
  galore_adam8bit_step_impl(&adam8bit_kernel_cpu, &decay_kernel_cpu, param, grad, left, right,
                            m_codes, m_absmax, v_codes, v_absmax, grad_is_projected,
                            Hyper{lr, beta1, beta2, eps, weight_decay, scale, step}, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("galore_adam_step", &galore_adam_step_cpu);
  m.impl("galore_adam8bit_step", &galore_adam8bit_step_cpu);
}

}  // namespace fastllm::galore
