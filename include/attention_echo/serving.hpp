// Serving: the prefill planner. For a prompt (tokens, namespace) it plans
// how to reuse earlier work and the engine executes the plan:
//
//   reuse  - take the K/V of the longest stored token prefix, compute the
//            rest exactly (what vLLM and SGLang do);
//   blend  - the KV-blend tier: take the per-layer K/V of a similar stored
//            prompt for the tokens that align with it, recompute what
//            deviates, guarded by a measured error estimate;
//   cache  - every row through the layers, the shared context's attention
//            served by AttentionEchoCache.
//
// The planner picks the cheapest by a cost model fitted on measured
// forwards, so with blending and the cache off it is exact prefix reuse,
// and with them on it is a superset of it: reuse stays available to every
// prompt and wins whenever it is cheapest. Stored K/V lives in fixed-size
// token blocks named by hashes chained over the namespace and the tokens
// (docs/architecture.md, "A prompt through serving"): lookup cost is
// independent of how many prompts are stored; a byte budget with LRU.
#pragma once

#include <array>
#include <cstddef>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attention_echo/cache.hpp"
#include "attention_echo/l2_store.hpp"
#include "attention_echo/llama.hpp"

namespace attention_echo::serving {

// How a blend chooses the aligned rows it recomputes (kv_blend.hpp).
enum class BlendSelection {
  // kRunStart for a prompt whose aligned text sits where it sat in its
  // donors but for edits (serving::moves_text), kDeviation where text moved.
  kAuto,
  // The rows nearest the start of their aligned run, where the donor's
  // context stops being the prompt's and reused K/V deviate most. Layer 0's
  // K/V of every row are projected (a token and its position make them),
  // its attention and MLP run for the selected rows only. Moved passages
  // deviate throughout, not just where they begin: on unseen text at 1024
  // tokens their continuations' perplexity moved by up to 1.6%
  // (BENCHMARKS.md section 12).
  kRunStart,
  // CacheBlend's: layer 0 over every row, then the rows whose layer-1 K/V
  // deviate most from the donor's (HKVD). Costs a layer of every row more.
  kDeviation,
};

// "auto", "run-start", "deviation" (the `aecho bench --blend-selection`
// and Python `blend_selection` names).
std::string_view to_string(BlendSelection selection);
// The selection so named; std::invalid_argument naming blend_selection for
// any other text.
BlendSelection parse_blend_selection(std::string_view text);

struct BlendConfig {
  bool enabled = false;
  BlendSelection selection = BlendSelection::kAuto;
  // Aligned rows recomputed in every layer (chosen by `selection`).
  // Changed tokens and the last recent_rows + 1 rows are always recomputed.
  double recompute_ratio = 0.15;
  // The rows just before the last, recomputed whatever their deviation: the
  // next token leans on them most, and a deviation there is what a global
  // estimate misses (on unseen C headers, a blend at estimate 0.054 reached
  // next-token KL 1.8e-2 with 0 of them; 2.8e-4 with 16).
  int recent_rows = 16;
  // The reused rows the last row attends to most (layer 1, every head),
  // recomputed whatever their deviation: the next token reads them most,
  // and the donor's context left in them is what the guard's evenly
  // spread probes miss (on near-dup traffic blends at estimates 0.02-0.07
  // reached next-token KL 1e-3 to 4.5e-2 with none; BENCHMARKS.md
  // section 8).
  int attended_rows = 16;
  // Guard: the cap on the relative L2 deviation of the reused rows' K/V
  // from their exact values (worst layer) and on the blend's error
  // estimate, that deviation times sqrt(next-token entropy)
  // (kv_blend.hpp); a blend above either is computed exactly. How much
  // output error an estimate means depends on the model (the bundled model
  // kept next-token KL below 3e-6 at deviations up to 0.46; a
  // 260K-parameter model reached 1e-2 at 0.1), so the planner calibrates
  // both bounds at run time (BlendCalibration): the first blend, and every
  // calibrate_every-th after it, is also computed exactly and served
  // exactly, and the KL between the two is measured, for the next token
  // and for the tokens that will follow (CalibrationSample::continuation_kl).
  double max_error = 0.2;
  // Next-token KL (nats) the calibrated guard aims under.
  double max_kl = 1e-3;
  // The continuation's KL (nats; CalibrationSample::continuation_kl) the
  // calibrated guard aims under. A token's expected NLL increase is its KL
  // when the exact model is right, so this is a perplexity change of 0.5%
  // (at the probes' measured ratio, about 0.3%: BENCHMARKS.md 13); served
  // blends sit under the bound, not at it (1e-3 refused most blends of a
  // new namespace: BENCHMARKS.md section 8).
  double max_continuation_kl = 5e-3;
  // A blend whose two most likely next tokens are closer in logit than
  // top1_sigmas times the change the guard lets through is computed
  // exactly, so that greedy decoding does not change: a logit perturbation
  // at KL k moves the top two apart by about 2 sqrt(k), and a guarded blend
  // is let through to KL max_kl (3 sigmas at 1e-3: a gap under 0.19). On
  // unseen C headers two blends at KL 5e-5 and 7e-5 flipped the top token;
  // scaled by the estimate (max_kl (e / guard)^2) the check let one at
  // 4.7e-4 flip it (BENCHMARKS.md section 14). 0: off.
  double top1_sigmas = 3.0;
  // One served blend in calibrate_every is also computed exactly, a sample;
  // a namespace priced out of blending tries one again after as many
  // prompts (BlendCalibration::refusal_rate). 0: neither (the guard at
  // max_error alone once calibrate() is done).
  int calibrate_every = 32;
  int probe_rows = 16;  // reused rows the guard samples in every layer
};

// One calibration sample: an approximate prefill (a blend, or a prompt
// served from a blend's K/V) measured against the exact one.
struct CalibrationSample {
  double estimate = 0.0;         // the guard's estimate (kv_blend.hpp: guard_estimate)
  double kl = 0.0;               // next-token KL (nats), the last row's
  double deviation = 0.0;        // the reused rows' K/V deviation (worst layer)
  // The tokens that will follow, nats: the larger of the mean KL over the
  // guard rows (the prompt's last) and over the probes (reused rows,
  // computed), which read the reused K/V as a continuation does
  // (kv_blend.hpp: measure_sample).
  double continuation_kl = 0.0;
  // How the blend chose the rows it recomputed (never kAuto): samples are
  // pooled by it (BlendCalibration). A prompt served from a blend's K/V
  // and computed again counts as kRunStart.
  BlendSelection selection = BlendSelection::kRunStart;
};

// What a blend must stay under to be served: its estimate (next-token
// error) and its K/V deviation (the continuation's error).
struct BlendGuard {
  double estimate = 0.0;
  double deviation = 0.0;
};

// What K/V deviation costs a model in output error, from calibration
// samples (BlendConfig::max_error). Two errors, each bounded by what
// predicts it: the next token's KL by the estimate (deviation weighed by
// the next token's entropy), the continuation's KL (the guard rows' and
// the probes') by the deviation alone. Over 194 blends on unseen text at
// contexts 256 to 2048 (BENCHMARKS.md section 8) the next token's KL /
// estimate^2 had medians from 8e-4 to 0.1 between prompt shapes (a RAG
// prompt's next token is nearly certain) where the guard rows' KL /
// deviation^2 had 0.35
// to 0.9 (0.56 in all, 90th percentile 2.8); RAG blends whose next token
// was safe carried guard-row KL of 1e-2 to 3e-1 into their continuation
// (NLL changes of 0.02 to 0.14 nats per token). KL grows about as the
// square of a small deviation, so samples bound each at
// sqrt(target * sum value^2 / sum KL), the value at which their mean KL
// meets the target (max_kl or max_continuation_kl): a ratio estimator, over
// the samples of one selection (text in place and moved text deviate
// differently: BlendSelection), the smallest of the two. Per-sample KL is
// heavy-tailed (one sample's 16 probes read 1e-11 to 1), so the smallest
// per-sample bound, the guard before, was the noisiest sample's
// (BENCHMARKS.md section 15). A quiet sample (KL under target / 100) is
// taken at that floor, vouching for ten times its value at most; a
// selection with only quiet samples bounds only where no other has a loud
// one (on unseen text a quiet startup sample at deviation 0.0026 had set
// the deviation bound at 0.026, under the 0.065 a loud one allowed, and
// every moved-passage blend of a namespace was refused; section 8).
//
// Per namespace. How much KL an estimate means varied by five orders of
// magnitude between prompt shapes on unseen text (BENCHMARKS.md section 8:
// blends of RAG prompts ending in a fresh question stayed under KL 2e-4 at
// estimates up to 0.11 where edited code reached 1.2e-3 at 0.056), and a
// namespace is one application's traffic, its prompts of one shape. So a
// namespace is guarded by its own samples once it has one, by every sample
// of the model (calibrate()'s and every namespace's) before. (Measured and
// dropped, BENCHMARKS.md section 8: holding a namespace to the stricter of
// its own and the model's bounds until it had two or three samples of its
// own, which refused most blends of every new namespace; and guarding a
// new namespace by calibrate()'s samples alone, which served moved-passage
// blends other namespaces' samples had warned of, perplexity -0.75%.)
//
// Samples come from calibrate() (the model's only), from one blend in
// calibrate_every, from the blends the guard refuses while
// their namespace has no sample of its own (finished and measured against
// the exact prefill that replaces them; a refused blend of a namespace
// with samples stops where it was refused unless it is the calibration
// blend), and from prompts that reused a blend's K/V and were computed
// again. Measuring every refused blend cost the remaining layers of each,
// and refused blends' samples are the loud ones: on unseen RAG prompts
// with moved passages two refused blends' samples refused a good one
// (0.93x exact prefix reuse; 1.28x stopping; BENCHMARKS.md section 8). The
// estimates of each namespace's recent blends give the rate at which the
// current guard would refuse its next one, which the planner prices in,
// and its recent screens (a blend priced out, read off the prompt's exact
// prefill: screen_blend) count with them. A namespace with neither is
// priced at the odds of the model's namespaces' first verdicts of its
// selection: on unseen text at 512-1024 tokens most first blends were
// refused, and each one tried cost more than its namespace's 16 prompts
// repaid (BENCHMARKS.md sections 14-18, 21-22). A namespace's record (at
// most 32 blends or screens and its pooled samples) lives as long as the
// calibration: it is what the model was measured to do on that traffic,
// so Planner::clear leaves it. One per model: planners of the same model
// may share it. Thread-safe.
class BlendCalibration {
 public:
  BlendCalibration() = default;
  // A snapshot of other's record that goes its own way from here: a second
  // serving stack that must decide as the first one would (aecho bench's
  // repeats).
  BlendCalibration(const BlendCalibration& other);
  BlendCalibration& operator=(const BlendCalibration&) = delete;

