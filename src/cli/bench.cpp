// The three-way serving benchmark. Each request is served by every mode back
// to back, so the modes see the same machine state, and that on each of
// BenchOptions::repeats identical serving stacks; only the prompt is timed
// (planning and forward(): time to first token), a request's time in a
// mode being the median over the stacks. The continuation that scores
// perplexity runs after the clock stops, on the first stack.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "attention_echo/serving.hpp"
#include "cli/bench.hpp"

namespace attention_echo::bench {
namespace {

using llama::Engine;
using llama::ForwardResult;
using llama::KVState;
using serving::Plan;

// One served request.
struct Served {
  double prefill_s = 0.0, attention_s = 0.0, prefill_cpu_s = 0.0, attention_cpu_s = 0.0;
  int reused = 0;  // leading prompt tokens taken from the prefix store
  std::vector<float> hidden, logits;  // last prompt row
  std::vector<EchoResult> echo;       // per layer, cache route only
  std::vector<double> layer_attention_cpu_s;
  double nll = 0.0;
  int nll_tokens = 0;
};

std::vector<double> log_softmax(const std::vector<float>& logits) {
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(l - max);
  std::vector<double> out(logits.size());
  const double log_z = max + std::log(sum);
  for (std::size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - log_z;
  return out;
}

int argmax(const std::vector<float>& v) { return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin()); }

double process_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Times `prompt` (planning, if any, and the forward over the prompt rows,
// which leaves the prompt's K/V in its KVState) in wall and CPU time.
template <class Prompt>
Served time_prompt(Engine& engine, Prompt prompt) {
  Served s;
  engine.timers() = {};
  const auto wall = std::chrono::steady_clock::now();
  const double cpu = process_cpu_s();
  ForwardResult f = prompt();
  s.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall).count();
  s.prefill_cpu_s = process_cpu_s() - cpu;
  const llama::Timers& t = engine.timers();
  s.attention_s = t.attention_s;
  s.attention_cpu_s = t.attention_cpu_s;
  s.hidden = std::move(f.hidden);
  s.logits = std::move(f.logits);
  s.echo = std::move(f.echo);
  s.layer_attention_cpu_s = std::move(f.attention_cpu_s);
  return s;
}

// Scores the reference continuation after the prompt whose K/V is in kv.
void score_continuation(Engine& engine, const ScenarioRequest& r, KVState& kv, Served& s) {
  // Continuation token i is predicted by the row before it.
  s.nll = -log_softmax(s.logits)[r.continuation[0]];
  const std::size_t rest = std::min<std::size_t>(r.continuation.size() - 1,
                                                 static_cast<std::size_t>(engine.config().seq_len - kv.length));
  if (rest > 0) {
    const ForwardResult c = engine.forward(std::span<const int>(r.continuation).first(rest), kv, {}, -1);
    const int V = engine.config().vocab_size;
    for (std::size_t i = 0; i < rest; ++i) {
      const std::vector<float> row(c.logits.begin() + static_cast<std::ptrdiff_t>(i * V),
                                   c.logits.begin() + static_cast<std::ptrdiff_t>((i + 1) * V));
      s.nll -= log_softmax(row)[r.continuation[i + 1]];
    }
  }
  s.nll_tokens = static_cast<int>(rest + 1);
}

// The first serving of a request, with the prompt times of the median one
// by wall time (of an even count, the faster middle one): a slow spell of
// the machine during one serving moves no request's time. Per-layer times
// stay the first serving's, the ones its layers' tiers go with.
Served with_median_time(std::vector<Served>& servings) {
  std::vector<const Served*> by_time;
  for (const Served& s : servings) by_time.push_back(&s);
  const auto middle = by_time.begin() + static_cast<std::ptrdiff_t>((by_time.size() - 1) / 2);
  std::nth_element(by_time.begin(), middle, by_time.end(),
                   [](const Served* a, const Served* b) { return a->prefill_s < b->prefill_s; });
  const Served& median = **middle;
  const double prefill_s = median.prefill_s, attention_s = median.attention_s;
  const double prefill_cpu_s = median.prefill_cpu_s, attention_cpu_s = median.attention_cpu_s;
  Served first = std::move(servings.front());
  first.prefill_s = prefill_s;
  first.attention_s = attention_s;
  first.prefill_cpu_s = prefill_cpu_s;
  first.attention_cpu_s = attention_cpu_s;
  return first;
}

// The measured error of one request against its no-reuse run.
struct Fidelity {
  double hidden_rel_error = 0.0, kl = 0.0;
  bool top1_agrees = true;
  double nll_change = 0.0;  // continuation NLL, mean nats per token, minus no reuse's
};

Fidelity add_fidelity(ModeReport& m, const Served& base, const Served& s) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < base.hidden.size(); ++i) {
    diff += (double(s.hidden[i]) - base.hidden[i]) * (double(s.hidden[i]) - base.hidden[i]);
    norm += double(base.hidden[i]) * base.hidden[i];
  }
  const double rel = std::sqrt(diff / std::max(norm, 1e-30));
  m.hidden_rel_err_sum += rel;
  m.hidden_rel_err_max = std::max(m.hidden_rel_err_max, rel);
  const bool top1 = argmax(base.logits) == argmax(s.logits);
  m.top1_agree += top1;
  const auto p = log_softmax(base.logits), q = log_softmax(s.logits);
  double kl = 0.0;
  for (std::size_t i = 0; i < p.size(); ++i) kl += std::exp(p[i]) * (p[i] - q[i]);
  m.kl_sum += std::max(kl, 0.0);
  return {rel, std::max(kl, 0.0), top1, (s.nll - base.nll) / std::max(s.nll_tokens, 1)};
}

