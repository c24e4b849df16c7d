// The forward pass. Activations are token-major [rows, width] buffers, so a
// fused QKV projection's output is already the [T, H, D] layout the
// attention views want (HeadsView::token_major with a wider token stride).
#include "attention_echo/llama.hpp"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <functional>
#include <stdexcept>

#include "attention_echo/attention.hpp"
#include "engine/gemm.hpp"

namespace attention_echo::llama {

namespace {

struct PackedLayer {
  std::vector<float> attn_norm, ffn_norm;
  PackedMatrix wqkv;     // [dim + 2 kv_dim, dim]: q, k, v rows stacked
  PackedMatrix wo;       // [dim, dim]
  PackedMatrix gate_up;  // [2 hidden, dim]: gate rows then up rows
  PackedMatrix down;     // [dim, hidden]
};

}  // namespace

struct Model::Packed {
  ModelConfig config;
  std::vector<float> token_embedding;  // [vocab, dim], for row lookup
  std::vector<PackedLayer> layers;
  std::vector<float> final_norm;
  PackedMatrix classifier;  // [vocab, dim]
  std::vector<float> rope_cos, rope_sin;  // [seq_len, head_dim / 2]
  std::uint64_t fingerprint = 0;
};

namespace {

using Clock = std::chrono::steady_clock;

// Row-wise work (norms, RoPE, SwiGLU) in chunks over the pool: fn(r0, r1).
void for_rows(ThreadPool& pool, int n, const std::function<void(int, int)>& fn) {
  constexpr int kChunk = 64;
  pool.parallel_for(static_cast<std::size_t>((n + kChunk - 1) / kChunk), [&](std::size_t c) {
    const int r0 = static_cast<int>(c) * kChunk;
    fn(r0, std::min(n, r0 + kChunk));
  });
}

// Scratch buffers only grow: a prefill allocates once, not once per layer.
std::vector<float>& grow(std::vector<float>& buffer, std::size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer;
}

// Wall and process CPU time at one instant.
struct Stamp {
  Clock::time_point wall;
  double cpu;
  static Stamp now() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return {Clock::now(), static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec)};
  }
  void add_since(double& wall_s, double& cpu_s) const {
    const Stamp end = now();
    wall_s += std::chrono::duration<double>(end.wall - wall).count();
    cpu_s += end.cpu - cpu;
  }
};

std::vector<float> stack(std::initializer_list<const std::vector<float>*> parts) {
  std::vector<float> out;
  for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

void check_size(const std::vector<float>& v, std::size_t n, const char* name) {
  if (v.size() != n)
    throw std::invalid_argument(std::string("weights: ") + name + " has " + std::to_string(v.size()) +
                                " values, expected " + std::to_string(n));
}

void rmsnorm(const float* x, const float* gain, float* out, int rows, int dim, float eps) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<std::size_t>(r) * dim;
    float* o = out + static_cast<std::size_t>(r) * dim;
    float ss = 0.0f;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float s = 1.0f / std::sqrt(ss / dim + eps);
    for (int i = 0; i < dim; ++i) o[i] = xr[i] * s * gain[i];
  }
}

// g = silu(g) * u over one row. libm's expf per element was 10% of a
// prefill, so AVX-512 CPUs take Cephes' expf polynomial (~1 ulp), 16 lanes
// at a time; the rest of the row and other CPUs use std::exp.
// GCC 12 warns about the undefined pass-through inside its own AVX-512
// intrinsic headers (GCC bug 105593); the warning is not about this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) int swiglu_avx512(float* g, const float* u, int n) {
  const __m512 lo = _mm512_set1_ps(-87.0f), hi = _mm512_set1_ps(88.0f), one = _mm512_set1_ps(1.0f);
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j);
    const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), lo), hi);
    // exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in two parts.
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), one);
    const __m512 e = _mm512_scalef_ps(p, k);
    _mm512_storeu_ps(g + j, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
  }
  return j;
}
#pragma GCC diagnostic pop

