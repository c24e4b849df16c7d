// Dense echo on the tile loop: the miss captures the
// logits exact_rows computes anyway (its output bit for bit exact_rows'),
// the hit loads them, adds the Taylor step and runs the same online softmax
// and PV. Checked on every SIMD path against float64 references; relative L2
// per head <= 1e-5. Shapes are small and ragged (D = 40, p not a multiple of
// a vector or a chunk) so every edge of the loads and stores runs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include "isa_scope.hpp"
#include "kernel_inputs.hpp"
#include "kernels/cpu_backend.hpp"
#include "kernels/dense_echo.hpp"
#include "core/isa.hpp"
#include "reference.hpp"

namespace attention_echo {
namespace {

using kernels::AttentionProblem;
using kernels::CpuBackend;
using kernels::DenseLogits;
using attention_echo::Isa;

using testing::IsaScope;

using Qkv = testing::KernelInputs;

Qkv make_qkv(int heads, int kv_heads, int tokens, int dim, unsigned seed, bool token_major = false) {
  Qkv x{heads, kv_heads, tokens, dim, token_major, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  x.q.resize(static_cast<std::size_t>(heads) * tokens * dim);
  x.k.resize(static_cast<std::size_t>(kv_heads) * tokens * dim);
  x.v.resize(x.k.size());
  for (float& f : x.q) f = normal(rng);
  for (float& f : x.k) f = normal(rng);
  for (float& f : x.v) f = normal(rng);
  x.out.assign(x.q.size(), 0.0f);
  return x;
}

// q + amount * noise (same k and v): a "near-duplicate" request.
Qkv perturb_q(const Qkv& a, float amount, unsigned seed) {
  Qkv b = a;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& f : b.q) f += amount * normal(rng);
  std::fill(b.out.begin(), b.out.end(), 0.0f);
  return b;
}

double max_head_error(Qkv& x, const std::vector<double>& ref, int rows) {
  return testing::max_head_error(as_const(x.ov()), ref, rows);
}

// softmax(S + u) @ V in float64 for rows [0, rows) of every head, S the
// cached logits as stored, u per head and key (empty: 0). [H, T, D].
std::vector<double> reference_from_logits(const DenseLogits& c, const std::vector<double>& u, Qkv& x, int rows) {
  const int group = x.heads / x.kv_heads;
  const HeadsView v = x.vv();
  std::vector<double> out(static_cast<std::size_t>(x.heads) * x.tokens * x.dim, 0.0);
  std::vector<double> p(c.prefix);
  const int keys = c.causal ? rows : c.prefix;
  for (int h = 0; h < x.heads; ++h)
    for (int i = 0; i < rows; ++i) {
      const int n = c.causal ? i + 1 : c.prefix;
      const float* s = c.logits.data() + c.head_size() * h + c.layout().row_offset(i);
      double max = -INFINITY, sum = 0.0;
      for (int j = 0; j < n; ++j) {
        p[j] = s[j] + (u.empty() ? 0.0 : u[static_cast<std::size_t>(h) * keys + j]);
        max = std::max(max, p[j]);
      }
      for (int j = 0; j < n; ++j) sum += p[j] = std::exp(p[j] - max);
      double* o = out.data() + (static_cast<std::size_t>(h) * x.tokens + i) * x.dim;
      for (int j = 0; j < n; ++j)
        for (int d = 0; d < x.dim; ++d) o[d] += p[j] / sum * v.row(h / group, j)[d];
    }
  return out;
}

// The dense tier's Taylor step,
// u_j = alpha * scale * (mean(q_b[:rows]) - mean(q_a[:prefix])) . k_j,
// in float64 from the raw queries, [H, keys].
std::vector<double> reference_shift(const Qkv& a, int prefix, const Qkv& b, int rows, bool causal, double alpha) {
  const int keys = causal ? rows : prefix, group = b.heads / b.kv_heads;
  const HeadsView qa = a.qv(), qb = b.qv(), k = b.kv();
  std::vector<double> u(static_cast<std::size_t>(b.heads) * keys);
  for (int h = 0; h < b.heads; ++h) {
    std::vector<double> delta(b.dim, 0.0);
    for (int d = 0; d < b.dim; ++d) {
      double ma = 0.0, mb = 0.0;
      for (int i = 0; i < prefix; ++i) ma += qa.row(h, i)[d];
      for (int i = 0; i < rows; ++i) mb += qb.row(h, i)[d];
      delta[d] = mb / rows - ma / prefix;
    }
    for (int j = 0; j < keys; ++j) {
      double dot = 0.0;
      for (int d = 0; d < b.dim; ++d) dot += delta[d] * k.row(h / group, j)[d];
      u[static_cast<std::size_t>(h) * keys + j] = alpha * b.scale() * dot;
    }
  }
  return u;
}

struct Case {
  int heads, kv_heads, tokens, dim, prefix;
  bool causal;
};

// GQA 2:1 and MHA; T > p (rows past the prefix exist); p ragged and not.
const Case kCases[] = {{4, 2, 170, 40, 150, true},  {4, 2, 170, 40, 150, false}, {2, 2, 96, 32, 64, true},
                       {2, 2, 96, 32, 64, false},   {3, 1, 40, 16, 33, true},    {3, 1, 40, 16, 33, false}};

std::string describe(Isa isa, const Case& c) {
  return std::string(to_string(isa)) + " H=" + std::to_string(c.heads) + " Hkv=" +
         std::to_string(c.kv_heads) + " T=" + std::to_string(c.tokens) + " D=" + std::to_string(c.dim) +
         " p=" + std::to_string(c.prefix) + (c.causal ? " causal" : " non-causal");
}

TEST(DenseEcho, MissIsBitIdenticalToExactAndCapturesTheLogits) {
  ThreadPool one(1), three(3);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (const Case& c : kCases)
      for (bool token_major : {false, true}) {
        SCOPED_TRACE(describe(isa, c) + (token_major ? " token-major" : ""));
        Qkv x = make_qkv(c.heads, c.kv_heads, c.tokens, c.dim, 11u + c.prefix, token_major);
        const AttentionProblem problem = x.problem(c.causal, c.prefix);
        CpuBackend(one).exact_rows(problem, 0, c.tokens);
        const std::vector<float> exact = x.out;
        std::fill(x.out.begin(), x.out.end(), 0.0f);
        const DenseLogits d = CpuBackend(three).exact_rows_with_dense_logits(problem, c.prefix);
        EXPECT_EQ(x.out, exact);
        ASSERT_EQ(d.logits.size(), d.head_size() * c.heads);
        // Logits: scale * q.k within float rounding of the kernel's dot.
        const int group = c.heads / c.kv_heads;
        double worst = 0.0;
        for (int h = 0; h < c.heads; ++h)
          for (int i = 0; i < c.prefix; ++i)
            for (int j = 0; j < (c.causal ? i + 1 : c.prefix); ++j) {
              double dot = 0.0;
              for (int e = 0; e < c.dim; ++e)
                dot += static_cast<double>(x.qv().row(h, i)[e]) * x.kv().row(h / group, j)[e];
              const double want = x.scale() * dot;
              const double got = d.logits[d.head_size() * h + d.layout().row_offset(i) + j];
              worst = std::max(worst, std::abs(got - want) / (1.0 + std::abs(want)));
            }
        EXPECT_LE(worst, 2e-6);
        for (int h = 0; h < c.heads; ++h)
          for (int e = 0; e < c.dim; ++e) {
            double mean = 0.0;
            for (int i = 0; i < c.prefix; ++i) mean += x.qv().row(h, i)[e];
            EXPECT_NEAR(d.mean_query[static_cast<std::size_t>(h) * c.dim + e], mean / c.prefix, 1e-6);
          }
      }
  }
}

TEST(DenseEcho, HitOnIdenticalInputsEqualsExactAttention) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (const Case& c : kCases) {
      SCOPED_TRACE(describe(isa, c));
      Qkv x = make_qkv(c.heads, c.kv_heads, c.tokens, c.dim, 5u + c.tokens);
      const AttentionProblem problem = x.problem(c.causal, c.prefix);
      const DenseLogits d = CpuBackend(pool).exact_rows_with_dense_logits(problem, c.prefix);
      const auto ref = testing::reference_attention(x.qv(), x.kv(), x.vv(), x.scale(), c.causal, c.prefix);
      // The same q: the Taylor step is 0 whatever alpha is.
      for (float alpha : {0.0f, 1.0f, 3.5f})
        for (bool jacobian : {false, true}) {
          std::fill(x.out.begin(), x.out.end(), 0.0f);
          CpuBackend(pool).dense_echo_rows(problem, c.prefix, d, alpha, jacobian);
          EXPECT_LE(max_head_error(x, ref, c.prefix), 1e-5) << "alpha=" << alpha << " jacobian=" << jacobian;
        }
      // Fewer rows than the cached prefix (mean query differs: no Taylor step).
      for (int rows : {1, c.prefix / 2 + 1, c.prefix - 1}) {
        std::fill(x.out.begin(), x.out.end(), 0.0f);
        CpuBackend(pool).dense_echo_rows(problem, rows, d, 1.0f, false);
        EXPECT_LE(max_head_error(x, ref, rows), 1e-5) << "rows=" << rows;
        // Rows past `rows` are not touched.
        EXPECT_EQ(x.ov().row(0, rows)[0], 0.0f) << "rows=" << rows;
      }
    }
  }
}

