// The Python module object for fastllm._C. The ops themselves register with the torch dispatcher
// when this library is loaded (TORCH_LIBRARY static initialisers); Python reaches them through
// torch.ops.fastllm, so this module only carries facts about the binary.
#include <pybind11/pybind11.h>

#include "common/index_errors.h"
#include "kv/kv_math.h"
#include "lora/lora_index.h"
#include "sparse/neuron_scores.h"
#include "sparse/sparse_mlp.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm compiled kernels (ops live in torch.ops.fastllm)";
  m.attr("with_cuda") = pybind11::bool_(FASTLLM_WITH_CUDA);
  // The index-validation mode and the error bits' names (the word itself is the op
  // fastllm::index_error_word, a tensor).
  m.def("set_index_debug_mode", &fastllm::set_index_debug_mode);
  m.def("index_debug_mode", &fastllm::index_debug_mode);
  m.def("describe_index_errors", &fastllm::describe_index_errors);
  // LoRA planning facts the Python layer builds plans with (one source of truth: lora_index.h).
  m.attr("lora_tile") = pybind11::int_(fastllm::lora::kTile);
  m.def("lora_gpu_prefers_sgmv", &fastllm::lora::gpu_prefers_sgmv);
  // Decode launch plans, exposed so the CPU tests check what the CUDA launches will use.
  m.def("lora_plan_shrink", [](int64_t tokens, int64_t slices, int64_t in, int64_t max_rank,
                               int64_t sms, int64_t vec) {
    const auto plan = fastllm::lora::plan_shrink(tokens, slices, in, max_rank, sms, vec);
    return pybind11::make_tuple(plan.splits, plan.chunk, plan.row_groups);
  });
  m.def("lora_plan_expand", [](int64_t tokens, int64_t slices, int64_t widest, int64_t vec,
                               int64_t sms) {
    const auto plan = fastllm::lora::plan_expand(tokens, slices, widest, vec, sms);
    return pybind11::make_tuple(plan.threads, plan.tiles);
  });
  // KV decode launch plans (kv_math.h), for the cache's split choice and the CPU tests.
  m.def("kv_plan_decode", [](int64_t group, int64_t d, int64_t elem_bytes) {
    const auto plan = fastllm::kv::plan_decode(group, d, elem_bytes);
    return pybind11::make_tuple(plan.grouped, plan.tile, plan.key_lanes, plan.shared_bytes);
  });
  m.def("kv_plan_decode_splits", &fastllm::kv::plan_decode_splits);
  m.def("sparse_plan_down", [](int64_t rows, int64_t d_out, int64_t k, bool per_row, int64_t sms,
                               int64_t vec) {
    const auto plan = fastllm::sparse::plan_sparse_down(rows, d_out, k, per_row, sms, vec);
    return pybind11::make_tuple(plan.col_tiles, plan.slices, plan.row_groups);
  });
  // The quantized predictor's and the up/gate kernel's CUDA launch plans, the x staging layout and
  // the code decoding (sparse/neuron_scores.h, sparse/sparse_mlp.h), for the CPU tests.
  m.def("sparse_plan_neuron_scores", [](int64_t rows, int64_t d, int64_t neurons, int64_t sms) {
    const auto plan = fastllm::sparse::plan_neuron_scores(rows, d, neurons, sms);
    return pybind11::make_tuple(plan.rows_per_pass, plan.blocks, plan.row_floats,
                                plan.shared_bytes);
  });
  m.def("sparse_staged_x_slot", &fastllm::sparse::staged_x_slot);
  m.def("sparse_plan_hidden", [](int64_t rows, int64_t d, int64_t k, bool per_row, int64_t sms) {
    const auto plan = fastllm::sparse::plan_sparse_hidden(rows, d, k, per_row, sms);
    return pybind11::make_tuple(plan.rows_per_pass, plan.blocks, plan.row_floats,
                                plan.shared_bytes);
  });
  m.def("sparse_int8_codes", [](uint32_t word) {
    pybind11::list out;
    for (int k = 0; k < 4; ++k) out.append(fastllm::sparse::int8_code(word, k));
    return out;
  });
  m.def("sparse_int4_codes", [](uint32_t word) {
    pybind11::list out;
    for (int k = 0; k < 8; ++k) out.append(fastllm::sparse::int4_code(word, k));
    return out;
  });
  m.attr("sparse_score_threads") = pybind11::int_(fastllm::sparse::kScoreThreads);
  m.attr("sparse_score_shared_budget") = pybind11::int_(fastllm::sparse::kScoreSharedBudget);
  m.def("lora_plan_sgmv_mma", [](int64_t max_rank, int64_t widest) {
    const auto plan = fastllm::lora::plan_sgmv_mma(max_rank, widest);
    return pybind11::make_tuple(plan.rank_groups, plan.column_blocks);
  });
  m.def("lora_plan_sgmv_mma_k_splits", &fastllm::lora::plan_sgmv_mma_k_splits);
  m.attr("lora_mma_ranks") = pybind11::int_(fastllm::lora::kMmaRanks);
  m.attr("lora_mma_chunk") = pybind11::int_(fastllm::lora::kMmaChunk);
  m.attr("lora_mma_columns") = pybind11::int_(fastllm::lora::kMmaColumns);
  m.attr("lora_shrink_threads") = pybind11::int_(fastllm::lora::kShrinkWarps * 32);
  m.attr("lora_expand_threads") = pybind11::int_(fastllm::lora::kExpandThreads);
  m.attr("lora_max_shrink_chunk") = pybind11::int_(fastllm::lora::kMaxShrinkChunk);
}
