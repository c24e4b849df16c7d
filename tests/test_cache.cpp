// AttentionEchoCache: hit/miss semantics per tier, eviction, budgets,
// isolation, the guard, thread safety, snapshots and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "cache_fixtures.hpp"

namespace attention_echo {
namespace {

using testing::call;
using testing::make_qkv;
using testing::Qkv;
using testing::rel_l2;
using testing::request_for;

constexpr int kH = 4, kHkv = 2, kT = 192, kD = 64, kP = 160;

EchoConfig small_config(EchoMode mode = EchoMode::kSparse) {
  EchoConfig c;
  c.mode = mode;
  c.block_size = 32;
  c.threads = 2;
  c.max_error = 0.1;
  return c;
}

std::vector<float> exact_output(const Qkv& x, bool causal = true, int prefix = 0) {
  std::vector<float> out(x.q.size());
  ThreadPool pool(1);
  AttentionOptions o;
  o.causal = causal;
  o.prefix_length = prefix;
  attention(x.qv(), x.kv(), x.vv(), MutableHeadsView::contiguous(out.data(), x.heads, x.tokens, x.dim), o, pool);
  return out;
}

TEST(Cache, FirstCallMissesAndMatchesExactAttention) {
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 1);
  EchoResult r = call(cache, x, request_for(x, kP));
  EXPECT_FALSE(r.echo_hit);
  EXPECT_EQ(r.compute_mode(), "full");
  EXPECT_EQ(r.tokens_computed, kT);
  EXPECT_EQ(r.tokens_echoed, 0);
  EXPECT_EQ(x.out, exact_output(x));
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_EQ(cache.stats().misses, 1u);
}

TEST(Cache, SimilarPrefixHitsSparseWithMeasuredError) {
  AttentionEchoCache cache(small_config());
  Qkv a = make_qkv(kH, kHkv, kT, kD, 1);
  call(cache, a, request_for(a, kP));
  Qkv b = make_qkv(kH, kHkv, kT, kD, 1, 0.05f);  // near-duplicate
  EchoResult r = call(cache, b, request_for(b, kP));
  ASSERT_TRUE(r.echo_hit);
  EXPECT_EQ(r.tier, Tier::kSparse);
  EXPECT_EQ(r.compute_mode(), "echo");
  EXPECT_GT(r.similarity, 0.85);
  EXPECT_EQ(r.tokens_echoed, kP);
  EXPECT_EQ(r.tokens_computed, kT - kP);
  EXPECT_LT(r.kept_fraction, 1.0);
  EXPECT_LE(r.estimated_error, 0.1);
  // The guard's estimate is a sample; the whole prefix is close too.
  const std::vector<float> exact = exact_output(b);
  EXPECT_LT(rel_l2(b.out, exact), 0.1);
  // Rows past the prefix are always exact.
  for (int h = 0; h < kH; ++h)
    for (int t = kP; t < kT; ++t)
      for (int d = 0; d < kD; ++d) {
        const std::size_t i = (static_cast<std::size_t>(h) * kT + t) * kD + d;
        ASSERT_EQ(b.out[i], exact[i]);
      }
  EXPECT_EQ(cache.stats().hits_sparse, 1u);
}

// Every tile edge the config takes serves a sparse hit within the guard,
// keeping fewer tiles than the causal prefix block has.
TEST(Cache, SparseTierTakesEveryBlockSize) {
  constexpr int kLongT = 640, kLongP = 512;
  for (int block : {32, 64, 128}) {
    EchoConfig c = small_config();
    c.block_size = block;
    AttentionEchoCache cache(c);
    Qkv a = make_qkv(kH, kHkv, kLongT, kD, 3);
    call(cache, a, request_for(a, kLongP));
    Qkv b = make_qkv(kH, kHkv, kLongT, kD, 3, 0.05f);
    const EchoResult r = call(cache, b, request_for(b, kLongP));
    ASSERT_EQ(r.tier, Tier::kSparse) << "block " << block;
    EXPECT_LT(r.kept_fraction, 1.0) << "block " << block;
    EXPECT_LE(r.estimated_error, c.max_error) << "block " << block;
    EXPECT_LT(rel_l2(b.out, exact_output(b)), 0.1) << "block " << block;
  }
}

TEST(Cache, DifferentPrefixMisses) {
  AttentionEchoCache cache(small_config());
  Qkv a = make_qkv(kH, kHkv, kT, kD, 1);
  Qkv b = make_qkv(kH, kHkv, kT, kD, 2);
  call(cache, a, request_for(a, kP));
  EchoResult r = call(cache, b, request_for(b, kP));
  EXPECT_FALSE(r.echo_hit);
  EXPECT_LT(r.similarity, 0.85);
  EXPECT_EQ(cache.size(), 2u);
}

TEST(Cache, ExactTierIsBitIdentical) {
  AttentionEchoCache cache(small_config(EchoMode::kOff));
  Qkv a = make_qkv(kH, kHkv, kT, kD, 3);
  call(cache, a, request_for(a, kP, true));
  const std::vector<float> first = a.out;
  std::fill(a.out.begin(), a.out.end(), -1.0f);
  EchoResult r = call(cache, a, request_for(a, kP, true));
  EXPECT_TRUE(r.echo_hit);
  EXPECT_EQ(r.tier, Tier::kExact);
  EXPECT_EQ(r.compute_mode(), "exact");
  EXPECT_EQ(r.estimated_error, 0.0);
  EXPECT_EQ(a.out, first);
}

// Overflowing logits (q and k up to 1e38, scale 1e38: scores +-inf, and NaN
// where they meet) are garbage in, but the same garbage on a hit: the rows
// after the prefix, computed in blocks that start at another row (and so
// walk other key chunks), are bit-identical to the miss's. Found by
// fuzz_cache_request (this shape: 2 heads over 1 kv head, 68 tokens, dim 2,
// prefix 1), where an exact hit read 0 for rows a miss read as NaN.
TEST(Cache, ExactTierIsBitIdenticalWhenLogitsOverflow) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> exponent(30.0f, 38.0f);
  auto wild = [&] { return (rng() % 2 ? 1.0f : -1.0f) * std::pow(10.0f, exponent(rng)); };
  int overflowing = 0;
  for (int round = 0; round < 50; ++round) {
    EchoConfig config = small_config(EchoMode::kOff);
    config.block_size = 64;
    AttentionEchoCache cache(config);
    Qkv a = make_qkv(2, 1, 68, 2, 100 + round);
    for (std::vector<float>* x : {&a.q, &a.k}) std::generate(x->begin(), x->end(), wild);
    EchoRequest request = request_for(a, 1, true);
    request.scale = 1e38f;
    call(cache, a, request);
    const std::vector<float> first = a.out;
    overflowing += !std::isfinite((a.q[0] * a.k[0] + a.q[1] * a.k[1]) * *request.scale);
    std::fill(a.out.begin(), a.out.end(), -1.0f);
    ASSERT_EQ(call(cache, a, request).tier, Tier::kExact);
    ASSERT_EQ(std::memcmp(a.out.data(), first.data(), first.size() * sizeof(float)), 0) << "round " << round;
  }
  EXPECT_GT(overflowing, 10);  // row 0's logit alone overflowed in that many rounds
}

