// The serving module's data structures: token alignment (the KV-blend
// tier's donor map) and the block-hashed K/V store.
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <vector>

#include "serving/kv_block_store.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {
namespace {

std::vector<int> random_tokens(int n, std::uint64_t seed, int vocab = 500) {
  std::mt19937_64 rng(seed);
  std::vector<int> t(n);
  for (int& x : t) x = static_cast<int>(rng() % vocab);
  return t;
}

// Every aligned token really is the donor's token at that position.
void expect_consistent(const TokenAlignment& a, const std::vector<int>& req, const std::vector<int>& donor) {
  int aligned = 0;
  for (std::size_t i = 0; i < req.size(); ++i) {
    const int j = a.donor_position[i];
    if (j < 0) continue;
    ++aligned;
    ASSERT_LT(j, static_cast<int>(donor.size()));
    EXPECT_EQ(req[i], donor[j]) << "position " << i;
  }
  EXPECT_EQ(aligned, a.aligned);
}

TEST(TokenAlignment, IdenticalIsOneRunAtTheSamePositions) {
  const auto t = random_tokens(300, 1);
  const auto a = align_tokens(t, t);
  expect_consistent(a, t, t);
  EXPECT_EQ(a.aligned, 300);
  EXPECT_EQ(a.moved, 0);
  EXPECT_EQ(a.exact_prefix, 300);
}

TEST(TokenAlignment, SubstitutionLeavesOnlyTheChangedToken) {
  const auto donor = random_tokens(300, 2);
  auto req = donor;
  req[100] = 9999;
  const auto a = align_tokens(req, donor);
  expect_consistent(a, req, donor);
  EXPECT_EQ(a.aligned, 299);
  EXPECT_EQ(a.donor_position[100], -1);
  EXPECT_EQ(a.moved, 0);
  EXPECT_EQ(a.exact_prefix, 100);
}

TEST(TokenAlignment, InsertionAndDeletionShiftTheRest) {
  const auto donor = random_tokens(300, 3);
  auto inserted = donor;
  inserted.insert(inserted.begin() + 50, {7001, 7002, 7003});
  const auto a = align_tokens(inserted, donor);
  expect_consistent(a, inserted, donor);
  EXPECT_EQ(a.aligned, 300);
  EXPECT_EQ(a.moved, 250);  // everything after the insertion moved by 3
  EXPECT_EQ(a.donor_position[53], 50);

  auto deleted = donor;
  deleted.erase(deleted.begin() + 80, deleted.begin() + 85);
  const auto d = align_tokens(deleted, donor);
  expect_consistent(d, deleted, donor);
  EXPECT_EQ(d.aligned, 295);
  EXPECT_EQ(d.donor_position[80], 85);
}

TEST(TokenAlignment, MovedChunksAlignAtAnyPosition) {
  // Passages A B C D served as C A D B.
  std::vector<std::vector<int>> p;
  for (int i = 0; i < 4; ++i) p.push_back(random_tokens(64, 10 + i));
  auto concat = [&](std::initializer_list<int> order) {
    std::vector<int> out;
    for (int i : order) out.insert(out.end(), p[i].begin(), p[i].end());
    return out;
  };
  const auto donor = concat({0, 1, 2, 3}), req = concat({2, 0, 3, 1});
  const auto a = align_tokens(req, donor);
  expect_consistent(a, req, donor);
  EXPECT_EQ(a.aligned, 256);
  EXPECT_EQ(a.donor_position[0], 128);   // C's first token
  EXPECT_EQ(a.donor_position[64], 0);    // A's
  EXPECT_EQ(a.donor_position[255], 127); // B's last
}

TEST(TokenAlignment, UnrelatedTokensDoNotAlign) {
  const auto a = align_tokens(random_tokens(200, 5), random_tokens(200, 6));
  EXPECT_LT(a.aligned, 8);
  EXPECT_THROW(align_tokens(random_tokens(5, 1), random_tokens(5, 1), 0), std::invalid_argument);
}

// A fake model state: K/V rows whose values encode (layer, position, token).
struct FakeKV {
  int layers = 2, kv_dim = 4;
  std::vector<std::vector<float>> k, v;
  FakeKV(const std::vector<int>& tokens, float salt = 0.0f) {
    for (int l = 0; l < layers; ++l) {
      k.emplace_back(tokens.size() * kv_dim);
      v.emplace_back(tokens.size() * kv_dim);
      for (std::size_t t = 0; t < tokens.size(); ++t)
        for (int d = 0; d < kv_dim; ++d) {
          k[l][t * kv_dim + d] = l * 1e4f + t + 0.1f * d + salt;
          v[l][t * kv_dim + d] = -(l * 1e4f + tokens[t] + 0.1f * d) - salt;
        }
    }
  }
  std::vector<const float*> kp() const { return {k[0].data(), k[1].data()}; }
  std::vector<const float*> vp() const { return {v[0].data(), v[1].data()}; }
};

float stored_k(const KVBlockStore::Prefix& p, int layer, int t, int d, int B = 16, int kvd = 4) {
  const KVBlock& b = *p.blocks[t / B];
  return b.data[(2 * layer) * B * kvd + (t % B) * kvd + d];
}

TEST(KVBlockStore, LongestPrefixAtTokenGranularity) {
  KVBlockStore store({2, 4, 16}, 1 << 20);
  const auto a = random_tokens(100, 7);
  const FakeKV kv(a);
  ASSERT_TRUE(store.insert("", a, kv.kp(), kv.vp(), false, 0.0));
  auto b = a;
  b[37] = 12345;  // shares 37 tokens: 2 full blocks and 5 rows of the third
  const auto p = store.longest_prefix("", b);
  EXPECT_EQ(p.length, 37);
  ASSERT_EQ(p.blocks.size(), 3u);
  EXPECT_FALSE(p.approximate);
  for (int t = 0; t < 37; ++t) EXPECT_EQ(stored_k(p, 1, t, 2), kv.k[1][t * 4 + 2]);
  EXPECT_EQ(store.longest_prefix("", a).length, 100);  // the partial tail block too
  EXPECT_EQ(store.longest_prefix("other", a).length, 0);  // namespaces never mix
}

TEST(KVBlockStore, SharedPrefixesShareBlocksAndEvictLeastRecentlyUsed) {
  const auto base = random_tokens(64, 8);
  const std::size_t block_bytes = 2 * 2 * 16 * 4 * sizeof(float) + 16 * sizeof(int);
  // A record costs its tokens and its donor index (73 8-grams of 80 tokens).
  const std::size_t record_bytes = 80 * sizeof(int) + index_anchors(random_tokens(80, 0)).bytes();
  const std::size_t budget = 10 * block_bytes + 3 * record_bytes;
  KVBlockStore store({2, 4, 16}, budget);
  auto x = base, y = base;
  x.insert(x.end(), {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16});
  y.insert(y.end(), {21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36});
  ASSERT_TRUE(store.insert("", x, FakeKV(x).kp(), FakeKV(x).vp(), false, 0));
  const std::size_t one = store.bytes();
  ASSERT_TRUE(store.insert("", y, FakeKV(y).kp(), FakeKV(y).vp(), false, 0));
  EXPECT_EQ(store.bytes() - one, block_bytes + record_bytes);  // 4 blocks shared
  // A third, unrelated request pushes the least recently used record out.
  EXPECT_EQ(store.longest_prefix("", x).length, 80);  // touch x
  const auto z = random_tokens(80, 9);
  ASSERT_TRUE(store.insert("", z, FakeKV(z).kp(), FakeKV(z).vp(), false, 0));
  EXPECT_LE(store.bytes(), budget);
  EXPECT_EQ(store.evictions(), 1u);
  EXPECT_EQ(store.longest_prefix("", x).length, 80);
  EXPECT_EQ(store.longest_prefix("", y).length, 64);  // its own last block went with it
  // A request larger than the whole budget is refused, nothing changes.
  const auto huge = random_tokens(2000, 10);
  const std::size_t before = store.bytes();
  EXPECT_FALSE(store.insert("", huge, FakeKV(huge).kp(), FakeKV(huge).vp(), false, 0));
  EXPECT_EQ(store.bytes(), before);
}

TEST(KVBlockStore, ExactBlocksReplaceApproximateOnesAndOnlyExactRecordsAreDonors) {
  KVBlockStore store({2, 4, 16}, 1 << 20);
  const auto a = random_tokens(40, 11);
  const FakeKV approx(a, 0.5f), exact(a);
  ASSERT_TRUE(store.insert("ns", a, approx.kp(), approx.vp(), true, 0.01));
  auto p = store.longest_prefix("ns", a);
  EXPECT_TRUE(p.approximate);
  EXPECT_DOUBLE_EQ(p.error, 0.01);
  EXPECT_TRUE(store.similar("ns", a, 4).empty());
  ASSERT_TRUE(store.insert("ns", a, exact.kp(), exact.vp(), false, 0.0));
  p = store.longest_prefix("ns", a);
  EXPECT_FALSE(p.approximate);
  EXPECT_EQ(stored_k(p, 0, 5, 1), exact.k[0][5 * 4 + 1]);
  const auto donors = store.similar("ns", a, 4);
  ASSERT_EQ(donors.size(), 1u);
  EXPECT_EQ(donors[0].record->tokens, a);
  EXPECT_NEAR(donors[0].similarity, 1.0f, 1e-5);
  EXPECT_TRUE(store.similar("", a, 4).empty());
}

TEST(KVBlockStore, ClearOfANamespaceDropsOnlyItsRecordsAndBlocks) {
  KVBlockStore store({2, 4, 16}, 1 << 20);
  const auto a = random_tokens(40, 14), b = random_tokens(50, 15);
  ASSERT_TRUE(store.insert("tenant-a", a, FakeKV(a).kp(), FakeKV(a).vp(), false, 0.0));
  ASSERT_TRUE(store.insert("tenant-a", b, FakeKV(b).kp(), FakeKV(b).vp(), false, 0.0));
  const std::size_t a_bytes = store.bytes();
  ASSERT_TRUE(store.insert("tenant-b", a, FakeKV(a).kp(), FakeKV(a).vp(), false, 0.0));  // same tokens
  const std::size_t b_bytes = store.bytes() - a_bytes;

  store.clear("tenant-a");
  EXPECT_EQ(store.size(), 1u);
  EXPECT_EQ(store.bytes(), b_bytes);  // every block of tenant-a went, none of tenant-b's
  EXPECT_EQ(store.longest_prefix("tenant-a", a).length, 0);
  EXPECT_TRUE(store.similar("tenant-a", a, 4).empty());
  EXPECT_EQ(store.longest_prefix("tenant-b", a).length, 40);
  EXPECT_EQ(store.similar("tenant-b", a, 4).size(), 1u);
  store.clear("tenant-b");
  EXPECT_EQ(store.size(), 0u);
  EXPECT_EQ(store.bytes(), 0u);
}

TEST(TokenProfile, SimilarRequestsScoreHigherThanUnrelatedOnes) {
  const auto a = random_tokens(400, 12);
  auto near = a;
  near[10] = 1, near[200] = 2;
  const auto far = random_tokens(400, 13);
  auto cosine = [](const std::vector<float>& x, const std::vector<float>& y) {
    return std::inner_product(x.begin(), x.end(), y.begin(), 0.0);
  };
  const auto ka = token_profile(a);
  EXPECT_GT(cosine(ka, token_profile(near)), 0.95);
  EXPECT_LT(cosine(ka, token_profile(far)), 0.4);
}

}  // namespace
}  // namespace attention_echo::serving
