// Exact, sparse and selected-row attention against the float64 reference, on
// every SIMD path this machine has. Accuracy is relative L2 per head:
// ||out_h - ref_h|| / ||ref_h|| <= 1e-5.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "isa_scope.hpp"
#include "kernel_inputs.hpp"
#include "attention_echo/attention.hpp"
#include "kernels/attention_kernel.hpp"
#include "core/isa.hpp"
#include "reference.hpp"

namespace attention_echo {
namespace {

using kernels::AttentionProblem;
using attention_echo::Isa;
using testing::reference_attention;

using testing::IsaScope;

using Inputs = testing::KernelInputs;

// Normal q/k/v; q_amplitude scales the logits.
Inputs make_inputs(int heads, int kv_heads, int tokens, int dim, unsigned seed, float q_amplitude = 1.0f,
                   bool token_major = false) {
  Inputs x{heads, kv_heads, tokens, dim, token_major, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  x.q.resize(static_cast<std::size_t>(heads) * tokens * dim);
  x.k.resize(static_cast<std::size_t>(kv_heads) * tokens * dim);
  x.v.resize(x.k.size());
  for (float& f : x.q) f = q_amplitude * normal(rng);
  for (float& f : x.k) f = normal(rng);
  for (float& f : x.v) f = normal(rng);
  x.out.assign(x.q.size(), 0.0f);
  return x;
}

double max_head_error(const Inputs& x, const std::vector<double>& ref, int rows) {
  return testing::max_head_error(x.view(x.out.data(), x.heads), ref, rows);
}

double attention_error(Inputs& x, bool causal, int prefix_length, ThreadPool& pool) {
  AttentionOptions options;
  options.causal = causal;
  options.prefix_length = prefix_length;
  attention(x.qv(), x.kv(), x.vv(), x.ov(), options, pool);
  const double scale = 1.0 / std::sqrt(static_cast<double>(x.dim));
  return max_head_error(x, reference_attention(x.qv(), x.kv(), x.vv(), scale, causal, prefix_length), x.tokens);
}

struct Shape {
  int heads, kv_heads, tokens, dim;
};

// H/Hkv of 1, 2 and 8; D of 32, 40, 64, 128; T of 1, tile multiples and not.
const Shape kShapes[] = {{1, 1, 1, 64},  {2, 1, 45, 40}, {8, 1, 100, 32}, {4, 2, 64, 128},
                         {2, 2, 97, 64}, {8, 8, 33, 16}, {3, 3, 130, 24}, {8, 4, 70, 128}};

TEST(Attention, MatchesReferenceOnEveryIsa) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (const Shape& s : kShapes)
      for (bool causal : {true, false})
        for (int prefix : {0, s.tokens / 2 + 1}) {
          if (prefix > s.tokens) continue;
          Inputs x = make_inputs(s.heads, s.kv_heads, s.tokens, s.dim, 7u + s.tokens);
          EXPECT_LE(attention_error(x, causal, prefix, pool), 1e-5)
              << to_string(isa) << " H=" << s.heads << " Hkv=" << s.kv_heads << " T=" << s.tokens
              << " D=" << s.dim << " causal=" << causal << " prefix=" << prefix;
        }
  }
}

// scale * q.k up to ~80: the softmax is nearly one-hot and exp must not
// overflow or lose the runner-up terms.
TEST(Attention, LargeLogits) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    Inputs x = make_inputs(2, 1, 90, 64, 3u, 10.0f);
    // Make a few rows point straight at an earlier key: logit ~ 8 * |k|^2 / 8.
    for (int t = 10; t < 90; t += 7)
      for (int d = 0; d < 64; ++d) x.q[static_cast<std::size_t>(t) * 64 + d] = 10.0f * x.k[(t - 5) * 64 + d];
    EXPECT_LE(attention_error(x, true, 0, pool), 1e-5) << to_string(isa);
    EXPECT_LE(attention_error(x, false, 40, pool), 1e-5) << to_string(isa);
  }
}

TEST(Attention, TokenMajorViews) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    Inputs x = make_inputs(4, 2, 77, 40, 11u, 1.0f, /*token_major=*/true);
    EXPECT_LE(attention_error(x, true, 0, pool), 1e-5) << to_string(isa);
    EXPECT_LE(attention_error(x, false, 30, pool), 1e-5) << to_string(isa);
  }
}

