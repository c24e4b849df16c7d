// The request boundary of AttentionEchoCache::attention_with_echo: shapes
// (valid or not, q/k/v/out disagreeing), prefix lengths, embeddings, tokens,
// scales and values (NaN, Inf, extremes). Each buffer is exactly as large as
// its own view claims, so a check that trusts the wrong view reads out of
// bounds (ASan). Every call either throws std::invalid_argument or succeeds,
// and a success is checked against exact attention:
//   miss or exact-tier hit: bit-identical to attention();
//   approximate hit: the guard's estimate within max_error.
// Two calls per input (the second may hit what the first stored).
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"

namespace ae = attention_echo;

namespace {

// A value: mostly moderate, sometimes any float bit pattern.
float value(FuzzedDataProvider& in, bool wild) {
  if (wild) return in.ConsumeFloatingPoint<float>();
  return static_cast<float>(in.ConsumeIntegralInRange<int>(-64, 64)) / 8.0f;
}

struct Heads {
  std::vector<float> data;
  int heads, tokens, dim;
  Heads(FuzzedDataProvider& in, int h, int t, int d, bool wild) : heads(h), tokens(t), dim(d) {
    const long long n = static_cast<long long>(std::max(h, 0)) * std::max(t, 0) * std::max(d, 0);
    data.resize(static_cast<std::size_t>(std::max(n, 1LL)));
    for (float& f : data) f = in.remaining_bytes() ? value(in, wild) : 0.0f;
  }
  ae::HeadsView view() const { return ae::HeadsView::contiguous(data.data(), heads, tokens, dim); }
  ae::MutableHeadsView mut() { return ae::MutableHeadsView::contiguous(data.data(), heads, tokens, dim); }
};

// Shape: usually consistent, sometimes one dimension off (or negative).
int around(FuzzedDataProvider& in, int base) {
  return in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<int>(-1, base + 2) : base;
}

struct Case {
  ae::EchoRequest request;
  std::vector<float> embeddings;
  std::vector<std::int32_t> tokens;
  std::string name_space;
};

void fill_request(FuzzedDataProvider& in, int tokens, bool wild, Case& c) {
  ae::EchoRequest& r = c.request;
  r.prefix_length = in.ConsumeIntegralInRange<int>(-2, tokens + 2);
  const int rows = around(in, std::max(r.prefix_length, 1)), cols = around(in, 8);
  c.embeddings.resize(static_cast<std::size_t>(std::max(rows, 0)) * std::max(cols, 0) + 1);
  for (float& f : c.embeddings) f = in.remaining_bytes() ? value(in, wild) : 1.0f;
  if (in.ConsumeBool()) r.prefix_embeddings = {c.embeddings.data(), rows, cols};
  r.layer_id = in.ConsumeIntegralInRange<int>(-1, 3);
  if (in.ConsumeBool()) r.scale = wild ? in.ConsumeFloatingPoint<float>() : in.ConsumeIntegralInRange<int>(1, 8) / 4.0f;
  r.causal = in.ConsumeBool();
  if (in.ConsumeBool()) {
    c.tokens.resize(static_cast<std::size_t>(std::max(around(in, std::max(r.prefix_length, 0)), 0)));
    for (auto& t : c.tokens) t = in.ConsumeIntegralInRange<std::int32_t>(0, 7);
    r.prefix_tokens = c.tokens;
  }
  c.name_space = in.ConsumeBool() ? "" : "tenant";
  r.name_space = c.name_space;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check(ae::AttentionEchoCache& cache, const Heads& q, const Heads& k, const Heads& v, Heads& out,
           const Case& c, ae::ThreadPool& pool) {
  ae::EchoResult r;
  try {
    r = cache.attention_with_echo(q.view(), k.view(), v.view(), out.mut(), c.request);
  } catch (const std::invalid_argument&) {
    return;  // refused, naming the argument: what bad input should get
  }
  if (r.tier == ae::Tier::kSparse || r.tier == ae::Tier::kDense) {
    if (!(r.estimated_error <= cache.config().max_error)) std::abort();
    return;
  }
  Heads exact = out;
  ae::AttentionOptions o;
  o.scale = c.request.scale;
  o.causal = c.request.causal;
  o.prefix_length = c.request.causal ? 0 : std::max(c.request.prefix_length, 0);
  ae::attention(q.view(), k.view(), v.view(), exact.mut(), o, pool);
  if (!same_bits(out.data, exact.data)) std::abort();  // a miss or exact hit is exact attention
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  static ae::ThreadPool pool(1);
  ae::EchoConfig config;
  config.threads = 1;
  config.block_size = in.ConsumeBool() ? 32 : 64;
  config.mode = static_cast<ae::EchoMode>(in.ConsumeIntegralInRange<int>(0, 2));
  config.max_prefix_length = in.ConsumeIntegralInRange<int>(1, 80);
  ae::AttentionEchoCache cache(config);

  const bool wild = in.ConsumeIntegralInRange<int>(0, 3) == 0;
  const int kv_heads = in.ConsumeIntegralInRange<int>(1, 2), group = in.ConsumeIntegralInRange<int>(1, 2);
  const int tokens = in.ConsumeIntegralInRange<int>(1, 80), dim = in.ConsumeIntegralInRange<int>(1, 16);
  const Heads q(in, around(in, kv_heads * group), around(in, tokens), around(in, dim), wild);
  const Heads k(in, around(in, kv_heads), around(in, tokens), around(in, dim), wild);
  const Heads v(in, around(in, kv_heads), around(in, tokens), around(in, dim), wild);
  Heads out(in, around(in, kv_heads * group), around(in, tokens), around(in, dim), false);
  Case request;
  fill_request(in, tokens, wild, request);
  check(cache, q, k, v, out, request, pool);
  check(cache, q, k, v, out, request, pool);  // may hit what the first call stored
  return 0;
}
