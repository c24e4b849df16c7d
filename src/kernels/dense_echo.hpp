// Dense echo: the seed's algorithm, done right. A miss
// stores the prefix logits S_c = scale * Q_c K_c^T and the mean prefix query;
// a hit reuses S_c, adds the exact first-order term of a uniform query shift
// (u_j = scale * (qbar - qbar_c) . k_j, O(p*D)), softmaxes and multiplies by
// the new V. It saves only the QK^T product.
//
// Both sides run the one tile loop (attention_kernel.hpp): the miss is
// exact_rows capturing the logits it computes anyway; the hit is cached_rows,
// the same online softmax and PV with scores loaded from S_c plus u.
#pragma once

#include <cstddef>
#include <vector>

#include "kernels/attention_kernel.hpp"

namespace attention_echo::kernels {

struct DenseLogits {
  int heads = 0;
  int prefix = 0;
  int dim = 0;
  bool causal = true;
  // Per head: causal -> packed lower triangle, row i at i*(i+1)/2 with i+1
  // entries (so the first r rows of a longer prefix are a prefix of it);
  // non-causal -> full prefix x prefix. See LogitLayout.
  std::vector<float> logits;
  std::vector<float> mean_query;  // [heads, dim]

  LogitLayout layout() const { return {prefix, causal}; }
  std::size_t head_size() const { return layout().head_size(); }
  std::size_t bytes() const { return (logits.size() + mean_query.size()) * sizeof(float); }
};

// A dense-mode miss in one pass: exact rows [0, T) of every head into
// problem.out, bit-identical to exact_rows(problem, 0, T), and the logits and
// mean query of the prefix block [0, prefix), the logits captured from the
// scores the kernel computes anyway (no second QK^T). prefix in [0, T];
// non-causal needs prefix == problem.prefix_length.
DenseLogits exact_rows_with_dense_logits(const CpuTarget& cpu, const AttentionProblem& problem, int prefix);

// The Taylor step per head, [heads, keys] with keys = rows causal, prefix
// non-causal: u[h][j] = alpha * scale * (qbar_h - cached.mean_query[h]) . k_j,
// qbar_h the mean of q[h, 0:rows). O(heads * keys * D).
std::vector<float> dense_taylor_shift(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                                      float adjustment_strength, ThreadPool& pool);

// Prefix rows [0, rows) of every head from cached logits (rows <= cached.prefix;
// non-causal needs cached.prefix == problem.prefix_length): softmax(S_c + u) @ V,
// with u = dense_taylor_shift(...) when enable_jacobian and adjustment_strength
// != 0, else u = 0. Throws std::invalid_argument when cached does not match
// the problem's heads, dim or mask.
void dense_echo_rows(const CpuTarget& cpu, const AttentionProblem& problem, int rows, const DenseLogits& cached,
                     float adjustment_strength, bool enable_jacobian);

}  // namespace attention_echo::kernels
