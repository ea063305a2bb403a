// Index arithmetic of the paged LoRA kernels, shared by the CPU and CUDA implementations.
//
// Layout. An adapter's weights are rows in the page pool: for every target module, r rows of A
// (each `in` elements) and r rows of B^T (each `out` elements), each row contiguous and inside one
// page, anywhere in the pool. A batch describes its adapters with row tables: a_rows[s, a, j] is the
// element offset in the pool of row j of A for output slice s of the batch's adapter a (b_rows the
// same for B^T), valid for j < ranks[s, a]. So mixed ranks cost nothing: a rank-8 adapter next to a
// rank-256 one reads 8 rows, and the tables (not the weights) are what is padded to the batch's
// largest rank.
//
// Two ways to walk a batch:
//  - BGMV (decode): one work item per (token, slice); each token reads its adapter's rows itself.
//  - SGMV (prefill): tokens grouped by adapter into tiles of up to kTile tokens; a tile reads each
//    adapter row once and applies it to all of its tokens, so a row is fetched once per tile
//    instead of once per token. The tensor-core kernels take chunks of up to kMaxChunk tokens
//    instead (tiles merged; below).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/host_device.h"

namespace fastllm::lora {

enum Path : int64_t { kAuto = 0, kBgmv = 1, kSgmv = 2 };

// Tokens per SGMV tile: enough to amortise a row fetch, few enough for per-token accumulators to
// stay in registers on the GPU.
constexpr int kTile = 8;

// CPU: below this many tokens per distinct adapter on average, grouping buys little: use BGMV.
constexpr int64_t kSgmvMinTokensPerAdapter = 4;

// Output slices one expand can take (q/k/v fused is 3, gate/up 2): their column offsets travel to
// the kernels by value, so no per-call upload.
constexpr int kMaxSlices = 16;
struct SliceOffsets {
  int64_t begin[kMaxSlices + 1];
};

// An SGMV plan is two int32 tensors: `order`, the tokens grouped by adapter (tokens without one
// left out), and `tiles` [T, 3], each row (first, end, adapter): tile i covers
// order[first, end), at most kTile tokens, all of adapter `adapter`; optionally a third,
// `chunks` [C, 3], the same tokens in rows of up to kMaxChunk (build_chunks).
constexpr int kTileFields = 3;

FASTLLM_HOST_DEVICE int64_t table_index(int64_t slice, int64_t adapter, int64_t row,
                                        int64_t num_adapters, int64_t max_rank) {
  return (slice * num_adapters + adapter) * max_rank + row;
}

// Offset of h[s, t, j] in the [S, T, R] intermediate.
FASTLLM_HOST_DEVICE int64_t h_index(int64_t slice, int64_t token, int64_t row, int64_t tokens,
                                    int64_t max_rank) {
  return (slice * tokens + token) * max_rank + row;
}

// CPU rule: the tiles are built in the op from token_adapter (host memory, free to read).
// ---- decode (BGMV) launch planning, host-only and unit-tested on the CPU -------------------------
//
// Shrink: a block of kShrinkWarps warps serves one (token, slice, group of kShrinkWarps rows,
// K split); each warp reduces one adapter row over the split's chunk of x (staged in shared
// memory, shared by the block's rows) with one 16-byte load per lane per step, and adds its
// partial sum into h (atomically when K is split). Splitting K is what lets a single decode token
// occupy the GPU: without it one token is one block.
constexpr int kShrinkWarps = 4;
// Largest chunk of x a block stages (elements): 32 KB of fp64, 16 KB of fp32, 8 KB of fp16.
constexpr int64_t kMaxShrinkChunk = 4096;
// CUDA's limit on grid.y and grid.z.
constexpr int64_t kMaxGridYZ = 65535;

struct ShrinkLaunch {
  int64_t splits;      // K splits per (token, slice, row group)
  int64_t chunk;       // elements of x per split, a multiple of 32 * vec
  int64_t row_groups;  // ceil(max_rank / kShrinkWarps)
  int64_t blocks() const { return splits * row_groups; }  // per (token, slice)
};

// vec: elements per 16-byte word (8 for fp16/bf16, 4 for fp32, 2 for fp64). Splits K until the
// launch has at least two waves of blocks (2 * sms), never below one warp step (32 * vec
// elements) per split: beyond that there is no more independent work to hand out.
inline ShrinkLaunch plan_shrink(int64_t tokens, int64_t slices, int64_t in, int64_t max_rank,
                                int64_t sms, int64_t vec) {
  const int64_t step = 32 * vec;
  const int64_t row_groups = std::max<int64_t>(1, (max_rank + kShrinkWarps - 1) / kShrinkWarps);
  const int64_t steps = std::max<int64_t>(1, (in + step - 1) / step);
  const int64_t base = std::max<int64_t>(1, tokens * slices * row_groups);
  const int64_t target = 2 * std::max<int64_t>(1, sms);
  const int64_t wanted = std::min(steps, std::max<int64_t>(1, (target + base - 1) / base));
  // Rounding the steps per split down keeps at least `wanted` splits.
  int64_t steps_per_split = std::max<int64_t>(1, steps / wanted);
  steps_per_split = std::min(steps_per_split, std::max<int64_t>(1, kMaxShrinkChunk / step));
  const int64_t max_splits = std::max<int64_t>(1, kMaxGridYZ / row_groups);
  steps_per_split = std::max(steps_per_split, (steps + max_splits - 1) / max_splits);
  // Even out the splits (43 steps in 2 would otherwise be 21 + 21 + 1).
  const int64_t splits = (steps + steps_per_split - 1) / steps_per_split;
  steps_per_split = (steps + splits - 1) / splits;
  return {(steps + steps_per_split - 1) / steps_per_split, steps_per_split * step, row_groups};
}

// Expand: a block serves one (token, column tile, slice); each thread owns vec contiguous outputs
// (one 16-byte word of y and of each B^T row), and the token's h and row offsets are loaded once
// per block into shared memory. Blocks shrink from kExpandThreads to one warp until the launch has
// two waves (decode batches are a few tokens wide); splitting the rank across warps would go
// further and is not done yet.
constexpr int kExpandThreads = 128;

struct ExpandLaunch {
  int64_t threads;  // per block: 32, 64 or 128
  int64_t tiles;    // column tiles covering the widest slice
};

inline ExpandLaunch plan_expand(int64_t tokens, int64_t slices, int64_t widest_slice, int64_t vec,
                                int64_t sms) {
  const int64_t target = 2 * std::max<int64_t>(1, sms);
  const int64_t width = std::max<int64_t>(1, widest_slice);
  int64_t threads = kExpandThreads;
  auto tiles_for = [&](int64_t t) { return (width + t * vec - 1) / (t * vec); };
  while (threads > 32 && tokens * slices * tiles_for(threads) < target) threads /= 2;
  return {threads, tiles_for(threads)};
}

// ---- prefill (SGMV) on tensor cores: fp16 / bf16 on sm_80 and later -------------------------------
//
// The tensor-core kernels work on chunks: up to kMaxChunk consecutive tokens of one adapter
// (the plan's tiles merged, build_chunks), so each adapter tile staged in shared memory serves up
// to 64 tokens instead of a tile's 8. A block of kMmaWarps warps serves one chunk with WMMA
// m8n32k16 products (fp32 accumulation); the chunk's rows are up to kMmaRowTiles row tiles of 8,
// and only the tiles that hold tokens are multiplied, so a ragged last chunk costs its own rows.
//  - shrink, grid (chunks, rank groups x K splits, slices): kMmaRanks adapter rows per block (the
//    N); warp w owns row tiles w and w + kMmaWarps of the chunk; x's rows and the adapter rows are
//    staged kMmaStageK columns of K at a time, double-buffered with cp.async, and every warp
//    multiplies its row tiles by the whole staged A tile.
//  - expand, grid (chunks, column blocks, slices): kMmaColumns output columns per block, 32 per
//    warp (the N), every row tile of the chunk per warp; the rank is the K, staged kMmaRankChunk
//    rows at a time. The tensor cores take h in the input type, so h is split in two parts there
//    (hi + lo, each rounded to fp16 / bf16) to keep about fp32's accuracy.
// fp32 and fp64 (and GPUs before sm_80) keep the CUDA-core SGMV kernels on the plan's tiles.
constexpr int kMmaWarps = 4;
constexpr int kMmaRanks = 32;
constexpr int kMmaRowTile = 8;  // the M of m8n32k16
constexpr int kMaxChunk = 64;
constexpr int kMmaRowTiles = kMaxChunk / kMmaRowTile;
// Columns of K per pipeline stage: 64 x rows and 32 adapter rows of 128 bytes (fp16), two stages
// in 27 KB of shared memory, under the 48 KB a block gets without opting in.
constexpr int kMmaStageK = 64;
// K splits start on multiples of this many columns (several stages, so a split amortises its
// atomic adds and its setup).
constexpr int kMmaSplitK = 256;
constexpr int kMmaRankChunk = 64;
constexpr int kMmaColumns = kMmaWarps * 32;
static_assert(kMaxChunk % kTile == 0, "a chunk is whole tiles");
static_assert(kMmaRowTiles % kMmaWarps == 0, "every warp owns the same number of row tiles");
static_assert(kMmaSplitK % kMmaStageK == 0, "a K split is whole stages");

struct SgmvMmaLaunch {
  int64_t rank_groups;    // shrink grid.y: ceil(max_rank / kMmaRanks)
  int64_t column_blocks;  // expand grid.y: ceil(widest slice / kMmaColumns)
};

inline SgmvMmaLaunch plan_sgmv_mma(int64_t max_rank, int64_t widest_slice) {
  return {std::max<int64_t>(1, (max_rank + kMmaRanks - 1) / kMmaRanks),
          std::max<int64_t>(1, (widest_slice + kMmaColumns - 1) / kMmaColumns)};
}

// Shrink K splits: a prefill of few chunks at a small rank leaves most SMs idle (512 tokens at
// rank 16 on q/k/v in 16-token chunks: 32 chunks x 1 rank group x 3 slices = 96 blocks of 4
// warps), so K is split across blocks, their partial sums added atomically into the zeroed h,
// until there are about kMmaBlocksPerSm blocks per SM; never below kMmaSplitK columns of K per
// split, at most kMmaMaxKSplits. grid.y = rank groups x K splits.
constexpr int64_t kMmaBlocksPerSm = 4;
constexpr int64_t kMmaMaxKSplits = 16;

inline int64_t plan_sgmv_mma_k_splits(int64_t chunks, int64_t rank_groups, int64_t slices,
                                      int64_t in, int64_t sms) {
  const int64_t groups = std::max<int64_t>(1, rank_groups);
  const int64_t blocks = std::max<int64_t>(1, chunks * groups * slices);
  const int64_t target = kMmaBlocksPerSm * std::max<int64_t>(1, sms);
  const int64_t steps = std::max<int64_t>(1, (in + kMmaSplitK - 1) / kMmaSplitK);
  int64_t splits = (target + blocks - 1) / blocks;
  splits = std::min({splits, steps, kMmaMaxKSplits, kMaxGridYZ / groups});
  return std::max<int64_t>(1, splits);
}

// ---- SGMV chunks: host-only, unit-tested on the CPU ---------------------------------------------
//
// A chunk list has the layout of a tile list, (first, end, adapter) per chunk over the plan's
// `order`, with up to kMaxChunk tokens per chunk. Chunks of `rows` tokens from a plan's tiles:
// consecutive tiles of one adapter that continue each other in `order` are merged while the
// chunk stays within `rows` tokens. On lora_sgmv_plan's tiles (each adapter's tiles back to back,
// all full but the last) that gives every adapter ceil(tokens / rows) chunks, the last ragged.
inline std::vector<int32_t> build_chunks(const int32_t* tiles, int64_t count, int64_t rows) {
  std::vector<int32_t> chunks;
  for (int64_t i = 0; i < count; ++i) {
    const int32_t first = tiles[kTileFields * i], end = tiles[kTileFields * i + 1];
    const int32_t adapter = tiles[kTileFields * i + 2];
    if (!chunks.empty()) {
      int32_t* last = chunks.data() + chunks.size() - kTileFields;
      if (last[2] == adapter && last[1] == first && end - last[0] <= rows) {
        last[1] = end;
        continue;
      }
    }
    chunks.insert(chunks.end(), {first, end, adapter});
  }
  return chunks;
}

// Rows per chunk: the largest of 64, 32, 16 whose chunks still give the shrink two waves of
// blocks once it splits K as far as it may (kMmaMaxKSplits, reached from a hidden size of 4096),
// so bigger chunks (each adapter row read once per chunk) are not paid for with idle SMs; below
// that even at 16 rows, 16 (the most blocks). The expand has ceil(width / kMmaColumns) blocks per
// chunk and slice, as many as the shrink's splits from a width of 2048. One list serves every
// projection of a batch, so the rule cannot depend on a module's width. A model, never timed.
inline int64_t plan_sgmv_chunk_rows(const int32_t* tiles, int64_t count, int64_t sms) {
  const int64_t target =
      (2 * std::max<int64_t>(1, sms) + kMmaMaxKSplits - 1) / kMmaMaxKSplits;
  for (int64_t rows : {int64_t{kMaxChunk}, int64_t{kMaxChunk / 2}}) {
    const int64_t chunks = static_cast<int64_t>(build_chunks(tiles, count, rows).size()) /
                           kTileFields;
    if (chunks >= target) return rows;
  }
  return kMaxChunk / 4;
}

inline int64_t resolve_path(int64_t path, int64_t tokens, int64_t adapters) {
  if (path != kAuto) return path;
  return tokens >= kSgmvMinTokensPerAdapter * (adapters > 0 ? adapters : 1) ? kSgmv : kBgmv;
}

// GPU rule, a model (never timed on a GPU).
// - Tensor-core SGMV (fp16/bf16 on sm_80+): it splits K over its chunks, so like the BGMV decode
//   kernels (split-K shrink, column-tiled expand) it fills the GPU at any batch, and what differs
//   is the bytes: BGMV reads a token's adapter rows once per token, the tensor-core SGMV once per
//   chunk of up to 64 tokens (at most once per 8-token tile). SGMV when it reads each adapter's
//   rows at most half as often: 64 decode tokens sharing one adapter (8 tiles) or spread over 16
//   adapters (16 tiles) take SGMV; 64 tokens on 64 distinct adapters, where both read every row
//   once, and a single token stay on BGMV, whose decode kernels carry no per-chunk bookkeeping.
//   The factor of two leaves BGMV the near-ties the model cannot call.
// - CUDA-core SGMV (fp32/fp64, GPUs before sm_80): one block per tile and no K split, so fewer
//   than about two waves of blocks leave HBM bandwidth unused and take about as long as two
//   waves. Cost ~ max(items, 2 * SMs): SGMV only when its tiles cost less than the tokens do;
//   decode stays on BGMV, a prefill of thousands of tokens goes to SGMV.
inline bool gpu_prefers_sgmv(int64_t tokens, int64_t tiles, int64_t sms, bool tensor_cores) {
  if (tiles <= 0) return false;
  if (tensor_cores) return 2 * tiles <= tokens;
  const int64_t floor = 2 * (sms > 0 ? sms : 1);
  auto cost = [floor](int64_t items) { return items > floor ? items : floor; };
  return cost(tiles) < cost(tokens);
}

// CUDA: SGMV needs a plan (the op cannot read token_adapter without a synchronisation), so auto
// means BGMV without one. tiles < 0: no plan.
inline int64_t resolve_path_cuda(int64_t path, int64_t tokens, int64_t tiles, int64_t sms,
                                 bool tensor_cores) {
  if (path != kAuto) return path;
  return tiles >= 0 && gpu_prefers_sgmv(tokens, tiles, sms, tensor_cores) ? kSgmv : kBgmv;
}

}  // namespace fastllm::lora
