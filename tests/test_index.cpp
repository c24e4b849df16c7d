// SemanticIndex: exact brute force, HNSW recall, add/replace/remove
// semantics in both modes, the switch between them, concurrent searches.
// Sizes stay in the low thousands: this also runs under ASan and TSan.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <thread>
#include <tuple>
#include <vector>

#include "index/distance.hpp"
#include "index/semantic_index.hpp"
#include "isa_scope.hpp"

namespace attention_echo::index {
namespace {

constexpr int kDim = 64;
constexpr std::size_t kAlwaysFlat = SIZE_MAX;
constexpr std::size_t kAlwaysHnsw = 0;

// Default options but for the HNSW threshold.
SemanticIndexOptions threshold(std::size_t hnsw_threshold) {
  SemanticIndexOptions options;
  options.hnsw_threshold = hnsw_threshold;
  return options;
}

void normalise(float* v) {
  double norm = 0;
  for (int i = 0; i < kDim; ++i) norm += double(v[i]) * v[i];
  for (int i = 0; i < kDim; ++i) v[i] = float(v[i] / std::sqrt(norm));
}

// n unit keys; clusters > 0 puts them around that many random centres
// (similarity to the centre ~0.85), clusters == 0 spreads them uniformly.
std::vector<float> make_keys(std::size_t n, std::size_t clusters, std::uint64_t seed) {
  std::mt19937_64 centre_rng(1234), rng(seed);
  std::normal_distribution<float> gauss;
  std::vector<float> centres(std::max<std::size_t>(clusters, 1) * kDim);
  for (auto& x : centres) x = gauss(centre_rng);
  for (std::size_t c = 0; c < clusters; ++c) normalise(&centres[c * kDim]);
  std::uniform_int_distribution<std::size_t> pick(0, std::max<std::size_t>(clusters, 1) - 1);

  std::vector<float> keys(n * kDim);
  for (std::size_t i = 0; i < n; ++i) {
    const float* centre = &centres[pick(rng) * kDim];
    for (int d = 0; d < kDim; ++d)
      keys[i * kDim + d] = clusters ? centre[d] + 0.08f * gauss(rng) : gauss(rng);
    normalise(&keys[i * kDim]);
  }
  return keys;
}

std::span<const float> row(const std::vector<float>& keys, std::size_t i) {
  return {&keys[i * kDim], kDim};
}

// Reference: every live key, double-precision dot, sorted best first.
std::vector<Candidate> naive_search(const std::vector<float>& keys,
                                    const std::vector<std::uint64_t>& ids,
                                    std::span<const float> query, int k, float min_similarity) {
  std::vector<Candidate> all;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    double sim = 0;
    for (int d = 0; d < kDim; ++d) sim += double(query[d]) * keys[i * kDim + d];
    if (sim >= min_similarity) all.push_back({ids[i], float(sim)});
  }
  std::sort(all.begin(), all.end(),
            [](const Candidate& a, const Candidate& b) { return a.similarity > b.similarity; });
  if (static_cast<int>(all.size()) > k) all.resize(k);
  return all;
}

TEST(SemanticIndex, BruteForceIsExact) {
  const auto keys = make_keys(1500, 0, 1), queries = make_keys(40, 0, 2);
  SemanticIndex index(kDim, threshold(kAlwaysFlat));
  std::vector<std::uint64_t> ids;
  for (std::size_t i = 0; i < 1500; ++i) {
    ids.push_back(1000 + 7 * i);
    index.add(ids.back(), row(keys, i));
  }
  for (std::size_t q = 0; q < 40; ++q) {
    for (const float min_similarity : {-1.0f, 0.1f, 0.3f}) {
      const auto got = index.search(row(queries, q), 10, min_similarity);
      const auto want = naive_search(keys, ids, row(queries, q), 10, min_similarity);
      ASSERT_EQ(got.size(), want.size());
      for (std::size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].id, want[i].id);
        EXPECT_NEAR(got[i].similarity, want[i].similarity, 1e-5);
      }
    }
  }
}

// Add, replace, remove, clear behave the same in both modes.
class IndexModes : public ::testing::TestWithParam<std::size_t> {};
INSTANTIATE_TEST_SUITE_P(, IndexModes, ::testing::Values(kAlwaysFlat, kAlwaysHnsw),
                         [](const auto& info) {
                           return info.param == kAlwaysFlat ? "Flat" : "Hnsw";
                         });

