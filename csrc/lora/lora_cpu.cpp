// CPU kernels for paged multi-adapter LoRA.
//
// Work is split over independent (token, slice) pairs (BGMV) or (tile, slice) pairs (SGMV) with
// at::parallel_for; the inner loops run over one contiguous adapter row. Half and bfloat16 inputs
// are widened to float once per token (x) or accumulated in a float row (y), so every sum is fp32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/cpu_vec.h"
#include "lora/lora_checks.h"
#include "lora/lora_index.h"

namespace fastllm::lora {
namespace {

using cpu::dot_f32;
#ifdef FASTLLM_HAVE_VEC
using cpu::horizontal_sum;
using cpu::kLanes;
using cpu::load_vec;
using cpu::VecF;

// kTile dot products against one weight row at once: each chunk of w is loaded once and feeds
// every token's accumulator (S-LoRA's MBGMM reuse, on the CPU); the kTile accumulators are also
// the independent chains that hide FMA latency.
template <typename w_t>
FASTLLM_INLINE void dot_tile_f32(const float* const* __restrict__ xs, const w_t* __restrict__ w,
                                 int64_t n, float* __restrict__ out) {
  VecF acc[kTile] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    const VecF wk = load_vec(w + k);
#pragma GCC unroll 8
    for (int i = 0; i < kTile; ++i) acc[i] += load_vec(xs[i] + k) * wk;
  }
  for (int i = 0; i < kTile; ++i) {
    float sum = horizontal_sum(acc[i]);
    for (int64_t kk = k; kk < n; ++kk) sum += xs[i][kk] * static_cast<float>(w[kk]);
    out[i] = sum;
  }
}
#else
template <typename w_t>
void dot_tile_f32(const float* const* xs, const w_t* w, int64_t n, float* out) {
  for (int i = 0; i < kTile; ++i) out[i] = dot_f32(xs[i], w, n);
}
#endif

template <typename acc_t, typename w_t>
FASTLLM_INLINE void axpy_impl(acc_t* __restrict__ y, acc_t c, const w_t* __restrict__ w,
                              int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += c * static_cast<acc_t>(w[k]);
}

FASTLLM_MULTIVERSION float dot(const float* x, const float* w, int64_t n) {
  return dot_f32(x, w, n);
}
FASTLLM_MULTIVERSION float dot(const float* x, const c10::BFloat16* w, int64_t n) {
  return dot_f32(x, w, n);
}
float dot(const float* x, const c10::Half* w, int64_t n) { return dot_f32(x, w, n); }
// float64 serves gradcheck only: plain loops.
double dot(const double* x, const double* w, int64_t n) {
  double sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * w[k];
  return sum;
}

FASTLLM_MULTIVERSION void axpy(float* y, float c, const float* w, int64_t n) {
  axpy_impl(y, c, w, n);
}
FASTLLM_MULTIVERSION void axpy(float* y, float c, const c10::BFloat16* w, int64_t n) {
  axpy_impl(y, c, w, n);
}
void axpy(float* y, float c, const c10::Half* w, int64_t n) { axpy_impl(y, c, w, n); }
void axpy(double* y, double c, const double* w, int64_t n) { axpy_impl(y, c, w, n); }

FASTLLM_MULTIVERSION void dot_tile(const float* const* xs, const float* w, int64_t n, float* out) {
  dot_tile_f32(xs, w, n, out);
}
FASTLLM_MULTIVERSION void dot_tile(const float* const* xs, const c10::BFloat16* w, int64_t n,
                                   float* out) {
  dot_tile_f32(xs, w, n, out);
}
void dot_tile(const float* const* xs, const c10::Half* w, int64_t n, float* out) {
  dot_tile_f32(xs, w, n, out);
}
void dot_tile(const double* const* xs, const double* w, int64_t n, double* out) {
  for (int i = 0; i < kTile; ++i) out[i] = dot(xs[i], w, n);
}

template <typename acc_t, typename scalar_t>
void widen(acc_t* out, const scalar_t* in, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<acc_t>(in[k]);
}

template <typename scalar_t, typename acc_t>
void narrow(scalar_t* out, const acc_t* in, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(in[k]);
}

// Grain for parallel_for: a task carries at least ~1M multiply-adds. A decode step's LoRA work
// (a few tokens x rank x width) is far below that and runs on the calling thread: split across
// threads it saved microseconds on an idle machine, and beside another busy process each
// parallel region waited for a descheduled thread (bench/cpu_contention_study.py: 0.025 ms
// idle, 14 ms contended, where the per-adapter matmuls went from 0.12 to 0.13 ms).
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, work_per_item));
}

template <typename index_t>
std::vector<int64_t> adapters_of(const at::Tensor& token_adapter) {
  const index_t* ids = token_adapter.data_ptr<index_t>();
  return std::vector<int64_t>(ids, ids + token_adapter.numel());
}

std::vector<int64_t> token_adapters(const at::Tensor& token_adapter) {
  return token_adapter.scalar_type() == at::kInt ? adapters_of<int32_t>(token_adapter)
                                                 : adapters_of<int64_t>(token_adapter);
}

