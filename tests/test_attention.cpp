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
#include "kernels/cpu_backend.hpp"
#include "core/isa.hpp"
#include "reference.hpp"

namespace attention_echo {
namespace {

using kernels::AttentionProblem;
using kernels::CpuBackend;
using kernels::KeptTiles;
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
      CpuBackend(one).exact_rows(problem, 0, x.tokens);
      const std::vector<float> whole = x.out;

      std::fill(x.out.begin(), x.out.end(), 0.0f);
      const CpuBackend backend(three);
      backend.exact_rows(problem, 0, 37);
      backend.exact_rows(problem, 37, 101);
      backend.exact_rows(problem, 101, x.tokens);
      EXPECT_EQ(std::memcmp(whole.data(), x.out.data(), whole.size() * sizeof(float)), 0);

      std::vector<int> rows = {149, 0, 63, 64, 65, 3, 127, 128, 100};
      std::vector<float> picked(static_cast<std::size_t>(x.heads) * rows.size() * x.dim);
      const int n = static_cast<int>(rows.size());
      backend.selected_rows(problem, rows, MutableHeadsView::contiguous(picked.data(), x.heads, n, x.dim));
      for (int h = 0; h < x.heads; ++h)
        for (std::size_t r = 0; r < rows.size(); ++r)
          EXPECT_EQ(std::memcmp(picked.data() + (h * rows.size() + r) * x.dim,
                                whole.data() + (static_cast<std::size_t>(h) * x.tokens + rows[r]) * x.dim,
                                x.dim * sizeof(float)),
                    0)
              << to_string(isa) << " head " << h << " row " << rows[r];

      backend.exact_rows_with_tile_mass(problem, causal ? 100 : 70, 32);
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
        const kernels::TileMass mass = CpuBackend(pool).exact_rows_with_tile_mass(x.problem(causal, prefix), prefix, block);
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
      const CpuBackend backend(pool);
      backend.exact_rows(x.problem(), 0, x.tokens);
      const std::vector<float> exact = x.out;
      std::fill(x.out.begin(), x.out.end(), 0.0f);
      backend.sparse_rows(x.problem(), prefix, KeptTiles(all_tiles(x.heads, (prefix + block - 1) / block, block)));
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
  const CpuBackend backend(pool);
  const kernels::TileMass mass = backend.exact_rows_with_tile_mass(x.problem(), prefix, block);
  const std::vector<float> exact = x.out;
  const auto kept = kernels::select_tiles(mass, heads, 0.98);
  const int tiles = mass.tiles;
  const double lower = static_cast<double>(heads) * tiles * (tiles + 1) / 2;
  EXPECT_LT(kept.cols.size() / lower, 0.5) << "the pattern should be sparse";

  backend.sparse_rows(x.problem(), prefix, KeptTiles(kept));
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
  // Paged views: key and value only, alike, in pages of whole kernel steps.
  const float* k_pages[] = {x.k.data()};
  const float* v_pages[] = {x.v.data()};
  const HeadsView k_paged = HeadsView::paged(k_pages, 64, 2, 8, 16, 32);
  const HeadsView v_paged = HeadsView::paged(v_pages, 64, 2, 8, 16, 32);
  expect_invalid("key", [&] { call(q, HeadsView::paged(k_pages, 32, 2, 8, 16, 32), v_paged, out); });
  expect_invalid("value", [&] { call(q, k_paged, v, out); });
  expect_invalid("value", [&] { call(q, k_paged, HeadsView::paged(v_pages, 128, 2, 8, 16, 32), out); });
  const float* q_pages[] = {x.q.data()};
  expect_invalid("query", [&] { call(HeadsView::paged(q_pages, 64, 4, 8, 16, 64), k_paged, v_paged, out); });
  float* out_pages[] = {x.out.data()};
  expect_invalid("out", [&] { call(q, k_paged, v_paged, MutableHeadsView::paged(out_pages, 64, 4, 8, 16, 64)); });
  x.k[40] = INFINITY;  // token 1 of the paged view
  expect_invalid("key", [&] { call(q, k_paged, v_paged, out); });
  x.k[40] = 0.0f;
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
  // Unchecked values reach the output instead (row 0 of head 0 reads v's row 0).
  AttentionOptions unchecked;
  unchecked.check_finite = false;
  call(q, k, v, out, unchecked);
  EXPECT_TRUE(std::isnan(x.out[3]) || std::isinf(x.out[3]));
  x.v[3] = 0.0f;

