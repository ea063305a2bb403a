// Neuron scores from a quantized copy of the up (and gate) weights: the quantized predictor.
//
//   u[b, j] = sum_g up_scale[j, g]   * (q_up[j, g-th group]   . x[b, g-th group]) + b_up[j]
//   g[b, j] = sum_g gate_scale[j, g] * (q_gate[j, g-th group] . x[b, g-th group]) + b_gate[j]
//   score[b, j] = |act(g) * u|   (gated)   or   |act(u)|   (no gate)
//
// A low-rank predictor of a gated MLP ranks neurons far from |act(gate) * up| (top-k recall 0.72
// at 50% on SmolLM2 for 14% of the MLP's multiply-adds); symmetric int8 with one fp32 scale per
// group of input columns keeps the ranking (recall 0.99) while reading 1 + 4/group bytes per
// weight, a sixth of an fp32 MLP's gate and up bytes.
//
// Two storages, told apart by the weights' dtype (one op, one schema):
//   int8  [n, d_in]:     one weight per byte.
//   uint8 [n, d_in / 2]: packed int4, two weights per byte: byte i of a row holds column 2i in
//                        its low nibble and column 2i + 1 in its high nibble, each a two's-
//                        complement 4-bit value (the quantizer uses -7..7). Read as little-endian
//                        32-bit words, nibble k of word w is column 8w + k.
// Packed int4 halves the predictor's weight bytes again (0.5 + 4/group per weight); issue 16's
// study found int4 gate+up (group 32) within +5% held-out perplexity at 50% on SmolLM2.
// Shared by the CPU and CUDA kernels: checks, the nibble / byte decoding, the staging layout of x
// and the CUDA launch plan (host functions, unit-tested on the CPU through fastllm._C).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/checks.h"
#include "common/host_device.h"
#include "sparse/sparse_mlp.h"

namespace fastllm::sparse {

// Column groups are whole 16-column steps (one 16-byte int8 word; half a packed-int4 word), so
// no step straddles two scales.
constexpr int64_t kScoreGroupMultiple = 16;
// Packed int4 rows are whole 16-byte words (32 columns), on the CPU too, so both devices accept
// the same inputs.
constexpr int64_t kPackedInt4ColumnMultiple = 32;

struct NeuronScoreShape {
  int64_t rows;
  int64_t d_in;
  int64_t neurons;
  int64_t group;  // input columns per scale
  bool gated;
  bool packed;    // uint8 storage, two int4 weights per byte
};

// ---- decoding (FASTLLM_HOST_DEVICE: the CPU tests run the arithmetic the GPU runs) ----------------

FASTLLM_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// OR-ing an integer u < 2^23 into the mantissa of 2^23 (0x4B000000) gives the float 2^23 + u
// exactly, so a biased code becomes a float with one logic op and one add: no integer-to-float
// conversion, which runs at a quarter of the FMA rate on the GPU. XOR with half the range turns a
// two's-complement code into its value plus that half (offset binary), which the add removes.
//
// Byte k (0..3) of a little-endian word of int8 codes.
FASTLLM_HOST_DEVICE float int8_code(uint32_t word, int k) {
  return float_from_bits(((word >> (8 * k)) & 0xFFu) ^ 0x4B000080u) - 8388736.f;  // 2^23 + 128
}

// Nibble k (0..7) of a little-endian word of packed int4 codes: column 8w + k of word w.
FASTLLM_HOST_DEVICE float int4_code(uint32_t word, int k) {
  return float_from_bits(((word >> (4 * k)) & 0xFu) ^ 0x4B000008u) - 8388616.f;  // 2^23 + 8
}

// ---- x rounded to int8 (quantize_x) --------------------------------------------------------------
//
// With quantize_x each row of x is rounded per group of the weights' scale groups: symmetric,
// scale = max |x| / 127 over the group, code = round-half-even(x / scale) in [-127, 127], a group
// of zeros a scale of 0 and codes 0. The dots are then integer dots of codes (exact in int32)
// times both scales. The same expressions in fp32 as the reference's torch ops, so the codes are
// the same on every device.
FASTLLM_HOST_DEVICE float x_group_scale(float max_abs) { return max_abs / 127.f; }

FASTLLM_HOST_DEVICE int x_code(float v, float scale) {
  if (!(scale > 0.f)) return 0;
#if defined(__CUDA_ARCH__)
  return static_cast<int>(rintf(v / scale));
#else
  // |v / scale| <= 127: adding 1.5 * 2^23 leaves no fraction bits, so the add rounds (half to
  // even, the default mode) and the subtraction is exact. std::nearbyint is a libm call per
  // element on the baseline ISA: a tenth of the int4 scores' time at SmolLM2's width.
  constexpr float kRoundingBias = 12582912.f;
  return static_cast<int>((v / scale + kRoundingBias) - kRoundingBias);
#endif
}

// ---- the CUDA kernel's launch plan ----------------------------------------------------------------
//
// The block stages rows_per_pass rows of x in shared memory as fp32 (sparse_mlp.h:
// staged_x_slot); a lane reads the 4 (int8, 16 columns) or 8 (packed int4, 32 columns) float4s
// under its weight word.
constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kScoreMaxRowsPerPass = 4;  // rows of x dotted per read of the weights
constexpr int64_t kScoreSharedBudget = kStagedXBudget;

struct NeuronScoresLaunch {
  int64_t rows_per_pass, blocks, row_floats, shared_bytes;
};

// The staged rows alone: they fix the dynamic shared memory the occupancy query needs.
inline StagedRows neuron_scores_staging(int64_t rows, int64_t d) {
  return plan_staged_rows(rows, d, kScoreMaxRowsPerPass);
}

// Neurons spread evenly over the warps of one wave of blocks_per_sm blocks per SM (the kernel's
// occupancy as the runtime reports it; sparse_mlp.h: spread_blocks).
inline NeuronScoresLaunch plan_neuron_scores(int64_t rows, int64_t d, int64_t neurons,
                                             int64_t sms, int64_t blocks_per_sm) {
  const StagedRows staging = neuron_scores_staging(rows, d);
  return {staging.rows_per_pass, spread_blocks(neurons, sms, blocks_per_sm, kScoreWarps),
          staging.row_floats, staging.shared_bytes};
}

// ---- argument checks -------------------------------------------------------------------------------

inline void check_quantized_weight(const char* op, const char* q_name, const at::Tensor& q,
                                   const char* s_name, const at::Tensor& scale,
                                   const at::Tensor& x, int64_t neurons) {
  check_dim(op, q_name, q, 2);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte, op, ": ",
                   q_name, " must be int8 (one weight per byte) or uint8 (packed int4, two "
                   "weights per byte), got ", q.scalar_type());
  check_contiguous(op, q_name, q);
  check_same_device(op, "x", x, q_name, q);
  if (q.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(x.size(1) % kPackedInt4ColumnMultiple == 0, op, ": packed int4 ", q_name,
                      " needs d_in to be a multiple of ", kPackedInt4ColumnMultiple,
                      " (rows of whole 16-byte words), got d_in ", x.size(1));
    TORCH_CHECK_VALUE(q.size(0) == neurons && q.size(1) * 2 == x.size(1), op, ": ", q_name,
                      " (packed int4, uint8) must have shape [", neurons, ", ", x.size(1) / 2,
                      "] (n_neurons, d_in / 2), got ", q.sizes());
  } else {
    TORCH_CHECK_VALUE(q.size(0) == neurons && q.size(1) == x.size(1), op, ": ", q_name,
                      " must have shape [", neurons, ", ", x.size(1), "] (n_neurons, d_in), got ",
                      q.sizes());
  }
  check_dim(op, s_name, scale, 2);
  check_dtype_in(op, s_name, scale, {at::kFloat});
  check_contiguous(op, s_name, scale);
  check_same_device(op, "x", x, s_name, scale);
  TORCH_CHECK_VALUE(scale.size(0) == neurons && scale.size(1) >= 1 &&
                        x.size(1) % scale.size(1) == 0,
                    op, ": ", s_name, " must have shape [", neurons,
                    ", groups] with groups dividing d_in (", x.size(1), "), got ", scale.sizes());
}

