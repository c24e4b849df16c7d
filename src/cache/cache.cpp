#include "attention_echo/cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>

#include "cache/cache_impl.hpp"
#include "core/validate.hpp"

namespace attention_echo {

using cache::Entry;
using cache::KeySpace;
using cache::Payload;
using kernels::AttentionProblem;

std::string_view to_string(Tier tier) {
  switch (tier) {
    case Tier::kNone: return "none";
    case Tier::kExact: return "exact";
    case Tier::kSparse: return "sparse";
    case Tier::kDense: return "dense";
  }
  return "?";
}

std::string_view EchoResult::compute_mode() const {
  if (tier == Tier::kExact) return "exact";
  return echo_hit ? "echo" : "full";
}

namespace {

// Candidates the semantic index returns per lookup; the first that also
// passes the length and payload checks is used.
constexpr int kCandidates = 8;

// Attention FLOPs of rows [0, rows) of the prefix block: 4*D per (row, key)
// pair (QK^T and PV, a multiply-add each).
double block_flops(int heads, int dim, int rows, bool causal) {
  const double r = rows;
  return 4.0 * heads * dim * (causal ? r * (r + 1) / 2 : r * r);
}

// Cheap and exact: any change to k's prefix rows changes it (with
// overwhelming probability), so same tokens with other weights is a miss.
// Four independent multiply-xorshift lanes keep the loop at memory speed
// instead of one long dependency chain.
std::uint64_t fingerprint(const HeadsView& k, int prefix) {
  constexpr std::uint64_t kMul = 0x9fb21c651e98df25ULL;
  std::uint64_t lane[4] = {0x243f6a8885a308d3ULL, 0x13198a2e03707344ULL, 0xa4093822299f31d0ULL,
                           0x082efa98ec4e6c89ULL};
  auto mix = [&](std::uint64_t& h, std::uint64_t word) {
    h = (h ^ word) * kMul;
    h ^= h >> 32;
  };
  for (int kh = 0; kh < k.heads; ++kh)
    for (int t = 0; t < prefix; ++t) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(k.row(kh, t));
      const std::size_t n = sizeof(float) * static_cast<std::size_t>(k.dim);
      std::size_t i = 0;
      for (; i + 32 <= n; i += 32)
        for (int l = 0; l < 4; ++l) {
          std::uint64_t word;
          std::memcpy(&word, bytes + i + 8 * l, 8);
          mix(lane[l], word);
        }
      for (; i + 4 <= n; i += 4) {
        std::uint32_t word;
        std::memcpy(&word, bytes + i, 4);
        mix(lane[0], word);
      }
    }
  std::uint64_t h = lane[0];
  for (int l = 1; l < 4; ++l) mix(h, lane[l]);
  return h;
}

// r rows spread over [0, prefix), one per stratum at a fixed pseudo-random
// offset, so the guard samples the whole prefix the same way every run.
std::vector<int> guard_rows(int prefix, int count) {
  count = std::min(count, prefix);
  std::vector<int> rows(count);
  std::uint64_t state = 0x9e3779b97f4a7c15ULL;
  for (int r = 0; r < count; ++r) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const double offset = static_cast<double>(state >> 11) / 9007199254740992.0;  // [0, 1)
    rows[r] = std::min(prefix - 1, static_cast<int>((r + offset) * prefix / count));
  }
  return rows;
}

// Max over heads of ||echo - exact|| / ||exact|| on the guard rows.
double relative_error(const MutableHeadsView& out, std::span<const int> rows, const std::vector<float>& exact) {
  double worst = 0.0;
  const int dim = out.dim;
  for (int h = 0; h < out.heads; ++h) {
    double diff2 = 0.0, ref2 = 0.0;
    for (std::size_t r = 0; r < rows.size(); ++r) {
      const float* echo = out.row(h, rows[r]);
      const float* ref = exact.data() + (h * rows.size() + r) * dim;
      for (int d = 0; d < dim; ++d) {
        const double e = double(echo[d]) - double(ref[d]);
        diff2 += e * e;
        ref2 += double(ref[d]) * ref[d];
      }
    }
    worst = std::max(worst, ref2 > 0.0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2));
  }
  return worst;
}

double kept_fraction(const kernels::TileSet& kept, int rows, int block) {
  const int tiles = (rows + block - 1) / block;
  double kept_tiles = 0, all_tiles = 0;
  for (int h = 0; h < kept.heads; ++h)
    for (int i = 0; i < tiles; ++i) {
      const std::size_t row = static_cast<std::size_t>(h) * kept.tiles + i;
      for (std::uint32_t c = kept.offsets[row]; c < kept.offsets[row + 1]; ++c) kept_tiles += kept.cols[c] < tiles;
      all_tiles += tiles == 0 ? 0 : std::min(i + 1, tiles);
    }
  return all_tiles > 0 ? kept_tiles / all_tiles : 1.0;
}

