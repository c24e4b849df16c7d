// Memory: an entry in use survives its eviction (calls hold its payload,
// not the entry), and an entry larger than max_bytes on its own is computed,
// served and counted, never stored.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "cache/entry_store.hpp"
#include "cache_fixtures.hpp"

namespace attention_echo {
namespace {

using testing::call;
using testing::make_qkv;
using testing::Qkv;
using testing::request_for;

constexpr int kH = 4, kHkv = 2, kT = 128, kD = 64, kP = 96;

std::vector<float> exact_output(const Qkv& x) {
  std::vector<float> out(x.q.size());
  ThreadPool pool(1);
  attention(x.qv(), x.kv(), x.vv(), MutableHeadsView::contiguous(out.data(), x.heads, x.tokens, x.dim), {}, pool);
  return out;
}

struct BigPart final : cache::TierPayload {
  std::vector<float> data = std::vector<float>(1000, 1.5f);
  std::size_t bytes() const override { return data.size() * sizeof(float); }
};

cache::Entry entry_with_tokens(std::int32_t first, Device device = Device::cpu()) {
  cache::Entry e;
  e.space = {"", -1, 1, 1, 8, true, device};
  e.tokens = {first, first + 1};
  auto payload = std::make_shared<cache::Payload>();
  payload->prefix = 2;
  payload->parts.emplace_back(Tier::kExact, std::make_unique<BigPart>());
  e.payload = std::move(payload);
  return e;
}

TEST(Memory, APayloadHeldByACallOutlivesTheEvictionOfItsEntry) {
  cache::EntryStore store(EvictionPolicy::kLru, 1, std::size_t{1} << 20, std::size_t{1} << 20);
  store.insert(entry_with_tokens(1));
  const std::int32_t tokens[] = {1, 2};
  const cache::Entry* found = store.find_exact({"", -1, 1, 1, 8, true}, tokens);
  ASSERT_NE(found, nullptr);
  const std::shared_ptr<const cache::Payload> held = found->payload;  // what a call keeps
  EXPECT_EQ(store.insert(entry_with_tokens(7)), 1);                    // evicts it
  EXPECT_EQ(store.find_exact({"", -1, 1, 1, 8, true}, tokens), nullptr);
  ASSERT_EQ(held.use_count(), 1);  // the store let go; the call's copy is the last
  const auto* part = dynamic_cast<const BigPart*>(held->find(Tier::kExact));
  ASSERT_NE(part, nullptr);
  EXPECT_EQ(part->data[999], 1.5f);  // still readable (ASan would catch a free)
}

// A CUDA entry's payload counts against that device's budget only, and a
// full device evicts entries on that device, not host entries (bookkeeping
// only: no GPU needed).
TEST(Memory, DevicePayloadsHaveTheirOwnBudgetPerDevice) {
  const std::size_t part = BigPart{}.bytes(), tokens = 2 * sizeof(std::int32_t);
  cache::EntryStore store(EvictionPolicy::kLru, 100, 10 * (part + tokens), 2 * part);
  ASSERT_EQ(store.insert(entry_with_tokens(1)), 0);                    // host
  ASSERT_EQ(store.insert(entry_with_tokens(3, Device::cuda(0))), 0);   // device 0
  ASSERT_EQ(store.insert(entry_with_tokens(5, Device::cuda(0))), 0);   // device 0 full now
  ASSERT_EQ(store.insert(entry_with_tokens(7, Device::cuda(1))), 0);   // another device: room
  EXPECT_EQ(store.bytes(), 4 * (part + tokens));
  EXPECT_EQ(store.insert(entry_with_tokens(9, Device::cuda(0))), 1);   // evicts device 0's oldest
  const std::int32_t host[] = {1, 2}, oldest[] = {3, 4}, newer[] = {5, 6};
  EXPECT_NE(store.find_exact({"", -1, 1, 1, 8, true}, host), nullptr);  // the older host entry stays
  EXPECT_EQ(store.find_exact({"", -1, 1, 1, 8, true, Device::cuda(0)}, oldest), nullptr);
  EXPECT_NE(store.find_exact({"", -1, 1, 1, 8, true, Device::cuda(0)}, newer), nullptr);
  EXPECT_EQ(store.find_exact({"", -1, 1, 1, 8, true, Device::cuda(1)}, newer), nullptr);  // spaces differ by device
  EXPECT_EQ(store.insert(entry_with_tokens(11, Device::cuda(0)), [](const cache::Entry&) {}), 1);
  cache::EntryStore tiny(EvictionPolicy::kLru, 100, 1 << 20, part - 1);
  EXPECT_EQ(tiny.insert(entry_with_tokens(1, Device::cuda(0))), -1);  // larger than the device budget alone
  EXPECT_EQ(tiny.insert(entry_with_tokens(1)), 0);                    // the host's budget is separate
}

// Two threads, capacity 1: every call evicts the entry the other thread may
// be serving from at that moment. Every output stays exact (exact tier:
// bit-identical), under ASan no use after free, under TSan no race.
TEST(Memory, EntriesInUseSurviveConcurrentEviction) {
  EchoConfig c;
  c.mode = EchoMode::kOff;
  c.capacity = 1;
  c.threads = 1;
  AttentionEchoCache cache(c);
  std::vector<Qkv> inputs = {make_qkv(kH, kHkv, kT, kD, 1), make_qkv(kH, kHkv, kT, kD, 2)};
  std::vector<std::vector<float>> exact = {exact_output(inputs[0]), exact_output(inputs[1])};
  std::atomic<int> wrong{0}, hits{0};
  auto worker = [&](int which) {
    Qkv x = inputs[which];
    for (int i = 0; i < 60; ++i) {
      const EchoResult r = call(cache, x, request_for(x, kP, true));
      hits += r.echo_hit;
      wrong += x.out != exact[which];
    }
  };
  std::thread a(worker, 0), b(worker, 1);
  a.join();
  b.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(cache.stats().evictions, 0u);
  EXPECT_LE(cache.size(), 1u);
  EXPECT_EQ(cache.stats().hits() + cache.stats().misses, cache.stats().lookups);
}

TEST(Memory, AnEntryLargerThanTheBudgetIsComputedCountedAndNotStored) {
  EchoConfig c;
  c.mode = EchoMode::kSparse;
  c.block_size = 32;
  c.threads = 1;
  c.max_bytes = 4096;  // far below one entry (~100 KB)
  AttentionEchoCache cache(c);
  Qkv x = make_qkv(kH, kHkv, kT, kD, 3);
  EchoRequest r = request_for(x, kP, true);
  r.name_space = "big";
  for (int i = 0; i < 3; ++i) {
    const EchoResult result = call(cache, x, r);
    EXPECT_FALSE(result.echo_hit);
    EXPECT_EQ(x.out, exact_output(x));
  }
  const CacheStats s = cache.stats();
  EXPECT_EQ(s.oversize_skipped, 3u);
  EXPECT_EQ(cache.stats("big").oversize_skipped, 3u);
  EXPECT_EQ(s.entries, 0u);
  EXPECT_EQ(s.bytes, 0u);
  EXPECT_EQ(s.misses, 3u);
  EXPECT_EQ(s.evictions, 0u);  // nothing else was pushed out for it
}

}  // namespace
}  // namespace attention_echo
