// The shared L2 store on a real redis-server (tests/redis_server.hpp): the
// URL, write-through and reads by a second cache and a second process, what
// a corrupt value, a stopped server and a killed one do. Skipped when
// redis-server is not installed or the library was built without Redis.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <thread>

#include "attention_echo/cache.hpp"
#include "attention_echo/l2_store.hpp"
#include "cache_fixtures.hpp"
#include "redis_server.hpp"

namespace attention_echo {
namespace {

using testing::call;
using testing::make_qkv;
using testing::Qkv;
using testing::keys_of;
using testing::put_one;
using testing::RedisServer;
using testing::rel_l2;
using testing::request_for;

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

EchoConfig config_for(const std::string& url, EchoMode mode = EchoMode::kOff) {
  EchoConfig c;
  c.threads = 2;
  c.mode = mode;
  c.store_url = url;
  return c;
}

// The output of a request computed with no store at all: the reference
// every request through a store must reproduce.
std::vector<float> computed(Qkv x, const EchoRequest& request) {
  EchoConfig c;
  c.threads = 2;
  AttentionEchoCache plain(c);
  call(plain, x, request);
  return x.out;
}

// ---- the URL ----------------------------------------------------------------

TEST(L2Url, ParsesHostPortAndOptions) {
  const L2Options o = parse_l2_url("redis://10.1.2.3:7001?deadline_ms=2.5&backoff_ms=10&max_backoff_ms=80");
  EXPECT_EQ(o.host, "10.1.2.3");
  EXPECT_EQ(o.port, 7001);
  EXPECT_DOUBLE_EQ(o.deadline_ms, 2.5);
  EXPECT_DOUBLE_EQ(o.backoff_ms, 10.0);
  EXPECT_DOUBLE_EQ(o.max_backoff_ms, 80.0);
  EXPECT_DOUBLE_EQ(o.write_timeout_ms, L2Options{}.write_timeout_ms);
  EXPECT_DOUBLE_EQ(parse_l2_url("redis://localhost:6379").deadline_ms, 3.0);  // the default
}

TEST(L2Url, RejectsBadUrlsNamingTheArgument) {
  for (const char* url : {"http://h:1", "redis://h", "redis://:80", "redis://h:0", "redis://h:65536", "redis://h:1/0",
                          "redis://h:1?deadline_ms=0", "redis://h:1?deadline_ms=-1", "redis://h:1?deadline_ms=nan",
                          "redis://h:1?deadline_ms", "redis://h:1?colour=red",
                          "redis://h:1?backoff_ms=10&max_backoff_ms=5"}) {
    try {
      parse_l2_url(url);
      ADD_FAILURE() << url << " was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("store_url", 0), 0u) << e.what();
    }
  }
  EchoConfig c;
  c.store_url = "redis://nohost";
  EXPECT_THROW(c.validate(), std::invalid_argument);
  EXPECT_THROW(AttentionEchoCache{c}, std::invalid_argument);
}

TEST(L2Url, ACacheWithoutAStoreCountsNothing) {
  AttentionEchoCache cache(config_for(""));
  Qkv x = make_qkv(2, 2, 64, 16, 1);
  call(cache, x, request_for(x, 48, true));
  EXPECT_EQ(cache.l2_stats().lookups, 0u);
  EXPECT_EQ(cache.l2_stats().writes, 0u);
}

// A store of the caller's own: values in a map, counted as RedisStore counts.
class MapStore final : public L2Store {
 public:
  std::vector<std::optional<std::string>> get(std::span<const std::string> keys) override {
    std::vector<std::optional<std::string>> out;
    for (const std::string& key : keys) {
      ++lookups_;
      const auto it = values.find(key);
      out.push_back(it == values.end() ? std::nullopt : std::optional(it->second));
      found_ += it != values.end();
    }
    return out;
  }
  std::size_t put(std::span<const L2Write> items) override {
    for (const L2Write& w : items) values[w.key] = w.value;
    writes_ += items.size();
    return items.size();
  }
  void reject() override { ++rejected_; }
  L2Stats stats() const override {
    return {.lookups = lookups_, .hits = found_ - rejected_, .misses = lookups_ - found_, .rejected = rejected_,
            .writes = writes_};
  }
  std::map<std::string, std::string> values;