TEST(Cache, ExactTierMissesWhenKeysDiffer) {
  AttentionEchoCache cache(small_config(EchoMode::kOff));
  Qkv a = make_qkv(kH, kHkv, kT, kD, 3);
  call(cache, a, request_for(a, kP, true));
  Qkv b = a;
  b.k[5] += 1e-3f;  // same tokens, other weights
  EchoResult r = call(cache, b, request_for(b, kP, true));
  EXPECT_FALSE(r.echo_hit);
  EXPECT_EQ(b.out, exact_output(b));
}

TEST(Cache, ExactModeWithoutTokensStoresNothing) {
  AttentionEchoCache cache(small_config(EchoMode::kOff));
  Qkv a = make_qkv(kH, kHkv, kT, kD, 3);
  call(cache, a, request_for(a, kP));
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(cache.stats().misses, 1u);
}

TEST(Cache, DenseTierHitsNearDuplicateAndReportsError) {
  EchoConfig c = small_config(EchoMode::kDense);
  c.max_error = 0.5;
  AttentionEchoCache cache(c);
  Qkv a = make_qkv(kH, kHkv, kT, kD, 4);
  call(cache, a, request_for(a, kP));
  Qkv b = make_qkv(kH, kHkv, kT, kD, 4, 0.02f);
  EchoResult r = call(cache, b, request_for(b, kP));
  ASSERT_TRUE(r.echo_hit);
  EXPECT_EQ(r.tier, Tier::kDense);
  EXPECT_GT(r.estimated_error, 0.0);
  EXPECT_LT(rel_l2(b.out, exact_output(b)), 0.5);
}

