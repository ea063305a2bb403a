// CUDA kernels for paged multi-adapter LoRA (S-LoRA's BGMV / MBGMM idea, written for runtime
// shapes: no template list of hidden sizes or ranks; any width, any rank up to the table's).
//
// shrink: one warp per adapter row; lanes stride over the row (coalesced) and a warp reduction
//         gives the dot product. BGMV blocks serve one (token, slice); SGMV blocks one tile of up
//         to kTile tokens sharing an adapter, each lane holding kTile partial sums, so a row is
//         read once per tile. Rows at or beyond a token's rank are skipped: mixed ranks cost no
//         padding work.
// expand: threads stride over output columns; each thread owns its columns of y, so no atomics.
// SGMV in fp16 / bf16 on sm_80+ runs on tensor cores instead, on chunks of up to 64 tokens of
// one adapter with cp.async double buffering (lora_index.h, plan_sgmv_mma).
// Accumulation is fp32 (fp64 for fp64 inputs) throughout. The split-K decode shrink adds its
// partial sums with atomics, unless torch.use_deterministic_algorithms(True) is on: then each
// split writes its own slice of a workspace, summed in a fixed order.
//
// No host synchronisation: the host checks only metadata; every index value read here (adapter
// ids, ranks, row offsets, the SGMV plan) is bounds-checked in the kernel, and a bad one skips the
// work it addresses and sets its bit in the device error word (common/index_errors.h). SGMV needs
// a plan built by the caller (fastllm.ops.lora_sgmv_plan and lora_sgmv_chunks, once per batch);
// without one the op runs BGMV. Slice offsets travel by value.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <type_traits>

#include "common/async_copy.cuh"
#include "common/index_guard.cuh"
#include "lora/lora_checks.h"
#include "lora/lora_index.h"

namespace fastllm::lora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Expand stages a work item's row offsets in shared memory (8 bytes per row).
constexpr int64_t kMaxCudaRank = 4096;
// Dynamic shared memory a launch may take without raising the kernel's limit.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

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

