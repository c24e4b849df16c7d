// Stress: 16 threads of mixed operations on shared caches and a shared
// planner — misses and hits of every tier (exact, sparse, dense),
// evictions by count and by bytes, clear (all and one namespace), stats
// reads, snapshot save/load, planner requests through the cache route —
// with invariants checked throughout:
//   hits + misses == lookups; entries <= capacity; bytes <= max_bytes;
//   every output within the guard's bound of exact attention (float64
//   reference), exact-tier hits and misses within rounding.
// Short by default (it runs under TSan in CI); the full run is
//   AE_STRESS_OPS=10000 ./build/release/tests/attention_echo_tests --gtest_filter='Stress.*'
#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attention_echo/cache.hpp"
#include "attention_echo/engine.hpp"
#include "cache_fixtures.hpp"
#include "reference.hpp"

namespace attention_echo {
namespace {

using testing::make_qkv;
using testing::Qkv;
using testing::request_for;

constexpr int kThreads = 16;
constexpr int kH = 2, kHkv = 1, kT = 64, kD = 32, kP = 48;
constexpr double kMaxError = 0.1;
constexpr long long kCountCapacity = 4;        // the sparse cache evicts by count
constexpr long long kByteBudget = 40 * 1024;    // the dense cache by bytes
const char* kNamespaces[] = {"", "tenant-1", "tenant-2"};

int ops_per_thread() {
  const char* env = std::getenv("AE_STRESS_OPS");
  return env ? std::max(1, std::atoi(env)) : 40;
}

// A request's inputs and its float64 reference output, shared read-only by
// every thread (each call writes its own out buffer).
struct Input {
  Qkv x;
  std::vector<double> reference;
};

std::vector<Input> make_inputs() {
  std::vector<Input> inputs;
  for (unsigned seed = 1; seed <= 6; ++seed)
    for (float noise : {0.0f, 0.02f}) {  // near-duplicates: approximate hits
      Qkv x = make_qkv(kH, kHkv, kT, kD, seed, noise);
      std::vector<double> ref = testing::reference_attention(x.qv(), x.kv(), x.vv(), 1.0 / std::sqrt(double(kD)),
                                                             true, kP);
      inputs.push_back({std::move(x), std::move(ref)});
    }
  return inputs;
}

EchoConfig cache_config(EchoMode mode, long long capacity, long long max_bytes) {
  EchoConfig c;
  c.mode = mode;
  c.block_size = 32;
  c.threads = 1;
  c.max_error = kMaxError;
  c.capacity = capacity;
  c.max_bytes = max_bytes;
  return c;
}

const llama::Model& model() {
  static const llama::Model m(llama::load_weights(std::string(AE_SOURCE_DIR) + "/models/echo-llama-6m/model.bin"));
  return m;
}

// The shared planner: not thread-safe, so behind a lock, as a server would
// hold it; its cache route calls the shared sparse cache concurrently with
// every other thread.
struct SharedPlanner {
  ThreadPool pool{1};
  llama::Engine engine{model(), pool};
  serving::Planner planner;
  std::mutex mutex;
  std::vector<std::vector<int>> prompts;
  std::vector<std::vector<float>> exact_logits;

  explicit SharedPlanner(AttentionEchoCache& cache) : planner(model().config(), {.cache = &cache}) {
    for (int p = 0; p < 3; ++p) {
      std::vector<int> tokens(40 + 8 * p);
      for (std::size_t t = 0; t < tokens.size(); ++t) tokens[t] = 3 + static_cast<int>((t * 7 + p * 13) % 200);
      llama::KVState kv;
      exact_logits.push_back(engine.forward(tokens, kv, {}).logits);
      prompts.push_back(std::move(tokens));
    }
  }

