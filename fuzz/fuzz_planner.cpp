// The prefill planner end to end on a tiny random Llama: prompts built by
// the input from earlier ones (shared prefixes, passages moved, edits, new
// tokens) in two namespaces, planned and executed under a config the input
// picks (blending on or off, each row selection, guards from none to
// refusing everything, a store of a few blocks to many), with bad requests
// among them. Whatever the route, the logits must be finite and the
// prompt's K/V whole; a prompt served exactly (exact prefix reuse, a
// refused or calibration blend) must match a full prefill; a bad request
// must throw std::invalid_argument and leave the store as it was. Under
// ASan this walks the paged K/V sharing, donor rows, re-rotation and the
// guard's fallbacks with inputs no test wrote.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_echo/engine.hpp"
#include "attention_echo/llama.hpp"
#include "attention_echo/serving.hpp"
#include "attention_echo/thread_pool.hpp"
#include "fuzz_require.hpp"

namespace {

namespace llama = attention_echo::llama;
namespace serving = attention_echo::serving;

using attention_echo::fuzzing::require;

const llama::Model& tiny_model() {
  static const auto model = [] {
    llama::Weights w;
    w.config = {.dim = 64, .hidden_dim = 128, .n_layers = 3, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 48,
                .seq_len = 512};
    const llama::ModelConfig& c = w.config;
    std::mt19937 rng(7);
    auto fill = [&](std::vector<float>& m, std::size_t n, float scale) {
      std::normal_distribution<float> normal(0.0f, scale);
      m.resize(n);
      for (float& x : m) x = normal(rng);
    };
    const float s = 1.0f / std::sqrt(static_cast<float>(c.dim));
    fill(w.token_embedding, std::size_t(c.vocab_size) * c.dim, 1.0f);
    for (int l = 0; l < c.n_layers; ++l) {
      llama::Weights::Layer layer;
      layer.attn_norm.assign(c.dim, 1.0f);
      layer.ffn_norm.assign(c.dim, 1.0f);
      fill(layer.wq, std::size_t(c.dim) * c.dim, s);
      fill(layer.wk, std::size_t(c.kv_dim()) * c.dim, s);
      fill(layer.wv, std::size_t(c.kv_dim()) * c.dim, s);
      fill(layer.wo, std::size_t(c.dim) * c.dim, s);
      fill(layer.w_gate, std::size_t(c.hidden_dim) * c.dim, s);
      fill(layer.w_up, std::size_t(c.hidden_dim) * c.dim, s);
      fill(layer.w_down, std::size_t(c.dim) * c.hidden_dim, 1.0f / std::sqrt(static_cast<float>(c.hidden_dim)));
      w.layers.push_back(std::move(layer));
    }
    w.final_norm.assign(c.dim, 1.0f);
    return std::make_unique<const llama::Model>(w);
  }();
  return *model;
}

// A prompt: new tokens, an earlier prompt edited (tokens substituted,
// inserted, deleted), or chunks of earlier prompts in another order.
std::vector<int> next_prompt(FuzzedDataProvider& in, const std::vector<std::vector<int>>& earlier, int vocab) {
  std::vector<int> tokens;
  const int kind = earlier.empty() ? 0 : in.ConsumeIntegralInRange(0, 2);
  if (kind == 0) {  // from a seed: a few input bytes make a long prompt
    tokens.resize(in.ConsumeIntegralInRange(1, 320));
    std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
    for (int& t : tokens) t = static_cast<int>(rng() % vocab);
  } else if (kind == 1) {
    tokens = earlier[in.ConsumeIntegralInRange<std::size_t>(0, earlier.size() - 1)];
    for (int edit = in.ConsumeIntegralInRange(1, 4); edit > 0 && !tokens.empty(); --edit) {
      const auto at = tokens.begin() + in.ConsumeIntegralInRange<std::size_t>(0, tokens.size() - 1);
      switch (in.ConsumeIntegralInRange(0, 2)) {
        case 0: *at = in.ConsumeIntegralInRange(0, vocab - 1); break;
        case 1: tokens.insert(at, in.ConsumeIntegralInRange(1, 16), in.ConsumeIntegralInRange(0, vocab - 1)); break;
        default: tokens.erase(at); break;
      }
    }
    if (tokens.empty()) tokens.push_back(0);
  } else {
    for (int part = in.ConsumeIntegralInRange(2, 6); part > 0; --part) {
      const auto& from = earlier[in.ConsumeIntegralInRange<std::size_t>(0, earlier.size() - 1)];
      const std::size_t start = in.ConsumeIntegralInRange<std::size_t>(0, from.size() - 1);
      const std::size_t length = in.ConsumeIntegralInRange<std::size_t>(1, from.size() - start);
      tokens.insert(tokens.end(), from.begin() + start, from.begin() + start + length);
    }
  }
  tokens.resize(std::min<std::size_t>(tokens.size(), 400));
  return tokens;
}

serving::PlannerConfig planner_config(FuzzedDataProvider& in, const llama::ModelConfig& c) {
  serving::PlannerConfig config;
  const std::size_t block_bytes = std::size_t{2} * c.n_layers * config.block_tokens * c.kv_dim() * sizeof(float);
  config.store_bytes = in.ConsumeIntegralInRange<std::size_t>(1, 64) * block_bytes;
  serving::BlendConfig& b = config.blend;
  b.enabled = in.ConsumeIntegralInRange(0, 3) != 0;  // mostly: the blend tier is what this fuzzes
  b.selection = in.PickValueInArray(
      {serving::BlendSelection::kAuto, serving::BlendSelection::kRunStart, serving::BlendSelection::kDeviation});
  b.recompute_ratio = in.ConsumeIntegralInRange(0, 5) / 10.0;  // above that no blend is worth planning
  b.max_error = in.PickValueInArray({0.0, 0.05, 0.2, std::numeric_limits<double>::infinity()});
  b.calibrate_every = in.ConsumeIntegralInRange(0, 4);
  b.probe_rows = in.ConsumeIntegralInRange(0, 16);
  b.recent_rows = in.ConsumeIntegralInRange(0, 16);
  b.attended_rows = in.ConsumeIntegralInRange(0, 16);
  return config;
}

// A request the planner must refuse, naming it, storing nothing.
void check_refused(serving::Planner& planner, FuzzedDataProvider& in, std::vector<int> tokens, int vocab, int context) {
  int prefix = 0;
  switch (in.ConsumeIntegralInRange(0, 3)) {
    case 0: tokens.clear(); break;
    case 1: tokens.push_back(in.ConsumeBool() ? vocab : -1); break;
    case 2: tokens.resize(context + 1, 0); break;
    default: prefix = static_cast<int>(tokens.size()); break;  // the last token must be computed
  }
  const std::size_t prompts = planner.stored_prompts(), bytes = planner.stored_bytes();
  try {
    planner.plan(tokens, prefix);
    std::abort();
  } catch (const std::invalid_argument&) {
  }
  require(planner.stored_prompts() == prompts && planner.stored_bytes() == bytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static attention_echo::ThreadPool pool(1);
  const llama::Model& model = tiny_model();
  const llama::ModelConfig& c = model.config();
  llama::Engine engine(model, pool);
  FuzzedDataProvider in(data, size);
  serving::Planner planner(c, planner_config(in, c));
  planner.observe(256, 2e-3, 5e-4);  // a cost model to price routes with
  std::vector<std::vector<int>> prompts;
  for (int request = 0; request < 6 && in.remaining_bytes() > 0; ++request) {
    std::vector<int> tokens = next_prompt(in, prompts, c.vocab_size);
    if (in.ConsumeIntegralInRange(0, 7) == 0) {
      check_refused(planner, in, std::move(tokens), c.vocab_size, c.seq_len);
      continue;
    }
    const int T = static_cast<int>(tokens.size());
    const std::string name_space = in.ConsumeBool() ? "a" : "b";
    serving::Plan plan = planner.plan(tokens, in.ConsumeIntegralInRange(0, T - 1), name_space);
    const llama::ForwardResult served = planner.execute(engine, tokens, plan);
    const serving::PrefillReport& report = plan.report;
    require(plan.kv.length == T && report.reused >= 0 && report.reused < T);
    require(served.logits.size() == static_cast<std::size_t>(c.vocab_size));
    for (float x : served.logits) require(std::isfinite(x));
    require(report.estimated_error >= 0.0 && std::isfinite(report.estimated_error));
    const bool blended = plan.route == serving::Plan::Route::kBlend;
    const bool exact = blended ? report.blend_rejected || report.blend_calibration : report.reused_exact;
    if (exact) {
      llama::KVState kv;
      const std::vector<float> reference = engine.forward(tokens, kv, {}).logits;
      float scale = 1.0f;
      for (float x : reference) scale = std::max(scale, std::fabs(x));
      // Exact routes read 1e-5 of the scale or closer; a served blend on
      // this model is past 1e-4 within a minute of fuzzing.
      for (int v = 0; v < c.vocab_size; ++v) require(std::fabs(served.logits[v] - reference[v]) <= 1e-4f * scale);
    }
    prompts.push_back(std::move(tokens));
  }
  return 0;
}