 private:
  std::uint64_t lookups_ = 0, found_ = 0, rejected_ = 0, writes_ = 0;
};

TEST(L2Url, ACacheTakesAStoreOfTheCallersOwn) {
  auto store = std::make_shared<MapStore>();
  Qkv x = make_qkv(4, 2, 96, 32, 1);
  const EchoRequest r = request_for(x, 64, true);
  const auto reference = computed(x, r);
  AttentionEchoCache a(config_for(""), store);
  EXPECT_EQ(call(a, x, r).tier, Tier::kNone);
  ASSERT_EQ(store->values.size(), 1u);

  AttentionEchoCache b(config_for(""), store);  // empty L1, the same store
  std::fill(x.out.begin(), x.out.end(), 0.0f);
  EXPECT_EQ(call(b, x, r).tier, Tier::kExact);
  EXPECT_LT(rel_l2(x.out, reference), 1e-6);
  EXPECT_EQ(b.l2_stats().hits, 1u);

  store->values.begin()->second.back() ^= 1;  // a flipped bit: rejected, computed
  AttentionEchoCache c(config_for(""), store);
  std::fill(x.out.begin(), x.out.end(), 0.0f);
  EXPECT_EQ(call(c, x, r).tier, Tier::kNone);
  EXPECT_LT(rel_l2(x.out, reference), 1e-6);
  EXPECT_EQ(c.l2_stats().rejected, 1u);

  try {
    AttentionEchoCache both(config_for("redis://127.0.0.1:6379"), store);
    ADD_FAILURE() << "a store and a store_url were both accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("store_url", 0), 0u) << e.what();
  }
  try {
    AttentionEchoCache none(config_for(""), nullptr);
    ADD_FAILURE() << "a null store was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("store", 0), 0u) << e.what();
  }
}

// ---- a cache on a real server -------------------------------------------------

TEST(L2Cache, WriteThroughThenAFreshCacheHitsFromL2) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  Qkv x = make_qkv(4, 2, 96, 32, 1);
  const EchoRequest r = request_for(x, 64, true);
  const auto reference = computed(x, r);

  AttentionEchoCache a(config_for(server.url()));
  EXPECT_EQ(call(a, x, r).tier, Tier::kNone);
  EXPECT_EQ(a.l2_stats().misses, 1u);
  EXPECT_EQ(a.l2_stats().writes, 1u);

  AttentionEchoCache b(config_for(server.url()));  // empty L1
  std::fill(x.out.begin(), x.out.end(), 0.0f);
  const EchoResult hit = call(b, x, r);
  EXPECT_EQ(hit.tier, Tier::kExact);
  EXPECT_EQ(hit.tokens_echoed, 64);
  EXPECT_LT(rel_l2(x.out, reference), 1e-6);
  EXPECT_EQ(b.l2_stats().hits, 1u);
  EXPECT_EQ(b.l2_stats().writes, 0u);  // nothing computed, nothing written
  EXPECT_EQ(b.size(), 1u);
  EXPECT_GT(b.l2_stats().lookup_seconds, 0.0);

  call(b, x, r);  // now an L1 hit: L2 is not asked
  EXPECT_EQ(b.l2_stats().lookups, 1u);
  EXPECT_EQ(b.stats().hits_exact, 2u);
}

TEST(L2Cache, SameEmbeddingsFindTheKeptTilesOfAnotherCache) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  Qkv x = make_qkv(4, 2, 256, 32, 2);
  const EchoRequest r = request_for(x, 192);  // no tokens: found by semantic key
  const auto reference = computed(x, r);
  AttentionEchoCache a(config_for(server.url(), EchoMode::kSparse));
  EXPECT_EQ(call(a, x, r).tier, Tier::kNone);
  EXPECT_EQ(a.l2_stats().writes, 1u);

  AttentionEchoCache b(config_for(server.url(), EchoMode::kSparse));
  const EchoResult hit = call(b, x, r);
  EXPECT_EQ(hit.tier, Tier::kSparse);
  EXPECT_LE(hit.estimated_error, b.config().max_error);
  EXPECT_LT(rel_l2(x.out, reference), 0.05);
  EXPECT_EQ(b.l2_stats().hits, 1u);

  // A near-duplicate now finds the fetched entry in L1, by similarity.
  Qkv near = make_qkv(4, 2, 256, 32, 2, 0.02f);
  EXPECT_EQ(call(b, near, request_for(near, 192)).tier, Tier::kSparse);
  EXPECT_EQ(b.l2_stats().lookups, 1u);
}