TEST(Cache, DenseTierOnIdenticalInputIsExactUpToRounding) {
  AttentionEchoCache cache(small_config(EchoMode::kDense));
  Qkv a = make_qkv(kH, kHkv, kT, kD, 4);
  call(cache, a, request_for(a, kP));
  EchoResult r = call(cache, a, request_for(a, kP));
  ASSERT_EQ(r.tier, Tier::kDense);
  EXPECT_LT(r.estimated_error, 1e-5);
  EXPECT_LT(rel_l2(a.out, exact_output(a)), 1e-5);
}

TEST(Cache, GuardRejectsAdversarialHitAndRecomputes) {
  AttentionEchoCache cache(small_config());
  Qkv a = make_qkv(kH, kHkv, kT, kD, 5);
  call(cache, a, request_for(a, kP));
  // Same embeddings (so the key matches), unrelated q/k/v: the cached
  // support is wrong for this request.
  Qkv b = make_qkv(kH, kHkv, kT, kD, 6);
  b.emb = a.emb;
  for (float& f : b.q) f *= -1.0f;
  EchoResult r = call(cache, b, request_for(b, kP));
  EXPECT_TRUE(r.rejected);
  EXPECT_FALSE(r.echo_hit);
  EXPECT_GT(r.estimated_error, 0.1);
  EXPECT_EQ(r.compute_mode(), "full");
  EXPECT_EQ(b.out, exact_output(b));
  const CacheStats s = cache.stats();
  EXPECT_EQ(s.rejected, 1u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(cache.size(), 1u);  // replaced, not added
}

TEST(Cache, GuardOffReportsUnmeasuredError) {
  EchoConfig c = small_config();
  c.max_error = std::numeric_limits<double>::infinity();
  AttentionEchoCache cache(c);
  Qkv a = make_qkv(kH, kHkv, kT, kD, 5);
  call(cache, a, request_for(a, kP));
  EchoResult r = call(cache, a, request_for(a, kP));
  EXPECT_TRUE(r.echo_hit);
  EXPECT_TRUE(std::isnan(r.estimated_error));
}

TEST(Cache, LruEvictsLeastRecentlyUsed) {
  EchoConfig c = small_config(EchoMode::kOff);
  c.capacity = 2;
  c.eviction_policy = EvictionPolicy::kLru;
  AttentionEchoCache cache(c);
  Qkv a = make_qkv(kH, kHkv, 64, kD, 10), b = make_qkv(kH, kHkv, 64, kD, 11), d = make_qkv(kH, kHkv, 64, kD, 12);
  call(cache, a, request_for(a, 32, true));
  call(cache, b, request_for(b, 32, true));
  EXPECT_TRUE(call(cache, a, request_for(a, 32, true)).echo_hit);  // a is now most recent
  call(cache, d, request_for(d, 32, true));                         // evicts b
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.stats().evictions, 1u);
  EXPECT_TRUE(call(cache, a, request_for(a, 32, true)).echo_hit);
  EXPECT_TRUE(call(cache, d, request_for(d, 32, true)).echo_hit);
  EXPECT_FALSE(call(cache, b, request_for(b, 32, true)).echo_hit);
}