// A token whose token_adapter entry is not the tile's adapter is a plan that does not match the
// batch: reported, and the tile skipped. (A token listed twice or left out cannot be seen here
// without a pass over the whole plan; the host check of the debug mode finds those.)
template <typename index_t>
__device__ __forceinline__ Tile load_tile(const Tables& t, const int32_t* order, int64_t listed,
                                          const int32_t* tiles, int64_t tile, int64_t tokens,
                                          const index_t* token_adapter) {
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
    const bool inside = token >= 0 && token < tokens;
    bad |= !inside || (i < n && static_cast<int64_t>(token_adapter[inside ? token : 0]) != a);
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

// 16-byte words: the unit of every vector access below.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
__device__ __forceinline__ bool word_aligned(const scalar_t* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// sum + w . x over one word of each.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_word(acc_t sum, const uint4& w, const uint4& x) {
  const scalar_t* ws = reinterpret_cast<const scalar_t*>(&w);
  const scalar_t* xs = reinterpret_cast<const scalar_t*>(&x);
#pragma unroll
  for (int i = 0; i < kVec<scalar_t>; ++i) {
    sum += static_cast<acc_t>(ws[i]) * static_cast<acc_t>(xs[i]);
  }
  return sum;
}

// Decode shrink (lora_index.h, plan_shrink). grid: (tokens, splits * row_groups, slices),
// kShrinkWarps warps; dynamic shared memory: the split's chunk of x.
// vector_x: x's rows are 16-byte aligned and whole words long (checked on the host); a weight
// row whose offset is not word-aligned is read with scalar loads instead.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    shrink_bgmv(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool, Tables tables,
                const index_t* __restrict__ token_adapter, acc_t* __restrict__ h, int64_t tokens,
                int64_t in, int64_t chunk, int64_t row_groups, int64_t splits, bool vector_x,
                int64_t split_stride) {
  extern __shared__ uint4 staged_words[];
  scalar_t* staged_x = reinterpret_cast<scalar_t*>(staged_words);
  constexpr int vec = kVec<scalar_t>;
  const int64_t t = blockIdx.x, s = blockIdx.z;
  const int64_t split = blockIdx.y / row_groups, group = blockIdx.y % row_groups;
  const int64_t a = checked_adapter(tables, token_adapter, t);
  if (a < 0) return;
  const int r = checked_rank(tables, s, a);
  if (group * kShrinkWarps >= r) return;  // the whole block: rows past the rank are not read
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < in ? begin + chunk : in;
  if (begin >= end) return;
  const scalar_t* xt = x + t * in;
  if (vector_x) {
    for (int64_t k = threadIdx.x * vec; k < end - begin; k += blockDim.x * vec) {
      staged_words[k / vec] = *reinterpret_cast<const uint4*>(xt + begin + k);
    }
  } else {
    for (int64_t k = threadIdx.x; k < end - begin; k += blockDim.x) staged_x[k] = xt[begin + k];
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = static_cast<int>(group) * kShrinkWarps + warp;
  if (j >= r) return;
  const int64_t offset = checked_row(tables, s, a, j, in);
  if (offset < 0) return;  // h keeps 0 for a bad row
  const scalar_t* w = pool + offset + begin;
  acc_t sum = 0;
  if (vector_x && word_aligned(w)) {
    // Unrolled so that several 16-byte loads are in flight per lane before their FMAs.
#pragma unroll 4
    for (int64_t k = lane * vec; k < end - begin; k += 32 * vec) {
      sum = dot_word<scalar_t, acc_t>(sum, *reinterpret_cast<const uint4*>(w + k),
                                      staged_words[k / vec]);
    }
  } else {
    for (int64_t k = lane; k < end - begin; k += 32) {
      sum += static_cast<acc_t>(w[k]) * static_cast<acc_t>(staged_x[k]);
    }
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    // split_stride > 0: each split owns a slice of the workspace (deterministic; summed later).
    acc_t* out = h + split * split_stride + h_index(s, t, j, tokens, tables.max_rank);
    if (splits == 1 || split_stride > 0) {
      *out = sum;
    } else {
      atomicAdd(out, sum);  // h starts at zero; the split order makes the last bits vary
    }
  }
}

// grid: (tiles, slices)
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void shrink_sgmv(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool,
                            Tables tables, const index_t* __restrict__ token_adapter,
                            const int32_t* __restrict__ order, int64_t listed,
                            const int32_t* __restrict__ tiles, acc_t* __restrict__ h,
                            int64_t tokens, int64_t in) {
  const int64_t s = blockIdx.y;
  const Tile tile = load_tile(tables, order, listed, tiles, blockIdx.x, tokens, token_adapter);
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

// Decode expand (lora_index.h, plan_expand). grid: (tokens, column tiles, slices), 32 to
// kExpandThreads threads, each owning vec contiguous outputs; dynamic shared memory: the token's
// row offsets (int64) then its h (acc_t), max_rank of each.
// vector_y: y's rows and every slice start are word-aligned and slices whole words (host check).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kExpandThreads)
    expand_bgmv(scalar_t* __restrict__ y, const acc_t* __restrict__ h,
                const scalar_t* __restrict__ pool, Tables tables,
                const float* __restrict__ scalings, const index_t* __restrict__ token_adapter,
                SliceOffsets slices, int64_t tokens, int64_t width, bool vector_y) {
  extern __shared__ int64_t staged_rows[];
  acc_t* staged_h = reinterpret_cast<acc_t*>(staged_rows + tables.max_rank);
  constexpr int vec = kVec<scalar_t>;
  const int64_t t = blockIdx.x, s = blockIdx.z;
  const int64_t a = checked_adapter(tables, token_adapter, t);
  if (a < 0) return;
  const int64_t begin = slices.begin[s], size = slices.begin[s + 1] - begin;
  const int64_t first = (blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x) * vec;
  if (blockIdx.y * static_cast<int64_t>(blockDim.x) * vec >= size) return;  // whole block
  const int r = checked_rank(tables, s, a);
  if (r == 0) return;  // y untouched, as on the CPU
  const acc_t* ht = h + h_index(s, t, 0, tokens, tables.max_rank);
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    staged_h[j] = ht[j];
    // Only the tile with blockIdx.y == 0 reports a bad row, so each is reported once per token.
    const int64_t o = tables.rows[table_index(s, a, j, tables.adapters, tables.max_rank)];
    const bool inside = o >= 0 && o <= tables.pool_size - size;
    if (!inside && blockIdx.y == 0) report_index_error(tables.error_word, kLoraRows);
    staged_rows[j] = inside ? o : -1;
  }
  __syncthreads();
  if (first >= size) return;
  const int owned = size - first < vec ? static_cast<int>(size - first) : vec;
  acc_t sum[vec] = {};
#pragma unroll 4
  for (int j = 0; j < r; ++j) {
    const int64_t row = staged_rows[j];
    if (row < 0) continue;
    const scalar_t* w = pool + row + first;
    const acc_t hj = staged_h[j];
    if (vector_y && word_aligned(w)) {
      const uint4 word = *reinterpret_cast<const uint4*>(w);
      const scalar_t* ws = reinterpret_cast<const scalar_t*>(&word);
#pragma unroll
      for (int i = 0; i < vec; ++i) sum[i] += hj * static_cast<acc_t>(ws[i]);
    } else {
#pragma unroll
      for (int i = 0; i < vec; ++i) {
        if (i < owned) sum[i] += hj * static_cast<acc_t>(w[i]);
      }
    }
  }
  const acc_t c = static_cast<acc_t>(scalings[s * tables.adapters + a]);
  scalar_t* yo = y + t * width + begin + first;
  if (vector_y) {
    uint4 word = *reinterpret_cast<const uint4*>(yo);
    scalar_t* ys = reinterpret_cast<scalar_t*>(&word);
#pragma unroll
    for (int i = 0; i < vec; ++i) {
      ys[i] = static_cast<scalar_t>(static_cast<acc_t>(ys[i]) + c * sum[i]);
    }
    *reinterpret_cast<uint4*>(yo) = word;
  } else {
#pragma unroll
    for (int i = 0; i < vec; ++i) {
      if (i < owned) yo[i] = static_cast<scalar_t>(static_cast<acc_t>(yo[i]) + c * sum[i]);
    }
  }
}

// grid: (tiles, slices); dynamic shared memory: max_rank int64 row offsets
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void expand_sgmv(scalar_t* __restrict__ y, const acc_t* __restrict__ h,
                            const scalar_t* __restrict__ pool, Tables tables,
                            const float* __restrict__ scalings,
                            const index_t* __restrict__ token_adapter,
                            const int32_t* __restrict__ order, int64_t listed,
                            const int32_t* __restrict__ tiles, SliceOffsets slices,
                            int64_t tokens, int64_t width) {
  extern __shared__ int64_t staged_rows[];
  const int64_t s = blockIdx.y;
  const Tile tile = load_tile(tables, order, listed, tiles, blockIdx.x, tokens, token_adapter);
  if (tile.n == 0) return;
  const int64_t a = tile.adapter;
  const int n = tile.n;
  const int r = checked_rank(tables, s, a);
  if (r == 0) return;  // y untouched, as on the CPU
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


// ---- SGMV on tensor cores (fp16 / bf16, sm_80+; lora_index.h, plan_sgmv_mma) ---------------------

// The CUDA type WMMA takes for a scalar type; void where the tensor-core kernels do not apply.
template <typename scalar_t>
struct MmaType {
  using type = void;
};
template <>
struct MmaType<at::Half> {
  using type = __half;
};
template <>
struct MmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Shared-memory row padding (elements): keeps rows 16-byte aligned and WMMA fragment pointers
// 32-byte aligned while shifting successive rows across banks.
constexpr int kMmaPad = 8;


// Stages the 16-byte word of a row that starts at base + start, at column k, into dst: an async
// copy where the source word is aligned and before `limit`, zeros for a dead row (start < 0) or
// past the limit, element loads across the limit or from a row that is not word-aligned (plain
// stores: complete before the barrier that publishes the stage). (An offset from a global base,
// not a pointer kept in shared memory, so the element loads compile to global loads.)
template <typename scalar_t>
__device__ __forceinline__ void stage_word(scalar_t* dst, const scalar_t* __restrict__ base,
                                           int64_t start, int64_t k, int64_t limit) {
  constexpr int vec = kVec<scalar_t>;
  if (start < 0 || k >= limit) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    return;
  }
  const scalar_t* p = base + start + k;
  if (k + vec <= limit && word_aligned(p)) {
    copy16_async(dst, p);
  } else {
#pragma unroll
    for (int i = 0; i < vec; ++i) dst[i] = k + i < limit ? p[i] : static_cast<scalar_t>(0.0f);
  }
}

// The work item of a tensor-core block: a chunk of up to kMaxChunk tokens of one adapter (a tile
// when the call has no chunk list). n = 0: a bad item (reported once), skipped.
struct Chunk {
  int n;
  int64_t adapter;
};

// Reads item `item` of a chunk (or tile) list and its tokens into chunk_token (shared memory,
// thread i reads token i). As for load_tile, a token whose token_adapter entry is not the item's
// adapter means a plan that does not match the batch: reported, the item skipped. Every thread
// of the block must call it; it ends on a barrier, so chunk_token is then visible to all.
template <typename index_t>
__device__ __forceinline__ Chunk load_chunk(const Tables& t, const int32_t* order, int64_t listed,
                                            const int32_t* items, int64_t item, int64_t tokens,
                                            const index_t* token_adapter, int64_t* chunk_token) {
  static_assert(kMaxChunk <= kMmaWarps * 32, "a thread per token of a chunk");
  const int64_t first = items[kTileFields * item], end = items[kTileFields * item + 1];
  const int64_t a = items[kTileFields * item + 2];
  // The same values in every thread: the whole block leaves together.
  if (first < 0 || end <= first || end > listed || end - first > kMaxChunk || a < 0 ||
      a >= t.adapters) {
    if (threadIdx.x == 0) report_index_error(t.error_word, kLoraSgmvPlan);
    return {0, 0};
  }
  const int n = static_cast<int>(end - first);
  bool bad = false;
  if (static_cast<int>(threadIdx.x) < n) {
    const int64_t token = order[first + threadIdx.x];
    const bool inside = token >= 0 && token < tokens;
    bad = !inside || static_cast<int64_t>(token_adapter[inside ? token : 0]) != a;
    chunk_token[threadIdx.x] = token;
  }
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) report_index_error(t.error_word, kLoraSgmvPlan);
    return {0, 0};
  }
  return {n, a};
}

