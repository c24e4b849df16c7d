// The serving module's data structures: token alignment (the KV-blend
// tier's donor map) and the block-hashed K/V store.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "serving/cost_model.hpp"
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

// `count` random 64-token passages, concatenated in any order.
struct Passages {
  std::vector<std::vector<int>> text;
  Passages(int count, std::uint64_t seed) {
    for (int i = 0; i < count; ++i) text.push_back(random_tokens(64, seed + i));
  }
  std::vector<int> concat(std::initializer_list<int> order) const {
    std::vector<int> out;
    for (int i : order) out.insert(out.end(), text[i].begin(), text[i].end());
    return out;
  }
};

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
  const Passages p(4, 10);
  const auto donor = p.concat({0, 1, 2, 3}), req = p.concat({2, 0, 3, 1});
  const auto a = align_tokens(req, donor);
  expect_consistent(a, req, donor);
  EXPECT_EQ(a.aligned, 256);
  EXPECT_EQ(a.donor_position[0], 128);   // C's first token
  EXPECT_EQ(a.donor_position[64], 0);    // A's
  EXPECT_EQ(a.donor_position[255], 127); // B's last
}

// Edits shift text by a few tokens; moved passages, or a long insertion,
// move it.
TEST(TokenAlignment, MovesTextTellsMovedPassagesFromEdits) {
  const auto donor = random_tokens(300, 4);
  EXPECT_FALSE(moves_text(align_tokens(donor, donor)));
  auto edited = donor;
  edited[100] = 9999;
  edited.insert(edited.begin() + 150, {7001, 7002, 7003});
  edited.erase(edited.begin() + 200, edited.begin() + 210);
  EXPECT_FALSE(moves_text(align_tokens(edited, donor)));
  auto long_insertion = donor;
  const auto other = random_tokens(100, 5, 400);
  long_insertion.insert(long_insertion.begin() + 150, other.begin(), other.end());
  EXPECT_TRUE(moves_text(align_tokens(long_insertion, donor)));
  EXPECT_FALSE(moves_text(align_tokens(long_insertion, donor), 100));
  const Passages p(4, 10);
  EXPECT_TRUE(moves_text(align_tokens(p.concat({2, 0, 3, 1}), p.concat({0, 1, 2, 3}))));
}

// The alignment's definition by brute force: a run continues while tokens
// match; a broken run restarts at the donor position whose next `anchor`
// tokens match, nearest to the last run's offset (the lower position on a
// tie), taking the matching tokens just before it too.
std::vector<int> brute_force_alignment(const std::vector<int>& req, const std::vector<int>& donor, int anchor) {
  const int T = static_cast<int>(req.size()), Td = static_cast<int>(donor.size());
  std::vector<int> pos(T, -1);
  int offset = 0;
  for (int i = 0; i < T;) {
    if (i > 0 && pos[i - 1] >= 0 && pos[i - 1] + 1 < Td && donor[pos[i - 1] + 1] == req[i]) {
      pos[i] = pos[i - 1] + 1;
      ++i;
      continue;
    }
    int best = -1;
    for (int j = 0; i + anchor <= T && j + anchor <= Td; ++j)
      if (std::equal(req.begin() + i, req.begin() + i + anchor, donor.begin() + j) &&
          (best < 0 || std::abs(j - i - offset) < std::abs(best - i - offset)))
        best = j;
    if (best < 0) {
      ++i;
      continue;
    }
    offset = best - i;
    for (int b = i - 1, j = best - 1; b >= 0 && j >= 0 && pos[b] < 0 && req[b] == donor[j]; --b, --j) pos[b] = j;
    for (int n = 0; n < anchor; ++n) pos[i + n] = best + n;
    i += anchor;
  }
  return pos;
}