TEST(Cache, LfuEvictsLeastFrequentlyUsed) {
  EchoConfig c = small_config(EchoMode::kOff);
  c.capacity = 2;
  c.eviction_policy = EvictionPolicy::kLfu;
  AttentionEchoCache cache(c);
  Qkv a = make_qkv(kH, kHkv, 64, kD, 10), b = make_qkv(kH, kHkv, 64, kD, 11), d = make_qkv(kH, kHkv, 64, kD, 12);
  call(cache, a, request_for(a, 32, true));
  call(cache, b, request_for(b, 32, true));
  call(cache, a, request_for(a, 32, true));
  call(cache, a, request_for(a, 32, true));
  call(cache, b, request_for(b, 32, true));  // b is most recent, but a is used more
  call(cache, d, request_for(d, 32, true));  // evicts b (2 uses) over a (3 uses)
  EXPECT_TRUE(call(cache, a, request_for(a, 32, true)).echo_hit);
  EXPECT_FALSE(call(cache, b, request_for(b, 32, true)).echo_hit);
}

TEST(Cache, ByteBudgetIsAHardLimit) {
  EchoConfig c = small_config(EchoMode::kOff);
  // One entry: 32 tokens * 4 B + 4 heads * 32 rows * 64 dims * 4 B = 32,896 B.
  c.max_bytes = 70000;
  AttentionEchoCache cache(c);
  for (unsigned seed = 0; seed < 6; ++seed) {
    Qkv x = make_qkv(kH, kHkv, 64, kD, 20 + seed);
    call(cache, x, request_for(x, 32, true));
    EXPECT_LE(cache.stats().bytes, 70000u);
  }
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.stats().evictions, 4u);
}

TEST(Cache, EntryLargerThanBudgetIsNotStored) {
  EchoConfig c = small_config(EchoMode::kOff);
  c.max_bytes = 1000;
  AttentionEchoCache cache(c);
  Qkv x = make_qkv(kH, kHkv, 64, kD, 1);
  EXPECT_FALSE(call(cache, x, request_for(x, 32, true)).echo_hit);
  EXPECT_EQ(cache.size(), 0u);
}

TEST(Cache, PerLayerAndNamespaceIsolation) {
  EchoConfig c = small_config();
  c.per_layer = true;
  AttentionEchoCache cache(c);
  Qkv x = make_qkv(kH, kHkv, kT, kD, 7);
  call(cache, x, request_for(x, kP, false, 0));
  EXPECT_FALSE(call(cache, x, request_for(x, kP, false, 1)).echo_hit);
  EXPECT_TRUE(call(cache, x, request_for(x, kP, false, 0)).echo_hit);
  EchoRequest other = request_for(x, kP, false, 0);
  other.name_space = "tenant-b";
  EXPECT_FALSE(call(cache, x, other).echo_hit);

  EchoConfig shared = small_config();
  shared.per_layer = false;
  AttentionEchoCache one_space(shared);
  call(one_space, x, request_for(x, kP, false, 0));
  EXPECT_TRUE(call(one_space, x, request_for(x, kP, false, 3)).echo_hit);
}

TEST(Cache, HeadShapeIsPartOfTheKeySpace) {
  AttentionEchoCache cache(small_config());
  Qkv a = make_qkv(4, 2, kT, kD, 8), b = make_qkv(4, 4, kT, kD, 8);
  call(cache, a, request_for(a, kP));
  EXPECT_FALSE(call(cache, b, request_for(b, kP)).echo_hit);
}

TEST(Cache, LengthToleranceBoundsEcho) {
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  call(cache, x, request_for(x, 150));
  EchoResult near = call(cache, x, request_for(x, 160));  // within 10%
  EXPECT_TRUE(near.echo_hit);
  EXPECT_EQ(near.tokens_echoed, 150);  // min(p, p_c); rows 150..159 exact
  EXPECT_FALSE(call(cache, x, request_for(x, 100)).echo_hit);
}

TEST(Cache, MaxPrefixLengthCachesLeadingRows) {
  EchoConfig c = small_config(EchoMode::kOff);
  c.max_prefix_length = 64;
  AttentionEchoCache cache(c);
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  call(cache, x, request_for(x, kP, true));
  const std::vector<float> first = x.out;
  EchoResult r = call(cache, x, request_for(x, kP, true));
  EXPECT_EQ(r.tokens_echoed, 64);
  EXPECT_EQ(x.out, first);
}

