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
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "lora/lora_checks.h"
#include "lora/lora_index.h"

namespace fastllm::lora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename index_t>
__device__ __forceinline__ int64_t load_adapter(const index_t* ids, int64_t t) {
  return static_cast<int64_t>(ids[t]);
}

// grid: (tokens, slices)
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void shrink_bgmv(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool,
                            const int64_t* __restrict__ rows, const int32_t* __restrict__ ranks,
                            const index_t* __restrict__ token_adapter, acc_t* __restrict__ h,
                            int64_t tokens, int64_t in, int64_t adapters, int64_t max_rank) {
  const int64_t t = blockIdx.x, s = blockIdx.y;
  const int64_t a = load_adapter(token_adapter, t);
  if (a < 0) return;
  const int r = ranks[s * adapters + a];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* xt = x + t * in;
  for (int j = warp; j < r; j += kWarps) {
    const scalar_t* w = pool + rows[table_index(s, a, j, adapters, max_rank)];
    acc_t sum = 0;
    for (int64_t k = lane; k < in; k += 32) {
      sum += static_cast<acc_t>(xt[k]) * static_cast<acc_t>(w[k]);
    }
    sum = warp_sum(sum);
    if (lane == 0) h[h_index(s, t, j, tokens, max_rank)] = sum;
  }
}

// grid: (tiles, slices)
template <typename scalar_t, typename acc_t>
__global__ void shrink_sgmv(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool,
                            const int64_t* __restrict__ rows, const int32_t* __restrict__ ranks,
                            const int32_t* __restrict__ order,
                            const int32_t* __restrict__ tile_begin,
                            const int32_t* __restrict__ tile_adapter, acc_t* __restrict__ h,
                            int64_t tokens, int64_t in, int64_t adapters, int64_t max_rank) {
  const int64_t tile = blockIdx.x, s = blockIdx.y, a = tile_adapter[tile];
  const int first = tile_begin[tile];
  const int n = min(kTile, tile_begin[tile + 1] - first);
  const int r = ranks[s * adapters + a];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t token[kTile];
  for (int i = 0; i < kTile; ++i) token[i] = i < n ? order[first + i] : order[first];
  for (int j = warp; j < r; j += kWarps) {
    const scalar_t* w = pool + rows[table_index(s, a, j, adapters, max_rank)];
    acc_t sum[kTile] = {};
    for (int64_t k = lane; k < in; k += 32) {
      const acc_t wk = static_cast<acc_t>(w[k]);
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (i < n) sum[i] += static_cast<acc_t>(x[token[i] * in + k]) * wk;
      }
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      const acc_t total = warp_sum(sum[i]);
      if (lane == 0 && i < n) h[h_index(s, token[i], j, tokens, max_rank)] = total;
    }
  }
}

// grid: (tokens, slices)
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void expand_bgmv(scalar_t* __restrict__ y, const acc_t* __restrict__ h,
                            const scalar_t* __restrict__ pool, const int64_t* __restrict__ rows,
                            const int32_t* __restrict__ ranks, const float* __restrict__ scalings,
                            const index_t* __restrict__ token_adapter,
                            const int64_t* __restrict__ slice_offsets, int64_t tokens,
                            int64_t width, int64_t adapters, int64_t max_rank) {
  const int64_t t = blockIdx.x, s = blockIdx.y;
  const int64_t a = load_adapter(token_adapter, t);
  if (a < 0) return;
  const int r = ranks[s * adapters + a];
  const acc_t c = static_cast<acc_t>(scalings[s * adapters + a]);
  const int64_t begin = slice_offsets[s], size = slice_offsets[s + 1] - begin;
  const acc_t* ht = h + h_index(s, t, 0, tokens, max_rank);
  const int64_t* row = rows + table_index(s, a, 0, adapters, max_rank);
  scalar_t* yt = y + t * width + begin;
  for (int64_t o = threadIdx.x; o < size; o += blockDim.x) {
    acc_t sum = 0;
    for (int j = 0; j < r; ++j) sum += ht[j] * static_cast<acc_t>(pool[row[j] + o]);
    yt[o] = static_cast<scalar_t>(static_cast<acc_t>(yt[o]) + c * sum);
  }
}

// grid: (tiles, slices)
template <typename scalar_t, typename acc_t>
__global__ void expand_sgmv(scalar_t* __restrict__ y, const acc_t* __restrict__ h,
                            const scalar_t* __restrict__ pool, const int64_t* __restrict__ rows,
                            const int32_t* __restrict__ ranks, const float* __restrict__ scalings,
                            const int32_t* __restrict__ order,
                            const int32_t* __restrict__ tile_begin,
                            const int32_t* __restrict__ tile_adapter,
                            const int64_t* __restrict__ slice_offsets, int64_t tokens,
                            int64_t width, int64_t adapters, int64_t max_rank) {
  const int64_t tile = blockIdx.x, s = blockIdx.y, a = tile_adapter[tile];
  const int first = tile_begin[tile];
  const int n = min(kTile, tile_begin[tile + 1] - first);
  const int r = ranks[s * adapters + a];
  const acc_t c = static_cast<acc_t>(scalings[s * adapters + a]);
  const int64_t begin = slice_offsets[s], size = slice_offsets[s + 1] - begin;
  const int64_t* row = rows + table_index(s, a, 0, adapters, max_rank);
  int64_t token[kTile];
  for (int i = 0; i < kTile; ++i) token[i] = i < n ? order[first + i] : order[first];
  for (int64_t o = threadIdx.x; o < size; o += blockDim.x) {
    acc_t sum[kTile] = {};
    for (int j = 0; j < r; ++j) {
      const acc_t w = static_cast<acc_t>(pool[row[j] + o]);
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        if (i < n) sum[i] += h[h_index(s, token[i], j, tokens, max_rank)] * w;
      }
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      if (i < n) {
        scalar_t* yo = y + token[i] * width + begin + o;
        *yo = static_cast<scalar_t>(static_cast<acc_t>(*yo) + c * sum[i]);
      }
    }
  }
}

