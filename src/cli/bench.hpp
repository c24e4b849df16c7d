// Scenario workloads and the three-way serving benchmark behind `aecho bench`.
//
// A scenario is a deterministic list of requests built from real held-out
// text. Every request is served three ways in the same run, one after the
// other: no reuse, exact prefix reuse (vLLM/SGLang: skip the longest stored
// token prefix), and AttentionEcho (serving::Planner's plan: reuse a stored
// prefix, blend a similar stored prompt's K/V, or, with blending off, run
// every layer through AttentionEchoCache). The benchmark only measures; the
// serving module decides and executes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <span>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "attention_echo/config.hpp"
#include "attention_echo/llama.hpp"
#include "attention_echo/serving.hpp"

namespace attention_echo::bench {

struct ScenarioRequest {
  std::vector<int> tokens;        // the prompt
  int prefix_length = 0;          // the shared context the application declares
  std::vector<int> continuation;  // real text that follows: perplexity reference
};

struct Scenario {
  std::string name;
  std::string description;
  std::vector<ScenarioRequest> requests;
};

// "chatbot", "rag", "code", "near-dup", "rag-shuffled", "chat-edit".
const std::vector<std::string>& scenario_names();

// Builds `requests` requests of at most `context` tokens (prompt plus
// continuation) from held-out text: plain text (one document), or several
// documents, each introduced by a line "#### FILE: name ####" (names under
// pydoc_topics/ or ending in .txt count as prose, the rest as code). The
// same arguments give the same tokens on every machine.
Scenario make_scenario(std::string_view name, std::string_view heldout, const llama::Tokenizer& tokenizer,
                       int context, int requests, std::uint64_t seed);

inline constexpr int kDefaultRepeats = 3;

struct BenchOptions {
  EchoMode mode = EchoMode::kSparse;
  int threads = 0;  // 0 = all hardware threads
  // The echo cache's config (per_layer, mode, threads and max_prefix_length
  // are set by the bench); its guard and tile knobs are the ones to sweep.
  EchoConfig cache;
  // Echo mode's KV-blend tier, and its guard's calibration, shared by the
  // scenarios of a run (one model).
  serving::BlendConfig blend{.enabled = true};
  std::shared_ptr<serving::BlendCalibration> calibration = std::make_shared<serving::BlendCalibration>();
  // Echo mode's shared L2 store (its planner's K/V blocks and its cache):
  // "" for none, else "redis://HOST:PORT[?...]". Another process running the
  // same scenario reads what this one wrote.
  std::string store_url;
  // Serving stacks (bench.cpp: Stack) every request is served on, each
  // mode's prompt time being the median of theirs: one serving's time moves
  // by a few percent on a shared machine, and a slow spell can add half. 1
  // with a shared store, which the stacks would otherwise share.
  int repeats = kDefaultRepeats;
};

// One serving strategy's totals over a scenario.
struct ModeReport {
  std::string name;               // "none", "exact-prefix", "echo"
  int requests = 0;
  double prefill_s = 0.0;         // sum of times to first token (wall)
  double attention_s = 0.0;       // the attention part of prefill_s
  double prefill_cpu_s = 0.0;     // the same in process CPU time
  double attention_cpu_s = 0.0;
  long long tokens_computed = 0;  // prompt rows run through the layers
  long long tokens_total = 0;
  // Reuse by tier, in requests (sums to `requests`): the stored prefix
  // covered the shared context (exact) or part of it (partial); a request
  // routed through the cache adds 1/layers per layer to its layer's tier.
  double exact = 0, partial = 0, sparse = 0, dense = 0, miss = 0, rejected = 0;
  int routed_skip = 0, routed_cache = 0;  // echo: which way requests went
  int routed_blend = 0, blend_rejected = 0;  // echo: KV-blend plans, and those the guard refused
  // echo: prompts priced out of a blend and screened, and those whose screen read past the guard
  int blend_screened = 0, screened_refused = 0;
  int reused_echoed = 0;                  // echo: skipped a prefix whose K/V was echoed
  // Servings on later stacks (BenchOptions::repeats) planned another way
  // than the first stack's, whose route, reuse and fidelity are reported.
  int repeats_on_another_route = 0;
  double kept_fraction_sum = 0.0;         // over sparse layer hits
  long long sparse_layer_hits = 0;
  // Attention CPU seconds of cache-routed layers by tier, and of the same
  // layers in the no-reuse run: how much of the kept fraction turns into time.
  double sparse_layer_s = 0, sparse_layer_base_s = 0;
  double dense_layer_s = 0, dense_layer_base_s = 0;
  double miss_layer_s = 0, miss_layer_base_s = 0;          // no usable candidate
  double rejected_layer_s = 0, rejected_layer_base_s = 0;  // echo tried, guard refused
  // Cache-routed requests per layer: which layers echo and which the guard
  // refuses, and the guard's measured error of the hits it served.
  struct Layer {
    int sparse = 0, dense = 0, exact = 0, miss = 0, rejected = 0;
    double served_error_sum = 0.0;  // estimated_error of sparse/dense hits
  };
  std::vector<Layer> layers;
  // Fidelity against the no-reuse run of the same request, at the last
  // prompt row (the one that yields the first token): relative L2 error of
  // the final hidden state (after the final RMSNorm), top-1 agreement and
  // KL(no reuse || this mode) of the next-token distribution; perplexity of
  // the reference continuation, teacher-forced after the prompt.
  double hidden_rel_err_sum = 0.0, hidden_rel_err_max = 0.0;
  int top1_agree = 0;
  double kl_sum = 0.0;
  double nll_sum = 0.0;  // continuation negative log-likelihood, nats
  long long nll_tokens = 0;
  // Echo and exact-prefix: every request as the planner served it, with
  // the guard's estimate next to the error measured against no reuse (the
  // two modes side by side, request by request).
  struct Request {
    std::string route;  // "reuse", "blend", "cache"
    int tokens = 0, reused = 0;
    int blend_first_layer = 0, blend_reused = 0, blend_recomputed = 0;
    bool blend_rejected = false, blend_calibration = false;
    double estimated_error = 0.0, calibration_kl = 0.0, calibration_continuation_kl = 0.0;
    double blend_deviation = 0.0;  // with the bounds and the refusal layer (PrefillReport)
    serving::BlendGuard blend_bounds;
    int blend_refused_at_layer = -1;
    bool blend_screened = false, screened_refused = false;  // with the screen's deviation (PrefillReport)
    double screened_deviation = 0.0;
    double hidden_rel_error = 0.0, kl = 0.0;
    bool top1_agrees = true;
    double nll_change = 0.0;  // continuation NLL (nats per token) minus no reuse's
    double prefill_ms = 0.0;
    int reused_from_l2 = 0;  // of `reused`: tokens the shared L2 store gave
    int repeats_on_another_route = 0;
  };
  std::vector<Request> per_request;
};

// With a shared store (BenchOptions::store_url): where echo mode's reused
// K/V came from, and the store's counters (their lookup_seconds: the time
// L2 lookups cost, inside echo mode's prefill times).
struct SharedStoreReport {
  bool enabled = false;
  long long prompt_tokens = 0;  // echo mode's prompt rows
  long long reused_l1 = 0;      // rows reused from this process's own store (L1)
  long long reused_l2 = 0;      // rows whose K/V another process computed (L2)
  int requests_l2 = 0;          // requests that reused any L2 rows
  L2Stats kv_blocks;            // the planner's store: keys are K/V blocks
  L2Stats cache;                // the echo cache's store: keys are entries
};

struct ScenarioReport {
  std::string scenario;
  std::string description;
  int mean_prompt_tokens = 0;
  int mean_prefix_tokens = 0;
  // K/V pages each planner wrote in before the first request (the most the
  // prompts can store), and how long setting the stacks up took with it.
  std::size_t kv_reserved_bytes = 0;
  double stacks_setup_s = 0.0;
  std::vector<ModeReport> modes;  // none, exact-prefix, echo
  SharedStoreReport shared_store;
};

// Text to calibrate echo mode's blend guard on before a run: an
// instruction line and four passages retrieved from the held-out text as
// the RAG scenarios retrieve them, drawn from a stream of their own.
std::vector<std::vector<int>> calibration_passages(std::string_view heldout, const llama::Tokenizer& tokenizer,
                                                   int context, std::uint64_t seed);

// Echo mode's blend guard, calibrated before the scenarios run
// (serving::Planner::calibrate on calibration_passages): a one-time
// startup cost, reported here and in no request's time.
struct CalibrationReport {
  bool ran = false;   // false: blending off, or the context too short to blend
  double seconds = 0.0;
  std::vector<serving::CalibrationSample> samples;
  serving::BlendGuard threshold;  // the guard's bounds after it
  double blend_cost_factor = 1.0;  // serving::BlendCalibration::blend_cost_factor after it
};
CalibrationReport calibrate_blend(const llama::Model& model, std::span<const std::vector<int>> passages,
                                  const BenchOptions& options);
nlohmann::ordered_json to_json(const CalibrationReport& report);

// Called after each request with (done, total).
using Progress = std::function<void(int, int)>;

ScenarioReport run_scenario(const llama::Model& model, const Scenario& scenario, const BenchOptions& options,
                            const Progress& progress);

// The human table for one scenario.
std::string format_report(const ScenarioReport& report);
// Every report as one JSON document: the fields of `meta` (describing the
// run), then "scenarios", one object per report; fields keep their order.
nlohmann::ordered_json reports_to_json(const std::vector<ScenarioReport>& reports, nlohmann::ordered_json meta);

}  // namespace attention_echo::bench
