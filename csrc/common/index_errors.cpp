// The index-validation mode and the per-device error words (see index_errors.h).
#include "common/index_errors.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace fastllm {
namespace {

std::atomic<bool>& debug_flag() {
  static std::atomic<bool> flag{[] {
    const char* value = std::getenv("FASTLLM_CHECK_INDICES");
    return value != nullptr && std::strcmp(value, "") != 0 && std::strcmp(value, "0") != 0;
  }()};
  return flag;
}

constexpr const char* kNames[kIndexErrorCount] = {
    "fastllm.pool_write: slots outside [0, pool rows)",
    "fastllm.pool_gather: slots outside [0, pool rows)",
    "fastllm.lora_shrink/lora_expand: token_adapter outside [-1, adapters)",
    "fastllm.lora_shrink/lora_expand: ranks outside [0, max_rank]",
    "fastllm.lora_shrink/lora_expand: a_rows/b_rows put a row outside the pool",
    "fastllm.kv_ragged_decode: lengths outside [0, pages * page_rows]",
    "fastllm.kv_ragged_decode: page_table outside [0, pool pages)",
    "fastllm.kv_evict_round: lengths outside [0, capacity]",
    "fastllm.sparse_mlp: active_idx outside [0, neurons)",
    "fastllm.sparse_mlp: counts outside [0, k]",
    "fastllm.lora_shrink/lora_expand: sgmv_order/sgmv_tiles/sgmv_chunks outside the batch or "
    "not matching token_adapter",
    "fastllm.kv_ragged_decode: work breaks its structure (caches 0, 1, ... in order, each from "
    "entry 0, first entries increasing)",
    "fastllm.kv_decode_step: lengths/capacity leave no room for the new entry in the page table "
    "and bookkeeping columns",
};

std::mutex& words_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::unordered_map<int, at::Tensor>& words() {
  static std::unordered_map<int, at::Tensor> by_device;
  return by_device;
}

}  // namespace

bool index_debug_mode() { return debug_flag().load(std::memory_order_relaxed); }
void set_index_debug_mode(bool on) { debug_flag().store(on, std::memory_order_relaxed); }

bool host_checks_index_values(const at::Tensor& t) {
  return !t.is_cuda() || index_debug_mode();
}

bool index_error_word_exists(const at::Device& device) {
  const std::lock_guard<std::mutex> lock(words_mutex());
  return words().count(device.index()) != 0;
}

at::Tensor index_error_word(const at::Device& device) {
  const std::lock_guard<std::mutex> lock(words_mutex());
  auto found = words().find(device.index());
  if (found != words().end()) return found->second;
  at::Tensor word = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  words().emplace(device.index(), word);
  return word;
}

std::string describe_index_errors(uint32_t bits) {
  std::string out;
  for (int bit = 0; bit < kIndexErrorCount; ++bit) {
    if (bits & (1u << bit)) {
      if (!out.empty()) out += "; ";
      out += kNames[bit];
    }
  }
  return out;
}

}  // namespace fastllm