TEST(DenseEcho, WithoutJacobianIsSoftmaxOfCachedLogitsTimesNewV) {
  ThreadPool pool(3);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (const Case& c : kCases) {
      SCOPED_TRACE(describe(isa, c));
      Qkv a = make_qkv(c.heads, c.kv_heads, c.tokens, c.dim, 21u);
      const DenseLogits d = CpuBackend(pool).exact_rows_with_dense_logits(a.problem(c.causal, c.prefix), c.prefix);
      // An unrelated request: new q, k and v; only v may matter.
      Qkv b = make_qkv(c.heads, c.kv_heads, c.tokens, c.dim, 22u);
      for (int rows : {c.prefix, c.prefix / 3 + 1}) {
        std::fill(b.out.begin(), b.out.end(), 0.0f);
        CpuBackend(pool).dense_echo_rows(b.problem(c.causal, c.prefix), rows, d, 0.9f, false);
        EXPECT_LE(max_head_error(b, reference_from_logits(d, {}, b, rows), rows), 1e-5) << "rows=" << rows;
      }
    }
  }
}

TEST(DenseEcho, TaylorShiftMatchesFloat64OnPerturbedQueries) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (const Case& c : kCases) {
      SCOPED_TRACE(describe(isa, c));
      Qkv a = make_qkv(c.heads, c.kv_heads, c.tokens, c.dim, 31u);
      const DenseLogits d = CpuBackend(pool).exact_rows_with_dense_logits(a.problem(c.causal, c.prefix), c.prefix);
      Qkv b = perturb_q(a, 0.3f, 32u);
      const float alpha = 0.8f;
      for (int rows : {c.prefix, c.prefix / 2 + 1}) {
        const AttentionProblem problem = b.problem(c.causal, c.prefix);
        const std::vector<double> want = reference_shift(a, c.prefix, b, rows, c.causal, alpha);
        const std::vector<float> got = kernels::dense_taylor_shift(problem, rows, d, alpha, pool);
        ASSERT_EQ(got.size(), want.size());
        double largest = 0.0, worst = 0.0;
        for (std::size_t i = 0; i < want.size(); ++i) {
          largest = std::max(largest, std::abs(want[i]));
          worst = std::max(worst, std::abs(got[i] - want[i]));
        }
        EXPECT_GT(largest, 1e-3) << "the perturbation must move the logits";
        EXPECT_LE(worst, 1e-5 * largest) << "rows=" << rows;
        // And the hit applies it: softmax(S_c + u) @ V.
        std::fill(b.out.begin(), b.out.end(), 0.0f);
        CpuBackend(pool).dense_echo_rows(problem, rows, d, alpha, true);
        EXPECT_LE(max_head_error(b, reference_from_logits(d, want, b, rows), rows), 1e-5) << "rows=" << rows;
        // Without the step the result differs (by the step's effect).
        std::fill(b.out.begin(), b.out.end(), 0.0f);
        CpuBackend(pool).dense_echo_rows(problem, rows, d, alpha, false);
        EXPECT_GT(max_head_error(b, reference_from_logits(d, want, b, rows), rows), 1e-4) << "rows=" << rows;
      }
    }
  }
}

