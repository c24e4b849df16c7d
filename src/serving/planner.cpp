#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <vector>

#include "attention_echo/serving.hpp"
#include "serving/blend_plan.hpp"
#include "serving/cost_model.hpp"
#include "serving/kv_blend.hpp"
#include "serving/kv_block_store.hpp"
#include "serving/kv_l2.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {

namespace {

// Donor candidates aligned per prompt: the index ranks by token profile,
// the alignment decides. Below kDonorProfile (a quarter of the trigram
// profile shared) a prompt has too little text in common with another to
// blend from it, and aligning it would cost a failed lookup per token.
constexpr int kDonorCandidates = 4;
constexpr float kDonorProfile = 0.25f;
// A blend projects one layer's K/V of every row past the stored prefix
// (kDeviation: runs layer 0 over them too), computes 16 recent rows, 16
// probes, 16 attended rows and the last row, and pays a donor lookup and
// alignment; below this many rows to compute it cannot repay that, so it is
// not even looked for (on a 260K-parameter model with 100-token prompts the
// lookup alone cost ~5% of a prefill).
constexpr int kMinBlendRows = 128;
static_assert(kMinCalibrationSample >= kMinBlendRows, "calibration blends must be long enough to be planned");
// The cache route is priced only for prompts with a stored neighbour at
// least this similar in token profile: a first-seen prompt would only pay
// the cache's capture cost (the sparse tier's first pass records tile mass
// and stores entries), which made echo up to 15% slower than exact prefix
// reuse on chatbot traffic before the planner.
constexpr float kCacheNeighbour = 0.5f;

// The expected cost of a cache-routed prefix block next to exact attention
// before any was measured: at sparse_mass 0.98 the sparse tier keeps 55-68%
// of the prefix tiles of trained models; without an approximate tier the
// cache can never beat reusing stored K/V.
double cache_prior(const AttentionEchoCache* cache) {
  if (!cache) return 1.0;
  const EchoMode mode = cache->config().mode;
  return mode == EchoMode::kSparse || mode == EchoMode::kDense ? 0.6 : 1.0;
}

bool every_layer_exact(const std::vector<EchoResult>& echo) {
  return std::all_of(echo.begin(), echo.end(),
                     [](const EchoResult& e) { return e.tier == Tier::kNone || e.tier == Tier::kExact; });
}

bool found_candidate(const std::vector<EchoResult>& echo) {
  return std::any_of(echo.begin(), echo.end(), [](const EchoResult& e) { return e.tier != Tier::kNone || e.rejected; });
}

double attention_cpu_s(const llama::ForwardResult& result) {
  double sum = 0.0;
  for (double s : result.attention_cpu_s) sum += s;
  return sum;
}

double process_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// CPU (every thread of the process) and wall seconds since it started.
class Stopwatch {
 public:
  double cpu_s() const { return process_cpu_s() - cpu_; }
  double wall_s() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_).count(); }

 private:
  double cpu_ = process_cpu_s();
  std::chrono::steady_clock::time_point wall_ = std::chrono::steady_clock::now();
};

// The QKV projection's share of a row's linear (non-attention) FLOPs.
double qkv_share(const llama::ModelConfig& c) {
  const double qkv = double(c.dim + 2 * c.kv_dim()) * c.dim;
  return qkv / (qkv + double(c.dim) * c.dim + 3.0 * c.hidden_dim * c.dim);
}

void validate_config(const PlannerConfig& c) {
  if (c.reserve_bytes > c.store_bytes) throw std::invalid_argument("reserve_bytes: must be at most store_bytes");
  if (c.block_tokens < 1 || c.block_tokens % kKeyChunk != 0)
    throw std::invalid_argument("block_tokens: must be a positive multiple of " + std::to_string(kKeyChunk) +
                                " (the engine's page size)");
  const BlendConfig& b = c.blend;
  if (!(b.recompute_ratio >= 0.0 && b.recompute_ratio <= 1.0))
    throw std::invalid_argument("blend.recompute_ratio: must be in [0, 1]");
  if (std::isnan(b.max_error) || b.max_error < 0.0)
    throw std::invalid_argument("blend.max_error: must be non-negative (inf disables the guard)");
  if (b.probe_rows < 0) throw std::invalid_argument("blend.probe_rows: must be non-negative");
  if (b.recent_rows < 0) throw std::invalid_argument("blend.recent_rows: must be non-negative");
  if (b.attended_rows < 0) throw std::invalid_argument("blend.attended_rows: must be non-negative");
  if (!(b.max_kl > 0.0)) throw std::invalid_argument("blend.max_kl: must be positive");
  if (!(b.max_continuation_kl > 0.0)) throw std::invalid_argument("blend.max_continuation_kl: must be positive");
  if (!(b.top1_sigmas >= 0.0)) throw std::invalid_argument("blend.top1_sigmas: must be non-negative");
  if (b.calibrate_every < 0) throw std::invalid_argument("blend.calibrate_every: must be non-negative");
  if (!c.store_url.empty()) {
    parse_l2_url(c.store_url, "store_url");
    if (c.model_fingerprint == 0)
      throw std::invalid_argument("model_fingerprint: required with store_url (llama::Model::fingerprint())");
  }
}