TEST(TokenAlignment, MatchesTheBruteForceDefinition) {
  // Small vocabularies repeat k-grams (many candidates per anchor, filter
  // false positives); edits of every kind, chunks moved, a fresh tail.
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 60; ++trial) {
    const int vocab = trial % 3 == 0 ? 3 : trial % 3 == 1 ? 8 : 500;
    const auto donor = random_tokens(150 + static_cast<int>(rng() % 200), 1000 + trial, vocab);
    std::vector<int> req = donor;
    for (int e = 0; e < 6; ++e) {
      const std::size_t at = rng() % req.size();
      switch (rng() % 4) {
        case 0: req[at] = static_cast<int>(rng() % vocab); break;
        case 1: req.insert(req.begin() + at, static_cast<int>(rng() % vocab)); break;
        case 2: if (req.size() > 20) req.erase(req.begin() + at); break;
        default: std::rotate(req.begin(), req.begin() + at, req.end());
      }
    }
    const auto tail = random_tokens(32, 5000 + trial, vocab);
    req.insert(req.end(), tail.begin(), tail.end());
    for (int anchor : {4, 8}) {
      const TokenAlignment a = align_tokens(req, donor, anchor);
      EXPECT_EQ(a.donor_position, brute_force_alignment(req, donor, anchor)) << "trial " << trial;
      expect_consistent(a, req, donor);
    }
  }
}

// Request A B C D against donors A B Y and Z B C D: A and B from the
// first (B follows A there, as in the request), C and D from the second,
// the only one holding them.
TEST(TokenAlignment, MergedTakesEachTokenFromTheLongestSharedRun) {
  const Passages p(6, 300);
  const auto req = p.concat({0, 1, 2, 3}), first = p.concat({0, 1, 4}), second = p.concat({5, 1, 2, 3});
  const std::vector<std::vector<AlignedRun>> per_donor = {align_runs(req, first), align_runs(req, second)};
  const TokenAlignment m = merge_alignments(per_donor, 256);
  EXPECT_EQ(m.aligned, 256);
  for (int i = 0; i < 256; ++i) {
    ASSERT_EQ(m.donor[i], i < 128 ? 0 : 1) << "token " << i;
    EXPECT_EQ(m.donor_position[i], i) << "token " << i;
  }
  EXPECT_EQ(m.exact_prefix, 256);
  // Equal runs: the first donor, and no switching on a tie.
  const std::vector<std::vector<AlignedRun>> twice = {align_runs(req, req), align_runs(req, req)};
  const TokenAlignment same = merge_alignments(twice, 256);
  EXPECT_TRUE(std::all_of(same.donor.begin(), same.donor.end(), [](int d) { return d == 0; }));
  // A run shorter than min_run is not taken: 40 tokens of B alone.
  std::vector<int> piece = p.concat({5});
  std::copy(p.text[1].begin(), p.text[1].begin() + 40, piece.begin() + 10);
  const std::vector<std::vector<AlignedRun>> short_run = {align_runs(piece, first)};
  EXPECT_EQ(to_alignment(short_run.front(), 64).aligned, 40);
  EXPECT_EQ(merge_alignments(short_run, 64).aligned, 0);
  EXPECT_EQ(merge_alignments(short_run, 64, 40).aligned, 40);
  EXPECT_THROW(merge_alignments({}, 64), std::invalid_argument);
  EXPECT_THROW(merge_alignments(short_run, 64, 0), std::invalid_argument);
  // Runs past the request, overlapping, empty or out of order.
  EXPECT_THROW(merge_alignments(short_run, 49), std::invalid_argument);
  for (const std::vector<AlignedRun>& bad : {std::vector<AlignedRun>{{0, 10, 0}, {5, 20, 30}},
                                             std::vector<AlignedRun>{{4, 4, 0}},
                                             std::vector<AlignedRun>{{20, 30, 0}, {0, 10, 0}},
                                             std::vector<AlignedRun>{{0, 10, -1}}})
    EXPECT_THROW(merge_alignments(std::vector<std::vector<AlignedRun>>{bad}, 64), std::invalid_argument);
  EXPECT_THROW(merge_alignments(short_run, -1), std::invalid_argument);
  EXPECT_THROW(to_alignment(short_run.front(), 49), std::invalid_argument);
}

