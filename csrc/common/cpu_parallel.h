// Parallel loops for short decode-time kernels on a CPU that other processes may be using.
//
// A parallel region ends at a barrier, so when the OS has descheduled one of its threads (another
// process's threads on the same cores) the region lasts until that thread gets a time slice back:
// milliseconds, for kernels that take tens of microseconds. claim_parallel gives two defences:
//   * tasks are claimed from an atomic counter, so the threads that are running take the work a
//     descheduled thread would have been handed up front (static partitioning waits for it);
//   * the calling thread times its own work and its wait at the barrier. A wait longer than the
//     work means another thread ran late; the call site then runs its next calls on the calling
//     thread alone (no barrier), for a stretch that doubles while late threads keep being seen
//     and falls back to the first length after a parallel call that waited for no one.
// Task t's work must not depend on which thread runs it, so the result is the same either way.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace fastllm::cpu {

// The serial stretch after a late thread is seen, and its cap (calls at one call site).
constexpr int64_t kFirstSerialStretch = 32;
constexpr int64_t kMaxSerialStretch = 4096;
// Waits shorter than this are a thread waking from its sleep (tens of microseconds on an idle
// machine), not a descheduled one (a time slice: milliseconds).
constexpr int64_t kWaitFloorNs = 200000;

// What one parallel call's timings decide: run the next `serial_calls` calls serially, and use
// `next_stretch` the next time a late thread is seen.
struct BackoffDecision {
  int64_t serial_calls;
  int64_t next_stretch;
};

inline BackoffDecision backoff_after(int64_t work_ns, int64_t wait_ns, int64_t stretch) {
  const bool late_thread = wait_ns > std::max(work_ns, kWaitFloorNs);
  if (!late_thread) return {0, kFirstSerialStretch};
  return {stretch, std::min(2 * stretch, kMaxSerialStretch)};
}

// One call site's memory of late threads (a function-local static at the call site).
struct ContentionBackoff {
  std::atomic<int64_t> serial_calls_left{0};
  std::atomic<int64_t> stretch{kFirstSerialStretch};
};

// Runs run_task(t) for every t in [0, tasks), on the intra-op threads or on the calling thread.
template <typename RunTask>
void claim_parallel(ContentionBackoff& state, int64_t tasks, const RunTask& run_task) {
  const auto run_serially = [&] {
    for (int64_t t = 0; t < tasks; ++t) run_task(t);
  };
  if (tasks <= 1 || at::get_num_threads() == 1 || at::in_parallel_region()) return run_serially();
  if (state.serial_calls_left.load(std::memory_order_relaxed) > 0) {
    state.serial_calls_left.fetch_sub(1, std::memory_order_relaxed);
    return run_serially();
  }
  using clock = std::chrono::steady_clock;
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<int64_t> next{0};
  const clock::time_point start = clock::now();
  clock::time_point caller_done = start;
  bool caller_ran = false;  // a threading backend may hand the caller no share
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      run_task(t);
    }
    if (std::this_thread::get_id() == caller) {
      caller_done = clock::now();
      caller_ran = true;
    }
  });
  const clock::time_point end = clock::now();
  if (!caller_ran) return;
  const auto ns = [](clock::duration span) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(span).count();
  };
  const BackoffDecision decision = backoff_after(
      ns(caller_done - start), ns(end - caller_done), state.stretch.load(std::memory_order_relaxed));
  state.serial_calls_left.store(decision.serial_calls, std::memory_order_relaxed);
  state.stretch.store(decision.next_stretch, std::memory_order_relaxed);
}

// claim_parallel over [0, n) in contiguous chunks of at least `grain` (about four per thread), for
// loops whose element results do not depend on how [0, n) is cut: run_chunk(begin, end).
template <typename RunChunk>
void claim_parallel_chunks(ContentionBackoff& state, int64_t n, int64_t grain,
                           const RunChunk& run_chunk) {
  if (n <= 0) return;
  const int64_t per_thread = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max({int64_t{1}, grain, (n + per_thread - 1) / per_thread});
  claim_parallel(state, (n + chunk - 1) / chunk, [&](int64_t task) {
    run_chunk(task * chunk, std::min(n, (task + 1) * chunk));
  });
}

}  // namespace fastllm::cpu