void copy_rows_out(const HeadsView& src, int rows, std::vector<float>& dst) {
  dst.resize(static_cast<std::size_t>(src.heads) * rows * src.dim);
  for (int h = 0; h < src.heads; ++h)
    for (int t = 0; t < rows; ++t)
      std::memcpy(dst.data() + (static_cast<std::size_t>(h) * rows + t) * src.dim, src.row(h, t),
                  sizeof(float) * src.dim);
}

void copy_rows_in(const std::vector<float>& src, int rows, const MutableHeadsView& dst) {
  for (int h = 0; h < dst.heads; ++h)
    for (int t = 0; t < rows; ++t)
      std::memcpy(dst.row(h, t), src.data() + (static_cast<std::size_t>(h) * rows + t) * dst.dim,
                  sizeof(float) * dst.dim);
}

}  // namespace

// ---- the call, step by step -------------------------------------------------

struct AttentionEchoCache::Impl::Call {
  AttentionProblem problem;
  int prefix = 0;  // cached prefix rows: min(prefix_length, max_prefix_length)
  KeySpace space;
  std::span<const std::int32_t> tokens;
  std::uint64_t k_fingerprint = 0;
  std::vector<float> key;
  EchoResult result;
  CacheStats delta;  // applied to the stats in one locked step at the end
};

AttentionEchoCache::Impl::Impl(EchoConfig c)
    : config((c.validate(), c)),
      pool(static_cast<int>(config.threads)),
      keyer(static_cast<int>(config.hash_dim)),
      store(config.eviction_policy, static_cast<std::size_t>(config.capacity),
            static_cast<std::size_t>(config.max_bytes)) {}

void AttentionEchoCache::Impl::validate_request(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                                                const MutableHeadsView& out, const EchoRequest& req) const {
  validate_attention_inputs(q, k, v, out, req.prefix_length);
  if (req.scale) validate_scale(*req.scale);
  if (req.layer_id < 0) throw std::invalid_argument("layer_id: must be non-negative");
  if (req.prefix_length > 0) {
    if (req.prefix_embeddings.data == nullptr)
      throw std::invalid_argument("prefix_embeddings: required when prefix_length > 0");
    validate_matrix("prefix_embeddings", req.prefix_embeddings);
  }
  if (!req.prefix_tokens.empty() && static_cast<int>(req.prefix_tokens.size()) != req.prefix_length)
    throw std::invalid_argument("prefix_tokens: length " + std::to_string(req.prefix_tokens.size()) +
                                " != prefix_length " + std::to_string(req.prefix_length));
}

AttentionEchoCache::Impl::Call AttentionEchoCache::Impl::plan(const HeadsView& q, const HeadsView& k,
                                                              const HeadsView& v, const MutableHeadsView& out,
                                                              const EchoRequest& req) const {
  Call call;
  call.problem = {q, k, v, out, req.scale.value_or(1.0f / std::sqrt(static_cast<float>(q.dim))), req.causal,
                  req.prefix_length};
  call.prefix = static_cast<int>(std::min<long long>(req.prefix_length, config.max_prefix_length));
  // Non-causal prefix rows see the whole prefix; a truncated block would
  // change them, so such prefixes are not cached.
  if (!req.causal && call.prefix != req.prefix_length) call.prefix = 0;
  call.space = {std::string(req.name_space), config.per_layer ? req.layer_id : -1, q.heads, k.heads, q.dim,
                req.causal};
  if (!req.prefix_tokens.empty()) {
    call.tokens = req.prefix_tokens.first(call.prefix);
    call.k_fingerprint = fingerprint(k, call.prefix);
  }
  call.result.layer_id = req.layer_id;
  return call;
}