// The runs are the alignment's: to_alignment of align_runs is align_tokens,
// and two runs never join at one offset (the first would have gone on).
TEST(TokenAlignment, RunsAreTheAlignmentsRuns) {
  const Passages p(5, 40);
  const auto donor = p.concat({0, 1, 2, 3}), req = p.concat({2, 3, 0, 4, 1});
  const std::vector<AlignedRun> runs = align_runs(req, donor);
  EXPECT_EQ(to_alignment(runs, static_cast<int>(req.size())).donor_position, align_tokens(req, donor).donor_position);
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_EQ(runs[0], (AlignedRun{0, 128, 128}));
  EXPECT_EQ(runs[1], (AlignedRun{128, 192, 0}));
  EXPECT_EQ(runs[2], (AlignedRun{256, 320, 64}));
  for (std::size_t r = 1; r < runs.size(); ++r)
    EXPECT_FALSE(runs[r].start == runs[r - 1].end &&
                 runs[r].donor_start - runs[r].start == runs[r - 1].donor_start - runs[r - 1].start);
}

// The merge's definition by brute force: per token, among the donors
// whose run through it (consecutive donor positions) is at least min_run
// long, the one whose run began earliest, the earlier donor on a tie.
TEST(TokenAlignment, MergeMatchesTheBruteForceDefinition) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    const auto base = random_tokens(300, 700 + trial, 50);
    std::vector<TokenAlignment> per_donor;
    std::vector<std::vector<AlignedRun>> runs;
    for (int d = 0; d < 1 + trial % 4; ++d) {
      std::vector<int> donor = base;
      for (int e = 0; e < 5; ++e) {
        const std::size_t at = rng() % donor.size();
        if (rng() % 2) donor[at] = static_cast<int>(rng() % 50);
        else std::rotate(donor.begin(), donor.begin() + at, donor.end());
      }
      runs.push_back(align_runs(base, donor));
      per_donor.push_back(to_alignment(runs.back(), static_cast<int>(base.size())));
    }
    const int min_run = 1 + trial % 40;
    const TokenAlignment m = merge_alignments(runs, static_cast<int>(base.size()), min_run);
    for (std::size_t i = 0; i < base.size(); ++i) {
      int want = -1;
      std::size_t want_start = 0;
      for (std::size_t d = 0; d < per_donor.size(); ++d) {
        const auto& pos = per_donor[d].donor_position;
        if (pos[i] < 0) continue;
        std::size_t start = i, end = i + 1;
        while (start > 0 && pos[start - 1] >= 0 && pos[start - 1] + 1 == pos[start]) --start;
        while (end < pos.size() && pos[end] >= 0 && pos[end] == pos[end - 1] + 1) ++end;
        if (static_cast<int>(end - start) < min_run) continue;
        if (want < 0 || start < want_start) want = static_cast<int>(d), want_start = start;
      }
      ASSERT_EQ(m.donor_position[i], want < 0 ? -1 : per_donor[want].donor_position[i])
          << "trial " << trial << " token " << i;
      if (want >= 0) ASSERT_EQ(m.donor[i], want) << "trial " << trial << " token " << i;
    }
  }
}

TEST(TokenAlignment, UnrelatedTokensDoNotAlign) {
  const auto a = align_tokens(random_tokens(200, 5), random_tokens(200, 6));
  EXPECT_LT(a.aligned, 8);
  EXPECT_THROW(align_tokens(random_tokens(5, 1), random_tokens(5, 1), 0), std::invalid_argument);
}

