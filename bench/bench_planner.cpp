// Prefill planner lookup latency (p50/p99 of Planner::plan) with 1e2..1e4
// stored prompts, blending on: the longest stored prefix (chained block
// hashes), donor candidates (token-profile index), token alignment of up to
// four donors and the cost comparison, plus copying the chosen prefix's K/V
// out of the store. The K/V are tiny (a model of dim 2 with random
// weights, and of two layers: serving::kMinBlendLayers, the fewest a
// planner plans blends for) so that 1e4 prompts of 512 tokens fit in
// memory; lookup cost does not depend on the K/V width except for that
// final copy.
//
// Prompts come in families of near-duplicates (100 base texts, 4 tokens
// substituted, a unique 32-token tail), as in the near-dup scenario; each
// query is a fresh member of a random family.
//
// BM_PlanExecute: what reusing a long stored prefix costs end to end on the
// bundled model (models/echo-llama-6m, 2 threads): plan() (lookup and
// handing the prefix's K/V to the plan) and execute() (the new rows'
// forward and storing the prompt) of a prompt whose first 2000 tokens are
// stored, followed by 64 new ones (a fresh tail each iteration), medians.
//
//   bench_planner                              # 1e2, 1e3, 1e4 stored prompts
//   bench_planner --benchmark_filter=PlanExecute
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "attention_echo/engine.hpp"

namespace {

namespace llama = attention_echo::llama;
namespace serving = attention_echo::serving;

constexpr int kTokens = 512, kFamilies = 100, kVocab = 4096, kQueries = 500;

llama::Weights tiny_model() {
  llama::Weights w;
  w.config = {.dim = 2, .hidden_dim = 2, .n_layers = serving::kMinBlendLayers, .n_heads = 1, .n_kv_heads = 1,
              .vocab_size = kVocab, .seq_len = 1024};
  std::mt19937 rng(1);
  std::normal_distribution<float> n(0.0f, 0.5f);
  auto fill = [&](std::size_t size) {
    std::vector<float> v(size);
    for (float& x : v) x = n(rng);
    return v;
  };
  w.token_embedding = fill(kVocab * 2);
  for (int l = 0; l < w.config.n_layers; ++l)
    w.layers.push_back({fill(2), fill(4), fill(4), fill(4), fill(4), fill(2), fill(4), fill(4), fill(4)});
  w.final_norm = fill(2);
  return w;
}

struct Workload {
  std::mt19937_64 rng{7};
  std::vector<std::vector<int>> bases;
  Workload() {
    for (int f = 0; f < kFamilies; ++f) bases.push_back(random_tokens(kTokens));
  }
  std::vector<int> random_tokens(int n) {
    std::vector<int> t(n);
    for (int& x : t) x = 3 + static_cast<int>(rng() % (kVocab - 3));
    return t;
  }
  std::vector<int> member() {
    std::vector<int> t = bases[rng() % kFamilies];
    for (int e = 0; e < 4; ++e) t[rng() % kTokens] = 3 + static_cast<int>(rng() % (kVocab - 3));
    const auto tail = random_tokens(32);
    t.insert(t.end(), tail.begin(), tail.end());
    return t;
  }
};

void BM_PlannerLookup(benchmark::State& state) {
  const llama::Model model(tiny_model());
  attention_echo::ThreadPool pool(1);
  llama::Engine engine(model, pool);
  serving::Planner planner(model.config(), {.store_bytes = std::size_t{4} << 30, .blend = {.enabled = true}});
  Workload work;
  for (int i = 0; i < state.range(0); ++i) {
    const auto t = work.member();
    serving::Plan plan = planner.plan(t);
    plan.route = serving::Plan::Route::kReuse;  // store it cheaply: reuse what the store has
    planner.execute(engine, t, plan);
  }
  std::vector<std::vector<int>> queries;
  for (int q = 0; q < kQueries; ++q) queries.push_back(work.member());
  std::vector<double> us;
  int blends = 0;
  for (auto _ : state) {
    for (const auto& q : queries) {
      const auto start = std::chrono::steady_clock::now();
      serving::Plan plan = planner.plan(q);
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
      blends += plan.route == serving::Plan::Route::kBlend;
      benchmark::DoNotOptimize(plan);
    }
  }
  std::sort(us.begin(), us.end());
  state.counters["stored"] = static_cast<double>(planner.stored_prompts());
  state.counters["p50_us"] = us[us.size() / 2];
  state.counters["p99_us"] = us[us.size() * 99 / 100];
  state.counters["blend_plans"] = static_cast<double>(blends) / static_cast<double>(us.size());
}
BENCHMARK(BM_PlannerLookup)->Arg(100)->Arg(1000)->Arg(10000)->Iterations(1)->Unit(benchmark::kMillisecond);

double median_ms(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void BM_PlanExecute(benchmark::State& state) {
  constexpr int kStored = 2000, kNew = 64;
  const llama::Model model(llama::load_weights(std::string(AE_SOURCE_DIR) + "/models/echo-llama-6m/model.bin"));
  attention_echo::ThreadPool pool(2);
  llama::Engine engine(model, pool);
  serving::Planner planner(model.config());
  std::mt19937_64 rng(11);
  auto random_tokens = [&](int n) {
    std::vector<int> t(n);
    for (int& x : t) x = 3 + static_cast<int>(rng() % (model.config().vocab_size - 3));
    return t;
  };
  const std::vector<int> stored = random_tokens(kStored);
  {
    serving::Plan plan = planner.plan(stored);
    planner.execute(engine, stored, plan);
  }
  std::vector<double> plan_ms, execute_ms, total_ms;
  for (auto _ : state) {
    std::vector<int> prompt = stored;
    const auto tail = random_tokens(kNew);
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    const auto t0 = std::chrono::steady_clock::now();
    serving::Plan plan = planner.plan(prompt);
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(planner.execute(engine, prompt, plan));
    const auto t2 = std::chrono::steady_clock::now();
    if (plan.report.reused < kStored) state.SkipWithError("the stored prefix was not reused");
    plan_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    execute_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    total_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t0).count());
  }
  state.counters["plan_ms"] = median_ms(plan_ms);
  state.counters["execute_ms"] = median_ms(execute_ms);
  state.counters["total_ms"] = median_ms(total_ms);
}
BENCHMARK(BM_PlanExecute)->Iterations(40)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
