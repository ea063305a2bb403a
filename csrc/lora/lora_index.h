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

// Below this many tokens per distinct adapter on average, grouping buys little: use BGMV.
constexpr int64_t kSgmvMinTokensPerAdapter = 4;

FASTLLM_HOST_DEVICE int64_t table_index(int64_t slice, int64_t adapter, int64_t row,
                                        int64_t num_adapters, int64_t max_rank) {
  return (slice * num_adapters + adapter) * max_rank + row;
}

// Offset of h[s, t, j] in the [S, T, R] intermediate.
FASTLLM_HOST_DEVICE int64_t h_index(int64_t slice, int64_t token, int64_t row, int64_t tokens,
                                    int64_t max_rank) {
  return (slice * tokens + token) * max_rank + row;
}

inline int64_t resolve_path(int64_t path, int64_t tokens, int64_t adapters) {
  if (path != kAuto) return path;
  return tokens >= kSgmvMinTokensPerAdapter * (adapters > 0 ? adapters : 1) ? kSgmv : kBgmv;
}

}  // namespace fastllm::lora