void add_timing(ModeReport& m, const ScenarioRequest& r, const Served& s) {
  ++m.requests;
  m.prefill_s += s.prefill_s;
  m.attention_s += s.attention_s;
  m.prefill_cpu_s += s.prefill_cpu_s;
  m.attention_cpu_s += s.attention_cpu_s;
  m.tokens_total += static_cast<long long>(r.tokens.size());
  m.tokens_computed += static_cast<long long>(r.tokens.size()) - s.reused;
  m.nll_sum += s.nll;
  m.nll_tokens += s.nll_tokens;
}

void add_prefix_tier(ModeReport& m, const ScenarioRequest& r, int reused) {
  if (reused >= r.prefix_length && r.prefix_length > 0) m.exact += 1;
  else if (reused > 0) m.partial += 1;
  else m.miss += 1;
}

// Per-layer tiers of a cache-routed request, and what each tier's layers
// cost next to the same layers of the no-reuse run.
void add_echo_tiers(ModeReport& m, const Served& base, const Served& s) {
  const double w = 1.0 / static_cast<double>(s.echo.size());
  m.layers.resize(s.echo.size());
  for (std::size_t l = 0; l < s.echo.size(); ++l) {
    const EchoResult& e = s.echo[l];
    ModeReport::Layer& layer = m.layers[l];
    if (e.rejected) {
      m.rejected += w;
      ++layer.rejected;
    }
    if (e.tier == Tier::kSparse || e.tier == Tier::kDense) layer.served_error_sum += e.estimated_error;
    switch (e.tier) {
      case Tier::kExact:
        m.exact += w;
        ++layer.exact;
        break;
      case Tier::kSparse:
        m.sparse += w;
        ++layer.sparse;
        m.kept_fraction_sum += e.kept_fraction;
        ++m.sparse_layer_hits;
        m.sparse_layer_s += s.layer_attention_cpu_s[l];
        m.sparse_layer_base_s += base.layer_attention_cpu_s[l];
        break;
      case Tier::kDense:
        m.dense += w;
        ++layer.dense;
        m.dense_layer_s += s.layer_attention_cpu_s[l];
        m.dense_layer_base_s += base.layer_attention_cpu_s[l];
        break;
      case Tier::kNone:
        m.miss += w;
        ++layer.miss;
        (e.rejected ? m.rejected_layer_s : m.miss_layer_s) += s.layer_attention_cpu_s[l];
        (e.rejected ? m.rejected_layer_base_s : m.miss_layer_base_s) += base.layer_attention_cpu_s[l];
        break;
    }
  }
}

double percent(double part, double whole) { return whole > 0 ? 100.0 * part / whole : 0.0; }

std::string fmt(const char* format, double value) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, value);
  return buf;
}

// a / b, or null (JSON) where b has no measurement.
nlohmann::ordered_json ratio_or_null(double a, double b) { return b > 0 ? nlohmann::ordered_json(a / b) : nlohmann::ordered_json(); }

// Per-layer tiers of cache-routed requests, layer 0 first.
nlohmann::ordered_json layers_json(const std::vector<ModeReport::Layer>& layers) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const auto& x : layers)
    out.push_back({{"sparse", x.sparse},
                   {"dense", x.dense},
                   {"exact", x.exact},
                   {"miss", x.miss},
                   {"rejected", x.rejected},
                   {"served_error_mean", ratio_or_null(x.served_error_sum, x.sparse + x.dense)}});
  return out;
}