TEST(TokenAlignment, KgramsOfAnotherRequestOrAnchorAreRefused) {
  const auto request = random_tokens(100, 1), donor = random_tokens(100, 2);
  const TokenAnchors anchors = index_anchors(donor);
  EXPECT_EQ(align_tokens(request, request_kgrams(request), donor, anchors).donor_position,
            align_tokens(request, donor).donor_position);
  EXPECT_THROW(align_tokens(request, request_kgrams(request, 4), donor, anchors), std::invalid_argument);
  EXPECT_THROW(align_tokens(request, request_kgrams(random_tokens(90, 1)), donor, anchors), std::invalid_argument);
  EXPECT_THROW(request_kgrams(request, 0), std::invalid_argument);
}

// The anchor filter never hides a k-gram the donor holds and lets few of
// those it lacks through to the binary search (a single bit per k-gram let
// 6% through).
TEST(TokenAlignment, AnchorFilterHasNoFalseNegativesAndFewFalsePositives) {
  const auto donor = random_tokens(4000, 21, 1 << 20);
  const TokenAnchors anchors = index_anchors(donor);
  for (const auto& [hash, at] : anchors.sorted) ASSERT_TRUE(anchors.may_hold(hash)) << "k-gram at " << at;
  const RequestKgrams other = request_kgrams(random_tokens(20000, 22, 1 << 20));
  const auto passed = std::count_if(other.hashes.begin(), other.hashes.end(),
                                    [&](std::uint64_t h) { return anchors.may_hold(h); });
  EXPECT_LT(static_cast<double>(passed) / static_cast<double>(other.hashes.size()), 0.02);
}

// A request's K/V as the engine leaves it, in pages of the test store's
// shape (2 layers, kv_dim 4, 64 tokens): K of layer l, row t, element d is
// l * 1e4 + t + 0.1 d + salt; V depends on the token id instead.
llama::KVState fake_kv(const std::vector<int>& tokens, float salt = 0.0f) {
  llama::KVState kv;
  const int T = static_cast<int>(tokens.size());
  kv.make_writable(0, T, 2, 4);
  for (int l = 0; l < 2; ++l)
    for (int t = 0; t < T; ++t)
      for (int d = 0; d < 4; ++d) {
        kv.writable_k(l, t)[d] = l * 1e4f + t + 0.1f * d + salt;
        kv.writable_v(l, t)[d] = -(l * 1e4f + tokens[t] + 0.1f * d) - salt;
      }
  kv.length = T;
  return kv;
}

constexpr KVBlockStore::Shape kShape{2, 4, 64};

TEST(KVBlockStore, LongestPrefixAtTokenGranularity) {
  KVBlockStore store(kShape, 1 << 22);
  const auto a = random_tokens(400, 7);
  const llama::KVState kv = fake_kv(a);
  ASSERT_TRUE(store.insert("", a, kv, false, 0.0));
  auto b = a;
  b[148] = 12345;  // shares 148 tokens: 2 full blocks and 20 rows of the third
  const auto p = store.longest_prefix("", b);
  EXPECT_EQ(p.length, 148);
  ASSERT_EQ(p.blocks.size(), 3u);
  EXPECT_FALSE(p.approximate);
  const llama::KVState stored = store.state(p.blocks, p.length);
  for (int t = 0; t < 148; ++t) EXPECT_EQ(stored.k(1, t)[2], kv.k(1, t)[2]);
  EXPECT_EQ(store.longest_prefix("", a).length, 400);  // the partial tail block too
  EXPECT_EQ(store.longest_prefix("other", a).length, 0);  // namespaces never mix
}

