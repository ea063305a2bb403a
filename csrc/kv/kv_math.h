// Index and per-element math shared by the CPU and CUDA KV kernels, so the CPU tests exercise the
// arithmetic the GPU runs.
#pragma once

#include <cstdint>
#include <vector>

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

// A decode step's new entry (kv_decode_step): the flags it is written with (its class bits, plus
// kKeep where its cache's policy keeps that class or the position is one of the first `sinks`),
// and the entry it goes to. Without a capacity (capacity < 0) it is the cache's next entry; with
// one (graph steps, where the host cannot know the lengths), a full cache overwrites its last
// entry rather than touch a page or bookkeeping column it does not own.
FASTLLM_HOST_DEVICE uint8_t new_entry_flags(int token_class, int keep_classes, int64_t pos,
                                            int64_t sinks) {
  const bool keep = (token_class & keep_classes) != 0 || pos < sinks;
  return static_cast<uint8_t>(token_class | (keep ? kKeep : 0));
}
FASTLLM_HOST_DEVICE int64_t new_entry_index(int64_t len, int64_t capacity) {
  return capacity >= 0 && len > capacity - 1 ? capacity - 1 : len;
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

// ---- decode work items -------------------------------------------------------------------------
//
// A decode call's work is a list of items, each a run of one cache's entries; every item is one
// (cache, split) task of a kernel and owns one slot of partial (max, sum, output) per query head,
// which the merge combines per cache. Two forms:
// * uniform: `splits` items per cache, item i = cache i / splits dividing the cache's own length
//   evenly (split_range);
// * a work list (plan_decode_work): int32 rows (cache, first entry), sorted by cache then first
//   entry, every cache present with a first item at entry 0. An item runs from its first entry to
//   the next item's of the same cache, and a cache's last item to the cache's length. So the
//   length may outgrow the bounds the list was planned from (a list planned once serves later
//   decode steps and CUDA-graph replays) without losing an entry: only the balance degrades.
// Both clip every range to the cache's real length, read on the device.

// Whether row i keeps the work list's structure, judged against the row before it only (O(1), so
// every CUDA block checks its own row): caches run 0, 1, ..., caches - 1 in order, each starting
// at entry 0 with increasing first entries. A list whose rows all pass covers every entry of
// every cache exactly once.
FASTLLM_HOST_DEVICE bool work_row_valid(const int32_t* work, int64_t items, int64_t i,
                                        int64_t caches) {
  const int64_t c = work[2 * i], first = work[2 * i + 1];
  const int64_t prev = i > 0 ? work[2 * (i - 1)] : -1;
  bool ok = c >= 0 && c < caches;
  ok = ok && (c == prev ? first > work[2 * (i - 1) + 1] : c == prev + 1 && first == 0);
  return ok && (i + 1 < items || c == caches - 1);
}

// Cache and entries [begin, end) of item i of a work list of `items` rows, given the length of
// the item's cache (length_of(cache)); returns false (nothing to do) for a row that breaks the
// list's structure (work_row_valid).
template <typename LengthOf>
FASTLLM_HOST_DEVICE bool work_item_range(const int32_t* work, int64_t items, int64_t i,
                                         int64_t caches, LengthOf length_of, int64_t* cache,
                                         int64_t* begin, int64_t* end) {
  if (!work_row_valid(work, items, i, caches)) return false;
  const int64_t c = work[2 * i];
  const int64_t len = length_of(c);
  const bool last = i + 1 >= items || work[2 * (i + 1)] != c;
  const int64_t first = work[2 * i + 1];
  const int64_t stop = last ? len : work[2 * (i + 1) + 1];
  *cache = c;
  *begin = first < 0 ? 0 : (first < len ? first : len);
  *end = stop < *begin ? *begin : (stop < len ? stop : len);
  return true;
}

// Items [lo, hi) of cache c in a work list (rows sorted by cache): two binary searches.
FASTLLM_HOST_DEVICE void work_items_of(const int32_t* work, int64_t items, int64_t c, int64_t* lo,
                                       int64_t* hi) {
  int64_t a = 0, b = items;
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    if (work[2 * mid] < c) a = mid + 1; else b = mid;
  }
  *lo = a;
  b = items;
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    if (work[2 * mid] <= c) a = mid + 1; else b = mid;
  }
  *hi = a;
}

// The items of one decode call, in either form, for the CPU and CUDA kernels alike.
struct DecodeWork {
  const int32_t* list;  // [items, 2] (cache, first entry), or nullptr for uniform splits
  int64_t items, splits, caches;

  // Cache and entries [begin, end) of item i; false (nothing to do) for a work-list row that
  // breaks the list's structure.
  template <typename LengthOf>
  FASTLLM_HOST_DEVICE bool range(int64_t i, LengthOf length_of, int64_t* cache, int64_t* begin,
                                 int64_t* end) const {
    if (list == nullptr) {
      *cache = i / splits;
      split_range(length_of(*cache), splits, i % splits, begin, end);
      return true;
    }
    return work_item_range(list, items, i, caches, length_of, cache, begin, end);
  }

  // Whether item i is the first of its cache (the one that reports a bad length).
  FASTLLM_HOST_DEVICE bool first_of_cache(int64_t i) const {
    return list == nullptr ? i % splits == 0 : (i == 0 || list[2 * (i - 1)] != list[2 * i]);
  }

  // Items [lo, hi) of cache c.
  FASTLLM_HOST_DEVICE void items_of(int64_t c, int64_t* lo, int64_t* hi) const {
    if (list == nullptr) {
      *lo = c * splits;
      *hi = *lo + splits;
    } else {
      work_items_of(list, items, c, lo, hi);
    }
  }
};

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

// The work list of a decode call from upper bounds of the caches' lengths (the host's mirror;
// kv/cache.py), for a GPU with `sms` SMs, as FlashInfer's plan stage balances ragged requests:
// the entries of all caches are cut into chunks of one size, chosen so the items fill two waves
// of kDecodeBlocksPerSm blocks per SM, at least kMinSplitEntries entries (each item costs a merge
// read) and a multiple of it, so a long cache gets many items and a short one one, instead of one
// split count sized by the longest cache for all. Bounds must lie in [0, 2^31) (int32 lengths).
// Appends the rows (cache, first entry) to `work` and returns the chunk.
inline int64_t plan_decode_work(const int64_t* bounds, int64_t caches, int64_t sms,
                                std::vector<int32_t>& work) {
  const int64_t blocks = 2 * kDecodeBlocksPerSm * (sms > 0 ? sms : 1);
  int64_t total = 0;
  for (int64_t c = 0; c < caches; ++c) total += bounds[c] > 0 ? bounds[c] : 0;
  int64_t chunk = (total + blocks - 1) / blocks;
  chunk = (chunk + kMinSplitEntries - 1) / kMinSplitEntries * kMinSplitEntries;
  if (chunk < kMinSplitEntries) chunk = kMinSplitEntries;
  for (int64_t c = 0; c < caches; ++c) {
    const int64_t n = bounds[c] > chunk ? (bounds[c] + chunk - 1) / chunk : 1;
    for (int64_t k = 0; k < n; ++k) {
      work.push_back(static_cast<int32_t>(c));
      work.push_back(static_cast<int32_t>(k * chunk));
    }
  }
  return chunk;
}

}  // namespace fastllm::kv