std::optional<KVBlocksL2> make_l2(const PlannerConfig& c, const KVBlockStore::Shape& shape) {
  if (c.store_url.empty()) return std::nullopt;
  return KVBlocksL2(connect_redis(parse_l2_url(c.store_url, "store_url")), c.model_fingerprint, shape);
}

// The last `rows` rows of a forward's logits.
std::span<const float> last_logits(const llama::ForwardResult& r, int rows, const llama::ModelConfig& c) {
  return std::span<const float>(r.logits).last(static_cast<std::size_t>(rows) * c.vocab_size);
}

// Prompts a blend meets, made of passages (the first a shared head) whose
// concatenation is the donor: the rest reversed (moved chunks, as RAG
// passages in another order), 8 tokens in the middle of one passage
// replaced by its first 8 (an edit), and 32 tokens of the last passage inserted
// after the head (every later position shifted: K re-rotated).
std::vector<std::vector<int>> calibration_prompts(std::span<const std::vector<int>> passages) {
  auto concat = [](auto first, auto last) {
    std::vector<int> out;
    for (auto p = first; p != last; ++p) out.insert(out.end(), p->begin(), p->end());
    return out;
  };
  std::vector<int> moved = passages.front();
  for (auto p = passages.rbegin(); p + 1 != passages.rend(); ++p) moved.insert(moved.end(), p->begin(), p->end());
  std::vector<std::vector<int>> edited_passages(passages.begin(), passages.end());
  std::vector<int>& middle = edited_passages[passages.size() / 2];
  const std::size_t at = middle.size() / 2;
  for (std::size_t i = at; i < std::min(at + 8, middle.size()); ++i) middle[i] = middle[i - at];
  std::vector<int> inserted = passages.front();
  const std::vector<int>& last = passages.back();
  inserted.insert(inserted.end(), last.begin(), last.begin() + std::min<std::size_t>(32, last.size()));
  const std::vector<int> rest = concat(passages.begin() + 1, passages.end());
  inserted.insert(inserted.end(), rest.begin(), rest.end());
  inserted.resize(inserted.size() - std::min<std::size_t>(32, last.size()));  // the donor's length
  return {moved, concat(edited_passages.begin(), edited_passages.end()), inserted};
}

}  // namespace

BlendCalibration::BlendCalibration(const BlendCalibration& other) {
  std::lock_guard lock(other.mutex_);
  blends_since_sample_ = other.blends_since_sample_;
  blend_cost_factor_ = other.blend_cost_factor_;
  model_ = other.model_;
  namespaces_ = other.namespaces_;
  first_verdicts_ = other.first_verdicts_;
  next_first_ = other.next_first_;
}

bool BlendCalibration::next_blend_calibrates(const BlendConfig& config) {
  std::lock_guard lock(mutex_);
  if (config.calibrate_every == 0) return false;
  return model_.size() == 0 || blends_since_sample_++ + 1 >= config.calibrate_every;
}

void BlendCalibration::Pool::add(double value, double sample_kl, double target) {
  value2 += value * value;
  kl += std::max(sample_kl, target / 100);
  ++size;
  loud = loud || sample_kl >= target / 100;
}

double BlendCalibration::pooled_bound(const std::array<Pool, 2>& pools, double target) {
  double loud = std::numeric_limits<double>::infinity(), quiet = loud;
  for (const Pool& pool : pools) {
    if (pool.size == 0) continue;
    double& smallest = pool.loud ? loud : quiet;
    smallest = std::min(smallest, pool.bound(target));
  }
  return std::isfinite(loud) ? loud : quiet;
}

void BlendCalibration::Samples::add(const CalibrationSample& sample, const BlendConfig& config) {
  const std::size_t pool = sample.selection == BlendSelection::kDeviation;
  estimate[pool].add(sample.estimate, sample.kl, config.max_kl);
  deviation[pool].add(sample.deviation, sample.continuation_kl, config.max_continuation_kl);
}

BlendGuard BlendCalibration::Samples::threshold(const BlendConfig& config) const {
  const double cap = config.max_error;
  if (size() == 0) return {cap, cap};
  return {std::min(cap, pooled_bound(estimate, config.max_kl)),
          std::min(cap, pooled_bound(deviation, config.max_continuation_kl))};
}

namespace {

void validate_sample(const CalibrationSample& s) {
  for (const auto& [value, name] : {std::pair{s.estimate, "sample.estimate"}, {s.kl, "sample.kl"},
                                    {s.deviation, "sample.deviation"}, {s.continuation_kl, "sample.continuation_kl"}})
    if (!(value >= 0.0) || !std::isfinite(value))
      throw std::invalid_argument(std::string(name) + ": must be non-negative and finite, got " + std::to_string(value));
  if (s.selection == BlendSelection::kAuto)
    throw std::invalid_argument("sample.selection: the selection the blend ran, kRunStart or kDeviation, not kAuto");
}

}  // namespace

void BlendCalibration::add(const CalibrationSample& sample, const BlendConfig& config) {
  validate_sample(sample);
  std::lock_guard lock(mutex_);
  blends_since_sample_ = 0;
  model_.add(sample, config);
}