// Exact tier: same space, tokens and k fingerprint -> copy the rows.
bool AttentionEchoCache::Impl::try_exact(Call& call) {
  if (call.tokens.empty()) return false;
  std::shared_ptr<const Payload> payload;
  {
    std::lock_guard lock(mutex);
    const Entry* e = store.find_exact(call.space, call.tokens);
    if (e == nullptr || e->k_fingerprint != call.k_fingerprint || e->payload->exact_rows.empty()) return false;
    payload = e->payload;
    store.touch(e->id);
  }
  copy_rows_in(payload->exact_rows, call.prefix, call.problem.out);
  kernels::exact_rows(call.problem, call.prefix, call.problem.q.tokens, pool);
  EchoResult& r = call.result;
  r.echo_hit = true;
  r.similarity = 1.0;
  r.tier = Tier::kExact;
  r.tokens_echoed = call.prefix;
  r.tokens_computed = call.problem.q.tokens - call.prefix;
  call.delta.hits_exact = 1;
  call.delta.flops_saved = block_flops(call.space.heads, call.space.dim, call.prefix, call.space.causal);
  return true;
}

// The best semantic candidate whose payload serves this call's mode and
// whose prefix length is within tolerance.
std::optional<AttentionEchoCache::Impl::Candidate> AttentionEchoCache::Impl::find_echo(Call& call) {
  std::lock_guard lock(mutex);
  const auto found = store.find_similar(call.space, call.key, kCandidates,
                                        static_cast<float>(config.similarity_threshold));
  if (!found.empty()) call.result.similarity = found.front().similarity;
  for (const index::Candidate& c : found) {
    const Entry* e = store.get(c.id);
    const Payload& p = *e->payload;
    const bool has_tier = config.mode == EchoMode::kSparse ? p.tiles.has_value() : p.dense.has_value();
    const bool length_ok = call.space.causal
                               ? std::abs(call.prefix - p.prefix) <= config.length_tolerance * p.prefix
                               : call.prefix == p.prefix;
    if (!has_tier || !length_ok) continue;
    store.touch(e->id);
    return Candidate{e->id, c.similarity, e->payload};
  }
  return std::nullopt;
}

// Sparse or dense echo of rows [0, min(p, p_c)), checked by the guard.
// Returns false when the guard rejects it (out is then garbage).
bool AttentionEchoCache::Impl::serve_echo(Call& call, const Candidate& cand) {
  const Payload& payload = *cand.payload;
  const int rows = std::min(call.prefix, payload.prefix);
  const bool sparse = config.mode == EchoMode::kSparse;
  const int heads = call.space.heads, dim = call.space.dim;
  EchoResult& r = call.result;
  r.similarity = cand.similarity;

  double echo_cost = 0.0;
  if (sparse) {
    kernels::sparse_rows(call.problem, rows, *payload.tiles, pool);
    r.kept_fraction = kept_fraction(*payload.tiles, rows, payload.tiles->block);
    echo_cost = r.kept_fraction * block_flops(heads, dim, rows, call.space.causal);
  } else {
    kernels::dense_echo_rows(call.problem, rows, *payload.dense, static_cast<float>(config.adjustment_strength),
                             config.enable_jacobian, pool);
    echo_cost = 0.5 * block_flops(heads, dim, rows, call.space.causal);  // the PV half is still done
  }

  double guard_cost = 0.0;
  r.estimated_error = std::numeric_limits<double>::quiet_NaN();  // guard off: not measured
  if (std::isfinite(config.max_error)) {
    const std::vector<int> check = guard_rows(rows, static_cast<int>(config.verify_rows));
    std::vector<float> exact(static_cast<std::size_t>(heads) * check.size() * dim);
    kernels::selected_rows(call.problem, check, exact.data(), pool);
    r.estimated_error = relative_error(call.problem.out, check, exact);
    for (int row : check) guard_cost += 4.0 * heads * dim * call.problem.key_end(row);
    if (r.estimated_error > config.max_error) {
      r.rejected = true;
      call.delta.rejected = 1;
      call.delta.flops_saved = -(echo_cost + guard_cost);
      return false;
    }
  }
  kernels::exact_rows(call.problem, rows, call.problem.q.tokens, pool);
  r.echo_hit = true;
  r.tier = sparse ? Tier::kSparse : Tier::kDense;
  r.tokens_echoed = rows;
  r.tokens_computed = call.problem.q.tokens - rows;
  (sparse ? call.delta.hits_sparse : call.delta.hits_dense) = 1;
  call.delta.flops_saved = block_flops(heads, dim, rows, call.space.causal) - echo_cost - guard_cost;
  return true;
}