inline void check_float_bias(const char* op, const char* name, const c10::optional<at::Tensor>& b,
                             const at::Tensor& x, int64_t neurons) {
  if (!b.has_value()) return;
  check_dim(op, name, *b, 1);
  check_dtype_in(op, name, *b, {at::kFloat});
  check_contiguous(op, name, *b);
  check_same_device(op, "x", x, name, *b);
  TORCH_CHECK_VALUE(b->size(0) == neurons, op, ": ", name, " must have length ", neurons, ", got ",
                    b->size(0));
}

inline NeuronScoreShape check_neuron_scores(const char* op, const at::Tensor& x,
                                            const at::Tensor& q_up, const at::Tensor& up_scale,
                                            const c10::optional<at::Tensor>& q_gate,
                                            const c10::optional<at::Tensor>& gate_scale,
                                            const c10::optional<at::Tensor>& b_up,
                                            const c10::optional<at::Tensor>& b_gate) {
  check_dim(op, "x", x, 2);
  check_dtype_in(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  check_contiguous(op, "x", x);
  // Zero columns would make the scale group 0 (the kernels divide by it).
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x must have at least one column (d_in > 0), got shape ",
                    x.sizes());
  check_dim(op, "q_up", q_up, 2);
  const int64_t neurons = q_up.size(0);
  check_quantized_weight(op, "q_up", q_up, "up_scale", up_scale, x, neurons);
  TORCH_CHECK_VALUE(q_gate.has_value() == gate_scale.has_value(), op,
                    ": q_gate and gate_scale must be given together");
  if (q_gate.has_value()) {
    TORCH_CHECK_TYPE(q_gate->scalar_type() == q_up.scalar_type(), op,
                     ": q_gate must have q_up's storage dtype (", q_up.scalar_type(), "), got ",
                     q_gate->scalar_type());
    check_quantized_weight(op, "q_gate", *q_gate, "gate_scale", *gate_scale, x, neurons);
    TORCH_CHECK_VALUE(gate_scale->size(1) == up_scale.size(1), op,
                      ": gate_scale must have up_scale's groups (", up_scale.size(1), "), got ",
                      gate_scale->size(1));
  }
  check_float_bias(op, "b_up", b_up, x, neurons);
  check_float_bias(op, "b_gate", b_gate, x, neurons);
  TORCH_CHECK_VALUE(!b_gate.has_value() || q_gate.has_value(), op,
                    ": b_gate was given without q_gate");
  const int64_t group = x.size(1) / up_scale.size(1);
  TORCH_CHECK_VALUE(group % kScoreGroupMultiple == 0, op, ": the scale group (d_in / groups = ",
                    group, ") must be a multiple of ", kScoreGroupMultiple);
  return {x.size(0), x.size(1), neurons, group, q_gate.has_value(),
          q_up.scalar_type() == at::kByte};
}

}  // namespace fastllm::sparse