// grid: (chunks, rank groups x K splits, slices), kMmaWarps warps. h[s, token, j] for the
// chunk's tokens and the group's kMmaRanks rows j over the split's columns of K (added
// atomically into the zeroed h when K is split); a row past the rank or a bad row keeps h at 0.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMmaWarps * 32)
    shrink_sgmv_mma(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pool,
                    Tables tables, const index_t* __restrict__ token_adapter,
                    const int32_t* __restrict__ order, int64_t listed,
                    const int32_t* __restrict__ chunks, float* __restrict__ h, int64_t tokens,
                    int64_t in, int64_t rank_groups, int64_t k_splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using mma_t = typename MmaType<scalar_t>::type;
  constexpr int vec = kVec<scalar_t>;
  constexpr int ld = kMmaStageK + kMmaPad;
  // A stage: the chunk's x rows (kMaxChunk), then the group's adapter rows (kMmaRanks).
  constexpr int stage_rows = kMaxChunk + kMmaRanks;
  constexpr int stage_elements = stage_rows * ld;
  constexpr int slots = kMmaRowTiles / kMmaWarps;  // row tiles per warp
  constexpr int tile_outputs = kMmaRowTile * kMmaRanks;
  static_assert(kMmaWarps * slots * tile_outputs * sizeof(float) <=
                    2 * stage_elements * sizeof(scalar_t),
                "the output tiles reuse the stages' shared memory");
  __shared__ alignas(128) scalar_t staged[2 * stage_elements];
  __shared__ int64_t row_start[stage_rows];  // element offsets; -1: a row that reads as zeros
  __shared__ int64_t chunk_token[kMaxChunk];
  const int64_t s = blockIdx.z;
  const Chunk chunk = load_chunk(tables, order, listed, chunks, blockIdx.x, tokens, token_adapter,
                                 chunk_token);
  if (chunk.n == 0) return;
  const int r = checked_rank(tables, s, chunk.adapter);
  const int j0 = static_cast<int>(blockIdx.y % rank_groups) * kMmaRanks;
  if (j0 >= r) return;  // the whole block
  const int64_t steps = (in + kMmaSplitK - 1) / kMmaSplitK;
  const int64_t per_split = (steps + k_splits - 1) / k_splits * kMmaSplitK;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y / rank_groups) * per_split;
  if (k_begin >= in) return;  // an empty split (the splits were evened out)
  const int64_t k_end = k_begin + per_split < in ? k_begin + per_split : in;
  // Only the row tiles that hold tokens are staged and multiplied: a ragged chunk costs its rows.
  const int row_tiles = (chunk.n + kMmaRowTile - 1) / kMmaRowTile;
  const int x_rows = row_tiles * kMmaRowTile;
  for (int i = threadIdx.x; i < stage_rows; i += blockDim.x) {
    int64_t start = -1;
    if (i < kMaxChunk) {
      if (i < chunk.n) start = chunk_token[i] * in;
    } else {
      const int j = j0 + i - kMaxChunk;
      if (j < r) start = checked_row(tables, s, chunk.adapter, j, in);
    }
    row_start[i] = start;
  }
  __syncthreads();
  auto stage = [&](int buffer, int64_t k0) {
    constexpr int words = kMmaStageK / vec;
    scalar_t* dst = staged + buffer * stage_elements;
    // The block size is the kernels' fixed kMmaWarps warps: a constant stride gives the compiler
    // exact trip counts to batch the copies by.
    for (int e = threadIdx.x; e < (x_rows + kMmaRanks) * words; e += kMmaWarps * 32) {
      const int row = e / words, word = e % words;
      const int i = row < x_rows ? row : row - x_rows + kMaxChunk;
      stage_word(dst + i * ld + word * vec, i < kMaxChunk ? x : pool, row_start[i],
                 k0 + word * vec, in);
    }
    async_commit();
  };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 8, 32, 16, float> acc[slots];
