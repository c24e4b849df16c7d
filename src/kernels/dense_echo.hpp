// Dense echo (DESIGN.md section 3): the seed's algorithm, done right. A miss
// stores the prefix logits S_c = scale * Q_c K_c^T and the mean prefix query;
// a hit reuses S_c, adds the exact first-order term of a uniform query shift
// (u_j = scale * (qbar - qbar_c) . k_j, O(p*D)), softmaxes and multiplies by
// the new V. It saves only the QK^T product.
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
  // non-causal -> full prefix x prefix.
  std::vector<float> logits;
  std::vector<float> mean_query;  // [heads, dim]

  std::size_t head_size() const {
    const auto p = static_cast<std::size_t>(prefix);
    return causal ? p * (p + 1) / 2 : p * p;
  }
  std::size_t bytes() const { return (logits.size() + mean_query.size()) * sizeof(float); }
};

// Logits and mean query of the prefix block [0, prefix) of problem.
DenseLogits capture_dense_logits(const AttentionProblem& problem, int prefix, ThreadPool& pool);

// Prefix rows [0, rows) of every head from cached logits (rows <= cached.prefix;
// non-causal needs rows == cached.prefix == problem.prefix_length).
void dense_echo_rows(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                     float adjustment_strength, bool enable_jacobian, ThreadPool& pool);

}  // namespace attention_echo::kernels
