// Inputs for cache tests: q/k/v whose attention looks like a trained head's
// (a sink at token 0 plus a local band), so the sparse tier keeps few tiles
// and a near-duplicate request attends the same way.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "attention_echo/cache.hpp"

namespace attention_echo::testing {

struct Qkv {
  int heads, kv_heads, tokens, dim;
  std::vector<float> q, k, v, out, emb;
  std::vector<std::int32_t> tokens_ids;

  HeadsView qv() const { return HeadsView::contiguous(q.data(), heads, tokens, dim); }
  HeadsView kv() const { return HeadsView::contiguous(k.data(), kv_heads, tokens, dim); }
  HeadsView vv() const { return HeadsView::contiguous(v.data(), kv_heads, tokens, dim); }
  MutableHeadsView ov() { return MutableHeadsView::contiguous(out.data(), heads, tokens, dim); }
  MatrixView embeddings(int rows) const { return {emb.data(), rows, emb_dim}; }
  static constexpr int emb_dim = 16;
};

// seed picks the random content; noise > 0 perturbs every value by that
// relative amount (a near-duplicate of the same seed).
inline Qkv make_qkv(int heads, int kv_heads, int tokens, int dim, unsigned seed, float noise = 0.0f) {
  Qkv x{heads, kv_heads, tokens, dim, {}, {}, {}, {}, {}, {}};
  std::mt19937 base(seed), jitter(seed * 7919u + 17u);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto draw = [&] { return n01(base) + noise * n01(jitter); };
  x.k.resize(static_cast<std::size_t>(kv_heads) * tokens * dim);
  x.v.resize(x.k.size());
  for (float& f : x.k) f = draw();
  for (float& f : x.v) f = draw();
  x.q.resize(static_cast<std::size_t>(heads) * tokens * dim);
  const int group = heads / kv_heads;
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t)
      for (int d = 0; d < dim; ++d) {
        const float* kk = x.k.data() + static_cast<std::size_t>(h / group) * tokens * dim;
        // q_t points at k_t (local band) and k_0 (sink): peaked attention.
        x.q[(static_cast<std::size_t>(h) * tokens + t) * dim + d] =
            3.0f * (kk[t * dim + d] + kk[d]) + 0.3f * draw();
      }
  x.out.assign(x.q.size(), 0.0f);
  // Each row is the seed's own direction plus noise: mean pooling recovers
  // the direction, so one seed's near-duplicates match and other seeds don't.
  std::vector<float> direction(Qkv::emb_dim);
  for (float& f : direction) f = draw();
  x.emb.resize(static_cast<std::size_t>(tokens) * Qkv::emb_dim);
  for (std::size_t i = 0; i < x.emb.size(); ++i) x.emb[i] = direction[i % Qkv::emb_dim] + 0.3f * draw();
  x.tokens_ids.resize(tokens);
  for (int t = 0; t < tokens; ++t) x.tokens_ids[t] = static_cast<std::int32_t>((seed * 31u + t) % 50000u);
  return x;
}

inline EchoRequest request_for(const Qkv& x, int prefix, bool with_tokens = false, int layer = 0) {
  EchoRequest r;
  r.prefix_length = prefix;
  r.prefix_embeddings = x.embeddings(prefix > 0 ? prefix : 1);
  r.layer_id = layer;
  if (with_tokens) r.prefix_tokens = std::span<const std::int32_t>(x.tokens_ids.data(), prefix);
  return r;
}

inline EchoResult call(AttentionEchoCache& cache, Qkv& x, const EchoRequest& r) {
  return cache.attention_with_echo(x.qv(), x.kv(), x.vv(), x.ov(), r);
}

// Relative L2 distance of two equally sized buffers.
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace attention_echo::testing