void BlendCalibration::add(std::string_view name_space, const CalibrationSample& sample, const BlendConfig& config) {
  validate_sample(sample);
  std::lock_guard lock(mutex_);
  blends_since_sample_ = 0;
  model_.add(sample, config);
  namespaces_.try_emplace(std::string(name_space)).first->second.samples.add(sample, config);
}

BlendGuard BlendCalibration::threshold_locked(std::string_view name_space, const BlendConfig& config) const {
  const auto it = namespaces_.find(name_space);
  const bool own = it != namespaces_.end() && it->second.samples.size() > 0;
  return (own ? it->second.samples : model_).threshold(config);
}

BlendGuard BlendCalibration::threshold(std::string_view name_space, const BlendConfig& config) const {
  std::lock_guard lock(mutex_);
  return threshold_locked(name_space, config);
}

namespace {

// Into a ring of at most `capacity` items whose oldest is at `next`.
template <typename T>
void push_ring(std::vector<T>& ring, std::size_t& next, T item, std::size_t capacity) {
  if (ring.size() < capacity) {
    ring.push_back(std::move(item));
  } else {
    ring[next] = std::move(item);
    next = (next + 1) % capacity;
  }
}

}  // namespace

void BlendCalibration::record_locked(std::string_view name_space, const Namespace::Blend& blend,
                                     BlendSelection selection) {
  Namespace& n = namespaces_.try_emplace(std::string(name_space)).first->second;
  if (n.recent.empty())
    push_ring(first_verdicts_, next_first_, FirstVerdict{std::string(name_space), selection, blend}, kRecentBlends);
  push_ring(n.recent, n.next, blend, kRecentBlends);
}

void BlendCalibration::record_blend(std::string_view name_space, double estimate, double deviation, bool near_tie,
                                    BlendSelection selection) {
  std::lock_guard lock(mutex_);
  record_locked(name_space, {estimate, deviation, near_tie}, selection);
  namespaces_.find(name_space)->second.priced_out = 0;
}

void BlendCalibration::record_screen(std::string_view name_space, double estimate, double deviation, bool near_tie,
                                     BlendSelection selection) {
  std::lock_guard lock(mutex_);
  record_locked(name_space, {estimate, deviation, near_tie}, selection);
}

bool BlendCalibration::refused(const Namespace::Blend& blend, const BlendGuard& guard) {
  return blend.estimate > guard.estimate || blend.deviation > guard.deviation || blend.near_tie;
}

double BlendCalibration::refusal_rate(std::string_view name_space, const BlendConfig& config,
                                      BlendSelection selection) const {
  std::lock_guard lock(mutex_);
  const auto it = namespaces_.find(name_space);
  if (it != namespaces_.end() && config.calibrate_every > 0 && it->second.priced_out >= config.calibrate_every)
    return 0.0;
  double n = 0, refusals = 0;
  if (it != namespaces_.end() && !it->second.recent.empty()) {
    const BlendGuard guard = threshold_locked(name_space, config);
    for (const Namespace::Blend& b : it->second.recent) refusals += refused(b, guard);
    n = static_cast<double>(it->second.recent.size());
  } else {
    for (const FirstVerdict& f : first_verdicts_) {
      if (f.selection != selection) continue;
      refusals += refused(f.blend, threshold_locked(f.name_space, config));
      ++n;
    }
  }
  return (refusals + 1.0) / (n + 2.0);
}

void BlendCalibration::priced_out(std::string_view name_space) {
  std::lock_guard lock(mutex_);
  ++namespaces_.try_emplace(std::string(name_space)).first->second.priced_out;
}

void BlendCalibration::set_blend_cost_factor(double factor) {
  if (!(factor > 0.0) || !std::isfinite(factor))
    throw std::invalid_argument("factor: must be positive and finite, got " + std::to_string(factor));
  std::lock_guard lock(mutex_);
  blend_cost_factor_ = factor;
}

double BlendCalibration::blend_cost_factor() const {
  std::lock_guard lock(mutex_);
  return blend_cost_factor_;
}

long long BlendCalibration::samples() const {
  std::lock_guard lock(mutex_);
  return static_cast<long long>(model_.size());
}

std::size_t BlendCalibration::samples(std::string_view name_space) const {
  std::lock_guard lock(mutex_);
  const auto it = namespaces_.find(name_space);
  return it == namespaces_.end() ? 0 : it->second.samples.size();
}

struct Planner::Impl {
  llama::ModelConfig model;
  PlannerConfig config;
  KVBlockStore store;
  CostModel cost;
  std::shared_ptr<BlendCalibration> calibration;
  std::optional<KVBlocksL2> l2;

  Impl(const llama::ModelConfig& m, PlannerConfig c)
      : model(m),
        config((validate_config(c), c)),
        store({m.n_layers, m.kv_dim(), c.block_tokens}, c.store_bytes),
        cost(cache_prior(c.cache)),
        calibration(c.calibration ? c.calibration : std::make_shared<BlendCalibration>()),
        l2(make_l2(config, store.shape())) {
    store.reserve(config.reserve_bytes);
  }

