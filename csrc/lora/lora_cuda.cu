// CUDA kernels for paged multi-adapter LoRA (S-LoRA's BGMV / MBGMM idea, written for runtime
// shapes: no template list of hidden sizes or ranks; any width, any rank up to the table's).
//
// shrink: one warp per adapter row; lanes stride over the row (coalesced) and a warp reduction
//         gives the dot product. BGMV blocks serve one (token, slice); SGMV blocks one tile of up
//         to kTile tokens sharing an adapter, each lane holding kTile partial sums, so a row is
//         read once per tile. Rows at or beyond a token's rank are skipped: mixed ranks cost no
//         padding work.
// expand: threads stride over output columns; each thread owns its columns of y, so no atomics.
// Accumulation is fp32 (fp64 for fp64 inputs) throughout.
//
// No host synchronisation: the host checks only metadata; every index value read here (adapter
// ids, ranks, row offsets, the SGMV plan) is bounds-checked in the kernel, and a bad one skips the
// work it addresses and sets its bit in the device error word (common/index_errors.h). SGMV needs
// a plan built by the caller (fastllm.ops.lora_sgmv_plan, once per batch); without one the op
// runs BGMV. Slice offsets travel by value.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/index_guard.cuh"
#include "lora/lora_checks.h"
#include "lora/lora_index.h"

namespace fastllm::lora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Expand stages a work item's row offsets in shared memory (8 bytes per row).
constexpr int64_t kMaxCudaRank = 4096;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Everything a kernel needs to read the batch's tables safely.
struct Tables {
  const int64_t* rows;
  const int32_t* ranks;
  int64_t adapters, max_rank, pool_size;
  unsigned int* error_word;
};

// The rank of (slice, adapter), or 0 (reported) when it lies outside [0, max_rank].
__device__ __forceinline__ int checked_rank(const Tables& t, int64_t s, int64_t a) {
  const int r = t.ranks[s * t.adapters + a];
  if (r < 0 || r > t.max_rank) {
    report_index_error(t.error_word, kLoraRanks);
    return 0;
  }
  return r;
}

// Row j's offset, or -1 (reported) when a row of `width` elements there leaves the pool.
__device__ __forceinline__ int64_t checked_row(const Tables& t, int64_t s, int64_t a, int j,
                                               int64_t width) {
  const int64_t o = t.rows[table_index(s, a, j, t.adapters, t.max_rank)];
  if (o < 0 || o > t.pool_size - width) {
    report_index_error(t.error_word, kLoraRows);
    return -1;
  }
  return o;
}

// The adapter of token t: -1 for none or (reported) for an id outside [-1, adapters).
template <typename index_t>
__device__ __forceinline__ int64_t checked_adapter(const Tables& t, const index_t* ids,
                                                   int64_t token) {
  const int64_t a = static_cast<int64_t>(ids[token]);
  if (a < -1 || a >= t.adapters) {
    report_index_error(t.error_word, kLoraTokenAdapter);
    return -1;
  }
  return a;
}

// Tile `tile` of a plan: its tokens (n of them, n = 0 for a bad tile, reported) and adapter.
struct Tile {
  int n;
  int64_t adapter;
  int64_t token[kTile];
};

__device__ __forceinline__ Tile load_tile(const Tables& t, const int32_t* order, int64_t listed,
                                          const int32_t* tiles, int64_t tile, int64_t tokens) {
  Tile out{0, 0, {}};
  const int64_t first = tiles[kTileFields * tile], end = tiles[kTileFields * tile + 1];
  const int64_t a = tiles[kTileFields * tile + 2];
  if (first < 0 || end <= first || end > listed || end - first > kTile || a < 0 ||
      a >= t.adapters) {
    report_index_error(t.error_word, kLoraSgmvPlan);
    return out;
  }
  const int n = static_cast<int>(end - first);
  bool bad = false;
  // Fixed trip count and constant indices keep the token list in registers.
#pragma unroll
  for (int i = 0; i < kTile; ++i) {
    const int64_t token = i < n ? static_cast<int64_t>(order[first + i]) : 0;
    bad |= token < 0 || token >= tokens;
    out.token[i] = token;
  }
  if (bad) {
    report_index_error(t.error_word, kLoraSgmvPlan);
    return out;
  }
  out.n = n;
  out.adapter = a;
  return out;
}

