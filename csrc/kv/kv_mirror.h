// The host's mirror of a FastGenCache layer's cache lengths (python/fastllm/kv/storage.py,
// _HeadCaches): what page allocation needs, advanced without reading the device. Host code only;
// here so that one call per layer replaces two dozen numpy operations on arrays of a few caches.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastllm::kv {

// One layer's caches, per cache c: its policy (offset: pad columns before the sequence; window,
// sinks, heavy; keep: the class bits it keeps; grow: never evicts; dep: its length depends on
// the classes of decode tokens) and its mirror (len, evictable, seen: mask columns < seen are
// in). classes [sequences, class_cols]: the token classes the host knows, by position, valid for
// mask columns < known; seq[c]: cache c's sequence.
struct MirrorCaches {
  int64_t caches;
  const int64_t* seq;
  const int64_t* offset;
  const int64_t* window;
  const int64_t* sinks;
  const int64_t* heavy;
  const uint8_t* keep;
  const bool* grow;
  const bool* dep;
  int64_t* len;
  int64_t* evictable;
  int64_t* seen;
};

// Advances every cache's mirror over mask columns < seen, as far as the classes are known: each
// column appends one entry; the entry leaving the local window (position column - offset -
// window) becomes evictable unless the policy keeps it for good (a kept class, or a sink); and a
// cache that does not grow evicts one entry when more than `heavy` are evictable (the device's
// kv_decode_step makes the same decision from the same facts).
inline void advance_mirror(const MirrorCaches& m, int64_t seen, const uint8_t* classes,
                           int64_t class_cols, int64_t known) {
  for (int64_t c = 0; c < m.caches; ++c) {
    for (int64_t column = m.seen[c]; column < seen; ++column) {
      if (m.dep[c] && column - m.window[c] >= known) break;  // the leaving entry's class is unknown
      const int64_t cross = column - m.offset[c] - m.window[c];
      const int64_t at = std::clamp<int64_t>(cross, 0, class_cols - 1);
      const bool kept = (classes[m.seq[c] * class_cols + at] & m.keep[c]) != 0 || cross < m.sinks[c];
      const int64_t evictable = m.evictable[c] + (cross >= 0 && !kept ? 1 : 0);
      const int64_t evicts = !m.grow[c] && evictable > m.heavy[c] ? 1 : 0;
      m.evictable[c] = evictable - evicts;
      m.len[c] += 1 - evicts;
      m.seen[c] = column + 1;
    }
  }
}

// What the mirror says of every cache's room once mask columns < seen_to are in: each cache's
// length bound is len + (seen_to - seen) (exact where the mirror has caught up). Returns the
// pages the caches lack for their bounds (pages of page_rows entries; npages held) and the
// longest bound.
struct MirrorRoom {
  int64_t short_pages;
  int64_t longest;
};
inline MirrorRoom mirror_room(int64_t caches, const int64_t* len, const int64_t* seen,
                              const int64_t* npages, int64_t seen_to, int64_t page_rows) {
  MirrorRoom room{0, 0};
  for (int64_t c = 0; c < caches; ++c) {
    const int64_t bound = len[c] + (seen_to - seen[c]);
    room.short_pages += std::max<int64_t>((bound + page_rows - 1) / page_rows - npages[c], 0);
    room.longest = std::max(room.longest, bound);
  }
  return room;
}

// Whether some cache holds more pages than its length bound needs (pages to give back).
inline bool mirror_has_excess(int64_t caches, const int64_t* len, const int64_t* seen,
                              const int64_t* npages, int64_t seen_to, int64_t page_rows) {
  for (int64_t c = 0; c < caches; ++c) {
    if (npages[c] > (len[c] + (seen_to - seen[c]) + page_rows - 1) / page_rows) return true;
  }
  return false;
}

}  // namespace fastllm::kv