void swiglu(float* g, const float* u, int n) {
  const bool avx512 = active_isa() == Isa::kAvx512;
  for (int j = avx512 ? swiglu_avx512(g, u, n) : 0; j < n; ++j) g[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
}

// llama2.c RoPE: rotate each adjacent pair (2i, 2i+1) of a head by pos * theta^(-2i/D).
void rope(float* row, int heads, int head_dim, const float* cos, const float* sin) {
  for (int h = 0; h < heads; ++h) {
    float* v = row + h * head_dim;
    for (int i = 0; i < head_dim / 2; ++i) {
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * cos[i] - b * sin[i];
      v[2 * i + 1] = a * sin[i] + b * cos[i];
    }
  }
}

}  // namespace

namespace {

PackedLayer pack_layer(const Weights::Layer& l, const ModelConfig& c) {
  const std::size_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim();
  check_size(l.attn_norm, d, "attn_norm");
  check_size(l.ffn_norm, d, "ffn_norm");
  check_size(l.wq, d * d, "wq");
  check_size(l.wk, kv * d, "wk");
  check_size(l.wv, kv * d, "wv");
  check_size(l.wo, d * d, "wo");
  check_size(l.w_gate, h * d, "w_gate");
  check_size(l.w_up, h * d, "w_up");
  check_size(l.w_down, d * h, "w_down");
  PackedLayer p;
  p.attn_norm = l.attn_norm;
  p.ffn_norm = l.ffn_norm;
  p.wqkv = pack(stack({&l.wq, &l.wk, &l.wv}).data(), c.dim + 2 * c.kv_dim(), c.dim);
  p.wo = pack(l.wo.data(), c.dim, c.dim);
  p.gate_up = pack(stack({&l.w_gate, &l.w_up}).data(), 2 * c.hidden_dim, c.dim);
  p.down = pack(l.w_down.data(), c.dim, c.hidden_dim);
  return p;
}

// cos/sin of pos * theta^(-2i/D) / factor_i, [seq_len, D/2] (factors:
// Weights::rope_freq_factors, 1 where there are none). Angles in double: at
// position 4096 a float product is already ~1e-4 rad off.
void rope_tables(const ModelConfig& c, const std::vector<float>& factors, std::vector<float>& cos,
                 std::vector<float>& sin) {
  const int half = c.head_dim() / 2;
  cos.resize(static_cast<std::size_t>(c.seq_len) * half);
  sin.resize(cos.size());
  for (int pos = 0; pos < c.seq_len; ++pos)
    for (int i = 0; i < half; ++i) {
      const double factor = factors.empty() ? 1.0 : factors[i];
      const double angle = pos * std::pow(static_cast<double>(c.rope_theta), -2.0 * i / c.head_dim()) / factor;
      cos[static_cast<std::size_t>(pos) * half + i] = static_cast<float>(std::cos(angle));
      sin[static_cast<std::size_t>(pos) * half + i] = static_cast<float>(std::sin(angle));
    }
}

}  // namespace

namespace {

// Every value of the config and the weights, 8 bytes at a time (a hash of
// ~60 MB takes ~20 ms): two models share a fingerprint only when they
// compute the same K/V.
std::uint64_t weights_fingerprint(const Weights& w) {
  std::uint64_t h = 0x6a09e667f3bcc908ULL;
  auto mix = [&h](std::uint64_t word) {
    h = (h ^ word) * 0x100000001b3ULL;
    h ^= h >> 29;
  };
  auto add = [&](const std::vector<float>& values) {
    mix(values.size());
    const std::size_t words = values.size() / 2;
    for (std::size_t i = 0; i < words; ++i) {
      std::uint64_t word;
      std::memcpy(&word, values.data() + 2 * i, sizeof word);
      mix(word);
    }
    if (values.size() % 2) {
      std::uint32_t last;
      std::memcpy(&last, &values.back(), sizeof last);
      mix(last);
    }
  };
  const ModelConfig& c = w.config;
  for (int field : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len}) mix(field);
  for (float field : {c.rope_theta, c.norm_eps}) add({field});
  add(w.token_embedding);
  for (const Weights::Layer& l : w.layers)
    for (const auto* m : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_down, &l.w_up})
      add(*m);
  add(w.final_norm);
  add(w.classifier);
  if (!w.rope_freq_factors.empty()) add(w.rope_freq_factors);  // fingerprints of plain-RoPE models unchanged
  return h;
}

}  // namespace