TEST(Cache, NonCausalPrefixBlockIsCachedExactly) {
  AttentionEchoCache cache(small_config(EchoMode::kOff));
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  EchoRequest r = request_for(x, kP, true);
  r.causal = false;
  call(cache, x, r);
  EXPECT_EQ(x.out, exact_output(x, false, kP));
  std::fill(x.out.begin(), x.out.end(), 0.0f);
  EXPECT_TRUE(call(cache, x, r).echo_hit);
  EXPECT_EQ(x.out, exact_output(x, false, kP));
}

TEST(Cache, ZeroPrefixIsPlainAttention) {
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  EchoRequest r;
  EchoResult res = call(cache, x, r);
  EXPECT_EQ(res.tokens_computed, kT);
  EXPECT_EQ(cache.stats().lookups, 0u);
  EXPECT_EQ(x.out, exact_output(x));
}

TEST(Cache, ClearDropsEntriesAndStats) {
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  call(cache, x, request_for(x, kP));
  cache.clear();
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(cache.stats().lookups, 0u);
  EXPECT_FALSE(call(cache, x, request_for(x, kP)).echo_hit);
}

TEST(Cache, StatsStayConsistentUnderConcurrency) {
  EchoConfig c = small_config();
  c.capacity = 16;
  c.threads = 2;
  AttentionEchoCache cache(c);
  constexpr int kThreads = 8, kCalls = 1000;
  std::atomic<int> with_prefix{0}, hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        const unsigned seed = static_cast<unsigned>((t * 7 + i) % 24);
        Qkv x = make_qkv(2, 1, 40, 16, seed);
        const int prefix = i % 5 == 0 ? 0 : 32;
        EchoResult r = call(cache, x, request_for(x, prefix, i % 2 == 0));
        with_prefix += prefix > 0;
        hits += r.echo_hit;
      }
    });
  for (auto& th : threads) th.join();
  const CacheStats s = cache.stats();
  EXPECT_EQ(s.lookups, static_cast<std::uint64_t>(with_prefix.load()));
  EXPECT_EQ(s.hits() + s.misses, s.lookups);
  EXPECT_EQ(s.hits(), static_cast<std::uint64_t>(hits.load()));
  EXPECT_LE(s.entries, 16u);
  EXPECT_EQ(s.entries, cache.size());
  EXPECT_EQ(s.tokens_echoed + s.tokens_computed, static_cast<std::uint64_t>(kThreads) * kCalls * 40);
}

TEST(Cache, SemanticKeyIsDeterministicUnitNorm) {
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  const std::vector<float> key = cache.compute_semantic_key(x.embeddings(kP));
  ASSERT_EQ(key.size(), 128u);
  double norm = 0;
  for (float f : key) norm += double(f) * f;
  EXPECT_NEAR(norm, 1.0, 1e-6);
  AttentionEchoCache other(small_config());
  EXPECT_EQ(key, other.compute_semantic_key(x.embeddings(kP)));
  // Pin the bytes: a change to the projection or the pooling changes them,
  // which would silently invalidate every stored snapshot.
  std::vector<float> emb(3 * 5);
  for (std::size_t i = 0; i < emb.size(); ++i) emb[i] = static_cast<float>(i % 7) - 2.5f;
  const std::vector<float> pinned = cache.compute_semantic_key({emb.data(), 3, 5});
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (float f : pinned) {
    std::uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    h = (h ^ bits) * 0x100000001b3ULL;
  }
  EXPECT_EQ(h, 729069737138045488ULL) << h;
}

TEST(Cache, SnapshotRoundTripAndCorruption) {
  const std::string path = ::testing::TempDir() + "/ae_snapshot.bin";
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  call(cache, x, request_for(x, kP, true));
  const std::vector<float> first = x.out;
  cache.save(path);

  AttentionEchoCache restored(small_config());
  restored.load(path);
  EXPECT_EQ(restored.size(), 1u);
  EchoResult r = call(restored, x, request_for(x, kP, true));
  EXPECT_EQ(r.tier, Tier::kExact);
  EXPECT_EQ(x.out, first);

  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  bytes[bytes.size() / 2] ^= 0x5a;
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  EXPECT_THROW(restored.load(path), std::runtime_error);
  EXPECT_EQ(restored.size(), 1u);  // unchanged
  std::remove(path.c_str());
}