nlohmann::ordered_json requests_json(const std::vector<ModeReport::Request>& requests) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const auto& q : requests) {
    // The guard's view of a blend: null for a request that was not one.
    const bool blend = q.route == "blend";
    auto blend_only = [blend](auto value) { return blend ? nlohmann::ordered_json(value) : nlohmann::ordered_json(); };
    auto screened_only = [&q](auto value) {
      return q.blend_screened ? nlohmann::ordered_json(value) : nlohmann::ordered_json();
    };
    out.push_back({{"route", q.route},
                   {"tokens", q.tokens},
                   {"reused", q.reused},
                   {"blend_first_layer_rows", q.blend_first_layer},
                   {"blend_reused_rows", q.blend_reused},
                   {"blend_recomputed_rows", q.blend_recomputed},
                   {"blend_rejected", q.blend_rejected},
                   {"blend_calibration", q.blend_calibration},
                   {"estimated_error", q.estimated_error},
                   {"blend_deviation", blend_only(q.blend_deviation)},
                   {"guard_estimate_bound", blend_only(q.blend_bounds.estimate)},
                   {"guard_deviation_bound", blend_only(q.blend_bounds.deviation)},
                   {"blend_refused_at_layer", blend_only(q.blend_refused_at_layer)},
                   {"blend_screened", q.blend_screened},
                   {"screened_deviation", screened_only(q.screened_deviation)},
                   {"screened_refused", screened_only(q.screened_refused)},
                   {"calibration_kl", q.calibration_kl},
                   {"calibration_continuation_kl", q.calibration_continuation_kl},
                   {"hidden_rel_error", q.hidden_rel_error},
                   {"kl", q.kl},
                   {"top1_agrees", q.top1_agrees},
                   {"nll_change", q.nll_change},
                   {"prefill_ms", q.prefill_ms},
                   {"reused_from_l2", q.reused_from_l2},
                   {"repeats_on_another_route", q.repeats_on_another_route}});
  }
  return out;
}

nlohmann::ordered_json l2_json(const L2Stats& s) {
  return {{"lookups", s.lookups},       {"hits", s.hits},         {"misses", s.misses},
          {"hit_rate", s.hit_rate()},   {"rejected", s.rejected}, {"timeouts", s.timeouts},
          {"errors", s.errors},         {"unavailable", s.unavailable}, {"reconnects", s.reconnects},
          {"writes", s.writes},         {"lookup_ms", 1e3 * s.lookup_seconds},
          {"max_lookup_ms", 1e3 * s.max_lookup_seconds}};
}

std::string l2_line(const char* what, const L2Stats& s) {
  char line[320];
  std::snprintf(line, sizeof line,
                "  %-22s %llu looked up, hit rate %.1f%%, %llu rejected, %llu timeouts, %llu errors, "
                "%llu skipped, %llu reconnects, %llu written, longest lookup %.2f ms\n",
                what, static_cast<unsigned long long>(s.lookups), 100.0 * s.hit_rate(),
                static_cast<unsigned long long>(s.rejected), static_cast<unsigned long long>(s.timeouts),
                static_cast<unsigned long long>(s.errors), static_cast<unsigned long long>(s.unavailable),
                static_cast<unsigned long long>(s.reconnects), static_cast<unsigned long long>(s.writes),
                1e3 * s.max_lookup_seconds);
  return line;
}

// The shared store's part of the human table: L1 and L2 hit rates, and what
// the L2 lookups cost next to echo mode's prefill.
std::string format_shared_store(const SharedStoreReport& s, const ModeReport& echo) {
  const double lookup_s = s.kv_blocks.lookup_seconds + s.cache.lookup_seconds;
  char line[320];
  std::snprintf(line, sizeof line,
                "  shared store (echo mode): prompt rows reused from L1 %.1f%%, from L2 %.1f%% "
                "(%d of %d requests used L2)\n",
                percent(s.reused_l1, s.prompt_tokens), percent(s.reused_l2, s.prompt_tokens), s.requests_l2,
                echo.requests);
  std::string out = line;
  out += l2_line("K/V blocks in L2:", s.kv_blocks);
  out += l2_line("cache entries in L2:", s.cache);
  std::snprintf(line, sizeof line, "  L2 lookups took %.2f ms in all, %.3f ms/request, %.2f%% of echo prefill\n",
                1e3 * lookup_s, 1e3 * lookup_s / echo.requests, percent(lookup_s, echo.prefill_s));
  return out + line;
}