  void validate_tokens(std::span<const int> tokens, const std::string& name = "tokens") const {
    if (tokens.empty()) throw std::invalid_argument(name + ": empty");
    if (static_cast<int>(tokens.size()) > model.seq_len)
      throw std::invalid_argument(name + ": " + std::to_string(tokens.size()) + " exceed the model's context of " +
                                  std::to_string(model.seq_len));
    for (int t : tokens)
      if (t < 0 || t >= model.vocab_size)
        throw std::invalid_argument(name + ": id " + std::to_string(t) + " is outside the vocabulary");
  }

  CostModel::BlendShape blend_shape(int T, int skip, int selected, const TokenAlignment& alignment) const {
    const bool first_layer_all = resolve_selection(config.blend.selection, alignment) == BlendSelection::kDeviation;
    return {T, skip, selected, model.n_layers, qkv_share(model), first_layer_all};
  }

  // A blend of this prompt, priced: what it is expected to cost at its
  // namespace's refusal rate, and what it would cost if sure to be served.
  struct BlendCandidate {
    std::shared_ptr<BlendPlan> plan;
    double expected = 0, served = 0;
  };

  // The blend from the stored prompts most like this one, if any aligns
  // with enough of it. Every candidate that
  // aligns is a donor, each token taken from the one that shares the
  // longest context before it (merge_alignments). With one donor per blend,
  // two prompts of unseen code (edits at rows 198 and 1481) blended from a
  // donor whose own edited line sat 694 rows before the end both measured
  // next-token KL 5.4e-3: the donor's edit, not theirs, made it. Rows past
  // a donor's own edit now come from a donor without it where one is
  // stored, and moved passages from a donor where they followed the same.
  std::optional<BlendCandidate> blend_candidate(std::span<const int> tokens, int skip, std::string_view name_space,
                                                const std::vector<KVBlockStore::Similar>& candidates) const {
    const int T = static_cast<int>(tokens.size());
    const BlendConfig& b = config.blend;
    std::vector<std::vector<AlignedRun>> alignments;
    std::vector<const KVBlockStore::Record*> records;
    std::optional<RequestKgrams> kgrams;
    for (const KVBlockStore::Similar& candidate : candidates)
      if (candidate.similarity >= kDonorProfile) prefetch_donor(candidate.record->tokens, candidate.record->anchors);
    for (const KVBlockStore::Similar& candidate : candidates) {
      if (candidate.similarity < kDonorProfile) break;  // best first
      const TokenAnchors& anchors = candidate.record->anchors;
      if (!kgrams || kgrams->anchor != anchors.anchor) kgrams = request_kgrams(tokens, anchors.anchor);
      std::vector<AlignedRun> a = align_runs(tokens, *kgrams, candidate.record->tokens, anchors);
      if (a.empty()) continue;
      alignments.push_back(std::move(a));
      records.push_back(candidate.record);
    }
    if (alignments.empty()) return std::nullopt;
    TokenAlignment merged = merge_alignments(alignments, T);
    const int reusable = T - 1 - b.recent_rows;  // the recent rows and the last are always computed
    int aligned = 0;
    for (int i = skip; i < reusable; ++i) aligned += merged.donor_position[i] >= 0;
    const int reused = aligned - static_cast<int>(std::ceil(b.recompute_ratio * aligned)) -
                       std::min(b.probe_rows + b.attended_rows, aligned);
    // A prompt mostly new is computed exactly: blended, its record would be
    // approximate, never a donor, and the prompts that repeat its new text
    // would find none. On unseen Python at full context a run-start blend
    // reusing 454 of 3162 rows saved 21 ms of 469 (4%), and the five later
    // variants of its document, left without a donor, blended at 420-450 ms
    // instead of ~80 (BENCHMARKS.md section 12).
    if (2 * reused < T - skip) return std::nullopt;
    const CostModel::BlendShape shape = blend_shape(T, skip, T - skip - reused, merged);
    const double prior = calibration->blend_cost_factor();
    const double refusal_rate = calibration->refusal_rate(name_space, b, resolve_selection(b.selection, merged));
    std::vector<llama::KVState> donors;
    for (const KVBlockStore::Record* r : records)
      donors.push_back(store.state(r->blocks, static_cast<int>(r->tokens.size())));
    return BlendCandidate{std::make_shared<BlendPlan>(BlendPlan{std::move(donors), std::move(merged), shape}),
                          cost.expected_blend(shape, refusal_rate, prior),
                          cost.blend(shape, prior)};
  }

  // A prompt priced out of its blend (plan.screen), computed exactly: what
  // the blend would have measured, read off the exact K/V, its estimate
  // under the last row's logits (the guard rows' would cost the classifier
  // on 16 more rows: on stories15M's 32000-token vocabulary the
  // multiply-adds of 25 prompt rows), into its namespace's record and the
  // report.
  void screen(const llama::Engine& engine, Plan& plan, const llama::ForwardResult& result) const {
    const BlendPlan& b = *plan.screen;
    const auto last = last_logits(result, 1, model);
    const ScreenedBlend s =
        screen_blend(engine, b.donors, b.alignment, plan.report.reused, plan.kv, last, config.blend);
    const BlendGuard guard = calibration->threshold(plan.name_space, config.blend);
    calibration->record_screen(plan.name_space, s.estimate, s.deviation, near_tie(last, guard.estimate, config.blend),
                               s.selection);
    PrefillReport& report = plan.report;
    report.blend_screened = true;
    report.screened_estimate = s.estimate;
    report.screened_deviation = s.deviation;
    report.screened_refused = refused(s.estimate, s.deviation, last, guard, config.blend);
  }

