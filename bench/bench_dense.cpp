// Dense echo tier timings on the prefix block, H = 8, D = 128, causal, T = p:
//
//   ExactMiss/p   exact_rows over the block: an exact-mode (or sparse-less) miss.
//   DenseMiss/p   exact_rows_with_dense_logits: the same pass capturing the
//                 prefix logits (p^2/2 floats per head) and the mean query.
//   DenseHit/p    dense_echo_rows over the block from those logits, Taylor
//                 step on (alpha 1, q perturbed so the step is not 0):
//                 softmax and PV only. Expect at most ~2x over the miss.
//
// Threads: AE_THREADS (default: all hardware threads). On a shared machine
// interleave the repetitions and read the medians:
//   bench_dense --benchmark_repetitions=9 --benchmark_enable_random_interleaving=true
//               --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "kernels/cpu_backend.hpp"

namespace {

using namespace attention_echo;

constexpr int kHeads = 8;
constexpr int kDim = 128;

ThreadPool& pool() {
  static ThreadPool p(std::getenv("AE_THREADS") ? std::atoi(std::getenv("AE_THREADS")) : 0);
  return p;
}

const kernels::CpuBackend& backend() {
  static const kernels::CpuBackend b(pool());
  return b;
}

struct Block {
  int prefix;
  std::vector<float> q, q_hit, k, v, out;
  kernels::DenseLogits cached;

  kernels::AttentionProblem problem(std::vector<float>& queries) {
    return {HeadsView::contiguous(queries.data(), kHeads, prefix, kDim),
            HeadsView::contiguous(k.data(), kHeads, prefix, kDim), HeadsView::contiguous(v.data(), kHeads, prefix, kDim),
            MutableHeadsView::contiguous(out.data(), kHeads, prefix, kDim), 1.0f / std::sqrt(float(kDim)), true,
            prefix};
  }
};

// Random inputs and the miss's cached logits, built once per prefix.
Block& block(int prefix) {
  static std::map<int, std::unique_ptr<Block>> blocks;
  auto& slot = blocks[prefix];
  if (!slot) {
    const std::size_t n = std::size_t(kHeads) * prefix * kDim;
    slot = std::make_unique<Block>();
    Block& b = *slot;
    b.prefix = prefix;
    for (auto* buffer : {&b.q, &b.q_hit, &b.k, &b.v, &b.out}) buffer->resize(n);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (auto* buffer : {&b.q, &b.k, &b.v})
      for (float& f : *buffer) f = normal(rng);
    for (std::size_t i = 0; i < n; ++i) b.q_hit[i] = b.q[i] + 0.05f * normal(rng);
    b.cached = backend().exact_rows_with_dense_logits(b.problem(b.q), prefix);
  }
  return *slot;
}

void set_counters(benchmark::State& state, int prefix) {
  state.counters["threads"] = pool().size();
  state.counters["logit_MB"] = double(kHeads) * prefix * (prefix + 1) / 2 * 4 / 1e6;
}

void ExactMiss(benchmark::State& state) {
  Block& b = block(int(state.range(0)));
  auto problem = b.problem(b.q);
  for (auto _ : state) backend().exact_rows(problem, 0, b.prefix);
  set_counters(state, b.prefix);
}

void DenseMiss(benchmark::State& state) {
  Block& b = block(int(state.range(0)));
  auto problem = b.problem(b.q);
  for (auto _ : state) benchmark::DoNotOptimize(backend().exact_rows_with_dense_logits(problem, b.prefix));
  set_counters(state, b.prefix);
}

void DenseHit(benchmark::State& state) {
  Block& b = block(int(state.range(0)));
  auto problem = b.problem(b.q_hit);
  for (auto _ : state) backend().dense_echo_rows(problem, b.prefix, b.cached, 1.0f, true);
  set_counters(state, b.prefix);
}

void DenseHitNoJacobian(benchmark::State& state) {
  Block& b = block(int(state.range(0)));
  auto problem = b.problem(b.q_hit);
  for (auto _ : state) backend().dense_echo_rows(problem, b.prefix, b.cached, 1.0f, false);
  set_counters(state, b.prefix);
}

#define AE_DENSE_BENCH(fn) \
  BENCHMARK(fn)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.3)
AE_DENSE_BENCH(ExactMiss);
AE_DENSE_BENCH(DenseMiss);
AE_DENSE_BENCH(DenseHit);
AE_DENSE_BENCH(DenseHitNoJacobian);

}  // namespace

BENCHMARK_MAIN();