struct DeviceTiles {
  at::Tensor order, tile_begin, tile_adapter;
  int64_t count;
};

// The tile list is built on the host (one small device-to-host copy of token_adapter); SGMV is the
// prefill path, where that copy is small next to the work.
DeviceTiles device_tiles(const at::Tensor& token_adapter, int64_t adapters) {
  const Tiles tiles = build_tiles(host_token_adapters(token_adapter), adapters);
  const auto device = token_adapter.device();
  auto upload = [&](const std::vector<int32_t>& v) {
    return at::tensor(v, at::kInt).to(device);
  };
  return {upload(tiles.order), upload(tiles.tile_begin), upload(tiles.tile_adapter), tiles.count()};
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                            const at::Tensor& ranks, const at::Tensor& token_adapter,
                            int64_t path) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_shrink(x, pool, a_rows, ranks, token_adapter, path);
  const int64_t slices = a_rows.size(0), adapters = a_rows.size(1), max_rank = a_rows.size(2);
  const int64_t tokens = x.size(0), in = x.size(1);
  at::Tensor h = at::zeros({slices, tokens, max_rank},
                           x.options().dtype(accumulate_dtype(x.scalar_type())));
  if (h.numel() == 0 || in == 0) return h;
  path = resolve_path(path, tokens, adapters);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (path == kBgmv) {
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_shrink_ids", [&] {
        shrink_bgmv<scalar_t, acc_t, index_t><<<dim3(tokens, slices), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), a_rows.data_ptr<int64_t>(),
            ranks.data_ptr<int32_t>(), token_adapter.data_ptr<index_t>(), h.data_ptr<acc_t>(),
            tokens, in, adapters, max_rank);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const DeviceTiles tiles = device_tiles(token_adapter, adapters);
      if (tiles.count == 0) return;
      shrink_sgmv<scalar_t, acc_t><<<dim3(tiles.count, slices), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), a_rows.data_ptr<int64_t>(),
          ranks.data_ptr<int32_t>(), tiles.order.data_ptr<int32_t>(),
          tiles.tile_begin.data_ptr<int32_t>(), tiles.tile_adapter.data_ptr<int32_t>(),
          h.data_ptr<acc_t>(), tokens, in, adapters, max_rank);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return h;
}

void lora_expand_cuda(at::Tensor& y, const at::Tensor& h, const at::Tensor& pool,
                      const at::Tensor& b_rows, const at::Tensor& ranks,
                      const at::Tensor& scalings, const at::Tensor& token_adapter,
                      at::IntArrayRef slice_sizes, int64_t path) {
  const c10::cuda::CUDAGuard guard(y.device());
  std::vector<int64_t> offsets = check_expand(y, h, pool, b_rows, ranks, scalings, token_adapter,
                                              slice_sizes, path);
  const int64_t slices = b_rows.size(0), adapters = b_rows.size(1), max_rank = b_rows.size(2);
  const int64_t tokens = y.size(0), width = y.size(1);
  if (y.numel() == 0 || max_rank == 0 || slices == 0) return;
  path = resolve_path(path, tokens, adapters);
  offsets.push_back(width);
  const at::Tensor slice_offsets = at::tensor(offsets, at::kLong).to(y.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lora_expand", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (path == kBgmv) {
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_expand_ids", [&] {
        expand_bgmv<scalar_t, acc_t, index_t><<<dim3(tokens, slices), kThreads, 0, stream>>>(
            y.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), pool.data_ptr<scalar_t>(),
            b_rows.data_ptr<int64_t>(), ranks.data_ptr<int32_t>(), scalings.data_ptr<float>(),
            token_adapter.data_ptr<index_t>(), slice_offsets.data_ptr<int64_t>(), tokens, width,
            adapters, max_rank);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const DeviceTiles tiles = device_tiles(token_adapter, adapters);
      if (tiles.count == 0) return;
      expand_sgmv<scalar_t, acc_t><<<dim3(tiles.count, slices), kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), pool.data_ptr<scalar_t>(),
          b_rows.data_ptr<int64_t>(), ranks.data_ptr<int32_t>(), scalings.data_ptr<float>(),
          tiles.order.data_ptr<int32_t>(), tiles.tile_begin.data_ptr<int32_t>(),
          tiles.tile_adapter.data_ptr<int32_t>(), slice_offsets.data_ptr<int64_t>(), tokens,
          width, adapters, max_rank);
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
