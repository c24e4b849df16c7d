// The seed's "Basic Usage", in C++: a first request misses and is cached, a
// second request with a similar prefix echoes it. Unlike the seed we print
// how wrong the echoed output is, measured against exact attention.
#include <attention_echo/attention_echo.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace ae = attention_echo;

struct Request {
  std::vector<float> q, k, v, embeddings;
};

// A head whose queries look at the first token and at themselves, like the
// sink + local band heads of trained models. noise makes a near-duplicate.
Request make_request(int heads, int tokens, int dim, int emb_dim, float noise) {
  std::mt19937 base(42), jitter(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  auto draw = [&] { return n(base) + noise * n(jitter); };
  Request r;
  r.k.resize(static_cast<size_t>(heads) * tokens * dim);
  r.v.resize(r.k.size());
  r.q.resize(r.k.size());
  for (float& x : r.k) x = draw();
  for (float& x : r.v) x = draw();
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t)
      for (int d = 0; d < dim; ++d) {
        const size_t head = static_cast<size_t>(h) * tokens * dim;
        r.q[head + t * dim + d] = 3.0f * (r.k[head + t * dim + d] + r.k[head + d]) + 0.3f * draw();
      }
  r.embeddings.resize(static_cast<size_t>(tokens) * emb_dim);
  for (float& x : r.embeddings) x = 1.0f + 0.3f * draw();
  return r;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

void print(const char* label, const ae::EchoResult& r) {
  std::printf("%s: echo_hit=%s tier=%s similarity=%.3f tokens_echoed=%d tokens_computed=%d "
              "kept_fraction=%.2f estimated_error=%.4f rejected=%s\n",
              label, r.echo_hit ? "true" : "false", ae::to_string(r.tier).data(), r.similarity, r.tokens_echoed,
              r.tokens_computed, r.kept_fraction, r.estimated_error, r.rejected ? "true" : "false");
}

int main() {
  constexpr int kHeads = 8, kTokens = 1024, kDim = 64, kEmbDim = 256, kPrefix = 960;
  ae::EchoConfig config;
  config.capacity = 1000;
  config.similarity_threshold = 0.85;
  config.block_size = 64;
  ae::AttentionEchoCache cache(config);

  std::vector<float> out(static_cast<size_t>(kHeads) * kTokens * kDim);
  auto run = [&](Request& r) {
    ae::EchoRequest req;
    req.prefix_length = kPrefix;
    req.prefix_embeddings = {r.embeddings.data(), kTokens, kEmbDim};
    return cache.attention_with_echo(ae::HeadsView::contiguous(r.q.data(), kHeads, kTokens, kDim),
                                     ae::HeadsView::contiguous(r.k.data(), kHeads, kTokens, kDim),
                                     ae::HeadsView::contiguous(r.v.data(), kHeads, kTokens, kDim),
                                     ae::MutableHeadsView::contiguous(out.data(), kHeads, kTokens, kDim), req);
  };

  Request first = make_request(kHeads, kTokens, kDim, kEmbDim, 0.0f);
  print("request 1", run(first));

  Request second = make_request(kHeads, kTokens, kDim, kEmbDim, 0.05f);
  const ae::EchoResult hit = run(second);
  print("request 2", hit);

  std::vector<float> exact(out.size());
  ae::ThreadPool pool;
  ae::attention(ae::HeadsView::contiguous(second.q.data(), kHeads, kTokens, kDim),
                ae::HeadsView::contiguous(second.k.data(), kHeads, kTokens, kDim),
                ae::HeadsView::contiguous(second.v.data(), kHeads, kTokens, kDim),
                ae::MutableHeadsView::contiguous(exact.data(), kHeads, kTokens, kDim), {}, pool);
  std::printf("request 2 output vs exact attention: relative L2 error %.4f (guard estimate %.4f)\n",
              relative_error(out, exact), hit.estimated_error);

  const ae::CacheStats s = cache.stats();
  std::printf("stats: lookups=%llu hits=%llu misses=%llu hit_rate=%.2f entries=%llu bytes=%llu\n",
              static_cast<unsigned long long>(s.lookups), static_cast<unsigned long long>(s.hits()),
              static_cast<unsigned long long>(s.misses), s.hit_rate(), static_cast<unsigned long long>(s.entries),
              static_cast<unsigned long long>(s.bytes));
  return 0;
}
