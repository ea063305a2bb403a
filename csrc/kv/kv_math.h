// Index and per-element math shared by the CPU and CUDA KV kernels, so the CPU tests exercise the
// arithmetic the GPU runs.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fastllm::kv {

// key_class bits (see python/fastllm/_reference/kv.py).
constexpr int kSpecial = 1;
constexpr int kPunct = 2;
constexpr int kHeavy = 4;
// Cache-entry flags bit: the entry's policy keeps it for good (a special or punctuation token its
// policy keeps, or a sink); the low bits are the token's class as above.
constexpr int kKeep = 8;

// Which of FastGen's cumulative policies first keeps key j for a query at position qpos:
// 0 special, 1 punctuation, 2 locality, 3 frequency, 4 only the full cache.
FASTLLM_HOST_DEVICE int first_policy_keeping(int key_class, int64_t qpos, int64_t j, int64_t window) {
  if (key_class & kSpecial) return 0;
  if (key_class & kPunct) return 1;
  if (qpos - j < window) return 2;
  if (key_class & kHeavy) return 3;
  return 4;
}

// Whether a cache entry (token position pos, flags) may be evicted once the newest token is at
// position newest: not kept for good and outside the policy's local window.
FASTLLM_HOST_DEVICE bool evictable(int flags, int64_t pos, int64_t newest, int64_t window) {
  return !(flags & kKeep) && newest - pos >= window;
}

// Evicts entry victim of cache c (bookkeeping rows of cap entries): the cache's last entry takes
// its place, the length drops by one, and moves[c] records (victim, last) for the pool rows.
FASTLLM_HOST_DEVICE void evict_entry(int64_t* pos, float* score, uint8_t* flags, int64_t* lengths,
                                     int64_t* moves, int64_t c, int64_t cap, int64_t victim) {
  const int64_t last = lengths[c] - 1, row = c * cap;
  pos[row + victim] = pos[row + last];
  score[row + victim] = score[row + last];
  flags[row + victim] = flags[row + last];
  lengths[c] = last;
  moves[2 * c] = victim;
  moves[2 * c + 1] = last;
}

// Index guards of the CUDA kernels (CPU values are checked on the host before any kernel runs,
// see common/index_errors.h): a cache length in [0, limit] and a page id in [0, pages).
FASTLLM_HOST_DEVICE bool length_in_range(int64_t len, int64_t limit) {
  return len >= 0 && len <= limit;
}
FASTLLM_HOST_DEVICE bool page_in_range(int64_t page, int64_t pages) {
  return page >= 0 && page < pages;
}

// Pool slot of entry e of a ragged cache whose pages are page_row (one row of the page table).
template <typename Index>
FASTLLM_HOST_DEVICE int64_t entry_slot(const Index* page_row, int64_t e, int64_t page_rows) {
  return static_cast<int64_t>(page_row[e / page_rows]) * page_rows + e % page_rows;
}

// Entries [begin, end) handled by split s of n over a cache of length len.
FASTLLM_HOST_DEVICE void split_range(int64_t len, int64_t splits, int64_t s, int64_t* begin,
                                     int64_t* end) {
  const int64_t per = (len + splits - 1) / splits;
  *begin = s * per < len ? s * per : len;
  *end = (s + 1) * per < len ? (s + 1) * per : len;
}

// ---- decode launch planning (host functions, unit-tested on the CPU) ------------------------------
//
// The grouped decode kernel (kv_cuda.cu, decode_gqa_kernel): one block of kDecodeThreads threads
// per (cache, split) serves the cache's whole query group, so each K/V row is read from HBM once
// and reused by the G query heads. It streams the split's entries in tiles (an entry's K and V
// are one contiguous row of 2D elements in the pool) into shared memory with 16-byte cp.async
// copies, double-buffered so the next tile's copies overlap this tile's math. Per tile: QK^T with
// `key_lanes` lanes per key (one 16-byte word of the key each, a shuffle reduction), an online
// softmax per query head, then P.V with each thread owning 16-byte chunks of the head dims of
// one or more (head, chunk) pairs.
constexpr int kDecodeThreads = 128;
constexpr int64_t kDecodeStageBytes = 16 * 1024;  // one of the two buffers of staged rows
constexpr int kDecodeMaxPairs = 4;                // (head, chunk) accumulators per thread
constexpr int kDecodeKeysPerLane = 8;             // key words a lane holds per tile in QK^T
constexpr int64_t kDecodeSharedLimit = 48 * 1024;

struct DecodeLaunch {
  bool grouped;         // false: the per-head fallback kernel (fp64, odd head dims, huge groups)
  int64_t tile;         // entries staged per buffer
  int64_t key_lanes;    // lanes per key in QK^T (a power of two >= D / vec)
  int64_t shared_bytes; // dynamic shared memory
};

inline DecodeLaunch plan_decode(int64_t group, int64_t d, int64_t elem_bytes) {
  const DecodeLaunch fallback{false, 0, 0, 0};
  if (elem_bytes != 2 && elem_bytes != 4) return fallback;
  const int64_t vec = 16 / elem_bytes;
  if (group <= 0 || d <= 0 || d % vec != 0) return fallback;
  const int64_t chunks = d / vec;
  int64_t lanes = 1;
  while (lanes < chunks) lanes *= 2;
  // (a thread per head keeps its softmax state: at most kDecodeThreads heads per group)
  if (lanes > 32 || group > kDecodeThreads || group * chunks > kDecodeMaxPairs * kDecodeThreads) {
    return fallback;
  }
  const int64_t row_bytes = 2 * d * elem_bytes;
  int64_t tile = kDecodeStageBytes / row_bytes;
  tile = tile < 8 ? 8 : (tile > 64 ? 64 : tile);
  // Each lane holds its keys' words of a tile in registers: 4 warps x 32 / lanes keys per step.
  const int64_t keys_per_step = (kDecodeThreads / 32) * (32 / lanes);
  if (tile > kDecodeKeysPerLane * keys_per_step) tile = kDecodeKeysPerLane * keys_per_step;
  // stage[2][tile][2D] | q[G][D] fp32 | logits and probabilities [G][tile] fp32 | m, l, alpha [G]
  const int64_t shared = 2 * tile * row_bytes + 4 * (group * d + 2 * group * tile + 3 * group);
  if (shared > kDecodeSharedLimit) return fallback;
  return {true, tile, lanes, shared};
}

// Splits per cache for a GPU with `sms` SMs: enough (cache, split) blocks for two waves of
// kDecodeBlocksPerSm resident blocks (the grouped kernel's registers allow about 4 per SM), no
// split shorter than kMinSplitEntries of the longest cache (each split costs a merge read), at
// most kMaxDecodeSplits. Each cache divides its own length by the split count, so a much shorter
// cache gets splits of a few entries (cheap blocks, but not free: a known cost of one count for
// all caches).
constexpr int64_t kMinSplitEntries = 64;
constexpr int64_t kMaxDecodeSplits = 64;
constexpr int64_t kDecodeBlocksPerSm = 4;

inline int64_t plan_decode_splits(int64_t caches, int64_t longest, int64_t sms) {
  const int64_t blocks = 2 * kDecodeBlocksPerSm * (sms > 0 ? sms : 1);
  const int64_t c = caches > 0 ? caches : 1;
  int64_t splits = (blocks + c - 1) / c;
  const int64_t most = longest / kMinSplitEntries;
  if (splits > most) splits = most;
  if (splits > kMaxDecodeSplits) splits = kMaxDecodeSplits;
  return splits < 1 ? 1 : splits;
}

}  // namespace fastllm::kv