// grid: (tokens, slices)
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void shrink_bgmv(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool,
                            Tables tables, const index_t* __restrict__ token_adapter,
                            acc_t* __restrict__ h, int64_t tokens, int64_t in) {
  const int64_t t = blockIdx.x, s = blockIdx.y;
  const int64_t a = checked_adapter(tables, token_adapter, t);
  if (a < 0) return;
  const int r = checked_rank(tables, s, a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* xt = x + t * in;
  for (int j = warp; j < r; j += kWarps) {
    const int64_t offset = checked_row(tables, s, a, j, in);
    if (offset < 0) continue;  // h stays 0 for a bad row
    const scalar_t* w = pool + offset;
    acc_t sum = 0;
    for (int64_t k = lane; k < in; k += 32) {
      sum += static_cast<acc_t>(xt[k]) * static_cast<acc_t>(w[k]);
    }
    sum = warp_sum(sum);
    if (lane == 0) h[h_index(s, t, j, tokens, tables.max_rank)] = sum;
  }
}

// grid: (tiles, slices)
template <typename scalar_t, typename acc_t>
__global__ void shrink_sgmv(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool,
                            Tables tables, const int32_t* __restrict__ order, int64_t listed,
                            const int32_t* __restrict__ tiles, acc_t* __restrict__ h,
                            int64_t tokens, int64_t in) {
  const int64_t s = blockIdx.y;
  const Tile tile = load_tile(tables, order, listed, tiles, blockIdx.x, tokens);
  if (tile.n == 0) return;
  const int64_t a = tile.adapter;
  const int n = tile.n;
  const int r = checked_rank(tables, s, a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = warp; j < r; j += kWarps) {
    const int64_t offset = checked_row(tables, s, a, j, in);
    if (offset < 0) continue;
    const scalar_t* w = pool + offset;
    acc_t sum[kTile] = {};
    for (int64_t k = lane; k < in; k += 32) {
      const acc_t wk = static_cast<acc_t>(w[k]);
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (i < n) sum[i] += static_cast<acc_t>(x[tile.token[i] * in + k]) * wk;
      }
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      const acc_t total = warp_sum(sum[i]);
      if (lane == 0 && i < n) h[h_index(s, tile.token[i], j, tokens, tables.max_rank)] = total;
    }
  }
}

// Stages the item's row offsets in shared memory, a bad row's as -1 (reported once per block).
__device__ __forceinline__ void stage_rows(const Tables& t, int64_t s, int64_t a, int r,
                                           int64_t width, int64_t* staged) {
  for (int j = threadIdx.x; j < r; j += blockDim.x) staged[j] = checked_row(t, s, a, j, width);
  __syncthreads();
}

// grid: (tokens, slices); dynamic shared memory: max_rank int64 row offsets
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void expand_bgmv(scalar_t* __restrict__ y, const acc_t* __restrict__ h,
                            const scalar_t* __restrict__ pool, Tables tables,
                            const float* __restrict__ scalings,
                            const index_t* __restrict__ token_adapter, SliceOffsets slices,
                            int64_t tokens, int64_t width) {
  extern __shared__ int64_t staged_rows[];
  const int64_t t = blockIdx.x, s = blockIdx.y;
  const int64_t a = checked_adapter(tables, token_adapter, t);
  if (a < 0) return;
  const int r = checked_rank(tables, s, a);
  const int64_t begin = slices.begin[s], size = slices.begin[s + 1] - begin;
  stage_rows(tables, s, a, r, size, staged_rows);
  const acc_t c = static_cast<acc_t>(scalings[s * tables.adapters + a]);
  const acc_t* ht = h + h_index(s, t, 0, tokens, tables.max_rank);
  scalar_t* yt = y + t * width + begin;
  for (int64_t o = threadIdx.x; o < size; o += blockDim.x) {
    acc_t sum = 0;
    for (int j = 0; j < r; ++j) {
      const int64_t row = staged_rows[j];
      if (row >= 0) sum += ht[j] * static_cast<acc_t>(pool[row + o]);
    }
    yt[o] = static_cast<scalar_t>(static_cast<acc_t>(yt[o]) + c * sum);
  }
}

// grid: (tiles, slices); dynamic shared memory: max_rank int64 row offsets
template <typename scalar_t, typename acc_t>
__global__ void expand_sgmv(scalar_t* __restrict__ y, const acc_t* __restrict__ h,
                            const scalar_t* __restrict__ pool, Tables tables,
                            const float* __restrict__ scalings, const int32_t* __restrict__ order,
                            int64_t listed, const int32_t* __restrict__ tiles,
                            SliceOffsets slices, int64_t tokens, int64_t width) {
  extern __shared__ int64_t staged_rows[];
  const int64_t s = blockIdx.y;
  const Tile tile = load_tile(tables, order, listed, tiles, blockIdx.x, tokens);
  if (tile.n == 0) return;
  const int64_t a = tile.adapter;
  const int n = tile.n;
  const int r = checked_rank(tables, s, a);
  const int64_t begin = slices.begin[s], size = slices.begin[s + 1] - begin;
  stage_rows(tables, s, a, r, size, staged_rows);
  const acc_t c = static_cast<acc_t>(scalings[s * tables.adapters + a]);
  for (int64_t o = threadIdx.x; o < size; o += blockDim.x) {
    acc_t sum[kTile] = {};
    for (int j = 0; j < r; ++j) {
      const int64_t row = staged_rows[j];
      if (row < 0) continue;
      const acc_t w = static_cast<acc_t>(pool[row + o]);
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (i < n) sum[i] += h[h_index(s, tile.token[i], j, tokens, tables.max_rank)] * w;
      }
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      if (i < n) {
        scalar_t* yo = y + tile.token[i] * width + begin + o;
        *yo = static_cast<scalar_t>(static_cast<acc_t>(*yo) + c * sum[i]);
      }
    }
  }
}

