// The Python module object for fastllm._C. The ops themselves register with the torch dispatcher
// when this library is loaded (TORCH_LIBRARY static initialisers); Python reaches them through
// torch.ops.fastllm, so this module only carries facts about the binary.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/index_errors.h"
#include "kv/kv_math.h"
#include "kv/kv_mirror.h"
#include "lora/lora_index.h"
#include "sparse/neuron_scores.h"
#include "sparse/sparse_mlp.h"

namespace {

// A flat tile list must be whole (first, end, adapter) triples.
void check_flat_tiles(const char* fn, const std::vector<int32_t>& tiles) {
  if (tiles.size() % 3 != 0) {
    throw pybind11::value_error(std::string(fn) + ": tiles must be flat (first, end, adapter) "
                                "triples, got " + std::to_string(tiles.size()) + " values");
  }
}

// The data of a numpy array the caller owns, used in place: refused unless it has exactly the
// dtype, shape and layout asked for (pybind11 would otherwise convert it into a copy, and writes
// would be lost).
template <typename T>
T* numpy_data(pybind11::array& a, const char* fn, const char* name, pybind11::ssize_t rows,
              pybind11::ssize_t cols = -1) {
  const bool shape_ok = cols < 0 ? a.ndim() == 1 && a.shape(0) == rows
                                 : a.ndim() == 2 && a.shape(0) == rows && a.shape(1) == cols;
  if (!a.dtype().is(pybind11::dtype::of<T>()) || !shape_ok ||
      !(a.flags() & pybind11::array::c_style) || !a.writeable()) {
    throw pybind11::value_error(std::string(fn) + ": " + name + " must be a writeable, "
                                "C-contiguous numpy array of " + std::string(pybind11::str(
                                pybind11::dtype::of<T>())) + " with the caches' shape");
  }
  return static_cast<T*>(a.mutable_data());
}

}  // namespace

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
  // Which rows of a work list (int32 [items, 2]) pass the per-row check each CUDA block makes.
  m.def("kv_work_rows_valid",
        [](pybind11::array_t<int32_t, pybind11::array::c_style | pybind11::array::forcecast> work,
           int64_t caches) {
          if (work.ndim() != 2 || work.shape(1) != 2) {
            throw pybind11::value_error("kv_work_rows_valid: work must be [items, 2]");
          }
          std::vector<bool> valid;
          for (pybind11::ssize_t i = 0; i < work.shape(0); ++i) {
            valid.push_back(fastllm::kv::work_row_valid(work.data(), work.shape(0), i, caches));
          }
          return valid;
        });
  // The decode work list from length bounds (numpy int64 [caches]): (chunk, int32 [items, 2]).
  m.def("kv_plan_decode_work",
        [](pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast> bounds,
           int64_t sms) {
          if (bounds.ndim() != 1) {
            throw pybind11::value_error("kv_plan_decode_work: bounds must be 1-D, got " +
                                        std::to_string(bounds.ndim()) + " dimensions");
          }
          const int64_t* data = bounds.data();
          for (pybind11::ssize_t c = 0; c < bounds.shape(0); ++c) {
            if (data[c] < 0 || data[c] > std::numeric_limits<int32_t>::max()) {
              throw pybind11::value_error("kv_plan_decode_work: bounds must lie in [0, 2^31), "
                                          "got " + std::to_string(data[c]) + " for cache " +
                                          std::to_string(c));
            }
          }
          std::vector<int32_t> work;
          const int64_t chunk =
              fastllm::kv::plan_decode_work(bounds.data(), bounds.shape(0), sms, work);
          const auto items = static_cast<pybind11::ssize_t>(work.size() / 2);
          pybind11::array_t<int32_t> rows({items, pybind11::ssize_t{2}});
          std::copy(work.begin(), work.end(), rows.mutable_data());
          return pybind11::make_tuple(chunk, rows);
        });
  // A FastGenCache layer's host mirror advanced in place (kv_mirror.h); numpy arrays [caches]
  // and the known classes uint8 [sequences, columns].
  m.def("kv_advance_mirror",
        [](pybind11::array seq, pybind11::array offset, pybind11::array window,
           pybind11::array sinks, pybind11::array heavy, pybind11::array keep,
           pybind11::array grow, pybind11::array dep, pybind11::array len,
           pybind11::array evictable, pybind11::array seen_cols, int64_t seen,
           pybind11::array classes, int64_t known) {
          constexpr const char* fn = "kv_advance_mirror";
          const pybind11::ssize_t caches = len.ndim() == 1 ? len.shape(0) : -1;
          if (classes.ndim() != 2 || classes.shape(1) < 1) {
            throw pybind11::value_error("kv_advance_mirror: classes must be [sequences, columns]");
          }
          const fastllm::kv::MirrorCaches mirror{
              caches, numpy_data<int64_t>(seq, fn, "seq", caches),
              numpy_data<int64_t>(offset, fn, "offset", caches),
              numpy_data<int64_t>(window, fn, "window", caches),
              numpy_data<int64_t>(sinks, fn, "sinks", caches),
              numpy_data<int64_t>(heavy, fn, "heavy", caches),
              numpy_data<uint8_t>(keep, fn, "keep", caches),
              numpy_data<bool>(grow, fn, "grow", caches), numpy_data<bool>(dep, fn, "dep", caches),
              numpy_data<int64_t>(len, fn, "len", caches),
              numpy_data<int64_t>(evictable, fn, "evictable", caches),
              numpy_data<int64_t>(seen_cols, fn, "seen", caches)};
          const uint8_t* class_data =
              numpy_data<uint8_t>(classes, fn, "classes", classes.shape(0), classes.shape(1));
          for (pybind11::ssize_t c = 0; c < caches; ++c) {
            if (mirror.seq[c] < 0 || mirror.seq[c] >= classes.shape(0)) {
              throw pybind11::value_error("kv_advance_mirror: seq must lie in [0, sequences)");
            }
          }
          fastllm::kv::advance_mirror(mirror, seen, class_data, classes.shape(1), known);
        });
  // The mirror's room for mask columns < seen_to: (pages short, longest length bound), and
  // whether some cache holds pages past its bound (kv_mirror.h).
  m.def("kv_mirror_room", [](pybind11::array len, pybind11::array seen, pybind11::array npages,
                             int64_t seen_to, int64_t page_rows) {
    constexpr const char* fn = "kv_mirror_room";
    const pybind11::ssize_t caches = len.ndim() == 1 ? len.shape(0) : -1;
    if (page_rows < 1) throw pybind11::value_error("kv_mirror_room: page_rows must be >= 1");
    const auto room = fastllm::kv::mirror_room(
        caches, numpy_data<int64_t>(len, fn, "len", caches),
        numpy_data<int64_t>(seen, fn, "seen", caches),
        numpy_data<int64_t>(npages, fn, "npages", caches), seen_to, page_rows);
    return pybind11::make_tuple(room.short_pages, room.longest);
  });
  m.def("kv_mirror_has_excess", [](pybind11::array len, pybind11::array seen,
                                   pybind11::array npages, int64_t seen_to, int64_t page_rows) {
    constexpr const char* fn = "kv_mirror_has_excess";
    const pybind11::ssize_t caches = len.ndim() == 1 ? len.shape(0) : -1;
    if (page_rows < 1) throw pybind11::value_error("kv_mirror_has_excess: page_rows must be >= 1");
    return fastllm::kv::mirror_has_excess(
        caches, numpy_data<int64_t>(len, fn, "len", caches),
        numpy_data<int64_t>(seen, fn, "seen", caches),
        numpy_data<int64_t>(npages, fn, "npages", caches), seen_to, page_rows);
  });
  // blocks_per_sm: the kernel's occupancy, which the CUDA code asks the runtime for.
  m.def("sparse_plan_down", [](int64_t rows, int64_t d_out, int64_t k, bool per_row, int64_t sms,
                               int64_t vec, int64_t blocks_per_sm, int64_t rows_per_pass) {
    const auto plan = fastllm::sparse::plan_sparse_down(rows, d_out, k, per_row, sms, vec,
                                                        blocks_per_sm, rows_per_pass);
    return pybind11::make_tuple(plan.col_tiles, plan.slices, plan.row_groups);
  });
  // The quantized predictor's and the up/gate kernel's CUDA launch plans, the x staging layout and
  // the code decoding (sparse/neuron_scores.h, sparse/sparse_mlp.h), for the CPU tests.
  m.def("sparse_plan_neuron_scores", [](int64_t rows, int64_t d, int64_t neurons, int64_t sms,
                                        int64_t blocks_per_sm) {
    const auto plan = fastllm::sparse::plan_neuron_scores(rows, d, neurons, sms, blocks_per_sm);
    return pybind11::make_tuple(plan.rows_per_pass, plan.blocks, plan.row_floats,
                                plan.shared_bytes);
  });
  m.def("sparse_staged_x_slot", &fastllm::sparse::staged_x_slot);
  m.def("sparse_rows_per_pass", &fastllm::sparse::sparse_rows_per_pass);
  m.def("sparse_plan_hidden", [](int64_t rows, int64_t d, int64_t k, bool per_row, int64_t sms,
                                 int64_t blocks_per_sm, int64_t rows_per_pass) {
    const auto plan = fastllm::sparse::plan_sparse_hidden(rows, d, k, per_row, sms, blocks_per_sm,
                                                          rows_per_pass);
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
  // SGMV chunks for the tensor-core kernels, from a plan's tiles given flat (first, end, adapter,
  // ...): fastllm.ops.lora_sgmv_chunks checks the tensor and calls these.
  m.def("lora_plan_sgmv_chunk_rows", [](const std::vector<int32_t>& tiles, int64_t sms) {
    check_flat_tiles("lora_plan_sgmv_chunk_rows", tiles);
    if (sms < 1) throw pybind11::value_error("lora_plan_sgmv_chunk_rows: sms must be >= 1");
    return fastllm::lora::plan_sgmv_chunk_rows(tiles.data(), tiles.size() / 3, sms);
  });
  m.def("lora_sgmv_chunks", [](const std::vector<int32_t>& tiles, int64_t rows) {
    check_flat_tiles("lora_sgmv_chunks", tiles);
    if (rows < fastllm::lora::kTile || rows > fastllm::lora::kMaxChunk ||
        rows % fastllm::lora::kTile != 0) {
      throw pybind11::value_error("lora_sgmv_chunks: rows must be a multiple of " +
                                  std::to_string(fastllm::lora::kTile) + " in [" +
                                  std::to_string(fastllm::lora::kTile) + ", " +
                                  std::to_string(fastllm::lora::kMaxChunk) + "], got " +
                                  std::to_string(rows));
    }
    return fastllm::lora::build_chunks(tiles.data(), tiles.size() / 3, rows);
  });
  m.attr("lora_max_chunk") = pybind11::int_(fastllm::lora::kMaxChunk);
  m.attr("lora_mma_row_tile") = pybind11::int_(fastllm::lora::kMmaRowTile);
  m.attr("lora_mma_ranks") = pybind11::int_(fastllm::lora::kMmaRanks);
  m.attr("lora_mma_split_k") = pybind11::int_(fastllm::lora::kMmaSplitK);
  m.attr("lora_mma_stage_k") = pybind11::int_(fastllm::lora::kMmaStageK);
  m.attr("lora_mma_columns") = pybind11::int_(fastllm::lora::kMmaColumns);
  m.attr("lora_shrink_threads") = pybind11::int_(fastllm::lora::kShrinkWarps * 32);
  m.attr("lora_expand_threads") = pybind11::int_(fastllm::lora::kExpandThreads);
  m.attr("lora_max_shrink_chunk") = pybind11::int_(fastllm::lora::kMaxShrinkChunk);

  // What a CPU parallel call's timings decide (common/cpu_parallel.h): (serial calls next,
  // the stretch after the next late thread).
  m.def("cpu_backoff_after", [](int64_t work_ns, int64_t wait_ns, int64_t stretch) {
    const fastllm::cpu::BackoffDecision d = fastllm::cpu::backoff_after(work_ns, wait_ns, stretch);
    return pybind11::make_tuple(d.serial_calls, d.next_stretch);
  });
  m.attr("cpu_first_serial_stretch") = pybind11::int_(fastllm::cpu::kFirstSerialStretch);
  m.attr("cpu_max_serial_stretch") = pybind11::int_(fastllm::cpu::kMaxSerialStretch);
  m.attr("cpu_wait_floor_ns") = pybind11::int_(fastllm::cpu::kWaitFloorNs);
}
