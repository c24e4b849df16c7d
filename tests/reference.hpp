// Naive float64 attention, the ground truth every kernel test compares with.
// Same semantics as attention.hpp: row i sees keys [0, key_end(i)), causal
// key_end = i + 1; non-causal key_end = prefix_length for rows i <
// prefix_length and T otherwise. Query head h reads kv head h / (H / Hkv).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "attention_echo/tensor.hpp"

namespace attention_echo::testing {

inline int reference_key_end(int row, int tokens, bool causal, int prefix_length) {
  if (causal) return row + 1;
  return row < prefix_length ? prefix_length : tokens;
}

// Output [H, T, D] row-major, in float64.
inline std::vector<double> reference_attention(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                                               double scale, bool causal, int prefix_length) {
  const int H = q.heads, T = q.tokens, D = q.dim, group = q.heads / k.heads;
  std::vector<double> out(static_cast<std::size_t>(H) * T * D, 0.0);
  std::vector<double> logits(T);
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < T; ++i) {
      const int end = reference_key_end(i, T, causal, prefix_length);
      const float* qi = q.row(h, i);
      double max = -INFINITY;
      for (int j = 0; j < end; ++j) {
        const float* kj = k.row(h / group, j);
        double dot = 0.0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(qi[d]) * kj[d];
        logits[j] = scale * dot;
        max = std::max(max, logits[j]);
      }
      double sum = 0.0;
      for (int j = 0; j < end; ++j) sum += logits[j] = std::exp(logits[j] - max);
      double* o = out.data() + (static_cast<std::size_t>(h) * T + i) * D;
      for (int j = 0; j < end; ++j) {
        const float* vj = v.row(h / group, j);
        for (int d = 0; d < D; ++d) o[d] += logits[j] / sum * vj[d];
      }
    }
  return out;
}

// Max over heads of ||out_h - ref_h|| / ||ref_h|| over rows [0, rows);
// ref is [H, T, D] as reference_attention returns it.
inline double max_head_error(const HeadsView& out, const std::vector<double>& ref, int rows) {
  double worst = 0.0;
  for (int h = 0; h < out.heads; ++h) {
    double err = 0.0, norm = 0.0;
    for (int t = 0; t < rows; ++t)
      for (int d = 0; d < out.dim; ++d) {
        const double r = ref[(static_cast<std::size_t>(h) * out.tokens + t) * out.dim + d];
        err += (out.row(h, t)[d] - r) * (out.row(h, t)[d] - r);
        norm += r * r;
      }
    worst = std::max(worst, std::sqrt(err / std::max(norm, 1e-300)));
  }
  return worst;
}

}  // namespace attention_echo::testing