nlohmann::ordered_json shared_store_json(const SharedStoreReport& s, const ModeReport& echo) {
  const double lookup_s = s.kv_blocks.lookup_seconds + s.cache.lookup_seconds;
  const double rows = static_cast<double>(std::max<long long>(s.prompt_tokens, 1));
  return {{"l1_reused_fraction", s.reused_l1 / rows},
          {"l2_reused_fraction", s.reused_l2 / rows},
          {"requests_using_l2", s.requests_l2},
          {"l2_lookup_ms", 1e3 * lookup_s},
          {"l2_lookup_ms_per_request", 1e3 * lookup_s / echo.requests},
          {"l2_lookup_share_of_prefill", echo.prefill_s > 0 ? lookup_s / echo.prefill_s : 0.0},
          {"kv_blocks", l2_json(s.kv_blocks)},
          {"cache", l2_json(s.cache)}};
}

double ppl(const ModeReport& m) { return m.nll_tokens ? std::exp(m.nll_sum / m.nll_tokens) : 0.0; }

// What serving a request changes: the echo cache, the planner of the
// exact-prefix mode (no cache, no blending: it always reuses the longest
// stored prefix) and echo mode's planner (every route).
// Both planners write `reserve_bytes` of K/V pages in at construction, as
// a server takes its K/V memory at startup, so that neither mode's requests
// pay for the process growing into memory it never held (KVPagePool).
struct Stack {
  Stack(const llama::Model& model, const BenchOptions& options,
        std::shared_ptr<serving::BlendCalibration> calibration, std::size_t reserve_bytes)
      : cache(cache_config(model, options)),
        exact(model.config(), exact_config(reserve_bytes)),
        echo(model.config(), {.reserve_bytes = reserve_bytes,
                              .cache = &cache,
                              .blend = options.blend,
                              .calibration = std::move(calibration),
                              .store_url = options.store_url,
                              .model_fingerprint = model.fingerprint()}) {}

  static serving::PlannerConfig exact_config(std::size_t reserve_bytes) {
    serving::PlannerConfig config;
    config.reserve_bytes = reserve_bytes;
    return config;
  }

  static EchoConfig cache_config(const llama::Model& model, const BenchOptions& options) {
    EchoConfig config = options.cache;
    config.per_layer = true;
    config.mode = options.mode;
    config.threads = options.threads;
    config.max_prefix_length = model.config().seq_len;
    config.store_url = options.store_url;
    return config;
  }

  AttentionEchoCache cache;
  serving::Planner exact, echo;
};

// One mode's servings of a request, one per stack.
struct Servings {
  std::vector<Served> served;
  Plan plan;            // the first stack's, whose output is scored and reported
  int other_route = 0;  // later stacks that planned the request another way
};

bool same_route(const Plan& a, const Plan& b) {
  return a.route == b.route && a.report.reused == b.report.reused &&
         a.report.blend_reused == b.report.blend_reused && a.report.blend_rejected == b.report.blend_rejected;
}

// The most K/V the scenario's prompts can leave in a planner's store (every
// prompt's pages, none shared), within the store's budget.
std::size_t kv_bytes_to_store(const llama::ModelConfig& c, const Scenario& scenario) {
  const serving::PlannerConfig defaults;
  const std::size_t block = defaults.block_tokens;
  const std::size_t page_bytes = sizeof(float) * 2 * c.n_layers * block * c.kv_dim();
  std::size_t pages = 0;
  for (const ScenarioRequest& r : scenario.requests) pages += (r.tokens.size() + block - 1) / block;
  return std::min(pages * page_bytes, defaults.store_bytes / page_bytes * page_bytes);
}

// One scenario's serving state: an engine and BenchOptions::repeats
// stacks, each serving every request from the same history. The first
// stack's copy of the blend calibration is the run's own (scenarios pass it
// on); the others start from a snapshot of it. Their cost models learn
// from their own measured times, so a stack can come to plan a request
// another way; that is counted, not hidden.
class Bench {
 public:
  Bench(const llama::Model& model, const Scenario& scenario, const BenchOptions& options)
      : pool_(options.threads), engine_(model, pool_), name_space_(scenario.name) {
    if (options.repeats < 1) throw std::invalid_argument("repeats: must be at least 1");
    if (options.repeats > 1 && !options.store_url.empty())
      throw std::invalid_argument("repeats: must be 1 with a shared store (the stacks would read each other's K/V)");
    const auto start = std::chrono::steady_clock::now();
    report_.kv_reserved_bytes = kv_bytes_to_store(model.config(), scenario);
    for (int i = 0; i < options.repeats; ++i) {
      auto calibration = i == 0 || !options.calibration
                             ? options.calibration
                             : std::make_shared<serving::BlendCalibration>(*options.calibration);
      stacks_.push_back(std::make_unique<Stack>(model, options, std::move(calibration), report_.kv_reserved_bytes));
    }
    report_.stacks_setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    report_.scenario = scenario.name;
    report_.description = scenario.description;
    report_.modes.resize(3);
    report_.modes[0].name = "none";
    report_.modes[1].name = "exact-prefix";
    report_.modes[2].name = "echo";
    report_.shared_store.enabled = !options.store_url.empty();
    KVState kv;  // warm-up (thread pool, page faults), not measured
    engine_.forward(std::span<const int>(scenario.requests.front().tokens).first(1), kv, {});
  }