#pragma unroll
  for (int slot = 0; slot < slots; ++slot) wmma::fill_fragment(acc[slot], 0.0f);
  stage(0, k_begin);
  int buffer = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaStageK, buffer ^= 1) {
    // Double buffering: the next stage's copies go out before this stage is multiplied.
    if (k0 + kMmaStageK < k_end) {
      stage(buffer ^ 1, k0 + kMmaStageK);
    } else {
      async_commit();  // an empty group, so that the wait below means "this stage" always
    }
    async_wait<1>();
    __syncthreads();  // every thread's part of this stage has landed
    const scalar_t* xs = staged + buffer * stage_elements;
    const scalar_t* ws = xs + kMaxChunk * ld;
    if (warp < row_tiles) {
#pragma unroll
      for (int kk = 0; kk < kMmaStageK; kk += 16) {
        // One fragment of the adapter rows serves every row tile the warp owns.
        wmma::fragment<wmma::matrix_b, 8, 32, 16, mma_t, wmma::col_major> b;
        wmma::load_matrix_sync(b, reinterpret_cast<const mma_t*>(ws + kk), ld);
#pragma unroll
        for (int slot = 0; slot < slots; ++slot) {
          const int tile = warp + slot * kMmaWarps;
          if (tile < row_tiles) {
            wmma::fragment<wmma::matrix_a, 8, 32, 16, mma_t, wmma::row_major> a;
            wmma::load_matrix_sync(
                a, reinterpret_cast<const mma_t*>(xs + tile * kMmaRowTile * ld + kk), ld);
            wmma::mma_sync(acc[slot], a, b, acc[slot]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration stages into this buffer
  }
  // The loop ended on a barrier: the stages' memory holds each warp's output tiles now.
  float* out = reinterpret_cast<float*>(staged) + warp * slots * tile_outputs;
#pragma unroll
  for (int slot = 0; slot < slots; ++slot) {
    const int tile = warp + slot * kMmaWarps;
    if (tile >= row_tiles) continue;
    wmma::store_matrix_sync(out + slot * tile_outputs, acc[slot], kMmaRanks, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < tile_outputs; e += 32) {
      const int i = tile * kMmaRowTile + e / kMmaRanks, jj = e % kMmaRanks;
      if (i >= chunk.n || j0 + jj >= r || row_start[kMaxChunk + jj] < 0) continue;
      float* target = h + h_index(s, chunk_token[i], j0 + jj, tokens, tables.max_rank);
      if (k_splits == 1) {
        *target = out[slot * tile_outputs + e];
      } else {
        atomicAdd(target, out[slot * tile_outputs + e]);
      }
    }
  }
#else
  __trap();  // built for an arch without these tensor cores: never launched (the host checks)
#endif
}

// grid: (chunks, column blocks, slices), kMmaWarps warps, warp w owning 32 of the block's
// columns for every row tile of the chunk. y[token, slice columns of the block] += scaling *
// h W^T; a bad row contributes nothing (reported by the first column block).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMmaWarps * 32)
    expand_sgmv_mma(scalar_t* __restrict__ y, const float* __restrict__ h,
                    const scalar_t* __restrict__ pool, Tables tables,
                    const float* __restrict__ scalings, const index_t* __restrict__ token_adapter,
                    const int32_t* __restrict__ order, int64_t listed,
                    const int32_t* __restrict__ chunks, SliceOffsets slices, int64_t tokens,
                    int64_t width) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using mma_t = typename MmaType<scalar_t>::type;
  constexpr int vec = kVec<scalar_t>;
  static_assert(vec == 8, "a lane's 8 outputs are one 16-byte word of y");
  constexpr int h_ld = kMmaRankChunk + kMmaPad;
  constexpr int w_ld = kMmaColumns + kMmaPad;
  // h in two parts, hi = h rounded to the input type and lo = the rest rounded again: two MMAs
  // carry h to ~2^-22 (fp16) / ~2^-16 (bf16) relative instead of one rounding's 2^-11 / 2^-8.
  // The rank (this product's K) is a single stage for ranks up to kMmaRankChunk, so the stage is
  // not double-buffered; its copies are in flight while h is converted.
  __shared__ alignas(32) scalar_t hs[kMaxChunk * h_ld];
  __shared__ alignas(32) scalar_t hs_lo[kMaxChunk * h_ld];
  __shared__ alignas(32) scalar_t ws[kMmaRankChunk * w_ld];
  __shared__ alignas(32) float out[kMmaWarps][kMmaRowTile * 32];
  __shared__ int64_t w_row[kMmaRankChunk];
  __shared__ int64_t chunk_token[kMaxChunk];
  const int64_t s = blockIdx.z;
  const Chunk chunk = load_chunk(tables, order, listed, chunks, blockIdx.x, tokens, token_adapter,
                                 chunk_token);
  if (chunk.n == 0) return;
  const int64_t begin = slices.begin[s], size = slices.begin[s + 1] - begin;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kMmaColumns;
  if (col0 >= size) return;  // the whole block: a narrower slice
  const int r = checked_rank(tables, s, chunk.adapter);
  if (r == 0) return;  // y untouched, as on the CPU
  const int row_tiles = (chunk.n + kMmaRowTile - 1) / kMmaRowTile;
  const int x_rows = row_tiles * kMmaRowTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // A warp whose 32 columns all lie past the slice's end only helps stage.
  const bool live = col0 + warp * 32 < size;
  wmma::fragment<wmma::accumulator, 8, 32, 16, float> acc[kMmaRowTiles];
#pragma unroll
  for (int tile = 0; tile < kMmaRowTiles; ++tile) wmma::fill_fragment(acc[tile], 0.0f);
  for (int j0 = 0; j0 < r; j0 += kMmaRankChunk) {
    // The chunk's rank rows rounded up to the MMA's K of 16: a rank-16 adapter stages 16 rows.
    const int depth = min(kMmaRankChunk, (r - j0 + 15) / 16 * 16);
    if (threadIdx.x < kMmaRankChunk) {
      const int j = j0 + static_cast<int>(threadIdx.x);
      int64_t row = -1;
      if (j < r) {
        const int64_t o = tables.rows[table_index(s, chunk.adapter, j, tables.adapters,
                                                  tables.max_rank)];
        const bool inside = o >= 0 && o <= tables.pool_size - size;
        if (!inside && blockIdx.y == 0) report_index_error(tables.error_word, kLoraRows);
        row = inside ? o + col0 : -1;
      }
      w_row[threadIdx.x] = row;
    }
    __syncthreads();
    constexpr int words = kMmaColumns / vec;
    for (int e = threadIdx.x; e < depth * words; e += kMmaWarps * 32) {
      const int row = e / words, word = e % words;
      stage_word(ws + row * w_ld + word * vec, pool, w_row[row], word * vec, size - col0);
    }
    async_commit();
    for (int e = threadIdx.x; e < x_rows * depth; e += kMmaWarps * 32) {
      const int i = e / depth, jj = e % depth;
      const float v = i < chunk.n && j0 + jj < r
                          ? h[h_index(s, chunk_token[i], j0 + jj, tokens, tables.max_rank)]
                          : 0.0f;
      const scalar_t hi = static_cast<scalar_t>(v);
      hs[i * h_ld + jj] = hi;
      hs_lo[i * h_ld + jj] = static_cast<scalar_t>(v - static_cast<float>(hi));
    }
    async_wait<0>();
    __syncthreads();
    if (live) {
      for (int kk = 0; kk < depth; kk += 16) {
        // One fragment of B^T serves every row tile of the chunk.
        wmma::fragment<wmma::matrix_b, 8, 32, 16, mma_t, wmma::row_major> b;
        wmma::load_matrix_sync(b, reinterpret_cast<const mma_t*>(ws + kk * w_ld + warp * 32),
                               w_ld);
#pragma unroll
        for (int tile = 0; tile < kMmaRowTiles; ++tile) {
          if (tile < row_tiles) {
            wmma::fragment<wmma::matrix_a, 8, 32, 16, mma_t, wmma::row_major> a;
            const int at = tile * kMmaRowTile * h_ld + kk;
            wmma::load_matrix_sync(a, reinterpret_cast<const mma_t*>(hs + at), h_ld);
            wmma::mma_sync(acc[tile], a, b, acc[tile]);
            wmma::load_matrix_sync(a, reinterpret_cast<const mma_t*>(hs_lo + at), h_ld);
            wmma::mma_sync(acc[tile], a, b, acc[tile]);
          }
        }
      }
    }
    __syncthreads();  // the next rank chunk overwrites the staged rows
  }
  if (!live) return;
  const float c = scalings[s * tables.adapters + chunk.adapter];
  // Lane: row lane / 4 of a row tile, 8 consecutive columns from (lane % 4) * 8, so each lane
  // reads and writes one 16-byte word of y.
  const int row_in = lane / 4, col_in = (lane % 4) * 8;
  const int64_t o = col0 + warp * 32 + col_in;
#pragma unroll
  for (int tile = 0; tile < kMmaRowTiles; ++tile) {
    if (tile >= row_tiles) continue;
    wmma::store_matrix_sync(out[warp], acc[tile], 32, wmma::mem_row_major);
    __syncwarp();
    const int i = tile * kMmaRowTile + row_in;
    if (i < chunk.n && o < size) {
      scalar_t* yo = y + chunk_token[i] * width + begin + o;
      const float* v = out[warp] + row_in * 32 + col_in;
      if (o + vec <= size && word_aligned(yo)) {
        uint4 word = *reinterpret_cast<const uint4*>(yo);
        scalar_t* ys = reinterpret_cast<scalar_t*>(&word);
#pragma unroll
        for (int q = 0; q < vec; ++q) {
          ys[q] = static_cast<scalar_t>(static_cast<float>(ys[q]) + c * v[q]);
        }
        *reinterpret_cast<uint4*>(yo) = word;
      } else {
        for (int q = 0; q < vec && o + q < size; ++q) {
          yo[q] = static_cast<scalar_t>(static_cast<float>(yo[q]) + c * v[q]);
        }
      }
    }
    __syncwarp();  // the next tile overwrites out[warp]
  }
#else
  __trap();  // built for an arch without these tensor cores: never launched (the host checks)
#endif
}

Tables make_tables(const at::Tensor& pool, const at::Tensor& rows, const at::Tensor& ranks) {
  TORCH_CHECK_VALUE(rows.size(2) <= kMaxCudaRank, "fastllm.lora: on CUDA the row tables may be at "
                    "most ", kMaxCudaRank, " wide (max_rank), got ", rows.size(2));
  return {rows.data_ptr<int64_t>(), ranks.data_ptr<int32_t>(), rows.size(1), rows.size(2),
          pool.numel(), device_error_word(pool)};
}

bool is_word_aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int64_t sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Whether SGMV in this type runs on tensor cores on the current GPU: an sm_80+ device and
// kernels compiled for sm_80+ (PTX of an older arch JIT-compiled here would hold the trap).
template <typename scalar_t>
bool use_tensor_cores() {
  if constexpr (std::is_void_v<typename MmaType<scalar_t>::type>) {
    return false;
  } else {
    // Known per device after the first call (0 unknown, 1 no, 2 yes): a prefill calls this per
    // LoRA linear.
    static std::array<std::atomic<int>, 64> known{};
    const int device = at::cuda::current_device();
    const bool cached = device >= 0 && device < static_cast<int>(known.size());
    if (cached && known[device].load() != 0) return known[device].load() == 2;
    bool usable = at::cuda::getCurrentDeviceProperties()->major >= 8;
    if (usable) {
      cudaFuncAttributes attributes{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, shrink_sgmv_mma<scalar_t, int64_t>));
      usable = attributes.ptxVersion >= 80;
    }
    if (cached) known[device].store(usable ? 2 : 1);
    return usable;
  }
}

// Whether the SGMV path of this dtype runs on tensor cores (the path rule depends on it).
bool tensor_cores_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return use_tensor_cores<at::Half>();
    case at::kBFloat16: return use_tensor_cores<at::BFloat16>();
    default: return false;
  }
}