Model::Model(const Weights& w) : packed_(std::make_unique<Packed>()) {
  const ModelConfig& c = w.config;
  c.validate();
  const std::size_t d = c.dim, V = c.vocab_size;
  check_size(w.token_embedding, V * d, "token_embedding");
  check_size(w.final_norm, d, "final_norm");
  if (!w.classifier.empty()) check_size(w.classifier, V * d, "classifier");
  if (w.layers.size() != static_cast<std::size_t>(c.n_layers))
    throw std::invalid_argument("weights: layer count does not match config");
  Packed& m = *packed_;
  m.config = c;
  m.token_embedding = w.token_embedding;
  m.final_norm = w.final_norm;
  m.classifier = pack(w.classifier.empty() ? w.token_embedding.data() : w.classifier.data(), c.vocab_size, c.dim);
  for (const auto& l : w.layers) m.layers.push_back(pack_layer(l, c));
  if (!w.rope_freq_factors.empty()) check_size(w.rope_freq_factors, static_cast<std::size_t>(c.head_dim() / 2), "rope_freq_factors");
  rope_tables(c, w.rope_freq_factors, m.rope_cos, m.rope_sin);
  m.fingerprint = weights_fingerprint(w);
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
const ModelConfig& Model::config() const { return packed_->config; }
std::uint64_t Model::fingerprint() const { return packed_->fingerprint; }

struct Engine::Impl {
  // A constructor, not aggregate init: clang before 16 cannot make_unique an aggregate.
  Impl(const Model::Packed& packed, ThreadPool& threads) : m(packed), pool(threads) {}
  const Model::Packed& m;
  ThreadPool& pool;
  Timers timers;
  std::vector<float> xb, qkv, q_at, att, gu;  // scratch, reused across calls
  std::vector<const float*> k_pages, v_pages;  // the paged K/V views' page starts

  // Rows of x (hidden states of positions pos(i), i < n) through the
  // attention RMSNorm (into xb: the cache keys on it) and the QKV projection
  // into qkv [n, dim + 2 kv_dim], RoPE'd at their positions; their K and V
  // also go to kv's layer at those positions.
  template <typename Position>
  void project(int layer, const float* x, int n, Position pos, KVState& kv);
  // att [n, dim] (the rows' attention outputs) through wo into x, then the
  // SwiGLU MLP: x += down(silu(gate(xb)) * up(xb)).
  void finish(int layer, float* x, int n);
  // Checks the layer and rows, and readies kv's rows [t0, t1) for writing
  // (rows below t0 must be there).
  void prepare(int layer, int t0, int t1, KVState& kv) const;
  // Layer `layer`'s K and V of positions [0, tokens) as paged views of kv.
  std::pair<HeadsView, HeadsView> kv_views(const KVState& kv, int layer, int tokens);
};

void Engine::Impl::prepare(int layer, int t0, int t1, KVState& kv) const {
  const ModelConfig& c = m.config;
  if (layer < 0 || layer >= c.n_layers) throw std::invalid_argument("layer: out of range");
  if (t0 < 0 || t1 > c.seq_len || t0 >= t1) throw std::invalid_argument("rows: need 0 <= t0 < t1 <= seq_len");
  kv.make_writable(t0, t1, c.n_layers, c.kv_dim());
}

std::pair<HeadsView, HeadsView> Engine::Impl::kv_views(const KVState& kv, int layer, int tokens) {
  const ModelConfig& c = m.config;
  k_pages.clear();
  v_pages.clear();
  for (int t = 0; t < tokens; t += kv.page_tokens) {
    k_pages.push_back(kv.k(layer, t));
    v_pages.push_back(kv.v(layer, t));
  }
  return {HeadsView::paged(k_pages.data(), kv.page_tokens, c.n_kv_heads, tokens, c.head_dim(), c.kv_dim()),
          HeadsView::paged(v_pages.data(), kv.page_tokens, c.n_kv_heads, tokens, c.head_dim(), c.kv_dim())};
}

template <typename Position>
void Engine::Impl::project(int layer, const float* x, int n, Position pos, KVState& kv) {
  const ModelConfig& c = m.config;
  const PackedLayer& w = m.layers[layer];
  const int dim = c.dim, kvd = c.kv_dim(), hd = c.head_dim(), half = hd / 2, width = dim + 2 * kvd;
  grow(xb, static_cast<std::size_t>(n) * dim);
  for_rows(pool, n, [&](int r0, int r1) {
    rmsnorm(x + std::size_t(r0) * dim, w.attn_norm.data(), xb.data() + std::size_t(r0) * dim, r1 - r0, dim, c.norm_eps);
  });
  grow(qkv, static_cast<std::size_t>(n) * width);
  gemm(xb.data(), dim, n, w.wqkv, qkv.data(), width, false, pool);
  for_rows(pool, n, [&](int r0, int r1) {
    for (int i = r0; i < r1; ++i) {
      float* r = qkv.data() + static_cast<std::size_t>(i) * width;
      const int at = pos(i);
      const std::size_t table = static_cast<std::size_t>(at) * half;
      rope(r, c.n_heads, hd, m.rope_cos.data() + table, m.rope_sin.data() + table);
      rope(r + dim, c.n_kv_heads, hd, m.rope_cos.data() + table, m.rope_sin.data() + table);
      std::copy(r + dim, r + dim + kvd, kv.writable_k(layer, at));
      std::copy(r + dim + kvd, r + width, kv.writable_v(layer, at));
    }
  });
}

void Engine::Impl::finish(int layer, float* x, int n) {
  const ModelConfig& c = m.config;
  const PackedLayer& w = m.layers[layer];
  const int dim = c.dim, hidden = c.hidden_dim;
  gemm(att.data(), dim, n, w.wo, x, dim, true, pool);
  for_rows(pool, n, [&](int r0, int r1) {
    rmsnorm(x + std::size_t(r0) * dim, w.ffn_norm.data(), xb.data() + std::size_t(r0) * dim, r1 - r0, dim, c.norm_eps);
  });
  grow(gu, static_cast<std::size_t>(n) * 2 * hidden);
  gemm(xb.data(), dim, n, w.gate_up, gu.data(), 2 * hidden, false, pool);
  for_rows(pool, n, [&](int r0, int r1) {
    for (int i = r0; i < r1; ++i) {
      float* g = gu.data() + static_cast<std::size_t>(i) * 2 * hidden;
      swiglu(g, g + hidden, hidden);
    }
  });
  gemm(gu.data(), 2 * hidden, n, w.down, x, dim, true, pool);
}

Engine::Engine(const Model& model, ThreadPool& pool) : impl_(std::make_unique<Impl>(model.packed(), pool)) {}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;

const ModelConfig& Engine::config() const { return impl_->m.config; }
Timers& Engine::timers() { return impl_->timers; }

EchoResult Engine::layer_forward(int layer, float* x, int t0, int t1, KVState& kv, const AttentionRoute& route) {
  Impl& e = *impl_;
  const ModelConfig& c = e.m.config;
  const int n = t1 - t0, dim = c.dim, hd = c.head_dim(), width = dim + 2 * c.kv_dim();
  if (route.cache && t0 != 0) throw std::invalid_argument("route: the echo cache needs the whole sequence (t0 == 0)");
  e.prepare(layer, t0, t1, kv);
  e.project(layer, x, n, [t0](int i) { return t0 + i; }, kv);

  // q and out are the new rows [t0, t1); keys are every row [0, t1).
  grow(e.att, static_cast<std::size_t>(n) * dim);
  const HeadsView q{e.qkv.data(), c.n_heads, n, hd, hd, width};
  const MutableHeadsView out = MutableHeadsView::token_major(e.att.data(), c.n_heads, n, hd);
  EchoResult echo;
  const Stamp start = Stamp::now();
  if (route.cache) {
    // t0 == 0: every key row is new, so the K and V columns of qkv (RoPE'd
    // in place by project) are all of them, contiguous for the cache.
    const HeadsView k{e.qkv.data() + dim, c.n_kv_heads, n, hd, hd, width};
    const HeadsView v{e.qkv.data() + dim + c.kv_dim(), c.n_kv_heads, n, hd, hd, width};
    EchoRequest request;
    request.prefix_length = route.prefix_length;
    // xb (the normed layer input) is exactly what Q/K/V are made from.
    request.prefix_embeddings = {e.xb.data(), route.prefix_length, dim};
    request.layer_id = layer;
    request.prefix_tokens = route.prefix_tokens;
    request.name_space = route.name_space;
    echo = route.cache->attention_with_echo(q, k, v, out, request);
  } else {
    AttentionOptions options;
    options.query_offset = t0;
    options.check_finite = false;  // this engine's own projections of finite weights
    const auto [k, v] = e.kv_views(kv, layer, t1);
    attention(q, k, v, out, options, e.pool);
  }
  start.add_since(e.timers.attention_s, e.timers.attention_cpu_s);
  e.finish(layer, x, n);
  return echo;
}

std::vector<float> Engine::project_kv(int layer, const float* x, int t0, int t1, KVState& kv) {
  Impl& e = *impl_;
  e.prepare(layer, t0, t1, kv);
  e.project(layer, x, t1 - t0, [t0](int i) { return t0 + i; }, kv);
  const ModelConfig& c = e.m.config;
  const float* last = e.qkv.data() + static_cast<std::size_t>(t1 - t0 - 1) * (c.dim + 2 * c.kv_dim());
  return std::vector<float>(last, last + c.dim);
}

void Engine::layer_forward_rows(int layer, float* x, std::span<const int> positions, KVState& kv) {
  Impl& e = *impl_;
  const ModelConfig& c = e.m.config;
  const int n = static_cast<int>(positions.size()), dim = c.dim, hd = c.head_dim(), width = dim + 2 * c.kv_dim();
  if (n == 0) throw std::invalid_argument("positions: empty");
  const int T = positions.back() + 1;
  e.prepare(layer, positions.front(), T, kv);
  e.project(layer, x, n, [positions](int i) { return positions[i]; }, kv);
  // attention_rows reads q at the rows' positions of a [T, dim] buffer.
  grow(e.q_at, static_cast<std::size_t>(T) * dim);
  for (int i = 0; i < n; ++i)
    std::copy_n(e.qkv.data() + static_cast<std::size_t>(i) * width, dim,
                e.q_at.data() + static_cast<std::size_t>(positions[i]) * dim);
  grow(e.att, static_cast<std::size_t>(n) * dim);
  const Stamp start = Stamp::now();
  const auto [k, v] = e.kv_views(kv, layer, T);
  AttentionOptions options;
  options.check_finite = false;  // this engine's own projections of finite weights
  attention_rows(HeadsView::token_major(e.q_at.data(), c.n_heads, T, hd), k, v, positions,
                 MutableHeadsView::token_major(e.att.data(), c.n_heads, n, hd), options, e.pool);
  start.add_since(e.timers.attention_s, e.timers.attention_cpu_s);
  e.finish(layer, x, n);
}

void Engine::rerotate_k(float* k_row, int from, int to) const {
  const Model::Packed& m = impl_->m;
  const ModelConfig& c = m.config;
  const int delta = to - from, half = c.head_dim() / 2;
  if (from < 0 || to < 0 || from >= c.seq_len || to >= c.seq_len)
    throw std::invalid_argument("from, to: positions must be in [0, seq_len)");
  // RoPE(to) = RoPE(to - from) * RoPE(from); a negative shift is the
  // inverse rotation: cos even, sin odd.
  const std::size_t at = static_cast<std::size_t>(std::abs(delta)) * half;
  std::vector<float> sin(m.rope_sin.begin() + static_cast<std::ptrdiff_t>(at),
                         m.rope_sin.begin() + static_cast<std::ptrdiff_t>(at + half));
  if (delta < 0)
    for (float& s : sin) s = -s;
  rope(k_row, c.n_kv_heads, c.head_dim(), m.rope_cos.data() + at, sin.data());
}

std::vector<float> Engine::embed(std::span<const int> tokens) const {
  const Model::Packed& m = impl_->m;
  const ModelConfig& c = m.config;
  std::vector<float> x(tokens.size() * c.dim);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw std::invalid_argument("tokens: id " + std::to_string(tokens[i]) + " is out of range");
    std::copy_n(m.token_embedding.begin() + static_cast<std::ptrdiff_t>(tokens[i]) * c.dim, c.dim,
                x.begin() + static_cast<std::ptrdiff_t>(i * c.dim));
  }
  return x;
}