  AttentionOptions bad_offset;
  bad_offset.query_offset = -1;
  expect_invalid("query_offset", [&] { call(q, k, v, out, bad_offset); });
  bad_offset.query_offset = 1;  // 8 query rows from position 1 need 9 keys
  expect_invalid("key", [&] { call(q, k, v, out, bad_offset); });

  const auto problem = x.problem();
  const CpuBackend backend(pool);
  expect_invalid("row_end", [&] { backend.exact_rows(problem, 0, 9); });
  expect_invalid("block", [&] { backend.exact_rows_with_tile_mass(problem, 8, 48); });
  const int rows[] = {8};
  const auto result = MutableHeadsView::contiguous(x.out.data(), 4, 1, 16);
  expect_invalid("rows", [&] { backend.selected_rows(problem, rows, result); });
  expect_invalid("result", [&] { backend.selected_rows(problem, rows, MutableHeadsView::contiguous(x.out.data(), 4, 2, 16)); });
  expect_invalid("kept", [&] { backend.sparse_rows(problem, 8, KeptTiles(all_tiles(3, 1, 32))); });
  expect_invalid("keep_mass", [&] { kernels::select_tiles(kernels::TileMass{32, 0, {}}, 0, -0.1); });
  expect_invalid("rows", [&] { backend.copy_rows(q, out, 9); });
  expect_invalid("dst", [&] { backend.copy_rows(q, MutableHeadsView::contiguous(x.out.data(), 2, 8, 16), 1); });
  expect_invalid("prefix", [&] { backend.k_fingerprint(k, 9); });

  // Prefix-block entry points address rows [0, rows): no query offset.
  auto offset = problem;
  offset.q.tokens = offset.out.tokens = 7;
  offset.query_offset = 1;
  expect_invalid("problem", [&] { backend.sparse_rows(offset, 8, KeptTiles(all_tiles(4, 1, 32))); });
  expect_invalid("row_begin", [&] { backend.exact_rows(offset, 0, 8); });
}

// K or V of a token-major problem copied into pages of page_tokens tokens,
// each its own buffer with rows `stride` floats apart (wider than the row,
// as a KVState page's plane is a layer's kv_dim), the way the engine hands
// its K/V to attention().
struct Paged {
  std::vector<std::vector<float>> buffers;
  std::vector<const float*> starts;
  HeadsView view;
  Paged(const HeadsView& src, int page_tokens, int stride) {
    for (int t0 = 0; t0 < src.tokens; t0 += page_tokens) {
      std::vector<float>& page = buffers.emplace_back(static_cast<std::size_t>(page_tokens) * stride, -7.0f);
      for (int t = t0; t < std::min(t0 + page_tokens, src.tokens); ++t)
        for (int h = 0; h < src.heads; ++h)
          std::copy_n(src.row(h, t), src.dim, page.data() + (t - t0) * stride + h * src.dim);
    }
    for (const auto& b : buffers) starts.push_back(b.data());
    view = HeadsView::paged(starts.data(), page_tokens, src.heads, src.tokens, src.dim, stride);
  }
};

// Paged K/V (several pages, a partial last one) give every row the same bits
// as contiguous K/V through attention() and attention_rows() (the engine's
// two calls), on every ISA.
TEST(Attention, PagedKeysAndValuesAreBitIdenticalToContiguous) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (int page_tokens : {64, 128}) {
      Inputs x = make_inputs(4, 2, 300, 40, 9u, 1.0f, /*token_major=*/true);
      const Paged k(x.kv(), page_tokens, 2 * 40 + 24), v(x.vv(), page_tokens, 2 * 40 + 24);
      auto same = [&](const std::vector<float>& a, const std::vector<float>& b, const char* what) {
        EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
            << to_string(isa) << " page_tokens " << page_tokens << ": " << what;
      };
      for (bool causal : {true, false}) {
        AttentionOptions options;
        options.causal = causal;
        options.prefix_length = 130;
        attention(x.qv(), x.kv(), x.vv(), x.ov(), options, pool);
        const std::vector<float> contiguous = x.out;
        attention(x.qv(), k.view, v.view, x.ov(), options, pool);
        same(contiguous, x.out, causal ? "attention, causal" : "attention, non-causal");
      }
      // The new rows of a prefill that starts past stored rows (mid-page).
      AttentionOptions offset;
      offset.query_offset = 150;
      const int n = x.tokens - offset.query_offset;
      const HeadsView q_new = HeadsView::token_major(x.q.data() + 150 * 4 * 40, 4, n, 40);
      std::vector<float> a(static_cast<std::size_t>(n) * 4 * 40), b(a.size());
      attention(q_new, x.kv(), x.vv(), MutableHeadsView::token_major(a.data(), 4, n, 40), offset, pool);
      attention(q_new, k.view, v.view, MutableHeadsView::token_major(b.data(), 4, n, 40), offset, pool);
      same(a, b, "query_offset");
      const std::vector<int> rows = {0, 63, 64, 65, 127, 128, 200, 299};
      std::vector<float> ra(rows.size() * 4 * 40), rb(ra.size());
      const auto out_a = MutableHeadsView::token_major(ra.data(), 4, static_cast<int>(rows.size()), 40);
      const auto out_b = MutableHeadsView::token_major(rb.data(), 4, static_cast<int>(rows.size()), 40);
      attention_rows(x.qv(), x.kv(), x.vv(), rows, out_a, {}, pool);
      attention_rows(x.qv(), k.view, v.view, rows, out_b, {}, pool);
      same(ra, rb, "attention_rows");
    }
  }
}