  void request(const ScenarioRequest& r) {
    std::vector<Served> none;
    Servings exact, echo;
    for (std::size_t i = 0; i < stacks_.size(); ++i) {
      Stack& stack = *stacks_[i];
      KVState kv;
      none.push_back(time_prompt(engine_, [&] { return engine_.forward(r.tokens, kv, {}); }));
      if (i == 0) score_continuation(engine_, r, kv, none.back());
      for (serving::Planner* planner : {&stack.exact, &stack.echo})
        planner->observe(static_cast<int>(r.tokens.size()), none.back().prefill_cpu_s, none.back().attention_cpu_s);
      // The two modes take turns going first from request to request, so
      // that neither is always timed in the other's wake (caches, clocks);
      // their ratio is what the targets are about. Within a request the
      // order is the same on every stack, which keeps a mode's servings
      // apart (none, exact, echo, none, exact, echo, ...): with the order
      // flipped between stacks, a slow spell of two servings' length could
      // take two of one mode's three and so its median.
      if (requests_ % 2 == 0) {
        serve_planned(stack.exact, r, exact);
        serve_planned(stack.echo, r, echo);
      } else {
        serve_planned(stack.echo, r, echo);
        serve_planned(stack.exact, r, exact);
      }
    }
    ++requests_;
    const Served base = with_median_time(none);
    add_timing(report_.modes[0], r, base);
    add_fidelity(report_.modes[0], base, base);
    report_.modes[0].miss += 1;
    exact_prefix(r, base, exact);
    echo_mode(r, base, echo);
  }

  ScenarioReport& report() {
    report_.shared_store.kv_blocks = stacks_.front()->echo.l2_stats();
    report_.shared_store.cache = stacks_.front()->cache.l2_stats();
    return report_;
  }

 private:
  // The request planned and executed by `planner`, both timed; the first
  // stack's serving is also scored.
  void serve_planned(serving::Planner& planner, const ScenarioRequest& r, Servings& servings) {
    Plan plan;
    Served s = time_prompt(engine_, [&] {
      plan = planner.plan(r.tokens, r.prefix_length, name_space_);
      return planner.execute(engine_, r.tokens, plan);
    });
    s.reused = plan.report.reused + plan.report.blend_reused;
    if (servings.served.empty()) {
      score_continuation(engine_, r, plan.kv, s);
      servings.plan = std::move(plan);
    } else {
      servings.other_route += !same_route(servings.plan, plan);
    }
    servings.served.push_back(std::move(s));
  }

  // vLLM/SGLang: skip the longest stored token prefix, compute the rest.
  void exact_prefix(const ScenarioRequest& r, const Served& base, Servings& servings) {
    ModeReport& m = report_.modes[1];
    const Served s = timed(m, r, servings);
    add_prefix_tier(m, r, s.reused);
    m.per_request.push_back(detail("reuse", r, servings, add_fidelity(m, base, s), s));
  }

  // The first stack's serving at the median time, counted into m.
  static Served timed(ModeReport& m, const ScenarioRequest& r, Servings& servings) {
    Served s = with_median_time(servings.served);
    add_timing(m, r, s);
    m.repeats_on_another_route += servings.other_route;
    return s;
  }

  static ModeReport::Request detail(const char* route, const ScenarioRequest& r, const Servings& servings,
                                    const Fidelity& f, const Served& s) {
    const serving::PrefillReport& rep = servings.plan.report;
    return {route, static_cast<int>(r.tokens.size()), rep.reused, rep.blend_first_layer, rep.blend_reused,
            rep.blend_recomputed, rep.blend_rejected, rep.blend_calibration, rep.estimated_error, rep.calibration_kl,
            rep.calibration_continuation_kl, rep.blend_deviation, rep.blend_bounds, rep.blend_refused_at_layer,
            rep.blend_screened, rep.screened_refused, rep.screened_deviation, f.hidden_rel_error, f.kl,
            f.top1_agrees, f.nll_change, 1e3 * s.prefill_s, rep.reused_from_l2, servings.other_route};
  }