TEST(KVBlockStore, InsertKeepsTheStatesPagesAndStateSharesThem) {
  KVBlockStore store(kShape, 1 << 22);
  const auto a = random_tokens(150, 16);  // 2 full blocks and a partial one
  llama::KVState kv = fake_kv(a);
  ASSERT_TRUE(store.insert("", a, kv, false, 0.0));
  const auto p = store.longest_prefix("", a);
  ASSERT_EQ(p.blocks.size(), 3u);
  for (std::size_t b = 0; b < 3; ++b) EXPECT_EQ(p.blocks[b].get(), kv.pages[b].get()) << "block " << b;
  const llama::KVState shared = store.state(p.blocks, 100);
  EXPECT_EQ(shared.pages.size(), 2u);
  EXPECT_EQ(shared.pages[1].get(), kv.pages[1].get());
  // The sequence goes on: the stored partial block is copied before the
  // engine writes past it; the full ones stay shared.
  const float before = p.blocks[2]->data[22 * 4];  // layer 0's K, row 150
  kv.make_writable(150, 160, 2, 4);
  kv.writable_k(0, 150)[0] = before + 1.0f;
  EXPECT_NE(kv.pages[2].get(), p.blocks[2].get());
  EXPECT_EQ(p.blocks[2]->data[22 * 4], before);
  EXPECT_EQ(kv.k(0, 150)[0], before + 1.0f);
  EXPECT_EQ(kv.pages[1].get(), p.blocks[1].get());
  EXPECT_EQ(kv.k(0, 140)[3], p.blocks[2]->data[12 * 4 + 3]);  // copied rows kept
  // Pages of another shape are refused, nothing stored.
  llama::KVState other = fake_kv(a);
  other.page_tokens = 128;
  EXPECT_THROW(store.insert("x", a, other, false, 0.0), std::invalid_argument);
  EXPECT_THROW(store.insert("x", a, kv.prefix(100), false, 0.0), std::invalid_argument);
  EXPECT_EQ(store.size(), 1u);
}

TEST(KVBlockStore, SharedPrefixesShareBlocksAndEvictLeastRecentlyUsed) {
  const auto base = random_tokens(256, 8);
  const std::size_t block_bytes = 2 * 2 * 64 * 4 * sizeof(float) + 64 * sizeof(int);
  // A record costs its tokens and its donor index (the 8-grams of 320 tokens).
  const std::size_t record_bytes = 320 * sizeof(int) + index_anchors(random_tokens(320, 0)).bytes();
  const std::size_t budget = 10 * block_bytes + 3 * record_bytes;
  KVBlockStore store(kShape, budget);
  auto x = base, y = base;
  for (int i = 0; i < 64; ++i) x.push_back(1 + i), y.push_back(101 + i);
  ASSERT_TRUE(store.insert("", x, fake_kv(x), false, 0));
  const std::size_t one = store.bytes();
  ASSERT_TRUE(store.insert("", y, fake_kv(y), false, 0));
  EXPECT_EQ(store.bytes() - one, block_bytes + record_bytes);  // 4 blocks shared
  // A third, unrelated request pushes the least recently used record out.
  EXPECT_EQ(store.longest_prefix("", x).length, 320);  // touch x
  const auto z = random_tokens(320, 9);
  ASSERT_TRUE(store.insert("", z, fake_kv(z), false, 0));
  EXPECT_LE(store.bytes(), budget);
  EXPECT_EQ(store.evictions(), 1u);
  EXPECT_EQ(store.longest_prefix("", x).length, 320);
  EXPECT_EQ(store.longest_prefix("", y).length, 256);  // its own last block went with it
  // A request larger than the whole budget is refused, nothing changes.
  const auto huge = random_tokens(2000, 10);
  const std::size_t before = store.bytes();
  EXPECT_FALSE(store.insert("", huge, fake_kv(huge), false, 0));
  EXPECT_EQ(store.bytes(), before);
}