TEST_P(IndexModes, AddReplaceRemoveClear) {
  const auto keys = make_keys(300, 0, 3);
  SemanticIndex index(kDim, threshold(GetParam()));
  EXPECT_EQ(index.dim(), kDim);
  EXPECT_TRUE(index.search(row(keys, 0), 5, -1.0f).empty());

  for (std::uint64_t i = 0; i < 300; ++i) index.add(i, row(keys, i));
  EXPECT_EQ(index.size(), 300u);
  auto found = index.search(row(keys, 42), 1, 0.0f);
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found[0].id, 42u);
  EXPECT_NEAR(found[0].similarity, 1.0f, 1e-5);

  // Replace: id 42 now holds key 7's vector; key 42 no longer finds it.
  index.add(42, row(keys, 7));
  EXPECT_EQ(index.size(), 300u);
  for (const auto& c : index.search(row(keys, 42), 300, 0.99f)) EXPECT_NE(c.id, 42u);
  found = index.search(row(keys, 7), 2, 0.99f);
  ASSERT_EQ(found.size(), 2u);
  EXPECT_EQ(std::set<std::uint64_t>({found[0].id, found[1].id}), std::set<std::uint64_t>({7, 42}));

  index.remove(7);
  index.remove(7);       // again: no-op
  index.remove(123456);  // unknown: no-op
  EXPECT_EQ(index.size(), 299u);
  found = index.search(row(keys, 7), 1, 0.99f);
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found[0].id, 42u);

  // Results are best first, at most k, all >= min_similarity.
  found = index.search(row(keys, 100), 20, 0.05f);
  EXPECT_LE(found.size(), 20u);
  for (std::size_t i = 0; i < found.size(); ++i) {
    EXPECT_GE(found[i].similarity, 0.05f);
    if (i > 0) {
      EXPECT_GE(found[i - 1].similarity, found[i].similarity);
    }
  }
  EXPECT_TRUE(index.search(row(keys, 100), 0, -1.0f).empty());

  index.clear();
  EXPECT_EQ(index.size(), 0u);
  EXPECT_TRUE(index.search(row(keys, 100), 5, -1.0f).empty());
  index.add(5, row(keys, 5));
  EXPECT_EQ(index.search(row(keys, 5), 5, -1.0f).at(0).id, 5u);

  SemanticIndex moved = std::move(index);
  EXPECT_EQ(moved.size(), 1u);
  EXPECT_EQ(moved.search(row(keys, 5), 5, -1.0f).at(0).id, 5u);
}

TEST_P(IndexModes, RejectsWrongKeySize) {
  SemanticIndex index(kDim, threshold(GetParam()));
  const std::vector<float> short_key(kDim - 1, 0.1f);
  EXPECT_THROW(index.add(1, short_key), std::invalid_argument);
  EXPECT_THROW(index.search(short_key, 1, 0.0f), std::invalid_argument);
  EXPECT_THROW(SemanticIndex(0), std::invalid_argument);
}

TEST(SemanticIndex, RejectsHnswOptionsOutOfRange) {
  for (const auto& [m, ef_construction, ef_search] :
       {std::tuple{1, 100, 12}, {65, 100, 12}, {16, 0, 12}, {16, 100, 0}}) {
    SemanticIndexOptions options;
    options.hnsw = {.m = m, .ef_construction = ef_construction, .ef_search = ef_search};
    EXPECT_THROW(SemanticIndex(kDim, options), std::invalid_argument) << m;
  }
}

// recall@1 of an HNSW-mode index against exact search on the same keys.
double recall_at_1(const SemanticIndex& hnsw, const SemanticIndex& exact,
                   const std::vector<float>& queries, std::size_t count) {
  std::size_t hits = 0;
  for (std::size_t q = 0; q < count; ++q) {
    const auto got = hnsw.search(row(queries, q), 1, -1.0f);
    hits += !got.empty() && got[0].id == exact.search(row(queries, q), 1, -1.0f).at(0).id;
  }
  return double(hits) / double(count);
}

TEST(SemanticIndex, HnswRecallOnClusteredKeys) {
  const auto keys = make_keys(2000, 40, 4), queries = make_keys(300, 40, 5);
  SemanticIndex hnsw(kDim, threshold(kAlwaysHnsw)), exact(kDim, threshold(kAlwaysFlat));
  for (std::uint64_t i = 0; i < 2000; ++i) {
    hnsw.add(i, row(keys, i));
    exact.add(i, row(keys, i));
  }
  EXPECT_GE(recall_at_1(hnsw, exact, queries, 300), 0.95);
}