TEST(L2Cache, NamespacesAndConfigsNeverShareKeys) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  Qkv x = make_qkv(2, 2, 64, 16, 3);
  EchoRequest r = request_for(x, 48, true);
  r.name_space = "tenant-a";
  AttentionEchoCache a(config_for(server.url()));
  call(a, x, r);

  AttentionEchoCache b(config_for(server.url()));
  r.name_space = "tenant-b";
  EXPECT_EQ(call(b, x, r).tier, Tier::kNone);
  r.name_space = "tenant-a:";  // escaped: not a prefix trick
  EXPECT_EQ(call(b, x, r).tier, Tier::kNone);
  EXPECT_EQ(b.l2_stats().hits, 0u);

  EchoConfig other = config_for(server.url());
  other.hash_dim = 64;  // another key space for the payloads
  AttentionEchoCache c(other);
  r.name_space = "tenant-a";
  EXPECT_EQ(call(c, x, r).tier, Tier::kNone);
  EXPECT_EQ(c.l2_stats().hits, 0u);
  EXPECT_EQ(c.l2_stats().misses, 1u);
  EXPECT_EQ(keys_of(server).size(), 4u);  // a, b, "a:" and the other config: four keys
}

TEST(L2Cache, GarbageUnderAValidKeyIsRejectedAndComputed) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  Qkv x = make_qkv(4, 2, 96, 32, 4);
  const EchoRequest r = request_for(x, 64, true);
  const auto reference = computed(x, r);
  AttentionEchoCache a(config_for(server.url()));
  call(a, x, r);
  const auto keys = keys_of(server);
  ASSERT_EQ(keys.size(), 1u);
  const auto raw = connect_redis(parse_l2_url(server.url()));
  const std::string good = *raw->get(keys)[0];

  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x10;  // one bit of the payload
  const std::string truncated = good.substr(0, good.size() - 7);
  for (const std::string& bad : {std::string("garbage"), flipped, truncated}) {
    ASSERT_TRUE(put_one(*raw, keys[0], bad));
    AttentionEchoCache b(config_for(server.url()));
    std::fill(x.out.begin(), x.out.end(), 0.0f);
    const EchoResult result = call(b, x, r);
    EXPECT_EQ(result.tier, Tier::kNone);
    EXPECT_EQ(b.l2_stats().rejected, 1u);
    EXPECT_EQ(b.l2_stats().hits, 0u);
    EXPECT_LT(rel_l2(x.out, reference), 1e-6);
  }
  // The last rejecting cache wrote the recomputed entry back: the key serves again.
  AttentionEchoCache c(config_for(server.url()));
  EXPECT_EQ(call(c, x, r).tier, Tier::kExact);
  EXPECT_EQ(c.l2_stats().hits, 1u);
}

TEST(L2Cache, AValueUnderAnotherKeyIsRejected) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  Qkv x = make_qkv(2, 2, 64, 16, 5), y = make_qkv(2, 2, 64, 16, 6);
  AttentionEchoCache a(config_for(server.url()));
  call(a, x, request_for(x, 48, true));
  call(a, y, request_for(y, 48, true));
  const auto keys = keys_of(server);
  ASSERT_EQ(keys.size(), 2u);
  const auto raw = connect_redis(parse_l2_url(server.url()));
  const auto values = raw->get(keys);
  ASSERT_TRUE(put_one(*raw, keys[0], *values[1]));  // a valid value, under the other prompt's key

  AttentionEchoCache b(config_for(server.url()));
  call(b, x, request_for(x, 48, true));
  call(b, y, request_for(y, 48, true));
  EXPECT_EQ(b.l2_stats().rejected, 1u);
  EXPECT_EQ(b.l2_stats().hits, 1u);
}