// Rows [offset, T) given alone (a chunked prefill or decode step) against
// the float64 reference, and bit-identical to the same rows of a whole call.
TEST(Attention, QueryOffsetMatchesReference) {
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    IsaScope scope(isa);
    for (const Shape& s : kShapes)
      for (bool causal : {true, false})
        for (int offset : {1, s.tokens / 2, s.tokens - 1}) {
          if (offset < 1 || offset >= s.tokens) continue;
          const int prefix = causal ? 0 : s.tokens / 3;
          for (bool token_major : {false, true}) {
            Inputs x = make_inputs(s.heads, s.kv_heads, s.tokens, s.dim, 3u + s.tokens, 1.0f, token_major);
            AttentionOptions options;
            options.causal = causal;
            options.prefix_length = prefix;
            attention(x.qv(), x.kv(), x.vv(), x.ov(), options, pool);
            const std::vector<float> whole = x.out;
            std::fill(x.out.begin(), x.out.end(), 0.0f);

            HeadsView q = x.qv();
            MutableHeadsView out = x.ov();
            q.data = q.row(0, offset);
            out.data = out.row(0, offset);
            q.tokens = out.tokens = s.tokens - offset;
            options.query_offset = offset;
            attention(q, x.kv(), x.vv(), out, options, pool);

            const auto ref = reference_attention(x.qv(), x.kv(), x.vv(), x.scale(), causal, prefix);
            double worst = 0.0;
            const MutableHeadsView all = x.ov();
            for (int h = 0; h < s.heads; ++h) {
              double err = 0.0, norm = 0.0;
              for (int t = offset; t < s.tokens; ++t) {
                EXPECT_EQ(std::memcmp(all.row(h, t), whole.data() + (all.row(h, t) - x.out.data()),
                                      s.dim * sizeof(float)),
                          0);
                for (int d = 0; d < s.dim; ++d) {
                  const double r = ref[(static_cast<std::size_t>(h) * s.tokens + t) * s.dim + d];
                  err += (all.row(h, t)[d] - r) * (all.row(h, t)[d] - r);
                  norm += r * r;
                }
              }
              worst = std::max(worst, std::sqrt(err / std::max(norm, 1e-300)));
            }
            EXPECT_LE(worst, 1e-5) << to_string(isa) << " H=" << s.heads << " T=" << s.tokens << " D=" << s.dim
                                   << " causal=" << causal << " offset=" << offset;
            EXPECT_EQ(x.out[0], 0.0f) << "rows before the offset are not written";
          }
        }
  }
}