TEST(DenseEcho, BadArgumentsThrow) {
  ThreadPool pool(2);
  Qkv a = make_qkv(2, 1, 40, 16, 1u);
  const AttentionProblem causal = a.problem(true, 30);
  const DenseLogits d = CpuBackend(pool).exact_rows_with_dense_logits(causal, 30);
  EXPECT_THROW(CpuBackend(pool).dense_echo_rows(causal, 31, d, 1.0f, true), std::invalid_argument);
  EXPECT_THROW(CpuBackend(pool).dense_echo_rows(a.problem(false, 30), 30, d, 1.0f, true), std::invalid_argument);
  Qkv b = make_qkv(4, 1, 40, 16, 1u);
  EXPECT_THROW(CpuBackend(pool).dense_echo_rows(b.problem(true, 30), 30, d, 1.0f, true), std::invalid_argument);
  EXPECT_THROW(CpuBackend(pool).exact_rows_with_dense_logits(a.problem(false, 20), 30), std::invalid_argument);
  EXPECT_THROW(CpuBackend(pool).exact_rows_with_dense_logits(causal, 41), std::invalid_argument);
  CpuBackend(pool).dense_echo_rows(causal, 0, d, 1.0f, true);  // nothing to do
}

}  // namespace
}  // namespace attention_echo