  // AttentionEcho: whatever the planner chose; the bench counts which route
  // and what each tier served, and keeps every request's guard estimate
  // next to its measured error.
  void echo_mode(const ScenarioRequest& r, const Served& base, Servings& servings) {
    ModeReport& m = report_.modes[2];
    const Plan& plan = servings.plan;
    const Served s = timed(m, r, servings);
    const Fidelity f = add_fidelity(m, base, s);
    const serving::PrefillReport& rep = plan.report;
    const char* route = "reuse";
    if (plan.route == Plan::Route::kCache) {
      route = "cache";
      ++m.routed_cache;
      add_echo_tiers(m, base, s);
    } else if (plan.route == Plan::Route::kBlend) {
      route = "blend";
      ++m.routed_blend;
      m.blend_rejected += rep.blend_rejected;
      add_prefix_tier(m, r, s.reused);
    } else {
      ++m.routed_skip;
      add_prefix_tier(m, r, s.reused);
      m.blend_screened += rep.blend_screened;
      m.screened_refused += rep.screened_refused;
      m.reused_echoed += !plan.reused_exact;
    }
    m.per_request.push_back(detail(route, r, servings, f, s));
    SharedStoreReport& shared = report_.shared_store;
    shared.prompt_tokens += static_cast<long long>(r.tokens.size());
    shared.reused_l1 += rep.reused - rep.reused_from_l2;
    shared.reused_l2 += rep.reused_from_l2;
    shared.requests_l2 += rep.reused_from_l2 > 0;
  }

  ThreadPool pool_;
  Engine engine_;
  std::vector<std::unique_ptr<Stack>> stacks_;
  std::string name_space_;
  ScenarioReport report_;
  int requests_ = 0;
};

}  // namespace

CalibrationReport calibrate_blend(const llama::Model& model, std::span<const std::vector<int>> passages,
                                  const BenchOptions& options) {
  CalibrationReport report;
  std::size_t tokens = 0;
  for (const auto& p : passages) tokens += p.size();
  // A model that cannot blend, too short to blend, or (contexts near 128
  // tokens) longer than the model reads.
  if (!options.blend.enabled || model.config().n_layers < serving::kMinBlendLayers ||
      tokens < serving::kMinCalibrationSample ||
      tokens > static_cast<std::size_t>(model.config().seq_len))
    return report;
  ThreadPool pool(options.threads);
  llama::Engine engine(model, pool);
  serving::PlannerConfig config;  // calibration only: no cache, no shared store
  config.blend = options.blend;
  config.calibration = options.calibration;
  serving::Planner planner(model.config(), config);
  const auto start = std::chrono::steady_clock::now();
  report.samples = planner.calibrate(engine, passages);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  report.threshold = options.calibration->threshold({}, options.blend);  // no namespace has samples yet: the model's
  report.blend_cost_factor = options.calibration->blend_cost_factor();
  report.ran = true;
  return report;
}

nlohmann::ordered_json to_json(const CalibrationReport& report) {
  nlohmann::ordered_json samples = nlohmann::ordered_json::array();
  for (const serving::CalibrationSample& s : report.samples)
    samples.push_back({{"estimate", s.estimate},
                       {"kl", s.kl},
                       {"deviation", s.deviation},
                       {"continuation_kl", s.continuation_kl},
                       {"selection", serving::to_string(s.selection)}});
  return {{"ran", report.ran},
          {"seconds", report.seconds},
          {"samples", samples},
          {"threshold", report.threshold.estimate},
          {"deviation_threshold", report.threshold.deviation},
          {"blend_cost_factor", report.blend_cost_factor}};
}

ScenarioReport run_scenario(const llama::Model& model, const Scenario& scenario, const BenchOptions& options,
                            const Progress& progress) {
  if (scenario.requests.empty()) throw std::invalid_argument("scenario: no requests");
  for (const ScenarioRequest& r : scenario.requests)
    if (r.continuation.empty() || r.prefix_length < 0 || r.prefix_length >= static_cast<int>(r.tokens.size()))
      throw std::invalid_argument("scenario: every request needs a continuation and a prefix shorter than its prompt");
  Bench bench(model, scenario, options);
  long long prompt_tokens = 0, prefix_tokens = 0;
  const int total = static_cast<int>(scenario.requests.size());
  for (int i = 0; i < total; ++i) {
    bench.request(scenario.requests[i]);
    prompt_tokens += static_cast<long long>(scenario.requests[i].tokens.size());
    prefix_tokens += scenario.requests[i].prefix_length;
    if (progress) progress(i + 1, total);
  }
  ScenarioReport& report = bench.report();
  report.mean_prompt_tokens = static_cast<int>(prompt_tokens / total);
  report.mean_prefix_tokens = static_cast<int>(prefix_tokens / total);
  return report;
}