Tables make_tables(const at::Tensor& pool, const at::Tensor& rows, const at::Tensor& ranks) {
  TORCH_CHECK_VALUE(rows.size(2) <= kMaxCudaRank, "fastllm.lora: on CUDA the row tables may be at "
                    "most ", kMaxCudaRank, " wide (max_rank), got ", rows.size(2));
  return {rows.data_ptr<int64_t>(), ranks.data_ptr<int32_t>(), rows.size(1), rows.size(2),
          pool.numel(), device_error_word(pool)};
}

int64_t sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                            const at::Tensor& ranks, const at::Tensor& token_adapter, int64_t path,
                            const c10::optional<at::Tensor>& sgmv_order,
                            const c10::optional<at::Tensor>& sgmv_tiles) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_shrink(x, pool, a_rows, ranks, token_adapter, path, sgmv_order, sgmv_tiles);
  const int64_t slices = a_rows.size(0), max_rank = a_rows.size(2);
  const int64_t tokens = x.size(0), in = x.size(1);
  const int64_t plan_tiles = sgmv_tiles.has_value() ? sgmv_tiles->size(0) : -1;
  path = resolve_path_cuda(path, tokens, plan_tiles, sm_count());
  TORCH_CHECK_VALUE(path != kSgmv || sgmv_order.has_value(), "fastllm.lora_shrink: path=2 (SGMV) "
                    "on CUDA needs sgmv_order and sgmv_tiles (fastllm.ops.lora_sgmv_plan): the op "
                    "cannot read token_adapter without synchronising");
  at::Tensor h = at::zeros({slices, tokens, max_rank},
                           x.options().dtype(accumulate_dtype(x.scalar_type())));
  if (h.numel() == 0 || in == 0) return h;
  const Tables tables = make_tables(pool, a_rows, ranks);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (path == kBgmv) {
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_shrink_ids", [&] {
        shrink_bgmv<scalar_t, acc_t, index_t><<<dim3(tokens, slices), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), tables,
            token_adapter.data_ptr<index_t>(), h.data_ptr<acc_t>(), tokens, in);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      if (plan_tiles == 0) return;
      shrink_sgmv<scalar_t, acc_t><<<dim3(plan_tiles, slices), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), tables,
          sgmv_order->data_ptr<int32_t>(), sgmv_order->numel(), sgmv_tiles->data_ptr<int32_t>(),
          h.data_ptr<acc_t>(), tokens, in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return h;
}

void lora_expand_cuda(at::Tensor& y, const at::Tensor& h, const at::Tensor& pool,
                      const at::Tensor& b_rows, const at::Tensor& ranks,
                      const at::Tensor& scalings, const at::Tensor& token_adapter,
                      at::IntArrayRef slice_sizes, int64_t path,
                      const c10::optional<at::Tensor>& sgmv_order,
                      const c10::optional<at::Tensor>& sgmv_tiles) {
  const c10::cuda::CUDAGuard guard(y.device());
  const std::vector<int64_t> offsets = check_expand(y, h, pool, b_rows, ranks, scalings,
                                                    token_adapter, slice_sizes, path, sgmv_order,
                                                    sgmv_tiles);
  const int64_t slices = b_rows.size(0), max_rank = b_rows.size(2);
  const int64_t tokens = y.size(0), width = y.size(1);
  const int64_t plan_tiles = sgmv_tiles.has_value() ? sgmv_tiles->size(0) : -1;
  path = resolve_path_cuda(path, tokens, plan_tiles, sm_count());
  TORCH_CHECK_VALUE(path != kSgmv || sgmv_order.has_value(), "fastllm.lora_expand: path=2 (SGMV) "
                    "on CUDA needs sgmv_order and sgmv_tiles (fastllm.ops.lora_sgmv_plan): the op "
                    "cannot read token_adapter without synchronising");
  if (y.numel() == 0 || max_rank == 0 || slices == 0) return;
  SliceOffsets slice_offsets{};
  for (int64_t s = 0; s < slices; ++s) slice_offsets.begin[s] = offsets[s];
  slice_offsets.begin[slices] = width;
  const Tables tables = make_tables(pool, b_rows, ranks);
  const size_t shared_bytes = static_cast<size_t>(max_rank) * sizeof(int64_t);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lora_expand", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (path == kBgmv) {
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_expand_ids", [&] {
        expand_bgmv<scalar_t, acc_t, index_t>
            <<<dim3(tokens, slices), kThreads, shared_bytes, stream>>>(
                y.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), pool.data_ptr<scalar_t>(), tables,
                scalings.data_ptr<float>(), token_adapter.data_ptr<index_t>(), slice_offsets,
                tokens, width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      if (plan_tiles == 0) return;
      expand_sgmv<scalar_t, acc_t><<<dim3(plan_tiles, slices), kThreads, shared_bytes, stream>>>(
          y.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), pool.data_ptr<scalar_t>(), tables,
          scalings.data_ptr<float>(), sgmv_order->data_ptr<int32_t>(), sgmv_order->numel(),
          sgmv_tiles->data_ptr<int32_t>(), slice_offsets, tokens, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_expand", &lora_expand_cuda);
}

}  // namespace fastllm::lora