  // Returns false when the logits are not what the plan promises.
  bool request(int which, std::string_view name_space) {
    std::lock_guard lock(mutex);
    const std::vector<int>& tokens = prompts[which];
    serving::Plan plan = planner.plan(tokens, static_cast<int>(tokens.size()) / 2, name_space);
    const std::vector<float> logits = planner.execute(engine, tokens, plan).logits;
    if (logits.size() != exact_logits[which].size()) return false;
    // Exact routes: the same logits up to summation order; approximate
    // ones: finite (their error is the cache guard's, checked elsewhere).
    const double tolerance = plan.report.reused_exact && plan.route != serving::Plan::Route::kCache ? 1e-3 : INFINITY;
    for (std::size_t i = 0; i < logits.size(); ++i)
      if (!std::isfinite(logits[i]) || std::fabs(logits[i] - exact_logits[which][i]) > tolerance) return false;
    return true;
  }
};

struct Counts {
  std::atomic<long> calls{0}, hits_exact{0}, hits_sparse{0}, hits_dense{0}, snapshots{0}, planner{0};
  std::atomic<long> violations{0};
  std::atomic<bool> evicted_by_count{false}, evicted_by_bytes{false};  // seen in a stats read
};

// Checks one call's output against its reference: approximate hits within
// the guard's bound, everything else within rounding of exact attention.
bool output_ok(const EchoResult& r, const Input& in, const std::vector<float>& out) {
  const HeadsView view = HeadsView::contiguous(out.data(), kH, kT, kD);
  const double error = testing::max_head_error(view, in.reference, kT);
  const bool approximate = r.tier == Tier::kSparse || r.tier == Tier::kDense;
  return approximate ? r.estimated_error <= kMaxError && error <= kMaxError : error <= 1e-5;
}

bool stats_ok(const AttentionEchoCache& cache) {
  const CacheStats s = cache.stats();
  const EchoConfig& c = cache.config();
  bool ok = s.hits() + s.misses == s.lookups && s.entries <= static_cast<std::uint64_t>(c.capacity) &&
            s.bytes <= static_cast<std::uint64_t>(c.max_bytes);
  for (const char* ns : kNamespaces) {
    const CacheStats n = cache.stats(ns);
    ok = ok && n.hits() + n.misses == n.lookups && n.bytes <= s.bytes + static_cast<std::uint64_t>(c.max_bytes);
  }
  return ok;
}

void run_thread(int id, int ops, std::vector<AttentionEchoCache*> caches, const std::vector<Input>& inputs,
                SharedPlanner& planner, Counts& counts) {
  std::mt19937 rng(1000u + static_cast<unsigned>(id));
  std::vector<float> out(static_cast<std::size_t>(kH) * kT * kD);
  const std::string snapshot = ::testing::TempDir() + "/ae_stress_" + std::to_string(getpid()) + "_" +
                               std::to_string(id) + ".bin";
  auto violation = [&](const char* what) {
    if (counts.violations++ < 10) ADD_FAILURE() << "thread " << id << ": " << what;
  };
  for (int op = 0; op < ops; ++op) {
    AttentionEchoCache& cache = *caches[rng() % caches.size()];
    const char* ns = kNamespaces[rng() % 3];
    const unsigned dice = rng() % 200;
    if (dice < 180) {  // a lookup: miss or a hit of any tier
      const Input& in = inputs[rng() % inputs.size()];
      EchoRequest req = request_for(in.x, kP, rng() % 2 == 0);
      req.name_space = ns;
      const EchoResult r = cache.attention_with_echo(in.x.qv(), in.x.kv(), in.x.vv(),
                                                     MutableHeadsView::contiguous(out.data(), kH, kT, kD), req);
      ++counts.calls;
      counts.hits_exact += r.tier == Tier::kExact;
      counts.hits_sparse += r.tier == Tier::kSparse;
      counts.hits_dense += r.tier == Tier::kDense;
      if (!output_ok(r, in, out)) violation("output outside the bound");
    } else if (dice < 190) {
      if (!stats_ok(cache)) violation("stats invariant");
      if (cache.stats().evictions > 0)
        (cache.config().capacity == kCountCapacity ? counts.evicted_by_count : counts.evicted_by_bytes) = true;
    } else if (dice < 193) {
      if (dice == 190) cache.clear();
      else cache.clear(ns);
    } else if (dice < 196) {
      cache.save(snapshot);
      cache.load(snapshot);
      ++counts.snapshots;
    } else if (op % 8 == 0 || ops < 100) {  // planner requests: few and short
      if (!planner.request(static_cast<int>(rng() % 3), ns)) violation("planner logits");
      ++counts.planner;
    }
  }
  std::remove(snapshot.c_str());
}

TEST(Stress, SixteenThreadsOfMixedOperationsKeepEveryInvariant) {
  const int ops = ops_per_thread();
  const std::vector<Input> inputs = make_inputs();
  AttentionEchoCache sparse(cache_config(EchoMode::kSparse, kCountCapacity, 1LL << 30));
  AttentionEchoCache dense(cache_config(EchoMode::kDense, 1000, kByteBudget));
  SharedPlanner planner(sparse);
  Counts counts;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back(run_thread, t, ops, std::vector<AttentionEchoCache*>{&sparse, &dense}, std::cref(inputs),
                         std::ref(planner), std::ref(counts));
  for (std::thread& t : threads) t.join();

  EXPECT_EQ(counts.violations.load(), 0);
  EXPECT_TRUE(stats_ok(sparse));
  EXPECT_TRUE(stats_ok(dense));
  // The mix did what it claims: every tier hit, both budgets evicted.
  EXPECT_GT(counts.hits_exact.load(), 0);
  EXPECT_GT(counts.hits_sparse.load(), 0);
  EXPECT_GT(counts.hits_dense.load(), 0);
  EXPECT_GT(counts.planner.load(), 0);
  EXPECT_TRUE(counts.evicted_by_count || sparse.stats().evictions > 0);
  EXPECT_TRUE(counts.evicted_by_bytes || dense.stats().evictions > 0);
  std::printf("stress: %d threads x %d ops: %ld lookups (exact %ld, sparse %ld, dense %ld hits), %ld snapshot "
              "round trips, %ld planner requests\n",
              kThreads, ops, counts.calls.load(), counts.hits_exact.load(), counts.hits_sparse.load(),
              counts.hits_dense.load(), counts.snapshots.load(), counts.planner.load());
}

}  // namespace
}  // namespace attention_echo