TEST(Cache, SnapshotRoundTripsEveryTierPayload) {
  const std::string path = ::testing::TempDir() + "/ae_snapshot_tiers.bin";
  for (EchoMode mode : {EchoMode::kSparse, EchoMode::kDense}) {
    AttentionEchoCache cache(small_config(mode));
    Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
    call(cache, x, request_for(x, kP));
    cache.save(path);
    AttentionEchoCache restored(small_config(mode));
    restored.load(path);
    Qkv again = x;
    const EchoResult before = call(cache, x, request_for(x, kP));
    const EchoResult after = call(restored, again, request_for(again, kP));
    EXPECT_EQ(after.tier, mode == EchoMode::kSparse ? Tier::kSparse : Tier::kDense);
    EXPECT_EQ(after.tier, before.tier);
    EXPECT_EQ(again.out, x.out);  // same payload, same bits
  }
  std::remove(path.c_str());
}

TEST(Cache, SnapshotEntriesOverBudgetAreReported) {
  const std::string path = ::testing::TempDir() + "/ae_snapshot_budget.bin";
  AttentionEchoCache cache(small_config(EchoMode::kOff));
  for (unsigned seed = 0; seed < 3; ++seed) {
    Qkv x = make_qkv(kH, kHkv, 64, kD, 30 + seed);
    call(cache, x, request_for(x, 32, true));  // 32,896 B each
  }
  cache.save(path);

  EchoConfig tiny = small_config(EchoMode::kOff);
  tiny.max_bytes = 1000;  // no entry fits on its own
  AttentionEchoCache none_fit(tiny);
  none_fit.load(path);
  EXPECT_EQ(none_fit.size(), 0u);
  EXPECT_EQ(none_fit.stats().snapshot_dropped, 3u);

  EchoConfig small = small_config(EchoMode::kOff);
  small.capacity = 2;  // the oldest entry is evicted to fit
  AttentionEchoCache two_fit(small);
  two_fit.load(path);
  EXPECT_EQ(two_fit.size(), 2u);
  EXPECT_EQ(two_fit.stats().snapshot_dropped, 1u);
  EXPECT_EQ(two_fit.stats().evictions, 0u);  // loading is not serving

  AttentionEchoCache all_fit(small_config(EchoMode::kOff));
  all_fit.load(path);
  EXPECT_EQ(all_fit.size(), 3u);
  EXPECT_EQ(all_fit.stats().snapshot_dropped, 0u);
  std::remove(path.c_str());
}

TEST(Cache, StatsCounterOfEachTier) {
  CacheStats s;
  s.hits_exact = 1;
  s.hits_sparse = 2;
  s.hits_dense = 3;
  s.misses = 4;
  EXPECT_EQ(s.*CacheStats::counter(Tier::kExact), 1u);
  EXPECT_EQ(s.*CacheStats::counter(Tier::kSparse), 2u);
  EXPECT_EQ(s.*CacheStats::counter(Tier::kDense), 3u);
  EXPECT_EQ(s.*CacheStats::counter(Tier::kNone), 4u);
}

// ---- bad input: clear error naming the argument, nothing changes ------------

void expect_rejected(AttentionEchoCache& cache, Qkv& x, const HeadsView& q, const HeadsView& k,
                     const HeadsView& v, const EchoRequest& r, const std::string& name) {
  const CacheStats before = cache.stats();
  const std::size_t size = cache.size();
  const std::vector<float> out = x.out;
  try {
    cache.attention_with_echo(q, k, v, x.ov(), r);
    FAIL() << "expected std::invalid_argument naming " << name;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
  }
  const CacheStats after = cache.stats();
  EXPECT_EQ(after.lookups, before.lookups);
  EXPECT_EQ(after.misses, before.misses);
  EXPECT_EQ(after.tokens_computed, before.tokens_computed);
  EXPECT_EQ(cache.size(), size);
  EXPECT_EQ(x.out, out);
}

