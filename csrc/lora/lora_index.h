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
//    instead of once per token.
#pragma once

#include <cstdint>

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
// order[first, end), at most kTile tokens, all of adapter `adapter`.
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
inline int64_t resolve_path(int64_t path, int64_t tokens, int64_t adapters) {
  if (path != kAuto) return path;
  return tokens >= kSgmvMinTokensPerAdapter * (adapters > 0 ? adapters : 1) ? kSgmv : kBgmv;
}

// GPU rule, a model (never timed on a GPU): both kernels run one block per work item (a token for
// BGMV, a tile of up to kTile tokens for SGMV) and read the adapter rows once per item, so the
// bytes read scale with the item count, while fewer than about two waves of blocks leave HBM
// bandwidth unused and take about as long as two waves. Cost ~ max(items, 2 * SMs): SGMV only
// when its tiles cost less than the tokens do. Decode (one token per sequence, a few sequences per
// adapter) stays on BGMV; a prefill of thousands of tokens goes to SGMV.
inline bool gpu_prefers_sgmv(int64_t tokens, int64_t tiles, int64_t sms) {
  const int64_t floor = 2 * (sms > 0 ? sms : 1);
  auto cost = [floor](int64_t items) { return items > floor ? items : floor; };
  return cost(tiles) < cost(tokens);
}

// CUDA: SGMV needs a plan (the op cannot read token_adapter without a synchronisation), so auto
// means BGMV without one. tiles < 0: no plan.
inline int64_t resolve_path_cuda(int64_t path, int64_t tokens, int64_t tiles, int64_t sms) {
  if (path != kAuto) return path;
  return tiles >= 0 && gpu_prefers_sgmv(tokens, tiles, sms) ? kSgmv : kBgmv;
}

}  // namespace fastllm::lora