  // A blend's K/V reused as a prefix is held to the blend's rules: its
  // deviation under the namespace's guard now, the last recent_rows rows
  // before the prompt's last computed, as a blend computes them, and its
  // estimate under this prompt's next-token distribution within the guard
  // (recompute_exactly). What a reused blend costs the next token is not
  // bounded by what it cost its own: on unseen code a blend served at
  // next-token KL 2.2e-3 gave 5.5e-3 to a prompt that reused all of it but
  // its last token.
  // And it must be worth it: the prompt's own record becomes approximate,
  // never a donor, so fewer than kMinBlendRows rows past the exact prefix
  // are not taken (on near-dup traffic a new document's first prompt took
  // 22 blended header rows and left the document without a donor: its next
  // prompt was computed in full).
  KVBlockStore::Prefix held_to_guard(std::string_view ns, std::span<const int> tokens,
                                     KVBlockStore::Prefix stored) {
    const int length = std::min(stored.length, static_cast<int>(tokens.size()) - 1 - config.blend.recent_rows);
    KVBlockStore::Prefix exact = store.longest_prefix(ns, tokens, true);
    const double max_deviation = calibration->threshold(ns, config.blend).deviation;  // at most max_error
    if (stored.error > max_deviation || length - exact.length < kMinBlendRows) return exact;
    stored.length = length;
    return stored;
  }

  // Whether a prompt served from blended K/V (the plan's approximate
  // prefix; `estimate` its deviation's guard_estimate under this prompt's
  // guard rows, `logits` its last row's) is computed again from its exact
  // prefix, as a blend would be (kv_blend.hpp: refused), under the
  // namespace's guard now (tighter, maybe, than when it was stored: the
  // prompts that reuse it are not measured).
  // Not also one in calibrate_every: sharing the blends' count, that moved
  // their calibrations onto other requests, which on the bundled model
  // cost near-dup a full prefill (2.27 -> 1.91x exact prefix reuse), and
  // its samples changed the ones chat-edit's guard starts from, so one of
  // its blends was refused, its donors' chain changed and ended in a blend
  // at KL 9e-4 that flipped a near tie (top-1 15 of 16; a guard miss that
  // can happen without it too).
  bool recompute_exactly(const Plan& plan, double estimate, std::span<const float> logits) const {
    return refused(estimate, plan.reused_error, logits, calibration->threshold(plan.name_space, config.blend),
                   config.blend);
  }

  // A served blend's sample: `out` against the exact logits of every row
  // from `first` on (a prompt of T rows).
  CalibrationSample measure_blend(llama::Engine& engine, const BlendOutcome& out, std::span<const float> exact,
                                  int first, int T) const {
    const int V = model.vocab_size, rows = guard_rows(config.blend, T - first);
    CalibrationSample sample =
        measure_sample(out.estimated_error, out.deviation, exact.last(static_cast<std::size_t>(rows) * V),
                       out.guard_logits, V, logits_at(exact, out.probes, first, V), probe_logits(engine, out));
    sample.selection = out.selection;
    return sample;
  }

  // A measured sample of the plan's namespace, reported and calibrating
  // its guard.
  void add_sample(Plan& plan, const CalibrationSample& sample) {
    plan.report.calibration_kl = sample.kl;
    plan.report.calibration_continuation_kl = sample.continuation_kl;
    // K/V of unknown error (echoed by a cache whose guard is off: NaN)
    // is measured and reported but calibrates nothing.
    if (std::isfinite(sample.estimate)) calibration->add(plan.name_space, sample, config.blend);
  }

  // Into the store, and exact K/V of the rows from `computed_from` on (the
  // ones this process computed) through to L2 as well.
  void store_prompt(std::string_view ns, std::span<const int> tokens, const llama::KVState& kv, bool exact,
                    double error, int computed_from) {
    store.insert(ns, tokens.first(kv.length), kv, !exact, error);
    if (l2 && exact)
      l2->put(ns, tokens, store.block_hashes(ns, tokens.first(kv.length)), computed_from / config.block_tokens, kv);
  }

  // The blocks past the exact stored prefix that L2 holds, into the store
  // (as many as arrive within the lookup deadline). Returns the token range
  // they cover, empty when none.
  std::pair<int, int> fill_from_l2(std::string_view ns, std::span<const int> tokens,
                                   const KVBlockStore::Prefix& stored) {
    const int B = config.block_tokens;
    if (!l2 || stored.length >= static_cast<int>(tokens.size()) - 1) return {0, 0};
    KVBlockStore::Prefix exact = stored.approximate ? store.longest_prefix(ns, tokens, true) : stored;
    const int first = exact.length / B;
    const auto hashes = store.block_hashes(ns, tokens);
    const auto fetched = l2->fetch(ns, tokens, hashes, first);
    if (fetched.empty()) return {0, 0};
    exact.blocks.resize(first);
    exact.blocks.insert(exact.blocks.end(), fetched.begin(), fetched.end());
    exact.length = static_cast<int>(exact.blocks.size()) * B;
    store.insert(ns, tokens.first(exact.length), store.state(exact.blocks, exact.length), false, 0.0);
    return {first * B, exact.length};
  }

