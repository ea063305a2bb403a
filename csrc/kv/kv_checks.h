// Argument validation for the KV ops, identical for every device.
#pragma once

#include "common/checks.h"

#include <algorithm>

namespace fastllm::kv {

inline void check_profile_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                               int64_t chunk) {
  check_dim(op, "q", q, 3);
  check_dim(op, "k", k, 3);
  check_dtype_in(op, "q", q, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_same_dtype(op, "q", q, "k", k);
  check_same_device(op, "q", q, "k", k);
  TORCH_CHECK_VALUE(k.size(0) > 0 && q.size(0) % k.size(0) == 0, op,
                    ": q's head count must be a positive multiple of k's, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(q.size(2) == k.size(2), op, ": q and k must have the same head_dim, got ",
                    q.size(2), " and ", k.size(2));
  TORCH_CHECK_VALUE(q.size(1) <= k.size(1), op, ": q may not have more rows than k (queries are "
                    "the last positions of the keys), got ", q.size(1), " queries and ", k.size(1),
                    " keys");
  TORCH_CHECK_VALUE(chunk > 0, op, ": chunk must be positive, got ", chunk);
}

inline void check_key_class(const char* op, const at::Tensor& k, const at::Tensor& key_class,
                            int64_t window) {
  check_dim(op, "key_class", key_class, 2);
  check_dtype_in(op, "key_class", key_class, {at::kByte});
  check_same_device(op, "k", k, "key_class", key_class);
  TORCH_CHECK_VALUE(key_class.size(0) == k.size(0) && key_class.size(1) == k.size(1), op,
                    ": key_class must be [Hkv, Lk] = [", k.size(0), ", ", k.size(1), "], got ",
                    key_class.sizes());
  TORCH_CHECK_VALUE(window >= 0, op, ": window must be >= 0, got ", window);
}

// A decode work list (kv_math.h, work_item_range): int32 [items, 2] rows (cache, first entry),
// sorted by cache, every cache present, each cache's first item at entry 0 and its first entries
// increasing. Values as index values: always for CPU tensors, for CUDA tensors in the debug mode;
// otherwise each CUDA block checks its own row by the same rules (work_row_valid), skips a bad
// one and reports it (kKvWork).
inline void check_decode_work(const char* op, const at::Tensor& q, const at::Tensor& work,
                              int64_t caches, int64_t num_splits) {
  check_dim(op, "work", work, 2);
  check_dtype_in(op, "work", work, {at::kInt});
  check_same_device(op, "q", q, "work", work);
  TORCH_CHECK_VALUE(work.size(1) == 2, op, ": work must be [items, 2] rows (cache, first entry), "
                    "got ", work.sizes());
  TORCH_CHECK_VALUE(work.size(0) >= caches, op, ": work must hold at least one item per cache (",
                    caches, "), got ", work.size(0), " items");
  TORCH_CHECK_VALUE(num_splits == 1, op, ": num_splits must be 1 when work is given (the work "
                    "list replaces it), got ", num_splits);
  // BEGIN host value checks
  if (work.numel() == 0 || !host_checks_index_values(work)) return;
  const at::Tensor rows = work.to(at::kCPU).contiguous();
  // END host value checks
  const int32_t* w = rows.const_data_ptr<int32_t>();
  const int64_t items = rows.size(0);
  for (int64_t i = 0; i < items; ++i) {
    const int64_t c = w[2 * i], first = w[2 * i + 1];
    const int64_t prev = i > 0 ? w[2 * (i - 1)] : -1;
    const bool new_cache = c != prev;
    TORCH_CHECK_INDEX(c >= 0 && c < caches && (new_cache ? c == prev + 1 : true), op,
                      ": work's caches must run 0, 1, ..., ", caches - 1, " in order, each at "
                      "least once; item ", i, " has cache ", c, " after ", prev);
    TORCH_CHECK_INDEX(new_cache ? first == 0 : first > w[2 * (i - 1) + 1], op,
                      ": work's first entries must start at 0 and increase within a cache; item ",
                      i, " (cache ", c, ") starts at ", first);
  }
  TORCH_CHECK_INDEX(items == 0 || w[2 * (items - 1)] == caches - 1, op, ": work must hold every "
                    "cache of 0 ..", caches - 1, "; it ends at cache ", w[2 * (items - 1)]);
}

// Everything about a ragged decode but the lengths (whose dtype differs between the ops).
inline void check_decode_layout(const char* op, const at::Tensor& q, const at::Tensor& kv_rows,
                                const at::Tensor& page_table, int64_t page_rows,
                                int64_t num_splits, const std::optional<at::Tensor>& work) {
  check_dim(op, "q", q, 3);
  check_dtype_in(op, "q", q, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_dim(op, "kv_rows", kv_rows, 2);
  check_same_dtype(op, "q", q, "kv_rows", kv_rows);
  check_contiguous(op, "kv_rows", kv_rows);
  check_dim(op, "page_table", page_table, 2);
  check_dtype_in(op, "page_table", page_table, {at::kInt});
  check_same_device(op, "q", q, "kv_rows", kv_rows);
  check_same_device(op, "q", q, "page_table", page_table);
  TORCH_CHECK_VALUE(kv_rows.size(1) == 2 * q.size(2), op, ": kv_rows must be [slots, 2 * head_dim]"
                    " = [*, ", 2 * q.size(2), "], got ", kv_rows.sizes());
  TORCH_CHECK_VALUE(page_rows > 0 && kv_rows.size(0) % page_rows == 0, op,
                    ": page_rows must be positive and divide kv_rows' row count ", kv_rows.size(0),
                    ", got ", page_rows);
  const int64_t batch = q.size(0);
  TORCH_CHECK_VALUE(batch > 0 && page_table.size(0) % batch == 0 &&
                        page_table.size(0) / batch > 0 && q.size(1) % (page_table.size(0) / batch) == 0,
                    op, ": page_table must have B * Hkv rows with Hkv dividing q's ", q.size(1),
                    " heads (B = ", batch, "), got ", page_table.size(0), " rows");
  TORCH_CHECK_VALUE(num_splits > 0, op, ": num_splits must be positive, got ", num_splits);
  // Values: always on the host for CPU tensors; for CUDA tensors only in the debug mode (each
  // check then synchronises), else the kernels skip out-of-range lengths and page ids and report
  // them in the device error word (kKvLengths, kKvPageTable).
  check_index_range(op, "page_table", page_table, kv_rows.size(0) / page_rows);
  if (work.has_value()) check_decode_work(op, q, *work, page_table.size(0), num_splits);
}

inline void check_decode_args(const at::Tensor& q, const at::Tensor& kv_rows,
                              const at::Tensor& page_table, const at::Tensor& lengths,
                              int64_t page_rows, int64_t num_splits,
                              const std::optional<at::Tensor>& work) {
  constexpr const char* op = "fastllm.kv_ragged_decode";
  check_decode_layout(op, q, kv_rows, page_table, page_rows, num_splits, work);
  check_dim(op, "lengths", lengths, 1);
  check_dtype_in(op, "lengths", lengths, {at::kInt});
  check_same_device(op, "q", q, "lengths", lengths);
  TORCH_CHECK_VALUE(lengths.size(0) == page_table.size(0), op,
                    ": lengths must have one entry per page_table row (", page_table.size(0),
                    "), got ", lengths.size(0));
  check_index_range(op, "lengths", lengths, page_table.size(1) * page_rows + 1);
}

// A negative heavy count would make a cache with no evictable entry "over budget" with no victim
// to take.
inline void check_heavy_counts(const char* op, const at::Tensor& heavy) {
  // BEGIN host value checks
  if (heavy.numel() == 0 || !host_checks_index_values(heavy)) return;
  const int64_t min_heavy = heavy.min().item<int64_t>();
  // END host value checks
  TORCH_CHECK_VALUE(min_heavy >= 0, op, ": heavy must be >= 0, got ", min_heavy);
}

// The caches' bookkeeping and policies (kv_evict_round, kv_decode_step); `newest_name` is what
// the op calls the per-cache newest positions.
inline void check_bookkeeping(const char* op, const at::Tensor& pos, const at::Tensor& score,
                              const at::Tensor& flags, const at::Tensor& lengths,
                              const char* newest_name, const at::Tensor& newest,
                              const at::Tensor& window, const at::Tensor& heavy,
                              const at::Tensor& grow) {
  check_dim(op, "pos", pos, 2);
  check_dtype_in(op, "pos", pos, {at::kLong});
  const int64_t caches = pos.size(0), cap = pos.size(1);
  struct Arg {
    const char* name;
    const at::Tensor& t;
    at::ScalarType dtype;
    bool per_entry;
  };
  const Arg args[] = {{"score", score, at::kFloat, true},     {"flags", flags, at::kByte, true},
                      {"lengths", lengths, at::kLong, false}, {newest_name, newest, at::kLong, false},
                      {"window", window, at::kLong, false},   {"heavy", heavy, at::kLong, false},
                      {"grow", grow, at::kBool, false}};
  for (const Arg& arg : args) {
    check_dtype_in(op, arg.name, arg.t, {arg.dtype});
    check_same_device(op, "pos", pos, arg.name, arg.t);
    check_contiguous(op, arg.name, arg.t);
    if (arg.per_entry) {
      TORCH_CHECK_VALUE(arg.t.dim() == 2 && arg.t.size(0) == caches && arg.t.size(1) == cap, op,
                        ": ", arg.name, " must be [caches, capacity] like pos = ", pos.sizes(),
                        ", got ", arg.t.sizes());
    } else {
      TORCH_CHECK_VALUE(arg.t.dim() == 1 && arg.t.size(0) == caches, op, ": ", arg.name,
                        " must be [caches] = [", caches, "], got ", arg.t.sizes());
    }
  }
  check_contiguous(op, "pos", pos);
  check_heavy_counts(op, heavy);
}

inline void check_evict_args(const at::Tensor& pos, const at::Tensor& score, const at::Tensor& flags,
                             const at::Tensor& lengths, const at::Tensor& step_scores,
                             const at::Tensor& newest, const at::Tensor& window,
                             const at::Tensor& heavy, const at::Tensor& grow) {
  constexpr const char* op = "fastllm.kv_evict_round";
  check_bookkeeping(op, pos, score, flags, lengths, "newest", newest, window, heavy, grow);
  const int64_t caches = pos.size(0), cap = pos.size(1);
  check_dim(op, "step_scores", step_scores, 2);
  check_dtype_in(op, "step_scores", step_scores, {at::kFloat});
  check_same_device(op, "pos", pos, "step_scores", step_scores);
  check_contiguous(op, "step_scores", step_scores);
  TORCH_CHECK_VALUE(step_scores.size(0) == caches, op, ": step_scores must have one row per cache (",
                    caches, "), got ", step_scores.sizes());
  // Values, as in check_decode_args: the CUDA kernel skips a cache whose length is out of range
  // (kKvEvictLengths) and never evicts without a victim, so outside the debug mode a negative
  // heavy count only changes which entries a cache keeps, never what memory it touches.
  check_index_range(op, "lengths", lengths, cap + 1);
}

// kv_decode_step: a ragged decode's layout, the caches' bookkeeping, the new entries and the
// room for them. Every cache must have room for its new entry within its pages and the
// bookkeeping columns (room = min(capacity columns, pages * page_rows)): lengths < room, or with
// a per-cache capacity (graph steps), lengths <= room and capacity in [1, room].
inline void check_decode_step_args(const at::Tensor& q, const at::Tensor& new_rows,
                                   const at::Tensor& new_pos, const at::Tensor& new_class,
                                   const at::Tensor& kv_rows, const at::Tensor& page_table,
                                   const at::Tensor& lengths, const at::Tensor& pos,
                                   const at::Tensor& score, const at::Tensor& flags,
                                   const at::Tensor& keep_classes, const at::Tensor& sinks,
                                   const at::Tensor& window, const at::Tensor& heavy,
                                   const at::Tensor& grow, int64_t page_rows, int64_t num_splits,
                                   const std::optional<at::Tensor>& work,
                                   const std::optional<at::Tensor>& capacity) {
  constexpr const char* op = "fastllm.kv_decode_step";
  check_decode_layout(op, q, kv_rows, page_table, page_rows, num_splits, work);
  check_bookkeeping(op, pos, score, flags, lengths, "new_pos", new_pos, window, heavy, grow);
  check_same_device(op, "q", q, "pos", pos);
  const int64_t caches = pos.size(0);
  TORCH_CHECK_VALUE(page_table.size(0) == caches, op, ": page_table must have one row per cache ("
                    "pos has ", caches, "), got ", page_table.size(0));
  check_dim(op, "new_rows", new_rows, 2);
  check_same_dtype(op, "kv_rows", kv_rows, "new_rows", new_rows);
  check_same_device(op, "q", q, "new_rows", new_rows);
  TORCH_CHECK_VALUE(new_rows.size(0) == caches && new_rows.size(1) == kv_rows.size(1), op,
                    ": new_rows must be [caches, 2 * head_dim] = [", caches, ", ", kv_rows.size(1),
                    "], got ", new_rows.sizes());
  struct PerCache {
    const char* name;
    const at::Tensor* t;
    at::ScalarType dtype;
  };
  const PerCache per_cache[] = {{"new_class", &new_class, at::kByte},
                                {"keep_classes", &keep_classes, at::kByte},
                                {"sinks", &sinks, at::kLong},
                                {"capacity", capacity.has_value() ? &*capacity : nullptr,
                                 at::kLong}};
  for (const PerCache& arg : per_cache) {
    if (arg.t == nullptr) continue;
    check_dtype_in(op, arg.name, *arg.t, {arg.dtype});
    check_same_device(op, "pos", pos, arg.name, *arg.t);  // any strides: read-only, small
    TORCH_CHECK_VALUE(arg.t->dim() == 1 && arg.t->size(0) == caches, op, ": ", arg.name,
                      " must be [caches] = [", caches, "], got ", arg.t->sizes());
  }
  const int64_t room = std::min<int64_t>(pos.size(1), page_table.size(1) * page_rows);
  if (!capacity.has_value()) {
    check_index_range(op, "lengths", lengths, room);
    return;
  }
  check_index_range(op, "lengths", lengths, room + 1);
  // BEGIN host value checks
  if (capacity->numel() == 0 || !host_checks_index_values(*capacity)) return;
  const at::Tensor cap_host = capacity->to(at::kCPU).contiguous();
  // END host value checks
  const int64_t* cap_data = cap_host.const_data_ptr<int64_t>();
  for (int64_t c = 0; c < caches; ++c) {
    TORCH_CHECK_INDEX(cap_data[c] >= 1 && cap_data[c] <= room, op, ": capacity must lie in [1, ",
                      room, "] (the room in the page table and bookkeeping columns), got ",
                      cap_data[c], " for cache ", c);
  }
}

}  // namespace fastllm::kv
