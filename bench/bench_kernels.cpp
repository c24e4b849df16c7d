// Attention kernel timings.
//
//   Exact/T/D          causal exact attention, H = 8, every row (the issue's
//                      shapes: compare with tools/bench_torch_sdpa.py at the
//                      same thread count).
//   PrefixExact/p      exact attention of the prefix block [0, p), H = 8, D = 64:
//                      the miss path the sparse tier saves on.
//   Sparse/p/percent   sparse_rows over the same block with about percent% of
//                      the causal tiles kept (block 64): sink, diagonal, a local
//                      band and scattered vertical tiles. Counter "kept" is the
//                      exact kept fraction; the target is hit time <= 1.25 x
//                      kept x PrefixExact.
//
// Threads: AE_THREADS (default: all hardware threads). On a shared machine
// use repetitions and read the median (and min, the least disturbed run):
//   bench_kernels --benchmark_repetitions=7 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "attention_echo/attention.hpp"
#include "kernels/cpu_backend.hpp"

namespace {

using namespace attention_echo;

constexpr int kHeads = 8;
constexpr int kSparseDim = 64;
constexpr int kBlock = 64;

ThreadPool& pool() {
  static ThreadPool p(std::getenv("AE_THREADS") ? std::atoi(std::getenv("AE_THREADS")) : 0);
  return p;
}

const kernels::CpuBackend& backend() {
  static const kernels::CpuBackend b(pool());
  return b;
}

struct Qkv {
  std::vector<float> q, k, v, out;
  int tokens, dim;
  kernels::AttentionProblem problem() {
    return {HeadsView::contiguous(q.data(), kHeads, tokens, dim), HeadsView::contiguous(k.data(), kHeads, tokens, dim),
            HeadsView::contiguous(v.data(), kHeads, tokens, dim),
            MutableHeadsView::contiguous(out.data(), kHeads, tokens, dim), 1.0f / std::sqrt(float(dim)), true, 0};
  }
};

// Random inputs, built once per shape.
Qkv& inputs(int tokens, int dim) {
  static std::map<std::pair<int, int>, std::unique_ptr<Qkv>> cache;
  auto& slot = cache[{tokens, dim}];
  if (!slot) {
    const std::size_t n = std::size_t(kHeads) * tokens * dim;
    slot = std::make_unique<Qkv>(Qkv{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n),
                                     std::vector<float>(n), tokens, dim});
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (auto* buffer : {&slot->q, &slot->k, &slot->v})
      for (float& f : *buffer) f = normal(rng);
  }
  return *slot;
}

double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

void set_counters(benchmark::State& state, double flops) {
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = pool().size();
}

// q.k and p.v over the causal lower triangle: 2 * 2 * T^2 / 2 * D per head.
double causal_flops(int tokens, int dim) { return 2.0 * kHeads * double(tokens) * tokens * dim; }

void Exact(benchmark::State& state) {
  const int tokens = int(state.range(0)), dim = int(state.range(1));
  auto problem = inputs(tokens, dim).problem();
  for (auto _ : state) backend().exact_rows(problem, 0, tokens);
  set_counters(state, causal_flops(tokens, dim));
  state.SetLabel(attention_isa());
}
BENCHMARK(Exact)->ArgsProduct({{512, 2048, 4096}, {64, 128}})->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", fastest);

void PrefixExact(benchmark::State& state) {
  const int prefix = int(state.range(0));
  auto problem = inputs(prefix, kSparseDim).problem();
  for (auto _ : state) backend().exact_rows(problem, 0, prefix);
  set_counters(state, causal_flops(prefix, kSparseDim));
}
BENCHMARK(PrefixExact)->Arg(1024)->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime()->ComputeStatistics("min", fastest);

// About fraction of each head's causal tiles: per query tile I, the sink,
// the diagonal, then alternately the nearest band tile and a random earlier
// tile, until round(fraction * (I + 1)) tiles (at least sink + diagonal).
kernels::TileSet pattern(int tiles, double fraction) {
  kernels::TileSet set{kBlock, tiles, kHeads, {0}, {}};
  std::mt19937 rng(7);
  for (int h = 0; h < kHeads; ++h)
    for (int i = 0; i < tiles; ++i) {
      std::vector<char> keep(i + 1, 0);
      keep[0] = keep[i] = 1;
      const int want = std::max<int>(std::lround(fraction * (i + 1)), i > 0 ? 2 : 1);
      int count = i > 0 ? 2 : 1;
      for (int band = i - 1, turn = 0; count < want; ++turn) {
        const int j = turn % 2 == 0 && band > 0 ? band-- : int(rng() % (i + 1));
        if (!keep[j]) keep[j] = 1, ++count;
      }
      for (int j = 0; j <= i; ++j)
        if (keep[j]) set.cols.push_back(std::uint16_t(j));
      set.offsets.push_back(std::uint32_t(set.cols.size()));
    }
  return set;
}

void Sparse(benchmark::State& state) {
  const int prefix = int(state.range(0));
  const int tiles = prefix / kBlock;
  const kernels::KeptTiles kept(pattern(tiles, state.range(1) / 100.0));
  auto problem = inputs(prefix, kSparseDim).problem();
  for (auto _ : state) backend().sparse_rows(problem, prefix, kept);
  const double fraction = double(kept.tiles().cols.size()) / (double(kHeads) * tiles * (tiles + 1) / 2);
  state.counters["kept"] = fraction;
  set_counters(state, fraction * causal_flops(prefix, kSparseDim));
}
BENCHMARK(Sparse)
    ->ArgsProduct({{1024, 4096, 8192}, {10, 20, 30, 50}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->ComputeStatistics("min", fastest);

}  // namespace

BENCHMARK_MAIN();