  // The blend route: blend_prefill under the namespace's guard, measured
  // now and then (calibrate_every, or refused while its namespace has no
  // sample of its own), the prompt stored approximate where served.
  llama::ForwardResult execute_blend(llama::Engine& engine, std::span<const int> tokens, Plan& plan) {
    PrefillReport& report = plan.report;
    const bool calibrate = calibration->next_blend_calibrates(config.blend);
    llama::KVState exact_prefix;
    if (calibrate) exact_prefix = plan.kv;
    const BlendGuard guard = calibration->threshold(plan.name_space, config.blend);
    const RefusedBlend on_refusal = calibrate || calibration->samples(plan.name_space) == 0 ? RefusedBlend::kMeasure
                                                                                           : RefusedBlend::kStop;
    const Stopwatch timer;
    llama::ForwardResult result;
    const BlendOutcome out = blend_prefill(engine, tokens, plan.blend->donors, plan.blend->alignment, plan.kv,
                                           config.blend, guard, result, on_refusal);
    report_blend(report, out, guard);
    calibration->record_blend(plan.name_space, out.estimated_error, out.deviation, out.near_tie, out.selection);
    if (out.blended) {  // priced by the rows it computed (the plan's count was estimated before the ranking)
      CostModel::BlendShape done = plan.blend->shape;
      done.selected = out.recomputed;
      cost.observe_blend(done, timer.cpu_s(), timer.wall_s());
    }
    if (out.blended && calibrate)
      return serve_calibration_blend(engine, tokens, plan, out, std::move(exact_prefix));
    if (out.refusal_sample) add_sample(plan, *out.refusal_sample);
    store_prompt(plan.name_space, tokens, plan.kv, !out.blended, out.blended ? out.deviation : 0.0, report.reused);
    return result;
  }

  void report_blend(PrefillReport& report, const BlendOutcome& out, const BlendGuard& guard) const {
    report.blend_first_layer = out.first_layer_rows;
    report.blend_reused = out.reused;
    report.blend_recomputed = out.recomputed;
    report.estimated_error = out.estimated_error;
    report.blend_rejected = !out.blended;
    report.blend_deviation = out.deviation;
    report.blend_bounds = {std::min(config.blend.max_error, guard.estimate),
                           std::min(config.blend.max_error, guard.deviation)};
    report.blend_refused_at_layer = out.stopped_at_layer;
  }

  // A served blend that calibrates: the prompt is also computed exactly
  // from `exact_prefix`, the measured KL calibrates the guard, and the
  // prompt is served (and stored) exact.
  llama::ForwardResult serve_calibration_blend(llama::Engine& engine, std::span<const int> tokens, Plan& plan,
                                     const BlendOutcome& out, llama::KVState exact_prefix) {
    const int T = static_cast<int>(tokens.size()), skip = exact_prefix.length;
    llama::ForwardResult exact = engine.forward(tokens.subspan(skip), exact_prefix, {}, T - skip);
    plan.report.blend_calibration = true;
    add_sample(plan, measure_blend(engine, out, exact.logits, skip, T));
    keep_last_rows(exact, 1, model);
    plan.kv = std::move(exact_prefix);
    store_prompt(plan.name_space, tokens, plan.kv, true, 0.0, plan.report.reused);
    return exact;
  }

  // The reuse route: the rows past the stored prefix through the engine.
  // Approximate K/V reused (a blend's) is held to the blend's guard under
  // this prompt's guard rows, and computed again from the exact prefix
  // past it (recompute_exactly).
  llama::ForwardResult execute_forward(llama::Engine& engine, std::span<const int> tokens, Plan& plan,
                                       int keep_rows) {
    PrefillReport& report = plan.report;
    const int T = static_cast<int>(tokens.size());
    const bool guarded = !plan.reused_exact && config.blend.enabled;
    const int rows = guard_rows(config.blend, T - plan.kv.length);
    const int keep = guarded && keep_rows >= 0 ? std::max(keep_rows, rows) : keep_rows;
    const llama::Timers before = engine.timers();
    llama::ForwardResult result = engine.forward(tokens.subspan(plan.kv.length), plan.kv, {}, keep);
    if (T - report.reused >= kMinBlendRows)  // as long as the forwards blends are priced against
      cost.observe_parallelism(engine.timers().total_cpu_s - before.total_cpu_s,
                               engine.timers().total_s - before.total_s);
    if (plan.screen) screen(engine, plan, result);
    // Blended K/V: its deviation's estimate under this prompt's guard rows;
    // echoed K/V (the cache's, blending off): the echo's estimate, stored.
    const double reused_estimate =
        guarded ? guard_estimate(plan.reused_error, last_logits(result, rows, model), model.vocab_size)
                : plan.reused_error;
    if (guarded && recompute_exactly(plan, reused_estimate, last_logits(result, 1, model))) {
      const auto approximate_rows = last_logits(result, rows, model);
      const std::vector<float> approximate(approximate_rows.begin(), approximate_rows.end());  // result is replaced
      const KVBlockStore::Prefix exact = store.longest_prefix(plan.name_space, tokens, true);
      plan.kv = store.state(exact.blocks, std::min(exact.length, T - 1));
      report.reused = plan.kv.length;
      result = engine.forward(tokens.subspan(plan.kv.length), plan.kv, {}, keep);
      report.blend_calibration = true;
      add_sample(plan, measure_sample(reused_estimate, plan.reused_error, last_logits(result, rows, model),
                                      approximate, model.vocab_size));
      plan.reused_exact = true;
      plan.reused_error = 0.0;
    }
    report.reused_exact = plan.reused_exact;
    if (!plan.reused_exact) report.estimated_error = reused_estimate;
    store_prompt(plan.name_space, tokens, plan.kv, plan.reused_exact, plan.reused_error, report.reused);
    keep_last_rows(result, keep_rows, model);
    return result;
  }