  // Whether the next blend should be a calibration one (none taken yet, or
  // calibrate_every blends since the last), counting it.
  bool next_blend_calibrates(const BlendConfig& config);
  // A sample of the model in no namespace (calibrate()). Both add()s throw
  // std::invalid_argument, adding nothing, for a negative or non-finite
  // value or a kAuto selection.
  void add(const CalibrationSample& sample, const BlendConfig& config);
  // A sample of a blend served in name_space.
  void add(std::string_view name_space, const CalibrationSample& sample, const BlendConfig& config);
  BlendGuard threshold(std::string_view name_space, const BlendConfig& config) const;
  // Every blend's estimate and deviation (its worst layer), guarded or not,
  // and whether the guard refused it for a near tie of its next tokens
  // (BlendConfig::top1_sigmas).
  void record_blend(std::string_view name_space, double estimate, double deviation, bool near_tie = false,
                    BlendSelection selection = BlendSelection::kRunStart);
  // A screened blend's (ScreenedBlend, the prompt's exact next-token
  // logits for near_tie), counted as a blend is but not as a try: the
  // namespace's count of prompts priced out goes on.
  void record_screen(std::string_view name_space, double estimate, double deviation, bool near_tie = false,
                     BlendSelection selection = BlendSelection::kRunStart);
  // (refused + 1) / (n + 2) over the namespace's last n recorded blends and
  // screens, refused meaning above the namespace's guard now, or at a near
  // tie (a property of the prompt, not of the guard: on the bundled model
  // at 512 tokens near ties refused 2 of near-dup's 15 blends); with none,
  // the same over the first verdicts of the model's last 32 namespaces
  // whose first blend ran (or was screened with) `selection` (moved text
  // and text in place differ: BlendSelection, and the guard's pools); 0
  // once calibrate_every prompts in a row were denied a blend by it
  // (priced_out), so that one blend is tried: a namespace whose first
  // blends were refused and that has no screens to read would otherwise
  // never blend again, whatever its traffic or its guard became.
  double refusal_rate(std::string_view name_space, const BlendConfig& config,
                      BlendSelection selection = BlendSelection::kRunStart) const;
  // A prompt of the namespace was planned without a blend that would have
  // been cheapest had it not been priced at the refusal rate.
  void priced_out(std::string_view name_space);
  // What blends cost next to what the planner's row counts predict
  // (measured / modelled time; 1 until calibrate() measured it): the price
  // of a blend before a planner has timed its own. The modelled time leaves
  // out what a blend does besides computing rows (alignment, donor pages,
  // re-rotation, selection, the guard), which on the bundled model is
  // nothing at 4096 tokens and a quarter of a blend at 256-512, where it
  // had made the first blends of every namespace look cheap enough to try.
  void set_blend_cost_factor(double factor);
  double blend_cost_factor() const;
  long long samples() const;
  // The namespace's own samples.
  std::size_t samples(std::string_view name_space) const;

