// The KV-blend tier (CacheBlend's idea, with a measured guard): prefill a
// prompt from the per-layer K/V of similar stored requests (the donors, each
// token from the one sharing the longest context before it), recomputing
// only what deviates. Rows [0, skip) hold K/V from the store, exact, never
// recomputed. The rows past them that are computed in every layer (the
// "selected") are chosen one of two ways (BlendSelection):
//
// kRunStart (kAuto's where no text moved):
//   layer 0          K/V of every row projected: they depend on the token
//                    and its position alone, so they are exact;
//   selected         the aligned rows nearest the start of their run (the
//                    recompute_ratio of them), the attended_rows ones the
//                    last row attends to most in layer 1 (its query
//                    against the donors' K), every unaligned row and the
//                    last recent_rows + 1 rows;
//   layers 0..L-1    the selected rows computed from their embeddings,
//                    every other row's K/V taken from the donor (K
//                    re-rotated where its position moved).
// kDeviation (CacheBlend's selection; kAuto's where text moved):
//   layer 0          every row computed (its output feeds layer 1);
//   layer 1          K/V of every row projected, compared with the donor's;
//                    the rows that deviate most (recompute_ratio of the
//                    aligned ones), the attended_rows the last row attends
//                    to most in layer 1, every unaligned row and the last
//                    recent_rows + 1 rows go on;
//   layers 2..L-1    as above.
// A reused row's K/V deviate most just past where its donor's context
// stops being the prompt's (merge_alignments), so after an edit the rows
// nearest a run's start are mostly the ones CacheBlend's ranking would
// pick, without running layer 0 over every row to rank them (a third of a
// blend at 1024 tokens); a moved passage's rows deviate throughout, so
// there the ranking is worth its layer (BENCHMARKS.md section 12).
//
// The guard: a deterministic sample of the reused rows is computed along
// with the selected ones; the relative L2 deviation of their fresh K/V from
// the donor's, worst layer, is the request's K/V deviation (with
// kDeviation, layer 1 is measured over every reused row, and a blend above
// max_error there, where unrelated donors show, goes on exactly from the
// layer-0 output it already has, wasting only layer 1's projections).
// Otherwise the blend is finished and its error estimate is the deviation
// times the square root of a next-token entropy (nats): the larger of the
// last row's and the mean over the guard rows (the prompt's last
// recent_rows + 1, computed in full by every blend, standing in for the
// tokens that will follow). A logit perturbation costs KL in proportion to
// the distribution's spread (KL ~ Var_p(delta) / 2), so the last row's
// entropy makes the estimate rank the next token's KL, which the deviation
// alone barely did; the guard rows' mean keeps a prompt whose next token
// is nearly certain from hiding a deviation the tokens after it will read
// (BENCHMARKS.md section 8). Above the guard's bound, past max_error
// deeper, or with its top two next tokens nearly tied
// (BlendConfig::top1_sigmas), the blend is refused and the prompt is
// computed exactly (from layer 1 on with kDeviation): its work past layer
// 0 is lost. A blend refused in a deep layer either stops there
// (RefusedBlend::kStop) or is finished first so that its guard rows and
// probes, measured against the exact ones, are a calibration sample
// (kMeasure, at the price of the layers after the refusal, unless its
// deviation reaches three times its bound: past that a sample only ever
// confirmed the refusal). The deviation is also held to the guard's
// deviation bound (the continuation's error) in every layer.
#pragma once

#include <optional>
#include <span>
#include <vector>

#include "attention_echo/llama.hpp"
#include "attention_echo/serving.hpp"
#include "serving/kv_block_store.hpp"
#include "serving/token_alignment.hpp"