TEST(CacheBadInput, EveryCaseThrowsNamingTheArgument) {
  AttentionEchoCache cache(small_config());
  Qkv x = make_qkv(kH, kHkv, kT, kD, 9);
  call(cache, x, request_for(x, kP));  // one entry that must survive
  const EchoRequest ok = request_for(x, kP);

  HeadsView q = x.qv(), k = x.kv(), v = x.vv();
  HeadsView short_k = k;
  short_k.tokens -= 1;
  expect_rejected(cache, x, q, short_k, v, ok, "key");
  HeadsView wide_k = k;
  wide_k.dim = kD / 2;
  expect_rejected(cache, x, q, wide_k, v, ok, "key");
  HeadsView odd_heads = k;
  odd_heads.heads = 3;
  expect_rejected(cache, x, q, odd_heads, v, ok, "key");
  HeadsView bad_v = v;
  bad_v.heads = 1;
  expect_rejected(cache, x, q, k, bad_v, ok, "value");
  HeadsView empty_q = q;
  empty_q.tokens = 0;
  expect_rejected(cache, x, empty_q, k, v, ok, "query");

  EchoRequest r = ok;
  r.prefix_length = -1;
  expect_rejected(cache, x, q, k, v, r, "prefix_length");
  r.prefix_length = kT + 1;
  expect_rejected(cache, x, q, k, v, r, "prefix_length");
  r = ok;
  r.prefix_embeddings = {};
  expect_rejected(cache, x, q, k, v, r, "prefix_embeddings");
  r = ok;
  r.prefix_tokens = std::span<const std::int32_t>(x.tokens_ids.data(), 3);
  expect_rejected(cache, x, q, k, v, r, "prefix_tokens");
  r = ok;
  r.scale = -1.0f;
  expect_rejected(cache, x, q, k, v, r, "scale");
  r = ok;
  r.layer_id = -2;
  expect_rejected(cache, x, q, k, v, r, "layer_id");

  for (auto* buffer : {&x.q, &x.k, &x.v, &x.emb}) {
    for (float poison : {NAN, INFINITY}) {
      const float saved = (*buffer)[7];
      (*buffer)[7] = poison;
      const char* name = buffer == &x.q ? "query" : buffer == &x.k ? "key" : buffer == &x.v ? "value"
                                                                                        : "prefix_embeddings";
      expect_rejected(cache, x, x.qv(), x.kv(), x.vv(), ok, name);
      (*buffer)[7] = saved;
    }
  }
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_TRUE(call(cache, x, ok).echo_hit);
}

// Views the backend cannot read (here: tagged as CUDA memory) are refused
// before the lookup, on both ways of finding an entry: no stats, no entry
// and no recency change, out untouched.
TEST(CacheBadInput, ViewsOnAnotherDeviceChangeNothing) {
  auto on_gpu = [](auto view) {
    view.device = Device::cuda(0);
    return view;
  };
  for (bool by_tokens : {true, false}) {
    EchoConfig c = small_config();
    c.capacity = 2;
    c.eviction_policy = EvictionPolicy::kLru;
    AttentionEchoCache cache(c);
    Qkv a = make_qkv(kH, kHkv, kT, kD, 30), b = make_qkv(kH, kHkv, kT, kD, 31), d = make_qkv(kH, kHkv, kT, kD, 32);
    call(cache, a, request_for(a, kP, by_tokens));
    call(cache, b, request_for(b, kP, by_tokens));  // a is now the least recently used
    const CacheStats before = cache.stats();
    const std::vector<float> out = a.out;
    try {
      cache.attention_with_echo(on_gpu(a.qv()), on_gpu(a.kv()), on_gpu(a.vv()), on_gpu(a.ov()),
                                request_for(a, kP, by_tokens));
      ADD_FAILURE() << "views on cuda:0 were accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("query", 0), 0u) << e.what();
    }
    const CacheStats after = cache.stats();
    EXPECT_EQ(after.lookups, before.lookups);
    EXPECT_EQ(after.hits(), before.hits());
    EXPECT_EQ(after.misses, before.misses);
    EXPECT_EQ(after.tokens_echoed, before.tokens_echoed);
    EXPECT_EQ(after.tokens_computed, before.tokens_computed);
    EXPECT_EQ(after.entries, before.entries);
    EXPECT_EQ(after.bytes, before.bytes);
    EXPECT_EQ(cache.size(), 2u);
    EXPECT_EQ(a.out, out);
    // a was not touched: the next entry evicts it, not b.
    call(cache, d, request_for(d, kP, by_tokens));
    EXPECT_TRUE(call(cache, b, request_for(b, kP, by_tokens)).echo_hit) << "by_tokens=" << by_tokens;
    EXPECT_FALSE(call(cache, a, request_for(a, kP, by_tokens)).echo_hit) << "by_tokens=" << by_tokens;
  }
}

