// Argument validation and SGMV tile construction for the LoRA ops, identical for every device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "lora/lora_index.h"

namespace fastllm::lora {

// Shapes, dtypes and devices of the arguments both ops share. Returns nothing; throws on misuse.
inline void check_tables(const char* op, const char* rows_name, const at::Tensor& pool,
                         const at::Tensor& rows, const at::Tensor& ranks,
                         const at::Tensor& token_adapter, int64_t tokens, int64_t path) {
  check_dim(op, "pool", pool, 1);
  check_float_dtype(op, "pool", pool);
  check_contiguous(op, "pool", pool);
  check_dim(op, rows_name, rows, 3);
  check_dtype_in(op, rows_name, rows, {at::kLong});
  check_contiguous(op, rows_name, rows);
  check_same_device(op, "pool", pool, rows_name, rows);
  check_dim(op, "ranks", ranks, 2);
  check_dtype_in(op, "ranks", ranks, {at::kInt});
  check_contiguous(op, "ranks", ranks);
  check_same_device(op, "pool", pool, "ranks", ranks);
  TORCH_CHECK_VALUE(ranks.size(0) == rows.size(0) && ranks.size(1) == rows.size(1), op,
                    ": ranks must have shape [slices, adapters] = [", rows.size(0), ", ",
                    rows.size(1), "] to match ", rows_name, ", got ", ranks.sizes());
  check_dim(op, "token_adapter", token_adapter, 1);
  check_index_dtype(op, "token_adapter", token_adapter);
  check_contiguous(op, "token_adapter", token_adapter);
  check_same_device(op, "pool", pool, "token_adapter", token_adapter);
  TORCH_CHECK_VALUE(token_adapter.size(0) == tokens, op, ": token_adapter must have one entry per "
                    "token (", tokens, "), got ", token_adapter.size(0));
  TORCH_CHECK_VALUE(path == kAuto || path == kBgmv || path == kSgmv, op,
                    ": path must be 0 (auto), 1 (BGMV) or 2 (SGMV), got ", path);
}

// An optional SGMV plan (lora_index.h): both tensors or neither, int32, on the pool's device.
inline void check_plan(const char* op, const at::Tensor& pool,
                       const c10::optional<at::Tensor>& order,
                       const c10::optional<at::Tensor>& tiles, int64_t tokens) {
  TORCH_CHECK_VALUE(order.has_value() == tiles.has_value(), op,
                    ": sgmv_order and sgmv_tiles must be given together (build both with "
                    "fastllm.ops.lora_sgmv_plan), got only ",
                    order.has_value() ? "sgmv_order" : "sgmv_tiles");
  if (!order.has_value()) return;
  check_dim(op, "sgmv_order", *order, 1);
  check_dtype_in(op, "sgmv_order", *order, {at::kInt});
  check_contiguous(op, "sgmv_order", *order);
  check_same_device(op, "pool", pool, "sgmv_order", *order);
  TORCH_CHECK_VALUE(order->size(0) <= tokens, op, ": sgmv_order lists at most one entry per token (",
                    tokens, "), got ", order->size(0));
  check_dim(op, "sgmv_tiles", *tiles, 2);
  check_dtype_in(op, "sgmv_tiles", *tiles, {at::kInt});
  check_contiguous(op, "sgmv_tiles", *tiles);
  check_same_device(op, "pool", pool, "sgmv_tiles", *tiles);
  TORCH_CHECK_VALUE(tiles->size(1) == kTileFields, op,
                    ": sgmv_tiles must be [tiles, 3] (first, end, adapter), got ", tiles->sizes());
}

// An optional chunk list (lora_index.h, build_chunks): only with a plan, int32 [chunks, 3], on
// the pool's device.
inline void check_chunks(const char* op, const at::Tensor& pool,
                         const c10::optional<at::Tensor>& order,
                         const c10::optional<at::Tensor>& chunks) {
  if (!chunks.has_value()) return;
  TORCH_CHECK_VALUE(order.has_value(), op, ": sgmv_chunks needs the plan it was built from "
                    "(sgmv_order and sgmv_tiles)");
  check_dim(op, "sgmv_chunks", *chunks, 2);
  check_dtype_in(op, "sgmv_chunks", *chunks, {at::kInt});
  check_contiguous(op, "sgmv_chunks", *chunks);
  check_same_device(op, "pool", pool, "sgmv_chunks", *chunks);
  TORCH_CHECK_VALUE(chunks->size(1) == kTileFields, op,
                    ": sgmv_chunks must be [chunks, 3] (first, end, adapter), got ",
                    chunks->sizes());
}

// A tile or chunk list (host memory) must cover every token with an adapter exactly once, each
// item 1 to `cap` entries of `order`, all of the item's adapter.
inline void check_work_list(const char* op, const char* name, const at::Tensor& items, int64_t cap,
                            const int32_t* listed, int64_t listed_count, const int64_t* ids,
                            int64_t tokens, int64_t adapters) {
  const int32_t* item = items.data_ptr<int32_t>();
  std::vector<int8_t> seen(tokens, 0);
  int64_t covered = 0;
  for (int64_t i = 0; i < items.size(0); ++i) {
    const int64_t first = item[kTileFields * i], end = item[kTileFields * i + 1];
    const int64_t a = item[kTileFields * i + 2];
    TORCH_CHECK_INDEX(0 <= first && first < end && end <= listed_count && end - first <= cap,
                      op, ": ", name, "[", i, "] = (", first, ", ", end, ", ", a,
                      ") must cover 1 to ", cap, " entries of sgmv_order (", listed_count,
                      " entries)");
    TORCH_CHECK_INDEX(0 <= a && a < adapters, op, ": ", name, "[", i, "] names adapter ", a,
                      ", outside [0, ", adapters, ")");
    for (int64_t k = first; k < end; ++k) {
      const int64_t t = listed[k];
      TORCH_CHECK_INDEX(0 <= t && t < tokens && ids[t] == a && !seen[t], op, ": sgmv_order[", k,
                        "] = ", t, " in ", name, "[", i, "] of adapter ", a, " is not a token of "
                        "that adapter listed once (rebuild the plan from token_adapter)");
      seen[t] = 1;
      ++covered;
    }
  }
  int64_t with_adapter = 0;
  for (int64_t t = 0; t < tokens; ++t) with_adapter += ids[t] >= 0;
  TORCH_CHECK_VALUE(covered == with_adapter, op, ": ", name, " covers ", covered,
                    " tokens but token_adapter gives ", with_adapter, " tokens an adapter");
}

// SGMV work list: `order` lists the tokens grouped by adapter (tokens without an adapter left out);
// tile i covers order[tile[3i] .. tile[3i + 1]) and uses adapter tile[3i + 2] (the layout of an
// sgmv_tiles tensor). Plain vectors so the CPU path allocates no tensors.
struct Tiles {
  std::vector<int32_t> order;
  std::vector<int32_t> tile;  // kTileFields entries per tile
  int64_t count() const { return static_cast<int64_t>(tile.size()) / kTileFields; }
};

// A counting sort over host adapter ids: O(tokens + adapters).
inline Tiles build_tiles(const std::vector<int64_t>& ids, int64_t adapters) {
  std::vector<int64_t> start(adapters + 1, 0);
  for (int64_t id : ids) {
    if (id >= 0) ++start[id + 1];
  }
  for (int64_t a = 0; a < adapters; ++a) start[a + 1] += start[a];
  Tiles tiles;
  tiles.order.resize(start[adapters]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (size_t t = 0; t < ids.size(); ++t) {
    if (ids[t] >= 0) tiles.order[fill[ids[t]]++] = static_cast<int32_t>(t);
  }
  for (int64_t a = 0; a < adapters; ++a) {
    for (int64_t b = start[a]; b < start[a + 1]; b += kTile) {
      tiles.tile.push_back(static_cast<int32_t>(b));
      tiles.tile.push_back(static_cast<int32_t>(std::min<int64_t>(b + kTile, start[a + 1])));
      tiles.tile.push_back(static_cast<int32_t>(a));
    }
  }
  return tiles;
}

// Value checks, on host copies: ranks in [0, max_rank], tokens' adapters in [-1, adapters), every
// row a token can read inside the pool, and a given plan consistent with token_adapter. Always
// for CPU tensors; for CUDA tensors only in the debug mode (otherwise the kernels guard every
// index and report through the device error word).
inline void check_values(const char* op, const char* rows_name, const at::Tensor& pool,
                         const at::Tensor& rows_in, const at::Tensor& ranks_in,
                         const at::Tensor& token_adapter_in, const std::vector<int64_t>& widths,
                         const c10::optional<at::Tensor>& order_in,
                         const c10::optional<at::Tensor>& tiles_in,
                         const c10::optional<at::Tensor>& chunks_in) {
  // BEGIN host value checks
  if (!host_checks_index_values(pool)) return;
  const at::Tensor rows = rows_in.cpu(), ranks = ranks_in.cpu();
  const at::Tensor token_adapter = token_adapter_in.to(at::kCPU, at::kLong);
  const at::Tensor order = order_in.has_value() ? order_in->cpu() : at::Tensor();
  const at::Tensor tiles = tiles_in.has_value() ? tiles_in->cpu() : at::Tensor();
  const at::Tensor chunks = chunks_in.has_value() ? chunks_in->cpu() : at::Tensor();
  // END host value checks
  const int64_t slices = rows.size(0), adapters = rows.size(1), max_rank = rows.size(2);
  const int64_t pool_size = pool.numel();
  const int32_t* rank = ranks.data_ptr<int32_t>();
  const int64_t* offset = rows.data_ptr<int64_t>();
  for (int64_t s = 0; s < slices; ++s) {
    for (int64_t a = 0; a < adapters; ++a) {
      const int32_t r = rank[s * adapters + a];
      TORCH_CHECK_VALUE(r >= 0 && r <= max_rank, op, ": ranks must lie in [0, ", max_rank,
                        "] (the width of ", rows_name, "), got ", r, " at [", s, ", ", a, "]");
      for (int64_t j = 0; j < r; ++j) {
        const int64_t o = offset[table_index(s, a, j, adapters, max_rank)];
        TORCH_CHECK_INDEX(o >= 0 && o <= pool_size - widths[s], op, ": ", rows_name, "[", s,
                          ", ", a, ", ", j, "] = ", o, " puts a row of ", widths[s],
                          " elements outside the pool of ", pool_size, " elements");
      }
    }
  }
  const int64_t* ids = token_adapter.data_ptr<int64_t>();
  const int64_t tokens = token_adapter.numel();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_INDEX(ids[t] >= -1 && ids[t] < adapters, op, ": token_adapter must lie in [-1, ",
                      adapters, "), got ", ids[t], " at token ", t);
  }
  if (!order.defined()) return;
  // The plan must be the one lora_sgmv_plan builds from token_adapter (up to tile order), and the
  // chunks a regrouping of the same tokens.
  const int32_t* listed = order.data_ptr<int32_t>();
  check_work_list(op, "sgmv_tiles", tiles, kTile, listed, order.numel(), ids, tokens, adapters);
  if (chunks.defined()) {
    check_work_list(op, "sgmv_chunks", chunks, kMaxChunk, listed, order.numel(), ids, tokens,
                    adapters);
  }
}

// Tiles of a plan tensor (host memory), or built from token_adapter when there is none.
inline Tiles host_tiles(const std::vector<int64_t>& ids, int64_t adapters,
                        const c10::optional<at::Tensor>& order,
                        const c10::optional<at::Tensor>& tiles) {
  if (!order.has_value()) return build_tiles(ids, adapters);
  Tiles out;
  out.order.assign(order->data_ptr<int32_t>(), order->data_ptr<int32_t>() + order->numel());
  out.tile.assign(tiles->data_ptr<int32_t>(), tiles->data_ptr<int32_t>() + tiles->numel());
  return out;
}

inline at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_shrink(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                         const at::Tensor& ranks, const at::Tensor& token_adapter, int64_t path,
                         const c10::optional<at::Tensor>& order,
                         const c10::optional<at::Tensor>& tiles,
                         const c10::optional<at::Tensor>& chunks) {
  constexpr const char* op = "fastllm.lora_shrink";
  check_dim(op, "x", x, 2);
  check_float_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  check_same_dtype(op, "x", x, "pool", pool);
  check_same_device(op, "x", x, "pool", pool);
  check_tables(op, "a_rows", pool, a_rows, ranks, token_adapter, x.size(0), path);
  check_plan(op, pool, order, tiles, x.size(0));
  check_chunks(op, pool, order, chunks);
  check_values(op, "a_rows", pool, a_rows, ranks, token_adapter,
               std::vector<int64_t>(a_rows.size(0), x.size(1)), order, tiles, chunks);
}

inline std::vector<int64_t> check_expand(const at::Tensor& y, const at::Tensor& h,
                                         const at::Tensor& pool, const at::Tensor& b_rows,
                                         const at::Tensor& ranks, const at::Tensor& scalings,
                                         const at::Tensor& token_adapter,
                                         at::IntArrayRef slice_sizes, int64_t path,
                                         const c10::optional<at::Tensor>& order,
                                         const c10::optional<at::Tensor>& tiles,
                                         const c10::optional<at::Tensor>& chunks) {
  constexpr const char* op = "fastllm.lora_expand";
  check_dim(op, "y", y, 2);
  check_float_dtype(op, "y", y);
  check_contiguous(op, "y", y);
  check_same_dtype(op, "y", y, "pool", pool);
  check_same_device(op, "y", y, "pool", pool);
  check_tables(op, "b_rows", pool, b_rows, ranks, token_adapter, y.size(0), path);
  const int64_t slices = b_rows.size(0);
  TORCH_CHECK_VALUE(static_cast<int64_t>(slice_sizes.size()) == slices, op,
                    ": slice_sizes must have one entry per slice (", slices, "), got ",
                    slice_sizes.size());
  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (int64_t s = 0; s < slices; ++s) {
    // Bounded by what is left of y's width, so the running total cannot overflow.
    TORCH_CHECK_VALUE(slice_sizes[s] >= 0 && slice_sizes[s] <= y.size(1) - total, op,
                      ": slice_sizes must be >= 0 and add up to y's width ", y.size(1), ", got ",
                      slice_sizes);
    offsets.push_back(total);
    total += slice_sizes[s];
  }
  TORCH_CHECK_VALUE(total == y.size(1), op, ": slice_sizes must add up to y's width ", y.size(1),
                    ", got ", slice_sizes);
  check_dim(op, "h", h, 3);
  TORCH_CHECK_TYPE(h.scalar_type() == accumulate_dtype(y.scalar_type()), op, ": h must be ",
                   accumulate_dtype(y.scalar_type()), " (the accumulation dtype for y's ",
                   y.scalar_type(), "), got ", h.scalar_type());
  check_contiguous(op, "h", h);
  check_same_device(op, "y", y, "h", h);
  TORCH_CHECK_VALUE(h.size(0) == slices && h.size(1) == y.size(0) && h.size(2) == b_rows.size(2),
                    op, ": h must have shape [slices, tokens, max_rank] = [", slices, ", ",
                    y.size(0), ", ", b_rows.size(2), "], got ", h.sizes());
  check_dim(op, "scalings", scalings, 2);
  check_dtype_in(op, "scalings", scalings, {at::kFloat});
  check_contiguous(op, "scalings", scalings);
  check_same_device(op, "y", y, "scalings", scalings);
  TORCH_CHECK_VALUE(scalings.sizes() == ranks.sizes(), op, ": scalings must have the shape of "
                    "ranks ", ranks.sizes(), ", got ", scalings.sizes());
  check_plan(op, pool, order, tiles, y.size(0));
  check_chunks(op, pool, order, chunks);
  check_values(op, "b_rows", pool, b_rows, ranks, token_adapter,
               std::vector<int64_t>(slice_sizes.begin(), slice_sizes.end()), order, tiles,
               chunks);
  return offsets;
}

}  // namespace fastllm::lora
