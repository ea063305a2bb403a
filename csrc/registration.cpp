// The one place where fastllm's op schemas are declared. This file is always compiled, so a
// CPU-only build still exposes every op; the per-capability *_cpu.cpp and *_cuda.cu files only add
// implementations for their dispatch key.
#include <torch/library.h>

#include "common/index_errors.h"

TORCH_LIBRARY(fastllm, m) {
  // ---- index validation (common/index_errors.h) ------------------------------------------------
  // The device's error word: int32 [1], a bit per (op, argument) whose kernel met an index out of
  // range (and skipped it). Reading its value is the caller's synchronisation, not the op's.
  m.def("index_error_word(Device device) -> Tensor",
        [](c10::Device device) { return fastllm::index_error_word(device); });
  // ---- memory: the unified page pool -----------------------------------------------------------
  // pool is a [num_slots, width] view of the pool's storage; rows[i] goes to pool[slots[i]].
  m.def("pool_write(Tensor(a!) pool, Tensor slots, Tensor rows) -> ()");
  // out[i] = pool[slots[i]]; slots may repeat.
  m.def("pool_gather(Tensor pool, Tensor slots) -> Tensor");
  // ---- sparse: Deja Vu contextual-sparsity MLP ---------------------------------------------------
  // out = b_down + sum over active neurons j of h_j * w_down_t[j], h_j = act(gate_j) * up_j (gated)
  // or act(up_j). active_idx: 1-D, one set for every row, or 2-D [rows, k], a set per row (the
  // first counts[r] entries of row r when counts is given).
  m.def("sparse_mlp(Tensor x, Tensor w_up, Tensor? w_gate, Tensor w_down_t, Tensor? b_up, "
        "Tensor? b_gate, Tensor? b_down, Tensor active_idx, Tensor? counts, str activation, "
        "bool deterministic=False) -> Tensor");
  // fp32 [rows, n] neuron scores |act(g) * u| (|act(u)| without a gate) from quantized weights with
  // one fp32 scale per group of input columns: u = sum over groups of up_scale * (q_up . x) + b_up.
  // q_up / q_gate: int8 [n, d_in] (one weight per byte) or uint8 [n, d_in / 2] (packed int4: column
  // 2i in the low nibble of byte i, 2i + 1 in the high one; sparse/neuron_scores.h).
  // quantize_x: x rounded to int8 per scale group first (sparse/neuron_scores.h), integer dots.
  m.def("quantized_neuron_scores(Tensor x, Tensor q_up, Tensor up_scale, Tensor? q_gate, "
        "Tensor? gate_scale, Tensor? b_up, Tensor? b_gate, str activation, "
        "bool quantize_x=False) -> Tensor");

  // ---- galore: gradient low-rank projection (GaLore) ---------------------------------------------
  // A projected weight W (m x n) has projectors left (m x r) and/or right (r x n); its low-rank
  // gradient is left^T grad right^T (a missing side is skipped). One fused Adam step: moments in
  // the low-rank space (fp32), W = decay * W + alpha * left (m / (sqrt(v) + eps)) right with
  // decay = 1 - lr * weight_decay and alpha = -lr * bias_correction(step) * scale * decay.
  // Without projectors it is a plain AdamW step on W. grad_is_projected: grad is already low-rank.
  // found_inf: one element on param's device (bool or float, as torch.amp makes it); non-zero
  // skips the step (W and moments unchanged), decided on the device without a host sync.
  m.def("galore_adam_step(Tensor(a!) param, Tensor grad, Tensor? left, Tensor? right, "
        "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, bool grad_is_projected, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float scale, int step, "
        "Tensor? found_inf=None) -> ()");
  // The same with blockwise 8-bit moments: int8/uint8 codes, one fp32 absmax per 256 elements.
  m.def("galore_adam8bit_step(Tensor(a!) param, Tensor grad, Tensor? left, Tensor? right, "
        "Tensor(b!) exp_avg_codes, Tensor(c!) exp_avg_absmax, Tensor(d!) exp_avg_sq_codes, "
        "Tensor(e!) exp_avg_sq_absmax, bool grad_is_projected, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, float scale, int step, "
        "Tensor? found_inf=None) -> ()");
  // left^T grad right^T as a new fp32 tensor.
  m.def("galore_project(Tensor grad, Tensor? left, Tensor? right) -> Tensor");
  // param = beta * param + alpha * (left low right), in place.
  m.def("galore_project_back_(Tensor(a!) param, Tensor low, Tensor? left, Tensor? right, "
        "float alpha, float beta) -> ()");

  // ---- lora: paged multi-adapter LoRA (S-LoRA) --------------------------------------------------
  // Adapter rows live anywhere in `pool` (the flat storage of a page pool); row j of slice s of the
  // batch's adapter a starts at element a_rows[s, a, j] (b_rows for B^T rows). token_adapter[t] is
  // the batch adapter of token t, or -1 for the base model. path: 0 auto, 1 BGMV, 2 SGMV.
  // h[s, t, j] = x[t] . A_{s,a,j} for j < ranks[s, a], else 0; h is float32 (float64 for float64).
  // sgmv_order / sgmv_tiles: an SGMV plan (lora/lora_index.h), built once per batch by
  // fastllm.ops.lora_sgmv_plan; CUDA runs SGMV only with one (the CPU builds its own if absent).
  // sgmv_chunks: the plan's tokens in chunks of up to 64 (fastllm.ops.lora_sgmv_chunks) for the
  // tensor-core kernels, which take the tiles as chunks without it; the CPU checks and ignores it.
  m.def("lora_shrink(Tensor x, Tensor pool, Tensor a_rows, Tensor ranks, Tensor token_adapter, "
        "int path=0, Tensor? sgmv_order=None, Tensor? sgmv_tiles=None, "
        "Tensor? sgmv_chunks=None) -> Tensor");
  // y[t, slice s] += scalings[s, a] * sum_j h[s, t, j] * B^T_{s,a,j}; slice s is slice_sizes[s]
  // columns wide, slices laid side by side. Tokens with adapter -1 are left untouched.
  m.def("lora_expand(Tensor(a!) y, Tensor h, Tensor pool, Tensor b_rows, Tensor ranks, "
        "Tensor scalings, Tensor token_adapter, int[] slice_sizes, int path=0, "
        "Tensor? sgmv_order=None, Tensor? sgmv_tiles=None, Tensor? sgmv_chunks=None) -> ()");

  // ---- kv: FastGen profiling and ragged per-head decode attention ------------------------------
  // q [Hq, Lq, D] (the last Lq positions), k [Hkv, Lk, D]: per-key attention summed over each KV
  // head's query group and all causal queries, float32 [Hkv, Lk]; chunk query rows at a time.
  m.def("kv_attention_scores(Tensor q, Tensor k, float scale, int chunk) -> Tensor");
  // Mean attention mass kept by FastGen's cumulative policies (special, +punct, +local, +heavy),
  // float32 [Hkv, 4]; key_class uint8 [Hkv, Lk] bits 1 special, 2 punct, 4 heavy.
  m.def("kv_policy_recovery(Tensor q, Tensor k, Tensor key_class, int window, float scale, "
        "int chunk) -> Tensor");
  // One query per sequence over ragged paged caches: kv_rows [slots, 2D] (key | value),
  // page_table int32 [B*Hkv, pages], lengths int32 [B*Hkv]. Returns out [B, Hq, D], lse float32
  // [B, Hq] and per-entry group-summed probabilities float32 [B*Hkv, pages*page_rows]. The work
  // is num_splits even splits of every cache, or the work list `work` int32 [items, 2] (cache,
  // first entry) (kv_math.h, plan_decode_work), with num_splits 1.
  m.def("kv_ragged_decode(Tensor q, Tensor kv_rows, Tensor page_table, Tensor lengths, "
        "int page_rows, float scale, int num_splits, Tensor? work=None) -> (Tensor, Tensor, Tensor)");
  // One decode step's eviction over C ragged caches' bookkeeping, rows [C, capacity]: adds
  // step_scores [C, W] into score, then every cache (grow false) whose evictable entries (flags bit
  // 8 clear, newest - pos >= window) outnumber heavy evicts its lowest-score one, the first on
  // ties, and its last entry's bookkeeping moves into the hole. Returns int64 [C, 2]: (victim,
  // last) per cache, -1 where none was evicted; the caller moves the pool rows likewise.
  m.def("kv_evict_round(Tensor(a!) pos, Tensor(b!) score, Tensor(c!) flags, Tensor(d!) lengths, "
        "Tensor step_scores, Tensor newest, Tensor window, Tensor heavy, Tensor grow) -> Tensor");
  // A whole decode step of C = B * Hkv ragged caches, in place: each cache's new entry (new_rows
  // [C, 2D] into the pool, new_pos, class new_class uint8 [C], flags with KEEP where keep_classes
  // or sinks say so, score 0) goes to entry lengths[c] (int64), or with `capacity` int64 [C]
  // (graph steps) to min(lengths[c], capacity[c] - 1); then kv_ragged_decode's attention, its
  // probabilities added into score; then kv_evict_round's eviction with newest = new_pos, the
  // pool row of each evicting cache's last entry moved into the hole. Returns out [B, Hq, D] and
  // the moves int64 [C, 2] (victim, last; -1 where none).
  m.def("kv_decode_step(Tensor q, Tensor new_rows, Tensor new_pos, Tensor new_class, "
        "Tensor(a!) kv_rows, Tensor page_table, Tensor(b!) lengths, Tensor(c!) pos, "
        "Tensor(d!) score, Tensor(e!) flags, Tensor keep_classes, Tensor sinks, Tensor window, "
        "Tensor heavy, Tensor grow, int page_rows, float scale, int num_splits, "
        "Tensor? work=None, Tensor? capacity=None) -> (Tensor, Tensor)");
}