// Miss (or rejected hit): exact attention for every row, capturing what the
// tiers need, and a new entry.
std::optional<Entry> AttentionEchoCache::Impl::compute_miss(Call& call) {
  const bool want_exact = !call.tokens.empty();
  const bool want_echo = config.mode != EchoMode::kExact && !call.key.empty();
  auto payload = std::make_shared<Payload>();
  payload->prefix = call.prefix;
  if (want_echo && config.mode == EchoMode::kSparse) {
    kernels::TileMass mass;
    mass.block = static_cast<int>(config.block_size);
    kernels::exact_rows(call.problem, 0, call.problem.q.tokens, pool, &mass, call.prefix);
    payload->tiles = kernels::select_tiles(mass, call.space.heads, config.sparse_mass);
  } else if (want_echo) {
    payload->dense = kernels::exact_rows_with_dense_logits(call.problem, call.prefix, pool);
  } else {
    kernels::exact_rows(call.problem, 0, call.problem.q.tokens, pool);
  }
  EchoResult& r = call.result;
  r.echo_hit = false;
  r.tier = Tier::kNone;
  r.tokens_echoed = 0;
  r.tokens_computed = call.problem.q.tokens;
  r.kept_fraction = 1.0;
  call.delta.misses = 1;
  if (!want_exact && !want_echo) return std::nullopt;
  if (want_exact) copy_rows_out(as_const(call.problem.out), call.prefix, payload->exact_rows);

  Entry e;
  e.space = call.space;
  if (want_echo) e.key = call.key;
  e.tokens.assign(call.tokens.begin(), call.tokens.end());
  e.k_fingerprint = call.k_fingerprint;
  e.payload = std::move(payload);
  return e;
}

void AttentionEchoCache::Impl::finish(Call& call, std::optional<Entry> entry, std::optional<std::uint64_t> replaced) {
  std::lock_guard lock(mutex);
  if (replaced) store.remove(*replaced);
  if (entry) {
    const int evicted = store.insert(std::move(*entry));
    if (evicted > 0) stats.evictions += static_cast<std::uint64_t>(evicted);
  }
  const CacheStats& d = call.delta;
  stats.lookups += 1;
  stats.hits_exact += d.hits_exact;
  stats.hits_sparse += d.hits_sparse;
  stats.hits_dense += d.hits_dense;
  stats.misses += d.misses;
  stats.rejected += d.rejected;
  stats.tokens_echoed += static_cast<std::uint64_t>(call.result.tokens_echoed);
  stats.tokens_computed += static_cast<std::uint64_t>(call.result.tokens_computed);
  stats.flops_saved += d.flops_saved;
}

EchoResult AttentionEchoCache::Impl::run(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                                         const MutableHeadsView& out, const EchoRequest& req) {
  validate_request(q, k, v, out, req);
  Call call = plan(q, k, v, out, req);
  if (call.prefix == 0) {  // nothing reusable: plain attention, not a lookup
    kernels::exact_rows(call.problem, 0, q.tokens, pool);
    call.result.tokens_computed = q.tokens;
    std::lock_guard lock(mutex);
    stats.tokens_computed += static_cast<std::uint64_t>(q.tokens);
    return call.result;
  }
  if (try_exact(call)) {
    finish(call, std::nullopt, std::nullopt);
    return call.result;
  }
  std::optional<std::uint64_t> replaced;
  if (config.mode != EchoMode::kExact) {
    call.key = keyer.key(req.prefix_embeddings);
    if (auto cand = find_echo(call)) {
      if (serve_echo(call, *cand)) {
        finish(call, std::nullopt, std::nullopt);
        return call.result;
      }
      replaced = cand->id;  // the guard refused it: the fresh entry replaces it
    }
  }
  auto entry = compute_miss(call);
  finish(call, std::move(entry), replaced);
  return call.result;
}

// ---- public surface -----------------------------------------------------------

AttentionEchoCache::AttentionEchoCache(EchoConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}
AttentionEchoCache::~AttentionEchoCache() = default;

EchoResult AttentionEchoCache::attention_with_echo(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                                                   const MutableHeadsView& out, const EchoRequest& request) {
  return impl_->run(q, k, v, out, request);
}

std::vector<float> AttentionEchoCache::compute_semantic_key(const MatrixView& embeddings) const {
  validate_matrix("prefix_embeddings", embeddings);
  return impl_->keyer.key(embeddings);
}

CacheStats AttentionEchoCache::stats() const {
  std::lock_guard lock(impl_->mutex);
  CacheStats s = impl_->stats;
  s.entries = impl_->store.size();
  s.bytes = impl_->store.bytes();
  return s;
}

std::size_t AttentionEchoCache::size() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->store.size();
}

void AttentionEchoCache::clear() {
  std::lock_guard lock(impl_->mutex);
  impl_->store.clear();
  impl_->stats = {};
}

const EchoConfig& AttentionEchoCache::config() const { return impl_->config; }

}  // namespace attention_echo