void Engine::head(const float* x, int rows, ForwardResult& result) {
  const Model::Packed& m = impl_->m;
  ThreadPool& pool = impl_->pool;
  const ModelConfig& c = m.config;
  result.hidden.resize(static_cast<std::size_t>(rows) * c.dim);
  rmsnorm(x, m.final_norm.data(), result.hidden.data(), rows, c.dim, c.norm_eps);
  result.logits.resize(static_cast<std::size_t>(rows) * c.vocab_size);
  gemm(result.hidden.data(), c.dim, rows, m.classifier, result.logits.data(), c.vocab_size, false, pool);
}

ForwardResult Engine::forward(std::span<const int> tokens, KVState& kv, const AttentionRoute& route, int keep_rows) {
  Impl& e = *impl_;
  const Model::Packed& m = impl_->m;
  const ModelConfig& c = m.config;
  const int n = static_cast<int>(tokens.size());
  const int t0 = kv.length, t1 = t0 + n;
  if (n == 0) throw std::invalid_argument("tokens: empty");
  if (t1 > c.seq_len)
    throw std::invalid_argument("tokens: " + std::to_string(t1) + " positions exceed the model's context of " +
                                std::to_string(c.seq_len));
  if (route.prefix_length < 0 || route.prefix_length > n)
    throw std::invalid_argument("route: prefix_length must be in [0, tokens]");
  if (route.cache && t0 != 0) throw std::invalid_argument("route: the echo cache needs the whole sequence (kv must be empty)");
  const Stamp start = Stamp::now();
  std::vector<float> x = embed(tokens);
  ForwardResult result;
  for (int l = 0; l < c.n_layers; ++l) {
    const double before = e.timers.attention_cpu_s;
    EchoResult echo = layer_forward(l, x.data(), t0, t1, kv, route);
    result.attention_cpu_s.push_back(e.timers.attention_cpu_s - before);
    if (route.cache) result.echo.push_back(echo);
  }
  kv.length = t1;
  const int keep = keep_rows < 0 ? n : std::min(keep_rows, n);
  head(x.data() + static_cast<std::size_t>(n - keep) * c.dim, keep, result);
  start.add_since(e.timers.total_s, e.timers.total_cpu_s);
  return result;
}

}  // namespace attention_echo::llama