std::string format_report(const ScenarioReport& r) {
  std::ostringstream out;
  const ModeReport& base = r.modes[0];
  const int n = base.requests;
  out << "== " << r.scenario << ": " << r.description << "\n   " << n << " requests, prompt " << r.mean_prompt_tokens
      << " tokens on average, shared context " << r.mean_prefix_tokens << "\n   K/V pages reserved before serving: "
      << (r.kv_reserved_bytes >> 20) << " MiB per planner, stacks set up in " << r.stacks_setup_s << " s\n";
  char line[256];
  auto row = [&](const char* label, auto cell) {
    std::snprintf(line, sizeof line, "  %-28s", label);
    out << line;
    for (const ModeReport& m : r.modes) {
      std::snprintf(line, sizeof line, " %18s", cell(m).c_str());
      out << line;
    }
    out << "\n";
  };
  row("", [](const ModeReport& m) { return m.name; });
  row("prefill (TTFT) ms/request", [&](const ModeReport& m) { return fmt("%.1f", 1e3 * m.prefill_s / n); });
  row("  speedup", [&](const ModeReport& m) { return fmt("%.2fx", base.prefill_s / m.prefill_s); });
  row("  speedup in CPU time", [&](const ModeReport& m) { return fmt("%.2fx", base.prefill_cpu_s / m.prefill_cpu_s); });
  row("attention ms/request", [&](const ModeReport& m) { return fmt("%.1f", 1e3 * m.attention_s / n); });
  row("  speedup", [&](const ModeReport& m) { return fmt("%.2fx", base.attention_s / m.attention_s); });
  row("  speedup in CPU time", [&](const ModeReport& m) { return fmt("%.2fx", base.attention_cpu_s / m.attention_cpu_s); });
  row("attention share of prefill", [](const ModeReport& m) { return fmt("%.0f%%", percent(m.attention_s, m.prefill_s)); });
  row("prompt rows computed", [](const ModeReport& m) { return fmt("%.0f%%", percent(m.tokens_computed, m.tokens_total)); });
  row("hits: exact", [&](const ModeReport& m) { return fmt("%.0f%%", percent(m.exact, n)); });
  row("      partial prefix", [&](const ModeReport& m) { return fmt("%.0f%%", percent(m.partial, n)); });
  row("      sparse", [&](const ModeReport& m) { return fmt("%.0f%%", percent(m.sparse, n)); });
  row("      dense", [&](const ModeReport& m) { return fmt("%.0f%%", percent(m.dense, n)); });
  row("      miss (incl. rejected)", [&](const ModeReport& m) { return fmt("%.0f%%", percent(m.miss, n)); });
  row("      rejected by the guard", [&](const ModeReport& m) { return fmt("%.0f%%", percent(m.rejected, n)); });
  row("routes skip / cache", [](const ModeReport& m) {
    return m.name == "echo" ? std::to_string(m.routed_skip) + " / " + std::to_string(m.routed_cache) : std::string("-");
  });
  row("routes blend (guard refused)", [](const ModeReport& m) {
    return m.name == "echo" ? std::to_string(m.routed_blend) + " (" + std::to_string(m.blend_rejected) + ")"
                            : std::string("-");
  });
  row("blends screened (refused)", [](const ModeReport& m) {
    return m.name == "echo" ? std::to_string(m.blend_screened) + " (" + std::to_string(m.screened_refused) + ")"
                            : std::string("-");
  });
  row("repeats on another route", [](const ModeReport& m) {
    return m.name == "none" ? std::string("-") : std::to_string(m.repeats_on_another_route);
  });
  row("requests reusing echoed K/V", [](const ModeReport& m) {
    return m.name == "echo" ? std::to_string(m.reused_echoed) : std::string("-");
  });
  row("kept fraction (sparse hits)", [](const ModeReport& m) {
    return m.sparse_layer_hits ? fmt("%.2f", m.kept_fraction_sum / m.sparse_layer_hits) : std::string("-");
  });
  auto ratio = [](double a, double b) { return b > 0 ? fmt("%.2fx", a / b) : std::string("-"); };
  row("sparse-hit layers: attn speedup", [&](const ModeReport& m) { return ratio(m.sparse_layer_base_s, m.sparse_layer_s); });
  row("dense-hit layers: attn speedup", [&](const ModeReport& m) { return ratio(m.dense_layer_base_s, m.dense_layer_s); });
  row("missed layers: attn speedup", [&](const ModeReport& m) { return ratio(m.miss_layer_base_s, m.miss_layer_s); });
  row("rejected layers: attn speedup", [&](const ModeReport& m) { return ratio(m.rejected_layer_base_s, m.rejected_layer_s); });
  row("hidden rel. error mean", [&](const ModeReport& m) { return fmt("%.2e", m.hidden_rel_err_sum / n); });
  row("hidden rel. error max", [](const ModeReport& m) { return fmt("%.2e", m.hidden_rel_err_max); });
  row("next-token top-1 agreement", [&](const ModeReport& m) { return fmt("%.1f%%", percent(m.top1_agree, n)); });
  row("next-token KL mean (nats)", [&](const ModeReport& m) { return fmt("%.2e", m.kl_sum / n); });
  row("continuation perplexity", [](const ModeReport& m) { return fmt("%.4f", ppl(m)); });
  row("  change vs none", [&](const ModeReport& m) { return fmt("%+.3f%%", 100.0 * (ppl(m) / ppl(base) - 1.0)); });
  if (r.shared_store.enabled) out << format_shared_store(r.shared_store, r.modes[2]);
  return out.str();
}