namespace attention_echo::serving {

struct BlendOutcome {
  bool blended = false;        // served from the donor (else computed exactly after layer 0)
  BlendSelection selection = BlendSelection::kRunStart;  // the one it ran (never kAuto)
  double deviation = 0;        // relative K/V deviation of the reused rows, worst layer (so far when stopped)
  // guard_estimate; stopped before the head: the deviation times
  // sqrt(ln vocab), the most any distribution makes of it.
  double estimated_error = 0;
  int reused = 0;              // rows whose K/V came from the donor in the deep layers
  int recomputed = 0;          // rows computed in every layer (selected + probes)
  int first_layer_rows = 0;    // rows run through layer 0 to select them (kDeviation's every row; else 0)
  int stopped_at_layer = -1;   // where the guard refused the donor (n_layers: at the head)
  bool near_tie = false;       // refused at the head for its top two next tokens (near_tie)
  // The guard rows' logits ([rows, vocab]) of the blend, finished even when
  // refused with kMeasure (but at kDeviation's layer 1): what it served, or
  // would have.
  std::vector<float> guard_logits;
  // The probes (reused rows the guard computes in every layer; ascending)
  // and the blend's final hidden rows at them ([probes, dim]) where it ran
  // to the head: probe_logits() of a blend that is measured. Hidden rows,
  // not logits: the classifier's pass for them cost a served blend ~12 of
  // ~300 ms on SmolLM2-135M at 800 tokens (vocab 49152: 113 MB of weights
  // streamed for 16 rows), for nothing unless it is measured.
  std::vector<int> probes;
  std::vector<float> probe_hidden;
  // Refused with RefusedBlend::kMeasure (but at kDeviation's layer 1, or
  // with its deviation three times its bound): the blend measured against
  // the exact prefill that replaced it.
  std::optional<CalibrationSample> refusal_sample;
};

// The blend's logits at its probes ([probes, vocab]; empty where it
// stopped before the head).
std::vector<float> probe_logits(llama::Engine& engine, const BlendOutcome& out);

// What a blend the guard refuses in a deep layer does: stop there, or be
// finished (the selected rows only) and measured against the exact
// prefill that replaces it (BlendOutcome::refusal_sample), stopping in a
// later layer where its deviation reaches three times its bound.
enum class RefusedBlend { kStop, kMeasure };

// Prefills `tokens` into kv (kv must hold exactly the first `skip` rows,
// exact) from `donors` (stored prompts' K/V, KVBlockStore::state) aligned
// by `alignment` (TokenAlignment::donor indexes `donors`), writing the
// donors' rows (K re-rotated where they moved)
// into kv's own pages, keeping the logits of the last row in result. The
// guard refuses an estimate or deviation above `guard`'s (the calibrated
// bounds, BlendCalibration::threshold) or config.max_error. Throws
// std::invalid_argument on inconsistent arguments. Needs an engine of at
// least kMinBlendLayers layers and 0 <= kv.length < tokens.size().
BlendOutcome blend_prefill(llama::Engine& engine, std::span<const int> tokens, std::span<const llama::KVState> donors,
                           const TokenAlignment& alignment, llama::KVState& kv, const BlendConfig& config,
                           const BlendGuard& guard, llama::ForwardResult& result,
                           RefusedBlend refused = RefusedBlend::kMeasure);

// What a blend of a prompt would have measured, read off the prompt's
// exact prefill instead: its probes' exact K/V (every layer from 1; with
// kDeviation, layer 1's of every reused row, then the probes from layer 2)
// against the donors' K/V they would have replaced, and that deviation's
// guard estimate under exact logits of the prompt's last rows. A screen
// costs a few rows of arithmetic where a blend costs a tenth to a half of
// a prefill, and it reads conservatively: a blend's fresh rows attend to
// the donor's K/V and drift toward it, so a served blend's probes deviate
// 1.2-1.4 times less than the same rows computed exactly (over 95 first
// blends of four texts at 512-4096 tokens, [deviation within the guard]
// matched the blend's verdict 91 times; BENCHMARKS.md section 21). kDeviation's screen
// keeps among the reused rows the attended_rows a blend would recompute
// (finding them takes layer 1's query of the last row, which a finished
// prefill no longer has).
struct ScreenedBlend {
  BlendSelection selection = BlendSelection::kRunStart;  // never kAuto
  double deviation = 0;  // relative, worst layer
  double estimate = 0;   // guard_estimate(deviation, logits)
  std::vector<int> probes;  // ascending: the blend's (BlendOutcome::probes), kDeviation's as noted
};

// kv: the prompt's exact K/V, every row (tokens past `skip` computed);
// alignment and donors as blend_prefill takes them; logits: the exact
// logits of the prompt's last rows ([rows, vocab]: its guard rows, or only
// the last) the estimate is taken under. Throws std::invalid_argument on
// inconsistent arguments.
ScreenedBlend screen_blend(const llama::Engine& engine, std::span<const llama::KVState> donors,
                           const TokenAlignment& alignment, int skip, const llama::KVState& kv,
                           std::span<const float> logits, const BlendConfig& config);

// The selection a blend of this alignment makes: `selection`, kAuto
// resolved (BlendSelection::kAuto).
BlendSelection resolve_selection(BlendSelection selection, const TokenAlignment& alignment);

// Drops all but the last `rows` rows of a forward's hidden states and
// logits (all kept when rows < 0).
void keep_last_rows(llama::ForwardResult& result, int rows, const llama::ModelConfig& c);

// The rows whose next-token logits the guard measures, the last of a
// prompt's `computed_rows` (those past the stored prefix).
int guard_rows(const BlendConfig& config, int computed_rows);

// The guard's error estimate of K/V deviating by `deviation` under the
// guard rows' logits ([rows, vocab]): deviation * sqrt(max(mean entropy,
// the last row's entropy)), entropies in nats.
double guard_estimate(double deviation, std::span<const float> logits, int vocab);

// The sample of an approximate prefill at `estimate` and `deviation`
// whose guard rows' logits ([rows, vocab]) were `approximate` where the
// exact prefill's were `exact`, and its probes' `approximate_probes` where
// the exact ones were `exact_probes` (none for a prompt that reused a
// blend's K/V): KL(exact || approximate) of the last row, and as the
// continuation's KL the larger of its means over the guard rows and over
// the probes, nats. The guard rows alone stood in badly for the tokens that
// follow a prompt: they attend mostly to the question or line they end,
// while the continuation reads the reused rows as the probes do. Over 43
// blends on unseen Python at 1024 tokens the continuation's per-token NLL
// change was a median 7.9 times the guard rows' mean KL (90th percentile
// 72) and 0.65 times the probes' (5.1); moved passages whose guard rows
// measured KL 4e-4 to 1e-2 moved their continuations' perplexity by -0.93%
// (BENCHMARKS.md section 13). Throws std::invalid_argument unless both
// hold the same one or more guard rows and the same number of probe rows.
CalibrationSample measure_sample(double estimate, double deviation, std::span<const float> exact,
                                 std::span<const float> approximate, int vocab,
                                 std::span<const float> exact_probes = {},
                                 std::span<const float> approximate_probes = {});

// The logits of the rows at `positions` out of a forward's logits of every
// row from `first` on ([rows, vocab]).
std::vector<float> logits_at(std::span<const float> logits, std::span<const int> positions, int first, int vocab);

// Whether the top two of a row's next-token logits are within reach of the
// logit change a guarded blend may make: a perturbation at KL k moves them
// apart by about 2 sqrt(k), and a blend under a finite guard is let through
// up to KL max_kl (BlendConfig::top1_sigmas). Not max_kl (e / g)^2, what
// estimate e under guard g predicts: a guard set by a quiet sample (ten
// times its estimate) let a blend through at 50 times the KL it predicted,
// and that blend flipped a top-1 (BENCHMARKS.md section 14).
bool near_tie(std::span<const float> logits, double guard, const BlendConfig& config);

// Whether an approximate prefill at `estimate` and `deviation` (its last
// row's logits `logits`) must be computed exactly: past either of the
// guard's bounds or config.max_error, or a near tie.
bool refused(double estimate, double deviation, std::span<const float> logits, const BlendGuard& guard,
             const BlendConfig& config);

}  // namespace attention_echo::serving