// Tensor-core SGMV launches; no-ops for the types the tensor cores do not take (never chosen:
// use_tensor_cores is false for them), so that only fp16 / bf16 instantiate the kernels.
template <typename scalar_t>
void launch_shrink_sgmv_mma(const at::Tensor& x, const at::Tensor& pool, const Tables& tables,
                            const at::Tensor& token_adapter, const at::Tensor& order,
                            const at::Tensor& chunks, at::Tensor& h, int64_t max_rank,
                            cudaStream_t stream) {
  if constexpr (!std::is_void_v<typename MmaType<scalar_t>::type>) {
    if (chunks.size(0) == 0) return;  // an empty grid is not a launch
    const int64_t slices = h.size(0), tokens = x.size(0), in = x.size(1);
    TORCH_CHECK_VALUE(slices <= kMaxGridYZ, "fastllm.lora_shrink: at most ", kMaxGridYZ,
                      " slices on CUDA, got ", slices);
    const SgmvMmaLaunch plan = plan_sgmv_mma(max_rank, 0);
    // Deterministic algorithms: one split, no atomics.
    const int64_t k_splits =
        at::globalContext().deterministicAlgorithms()
            ? 1
            : plan_sgmv_mma_k_splits(chunks.size(0), plan.rank_groups, slices, in, sm_count());
    AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_shrink_ids", [&] {
      shrink_sgmv_mma<scalar_t, index_t>
          <<<dim3(chunks.size(0), plan.rank_groups * k_splits, slices), kMmaWarps * 32, 0,
             stream>>>(
              x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), tables,
              token_adapter.data_ptr<index_t>(), order.data_ptr<int32_t>(), order.numel(),
              chunks.data_ptr<int32_t>(), h.data_ptr<float>(), tokens, in, plan.rank_groups,
              k_splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

template <typename scalar_t>
void launch_expand_sgmv_mma(at::Tensor& y, const at::Tensor& h, const at::Tensor& pool,
                            const Tables& tables, const at::Tensor& scalings,
                            const at::Tensor& token_adapter, const at::Tensor& order,
                            const at::Tensor& chunks, const SliceOffsets& slice_offsets,
                            int64_t max_rank, int64_t widest, cudaStream_t stream) {
  if constexpr (!std::is_void_v<typename MmaType<scalar_t>::type>) {
    if (chunks.size(0) == 0) return;
    const int64_t slices = h.size(0), tokens = y.size(0), width = y.size(1);
    const SgmvMmaLaunch plan = plan_sgmv_mma(max_rank, widest);
    TORCH_CHECK_VALUE(plan.column_blocks <= kMaxGridYZ, "fastllm.lora_expand: a slice of ",
                      widest, " columns is too wide for the CUDA prefill kernel");
    AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_expand_ids", [&] {
      expand_sgmv_mma<scalar_t, index_t>
          <<<dim3(chunks.size(0), plan.column_blocks, slices), kMmaWarps * 32, 0, stream>>>(
              y.data_ptr<scalar_t>(), h.data_ptr<float>(), pool.data_ptr<scalar_t>(), tables,
              scalings.data_ptr<float>(), token_adapter.data_ptr<index_t>(),
              order.data_ptr<int32_t>(), order.numel(), chunks.data_ptr<int32_t>(), slice_offsets,
              tokens, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows,
                            const at::Tensor& ranks, const at::Tensor& token_adapter, int64_t path,
                            const c10::optional<at::Tensor>& sgmv_order,
                            const c10::optional<at::Tensor>& sgmv_tiles,
                            const c10::optional<at::Tensor>& sgmv_chunks) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_shrink(x, pool, a_rows, ranks, token_adapter, path, sgmv_order, sgmv_tiles, sgmv_chunks);
  const int64_t slices = a_rows.size(0), max_rank = a_rows.size(2);
  const int64_t tokens = x.size(0), in = x.size(1);
  const int64_t plan_tiles = sgmv_tiles.has_value() ? sgmv_tiles->size(0) : -1;
  path = resolve_path_cuda(path, tokens, plan_tiles, sm_count(),
                           tensor_cores_for(x.scalar_type()));
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
      constexpr int vec = kVec<scalar_t>;
      TORCH_CHECK_VALUE(slices <= kMaxGridYZ, "fastllm.lora_shrink: at most ", kMaxGridYZ,
                        " slices on CUDA, got ", slices);
      const ShrinkLaunch plan = plan_shrink(tokens, slices, in, max_rank, sm_count(), vec);
      TORCH_CHECK_VALUE(plan.chunk <= kMaxShrinkChunk, "fastllm.lora_shrink: x is too wide (",
                        in, " columns) for the CUDA decode kernel");
      const bool vector_x = in % vec == 0 && is_word_aligned(x.data_ptr());
      const size_t shared_bytes = static_cast<size_t>(plan.chunk) * sizeof(scalar_t);
      // Deterministic: one workspace slice per K split (zeros where a row is past its rank),
      // summed by at::sum in an order fixed by the shape; otherwise the splits add into h
      // atomically, in whatever order the blocks finish.
      const bool ordered = plan.splits > 1 && at::globalContext().deterministicAlgorithms();
      at::Tensor out = ordered ? at::zeros({plan.splits, slices, tokens, max_rank}, h.options())
                               : h;
      const int64_t split_stride = ordered ? slices * tokens * max_rank : 0;
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_shrink_ids", [&] {
        shrink_bgmv<scalar_t, acc_t, index_t>
            <<<dim3(tokens, plan.blocks(), slices), kShrinkWarps * 32, shared_bytes, stream>>>(
                x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), tables,
                token_adapter.data_ptr<index_t>(), out.data_ptr<acc_t>(), tokens, in, plan.chunk,
                plan.row_groups, plan.splits, vector_x, split_stride);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (ordered) at::sum_out(h, out, {0});
    } else if (use_tensor_cores<scalar_t>()) {
      if (plan_tiles == 0) return;
      // The tiles are chunks of up to kTile tokens when the call has no chunk list.
      launch_shrink_sgmv_mma<scalar_t>(x, pool, tables, token_adapter, *sgmv_order,
                                       sgmv_chunks.has_value() ? *sgmv_chunks : *sgmv_tiles, h,
                                       max_rank, stream);
    } else {
      if (plan_tiles == 0) return;
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_shrink_ids", [&] {
        shrink_sgmv<scalar_t, acc_t, index_t><<<dim3(plan_tiles, slices), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), pool.data_ptr<scalar_t>(), tables,
            token_adapter.data_ptr<index_t>(), sgmv_order->data_ptr<int32_t>(),
            sgmv_order->numel(), sgmv_tiles->data_ptr<int32_t>(), h.data_ptr<acc_t>(), tokens,
            in);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return h;
}