 private:
  // One bound's samples of one selection, pooled: sums of value^2 and of
  // KL, each KL taken at target / 100 at least (a quiet sample).
  struct Pool {
    double value2 = 0.0, kl = 0.0;
    std::size_t size = 0;
    bool loud = false;  // holds a sample at KL target / 100 or more
    void add(double value, double kl, double target);
    // sqrt(target * sum value^2 / sum KL): where their mean KL meets target.
    double bound(double target) const { return std::sqrt(target * value2 / kl); }
  };
  // The bound of a bound's pools: the smallest loud one's, the smallest
  // quiet one's without a loud one (a quiet pool bounds only from below).
  static double pooled_bound(const std::array<Pool, 2>& pools, double target);
  struct Samples {
    std::array<Pool, 2> estimate, deviation;  // [0] kRunStart, [1] kDeviation
    void add(const CalibrationSample& sample, const BlendConfig& config);
    BlendGuard threshold(const BlendConfig& config) const;
    std::size_t size() const { return estimate[0].size + estimate[1].size; }
  };
  struct Namespace {
    Samples samples;
    struct Blend {
      double estimate, deviation;
      bool near_tie;
    };
    std::vector<Blend> recent;  // the last kRecentBlends blends and screens, a ring
    std::size_t next = 0;
    int priced_out = 0;  // prompts since the last blend (priced_out)
  };
  struct FirstVerdict {
    std::string name_space;
    BlendSelection selection;
    Namespace::Blend blend;
  };
  static constexpr std::size_t kRecentBlends = 32;
  BlendGuard threshold_locked(std::string_view name_space, const BlendConfig& config) const;
  // Into the namespace's ring, and the model's first verdicts if its first.
  void record_locked(std::string_view name_space, const Namespace::Blend& blend, BlendSelection selection);
  // Whether `blend` is past `guard`, or was at a near tie.
  static bool refused(const Namespace::Blend& blend, const BlendGuard& guard);