// Evict half, add fresh keys into the freed slots, evict again: removed ids
// never come back and recall holds up without a rebuild.
TEST(SemanticIndex, HnswChurnNeverReturnsRemovedIds) {
  const auto keys = make_keys(2400, 48, 6), queries = make_keys(150, 48, 7);
  SemanticIndex hnsw(kDim, threshold(kAlwaysHnsw)), exact(kDim, threshold(kAlwaysFlat));
  std::set<std::uint64_t> live, removed;
  auto add = [&](std::uint64_t id) {
    hnsw.add(id, row(keys, id));
    exact.add(id, row(keys, id));
    live.insert(id);
  };
  auto remove = [&](std::uint64_t id) {
    hnsw.remove(id);
    exact.remove(id);
    live.erase(id);
    removed.insert(id);
  };
  auto check = [&] {
    ASSERT_EQ(hnsw.size(), live.size());
    for (std::size_t q = 0; q < 150; ++q)
      for (const auto& c : hnsw.search(row(queries, q), 20, -1.0f))
        ASSERT_TRUE(live.count(c.id)) << c.id;
    for (const std::uint64_t id : removed)  // a removed key must not find itself
      for (const auto& c : hnsw.search(row(keys, id), 3, 0.999f)) ASSERT_NE(c.id, id);
    EXPECT_GE(recall_at_1(hnsw, exact, queries, 150), 0.95);
  };

  std::mt19937_64 rng(8);
  for (std::uint64_t id = 0; id < 1200; ++id) add(id);
  for (std::uint64_t id = 0; id < 1200; ++id)
    if (rng() % 2) remove(id);
  check();
  for (std::uint64_t id = 1200; id < 2400; ++id) add(id);
  for (std::uint64_t id = 1200; id < 2400; ++id)
    if (rng() % 3 == 0) remove(id);
  check();
}

// Crossing the threshold builds the graph; falling below half of it goes
// back to exact search. Contents survive both switches.
TEST(SemanticIndex, SwitchesBetweenFlatAndHnsw) {
  const auto keys = make_keys(400, 0, 9);
  SemanticIndex index(kDim, threshold(100));
  for (std::uint64_t i = 0; i < 400; ++i) index.add(i, row(keys, i));
  EXPECT_EQ(index.size(), 400u);
  for (std::uint64_t i = 0; i < 400; i += 37)
    EXPECT_EQ(index.search(row(keys, i), 1, 0.99f).at(0).id, i);

  for (std::uint64_t i = 0; i < 380; ++i) index.remove(i);
  EXPECT_EQ(index.size(), 20u);
  std::vector<std::uint64_t> ids;
  std::vector<float> rest;
  for (std::uint64_t i = 380; i < 400; ++i) {
    ids.push_back(i);
    rest.insert(rest.end(), row(keys, i).begin(), row(keys, i).end());
  }
  for (std::size_t q = 0; q < 50; ++q) {  // exact again
    const auto got = index.search(row(keys, q), 5, -1.0f);
    const auto want = naive_search(rest, ids, row(keys, q), 5, -1.0f);
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].id, want[i].id);
  }
}

// search() is const and may run on many threads at once (the cache's shared
// lock); each thread must see exactly what a lone search sees.
TEST_P(IndexModes, ConcurrentSearchesAgree) {
  const auto keys = make_keys(1000, 20, 10), queries = make_keys(100, 20, 11);
  SemanticIndex index(kDim, threshold(GetParam()));
  for (std::uint64_t i = 0; i < 1000; ++i) index.add(i, row(keys, i));
  std::vector<std::vector<Candidate>> expected;
  for (std::size_t q = 0; q < 100; ++q) expected.push_back(index.search(row(queries, q), 5, 0.0f));

  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep)
        for (std::size_t q = 0; q < 100; ++q) {
          const auto got = index.search(row(queries, (q + 25 * t) % 100), 5, 0.0f);
          const auto& want = expected[(q + 25 * t) % 100];
          mismatches[t] += got.size() != want.size() ||
                           !std::equal(got.begin(), got.end(), want.begin(), [](auto& a, auto& b) {
                             return a.id == b.id && a.similarity == b.similarity;
                           });
        }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

// Every ISA path, both kernels: 6 rows cover the AVX-512 scan's 4-row blocks
// and its tail.
TEST(DotKernels, MatchFloat64ForAnyLengthOnEveryIsa) {
  constexpr std::size_t kRows = 6;
  std::mt19937_64 rng(12);
  std::normal_distribution<float> gauss;
  for (const Isa isa : supported_isas()) {
    const attention_echo::testing::IsaScope scope(isa);
    const DotKernels kernels = dot_kernels();
    for (const int n : {1, 7, 15, 16, 17, 33, 64, 100, 128, 130}) {
      std::vector<float> q(n), rows(kRows * n);
      for (auto& x : q) x = gauss(rng);
      for (auto& x : rows) x = gauss(rng);
      std::vector<float> got(kRows);
      kernels.dot_rows(q.data(), rows.data(), kRows, n, got.data());
      for (std::size_t r = 0; r < kRows; ++r) {
        double want = 0;
        for (int i = 0; i < n; ++i) want += double(q[i]) * rows[r * n + i];
        EXPECT_NEAR(kernels.dot(q.data(), &rows[r * n], n), want, 1e-4 * n)
            << to_string(isa) << " n " << n;
        EXPECT_NEAR(got[r], want, 1e-4 * n) << to_string(isa) << " n " << n << " row " << r;
      }
    }
  }
}

}  // namespace
}  // namespace attention_echo::index
