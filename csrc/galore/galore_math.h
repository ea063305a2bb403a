// Per-element math of the GaLore Adam step, shared by the CPU and CUDA kernels so the CPU tests
// exercise exactly the arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastllm::galore {

// Elements sharing one fp32 absmax in the 8-bit moment format (the CUDA kernel uses one thread
// block of this size per quantisation block).
constexpr int kQuantBlock = 256;

struct AdamCoeffs {
  float beta1, beta2, eps;
  // out = (accumulate ? out_beta * out : 0) + out_alpha * m / (sqrt(v) + eps)
  float out_alpha, out_beta;
};

// One Adam moment update; returns the normalised step m / (sqrt(v) + eps).
FASTLLM_HOST_DEVICE float adam_moments(float g, float& m, float& v, const AdamCoeffs& c) {
  m = c.beta1 * m + (1.0f - c.beta1) * g;
  v = c.beta2 * v + (1.0f - c.beta2) * g * g;
  return m / (sqrtf(v) + c.eps);
}

// 8-bit moments are companded so small values keep relative precision inside a block whose
// absmax is set by its largest element: m = sign(q) (|q|/127)^2 absmax, v = (q/255)^4 absmax.
FASTLLM_HOST_DEVICE float dequant_signed(int8_t q, float absmax) {
  const float t = static_cast<float>(q) / 127.0f;
  return (t < 0.0f ? -t * t : t * t) * absmax;
}

FASTLLM_HOST_DEVICE float dequant_unsigned(uint8_t q, float absmax) {
  const float t = static_cast<float>(q) / 255.0f;
  const float t2 = t * t;
  return t2 * t2 * absmax;
}

FASTLLM_HOST_DEVICE int8_t quant_signed(float x, float absmax) {
  if (!(absmax > 0.0f)) return 0;
  float q = rintf(127.0f * sqrtf(fabsf(x) / absmax));
  q = q > 127.0f ? 127.0f : q;
  return static_cast<int8_t>(x < 0.0f ? -q : q);
}

FASTLLM_HOST_DEVICE uint8_t quant_unsigned(float x, float absmax) {
  if (!(absmax > 0.0f) || !(x > 0.0f)) return 0;
  float q = rintf(255.0f * sqrtf(sqrtf(x / absmax)));
  q = q > 255.0f ? 255.0f : q;
  return static_cast<uint8_t>(q);
}

}  // namespace fastllm::galore
