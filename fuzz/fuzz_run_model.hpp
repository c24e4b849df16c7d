// What a loader fuzz target does with weights that loaded: builds the model
// and runs two tokens through it when it is small enough to be quick and
// its weights are moderate (|w| <= 16: no activation can overflow to Inf
// in two tokens of a model this small, so the forward must succeed).
// Weights that disagree with their config are read out of bounds here.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_echo/llama.hpp"
#include "attention_echo/thread_pool.hpp"

namespace attention_echo::fuzzing {

inline bool moderate(const std::vector<float>& tensor) {
  return std::all_of(tensor.begin(), tensor.end(), [](float x) { return std::fabs(x) <= 16.0f; });
}

inline bool moderate(const llama::Weights& w) {
  bool ok = moderate(w.token_embedding) && moderate(w.final_norm) && moderate(w.classifier);
  for (const llama::Weights::Layer& l : w.layers)
    ok = ok && moderate(l.attn_norm) && moderate(l.wq) && moderate(l.wk) && moderate(l.wv) && moderate(l.wo) &&
         moderate(l.ffn_norm) && moderate(l.w_gate) && moderate(l.w_down) && moderate(l.w_up);
  return ok;
}

inline void run_if_small(const llama::Weights& weights) {
  const llama::ModelConfig& c = weights.config;
  if (c.dim > 64 || c.hidden_dim > 256 || c.n_layers > 2 || c.vocab_size > 512 || c.seq_len < 2) return;
  if (!moderate(weights)) return;
  static ThreadPool pool(1);
  const llama::Model model(weights);
  llama::Engine engine(model, pool);
  llama::KVState kv;
  const std::vector<int> tokens = {0, c.vocab_size - 1};
  engine.forward(tokens, kv, {});
}

}  // namespace attention_echo::fuzzing
