#include "attention_echo/cache.hpp"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>

#include "cache/cache_impl.hpp"
#include "core/errors.hpp"
#include "core/validate.hpp"
#ifdef AE_HAVE_CUDA
#include "kernels/cuda/cuda_backend.hpp"
#endif

namespace attention_echo {

using cache::Call;
using cache::Entry;
using cache::ReuseTier;

std::string_view to_string(Tier tier) {
  switch (tier) {
    case Tier::kNone: return "none";
    case Tier::kExact: return "exact";
    case Tier::kSparse: return "sparse";
    case Tier::kDense: return "dense";
  }
  return "?";
}

std::uint64_t CacheStats::*CacheStats::counter(Tier tier) {
  switch (tier) {
    case Tier::kNone: return &CacheStats::misses;
    case Tier::kExact: return &CacheStats::hits_exact;
    case Tier::kSparse: return &CacheStats::hits_sparse;
    case Tier::kDense: return &CacheStats::hits_dense;
  }
  throw_invalid("tier", "unknown value " + std::to_string(static_cast<int>(tier)));
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
double block_flops(const cache::KeySpace& space, int rows) {
  const double r = rows;
  return 4.0 * space.heads * space.dim * (space.causal ? r * (r + 1) / 2 : r * r);
}

// Whether a miss of this call gives the tier something to be found by later.
bool can_capture(const Call& call, const ReuseTier& tier) {
  return tier.match() == cache::Match::kTokens ? !call.tokens.empty() : !call.key.empty();
}

std::optional<cache::L2Entries> make_l2(const EchoConfig& config, const cache::TierSet& tiers,
                                        std::shared_ptr<L2Store> store) {
  if (!store && !config.store_url.empty()) store = connect_redis(parse_l2_url(config.store_url));
  if (!store) return std::nullopt;
  return cache::L2Entries(std::move(store), config, tiers);
}

}  // namespace

// ---- the call, step by step -------------------------------------------------

AttentionEchoCache::Impl::Impl(EchoConfig c, std::shared_ptr<L2Store> shared)
    : config((c.validate(), c)),
      tiers(config),
      guard(config.max_error, static_cast<int>(config.verify_rows)),
      pool(static_cast<int>(config.threads)),
      keyer(static_cast<int>(config.hash_dim)),
      store(config.eviction_policy, static_cast<std::size_t>(config.capacity),
            static_cast<std::size_t>(config.max_bytes), static_cast<std::size_t>(config.device_max_bytes)),
      l2(make_l2(config, tiers, std::move(shared))) {}

const kernels::Backend& AttentionEchoCache::Impl::backend_for(Device device, void* stream,
                                                              std::unique_ptr<kernels::Backend>& made) const {
  if (device == Device::cpu()) return cpu_backend;
#ifdef AE_HAVE_CUDA
  if (device.kind == DeviceKind::kCuda) return *(made = kernels::cuda::make_backend(device.index, stream));
#endif
  (void)stream;
  (void)made;
  throw_invalid("query", "is on " + to_string(device) + ", which this build does not run (AE_CUDA=OFF)");
}

// Everything but the views' shapes (validate_attention_inputs, before the
// call was planned): what the backend can run, then the request's fields.
void AttentionEchoCache::Impl::validate_request(const Call& call, const EchoRequest& req,
                                                const kernels::Backend& backend) const {
  backend.check_problem(call.problem);
  if (call.space.device != Device::cpu() && config.mode == EchoMode::kDense)
    throw_invalid("mode", "dense echo runs on the host only: use sparse or off with CUDA tensors");
  if (call.space.device != Device::cpu() && config.mode == EchoMode::kSparse && config.block_size % 64 != 0)
    throw_invalid("block_size", "must be 64 or 128 with CUDA tensors (multiples of the kernel's key chunk)");
  if (req.scale) validate_scale(*req.scale);
  if (req.layer_id < 0) throw_invalid("layer_id", "must be non-negative");
  if (req.prefix_length > 0) {
    if (req.prefix_embeddings.data == nullptr)
      throw_invalid("prefix_embeddings", "required when prefix_length > 0");
    validate_matrix("prefix_embeddings", req.prefix_embeddings);
  }
  if (!req.prefix_tokens.empty() && static_cast<int>(req.prefix_tokens.size()) != req.prefix_length)
    throw_invalid("prefix_tokens", "length " + std::to_string(req.prefix_tokens.size()) + " != prefix_length " +
                                   std::to_string(req.prefix_length));
}

Call AttentionEchoCache::Impl::plan(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                                    const MutableAnyHeadsView& out, const EchoRequest& req) const {
  Call call;
  call.problem = {q, k, v, out, req.scale.value_or(1.0f / std::sqrt(static_cast<float>(q.dim))), req.causal,
                  req.prefix_length};
  call.prefix = static_cast<int>(std::min<long long>(req.prefix_length, config.max_prefix_length));
  // Non-causal prefix rows see the whole prefix; a truncated block would
  // change them, so such prefixes are not cached.
  if (!req.causal && call.prefix != req.prefix_length) call.prefix = 0;
  call.space = {std::string(req.name_space), config.per_layer ? req.layer_id : -1, q.heads, k.heads, q.dim,
                req.causal, q.device, q.dtype};
  call.embeddings = req.prefix_embeddings;
  if (!req.prefix_tokens.empty()) call.tokens = req.prefix_tokens.first(call.prefix);
  call.result.layer_id = req.layer_id;
  return call;
}

// L1 first; on an L1 miss the shared store, by the call's identity (at
// most one L2 lookup per call: covers() holds for one tier of a call).
std::optional<AttentionEchoCache::Impl::Candidate> AttentionEchoCache::Impl::find(Call& call,
                                                                                  const ReuseTier& tier) {
  if (tier.match() == cache::Match::kSimilarKey && call.key.empty())
    call.key = keyer.key(call.embeddings);  // outside the lock: it is compute
  auto found = find_in_l1(call, tier);
  // L2 holds host entries only (a device payload is not written through).
  if (!found && l2 && call.space.device == Device::cpu() && cache::L2Entries::covers(call, tier.match()) &&
      fetch_from_l2(call))
    found = find_in_l1(call, tier);
  return found;
}

std::optional<AttentionEchoCache::Impl::Candidate> AttentionEchoCache::Impl::find_in_l1(Call& call,
                                                                                        const ReuseTier& tier) {
  if (tier.match() == cache::Match::kTokens) return find_by_tokens(call, tier.kind());
  return find_similar(call, tier.kind());
}

// The entry L2 holds under the call's identity, into L1 (where the tiers
// find it as any other entry); false when there was none to use.
bool AttentionEchoCache::Impl::fetch_from_l2(const Call& call) {
  auto entry = l2->fetch(call);
  if (!entry) return false;
  std::lock_guard lock(mutex);
  return store.insert(std::move(*entry), [this](const Entry& victim) { count_eviction(victim); }) >= 0;
}

// Same space, tokens and k fingerprint (same tokens under other weights is a
// miss).
std::optional<AttentionEchoCache::Impl::Candidate> AttentionEchoCache::Impl::find_by_tokens(const Call& call,
                                                                                            Tier tier) {
  if (call.tokens.empty()) return std::nullopt;
  std::lock_guard lock(mutex);
  const Entry* e = store.find_exact(call.space, call.tokens);
  if (e == nullptr || e->k_fingerprint != call.k_fingerprint) return std::nullopt;
  const cache::TierPayload* part = e->payload->find(tier);
  if (part == nullptr) return std::nullopt;
  store.touch(e->id);
  return Candidate{e->id, 1.0, e->payload, part};
}

// The best semantic candidate with a payload of the tier and a prefix length
// within tolerance.
std::optional<AttentionEchoCache::Impl::Candidate> AttentionEchoCache::Impl::find_similar(Call& call, Tier tier) {
  std::lock_guard lock(mutex);
  const auto found = store.find_similar(call.space, call.key, kCandidates,
                                        static_cast<float>(config.similarity_threshold));
  if (!found.empty()) call.result.similarity = found.front().similarity;
  for (const index::Candidate& c : found) {
    const Entry* e = store.get(c.id);
    const cache::TierPayload* part = e->payload->find(tier);
    const int stored = e->payload->prefix;
    const bool length_ok = call.space.causal ? std::abs(call.prefix - stored) <= config.length_tolerance * stored
                                             : call.prefix == stored;
    if (part == nullptr || !length_ok) continue;
    store.touch(e->id);
    return Candidate{e->id, c.similarity, e->payload, part};
  }
  return std::nullopt;
}

// The tier writes the prefix rows it can serve, the guard checks them if the
// tier is approximate, the rest is computed exactly. Returns false when the
// guard rejects (out is then garbage).
bool AttentionEchoCache::Impl::serve(Call& call, const ReuseTier& tier, const Candidate& cand,
                                     const kernels::Backend& backend) {
  EchoResult& r = call.result;
  r.similarity = cand.similarity;
  if (cand.payload->written) backend.wait(*cand.payload->written);
  const cache::Served served = tier.serve(call, *cand.part, cand.payload->prefix, backend);
  r.kept_fraction = served.kept_fraction;
  const double exact_cost = block_flops(call.space, served.rows);
  double spent = served.cost_share * exact_cost;
  if (tier.approximate()) {
    const cache::Guard::Verdict verdict = guard.check(call.problem, served.rows, backend);
    r.estimated_error = verdict.error;
    spent += verdict.flops;
    if (!verdict.accepted) {
      r.rejected = true;
      call.flops_saved = -spent;
      return false;
    }
  }
  backend.exact_rows(call.problem, served.rows, call.problem.q.tokens);
  r.echo_hit = true;
  r.tier = tier.kind();
  r.tokens_echoed = served.rows;
  r.tokens_computed = call.problem.q.tokens - served.rows;
  call.flops_saved = exact_cost - spent;
  return true;
}

// Miss (or rejected hit): exact attention for every row, each enabled tier
// capturing what it needs, and a new entry when any did.
std::optional<Entry> AttentionEchoCache::Impl::compute_miss(Call& call, const kernels::Backend& backend) {
  auto payload = std::make_shared<cache::Payload>();
  payload->prefix = call.prefix;
  bool by_tokens = false, by_key = false;
  auto capture = [&](const ReuseTier& tier) {
    payload->parts.emplace_back(tier.kind(), tier.capture(call, backend));
    (tier.match() == cache::Match::kTokens ? by_tokens : by_key) = true;
  };
  const auto enabled = tiers.enabled();
  const auto in_kernel = std::ranges::find_if(enabled, [&](const ReuseTier* t) {
    return t->capture_stage() == cache::Capture::kInKernel && can_capture(call, *t);
  });
  if (in_kernel != enabled.end()) capture(**in_kernel);  // runs the exact kernel
  else backend.exact_rows(call.problem, 0, call.problem.q.tokens);
  for (const ReuseTier* t : enabled)
    if (t->capture_stage() == cache::Capture::kFromOutput && can_capture(call, *t)) capture(*t);

  EchoResult& r = call.result;
  r.echo_hit = false;
  r.tier = Tier::kNone;
  r.tokens_echoed = 0;
  r.tokens_computed = call.problem.q.tokens;
  r.kept_fraction = 1.0;
  if (payload->parts.empty()) return std::nullopt;
  payload->written = backend.fence();

  // Indexed only where one of its payloads can be found from.
  Entry e;
  e.space = call.space;
  if (by_key) e.key = call.key;
  if (by_tokens) {
    e.tokens.assign(call.tokens.begin(), call.tokens.end());
    e.k_fingerprint = call.k_fingerprint;
  }
  e.payload = std::move(payload);
  return e;
}

void AttentionEchoCache::Impl::finish(const Call& call, std::optional<Entry> entry,
                                      std::optional<std::uint64_t> replaced) {
  std::lock_guard lock(mutex);
  if (replaced) store.remove(*replaced);
  const bool oversize =
      entry && store.insert(std::move(*entry), [this](const Entry& victim) { count_eviction(victim); }) < 0;
  const EchoResult& r = call.result;
  count(call.space.name_space, [&](CacheStats& s) {
    s.lookups += 1;
    s.*CacheStats::counter(r.tier) += 1;
    s.rejected += r.rejected;
    s.tokens_echoed += static_cast<std::uint64_t>(r.tokens_echoed);
    s.tokens_computed += static_cast<std::uint64_t>(r.tokens_computed);
    s.flops_saved += call.flops_saved;
    s.oversize_skipped += oversize;
  });
}

void AttentionEchoCache::Impl::count(std::string_view name_space, const std::function<void(CacheStats&)>& add) {
  add(stats);
  auto it = namespace_stats.find(name_space);
  if (it == namespace_stats.end()) it = namespace_stats.emplace(std::string(name_space), CacheStats{}).first;
  add(it->second);
}

void AttentionEchoCache::Impl::count_eviction(const Entry& victim) {
  count(victim.space.name_space, [](CacheStats& s) { s.evictions += 1; });
}

EchoResult AttentionEchoCache::Impl::run(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                                         const MutableAnyHeadsView& out, const EchoRequest& req) {
  validate_attention_inputs(q, k, v, out, req.prefix_length);
  std::unique_ptr<kernels::Backend> device_backend;
  const kernels::Backend& backend = backend_for(q.device, req.stream, device_backend);
  Call call = plan(q, k, v, out, req);
  validate_request(call, req, backend);
  if (!call.tokens.empty()) call.k_fingerprint = backend.k_fingerprint(k, call.prefix);
  if (call.prefix == 0) {  // nothing reusable: plain attention, not a lookup
    backend.exact_rows(call.problem, 0, q.tokens);
    call.result.tokens_computed = q.tokens;
    std::lock_guard lock(mutex);
    count(call.space.name_space, [&](CacheStats& s) { s.tokens_computed += static_cast<std::uint64_t>(q.tokens); });
    return call.result;
  }
  std::optional<std::uint64_t> replaced;
  for (const ReuseTier* tier : tiers.enabled()) {
    const auto candidate = find(call, *tier);
    if (!candidate) continue;
    if (serve(call, *tier, *candidate, backend)) {
      finish(call, std::nullopt, std::nullopt);
      return call.result;
    }
    replaced = candidate->id;  // the guard refused it: the fresh entry replaces it
    break;
  }
  auto entry = compute_miss(call, backend);
  std::optional<L2Write> written;  // write-through, encoded and sent outside the lock
  if (entry && l2 && entry->on_host()) written = l2->encode(*entry);
  finish(call, std::move(entry), replaced);
  if (written) l2->put(*written);
  return call.result;
}

// ---- public surface -----------------------------------------------------------

AttentionEchoCache::AttentionEchoCache(EchoConfig config) : impl_(std::make_unique<Impl>(std::move(config), nullptr)) {}

AttentionEchoCache::AttentionEchoCache(EchoConfig config, std::shared_ptr<L2Store> store) {
  if (!store) throw_invalid("store", "must not be null (without one: the constructor taking only a config)");
  if (!config.store_url.empty()) throw_invalid("store_url", "must be empty when a store is given");
  impl_ = std::make_unique<Impl>(std::move(config), std::move(store));
}
AttentionEchoCache::~AttentionEchoCache() = default;

EchoResult AttentionEchoCache::attention_with_echo(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                                                   const MutableHeadsView& out, const EchoRequest& request) {
  return impl_->run(q, k, v, out, request);
}

EchoResult AttentionEchoCache::attention_with_echo(const AnyHeadsView& q, const AnyHeadsView& k,
                                                   const AnyHeadsView& v, const MutableAnyHeadsView& out,
                                                   const EchoRequest& request) {
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
  impl_->namespace_stats.clear();
}

CacheStats AttentionEchoCache::stats(std::string_view name_space) const {
  std::lock_guard lock(impl_->mutex);
  const auto it = impl_->namespace_stats.find(name_space);
  CacheStats s = it == impl_->namespace_stats.end() ? CacheStats{} : it->second;
  const cache::EntryStore::Usage used = impl_->store.usage(name_space);
  s.entries = used.entries;
  s.bytes = used.bytes;
  return s;
}

std::vector<std::string> AttentionEchoCache::namespaces() const {
  std::lock_guard lock(impl_->mutex);
  std::vector<std::string> names = impl_->store.namespaces();
  for (const auto& [name, counters] : impl_->namespace_stats) names.push_back(name);
  std::ranges::sort(names);
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

void AttentionEchoCache::clear(std::string_view name_space) {
  std::lock_guard lock(impl_->mutex);
  impl_->store.clear(name_space);
  const auto it = impl_->namespace_stats.find(name_space);
  if (it == impl_->namespace_stats.end()) return;
  const CacheStats& gone = it->second;
  CacheStats& total = impl_->stats;
  for (Tier tier : {Tier::kNone, Tier::kExact, Tier::kSparse, Tier::kDense})
    total.*CacheStats::counter(tier) -= gone.*CacheStats::counter(tier);
  total.lookups -= gone.lookups;
  total.rejected -= gone.rejected;
  total.evictions -= gone.evictions;
  total.tokens_echoed -= gone.tokens_echoed;
  total.tokens_computed -= gone.tokens_computed;
  total.flops_saved -= gone.flops_saved;
  total.snapshot_dropped -= gone.snapshot_dropped;
  total.oversize_skipped -= gone.oversize_skipped;
  impl_->namespace_stats.erase(it);
}

const EchoConfig& AttentionEchoCache::config() const { return impl_->config; }

L2Stats AttentionEchoCache::l2_stats() const { return impl_->l2 ? impl_->l2->stats() : L2Stats{}; }

}  // namespace attention_echo
