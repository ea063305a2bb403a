// CPU kernels for FastGen profiling and ragged decode attention.
//
// Profiling works on `chunk` query rows at a time, one task per query head: a matmul gives the
// head's logits for the chunk, then a fused pass turns each row into probabilities and folds them
// into the per-key scores or the per-policy masses. Each task holds one [chunk, Lk] block.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kv/kv_checks.h"
#include "kv/kv_math.h"

namespace fastllm::kv {
namespace {

// Work (multiply-adds or exp calls) a parallel task should carry before a thread is worth
// starting: decode steps of a small model are tiny, and on a busy machine waking a second thread
// costs far more than the work.
constexpr int64_t kMinWorkPerTask = 1 << 20;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_item));
}

// Logits of query head h's rows [start, start + rows) against the keys they may see, into
// out [rows, visible] (visible = the last row's position + 1). Called inside a parallel region,
// where ATen's matmul runs single-threaded: one level of parallelism, over heads.
void head_chunk_logits(const at::Tensor& qf, const at::Tensor& kf, int64_t h, int64_t group,
                       int64_t start, int64_t rows, int64_t visible, double scale,
                       at::Tensor& out) {
  at::mm_out(out, qf[h].narrow(0, start, rows), kf[h / group].narrow(0, 0, visible).t());
  out.mul_(scale);
}

// Softmax of row[0..n) in place; the row becomes probabilities.
inline void softmax_row(float* row, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - m);
    s += row[j];
  }
  const float inv = 1.f / s;
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
}

at::Tensor kv_attention_scores_cpu(const at::Tensor& q, const at::Tensor& k, double scale,
                                   int64_t chunk) {
  check_profile_args("fastllm.kv_attention_scores", q, k, chunk);
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), lk = k.size(1), d = q.size(2);
  const int64_t group = hq / hkv, offset = lk - lq;
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor kf = k.to(at::kFloat).contiguous();
  at::Tensor acc = at::zeros({hq, lk}, qf.options());
  float* acc_data = acc.data_ptr<float>();
  for (int64_t start = 0; start < lq; start += chunk) {
    const int64_t rows = std::min(chunk, lq - start);
    const int64_t visible = offset + start + rows;
    // One task per query head: its rows all add into the same accumulator row, so no races.
    at::parallel_for(0, hq, grain_for(rows * visible * (d + 3)), [&](int64_t h0, int64_t h1) {
      at::Tensor logits = at::empty({rows, visible}, qf.options());
      for (int64_t h = h0; h < h1; ++h) {
        head_chunk_logits(qf, kf, h, group, start, rows, visible, scale, logits);
        float* data = logits.data_ptr<float>();
        float* out = acc_data + h * lk;
        for (int64_t r = 0; r < rows; ++r) {
          float* row = data + r * visible;
          const int64_t n = offset + start + r + 1;
          softmax_row(row, n);
          for (int64_t j = 0; j < n; ++j) out[j] += row[j];
        }
      }
    });
  }
  return acc.view({hkv, group, lk}).sum(1);
}

at::Tensor kv_policy_recovery_cpu(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& key_class, int64_t window, double scale,
                                  int64_t chunk) {
  constexpr const char* op = "fastllm.kv_policy_recovery";
  check_profile_args(op, q, k, chunk);
  check_key_class(op, k, key_class, window);
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), lk = k.size(1), d = q.size(2);
  const int64_t group = hq / hkv, offset = lk - lq;
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor kf = k.to(at::kFloat).contiguous();
  at::Tensor cls = key_class.contiguous();
  const uint8_t* cls_data = cls.data_ptr<uint8_t>();
  std::vector<double> mass(hq * 5, 0.0);
  for (int64_t start = 0; start < lq; start += chunk) {
    const int64_t rows = std::min(chunk, lq - start);
    const int64_t visible = offset + start + rows;
    at::parallel_for(0, hq, grain_for(rows * visible * (d + 4)), [&](int64_t h0, int64_t h1) {
      at::Tensor logits = at::empty({rows, visible}, qf.options());
      for (int64_t h = h0; h < h1; ++h) {
        head_chunk_logits(qf, kf, h, group, start, rows, visible, scale, logits);
        float* data = logits.data_ptr<float>();
        const uint8_t* head_cls = cls_data + (h / group) * lk;
        for (int64_t r = 0; r < rows; ++r) {
          float* row = data + r * visible;
          const int64_t qpos = offset + start + r;
          softmax_row(row, qpos + 1);
          float part[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
          for (int64_t j = 0; j <= qpos; ++j) {
            part[first_policy_keeping(head_cls[j], qpos, j, window)] += row[j];
          }
          for (int p = 0; p < 5; ++p) mass[h * 5 + p] += part[p];
        }
      }
    });
  }
  at::Tensor out = at::empty({hkv, 4}, qf.options());
  float* out_data = out.data_ptr<float>();
  const double rows_total = static_cast<double>(std::max<int64_t>(lq, 1) * group);
  for (int64_t g = 0; g < hkv; ++g) {
    double cumulative = 0.0;
    for (int p = 0; p < 4; ++p) {
      double sum = 0.0;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) sum += mass[h * 5 + p];
      cumulative += sum;
      out_data[g * 4 + p] = static_cast<float>(cumulative / rows_total);
    }
  }
  return out;
}

