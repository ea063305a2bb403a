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

}  // namespace fastllm::kv