  // The cache route: every row through the engine, each layer's prefix
  // block through the attention cache.
  llama::ForwardResult execute_cache(llama::Engine& engine, std::span<const int> tokens, Plan& plan, int keep_rows) {
    if (!config.cache) throw std::invalid_argument("plan: routed through the cache, but this planner has none");
    if (plan.kv.length != 0) throw std::invalid_argument("plan: a cache-routed plan starts from empty K/V");
    const int T = static_cast<int>(tokens.size()), p = plan.prefix_length;
    const llama::AttentionRoute route{config.cache, p, tokens.first(p), plan.name_space};
    llama::ForwardResult result = engine.forward(tokens, plan.kv, route, keep_rows);
    if (found_candidate(result.echo)) cost.observe_cache(T, p, attention_cpu_s(result));
    PrefillReport& report = plan.report;
    report.reused_exact = every_layer_exact(result.echo);
    report.echo = result.echo;
    for (const EchoResult& e : result.echo)
      if (e.tier == Tier::kSparse || e.tier == Tier::kDense)
        report.estimated_error = std::max(report.estimated_error, e.estimated_error);
    store_prompt(plan.name_space, tokens, plan.kv, report.reused_exact, report.estimated_error, 0);
    return result;
  }
};

Planner::Planner(const llama::ModelConfig& model, PlannerConfig config)
    : impl_(std::make_unique<Impl>(model, std::move(config))) {}
Planner::~Planner() = default;
Planner::Planner(Planner&&) noexcept = default;

Plan Planner::plan(std::span<const int> tokens, int prefix_length, std::string_view name_space) {
  Impl& m = *impl_;
  m.validate_tokens(tokens);
  const int T = static_cast<int>(tokens.size());
  if (prefix_length < 0 || prefix_length >= T)
    throw std::invalid_argument("prefix_length: must be in [0, tokens) (the last token is always computed)");
  Plan plan;
  plan.name_space = std::string(name_space);
  plan.prefix_length = prefix_length;
  plan.kv = m.store.state({}, 0);  // the store's page size and pool: it keeps the pages the forward writes

  KVBlockStore::Prefix stored = m.store.longest_prefix(name_space, tokens);
  const auto [l2_from, l2_to] = m.fill_from_l2(name_space, tokens, stored);
  if (l2_to > l2_from) stored = m.store.longest_prefix(name_space, tokens);
  if (stored.approximate && m.config.blend.enabled) stored = m.held_to_guard(name_space, tokens, std::move(stored));
  // Of the K/V the plan starts from, the tokens L2 gave.
  auto count_l2 = [&, l2_from = l2_from, l2_to = l2_to] {
    plan.report.reused_from_l2 = std::clamp(plan.kv.length - l2_from, 0, l2_to - l2_from);
  };
  const int L = std::min(stored.length, T - 1);
  double best = m.cost.reuse(T, L);
  // The cache route serves a declared shared context the store misses. With
  // blending on it is never priced: a blend reuses what the cache would
  // (a similar prompt's work) and saves the projections and MLP too, while
  // the cache's first use of any prompt is a miss that pays its capture.
  const bool blend = m.config.blend.enabled && m.model.n_layers >= kMinBlendLayers && T - L >= kMinBlendRows;
  const bool cache = m.config.cache && !m.config.blend.enabled && L < prefix_length;
  const auto neighbours = cache || blend ? m.store.similar(name_space, tokens, kDonorCandidates)
                                         : std::vector<KVBlockStore::Similar>{};
  if (cache && !neighbours.empty() && neighbours.front().similarity >= kCacheNeighbour &&
      m.cost.cache(T, prefix_length) < best) {
    plan.route = Plan::Route::kCache;
    best = m.cost.cache(T, prefix_length);
  }
  if (blend) {
    const KVBlockStore::Prefix exact = stored.approximate ? m.store.longest_prefix(name_space, tokens, true) : stored;
    const int skip = std::min(exact.length, T - 1);
    if (auto candidate = m.blend_candidate(tokens, skip, name_space, neighbours)) {
      if (candidate->expected < best) {
        plan.route = Plan::Route::kBlend;
        plan.blend = std::move(candidate->plan);
        plan.kv = m.store.state(exact.blocks, skip);
        count_l2();
        return plan;
      }
      if (candidate->served < best) {  // priced out by its refusal rate alone
        m.calibration->priced_out(name_space);
        // Screened where the prompt is computed from exact K/V alone.
        if (!stored.approximate) plan.screen = std::move(candidate->plan);
      }
    }
  }
  if (plan.route == Plan::Route::kReuse && L > 0) {
    plan.kv = m.store.state(stored.blocks, L);
    plan.reused_exact = !stored.approximate;
    plan.reused_error = stored.error;
  }
  count_l2();
  return plan;
}