// The exact prefix tier copies rows computed once; they must equal a
// recomputation by any entry point, with any split of rows or threads.
TEST(Attention, RowsAreBitIdenticalAcrossEntryPointsAndThreads) {
  ThreadPool one(1), three(3);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (bool causal : {true, false}) {
      Inputs x = make_inputs(4, 2, 150, 40, 5u);
      const auto problem = x.problem(causal, 70);
      kernels::exact_rows(problem, 0, x.tokens, one);
      const std::vector<float> whole = x.out;

      std::fill(x.out.begin(), x.out.end(), 0.0f);
      kernels::exact_rows(problem, 0, 37, three);
      kernels::exact_rows(problem, 37, 101, three);
      kernels::exact_rows(problem, 101, x.tokens, three);
      EXPECT_EQ(std::memcmp(whole.data(), x.out.data(), whole.size() * sizeof(float)), 0);

      std::vector<int> rows = {149, 0, 63, 64, 65, 3, 127, 128, 100};
      std::vector<float> picked(static_cast<std::size_t>(x.heads) * rows.size() * x.dim);
      kernels::selected_rows(problem, rows, picked.data(), three);
      for (int h = 0; h < x.heads; ++h)
        for (std::size_t r = 0; r < rows.size(); ++r)
          EXPECT_EQ(std::memcmp(picked.data() + (h * rows.size() + r) * x.dim,
                                whole.data() + (static_cast<std::size_t>(h) * x.tokens + rows[r]) * x.dim,
                                x.dim * sizeof(float)),
                    0)
              << to_string(isa) << " head " << h << " row " << rows[r];

      kernels::TileMass mass{32};
      kernels::exact_rows(problem, 0, x.tokens, three, &mass, causal ? 100 : 70);
      EXPECT_EQ(std::memcmp(whole.data(), x.out.data(), whole.size() * sizeof(float)), 0);
    }
  }
}

// Row i of head h's softmax probabilities over its keys, in float64.
std::vector<double> reference_probabilities(const Inputs& x, int h, int i, bool causal, int prefix_length) {
  const int end = testing::reference_key_end(i, x.tokens, causal, prefix_length);
  const double scale = 1.0 / std::sqrt(static_cast<double>(x.dim));
  const HeadsView q = x.qv(), k = x.kv();
  std::vector<double> p(end);
  for (int j = 0; j < end; ++j) {
    double dot = 0.0;
    for (int d = 0; d < x.dim; ++d) dot += static_cast<double>(q.row(h, i)[d]) * k.row(h / (x.heads / x.kv_heads), j)[d];
    p[j] = scale * dot;
  }
  const double max = *std::max_element(p.begin(), p.end());
  double sum = 0.0;
  for (double& e : p) sum += e = std::exp(e - max);
  for (double& e : p) e /= sum;
  return p;
}

// Reference tile mass: mean over tile I's rows of each row's mass on key tile J.
std::vector<double> reference_mass(const Inputs& x, bool causal, int prefix, int block) {
  const int tiles = (prefix + block - 1) / block;
  std::vector<double> mass(static_cast<std::size_t>(x.heads) * tiles * tiles, 0.0);
  for (int h = 0; h < x.heads; ++h)
    for (int i = 0; i < prefix; ++i) {
      const auto p = reference_probabilities(x, h, i, causal, prefix);
      const int tile = i / block, rows = std::min(block, prefix - tile * block);
      for (std::size_t j = 0; j < p.size(); ++j)
        mass[(static_cast<std::size_t>(h) * tiles + tile) * tiles + j / block] += p[j] / rows;
    }
  return mass;
}

TEST(TileMass, MatchesReferenceAndRowsSumToOne) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (bool causal : {true, false})
      for (int block : {32, 64}) {
        Inputs x = make_inputs(4, 2, 200, 32, 9u, 2.0f);
        const int prefix = 150;
        kernels::TileMass mass{block};
        kernels::exact_rows(x.problem(causal, prefix), 0, x.tokens, pool, &mass, prefix);
        const int tiles = (prefix + block - 1) / block;
        ASSERT_EQ(mass.tiles, tiles);
        const auto ref = reference_mass(x, causal, prefix, block);
        for (int h = 0; h < x.heads; ++h)
          for (int i = 0; i < tiles; ++i) {
            double sum = 0.0;
            for (int j = 0; j < tiles; ++j) {
              const std::size_t at = (static_cast<std::size_t>(h) * tiles + i) * tiles + j;
              EXPECT_NEAR(mass.mass[at], ref[at], 1e-5);
              if (causal && j > i) EXPECT_EQ(mass.mass[at], 0.0f);
              sum += mass.mass[at];
            }
            EXPECT_NEAR(sum, 1.0, 1e-5) << "head " << h << " tile " << i;
          }
      }
  }
}

