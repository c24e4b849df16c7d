// Tenants: entries never cross namespaces in any tier, per-namespace stats
// sum to the cache-wide ones, and clear(namespace) drops exactly one
// tenant's entries and counters.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "cache_fixtures.hpp"

namespace attention_echo {
namespace {

using testing::call;
using testing::make_qkv;
using testing::Qkv;
using testing::request_for;

constexpr int kH = 4, kHkv = 2, kT = 192, kD = 64, kP = 160;

EchoConfig config_for(EchoMode mode) {
  EchoConfig c;
  c.mode = mode;
  c.block_size = 32;
  c.threads = 2;
  c.max_error = 0.1;
  return c;
}

std::vector<float> exact_output(const Qkv& x) {
  std::vector<float> out(x.q.size());
  ThreadPool pool(1);
  attention(x.qv(), x.kv(), x.vv(), MutableHeadsView::contiguous(out.data(), x.heads, x.tokens, x.dim), {}, pool);
  return out;
}

EchoResult call_in(AttentionEchoCache& cache, Qkv& x, std::string_view name_space, bool tokens) {
  EchoRequest r = request_for(x, kP, tokens);
  r.name_space = name_space;
  return call(cache, x, r);
}

// Every counter, field by field (flops_saved with a tolerance: sums of
// doubles in another order).
void expect_same_counters(const CacheStats& a, const CacheStats& b) {
  EXPECT_EQ(a.lookups, b.lookups);
  EXPECT_EQ(a.hits_exact, b.hits_exact);
  EXPECT_EQ(a.hits_sparse, b.hits_sparse);
  EXPECT_EQ(a.hits_dense, b.hits_dense);
  EXPECT_EQ(a.misses, b.misses);
  EXPECT_EQ(a.rejected, b.rejected);
  EXPECT_EQ(a.evictions, b.evictions);
  EXPECT_EQ(a.entries, b.entries);
  EXPECT_EQ(a.bytes, b.bytes);
  EXPECT_EQ(a.tokens_echoed, b.tokens_echoed);
  EXPECT_EQ(a.tokens_computed, b.tokens_computed);
  EXPECT_EQ(a.snapshot_dropped, b.snapshot_dropped);
  EXPECT_EQ(a.oversize_skipped, b.oversize_skipped);
  EXPECT_NEAR(a.flops_saved, b.flops_saved, 1e-6 * (1.0 + std::abs(a.flops_saved)));
}

CacheStats sum_over_namespaces(const AttentionEchoCache& cache) {
  CacheStats sum;
  for (const std::string& ns : cache.namespaces()) {
    const CacheStats s = cache.stats(ns);
    sum.lookups += s.lookups;
    for (Tier t : {Tier::kNone, Tier::kExact, Tier::kSparse, Tier::kDense})
      sum.*CacheStats::counter(t) += s.*CacheStats::counter(t);
    sum.rejected += s.rejected;
    sum.evictions += s.evictions;
    sum.entries += s.entries;
    sum.bytes += s.bytes;
    sum.tokens_echoed += s.tokens_echoed;
    sum.tokens_computed += s.tokens_computed;
    sum.snapshot_dropped += s.snapshot_dropped;
    sum.oversize_skipped += s.oversize_skipped;
    sum.flops_saved += s.flops_saved;
  }
  return sum;
}

struct TierCase {
  EchoMode mode;
  bool tokens;  // the exact tier matches by tokens
  Tier hit;
};

TEST(Tenants, NoEntryCrossesNamespacesInAnyTier) {
  for (const TierCase& c : {TierCase{EchoMode::kOff, true, Tier::kExact},
                            TierCase{EchoMode::kSparse, false, Tier::kSparse},
                            TierCase{EchoMode::kDense, false, Tier::kDense}}) {
    SCOPED_TRACE(std::string(to_string(c.hit)));
    AttentionEchoCache cache(config_for(c.mode));
    Qkv x = make_qkv(kH, kHkv, kT, kD, 3);
    const std::vector<float> exact = exact_output(x);
    ASSERT_EQ(call_in(cache, x, "tenant-a", c.tokens).tier, Tier::kNone);
    // The same request from another tenant: a miss, computed exactly.
    const EchoResult other = call_in(cache, x, "tenant-b", c.tokens);
    EXPECT_EQ(other.tier, Tier::kNone);
    EXPECT_FALSE(other.echo_hit);
    EXPECT_EQ(x.out, exact);
    // A near-duplicate from a third tenant: a miss too.
    Qkv near = make_qkv(kH, kHkv, kT, kD, 3, 0.01f);
    EXPECT_EQ(call_in(cache, near, "tenant-c", c.tokens).tier, Tier::kNone);
    // Each tenant hits its own entry.
    EXPECT_EQ(call_in(cache, x, "tenant-a", c.tokens).tier, c.hit);
    EXPECT_EQ(call_in(cache, x, "tenant-b", c.tokens).tier, c.hit);
    EXPECT_EQ(cache.stats("tenant-a").*CacheStats::counter(c.hit), 1u);
    EXPECT_EQ(cache.stats("tenant-b").*CacheStats::counter(c.hit), 1u);
    EXPECT_EQ(cache.stats("tenant-c").misses, 1u);
    EXPECT_EQ(cache.stats("tenant-c").hits(), 0u);
  }
}

TEST(Tenants, PerNamespaceStatsSumToTheCacheWideStats) {
  EchoConfig c = config_for(EchoMode::kSparse);
  c.capacity = 4;  // evictions across tenants
  AttentionEchoCache cache(c);
  const std::vector<std::string> tenants = {"", "a", "b"};
  for (unsigned seed = 0; seed < 5; ++seed)
    for (const std::string& ns : tenants) {
      Qkv x = make_qkv(kH, kHkv, kT, kD, 40 + seed / 2);  // each twice: hits
      call_in(cache, x, ns, seed % 2 == 0);
    }
  EXPECT_EQ(cache.namespaces(), tenants);
  const CacheStats total = cache.stats();
  EXPECT_GT(total.evictions, 0u);
  EXPECT_GT(total.hits(), 0u);
  expect_same_counters(sum_over_namespaces(cache), total);
  for (const std::string& ns : tenants) {
    const CacheStats s = cache.stats(ns);
    EXPECT_EQ(s.hits() + s.misses, s.lookups);
  }
  expect_same_counters(cache.stats("never-seen"), CacheStats{});
}

TEST(Tenants, ClearOfANamespaceDropsOnlyItsEntriesAndCounters) {
  AttentionEchoCache cache(config_for(EchoMode::kSparse));
  Qkv x = make_qkv(kH, kHkv, kT, kD, 5), y = make_qkv(kH, kHkv, kT, kD, 6);
  call_in(cache, x, "a", true);
  call_in(cache, y, "a", false);
  call_in(cache, x, "b", true);
  call_in(cache, x, "b", true);
  const CacheStats b_before = cache.stats("b");
  ASSERT_EQ(cache.size(), 3u);

  cache.clear("a");
  EXPECT_EQ(cache.size(), 1u);
  expect_same_counters(cache.stats("a"), CacheStats{});
  expect_same_counters(cache.stats("b"), b_before);
  expect_same_counters(cache.stats(), b_before);  // "a" is gone from the sum
  EXPECT_EQ(cache.namespaces(), std::vector<std::string>{"b"});
  EXPECT_EQ(call_in(cache, x, "a", true).tier, Tier::kNone);  // its entries went
  EXPECT_NE(call_in(cache, x, "b", true).tier, Tier::kNone);  // the other's stayed
  cache.clear("no-such-tenant");                             // a no-op
  EXPECT_EQ(cache.size(), 2u);
}

TEST(Tenants, EvictionsAreCountedToTheVictimsNamespace) {
  EchoConfig c = config_for(EchoMode::kSparse);
  c.capacity = 1;
  AttentionEchoCache cache(c);
  Qkv x = make_qkv(kH, kHkv, kT, kD, 7), y = make_qkv(kH, kHkv, kT, kD, 8);
  call_in(cache, x, "old", false);
  call_in(cache, y, "new", false);  // evicts "old"'s entry
  EXPECT_EQ(cache.stats("old").evictions, 1u);
  EXPECT_EQ(cache.stats("new").evictions, 0u);
  EXPECT_EQ(cache.stats("old").entries, 0u);
  EXPECT_EQ(cache.stats("new").entries, 1u);
  EXPECT_EQ(cache.stats("new").bytes, cache.stats().bytes);
}

}  // namespace
}  // namespace attention_echo