llama::ForwardResult Planner::execute(llama::Engine& engine, std::span<const int> tokens, Plan& plan, int keep_rows) {
  Impl& m = *impl_;
  plan.report.reused = plan.kv.length;
  // A blend keeps one row's logits; asked for more, the plan's exact
  // prefix is computed on (plan() handed it over as plan.kv).
  if (plan.route == Plan::Route::kBlend && keep_rows == 1) return m.execute_blend(engine, tokens, plan);
  if (plan.route != Plan::Route::kCache) return m.execute_forward(engine, tokens, plan, keep_rows);
  return m.execute_cache(engine, tokens, plan, keep_rows);
}

std::vector<CalibrationSample> Planner::calibrate(llama::Engine& engine,
                                                  std::span<const std::vector<int>> passages) {
  Impl& m = *impl_;
  if (passages.size() < 3) throw std::invalid_argument("passages: need a head and at least two more");
  std::vector<int> donor;
  for (const std::vector<int>& p : passages) {
    if (p.empty()) throw std::invalid_argument("passages: an empty passage");
    donor.insert(donor.end(), p.begin(), p.end());
  }
  m.validate_tokens(donor, "passages");
  if (donor.size() < kMinCalibrationSample)
    throw std::invalid_argument("passages: need at least " + std::to_string(kMinCalibrationSample) + " tokens in all");
  if (!m.config.blend.enabled) throw std::invalid_argument("calibrate: blending is off in this planner");
  if (m.model.n_layers < kMinBlendLayers)
    throw std::invalid_argument("calibrate: a model of " + std::to_string(m.model.n_layers) +
                                " layer(s) cannot blend (kMinBlendLayers)");
  llama::KVState donor_kv;
  donor_kv.page_tokens = m.config.block_tokens;
  // The donor's forward and every blend are timed, for the cost model and
  // the blends' cost factor (BlendCalibration::blend_cost_factor); not the
  // exact forwards the blends are measured against, which keep every row's
  // logits (the probes' among them), as no prefill does.
  engine.timers() = {};
  engine.forward(donor, donor_kv, {}, 1);
  const llama::Timers& timers = engine.timers();
  m.cost.observe(static_cast<int>(donor.size()), timers.total_cpu_s, timers.attention_cpu_s);
  m.cost.observe_parallelism(timers.total_cpu_s, timers.total_s);
  const TokenAnchors anchors = index_anchors(donor);
  BlendConfig unguarded = m.config.blend;  // measure every sample, however far off
  unguarded.max_error = INFINITY;
  std::vector<CalibrationSample> samples;
  for (const std::vector<int>& prompt : calibration_prompts(passages)) {
    llama::KVState kv, exact_kv;
    llama::ForwardResult blended;
    const int T = static_cast<int>(prompt.size());
    const Stopwatch timer;
    const std::vector<std::vector<AlignedRun>> runs = {
        align_runs(prompt, request_kgrams(prompt, anchors.anchor), donor, anchors)};
    const TokenAlignment alignment = merge_alignments(runs, T);
    const BlendOutcome out =
        blend_prefill(engine, prompt, {&donor_kv, 1}, alignment, kv, unguarded, {INFINITY, INFINITY}, blended);
    m.cost.observe_blend(m.blend_shape(T, 0, out.recomputed, alignment), timer.cpu_s(), timer.wall_s());
    const llama::ForwardResult exact = engine.forward(prompt, exact_kv, {}, T);  // every row: the probes'
    samples.push_back(m.measure_blend(engine, out, exact.logits, 0, T));
    m.calibration->add(samples.back(), m.config.blend);
  }
  if (m.cost.blend_factor() > 0.0) m.calibration->set_blend_cost_factor(m.cost.blend_factor());
  return samples;
}

void Planner::observe(int rows, double total_cpu_s, double attention_cpu_s) {
  impl_->cost.observe(rows, total_cpu_s, attention_cpu_s);
}

std::size_t Planner::stored_prompts() const { return impl_->store.size(); }
std::size_t Planner::stored_bytes() const { return impl_->store.bytes(); }
void Planner::clear(std::string_view name_space) { impl_->store.clear(name_space); }
L2Stats Planner::l2_stats() const { return impl_->l2 ? impl_->l2->stats() : L2Stats{}; }

}  // namespace attention_echo::serving