// ---- shrink --------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void shrink_kernel(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                   const at::Tensor& ranks, const std::vector<int64_t>& adapter_of, int64_t path,
                   const Tiles& tiles, at::Tensor& h) {
  const int64_t tokens = x.size(0), in = x.size(1);
  const int64_t slices = a_rows.size(0), adapters = a_rows.size(1), max_rank = a_rows.size(2);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const scalar_t* pool_data = pool.data_ptr<scalar_t>();
  const int64_t* rows = a_rows.data_ptr<int64_t>();
  const int32_t* rank = ranks.data_ptr<int32_t>();
  acc_t* h_data = h.data_ptr<acc_t>();
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;

  if (path == kBgmv) {
    const int64_t items = tokens * slices;
    at::parallel_for(0, items, grain_for(in * max_rank), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> widened(kWide ? 0 : in);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / slices, s = item % slices, a = adapter_of[t];
        if (a < 0) continue;
        const int32_t r = rank[s * adapters + a];
        const acc_t* xt;
        if constexpr (kWide) {
          xt = x_data + t * in;
        } else {
          widen(widened.data(), x_data + t * in, in);
          xt = widened.data();
        }
        for (int32_t j = 0; j < r; ++j) {
          const scalar_t* w = pool_data + rows[table_index(s, a, j, adapters, max_rank)];
          h_data[h_index(s, t, j, tokens, max_rank)] = dot(xt, w, in);
        }
      }
    });
    return;
  }

  const int32_t* order = tiles.order.data();
  const int32_t* tile_of = tiles.tile.data();
  const int64_t items = tiles.count() * slices;
  at::parallel_for(0, items, grain_for(kTile * in * max_rank), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> widened(kWide ? 0 : kTile * in);
    const acc_t* xs[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / slices, s = item % slices;
      const int64_t first = tile_of[kTileFields * tile], a = tile_of[kTileFields * tile + 2];
      const int n = static_cast<int>(tile_of[kTileFields * tile + 1] - first);
      const int32_t r = rank[s * adapters + a];
      for (int i = 0; i < n; ++i) {
        const int64_t t = order[first + i];
        if constexpr (kWide) {
          xs[i] = x_data + t * in;
        } else {
          widen(widened.data() + i * in, x_data + t * in, in);
          xs[i] = widened.data() + i * in;
        }
      }
      for (int i = n; i < kTile; ++i) xs[i] = xs[0];  // a short tile repeats its first token
      // One adapter row, fetched once, serves every token of the tile.
      acc_t sums[kTile];
      for (int32_t j = 0; j < r; ++j) {
        const scalar_t* w = pool_data + rows[table_index(s, a, j, adapters, max_rank)];
        dot_tile(xs, w, in, sums);
        for (int i = 0; i < n; ++i) h_data[h_index(s, order[first + i], j, tokens, max_rank)] = sums[i];
      }
    }
  });
}

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                           const at::Tensor& ranks, const at::Tensor& token_adapter,
                           int64_t path, const c10::optional<at::Tensor>& sgmv_order,
                           const c10::optional<at::Tensor>& sgmv_tiles,
                           const c10::optional<at::Tensor>& sgmv_chunks) {
  // The chunks serve the GPU's tensor cores; the CPU keeps its 8-token tiles (a tile's
  // accumulators stay in vector registers), so they are checked and left unused.
  check_shrink(x, pool, a_rows, ranks, token_adapter, path, sgmv_order, sgmv_tiles, sgmv_chunks);
  const int64_t slices = a_rows.size(0), max_rank = a_rows.size(2), tokens = x.size(0);
  at::Tensor h = at::zeros({slices, tokens, max_rank}, x.options().dtype(
      accumulate_dtype(x.scalar_type())));
  if (h.numel() == 0 || x.size(1) == 0) return h;
  path = resolve_path(path, tokens, a_rows.size(1));
  const std::vector<int64_t> adapter_of = token_adapters(token_adapter);
  const Tiles tiles =
      path == kSgmv ? host_tiles(adapter_of, a_rows.size(1), sgmv_order, sgmv_tiles) : Tiles{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    shrink_kernel<scalar_t, acc_t>(x, pool, a_rows, ranks, adapter_of, path, tiles, h);
  });
  return h;
}

