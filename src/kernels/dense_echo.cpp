#include "kernels/dense_echo.hpp"

#include <algorithm>
#include <cmath>

namespace attention_echo::kernels {
namespace {

constexpr int kRowsPerTask = 32;

float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

// Keys row i of the cached block covers: j <= i (causal) or the whole prefix.
int cached_row_length(const DenseLogits& c, int i) { return c.causal ? i + 1 : c.prefix; }

std::size_t cached_row_offset(const DenseLogits& c, int i) {
  const auto r = static_cast<std::size_t>(i);
  return c.causal ? r * (r + 1) / 2 : r * static_cast<std::size_t>(c.prefix);
}

}  // namespace

DenseLogits capture_dense_logits(const AttentionProblem& problem, int prefix, ThreadPool& pool) {
  DenseLogits c;
  c.heads = problem.q.heads;
  c.prefix = prefix;
  c.dim = problem.q.dim;
  c.causal = problem.causal;
  c.logits.resize(c.head_size() * c.heads);
  c.mean_query.assign(static_cast<std::size_t>(c.heads) * c.dim, 0.0f);
  const int row_tasks = (prefix + kRowsPerTask - 1) / kRowsPerTask;
  pool.parallel_for(static_cast<std::size_t>(c.heads) * row_tasks, [&](std::size_t task) {
    const int h = static_cast<int>(task / row_tasks);
    const int kvh = problem.kv_head(h);
    const int begin = static_cast<int>(task % row_tasks) * kRowsPerTask;
    const int end = std::min(prefix, begin + kRowsPerTask);
    float* head_logits = c.logits.data() + c.head_size() * h;
    for (int i = begin; i < end; ++i) {
      const float* qi = problem.q.row(h, i);
      float* row = head_logits + cached_row_offset(c, i);
      for (int j = 0, n = cached_row_length(c, i); j < n; ++j)
        row[j] = problem.scale * dot(qi, problem.k.row(kvh, j), c.dim);
    }
  });
  for (int h = 0; h < c.heads; ++h) {
    float* mean = c.mean_query.data() + static_cast<std::size_t>(h) * c.dim;
    for (int i = 0; i < prefix; ++i) {
      const float* qi = problem.q.row(h, i);
      for (int d = 0; d < c.dim; ++d) mean[d] += qi[d];
    }
    for (int d = 0; d < c.dim; ++d) mean[d] /= static_cast<float>(prefix);
  }
  return c;
}

void dense_echo_rows(const AttentionProblem& problem, int rows, const DenseLogits& cached,
                     float adjustment_strength, bool enable_jacobian, ThreadPool& pool) {
  const int heads = problem.q.heads, dim = problem.q.dim;
  const int keys = cached.causal ? rows : cached.prefix;
  // u[h][j] = alpha * scale * (qbar - qbar_c) . k_j: the Taylor step, O(p*D).
  std::vector<float> shift(static_cast<std::size_t>(heads) * keys, 0.0f);
  if (enable_jacobian && adjustment_strength != 0.0f) {
    std::vector<float> delta(dim);
    for (int h = 0; h < heads; ++h) {
      std::fill(delta.begin(), delta.end(), 0.0f);
      for (int i = 0; i < rows; ++i) {
        const float* qi = problem.q.row(h, i);
        for (int d = 0; d < dim; ++d) delta[d] += qi[d];
      }
      const float* cached_mean = cached.mean_query.data() + static_cast<std::size_t>(h) * dim;
      for (int d = 0; d < dim; ++d) delta[d] = delta[d] / static_cast<float>(rows) - cached_mean[d];
      const int kvh = problem.kv_head(h);
      for (int j = 0; j < keys; ++j)
        shift[static_cast<std::size_t>(h) * keys + j] =
            adjustment_strength * problem.scale * dot(delta.data(), problem.k.row(kvh, j), dim);
    }
  }

  const int row_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  pool.parallel_for(static_cast<std::size_t>(heads) * row_tasks, [&](std::size_t task) {
    const int h = static_cast<int>(task / row_tasks);
    const int kvh = problem.kv_head(h);
    const int begin = static_cast<int>(task % row_tasks) * kRowsPerTask;
    const int end = std::min(rows, begin + kRowsPerTask);
    const float* head_logits = cached.logits.data() + cached.head_size() * h;
    const float* head_shift = shift.data() + static_cast<std::size_t>(h) * keys;
    std::vector<float> p(keys);
    for (int i = begin; i < end; ++i) {
      const int n = cached_row_length(cached, i);
      const float* s = head_logits + cached_row_offset(cached, i);
      float max_logit = -INFINITY;
      for (int j = 0; j < n; ++j) {
        p[j] = s[j] + head_shift[j];
        max_logit = std::max(max_logit, p[j]);
      }
      float sum = 0.0f;
      for (int j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - max_logit));
      float* out = problem.out.row(h, i);
      std::fill(out, out + dim, 0.0f);
      for (int j = 0; j < n; ++j) {
        const float* vj = problem.v.row(kvh, j);
        const float w = p[j];
#pragma omp simd
        for (int d = 0; d < dim; ++d) out[d] += w * vj[d];
      }
      const float inv = 1.0f / sum;
      for (int d = 0; d < dim; ++d) out[d] *= inv;
    }
  });
}

}  // namespace attention_echo::kernels