void lora_expand_cuda(at::Tensor& y, const at::Tensor& h, const at::Tensor& pool,
                      const at::Tensor& b_rows, const at::Tensor& ranks,
                      const at::Tensor& scalings, const at::Tensor& token_adapter,
                      at::IntArrayRef slice_sizes, int64_t path,
                      const c10::optional<at::Tensor>& sgmv_order,
                      const c10::optional<at::Tensor>& sgmv_tiles,
                      const c10::optional<at::Tensor>& sgmv_chunks) {
  const c10::cuda::CUDAGuard guard(y.device());
  const std::vector<int64_t> offsets = check_expand(y, h, pool, b_rows, ranks, scalings,
                                                    token_adapter, slice_sizes, path, sgmv_order,
                                                    sgmv_tiles, sgmv_chunks);
  const int64_t slices = b_rows.size(0), max_rank = b_rows.size(2);
  const int64_t tokens = y.size(0), width = y.size(1);
  TORCH_CHECK_VALUE(slices <= kMaxSlices, "fastllm.lora_expand: at most ", kMaxSlices,
                    " output slices on CUDA, got ", slices);
  const int64_t plan_tiles = sgmv_tiles.has_value() ? sgmv_tiles->size(0) : -1;
  path = resolve_path_cuda(path, tokens, plan_tiles, sm_count(),
                           tensor_cores_for(y.scalar_type()));
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
      constexpr int vec = kVec<scalar_t>;
      int64_t widest = 0;
      bool vector_y = width % vec == 0 && is_word_aligned(y.data_ptr());
      for (int64_t s = 0; s < slices; ++s) {
        widest = std::max(widest, slice_sizes[s]);
        vector_y = vector_y && offsets[s] % vec == 0 && slice_sizes[s] % vec == 0;
      }
      const ExpandLaunch plan = plan_expand(tokens, slices, widest, vec, sm_count());
      TORCH_CHECK_VALUE(plan.tiles <= kMaxGridYZ, "fastllm.lora_expand: a slice of ", widest,
                        " columns is too wide for the CUDA decode kernel");
      const size_t bgmv_shared = static_cast<size_t>(max_rank) * (sizeof(int64_t) + sizeof(acc_t));
      TORCH_CHECK_VALUE(bgmv_shared <= kDefaultSharedBytes, "fastllm.lora_expand: b_rows is ",
                        max_rank, " wide (max_rank); the CUDA decode kernel takes at most ",
                        kDefaultSharedBytes / (sizeof(int64_t) + sizeof(acc_t)), " for ",
                        y.scalar_type());
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_expand_ids", [&] {
        expand_bgmv<scalar_t, acc_t, index_t>
            <<<dim3(tokens, plan.tiles, slices), plan.threads, bgmv_shared, stream>>>(
                y.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), pool.data_ptr<scalar_t>(), tables,
                scalings.data_ptr<float>(), token_adapter.data_ptr<index_t>(), slice_offsets,
                tokens, width, vector_y);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else if (use_tensor_cores<scalar_t>()) {
      if (plan_tiles == 0) return;
      int64_t widest = 0;
      for (int64_t s = 0; s < slices; ++s) widest = std::max(widest, slice_sizes[s]);
      launch_expand_sgmv_mma<scalar_t>(y, h, pool, tables, scalings, token_adapter, *sgmv_order,
                                       sgmv_chunks.has_value() ? *sgmv_chunks : *sgmv_tiles,
                                       slice_offsets, max_rank, widest, stream);
    } else {
      if (plan_tiles == 0) return;
      AT_DISPATCH_INDEX_TYPES(token_adapter.scalar_type(), "lora_expand_ids", [&] {
        expand_sgmv<scalar_t, acc_t, index_t>
            <<<dim3(plan_tiles, slices), kThreads, shared_bytes, stream>>>(
                y.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), pool.data_ptr<scalar_t>(), tables,
                scalings.data_ptr<float>(), token_adapter.data_ptr<index_t>(),
                sgmv_order->data_ptr<int32_t>(), sgmv_order->numel(),
                sgmv_tiles->data_ptr<int32_t>(), slice_offsets, tokens, width);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_expand", &lora_expand_cuda);
}

}  // namespace fastllm::lora