// ---- expand --------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void expand_kernel(at::Tensor& y, const at::Tensor& h, const at::Tensor& pool,
                   const at::Tensor& b_rows, const at::Tensor& ranks, const at::Tensor& scalings,
                   const std::vector<int64_t>& adapter_of, const std::vector<int64_t>& widths,
                   const std::vector<int64_t>& offsets, int64_t path, const Tiles& tiles) {
  const int64_t tokens = y.size(0), width = y.size(1);
  const int64_t slices = b_rows.size(0), adapters = b_rows.size(1), max_rank = b_rows.size(2);
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const acc_t* h_data = h.data_ptr<acc_t>();
  const scalar_t* pool_data = pool.data_ptr<scalar_t>();
  const int64_t* rows = b_rows.data_ptr<int64_t>();
  const int32_t* rank = ranks.data_ptr<int32_t>();
  const float* scale = scalings.data_ptr<float>();
  const int64_t widest = *std::max_element(widths.begin(), widths.end());
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;

  if (path == kBgmv) {
    const int64_t items = tokens * slices;
    at::parallel_for(0, items, grain_for(widest * max_rank), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kWide ? 0 : widest);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / slices, s = item % slices, a = adapter_of[t];
        if (a < 0) continue;
        const int32_t r = rank[s * adapters + a];
        if (r == 0 || widths[s] == 0) continue;
        scalar_t* yt = y_data + t * width + offsets[s];
        acc_t* out;
        if constexpr (kWide) {
          out = yt;
        } else {
          widen(acc.data(), yt, widths[s]);
          out = acc.data();
        }
        const acc_t c = static_cast<acc_t>(scale[s * adapters + a]);
        // Column blocks keep the output block in L1 across the adapter's rows.
        constexpr int64_t kBlock = 1024;
        for (int64_t o = 0; o < widths[s]; o += kBlock) {
          const int64_t len = std::min<int64_t>(kBlock, widths[s] - o);
          for (int32_t j = 0; j < r; ++j) {
            const scalar_t* w = pool_data + rows[table_index(s, a, j, adapters, max_rank)] + o;
            axpy(out + o, c * h_data[h_index(s, t, j, tokens, max_rank)], w, len);
          }
        }
        if constexpr (!kWide) narrow(yt, acc.data(), widths[s]);
      }
    });
    return;
  }

  const int32_t* order = tiles.order.data();
  const int32_t* tile_of = tiles.tile.data();
  const int64_t items = tiles.count() * slices;
  at::parallel_for(0, items, grain_for(kTile * widest * max_rank), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kWide ? 0 : kTile * widest);
    acc_t* outs[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / slices, s = item % slices;
      const int64_t first = tile_of[kTileFields * tile], a = tile_of[kTileFields * tile + 2];
      const int n = static_cast<int>(tile_of[kTileFields * tile + 1] - first);
      const int32_t r = rank[s * adapters + a];
      if (r == 0 || widths[s] == 0) continue;
      for (int i = 0; i < n; ++i) {
        scalar_t* yt = y_data + order[first + i] * width + offsets[s];
        if constexpr (kWide) {
          outs[i] = yt;
        } else {
          widen(acc.data() + i * widest, yt, widths[s]);
          outs[i] = acc.data() + i * widest;
        }
      }
      const acc_t c = static_cast<acc_t>(scale[s * adapters + a]);
      // Column blocks small enough that the tile's output block stays in L1 while every row of
      // the adapter streams past it once.
      constexpr int64_t kBlock = 512;
      for (int64_t o = 0; o < widths[s]; o += kBlock) {
        const int64_t len = std::min<int64_t>(kBlock, widths[s] - o);
        for (int32_t j = 0; j < r; ++j) {
          const scalar_t* w = pool_data + rows[table_index(s, a, j, adapters, max_rank)] + o;
          for (int i = 0; i < n; ++i) {
            axpy(outs[i] + o, c * h_data[h_index(s, order[first + i], j, tokens, max_rank)], w,
                 len);
          }
        }
      }
      if constexpr (!kWide) {
        for (int i = 0; i < n; ++i) {
          narrow(y_data + order[first + i] * width + offsets[s], outs[i], widths[s]);
        }
      }
    }
  });
}

void lora_expand_cpu(at::Tensor& y, const at::Tensor& h, const at::Tensor& pool,
                     const at::Tensor& b_rows, const at::Tensor& ranks, const at::Tensor& scalings,
                     const at::Tensor& token_adapter, at::IntArrayRef slice_sizes, int64_t path,
                     const c10::optional<at::Tensor>& sgmv_order,
                     const c10::optional<at::Tensor>& sgmv_tiles,
                     const c10::optional<at::Tensor>& sgmv_chunks) {
  const std::vector<int64_t> offsets = check_expand(y, h, pool, b_rows, ranks, scalings,
                                                    token_adapter, slice_sizes, path, sgmv_order,
                                                    sgmv_tiles, sgmv_chunks);
  if (y.numel() == 0 || b_rows.size(2) == 0 || b_rows.size(0) == 0) return;
  path = resolve_path(path, y.size(0), b_rows.size(1));
  const std::vector<int64_t> adapter_of = token_adapters(token_adapter);
  const std::vector<int64_t> widths(slice_sizes.begin(), slice_sizes.end());
  const Tiles tiles =
      path == kSgmv ? host_tiles(adapter_of, b_rows.size(1), sgmv_order, sgmv_tiles) : Tiles{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lora_expand", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    expand_kernel<scalar_t, acc_t>(y, h, pool, b_rows, ranks, scalings, adapter_of, widths,
                                   offsets, path, tiles);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_expand", &lora_expand_cpu);
}

}  // namespace fastllm::lora
