// Argument validation and SGMV tile construction for the LoRA ops, identical for every device.
#pragma once

#include <ATen/ATen.h>

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

// Value checks: ranks in [0, max_rank], tokens' adapters in [-1, adapters), and every row a token
// can read lies inside the pool. On the GPU these cost a synchronisation; a wrong offset would
// otherwise read (or, in expand's backward, write) outside the pool.
inline void check_values(const char* op, const char* rows_name, const at::Tensor& pool,
                         const at::Tensor& rows, const at::Tensor& ranks,
                         const at::Tensor& token_adapter, const std::vector<int64_t>& widths) {
  const int64_t slices = rows.size(0), adapters = rows.size(1), max_rank = rows.size(2);
  const int64_t pool_size = pool.numel();
  if (pool.device().is_cpu()) {
    const int32_t* rank = ranks.data_ptr<int32_t>();
    const int64_t* offset = rows.data_ptr<int64_t>();
    for (int64_t s = 0; s < slices; ++s) {
      for (int64_t a = 0; a < adapters; ++a) {
        const int32_t r = rank[s * adapters + a];
        TORCH_CHECK_VALUE(r >= 0 && r <= max_rank, op, ": ranks must lie in [0, ", max_rank,
                          "] (the width of ", rows_name, "), got ", r, " at [", s, ", ", a, "]");
        for (int64_t j = 0; j < r; ++j) {
          const int64_t o = offset[table_index(s, a, j, adapters, max_rank)];
          TORCH_CHECK_INDEX(o >= 0 && o + widths[s] <= pool_size, op, ": ", rows_name, "[", s,
                            ", ", a, ", ", j, "] = ", o, " puts a row of ", widths[s],
                            " elements outside the pool of ", pool_size, " elements");
        }
      }
    }
    AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_check", [&] {
      const index_t* ids = token_adapter.data_ptr<index_t>();
      for (int64_t t = 0; t < token_adapter.numel(); ++t) {
        TORCH_CHECK_INDEX(ids[t] >= -1 && ids[t] < adapters, op, ": token_adapter must lie in [-1, ",
                          adapters, "), got ", static_cast<int64_t>(ids[t]), " at token ", t);
      }
    });
    return;
  }
  // On the GPU: reduce every check to a few numbers on the device and copy them back at once, a
  // single synchronisation (an .item() per check would be one each, several per call).
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::vector<at::Tensor> summary;
  if (ranks.numel()) {
    summary.push_back(ranks.min().to(at::kLong).view(1));
    summary.push_back(ranks.max().to(at::kLong).view(1));
    if (rows.numel()) {
      const at::Tensor valid =
          at::arange(max_rank, ranks.options()).view({1, 1, -1}) < ranks.unsqueeze(-1);
      const at::Tensor width =
          at::tensor(widths, rows.options().device(at::kCPU)).to(rows.device()).view({-1, 1, 1});
      summary.push_back(rows.masked_fill(~valid, kNone).min().view(1));
      summary.push_back((rows + width).masked_fill(~valid, -kNone).max().view(1));
    }
  }
  if (token_adapter.numel()) {
    summary.push_back(token_adapter.min().to(at::kLong).view(1));
    summary.push_back(token_adapter.max().to(at::kLong).view(1));
  }
  if (summary.empty()) return;
  const at::Tensor host = at::cat(summary).cpu();
  const int64_t* value = host.data_ptr<int64_t>();
  if (ranks.numel()) {
    const int64_t min_rank = *value++, top_rank = *value++;
    TORCH_CHECK_VALUE(min_rank >= 0 && top_rank <= max_rank, op, ": ranks must lie in [0, ",
                      max_rank, "] (the width of ", rows_name, "), got values in [", min_rank,
                      ", ", top_rank, "]");
    if (rows.numel()) {
      const int64_t min_offset = *value++, max_end = *value++;
      const bool any_row = min_offset != kNone;
      TORCH_CHECK_INDEX(!any_row || (min_offset >= 0 && max_end <= pool_size), op, ": ",
                        rows_name, " puts rows outside the pool of ", pool_size,
                        " elements (rows span [", min_offset, ", ", max_end, "))");
    }
  }
  if (token_adapter.numel()) {
    const int64_t min_id = *value++, max_id = *value++;
    TORCH_CHECK_INDEX(min_id >= -1 && max_id < adapters, op, ": token_adapter must lie in [-1, ",
                      adapters, "), got values in [", min_id, ", ", max_id, "]");
  }
}

// SGMV work list, built on the host: `order` lists the tokens grouped by adapter (tokens without
// an adapter left out); tile i covers order[tile_begin[i] .. tile_begin[i + 1]) and uses adapter
// tile_adapter[i]. A counting sort: O(tokens + adapters), plain vectors so the CPU path allocates
// no tensors.
struct Tiles {
  std::vector<int32_t> order;
  std::vector<int32_t> tile_begin;    // tiles + 1 entries
  std::vector<int32_t> tile_adapter;  // tiles entries
  int64_t count() const { return static_cast<int64_t>(tile_adapter.size()); }
};

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
      tiles.tile_begin.push_back(static_cast<int32_t>(b));
      tiles.tile_adapter.push_back(static_cast<int32_t>(a));
    }
  }
  tiles.tile_begin.push_back(static_cast<int32_t>(start[adapters]));
  return tiles;
}

inline std::vector<int64_t> host_token_adapters(const at::Tensor& token_adapter) {
  const at::Tensor ids = token_adapter.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = ids.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + ids.numel());
}

inline at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_shrink(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                         const at::Tensor& ranks, const at::Tensor& token_adapter, int64_t path) {
  constexpr const char* op = "fastllm.lora_shrink";
  check_dim(op, "x", x, 2);
  check_float_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  check_same_dtype(op, "x", x, "pool", pool);
  check_same_device(op, "x", x, "pool", pool);
  check_tables(op, "a_rows", pool, a_rows, ranks, token_adapter, x.size(0), path);
  check_values(op, "a_rows", pool, a_rows, ranks, token_adapter,
               std::vector<int64_t>(a_rows.size(0), x.size(1)));
}

inline std::vector<int64_t> check_expand(const at::Tensor& y, const at::Tensor& h,
                                         const at::Tensor& pool, const at::Tensor& b_rows,
                                         const at::Tensor& ranks, const at::Tensor& scalings,
                                         const at::Tensor& token_adapter,
                                         at::IntArrayRef slice_sizes, int64_t path) {
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
    TORCH_CHECK_VALUE(slice_sizes[s] >= 0, op, ": slice_sizes must be >= 0, got ", slice_sizes);
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
  check_values(op, "b_rows", pool, b_rows, ranks, token_adapter,
               std::vector<int64_t>(slice_sizes.begin(), slice_sizes.end()));
  return offsets;
}

}  // namespace fastllm::lora