template <typename scalar_t>
void ragged_decode_cpu_impl(const at::Tensor& q, const at::Tensor& kv_rows,
                            const at::Tensor& page_table, const at::Tensor& lengths,
                            int64_t page_rows, double scale, int64_t splits, at::Tensor& out,
                            at::Tensor& lse, at::Tensor& scores) {
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t caches = page_table.size(0), hkv = caches / batch, group = hq / hkv;
  const int64_t width = scores.size(1), pages = page_table.size(1);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* rows = kv_rows.data_ptr<scalar_t>();
  const int32_t* table = page_table.data_ptr<int32_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  // logits[c, g, e]; partial max, sum and weighted values per (c, g, split).
  std::vector<float> logits(caches * group * width);
  std::vector<float> part_m(caches * group * splits), part_s(caches * group * splits);
  std::vector<float> part_o(caches * group * splits * d);
  int64_t longest = 0;
  for (int64_t c = 0; c < caches; ++c) longest = std::max<int64_t>(longest, len[c]);
  const int64_t per_task = (longest + splits - 1) / splits * d * 3;
  at::parallel_for(0, caches * group * splits, grain_for(per_task), [&](int64_t t0, int64_t t1) {
    std::vector<float> qrow(d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t % splits, cg = t / splits, c = cg / group, g = cg % group;
      const int64_t seq = c / hkv, head = (c % hkv) * group + g;
      for (int64_t i = 0; i < d; ++i) {
        qrow[i] = static_cast<float>(q_data[(seq * hq + head) * d + i]);
      }
      int64_t begin, end;
      split_range(len[c], splits, s, &begin, &end);
      float* lg = logits.data() + cg * width;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t* key = rows + entry_slot(table + c * pages, e, page_rows) * 2 * d;
        float dot = 0.f;
        for (int64_t i = 0; i < d; ++i) dot += qrow[i] * static_cast<float>(key[i]);
        lg[e] = dot * static_cast<float>(scale);
        m = std::max(m, lg[e]);
      }
      float sum = 0.f;
      float* o = part_o.data() + t * d;
      for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
      for (int64_t e = begin; e < end; ++e) {
        const float p = std::exp(lg[e] - m);
        sum += p;
        const scalar_t* value = rows + entry_slot(table + c * pages, e, page_rows) * 2 * d + d;
        for (int64_t i = 0; i < d; ++i) o[i] += p * static_cast<float>(value[i]);
      }
      part_m[t] = m;
      part_s[t] = sum;
    }
  });
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();
  float* score_data = scores.data_ptr<float>();
  at::parallel_for(0, caches, grain_for(group * (splits * d + longest)), [&](int64_t c0, int64_t c1) {
    std::vector<float> acc(d);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t seq = c / hkv;
      float* sc = score_data + c * width;
      for (int64_t e = 0; e < width; ++e) sc[e] = 0.f;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t cg = c * group + g, head = (c % hkv) * group + g;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < splits; ++s) {
          if (part_s[cg * splits + s] > 0.f) m = std::max(m, part_m[cg * splits + s]);
        }
        float total = 0.f;
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t t = cg * splits + s;
          if (part_s[t] <= 0.f) continue;
          const float w = std::exp(part_m[t] - m);
          total += w * part_s[t];
          for (int64_t i = 0; i < d; ++i) acc[i] += w * part_o[t * d + i];
        }
        scalar_t* o = out_data + (seq * hq + head) * d;
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(acc[i] * inv);
        const float l = total > 0.f ? m + std::log(total) : -std::numeric_limits<float>::infinity();
        lse_data[seq * hq + head] = l;
        const float* lg = logits.data() + cg * width;
        for (int64_t e = 0; e < len[c]; ++e) sc[e] += std::exp(lg[e] - l);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_ragged_decode_cpu(
    const at::Tensor& q, const at::Tensor& kv_rows, const at::Tensor& page_table,
    const at::Tensor& lengths, int64_t page_rows, double scale, int64_t num_splits) {
  check_decode_args(q, kv_rows, page_table, lengths, page_rows, num_splits);
  at::Tensor qc = q.contiguous();
  at::Tensor table = page_table.contiguous();
  at::Tensor lens = lengths.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor scores =
      at::empty({page_table.size(0), page_table.size(1) * page_rows}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_ragged_decode",
                                  [&] {
                                    ragged_decode_cpu_impl<scalar_t>(qc, kv_rows, table, lens,
                                                                     page_rows, scale, num_splits,
                                                                     out, lse, scores);
                                  });
  return {out, lse, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("kv_attention_scores", &kv_attention_scores_cpu);
  m.impl("kv_policy_recovery", &kv_policy_recovery_cpu);
  m.impl("kv_ragged_decode", &kv_ragged_decode_cpu);
}

}  // namespace fastllm::kv