TEST(KVBlockStore, ExactBlocksReplaceApproximateOnesAndOnlyExactRecordsAreDonors) {
  KVBlockStore store(kShape, 1 << 22);
  const auto a = random_tokens(40, 11);
  ASSERT_TRUE(store.insert("ns", a, fake_kv(a, 0.5f), true, 0.01));
  auto p = store.longest_prefix("ns", a);
  EXPECT_TRUE(p.approximate);
  EXPECT_DOUBLE_EQ(p.error, 0.01);
  EXPECT_TRUE(store.similar("ns", a, 4).empty());
  const llama::KVState exact = fake_kv(a);
  ASSERT_TRUE(store.insert("ns", a, exact, false, 0.0));
  p = store.longest_prefix("ns", a);
  EXPECT_FALSE(p.approximate);
  EXPECT_EQ(store.state(p.blocks, p.length).k(0, 5)[1], exact.k(0, 5)[1]);
  const auto donors = store.similar("ns", a, 4);
  ASSERT_EQ(donors.size(), 1u);
  EXPECT_EQ(donors[0].record->tokens, a);
  EXPECT_NEAR(donors[0].similarity, 1.0f, 1e-5);
  EXPECT_TRUE(store.similar("", a, 4).empty());
}

TEST(KVBlockStore, ClearOfANamespaceDropsOnlyItsRecordsAndBlocks) {
  KVBlockStore store(kShape, 1 << 22);
  const auto a = random_tokens(40, 14), b = random_tokens(50, 15);
  ASSERT_TRUE(store.insert("tenant-a", a, fake_kv(a), false, 0.0));
  ASSERT_TRUE(store.insert("tenant-a", b, fake_kv(b), false, 0.0));
  const std::size_t a_bytes = store.bytes();
  ASSERT_TRUE(store.insert("tenant-b", a, fake_kv(a), false, 0.0));  // same tokens
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

// A CostModel whose rates are 1 CPU second per row (no attention).
CostModel rows_at_one_second() {
  CostModel cost(1.0);
  cost.observe(100, 100.0, 0.0);
  return cost;
}

TEST(CostModel, BlendsArePricedByTheirOwnSelectionsMeasuredFactor) {
  CostModel cost = rows_at_one_second();
  const CostModel::BlendShape run_start{400, 0, 100, 4, 0.0, false};
  CostModel::BlendShape deviation = run_start;
  deviation.first_layer_all = true;
  const double modelled_run_start = cost.blend(run_start), modelled_deviation = cost.blend(deviation);
  EXPECT_DOUBLE_EQ(cost.blend(run_start, 1.5), 1.5 * modelled_run_start);  // the prior before any was measured

  cost.observe_blend(run_start, 2.0 * modelled_run_start, 0.0);  // no wall time: its CPU time
  EXPECT_DOUBLE_EQ(cost.blend(run_start, 1.5), 2.0 * modelled_run_start);
  EXPECT_DOUBLE_EQ(cost.blend(deviation, 1.5), 2.0 * modelled_deviation);  // none of its own yet: the other's
  cost.observe_blend(deviation, 1.2 * modelled_deviation, 0.0);
  EXPECT_DOUBLE_EQ(cost.blend(deviation, 1.5), 1.2 * modelled_deviation);
  EXPECT_DOUBLE_EQ(cost.blend(run_start, 1.5), 2.0 * modelled_run_start);
  EXPECT_DOUBLE_EQ(cost.blend_factor(), 1.6);  // both, for calibrate()'s prior
}

TEST(CostModel, ABlendCostsItsWallTimeAtTheCoresExactForwardsKeepBusy) {
  CostModel cost = rows_at_one_second();
  const CostModel::BlendShape shape{400, 0, 100, 4, 0.0, false};
  const double modelled = cost.blend(shape);
  cost.observe_parallelism(20.0, 10.0);  // exact forwards keep two cores busy
  cost.observe_parallelism(-1.0, 5.0);   // not a measurement: ignored
  // The blend's CPU time says as modelled; its wall time says it kept only
  // one core busy, idling the other: twice the price.
  cost.observe_blend(shape, modelled, modelled);
  EXPECT_DOUBLE_EQ(cost.blend(shape), 2.0 * modelled);
}

}  // namespace
}  // namespace attention_echo::serving