  mutable std::mutex mutex_;
  long long blends_since_sample_ = 0;
  double blend_cost_factor_ = 1.0;
  Samples model_;
  std::map<std::string, Namespace, std::less<>> namespaces_;
  std::vector<FirstVerdict> first_verdicts_;  // the last kRecentBlends namespaces' first, a ring
  std::size_t next_first_ = 0;
};

// The shortest text Planner::calibrate takes: its blends must be long
// enough for the planner to consider blending at all (kMinBlendRows). A
// model whose context is 256 tokens (llama2.c's stories15M) blends prompts
// of 128-224 rows; with a floor of 256 its guard was never calibrated
// before serving, and the first blend a workload planned was computed
// twice to calibrate it (1.6-1.7 prefills of its request: echo 0.93x
// exact prefix reuse on three texts at 256 tokens, BENCHMARKS.md 10).
inline constexpr int kMinCalibrationSample = 128;

// The fewest layers a model needs to blend: a blend computes layer 0's K/V
// of every row and reuses K/V from layer 1 on, so a one-layer model has
// nothing to reuse. Planners of shallower models never plan a blend.
inline constexpr int kMinBlendLayers = 2;

struct PlannerConfig {
  std::size_t store_bytes = std::size_t{512} << 20;
  // K/V memory the planner writes in at construction (at most store_bytes),
  // as a server takes its K/V cache at startup: the store's pages then come
  // from memory the process already holds (llama::KVPagePool).
  std::size_t reserve_bytes = 0;
  // K/V block size of the store, which is the page size of the plans' K/V
  // (llama::KVState): a positive multiple of 64. Stored blocks go to the
  // engine as they are, and its pages to the store, without a copy.
  int block_tokens = llama::KVState::kDefaultPageTokens;
  // The cache route (priced only with blending off); must outlive the planner.
  AttentionEchoCache* cache = nullptr;
  BlendConfig blend;
  std::shared_ptr<BlendCalibration> calibration;  // null: the planner keeps its own
  // Shared L2 store of exact K/V blocks (several processes serving one
  // model): "" for none, else "redis://HOST:PORT[?deadline_ms=3&...]" as
  // EchoConfig::store_url. Needs model_fingerprint (llama::Model::
  // fingerprint()): it is part of every key, so models never share K/V.
  std::string store_url;
  std::uint64_t model_fingerprint = 0;
};

// What executing a plan did, for reports.
struct PrefillReport {
  int reused = 0;               // leading tokens whose K/V came from the store
  int reused_from_l2 = 0;       // of those, tokens the shared L2 store gave (another process computed)
  bool reused_exact = true;     // false: those came from a blended or echoed forward
  // Blend: rows (past `reused`) run through layer 0 besides the
  // recomputed ones (kDeviation's every row; 0 with kRunStart), and those
  // taken from the donor and those recomputed in every other layer.
  int blend_first_layer = 0, blend_reused = 0, blend_recomputed = 0;
  double estimated_error = 0.0;  // guard estimate (blend), or the reused K/V's
  bool blend_rejected = false;   // the guard refused it; computed exactly instead
  // Blend: its K/V deviation (worst layer computed: up to the refusal where
  // a refused blend stopped, every layer where it was finished to be
  // measured), the bounds the guard held its estimate and deviation to (at
  // most max_error), and the layer it refused the blend at (-1: not
  // refused; n_layers: at the head), so that a refusal's margin shows per
  // request.
  double blend_deviation = 0.0;
  BlendGuard blend_bounds;
  int blend_refused_at_layer = -1;
  // Also computed exactly (and served exactly): a calibration blend, or a
  // prompt that reused a blend's K/V computed again from its exact prefix
  // (past the guard now, or a near tie at the head). The KL between the
  // approximate and the exact prefill, in nats, next-token and the
  // continuation's (CalibrationSample), for those and for a blend the guard
  // refused past layer 1 (finished, not served).
  bool blend_calibration = false;
  double calibration_kl = 0.0;
  double calibration_continuation_kl = 0.0;
  // Priced out of a blend and computed exactly: what the blend would have
  // measured, read off the exact prefill (screen_blend: the probes'
  // deviation, worst layer, and its guard estimate under the last row's
  // logits), and whether the guard then would have refused it.
  bool blend_screened = false;
  double screened_estimate = 0.0, screened_deviation = 0.0;
  bool screened_refused = false;
  std::vector<EchoResult> echo;  // cache route: per layer
};

struct BlendPlan;  // donor K/V and alignment, opaque

struct Plan {
  enum class Route { kReuse, kBlend, kCache };
  Route route = Route::kReuse;
  std::string name_space;
  int prefix_length = 0;   // the shared context the application declared (cache route)
  llama::KVState kv;       // the stored prefix's K/V (the store's own blocks); after execute: the prompt's
  bool reused_exact = true;
  double reused_error = 0.0;
  std::shared_ptr<const BlendPlan> blend;  // kBlend only
  // kReuse from exact K/V, a blend priced out by its refusal rate alone:
  // screened after the exact prefill (BlendCalibration::record_screen).
  std::shared_ptr<const BlendPlan> screen;
  PrefillReport report;    // filled by execute
};

// Not thread-safe: one Planner per Engine.
class Planner {
 public:
  // Throws std::invalid_argument naming a bad field.
  Planner(const llama::ModelConfig& model, PlannerConfig config = {});
  ~Planner();
  Planner(Planner&&) noexcept;

