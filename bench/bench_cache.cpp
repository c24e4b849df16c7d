// Cache call overhead without Python: a miss (exact attention + storing the
// entry) against an exact-tier hit (lookup, fingerprint, row copy) on the
// prefix block, with preallocated buffers. H=8, D=128, T=p.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "attention_echo/cache.hpp"

namespace ae = attention_echo;

namespace {

struct Request {
  int heads = 8, dim = 128, tokens = 0;
  std::vector<float> q, k, v, out, emb;
  std::vector<std::int32_t> ids;

  explicit Request(int p) : tokens(p) {
    std::mt19937 rng(7);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto* buf : {&q, &k, &v}) {
      buf->resize(static_cast<std::size_t>(heads) * p * dim);
      for (float& x : *buf) x = n(rng);
    }
    out.resize(q.size());
    emb.resize(static_cast<std::size_t>(p) * 32);
    for (float& x : emb) x = n(rng);
    ids.resize(p);
    for (int i = 0; i < p; ++i) ids[i] = i;
  }
  ae::EchoResult call(ae::AttentionEchoCache& cache) {
    ae::EchoRequest r;
    r.prefix_length = tokens;
    r.prefix_embeddings = {emb.data(), tokens, 32};
    r.prefix_tokens = ids;
    return cache.attention_with_echo(ae::HeadsView::contiguous(q.data(), heads, tokens, dim),
                                     ae::HeadsView::contiguous(k.data(), heads, tokens, dim),
                                     ae::HeadsView::contiguous(v.data(), heads, tokens, dim),
                                     ae::MutableHeadsView::contiguous(out.data(), heads, tokens, dim), r);
  }
};

ae::EchoConfig exact_config(int p) {
  ae::EchoConfig c;
  c.mode = ae::EchoMode::kOff;
  c.max_prefix_length = p;
  return c;
}

void BM_ExactTierMiss(benchmark::State& state) {
  const int p = static_cast<int>(state.range(0));
  Request r(p);
  ae::AttentionEchoCache cache(exact_config(p));
  for (auto _ : state) {
    cache.clear();
    benchmark::DoNotOptimize(r.call(cache));
  }
}

void BM_ExactTierHit(benchmark::State& state) {
  const int p = static_cast<int>(state.range(0));
  Request r(p);
  ae::AttentionEchoCache cache(exact_config(p));
  r.call(cache);
  for (auto _ : state) {
    const ae::EchoResult res = r.call(cache);
    if (res.tier != ae::Tier::kExact) state.SkipWithError("expected an exact hit");
  }
}

}  // namespace

BENCHMARK(BM_ExactTierMiss)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ExactTierHit)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