TEST(Config, ValidationNamesTheField) {
  auto rejects = [](auto mutate, const std::string& field) {
    EchoConfig c;
    mutate(c);
    try {
      c.validate();
      ADD_FAILURE() << "expected rejection of " << field;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(field, 0), 0u) << e.what();
    }
  };
  rejects([](EchoConfig& c) { c.capacity = 0; }, "capacity must be positive");
  rejects([](EchoConfig& c) { c.similarity_threshold = 1.5; }, "similarity_threshold must be between 0 and 1");
  rejects([](EchoConfig& c) { c.max_prefix_length = 0; }, "max_prefix_length");
  rejects([](EchoConfig& c) { c.adjustment_strength = -1; }, "adjustment_strength must be between 0 and 1");
  rejects([](EchoConfig& c) { c.adjustment_strength = 1.5; }, "adjustment_strength must be between 0 and 1");
  rejects([](EchoConfig& c) { c.hash_dim = 0; }, "hash_dim");
  rejects([](EchoConfig& c) { c.max_bytes = 0; }, "max_bytes");
  rejects([](EchoConfig& c) { c.max_error = NAN; }, "max_error");
  rejects([](EchoConfig& c) { c.verify_rows = 0; }, "verify_rows");
  rejects([](EchoConfig& c) { c.length_tolerance = 2; }, "length_tolerance");
  rejects([](EchoConfig& c) { c.threads = -1; }, "threads");
  rejects([](EchoConfig& c) { c.sparse_mass = 0; }, "sparse_mass");
  rejects([](EchoConfig& c) { c.block_size = 48; }, "block_size");
  rejects([](EchoConfig& c) { c.block_size = 256; }, "block_size");
  EXPECT_THROW(AttentionEchoCache(EchoConfig{.capacity = -5}), std::invalid_argument);
  EXPECT_THROW(parse_eviction_policy("fifo"), std::invalid_argument);
  EXPECT_THROW(parse_echo_mode("fast"), std::invalid_argument);
}

TEST(Config, ModeOffAcceptsTheOlderNameExact) {
  EXPECT_EQ(parse_echo_mode("off"), EchoMode::kOff);
  EXPECT_EQ(parse_echo_mode("exact"), EchoMode::kOff);
  EXPECT_EQ(to_string(EchoMode::kOff), "off");
  for (EchoMode mode : {EchoMode::kOff, EchoMode::kSparse, EchoMode::kDense})
    EXPECT_EQ(parse_echo_mode(to_string(mode)), mode);
}

TEST(Config, SeedDefaults) {
  EchoConfig c;
  EXPECT_EQ(c.capacity, 1000);
  EXPECT_DOUBLE_EQ(c.similarity_threshold, 0.85);
  EXPECT_EQ(c.max_prefix_length, 2048);
  EXPECT_DOUBLE_EQ(c.adjustment_strength, 0.1);
  EXPECT_TRUE(c.enable_jacobian);
  EXPECT_EQ(c.hash_dim, 128);
  EXPECT_EQ(c.eviction_policy, EvictionPolicy::kLru);
  EXPECT_FALSE(c.per_layer);
}

}  // namespace
}  // namespace attention_echo