TEST(SelectTiles, KeepsSinkAndDiagonalAndCoversTheMass) {
  // One head, 4 tiles; rows of the lower triangle with known masses.
  kernels::TileMass mass{64, 4, {1.0f, 0, 0, 0,  //
                                 0.3f, 0.7f, 0, 0,  //
                                 0.05f, 0.6f, 0.35f, 0,  //
                                 0.02f, 0.5f, 0.08f, 0.4f}};
  const auto kept = kernels::select_tiles(mass, 1, 0.9);
  auto row = [&](int i) {
    return std::vector<int>(kept.cols.begin() + kept.offsets[i], kept.cols.begin() + kept.offsets[i + 1]);
  };
  EXPECT_EQ(row(0), (std::vector<int>{0}));
  EXPECT_EQ(row(1), (std::vector<int>{0, 1}));
  EXPECT_EQ(row(2), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(row(3), (std::vector<int>{0, 1, 3}));  // 0.92 >= 0.9 without tile 2
  EXPECT_EQ(kept.offsets.size(), 5u);

  const auto all = kernels::select_tiles(mass, 1, 1.0);
  EXPECT_EQ(all.cols.size(), 10u);  // every tile with mass, none without
  EXPECT_THROW(kernels::select_tiles(mass, 1, 1.5), std::invalid_argument);
}

kernels::TileSet all_tiles(int heads, int tiles, int block) {
  kernels::TileSet set{block, tiles, heads, {0}, {}};
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < tiles; ++i) {
      for (int j = 0; j < tiles; ++j) set.cols.push_back(static_cast<std::uint16_t>(j));
      set.offsets.push_back(static_cast<std::uint32_t>(set.cols.size()));
    }
  return set;
}

TEST(SparseRows, AllTilesKeptEqualsExact) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (int block : {32, 64}) {
      Inputs x = make_inputs(4, 2, 140, 64, 13u);
      const int prefix = 120;
      kernels::exact_rows(x.problem(), 0, x.tokens, pool);
      const std::vector<float> exact = x.out;
      std::fill(x.out.begin(), x.out.end(), 0.0f);
      kernels::sparse_rows(x.problem(), prefix, all_tiles(x.heads, (prefix + block - 1) / block, block), pool);
      for (int h = 0; h < x.heads; ++h)
        EXPECT_EQ(std::memcmp(x.out.data() + static_cast<std::size_t>(h) * x.tokens * x.dim,
                              exact.data() + static_cast<std::size_t>(h) * x.tokens * x.dim,
                              static_cast<std::size_t>(prefix) * x.dim * sizeof(float)),
                  0)
            << to_string(isa) << " block " << block << " head " << h;
    }
  }
}

// A trained head's pattern, built by making keys point along the queries:
// a sink at token 0, a local band, and a few vertical lines. Attention then
// concentrates there, select_tiles keeps few tiles, and sparse_rows' error is
// about the mass it leaves out.
TEST(SparseRows, ErrorIsAboutTheOmittedMass) {
  ThreadPool pool(2);
  const int heads = 2, tokens = 512, dim = 64, prefix = 512, block = 32;
  Inputs x = make_inputs(heads, heads, tokens, dim, 17u, 0.3f);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> anchor(dim);
  for (float& a : anchor) a = normal(rng);
  // q_t = 2 (anchor + k_{t-1}) + noise: logit ~16 on the anchor keys (token 0
  // and every 97th) and on the previous token, ~N(0, 3^2) elsewhere.
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t) {
      float* k = x.k.data() + (static_cast<std::size_t>(h) * tokens + t) * dim;
      if (t == 0 || t % 97 == 13) std::copy(anchor.begin(), anchor.end(), k);
    }
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t) {
      float* q = x.q.data() + (static_cast<std::size_t>(h) * tokens + t) * dim;
      const float* previous = x.k.data() + (static_cast<std::size_t>(h) * tokens + std::max(t - 1, 0)) * dim;
      for (int d = 0; d < dim; ++d) q[d] += 2.0f * (anchor[d] + previous[d]);
    }
  kernels::TileMass mass{block};
  kernels::exact_rows(x.problem(), 0, tokens, pool, &mass, prefix);
  const std::vector<float> exact = x.out;
  const auto kept = kernels::select_tiles(mass, heads, 0.98);
  const int tiles = mass.tiles;
  const double lower = static_cast<double>(heads) * tiles * (tiles + 1) / 2;
  EXPECT_LT(kept.cols.size() / lower, 0.5) << "the pattern should be sparse";

  kernels::sparse_rows(x.problem(), prefix, kept, pool);
  // Dropping mass e from a row moves it by at most 2 e / (1 - e) max_j |v_j|.
  double max_v = 0.0;
  for (int j = 0; j < heads * tokens; ++j)
    max_v = std::max(max_v, std::sqrt(std::inner_product(x.v.begin() + j * dim, x.v.begin() + (j + 1) * dim,
                                                         x.v.begin() + j * dim, 0.0)));
  double total_omitted = 0.0, total_error = 0.0;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < prefix; ++i) {
      const auto p = reference_probabilities(x, h, i, true, 0);
      const std::size_t slot = static_cast<std::size_t>(h) * tiles + i / block;
      double omitted = std::accumulate(p.begin(), p.end(), 0.0);
      for (auto c = kept.offsets[slot]; c < kept.offsets[slot + 1]; ++c)
        for (int j = kept.cols[c] * block; j < std::min((kept.cols[c] + 1) * block, i + 1); ++j) omitted -= p[j];
      double error = 0.0;
      const std::size_t row = (static_cast<std::size_t>(h) * tokens + i) * dim;
      for (int d = 0; d < dim; ++d) error += (x.out[row + d] - exact[row + d]) * (x.out[row + d] - exact[row + d]);
      error = std::sqrt(error);
      EXPECT_LE(error, 2.0 * omitted / (1.0 - omitted) * max_v + 1e-4) << "head " << h << " row " << i;
      total_omitted += omitted / (heads * prefix);
      total_error += error / (heads * prefix);
    }
  EXPECT_GT(total_omitted, 0.0);
  EXPECT_LE(total_omitted, 1.0 - 0.98 + 1e-4);
  EXPECT_GT(total_error, 0.0);
}