TEST(L2Cache, ALookupReturnsWithinTheDeadlineWhenTheServerIsStopped) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  const auto store = connect_redis(parse_l2_url(server.url("deadline_ms=20&backoff_ms=300&max_backoff_ms=300")));
  const std::vector<std::string> keys{"ae:test"};
  ASSERT_TRUE(put_one(*store, keys[0], "value"));  // connected
  server.pause();
  const auto start = Clock::now();
  EXPECT_FALSE(store->get(keys)[0]);
  const double waited = ms_since(start);
  EXPECT_GE(waited, 15.0);  // it did wait for the server,
  EXPECT_LT(waited, 20.0 + 40.0) << "a lookup outlived its deadline";  // and no longer than the deadline (+ slack)
  EXPECT_EQ(store->stats().timeouts, 1u);

  // Backing off: the next lookup does not wait at all.
  const auto again = Clock::now();
  EXPECT_FALSE(store->get(keys)[0]);
  EXPECT_LT(ms_since(again), 10.0);
  EXPECT_EQ(store->stats().unavailable, 1u);

  // A cache on the stopped server (the default 3 ms deadline) computes.
  AttentionEchoCache cache(config_for(server.url("")));
  Qkv x = make_qkv(2, 2, 64, 16, 7);
  const EchoRequest r = request_for(x, 48, true);
  const auto reference = computed(x, r);
  const auto call_start = Clock::now();
  EXPECT_EQ(call(cache, x, r).tier, Tier::kNone);
  EXPECT_LT(rel_l2(x.out, reference), 1e-6);
  const L2Stats s = cache.l2_stats();
  EXPECT_EQ(s.timeouts, 1u);   // the lookup; the write-through that follows is skipped (backing off)
  EXPECT_EQ(s.unavailable, 1u);
  EXPECT_LT(s.lookup_seconds * 1e3, 3.0 + 40.0);
  EXPECT_LE(s.max_lookup_seconds, s.lookup_seconds);
  EXPECT_GT(s.max_lookup_seconds * 1e3, 2.5);  // it waited for its deadline
  EXPECT_LT(ms_since(call_start), 1000.0);
  server.resume();
}

TEST(L2Cache, ALookupCutShortByItsDeadlineKeepsWhatArrived) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  const auto writer = connect_redis(parse_l2_url(server.url("deadline_ms=60000&write_timeout_ms=60000")));
  std::vector<std::string> keys;
  std::vector<L2Write> writes;
  // 8 small values (one MGET), then 128 MB, which would need 5 GB/s to
  // arrive within 25 ms (hiredis read ~1 GB/s here).
  for (int i = 0; i < 16; ++i) {
    keys.push_back("ae:test:" + std::to_string(i));
    writes.push_back({keys.back(), i < 8 ? std::string(1, char('a' + i)) : std::string(16 << 20, char('a' + i))});
  }
  ASSERT_EQ(writer->put(writes), 16u);

  const auto store = connect_redis(parse_l2_url(server.url("deadline_ms=25")));
  const auto start = Clock::now();
  const auto values = store->get(keys);
  EXPECT_LT(ms_since(start), 25.0 + 40.0);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(values[i], writes[i].value) << i;
  for (int i = 8; i < 16; ++i) EXPECT_FALSE(values[i]) << i;
  EXPECT_EQ(store->stats().timeouts, 1u);
  // The server answered: no backoff, the next lookup is tried (once the
  // single-threaded server is done with the abandoned reply: the patient
  // writer's lookup waits for that).
  ASSERT_TRUE(writer->get({keys.data(), 1})[0]);
  store->get({keys.data(), 1});
  EXPECT_EQ(store->stats().unavailable, 0u);
  EXPECT_EQ(store->stats().hits, 9u);
}

TEST(L2Cache, AKilledAndRestartedServerNeverChangesAnOutput) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  AttentionEchoCache cache(config_for(server.url(std::string(RedisServer::kPatient) + "&backoff_ms=20&max_backoff_ms=100")));
  std::vector<Qkv> prompts;
  std::vector<std::vector<float>> references;
  for (unsigned seed = 10; seed < 16; ++seed) {
    prompts.push_back(make_qkv(2, 2, 64, 16, seed));
    references.push_back(computed(prompts.back(), request_for(prompts.back(), 48, true)));
  }
  auto run = [&](int i) {
    Qkv& x = prompts[i];
    std::fill(x.out.begin(), x.out.end(), 0.0f);
    const EchoResult result = call(cache, x, request_for(x, 48, true));
    EXPECT_LT(rel_l2(x.out, references[i]), 1e-6) << "prompt " << i;
    return result.tier;
  };
  for (int i = 0; i < 3; ++i) EXPECT_EQ(run(i), Tier::kNone);
  EXPECT_EQ(cache.l2_stats().writes, 3u);

  server.stop();  // mid-run
  for (int i = 0; i < 3; ++i) EXPECT_EQ(run(i), Tier::kExact);  // L1 keeps serving
  EXPECT_EQ(run(3), Tier::kNone);                              // a miss is computed
  const L2Stats down = cache.l2_stats();
  EXPECT_GE(down.errors + down.timeouts, 1u);
  EXPECT_EQ(down.writes, 3u);

  ASSERT_TRUE(server.start());  // empty: no persistence
  std::this_thread::sleep_for(std::chrono::milliseconds(250));  // past the longest backoff
  EXPECT_EQ(run(4), Tier::kNone);
  const L2Stats up = cache.l2_stats();
  EXPECT_GE(up.reconnects, 1u);
  EXPECT_EQ(up.writes, 4u);

  AttentionEchoCache fresh(config_for(server.url()));  // what was written after the restart is shared
  Qkv& x = prompts[4];
  EXPECT_EQ(call(fresh, x, request_for(x, 48, true)).tier, Tier::kExact);
  EXPECT_LT(rel_l2(x.out, references[4]), 1e-6);
}