// Views say where their memory is: the CPU backend refuses anything else,
// naming the argument, and validation never reads device memory.
TEST(CpuBackend, RejectsViewsNotInHostMemory) {
  ThreadPool pool(1);
  Inputs x = make_inputs(2, 1, 8, 16, 2u);
  const CpuBackend backend(pool);
  EXPECT_EQ(backend.device(), Device::cpu());
  const Device gpu = Device::cuda(1);
  EXPECT_EQ(to_string(gpu), "cuda:1");

  auto on = [&](auto view, Device device) {
    view.device = device;
    return view;
  };
  const int rows[] = {0};
  for (const char* name : {"query", "key", "value", "out"}) {
    auto problem = x.problem();
    const std::string n = name;
    if (n == "query") problem.q = on(problem.q, gpu);
    if (n == "key") problem.k = on(problem.k, gpu);
    if (n == "value") problem.v = on(problem.v, gpu);
    if (n == "out") problem.out = on(problem.out, gpu);
    expect_invalid(name, [&] { backend.exact_rows(problem, 0, 8); });
    expect_invalid(name, [&] { backend.exact_rows_with_tile_mass(problem, 8, 32); });
    expect_invalid(name, [&] { backend.exact_rows_with_dense_logits(problem, 8); });
    expect_invalid(name, [&] { backend.sparse_rows(problem, 8, KeptTiles(all_tiles(2, 1, 32))); });
    expect_invalid(name, [&] { backend.dense_echo_rows(problem, 8, kernels::DenseLogits{}, 1.0f, true); });
    expect_invalid(name, [&] { backend.selected_rows(problem, rows, x.ov()); });
  }
  std::vector<float> result(2 * 16);
  expect_invalid("result", [&] {
    backend.selected_rows(x.problem(), rows, MutableHeadsView::contiguous(result.data(), 2, 1, 16, gpu));
  });
  expect_invalid("src", [&] { backend.copy_rows(on(x.qv(), gpu), x.ov(), 1); });
  expect_invalid("dst", [&] { backend.copy_rows(x.qv(), on(x.ov(), gpu), 1); });
  expect_invalid("key", [&] { backend.k_fingerprint(on(x.kv(), gpu), 1); });

  // attention(): mixed devices are named by validation; all on a GPU passes
  // validation unread and the CPU backend refuses it.
  expect_invalid("value", [&] { attention(x.qv(), x.kv(), on(x.vv(), gpu), x.ov(), {}, pool); });
  expect_invalid("query", [&] {
    attention(on(x.qv(), gpu), on(x.kv(), gpu), on(x.vv(), gpu), on(x.ov(), gpu), {}, pool);
  });
}

// The exact tier's row copy: any strides in and out, only rows [0, rows).
TEST(CpuBackend, CopiesRowsBetweenLayouts) {
  ThreadPool pool(1);
  const CpuBackend backend(pool);
  Inputs x = make_inputs(3, 3, 10, 24, 4u, 1.0f, /*token_major=*/true);
  std::vector<float> packed(3 * 6 * 24, -1.0f);
  backend.copy_rows(x.qv(), MutableHeadsView::contiguous(packed.data(), 3, 6, 24), 6);
  for (int h = 0; h < 3; ++h)
    for (int t = 0; t < 6; ++t)
      EXPECT_EQ(std::memcmp(packed.data() + (h * 6 + t) * 24, x.qv().row(h, t), 24 * sizeof(float)), 0);
  backend.copy_rows(HeadsView::contiguous(packed.data(), 3, 6, 24), x.ov(), 4);
  for (int h = 0; h < 3; ++h)
    for (int t = 0; t < 10; ++t)
      for (int d = 0; d < 24; ++d) EXPECT_EQ(x.ov().row(h, t)[d], t < 4 ? x.qv().row(h, t)[d] : 0.0f);
}

// The fingerprint hashes the bytes of k's rows [0, prefix), not their layout.
TEST(CpuBackend, FingerprintsTheKeyPrefix) {
  ThreadPool pool(1);
  const CpuBackend backend(pool);
  Inputs a = make_inputs(4, 2, 12, 20, 6u);
  Inputs b = a;
  b.token_major = true;
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 12; ++t) std::memcpy(b.view(b.k.data(), 2).row(h, t), a.kv().row(h, t), 20 * sizeof(float));
  const std::uint64_t fp = backend.k_fingerprint(a.kv(), 8);
  EXPECT_EQ(backend.k_fingerprint(b.kv(), 8), fp);
  EXPECT_NE(backend.k_fingerprint(a.kv(), 7), fp);
  a.k[(1 * 12 + 10) * 20 + 3] += 1.0f;  // a row past the prefix
  EXPECT_EQ(backend.k_fingerprint(a.kv(), 8), fp);
  a.k[(1 * 12 + 7) * 20 + 19] += 1.0f;  // the prefix's last value
  EXPECT_NE(backend.k_fingerprint(a.kv(), 8), fp);
}

TEST(Attention, ReportsTheActiveIsa) {
  const std::string name = attention_isa();
  EXPECT_TRUE(name == "avx512" || name == "avx2" || name == "scalar") << name;
  IsaScope scope(Isa::kScalar);
  EXPECT_STREQ(attention_isa(), "scalar");
}

}  // namespace
}  // namespace attention_echo