  // tokens: ids in the vocabulary, 1 to seq_len of them; prefix_length in
  // [0, tokens) (the last token is always computed: its logits). Throws
  // std::invalid_argument naming the argument; stores nothing.
  Plan plan(std::span<const int> tokens, int prefix_length = 0, std::string_view name_space = {});
  // Runs the prompt as planned (keeping the logits of the last keep_rows
  // rows, all when negative), leaves its K/V in plan.kv, stores it and fills
  // plan.report.
  llama::ForwardResult execute(llama::Engine& engine, std::span<const int> tokens, Plan& plan, int keep_rows = 1);
  // Calibrates the blend guard before serving, so no request pays for it,
  // from `passages` of the workload's text (a shared head such as a system
  // prompt first; kMinCalibrationSample tokens or more in all, at most the
  // context): blends of prompts made of them from their concatenation's
  // K/V, each also computed exactly: the passages after the head in
  // reverse order (chunks that moved), an 8-token edit inside one, and 32
  // tokens inserted after the head (every later position shifted). The
  // samples go to the planner's BlendCalibration; the first blend served
  // is then an ordinary one. Stores nothing. Throws std::invalid_argument
  // naming `passages`, or when blending is off.
  std::vector<CalibrationSample> calibrate(llama::Engine& engine, std::span<const std::vector<int>> passages);
  // Teaches the cost model what a forward over `rows` rows without reuse
  // cost, in CPU seconds: in total and in attention.
  void observe(int rows, double total_cpu_s, double attention_cpu_s);

  std::size_t stored_prompts() const;
  std::size_t stored_bytes() const;
  // Drops the stored K/V of one namespace (a tenant leaving); other
  // namespaces keep theirs.
  void clear(std::string_view name_space);
  // The shared L2 store's counters (PlannerConfig::store_url), keys being
  // K/V blocks; zeros without one.
  L2Stats l2_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace attention_echo::serving