TEST(L2Cache, ManyThreadsShareOneStore) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  std::vector<Qkv> prompts;
  std::vector<std::vector<float>> references;
  for (unsigned seed = 20; seed < 28; ++seed) {
    prompts.push_back(make_qkv(2, 2, 64, 16, seed));
    references.push_back(computed(prompts.back(), request_for(prompts.back(), 48, true)));
  }
  AttentionEchoCache writer(config_for(server.url()));
  for (int i = 0; i < 4; ++i) call(writer, prompts[i], request_for(prompts[i], 48, true));

  AttentionEchoCache cache(config_for(server.url()));
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int n = 0; n < 16; ++n) {
        const int i = (t + n) % 8;
        Qkv x = prompts[i];
        call(cache, x, request_for(x, 48, true));
        if (rel_l2(x.out, references[i]) > 1e-6) ++wrong;
      }
    });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  const L2Stats s = cache.l2_stats();
  EXPECT_EQ(s.errors + s.timeouts + s.unavailable, 0u);
  EXPECT_EQ(s.lookups, s.hits + s.misses + s.rejected);
  EXPECT_GE(s.hits, 4u);  // each stored prompt came from L2 once at least
}

// ---- two processes --------------------------------------------------------------

// Runs in a child process of TwoProcesses: AE_L2_CHILD_ROLE "store" computes
// and writes a prompt through; "hit" expects to be served it from L2.
TEST(L2Child, Run) {
  const char* url = std::getenv("AE_L2_CHILD_URL");
  const char* role = std::getenv("AE_L2_CHILD_ROLE");
  if (!url || !role) GTEST_SKIP() << "a child of L2TwoProcesses";
  Qkv x = make_qkv(4, 2, 128, 32, 42);
  const EchoRequest r = request_for(x, 96, true);
  const auto reference = computed(x, r);
  AttentionEchoCache cache(config_for(url));
  const EchoResult result = call(cache, x, r);
  EXPECT_LT(rel_l2(x.out, reference), 1e-6);
  if (std::string(role) == "store") {
    EXPECT_EQ(result.tier, Tier::kNone);
    EXPECT_EQ(cache.l2_stats().writes, 1u);
  } else {
    EXPECT_EQ(result.tier, Tier::kExact);
    EXPECT_EQ(cache.l2_stats().hits, 1u);
  }
}

TEST(L2TwoProcesses, ProcessBHitsWhatProcessAStored) {
  RedisServer server;
  AE_REQUIRE_REDIS(server);
  const std::string self = std::filesystem::read_symlink("/proc/self/exe");
  const std::vector<std::string> args{self, "--gtest_filter=L2Child.Run"};
  const std::string url = "AE_L2_CHILD_URL=" + server.url();
  const auto a = testing::run_program(args, {url, "AE_L2_CHILD_ROLE=store"});
  EXPECT_EQ(a.status, 0) << a.output;
  const auto b = testing::run_program(args, {url, "AE_L2_CHILD_ROLE=hit"});
  EXPECT_EQ(b.status, 0) << b.output;
  // The check can fail: on another, empty server process B has nothing to hit.
  RedisServer empty;
  EXPECT_EQ(testing::run_program(args, {"AE_L2_CHILD_URL=" + empty.url(), "AE_L2_CHILD_ROLE=hit"}).status, 1);
}

}  // namespace
}  // namespace attention_echo