nlohmann::ordered_json reports_to_json(const std::vector<ScenarioReport>& reports, nlohmann::ordered_json meta) {
  nlohmann::ordered_json scenarios = nlohmann::ordered_json::array();
  for (const ScenarioReport& r : reports) {
    const ModeReport& base = r.modes[0];
    nlohmann::ordered_json modes = nlohmann::ordered_json::object();
    for (const ModeReport& m : r.modes) {
      const double n = m.requests;
      modes[m.name] = {
          {"prefill_ms_mean", 1e3 * m.prefill_s / n},
          {"prefill_speedup", base.prefill_s / m.prefill_s},
          {"attention_ms_mean", 1e3 * m.attention_s / n},
          {"attention_speedup", base.attention_s / m.attention_s},
          {"attention_share", m.attention_s / m.prefill_s},
          {"prefill_cpu_ms_mean", 1e3 * m.prefill_cpu_s / n},
          {"prefill_cpu_speedup", base.prefill_cpu_s / m.prefill_cpu_s},
          {"attention_cpu_ms_mean", 1e3 * m.attention_cpu_s / n},
          {"attention_cpu_speedup", base.attention_cpu_s / m.attention_cpu_s},
          {"rows_computed_fraction", double(m.tokens_computed) / m.tokens_total},
          {"hit_rate",
           {{"exact", m.exact / n},
            {"partial", m.partial / n},
            {"sparse", m.sparse / n},
            {"dense", m.dense / n},
            {"miss", m.miss / n},
            {"rejected", m.rejected / n}}},
          {"routed_skip", m.routed_skip},
          {"routed_cache", m.routed_cache},
          {"reused_echoed_kv", m.reused_echoed},
          {"routed_blend", m.routed_blend},
          {"repeats_on_another_route", m.repeats_on_another_route},
          {"blend_rejected", m.blend_rejected},
          {"blend_screened", m.blend_screened},
          {"screened_refused", m.screened_refused},
          {"kept_fraction", ratio_or_null(m.kept_fraction_sum, double(m.sparse_layer_hits))},
          {"layer_attention_speedup",
           {{"sparse", ratio_or_null(m.sparse_layer_base_s, m.sparse_layer_s)},
            {"dense", ratio_or_null(m.dense_layer_base_s, m.dense_layer_s)},
            {"miss", ratio_or_null(m.miss_layer_base_s, m.miss_layer_s)},
            {"rejected", ratio_or_null(m.rejected_layer_base_s, m.rejected_layer_s)}}},
          {"layers", layers_json(m.layers)},
          {"hidden_rel_error_mean", m.hidden_rel_err_sum / n},
          {"hidden_rel_error_max", m.hidden_rel_err_max},
          {"top1_agreement", m.top1_agree / n},
          {"kl_mean", m.kl_sum / n},
          {"perplexity", ppl(m)},
          {"perplexity_change", ppl(m) / ppl(base) - 1.0},
          {"requests_detail", requests_json(m.per_request)}};
    }
    scenarios.push_back({{"scenario", r.scenario},
                         {"description", r.description},
                         {"requests", base.requests},
                         {"mean_prompt_tokens", r.mean_prompt_tokens},
                         {"mean_prefix_tokens", r.mean_prefix_tokens},
                         {"kv_reserved_bytes", r.kv_reserved_bytes},
                         {"stacks_setup_s", r.stacks_setup_s},
                         {"modes", std::move(modes)}});
    if (r.shared_store.enabled) scenarios.back()["shared_store"] = shared_store_json(r.shared_store, r.modes[2]);
  }
  meta["scenarios"] = std::move(scenarios);
  return meta;
}

}  // namespace attention_echo::bench