// what() must start with the offending argument's name.
template <class F>
void expect_invalid(const char* name, F&& f) {
  try {
    f();
    ADD_FAILURE() << "no exception for " << name;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
  }
}

TEST(Attention, RejectsBadInput) {
  ThreadPool pool(1);
  Inputs x = make_inputs(4, 2, 8, 16, 1u);
  auto call = [&](const HeadsView& q, const HeadsView& k, const HeadsView& v, const MutableHeadsView& out,
                  AttentionOptions options = {}) { attention(q, k, v, out, options, pool); };
  const HeadsView q = x.qv(), k = x.kv(), v = x.vv();
  const MutableHeadsView out = x.ov();
  expect_invalid("query", [&] { call(HeadsView::contiguous(x.q.data(), 4, 0, 16), k, v, out); });
  expect_invalid("key", [&] { call(q, HeadsView::contiguous(x.k.data(), 2, 8, 8), v, out); });
  expect_invalid("key", [&] { call(q, HeadsView::contiguous(x.k.data(), 3, 4, 16), v, out); });
  expect_invalid("value", [&] { call(q, k, HeadsView::contiguous(x.v.data(), 1, 8, 16), out); });
  expect_invalid("out", [&] { call(q, k, v, MutableHeadsView::contiguous(x.out.data(), 4, 7, 16)); });
  AttentionOptions bad_prefix;
  bad_prefix.prefix_length = 9;
  expect_invalid("prefix_length", [&] { call(q, k, v, out, bad_prefix); });
  bad_prefix.prefix_length = -1;
  expect_invalid("prefix_length", [&] { call(q, k, v, out, bad_prefix); });
  AttentionOptions bad_scale;
  bad_scale.scale = std::nanf("");
  expect_invalid("scale", [&] { call(q, k, v, out, bad_scale); });

  x.q[5] = std::nanf("");
  expect_invalid("query", [&] { call(q, k, v, out); });
  x.q[5] = 0.0f;
  x.k[7] = INFINITY;
  expect_invalid("key", [&] { call(q, k, v, out); });
  x.k[7] = 0.0f;
  x.v[3] = -INFINITY;
  expect_invalid("value", [&] { call(q, k, v, out); });
  x.v[3] = 0.0f;

  const auto problem = x.problem();
  expect_invalid("row_end", [&] { kernels::exact_rows(problem, 0, 9, pool); });
  const int rows[] = {8};
  expect_invalid("rows", [&] { kernels::selected_rows(problem, rows, x.out.data(), pool); });
  expect_invalid("kept", [&] { kernels::sparse_rows(problem, 8, all_tiles(3, 1, 32), pool); });
  expect_invalid("keep_mass", [&] { kernels::select_tiles(kernels::TileMass{32, 0, {}}, 0, -0.1); });
}

TEST(Attention, ReportsTheActiveIsa) {
  const std::string name = attention_isa();
  EXPECT_TRUE(name == "avx512" || name == "avx2" || name == "scalar") << name;
  IsaScope scope(Isa::kScalar);
  EXPECT_STREQ(attention_isa(), "scalar");
}

}  // namespace
}  // namespace attention_echo
