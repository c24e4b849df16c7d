// Helpers shared by the tests that run the Llama engine: a prompt's logits
// without reuse (the reference every reuse path is held to) and the largest
// elementwise difference of two logit vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_echo/engine.hpp"

namespace attention_echo::testing {

// The last row's logits of `tokens` prefilled from empty K/V.
inline std::vector<float> last_logits(llama::Engine& engine, const std::vector<int>& tokens) {
  llama::KVState kv;
  return engine.forward(tokens, kv, {}).logits;
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  return worst;
}

}  // namespace attention_echo::testing
