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
  // [B, Hq] and per-entry group-summed probabilities float32 [B*Hkv, pages*page_rows].
  m.def("kv_ragged_decode(Tensor q, Tensor kv_rows, Tensor page_table, Tensor lengths, "
        "int page_rows, float scale, int num_splits) -> (Tensor, Tensor, Tensor)");
}
